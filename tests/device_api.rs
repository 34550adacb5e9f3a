//! The `BlockDevice` surface a VMM uses beyond `read_at`/`write_at`: vectored requests,
//! discard modes and `close`, on raw and qcow2 devices, judged by qemu-img.

#[path = "support/write_helpers.rs"]
mod write_helpers;

use qcow2kit::device::MAX_GATHER_BYTES;
use qcow2kit::io::MemoryStorage;
use qcow2kit::{BlockDevice, DiscardMode, Error, Extent, RawImage};
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use write_helpers::{
    assert_check_clean, assert_compare_identical, export_raw, open_rw, qemu_img, qemu_io, scratch,
};

/// A device that counts the requests reaching it and implements only the required methods,
/// so the trait's provided vectored methods are the ones under test.
struct Counting {
    inner: RawImage,
    reads: AtomicUsize,
    writes: AtomicUsize,
}

impl Counting {
    fn new(len: usize) -> Self {
        let bytes = (0..len).map(|i| (i % 251) as u8).collect();
        Counting {
            inner: RawImage::open(Arc::new(MemoryStorage::from_bytes(bytes)), true)
                .expect("raw image in memory"),
            reads: AtomicUsize::new(0),
            writes: AtomicUsize::new(0),
        }
    }
}

impl BlockDevice for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> qcow2kit::Result<()> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> qcow2kit::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> qcow2kit::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> qcow2kit::Result<()> {
        self.inner.discard(offset, len)
    }
    fn flush(&self) -> qcow2kit::Result<()> {
        self.inner.flush()
    }
    fn close(&self) -> qcow2kit::Result<()> {
        self.inner.close()
    }
    fn block_status(&self, offset: u64, len: u64) -> qcow2kit::Result<Extent> {
        self.inner.block_status(offset, len)
    }
    fn format_name(&self) -> &'static str {
        "counting"
    }
}

#[test]
fn vectored_requests_gather_small_buffers_into_few_requests() {
    let dev = Counting::new(16 << 20);
    // Sector-sized buffers with empty ones between them, then one buffer larger than a gather.
    let mut sizes: Vec<usize> = (0..64).map(|i| if i % 5 == 0 { 0 } else { 512 }).collect();
    sizes.push(MAX_GATHER_BYTES + 4096);
    let data: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| vec![i as u8 ^ 0x5a; n])
        .collect();
    let slices: Vec<IoSlice<'_>> = data.iter().map(|d| IoSlice::new(d)).collect();
    let offset = 1_000_000;
    dev.write_vectored_at(&slices, offset)
        .expect("vectored write");
    let total: usize = sizes.iter().sum();
    assert_eq!(
        dev.writes.load(Ordering::SeqCst),
        total.div_ceil(MAX_GATHER_BYTES),
        "a write per gather of at most MAX_GATHER_BYTES"
    );

    let mut flat = vec![0u8; total];
    dev.read_at(&mut flat, offset).expect("read back");
    assert!(flat == data.concat(), "vectored write reads back in order");

    let mut back: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0u8; n]).collect();
    let mut out: Vec<IoSliceMut<'_>> = back.iter_mut().map(|b| IoSliceMut::new(b)).collect();
    let before = dev.reads.load(Ordering::SeqCst);
    dev.read_vectored_at(&mut out, offset)
        .expect("vectored read");
    assert_eq!(
        dev.reads.load(Ordering::SeqCst) - before,
        total.div_ceil(MAX_GATHER_BYTES)
    );
    assert!(back == data, "vectored read scatters in order");

    // The whole list is checked against the size before anything is written.
    let writes = dev.writes.load(Ordering::SeqCst);
    let past = dev.size() - 1024;
    assert!(matches!(
        dev.write_vectored_at(&slices[1..4], past),
        Err(Error::OutOfRange { .. })
    ));
    assert_eq!(dev.writes.load(Ordering::SeqCst), writes);
}

/// A 4 MiB `base.qcow2` whose first `written` bytes are 0x11, and each of `overlays` over it.
fn chain_of_two(d: &std::path::Path, written: &str, overlays: &[&str]) {
    qemu_img(&["create", "-q", "-f", "qcow2", "base.qcow2", "4M"], d);
    qemu_io(
        &["-c", &format!("write -P 0x11 0 {written}"), "base.qcow2"],
        d,
    );
    for img in overlays {
        qemu_img(
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                img,
            ],
            d,
        );
    }
}

