//! Internal snapshots of an open image: create, apply (QEMU's "goto") and delete.
//!
//! # One atomic switch
//!
//! QEMU changes the active tables, the refcounts and the snapshot table in place, one after the
//! other: a crash in between leaves COPIED flags that disagree with the refcounts, which
//! `qemu-img check` counts as corruptions. Here every operation is one switch of the first
//! sector of the header, and nothing the old state uses is written before it:
//!
//! 1. everything dirty is flushed and the L2 cache emptied, so the disk is the truth;
//! 2. the new state is written into clusters the old state does not use: a new active L1
//!    table, copies of the active L2 tables whose COPIED flags must change, the new snapshot
//!    table (L2 tables only snapshots use have their COPIED flags, which nothing reads, set
//!    in place);
//! 3. the refcounts of the new state are counted from all of its metadata (as a refcount
//!    rebuild counts them), the clusters the old state uses but the new one does not are
//!    counted once more (so that no new structure lands on them), and a whole new refcount
//!    structure is written into clusters both states leave free, and flushed;
//! 4. one 48-byte write inside the first sector (virtual size, active L1, refcount table,
//!    snapshot count and table) switches from the old state to the new, and is flushed;
//! 5. the clusters only the old state used are freed (a crash before leaks them) and punched,
//!    and the file loses its tail of free clusters.
//!
//! A crash or an I/O error at any point therefore leaves the old state or the new one, clean
//! but for leaked clusters. The price is a walk of all metadata and a new refcount structure
//! per operation (QEMU walks the active tables only).
//!
//! Afterwards the handle's memory is reloaded from what was written: header fields, the
//! published L1 table, the refcounts and the metadata map, the snapshot list, the size.

use super::meta::Meta;
use super::open::{fill_metadata_map, read_table_words, SnapshotRef, Tables};
use super::rebuild::{place_refcount_structure, Counter, RefcountArray};
use super::refcount::Refcounts;
use super::Qcow2Image;
use crate::device::BlockDevice;
use crate::error::{Corruption, Error, Result};
use crate::format::bytes::{put_u32, put_u64};
use crate::format::entry::{COPIED, OFFSET_MASK};
use crate::format::header::check_table;
use crate::format::snapshot::{encode_table, Snapshot};
use crate::format::{refcount, MAX_L1_BYTES, MAX_SNAPSHOTS, MAX_SNAPSHOT_TABLE_BYTES};
use crate::io::StorageExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

/// Longest snapshot id or name the table can hold (a 16-bit length).
const MAX_SNAPSHOT_STRING: usize = u16::MAX as usize;

/// `EFBIG`, QEMU's answer to too many snapshots or too large a table.
const EFBIG: i32 = 27;
/// `EINVAL`, QEMU's answer to a refcount that would overflow its width.
pub(super) const EINVAL: i32 = 22;
/// `ENOTSUP`, QEMU's answer to snapshots of an image with an external data file.
const ENOTSUP: i32 = 95;

pub(super) fn errno(what: &'static str, code: i32) -> Error {
    Error::io(what, std::io::Error::from_raw_os_error(code))
}

pub(super) fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

/// What a new snapshot records besides its tables.
///
/// ```
/// use qcow2kit::NewSnapshot;
/// // An explicit date, for reproducible images.
/// let s = NewSnapshot { date_sec: 1_700_000_000, ..NewSnapshot::now("release") };
/// assert_eq!(s.name, "release");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSnapshot {
    /// Name (tag); need not be unique, as in QEMU.
    pub name: String,
    /// Id; `None` takes QEMU's choice (the largest numeric id plus one).
    pub id: Option<String>,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock (0 for a snapshot of a stopped image, as `qemu-img snapshot -c` writes).
    pub vm_clock_nsec: u64,
    /// Instruction count (`qemu-img snapshot -c` writes 0).
    pub icount: Option<u64>,
}

