//! The library's streamed qcow2 writer over a `Vec<u8>`: the bytes open as a qcow2 image whose
//! every byte equals the source's, whose file is exactly the planned clusters, and which is the
//! same on every run.

use qcow2kit::io::MemoryStorage;
use qcow2kit::ops::stream::{write_qcow2_stream, StreamWriteOptions};
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
