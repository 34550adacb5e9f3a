//! The NBD client against a scripted, hostile server: structured reply chunks out of order are
//! assembled, and chunks out of range, overlapping, oversized or incomplete, replies to requests
//! never sent and block status of the wrong context are clear errors — never a panic, a hang or
//! an allocation the server sizes. (The client against qemu-nbd and nbdkit is judged by qemu-img
//! in cli/tests/cli_nbd.rs.)

use qcow2kit::io::Storage;
use qcow2kit::nbd::NbdStorage;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread::JoinHandle;

const SIZE: u64 = 1 << 20;
const MAX_BLOCK: u32 = 64 << 10;
const CTX: u32 = 7;
const DATA: u16 = 1;
const HOLE: u16 = 2;
const STATUS: u16 = 5;
const ERROR: u16 = 0x8001;
const DONE: u16 = 1;

struct Fake {
    _dir: tempfile::TempDir,
    uri: String,
    server: JoinHandle<()>,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().expect("4 bytes"))
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().expect("8 bytes"))
}

/// The server's greeting with handshake `flags` (1: fixed newstyle, 2: no zeroes), and the
/// client's flags read.
fn greet(s: &mut UnixStream, flags: u16) {
    let mut hello = b"NBDMAGICIHAVEOPT".to_vec();
    hello.extend_from_slice(&flags.to_be_bytes());
    s.write_all(&hello).expect("hello");
    let mut cflags = [0u8; 4];
    s.read_exact(&mut cflags).expect("client flags");
}

/// Answers the client's options as a well-behaved server would: structured replies, the
/// `base:allocation` context as id [`CTX`], and a writable export of [`SIZE`] bytes taking
/// requests of at most [`MAX_BLOCK`] bytes.
fn handshake(s: &mut UnixStream) {
    greet(s, 3);
    let reply = |s: &mut UnixStream, opt: u32, kind: u32, data: &[u8]| {
        let mut h = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
        h.extend_from_slice(&opt.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&(data.len() as u32).to_be_bytes());
        h.extend_from_slice(data);
        s.write_all(&h).expect("option reply");
    };
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).expect("option");
        let opt = be32(&h[8..12]);
        let mut data = vec![0u8; be32(&h[12..16]) as usize];
        s.read_exact(&mut data).expect("option data");
        match opt {
            10 => {
                let mut m = CTX.to_be_bytes().to_vec();
                m.extend_from_slice(b"base:allocation");
                reply(s, opt, 4, &m);
            }
            7 => {
                let mut i = 0u16.to_be_bytes().to_vec();
                i.extend_from_slice(&SIZE.to_be_bytes());
                i.extend_from_slice(&(1u16 | 4).to_be_bytes());
                reply(s, opt, 3, &i);
                let mut b = 3u16.to_be_bytes().to_vec();
                for v in [1, 4096, MAX_BLOCK] {
                    b.extend_from_slice(&v.to_be_bytes());
                }
                reply(s, opt, 3, &b);
                reply(s, opt, 1, &[]);
                return;
            }
            _ => {}
        }
        reply(s, opt, 1, &[]);
    }
}

/// A request header: `(kind, cookie, offset, len)`.
fn request(s: &mut UnixStream) -> Option<(u16, u64, u64, u32)> {
    let mut h = [0u8; 28];
    s.read_exact(&mut h).ok()?;
    let kind = u16::from_be_bytes([h[6], h[7]]);
    Some((kind, be64(&h[8..16]), be64(&h[16..24]), be32(&h[24..28])))
}

fn chunk(s: &mut UnixStream, cookie: u64, flags: u16, kind: u16, payload: &[u8]) {
    chunk_claiming(s, cookie, flags, kind, payload.len() as u32, payload);
}

/// A chunk whose header claims `len` payload bytes, followed by `payload`.
fn chunk_claiming(s: &mut UnixStream, cookie: u64, flags: u16, kind: u16, len: u32, p: &[u8]) {
    let mut h = 0x668e_33efu32.to_be_bytes().to_vec();
    h.extend_from_slice(&flags.to_be_bytes());
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&cookie.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(p);
    // The client may hang up first on a reply it refuses.
    let _ = s.write_all(&h);
}

