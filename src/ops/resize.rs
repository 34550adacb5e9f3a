//! Changing an image's virtual size, as `qemu-img resize [--shrink] [--preallocation=…]` does:
//! qcow2 images through their engine (new L1 entries, refcounts, bitmaps resized), raw ones by
//! their file's length.
//!
//! ```
//! use qcow2kit::ops::create::{create_raw, Preallocation};
//! use qcow2kit::ops::resize::{resize, ResizeOptions};
//! use qcow2kit::{open, Format, OpenOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.raw");
//! create_raw(&path, 1 << 20, Preallocation::Off)?;
//! let rw = OpenOptions { writable: true, ..OpenOptions::default() };
//! let img = open(&path, Format::Raw, &rw)?;
//! // qemu-img resize --preallocation=full disk.raw 2M
//! let full = ResizeOptions { preallocation: Preallocation::Full, ..Default::default() };
//! resize(&img, 2 << 20, &full)?;
//! img.close()?;
//! assert_eq!(std::fs::metadata(&path)?.len(), 2 << 20);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::chain::Opened;
use crate::error::{Error, Result};
use crate::ops::create::Preallocation;

/// How [`resize`] changes the size.
///
/// ```
/// use qcow2kit::ops::create::Preallocation;
/// use qcow2kit::ops::resize::ResizeOptions;
///
/// // qemu-img resize --preallocation=metadata
/// let opts = ResizeOptions { preallocation: Preallocation::Metadata, ..Default::default() };
/// assert!(!opts.shrink);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeOptions {
    /// Allow a smaller size (qemu-img `--shrink`): the data past the new end is lost.
    pub shrink: bool,
    /// What the grown range gets (qemu-img `--preallocation`): nothing (`Off`), its clusters
    /// allocated (`Metadata`, qcow2 only), its blocks allocated (`Falloc`) or zeros written
    /// (`Full`). Anything but `Off` needs a larger size.
    pub preallocation: Preallocation,
}

impl Default for ResizeOptions {
    fn default() -> Self {
        ResizeOptions {
            shrink: false,
            preallocation: Preallocation::Off,
        }
    }
}

/// Largest request the zero-filling of a grown raw image writes at once.
const ZERO_CHUNK: usize = 1 << 20;

/// Resizes the top image of `image` (opened writable) to `new_size` bytes, a multiple of 512.
/// The grown range reads as zeros (never as the backing file's data); a shrink is refused
/// unless [`ResizeOptions::shrink`]. Errors carry qemu-img's messages.
///
/// ```
/// use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// use qcow2kit::ops::resize::{resize, ResizeOptions};
/// use qcow2kit::{open, BlockDevice, Format, OpenOptions};
///
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("disk.qcow2");
/// create_qcow2(&path, &CreateOptions { size: Some(1 << 20), ..CreateOptions::default() })?;
/// let rw = OpenOptions { writable: true, ..OpenOptions::default() };
/// let img = open(&path, Format::Qcow2, &rw)?;
/// resize(&img, 4 << 20, &ResizeOptions::default())?;
/// assert_eq!(img.device.size(), 4 << 20);
/// // Shrinking needs the caller's say-so.
/// assert!(resize(&img, 1 << 20, &ResizeOptions::default()).is_err());
/// img.close()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn resize(image: &Opened, new_size: u64, opts: &ResizeOptions) -> Result<()> {
    if new_size % 512 != 0 {
        return Err(Error::InvalidArgument(
            "The new size must be a multiple of 512".into(),
        ));
    }
    if let Some(q) = &image.qcow2 {
        return match opts.preallocation {
            Preallocation::Off => q.resize(new_size, opts.shrink),
            p => q.resize_preallocated(new_size, p != Preallocation::Metadata),
        };
    }
    let dev = image.device.as_ref();
    let old = dev.size();
    match opts.preallocation {
        Preallocation::Off => dev.resize(new_size, opts.shrink),
        Preallocation::Metadata => Err(Error::Unsupported(
            "Unsupported preallocation mode: metadata".into(),
        )),
        Preallocation::Falloc | Preallocation::Full => {
            if new_size <= old {
                return Err(Error::InvalidArgument(
                    "Preallocation can only be used for growing images".into(),
                ));
            }
            dev.resize(new_size, false)?;
            // The grown range is allocated by writing its zeros.
            let zeros = vec![0u8; ZERO_CHUNK];
            let mut pos = old;
            while pos < new_size {
                let n = (new_size - pos).min(ZERO_CHUNK as u64) as usize;
                dev.write_at(&zeros[..n], pos)?;
                pos += n as u64;
            }
            dev.flush()
        }
    }
}
