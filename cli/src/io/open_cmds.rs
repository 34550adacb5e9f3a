//! The `open`, `close`, `reopen` and `sigraise` commands.

use super::commands::{CmdInfo, Session};
use super::getopt::{getopt, Opt};
use super::numbers::{cvtnum, print_cvtnum_err};
use super::open::{
    close_image, open_image, parse_cache, parse_discard, Image, OpenError, OpenSpec,
    NO_EFFECT_BOOLS,
};
use super::output::EINVAL;
use super::qcow2_opts::{is_runtime_key, take_qcow2_options, ImageFacts};
use super::qopts::{parse_bool, Opts};
use crate::common::prog;

/// glibc's `NSIG`: signal numbers above it are refused.
const NSIG: i64 = 65;

/// The overlap-check options: a new template replaces all of them (QEMU's qcow2 join rule).
const OVERLAP_KEYS_PREFIX: &str = "overlap-check";

impl Session {
    /// `open [-rsCnkU] [-t cache] [-d discard] [-o options] [path]`.
    pub(super) fn open_cmd(&mut self, ci: &CmdInfo, name: &str, args: &[&str]) -> i32 {
        let (flags, mut operands) = getopt(name, args, "snCro:ki:t:d:U");
        let mut spec = OpenSpec {
            name: None,
            opts: Opts::default(),
            read_only: false,
            force_share: false,
        };
        let (mut writethrough, mut unmap) = (true, true);
        for f in flags {
            match f {
                Opt::Bad(msg) => {
                    errln!("{msg}");
                    return self.usage(ci);
                }
                Opt::Flag('r', _) => spec.read_only = true,
                Opt::Flag('U', _) => spec.force_share = true,
                Opt::Flag('n', _) => writethrough = false,
                Opt::Flag('s' | 'C', _) => {
                    errln!(
                        "{}: io: snapshot mode (-s) and copy-on-read (-C) are not supported",
                        prog()
                    );
                    return -EINVAL;
                }
                Opt::Flag('t', Some(v)) => match parse_cache(&v) {
                    Ok(w) => writethrough = w,
                    Err(e) => {
                        errln!("{}: {e}", prog());
                        return -EINVAL;
                    }
                },
                Opt::Flag('d', Some(v)) => match parse_discard(&v) {
                    Some(u) => unmap = u,
                    None => {
                        errln!("{}: Invalid discard option: {v}", prog());
                        return -EINVAL;
                    }
                },
                Opt::Flag('i', Some(v)) => {
                    if !matches!(v.as_str(), "threads" | "native" | "io_uring") {
                        errln!("{}: Invalid aio option: {v}", prog());
                        return -EINVAL;
                    }
                }
                Opt::Flag('o', Some(v)) => {
                    if self.image_opts {
                        out!(
                            self.out,
                            "--image-opts and 'open -o' are mutually exclusive\n"
                        );
                        return -EINVAL;
                    }
                    if let Err(e) = spec.opts.parse_into(&v) {
                        errln!("{}: {e}", prog());
                        return -EINVAL;
                    }
                }
                Opt::Flag(_, _) => {} // -k: no effect
            }
        }
        if self.image_opts && operands.len() == 1 {
            if let Some(text) = operands.pop() {
                if let Err(e) = spec.opts.parse_into(&text) {
                    errln!("{}: {e}", prog());
                    return -EINVAL;
                }
            }
        }
        match operands.len() {
            0 => {}
            1 => spec.name = operands.pop(),
            _ => return self.usage(ci),
        }
        if self.img.is_some() {
            errln!("{}: file open already, try 'help close'", prog());
            return -EINVAL;
        }
        match open_image(&spec, writethrough, unmap) {
            Ok(img) => {
                self.img = Some(img);
                0
            }
            Err(e) => {
                report_open_error(spec.name.as_deref(), e);
                -EINVAL
            }
        }
    }

    /// `close`.
    pub(super) fn close_cmd(&mut self) -> i32 {
        if let Some(img) = self.img.take() {
            if let Err(e) = close_image(img) {
                errln!("{}: {e}", prog());
            }
        }
        0
    }