impl NewSnapshot {
    /// A snapshot named `name` taken now, as `qemu-img snapshot -c` records it (microsecond
    /// precision, guest clock and instruction count 0).
    ///
    /// ```
    /// let s = qcow2kit::NewSnapshot::now("before-upgrade");
    /// assert!(s.date_sec > 0 && s.id.is_none());
    /// ```
    pub fn now(name: &str) -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        NewSnapshot {
            name: name.to_string(),
            id: None,
            date_sec: t.as_secs() as u32,
            date_nsec: t.subsec_micros() * 1000,
            vm_clock_nsec: 0,
            icount: Some(0),
        }
    }
}

/// QEMU's `find_new_snapshot_id`: one more than the largest id read as a number (`strtoul`:
/// leading digits, 0 if none).
fn next_snapshot_id(snaps: &[Snapshot]) -> String {
    let max = snaps
        .iter()
        .map(|s| {
            let t = s.id.trim_start();
            let digits: String = t.chars().take_while(char::is_ascii_digit).collect();
            if digits.is_empty() {
                0
            } else {
                digits.parse::<u64>().unwrap_or(u64::MAX)
            }
        })
        .max()
        .unwrap_or(0);
    max.wrapping_add(1).to_string()
}

/// The state a snapshot operation switches the image to.
pub(super) struct Target {
    pub(super) size: u64,
    /// The new active L1 table's entries (L2 table offsets; the COPIED flags are recomputed).
    pub(super) l1: Vec<u64>,
    pub(super) snapshots: Vec<Snapshot>,
    /// A new refcount order (amend's `refcount_bits`), or `None` to keep the current one.
    pub(super) refcount_order: Option<u32>,
}

/// Refcounts of the new state, indexed by cluster.
struct Counts(Vec<u64>);

impl RefcountArray for Counts {
    fn get(&self, cluster: u64) -> u64 {
        self.0.get(cluster as usize).copied().unwrap_or(0)
    }
    fn set(&mut self, cluster: u64, value: u64) {
        let i = cluster as usize;
        if i >= self.0.len() {
            self.0.resize(i + 1, 0);
        }
        self.0[i] = value;
    }
}

impl Qcow2Image {
    /// The text of the [`Error::Unsupported`] that refuses to apply a snapshot to an image
    /// with persistent bitmaps (QEMU's words: applying changes the guest content without
    /// marking any bitmap, so QEMU refuses it whatever the bitmaps' flags).
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// use qcow2kit::{NewSnapshot, Qcow2Image, SnapshotRef};
    /// img.create_snapshot(&NewSnapshot::now("s"))?;
    /// img.add_bitmap("b", 65536, true)?;
    /// let r = img.apply_snapshot(&SnapshotRef::Name("s".into()));
    /// assert!(matches!(r, Err(qcow2kit::Error::Unsupported(m)) if m == Qcow2Image::APPLY_WITH_BITMAPS));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub const APPLY_WITH_BITMAPS: &'static str = "Device has active dirty bitmaps";

