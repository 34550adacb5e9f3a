//! Hostile and broken NBD clients, scripted on a raw socket: each gets the protocol's error or
//! loses its connection, the server keeps serving everyone else, and the image stays clean.

#[path = "support/nbd_helpers.rs"]
mod nbd_helpers;

use nbd_helpers::*;
#[path = "support/nbd_wire.rs"]
mod proto;

use proto::{cmd, errno, opt, rep, Request};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

fn connect(sock: &Path) -> UnixStream {
    let s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    s
}

fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).expect("send option");
}

/// Reads one option reply: `(type, payload)`.
fn option_reply(s: &mut UnixStream) -> (u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("option reply");
    assert_eq!(&h[..8], &proto::OPT_REPLY_MAGIC.to_be_bytes());
    let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
    let mut p = vec![0u8; len as usize];
    s.read_exact(&mut p).expect("payload");
    (kind, p)
}

/// Handshake up to transmission with simple replies on export `name`.
fn go(sock: &Path, name: &str) -> UnixStream {
    let mut s = connect(sock);
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("hello");
    assert_eq!(&hello[..8], &proto::NBD_MAGIC.to_be_bytes());
    s.write_all(&3u32.to_be_bytes()).expect("flags");
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    send_option(&mut s, opt::GO, &d);
    loop {
        let (kind, _) = option_reply(&mut s);
        if kind == rep::ACK {
            return s;
        }
        assert_eq!(kind, rep::INFO);
    }
}

fn request(s: &mut UnixStream, kind: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
    let r = Request {
        flags: 0,
        kind,
        cookie,
        offset,
        len,
    };
    s.write_all(&r.encode()).expect("request");
    s.write_all(payload).expect("payload");
}

/// A simple reply: `(cookie, error)`.
fn reply(s: &mut UnixStream) -> (u64, u32) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).expect("reply");
    assert_eq!(&h[..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    let err = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let mut c = [0u8; 8];
    c.copy_from_slice(&h[8..16]);
    (u64::from_be_bytes(c), err)
}

/// The peer closed the connection (reads end) within the timeout.
fn assert_dropped(s: &mut UnixStream) {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("connection not dropped: {e}"),
        }
    }
}

/// A well-behaved client still gets served.
fn assert_serving(sock: &Path) {
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0xab 0 64k",
            &unix_uri("disk", sock),
        ],
    );
    assert!(out.contains("read 65536/65536"), "{out}");
}

#[test]
fn malformed_handshakes_lose_their_connection_only() {
    let (_d, dir) = tmp();
    let img = dir.join("a.qcow2");
    make_image(&img);
    let sock = dir.join("s");
    let ours = Ours::unix(&img, "disk", &sock, false);

    // Unknown client flags.
    let mut s = connect(&sock);
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("hello");
    s.write_all(&0xffff_ffffu32.to_be_bytes()).expect("flags");
    assert_dropped(&mut s);

    // A bad option magic.
    let mut s = connect(&sock);
    s.read_exact(&mut hello).expect("hello");
    s.write_all(&1u32.to_be_bytes()).expect("flags");
    s.write_all(&[0x55u8; 16]).expect("garbage");
    assert_dropped(&mut s);

    // An option claiming 4 GiB of data is drained, not buffered, and refused; a GO whose name
    // length runs past its data is invalid; an unknown option unsupported; the client can
    // still go on.
    let mut s = connect(&sock);
    s.read_exact(&mut hello).expect("hello");
    s.write_all(&1u32.to_be_bytes()).expect("flags");
    let mut h = proto::IHAVEOPT.to_be_bytes().to_vec();
    h.extend_from_slice(&opt::LIST.to_be_bytes());
    h.extend_from_slice(&(1u32 << 20).to_be_bytes());
    s.write_all(&h).expect("header");
    s.write_all(&vec![0u8; 1 << 20]).expect("body");
    assert_eq!(option_reply(&mut s).0, rep::ERR_TOO_BIG);
    send_option(&mut s, opt::GO, &[0, 0, 0, 200, b'd']);
    assert_eq!(option_reply(&mut s).0, rep::ERR_INVALID);
    send_option(&mut s, 999, &[]);
    assert_eq!(option_reply(&mut s).0, rep::ERR_UNSUP);
    send_option(&mut s, opt::SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        option_reply(&mut s).0,
        rep::ERR_INVALID,
        "meta context before structured replies"
    );
    send_option(&mut s, opt::ABORT, &[]);
    assert_eq!(option_reply(&mut s).0, rep::ACK);

    // A client that vanishes mid-handshake.
    let mut s = connect(&sock);
    s.read_exact(&mut hello).expect("hello");
    drop(s);

    assert_serving(&sock);
    ours.stop();
    assert_clean(&img);
}