    /// `reopen [(-r|-w)] [-c cache] [-o options]`: the image opened again with the new mode
    /// and options laid over the ones it was opened with.
    pub(super) fn reopen_cmd(&mut self, ci: &CmdInfo, name: &str, args: &[&str]) -> i32 {
        let Some(img) = &self.img else {
            return -EINVAL;
        };
        let (flags, operands) = getopt(name, args, "c:o:rw");
        let mut new = Opts::default();
        let mut writethrough = img.writethrough;
        let mut cache_flag = false;
        let mut rw_flag: Option<bool> = None;
        for f in flags {
            match f {
                Opt::Bad(msg) => {
                    errln!("{msg}");
                    return self.usage(ci);
                }
                Opt::Flag('c', Some(v)) => match parse_cache(&v) {
                    Ok(w) => {
                        writethrough = w;
                        cache_flag = true;
                    }
                    Err(e) => {
                        errln!("{}: {e}", prog());
                        return -EINVAL;
                    }
                },
                Opt::Flag('o', Some(v)) => {
                    if let Err(e) = new.parse_into(&v) {
                        errln!("{}: {e}", prog());
                        return -EINVAL;
                    }
                }
                Opt::Flag(c, _) => {
                    if rw_flag.is_some() {
                        errln!("{}: Only one -r/-w option may be given", prog());
                        return -EINVAL;
                    }
                    rw_flag = Some(c == 'r');
                }
            }
        }
        if !operands.is_empty() {
            return self.usage(ci);
        }
        match reopened_spec(img, rw_flag, cache_flag, &new) {
            Ok((spec, unmap, l2)) => self.reopen_with(spec, l2, writethrough, unmap),
            Err(e) => {
                errln!("{}: {e}", prog());
                -EINVAL
            }
        }
    }

    /// Replaces the image by one opened as `spec` (only when the mode or the cache changes:
    /// otherwise the same image stays open); on failure the image is opened as it was.
    fn reopen_with(
        &mut self,
        spec: OpenSpec,
        l2_cache_bytes: Option<u64>,
        writethrough: bool,
        unmap: bool,
    ) -> i32 {
        let Some(cur) = &mut self.img else {
            return -EINVAL;
        };
        if spec.read_only == cur.read_only && l2_cache_bytes == cur.runtime.l2_cache_bytes {
            cur.writethrough = writethrough;
            cur.unmap = unmap;
            cur.spec = spec;
            return 0;
        }
        // The old image lets go of its file (and locks) before the new open takes them: this
        // session holds the only references.
        let Some(old) = self.img.take() else {
            return -EINVAL;
        };
        let old_spec = old.spec.clone();
        let (old_wt, old_unmap) = (old.writethrough, old.unmap);
        if let Err(e) = close_image(old) {
            errln!("{}: {e}", prog());
        }
        match open_image(&spec, writethrough, unmap) {
            Ok(new) => {
                self.img = Some(new);
                0
            }
            Err(e) => {
                match e {
                    OpenError::Reason(m) | OpenError::Plain(m) => errln!("{}: {m}", prog()),
                }
                match open_image(&old_spec, old_wt, old_unmap) {
                    Ok(back) => self.img = Some(back),
                    Err(e) => report_open_error(old_spec.name.as_deref(), e),
                }
                -EINVAL
            }
        }
    }

    /// `sigraise SIGNAL`: standard output and error flushed, then the signal raised.
    pub(super) fn sigraise(&mut self, arg: &str) -> i32 {
        let sig = match cvtnum(arg) {
            Ok(s) => s,
            Err(e) => {
                print_cvtnum_err(&mut self.out, e, arg);
                return -e;
            }
        };
        if sig > NSIG {
            out!(
                self.out,
                "signal argument '{arg}' is too large to be a valid signal\n"
            );
            return -EINVAL;
        }
        self.out.flush();
        super::signal::raise(sig as i32);
        0
    }
}

/// Prints qemu-io's message for a failed open of `name`.
fn report_open_error(name: Option<&str>, e: OpenError) {
    match e {
        OpenError::Plain(m) => errln!("{}: {m}", prog()),
        OpenError::Reason(r) => match name {
            Some(n) => errln!("{}: can't open device {n}: {r}", prog()),
            None => errln!("{}: can't open: {r}", prog()),
        },
    }
}

/// The L2 cache size `opts` ask for, checking qcow2's runtime options.
fn check_runtime(img: &Image, opts: &Opts) -> Result<Option<u64>, String> {
    let Some(q) = &img.qcow2 else {
        return Ok(None);
    };
    let h = q.header();
    let facts = ImageFacts {
        cluster_size: q.cluster_size(),
        virtual_size: h.size,
        version: h.version,
        encrypted: q.encryption().is_some(),
    };
    let mut opts = opts.clone();
    Ok(take_qcow2_options(&mut opts, &facts)?.l2_cache_bytes)
}

