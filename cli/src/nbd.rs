//! `qcow2kit nbd`: serve an image over NBD with qemu-nbd's options (a drop-in for qemu-nbd's
//! server mode).
//!
//! Differences from qemu-nbd, each on the safe side: the default bind address is `127.0.0.1`
//! (qemu-nbd binds `0.0.0.0`); TLS, `-c`/`-d`, `-s`, `-o` and `--detect-zeroes` other than
//! `off` are refused rather than half-supported.

use crate::args::{opt, Spec};
use crate::common::{exit_code, open_error_text, parse_args, parse_format, prog, qemu_options};
use qcow2kit::chain::{open, probe_file, Opened};
use qcow2kit::engine::SnapshotRef;
use qcow2kit::nbd::{Export, ExportBitmap, Listener, Server, DEFAULT_PORT};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::Arc;

/// Set in the environment of the child `--fork` starts; it reports readiness on stdout.
const FORKED_ENV: &str = "QCOW2KIT_NBD_FORKED";

const HELP: &str = "Usage: qcow2kit nbd [OPTIONS] FILE
Serve FILE over the NBD protocol (qemu-nbd compatible server).

  -h, --help                display this help and exit
  -p, --port=PORT           port to listen on (default `10809')
  -b, --bind=IFACE          interface to bind to (default `127.0.0.1'; qemu-nbd: `0.0.0.0')
  -k, --socket=PATH         path to the unix socket
  -e, --shared=NUM          device can be shared by NUM clients (default '1', 0: no limit)
  -t, --persistent          don't exit on the last connection
  -x, --export-name=NAME    expose export by name (default is empty string)
  -D, --description=TEXT    export a human-readable description
      --handshake-limit=N   limit client's handshake to N seconds (default 10)
  -A, --allocation-depth    expose the allocation depth
  -B, --bitmap=NAME         expose a persistent dirty bitmap (may be repeated)
  -f, --format=FORMAT       set image format (raw, qcow2)
  -r, --read-only           export read-only
  -l, --load-snapshot=SNAPSHOT_PARAM
                            export an internal snapshot of FILE read-only
                            ('snapshot.id=[ID],snapshot.name=[NAME]' or '[ID_OR_NAME]')
      --discard=MODE        set discard mode (ignore, unmap)
      --detect-zeroes=MODE  set detect-zeroes mode (only 'off')
      --fork                fork off the server process and exit the parent
                            once the server is running
      --pid-file=PATH       store the server's process ID in the given file
  -v, --verbose             accepted, no effect

      --object=secret,id=ID,data=KEY|file=PATH
                            define a secret for an encrypted image's key
      --image-opts          treat FILE as a full set of image options
                            (driver=qcow2,file.filename=PATH,encrypt.key-secret=ID,…)

Not supported: TLS (--tls-creds, --tls-authz, --tls-hostname: out of scope; listen on
loopback or a Unix socket instead), -c/-d (kernel client), -s/--snapshot, -o/--offset.
";

const SPECS: &[Spec] = &[
    opt(Some('h'), Some("help"), false, "h"),
    opt(Some('p'), Some("port"), true, "p"),
    opt(Some('b'), Some("bind"), true, "b"),
    opt(Some('k'), Some("socket"), true, "k"),
    opt(Some('e'), Some("shared"), true, "e"),
    opt(Some('t'), Some("persistent"), false, "t"),
    opt(Some('x'), Some("export-name"), true, "x"),
    opt(Some('D'), Some("description"), true, "D"),
    opt(Some('A'), Some("allocation-depth"), false, "A"),
    opt(Some('f'), Some("format"), true, "f"),
    opt(Some('r'), Some("read-only"), false, "r"),
    opt(Some('l'), Some("load-snapshot"), true, "l"),
    opt(None, Some("discard"), true, "discard"),
    opt(None, Some("detect-zeroes"), true, "detect-zeroes"),
    opt(None, Some("fork"), false, "fork"),
    opt(None, Some("pid-file"), true, "pid-file"),
    opt(Some('v'), Some("verbose"), false, "v"),
    opt(None, Some("handshake-limit"), true, "handshake-limit"),
    opt(None, Some("tls-creds"), true, "tls-creds"),
    opt(None, Some("tls-authz"), true, "tls-authz"),
    opt(None, Some("tls-hostname"), true, "tls-hostname"),
    opt(None, Some("object"), true, "object"),
    opt(None, Some("image-opts"), false, "image-opts"),
    opt(Some('B'), Some("bitmap"), true, "B"),
    opt(Some('c'), Some("connect"), true, "c"),
    opt(Some('d'), Some("disconnect"), false, "d"),
    opt(Some('s'), Some("snapshot"), false, "s"),
    opt(Some('o'), Some("offset"), true, "o"),
];

