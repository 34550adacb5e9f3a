//! The transmission phase of one connection: a reader thread decodes requests and hands them to
//! a few workers, which run them on the device and write the replies (possibly out of order).
//!
//! Invariants: a request's payload or reply buffer is allocated only after its bytes are taken
//! from the connection's budget ([`BUDGET`]), and given back once the reply is written, so a
//! client that pipelines many requests or never reads its replies holds at most that much
//! memory; every offset is checked against the export size with checked arithmetic before the
//! device sees it; a reply is written whole under the writer lock.

use super::handshake::{self, MetaContext, Negotiated};
use super::proto::{self, cflag, chunk, cmd, errno, Request, MAX_PAYLOAD, REQUEST_LEN};
use super::{Export, Stream};
use crate::device::{chain_status, ExtentKind};
use crate::error::Error;
use std::io::{self, BufReader, Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Bytes of request payloads and reply buffers one connection may hold at once.
pub(crate) const BUDGET: u64 = 2 * MAX_PAYLOAD as u64;
/// Worker threads per connection: requests in flight at once.
const WORKERS: usize = 4;
/// Most extents sent for one context in one block status reply.
const MAX_EXTENTS: usize = 4096;

/// Serves one client on `stream`: the handshake (which must end within `handshake_limit`,
/// qemu-nbd's `--handshake-limit`, when given), then requests until the client disconnects
/// (or sends `NBD_CMD_DISC`, or breaks the protocol). Requests in flight are finished and the
/// export flushed (when writable) before it returns.
pub fn serve_connection(
    stream: Box<dyn Stream>,
    exports: &[Arc<Export>],
    handshake_limit: Option<Duration>,
) -> io::Result<()> {
    let mut reader = stream;
    reader.set_read_limit(handshake_limit)?;
    let negotiated = handshake::negotiate(&mut reader, exports);
    if negotiated.is_err() {
        reader.shutdown_both();
    }
    let Some(neg) = negotiated? else {
        return Ok(());
    };
    reader.set_read_limit(None)?;
    let writer = Arc::new(Mutex::new(reader.try_clone_stream()?));
    let budget = Arc::new(Budget::new(BUDGET));
    let conn = Arc::new(Conn {
        neg,
        in_flight: AtomicUsize::new(0),
        writer,
        budget,
    });
    let (tx, rx) = sync_channel::<Job>(WORKERS);
    let rx = Arc::new(Mutex::new(rx));
    let workers: Vec<_> = (0..WORKERS)
        .map(|_| {
            let rx = rx.clone();
            let conn = conn.clone();
            std::thread::spawn(move || worker(&conn, &rx))
        })
        .collect();
    let result = read_requests(
        &mut BufReader::with_capacity(64 << 10, &mut reader),
        &conn,
        &tx,
    );
    drop(tx);
    for w in workers {
        // A worker only ends by its channel closing; a panic there is a bug worth surfacing.
        if w.join().is_err() {
            return Err(io::Error::other("nbd worker panicked"));
        }
    }
    if !conn.neg.export.read_only {
        conn.neg.export.device.flush().map_err(io::Error::other)?;
    }
    reader.shutdown_both();
    result
}

struct Conn {
    neg: Negotiated,
    /// Requests handed to the workers and not yet replied to.
    in_flight: AtomicUsize,
    writer: Arc<Mutex<Box<dyn Stream>>>,
    budget: Arc<Budget>,
}

struct Job {
    req: Request,
    payload: Vec<u8>,
    /// Budget bytes to give back once replied.
    held: u64,
}

/// A byte budget: `take` blocks until enough is free.
struct Budget {
    free: Mutex<u64>,
    cv: Condvar,
}

impl Budget {
    fn new(n: u64) -> Self {
        Budget {
            free: Mutex::new(n),
            cv: Condvar::new(),
        }
    }

    fn take(&self, n: u64) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free < n {
            free = self.cv.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= n;
    }

    fn give(&self, n: u64) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        *free += n;
        self.cv.notify_all();
    }
}

