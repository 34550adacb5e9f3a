//! What the OpenStack examples share: a scratch directory, a guest image to start from, and
//! read-back checks done with the library.
// Each example uses a subset of these helpers.
#![allow(dead_code)]

use qcow2kit::chain::{open, OpenOptions};
use qcow2kit::io::FileStorage;
use qcow2kit::ops::check::check;
use qcow2kit::ops::compare::{compare, CompareResult};
use qcow2kit::ops::create::{create_qcow2, CreateOptions};
use qcow2kit::BlockDevice;
use qcow2kit::Format;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// What every step returns.
pub(crate) type Res<T> = Result<T, Box<dyn Error>>;

/// A fresh directory under the system's temporary directory, removed with its content on drop.
pub(crate) struct Scratch(PathBuf);

impl Scratch {
    /// Creates `qcow2kit-EXAMPLE-PID-NANOS`; creation fails rather than reuse a directory.
    pub(crate) fn new(example: &str) -> Res<Self> {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos();
        let name = format!("qcow2kit-{example}-{}-{nanos}", std::process::id());
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir(&dir)?;
        Ok(Scratch(dir))
    }

    /// A path inside the directory.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Virtual size of [`make_guest_image`]'s image.
pub(crate) const GUEST_IMAGE_SIZE: u64 = 16 << 20;

/// Pseudo-random bytes (they do not compress), the same for the same seed.
pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Makes the kind of qcow2 image an image service holds: a 16 MiB disk with a "boot area" of
/// data, one cluster written compressed, a zeroed range inside data, and data in its last
/// cluster. Returns the guest content it must read as.
pub(crate) fn make_guest_image(path: &Path) -> Res<Vec<u8>> {
    let size = GUEST_IMAGE_SIZE;
    let opts = CreateOptions {
        size: Some(size),
        ..CreateOptions::default()
    };
    create_qcow2(path, &opts)?;
    let writable = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let img = open(path, Format::Qcow2, &writable)?;
    let q = img
        .qcow2
        .clone()
        .ok_or("a qcow2 image opened as something else")?;
    let cs = q.cluster_size() as usize;
    let mut model = vec![0u8; size as usize];
    let mut put = |offset: usize, data: &[u8]| {
        model[offset..offset + data.len()].copy_from_slice(data);
    };
    // The boot area: 1 MiB of data.
    let boot = noise(1, 1 << 20);
    q.write_at(&boot, 0)?;
    put(0, &boot);
    // A cluster of text, as `qemu-img convert -c` leaves it.
    let line = b"qcow2kit example: compressible text. ";
    let text = line.repeat(cs / line.len() + 1)[..cs].to_vec();
    q.write_compressed(1 << 20, &text)?;
    put(1 << 20, &text);
    // 1 MiB of data at 4 MiB, its middle half zeroed afterwards (zero clusters).
    let data = noise(2, 1 << 20);
    q.write_at(&data, 4 << 20)?;
    put(4 << 20, &data);
    q.write_zeroes((4 << 20) + (256 << 10), 512 << 10)?;
    put((4 << 20) + (256 << 10), &vec![0; 512 << 10]);
    // The last cluster.
    let tail = noise(3, cs);
    q.write_at(&tail, size - cs as u64)?;
    put(size as usize - cs, &tail);
    drop(q);
    img.close()?;
    // The cluster went in compressed (the engine writes data that does not compress as is).
    let report = check(&FileStorage::open(path, false)?)?;
    if !report.is_clean() || report.compressed_clusters != 1 {
        return Err(format!("the guest image is not as made: {report:?}").into());
    }
    Ok(model)
}

/// Fails unless `a` and `b` read the same (qemu-img compare: a longer device's extra part must
/// read as zeros).
pub(crate) fn same_content(what: &str, a: &dyn BlockDevice, b: &dyn BlockDevice) -> Res<()> {
    match compare(a, b, false)? {
        CompareResult::Identical => Ok(()),
        other => Err(format!("{what}: contents differ: {other:?}").into()),
    }
}

/// Lower-case hex of `bytes` (how OpenStack records digests).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