/// Runs `qcow2kit nbd ARGS`.
pub fn run(args: &[String]) -> u8 {
    exit_code(serve(args))
}

fn serve(args: &[String]) -> Result<(), String> {
    let p = parse_args(args, SPECS, "nbd")?;
    if p.has("h") {
        out!("{HELP}");
        return Ok(());
    }
    for (key, what) in [
        ("tls-creds", "TLS"),
        ("tls-authz", "TLS"),
        ("tls-hostname", "TLS"),
        ("c", "the kernel NBD client (-c)"),
        ("d", "the kernel NBD client (-d)"),
        ("s", "temporary snapshots (-s)"),
        ("o", "exporting part of an image (-o)"),
    ] {
        if p.has(key) {
            return Err(format!("{what} is not supported"));
        }
    }
    let [file] = p.operands.as_slice() else {
        errln!(
            "{}: Invalid number of arguments\nTry `{} --help' for more information.",
            prog(),
            invocation()
        );
        return Err(String::new());
    };
    let shared: usize = match p.last("e") {
        Some(s) => s
            .parse()
            .map_err(|_| format!("Invalid shared device number '{s}'"))?,
        None => 1,
    };
    let handshake_limit = match p.last("handshake-limit") {
        None => Some(qcow2kit::nbd::DEFAULT_HANDSHAKE_LIMIT),
        Some(s) => match s.parse::<u64>() {
            Ok(0) => None,
            Ok(n) => Some(std::time::Duration::from_secs(n)),
            Err(_) => return Err(format!("Invalid handshake limit '{s}'")),
        },
    };
    let discard = match p.last("discard") {
        None | Some("ignore") | Some("off") => false,
        Some("unmap") | Some("on") => true,
        Some(m) => return Err(format!("Invalid discard mode `{m}'")),
    };
    match p.last("detect-zeroes") {
        None | Some("off") => {}
        Some(m) => return Err(format!("--detect-zeroes={m} is not supported")),
    }
    let snapshot = match p.last("l") {
        Some(s) => Some(SnapshotRef::parse(s).map_err(|e| e.to_string())?),
        None => None,
    };
    let read_only = p.has("r") || snapshot.is_some();
    if p.has("fork") && std::env::var_os(FORKED_ENV).is_none() {
        return fork_and_wait(args);
    }

    let image = open_export(&p, file, read_only, snapshot)
        .map_err(|e| format!("Failed to blk_new_open '{file}': {e}"))?;
    // qemu-nbd refuses a bad -B before it binds its socket.
    let bitmaps = export_bitmaps(&image, p.all("B"))?;
    let listener = match p.last("k") {
        Some(path) => Listener::bind_unix(Path::new(path))
            .map_err(|e| format!("Failed to bind socket to {path}: {}", io_reason(&e)))?,
        None => {
            let host = p.last("b").unwrap_or("127.0.0.1");
            let port: u16 = match p.last("p") {
                Some(s) => s.parse().map_err(|_| format!("Invalid port '{s}'"))?,
                None => DEFAULT_PORT,
            };
            let ip: IpAddr = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .map_err(|_| format!("Invalid bind address '{host}'"))?;
            Listener::bind_tcp(SocketAddr::new(ip, port))
                .map_err(|e| format!("Failed to bind socket to {host}:{port}: {}", io_reason(&e)))?
        }
    };
    let mut export = Export::new(p.last("x").unwrap_or(""), image.device.clone(), read_only);
    export.description = p.last("D").unwrap_or("").to_string();
    export.discard = discard;
    export.allocation_depth = p.has("A");
    export.bitmaps = bitmaps;
    let server = Server::new(vec![Arc::new(export)], listener)
        .handshake_limit(handshake_limit)
        .max_clients(shared)
        .persistent(p.has("t"));
    stop_on_signals(server.shutdown_handle())?;
    if let Some(pid_file) = p.last("pid-file") {
        std::fs::write(pid_file, format!("{}\n", std::process::id()))
            .map_err(|e| format!("Failed to write pid file '{pid_file}': {e}"))?;
    }
    if std::env::var_os(FORKED_ENV).is_some() {
        // The parent waits for this line: the server is listening.
        out!("ready\n");
    }
    let served = server.run();
    let closed = image.close();
    served
        .and(closed)
        .map_err(|e| format!("Failed to serve '{file}': {e}"))
}

