//! `qcow2kit nbd` side by side with qemu-nbd (errors, exit statuses, serving, --fork,
//! --pid-file, one client unless -t), and qcow2kit opening images behind NBD servers
//! (qemu-nbd and nbdkit exporting qcow2 files as raw bytes) as it opens local ones.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_qcow2kit");

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn run(prog: &str, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

fn ok(prog: &str, args: &[&str]) -> String {
    let o = run(prog, args);
    assert!(o.status.success(), "{prog} {args:?}: {}", out(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn make_image(p: &Path) {
    make(
        p,
        "qcow2",
        "32M",
        &[
            "write -P 0xab 0 1M",
            "write -z 2M 1M",
            "write -P 0xcd 10M 64k",
        ],
    );
}

/// Creates a `size` image of format `fmt` at `p` and runs the qemu-io `commands` on it.
fn make(p: &Path, fmt: &str, size: &str, commands: &[&str]) {
    let p = p.to_str().expect("utf-8");
    ok("qemu-img", &["create", "-q", "-f", fmt, p, size]);
    let mut args = vec!["-f", fmt];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(p);
    ok("qemu-io", &args);
}

fn wait_for_socket(sock: &Path) {
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no socket {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "server did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn errors_match_qemu_nbd() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("a.qcow2");
    make_image(&img);
    let ip = img.to_str().expect("utf-8");
    // Installed under qemu-nbd's name, it is qemu-nbd: the same words and statuses.
    let alias = dir.path().join("qemu-nbd");
    std::os::unix::fs::symlink(BIN, &alias).expect("symlink");
    let alias = alias.to_str().expect("utf-8");
    let cases: &[&[&str]] = &[
        &["/nonexistent/x.qcow2"],
        &[],
        &["a", "b"],
        &["-e", "-1", ip],
        &["--discard=foo", ip],
        &["-f", "vmdk2", ip],
        &["-f", "qcow2", "/etc/passwd"],
    ];
    for args in cases {
        let theirs = run("qemu-nbd", args);
        let mine = run(alias, args);
        assert_eq!(out(&mine), out(&theirs), "qemu-nbd {args:?}");
        assert_eq!(
            mine.status.code(),
            theirs.status.code(),
            "qemu-nbd {args:?}"
        );
    }
    let help = ok(BIN, &["nbd", "--help"]);
    assert!(
        help.contains("TLS") && help.contains("Not supported"),
        "{help}"
    );
    let o = run(BIN, &["nbd", "--tls-creds=tls0", ip]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(out(&o), "qcow2kit: TLS is not supported\n");
}

#[test]
fn serves_one_client_then_exits_and_the_image_is_clean() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("a.qcow2");
    make_image(&img);
    let sock = dir.path().join("s");
    let mut server = Command::new(BIN)
        .args(["nbd", "-f", "qcow2", "-k"])
        .arg(&sock)
        .arg(&img)
        .spawn()
        .expect("server");
    wait_for_socket(&sock);
    let o = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x42 4M 1M",
            "-c",
            "read -P 0xab 0 1M",
            &uri(&sock),
        ],
    );
    assert!(
        o.contains("wrote 1048576/1048576") && o.contains("read 1048576/1048576"),
        "{o}"
    );
    // Without -t the server ends with its first client, flushing and closing the image.
    assert!(wait_exit(&mut server).success());
    assert!(!sock.exists(), "socket left behind");
    let c = ok("qemu-img", &["check", img.to_str().expect("utf-8")]);
    assert!(c.contains("No errors were found"), "{c}");
    let r = ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x42 4M 1M",
            img.to_str().expect("utf-8"),
        ],
    );
    assert!(r.contains("read 1048576/1048576"), "{r}");
}

#[test]
fn fork_pid_file_tcp_and_sigterm() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("a.qcow2");
    make_image(&img);
    let pid_file = dir.path().join("pid");
    // A free port: bind port 0, note it, let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
        .to_string();
    let o = run(
        BIN,
        &[
            "nbd",
            "--fork",
            "-t",
            "-e",
            "2",
            "-x",
            "d",
            "-p",
            &port,
            "--pid-file",
            pid_file.to_str().expect("utf-8"),
            img.to_str().expect("utf-8"),
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    let pid = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .to_string();
    let u = format!("nbd://127.0.0.1:{port}/d");
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0x17 8M 64k", &u]);
    // -t: still there after the first client.
    let o = ok("qemu-io", &["-f", "raw", "-c", "read -P 0x17 8M 64k", &u]);
    assert!(o.contains("read 65536/65536"), "{o}");
    ok("kill", &["-TERM", &pid]);
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "server ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = ok("qemu-img", &["check", img.to_str().expect("utf-8")]);
    assert!(c.contains("No errors were found"), "{c}");
}

/// A qcow2 image exported as raw bytes by an NBD server that is not ours.
struct Foreign(Child, PathBuf);

impl Foreign {
    fn qemu_nbd(img: &Path, sock: &Path) -> Foreign {
        let c = Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-e", "0", "-k"])
            .arg(sock)
            .arg(img)
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        wait_for_socket(sock);
        Foreign(c, sock.to_path_buf())
    }

    fn nbdkit_file(img: &Path, sock: &Path) -> Foreign {
        Foreign::nbdkit_file_with(img, sock, &[])
    }

    /// nbdkit's file plugin with extra server options `opts`.
    fn nbdkit_file_with(img: &Path, sock: &Path, opts: &[&str]) -> Foreign {
        let c = Command::new("nbdkit")
            .args(opts)
            .args(["-f", "-U"])
            .arg(sock)
            .arg("file")
            .arg(img)
            .spawn()
            .expect("nbdkit");
        wait_for_socket(sock);
        Foreign(c, sock.to_path_buf())
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

#[test]
fn client_reads_and_writes_qcow2_behind_qemu_nbd_and_nbdkit() {
    let dir = tempfile::tempdir().expect("tmp");
    for (i, server) in ["qemu-nbd", "nbdkit"].into_iter().enumerate() {
        let img = dir.path().join(format!("a{i}.qcow2"));
        make_image(&img);
        let ip = img.to_str().expect("utf-8");
        let local_map = ok(BIN, &["map", "-f", "qcow2", "--output=json", ip]);
        let local_raw = dir.path().join(format!("local{i}.raw"));
        ok(
            BIN,
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                ip,
                local_raw.to_str().expect("utf-8"),
            ],
        );
        // An export cannot grow: room for new clusters is made before it is served.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .expect("image");
        f.set_len(f.metadata().expect("meta").len() + (8 << 20))
            .expect("pad");
        drop(f);
        let sock = dir.path().join(format!("s{i}"));
        let f = match server {
            "qemu-nbd" => Foreign::qemu_nbd(&img, &sock),
            _ => Foreign::nbdkit_file(&img, &sock),
        };
        let u = uri(&sock);
        let info = ok(BIN, &["info", "--output=json", &u]);
        let j: serde_json::Value = serde_json::from_str(&info).expect("json");
        assert_eq!(j["format"], "qcow2", "{server}: probed over the wire");
        assert_eq!(j["virtual-size"], serde_json::json!(32 << 20), "{server}");
        assert_eq!(
            ok(BIN, &["map", "-f", "qcow2", "--output=json", &u]),
            local_map,
            "{server}"
        );
        let c = ok(BIN, &["check", "-f", "qcow2", &u]);
        assert!(c.contains("No errors were found"), "{server}: {c}");
        let remote_raw = dir.path().join(format!("remote{i}.raw"));
        ok(
            BIN,
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                &u,
                remote_raw.to_str().expect("utf-8"),
            ],
        );
        assert!(
            std::fs::read(&remote_raw).expect("r") == std::fs::read(&local_raw).expect("l"),
            "{server}"
        );
        // Writes through the wire, with cluster allocation, judged by qemu-img check.
        let w = ok(
            BIN,
            &[
                "io",
                "-f",
                "qcow2",
                "-c",
                "write -P 0x61 20M 1M",
                "-c",
                "write -z 0 64k",
                &u,
            ],
        );
        assert!(w.contains("wrote 1048576/1048576"), "{server}: {w}");
        drop(f);
        let c = ok("qemu-img", &["check", ip]);
        assert!(c.contains("No errors were found"), "{server}: {c}");
        let r = ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "read -P 0x61 20M 1M",
                "-c",
                "read -P 0 0 64k",
                ip,
            ],
        );
        assert_eq!(r.matches("read ").count(), 2, "{server}: {r}");
        assert!(!r.contains("failed"), "{server}: {r}");
    }
}