#[test]
fn bad_requests_get_protocol_errors_and_the_image_stays_clean() {
    let (_d, dir) = tmp();
    let img = dir.join("a.qcow2");
    make_image(&img);
    let sock = dir.join("s");
    let ours = Ours::unix(&img, "disk", &sock, false);
    let size = 64u64 << 20;

    let mut s = go(&sock, "disk");
    request(&mut s, cmd::READ, 1, size - 512, 1024, &[]);
    assert_eq!(reply(&mut s), (1, errno::EINVAL), "read past the end");
    request(&mut s, cmd::READ, 2, u64::MAX - 10, 512, &[]);
    assert_eq!(
        reply(&mut s),
        (2, errno::EINVAL),
        "offset + length overflows"
    );
    request(&mut s, cmd::WRITE, 3, size - 512, 1024, &[0x77u8; 1024]);
    assert_eq!(reply(&mut s), (3, errno::ENOSPC), "write past the end");
    request(&mut s, cmd::WRITE_ZEROES, 4, size, 512, &[]);
    assert_eq!(reply(&mut s), (4, errno::ENOSPC), "zero write past the end");
    request(&mut s, cmd::READ, 5, 0, (32 << 20) + 1, &[]);
    assert_eq!(
        reply(&mut s),
        (5, errno::EINVAL),
        "read over the 32 MiB cap"
    );
    request(&mut s, 77, 6, 0, 0, &[]);
    assert_eq!(reply(&mut s), (6, errno::EINVAL), "unknown command");
    request(&mut s, cmd::BLOCK_STATUS, 7, 0, 4096, &[]);
    assert_eq!(
        reply(&mut s),
        (7, errno::EINVAL),
        "block status without a context"
    );
    let r = Request {
        flags: 0x8000,
        kind: cmd::READ,
        cookie: 8,
        offset: 0,
        len: 512,
    };
    s.write_all(&r.encode()).expect("request");
    assert_eq!(reply(&mut s), (8, errno::EINVAL), "unknown flag");
    // The connection is still in step: a good read works.
    request(&mut s, cmd::READ, 9, 0, 512, &[]);
    assert_eq!(reply(&mut s), (9, 0));
    let mut data = [0u8; 512];
    s.read_exact(&mut data).expect("data");
    assert_eq!(data, [0xab; 512]);
    // An oversized write: answered, then the connection is dropped (its payload is not read).
    request(&mut s, cmd::WRITE, 10, 0, u32::MAX, &[]);
    assert_eq!(reply(&mut s), (10, errno::EINVAL));
    assert_dropped(&mut s);

    // Disconnect in the middle of a write's payload.
    let mut s = go(&sock, "disk");
    request(&mut s, cmd::WRITE, 1, 20 << 20, 1 << 20, &[0x99u8; 1000]);
    drop(s);
    // A bad request magic.
    let mut s = go(&sock, "disk");
    s.write_all(&[0u8; 28]).expect("garbage");
    assert_dropped(&mut s);

    assert_serving(&sock);
    ours.stop();
    assert_clean(&img);
    // Nothing from the refused or torn writes reached the image.
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0 20M 1M",
            "-c",
            "read -P 0 63M 1M",
            img.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.matches("read 1048576/1048576").count(), 2, "{out}");
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let (_d, dir) = tmp();
    let img = dir.join("a.qcow2");
    make_image(&img);
    let before = std::fs::read(&img).expect("image");
    let sock = dir.join("s");
    let ours = Ours::unix(&img, "disk", &sock, true);
    let mut s = go(&sock, "disk");
    request(&mut s, cmd::WRITE, 1, 0, 4096, &[1u8; 4096]);
    assert_eq!(reply(&mut s), (1, errno::EPERM));
    request(&mut s, cmd::WRITE_ZEROES, 2, 0, 4096, &[]);
    assert_eq!(reply(&mut s), (2, errno::EPERM));
    request(&mut s, cmd::TRIM, 3, 0, 4096, &[]);
    assert_eq!(reply(&mut s), (3, errno::EPERM));
    request(&mut s, cmd::FLUSH, 4, 0, 0, &[]);
    assert_eq!(reply(&mut s), (4, 0));
    drop(s);
    ours.stop();
    assert!(
        std::fs::read(&img).expect("image") == before,
        "a read-only export changed the file"
    );
}

#[test]
fn a_client_that_never_reads_its_replies_does_not_stop_the_others() {
    let (_d, dir) = tmp();
    let img = dir.join("a.qcow2");
    make_image(&img);
    let sock = dir.join("s");
    let ours = Ours::unix(&img, "disk", &sock, false);
    let mut s = go(&sock, "disk");
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // 2 GiB of reads requested; the replies are never read. The server must block on its
    // budget, not buffer them: our writes of requests stall once it stops reading them.
    let mut sent = 0u64;
    for i in 0..64u64 {
        let r = Request {
            flags: 0,
            kind: cmd::READ,
            cookie: i,
            offset: 0,
            len: 32 << 20,
        };
        if s.write_all(&r.encode()).is_err() {
            break;
        }
        sent += 1;
    }
    assert!(sent > 0);
    assert_serving(&sock);
    drop(s);
    ours.stop();
    assert_clean(&img);
}

#[test]
fn a_silent_client_loses_its_place_after_the_handshake_limit() {
    use qcow2kit::chain::{open, OpenOptions};
    use qcow2kit::nbd::{Export, Listener, Server};
    use qcow2kit::Format;
    let (_d, dir) = tmp();
    let img = dir.join("a.qcow2");
    make_image(&img);
    let sock = dir.join("s");
    let image = open(&img, Format::Qcow2, &OpenOptions::default()).expect("open");
    let export = Export::new("disk", image.device.clone(), true);
    // One client at a time (qemu-nbd's default): a client that connects and says nothing
    // must not keep everyone else out.
    let server = Server::new(
        vec![std::sync::Arc::new(export)],
        Listener::bind_unix(&sock).expect("bind"),
    )
    .max_clients(1)
    .persistent(true)
    .handshake_limit(Some(Duration::from_secs(1)));
    let handle = server.shutdown_handle();
    let t = std::thread::spawn(move || server.run());
    let mut silent = connect(&sock);
    let mut hello = [0u8; 18];
    silent.read_exact(&mut hello).expect("hello");
    let mut client = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0xab 0 64k",
            &unix_uri("disk", &sock),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = client.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > Duration::from_secs(15) {
            let _ = client.kill();
            panic!("a silent client kept the only place");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    assert_dropped(&mut silent);
    handle.shutdown();
    t.join().expect("server thread").expect("server");
}
