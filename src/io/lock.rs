//! QEMU's image locking protocol (`block/file-posix.c`), so that QEMU and qcow2kit processes
//! exclude each other from the images they use.
//!
//! An open that uses an image takes Linux open-file-description (OFD) byte-range locks on it,
//! all of them *shared* (read) locks on single bytes:
//! - byte `100 + bit` for each [`Permissions`] bit the open uses, and
//! - byte `200 + bit` for each bit it does **not** share with other users.
//!
//! Before an open goes ahead it tests, with `F_OFD_GETLK` for an exclusive lock, whether some
//! other open file description holds byte `200 + bit` for a permission it uses (someone refuses
//! to share it) or byte `100 + bit` for a permission it does not share (someone uses it). Either
//! refuses the open with QEMU's message. As in QEMU the locks are taken first and tested second,
//! so two opens racing each other both see the other and fail rather than both succeed.
//!
//! OFD locks belong to the open file description: they conflict between two opens of the same
//! file in one process as between processes, and they are released when the last descriptor of
//! the description closes (for [`FileStorage`](super::FileStorage), when it is dropped). A
//! descriptor inherited through `fork` shares the description and so its locks; qcow2kit's
//! descriptors are close-on-exec.

use crate::error::strerror;
use nix::fcntl::{fcntl, FcntlArg};
use nix::libc;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

bitflags::bitflags! {
    /// What an open does with an image, in QEMU's bit order (`BLK_PERM_*` in
    /// `include/block/block-common.h`); each bit has its lock bytes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Permissions: u8 {
        /// Reading data that no one else changes under the reader ("consistent read").
        const CONSISTENT_READ = 1 << 0;
        /// Writing ("write").
        const WRITE = 1 << 1;
        /// Writing data that leaves the guest-visible content unchanged ("write unchanged").
        const WRITE_UNCHANGED = 1 << 2;
        /// Changing the length ("resize").
        const RESIZE = 1 << 3;
    }
}

impl Permissions {
    /// The name QEMU gives a single permission bit in its messages.
    pub fn qemu_name(self) -> &'static str {
        match self {
            Permissions::CONSISTENT_READ => "consistent read",
            Permissions::WRITE => "write",
            Permissions::WRITE_UNCHANGED => "write unchanged",
            Permissions::RESIZE => "resize",
            _ => "unknown",
        }
    }
}

/// The first lock byte of the permissions an open uses.
const PERM_BASE: u64 = 100;
/// The first lock byte of the permissions an open does not share.
const SHARED_BASE: u64 = 200;

/// The permissions one open of a file uses and those it lets other opens use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockRequest {
    /// What this open does with the file.
    pub uses: Permissions,
    /// What other opens of the file may do meanwhile.
    pub shares: Permissions,
}

impl LockRequest {
    /// What QEMU's qcow2 driver asks of its image file: reading (and, writable, writing and
    /// resizing), sharing only reads and unchanged writes. This is the default of
    /// [`FileStorage::open`](super::FileStorage::open).
    pub fn image(writable: bool) -> Self {
        let mut uses = Permissions::CONSISTENT_READ;
        if writable {
            uses |= Permissions::WRITE | Permissions::RESIZE;
        }
        LockRequest {
            uses,
            shares: Permissions::CONSISTENT_READ | Permissions::WRITE_UNCHANGED,
        }
    }

    /// What qemu-img create asks of the file it creates: writing and resizing, refusing
    /// other resizers.
    pub fn create() -> Self {
        LockRequest {
            uses: Permissions::WRITE | Permissions::RESIZE,
            shares: Permissions::all() - Permissions::RESIZE,
        }
    }

    /// Reading while sharing everything (`-U`/`--force-share`).
    pub fn force_share() -> Self {
        LockRequest {
            uses: Permissions::CONSISTENT_READ,
            shares: Permissions::all(),
        }
    }
}

/// What could not be locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockTarget {
    /// Taking the shared lock on this byte failed.
    Byte(u64),
    /// Another open holds a lock that conflicts with `permission`: it refuses to share a
    /// permission this open uses (`shared: false`), or uses a permission this open does not
    /// share (`shared: true`).
    Permission {
        /// The single permission bit in conflict.
        permission: Permissions,
        /// Whether the conflict is over sharing it.
        shared: bool,
    },
}

/// A lock that could not be taken, shown as QEMU shows it.
#[derive(Debug)]
pub struct LockError {
    /// The file.
    pub path: PathBuf,
    /// What could not be locked.
    pub target: LockTarget,
    /// The operating system's error; `None` when another open holds a conflicting lock.
    /// QEMU adds the line asking whether another process uses the image only to permission
    /// conflicts, not to a byte that could not be locked.
    pub os_error: Option<io::Error>,
}

