//! Opening a qcow2 image: every header rule and limit checked before any table is read or
//! allocated (mirroring QEMU's `qcow2_do_open`), then the L1 table, snapshot table and bitmap
//! directory loaded with sizes bounded by the file.

use super::cache::SliceCache;
use super::corrupt::CorruptionReporter;
use super::encryption::{Encryption, EncryptionOptions};
use super::meta::Meta;
use super::overlap::{MetadataMap, INACTIVE_L1_READ_BUDGET};
use super::rebuild::rebuild_refcounts;
use super::refcount::Refcounts;
use super::shared::{L1Table, Shared, MAX_SLOTS};
use super::{Geometry, HeaderArea, Qcow2Image};
use crate::error::{Corruption, Error, Result};
use crate::format::bitmap::{parse_directory, BitmapEntry};
use crate::format::entry::OFFSET_MASK;
use crate::format::extension::Extensions;
use crate::format::features::AutoclearFeatures;
use crate::format::features::IncompatibleFeatures;
use crate::format::header::{check_table, Header, SNAPSHOT_HEADER_SIZE};
use crate::format::parse_first_cluster;
use crate::format::snapshot::{parse_table, Snapshot, ENTRY_PAST_END};
use crate::format::{be_u64, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_SNAPSHOT_TABLE_BYTES};
use crate::io::{Storage, StorageExt};
use std::sync::atomic::AtomicU64;
use std::sync::Condvar;
use std::sync::{Arc, Mutex};

/// Default memory for the L2 cache: maps 256 GiB of guest data with 64 KiB clusters.
///
/// ```
/// use qcow2kit::engine::DEFAULT_L2_CACHE_BYTES;
/// assert_eq!(qcow2kit::Qcow2Options::default().l2_cache_bytes, DEFAULT_L2_CACHE_BYTES);
/// ```
pub const DEFAULT_L2_CACHE_BYTES: usize = 32 << 20;

/// Which snapshot to read instead of the active image.
///
/// ```
/// use qcow2kit::SnapshotRef;
/// assert_eq!(SnapshotRef::parse("snapshot.name=nightly")?, SnapshotRef::Name("nightly".into()));
/// assert_eq!(SnapshotRef::parse("3")?, SnapshotRef::IdOrName("3".into()));
/// # Ok::<(), qcow2kit::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotRef {
    /// Match the snapshot id (`snapshot.id=`).
    Id(String),
    /// Match the snapshot name (`snapshot.name=`).
    Name(String),
    /// Match the id first, then the name (qemu-img's plain `-l NAME`).
    IdOrName(String),
}

impl SnapshotRef {
    /// Parses qemu-img's `-l` argument: `snapshot.id=ID`, `snapshot.name=NAME`, a combination
    /// separated by commas, or a plain id-or-name.
    ///
    /// ```
    /// use qcow2kit::SnapshotRef;
    /// assert_eq!(SnapshotRef::parse("snapshot.id=2")?, SnapshotRef::Id("2".into()));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn parse(s: &str) -> Result<Self> {
        let mut id = None;
        let mut name = None;
        if !s.starts_with("snapshot.") {
            return Ok(SnapshotRef::IdOrName(s.to_string()));
        }
        for part in s.split(',') {
            if let Some(v) = part.strip_prefix("snapshot.id=") {
                id = Some(v.to_string());
            } else if let Some(v) = part.strip_prefix("snapshot.name=") {
                name = Some(v.to_string());
            } else {
                return Err(Error::InvalidArgument(format!(
                    "invalid snapshot option '{part}'"
                )));
            }
        }
        match (id, name) {
            (Some(i), None) => Ok(SnapshotRef::Id(i)),
            (None, Some(n)) => Ok(SnapshotRef::Name(n)),
            (Some(i), Some(_)) => Ok(SnapshotRef::Id(i)),
            (None, None) => Err(Error::InvalidArgument(s.to_string())),
        }
    }

    pub(crate) fn find(&self, snaps: &[Snapshot]) -> Option<usize> {
        match self {
            SnapshotRef::Id(i) => snaps.iter().position(|s| &s.id == i),
            SnapshotRef::Name(n) => snaps.iter().position(|s| &s.name == n),
            SnapshotRef::IdOrName(x) => snaps
                .iter()
                .position(|s| &s.id == x)
                .or_else(|| snaps.iter().position(|s| &s.name == x)),
        }
    }

    pub(crate) fn text(&self) -> &str {
        match self {
            SnapshotRef::Id(s) | SnapshotRef::Name(s) | SnapshotRef::IdOrName(s) => s,
        }
    }
}