fn data(offset: u64, fill: u8, n: usize) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend(std::iter::repeat_n(fill, n));
    p
}

fn hole(offset: u64, n: u32) -> Vec<u8> {
    let mut p = offset.to_be_bytes().to_vec();
    p.extend_from_slice(&n.to_be_bytes());
    p
}

fn extents(ctx: u32, list: &[(u32, u32)]) -> Vec<u8> {
    let mut p = ctx.to_be_bytes().to_vec();
    for (n, f) in list {
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&f.to_be_bytes());
    }
    p
}

/// A server that shakes hands, then answers each request with `answer` until the client leaves.
fn fake(answer: impl Fn(&mut UnixStream, u16, u64, u64, u32) + Send + 'static) -> Fake {
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("s");
    let l = UnixListener::bind(&sock).expect("bind");
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        handshake(&mut s);
        while let Some((kind, cookie, offset, len)) = request(&mut s) {
            if kind == 2 {
                return;
            }
            answer(&mut s, kind, cookie, offset, len);
        }
    });
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    Fake {
        _dir: dir,
        uri,
        server,
    }
}

fn connect(f: &Fake) -> NbdStorage {
    NbdStorage::connect(&f.uri, false).expect("connect")
}

/// Reads 64 KiB at 4 KiB and returns the error text, asserting that the read failed as a protocol
/// error and that the connection is not used again.
fn refused(answer: impl Fn(&mut UnixStream, u16, u64, u64, u32) + Send + 'static) -> String {
    let f = fake(answer);
    let c = connect(&f);
    let mut buf = vec![0u8; 64 << 10];
    let e = c
        .read_at(&mut buf, 4096)
        .expect_err("a hostile reply must fail the read");
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    let again = c
        .read_at(&mut buf, 4096)
        .expect_err("a broken connection stays broken");
    assert_eq!(again.kind(), std::io::ErrorKind::BrokenPipe, "{again}");
    drop(c);
    f.server.join().expect("server");
    e.to_string()
}

#[test]
fn chunks_out_of_order_holes_and_block_status_are_assembled() {
    let f = fake(|s, kind, cookie, offset, len| match kind {
        0 => {
            let half = u64::from(len / 2);
            chunk(s, cookie, 0, HOLE, &hole(offset + half, len / 2));
            chunk(s, cookie, DONE, DATA, &data(offset, 0xab, half as usize));
        }
        7 => {
            assert!(u64::from(len) <= SIZE - offset);
            let p = extents(CTX, &[(4096, 0), (4096, 0), (8192, 3), (1 << 30, 0)]);
            chunk(s, cookie, DONE, STATUS, &p);
        }
        _ => panic!("unexpected request {kind}"),
    });
    let c = connect(&f);
    assert!(c.has_block_status());
    let mut buf = vec![0x55u8; 64 << 10];
    c.read_at(&mut buf, 4096).expect("read");
    assert!(buf[..32 << 10].iter().all(|&b| b == 0xab));
    assert!(buf[32 << 10..].iter().all(|&b| b == 0));
    assert_eq!(c.data_run(0).expect("status"), Some((true, 8192)));
    assert_eq!(c.data_run(8192).expect("status"), Some((false, 16384)));
    assert_eq!(c.data_run(SIZE).expect("status"), Some((false, u64::MAX)));
    drop(c);
    f.server.join().expect("server");
}

#[test]
fn overlapping_chunks_are_refused() {
    let e = refused(|s, _, cookie, offset, _| {
        chunk(s, cookie, 0, DATA, &data(offset, 1, 32 << 10));
        chunk(
            s,
            cookie,
            DONE,
            DATA,
            &data(offset + (16 << 10), 2, 48 << 10),
        );
    });
    assert!(e.contains("overlapping"), "{e}");
    let e = refused(|s, _, cookie, offset, _| {
        chunk(s, cookie, 0, HOLE, &hole(offset, 32 << 10));
        chunk(s, cookie, DONE, DATA, &data(offset, 2, 64 << 10));
    });
    assert!(e.contains("overlapping"), "{e}");
}

