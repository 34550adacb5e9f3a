//! One client connection: the fixed newstyle handshake (structured replies and the
//! `base:allocation` context asked for, then `NBD_OPT_GO`) and the transmission phase, where
//! several requests are kept in flight and each reply — simple, or structured chunks in any
//! order — is matched to its request by cookie.
//!
//! Invariants: a read's data lands only in the buffer of the request it answers and only inside
//! the range that request asked for, never twice in the same place; no allocation is sized by
//! the server beyond [`MAX_META_CHUNK`] bytes; a reply that breaks the protocol is an
//! `InvalidData` error after which the connection is not used again.

use super::client_reply::{parse_error, parse_hole, proto_err, Coverage, Extents, MAX_META_CHUNK};
use super::proto::{self, chunk, cmd, info, opt, rep, Request, MAX_PAYLOAD};
use super::Stream;
use std::io::{self, BufReader, BufWriter, Read, Write};

/// Requests kept in flight at once.
pub(crate) const WINDOW: usize = 16;
/// Most replies to one option before the server is taken to be misbehaving.
const MAX_OPTION_REPLIES: usize = 1024;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
const CHUNK_ERROR_OFFSET: u16 = 0x8002;

/// What the handshake settled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settled {
    /// Export size in bytes.
    pub(crate) size: u64,
    /// Transmission flags.
    pub(crate) flags: u16,
    /// Largest payload per request.
    pub(crate) max_payload: u32,
    /// The server's minimum block size: requests must be aligned to it (1: any).
    pub(crate) min_block: u32,
}

/// One request to run, and where its answer goes.
pub(crate) struct Op<'a> {
    /// Command type.
    pub(crate) kind: u16,
    /// Command flags.
    pub(crate) flags: u16,
    /// Offset in the export.
    pub(crate) offset: u64,
    /// Length in bytes.
    pub(crate) len: u32,
    /// Payload sent after the header (writes).
    pub(crate) payload: &'a [u8],
    /// Where the reply's data goes.
    pub(crate) target: Target<'a>,
}

/// Where a reply's data goes.
pub(crate) enum Target<'a> {
    /// Nothing comes back but the status.
    Status,
    /// Read data, exactly `len` bytes.
    Read(&'a mut [u8]),
    /// `base:allocation` extents.
    Extents(&'a mut Extents),
}

struct InFlight<'a> {
    cookie: u64,
    op: Op<'a>,
    cover: Coverage,
    /// The first error the server reported for this request.
    error: Option<u32>,
}

/// A client connection after (or during) its handshake.
pub(crate) struct ClientConn {
    r: BufReader<Box<dyn Stream>>,
    w: BufWriter<Box<dyn Stream>>,
    next_cookie: u64,
    /// Whether structured replies were negotiated.
    pub(crate) structured: bool,
    /// The id the server gave `base:allocation`, when it offers it.
    pub(crate) alloc_ctx: Option<u32>,
    /// Set once the connection can no longer be trusted.
    pub(crate) broken: bool,
}

impl ClientConn {
    /// Wraps a connected stream.
    pub(crate) fn new(stream: Box<dyn Stream>) -> io::Result<Self> {
        let w = stream.try_clone_stream()?;
        Ok(ClientConn {
            r: BufReader::with_capacity(256 << 10, stream),
            w: BufWriter::with_capacity(64 << 10, w),
            next_cookie: 1,
            structured: false,
            alloc_ctx: None,
            broken: false,
        })
    }

    /// Shuts the connection down, politely when it is still in step.
    pub(crate) fn close(&mut self) {
        if !self.broken {
            // A polite goodbye; servers cope without it.
            let _ = self.send(cmd::DISC, 0, 0, 0, &[]);
            let _ = self.w.flush();
        }
        self.w.get_ref().shutdown_both();
    }

