//! Opening images with their backing chains and data files, under a policy.
//!
//! The library's default policy ([`OpenOptions::default`]) opens no file an image names: an image
//! with a backing or data file is refused with [`Error::ExternalFileDenied`]. The CLI uses
//! [`OpenOptions::qemu_compatible`], which resolves names as qemu-img does: relative to the
//! directory of the image that names them, in the format the backing-format extension records
//! (probing only when it is absent), at most [`DEFAULT_MAX_DEPTH`] backing layers deep. A chain
//! that comes back to an image already in it (same device and inode) is an error, not a hang.
//!
//! Every file an open uses (the image, its data file, its backing files) is locked as QEMU locks
//! it ([`Locking`], [`crate::io::lock`]), so that a QEMU process and a qcow2kit one (or two opens
//! in one process) cannot write the same image at once: a conflict is [`Error::Locked`].
//!
//! ```
//! use qcow2kit::chain::{open, OpenOptions};
//! use qcow2kit::ops::create::{create_qcow2, CreateOptions};
//! use qcow2kit::{Error, Format};
//!
//! let dir = tempfile::tempdir()?;
//! let top = dir.path().join("top.qcow2");
//! let base = CreateOptions {
//!     size: Some(1 << 20),
//!     backing_file: Some("base.qcow2".into()),
//!     backing_format: Some("qcow2".into()),
//!     ..CreateOptions::default()
//! };
//! create_qcow2(&top, &base)?;
//! // The default policy refuses the file the image names; qemu_compatible() opens it (and
//! // fails here, since base.qcow2 does not exist).
//! assert!(matches!(open(&top, Format::Qcow2, &OpenOptions::default()), Err(Error::ExternalFileDenied { .. })));
//! assert!(open(&top, Format::Qcow2, &OpenOptions::qemu_compatible()).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::device::{BlockDevice, RawImage};
use crate::engine::{Qcow2Image, Qcow2Options, SnapshotRef};
use crate::error::{Error, Result};
use crate::format::probe::{detect, dmg_by_name, probe, Format, HEAD_BYTES, TAIL_BYTES};
use crate::io::lock::{LockRequest, Permissions};
use crate::io::{FileStorage, Storage, StorageExt};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// qemu-img's message for a writable open that asks to share everything.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 20), ..CreateOptions::default() })?;
/// use qcow2kit::chain::{open, Locking, OpenOptions, FORCE_SHARE_WRITABLE};
/// use qcow2kit::{Error, Format};
/// let opts = OpenOptions { writable: true, locking: Locking::ForceShare, ..OpenOptions::default() };
/// let r = open(&path, Format::Qcow2, &opts);
/// assert!(matches!(r, Err(Error::InvalidArgument(m)) if m == FORCE_SHARE_WRITABLE));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub const FORCE_SHARE_WRITABLE: &str = "force-share=on can only be used with read-only images";

/// Default limit on the number of backing layers under an image.
///
/// ```
/// use qcow2kit::chain::{BackingPolicy, OpenOptions, DEFAULT_MAX_DEPTH};
/// let o = OpenOptions::qemu_compatible();
/// assert_eq!(o.backing, BackingPolicy::Follow { max_depth: DEFAULT_MAX_DEPTH });
/// ```
pub const DEFAULT_MAX_DEPTH: usize = 16;

/// What to do with a backing file an image names.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 20), ..CreateOptions::default() })?;
/// use qcow2kit::chain::{open, BackingPolicy, OpenOptions};
/// use qcow2kit::Format;
/// // Read an overlay alone, its unallocated clusters as zeros, without opening its backing file.
/// let opts = OpenOptions { backing: BackingPolicy::Ignore, ..OpenOptions::default() };
/// let img = open(&path, Format::Qcow2, &opts)?;
/// assert_eq!(img.layers.len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingPolicy {
    /// Refuse images that name a backing file.
    Deny,
    /// Open no backing file: unallocated clusters read as zeros.
    Ignore,
    /// Open the chain, at most `max_depth` backing layers deep.
    Follow {
        /// Largest number of backing layers below the top image.
        max_depth: usize,
    },
}

