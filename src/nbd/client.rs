//! A [`Storage`] over an NBD export: qcow2kit opens an image file that lives behind any NBD
//! server (qemu-nbd, nbdkit, our own) as it opens a local file.
//!
//! The client negotiates the fixed newstyle handshake with `NBD_OPT_GO` and simple replies.
//! Large reads are split at the server's maximum block size and pipelined (up to [`WINDOW`]
//! requests in flight). Invariants: a reply is matched to its request by cookie, and a read's
//! data lands only in the slot of the request it answers; a reply that names no outstanding
//! request breaks the connection (every later call fails) rather than being guessed at.

use super::proto::{self, cmd, info, opt, rep, tflag, Request, MAX_PAYLOAD};
use super::uri::NbdAddress;
use super::Stream;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// Requests a read keeps in flight at once.
const WINDOW: usize = 16;

/// An NBD export as byte storage.
pub struct NbdStorage {
    uri: String,
    size: u64,
    flags: u16,
    max_payload: u32,
    conn: Mutex<ClientConn>,
}

struct ClientConn {
    r: BufReader<Box<dyn Stream>>,
    w: Box<dyn Stream>,
    next_cookie: u64,
    broken: bool,
}

impl std::fmt::Debug for NbdStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdStorage")
            .field("uri", &self.uri)
            .field("size", &self.size)
            .field("flags", &self.flags)
            .finish()
    }
}

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// The `io::Error` for an error number of the protocol.
fn errno_error(e: u32) -> io::Error {
    let os = match e {
        proto::errno::EPERM => 1,
        proto::errno::ENOMEM => 12,
        proto::errno::EINVAL => 22,
        proto::errno::ENOSPC => 28,
        proto::errno::EOVERFLOW => 75,
        proto::errno::ENOTSUP => 95,
        proto::errno::ESHUTDOWN => 108,
        _ => 5,
    };
    io::Error::from_raw_os_error(os)
}

impl NbdStorage {
    /// Connects to the export an NBD URI names. With `writable`, an export the server offers
    /// read-only is refused.
    pub fn connect(uri: &str, writable: bool) -> io::Result<Self> {
        let addr = NbdAddress::parse(uri)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let stream: Box<dyn Stream> = match &addr {
            NbdAddress::Tcp { host, port, .. } => {
                let s = std::net::TcpStream::connect((host.as_str(), *port))?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            NbdAddress::Unix { socket, .. } => Box::new(UnixStream::connect(socket)?),
        };
        let w = stream.try_clone_stream()?;
        let mut conn = ClientConn {
            r: BufReader::with_capacity(256 << 10, stream),
            w,
            next_cookie: 1,
            broken: false,
        };
        let (size, flags, max_payload) = conn.handshake(addr.name())?;
        if writable && flags & tflag::READ_ONLY != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the NBD export is read-only",
            ));
        }
        Ok(NbdStorage {
            uri: uri.to_string(),
            size,
            flags,
            max_payload,
            conn: Mutex::new(conn),
        })
    }

    /// The export's transmission flags.
    pub fn transmission_flags(&self) -> u16 {
        self.flags
    }

    fn with_conn<T>(&self, f: impl FnOnce(&mut ClientConn) -> io::Result<T>) -> io::Result<T> {
        let mut c = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if c.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "NBD connection lost",
            ));
        }
        let r = f(&mut c);
        if let Err(e) = &r {
            // Errors the server reported leave the connection in step; anything else does not.
            if e.raw_os_error().is_none() {
                c.broken = true;
            }
        }
        r
    }

    /// Sends a command without payload and waits for its reply.
    fn command(&self, kind: u16, flags: u16, offset: u64, len: u32) -> io::Result<()> {
        self.with_conn(|c| {
            let cookie = c.send(kind, flags, offset, len, &[])?;
            c.reply_for(cookie)
        })
    }
}