    /// The handshake for export `name`.
    pub(crate) fn handshake(&mut self, name: &str) -> io::Result<Settled> {
        let mut hello = [0u8; 18];
        self.r.read_exact(&mut hello)?;
        let mut c = proto::Cursor::new(&hello);
        if c.u64() != Some(proto::NBD_MAGIC) || c.u64() != Some(proto::IHAVEOPT) {
            return Err(proto_err("not a newstyle NBD server"));
        }
        let sflags = c.u16().unwrap_or(0);
        if sflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto_err("NBD server does not speak fixed newstyle"));
        }
        let cflags = u32::from(sflags & (proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES));
        self.w.write_all(&cflags.to_be_bytes())?;
        let name_len = u32::try_from(name.len())
            .ok()
            .filter(|&n| n <= proto::MAX_STRING)
            .ok_or_else(|| proto_err("export name too long"))?;

        self.structured = self.option(opt::STRUCTURED_REPLY, &[], |_, _| Ok(()))?;
        if self.structured {
            let query = proto::CTX_BASE_ALLOCATION.as_bytes();
            let mut o = name_len.to_be_bytes().to_vec();
            o.extend_from_slice(name.as_bytes());
            o.extend_from_slice(&1u32.to_be_bytes());
            o.extend_from_slice(&(query.len() as u32).to_be_bytes());
            o.extend_from_slice(query);
            let mut ctx = None;
            self.option(opt::SET_META_CONTEXT, &o, |kind, data| {
                if kind == rep::META_CONTEXT {
                    let mut c = proto::Cursor::new(data);
                    let id = c
                        .u32()
                        .ok_or_else(|| proto_err("short meta context reply"))?;
                    if c.bytes(query.len()) == Some(query) && c.is_empty() {
                        ctx = Some(id);
                    }
                }
                Ok(())
            })?;
            self.alloc_ctx = ctx;
        }

        let mut o = name_len.to_be_bytes().to_vec();
        o.extend_from_slice(name.as_bytes());
        o.extend_from_slice(&1u16.to_be_bytes());
        o.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        let mut export = None;
        let mut max_payload = MAX_PAYLOAD;
        let mut min_block = 1;
        let mut refusal = None;
        let went = self.option_with_refusal(opt::GO, &o, &mut refusal, |kind, data| {
            if kind != rep::INFO {
                return Ok(());
            }
            let mut c = proto::Cursor::new(data);
            match c.u16() {
                Some(info::EXPORT) => {
                    if let (Some(size), Some(flags)) = (c.u64(), c.u16()) {
                        export = Some((size, flags));
                    }
                }
                Some(info::BLOCK_SIZE) => {
                    if let (Some(min), Some(_pref), Some(max)) = (c.u32(), c.u32(), c.u32()) {
                        // The protocol's minimum is a power of two of at most 64 KiB; any
                        // other value is not trusted (and alignment is then not attempted).
                        if min.is_power_of_two() && min <= 1 << 16 {
                            min_block = min;
                        }
                        max_payload = max.clamp(512, MAX_PAYLOAD).max(min_block);
                        max_payload -= max_payload % min_block;
                    }
                }
                _ => {}
            }
            Ok(())
        })?;
        if !went {
            let (kind, msg) = refusal.unwrap_or_default();
            if kind == rep::ERR_UNSUP {
                // A server older than NBD_OPT_GO: the export by NBD_OPT_EXPORT_NAME.
                return self.export_name(name, cflags);
            }
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("Requested export not available\nserver reported: {msg}"),
            ));
        }
        let (size, flags) = export.ok_or_else(|| proto_err("server sent no export information"))?;
        Ok(Settled {
            size,
            flags,
            max_payload,
            min_block,
        })
    }

    /// `NBD_OPT_EXPORT_NAME`, the option that ends the handshake without a reply header: the
    /// server answers with the export's size and flags (and 124 zero bytes unless both sides
    /// agreed to `NO_ZEROES`), or closes the connection when it has no such export.
    fn export_name(&mut self, name: &str, cflags: u32) -> io::Result<Settled> {
        let len = u32::try_from(name.len()).map_err(|_| proto_err("export name too long"))?;
        self.w.write_all(&proto::IHAVEOPT.to_be_bytes())?;
        self.w.write_all(&opt::EXPORT_NAME.to_be_bytes())?;
        self.w.write_all(&len.to_be_bytes())?;
        self.w.write_all(name.as_bytes())?;
        self.w.flush()?;
        let mut answer = [0u8; 10];
        self.r.read_exact(&mut answer).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                io::Error::new(io::ErrorKind::NotFound, "Requested export not available")
            }
            _ => e,
        })?;
        if cflags & u32::from(proto::FLAG_NO_ZEROES) == 0 {
            let mut zeros = [0u8; 124];
            self.r.read_exact(&mut zeros)?;
        }
        let mut c = proto::Cursor::new(&answer);
        let (Some(size), Some(flags)) = (c.u64(), c.u16()) else {
            return Err(proto_err("short export information"));
        };
        Ok(Settled {
            size,
            flags,
            max_payload: MAX_PAYLOAD,
            min_block: 1,
        })
    }

    /// Sends option `code` with `data` and reads its replies, handing each non-final one to
    /// `each`; `true` when the server acknowledged it, `false` when it refused it.
    fn option(
        &mut self,
        code: u32,
        data: &[u8],
        each: impl FnMut(u32, &[u8]) -> io::Result<()>,
    ) -> io::Result<bool> {
        self.option_with_refusal(code, data, &mut None, each)
    }

    fn option_with_refusal(
        &mut self,
        code: u32,
        data: &[u8],
        refusal: &mut Option<(u32, String)>,
        mut each: impl FnMut(u32, &[u8]) -> io::Result<()>,
    ) -> io::Result<bool> {
        let len = u32::try_from(data.len()).map_err(|_| proto_err("option too long"))?;
        self.w.write_all(&proto::IHAVEOPT.to_be_bytes())?;
        self.w.write_all(&code.to_be_bytes())?;
        self.w.write_all(&len.to_be_bytes())?;
        self.w.write_all(data)?;
        self.w.flush()?;
        for _ in 0..MAX_OPTION_REPLIES {
            let mut h = [0u8; 20];
            self.r.read_exact(&mut h)?;
            let mut c = proto::Cursor::new(&h);
            let (magic, option, kind, len) = (c.u64(), c.u32(), c.u32(), c.u32());
            let (Some(proto::OPT_REPLY_MAGIC), Some(option), Some(kind), Some(len)) =
                (magic, option, kind, len)
            else {
                return Err(proto_err("bad option reply magic"));
            };
            if option != code {
                return Err(proto_err("NBD server answered another option"));
            }
            if len > proto::MAX_OPTION_LEN {
                return Err(proto_err("option reply too long"));
            }
            let mut payload = vec![0u8; len as usize];
            self.r.read_exact(&mut payload)?;
            match kind {
                rep::ACK => return Ok(true),
                k if k & 0x8000_0000 != 0 => {
                    *refusal = Some((k, String::from_utf8_lossy(&payload).into_owned()));
                    return Ok(false);
                }
                k => each(k, &payload)?,
            }
        }
        Err(proto_err("NBD server sent too many option replies"))
    }

    fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let req = Request {
            flags,
            kind,
            cookie,
            offset,
            len,
        };
        self.w.write_all(&req.encode())?;
        self.w.write_all(data)?;
        Ok(cookie)
    }

    /// Runs `ops`, up to [`WINDOW`] in flight at once, and waits for every reply: `Ok(None)`
    /// when all succeeded, `Ok(Some(errno))` with the first error the server reported for any of
    /// them, `Err` when the connection failed or the server broke the protocol.
    pub(crate) fn pipeline<'a>(
        &mut self,
        ops: impl IntoIterator<Item = Op<'a>>,
    ) -> io::Result<Option<u32>> {
        let mut queue = ops.into_iter();
        let mut flight: Vec<InFlight<'a>> = Vec::with_capacity(WINDOW);
        let mut first_err = None;
        loop {
            while flight.len() < WINDOW {
                let Some(op) = queue.next() else { break };
                let cookie = self.send(op.kind, op.flags, op.offset, op.len, op.payload)?;
                flight.push(InFlight {
                    cookie,
                    op,
                    cover: Coverage::default(),
                    error: None,
                });
            }
            self.w.flush()?;
            if flight.is_empty() {
                return Ok(first_err);
            }
            if let Some(done) = self.receive(&mut flight)? {
                first_err = first_err.or(done);
            }
        }
    }

    /// Reads one reply message (a simple reply or one chunk) for a request in `flight`; when it
    /// completes that request, removes it and returns `Some(its error)`.
    fn receive(&mut self, flight: &mut Vec<InFlight<'_>>) -> io::Result<Option<Option<u32>>> {
        let mut m = [0u8; 4];
        self.r.read_exact(&mut m)?;
        let find = |flight: &Vec<InFlight<'_>>, cookie: u64| {
            flight
                .iter()
                .position(|f| f.cookie == cookie)
                .ok_or_else(|| proto_err("NBD server replied to a request never sent"))
        };
        match u32::from_be_bytes(m) {
            proto::SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.r.read_exact(&mut h)?;
                let err = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                let cookie = u64::from_be_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
                let i = find(flight, cookie)?;
                let f = &mut flight[i];
                if let Target::Read(buf) = &mut f.op.target {
                    if self.structured && err == 0 {
                        return Err(proto_err("NBD server sent a simple reply to a read"));
                    }
                    if err == 0 {
                        self.r.read_exact(buf)?;
                    }
                }
                let f = flight.swap_remove(i);
                Ok(Some(f.error.or((err != 0).then_some(err))))
            }
            proto::STRUCTURED_REPLY_MAGIC if self.structured => {
                let mut h = [0u8; 16];
                self.r.read_exact(&mut h)?;
                let mut c = proto::Cursor::new(&h);
                let (Some(flags), Some(kind), Some(cookie), Some(len)) =
                    (c.u16(), c.u16(), c.u64(), c.u32())
                else {
                    return Err(proto_err("short chunk header"));
                };
                let i = find(flight, cookie)?;
                self.chunk(&mut flight[i], kind, len)?;
                if flags & chunk::FLAG_DONE == 0 {
                    return Ok(None);
                }
                let f = flight.swap_remove(i);
                if let Target::Read(buf) = &f.op.target {
                    if f.error.is_none() && !f.cover.is_full(buf.len() as u64) {
                        return Err(proto_err("NBD server left part of a read unanswered"));
                    }
                }
                Ok(Some(f.error))
            }
            _ => Err(proto_err("bad NBD reply magic")),
        }
    }

    /// Reads the payload of one structured chunk of `len` bytes into the request it answers.
    fn chunk(&mut self, f: &mut InFlight<'_>, kind: u16, len: u32) -> io::Result<()> {
        let (req_off, req_len) = (f.op.offset, u64::from(f.op.len));
        match (kind, &mut f.op.target) {
            (chunk::NONE, _) if len == 0 => Ok(()),
            (chunk::OFFSET_DATA, Target::Read(buf)) => {
                let mut o = [0u8; 8];
                let n = u64::from(len)
                    .checked_sub(8)
                    .ok_or_else(|| proto_err("NBD server sent a short data chunk"))?;
                self.r.read_exact(&mut o)?;
                let range = f.cover.claim(req_off, req_len, u64::from_be_bytes(o), n)?;
                self.r.read_exact(&mut buf[range])
            }
            (chunk::OFFSET_HOLE, Target::Read(buf)) => {
                let p = self.meta_payload(len)?;
                let (o, n) = parse_hole(&p)?;
                let range = f.cover.claim(req_off, req_len, o, n)?;
                buf[range].fill(0);
                Ok(())
            }
            (chunk::BLOCK_STATUS, Target::Extents(ext)) => {
                let Some(n) = len.checked_sub(4).filter(|n| n % 8 == 0 && *n > 0) else {
                    return Err(proto_err(
                        "NBD server sent a block status chunk of the wrong size",
                    ));
                };
                let mut id = [0u8; 4];
                self.r.read_exact(&mut id)?;
                if Some(u32::from_be_bytes(id)) != self.alloc_ctx {
                    return Err(proto_err(
                        "NBD server sent status of a context never asked for",
                    ));
                }
                // Extents are read one at a time: the count is the server's to choose.
                for _ in 0..n / 8 {
                    let mut e = [0u8; 8];
                    self.r.read_exact(&mut e)?;
                    let elen = u32::from_be_bytes([e[0], e[1], e[2], e[3]]);
                    let eflags = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                    ext.push(elen, eflags, req_len)?;
                }
                Ok(())
            }
            (k, _) if k & 0x8000 != 0 => {
                let p = self.meta_payload(len)?;
                let (err, offset) = if k == CHUNK_ERROR_OFFSET {
                    parse_error(&p, true)?
                } else if k == chunk::ERROR {
                    parse_error(&p, false)?
                } else {
                    // An error type this client does not know is still an error (the
                    // protocol's rule); its payload is read and ignored.
                    (proto::errno::EIO, None)
                };
                if let Some(o) = offset {
                    let inside = o.checked_sub(req_off).is_some_and(|d| d < req_len.max(1));
                    if !inside {
                        return Err(proto_err(
                            "NBD server named an error offset outside the request",
                        ));
                    }
                }
                f.error.get_or_insert(err);
                Ok(())
            }
            _ => Err(proto_err(format!(
                "NBD server sent an unexpected chunk (type {kind})"
            ))),
        }
    }

    /// Reads a chunk payload that carries no read data, refusing one longer than such a payload
    /// can be.
    fn meta_payload(&mut self, len: u32) -> io::Result<Vec<u8>> {
        if len > MAX_META_CHUNK {
            return Err(proto_err("NBD server sent an oversized chunk"));
        }
        let mut p = vec![0u8; len as usize];
        self.r.read_exact(&mut p)?;
        Ok(p)
    }
}
