//! The allocation map of a device through its backing chain, as `qemu-img map` reports it.
//!
//! [`for_each_extent`] walks the device from a start offset, asks each layer of the chain for the
//! status of the run at hand (the first layer that has data or zeros answers, exactly like
//! qemu-img's `get_block_status`), and merges adjacent runs with the same depth, presence, zero,
//! data and compressed flags and contiguous host offsets, as qemu-img does before printing. The
//! cost is one status query per run of one kind, so a sparse image of any size maps at once.
//!
//! The status of one layer follows QEMU's block layer (`bdrv_co_do_block_status`): data and zero
//! clusters are *allocated* (present); an unallocated range reads as zeros when the layer has no
//! backing device or lies at or past the end of its backing device, and is then reported by that
//! layer (depth of the layer, not present).
//!
//! ```
//! use qcow2kit::io::MemoryStorage;
//! use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
//! use qcow2kit::ops::map::map_extents;
//! use qcow2kit::BlockDevice;
//! use std::sync::Arc;
//! let img = create_qcow2_on(Arc::new(MemoryStorage::new()), None, 1 << 20, &CreateOptions::default())?;
//! img.write_at(&[1; 65536], 65536)?;
//! let runs: Vec<(u64, u64, bool)> = map_extents(&img, 0, None)?
//!     .iter()
//!     .map(|e| (e.start, e.length, e.data))
//!     .collect();
//! assert_eq!(runs, vec![(0, 65536, false), (65536, 65536, true), (131072, 917504, false)]);
//! # Ok::<(), qcow2kit::Error>(())
//! ```

use crate::device::{BlockDevice, ExtentKind};
use crate::error::{Error, Result};

/// QEMU's `BDRV_BLOCK_*` status bits, as far as qcow2kit reproduces them.
pub(crate) mod flags {
    /// `BDRV_BLOCK_DATA`: the range holds data.
    pub(crate) const DATA: u32 = 0x01;
    /// `BDRV_BLOCK_ZERO`: the range reads as zeros.
    pub(crate) const ZERO: u32 = 0x02;
    /// `BDRV_BLOCK_OFFSET_VALID`: the host offset is known.
    pub(crate) const OFFSET_VALID: u32 = 0x04;
    /// `BDRV_BLOCK_ALLOCATED`: this layer decides the content.
    pub(crate) const ALLOCATED: u32 = 0x10;
    /// `BDRV_BLOCK_EOF`: the run reaches the end of the layer.
    pub(crate) const EOF: u32 = 0x20;
    /// `BDRV_BLOCK_COMPRESSED`: the data is stored compressed.
    pub(crate) const COMPRESSED: u32 = 0x80;
}

/// The status of one run in one layer, in QEMU's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LayerStatus {
    /// `flags::*` bits.
    pub(crate) flags: u32,
    /// Length of the run (0 only when the offset is at or past the end of the layer).
    pub(crate) len: u64,
    /// Host offset, when `OFFSET_VALID`.
    pub(crate) host_offset: Option<u64>,
}

/// The status of the run at `offset` (at most `bytes` long) in `layer` alone.
pub(crate) fn layer_status(
    layer: &dyn BlockDevice,
    offset: u64,
    bytes: u64,
) -> Result<LayerStatus> {
    let size = layer.size();
    if offset >= size {
        return Ok(LayerStatus {
            flags: flags::EOF,
            len: 0,
            host_offset: None,
        });
    }
    let bytes = bytes.min(size - offset);
    if bytes == 0 {
        return Err(Error::InvalidArgument(
            "block status of an empty range".into(),
        ));
    }
    let e = layer.block_status(offset, bytes)?;
    let len = e.len.min(bytes);
    if len == 0 {
        return Err(Error::InvalidArgument(format!(
            "block status at offset {offset} returned an empty run"
        )));
    }
    let mut f = match e.kind {
        ExtentKind::Data => flags::DATA | flags::ALLOCATED,
        ExtentKind::Zero => flags::ZERO | flags::ALLOCATED,
        ExtentKind::Unallocated => match layer.backing() {
            None => flags::ZERO,
            Some(b) if offset >= b.size() => flags::ZERO,
            Some(_) => 0,
        },
    };
    if e.compressed {
        f |= flags::COMPRESSED;
    }
    let host_offset = if e.compressed { None } else { e.host_offset };
    if host_offset.is_some() {
        f |= flags::OFFSET_VALID;
    }
    if offset + len == size {
        f |= flags::EOF;
    }
    Ok(LayerStatus {
        flags: f,
        len,
        host_offset,
    })
}

