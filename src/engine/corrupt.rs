//! Corruption found while an image is in use (QEMU's `qcow2_signal_corruption`).
//!
//! A *fatal* event — a write that would land on metadata, an entry that points into metadata
//! or is misaligned, a misaligned refcount block — refuses the request, sets the corrupt bit
//! (incompatible bit 1) with one header write and a flush, and makes the open image refuse every
//! later write; writable opens are refused until `check -r` clears the bit. A *non-fatal* event
//! (a cluster that cannot be freed and is leaked instead) is only reported. On an image opened
//! read-only every event is non-fatal: nothing is written.
//!
//! As in QEMU, only the first event is reported, except that a fatal event is still reported
//! (and acted on) after non-fatal ones.

use super::meta::Meta;
use super::Qcow2Image;
use crate::error::{Corruption, Error, Result};
use crate::format::entry::OFFSET_MASK;
use crate::format::features::IncompatibleFeatures;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A corruption found while the image was in use.
///
/// ```
/// use qcow2kit::engine::{CorruptionEvent, CorruptionReporter};
/// use qcow2kit::io::MemoryStorage;
/// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// use qcow2kit::{BlockDevice, Qcow2Image, Qcow2Options};
/// use std::sync::{Arc, Mutex};
///
/// let file = Arc::new(MemoryStorage::new());
/// create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
/// // Damage: the header's cluster counted free, so the allocator could hand it to guest data.
/// let mut bytes = file.to_bytes();
/// bytes[2 * 65536..2 * 65536 + 2].copy_from_slice(&[0, 0]);
/// let seen: Arc<Mutex<Vec<CorruptionEvent>>> = Arc::default();
/// let log = seen.clone();
/// let opts = Qcow2Options {
///     on_corruption: Some(CorruptionReporter::new(move |e| log.lock().unwrap().push(e.clone()))),
///     ..Qcow2Options::default()
/// };
/// let img = Qcow2Image::open_writable(Arc::new(MemoryStorage::from_bytes(bytes)), &opts)?;
/// assert!(img.write_at(&[1; 512], 0).is_err()); // refused, never written over the header
/// let events = seen.lock().unwrap();
/// assert!(events[0].fatal);
/// # Ok::<(), qcow2kit::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CorruptionEvent {
    /// What was found, in QEMU's words where QEMU has them (e.g. "Preventing invalid write on
    /// metadata (overlaps with qcow2_header)").
    pub message: String,
    /// Whether the image was marked corrupt (and the request refused).
    pub fatal: bool,
}

impl CorruptionEvent {
    /// The line QEMU prints for the event, e.g. `qcow2: Marking image as corrupt: …; further
    /// corruption events will be suppressed`.
    ///
    /// ```
    /// use qcow2kit::engine::{CorruptionEvent, CorruptionReporter};
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// use qcow2kit::{BlockDevice, Qcow2Image, Qcow2Options};
    /// use std::sync::{Arc, Mutex};
    ///
    /// let file = Arc::new(MemoryStorage::new());
    /// create_qcow2_on(file.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
    /// // Damage: the header's cluster counted free, so the allocator could hand it to guest data.
    /// let mut bytes = file.to_bytes();
    /// bytes[2 * 65536..2 * 65536 + 2].copy_from_slice(&[0, 0]);
    /// let seen: Arc<Mutex<Vec<CorruptionEvent>>> = Arc::default();
    /// let log = seen.clone();
    /// let opts = Qcow2Options {
    ///     on_corruption: Some(CorruptionReporter::new(move |e| log.lock().unwrap().push(e.clone()))),
    ///     ..Qcow2Options::default()
    /// };
    /// let img = Qcow2Image::open_writable(Arc::new(MemoryStorage::from_bytes(bytes)), &opts)?;
    /// assert!(img.write_at(&[1; 512], 0).is_err()); // refused, never written over the header
    /// let events = seen.lock().unwrap();
    /// assert!(events[0].qemu_line().starts_with("qcow2: Marking image as corrupt: "));
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn qemu_line(&self) -> String {
        if self.fatal {
            format!(
                "qcow2: Marking image as corrupt: {}; further corruption events will be suppressed",
                self.message
            )
        } else {
            format!(
                "qcow2: Image is corrupt: {}; further non-fatal corruption events will be suppressed",
                self.message
            )
        }
    }
}

/// Receives the corruption events of an open image (set in
/// [`Qcow2Options::on_corruption`](super::Qcow2Options::on_corruption)); called with the
/// image's metadata lock held, so it must not use the image.
///
/// ```
/// use qcow2kit::engine::CorruptionReporter;
/// use qcow2kit::Qcow2Options;
/// use std::sync::{Arc, Mutex};
/// // A VMM records the events to raise them to its management layer.
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let log = seen.clone();
/// let opts = Qcow2Options {
///     on_corruption: Some(CorruptionReporter::new(move |e| log.lock().unwrap().push(e.message.clone()))),
///     ..Qcow2Options::default()
/// };
/// # let _ = opts;
/// ```
#[derive(Clone)]
pub struct CorruptionReporter(Arc<dyn Fn(&CorruptionEvent) + Send + Sync>);

