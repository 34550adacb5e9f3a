//! The server's side of the fixed newstyle handshake: option haggling until the client picks an
//! export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`), aborts, or misbehaves.
//!
//! Invariants: an option's payload is read into memory only up to [`MAX_OPTION_LEN`] bytes
//! (longer ones are drained and refused with `NBD_REP_ERR_TOO_BIG`); strings are capped at
//! [`proto::MAX_STRING`]; a malformed option gets `NBD_REP_ERR_INVALID`, never a panic.

use super::proto::{self, info, opt, rep, Cursor, MAX_OPTION_LEN, MAX_PAYLOAD};
use super::Export;
use std::io::{self, Read, Write};
use std::sync::Arc;

/// A meta context a client selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetaContext {
    /// `base:allocation`.
    BaseAllocation,
    /// `qemu:allocation-depth`.
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME` of the export's bitmap at this index.
    DirtyBitmap(u16),
}

impl MetaContext {
    /// The id the server gives the context (stable for the connection).
    pub(crate) fn id(self) -> u32 {
        match self {
            MetaContext::BaseAllocation => 1,
            MetaContext::AllocationDepth => 2,
            MetaContext::DirtyBitmap(i) => 3 + u32::from(i),
        }
    }

    fn name(self, export: &Export) -> String {
        match self {
            MetaContext::BaseAllocation => proto::CTX_BASE_ALLOCATION.to_string(),
            MetaContext::AllocationDepth => proto::CTX_ALLOCATION_DEPTH.to_string(),
            MetaContext::DirtyBitmap(i) => {
                let name = export.bitmaps.get(usize::from(i)).map_or("", |b| &b.name);
                format!("{}{name}", proto::CTX_DIRTY_BITMAP_PREFIX)
            }
        }
    }
}

/// What the handshake agreed on.
#[derive(Debug)]
pub(crate) struct Negotiated {
    /// The export chosen.
    pub export: Arc<Export>,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// The meta contexts selected for `NBD_CMD_BLOCK_STATUS`.
    pub contexts: Vec<MetaContext>,
}

struct Haggle<'a, S: Read + Write> {
    s: &'a mut S,
    exports: &'a [Arc<Export>],
    no_zeroes: bool,
    structured: bool,
    /// Contexts chosen by the last `SET_META_CONTEXT`, with the export they were chosen for.
    contexts: Option<(String, Vec<MetaContext>)>,
}

/// Runs the handshake on `s`. `Ok(None)`: the client aborted or went away cleanly.
pub(crate) fn negotiate<S: Read + Write>(
    s: &mut S,
    exports: &[Arc<Export>],
) -> io::Result<Option<Negotiated>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&proto::NBD_MAGIC.to_be_bytes());
    hello.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    let known = u32::from(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
    if client_flags & !known != 0 {
        return Err(invalid("client sent unknown handshake flags"));
    }
    let mut h = Haggle {
        s,
        exports,
        no_zeroes: client_flags & u32::from(proto::FLAG_NO_ZEROES) != 0,
        structured: false,
        contexts: None,
    };
    loop {
        let mut head = [0u8; 16];
        h.s.read_exact(&mut head)?;
        let mut c = Cursor::new(&head);
        let (magic, option, len) = match (c.u64(), c.u32(), c.u32()) {
            (Some(m), Some(o), Some(l)) => (m, o, l),
            _ => return Err(invalid("short option header")),
        };
        if magic != proto::IHAVEOPT {
            return Err(invalid("bad option magic"));
        }
        if len > MAX_OPTION_LEN {
            if option == opt::EXPORT_NAME {
                return Err(invalid("export name too long"));
            }
            drain(h.s, u64::from(len))?;
            h.error(option, rep::ERR_TOO_BIG, "option too long")?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        h.s.read_exact(&mut data)?;
        if let Some(done) = h.option(option, &data)? {
            return Ok(done);
        }
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Reads and discards `n` bytes with a small buffer.
pub(crate) fn drain<S: Read>(s: &mut S, n: u64) -> io::Result<()> {
    let copied = io::copy(&mut s.take(n), &mut io::sink())?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

impl<S: Read + Write> Haggle<'_, S> {
    fn reply(&mut self, option: u32, kind: u32, payload: &[u8]) -> io::Result<()> {
        let len = u32::try_from(payload.len()).map_err(|_| invalid("reply too long"))?;
        let mut b = proto::option_reply(option, kind, len).to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b)
    }

    fn error(&mut self, option: u32, kind: u32, msg: &str) -> io::Result<()> {
        self.reply(option, kind, msg.as_bytes())
    }

    fn find(&self, name: &[u8]) -> Option<Arc<Export>> {
        self.exports
            .iter()
            .find(|e| e.name.as_bytes() == name)
            .cloned()
    }

    /// Handles one option; `Some(result)` ends the handshake.
    fn option(&mut self, option: u32, data: &[u8]) -> io::Result<Option<Option<Negotiated>>> {
        match option {
            opt::ABORT => {
                // The client may already be gone; the reply is a courtesy.
                let _ = self.reply(option, rep::ACK, &[]);
                Ok(Some(None))
            }
            opt::EXPORT_NAME => {
                let Some(export) = self.find(data) else {
                    return Err(invalid("unknown export name"));
                };
                let mut b = export.device.size().to_be_bytes().to_vec();
                b.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !self.no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                self.s.write_all(&b)?;
                Ok(Some(Some(self.finish(export))))
            }
            opt::LIST => {
                if !data.is_empty() {
                    self.error(option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    return Ok(None);
                }
                for e in self.exports {
                    let mut b = (e.name.len() as u32).to_be_bytes().to_vec();
                    b.extend_from_slice(e.name.as_bytes());
                    b.extend_from_slice(e.description.as_bytes());
                    self.reply(option, rep::SERVER, &b)?;
                }
                self.reply(option, rep::ACK, &[])?;
                Ok(None)
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.error(option, rep::ERR_INVALID, "option takes no data")?;
                } else if self.structured {
                    self.error(
                        option,
                        rep::ERR_INVALID,
                        "structured reply already negotiated",
                    )?;
                } else {
                    self.structured = true;
                    self.reply(option, rep::ACK, &[])?;
                }
                Ok(None)
            }
            opt::INFO | opt::GO => self.info_or_go(option, data),
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, data)?;
                Ok(None)
            }
            opt::STARTTLS => {
                self.error(option, rep::ERR_POLICY, "TLS is not supported")?;
                Ok(None)
            }
            _ => {
                self.error(option, rep::ERR_UNSUP, "option not supported")?;
                Ok(None)
            }
        }
    }

    fn finish(&mut self, export: Arc<Export>) -> Negotiated {
        let contexts = match self.contexts.take() {
            Some((name, c)) if name == export.name => c,
            _ => Vec::new(),
        };
        Negotiated {
            export,
            structured: self.structured,
            contexts,
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> io::Result<Option<Option<Negotiated>>> {
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u16()?;
            let mut wanted = Vec::new();
            for _ in 0..n {
                wanted.push(c.u16()?);
            }
            c.is_empty().then_some((name, wanted))
        })();
        let Some((name, wanted)) = parsed else {
            self.error(option, rep::ERR_INVALID, "malformed NBD_OPT_INFO/GO")?;
            return Ok(None);
        };
        let Some(export) = self.find(name) else {
            let msg = format!("export '{}' not present", String::from_utf8_lossy(name));
            self.error(option, rep::ERR_UNKNOWN, &msg)?;
            return Ok(None);
        };
        if wanted.contains(&info::NAME) {
            let mut b = info::NAME.to_be_bytes().to_vec();
            b.extend_from_slice(export.name.as_bytes());
            self.reply(option, rep::INFO, &b)?;
        }
        if wanted.contains(&info::DESCRIPTION) && !export.description.is_empty() {
            let mut b = info::DESCRIPTION.to_be_bytes().to_vec();
            b.extend_from_slice(export.description.as_bytes());
            self.reply(option, rep::INFO, &b)?;
        }
        // Sent whether asked or not, as qemu-nbd does: any byte alignment works, 4 KiB is
        // preferred, and no request payload may exceed MAX_PAYLOAD.
        let mut b = info::BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1u32, 4096, MAX_PAYLOAD] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        self.reply(option, rep::INFO, &b)?;
        let mut b = info::EXPORT.to_be_bytes().to_vec();
        b.extend_from_slice(&export.device.size().to_be_bytes());
        b.extend_from_slice(&export.transmission_flags().to_be_bytes());
        self.reply(option, rep::INFO, &b)?;
        self.reply(option, rep::ACK, &[])?;
        if option == opt::GO {
            return Ok(Some(Some(self.finish(export))));
        }
        Ok(None)
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> io::Result<()> {
        let set = option == opt::SET_META_CONTEXT;
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string()?;
            let n = c.u32()?;
            let mut queries = Vec::new();
            for _ in 0..n {
                queries.push(c.string()?);
            }
            c.is_empty().then_some((name, queries))
        })();
        let Some((name, queries)) = parsed else {
            return self.error(option, rep::ERR_INVALID, "malformed meta context option");
        };
        if !self.structured {
            return self.error(
                option,
                rep::ERR_INVALID,
                "structured replies not negotiated",
            );
        }
        let Some(export) = self.find(name) else {
            let msg = format!("export '{}' not present", String::from_utf8_lossy(name));
            return self.error(option, rep::ERR_UNKNOWN, &msg);
        };
        let mut offered = vec![MetaContext::BaseAllocation];
        if export.allocation_depth {
            offered.push(MetaContext::AllocationDepth);
        }
        // Ids are u16 indexes: an export with more bitmaps offers the first 65536.
        let n_bitmaps = export.bitmaps.len().min(usize::from(u16::MAX) + 1);
        offered.extend((0..n_bitmaps).map(|i| MetaContext::DirtyBitmap(i as u16)));
        let mut chosen: Vec<MetaContext> = Vec::new();
        if queries.is_empty() {
            if !set {
                chosen = offered.clone();
            }
        } else {
            for q in &queries {
                for &ctx in &offered {
                    let name = ctx.name(&export);
                    let full = name.as_bytes();
                    // A list query may name a namespace ("base:", "qemu:"); a set names exactly.
                    let hit = *q == full
                        || (!set
                            && q.ends_with(b":")
                            && full.starts_with(q)
                            && q.len() < full.len());
                    if hit && !chosen.contains(&ctx) {
                        chosen.push(ctx);
                    }
                }
            }
        }
        for ctx in &chosen {
            let mut b = ctx.id().to_be_bytes().to_vec();
            b.extend_from_slice(ctx.name(&export).as_bytes());
            self.reply(option, rep::META_CONTEXT, &b)?;
        }
        if set {
            self.contexts = Some((export.name.clone(), chosen));
        }
        self.reply(option, rep::ACK, &[])
    }
}
