//! A storage that fails a chosen operation.

use super::{OpCounts, OpKind};
use crate::io::Storage;
use rustix::io::Errno;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The error a [`Fault`] injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultError {
    /// `EIO`: the medium failed.
    Eio,
    /// `ENOSPC`: the file system is full.
    Enospc,
}

impl FaultError {
    /// The `std::io::Error` with this errno.
    pub fn to_io(self) -> io::Error {
        match self {
            FaultError::Eio => Errno::IO.into(),
            FaultError::Enospc => Errno::NOSPC.into(),
        }
    }
}

/// Which operation fails, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fault {
    /// The kind of operation counted.
    pub kind: OpKind,
    /// Index (from 0) among the operations of that kind of the first one that fails.
    pub index: u64,
    /// The error returned.
    pub error: FaultError,
    /// Whether every later operation of the kind fails too (a full disk stays full); otherwise
    /// only the one at `index` fails.
    pub sticky: bool,
}

/// Wraps a storage, counts its mutating operations and fails the one a [`Fault`] names.
///
/// A failed operation has no effect on the inner storage. Reads, `len` and `data_run` pass
/// through and are never failed.
#[derive(Debug)]
pub struct FailingStorage {
    inner: Arc<dyn Storage>,
    fault: Option<Fault>,
    counts: Mutex<OpCounts>,
    injected: AtomicU64,
}

impl FailingStorage {
    /// A pass-through storage that only counts (learn a workload's totals with it).
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        Self::with_fault(inner, None)
    }

    /// A storage that injects `fault` (none: count only).
    pub fn with_fault(inner: Arc<dyn Storage>, fault: Option<Fault>) -> Self {
        FailingStorage {
            inner,
            fault,
            counts: Mutex::new(OpCounts::default()),
            injected: AtomicU64::new(0),
        }
    }

    /// Operations attempted so far, by kind (failed ones included).
    pub fn counts(&self) -> OpCounts {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many operations have been failed so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// The wrapped storage.
    pub fn inner(&self) -> &Arc<dyn Storage> {
        &self.inner
    }

    fn gate(&self, kind: OpKind) -> io::Result<()> {
        let index = self
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .bump(kind);
        match self.fault {
            Some(f) if f.kind == kind && (index == f.index || (f.sticky && index > f.index)) => {
                self.injected.fetch_add(1, Ordering::Relaxed);
                Err(f.error.to_io())
            }
            _ => Ok(()),
        }
    }
}

impl Storage for FailingStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.gate(OpKind::Write)?;
        self.inner.write_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.gate(OpKind::SetLen)?;
        self.inner.set_len(len)
    }

    fn flush(&self) -> io::Result<()> {
        self.gate(OpKind::Flush)?;
        self.inner.flush()
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.gate(OpKind::PunchHole)?;
        self.inner.punch_hole(offset, len)
    }

    fn data_run(&self, offset: u64) -> io::Result<Option<(bool, u64)>> {
        self.inner.data_run(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemoryStorage;

    #[test]
    fn fails_exactly_the_chosen_write() {
        let mem = Arc::new(MemoryStorage::new());
        let fault = Fault {
            kind: OpKind::Write,
            index: 1,
            error: FaultError::Enospc,
            sticky: false,
        };
        let s = FailingStorage::with_fault(mem.clone(), Some(fault));
        s.write_at(&[1], 0).unwrap();
        let e = s.write_at(&[2], 1).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(Errno::NOSPC.raw_os_error()));
        s.write_at(&[3], 2).unwrap();
        s.flush().unwrap();
        assert_eq!(mem.to_bytes(), vec![1, 0, 3]);
        assert_eq!(s.counts().writes, 3);
        assert_eq!(s.counts().flushes, 1);
        assert_eq!(s.injected(), 1);
    }

    #[test]
    fn sticky_faults_keep_failing() {
        let fault = Fault {
            kind: OpKind::Flush,
            index: 0,
            error: FaultError::Eio,
            sticky: true,
        };
        let s = FailingStorage::with_fault(Arc::new(MemoryStorage::new()), Some(fault));
        assert!(s.flush().is_err());
        assert!(s.flush().is_err());
        s.write_at(&[1], 0).unwrap();
        assert_eq!(s.injected(), 2);
    }
}