/// Sets the in-use flag of the first bitmap in `img`'s bitmap directory, as a writer that died
/// before closing the image leaves it.
fn flag_first_bitmap_in_use(img: &Path) {
    let mut d = std::fs::read(img).expect("read image");
    let be32 = |d: &[u8], o: usize| u32::from_be_bytes(d[o..o + 4].try_into().expect("4"));
    let mut o = be32(&d, 100) as usize;
    let dir = loop {
        let (magic, len) = (be32(&d, o), be32(&d, o + 4) as usize);
        assert_ne!(magic, 0, "no bitmap extension");
        if magic == 0x2385_2875 {
            break u64::from_be_bytes(d[o + 24..o + 32].try_into().expect("8")) as usize;
        }
        o += 8 + len.div_ceil(8) * 8;
    };
    d[dir + 15] |= 1;
    std::fs::write(img, d).expect("write image");
}

/// Starts `prog` (qemu-nbd or qcow2kit under that name) serving `img` persistently on `sock`.
fn serve_persistent(prog: &str, args: &[&str], sock: &Path, img: &Path) -> Child {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(prog)
        .args(args)
        .args(["-t", "-f", "qcow2", "-k"])
        .arg(sock)
        .arg(img)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("server");
    wait_for_socket(sock);
    child
}

