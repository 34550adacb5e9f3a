//! Shared by the NBD tests: images made by qemu-img, our server in a thread, qemu-nbd in a
//! child process, and QEMU's tools run as clients. Each test file uses a part of them.
#![allow(dead_code)]

use qcow2kit::chain::{open, OpenOptions, Opened};
use qcow2kit::nbd::{Export, Listener, Server, ShutdownHandle};
use qcow2kit::Format;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Runs a program; `(success, stdout, stderr)`. A program that cannot start fails the test.
pub(crate) fn run(prog: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs a program that must succeed; its stdout.
pub(crate) fn ok(prog: &str, args: &[&str]) -> String {
    let (good, out, err) = run(prog, args);
    assert!(good, "{prog} {args:?} failed:\n{out}\n{err}");
    out
}

/// qemu-io's output without its timing lines.
pub(crate) fn untimed(s: &str) -> String {
    s.lines()
        .filter(|l| !l.contains("ops/sec"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A 64 MiB qcow2 image with data, a zero range and a hole, written by qemu-io.
pub(crate) fn make_image(path: &Path) {
    let p = path.to_str().expect("utf-8 path");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", p, "64M"]);
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -z 2M 1M",
            "-c",
            "write -P 0xcd 10M 64k",
            "-c",
            "write -P 0x5a 33M 3M",
            p,
        ],
    );
}

/// `nbd+unix` URI of export `name` on socket `sock`.
pub(crate) fn unix_uri(name: &str, sock: &Path) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// Waits until something accepts connections on the Unix socket `sock`.
pub(crate) fn wait_for_socket(sock: &Path) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no server on {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Our server in a thread, exporting an image opened writable (or read-only) as `name`.
pub(crate) struct Ours {
    handle: ShutdownHandle,
    thread: Option<JoinHandle<qcow2kit::Result<()>>>,
    image: Option<Opened>,
    /// The TCP port, for TCP listeners.
    pub(crate) port: Option<u16>,
}

impl Ours {
    /// Serves `img` (qcow2) as `name` on `listener`, persistent, any number of clients;
    /// `tune` adjusts the export.
    pub(crate) fn start(
        img: &Path,
        name: &str,
        listener: Listener,
        read_only: bool,
        tune: impl FnOnce(&mut Export),
    ) -> Ours {
        let opts = OpenOptions {
            writable: !read_only,
            ..OpenOptions::qemu_compatible()
        };
        let image = open(img, Format::Qcow2, &opts).expect("open image");
        let mut export = Export::new(name, image.device.clone(), read_only);
        tune(&mut export);
        let port = listener.local_port();
        let server = Server::new(vec![Arc::new(export)], listener)
            .max_clients(0)
            .persistent(true);
        let handle = server.shutdown_handle();
        let thread = Some(std::thread::spawn(move || server.run()));
        Ours {
            handle,
            thread,
            image: Some(image),
            port,
        }
    }

    /// Serves on a new Unix socket `sock`.
    pub(crate) fn unix(img: &Path, name: &str, sock: &Path, read_only: bool) -> Ours {
        let l = Listener::bind_unix(sock).expect("bind unix socket");
        Ours::start(img, name, l, read_only, |_| {})
    }

    /// Stops the server and closes the image; both must succeed.
    pub(crate) fn stop(mut self) {
        self.handle.shutdown();
        let t = self.thread.take().expect("running");
        t.join().expect("server thread").expect("server run");
        self.image
            .take()
            .expect("open")
            .close()
            .expect("close image");
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// qemu-nbd serving `img` as `name` on Unix socket `sock` (persistent, shared).
pub(crate) struct QemuNbd(Child);

impl QemuNbd {
    pub(crate) fn unix(img: &Path, fmt: &str, name: &str, sock: &Path, extra: &[&str]) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args(["-f", fmt, "-t", "-e", "0", "-x", name, "-k"])
            .arg(sock)
            .args(extra)
            .arg(img)
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd runs");
        wait_for_socket(sock);
        QemuNbd(child)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // SIGTERM: qemu-nbd flushes and closes the image.
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// `qemu-img check` of a qcow2 image must find nothing.
pub(crate) fn assert_clean(img: &Path) {
    let out = ok(
        "qemu-img",
        &["check", "-f", "qcow2", img.to_str().expect("utf-8")],
    );
    assert!(out.contains("No errors were found"), "{out}");
}

/// A fresh temporary directory.
pub(crate) fn tmp() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path().to_path_buf();
    (d, p)
}