impl ClientConn {
    fn handshake(&mut self, name: &str) -> io::Result<(u64, u16, u32)> {
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
        let name_len = u32::try_from(name.len()).map_err(|_| proto_err("export name too long"))?;
        let mut o = proto::IHAVEOPT.to_be_bytes().to_vec();
        o.extend_from_slice(&opt::GO.to_be_bytes());
        o.extend_from_slice(&(4 + name_len + 2 + 2).to_be_bytes());
        o.extend_from_slice(&name_len.to_be_bytes());
        o.extend_from_slice(name.as_bytes());
        o.extend_from_slice(&1u16.to_be_bytes());
        o.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        self.w.write_all(&o)?;
        let mut export = None;
        let mut max_payload = MAX_PAYLOAD;
        loop {
            let mut h = [0u8; 20];
            self.r.read_exact(&mut h)?;
            let mut c = proto::Cursor::new(&h);
            let (magic, _option, kind, len) = (c.u64(), c.u32(), c.u32(), c.u32());
            if magic != Some(proto::OPT_REPLY_MAGIC) {
                return Err(proto_err("bad option reply magic"));
            }
            let (Some(kind), Some(len)) = (kind, len) else {
                return Err(proto_err("short option reply"));
            };
            if len > proto::MAX_OPTION_LEN {
                return Err(proto_err("option reply too long"));
            }
            let mut data = vec![0u8; len as usize];
            self.r.read_exact(&mut data)?;
            match kind {
                rep::ACK => break,
                rep::INFO => {
                    let mut c = proto::Cursor::new(&data);
                    match c.u16() {
                        Some(info::EXPORT) => {
                            if let (Some(size), Some(flags)) = (c.u64(), c.u16()) {
                                export = Some((size, flags));
                            }
                        }
                        Some(info::BLOCK_SIZE) => {
                            if let (Some(_min), Some(_pref), Some(max)) =
                                (c.u32(), c.u32(), c.u32())
                            {
                                max_payload = max.clamp(512, MAX_PAYLOAD);
                            }
                        }
                        _ => {}
                    }
                }
                k if k & 0x8000_0000 != 0 => {
                    let msg = String::from_utf8_lossy(&data);
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("Requested export not available ({msg})"),
                    ));
                }
                _ => {}
            }
        }
        let (size, flags) = export.ok_or_else(|| proto_err("server sent no export information"))?;
        Ok((size, flags, max_payload))
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
        if !data.is_empty() {
            self.w.write_all(data)?;
        }
        Ok(cookie)
    }

    /// Reads one simple reply header: `(cookie, error)`.
    fn reply_header(&mut self) -> io::Result<(u64, u32)> {
        let mut h = [0u8; 16];
        self.r.read_exact(&mut h)?;
        let mut c = proto::Cursor::new(&h);
        let (magic, err, cookie) = (c.u32(), c.u32(), c.u64());
        match (magic, err, cookie) {
            (Some(proto::SIMPLE_REPLY_MAGIC), Some(e), Some(k)) => Ok((k, e)),
            _ => Err(proto_err("bad NBD reply")),
        }
    }

    fn reply_for(&mut self, cookie: u64) -> io::Result<()> {
        let (k, e) = self.reply_header()?;
        if k != cookie {
            return Err(proto_err("NBD reply for an unknown request"));
        }
        if e != 0 {
            return Err(errno_error(e));
        }
        Ok(())
    }

    /// Reads `buf` from `offset` in pieces of at most `max` bytes, several in flight.
    fn read(&mut self, buf: &mut [u8], offset: u64, max: usize) -> io::Result<()> {
        let mut pieces: Vec<(u64, &mut [u8])> = Vec::new();
        let mut at = offset;
        for chunk in buf.chunks_mut(max) {
            let n = chunk.len() as u64;
            pieces.push((at, chunk));
            at += n;
        }
        let mut first_err = None;
        for window in pieces.chunks_mut(WINDOW) {
            let mut pending = Vec::with_capacity(window.len());
            for (i, (off, chunk)) in window.iter().enumerate() {
                let cookie = self.send(cmd::READ, 0, *off, chunk.len() as u32, &[])?;
                pending.push((cookie, i));
            }
            while !pending.is_empty() {
                let (cookie, e) = self.reply_header()?;
                let pos = pending
                    .iter()
                    .position(|(c, _)| *c == cookie)
                    .ok_or_else(|| proto_err("NBD reply for an unknown request"))?;
                let (_, i) = pending.swap_remove(pos);
                if e != 0 {
                    first_err.get_or_insert(errno_error(e));
                    continue;
                }
                self.r.read_exact(window[i].1)?;
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl crate::io::Storage for NbdStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Bytes past the end read as zeros (the Storage contract).
        let inside = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        let max = self.max_payload as usize;
        self.with_conn(|c| c.read(head, offset, max))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(22))?;
        if end > self.size {
            // An export cannot grow.
            return Err(io::Error::from_raw_os_error(28));
        }
        let max = self.max_payload as usize;
        self.with_conn(|c| {
            let mut at = offset;
            for piece in buf.chunks(max) {
                let cookie = c.send(cmd::WRITE, 0, at, piece.len() as u32, piece)?;
                c.reply_for(cookie)?;
                at += piece.len() as u64;
            }
            Ok(())
        })
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if len == self.size {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "an NBD export cannot be resized",
        ))
    }

    fn flush(&self) -> io::Result<()> {
        if self.flags & tflag::SEND_FLUSH == 0 {
            return Ok(());
        }
        self.command(cmd::FLUSH, 0, 0, 0)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(22))?;
        if end > self.size {
            return Err(io::Error::from_raw_os_error(28));
        }
        if self.flags & tflag::SEND_WRITE_ZEROES == 0 {
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut at = offset;
            while at < end {
                let n = (end - at).min(zeros.len() as u64) as usize;
                self.write_at(&zeros[..n], at)?;
                at += n as u64;
            }
            return Ok(());
        }
        let mut at = offset;
        while at < end {
            // A zero write's length is a u32; stay well inside it and 512-byte aligned.
            let n = (end - at).min(1 << 30) as u32;
            self.command(cmd::WRITE_ZEROES, 0, at, n)?;
            at += u64::from(n);
        }
        Ok(())
    }
}

impl Drop for NbdStorage {
    fn drop(&mut self) {
        let c = self.conn.get_mut().unwrap_or_else(|p| p.into_inner());
        if !c.broken {
            // A polite goodbye; the server copes without it.
            let _ = c.send(cmd::DISC, 0, 0, 0, &[]);
        }
        c.w.shutdown_both();
    }
}
