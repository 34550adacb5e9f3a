//! The public side of persistent bitmaps: reading a bitmap's bits and dirty extents, and
//! adding, removing, clearing, enabling, disabling and merging bitmaps as QEMU's
//! `block-dirty-bitmap-*` commands do (see [`super::bitmaps`] for how they are kept and
//! stored).

use super::bitmaps::{inconsistent, not_found, Flag, Tracked, MAX_BITMAP_MEMORY};
use super::dirty_bitmap::DirtyBitmap;
use super::Qcow2Image;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::be_u64;
use crate::format::bitmap::{
    entry_size, BitmapEntry, TableEntry, FLAG_IN_USE, TYPE_DIRTY_TRACKING,
};
use crate::format::extension::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE};
use crate::io::StorageExt;

impl Qcow2Image {
    /// Runs `f` on the loaded, consistent bitmap `name`; what it changes is stored on close.
    fn with_bitmap<T>(&self, name: &str, f: impl FnOnce(&mut Tracked) -> Result<T>) -> Result<T> {
        let mut st = self.bitmap_state();
        if !st.loaded {
            return Err(Error::ReadOnly);
        }
        st.changed = true;
        let t = st
            .list
            .iter_mut()
            .find(|t| t.entry.name == name)
            .ok_or_else(|| not_found(name))?;
        if t.bits.is_none() {
            return Err(inconsistent(name));
        }
        f(t)
    }

