//! The library's streamed qcow2 writer over a `Vec<u8>`: the bytes open as a qcow2 image whose
//! every byte equals the source's, whose file is exactly the planned clusters, and which is the
//! same on every run.

use qcow2kit::format::entry::{classify, ClusterKind, CompressedDescriptor, COPIED, OFFSET_MASK};
use qcow2kit::io::MemoryStorage;
use qcow2kit::ops::stream::{
    write_qcow2_stream, StreamReader, StreamWriteOptions, DEFAULT_MAX_PENDING,
};
use qcow2kit::{BlockDevice, Qcow2Image, Qcow2Options, RawImage};
use std::sync::Arc;

fn source() -> Vec<u8> {
    let mut v = vec![0u8; 5 << 20];
    for (i, b) in v[100..70_000].iter_mut().enumerate() {
        *b = (i % 251) as u8 | 1;
    }
    v[(3 << 20)..(3 << 20) + 4096].fill(7);
    *v.last_mut().unwrap() = 9;
    v
}

#[test]
fn streamed_bytes_open_as_the_same_disk() {
    let data = source();
    let src = RawImage::open(Arc::new(MemoryStorage::from_bytes(data.clone())), false).unwrap();
    let mut first = Vec::new();
    let n = write_qcow2_stream(&src, &mut first, &StreamWriteOptions::default()).unwrap();
    assert_eq!(n, first.len() as u64);
    let mut second = Vec::new();
    write_qcow2_stream(&src, &mut second, &StreamWriteOptions::default()).unwrap();
    assert!(first == second);
    let img = Qcow2Image::open(
        Arc::new(MemoryStorage::from_bytes(first)),
        &Qcow2Options::default(),
    )
    .unwrap();
    assert_eq!(img.size(), data.len() as u64);
    let mut back = vec![0u8; data.len()];
    img.read_at(&mut back, 0).unwrap();
    assert!(back == data);
}