/// The engine's settings for one qcow2 image: its cache, its corruption reporter and its key.
/// Whether it is opened for writing or as a snapshot is the choice of the constructor
/// ([`Qcow2Image::open`], [`Qcow2Image::open_writable`], [`Qcow2Image::open_snapshot`]), or of
/// [`OpenOptions`](crate::OpenOptions) for a whole chain; its backing and data files are
/// attached separately (see [`crate::chain`]).
///
/// ```
/// use qcow2kit::Qcow2Options;
/// // A small cache for a VMM running many disks.
/// let opts = Qcow2Options { l2_cache_bytes: 1 << 20, ..Qcow2Options::default() };
/// # let _ = opts;
/// ```
#[derive(Debug, Clone)]
pub struct Qcow2Options {
    /// Bytes of memory the L2 cache may use: between 4 and 131 071 slices of at most 4 KiB
    /// (512 MiB; with 64 KiB clusters they map 4 PiB of guest data) are kept. Besides the
    /// slices, about 33 bytes per slice of this budget are allocated at open for the index that
    /// lock-free lookups use.
    pub l2_cache_bytes: usize,
    /// Where corruption found while the image is in use is reported (see
    /// [`CorruptionEvent`](super::CorruptionEvent)); `None` reports nothing (the failing
    /// request's error still says what was found).
    pub on_corruption: Option<CorruptionReporter>,
    /// The key and expectations for an encrypted image.
    pub encryption: EncryptionOptions,
}

impl Default for Qcow2Options {
    fn default() -> Self {
        Qcow2Options {
            l2_cache_bytes: DEFAULT_L2_CACHE_BYTES,
            on_corruption: None,
            encryption: EncryptionOptions::default(),
        }
    }
}

fn io_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(what, e)
}

pub(crate) fn read_table_words(
    storage: &dyn Storage,
    offset: u64,
    entries: usize,
) -> Result<Box<[u64]>> {
    let bytes = storage
        .read_vec(offset, entries * 8)
        .map_err(io_err("reading L1 table"))?;
    Ok(bytes.chunks_exact(8).map(|c| be_u64(c, 0)).collect())
}

/// First read of the snapshot table; doubled while entries run past it.
const SNAPSHOT_TABLE_FIRST_READ: u64 = 64 << 10;