/// How an open takes QEMU's image locks ([`crate::io::lock`]) on the files it uses.
///
/// The root of an open asks for reading (and writing when writable); each format then asks of
/// its files what QEMU's driver does: qcow2 refuses to share writes and resizes of its image
/// file with anyone, an external data file is not resized by others, a raw image passes the
/// root's sharing through, and backing files are only read.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 20), ..CreateOptions::default() })?;
/// use qcow2kit::chain::{open, Locking, OpenOptions};
/// use qcow2kit::{Error, Format};
/// let rw = OpenOptions { writable: true, ..OpenOptions::default() };
/// let writer = open(&path, Format::Qcow2, &rw)?;
/// // A second writer is refused, as QEMU refuses it ...
/// assert!(matches!(open(&path, Format::Qcow2, &rw), Err(Error::Locked { .. })));
/// // ... and so is a reader that does not share writes, unless it asks to (qemu-img -U).
/// let shared = OpenOptions { locking: Locking::ForceShare, ..OpenOptions::default() };
/// open(&path, Format::Qcow2, &shared)?;
/// # drop(writer);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// As qemu-img and qemu-io lock (the default): other opens may do whatever the formats
    /// allow (a raw image may be written by others while it is read).
    #[default]
    Qemu,
    /// As [`Locking::Qemu`], and no other open may write or resize any file of the image while
    /// it is open, raw ones included (qemu-img convert's source).
    Exclusive,
    /// Read-only, sharing everything: only the read lock is taken, so the open succeeds while
    /// another process writes the image (`-U`/`--force-share`; what is read may then be
    /// inconsistent). A writable open with it is refused.
    ForceShare,
    /// No locks at all, for callers that lock by themselves.
    Off,
}

/// What a file is to the image that uses it, for [`Locking::request`].
///
/// ```
/// use qcow2kit::chain::FileRole;
/// use qcow2kit::Format;
/// assert_eq!(FileRole::of(Format::Raw), FileRole::Raw);
/// assert_eq!(FileRole::of(Format::Qcow2), FileRole::Qcow2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRole {
    /// The file of a qcow2 image (top or backing layer).
    Qcow2,
    /// The file of a raw image (top or backing layer).
    Raw,
    /// The external data file of a qcow2 image.
    DataFile,
}

impl FileRole {
    /// The role of the file of an image in `format`.
    ///
    /// ```
    /// use qcow2kit::chain::FileRole;
    /// assert_eq!(FileRole::of(qcow2kit::Format::Raw), FileRole::Raw);
    /// ```
    pub fn of(format: Format) -> Self {
        match format {
            Format::Raw => FileRole::Raw,
            _ => FileRole::Qcow2,
        }
    }
}

impl Locking {
    /// The locks to take on one file in `role`, written or not; `None` for [`Locking::Off`].
    ///
    /// ```
    /// use qcow2kit::chain::{FileRole, Locking};
    /// assert!(Locking::Off.request(FileRole::Qcow2, true).is_none());
    /// assert!(Locking::Qemu.request(FileRole::Qcow2, true).is_some());
    /// ```
    pub fn request(self, role: FileRole, writable: bool) -> Option<LockRequest> {
        let read = Permissions::CONSISTENT_READ;
        let all = Permissions::all();
        let root_shares = match self {
            Locking::Off => return None,
            Locking::ForceShare => return Some(LockRequest::force_share()),
            Locking::Qemu => all,
            Locking::Exclusive => read | Permissions::WRITE_UNCHANGED,
        };
        let mut uses = read;
        if writable {
            uses |= Permissions::WRITE;
        }
        let (uses, shares) = match role {
            FileRole::Raw => (uses, root_shares),
            FileRole::Qcow2 => (
                uses | grows(writable),
                root_shares & (read | Permissions::WRITE_UNCHANGED),
            ),
            FileRole::DataFile => (uses | grows(writable), root_shares - Permissions::RESIZE),
        };
        Some(LockRequest { uses, shares })
    }
}

/// qcow2 grows its files as it writes.
fn grows(writable: bool) -> Permissions {
    if writable {
        Permissions::RESIZE
    } else {
        Permissions::empty()
    }
}