fn stop(mut child: Child) {
    ok("kill", &[&child.id().to_string()]);
    wait_exit(&mut child);
}

fn bitmap_map(sock: &Path, name: &str) -> (String, String) {
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        sock.display()
    );
    let qemu = ok("qemu-img", &["map", "--output=json", "--image-opts", &opts]);
    let ctx = format!("--map=qemu:dirty-bitmap:{name}");
    (qemu, ok("nbdinfo", &[&ctx, &uri(sock)]))
}

#[test]
fn dirty_bitmaps_served_as_qemu_nbd_serves_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let img = dir.path().join("a.qcow2");
    let ip = img.to_str().expect("utf-8");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", ip, "32M"]);
    ok("qemu-img", &["bitmap", "--add", ip, "b0"]);
    ok(
        "qemu-io",
        &[
            "-c",
            "write 1M 64k",
            "-c",
            "write 10M 192k",
            "-c",
            "write 31M 1M",
            ip,
        ],
    );
    ok("qemu-img", &["bitmap", "--add", "--disable", ip, "b1"]);
    ok("qemu-io", &["-c", "write 5M 4k", ip]);
    let alias = dir.path().join("qemu-nbd");
    std::os::unix::fs::symlink(BIN, &alias).expect("symlink");
    let alias = alias.to_str().expect("utf-8");
    let sock = dir.path().join("s");

    // Read-only: both bitmaps, through qemu-img map and nbdinfo, as qemu-nbd shows them.
    let mut seen = Vec::new();
    for prog in ["qemu-nbd", alias] {
        let srv = serve_persistent(prog, &["-r", "-B", "b0", "-B", "b1"], &sock, &img);
        seen.push((bitmap_map(&sock, "b0"), bitmap_map(&sock, "b1")));
        stop(srv);
    }
    assert_eq!(seen[1], seen[0]);
    let (b0, b1) = &seen[0];
    assert!(
        b0.1.contains("10485760      196608    1  dirty"),
        "{}",
        b0.1
    );
    assert!(
        b1.1.contains("clean") && !b1.1.contains(" dirty"),
        "{}",
        b1.1
    );

    // Writable: writes through the export mark the enabled bitmap, as qemu-nbd's do.
    let mut live = Vec::new();
    for prog in ["qemu-nbd", alias] {
        let copy = dir.path().join(format!("w{}.qcow2", live.len()));
        std::fs::copy(&img, &copy).expect("copy");
        let srv = serve_persistent(prog, &["-B", "b0", "-B", "b1"], &sock, &copy);
        ok("qemu-io", &["-f", "raw", "-c", "write 20M 8k", &uri(&sock)]);
        live.push((bitmap_map(&sock, "b0"), bitmap_map(&sock, "b1")));
        stop(srv);
        let c = ok("qemu-img", &["check", copy.to_str().expect("utf-8")]);
        assert!(c.contains("No errors were found"), "{c}");
    }
    assert_eq!(live[1], live[0]);
    assert!(
        live[0].0 .1.contains("20971520       65536    1  dirty"),
        "{}",
        live[0].0 .1
    );

    // A bitmap the image lacks, or holds inconsistent: qemu-nbd's words and status.
    let bad = dir.path().join("bad.qcow2");
    std::fs::copy(&img, &bad).expect("copy");
    flag_first_bitmap_in_use(&bad);
    let bp = bad.to_str().expect("utf-8");
    let s = sock.to_str().expect("utf-8");
    for args in [
        ["-r", "-k", s, "-B", "nope", ip],
        ["-r", "-k", s, "-B", "b0", bp],
    ] {
        let theirs = run("qemu-nbd", &args);
        let mine = run(alias, &args);
        assert_eq!(out(&mine), out(&theirs), "qemu-nbd {args:?}");
        assert_eq!(mine.status.code(), theirs.status.code(), "{args:?}");
        assert_eq!(mine.status.code(), Some(1), "{args:?}");
    }
}

