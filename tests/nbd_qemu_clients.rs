//! Our NBD server judged by QEMU's and libnbd's clients, side by side with qemu-nbd serving a
//! copy of the same image: the same qemu-io output, the same `qemu-img map`, the same bytes,
//! and images that `qemu-img check` finds clean and `qemu-img compare` finds identical.

#[path = "support/nbd_helpers.rs"]
mod nbd_helpers;

use nbd_helpers::*;
use qcow2kit::nbd::Listener;

const IO_SCRIPT: &[&str] = &[
    "read -P 0xab 0 1M",
    "read -P 0 1M 2M",
    "read -P 0x5a 33M 3M",
    "read -v 10M 32",
    "write -P 0x11 5M 100k",
    "write -P 0x22 1000 3000",
    "read -P 0x22 1000 3000",
    "write -z 5M 4k",
    "write -z -u 6M 64k",
    "read -P 0 5M 4k",
    "discard 40M 1M",
    "flush",
    "write -f -P 0x33 50M 8k",
    "read -P 0x33 50M 8k",
    "read 64M 512",
    "write 64M 512",
    "length",
];

fn qemu_io(uri: &str) -> String {
    let mut args = vec!["-f", "raw"];
    for c in IO_SCRIPT {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let (_, out, err) = run("qemu-io", &args);
    untimed(&format!("{out}{err}"))
}

#[test]
fn qemu_io_map_convert_and_compare_match_qemu_nbd() {
    let (_d, dir) = tmp();
    let a = dir.join("a.qcow2");
    let b = dir.join("b.qcow2");
    make_image(&a);
    std::fs::copy(&a, &b).expect("copy");
    let (sa, sb) = (dir.join("ours.sock"), dir.join("qemu.sock"));
    let ours = Ours::unix(&a, "disk", &sa, false);
    let theirs = QemuNbd::unix(&b, "qcow2", "disk", &sb, &[]);
    let (ua, ub) = (unix_uri("disk", &sa), unix_uri("disk", &sb));

    let map = |u: &str| ok("qemu-img", &["map", "-f", "raw", "--output=json", u]);
    assert_eq!(map(&ua), map(&ub), "qemu-img map before writes");
    let (mine, qemus) = (qemu_io(&ua), qemu_io(&ub));
    assert!(
        mine.contains("wrote 3000/3000 bytes at offset 1000"),
        "{mine}"
    );
    assert_eq!(mine, qemus, "qemu-io through our server vs qemu-nbd");
    assert_eq!(map(&ua), map(&ub), "qemu-img map after writes");

    let size = |u: &str| {
        let j: serde_json::Value =
            serde_json::from_str(&ok("qemu-img", &["info", "--output=json", u])).expect("json");
        j["virtual-size"].clone()
    };
    assert_eq!(size(&ua), size(&ub));
    assert_eq!(size(&ua), serde_json::json!(64 << 20));

    let (ra, rb) = (dir.join("a.raw"), dir.join("b.raw"));
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &ua,
            ra.to_str().expect("utf-8"),
        ],
    );
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &ub,
            rb.to_str().expect("utf-8"),
        ],
    );
    assert!(
        std::fs::read(&ra).expect("a") == std::fs::read(&rb).expect("b"),
        "converted bytes"
    );
    ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", &ua, &ub]);

    drop(theirs);
    ours.stop();
    assert_clean(&a);
    assert_clean(&b);
    ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            a.to_str().expect("utf-8"),
            b.to_str().expect("utf-8"),
        ],
    );
}