/// One run of guest bytes with one status: the fields of qemu-img map's JSON output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Guest offset of the run.
    pub start: u64,
    /// Length of the run in bytes.
    pub length: u64,
    /// Layer that decides the content: 0 is the image itself, 1 its backing file, …
    pub depth: u32,
    /// Whether that layer allocates the run (data or zero clusters), rather than the run reading
    /// as zeros because nothing below has it.
    pub present: bool,
    /// Whether the run reads as zeros.
    pub zero: bool,
    /// Whether the run holds data.
    pub data: bool,
    /// Whether the data is stored compressed.
    pub compressed: bool,
    /// Host offset of the run in the file of the layer at `depth` (its data file, if it has one),
    /// when known.
    pub offset: Option<u64>,
}

impl MapEntry {
    /// Whether `next` continues this entry as qemu-img map merges entries: the same flags and
    /// depth, and (when both have host offsets) contiguous host offsets.
    pub fn mergeable(&self, next: &MapEntry) -> bool {
        if self.length == 0
            || self.zero != next.zero
            || self.data != next.data
            || self.compressed != next.compressed
            || self.depth != next.depth
            || self.present != next.present
            || self.offset.is_some() != next.offset.is_some()
        {
            return false;
        }
        match (self.offset, next.offset) {
            (Some(a), Some(b)) => a.checked_add(self.length) == Some(b),
            _ => true,
        }
    }
}

/// The status of the run at `offset` (at most `bytes`), resolved through the chain the way
/// qemu-img map's `get_block_status` resolves it.
pub fn entry_at(dev: &dyn BlockDevice, offset: u64, bytes: u64) -> Result<MapEntry> {
    let mut layer = dev;
    let mut depth = 0u32;
    let mut bytes = bytes;
    let st = loop {
        let st = layer_status(layer, offset, bytes)?;
        if st.len == 0 {
            return Err(Error::OutOfRange {
                offset,
                len: bytes,
                size: layer.size(),
            });
        }
        bytes = st.len;
        if st.flags & (flags::ZERO | flags::DATA) != 0 {
            break st;
        }
        match layer.backing() {
            Some(b) => {
                layer = b.as_ref();
                depth += 1;
            }
            None => break LayerStatus { flags: 0, ..st },
        }
    };
    Ok(MapEntry {
        start: offset,
        length: st.len,
        depth,
        present: st.flags & flags::ALLOCATED != 0,
        zero: st.flags & flags::ZERO != 0,
        data: st.flags & flags::DATA != 0,
        compressed: st.flags & flags::COMPRESSED != 0,
        offset: st
            .host_offset
            .filter(|_| st.flags & flags::OFFSET_VALID != 0),
    })
}

/// Calls `f` with each merged entry of the map of `dev` from `start`, at most `max_length`
/// bytes (to the end of the device if `None`), in order. Nothing is emitted when `start` lies at
/// or past the end.
///
/// An entry is emitted as soon as the next one is known not to continue it, so a caller that
/// prints as it goes shows the same prefix as qemu-img when an error stops the walk.
pub fn for_each_extent<E: From<Error>>(
    dev: &dyn BlockDevice,
    start: u64,
    max_length: Option<u64>,
    mut f: impl FnMut(&MapEntry) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    let size = dev.size();
    let end = match max_length {
        Some(m) => start.saturating_add(m).min(size),
        None => size,
    };
    let mut cur: Option<MapEntry> = None;
    let mut pos = start;
    while pos < end {
        let next = entry_at(dev, pos, end - pos)?;
        pos += next.length;
        match &mut cur {
            Some(c) if c.mergeable(&next) => c.length += next.length,
            Some(c) => {
                f(c)?;
                *c = next;
            }
            None => cur = Some(next),
        }
    }
    if let Some(c) = cur {
        f(&c)?;
    }
    Ok(())
}