    /// The bits of the persistent bitmap `name`: as tracked in memory on a writable image,
    /// else as stored. A bitmap flagged in use (inconsistent) is refused.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.add_bitmap("b", 65536, true)?;
    /// img.write_at(&[1; 512], 0)?;
    /// assert_eq!(img.bitmap("b")?.count(), 1);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn bitmap(&self, name: &str) -> Result<DirtyBitmap> {
        if self.bitmap_state().loaded {
            return self.with_bitmap(name, |t| t.bits.clone().ok_or_else(|| inconsistent(name)));
        }
        let e = self
            .bitmaps()
            .into_iter()
            .find(|e| e.name == name)
            .ok_or_else(|| not_found(name))?;
        if e.flags & FLAG_IN_USE != 0 {
            return Err(inconsistent(name));
        }
        Ok(self.read_bitmap(&e, MAX_BITMAP_MEMORY)?.0)
    }

    /// The dirty ranges (offset, length) of the persistent bitmap `name`: what an incremental
    /// backup since the bitmap was created or cleared copies.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.add_bitmap("b", 65536, true)?;
    /// img.write_at(&[1; 200_000], 0)?;
    /// assert_eq!(img.bitmap_dirty_extents("b")?, vec![(0, 262144)]);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn bitmap_dirty_extents(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        Ok(self.bitmap(name)?.extents())
    }

    /// Adds a persistent bitmap, clean, tracking writes if `enabled`, at a granularity of
    /// `granularity` bytes (a power of two, 512 B..2 GiB). Stored on close, as QEMU stores it.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.add_bitmap("backup", 65536, true)?;
    /// img.write_at(&[1; 512], 70000)?;
    /// assert_eq!(img.bitmap_dirty_extents("backup")?, vec![(65536, 65536)]);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn add_bitmap(&self, name: &str, granularity: u64, enabled: bool) -> Result<()> {
        self.ensure_open()?;
        if name.is_empty() {
            return Err(Error::InvalidArgument("Bitmap name cannot be empty".into()));
        }
        if granularity < 512 || !granularity.is_power_of_two() || granularity > u64::from(u32::MAX)
        {
            return Err(Error::InvalidArgument(
                "Granularity must be power of 2 and at least 512".into(),
            ));
        }
        let g = granularity.trailing_zeros() as u8;
        let mut st = self.bitmap_state();
        if !st.loaded {
            return Err(Error::ReadOnly);
        }
        if st.list.iter().any(|t| t.entry.name == name) {
            return Err(Error::InvalidArgument(format!(
                "Bitmap already exists: {name}"
            )));
        }
        let persistent = |m: String| {
            Error::InvalidArgument(format!("Can't make bitmap '{name}' persistent: {m}"))
        };
        if self.header().version < 3 {
            return Err(persistent(
                "Cannot store dirty bitmaps in qcow2 v2 files".into(),
            ));
        }
        self.check_constraints(name, g, self.size())
            .map_err(|e| match e {
                Error::InvalidArgument(m) => persistent(m),
                other => other,
            })?;
        let count = st.list.len() as u64 + 1;
        let dir: usize = st
            .list
            .iter()
            .map(|t| entry_size(t.entry.name.len(), 0))
            .sum::<usize>()
            + entry_size(name.len(), 0);
        if count > u64::from(MAX_BITMAPS) {
            return Err(persistent(
                "Maximum number of persistent bitmaps is already reached".into(),
            ));
        }
        if dir as u64 > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(persistent(
                "Not enough space in the bitmap directory".into(),
            ));
        }
        let used: u64 = st
            .list
            .iter()
            .filter_map(|t| t.bits.as_ref())
            .map(DirtyBitmap::memory)
            .sum();
        let bits = DirtyBitmap::new(self.size(), g, MAX_BITMAP_MEMORY - used)?;
        st.list.push(Tracked {
            entry: BitmapEntry {
                table_offset: 0,
                table_size: 0,
                flags: 0,
                kind: TYPE_DIRTY_TRACKING,
                granularity_bits: g,
                name: name.to_string(),
                extra_data_size: 0,
            },
            bits: Some(bits),
            enabled,
            data_clusters: Vec::new(),
        });
        st.changed = true;
        Ok(())
    }

    /// Removes the persistent bitmap `name` from the image at once (inconsistent ones too),
    /// freeing its clusters, as QEMU's `block-dirty-bitmap-remove` does.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.add_bitmap("b", 65536, true)?;
    /// img.remove_bitmap("b")?;
    /// assert!(img.bitmaps().is_empty());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn remove_bitmap(&self, name: &str) -> Result<()> {
        self.ensure_open()?;
        self.guard(self.remove_bitmap_impl(name))
    }

    fn remove_bitmap_impl(&self, name: &str) -> Result<()> {
        let _ops = self.bitmap_ops();
        let (entries, frees) = {
            let st = self.bitmap_state();
            if !st.loaded {
                return Err(Error::ReadOnly);
            }
            let i = st
                .list
                .iter()
                .position(|t| t.entry.name == name)
                .ok_or_else(|| not_found(name))?;
            let t = &st.list[i];
            if t.entry.table_offset == 0 {
                (None, Vec::new())
            } else {
                let mut frees = if t.bits.is_some() {
                    t.data_clusters.clone()
                } else {
                    // Inconsistent: its table was not read at open.
                    self.data_clusters_of(&t.entry)?
                };
                frees.extend(self.table_clusters(&t.entry));
                let entries: Vec<BitmapEntry> = st
                    .list
                    .iter()
                    .enumerate()
                    .filter(|&(k, t)| k != i && t.entry.table_offset != 0)
                    .map(|(_, t)| t.entry.clone())
                    .collect();
                (Some(entries), frees)
            }
        };
        // The state lock is not held here: committing waits for writes in flight, which take it.
        if let Some(entries) = entries {
            self.commit_directory(&entries, frees)?;
        }
        self.bitmap_state().list.retain(|t| t.entry.name != name);
        Ok(())
    }

    /// The data clusters the table of `e` names (entries that are not valid are skipped:
    /// leaked rather than freed).
    fn data_clusters_of(&self, e: &BitmapEntry) -> Result<Vec<u64>> {
        let cs = self.geo.cluster_size;
        let raw = self
            .storage
            .read_vec(e.table_offset, e.table_size as usize * 8)
            .map_err(|err| Error::io("reading bitmap table", err))?;
        Ok(raw
            .chunks_exact(8)
            .filter_map(|c| match TableEntry::decode(be_u64(c, 0), cs) {
                Some(TableEntry::Data(h)) => Some(h),
                _ => None,
            })
            .collect())
    }

    /// Clears every bit of the bitmap `name`.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.add_bitmap("b", 65536, true)?;
    /// img.write_at(&[1; 512], 0)?;
    /// img.clear_bitmap("b")?;
    /// assert_eq!(img.bitmap("b")?.count(), 0);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn clear_bitmap(&self, name: &str) -> Result<()> {
        self.ensure_open()?;
        self.with_bitmap(name, |t| {
            if let Some(b) = &mut t.bits {
                b.clear();
            }
            Ok(())
        })
    }

    /// Enables or disables the tracking of writes by the bitmap `name`.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.add_bitmap("b", 65536, true)?;
    /// img.set_bitmap_enabled("b", false)?;
    /// img.write_at(&[1; 512], 0)?; // not tracked while disabled
    /// assert_eq!(img.bitmap("b")?.count(), 0);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn set_bitmap_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.ensure_open()?;
        let flag = self.with_bitmap(name, |t| {
            let flag = enabled && !t.enabled && t.entry.table_offset != 0;
            t.enabled = enabled;
            Ok(flag)
        })?;
        if flag {
            // Writes must flag it in use before they set its bits.
            self.bitmap_state().marked = false;
        }
        Ok(())
    }

    /// Marks dirty in the bitmap `name` every range `source` has dirty.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.add_bitmap("a", 65536, true)?;
    /// img.add_bitmap("b", 65536, false)?;
    /// img.write_at(&[1; 512], 0)?;
    /// img.merge_into_bitmap("b", &img.bitmap("a")?)?;
    /// assert_eq!(img.bitmap("b")?.count(), 1);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn merge_into_bitmap(&self, name: &str, source: &DirtyBitmap) -> Result<()> {
        self.ensure_open()?;
        self.with_bitmap(name, |_| Ok(()))?;
        // Bits the stored bitmap lacks: flagged in use before they are set.
        self.flag_bitmaps_in_use(Flag::Also(name))?;
        self.with_bitmap(name, |t| match &mut t.bits {
            Some(b) => b.merge(source),
            None => Err(inconsistent(name)),
        })
    }
}