#[test]
fn chunks_outside_the_request_are_refused() {
    let e = refused(|s, _, cookie, offset, len| {
        chunk(
            s,
            cookie,
            DONE,
            DATA,
            &data(offset + u64::from(len) - 10, 1, 20),
        );
    });
    assert!(e.contains("past the requested range"), "{e}");
    let e = refused(|s, _, cookie, _, len| {
        chunk(s, cookie, DONE, HOLE, &hole(u64::MAX - 4, len));
    });
    assert!(e.contains("past the requested range"), "{e}");
    let e = refused(|s, _, cookie, offset, len| {
        chunk(s, cookie, DONE, HOLE, &hole(offset.wrapping_sub(1), len));
    });
    assert!(e.contains("before the requested range"), "{e}");
}

#[test]
fn oversized_and_incomplete_replies_are_refused_without_allocating() {
    // A 4 GiB error chunk: refused from its header, before any payload is read.
    let e = refused(|s, _, cookie, _, _| {
        chunk_claiming(s, cookie, DONE, ERROR, u32::MAX, &[0; 16]);
    });
    assert!(e.contains("oversized"), "{e}");
    // A data chunk claiming more bytes than the request: refused before reading them.
    let e = refused(|s, _, cookie, offset, _| {
        chunk_claiming(s, cookie, DONE, DATA, u32::MAX, &offset.to_be_bytes());
    });
    assert!(e.contains("past the requested range"), "{e}");
    let e = refused(|s, _, cookie, offset, _| {
        chunk(s, cookie, DONE, DATA, &data(offset, 1, 4096));
    });
    assert!(e.contains("unanswered"), "{e}");
    let e = refused(|s, _, cookie, offset, len| {
        chunk(s, cookie + 1000, DONE, HOLE, &hole(offset, len));
    });
    assert!(e.contains("never sent"), "{e}");
    let e = refused(|s, _, cookie, _, _| {
        let mut r = 0x6744_6698u32.to_be_bytes().to_vec();
        r.extend_from_slice(&0u32.to_be_bytes());
        r.extend_from_slice(&cookie.to_be_bytes());
        let _ = s.write_all(&r);
    });
    assert!(e.contains("simple reply"), "{e}");
}

#[test]
fn an_error_chunk_fails_the_request_and_the_connection_goes_on() {
    let f = fake(|s, _, cookie, offset, len| {
        if offset == 0 {
            let mut p = 28u32.to_be_bytes().to_vec();
            p.extend_from_slice(&4u16.to_be_bytes());
            p.extend_from_slice(b"full");
            chunk(s, cookie, 0, ERROR, &p);
            chunk(s, cookie, DONE, HOLE, &hole(offset, len));
        } else {
            chunk(s, cookie, DONE, DATA, &data(offset, 9, len as usize));
        }
    });
    let c = connect(&f);
    let mut buf = vec![0u8; 4096];
    let e = c.read_at(&mut buf, 0).expect_err("error chunk");
    assert_eq!(e.raw_os_error(), Some(28), "{e}");
    c.read_at(&mut buf, 4096)
        .expect("the connection is still in step");
    assert!(buf.iter().all(|&b| b == 9));
    drop(c);
    f.server.join().expect("server");
}

#[test]
fn block_status_of_another_context_or_empty_extents_is_refused() {
    for list in [extents(CTX + 1, &[(4096, 0)]), extents(CTX, &[(0, 0)])] {
        let f = fake(move |s, _, cookie, _, _| chunk(s, cookie, DONE, STATUS, &list));
        let c = connect(&f);
        let e = c.data_run(0).expect_err("hostile status");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        drop(c);
        f.server.join().expect("server");
    }
}

