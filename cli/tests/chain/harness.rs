//! The differential harness: chains built with qemu-img / qemu-io in `src/`, copied whole into
//! `q/` (operated on by qemu-img) and `k/` (operated on by qcow2kit), and the judges that compare
//! the two sets after the same operation.

use serde_json::Value;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tempfile::TempDir;

/// The program run in `k/`: the qcow2kit binary, called with qemu-img's arguments.
pub const KIT: &str = env!("CARGO_BIN_EXE_qcow2kit");

/// The name qcow2kit is run under (`argv[0]`), bare as qemu-img's is: it starts the messages.
const KIT_NAME: &str = "qcow2kit";

/// Runs `prog args…` in `dir`; panics clearly if the program cannot be started.
pub fn exec(prog: &str, args: &[&str], dir: &Path) -> Output {
    exec_as(prog, prog, args, dir)
}

/// Runs `prog` with `argv[0]` set to `name`.
fn exec_as(prog: &str, name: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(prog)
        .arg0(name)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{prog}` ({e}); these tests need qemu-img and qemu-io (Debian \
                 package qemu-utils, 10.x) in PATH"
            )
        })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a qemu tool that must succeed (building images); qemu-io reports its failures on
/// standard output with exit status 0, so those count too.
fn tool(prog: &str, args: &[&str], dir: &Path) -> String {
    let out = exec(prog, args, dir);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    if !out.status.success() || stdout.contains(" failed") || stderr.contains("qemu-io:") {
        panic!(
            "`{prog} {}` failed with {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            args.join(" "),
            out.status
        );
    }
    stdout
}

/// One image of a chain, built on the layer before it.
pub struct Layer<'a> {
    /// File name; raw layers end in `.raw`, which is how the judges know their format.
    pub name: &'a str,
    /// Virtual size, in qemu-img's syntax.
    pub size: &'a str,
    /// `-o` options of `qemu-img create` (qcow2 only).
    pub opts: &'a str,
    /// qemu-io commands run on the layer in turn; `snapshot -c NAME` runs `qemu-img snapshot`.
    pub steps: &'a [&'a str],
}

/// A qcow2 layer.
pub const fn qcow2<'a>(
    name: &'a str,
    size: &'a str,
    opts: &'a str,
    steps: &'a [&'a str],
) -> Layer<'a> {
    Layer {
        name,
        size,
        opts,
        steps,
    }
}

/// The format of a file of the set, told by its name.
pub fn fmt_of(name: &str) -> &'static str {
    if name.ends_with(".raw") {
        "raw"
    } else {
        "qcow2"
    }
}

/// Exit status, standard output and standard error of one run.
#[derive(Debug)]
pub struct Res {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Res {
    fn of(o: &Output) -> Res {
        Res {
            code: o.status.code(),
            stdout: text(&o.stdout),
            stderr: text(&o.stderr),
        }
    }
}

/// A scratch directory: `src/` where the chains are built, `pre/` with the raw content recorded
/// before the operation, and the two copies `q/` and `k/`.
pub struct Work {
    _tmp: TempDir,
    pub src: PathBuf,
    pub pre: PathBuf,
    pub q: PathBuf,
    pub k: PathBuf,
    case: String,
}

impl Work {
    pub fn new(case: &str) -> Work {
        let tmp = tempfile::Builder::new()
            .prefix("qcow2kit-cli-chain-")
            .tempdir()
            .expect("creating a temporary directory");
        let dir = |n: &str| {
            let p = tmp.path().join(n);
            fs::create_dir(&p).expect("mkdir");
            p
        };
        Work {
            src: dir("src"),
            pre: dir("pre"),
            q: dir("q"),
            k: dir("k"),
            _tmp: tmp,
            case: case.to_string(),
        }
    }

    /// `qemu-img args…` in `src/`; must succeed.
    pub fn img(&self, args: &[&str]) {
        tool("qemu-img", args, &self.src);
    }

    /// `qemu-io -f FMT -c CMD name` in `src/`, the format told by the name; must succeed.
    pub fn io(&self, name: &str, cmd: &str) {
        tool("qemu-io", &["-f", fmt_of(name), "-c", cmd, name], &self.src);
    }

    /// Builds `layers` in `src/`, each backed by the one before (relative name, `-F` given).
    pub fn chain(&self, layers: &[Layer]) {
        let mut below: Option<&str> = None;
        for l in layers {
            let fmt = fmt_of(l.name);
            let mut args = vec!["create", "-q", "-f", fmt];
            if !l.opts.is_empty() {
                args.extend(["-o", l.opts]);
            }
            if let Some(b) = below {
                assert_eq!(fmt, "qcow2", "a raw layer cannot have a backing file");
                args.extend(["-b", b, "-F", fmt_of(b)]);
            }
            args.extend([l.name, l.size]);
            self.img(&args);
            for step in l.steps {
                if let Some(rest) = step.strip_prefix("snapshot ") {
                    let mut a = vec!["snapshot"];
                    a.extend(rest.split_whitespace());
                    a.push(l.name);
                    self.img(&a);
                } else {
                    self.io(l.name, step);
                }
            }
            below = Some(l.name);
        }
    }

    /// Records the content of `name` (its whole chain) as `pre/<name>.raw`.
    pub fn record(&self, name: &str) {
        let out = self.pre_of(name);
        let out = out.to_str().expect("utf-8 path");
        self.img(&["convert", "-f", fmt_of(name), "-O", "raw", name, out]);
    }

    fn pre_of(&self, name: &str) -> PathBuf {
        self.pre.join(format!("{}.raw", name.replace('/', "_")))
    }

    /// Copies every file of `src/` into `q/` and `k/`, subdirectories included (relative backing
    /// names keep working).
    pub fn split(&self) {
        for name in files_under(&self.src) {
            for d in [&self.q, &self.k] {
                let to = d.join(&name);
                if let Some(parent) = to.parent() {
                    fs::create_dir_all(parent).expect("mkdir");
                }
                fs::copy(self.src.join(&name), to).expect("copy");
            }
        }
    }

    /// The files of the set, paths relative to its directory, sorted.
    pub fn files(&self) -> Vec<String> {
        files_under(&self.q)
    }

    /// `qemu-img args…` in `q/` and qcow2kit with the same arguments in `k/`.
    pub fn run(&self, args: &[&str]) -> (Res, Res) {
        (
            Res::of(&exec("qemu-img", args, &self.q)),
            Res::of(&exec_as(KIT, KIT_NAME, args, &self.k)),
        )
    }

    /// File length of `name` in `q/` and in `k/`.
    pub fn len(&self, name: &str) -> (u64, u64) {
        let l = |d: &Path| fs::metadata(d.join(name)).map(|m| m.len()).expect("stat");
        (l(&self.q), l(&self.k))
    }

    /// Same exit status, same standard output (progress lines normalised) and same standard
    /// error with qemu-img's name replaced by qcow2kit's.
    pub fn assert_same_output(&self, q: &Res, k: &Res) {
        let show = || {
            format!(
                "[{}]\n--- qemu-img (status {:?}) ---\n{}{}\n--- qcow2kit (status {:?}) ---\n{}{}",
                self.case, q.code, q.stdout, q.stderr, k.code, k.stdout, k.stderr
            )
        };
        assert_eq!(q.code, k.code, "exit status: {}", show());
        assert_eq!(
            progress_normalised(&q.stdout),
            progress_normalised(&k.stdout),
            "stdout: {}",
            show()
        );
        assert_eq!(
            q.stderr.replace("qemu-img", KIT_NAME),
            k.stderr,
            "stderr: {}",
            show()
        );
    }

    /// `qemu-img compare` of `a` (format by name) against `b` in raw; exit status 0 or panic.
    fn assert_compare(&self, a: &Path, b: &Path, fmt_b: &str, what: &str) {
        let (a, b) = (a.to_str().expect("utf-8"), b.to_str().expect("utf-8"));
        let fa = fmt_of(a);
        let out = exec(
            "qemu-img",
            &["compare", "-f", fa, "-F", fmt_b, a, b],
            &self.q,
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "[{}] {what}: qemu-img compare {a} {b}:\n{}{}",
            self.case,
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    /// `name` reads the same in `q/` and `k/`, and both as the content recorded of `pre`.
    pub fn assert_content(&self, name: &str, pre: &str) {
        let (q, k) = (self.q.join(name), self.k.join(name));
        self.assert_compare(
            &q,
            &k,
            fmt_of(name),
            &format!("{name}: qemu-img's vs qcow2kit's"),
        );
        let p = self.pre_of(pre);
        self.assert_compare(&q, &p, "raw", &format!("qemu-img's {name} vs {pre} before"));
        self.assert_compare(&k, &p, "raw", &format!("qcow2kit's {name} vs {pre} before"));
    }

    /// `name` reads the same in `q/` and `k/` (its own data only when `no_backing`).
    pub fn assert_same_content(&self, name: &str, no_backing: bool) {
        let spec = |d: &Path| {
            let p = d.join(name);
            if no_backing {
                standalone(&p)
            } else {
                p.to_str().expect("utf-8").to_string()
            }
        };
        let (q, k) = (spec(&self.q), spec(&self.k));
        let mut args = vec!["compare"];
        if !no_backing {
            args.extend(["-f", fmt_of(name), "-F", fmt_of(name)]);
        }
        args.extend([q.as_str(), k.as_str()]);
        let out = exec("qemu-img", &args, &self.q);
        assert_eq!(
            out.status.code(),
            Some(0),
            "[{}] {name}: qemu-img's vs qcow2kit's:\n{}{}",
            self.case,
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    /// `qemu-img check` passes (status 0: no corruption, no leak) on every qcow2 file of both
    /// sets, each opened alone so that a missing backing file does not hide its state.
    pub fn assert_all_clean(&self) {
        for name in self.files().iter().filter(|n| fmt_of(n) == "qcow2") {
            for (who, d) in [("qemu-img", &self.q), ("qcow2kit", &self.k)] {
                let out = exec("qemu-img", &["check", &standalone(&d.join(name))], d);
                assert_eq!(
                    out.status.code(),
                    Some(0),
                    "[{}] qemu-img check of {who}'s {name}:\n{}{}",
                    self.case,
                    text(&out.stdout),
                    text(&out.stderr)
                );
            }
        }
    }

    /// `qemu-img info` of `name` on both sides: the same backing fields and virtual size.
    pub fn assert_same_info(&self, name: &str) {
        let (q, k) = (self.info(&self.q, name), self.info(&self.k, name));
        assert_eq!(
            q, k,
            "[{}] qemu-img info {name}: qemu-img's vs qcow2kit's",
            self.case
        );
    }

    /// The judged fields of `qemu-img info --output json name` in `dir`, the directory's path
    /// in `full-backing-filename` replaced by `DIR`.
    pub fn info(&self, dir: &Path, name: &str) -> Value {
        let out = exec(
            "qemu-img",
            &["info", "--output", "json", "-f", fmt_of(name), name],
            dir,
        );
        assert!(
            out.status.success(),
            "[{}] qemu-img info {name}: {}",
            self.case,
            text(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("info JSON");
        let dir = dir.to_str().expect("utf-8");
        let mut m = serde_json::Map::new();
        for key in [
            "backing-filename",
            "backing-filename-format",
            "full-backing-filename",
            "virtual-size",
            "snapshots",
        ] {
            if let Some(x) = v.get(key) {
                let x = match x {
                    Value::String(s) => Value::String(s.replace(dir, "DIR")),
                    other => other.clone(),
                };
                m.insert(key.to_string(), x);
            }
        }
        Value::Object(m)
    }

    /// Runs `args` on both sides and judges them: the same output and exit status, qemu-img's
    /// status success or failure as `ok` says, each `(name, pre)` of `reads` reading in both
    /// sets as `pre` read before, every qcow2 file checking clean and every file's info equal.
    pub fn judge(&self, args: &[&str], ok: bool, reads: &[(&str, &str)]) -> (Res, Res) {
        let (q, k) = self.run(args);
        self.assert_same_output(&q, &k);
        assert_eq!(
            q.code == Some(0),
            ok,
            "[{}] qemu-img itself {}: {q:?}",
            self.case,
            if ok { "failed" } else { "succeeded" }
        );
        for (name, pre) in reads {
            self.assert_content(name, pre);
        }
        self.assert_all_clean();
        for f in self.files() {
            self.assert_same_info(&f);
        }
        (q, k)
    }

    /// Bytes allocated in `name` itself (not its backing chain), per `qemu-io alloc`.
    pub fn allocated(&self, dir: &Path, name: &str) -> u64 {
        let size = self.info(dir, name)["virtual-size"]
            .as_u64()
            .expect("virtual-size");
        let out = tool(
            "qemu-io",
            &["-r", "-c", &format!("alloc 0 {size}"), name],
            dir,
        );
        out.split('/')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("[{}] unexpected qemu-io alloc output: {out}", self.case))
    }
}

/// The files under `root` (one level of subdirectories), relative paths, sorted.
fn files_under(root: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for e in fs::read_dir(root).expect("read dir") {
        let e = e.expect("dir entry");
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().expect("file type").is_dir() {
            for f in fs::read_dir(e.path()).expect("read subdir") {
                let f = f.expect("dir entry").file_name();
                v.push(format!("{name}/{}", f.to_string_lossy()));
            }
        } else {
            v.push(name);
        }
    }
    v.sort();
    v
}

/// Runs `case` on every item, then fails naming each item that failed, not only the first.
pub fn every<T: std::fmt::Debug>(items: impl IntoIterator<Item = T>, case: impl Fn(&T)) {
    let mut failed = Vec::new();
    let mut total = 0;
    for item in items {
        total += 1;
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&item))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failed.push(format!("{item:?}: {msg}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {total} cases failed:\n{}",
        failed.len(),
        failed.join("\n\n")
    );
}

/// A `json:` filename opening the qcow2 file at `p` without its backing file.
pub fn standalone(p: &Path) -> String {
    let file = serde_json::json!({
        "driver": "qcow2",
        "backing": null,
        "file": {"driver": "file", "filename": p.to_str().expect("utf-8")},
    });
    format!("json:{file}")
}

/// Standard output with the `(N/100%)\r` progress records (whose number and steps depend on
/// timing in qemu-img itself) replaced by one marker naming the last figure.
pub fn progress_normalised(s: &str) -> String {
    let mut kept = Vec::new();
    let mut first = None;
    let mut last = "";
    for seg in s.split('\r') {
        let t = seg.trim_start();
        match t.strip_prefix('(').and_then(|t| t.strip_suffix("/100%)")) {
            Some(figure) => {
                first.get_or_insert(kept.len());
                last = figure;
            }
            None => kept.push(seg.to_string()),
        }
    }
    if let Some(at) = first {
        kept.insert(at, format!("<progress to {last}>"));
    }
    kept.join("\r")
}
