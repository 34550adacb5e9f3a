//! qemu-io's `truncate`, `length` and `info`.

use super::commands::{CmdInfo, Session};
use super::getopt::{getopt, Opt};
use super::numbers::{cvtnum, print_cvtnum_err};
use super::open::Image;
use super::output::*;
use crate::common::prog;

/// QEMU's preallocation modes (`PreallocMode`).
const PREALLOC_MODES: &[&str] = &["off", "metadata", "falloc", "full"];

impl Session {
    /// `truncate [-m prealloc_mode] off`: the image's new virtual size (growing or shrinking,
    /// as qemu-io's `blk_truncate` allows).
    pub(super) fn truncate(&mut self, ci: &CmdInfo, name: &str, img: &Image, args: &[&str]) -> i32 {
        let (opts, operands) = getopt(name, args, "m:");
        let mut prealloc = "off".to_string();
        for o in opts {
            match o {
                Opt::Flag('m', Some(v)) => {
                    if !PREALLOC_MODES.contains(&v.as_str()) {
                        errln!("{}: Invalid preallocation mode '{v}'", prog());
                        return -EINVAL;
                    }
                    prealloc = v;
                }
                Opt::Bad(msg) => {
                    errln!("{msg}");
                    return self.usage(ci);
                }
                Opt::Flag(_, _) => return self.usage(ci),
            }
        }
        // qemu-io takes the first operand and ignores the others.
        let Some(arg) = operands.first() else {
            return self.usage(ci);
        };
        let size = match cvtnum(arg) {
            Ok(v) => v as u64,
            Err(e) => {
                print_cvtnum_err(&mut self.out, e, args[0]);
                return -e;
            }
        };
        let r = if size % 512 != 0 {
            Err("The new size must be a multiple of 512".to_string())
        } else {
            resize(img, size, &prealloc)
        };
        match r {
            Ok(()) => 0,
            Err(m) => {
                errln!("{}: {m}", prog());
                -EINVAL
            }
        }
    }

    /// `length`: the virtual size, as qemu-io's `cvtstr` prints it.
    pub(super) fn length(&mut self, img: &Image) -> i32 {
        let s = cvtstr(img.dev.size() as f64);
        out!(self.out, "{s}\n");
        0
    }

    /// `info`: the driver, cluster size, VM state offset and (qcow2) the format-specific data,
    /// as `qemu-img info` dumps them.
    pub(super) fn info(&mut self, img: &Image) -> i32 {
        out!(self.out, "format name: {}\n", img.driver);
        if super::open::PROTOCOLS.contains(&img.driver.as_str()) {
            // A protocol driver is named by both its format and its protocol name.
            out!(self.out, "format name: {}\n", img.driver);
        }
        let Some(q) = &img.qcow2 else {
            out!(
                self.out,
                "cluster size: 0 bytes\nvm state offset: 0 bytes\n"
            );
            return 0;
        };
        let h = q.header();
        let cs = q.cluster_size();
        let entry = if h.has_extended_l2() { 16 } else { 8 };
        // The VM state lies after the guest data, from the first L1 entry the disk does not use.
        let coverage = cs.saturating_mul(cs / entry).max(1);
        let vm_state = h.size.div_ceil(coverage).saturating_mul(coverage);
        out!(
            self.out,
            "cluster size: {}\nvm state offset: {}\n",
            cvtstr(cs as f64),
            cvtstr(vm_state as f64)
        );
        let opened = qcow2kit::chain::Opened {
            device: img.dev.clone(),
            qcow2: Some(q.clone()),
            format: qcow2kit::Format::Qcow2,
            path: std::path::PathBuf::new(),
            layers: Vec::new(),
        };
        match qcow2kit::ops::info::image_info(&opened) {
            Ok(info) => {
                if let Some(spec) = &info.qcow2 {
                    self.out.print(&crate::info::format_specific_text(spec));
                }
                0
            }
            Err(e) => {
                errln!("{}: {e}", prog());
                -EIO
            }
        }
    }
}

/// Resizes the image to `size` with the preallocation mode `prealloc`: raw images allocate
/// a grown range (`falloc`, `full`) by writing zeros; qcow2 images take `off` only.
fn resize(img: &Image, size: u64, prealloc: &str) -> Result<(), String> {
    let old = img.dev.size();
    if prealloc != "off" && size < old {
        return Err(match img.qcow2 {
            Some(_) => "Preallocation can't be used for shrinking an image".into(),
            None => "Cannot use preallocation for shrinking files".into(),
        });
    }
    match (prealloc, img.qcow2.is_some()) {
        ("off", _) => {}
        (_, true) => {
            return Err(format!(
                "truncate: preallocation mode '{prealloc}' is not supported by qcow2kit"
            ))
        }
        ("metadata", false) => return Err("Unsupported preallocation mode: metadata".into()),
        _ => {}
    }
    img.dev.resize(size, true).map_err(|e| truncate_error(&e))?;
    if prealloc == "off" {
        return Ok(());
    }
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut pos = old;
    while pos < size {
        let n = (size - pos).min(ZERO_CHUNK as u64) as usize;
        img.dev
            .write_at(&zeros[..n], pos)
            .map_err(|e| truncate_error(&e))?;
        pos += n as u64;
    }
    Ok(())
}

/// Bytes of zeros written at a time to preallocate a grown raw image.
const ZERO_CHUNK: usize = 1 << 20;

/// QEMU's words for a failed resize of the image.
fn truncate_error(e: &qcow2kit::Error) -> String {
    match e {
        qcow2kit::Error::ReadOnly => "Block node is read-only".into(),
        other => other.to_string(),
    }
}