/// How to open an image and what it refers to.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 20), ..CreateOptions::default() })?;
/// use qcow2kit::chain::{open, OpenOptions};
/// use qcow2kit::Format;
/// // The defaults: read-only, no backing or data file opened, QEMU's locks.
/// let img = open(&path, Format::Qcow2, &OpenOptions::default())?;
/// assert!(!img.layers[0].writable);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open the top image for writing.
    pub writable: bool,
    /// Backing file policy.
    pub backing: BackingPolicy,
    /// Probe a backing file's format when the image does not record it (qemu-img does).
    pub probe_backing_format: bool,
    /// Allow opening an external data file named by a qcow2 image.
    pub allow_data_file: bool,
    /// Read this internal snapshot of the top image.
    pub snapshot: Option<SnapshotRef>,
    /// qcow2 tuning (L2 cache size) for every layer.
    pub qcow2: Qcow2Options,
    /// How the files are locked against other opens ([`Locking::Qemu`] by default, as QEMU).
    pub locking: Locking,
    /// Also open the backing layer this many layers down (1 = the immediate backing file) for
    /// writing: the base of a commit. `None` (the default) opens every backing file read-only.
    pub writable_layer: Option<usize>,
    /// The top image's external data file, instead of the one the image names (QEMU's
    /// `data-file` option): the caller's path, taken as it is (not against the image's
    /// directory) and allowed whatever [`OpenOptions::allow_data_file`] says. An image without
    /// an external data file refuses it with [`Error::InvalidArgument`], as QEMU does.
    pub data_file: Option<PathBuf>,
    /// The keys of encrypted backing files: entry `i` for the layer `i + 1` below the top
    /// (QEMU's `backing.encrypt.*`, `backing.backing.encrypt.*`, …). The top image's key is in
    /// [`Qcow2Options::encryption`]; it is never used for another layer.
    pub backing_encryption: Vec<crate::engine::EncryptionOptions>,
    /// A filter put between the top image and its files (its own file and its external data
    /// file): QEMU's filter drivers, such as [`crate::io::blkdebug`], under the format driver.
    pub interpose: Option<Interpose>,
}

/// A function given each file of the top image once it is open, with its role, that returns
/// the storage the image is to use instead (see [`OpenOptions::interpose`]).
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 20), ..CreateOptions::default() })?;
/// use qcow2kit::chain::{open, Interpose, OpenOptions};
/// use qcow2kit::Format;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use std::sync::Arc;
/// // Count the files the open hands to the filter (a VMM would wrap them in its own Storage).
/// let seen = Arc::new(AtomicUsize::new(0));
/// let counter = seen.clone();
/// let opts = OpenOptions {
///     interpose: Some(Interpose(Arc::new(move |_role, storage| {
///         counter.fetch_add(1, Ordering::SeqCst);
///         storage
///     }))),
///     ..OpenOptions::default()
/// };
/// open(&path, Format::Qcow2, &opts)?;
/// assert_eq!(seen.load(Ordering::SeqCst), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Interpose(pub Arc<InterposeFn>);

/// The function an [`Interpose`] holds.
///
/// ```
/// use qcow2kit::chain::{FileRole, InterposeFn};
/// use qcow2kit::io::Storage;
/// use std::sync::Arc;
/// let identity: Arc<InterposeFn> = Arc::new(|_role: FileRole, s: Arc<dyn Storage>| s);
/// # let _ = identity;
/// ```
pub type InterposeFn = dyn Fn(FileRole, Arc<dyn Storage>) -> Arc<dyn Storage> + Send + Sync;

impl std::fmt::Debug for Interpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Interpose(..)")
    }
}

impl Interpose {
    fn apply(
        filter: Option<&Interpose>,
        role: FileRole,
        storage: Arc<dyn Storage>,
    ) -> Arc<dyn Storage> {
        match filter {
            Some(f) => (f.0)(role, storage),
            None => storage,
        }
    }
}

impl Default for OpenOptions {
    /// The safe default for untrusted images: no backing file, no data file, read-only.
    fn default() -> Self {
        OpenOptions {
            writable: false,
            backing: BackingPolicy::Deny,
            probe_backing_format: false,
            allow_data_file: false,
            snapshot: None,
            qcow2: Qcow2Options::default(),
            locking: Locking::Qemu,
            writable_layer: None,
            data_file: None,
            backing_encryption: Vec::new(),
            interpose: None,
        }
    }
}