/// `map` and `convert` of a sparse raw file behind qemu-nbd and nbdkit: the client's block
/// status shows the holes exactly as qemu-img sees them through the same export, a convert skips
/// them (its output allocates what qemu-img's allocates), and the bytes are the file's. nbdkit
/// without structured replies (`--no-sr`, so no block status either) is read with simple replies
/// and mapped all data, as qemu-img maps it.
#[test]
fn map_and_convert_over_nbd_see_holes_as_qemu_img_does() {
    let dir = tempfile::tempdir().expect("tmp");
    let raw = dir.path().join("sparse.raw");
    let rp = raw.to_str().expect("utf-8");
    make(
        &raw,
        "raw",
        "16M",
        &[
            "write -P 0x5a 1M 64k",
            "write -P 0x33 8M 1M",
            "write -P 0x11 15M 4k",
        ],
    );
    for (i, server) in ["qemu-nbd", "nbdkit", "nbdkit --no-sr"]
        .into_iter()
        .enumerate()
    {
        let sock = dir.path().join(format!("m{i}"));
        let _f = match server {
            "qemu-nbd" => Foreign::qemu_nbd(&raw, &sock),
            "nbdkit" => Foreign::nbdkit_file(&raw, &sock),
            _ => Foreign::nbdkit_file_with(&raw, &sock, &["--no-sr"]),
        };
        let holes_shown = !server.ends_with("--no-sr");
        let u = uri(&sock);
        for output in ["--output=json", "--output=human"] {
            let theirs = ok("qemu-img", &["map", "-f", "raw", output, &u]);
            let mine = ok(BIN, &["map", "-f", "raw", output, &u]);
            assert_eq!(mine, theirs, "{server} {output}");
            assert!(
                output.ends_with("human") || theirs.contains("\"data\": false") == holes_shown,
                "{server}: the export must show holes for this test to judge: {theirs}"
            );
        }
        let mut maps = Vec::new();
        for prog in ["qemu-img", BIN] {
            let o = dir.path().join(format!("c{i}-{}.qcow2", maps.len()));
            let op = o.to_str().expect("utf-8");
            ok(prog, &["convert", "-f", "raw", "-O", "qcow2", &u, op]);
            let same = ok("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", op, rp]);
            assert!(same.contains("Images are identical"), "{server}: {same}");
            maps.push(allocation(&ok("qemu-img", &["map", "--output=json", op])));
        }
        assert_eq!(
            maps[1], maps[0],
            "{server}: convert allocates as qemu-img's"
        );
    }
}

/// A qemu-img JSON map as `(length, data, zero)` runs, adjacent alike runs merged: what is
/// allocated, without where (each writer places its clusters as it likes).
fn allocation(json: &str) -> Vec<(u64, bool, bool)> {
    let v: serde_json::Value = serde_json::from_str(json).expect("json");
    let mut runs: Vec<(u64, bool, bool)> = Vec::new();
    for r in v.as_array().expect("array") {
        let (n, d, z) = (
            r["length"].as_u64().expect("length"),
            r["data"].as_bool().expect("data"),
            r["zero"].as_bool().expect("zero"),
        );
        match runs.last_mut() {
            Some(l) if (l.1, l.2) == (d, z) => l.0 += n,
            _ => runs.push((n, d, z)),
        }
    }
    runs
}

/// A write larger than qemu-nbd's 32 MiB block limit goes out as several requests in flight;
/// qemu-io reads every byte back from the file, and a second client sees the data at once.
#[test]
fn large_pipelined_writes_through_qemu_nbd_land_whole() {
    let dir = tempfile::tempdir().expect("tmp");
    let raw = dir.path().join("big.raw");
    make(&raw, "raw", "100M", &[]);
    let sock = dir.path().join("w");
    let f = Foreign::qemu_nbd(&raw, &sock);
    let u = uri(&sock);
    let w = ok(
        BIN,
        &[
            "io",
            "-f",
            "raw",
            "-c",
            "write -P 0x61 1M 80M",
            "-c",
            "write -P 0x62 90M 4k",
            &u,
        ],
    );
    assert!(w.contains("wrote 83886080/83886080"), "{w}");
    let r = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x61 1M 80M",
            "-c",
            "read -P 0 81M 9M",
            &u,
        ],
    );
    assert!(!r.contains("failed") && !r.contains("Pattern"), "{r}");
    drop(f);
    let r = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0 0 1M",
            "-c",
            "read -P 0x61 1M 80M",
            "-c",
            "read -P 0x62 90M 4k",
            raw.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(r.matches("read ").count(), 3, "{r}");
    assert!(!r.contains("failed") && !r.contains("Pattern"), "{r}");
}