/// Reads and parses the snapshot table. The table's length is only known by parsing it, and may
/// be anything up to 64 MiB (QEMU's limit): read a little, and read more (doubling, up to what
/// the file and the limit allow) only while an entry runs past what was read, so that opening
/// reads in proportion to the real table, not to the file or the limit.
fn read_snapshot_table(
    storage: &dyn Storage,
    header: &Header,
    file_end: u64,
) -> Result<(Vec<Snapshot>, u64)> {
    let cap = file_end
        .saturating_sub(header.snapshots_offset)
        .min(MAX_SNAPSHOT_TABLE_BYTES);
    // Every entry takes at least its 40-byte fixed part (validate checked this fits).
    let mut len = (u64::from(header.nb_snapshots) * SNAPSHOT_HEADER_SIZE)
        .max(SNAPSHOT_TABLE_FIRST_READ)
        .min(cap);
    loop {
        let buf = storage
            .read_vec(header.snapshots_offset, len as usize)
            .map_err(io_err("reading snapshot table"))?;
        match parse_table(&buf, header.nb_snapshots) {
            Ok(parsed) => return Ok(parsed),
            Err(Corruption::BadSnapshot { rule, .. }) if rule == ENTRY_PAST_END && len < cap => {
                len = (len * 2).min(cap);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl Qcow2Image {
    /// Opens and validates a qcow2 image on `storage`, read-only.
    ///
    /// No backing or data file is opened here: an image that names one reads unallocated
    /// clusters as zeros until [`set_backing`](Qcow2Image::set_backing) attaches a device, and an
    /// image with an external data file refuses reads until
    /// [`set_data_file`](Qcow2Image::set_data_file) attaches its storage.
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// use qcow2kit::{BlockDevice, Error, Qcow2Image, Qcow2Options};
    /// use std::sync::Arc;
    ///
    /// let file = Arc::new(MemoryStorage::new());
    /// create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
    /// let img = Qcow2Image::open(file, &Qcow2Options::default())?;
    /// assert_eq!(img.size(), 1 << 20);
    /// assert!(matches!(img.write_at(&[1; 512], 0), Err(Error::ReadOnly)));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn open(storage: Arc<dyn Storage>, opts: &Qcow2Options) -> Result<Qcow2Image> {
        Self::open_as(storage, false, None, opts)
    }

    /// Opens and validates a qcow2 image on `storage` (which must be writable) for reading
    /// and writing; see [`open`](Qcow2Image::open) for backing and data files. A dirty image
    /// (lazy refcounts) is repaired here, as QEMU repairs it.
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// use qcow2kit::{BlockDevice, Qcow2Image, Qcow2Options};
    /// use std::sync::Arc;
    ///
    /// let file = Arc::new(MemoryStorage::new());
    /// create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
    /// let img = Qcow2Image::open_writable(file, &Qcow2Options::default())?;
    /// img.write_at(&[7; 4096], 65536)?;
    /// img.close()?;
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn open_writable(storage: Arc<dyn Storage>, opts: &Qcow2Options) -> Result<Qcow2Image> {
        Self::open_as(storage, true, None, opts)
    }

    /// Opens the internal snapshot `snapshot` of the qcow2 image on `storage` as a read-only
    /// device reading what the image held when the snapshot was taken; see
    /// [`open`](Qcow2Image::open) for backing and data files.
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// use qcow2kit::{BlockDevice, NewSnapshot, Qcow2Image, Qcow2Options, SnapshotRef};
    /// use std::sync::Arc;
    ///
    /// let file = Arc::new(MemoryStorage::new());
    /// let img = create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?;
    /// img.write_at(&[1; 512], 0)?;
    /// img.create_snapshot(&NewSnapshot::now("before"))?;
    /// img.write_at(&[2; 512], 0)?;
    /// img.close()?;
    /// let old = Qcow2Image::open_snapshot(file, &SnapshotRef::Name("before".into()), &Qcow2Options::default())?;
    /// let mut buf = [0; 512];
    /// old.read_at(&mut buf, 0)?;
    /// assert_eq!(buf, [1; 512]);
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn open_snapshot(
        storage: Arc<dyn Storage>,
        snapshot: &SnapshotRef,
        opts: &Qcow2Options,
    ) -> Result<Qcow2Image> {
        Self::open_as(storage, false, Some(snapshot), opts)
    }

    /// Opens for writing or not, the active image or `snapshot` (a read-only view).
    pub(crate) fn open_as(
        storage: Arc<dyn Storage>,
        writable: bool,
        snapshot: Option<&SnapshotRef>,
        opts: &Qcow2Options,
    ) -> Result<Qcow2Image> {
        let file_len = storage.len().map_err(io_err("reading image size"))?;

        // The header and its extensions live in cluster 0; read at most the largest cluster.
        let first_len = file_len.min(1 << MAX_CLUSTER_BITS) as usize;
        let first = storage
            .read_vec(0, first_len)
            .map_err(io_err("reading header"))?;
        let (mut header, extensions) = parse_first_cluster(&first)?;
        let cs = header.cluster_size();
        header.validate(file_len)?;
        let file_end = file_len.next_multiple_of(cs);

        let encryption = Encryption::open(
            storage.as_ref(),
            &header,
            &extensions,
            file_end,
            &opts.encryption,
        )?;

        let backing_name = if header.backing_file_offset != 0 && header.backing_file_size > 0 {
            let len = u64::from(header.backing_file_size);
            let end = header.backing_file_offset + len;
            if end > file_len {
                return Err(Corruption::Truncated {
                    what: "backing file name",
                    needed: end,
                    available: file_len,
                }
                .into());
            }
            let name = storage
                .read_vec(header.backing_file_offset, len as usize)
                .map_err(io_err("reading backing file name"))?;
            Some(name)
        } else {
            None
        };
        if header.has_data_file()
            && backing_name.is_some()
            && header.autoclear.contains(AutoclearFeatures::DATA_FILE_RAW)
        {
            return Err(Corruption::BadField {
                field: "autoclear_features",
                value: header.autoclear.bits(),
                rule: "a raw external data file cannot have a backing file",
            }
            .into());
        }

        let (snapshots, snapshot_table_len) = if header.nb_snapshots > 0 {
            read_snapshot_table(storage.as_ref(), &header, file_end)?
        } else {
            (Vec::new(), 0)
        };

        let bitmaps = match extensions.bitmaps {
            Some(b) if header.autoclear.contains(AutoclearFeatures::BITMAPS) => {
                check_table(
                    "bitmap directory",
                    b.directory_offset,
                    b.directory_size,
                    cs,
                    file_end,
                )?;
                let buf = storage
                    .read_vec(b.directory_offset, b.directory_size as usize)
                    .map_err(io_err("reading bitmap directory"))?;
                let bitmaps = parse_directory(&buf, b.nb_bitmaps)?;
                for bm in &bitmaps {
                    check_bitmap_constraints(bm, header.size, cs, file_end)?;
                }
                bitmaps
            }
            _ => Vec::<BitmapEntry>::new(),
        };

        let geo = Geometry::new(&header);
        let (l1, size, view) = match snapshot {
            None => {
                let l1 = read_table_words(
                    storage.as_ref(),
                    header.l1_table_offset,
                    header.l1_size as usize,
                )?;
                (l1, header.size, None)
            }
            Some(r) => {
                let i = r
                    .find(&snapshots)
                    .ok_or_else(|| Error::SnapshotNotFound(r.text().into()))?;
                let s = &snapshots[i];
                let l1_bytes = u64::from(s.l1_size) * 8;
                // QEMU (qcow2_snapshot_load_tmp → qcow2_validate_table): a snapshot's L1 is
                // limited to 32 MiB like the active one; checked here, when it is used.
                if l1_bytes > MAX_L1_BYTES {
                    return Err(Corruption::BadTable {
                        table: "snapshot L1 table",
                        offset: s.l1_table_offset,
                        size: l1_bytes,
                        rule: "larger than 32 MiB",
                    }
                    .into());
                }
                check_table(
                    "snapshot L1 table",
                    s.l1_table_offset,
                    l1_bytes,
                    cs,
                    file_end,
                )?;
                // As in QEMU (qcow2_snapshot_load_tmp), a snapshot is read at the image's
                // current virtual size: guest offsets past the snapshot's L1 table are
                // unallocated (backing data or zeros), whatever size the snapshot recorded.
                let l1 = read_table_words(storage.as_ref(), s.l1_table_offset, s.l1_size as usize)?;
                (l1, header.size, Some(i))
            }
        };

        let refs = if writable {
            let mut refs = prepare_writable(
                storage.as_ref(),
                &mut header,
                &extensions,
                &snapshots,
                &bitmaps,
                view.is_some(),
            )?;
            let tables = Tables {
                l1: &l1,
                snapshots: &snapshots,
                snapshot_table: (header.snapshots_offset, snapshot_table_len),
                bitmaps: &bitmaps,
                bitmap_directory: extensions
                    .bitmaps
                    .filter(|_| !bitmaps.is_empty())
                    .map(|b| (b.directory_offset, b.directory_size)),
                encryption_header: extensions.crypto.map(|c| (c.offset, c.length)),
            };
            fill_metadata_map(&mut refs.map, storage.as_ref(), &tables, cs, file_end)?;
            Some(refs)
        } else {
            None
        };
        let slices = (opts.l2_cache_bytes / geo.slice_bytes as usize).clamp(4, MAX_SLOTS);
        let shared = Arc::new(Shared::new(&l1, slices, geo.slice_bytes as usize / 8));
        let meta = Meta {
            l1: L1Table::new(shared.clone()),
            l1_dirty: Default::default(),
            l2: SliceCache::new(shared.clone(), slices),
            slice_buf: Vec::new(),
            refs,
            pending_free: Vec::new(),
            compressed_cursor: 0,
            file_end,
            file_len,
            header: header.clone(),
            broken: false,
            closed: false,
        };
        let image = Qcow2Image {
            storage,
            data_storage: None,
            header_area: std::sync::RwLock::new(HeaderArea {
                extensions,
                backing_name,
            }),
            view: view.map(|i| snapshots[i].clone()),
            snapshots: std::sync::RwLock::new(snapshots),
            bitmaps: std::sync::RwLock::new(bitmaps),
            bitmap_state: Default::default(),
            bitmap_ops: Default::default(),
            backing: None,
            geo,
            size: AtomicU64::new(size),
            file_len: AtomicU64::new(file_len),
            meta: Mutex::new(meta),
            shared,
            fast_hits: Default::default(),
            frees_applied: AtomicU64::new(0),
            writable,
            inflight: Mutex::new(Vec::new()),
            inflight_done: Condvar::new(),
            reporter: opts.on_corruption.clone(),
            corruption_signaled: Default::default(),
            encryption,
        };
        image.activate_bitmaps()?;
        Ok(image)
    }
}

/// The tables of an image that the metadata map records, as found at open.
pub(crate) struct Tables<'a> {
    pub(crate) l1: &'a [u64],
    pub(crate) snapshots: &'a [Snapshot],
    /// Snapshot table offset and bytes.
    pub(crate) snapshot_table: (u64, u64),
    pub(crate) bitmaps: &'a [BitmapEntry],
    /// Bitmap directory offset and bytes, when bitmaps are in use.
    pub(crate) bitmap_directory: Option<(u64, u64)>,
    /// Encryption header offset and bytes, for LUKS images.
    pub(crate) encryption_header: Option<(u64, u64)>,
}

/// Records in `map` (which holds the refcount structures and the active L1 table already) the
/// active L2 tables, the snapshot table, the snapshots' L1 tables and, within
/// [`INACTIVE_L1_READ_BUDGET`], their L2 tables, the bitmap directory and the bitmap tables.
///
/// Snapshot L1 tables are read as the union of their byte ranges, each byte once, so that many
/// snapshots sharing (or overlapping) tables cost what their distinct tables cost.
pub(crate) fn fill_metadata_map(
    map: &mut MetadataMap,
    storage: &dyn Storage,
    t: &Tables<'_>,
    cs: u64,
    file_end: u64,
) -> Result<()> {
    for e in t.l1 {
        map.add_active_l2(e & OFFSET_MASK);
    }
    map.set_snapshot_table(t.snapshot_table.0, t.snapshot_table.1);
    for s in t.snapshots {
        let bytes = u64::from(s.l1_size) * 8;
        if bytes <= MAX_L1_BYTES
            && check_table("snapshot L1 table", s.l1_table_offset, bytes, cs, file_end).is_ok()
        {
            map.add_inactive_l1(s.l1_table_offset, bytes);
        }
    }
    if map.inactive_l1().bytes() <= INACTIVE_L1_READ_BUDGET {
        let mut l2s = Vec::new();
        for (start, end) in map.inactive_l1().iter() {
            let words = read_table_words(storage, start, ((end - start) / 8) as usize)?;
            l2s.extend(
                words
                    .iter()
                    .map(|e| e & OFFSET_MASK)
                    .filter(|&o| o != 0 && o % cs == 0 && o < file_end),
            );
        }
        map.set_inactive_l2(l2s);
    }
    if let Some((offset, bytes)) = t.bitmap_directory {
        map.set_bitmap_directory(offset, bytes);
    }
    for b in t.bitmaps {
        map.add_bitmap_table(b.table_offset, u64::from(b.table_size) * 8);
    }
    if let Some((offset, bytes)) = t.encryption_header {
        map.set_encryption_header(offset, bytes);
    }
    Ok(())
}

/// QEMU's constraints on a bitmap directory entry (`check_constraints` in
/// `qcow2-bitmap.c`): granularity of 512 B to 2 GiB, a cluster-aligned table no larger than
/// 2^27 entries that covers the whole disk with at most 512 MiB of bitmap data, no unknown flag;
/// and, stricter than QEMU, a table that lies inside the file.
fn check_bitmap_constraints(b: &BitmapEntry, size: u64, cs: u64, file_end: u64) -> Result<()> {
    const KNOWN_FLAGS: u32 = 0b111;
    let table_bytes = u64::from(b.table_size) * 8;
    let phys_bytes = u64::from(b.table_size) * cs;
    let covered = if b.granularity_bits <= 31 {
        phys_bytes
            .checked_mul(8)
            .and_then(|bits| bits.checked_mul(1 << b.granularity_bits))
    } else {
        None
    };
    let ok = (9..=31).contains(&b.granularity_bits)
        && b.table_offset != 0
        && b.table_offset % cs == 0
        && b.table_size <= 0x800_0000
        && phys_bytes <= 0x2000_0000
        && covered.is_none_or(|c| c >= size)
        && b.flags & !KNOWN_FLAGS == 0
        && check_table("bitmap table", b.table_offset, table_bytes, cs, file_end).is_ok();
    if ok {
        Ok(())
    } else {
        Err(Corruption::Inconsistent(format!(
            "Bitmap '{}' doesn't satisfy the constraints",
            b.name
        ))
        .into())
    }
}

/// Checks that an image may be written and loads its refcounts. Unknown autoclear bits are
/// cleared on disk (they describe structures this writer would not keep consistent).
fn prepare_writable(
    storage: &dyn Storage,
    header: &mut Header,
    extensions: &Extensions,
    snapshots: &[Snapshot],
    bitmaps: &[BitmapEntry],
    snapshot_view: bool,
) -> Result<Refcounts> {
    if snapshot_view {
        return Err(Error::InvalidArgument(
            "a snapshot view cannot be opened writable".into(),
        ));
    }
    if header.incompatible.contains(IncompatibleFeatures::CORRUPT) {
        return Err(Corruption::MarkedCorrupt.into());
    }
    if header.autoclear.contains(AutoclearFeatures::DATA_FILE_RAW) && !header.has_data_file() {
        return Err(Corruption::Inconsistent("data-file-raw requires a data file".into()).into());
    }
    let unknown_autoclear = header.autoclear.bits() & !AutoclearFeatures::all().bits();
    if unknown_autoclear != 0 && header.version >= 3 {
        let keep = header.autoclear.bits() & AutoclearFeatures::all().bits();
        storage
            .write_at(&keep.to_be_bytes(), 88)
            .and_then(|()| storage.flush())
            .map_err(io_err("clearing unknown autoclear bits"))?;
        header.autoclear = AutoclearFeatures::from_bits_retain(keep);
    }
    if header.incompatible.contains(IncompatibleFeatures::DIRTY) {
        // Refcounts may be stale: recompute them from all metadata before any write.
        return rebuild_refcounts(storage, header, extensions, snapshots, bitmaps);
    }
    Refcounts::load(storage, header)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_ref_parse() {
        assert_eq!(
            SnapshotRef::parse("s1").expect("valid test input"),
            SnapshotRef::IdOrName("s1".into())
        );
        assert_eq!(
            SnapshotRef::parse("snapshot.name=x").expect("valid test input"),
            SnapshotRef::Name("x".into())
        );
        assert_eq!(
            SnapshotRef::parse("snapshot.id=3").expect("valid test input"),
            SnapshotRef::Id("3".into())
        );
        assert!(SnapshotRef::parse("snapshot.foo=3").is_err());
    }
}