/// The dirty bitmaps `-B` names, each checked readable now; qemu-nbd's errors for a bitmap the
/// image lacks or holds inconsistent (flagged in use by a writer that did not close it).
fn export_bitmaps(image: &Opened, names: &[String]) -> Result<Vec<ExportBitmap>, String> {
    let mut out = Vec::new();
    for name in names {
        let not_found = || format!("Bitmap '{name}' is not found");
        let q = image.qcow2.as_ref().ok_or_else(not_found)?;
        if !q.bitmaps().iter().any(|b| b.name == *name) {
            return Err(not_found());
        }
        if let Err(e) = q.bitmap(name) {
            return Err(match e {
                qcow2kit::Error::InvalidArgument(_) => {
                    format!("Bitmap '{name}' is inconsistent and cannot be used")
                }
                other => other.to_string(),
            });
        }
        out.push(ExportBitmap::of_image(q.clone(), name));
    }
    Ok(out)
}

/// Opens the image as qemu-nbd does: the given format or a probe, its chain followed; errors in
/// QEMU's words (without the `Could not open` prefix qemu-img adds).
fn open_export(
    p: &crate::args::Parsed,
    file: &str,
    read_only: bool,
    snapshot: Option<SnapshotRef>,
) -> Result<Opened, String> {
    // FILE, or with --image-opts an option string; keys from --object secret,… definitions.
    let mut arg = crate::common::image_operand_for_info(p, file, p.last("f"))?;
    if let Some(e) = arg.secret_error.take() {
        return Err(e);
    }
    let path = Path::new(&arg.path);
    let fmt = match arg.format.as_deref() {
        Some(f) => parse_format(f).map_err(|_| format!("Unknown driver '{f}'"))?,
        None => probe_file(path).map_err(|e| open_error_text(&e))?,
    };
    let mut opts = qemu_options();
    arg.apply(&mut opts);
    opts.writable = !read_only;
    opts.snapshot = snapshot;
    if arg.no_backing {
        opts.backing = qcow2kit::BackingPolicy::Ignore;
    }
    open(path, fmt, &opts).map_err(|e| open_error_text(&e))
}

/// How the usage hint names this command: `qemu-nbd` when invoked under that name.
fn invocation() -> String {
    if prog() == "qemu-nbd" {
        prog().to_string()
    } else {
        format!("{} nbd", prog())
    }
}

fn io_reason(e: &qcow2kit::Error) -> String {
    match e {
        qcow2kit::Error::Io { source, .. } => qcow2kit::error::strerror(source),
        other => other.to_string(),
    }
}

/// SIGTERM, SIGINT and SIGHUP stop the server cleanly (requests in flight finish, the image is
/// flushed and closed), as they stop qemu-nbd. The signals are blocked in every thread and
/// taken by one waiting thread; no signal handler runs.
fn stop_on_signals(handle: qcow2kit::nbd::ShutdownHandle) -> Result<(), String> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()
        .map_err(|e| format!("blocking signals: {e}"))?;
    std::thread::spawn(move || {
        if set.wait().is_ok() {
            handle.shutdown();
        }
    });
    Ok(())
}

/// `--fork`: runs the server as a child process and returns once it listens (or has failed).
fn fork_and_wait(args: &[String]) -> Result<(), String> {
    use std::io::Read;
    let exe = std::env::current_exe().map_err(|e| format!("Failed to fork: {e}"))?;
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let sub: &[&str] = if prog() == "qemu-nbd" { &[] } else { &["nbd"] };
    let mut child = std::process::Command::new(exe)
        .arg0(argv0)
        .args(sub)
        .args(args)
        .env(FORKED_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("Failed to fork: {e}"))?;
    let mut line = [0u8; 6];
    let ready = child
        .stdout
        .take()
        .is_some_and(|mut o| o.read_exact(&mut line).is_ok() && &line == b"ready\n");
    if ready {
        // The server's standard error goes nowhere from now on (qemu-nbd's child points it at
        // /dev/null): the pipe closes with this process, so nobody waits on it.
        return Ok(());
    }
    // The child failed before listening: relay its message and exit as it did.
    let mut msg = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut msg);
    }
    err!("{msg}");
    let _ = child.wait();
    Err(String::new())
}