impl CorruptionReporter {
    /// A reporter calling `f` for each event.
    ///
    /// ```
    /// let r = qcow2kit::engine::CorruptionReporter::new(|e| eprintln!("{}", e.qemu_line()));
    /// # let _ = r;
    /// ```
    pub fn new(f: impl Fn(&CorruptionEvent) + Send + Sync + 'static) -> Self {
        CorruptionReporter(Arc::new(f))
    }

    /// A reporter that prints QEMU's line for each event on standard error, as qemu-img and
    /// qemu-io do.
    ///
    /// ```
    /// let opts = qcow2kit::Qcow2Options {
    ///     on_corruption: Some(qcow2kit::engine::CorruptionReporter::stderr()), // as qemu-img does
    ///     ..Default::default()
    /// };
    /// # let _ = opts;
    /// ```
    pub fn stderr() -> Self {
        CorruptionReporter::new(|e| eprintln!("{}", e.qemu_line()))
    }
}

impl std::fmt::Debug for CorruptionReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CorruptionReporter")
    }
}

/// A number as C's `%#x` prints it (`0` for zero, `0x…` otherwise), for messages in QEMU's
/// words.
pub(crate) struct CHex(pub(crate) u64);

impl std::fmt::Display for CHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == 0 {
            f.write_str("0")
        } else {
            write!(f, "{:#x}", self.0)
        }
    }
}

/// The error of a fatal corruption event with `message`.
pub(crate) fn inconsistent(message: String) -> Error {
    Error::Corrupt(Corruption::Inconsistent(message))
}

/// Whether `e` reports metadata that is inconsistent in a way that makes further writes unsafe
/// (the errors that QEMU turns into fatal corruption events).
fn is_fatal(e: &Error) -> Option<String> {
    match e {
        Error::Corrupt(c @ (Corruption::Inconsistent(_) | Corruption::BadEntry { .. })) => {
            Some(c.to_string())
        }
        _ => None,
    }
}

impl Qcow2Image {
    /// Reports a corruption event and, when `fatal` and the image is writable, marks the image
    /// corrupt (see the module docs).
    pub(crate) fn signal_corruption(&self, m: &mut Meta, message: String, fatal: bool) {
        let fatal = fatal && self.writable;
        let marked = m
            .header
            .incompatible
            .contains(IncompatibleFeatures::CORRUPT);
        if self.corruption_signaled.swap(true, Ordering::SeqCst) && (!fatal || marked) {
            return;
        }
        if fatal {
            m.broken = true;
            m.header.incompatible |= IncompatibleFeatures::CORRUPT;
            // A v2 header has no feature bits: the mark lives in memory only, as in QEMU.
            if m.header.version >= 3 {
                let s = self.storage.as_ref();
                // Best effort: the image is refused for writing from now on whatever happens.
                let _ = s
                    .write_at(&m.header.incompatible.bits().to_be_bytes(), 72)
                    .and_then(|()| s.flush());
            }
        }
        if let Some(r) = &self.reporter {
            (r.0)(&CorruptionEvent { message, fatal });
        }
    }

    /// Passes `r` through; a fatal corruption in it is signalled first (the image marked
    /// corrupt). Every entry point that writes, and reads of writable images, end in this.
    pub(crate) fn guard<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if let Some(message) = is_fatal(e) {
                let mut m = self.lock_meta();
                let message = match e {
                    Error::Corrupt(c) => self.qemu_words(&m, c).unwrap_or(message),
                    _ => message,
                };
                self.signal_corruption(&mut m, message, true);
            }
        }
        r
    }

    /// QEMU's words for a malformed table entry found in use (`qcow2_get_host_offset`), which
    /// name the table's position rather than the guest offset.
    fn qemu_words(&self, m: &Meta, c: &Corruption) -> Option<String> {
        let Corruption::BadEntry {
            table,
            guest_offset,
            entry,
            rule,
        } = c
        else {
            return None;
        };
        let g = self.geo;
        let l1_index = guest_offset >> (g.cluster_bits + g.l2_bits);
        let l2_offset = m.l1.get_or_zero(usize::try_from(l1_index).ok()?) & OFFSET_MASK;
        let l2_index = (guest_offset >> g.cluster_bits) & ((1 << g.l2_bits) - 1);
        let at = format!(
            "(L2 offset: {}, L2 index: {})",
            CHex(l2_offset),
            CHex(l2_index)
        );
        match (*table, *rule) {
            ("L1", "L2 table offset is not cluster-aligned") => Some(format!(
                "L2 table offset {} unaligned (L1 index: {})",
                CHex(entry & OFFSET_MASK),
                CHex(l1_index)
            )),
            ("L2", "cluster offset is not cluster-aligned") => Some(format!(
                "Cluster allocation offset {} unaligned {at}",
                CHex(entry & OFFSET_MASK)
            )),
            ("L2", "subcluster is both allocated and zero")
            | ("L2", "unallocated cluster has allocated subclusters") => {
                Some(format!("Invalid cluster entry found  {at}"))
            }
            _ => None,
        }
    }
}