    /// Creates an internal snapshot of the active image, as `qemu-img snapshot -c` does, and
    /// returns it. The image stays open and usable.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// use qcow2kit::NewSnapshot;
    /// let s = img.create_snapshot(&NewSnapshot::now("nightly"))?;
    /// assert_eq!((s.name.as_str(), s.id.as_str()), ("nightly", "1"));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn create_snapshot(&self, new: &NewSnapshot) -> Result<Snapshot> {
        if !super::snapshot_create::in_place(self.lock_meta().header.version) {
            return self.guard(self.snapshot_op(|img, m| img.plan_create(m, new)));
        }
        self.guard((|| {
            let _all = self.lock_everything()?;
            let mut m = self.lock_meta();
            if self.geo.data_file {
                return Err(errno(
                    "snapshots of an image with an external data file",
                    ENOTSUP,
                ));
            }
            self.flush_locked(&mut m)?;
            m.l2.forget_range(0, u64::MAX);
            let r = self.create_snapshot_in_place(&mut m, new);
            if r.is_err() {
                // The disk holds a dirty image (repaired at the next writable open) or the
                // finished snapshot; memory may match neither.
                m.broken = true;
            }
            r
        })())
    }

    /// Makes the snapshot `which` (found by id first, then by name) the active image, as
    /// `qemu-img snapshot -a` does: what was written since is dropped, and the virtual size
    /// becomes the snapshot's. Refused, as QEMU refuses it, on an image with persistent
    /// bitmaps ([`Self::APPLY_WITH_BITMAPS`]).
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// use qcow2kit::{NewSnapshot, SnapshotRef};
    /// img.write_at(&[1; 512], 0)?;
    /// img.create_snapshot(&NewSnapshot::now("before"))?;
    /// img.write_at(&[2; 512], 0)?;
    /// img.apply_snapshot(&SnapshotRef::Name("before".into()))?;
    /// let mut buf = [0u8; 512];
    /// img.read_at(&mut buf, 0)?;
    /// assert_eq!(buf, [1u8; 512]);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn apply_snapshot(&self, which: &SnapshotRef) -> Result<()> {
        if !self.bitmap_state().list.is_empty() {
            return Err(Error::Unsupported(Self::APPLY_WITH_BITMAPS.into()));
        }
        self.guard(self.snapshot_op(|img, m| img.plan_apply(m, which)))
            .map(|_| ())
    }

    /// Deletes the snapshot `which` and frees what only it used; returns it.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// use qcow2kit::{NewSnapshot, SnapshotRef};
    /// img.create_snapshot(&NewSnapshot::now("old"))?;
    /// img.delete_snapshot(&SnapshotRef::Name("old".into()))?;
    /// assert!(img.snapshots().is_empty());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn delete_snapshot(&self, which: &SnapshotRef) -> Result<Snapshot> {
        self.guard(self.snapshot_op(|img, m| img.plan_delete(m, which)))
    }

    /// Runs one snapshot operation: `plan` decides the target state (and what to return)
    /// from the flushed image, [`Qcow2Image::switch_state`] makes it so.
    pub(super) fn snapshot_op<T>(
        &self,
        plan: impl FnOnce(&Self, &mut Meta) -> Result<(Target, T)>,
    ) -> Result<T> {
        let _all = self.lock_everything()?;
        let mut m = self.lock_meta();
        if self.geo.data_file {
            return Err(errno(
                "snapshots of an image with an external data file",
                ENOTSUP,
            ));
        }
        self.flush_locked(&mut m)?;
        let (target, out) = plan(self, &mut m)?;
        if let Err(e) = self.switch_state(&mut m, target) {
            // The disk holds the old state or the new one; memory may match neither.
            m.broken = true;
            return Err(e);
        }
        Ok(out)
    }

    /// Changes the refcount width to `bits` (a power of two, 1..=64; version 3 images), as
    /// `qemu-img amend -o refcount_bits=N` does: a new refcount structure of the new width is
    /// written and switched to with the rest of the image's metadata in one header write, and
    /// the old one freed. A narrower width that cannot hold a cluster's count is refused with
    /// QEMU's message, before anything is written.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// # use qcow2kit::io::MemoryStorage;
    /// # use qcow2kit::BlockDevice;
    /// # use std::sync::Arc;
    /// # let file = Arc::new(MemoryStorage::new());
    /// # let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.change_refcount_width(64)?; // qemu-img amend -o refcount_bits=64
    /// assert_eq!(img.header().refcount_order, 6);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn change_refcount_width(&self, bits: u64) -> Result<()> {
        self.guard(self.snapshot_op(|img, m| img.plan_refcount_width(m, bits)))
    }

    /// Gives every snapshot table entry QEMU's 24 bytes of version 3 extra data, as
    /// `qemu-img amend -o compat=1.1` does before it upgrades a version 2 image: an entry
    /// without a disk size records the image's current size, one without an instruction count
    /// records none (-1). The table is written elsewhere and switched to as by every snapshot
    /// operation.
    pub(crate) fn complete_snapshot_extra_data(&self) -> Result<()> {
        self.guard(self.snapshot_op(|img, m| {
            let size = img.size();
            let snapshots = img
                .snapshots()
                .into_iter()
                .map(|s| Snapshot {
                    disk_size: s.disk_size.or(Some(size)),
                    icount: s.icount.or(Some(u64::MAX)),
                    ..s
                })
                .collect();
            let target = Target {
                size,
                l1: m.l1.to_vec(),
                snapshots,
                refcount_order: None,
            };
            Ok((target, ()))
        }))
    }

    fn plan_refcount_width(&self, m: &mut Meta, bits: u64) -> Result<(Target, ())> {
        if bits == 0 || bits > 64 || !bits.is_power_of_two() {
            return Err(Error::InvalidArgument(
                "Refcount width must be a power of two and may not exceed 64 bits".into(),
            ));
        }
        if m.header.version < 3 && bits != 16 {
            return Err(Error::InvalidArgument(
                "Refcount widths other than 16 bits require compatibility level 1.1 or above"
                    .into(),
            ));
        }
        let order = bits.trailing_zeros();
        if order < m.header.refcount_order {
            let max = refcount::max_value(order);
            let s = self.storage.as_ref();
            let clusters = s
                .len()
                .map_err(io_err("sizing the image"))?
                .div_ceil(self.geo.cluster_size);
            for cl in 0..clusters {
                let n = m.refs()?.get(s, cl)?;
                if n > max {
                    return Err(Error::InvalidArgument(format!(
                        "Cannot decrease refcount entry width to {bits} bits: Cluster at offset \
                         {:#x} has a refcount of {n}",
                        cl << self.geo.cluster_bits
                    )));
                }
            }
        }
        let target = Target {
            size: self.size(),
            l1: m.l1.to_vec(),
            snapshots: self.snapshots(),
            refcount_order: Some(order),
        };
        Ok((target, ()))
    }

    pub(super) fn plan_create(
        &self,
        m: &mut Meta,
        new: &NewSnapshot,
    ) -> Result<(Target, Snapshot)> {
        let mut snaps = self.snapshots();
        if snaps.len() >= MAX_SNAPSHOTS as usize {
            return Err(errno("too many snapshots", EFBIG));
        }
        let id = new.id.clone().unwrap_or_else(|| next_snapshot_id(&snaps));
        if snaps.iter().any(|s| s.id == id) {
            return Err(Error::InvalidArgument(format!(
                "a snapshot with id '{id}' exists"
            )));
        }
        if id.len() > MAX_SNAPSHOT_STRING || new.name.len() > MAX_SNAPSHOT_STRING {
            return Err(Error::InvalidArgument(
                "snapshot id and name are limited to 65535 bytes".into(),
            ));
        }
        // The old active L1 table becomes the snapshot's as it is (COPIED flags are not read
        // in a snapshot's table); the active image gets a new one.
        let snap = Snapshot {
            l1_table_offset: m.header.l1_table_offset,
            l1_size: m.header.l1_size,
            id,
            name: new.name.clone(),
            date_sec: new.date_sec,
            date_nsec: new.date_nsec,
            vm_clock_nsec: new.vm_clock_nsec,
            vm_state_size: 0,
            disk_size: Some(self.size()),
            icount: new.icount,
            extra_unknown: Vec::new(),
        };
        snaps.push(snap.clone());
        let target = Target {
            size: self.size(),
            l1: m.l1.to_vec(),
            snapshots: snaps,
            refcount_order: None,
        };
        Ok((target, snap))
    }

    fn plan_apply(&self, m: &mut Meta, which: &SnapshotRef) -> Result<(Target, ())> {
        // QEMU's `bdrv_snapshot_goto` refuses an image with any dirty bitmap (persistent
        // ones are loaded at open, enabled, disabled or inconsistent), before it looks for
        // the snapshot.
        // (Bitmaps added since open are refused by the caller: the bitmap state is not
        // taken under the metadata lock.)
        if !self.bitmaps().is_empty() {
            return Err(Error::Unsupported(Self::APPLY_WITH_BITMAPS.into()));
        }
        let snaps = self.snapshots();
        let sn = which
            .find(&snaps)
            .map(|i| snaps[i].clone())
            .ok_or_else(|| Error::SnapshotNotFound(which.text().into()))?;
        let l1_bytes = u64::from(sn.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Corruption::BadTable {
                table: "snapshot L1 table",
                offset: sn.l1_table_offset,
                size: l1_bytes,
                rule: "larger than 32 MiB",
            }
            .into());
        }
        let cs = self.geo.cluster_size;
        check_table(
            "snapshot L1 table",
            sn.l1_table_offset,
            l1_bytes,
            cs,
            m.file_end,
        )?;
        let size = sn.disk_size.unwrap_or(self.size());
        let needed = m
            .header
            .l1_entries_for(size)
            .filter(|&n| n <= MAX_L1_BYTES / 8)
            .ok_or_else(|| Error::Unsupported("size needs an L1 table over 32 MiB".into()))?;
        let mut l1 = read_table_words(
            self.storage.as_ref(),
            sn.l1_table_offset,
            sn.l1_size as usize,
        )?
        .into_vec();
        // As QEMU does, the active table never shrinks.
        let len = (sn.l1_size as usize).max(m.l1.len()).max(needed as usize);
        l1.resize(len, 0);
        Ok((
            Target {
                size,
                l1,
                snapshots: snaps,
                refcount_order: None,
            },
            (),
        ))
    }

    fn plan_delete(&self, m: &mut Meta, which: &SnapshotRef) -> Result<(Target, Snapshot)> {
        let mut snaps = self.snapshots();
        let i = which
            .find(&snaps)
            .ok_or_else(|| Error::SnapshotNotFound(which.text().into()))?;
        let gone = snaps.remove(i);
        let target = Target {
            size: self.size(),
            l1: m.l1.to_vec(),
            snapshots: snaps,
            refcount_order: None,
        };
        Ok((target, gone))
    }

    /// Allocates `bytes` (rounded up to clusters) from the old state's free clusters.
    pub(super) fn alloc_new(&self, m: &mut Meta, bytes: u64) -> Result<u64> {
        let n = bytes.div_ceil(self.geo.cluster_size).max(1);
        let s = self.storage.as_ref();
        let at = {
            let Meta { refs, file_end, .. } = &mut *m;
            refs.as_mut()
                .ok_or(Error::ReadOnly)?
                .alloc(s, n, file_end)?
        };
        Ok(at)
    }

    pub(super) fn write_new(
        &self,
        m: &mut Meta,
        buf: &[u8],
        at: u64,
        what: &'static str,
    ) -> Result<()> {
        self.storage.write_at(buf, at).map_err(io_err(what))?;
        self.note_file_growth(m, at + buf.len() as u64);
        Ok(())
    }

    /// Switches the image to `t` (see the module docs). `m` is flushed.
    fn switch_state(&self, m: &mut Meta, mut t: Target) -> Result<()> {
        let s = self.storage.as_ref();
        let g = self.geo;
        let (cb, cs) = (g.cluster_bits, g.cluster_size);
        m.l2.forget_range(0, u64::MAX);
        self.frees_applied.fetch_add(1, Ordering::SeqCst);
        let old_active: BTreeSet<u64> =
            m.l1.to_vec()
                .iter()
                .map(|e| e & OFFSET_MASK)
                .filter(|&o| o != 0)
                .collect();

        // New structures (before counting: the walk reads them from the disk).
        let l1_bytes = t.l1.len() as u64 * 8;
        let l1_at = self.alloc_new(m, l1_bytes)?;
        let table = encode_table(&t.snapshots, self.size());
        if table.len() as u64 > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(errno("the snapshot table would exceed 64 MiB", EFBIG));
        }
        let table_at = if table.is_empty() {
            0
        } else {
            let at = self.alloc_new(m, table.len() as u64)?;
            self.write_new(m, &table, at, "writing the snapshot table")?;
            at
        };
        // A provisional active table, so that the walk sees the new state's references.
        let mut raw = vec![0u8; l1_bytes as usize];
        for (i, e) in t.l1.iter().enumerate() {
            put_u64(&mut raw, i * 8, e & OFFSET_MASK);
        }
        self.write_new(m, &raw, l1_at, "writing the new L1 table")?;

        let file_len = s.len().map_err(io_err("sizing the image"))?;
        let mut header = m.header.clone();
        header.size = t.size;
        header.l1_table_offset = l1_at;
        header.l1_size = t.l1.len() as u32;
        header.nb_snapshots = t.snapshots.len() as u32;
        header.snapshots_offset = table_at;
        if let Some(order) = t.refcount_order {
            header.refcount_order = order;
        }
        let mut c = Counter::new(s, cb, file_len.div_ceil(cs) + 2, file_len);
        c.inc("header", 0, cs)?;
        c.l1(&header, l1_at, header.l1_size)?;
        c.inc("snapshot table", table_at, table.len() as u64)?;
        for sn in &t.snapshots {
            c.l1(&header, sn.l1_table_offset, sn.l1_size)?;
        }
        c.bitmaps(&header, &self.area().extensions, &self.bitmaps())?;
        c.encryption_header(&self.area().extensions)?;
        let mut counts = Counts(std::mem::take(&mut c.counts));

        // COPIED flags of the new active L2 tables; tables the old active image uses are
        // copied rather than changed.
        let mut replaced: BTreeMap<u64, u64> = BTreeMap::new();
        let distinct: BTreeSet<u64> =
            t.l1.iter()
                .map(|e| e & OFFSET_MASK)
                .filter(|&o| o != 0)
                .collect();
        for l2 in distinct {
            if l2 % cs != 0 {
                return Err(
                    Corruption::Inconsistent(format!("L2 table offset {l2:#x} unaligned")).into(),
                );
            }
            let words = read_table_words(s, l2, (cs / 8) as usize)?;
            let fixed = self.fixed_copied(&words, &counts);
            if fixed == *words {
                continue;
            }
            let mut raw = vec![0u8; cs as usize];
            for (i, w) in fixed.iter().enumerate() {
                put_u64(&mut raw, i * 8, *w);
            }
            if old_active.contains(&l2) {
                let at = self.alloc_new(m, cs)?;
                self.write_new(m, &raw, at, "writing an L2 table")?;
                let refs = t.l1.iter().filter(|e| *e & OFFSET_MASK == l2).count() as u64;
                let cl = (l2 >> cb) as usize;
                counts.0[cl] = counts.0[cl].saturating_sub(refs);
                counts.set(at >> cb, refs);
                replaced.insert(l2, at);
            } else {
                // Only snapshots use it: its COPIED flags mean nothing to the old state.
                m.refs()?
                    .map
                    .refuse(l2, cs, &[super::overlap::Structure::InactiveL2])?;
                s.write_at(&raw, l2)
                    .map_err(io_err("writing an L2 table"))?;
            }
        }
        for e in &mut t.l1 {
            let l2 = *e & OFFSET_MASK;
            let l2 = replaced.get(&l2).copied().unwrap_or(l2);
            *e = if l2 != 0 && counts.get(l2 >> cb) == 1 {
                l2 | COPIED
            } else {
                l2
            };
        }
        let mut raw = vec![0u8; l1_bytes as usize];
        for (i, e) in t.l1.iter().enumerate() {
            put_u64(&mut raw, i * 8, *e);
        }
        s.write_at(&raw, l1_at)
            .map_err(io_err("writing the new L1 table"))?;

        // What the old state uses and the new one does not stays counted until the switch.
        let mut reserved = Vec::new();
        let total = counts.0.len() as u64;
        for cl in 0..total {
            if counts.get(cl) == 0 && m.refs()?.get(s, cl)? > 0 {
                counts.set(cl, 1);
                reserved.push(cl << cb);
            }
        }
        let max = refcount::max_value(header.refcount_order);
        if counts.0.iter().any(|&n| n > max) {
            return Err(errno("refcount overflow", EINVAL));
        }
        s.flush().map_err(io_err("flushing the new tables"))?;
        let mut nb = counts.0.len() as u64;
        let rt = place_refcount_structure(s, cb, header.refcount_order, &mut counts, &mut nb)?;
        header.refcount_table_offset = rt.offset;
        header.refcount_table_clusters = rt.clusters;

        // The switch: one write inside the first sector (up to the refcount order of a
        // version 3 header when it changes).
        let span = if t.refcount_order.is_some() { 76 } else { 48 };
        let mut first = s
            .read_vec(24, span)
            .map_err(io_err("reading the image header"))?;
        if span == 76 {
            put_u32(&mut first, 72, header.refcount_order);
        }
        put_u64(&mut first, 0, header.size);
        put_u32(&mut first, 12, header.l1_size);
        put_u64(&mut first, 16, header.l1_table_offset);
        put_u64(&mut first, 24, header.refcount_table_offset);
        put_u32(&mut first, 32, header.refcount_table_clusters);
        put_u32(&mut first, 36, header.nb_snapshots);
        put_u64(&mut first, 40, header.snapshots_offset);
        s.write_at(&first, 24)
            .and_then(|()| s.flush())
            .map_err(io_err("switching the image header"))?;

        self.reload(m, header, &t, table.len() as u64)?;

        // Free what only the old state used. Counted first, so that a read whose data I/O
        // overlaps the frees and punches reads again (see `read_at`).
        self.frees_applied.fetch_add(1, Ordering::SeqCst);
        for &host in &reserved {
            m.refs()?.add(s, host, -1)?;
        }
        m.refs()?.write_blocks(s)?;
        s.flush().map_err(io_err("flushing freed clusters"))?;
        for &host in &reserved {
            if m.refs()?.map.find(host, cs, &[]).is_none() {
                let _ = s.punch_hole(host, cs);
            }
        }
        // The new structures may have left free clusters at the end of the file.
        self.trim_free_tail(m)
    }

    /// `words` (one L2 table) with the COPIED flag of every allocated entry set exactly when
    /// its cluster's count in `counts` is 1.
    fn fixed_copied(&self, words: &[u64], counts: &Counts) -> Vec<u64> {
        let g = self.geo;
        let mut out = words.to_vec();
        super::rebuild::set_copied_flags(&mut out, g.cluster_bits, g.extended, |host| {
            counts.get(host >> g.cluster_bits)
        });
        out
    }

    /// Makes the handle's memory what the disk now holds after a switch to `t` under `header`.
    pub(super) fn reload(
        &self,
        m: &mut Meta,
        header: crate::format::header::Header,
        t: &Target,
        table_len: u64,
    ) -> Result<()> {
        let s = self.storage.as_ref();
        let cs = self.geo.cluster_size;
        let file_len = s.len().map_err(io_err("sizing the image"))?;
        let file_end = file_len.next_multiple_of(cs);
        let mut refs = Refcounts::load(s, &header)?;
        let ext = self.area().extensions.clone();
        let bitmaps = self.bitmaps();
        let tables = Tables {
            l1: &t.l1,
            snapshots: &t.snapshots,
            snapshot_table: (header.snapshots_offset, table_len),
            bitmaps: &bitmaps,
            bitmap_directory: ext
                .bitmaps
                .filter(|_| !bitmaps.is_empty())
                .map(|b| (b.directory_offset, b.directory_size)),
            encryption_header: ext.crypto.map(|c| (c.offset, c.length)),
        };
        fill_metadata_map(&mut refs.map, s, &tables, cs, file_end)?;
        m.refs = Some(refs);
        m.l1.grow(t.l1.len());
        for (i, &e) in t.l1.iter().enumerate() {
            m.l1.set(i, e);
        }
        m.l1_dirty.clear();
        m.file_len = file_len;
        m.file_end = m.file_end.max(file_end);
        self.file_len.store(file_len, Ordering::Relaxed);
        m.header = header;
        *self.snapshots.write().unwrap_or_else(|e| e.into_inner()) = t.snapshots.clone();
        self.size.store(t.size, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str) -> Snapshot {
        Snapshot {
            l1_table_offset: 0,
            l1_size: 0,
            id: id.into(),
            name: String::new(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: None,
            icount: None,
            extra_unknown: Vec::new(),
        }
    }

    #[test]
    fn ids_as_qemu_assigns_them() {
        assert_eq!(next_snapshot_id(&[]), "1");
        assert_eq!(next_snapshot_id(&[snap("1"), snap("7"), snap("3")]), "8");
        assert_eq!(next_snapshot_id(&[snap("abc"), snap("12x")]), "13");
    }
}