fn is_write(kind: u16) -> bool {
    matches!(kind, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM)
}

fn allowed_flags(kind: u16) -> u16 {
    match kind {
        cmd::READ => cflag::DF,
        cmd::WRITE => cflag::FUA,
        cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
        cmd::TRIM => cflag::FUA,
        cmd::BLOCK_STATUS => cflag::REQ_ONE,
        _ => 0,
    }
}

/// Decodes requests until the client leaves; `Err` for a protocol violation or I/O error.
fn read_requests(
    r: &mut BufReader<&mut Box<dyn Stream>>,
    conn: &Conn,
    tx: &std::sync::mpsc::SyncSender<Job>,
) -> io::Result<()> {
    let export = &conn.neg.export;
    loop {
        let mut head = [0u8; REQUEST_LEN];
        match r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let Some(req) = Request::decode(&head) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad request magic",
            ));
        };
        if req.kind == cmd::DISC {
            return Ok(());
        }
        let has_payload = req.kind == cmd::WRITE;
        if has_payload && req.len > MAX_PAYLOAD {
            // Its payload cannot be taken in: answer, then drop the connection (as qemu-nbd).
            conn.reply_error(&req, errno::EINVAL, "request too large")?;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "write too large",
            ));
        }
        let payload_len = if has_payload { u64::from(req.len) } else { 0 };
        let refusal = check(
            &req,
            export,
            conn.neg.structured,
            !conn.neg.contexts.is_empty(),
        );
        let held = match (refusal, req.kind) {
            (None, cmd::READ) => u64::from(req.len),
            _ => payload_len,
        };
        conn.budget.take(held);
        let mut payload = Vec::new();
        if has_payload {
            payload = vec![0u8; req.len as usize];
            if let Err(e) = r.read_exact(&mut payload) {
                conn.budget.give(held);
                return Err(e);
            }
        }
        if let Some((err, msg)) = refusal {
            drop(payload);
            conn.budget.give(held);
            conn.reply_error(&req, err, msg)?;
            continue;
        }
        let job = Job { req, payload, held };
        if r.buffer().is_empty() && conn.in_flight.load(Ordering::Acquire) == 0 {
            // Nothing else in flight or waiting: run it here, saving two thread hand-offs per
            // request for a client that waits for each reply (queue depth 1). Requests that
            // arrive meanwhile are buffered and go to the workers.
            let r = conn.run(job);
            conn.budget.give(held);
            r?;
            continue;
        }
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        if tx.send(job).is_err() {
            conn.in_flight.fetch_sub(1, Ordering::AcqRel);
            conn.budget.give(held);
            return Err(io::Error::other("nbd workers gone"));
        }
    }
}

/// Why a request is refused before it runs, as qemu-nbd refuses it.
fn check(
    req: &Request,
    export: &Export,
    structured: bool,
    has_contexts: bool,
) -> Option<(u32, &'static str)> {
    let known = matches!(
        req.kind,
        cmd::READ
            | cmd::WRITE
            | cmd::FLUSH
            | cmd::TRIM
            | cmd::CACHE
            | cmd::WRITE_ZEROES
            | cmd::BLOCK_STATUS
    );
    if !known {
        return Some((errno::EINVAL, "unsupported command"));
    }
    if req.flags & !allowed_flags(req.kind) != 0 {
        return Some((errno::EINVAL, "unsupported flags for command"));
    }
    if req.kind == cmd::READ && req.len > MAX_PAYLOAD {
        let e = if req.flags & cflag::DF != 0 && structured {
            errno::EOVERFLOW
        } else {
            errno::EINVAL
        };
        return Some((e, "request too large"));
    }
    if req.kind == cmd::BLOCK_STATUS && (!structured || !has_contexts) {
        return Some((errno::EINVAL, "no meta context negotiated"));
    }
    if req.kind == cmd::FLUSH && (req.offset != 0 || req.len != 0) {
        return Some((errno::EINVAL, "flush with offset or length"));
    }
    let size = export.device.size();
    let in_range = req
        .offset
        .checked_add(u64::from(req.len))
        .is_some_and(|end| end <= size);
    if req.kind != cmd::FLUSH && !in_range {
        let e = match req.kind {
            cmd::WRITE | cmd::WRITE_ZEROES => errno::ENOSPC,
            _ => errno::EINVAL,
        };
        return Some((e, "request past the end of the export"));
    }
    if req.kind == cmd::BLOCK_STATUS && req.len == 0 {
        return Some((errno::EINVAL, "block status of length 0"));
    }
    if export.read_only && is_write(req.kind) {
        return Some((errno::EPERM, "export is read-only"));
    }
    None
}