impl fmt::Display for LockError {
    /// QEMU's message: `Failed to get "write" lock` (or `shared "write"`, or `Failed to lock
    /// byte N`), the OS error if there is one, and for conflicts the line `Is another process
    /// using the image [PATH]?`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.target {
            LockTarget::Byte(b) => write!(f, "Failed to lock byte {b}")?,
            LockTarget::Permission { permission, shared } => write!(
                f,
                "Failed to get {}\"{}\" lock",
                if shared { "shared " } else { "" },
                permission.qemu_name()
            )?,
        }
        if let Some(e) = &self.os_error {
            write!(f, ": {}", strerror(e))?;
        }
        if let LockTarget::Permission { .. } = self.target {
            write!(
                f,
                "\nIs another process using the image [{}]?",
                self.path.display()
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for LockError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.os_error
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<LockError> for io::Error {
    fn from(e: LockError) -> Self {
        let kind = match &e.os_error {
            Some(os) => os.kind(),
            None => io::ErrorKind::WouldBlock,
        };
        io::Error::new(kind, e)
    }
}

/// The [`LockError`] inside an I/O error from [`FileStorage`](super::FileStorage), if it is
/// one.
pub fn lock_error(e: &io::Error) -> Option<&LockError> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<LockError>())
}

/// Every permission bit, lowest first.
fn bits() -> impl Iterator<Item = (u64, Permissions)> {
    Permissions::all()
        .iter()
        .map(|p| (u64::from(p.bits().trailing_zeros()), p))
}

fn flock(kind: libc::c_int, byte: u64) -> libc::flock {
    libc::flock {
        // The lock types and SEEK_SET are small constants; the bytes are below 300.
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte as libc::off_t,
        l_len: 1,
        l_pid: 0,
    }
}

/// Takes a shared lock on one byte (never waiting).
fn lock_byte(file: &File, byte: u64) -> io::Result<()> {
    let fl = flock(libc::F_RDLCK, byte);
    fcntl(file, FcntlArg::F_OFD_SETLK(&fl))?;
    Ok(())
}

/// Whether another open file description holds a lock on `byte` (one that would keep this one
/// from locking it exclusively).
fn byte_held_elsewhere(file: &File, byte: u64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK, byte);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

/// Takes the locks of `request` on `file` (opened from `path`) and checks that no other open
/// holds a conflicting one; the locks then last as long as the file's open file description.
///
/// On a conflict the locks already taken stay until `file` is closed: callers drop the file on
/// error, as [`FileStorage`](super::FileStorage) does.
pub fn acquire(file: &File, path: &Path, request: LockRequest) -> Result<(), LockError> {
    let error = |target, os_error| LockError {
        path: path.to_path_buf(),
        target,
        os_error,
    };
    // An error that only says the byte is locked elsewhere is a conflict (QEMU elides it).
    let os = |e: io::Error| {
        let busy = matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES));
        (!busy).then_some(e)
    };
    let unshared = Permissions::all() - request.shares;
    for (base, wanted) in [(PERM_BASE, request.uses), (SHARED_BASE, unshared)] {
        for (bit, p) in bits() {
            if wanted.contains(p) {
                let byte = base + bit;
                lock_byte(file, byte).map_err(|e| error(LockTarget::Byte(byte), os(e)))?;
            }
        }
    }
    // The same order as QEMU, so that the first conflict reported is the one qemu-img reports.
    let checks = [
        (SHARED_BASE, request.uses, false),
        (PERM_BASE, unshared, true),
    ];
    for (base, wanted, shared) in checks {
        for (bit, permission) in bits() {
            if !wanted.contains(permission) {
                continue;
            }
            let target = LockTarget::Permission { permission, shared };
            match byte_held_elsewhere(file, base + bit) {
                Ok(false) => {}
                Ok(true) => return Err(error(target, None)),
                Err(e) => return Err(error(target, os(e))),
            }
        }
    }
    Ok(())
}

/// Drops every lock byte of the protocol held through `file`'s open file description.
///
/// Closing the last descriptor does that too, but a process that spawns a child in another
/// thread shares the description with the child until it calls `exec`: releasing the locks
/// explicitly keeps a closed image from looking busy meanwhile.
pub fn release(file: &File) -> io::Result<()> {
    let fl = libc::flock {
        l_len: (2 * SHARED_BASE - PERM_BASE) as libc::off_t,
        ..flock(libc::F_UNLCK, PERM_BASE)
    };
    fcntl(file, FcntlArg::F_OFD_SETLK(&fl))?;
    Ok(())
}

/// Takes the [`LockError`] out of an I/O error from [`FileStorage`](super::FileStorage); any
/// other error comes back unchanged.
pub(crate) fn into_lock_error(e: io::Error) -> Result<LockError, io::Error> {
    if lock_error(&e).is_none() {
        return Err(e);
    }
    let kind = e.kind();
    match e.into_inner() {
        Some(inner) => inner
            .downcast::<LockError>()
            .map(|b| *b)
            .map_err(|inner| io::Error::new(kind, inner)),
        None => Err(io::Error::from(kind)),
    }
}