impl OpenOptions {
    /// What qemu-img does: follow backing chains (probing formats it does not know) and open
    /// data files.
    ///
    /// ```
    /// use qcow2kit::chain::{BackingPolicy, OpenOptions};
    /// let o = OpenOptions::qemu_compatible();
    /// assert!(matches!(o.backing, BackingPolicy::Follow { .. }) && o.allow_data_file);
    /// ```
    pub fn qemu_compatible() -> Self {
        OpenOptions {
            backing: BackingPolicy::Follow {
                max_depth: DEFAULT_MAX_DEPTH,
            },
            probe_backing_format: true,
            allow_data_file: true,
            ..OpenOptions::default()
        }
    }
}

/// An opened image: the device and, for qcow2, the concrete top image.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 20), ..CreateOptions::default() })?;
/// use qcow2kit::chain::{open, OpenOptions};
/// use qcow2kit::{BlockDevice, Format};
/// let img = open(&path, Format::Qcow2, &OpenOptions::default())?;
/// assert_eq!((img.format, img.device.size()), (Format::Qcow2, 1 << 20));
/// assert!(img.qcow2.is_some());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Opened {
    /// The image as a block device (with its chain attached).
    pub device: Arc<dyn BlockDevice>,
    /// The top image, when it is qcow2.
    pub qcow2: Option<Arc<Qcow2Image>>,
    /// The top image's format.
    pub format: Format,
    /// The path it was opened from.
    pub path: PathBuf,
    /// Every image of the chain, the top first (`layers[0]` is this image, `layers[1]` its
    /// backing file, …). Empty for images not opened through [`open`].
    pub layers: Vec<Layer>,
}

/// One image of an opened backing chain.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 20), ..CreateOptions::default() })?;
/// use qcow2kit::chain::{open, OpenOptions};
/// use qcow2kit::Format;
/// let img = open(&path, Format::Qcow2, &OpenOptions::default())?;
/// let top = &img.layers[0];
/// assert_eq!((top.format, top.path.as_path()), (Format::Qcow2, path.as_path()));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Layer {
    /// The image as a block device, with the rest of the chain below it attached.
    pub device: Arc<dyn BlockDevice>,
    /// The concrete image, when it is qcow2.
    pub qcow2: Option<Arc<Qcow2Image>>,
    /// Its format.
    pub format: Format,
    /// Its path (a backing file's name resolved against the directory of the image naming it).
    pub path: PathBuf,
    /// Whether it was opened for writing.
    pub writable: bool,
    /// Device and inode numbers of its file: identifies it however it is named.
    pub file_id: (u64, u64),
}

impl Opened {
    /// Closes the image: every layer is closed top first ([`BlockDevice::close`]: a layer
    /// opened for writing is flushed, and a qcow2 layer writes lazy refcounts back), the first
    /// error is returned, and the handles are dropped. The files' locks are released once no
    /// clone of the devices remains; a clone kept by the caller refuses every change with
    /// [`Error::Closed`]. Dropping an `Opened` closes it too, but without reporting errors.
    ///
    /// `close` takes the image by value, so it cannot be used afterwards:
    ///
    /// ```compile_fail
    /// # fn f(img: qcow2kit::Opened) -> qcow2kit::Result<()> {
    /// img.close()?;
    /// img.device.flush()?; // error[E0382]: borrow of moved value: `img`
    /// # Ok(()) }
    /// ```
    pub fn close(self) -> Result<()> {
        let mut first = None;
        let devices: Vec<&Arc<dyn BlockDevice>> = if self.layers.is_empty() {
            vec![&self.device]
        } else {
            self.layers.iter().map(|l| &l.device).collect()
        };
        for device in devices {
            if let Err(e) = device.close() {
                first.get_or_insert(e);
            }
        }
        drop(self);
        first.map_or(Ok(()), Err)
    }