fn worker(conn: &Conn, rx: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        let held = job.held;
        let r = conn.run(job);
        conn.budget.give(held);
        conn.in_flight.fetch_sub(1, Ordering::AcqRel);
        if r.is_err() {
            // The client is gone or stuck: every other handle sees the shutdown.
            if let Ok(w) = conn.writer.lock() {
                w.shutdown_both();
            }
        }
    }
}

/// The protocol error for a library error.
fn errno_of(e: &Error) -> u32 {
    match e {
        Error::ReadOnly => errno::EPERM,
        Error::OutOfRange { .. } | Error::InvalidArgument(_) => errno::EINVAL,
        Error::Unsupported(_) => errno::ENOTSUP,
        Error::Io { source, .. } => match source.raw_os_error() {
            Some(28) => errno::ENOSPC,
            Some(12) => errno::ENOMEM,
            _ => errno::EIO,
        },
        _ => errno::EIO,
    }
}

impl Conn {
    fn send(&self, bytes: &[&[u8]]) -> io::Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        for b in bytes {
            w.write_all(b)?;
        }
        w.flush()
    }

    fn reply_ok(&self, req: &Request) -> io::Result<()> {
        if self.neg.structured {
            let h = proto::chunk_header(req.cookie, chunk::FLAG_DONE, chunk::NONE, 0);
            self.send(&[&h])
        } else {
            self.send(&[&proto::simple_reply(req.cookie, 0)])
        }
    }

    fn reply_error(&self, req: &Request, err: u32, msg: &str) -> io::Result<()> {
        if self.neg.structured {
            let msg = &msg.as_bytes()[..msg.len().min(4096)];
            let mut p = err.to_be_bytes().to_vec();
            p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            p.extend_from_slice(msg);
            let h = proto::chunk_header(req.cookie, chunk::FLAG_DONE, chunk::ERROR, p.len() as u32);
            self.send(&[&h, &p])
        } else {
            self.send(&[&proto::simple_reply(req.cookie, err)])
        }
    }

    fn outcome(&self, req: &Request, r: crate::Result<()>) -> io::Result<()> {
        match r {
            Ok(()) => self.reply_ok(req),
            Err(e) => self.reply_error(req, errno_of(&e), &e.to_string()),
        }
    }

    fn run(&self, job: Job) -> io::Result<()> {
        let req = job.req;
        let dev = &self.neg.export.device;
        let fua = |r: crate::Result<()>| {
            r.and_then(|()| {
                if req.flags & cflag::FUA != 0 {
                    dev.flush()
                } else {
                    Ok(())
                }
            })
        };
        let len = u64::from(req.len);
        match req.kind {
            cmd::READ => self.read(&req),
            cmd::WRITE => self.outcome(&req, fua(dev.write_at(&job.payload, req.offset))),
            cmd::FLUSH => self.outcome(&req, dev.flush()),
            cmd::CACHE => self.reply_ok(&req),
            cmd::TRIM => {
                let r = if self.neg.export.discard {
                    dev.discard(req.offset, len)
                } else {
                    Ok(())
                };
                self.outcome(&req, fua(r))
            }
            cmd::WRITE_ZEROES => {
                if req.flags & cflag::NO_HOLE != 0 {
                    if req.flags & cflag::FAST_ZERO != 0 {
                        return self.reply_error(&req, errno::ENOTSUP, "zeroing is not fast");
                    }
                    return self.outcome(
                        &req,
                        fua(write_explicit_zeroes(dev.as_ref(), req.offset, len)),
                    );
                }
                self.outcome(&req, fua(dev.write_zeroes(req.offset, len)))
            }
            cmd::BLOCK_STATUS => self.block_status(&req),
            _ => self.reply_error(&req, errno::EINVAL, "unsupported command"),
        }
    }

    fn read(&self, req: &Request) -> io::Result<()> {
        let dev = &self.neg.export.device;
        let mut buf = vec![0u8; req.len as usize];
        if !self.neg.structured {
            return match dev.read_at(&mut buf, req.offset) {
                Ok(()) => self.send(&[&proto::simple_reply(req.cookie, 0), &buf]),
                Err(e) => self.reply_error(req, errno_of(&e), ""),
            };
        }
        // Holes are sent as OFFSET_HOLE chunks unless the client forbids fragmenting.
        let runs = if req.flags & cflag::DF != 0 || req.len == 0 {
            vec![(req.offset, u64::from(req.len), false)]
        } else {
            match zero_runs(dev.as_ref(), req.offset, u64::from(req.len)) {
                Ok(r) => r,
                Err(e) => return self.reply_error(req, errno_of(&e), &e.to_string()),
            }
        };
        let mut chunks: Vec<(u16, Vec<u8>, std::ops::Range<usize>)> = Vec::new();
        for (off, n, hole) in runs {
            let at = (off - req.offset) as usize;
            let range = at..at + n as usize;
            if hole {
                let mut p = off.to_be_bytes().to_vec();
                p.extend_from_slice(&(n as u32).to_be_bytes());
                chunks.push((chunk::OFFSET_HOLE, p, 0..0));
            } else {
                if let Err(e) = dev.read_at(&mut buf[range.clone()], off) {
                    return self.reply_error(req, errno_of(&e), &e.to_string());
                }
                chunks.push((chunk::OFFSET_DATA, off.to_be_bytes().to_vec(), range));
            }
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let last = chunks.len().saturating_sub(1);
        if chunks.is_empty() {
            w.write_all(&proto::chunk_header(
                req.cookie,
                chunk::FLAG_DONE,
                chunk::NONE,
                0,
            ))?;
        }
        for (i, (kind, head, range)) in chunks.iter().enumerate() {
            let flags = if i == last { chunk::FLAG_DONE } else { 0 };
            let plen = (head.len() + range.len()) as u32;
            w.write_all(&proto::chunk_header(req.cookie, flags, *kind, plen))?;
            w.write_all(head)?;
            w.write_all(&buf[range.clone()])?;
        }
        w.flush()
    }

    fn block_status(&self, req: &Request) -> io::Result<()> {
        let dev = &self.neg.export.device;
        let max = if req.flags & cflag::REQ_ONE != 0 {
            1
        } else {
            MAX_EXTENTS
        };
        let mut payloads = Vec::new();
        for &ctx in &self.neg.contexts {
            let (offset, len) = (req.offset, u64::from(req.len));
            let found = match ctx {
                MetaContext::DirtyBitmap(i) => {
                    bitmap_extents(&self.neg.export, i, offset, len, max)
                }
                _ => status_extents(dev.as_ref(), ctx, offset, len, max),
            };
            let extents = match found {
                Ok(e) => e,
                Err(e) => return self.reply_error(req, errno_of(&e), &e.to_string()),
            };
            let mut p = ctx.id().to_be_bytes().to_vec();
            for (n, flags) in extents {
                p.extend_from_slice(&n.to_be_bytes());
                p.extend_from_slice(&flags.to_be_bytes());
            }
            payloads.push(p);
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let last = payloads.len().saturating_sub(1);
        for (i, p) in payloads.iter().enumerate() {
            let flags = if i == last { chunk::FLAG_DONE } else { 0 };
            w.write_all(&proto::chunk_header(
                req.cookie,
                flags,
                chunk::BLOCK_STATUS,
                p.len() as u32,
            ))?;
            w.write_all(p)?;
        }
        w.flush()
    }
}

/// Writes real zeros over `offset..offset+len`, a bounded buffer at a time.
fn write_explicit_zeroes(dev: &dyn crate::BlockDevice, offset: u64, len: u64) -> crate::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        dev.write_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// The runs of `offset..offset+len` as `(offset, len, reads_as_zero)`, adjacent runs of one kind
/// merged.
fn zero_runs(
    dev: &dyn crate::BlockDevice,
    offset: u64,
    len: u64,
) -> crate::Result<Vec<(u64, u64, bool)>> {
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let e = chain_status(dev, at, end - at)?;
        let n = e.len.min(end - at);
        if n == 0 {
            return Err(Error::InvalidArgument("block status of length 0".into()));
        }
        let zero = matches!(e.kind, ExtentKind::Zero | ExtentKind::Unallocated);
        match runs.last_mut() {
            Some(last) if last.2 == zero => last.1 += n,
            _ => runs.push((at, n, zero)),
        }
        at += n;
    }
    Ok(runs)
}