#[test]
fn info_of_images_behind_qemu_nbd_matches_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (fmt, name) in [("raw", "r.raw"), ("qcow2", "q.qcow2")] {
        let img = dir.path().join(name);
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                fmt,
                img.to_str().expect("utf-8"),
                "1M",
            ],
        );
        let sock = dir.path().join(format!("{fmt}.sock"));
        let _server = Foreign::qemu_nbd(&img, &sock);
        for output in ["human", "json"] {
            let o = format!("--output={output}");
            let args = ["info", o.as_str(), "-f", fmt, &uri(&sock)];
            let theirs = run("qemu-img", &args);
            let mine = run(BIN, &args);
            assert_eq!(
                (out(&mine), mine.status.code()),
                (out(&theirs), theirs.status.code()),
                "info {fmt} over NBD, {output}"
            );
            // A raw image over NBD has no host file: no disk size, protocol nbd.
            assert!(
                output == "json" || out(&mine).contains("protocol type: nbd"),
                "{}",
                out(&mine)
            );
        }
    }
}

/// A persistent server (`-t`) on a Unix socket stopped by SIGTERM removes its socket, as
/// qemu-nbd does, so that the next server binds the same path; the image is left clean.
#[test]
fn persistent_server_removes_its_socket_on_sigterm() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("t.qcow2");
    make_image(&img);
    let sock = tmp.path().join("s.sock");
    for round in 0..2 {
        let mut server = Command::new(BIN)
            .args(["nbd", "-t", "-f", "qcow2", "-k"])
            .arg(&sock)
            .arg(&img)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("server");
        wait_for_socket(&sock);
        let o = ok(
            "qemu-io",
            &["-f", "raw", "-c", "write -P 0x33 64k 64k", &uri(&sock)],
        );
        assert!(o.contains("wrote 65536/65536"), "round {round}: {o}");
        ok("kill", &["-TERM", &server.id().to_string()]);
        assert!(wait_exit(&mut server).success(), "round {round}");
        assert!(!sock.exists(), "round {round}: socket left behind");
    }
    let c = ok("qemu-img", &["check", img.to_str().expect("utf-8")]);
    assert!(c.contains("No errors were found"), "{c}");
}

/// `--object secret,…` and `--image-opts`, as qemu-nbd takes them: a LUKS image served with
/// its key reads as plaintext through the export, as it does through qemu-nbd, and takes
/// writes that qemu-io then reads with the key; a wrong key is refused before anything is
/// served.
#[test]
fn encrypted_image_served_with_object_and_image_opts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("enc.qcow2");
    let img_s = img.to_str().expect("utf-8");
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            "secret,id=sec0,data=pw",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
            img_s,
            "4M",
        ],
    );
    let opts = format!("driver=qcow2,file.filename={img_s},encrypt.key-secret=sec0");
    ok(
        "qemu-io",
        &[
            "--object",
            "secret,id=sec0,data=pw",
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x5a 0 1M",
        ],
    );
    let sock = tmp.path().join("e.sock");
    let mut server = Command::new(BIN)
        .args(["nbd", "-k"])
        .arg(&sock)
        .args(["--object", "secret,id=sec0,data=pw", "--image-opts", &opts])
        .stdout(Stdio::null())
        .spawn()
        .expect("server");
    wait_for_socket(&sock);
    let o = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "write -P 0x6b 1M 64k",
            &uri(&sock),
        ],
    );
    assert!(
        o.contains("read 1048576/1048576") && o.contains("wrote 65536/65536"),
        "{o}"
    );
    assert!(wait_exit(&mut server).success());
    let o = ok(
        "qemu-io",
        &[
            "--object",
            "secret,id=sec0,data=pw",
            "--image-opts",
            &opts,
            "-c",
            "read -P 0x6b 1M 64k",
        ],
    );
    assert!(o.contains("read 65536/65536"), "{o}");
    // A wrong key: refused, nothing listens.
    let bad = run(
        BIN,
        &[
            "nbd",
            "-k",
            sock.to_str().expect("utf-8"),
            "--object",
            "secret,id=sec0,data=wrong",
            "--image-opts",
            &opts,
        ],
    );
    assert!(!bad.status.success(), "{}", out(&bad));
    assert!(
        out(&bad).contains("Invalid password, cannot unlock any keyslot"),
        "{}",
        out(&bad)
    );
    assert!(!sock.exists());
}