/// Writes and reads larger than the server's block size go out as several requests before the
/// first reply comes back (the server reads them all first, or fails after 10 s), and replies
/// in reverse order land in the right place.
#[test]
fn large_writes_and_reads_are_pipelined_and_matched_by_cookie() {
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("s");
    let l = UnixListener::bind(&sock).expect("bind");
    let pieces = 4usize;
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        handshake(&mut s);
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let mut seen = Vec::new();
        // Writes: all pieces arrive before any reply; the last is refused with ENOSPC.
        let mut cookies = Vec::new();
        for _ in 0..pieces {
            let (kind, cookie, offset, len) = request(&mut s).expect("pipelined write");
            assert_eq!((kind, len), (1, MAX_BLOCK));
            let mut p = vec![0u8; len as usize];
            s.read_exact(&mut p).expect("payload");
            seen.push((offset, p[0]));
            cookies.push(cookie);
        }
        for (i, c) in cookies.iter().enumerate().rev() {
            let err: u32 = if i == pieces - 1 { 28 } else { 0 };
            let mut r = 0x6744_6698u32.to_be_bytes().to_vec();
            r.extend_from_slice(&err.to_be_bytes());
            r.extend_from_slice(&c.to_be_bytes());
            s.write_all(&r).expect("reply");
        }
        // Reads: all pieces requested first, answered last to first.
        let mut reads = Vec::new();
        for _ in 0..pieces {
            let (kind, cookie, offset, len) = request(&mut s).expect("pipelined read");
            assert_eq!(kind, 0);
            reads.push((cookie, offset, len));
        }
        for &(cookie, offset, len) in reads.iter().rev() {
            let fill = (offset / u64::from(MAX_BLOCK)) as u8 + 1;
            chunk(
                &mut s,
                cookie,
                DONE,
                DATA,
                &data(offset, fill, len as usize),
            );
        }
        while request(&mut s).is_some_and(|r| r.0 != 2) {}
        seen
    });
    let c = NbdStorage::connect(&format!("nbd+unix:///?socket={}", sock.display()), true)
        .expect("connect");
    let n = pieces * MAX_BLOCK as usize;
    let buf: Vec<u8> = (0..n)
        .map(|i| (i / MAX_BLOCK as usize) as u8 + 10)
        .collect();
    let e = c.write_at(&buf, 0).expect_err("one piece refused");
    assert_eq!(e.raw_os_error(), Some(28), "{e}");
    let mut back = vec![0u8; n];
    c.read_at(&mut back, 0).expect("read after a refused write");
    for (i, piece) in back.chunks(MAX_BLOCK as usize).enumerate() {
        assert!(piece.iter().all(|&b| b == i as u8 + 1), "piece {i}");
    }
    drop(c);
    let mut seen = server.join().expect("server");
    seen.sort_unstable();
    let want: Vec<(u64, u8)> = (0..pieces)
        .map(|i| ((i as u64) * u64::from(MAX_BLOCK), i as u8 + 10))
        .collect();
    assert_eq!(seen, want);
}

/// An in-memory disk of [`SIZE`] bytes served in simple replies, refusing with `EINVAL` every
/// request not aligned to `min_block` (as a server over an `O_DIRECT` disk does). The
/// handshake is `shake`'s. Returns the disk's bytes when the client leaves.
fn memory_server(
    min_block: u32,
    shake: impl Fn(&mut UnixStream) + Send + 'static,
) -> (tempfile::TempDir, String, JoinHandle<Vec<u8>>) {
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("s");
    let l = UnixListener::bind(&sock).expect("bind");
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        shake(&mut s);
        let mut disk = vec![0u8; SIZE as usize];
        while let Some((kind, cookie, offset, len)) = request(&mut s) {
            if kind == 2 {
                break;
            }
            let (o, n) = (offset as usize, len as usize);
            let aligned = offset % u64::from(min_block) == 0 && len % min_block == 0;
            let mut payload = vec![0u8; if kind == 1 { n } else { 0 }];
            s.read_exact(&mut payload).expect("payload");
            let err: u32 = if !aligned { 22 } else { 0 };
            let mut r = 0x6744_6698u32.to_be_bytes().to_vec();
            r.extend_from_slice(&err.to_be_bytes());
            r.extend_from_slice(&cookie.to_be_bytes());
            if err == 0 {
                match kind {
                    0 => r.extend_from_slice(&disk[o..o + n]),
                    1 => disk[o..o + n].copy_from_slice(&payload),
                    6 => disk[o..o + n].fill(0),
                    _ => {}
                }
            }
            s.write_all(&r).expect("reply");
        }
        disk
    });
    (
        dir,
        format!("nbd+unix:///?socket={}", sock.display()),
        server,
    )
}