/// The extents of `ctx` from `offset`, at most `max` of them and at most `len` bytes in all,
/// as `(length, flags)`.
fn status_extents(
    dev: &dyn crate::BlockDevice,
    ctx: MetaContext,
    offset: u64,
    len: u64,
    max: usize,
) -> crate::Result<Vec<(u32, u32)>> {
    let mut out: Vec<(u32, u32)> = Vec::new();
    let end = offset + len;
    let mut at = offset;
    while at < end {
        // Lengths are u32 on the wire; len itself is a u32, so every run fits.
        let e = chain_status(dev, at, end - at)?;
        let n = e.len.min(end - at);
        if n == 0 {
            return Err(Error::InvalidArgument("block status of length 0".into()));
        }
        let flags = match ctx {
            MetaContext::BaseAllocation => match e.kind {
                ExtentKind::Data => 0,
                ExtentKind::Zero | ExtentKind::Unallocated => proto::STATE_HOLE | proto::STATE_ZERO,
            },
            MetaContext::AllocationDepth => match e.kind {
                ExtentKind::Unallocated => 0,
                _ => e.depth + 1,
            },
            MetaContext::DirtyBitmap(_) => {
                return Err(Error::InvalidArgument("not an allocation context".into()))
            }
        };
        if !push_extent(&mut out, n as u32, flags, max) {
            break;
        }
        at += n;
    }
    Ok(out)
}

