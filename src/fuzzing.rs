//! Entry points for the cargo-fuzz targets in `fuzz/` (not a stable API).
//!
//! Each function takes arbitrary bytes and must never panic, hang or allocate beyond a bound
//! proportional to its input; errors are the expected outcome for most inputs.

use crate::codec::decompress_cluster;
use crate::device::BlockDevice;
use crate::engine::{Qcow2Image, Qcow2Options};
use crate::format::header::CompressionType;
use crate::io::MemoryStorage;
use std::sync::Arc;

/// Opens `data` as a qcow2 image held in memory and reads what its metadata maps: up to 256
/// extents found by `block_status`, at most 256 KiB of each.
pub fn open_and_read(data: &[u8]) {
    let storage = Arc::new(MemoryStorage::from_bytes(data.to_vec()));
    let opts = Qcow2Options {
        l2_cache_bytes: 64 << 10,
        ..Default::default()
    };
    let Ok(img) = Qcow2Image::open(storage, &opts) else {
        return;
    };
    let size = img.size();
    let mut buf = vec![0u8; 256 << 10];
    let mut pos = 0u64;
    for _ in 0..256 {
        if pos >= size {
            break;
        }
        let Ok(e) = img.block_status(pos, size - pos) else {
            return;
        };
        assert!(
            e.len > 0 && e.len <= size - pos,
            "extent out of the requested range"
        );
        let n = e.len.min(buf.len() as u64) as usize;
        if img.read_at(&mut buf[..n], pos).is_err() {
            return;
        }
        pos += e.len;
    }
}

/// Decompresses `data` (first byte picks zlib or zstd, second the cluster size) into one
/// cluster; the output must never exceed the cluster.
pub fn decompress(data: &[u8]) {
    let [kind, bits, rest @ ..] = data else {
        return;
    };
    let kind = if kind & 1 == 0 {
        CompressionType::Zlib
    } else {
        CompressionType::Zstd
    };
    let cluster = 1usize << (9 + u32::from(*bits) % 13);
    let mut out = vec![0u8; cluster];
    let _ = decompress_cluster(kind, rest, &mut out);
}
