//! How Nova snapshots an instance booted from a qcow2 disk over a shared raw base (libvirt
//! driver `snapshot` → `snapshot_extract`, with `[libvirt] snapshot_compression`), and what
//! Glance records for the upload — done with qcow2kit instead of qemu-img.
//!
//! | step                                   | qemu-img command line it replaces                     |
//! |----------------------------------------|-------------------------------------------------------|
//! | shared base in the image cache         | `qemu-img create -f raw _base/BASE 64M` (then filled) |
//! | instance disk over the base            | `qemu-img create -f qcow2 -o backing_file=_base/BASE,backing_fmt=raw disk` |
//! | standalone, compressed snapshot        | `qemu-img convert -f qcow2 -O qcow2 -c disk snap`     |
//! | the snapshot stands alone, reads right | `qemu-img info snap`, `qemu-img compare disk snap`    |
//! | its metadata is consistent             | `qemu-img check -f qcow2 snap`                        |
//!
//! The snapshot's Glance record is printed as Glance computes it on upload: `checksum` is the
//! MD5 of the bytes uploaded, `os_hash_value` their SHA-512 (`os_hash_algo`), `size` their
//! count, `virtual_size` what `qemu-img info` reports.
//!
//! ```text
//! cargo run --release --example nova_snapshot
//! ```

mod common;

use common::{hex, noise, same_content, Res, Scratch};
use md5::Md5;
use qcow2kit::chain::{open, OpenOptions};
use qcow2kit::io::FileStorage;
use qcow2kit::ops::check::check;
use qcow2kit::ops::convert::{convert, ConvertOptions, Target, TargetFormat};
use qcow2kit::ops::create::{create_qcow2, create_raw, CreateOptions, Preallocation};
use qcow2kit::ops::info::{image_info, open_for_info};
use qcow2kit::Format;
use qcow2kit::Locking;
use sha2::{Digest, Sha512};
use std::io::Read;
use std::path::Path;

/// Size of the shared base (and of the instance's disk).
const BASE_SIZE: u64 = 64 << 20;

fn main() -> Res<()> {
    let dir = Scratch::new("nova-snapshot")?;
    let base = dir.path("base.raw");
    let disk = dir.path("disk");
    make_instance(&base, &disk)?;

    let snap = dir.path("snapshot.qcow2");
    snapshot_by_convert(&disk, &snap)?;

    // The snapshot names no backing file: the default policy, which refuses an image that does,
    // opens it, and it reads exactly as the instance's disk with its base.
    let alone = open(&snap, Format::Qcow2, &OpenOptions::default())?;
    let q = alone
        .qcow2
        .as_ref()
        .ok_or("the snapshot opened as something else")?;
    if q.backing_file_name().is_some() {
        return Err("the snapshot names a backing file".into());
    }
    let vm = open(&disk, Format::Qcow2, &OpenOptions::qemu_compatible())?;
    if vm.device.size() != alone.device.size() {
        return Err("the snapshot's size differs from the disk's".into());
    }
    same_content(
        "disk vs. snapshot",
        vm.device.as_ref(),
        alone.device.as_ref(),
    )?;
    let report = check(&FileStorage::open(&snap, false)?)?;
    if !report.is_clean() || report.compressed_clusters == 0 {
        return Err(format!("check of the snapshot: {report:?}").into());
    }
    drop((alone, vm));
    println!(
        "snapshot: {} of {} clusters allocated, {} compressed, no backing file, check clean",
        report.allocated_clusters, report.total_clusters, report.compressed_clusters
    );
    print_glance_record(&snap)
}

/// The shared base (raw, filled with data) and the instance's disk over it, written by the
/// guest: new data, a compressible file, and a range of the base it zeroed.
fn make_instance(base: &Path, disk: &Path) -> Res<()> {
    create_raw(base, BASE_SIZE, Preallocation::Off)?;
    {
        let rw = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let b = open(base, Format::Raw, &rw)?;
        b.device.write_at(&noise(1, 8 << 20), 0)?;
        b.device.write_at(&noise(2, 4 << 20), 32 << 20)?;
        b.device.flush()?;
    }
    let cow = CreateOptions {
        backing_file: Some("base.raw".into()),
        backing_format: Some("raw".into()),
        ..CreateOptions::default()
    };
    create_qcow2(disk, &cow)?;
    let rw = OpenOptions {
        writable: true,
        ..OpenOptions::qemu_compatible()
    };
    let vm = open(disk, Format::Qcow2, &rw)?;
    vm.device.write_at(&noise(3, 100_000), (1 << 20) + 12_345)?;
    let text = b"instance log line: all is well\n".repeat(40_000);
    vm.device.write_at(&text, 16 << 20)?;
    vm.device.write_zeroes(33 << 20, 1 << 20)?;
    vm.device.write_at(&noise(4, 4096), BASE_SIZE - 4096)?;
    vm.device.flush()?;
    vm.qcow2
        .ok_or("the disk opened as something else")?
        .close()?;
    Ok(())
}

/// Nova's snapshot of a stopped (or cold-snapshotted) instance: its disk with the whole backing
/// chain flattened into one new qcow2 image, every cluster compressed. This is the one place
/// the snapshot is made: `main` verifies and records whatever image it leaves at `snap`.
fn snapshot_by_convert(disk: &Path, snap: &Path) -> Res<()> {
    let src = open(disk, Format::Qcow2, &OpenOptions::qemu_compatible())?;
    let opts = ConvertOptions {
        format: TargetFormat::Qcow2(CreateOptions::default()),
        compress: true,
        ..ConvertOptions::default()
    };
    convert(src.device.as_ref(), Target::NewFile(snap), &opts)?;
    Ok(())
}

/// Prints the upload's fields as Glance records them.
fn print_glance_record(path: &Path) -> Res<()> {
    let info = image_info(&open_for_info(path, Format::Qcow2, Locking::Qemu)?)?;
    let (mut md5, mut sha512) = (Md5::new(), Sha512::new());
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        md5.update(&buf[..n]);
        sha512.update(&buf[..n]);
        size += n as u64;
    }
    if size != std::fs::metadata(path)?.len() {
        return Err("the snapshot changed while it was hashed".into());
    }
    println!("disk_format:      {}", info.format.name());
    println!("container_format: bare");
    println!("virtual_size:     {}", info.virtual_size);
    println!("size:             {size}");
    println!("checksum:         {}", hex(&md5.finalize()));
    println!("os_hash_algo:     sha512");
    println!("os_hash_value:    {}", hex(&sha512.finalize()));
    Ok(())
}
