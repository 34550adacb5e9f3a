//! How Nova's libvirt driver lays out an instance's root disk (`_create_image`: the image cache's
//! `fetch_to_raw`, `disk.extend`, then `create_cow_image`), done with qcow2kit instead of
//! qemu-img.
//!
//! | step                                  | qemu-img command line it replaces                       |
//! |---------------------------------------|---------------------------------------------------------|
//! | vet the download                      | `format_inspector` `safety_check()`, `qemu-img info -f qcow2 ID.part` |
//! | image from Glance → raw cache entry   | `qemu-img convert -O raw -f qcow2 ID.part ID.converted`  |
//! | base to the flavour's root-disk size  | `qemu-img resize -f raw _base/SHA1 2G`                   |
//! | instance disk over the base           | `qemu-img create -f qcow2 -o backing_file=_base/SHA1,backing_fmt=raw disk` |
//! | overlay consistency                   | `qemu-img check -f qcow2 disk`                           |
//! | what Nova records                     | `qemu-img info -f qcow2 disk`                            |
//!
//! The cache entry is named by the SHA-1 of the image id, as Nova names it. The guest then
//! writes into the instance disk (as QEMU would) and everything is read back.
//!
//! ```text
//! cargo run --release --example nova_create_image
//! ```

mod common;

use common::{hex, make_guest_image, noise, same_content, Res, Scratch, GUEST_IMAGE_SIZE};
use qcow2kit::chain::{open, OpenOptions};
use qcow2kit::io::{FileStorage, Storage};
use qcow2kit::ops::check::check;
use qcow2kit::ops::convert::{convert, ConvertOptions, Target};
use qcow2kit::ops::create::{create_qcow2, CreateOptions};
use qcow2kit::ops::info::{image_info, open_for_info};
use qcow2kit::ops::inspect::{inspect_path, Policy};
use qcow2kit::Format;
use qcow2kit::{BlockDevice, Locking};
use sha1::{Digest, Sha1};
use std::path::Path;

/// The Glance image id of the image being booted.
const IMAGE_ID: &str = "5c0e6f9a-2b7d-4c1e-9f3a-8d4b6a2e1c07";
/// The flavour's root disk.
const ROOT_GB: u64 = 2;
/// Bytes read (and compared) at a time.
const CHUNK: usize = 4 << 20;