    /// The depth in [`Opened::layers`] of the file at `path` (compared by device and inode, so
    /// any name of it matches), or `None` when it is not in the chain.
    ///
    /// ```
    /// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
    /// # let dir = tempfile::tempdir()?;
    /// # let path = dir.path().join("disk.qcow2");
    /// # create_qcow2(&path, &CreateOptions { size: Some(1 << 20), ..CreateOptions::default() })?;
    /// use qcow2kit::chain::{open, OpenOptions};
    /// use qcow2kit::Format;
    /// let img = open(&path, Format::Qcow2, &OpenOptions::default())?;
    /// assert_eq!(img.depth_of(&path)?, Some(0));
    /// assert_eq!(img.depth_of(&dir.path().join("elsewhere"))?, None);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn depth_of(&self, path: &Path) -> Result<Option<usize>> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            // A file that does not exist is in no chain.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(open_error(path, e)),
        };
        let id = (meta.dev(), meta.ino());
        Ok(self.layers.iter().position(|l| l.file_id == id))
    }
}

/// Opens `path` as `format` with `opts`.
///
/// A file another open uses in a way this one may not share (or that refuses to share what this
/// one does) is refused with [`Error::Locked`]; [`Locking::ForceShare`] with `writable` is
/// refused with [`Error::InvalidArgument`].
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 20), ..CreateOptions::default() })?;
/// use qcow2kit::chain::{open, OpenOptions};
/// use qcow2kit::{BlockDevice, Format};
/// let img = open(&path, Format::Qcow2, &OpenOptions::qemu_compatible())?;
/// let mut buf = [1u8; 512];
/// img.device.read_at(&mut buf, 0)?;
/// assert_eq!(buf, [0u8; 512]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn open(path: &Path, format: Format, opts: &OpenOptions) -> Result<Opened> {
    if opts.writable && opts.locking == Locking::ForceShare {
        return Err(Error::InvalidArgument(FORCE_SHARE_WRITABLE.into()));
    }
    let mut seen = Vec::new();
    open_layer(path, format, opts, 0, &mut seen, true)
}