/// Appends a run of `n` bytes with `flags` to `out`, merged into the last extent when the flags
/// match; `false` (nothing appended) when it would be extent number `max + 1`.
fn push_extent(out: &mut Vec<(u32, u32)>, n: u32, flags: u32, max: usize) -> bool {
    if let Some(last) = out.last_mut().filter(|l| l.1 == flags) {
        last.0 += n;
        return true;
    }
    if out.len() == max {
        return false;
    }
    out.push((n, flags));
    true
}

/// The extents of the export's dirty bitmap `index` from `offset`, at most `max` of them and at
/// most `len` bytes in all, as `(length, flags)`; bytes past the bitmap's end read clean.
fn bitmap_extents(
    export: &super::Export,
    index: u16,
    offset: u64,
    len: u64,
    max: usize,
) -> crate::Result<Vec<(u32, u32)>> {
    let b = export
        .bitmaps
        .get(usize::from(index))
        .ok_or_else(|| Error::InvalidArgument("no such dirty bitmap".into()))?;
    let bits = (b.source)()?;
    let g = bits.granularity();
    let mut out: Vec<(u32, u32)> = Vec::new();
    let end = offset + len;
    let mut at = offset;
    while at < end {
        // The run ends at the next granularity boundary (or the request's end).
        let next = (at / g).checked_add(1).and_then(|i| i.checked_mul(g));
        let n = next.map_or(end, |nx| nx.min(end)) - at;
        let flags = if bits.get(at / g) {
            proto::STATE_DIRTY
        } else {
            0
        };
        // len is a u32, so every run fits.
        if !push_extent(&mut out, n as u32, flags, max) {
            break;
        }
        at += n;
    }
    Ok(out)
}
