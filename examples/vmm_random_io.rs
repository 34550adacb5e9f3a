//! A VMM's disk: a qcow2 overlay over a raw base, shared by several I/O threads that issue
//! random reads, writes, scatter-gather writes, zero writes and discards at once, as a guest's
//! virtio queues do; then a flush, a close, and the result checked against what the guest
//! wrote.
//!
//! | step                                   | what a VMM on QEMU would use                      |
//! |----------------------------------------|---------------------------------------------------|
//! | base and overlay                       | `qemu-img create -f qcow2 -b base.raw -F raw disk` |
//! | the disk opened with QEMU's image locks | `-drive file=disk,format=qcow2`                    |
//! | queues of requests from several threads | virtio-blk / virtio-scsi with an iothread         |
//! | guest flush, then shutdown             | `FLUSH` requests, `bdrv_close`                     |
//! | consistency                            | `qemu-img check disk`                              |
//!
//! Each thread owns its own stripe of the disk, so the final content is known exactly: a model
//! of every byte is kept and compared with the image after it is closed and reopened.
//!
//! ```text
//! cargo run --release --example vmm_random_io
//! ```

mod common;

use common::{noise, Res, Scratch};
use qcow2kit::chain::{open, OpenOptions};
use qcow2kit::io::FileStorage;
use qcow2kit::ops::check::check;
use qcow2kit::ops::create::{create_qcow2, create_raw, CreateOptions, Preallocation};
use qcow2kit::{BlockDevice, DiscardMode, Error, Format};
use std::io::IoSlice;
use std::path::Path;
use std::sync::Arc;

/// Virtual size of the disk.
const SIZE: u64 = 64 << 20;
/// I/O threads (the VMM's queues).
const THREADS: u64 = 4;
/// Requests per thread.
const REQUESTS: u64 = 2_000;

fn main() -> Res<()> {
    let dir = Scratch::new("vmm-random-io")?;
    let base = dir.path("base.raw");
    let disk = dir.path("disk.qcow2");
    let base_bytes = noise(7, SIZE as usize);
    make_disk(&base, &disk, &base_bytes)?;

    let rw = OpenOptions {
        writable: true,
        ..OpenOptions::qemu_compatible()
    };
    let vm = open(&disk, Format::Qcow2, &rw)?;
    // A second writer is refused while the VMM holds the disk, as QEMU refuses it.
    match open(&disk, Format::Qcow2, &rw) {
        Err(Error::Locked { .. }) => {}
        Err(e) => return Err(format!("a second writer failed otherwise: {e}").into()),
        Ok(_) => return Err("a second writer was not refused".into()),
    }

    let dev: Arc<dyn BlockDevice> = vm.device.clone();
    let stripe = SIZE / THREADS;
    let models = std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let dev = dev.clone();
                let start = t * stripe;
                let model = base_bytes[start as usize..(start + stripe) as usize].to_vec();
                s.spawn(move || queue(dev.as_ref(), t, start, model))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().map_err(|_| "an I/O thread panicked")?)
            .collect::<Result<Vec<Vec<u8>>, Box<dyn std::error::Error + Send + Sync>>>()
    })
    .map_err(|e| e.to_string())?;
    // The locks go with the last handle: the queues' clone first, then the disk, closed.
    drop(dev);
    vm.close()?;

    // Reopened read-only, the disk reads exactly what the guest wrote over the base.
    let model = models.concat();
    let again = open(&disk, Format::Qcow2, &OpenOptions::qemu_compatible())?;
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..SIZE).step_by(buf.len()) {
        again.device.read_at(&mut buf, off)?;
        let want = &model[off as usize..off as usize + buf.len()];
        if let Some(i) = buf.iter().zip(want).position(|(a, b)| a != b) {
            return Err(
                format!("byte {} differs from what the guest wrote", off + i as u64).into(),
            );
        }
    }
    drop(again);
    let report = check(&FileStorage::open(&disk, false)?)?;
    if !report.is_clean() {
        return Err(format!("check of the disk: {report:?}").into());
    }
    println!(
        "{THREADS} threads, {} requests: the disk reads what the guest wrote; check clean, \
         {} of {} clusters allocated",
        THREADS * REQUESTS,
        report.allocated_clusters,
        report.total_clusters
    );
    Ok(())
}

/// The raw base filled with `bytes`, and the qcow2 overlay over it.
fn make_disk(base: &Path, disk: &Path, bytes: &[u8]) -> Res<()> {
    create_raw(base, SIZE, Preallocation::Off)?;
    let b = open(
        base,
        Format::Raw,
        &OpenOptions {
            writable: true,
            ..OpenOptions::default()
        },
    )?;
    b.device.write_at(bytes, 0)?;
    b.close()?;
    create_qcow2(
        disk,
        &CreateOptions {
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            ..CreateOptions::default()
        },
    )?;
    Ok(())
}

/// One I/O thread: random requests inside its stripe `[start, start + model.len())`, kept in
/// `model`; a flush every 256 requests, as a guest's journal commits.
fn queue(
    dev: &dyn BlockDevice,
    thread: u64,
    start: u64,
    mut model: Vec<u8>,
) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ thread;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let span = model.len() as u64;
    let mut buf = vec![0u8; 256 << 10];
    for i in 0..REQUESTS {
        let len = 512 * (1 + next() % 128);
        let at = (next() % ((span - len) / 512)) * 512;
        let (o, l) = (at as usize, len as usize);
        match next() % 10 {
            0..=3 => {
                dev.read_at(&mut buf[..l], start + at)?;
                if buf[..l] != model[o..o + l] {
                    return Err(format!("thread {thread}: read at {} differs", start + at).into());
                }
            }
            4..=5 => {
                let data = noise(next(), l);
                dev.write_at(&data, start + at)?;
                model[o..o + l].copy_from_slice(&data);
            }
            6 => {
                // A scatter-gather list of sector-sized buffers.
                let data = noise(next(), l);
                let sg: Vec<IoSlice<'_>> = data.chunks(512).map(IoSlice::new).collect();
                dev.write_vectored_at(&sg, start + at)?;
                model[o..o + l].copy_from_slice(&data);
            }
            7 => {
                dev.write_zeroes(start + at, len)?;
                model[o..o + l].fill(0);
            }
            _ => {
                // A guest discard reads as zeros afterwards, whatever the base holds.
                dev.discard_with(start + at, len, DiscardMode::Zeros)?;
                // Only whole clusters are dropped; partial ones keep their data.
                let cs = 65536;
                let first = at.div_ceil(cs) * cs;
                let end = ((at + len) / cs) * cs;
                if first < end {
                    model[first as usize..end as usize].fill(0);
                }
            }
        }
        if i % 256 == 255 {
            dev.flush()?;
        }
    }
    Ok(model)
}