fn main() -> Res<()> {
    let dir = Scratch::new("nova-create-image")?;
    std::fs::create_dir(dir.path("_base"))?;
    let root_size = ROOT_GB << 30;

    // The image as Glance serves it, downloaded beside the cache entry.
    let part = dir.path("download.part");
    let original = make_guest_image(&part)?;

    // fetch_to_raw: vet the download as qcow2 (no backing or data file, nothing else inside),
    // convert it to raw under a temporary name, then rename it into the cache (Target::NewFile
    // does both: the cache entry appears whole or not at all).
    let vetted = inspect_path(&part)?.check(&Policy::openstack().declared(Format::Qcow2));
    if let Some(v) = vetted.first() {
        return Err(format!("image {IMAGE_ID} is unsafe: {v}").into());
    }
    let base = dir.path("_base").join(hex(&Sha1::digest(IMAGE_ID)));
    let download = open(&part, Format::Qcow2, &OpenOptions::default())?;
    convert(
        download.device.as_ref(),
        Target::NewFile(&base),
        &ConvertOptions::default(),
    )?;

    // disk.extend on a raw file is a truncate up (the library has no raw resize).
    {
        let raw = FileStorage::open(&base, true)?;
        raw.set_len(root_size)?;
        raw.flush()?;
    }
    let base_size = std::fs::metadata(&base)?.len();
    if base_size != root_size {
        return Err(format!("base is {base_size} bytes, not {root_size}").into());
    }
    // The base reads as the image, then zeros to the flavour's size (qemu-img compare).
    let base_dev = open(&base, Format::Raw, &OpenOptions::default())?.device;
    same_content(
        "base vs. image",
        download.device.as_ref(),
        base_dev.as_ref(),
    )?;
    drop((download, base_dev));
    std::fs::remove_file(&part)?;

    // create_cow_image: the instance disk names the base and its format; its size is the base's.
    let disk = dir.path("disk");
    let cow = CreateOptions {
        backing_file: Some(base.to_str().ok_or("non-UTF-8 temporary path")?.to_string()),
        backing_format: Some("raw".into()),
        ..CreateOptions::default()
    };
    create_qcow2(&disk, &cow)?;

    // The guest boots: it rewrites part of the boot area (copy-on-write from the base, in part
    // clusters) and writes into the space the flavour added.
    let writes = [
        (300 << 10, noise(10, 5000)),
        (GUEST_IMAGE_SIZE - 1000, noise(11, 70_000)),
        (root_size - 4096, noise(12, 4096)),
    ];
    {
        let rw = OpenOptions {
            writable: true,
            ..OpenOptions::qemu_compatible()
        };
        let vm = open(&disk, Format::Qcow2, &rw)?;
        for (offset, data) in &writes {
            vm.device.write_at(data, *offset)?;
        }
        vm.device.flush()?;
        vm.qcow2
            .ok_or("the disk opened as something else")?
            .close()?;
    }

    // The overlay's metadata is consistent, and the disk reads as the image with the guest's
    // writes over it and zeros elsewhere.
    let report = check(&FileStorage::open(&disk, false)?)?;
    if !report.is_clean() {
        return Err(format!("check of the instance disk: {report:?}").into());
    }
    let vm = open(&disk, Format::Qcow2, &OpenOptions::qemu_compatible())?;
    verify(vm.device.as_ref(), |offset, buf| {
        expected(&original, &writes, offset, buf)
    })?;

    let info = image_info(&open_for_info(&disk, Format::Qcow2, Locking::Qemu)?)?;
    if info.backing_filename.as_deref().map(Path::new) != Some(base.as_path())
        || info.backing_format.as_deref() != Some("raw")
        || info.virtual_size != root_size
    {
        return Err(format!("the instance disk does not record its base: {info:?}").into());
    }
    println!("base path:            {}", base.display());
    println!("base size:            {base_size}");
    println!("overlay virtual size: {}", info.virtual_size);
    println!(
        "backing file:         {} (format raw)",
        info.backing_filename.as_deref().unwrap_or_default()
    );
    println!(
        "check:                No errors were found on the image ({}/{} clusters allocated)",
        report.allocated_clusters, report.total_clusters
    );
    Ok(())
}

/// Fills `buf` with what the disk must hold at `offset`: the image's content, zeros past it,
/// and the guest's `writes` over both.
fn expected(original: &[u8], writes: &[(u64, Vec<u8>)], offset: u64, buf: &mut [u8]) {
    buf.fill(0);
    let end = offset + buf.len() as u64;
    if let Some(have) = original.get(offset as usize..) {
        let n = have.len().min(buf.len());
        buf[..n].copy_from_slice(&have[..n]);
    }
    for (at, data) in writes {
        let (s, e) = ((*at).max(offset), (at + data.len() as u64).min(end));
        if s < e {
            buf[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&data[(s - at) as usize..(e - at) as usize]);
        }
    }
}

/// Reads all of `dev` and fails at the first byte that differs from what `expected` fills in.
fn verify(dev: &dyn BlockDevice, expected: impl Fn(u64, &mut [u8])) -> Res<()> {
    let (mut got, mut want) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut offset = 0;
    while offset < dev.size() {
        let n = (dev.size() - offset).min(CHUNK as u64) as usize;
        dev.read_at(&mut got[..n], offset)?;
        expected(offset, &mut want[..n]);
        if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
            return Err(format!("the disk differs at byte {}", offset + i as u64).into());
        }
        offset += n as u64;
    }
    Ok(())
}