/// The merged map of `dev` from `start`, at most `max_length` bytes (see [`for_each_extent`]).
///
/// ```
/// use qcow2kit::io::MemoryStorage;
/// use qcow2kit::ops::map::map_extents;
/// use qcow2kit::RawImage;
/// use std::sync::Arc;
/// let raw = RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![3; 8192])), false)?;
/// let m = map_extents(&raw, 0, None)?; // qemu-img map --output=json
/// assert_eq!((m.len(), m[0].data, m[0].offset), (1, true, Some(0)));
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub fn map_extents(
    dev: &dyn BlockDevice,
    start: u64,
    max_length: Option<u64>,
) -> Result<Vec<MapEntry>> {
    let mut v = Vec::new();
    for_each_extent(dev, start, max_length, |e| {
        v.push(*e);
        Ok::<(), Error>(())
    })?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{Extent, RawImage};
    use crate::io::MemoryStorage;
    use std::sync::Arc;

    /// A device described by a list of extents, with an optional backing device.
    struct Fake {
        size: u64,
        runs: Vec<(u64, u64, ExtentKind, Option<u64>)>,
        backing: Option<Arc<dyn BlockDevice>>,
    }

    impl BlockDevice for Fake {
        fn size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, buf: &mut [u8], _offset: u64) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
        fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
            Err(Error::ReadOnly)
        }
        fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<()> {
            Err(Error::ReadOnly)
        }
        fn close(&self) -> Result<()> {
            Ok(())
        }
        fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
            Err(Error::ReadOnly)
        }
        fn flush(&self) -> Result<()> {
            Ok(())
        }
        fn block_status(&self, offset: u64, len: u64) -> Result<Extent> {
            let (s, l, kind, host) = *self
                .runs
                .iter()
                .find(|r| r.0 <= offset && offset < r.0 + r.1)
                .expect("run");
            let n = (s + l - offset).min(len);
            Ok(Extent {
                offset,
                len: n,
                kind,
                depth: 0,
                host_offset: host.map(|h| h + offset - s),
                compressed: false,
            })
        }
        fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
            self.backing.as_ref()
        }
        fn format_name(&self) -> &'static str {
            "fake"
        }
    }

    #[test]
    fn past_the_end_of_a_short_backing_file_is_the_top_layer_zero() {
        let raw: Arc<dyn BlockDevice> = Arc::new(
            RawImage::open(Arc::new(MemoryStorage::from_bytes(vec![1; 4096])), false).unwrap(),
        );
        let top = Fake {
            size: 16384,
            runs: vec![
                (0, 1024, ExtentKind::Data, Some(65536)),
                (1024, 1024, ExtentKind::Data, Some(65536 + 1024)),
                (2048, 14336, ExtentKind::Unallocated, None),
            ],
            backing: Some(raw),
        };
        let m = map_extents(&top, 0, None).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(
            (m[0].start, m[0].length, m[0].depth, m[0].offset),
            (0, 2048, 0, Some(65536))
        );
        assert_eq!(
            (m[1].start, m[1].length, m[1].depth, m[1].present),
            (2048, 2048, 1, true)
        );
        assert!(m[1].data && !m[1].zero);
        assert_eq!((m[2].start, m[2].length, m[2].depth), (4096, 12288, 0));
        assert!(!m[2].present && m[2].zero && !m[2].data && m[2].offset.is_none());
    }

    #[test]
    fn unallocated_without_backing_is_zero_not_present() {
        let top = Fake {
            size: 8192,
            runs: vec![
                (0, 4096, ExtentKind::Unallocated, None),
                (4096, 4096, ExtentKind::Zero, None),
            ],
            backing: None,
        };
        let m = map_extents(&top, 1000, Some(5000)).unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(
            (m[0].start, m[0].length, m[0].present, m[0].zero),
            (1000, 3096, false, true)
        );
        assert_eq!(
            (m[1].start, m[1].length, m[1].present, m[1].zero),
            (4096, 1904, true, true)
        );
        assert!(map_extents(&top, 9000, None).unwrap().is_empty());
    }

    #[test]
    fn discontiguous_host_offsets_do_not_merge() {
        let top = Fake {
            size: 2048,
            runs: vec![
                (0, 1024, ExtentKind::Data, Some(0)),
                (1024, 1024, ExtentKind::Data, Some(4096)),
            ],
            backing: None,
        };
        assert_eq!(map_extents(&top, 0, None).unwrap().len(), 2);
    }
}
