//! A [`Storage`](crate::io::Storage) over an NBD export: qcow2kit opens an image file that lives
//! behind any NBD server (qemu-nbd, nbdkit, our own) as it opens a local file.
//!
//! The client asks for structured replies (so holes in a read travel as `OFFSET_HOLE` chunks)
//! and the `base:allocation` context (so [`data_run`](crate::io::Storage::data_run) tells
//! holes from data and a map or a convert skips the holes). Reads and writes are split at the
//! server's maximum block size and pipelined. Invariants: one request at a time owns the
//! connection's lock; a reply that breaks the protocol breaks the connection (every later call
//! fails) rather than being guessed at; an error the server reports for a request fails that
//! request only.

use super::client_conn::{ClientConn, Op, Settled, Target};
use super::client_reply::{errno_error, proto_err, Extents};
use super::proto::{self, cmd, tflag};
use super::uri::NbdAddress;
use super::Stream;
use std::io;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// Most bytes one block status request asks about.
const STATUS_SPAN: u64 = 1 << 30;
/// Most bytes one zero-write request covers (a `u32` on the wire, kept aligned).
const ZERO_SPAN: u64 = 1 << 30;

/// An NBD export as byte storage.
pub struct NbdStorage {
    uri: String,
    settled: Settled,
    /// Whether the server answers `base:allocation` block status.
    block_status: bool,
    conn: Mutex<ClientConn>,
    /// Held by every write when the server has a minimum block size, so that a block read,
    /// patched and written whole never loses a write that landed in between.
    rmw: Mutex<()>,
    /// The last block status answer, as contiguous runs from `.0`: `(end, holds data)`.
    status: Mutex<(u64, Vec<(u64, bool)>)>,
}

impl std::fmt::Debug for NbdStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdStorage")
            .field("uri", &self.uri)
            .field("size", &self.settled.size)
            .field("flags", &self.settled.flags)
            .finish()
    }
}

/// C's `strerror` text of an OS error.
fn reason(e: &io::Error) -> String {
    crate::error::strerror(e)
}

impl NbdStorage {
    /// Connects to the export an NBD URI names. With `writable`, an export the server offers
    /// read-only is refused. Failing to reach the server is reported in qemu's words
    /// (`Failed to connect to 'WHERE': REASON`).
    pub fn connect(uri: &str, writable: bool) -> io::Result<Self> {
        let addr = NbdAddress::parse(uri)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let stream: Box<dyn Stream> = match &addr {
            NbdAddress::Tcp { host, port, .. } => {
                let s = std::net::TcpStream::connect((host.as_str(), *port)).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("Failed to connect to '{host}:{port}': {}", reason(&e)),
                    )
                })?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            NbdAddress::Unix { socket, .. } => {
                Box::new(UnixStream::connect(socket).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "Failed to connect to '{}': {}",
                            socket.display(),
                            reason(&e)
                        ),
                    )
                })?)
            }
        };
        let mut conn = ClientConn::new(stream)?;
        let settled = conn.handshake(addr.name())?;
        if writable && settled.flags & tflag::READ_ONLY != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the NBD export is read-only",
            ));
        }
        Ok(NbdStorage {
            uri: uri.to_string(),
            settled,
            block_status: conn.alloc_ctx.is_some(),
            conn: Mutex::new(conn),
            rmw: Mutex::new(()),
            status: Mutex::new((0, Vec::new())),
        })
    }

    /// The export's transmission flags.
    pub fn transmission_flags(&self) -> u16 {
        self.settled.flags
    }

    /// Whether the server answers block status for `base:allocation`, so holes can be told
    /// from data.
    pub fn has_block_status(&self) -> bool {
        self.block_status
    }

    /// Runs `ops` on the connection. A failure of the connection itself (I/O, a protocol
    /// violation) breaks it for good; an error the server reports fails these requests only.
    fn run<'a>(&self, ops: impl IntoIterator<Item = Op<'a>>) -> io::Result<()> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if c.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "NBD connection lost",
            ));
        }
        let r = c.pipeline(ops);
        match r {
            Ok(None) => Ok(()),
            Ok(Some(e)) => Err(errno_error(e)),
            Err(e) => {
                c.broken = true;
                Err(e)
            }
        }
    }

    /// Drops the cached block status; called after every change to the export, so that a
    /// status request that ran before the change cannot be answered from afterwards.
    fn forget_status(&self) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.1.clear();
    }

    /// Checks that `offset..offset+len` lies inside the export, which cannot grow.
    fn check_inside(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(22))?;
        if end > self.settled.size {
            return Err(io::Error::from_raw_os_error(28));
        }
        Ok(())
    }

    /// Pieces of `offset..offset+len` of at most `max` bytes each, as `(offset, len)`.
    fn pieces(offset: u64, len: u64, max: u64) -> impl Iterator<Item = (u64, u32)> {
        let end = offset + len;
        (0..len.div_ceil(max)).map(move |i| {
            let at = offset + i * max;
            (at, (end - at).min(max) as u32)
        })
    }
}

