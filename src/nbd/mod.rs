//! NBD (Network Block Device): a server that exports any [`BlockDevice`]
//! and a client [`Storage`] that opens an image behind any NBD server.
//!
//! The server speaks the fixed newstyle handshake (`NBD_OPT_GO`, `INFO`, `LIST`, `EXPORT_NAME`,
//! `STRUCTURED_REPLY`, `SET_META_CONTEXT`, `LIST_META_CONTEXT`, `ABORT`) and the commands
//! `READ`, `WRITE` (with `FUA`), `FLUSH`, `TRIM`, `WRITE_ZEROES` (with `NO_HOLE`, `FAST_ZERO`),
//! `CACHE`, `BLOCK_STATUS` (`base:allocation`, `qemu:allocation-depth`,
//! `qemu:dirty-bitmap:NAME`) and `DISC`. It runs a
//! thread per connection plus a few workers per connection, so several requests are in flight
//! and replies may come out of order; the bytes held for requests in flight are capped per
//! connection. No TLS: listen on loopback or a Unix socket.
//!
//! ```no_run
//! use qcow2kit::nbd::{Export, Listener, Server};
//! use qcow2kit::chain::{open, OpenOptions};
//! use qcow2kit::Format;
//! use std::sync::Arc;
//!
//! let img = open("disk.qcow2".as_ref(), Format::Qcow2, &OpenOptions::default())?;
//! let export = Export::new("disk", img.device.clone(), true);
//! let server = Server::new(vec![Arc::new(export)], Listener::bind_unix("/tmp/nbd.sock".as_ref())?);
//! server.run()?; // serves one client, then flushes and returns (as qemu-nbd without -t)
//! # Ok::<(), qcow2kit::Error>(())
//! ```

mod client;
mod client_conn;
mod client_reply;
mod handshake;
pub(crate) mod proto;
mod server;
mod stream;
mod transmit;
mod uri;

pub use client::NbdStorage;
pub use server::{Listener, Server, ShutdownHandle, DEFAULT_HANDSHAKE_LIMIT};
pub use stream::Stream;
pub use transmit::serve_connection;
pub use uri::{NbdAddress, DEFAULT_PORT};

use crate::engine::DirtyBitmap;
use crate::error::{Error, Result};
use crate::io::Storage;
use crate::{BlockDevice, Qcow2Image};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

/// Device and inode numbers, or for an NBD export a stand-in that identifies it.
pub type FileId = (u64, u64);

/// The context of an [`Error::Io`] from [`open_uri`]: its source is the whole reason, in qemu's
/// words (`Failed to connect to '…': …`, `Requested export not available`, …).
pub const OPEN_CONTEXT: &str = "connecting to an NBD server";

/// The storage of the NBD export `path` names when it is an NBD URI (`nbd://HOST[:PORT]/NAME`,
/// `nbd+unix:///NAME?socket=PATH`), with an identity for backing-loop detection (device
/// `u64::MAX`, a hash of the URI); `None` for any other name. Locking is the server's business.
pub fn open_uri(path: &Path, writable: bool) -> Result<Option<(Arc<dyn Storage>, FileId)>> {
    use std::hash::{Hash, Hasher};
    let bytes = path.as_os_str().as_bytes();
    if !NbdAddress::is_uri(bytes) {
        return Ok(None);
    }
    let uri = String::from_utf8_lossy(bytes);
    let s = NbdStorage::connect(&uri, writable).map_err(|e| Error::io(OPEN_CONTEXT, e))?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    uri.hash(&mut h);
    Ok(Some((Arc::new(s), (u64::MAX, h.finish()))))
}

/// One export a server offers: a device under a name.
pub struct Export {
    /// The name clients ask for (`""` is qemu-nbd's default).
    pub name: String,
    /// A description shown to clients that ask (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST`).
    pub description: String,
    /// The device served.
    pub device: Arc<dyn BlockDevice>,
    /// Refuse every write, zero write and trim with `EPERM` (and advertise `NBD_FLAG_READ_ONLY`).
    pub read_only: bool,
    /// Whether `NBD_CMD_TRIM` reaches the device (qemu-nbd's `--discard=unmap`); otherwise trims
    /// succeed without effect, as qemu-nbd's default `--discard=ignore`.
    pub discard: bool,
    /// Offer the `qemu:allocation-depth` meta context (qemu-nbd's `-A`).
    pub allocation_depth: bool,
    /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` meta contexts (qemu-nbd's `-B`).
    pub bitmaps: Vec<ExportBitmap>,
}

/// The current bits of a dirty bitmap, asked for at each `NBD_CMD_BLOCK_STATUS`.
pub type BitmapSource = dyn Fn() -> Result<DirtyBitmap> + Send + Sync;

/// A dirty bitmap an export offers: its name and where its current bits come from (for a
/// writable export whose bitmap tracks writes, the bits as they are now).
pub struct ExportBitmap {
    /// The bitmap's name, as in `qemu:dirty-bitmap:NAME`.
    pub name: String,
    /// Returns the bitmap's bits; a bitmap covering less than the export reads clean past its end.
    pub source: Arc<BitmapSource>,
}

impl ExportBitmap {
    /// The persistent bitmap `name` of `image`, read afresh at each request.
    pub fn of_image(image: Arc<Qcow2Image>, name: &str) -> Self {
        let owned = name.to_string();
        ExportBitmap {
            name: name.to_string(),
            source: Arc::new(move || image.bitmap(&owned)),
        }
    }
}

impl Export {
    /// An export of `device` named `name`, without trims reaching the device and without the
    /// allocation-depth context.
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>, read_only: bool) -> Self {
        Export {
            name: name.into(),
            description: String::new(),
            device,
            read_only,
            discard: false,
            allocation_depth: false,
            bitmaps: Vec::new(),
        }
    }

    /// The transmission flags advertised for this export. Flushes are device-wide, so
    /// `NBD_FLAG_CAN_MULTI_CONN` holds for every export (all connections share the one device).
    pub fn transmission_flags(&self) -> u16 {
        use proto::tflag::*;
        let mut f = HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_DF | CAN_MULTI_CONN | SEND_CACHE;
        if self.read_only {
            f |= READ_ONLY;
        } else {
            f |= SEND_TRIM | SEND_WRITE_ZEROES | SEND_FAST_ZERO;
        }
        f
    }
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.device.size())
            .field("read_only", &self.read_only)
            .field("discard", &self.discard)
            .field("allocation_depth", &self.allocation_depth)
            .field(
                "bitmaps",
                &self.bitmaps.iter().map(|b| &b.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}
