//! Shared by the library's and the CLI's locking tests: the images they lock, and a process
//! that holds an image open (and so locked) until dropped, qemu-io or `qcow2kit io` reading
//! commands from a pipe.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Makes, with qemu-img in `dir`: `top.qcow2` over `base.qcow2`, and `dimg.qcow2` with the
/// data file `data.raw` (1 MiB each).
pub(crate) fn make_images(dir: &Path) {
    let backing = "-bbase.qcow2";
    let data = "-odata_file=data.raw";
    for (name, extra) in [
        ("base.qcow2", ""),
        ("top.qcow2", backing),
        ("dimg.qcow2", data),
    ] {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2"]).current_dir(dir);
        if !extra.is_empty() {
            cmd.arg(extra);
        }
        if name == "top.qcow2" {
            cmd.args(["-F", "qcow2"]);
        }
        let out = cmd
            .args([name, "1M"])
            .output()
            .expect("qemu-img (Debian package qemu-utils, 10.x) must be installed");
        assert!(
            out.status.success(),
            "qemu-img create {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The holder process; dropping it closes its standard input, so it quits.
pub(crate) struct Held(Child);

impl Held {
    /// Starts `cmd` (an interactive qemu-io-like command on an image), asks it the image's
    /// `length` and waits for the answer: once it is there, the image is open.
    pub(crate) fn spawn(mut cmd: Command) -> Held {
        let shown = format!("{cmd:?}");
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {shown} ({e}); qemu-io must be installed"));
        let stdin = child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"length\n").expect("send");
        stdin.flush().expect("flush");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        out.read_line(&mut line).expect("holder output");
        assert!(
            line.contains("MiB"),
            "{shown} did not open the image: {line:?}"
        );
        Held(child)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}