impl crate::io::Storage for NbdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some((start, end)) = self.widened(offset, buf.len() as u64) else {
            return self.read_direct(buf, offset);
        };
        let mut whole = vec![0u8; (end - start) as usize];
        self.read_direct(&mut whole, start)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&whole[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.settled.min_block <= 1 {
            return self.write_direct(buf, offset);
        }
        let _whole_blocks = self.rmw.lock().unwrap_or_else(|p| p.into_inner());
        self.write_blocks(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.settled.size)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.settled.size {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "an NBD export cannot be resized",
        ))
    }

    fn flush(&self) -> io::Result<()> {
        if self.settled.flags & tflag::SEND_FLUSH == 0 {
            return Ok(());
        }
        self.run([Op {
            kind: cmd::FLUSH,
            flags: 0,
            offset: 0,
            len: 0,
            payload: &[],
            target: Target::Status,
        }])
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let b = u64::from(self.settled.min_block);
        if b <= 1 {
            return self.zero_direct(offset, len);
        }
        self.check_inside(offset, len)?;
        let end = offset + len;
        let _whole_blocks = self.rmw.lock().unwrap_or_else(|p| p.into_inner());
        let (first, last) = (offset.next_multiple_of(b), end - end % b);
        if first >= last {
            return self.write_blocks(&vec![0u8; len as usize], offset);
        }
        self.write_blocks(&vec![0u8; (first - offset) as usize], offset)?;
        self.zero_direct(first, last - first)?;
        self.write_blocks(&vec![0u8; (end - last) as usize], last)
    }

    fn data_run(&self, offset: u64) -> io::Result<Option<(bool, u64)>> {
        let size = self.settled.size;
        if offset >= size {
            return Ok(Some((false, u64::MAX)));
        }
        if !self.has_block_status() {
            return Ok(None);
        }
        // Held across the request, so a change that ends meanwhile clears the answer after it
        // is stored.
        let mut cache = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if offset >= cache.0 {
            let i = cache.1.partition_point(|r| r.0 <= offset);
            if let Some(&(end, data)) = cache.1.get(i) {
                return Ok(Some((data, end)));
            }
        }
        let len = (size - offset).min(STATUS_SPAN);
        let mut ext = Extents::default();
        self.run([Op {
            kind: cmd::BLOCK_STATUS,
            flags: 0,
            offset,
            len: len as u32,
            payload: &[],
            target: Target::Extents(&mut ext),
        }])?;
        if ext.list.is_empty() {
            return Err(proto_err("NBD server sent no block status"));
        }
        // A run that reads as zeros is a hole whether or not the server allocated it.
        let mut runs: Vec<(u64, bool)> = Vec::with_capacity(ext.list.len());
        let mut end = offset;
        for (n, flags) in ext.list {
            end += n;
            let data = flags & proto::STATE_ZERO == 0;
            match runs.last_mut() {
                Some(last) if last.1 == data => last.0 = end,
                _ => runs.push((end, data)),
            }
        }
        let first = runs[0];
        *cache = (offset, runs);
        Ok(Some((first.1, first.0)))
    }
}

impl Drop for NbdStorage {
    fn drop(&mut self) {
        self.conn
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .close();
    }
}

impl NbdStorage {
    /// A read as the server gets it (no alignment).
    fn read_direct(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Bytes past the end read as zeros (the Storage contract).
        let inside = self
            .settled
            .size
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        let max = self.settled.max_payload as usize;
        let mut at = offset;
        let ops: Vec<Op<'_>> = head
            .chunks_mut(max)
            .map(|piece| {
                let len = piece.len() as u32;
                let op = Op {
                    kind: cmd::READ,
                    flags: 0,
                    offset: at,
                    len,
                    payload: &[],
                    target: Target::Read(piece),
                };
                at += u64::from(len);
                op
            })
            .collect();
        if ops.is_empty() {
            return Ok(());
        }
        self.run(ops)
    }

    /// A write as the server gets it (no alignment).
    fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_inside(offset, buf.len() as u64)?;
        let max = self.settled.max_payload as usize;
        let mut at = offset;
        let ops = buf.chunks(max).map(|piece| {
            let op = Op {
                kind: cmd::WRITE,
                flags: 0,
                offset: at,
                len: piece.len() as u32,
                payload: piece,
                target: Target::Status,
            };
            at += piece.len() as u64;
            op
        });
        let r = self.run(ops);
        self.forget_status();
        r
    }

    /// A zero write as the server gets it (no alignment).
    fn zero_direct(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_inside(offset, len)?;
        if self.settled.flags & tflag::SEND_WRITE_ZEROES == 0 {
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            for (at, n) in Self::pieces(offset, len, zeros.len().max(1) as u64) {
                self.write_direct(&zeros[..n as usize], at)?;
            }
            return Ok(());
        }
        let r = self.run(Self::pieces(offset, len, ZERO_SPAN).map(|(at, n)| Op {
            kind: cmd::WRITE_ZEROES,
            flags: 0,
            offset: at,
            len: n,
            payload: &[],
            target: Target::Status,
        }));
        self.forget_status();
        r
    }

    /// `offset..offset+len` widened to the server's minimum block size, or `None` when it is
    /// aligned already (or the server has no minimum).
    fn widened(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let b = u64::from(self.settled.min_block);
        if b <= 1 || (offset % b == 0 && len % b == 0) {
            return None;
        }
        let end = offset.checked_add(len)?.checked_next_multiple_of(b)?;
        Some((offset - offset % b, end))
    }

    /// Writes `buf` at `offset` in whole blocks of the server's minimum size: the blocks it
    /// covers partly are read, patched and written whole. The caller holds `rmw`, so that no
    /// other write lands between the read and the write of a block.
    fn write_blocks(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let Some((start, end)) = self.widened(offset, buf.len() as u64) else {
            return self.write_direct(buf, offset);
        };
        self.check_inside(start, end - start)?;
        let b = self.settled.min_block as usize;
        let mut whole = vec![0u8; (end - start) as usize];
        self.read_direct(&mut whole[..b], start)?;
        if whole.len() > b {
            let tail = whole.len() - b;
            self.read_direct(&mut whole[tail..], end - b as u64)?;
        }
        let at = (offset - start) as usize;
        whole[at..at + buf.len()].copy_from_slice(buf);
        self.write_direct(&whole, start)
    }
}