/// Detects the format of the file at `path` as a qemu-style probe would (see
/// [`crate::format::probe::probe`]): raw when no image signature is found, qcow2 or raw are
/// returned, any other format qemu can name (bochs, cloop, DMG — by a `koly` trailer or, as qemu
/// does, a `.dmg` name — parallels, qcow, qed, vdi, vhdx, vmdk, vpc, luks) is named and refused
/// as unsupported, never read as raw, and a polyglot (signatures of several formats) is refused
/// rather than guessed at.
///
/// ```
/// # use qcow2kit::ops::create::{create_qcow2, CreateOptions};
/// # let dir = tempfile::tempdir()?;
/// # let path = dir.path().join("disk.qcow2");
/// # create_qcow2(&path, &CreateOptions { size: Some(1 << 20), ..CreateOptions::default() })?;
/// use qcow2kit::chain::probe_file;
/// use qcow2kit::Format;
/// assert_eq!(probe_file(&path)?, Format::Qcow2);
/// std::fs::write(dir.path().join("blank"), [0u8; 4096])?;
/// assert_eq!(probe_file(&dir.path().join("blank"))?, Format::Raw);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn probe_file(path: &Path) -> Result<Format> {
    // Probing takes no lock (neither does QEMU's): the open that follows does.
    let s: Arc<dyn Storage> = match crate::nbd::open_uri(path, false)? {
        Some((s, _)) => s,
        None => Arc::new(open_storage(path, false, None, 0)?),
    };
    let len = s.len().map_err(|e| Error::io("probing format", e))?;
    let head = s
        .read_vec(0, len.min(HEAD_BYTES) as usize)
        .map_err(|e| Error::io("probing format", e))?;
    let tail = match len.checked_sub(TAIL_BYTES) {
        Some(at) => Some(
            s.read_vec(at, TAIL_BYTES as usize)
                .map_err(|e| Error::io("probing format", e))?,
        ),
        None => None,
    };
    let mut detected = detect(&head, tail.as_deref());
    if dmg_by_name(path.as_os_str().as_bytes()) && !detected.contains(&Format::Dmg) {
        detected.push(Format::Dmg);
    }
    match probe(&detected) {
        Some(Format::Raw) => Ok(Format::Raw),
        Some(Format::Qcow2) => Ok(Format::Qcow2),
        Some(f) => Err(Error::Unsupported(format!(
            "image format '{f}' (probed); only qcow2 and raw images can be opened"
        ))),
        None => Err(Error::Unsupported(format!(
            "'{}' carries the signatures of several formats ({}); name its format explicitly",
            path.display(),
            detected
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn open_error(path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("opening '{}'", path.display()), e)
}

/// Opens a file an image (or the caller) names, refusing anything but a regular file or a
/// block device *before* opening it: opening a FIFO blocks until a writer appears, so a hostile
/// backing or data file name must not reach `open(2)` (QEMU's `file` driver likewise requires a
/// regular file; block devices go through `host_device`). The file is locked with `lock`; a
/// conflict is [`Error::Locked`] for a file `backing_depth` layers below the opened image.
pub(crate) fn open_storage(
    path: &Path,
    writable: bool,
    lock: Option<LockRequest>,
    backing_depth: usize,
) -> Result<FileStorage> {
    let meta = std::fs::metadata(path).map_err(|e| open_error(path, e))?;
    let ft = meta.file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(Error::Unsupported(format!(
            "'{}' is not a regular file or block device",
            path.display()
        )));
    }
    FileStorage::open_with(path, writable, lock).map_err(|e| {
        match Error::storage(format!("opening '{}'", path.display()), e) {
            Error::Locked { source, .. } => Error::Locked {
                backing_depth,
                source,
            },
            other => other,
        }
    })
}

/// Resolves a name stored in an image relative to the directory of the image's path.
///
/// ```
/// use qcow2kit::chain::resolve_relative;
/// use std::path::Path;
/// let p = resolve_relative(Path::new("/images/top.qcow2"), b"base.qcow2")?;
/// assert_eq!(p, Path::new("/images/base.qcow2"));
/// assert_eq!(resolve_relative(Path::new("/images/top.qcow2"), b"/abs.raw")?, Path::new("/abs.raw"));
/// # Ok::<(), qcow2kit::Error>(())
/// ```
pub fn resolve_relative(image_path: &Path, name: &[u8]) -> Result<PathBuf> {
    if name.is_empty() {
        return Err(Error::InvalidArgument("empty file name".into()));
    }
    // qemu treats "proto:..." (a colon before any slash) as a protocol, not a file.
    if let Some(colon) = name.iter().position(|&b| b == b':') {
        if !name[..colon].contains(&b'/') {
            return Err(Error::Unsupported(format!(
                "file name '{}' uses a protocol or json: syntax",
                String::from_utf8_lossy(name)
            )));
        }
    }
    let p = Path::new(OsStr::from_bytes(name));
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(match image_path.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    })
}

fn open_layer(
    path: &Path,
    format: Format,
    opts: &OpenOptions,
    depth: usize,
    seen: &mut Vec<(u64, u64)>,
    top: bool,
) -> Result<Opened> {
    format.ensure_openable()?;
    let writable = if top {
        opts.writable
    } else {
        opts.writable_layer == Some(depth)
    };
    let (storage, id): (Arc<dyn Storage>, _) = match crate::nbd::open_uri(path, writable)? {
        Some(nbd) => nbd,
        None => {
            let lock = opts.locking.request(FileRole::of(format), writable);
            let storage = open_storage(path, writable, lock, depth)?;
            let meta = storage.file().metadata().map_err(|e| open_error(path, e))?;
            (Arc::new(storage), (meta.dev(), meta.ino()))
        }
    };
    if seen.contains(&id) {
        return Err(Error::BackingLoop(path.to_path_buf()));
    }
    seen.push(id);
    let interpose = if top { opts.interpose.as_ref() } else { None };
    let storage = Interpose::apply(interpose, FileRole::of(format), storage);

    match format {
        Format::Raw => {
            if top && opts.snapshot.is_some() {
                return Err(Error::InvalidArgument(
                    "raw images have no snapshots".into(),
                ));
            }
            let dev: Arc<dyn BlockDevice> = Arc::new(RawImage::open(storage, writable)?);
            Ok(Opened {
                device: dev.clone(),
                qcow2: None,
                format,
                path: path.to_path_buf(),
                layers: vec![Layer {
                    device: dev,
                    qcow2: None,
                    format,
                    path: path.to_path_buf(),
                    writable,
                    file_id: id,
                }],
            })
        }
        _ => {
            let mut q_opts = opts.qcow2.clone();
            let snapshot = if top { opts.snapshot.as_ref() } else { None };
            if !top {
                q_opts.encryption = depth
                    .checked_sub(1)
                    .and_then(|i| opts.backing_encryption.get(i))
                    .cloned()
                    .unwrap_or_default();
            }
            let mut img = Qcow2Image::open_as(storage, writable, snapshot, &q_opts)?;

            let data_file = if top { opts.data_file.as_deref() } else { None };
            if img.has_data_file() {
                let dpath = match data_file {
                    Some(p) => p.to_path_buf(),
                    None => {
                        let name = img.data_file_name().ok_or_else(|| {
                            Error::InvalidArgument("'data-file' is required for this image".into())
                        })?;
                        if !opts.allow_data_file {
                            return Err(Error::ExternalFileDenied {
                                kind: "data",
                                name: String::from_utf8_lossy(&name).into_owned(),
                            });
                        }
                        resolve_relative(path, &name)?
                    }
                };
                let lock = opts.locking.request(FileRole::DataFile, writable);
                let ds = open_storage(&dpath, writable, lock, depth)?;
                img.set_data_file(Interpose::apply(
                    interpose,
                    FileRole::DataFile,
                    Arc::new(ds),
                ));
            } else if let Some(p) = data_file {
                // QEMU opens the file before it finds that the image has no use for it.
                open_storage(p, false, None, depth)?;
                return Err(Error::InvalidArgument(
                    "'data-file' can only be set for images with an external data file".into(),
                ));
            }

            let mut below = Vec::new();
            if let Some(name) = img.backing_file_name() {
                let shown = || String::from_utf8_lossy(&name).into_owned();
                match opts.backing {
                    BackingPolicy::Deny => {
                        return Err(Error::ExternalFileDenied {
                            kind: "backing",
                            name: shown(),
                        })
                    }
                    BackingPolicy::Ignore => {}
                    BackingPolicy::Follow { max_depth } => {
                        if depth >= max_depth {
                            return Err(Error::BackingTooDeep(max_depth));
                        }
                        let bpath = resolve_relative(path, &name)?;
                        let bformat = match img.backing_format() {
                            Some(f) => Format::openable(&f)?,
                            None if opts.probe_backing_format => probe_file(&bpath)?,
                            None => {
                                return Err(Error::Unsupported(format!(
                                    "backing file '{}' has no recorded format and probing is off",
                                    shown()
                                )))
                            }
                        };
                        let b = open_layer(&bpath, bformat, opts, depth + 1, seen, false).map_err(
                            |e| match e {
                                // Already named for their layer, or about the chain as a whole.
                                Error::Locked { .. }
                                | Error::Backing(_)
                                | Error::BackingLoop(_)
                                | Error::BackingTooDeep(_) => e,
                                other => Error::Backing(Box::new(other)),
                            },
                        )?;
                        img.set_backing(Some(b.device));
                        below = b.layers;
                    }
                }
            }
            let img = Arc::new(img);
            let mut layers = vec![Layer {
                device: img.clone(),
                qcow2: Some(img.clone()),
                format,
                path: path.to_path_buf(),
                writable,
                file_id: id,
            }];
            layers.append(&mut below);
            Ok(Opened {
                device: img.clone(),
                qcow2: Some(img),
                format,
                path: path.to_path_buf(),
                layers,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_resolve_against_the_image_directory() {
        let p =
            resolve_relative(Path::new("/a/b/top.qcow2"), b"base.qcow2").expect("valid test input");
        assert_eq!(p, PathBuf::from("/a/b/base.qcow2"));
        let p = resolve_relative(Path::new("top.qcow2"), b"base.qcow2").expect("valid test input");
        assert_eq!(p, PathBuf::from("base.qcow2"));
        let p =
            resolve_relative(Path::new("/a/top.qcow2"), b"/abs/base").expect("valid test input");
        assert_eq!(p, PathBuf::from("/abs/base"));
        assert!(resolve_relative(Path::new("/a/t"), b"nbd:localhost:10809").is_err());
        assert!(resolve_relative(Path::new("/a/t"), b"dir/with:colon").is_ok());
    }
}