/// Option replies of a scripted handshake: `(option, kind, data)`.
fn option_reply(s: &mut UnixStream, opt: u32, kind: u32, data: &[u8]) {
    let mut h = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
    h.extend_from_slice(&opt.to_be_bytes());
    h.extend_from_slice(&kind.to_be_bytes());
    h.extend_from_slice(&(data.len() as u32).to_be_bytes());
    h.extend_from_slice(data);
    s.write_all(&h).expect("option reply");
}

/// Reads one option: `(option, data)`.
fn option(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("option");
    let mut data = vec![0u8; be32(&h[12..16]) as usize];
    s.read_exact(&mut data).expect("option data");
    (be32(&h[8..12]), data)
}

/// A server older than `NBD_OPT_GO` (it knows only `NBD_OPT_EXPORT_NAME`, and answers the
/// 124 zero bytes the client did not ask it to leave out): the client falls back, and reads and
/// writes work in simple replies.
#[test]
fn a_server_without_opt_go_is_reached_through_export_name() {
    let (_dir, uri, server) = memory_server(1, |s| {
        // Fixed newstyle only: no NO_ZEROES.
        greet(s, 1);
        loop {
            let (opt, data) = option(s);
            if opt == 1 {
                assert!(data.is_empty(), "the default export's name");
                let mut answer = SIZE.to_be_bytes().to_vec();
                answer.extend_from_slice(&(1u16 | 4).to_be_bytes());
                answer.extend_from_slice(&[0u8; 124]);
                s.write_all(&answer).expect("export");
                return;
            }
            // Every other option is unknown to this server.
            option_reply(s, opt, 0x8000_0001, &[]);
        }
    });
    let c = NbdStorage::connect(&uri, true).expect("connect through NBD_OPT_EXPORT_NAME");
    assert_eq!(c.len().expect("len"), SIZE);
    c.write_at(&[0x5a; 4096], 8192).expect("write");
    let mut back = [0u8; 4096];
    c.read_at(&mut back, 8192).expect("read");
    assert_eq!(back, [0x5a; 4096]);
    drop(c);
    let disk = server.join().expect("server");
    assert_eq!(&disk[8192..12288], &[0x5a; 4096][..]);
}

/// A server with a minimum block size of 4 KiB refuses unaligned requests: the client widens
/// reads to whole blocks and writes and zero writes by reading, patching and writing whole
/// blocks, so that an 8-byte header update of an image behind it works.
#[test]
fn requests_are_aligned_to_the_servers_minimum_block_size() {
    let (_dir, uri, server) = memory_server(4096, |s| {
        greet(s, 3);
        loop {
            let (opt, _) = option(s);
            if opt == 7 {
                let mut i = 0u16.to_be_bytes().to_vec();
                i.extend_from_slice(&SIZE.to_be_bytes());
                // Read-write, flush, write zeroes.
                i.extend_from_slice(&(1u16 | 4 | 64).to_be_bytes());
                option_reply(s, opt, 3, &i);
                let mut b = 3u16.to_be_bytes().to_vec();
                for v in [4096u32, 4096, MAX_BLOCK] {
                    b.extend_from_slice(&v.to_be_bytes());
                }
                option_reply(s, opt, 3, &b);
                option_reply(s, opt, 1, &[]);
                return;
            }
            // No structured replies, no meta contexts: simple replies only.
            option_reply(s, opt, 0x8000_0001, &[]);
        }
    });
    let c = NbdStorage::connect(&uri, true).expect("connect");
    c.write_at(&[0x11; 20000], 0).expect("unaligned length");
    c.write_at(b"8 bytes!", 100).expect("8 bytes at 100");
    c.write_at(&[0x22; 5000], 4000)
        .expect("across a block boundary");
    c.punch_hole(10_000, 6000).expect("unaligned zero write");
    let mut b = [0u8; 8];
    c.read_at(&mut b, 100).expect("unaligned read");
    assert_eq!(&b, b"8 bytes!");
    let mut all = vec![0u8; 20000];
    c.read_at(&mut all, 0).expect("read back");
    let mut want = vec![0x11u8; 20000];
    want[100..108].copy_from_slice(b"8 bytes!");
    want[4000..9000].fill(0x22);
    want[10_000..16_000].fill(0);
    assert!(all == want, "unaligned requests must land as asked");
    drop(c);
    let disk = server.join().expect("server");
    assert!(disk[..20000] == want[..]);
}