#[test]
fn a_failing_writer_stops_the_stream_with_an_error() {
    struct Full(usize);
    impl std::io::Write for Full {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if self.0 < b.len() {
                return Err(std::io::Error::other("pipe closed"));
            }
            self.0 -= b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let src = RawImage::open(Arc::new(MemoryStorage::from_bytes(source())), false).unwrap();
    let r = write_qcow2_stream(&src, &mut Full(200_000), &StreamWriteOptions::default());
    assert!(r.is_err());
}

fn streamed(data: &[u8], compress: bool) -> Vec<u8> {
    streamed_with(data, 65536, compress)
}

fn streamed_with(data: &[u8], cluster_size: u64, compress: bool) -> Vec<u8> {
    let src = RawImage::open(Arc::new(MemoryStorage::from_bytes(data.to_vec())), false).unwrap();
    let mut out = Vec::new();
    let mut opts = StreamWriteOptions {
        compress,
        ..Default::default()
    };
    opts.create.cluster_size = cluster_size;
    write_qcow2_stream(&src, &mut out, &opts).unwrap();
    out
}

/// Reads a stream back into a disk image in memory.
fn read_back(stream: &[u8]) -> qcow2kit::Result<Vec<u8>> {
    read_back_capped(stream, DEFAULT_MAX_PENDING)
}

/// Reads a stream back with at most `max` entries queued ahead of their data.
fn read_back_capped(stream: &[u8], max: usize) -> qcow2kit::Result<Vec<u8>> {
    let mut input: &[u8] = stream;
    let mut reader = StreamReader::open(&mut input)?;
    reader.set_max_pending(max);
    let mut disk = vec![0u8; reader.header().size as usize];
    reader.copy_to(|off, data| {
        disk[off as usize..off as usize + data.len()].copy_from_slice(data);
        Ok(())
    })?;
    Ok(disk)
}

#[test]
fn the_reader_takes_back_what_the_writer_streams() {
    let data = source();
    for compress in [false, true] {
        let s = streamed(&data, compress);
        assert!(read_back(&s).unwrap() == data, "compress {compress}");
    }
}

#[test]
fn a_backward_reference_is_refused_by_name() {
    let data = source();
    let mut s = streamed(&data, false);
    // Point the first L1 entry back at cluster 1 (the refcount table), already passed.
    let l1 = u64::from_be_bytes(s[40..48].try_into().unwrap()) as usize;
    s[l1..l1 + 8].copy_from_slice(&(65536u64 | 1 << 63).to_be_bytes());
    let e = read_back(&s).unwrap_err().to_string();
    assert!(
        e.contains("L2 table of L1 entry 0") && e.contains("0x10000"),
        "{e}"
    );
    // An L1 table inside cluster 0.
    let mut s = streamed(&data, false);
    s[40..48].copy_from_slice(&512u64.to_be_bytes());
    assert!(read_back(&s).is_err());
    // Data further back than the one cluster kept before its L2 table, or inside the table.
    let s = streamed(&data, false);
    let l1 = be64(&s, 40) as usize;
    let table = be64(&s, l1) & OFFSET_MASK;
    for host in [table - 65536 - 512, table + 512, table - 512] {
        let mut bad = s.clone();
        let t = table as usize;
        bad[t..t + 8].copy_from_slice(&(host | COPIED).to_be_bytes());
        let e = read_back(&bad).unwrap_err().to_string();
        assert!(
            e.contains("the data of guest offset 0") && e.contains("not laid out for streaming"),
            "{host:#x}: {e}"
        );
    }
}

#[test]
fn truncated_and_garbled_streams_fail_cleanly() {
    let data = source();
    for compress in [false, true] {
        let s = streamed(&data, compress);
        // (A compressed stream ends in padding: only the plain one fails one byte short.)
        let last = if compress {
            s.len() - 65536 + 10
        } else {
            s.len() - 1
        };
        for cut in [0, 100, 511, 4096, 65536, 65536 * 5 + 3, last] {
            assert!(read_back(&s[..cut]).is_err(), "cut at {cut}");
        }
    }
    let mut s = streamed(&data, true);
    // Garble the compressed data: an error, never a panic.
    let n = s.len();
    for b in &mut s[n - 60_000..n - 30_000] {
        *b ^= 0x5a;
    }
    let _ = read_back(&s);
}

#[test]
fn the_queue_of_references_ahead_of_the_data_is_capped() {
    let data = source();
    let s = streamed(&data, false);
    let mut input: &[u8] = &s;
    let mut reader = StreamReader::open(&mut input).unwrap();
    reader.set_max_pending(2);
    let e = reader.copy_to(|_, _| Ok(())).unwrap_err().to_string();
    assert!(e.contains("more than 2 clusters"), "{e}");
}

/// A disk of `n` bytes whose 512-byte clusters all differ and all compress.
fn text_disk(n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 32);
    let mut i = 0u64;
    while v.len() < n {
        v.extend_from_slice(format!("stream line {i:08}\n").as_bytes());
        i += 1;
    }
    v.truncate(n);
    v
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The same image with every L2 table moved before all the data, as the first streamed writer
/// laid images out: the clusters after the L1 table permuted, every reference moved with them.
fn every_l2_table_first(s: &[u8]) -> Vec<u8> {
    let bits = u32::from_be_bytes(s[20..24].try_into().unwrap());
    let cs = 1usize << bits;
    let l1_size = u32::from_be_bytes(s[36..40].try_into().unwrap()) as usize;
    let l1 = be64(s, 40) as usize;
    let tables: Vec<(usize, usize)> = (0..l1_size)
        .map(|i| (i, be64(s, l1 + i * 8) & OFFSET_MASK))
        .filter(|&(_, t)| t != 0)
        .map(|(i, t)| (i, t as usize))
        .collect();
    let area = tables[0].1;
    let mut out = s[..area].to_vec();
    let mut data = Vec::new();
    let mut moved = Vec::new();
    for (k, &(i, t)) in tables.iter().enumerate() {
        let end = tables.get(k + 1).map_or(s.len(), |n| n.1);
        let new_data = area + tables.len() * cs + data.len();
        let delta = new_data as u64 - (t + cs) as u64;
        let mut table = s[t..t + cs].to_vec();
        for j in 0..cs / 8 {
            let raw = be64(&table, j * 8);
            let e = match classify(raw, bits, false, false) {
                ClusterKind::Normal { host } => (raw & !OFFSET_MASK) | (host + delta),
                ClusterKind::Compressed(d) => CompressedDescriptor {
                    host_offset: d.host_offset + delta,
                    ..d
                }
                .encode(bits)
                .unwrap(),
                _ => raw,
            };
            table[j * 8..j * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        let new_table = (area + k * cs) as u64;
        out[l1 + i * 8..l1 + i * 8 + 8].copy_from_slice(&(new_table | COPIED).to_be_bytes());
        moved.extend_from_slice(&table);
        data.extend_from_slice(&s[t + cs..end]);
    }
    out.extend_from_slice(&moved);
    out.extend_from_slice(&data);
    assert_eq!(out.len(), s.len());
    out
}

fn open_in_memory(image: &[u8]) -> Vec<u8> {
    let img = Qcow2Image::open(
        Arc::new(MemoryStorage::from_bytes(image.to_vec())),
        &Qcow2Options::default(),
    )
    .unwrap();
    let mut back = vec![0u8; img.size() as usize];
    img.read_at(&mut back, 0).unwrap();
    back
}

#[test]
fn the_reader_holds_one_l2_table_of_a_streamed_image() {
    // 512-byte clusters: 64 entries per L2 table, 64 tables; every cluster its own entry when
    // compressed. Each table must come just before the data it maps.
    let data = text_disk(2 << 20);
    for compress in [false, true] {
        let s = streamed_with(&data, 512, compress);
        assert!(open_in_memory(&s) == data, "compress {compress}");
        assert!(
            read_back_capped(&s, 64).unwrap() == data,
            "compress {compress}"
        );
    }
}

#[test]
fn an_image_with_every_l2_table_first_is_read_in_bounded_memory_or_refused() {
    let data = text_disk(2 << 20);
    // Plain: the data of each table follows on in the file, one queue entry per table.
    let old = every_l2_table_first(&streamed_with(&data, 512, false));
    assert!(open_in_memory(&old) == data);
    assert!(read_back_capped(&old, 64).unwrap() == data);
    // Compressed: one entry per cluster, refused past the cap (by name), read within it.
    let old = every_l2_table_first(&streamed_with(&data, 512, true));
    assert!(open_in_memory(&old) == data);
    let e = read_back_capped(&old, 64).unwrap_err().to_string();
    assert!(e.contains("more than 64 clusters ahead"), "{e}");
    assert!(read_back_capped(&old, 4096).unwrap() == data);
}