/// QEMU's join of new options with the explicit ones of the open: a new overlap-check
/// template replaces every old overlap-check option, a new `cache-size` the old cache sizes,
/// and an old `cache-size` is dropped by any reopen that does not give one (qcow2's
/// `join_options`: with all three sizes set, the old total would otherwise conflict).
fn joined(old: &Opts, new: &Opts) -> Opts {
    let mut old = old.clone();
    let keys: Vec<String> = old.keys().map(str::to_string).collect();
    if new.get("overlap-check").is_some() || new.get("overlap-check.template").is_some() {
        for k in keys.iter().filter(|k| k.starts_with(OVERLAP_KEYS_PREFIX)) {
            old.take(k);
        }
    }
    if new.get("cache-size").is_some() {
        old.take("l2-cache-size");
        old.take("refcount-cache-size");
    } else {
        old.take("cache-size");
    }
    old.overlaid(new)
}

/// The spec `reopen` opens the image with, and its discard mode; QEMU's message for options
/// that may not change.
fn reopened_spec(
    img: &Image,
    rw_flag: Option<bool>,
    cache_flag: bool,
    new: &Opts,
) -> Result<(OpenSpec, bool, Option<u64>), String> {
    let mut opts = joined(&img.spec.opts, new);
    let mut read_only = img.read_only;
    if let Some(v) = opts.take("read-only") {
        if rw_flag.is_some() && new.get("read-only").is_some() {
            return Err("Cannot set both -r/-w and 'read-only'".into());
        }
        read_only = parse_bool("read-only", &v)?;
    }
    // qemu-io's reopen asks for read-only through the option without dropping its own write
    // permission: refused once the rest is checked.
    let ro_by_option = read_only && !img.read_only && rw_flag.is_none();
    if let Some(ro) = rw_flag {
        read_only = ro;
    }
    if cache_flag
        && ["cache.direct", "cache.no-flush"]
            .iter()
            .any(|k| new.get(k).is_some())
    {
        return Err("Cannot set both -c and the cache options".into());
    }
    let mut unmap = img.unmap;
    if let Some(v) = new.get("discard") {
        unmap = parse_discard(v).ok_or_else(|| "Invalid discard option".to_string())?;
    }
    for key in NO_EFFECT_BOOLS {
        if let Some(v) = new.get(key) {
            parse_bool(key, v)?;
        }
    }
    let l2 = check_runtime(img, &opts)?;
    // The file the image was opened from: its name, the `file.filename` of a `json:` name, or
    // the option.
    let current_name = match img.spec.name.as_deref() {
        Some(n) => match crate::json_name::options_of(n) {
            Some(json) => json
                .ok()
                .and_then(|o| o.into_iter().find(|(k, _)| k == "file.filename"))
                .map(|(_, v)| v),
            None => Some(n.to_string()),
        },
        None => img.spec.opts.get("file.filename").map(str::to_string),
    };
    for (k, v) in new.iter() {
        let same_as_before = img.spec.opts.get(k) == Some(v);
        let unchanged = match k {
            "driver" => v == img.driver,
            "file.driver" => v == "file",
            "file.filename" => current_name.as_deref() == Some(v),
            "discard" | "read-only" => true,
            _ if NO_EFFECT_BOOLS.contains(&k) => true,
            "backing.driver" => img.backing_format.map(|f| f.name()) == Some(v),
            _ if img.qcow2.is_some() && is_runtime_key(k) => true,
            _ => same_as_before,
        };
        if !unchanged {
            // QEMU names an option of a child node without the children's names (a backing
            // option of an image without a backing file is no child's).
            let mut shown = k;
            if k.starts_with("backing.") && img.backing_format.is_none() {
                return Err(format!("Cannot change the option '{k}'"));
            }
            while let Some(rest) = ["file.", "data-file.", "backing."]
                .iter()
                .find_map(|c| shown.strip_prefix(c))
            {
                shown = rest;
            }
            return Err(format!("Cannot change the option '{shown}'"));
        }
    }
    if ro_by_option {
        return Err(format!(
            "Read-only block node '#block{}' cannot support read-write users",
            std::process::id() % 1000
        ));
    }
    opts.set("driver", img.driver.clone());
    let spec = OpenSpec {
        read_only,
        opts,
        ..img.spec.clone()
    };
    Ok((spec, unmap, l2))
}