#[test]
fn tcp_export_and_read_only_refusal() {
    let (_d, dir) = tmp();
    let a = dir.join("a.qcow2");
    make_image(&a);
    let l = Listener::bind_tcp("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let ours = Ours::start(&a, "ro", l, true, |_| {});
    let uri = format!("nbd://127.0.0.1:{}/ro", ours.port.expect("tcp port"));
    let out = ok(
        "qemu-io",
        &["-f", "raw", "-r", "-c", "read -P 0xcd 10M 64k", &uri],
    );
    assert!(out.contains("read 65536/65536"), "{out}");
    // A writable open of a read-only export: QEMU refuses it or the write fails with EPERM.
    let (good, out, err) = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &uri]);
    assert!(!out.contains("wrote 4096/4096"), "{out}{err}");
    assert!(
        !good || err.contains("Operation not permitted") || out.contains("Operation not permitted"),
        "{out}{err}"
    );
    // Unknown export names are refused.
    let bad = format!("nbd://127.0.0.1:{}/nope", ours.port.expect("tcp port"));
    let (good, _, err) = run("qemu-img", &["info", &bad]);
    assert!(!good && err.contains("nope"), "{err}");
    ours.stop();
    assert_clean(&a);
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0xab 0 4k",
            a.to_str().expect("utf-8"),
        ],
    );
    assert!(out.contains("read 4096/4096"), "{out}");
}

#[test]
fn nbdinfo_maps_match_qemu_nbd_including_allocation_depth() {
    let (_d, dir) = tmp();
    let base = dir.join("base.qcow2");
    make_image(&base);
    let top = dir.join("top.qcow2");
    let (tp, bp) = (top.to_str().expect("utf-8"), base.to_str().expect("utf-8"));
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", bp, "-F", "qcow2", tp],
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 7 512k 1M",
            "-c",
            "write -z 34M 64k",
            tp,
        ],
    );
    let (sa, sb) = (dir.join("ours.sock"), dir.join("qemu.sock"));
    let l = Listener::bind_unix(&sa).expect("bind");
    let ours = Ours::start(&top, "", l, true, |e| e.allocation_depth = true);
    let theirs = QemuNbd::unix(&top, "qcow2", "", &sb, &["-r", "-A"]);
    let (ua, ub) = (unix_uri("", &sa), unix_uri("", &sb));
    for ctx in ["base:allocation", "qemu:allocation-depth"] {
        let m = format!("--map={ctx}");
        let mine = ok("nbdinfo", &[&m, &ua]);
        assert_eq!(mine, ok("nbdinfo", &[&m, &ub]), "nbdinfo {m}");
        assert!(mine.lines().count() > 3, "{mine}");
    }
    let list = ok("nbdinfo", &["--list", "--json", &ua]);
    let j: serde_json::Value = serde_json::from_str(&list).expect("json");
    assert_eq!(j["exports"][0]["export-size"], serde_json::json!(64 << 20));
    assert_eq!(j["exports"][0]["is_read_only"], serde_json::json!(true));
    assert_eq!(j["exports"][0]["can_multi_conn"], serde_json::json!(true));
    assert_eq!(
        j["exports"][0]["block_size_maximum"],
        serde_json::json!(32 << 20)
    );
    drop(theirs);
    ours.stop();
}

#[test]
fn several_clients_at_once_then_nbdcopy_multi_conn() {
    let (_d, dir) = tmp();
    let a = dir.join("a.qcow2");
    make_image(&a);
    let sock = dir.join("ours.sock");
    let ours = Ours::unix(&a, "disk", &sock, false);
    let uri = unix_uri("disk", &sock);
    let writers: Vec<_> = (0..4u32)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let cmd = format!("write -P {} {}M 2M", 0x40 + i, 16 + 2 * i);
                let out = ok("qemu-io", &["-f", "raw", "-c", &cmd, "-c", "flush", &uri]);
                assert!(out.contains("wrote 2097152/2097152"), "{out}");
            })
        })
        .collect();
    for w in writers {
        w.join().expect("writer");
    }
    let copied = dir.join("copy.raw");
    ok(
        "nbdcopy",
        &[
            "--connections=4",
            "--requests=16",
            &uri,
            copied.to_str().expect("utf-8"),
        ],
    );
    ours.stop();
    assert_clean(&a);
    let local = dir.join("local.raw");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            a.to_str().expect("utf-8"),
            local.to_str().expect("utf-8"),
        ],
    );
    let (c, l) = (
        std::fs::read(&copied).expect("copy"),
        std::fs::read(&local).expect("local"),
    );
    assert!(c == l, "nbdcopy's bytes differ from the image's");
    for i in 0..4u64 {
        let at = ((16 + 2 * i) << 20) as usize;
        assert!(l[at..at + (2 << 20)]
            .iter()
            .all(|&b| u64::from(b) == 0x40 + i));
    }
}