/// Eight 512-byte buffers into a cluster an overlay does not hold yet: one copy-on-write, the
/// result identical to qemu-io's `writev` of the same buffers.
#[test]
fn vectored_write_to_a_qcow2_overlay_matches_qemu_io_writev() {
    let dir = scratch();
    let d = dir.path();
    chain_of_two(d, "1M", &["ours.qcow2", "theirs.qcow2"]);
    let bufs: Vec<Vec<u8>> = (0..8u8).map(|i| vec![0x20 + i; 512]).collect();
    let slices: Vec<IoSlice<'_>> = bufs.iter().map(|b| IoSlice::new(b)).collect();
    let opened = open_rw(&d.join("ours.qcow2"));
    opened
        .device
        .write_vectored_at(&slices, 70_000)
        .expect("vectored write");
    opened.close().expect("close");
    let pattern_cmds: Vec<String> = (0..8u8)
        .map(|i| format!("write -P {} {} 512", 0x20 + i, 70_000 + u64::from(i) * 512))
        .collect();
    let mut args = Vec::new();
    for c in &pattern_cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push("theirs.qcow2");
    qemu_io(&args, d);
    assert_check_clean(d, "ours.qcow2", "after a vectored write");
    assert_compare_identical(
        d,
        "ours.qcow2",
        "qcow2",
        "theirs.qcow2",
        "qcow2",
        "vectored write vs qemu-io",
    );
}

/// `DiscardMode::Backing` makes whole clusters read from the backing file again;
/// `DiscardMode::Zeros` (and `discard`) makes them read as zeros, as qemu-io's discard does.
#[test]
fn discard_modes_read_zeros_or_the_backing_file() {
    let dir = scratch();
    let d = dir.path();
    chain_of_two(d, "4M", &["top.qcow2", "qemu.qcow2"]);
    for img in ["top.qcow2", "qemu.qcow2"] {
        qemu_io(&["-c", "write -P 0x22 0 1M", img], d);
    }
    let opened = open_rw(&d.join("top.qcow2"));
    let dev = &opened.device;
    dev.discard_with(0, 256 << 10, DiscardMode::Zeros)
        .expect("discard to zeros");
    dev.discard_with(256 << 10, 256 << 10, DiscardMode::Backing)
        .expect("discard to backing");
    opened.close().expect("close");
    assert_check_clean(d, "top.qcow2", "after discards");

    let got = export_raw(d, "top.qcow2", None, "top.raw");
    assert!(
        got[..256 << 10].iter().all(|&b| b == 0),
        "Zeros reads zeros"
    );
    assert!(
        got[256 << 10..512 << 10].iter().all(|&b| b == 0x11),
        "Backing reads the backing file"
    );
    assert!(got[512 << 10..1 << 20].iter().all(|&b| b == 0x22));
    assert!(got[1 << 20..].iter().all(|&b| b == 0x11));

    // What QEMU makes of the same requests: a guest discard, and the backing data rewritten.
    qemu_io(
        &[
            "-c",
            "discard 0 256k",
            "-c",
            "write -P 0x11 256k 256k",
            "qemu.qcow2",
        ],
        d,
    );
    assert_compare_identical(
        d,
        "top.qcow2",
        "qcow2",
        "qemu.qcow2",
        "qcow2",
        "discard modes vs qemu-io",
    );
    let map = qemu_img(&["map", "--output=json", "top.qcow2"], d);
    assert!(
        map.contains(r#""start": 262144, "length": 262144, "depth": 1"#),
        "the range discarded to the backing file is not allocated in the top image:\n{map}"
    );
}

#[test]
fn a_closed_device_refuses_changes_and_still_reads() {
    let dir = scratch();
    let d = dir.path();
    qemu_img(&["create", "-q", "-f", "qcow2", "img.qcow2", "1M"], d);
    qemu_img(&["create", "-q", "-f", "raw", "img.raw", "1M"], d);
    for name in ["img.qcow2", "img.raw"] {
        let format = if name.ends_with("raw") {
            qcow2kit::Format::Raw
        } else {
            qcow2kit::Format::Qcow2
        };
        let opts = qcow2kit::OpenOptions {
            writable: true,
            ..qcow2kit::OpenOptions::qemu_compatible()
        };
        let opened = qcow2kit::open(&d.join(name), format, &opts).expect("open");
        let dev = opened.device.clone();
        dev.write_at(&[7u8; 4096], 0).expect("write");
        opened.close().expect("close");
        let closed = |r: qcow2kit::Result<()>, what: &str| {
            assert!(
                matches!(r, Err(Error::Closed)),
                "{name}: {what} after close: {r:?}"
            );
        };
        closed(dev.write_at(&[1u8; 512], 0), "write");
        closed(dev.write_zeroes(0, 512), "write_zeroes");
        closed(dev.discard(0, 512), "discard");
        closed(dev.flush(), "flush");
        closed(dev.resize(2 << 20, false), "resize");
        closed(
            dev.write_vectored_at(&[IoSlice::new(&[1u8; 512]), IoSlice::new(&[2u8; 512])], 0),
            "write_vectored_at",
        );
        let mut buf = [0u8; 4096];
        dev.read_at(&mut buf, 0).expect("reads still answer");
        assert_eq!(buf, [7u8; 4096], "{name}");
        dev.close().expect("closing again is a no-op");
    }
}
