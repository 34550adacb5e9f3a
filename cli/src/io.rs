//! `qcow2kit io [-f FMT] [-r] [-c CMD]... FILE`: qemu-io's command language over the qcow2kit
//! engine, with qemu-io 10's output, messages and exit code.
//!
//! Commands (and their one-letter aliases):
//! - `read|r [-bCpqrv] [-P pattern [-s off] [-l len]] off len`
//! - `write|w [-bcCfnpqruz] [-P pattern | -s source_file] off len`
//! - `discard|d [-Cq] off len`
//! - `flush|f`, `length|l`, `quit|q`, `abort`
//!
//! Offsets and lengths take qemu's size syntax (`4k`, `1.5M`, `0x1000`). Each `-c` runs in
//! order; without `-c`, commands are read from standard input after a `qemu-io> ` prompt. A
//! failing command does not stop the others; the exit code is 1 if any failed. The image is
//! opened writable (`-r`: read-only) with its backing chain, and every write, zero write and
//! discard is followed by a flush (qemu-io's default writethrough cache mode; `-n` or a `-t`
//! mode other than `writethrough`/`directsync` turn that off). The image is flushed and closed
//! at the end. `-d ignore` (or `off`) makes discards succeed without effect, as in QEMU.
//!
//! `abort` ends the process with `SIGABRT` at once, without flushing or closing anything, as
//! qemu-io does: standard output not yet written is lost too (it is line-buffered on a
//! terminal and block-buffered otherwise, like C's stdio).
//!
//! Not covered (refused with a message): the VM state (`-b`), the other qemu-io commands, `-s`
//! (snapshot mode), `-C` (copy-on-read), `--object`, `--image-opts`. `write -z` without `-u`
//! may free clusters where QEMU keeps them allocated (the guest data is the same).

use crate::args::{opt, parse, Spec};
use crate::common::{fail, parse_format};
use qcow2kit::chain::{open, probe_file, ImageFormat, OpenOptions, Opened};
use qcow2kit::BlockDevice;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

const SPECS: &[Spec] = &[
    opt(Some('c'), Some("cmd"), true, "c"),
    opt(Some('f'), Some("format"), true, "f"),
    opt(Some('r'), Some("read-only"), false, "r"),
    opt(Some('s'), Some("snapshot"), false, "s"),
    opt(Some('n'), Some("nocache"), false, "n"),
    opt(Some('C'), Some("copy-on-read"), false, "C"),
    opt(Some('m'), Some("misalign"), false, "m"),
    opt(Some('k'), Some("native-aio"), false, "k"),
    opt(Some('i'), Some("aio"), true, "i"),
    opt(Some('t'), Some("cache"), true, "t"),
    opt(Some('d'), Some("discard"), true, "d"),
    opt(Some('T'), Some("trace"), true, "T"),
    opt(Some('U'), Some("force-share"), false, "U"),
    opt(None, Some("object"), true, "object"),
    opt(None, Some("image-opts"), false, "image-opts"),
    opt(Some('h'), Some("help"), false, "help"),
];

const HELP: &str = "usage: qcow2kit io [-f FMT] [-r] [-n] [-t CACHE] [-c CMD]... FILE

Runs qemu-io commands on an image:
  read [-Cqv] [-P pattern [-s off] [-l len]] off len
  write [-Cfqz] [-u] [-P pattern | -s source_file] off len
  discard [-Cq] off len
  flush | length | quit | abort
";

/// Largest request qemu's block layer accepts (`BDRV_REQUEST_MAX_BYTES`).
const REQUEST_MAX: i64 = 2147483136;

const EINVAL: i32 = 22;
const ERANGE: i32 = 34;
const EIO: i32 = 5;
const EPERM: i32 = 1;
const ENOTSUP: i32 = 95;

/// Standard output with C stdio's buffering: line-buffered on a terminal, in 4 KiB blocks
/// otherwise, so that `abort` loses what a C program would lose.
struct Out {
    buf: Vec<u8>,
    tty: bool,
}

impl Out {
    fn new() -> Self {
        Out {
            buf: Vec::new(),
            tty: std::io::stdout().is_terminal(),
        }
    }

    fn print(&mut self, s: &str) {
        self.buf.extend_from_slice(s.as_bytes());
        if self.tty {
            if let Some(i) = self.buf.iter().rposition(|&b| b == b'\n') {
                let rest = self.buf.split_off(i + 1);
                self.write_out();
                self.buf = rest;
            }
        } else if self.buf.len() >= 4096 {
            let keep = self.buf.len() % 4096;
            let rest = self.buf.split_off(self.buf.len() - keep);
            self.write_out();
            self.buf = rest;
        }
    }

    fn write_out(&mut self) {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(&self.buf);
        let _ = o.flush();
        self.buf.clear();
    }

    fn flush(&mut self) {
        self.write_out();
    }
}

macro_rules! out {
    ($o:expr, $($arg:tt)*) => { $o.print(&format!($($arg)*)) };
}

/// C's `strerror` for the errno values the commands report.
fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The errno a library error stands for, printing details QEMU would have logged.
fn errno_of(e: &qcow2kit::Error) -> i32 {
    match e {
        qcow2kit::Error::OutOfRange { .. } => EIO,
        qcow2kit::Error::ReadOnly => EPERM,
        qcow2kit::Error::InvalidArgument(_) => EINVAL,
        qcow2kit::Error::Io { source, .. } => {
            eprintln!("qcow2kit: {e}");
            source.raw_os_error().unwrap_or(EIO)
        }
        qcow2kit::Error::Unsupported(_) => {
            eprintln!("qcow2kit: {e}");
            ENOTSUP
        }
        _ => {
            eprintln!("qcow2kit: {e}");
            EIO
        }
    }
}

/// qemu's `qemu_strtosz` (as qemu-io's `cvtnum` uses it): decimal with an optional fraction
/// and a B/K/M/G/T/P/E suffix (binary units), or hexadecimal without either. Errors are errno
/// values (`EINVAL`, `ERANGE`).
fn strtosz(s: &str) -> Result<u64, i32> {
    let b = s.as_bytes();
    let mut i = 0;
    if b.first() == Some(&b'+') {
        i = 1;
    }
    let start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = &s[start..i];
    if int_digits == "0" && matches!(b.get(i), Some(b'x' | b'X')) {
        let h = &s[i + 1..];
        if h.is_empty() || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(EINVAL);
        }
        return u64::from_str_radix(h, 16).map_err(|_| ERANGE);
    }
    let mut frac_digits = "";
    if b.get(i) == Some(&b'.') {
        let f0 = i + 1;
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = &s[f0..i];
    }
    if int_digits.is_empty() && frac_digits.is_empty() {
        return Err(EINVAL);
    }
    let val: u64 = if int_digits.is_empty() {
        0
    } else {
        int_digits.parse().map_err(|_| ERANGE)?
    };
    let mul: u64 = match b.get(i).map(|c| c.to_ascii_lowercase()) {
        None => 1,
        Some(c) => {
            let m = match c {
                b'b' => 1,
                b'k' => 1 << 10,
                b'm' => 1 << 20,
                b'g' => 1 << 30,
                b't' => 1 << 40,
                b'p' => 1 << 50,
                b'e' => 1 << 60,
                _ => return Err(EINVAL),
            };
            i += 1;
            m
        }
    };
    if i != b.len() {
        return Err(EINVAL);
    }
    // The fraction as 0.64 fixed point, from a double as QEMU computes it.
    let frac: f64 = if frac_digits.is_empty() {
        0.0
    } else {
        format!("0.{frac_digits}").parse().map_err(|_| EINVAL)?
    };
    let valf = (frac * 18446744073709551616.0) as u64;
    if mul == 1 {
        return if valf != 0 { Err(EINVAL) } else { Ok(val) };
    }
    let whole = val as u128 * mul as u128;
    let f = valf as u128 * mul as u128;
    let total = whole + (f >> 64) + ((f >> 63) & 1);
    u64::try_from(total).map_err(|_| ERANGE)
}

/// qemu-io's `cvtnum`: [`strtosz`] limited to `i64`.
fn cvtnum(s: &str) -> Result<i64, i32> {
    let v = strtosz(s)?;
    i64::try_from(v).map_err(|_| ERANGE)
}

fn print_cvtnum_err(o: &mut Out, errno: i32, arg: &str) {
    match errno {
        EINVAL => out!(
            o,
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}\n"
        ),
        ERANGE => out!(o, "Parsing error: argument too large -- {arg}\n"),
        _ => out!(o, "Parsing error: {arg}\n"),
    }
}

/// qemu's `cvtstr`: a byte count with a binary unit, `.000` dropped.
fn cvtstr(value: f64) -> String {
    const UNITS: [(f64, &str); 6] = [
        (1152921504606846976.0, " EiB"),
        (1125899906842624.0, " PiB"),
        (1099511627776.0, " TiB"),
        (1073741824.0, " GiB"),
        (1048576.0, " MiB"),
        (1024.0, " KiB"),
    ];
    let (mut s, suffix) = match UNITS.iter().find(|(u, _)| value >= *u) {
        Some((u, name)) => (format!("{:.3}", value / u), *name),
        None => (format!("{value:.6}"), " bytes"),
    };
    match s.find(".000") {
        Some(i) => {
            s.truncate(i);
            s.push_str(suffix);
        }
        None => s.push_str(suffix),
    }
    s
}

/// qemu's `timestr`: `SS.ss sec` below a second, `H:MM:SS.ss` otherwise or when `fixed`.
fn timestr(t: Duration, fixed: bool) -> String {
    let secs = t.as_secs();
    let frac = t.subsec_nanos() as f64 / 1e9;
    if fixed || secs > 0 {
        format!(
            "{}:{:02}:{:05.2}",
            secs / 3600,
            (secs % 3600) / 60,
            (secs % 60) as f64 + frac
        )
    } else {
        format!("{frac:05.2} sec")
    }
}

/// qemu-io's `print_report`.
fn print_report(o: &mut Out, op: &str, t: Duration, offset: i64, count: i64, cflag: bool) {
    let secs = t.as_secs_f64();
    let total = count as f64;
    if cflag {
        out!(
            o,
            "{count},1,{},{:.3},{:.3}\n",
            timestr(t, true),
            total / secs,
            1.0 / secs
        );
    } else {
        out!(o, "{op} {count}/{count} bytes at offset {offset}\n");
        out!(
            o,
            "{}, 1 ops; {} ({}/sec and {:.4} ops/sec)\n",
            cvtstr(total),
            timestr(t, false),
            cvtstr(total / secs),
            1.0 / secs
        );
    }
}

/// qemu-io's `dump_buffer`: 16 bytes a line, alphanumerics shown, the rest as dots.
fn dump_buffer(o: &mut Out, buf: &[u8], offset: i64) {
    for (i, chunk) in buf.chunks(16).enumerate() {
        let mut line = format!("{:08x}:  ", offset as u64 + i as u64 * 16);
        for b in chunk {
            line.push_str(&format!("{b:02x} "));
        }
        line.push(' ');
        for &b in chunk {
            line.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        line.push('\n');
        o.print(&line);
    }
}

/// qemu-io's `parse_pattern`: `strtol(arg, &end, 0)` in 0..=255.
fn parse_pattern(o: &mut Out, arg: &str) -> Result<u8, i32> {
    let (neg, body) = match arg.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, arg.strip_prefix('+').unwrap_or(arg)),
    };
    let v = if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()
    } else if body.len() > 1 && body.starts_with('0') {
        i64::from_str_radix(&body[1..], 8).ok()
    } else {
        body.parse::<i64>().ok()
    };
    match v {
        Some(v) if !neg && v <= 255 && !body.is_empty() => Ok(v as u8),
        Some(0) if neg => Ok(0),
        _ => {
            out!(o, "{arg} is not a valid pattern byte\n");
            Err(EINVAL)
        }
    }
}

/// One result of [`getopt`].
enum Opt {
    /// A valid option with its argument.
    Flag(char, Option<String>),
    /// What glibc's getopt prints for a bad option.
    Bad(String),
}

/// glibc `getopt` with argument permutation: options (in order, stopping after the first bad
/// one) and operands. `spec` is getopt's option string.
fn getopt(cmd: &str, args: &[&str], spec: &str) -> (Vec<Opt>, Vec<String>) {
    let mut opts = Vec::new();
    let mut operands = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        i += 1;
        if a == "--" {
            operands.extend(args[i..].iter().map(|s| s.to_string()));
            break;
        }
        if a.len() < 2 || !a.starts_with('-') {
            operands.push(a.to_string());
            continue;
        }
        let chars: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < chars.len() {
            let c = chars[j];
            j += 1;
            let pos = spec.find(c).filter(|_| c != ':');
            let Some(pos) = pos else {
                opts.push(Opt::Bad(format!("{cmd}: invalid option -- '{c}'")));
                return (opts, operands);
            };
            if spec[pos + 1..].starts_with(':') {
                let rest: String = chars[j..].iter().collect();
                let v = if !rest.is_empty() {
                    rest
                } else if let Some(v) = args.get(i) {
                    i += 1;
                    v.to_string()
                } else {
                    opts.push(Opt::Bad(format!(
                        "{cmd}: option requires an argument -- '{c}'"
                    )));
                    return (opts, operands);
                };
                opts.push(Opt::Flag(c, Some(v)));
                break;
            }
            opts.push(Opt::Flag(c, None));
        }
    }
    (opts, operands)
}

/// A command of the table: name, alias, argument counts, usage and whether it writes.
struct CmdInfo {
    name: &'static str,
    alt: Option<&'static str>,
    argmin: usize,
    argmax: Option<usize>,
    args: &'static str,
    oneline: &'static str,
    writes: bool,
}

const COMMANDS: &[CmdInfo] = &[
    CmdInfo {
        name: "read",
        alt: Some("r"),
        argmin: 2,
        argmax: None,
        args: "[-abCqrv] [-P pattern [-s off] [-l len]] off len",
        oneline: "reads a number of bytes at a specified offset",
        writes: false,
    },
    CmdInfo {
        name: "write",
        alt: Some("w"),
        argmin: 2,
        argmax: None,
        args: "[-bcCfnqruz] [-P pattern | -s source_file] off len",
        oneline: "writes a number of bytes at a specified offset",
        writes: true,
    },
    CmdInfo {
        name: "discard",
        alt: Some("d"),
        argmin: 2,
        argmax: None,
        args: "[-Cq] off len",
        oneline: "discards a number of bytes at a specified offset",
        writes: true,
    },
    CmdInfo {
        name: "flush",
        alt: Some("f"),
        argmin: 0,
        argmax: Some(0),
        args: "",
        oneline: "flush all in-core file state to disk",
        writes: false,
    },
    CmdInfo {
        name: "length",
        alt: Some("l"),
        argmin: 0,
        argmax: Some(0),
        args: "",
        oneline: "gets the length of the current file",
        writes: false,
    },
    CmdInfo {
        name: "quit",
        alt: Some("q"),
        argmin: 0,
        argmax: Some(0),
        args: "",
        oneline: "exit the program",
        writes: false,
    },
    CmdInfo {
        name: "abort",
        alt: None,
        argmin: 0,
        argmax: Some(0),
        args: "",
        oneline: "simulate a program crash using abort(3)",
        writes: false,
    },
];

/// qemu-io commands qcow2kit does not implement (names and aliases).
const UNSUPPORTED: &[&str] = &[
    "aio_flush",
    "aio_read",
    "aio_write",
    "alloc",
    "a",
    "break",
    "close",
    "c",
    "help",
    "?",
    "info",
    "i",
    "map",
    "open",
    "o",
    "readv",
    "remove_break",
    "reopen",
    "resume",
    "sigraise",
    "sleep",
    "truncate",
    "t",
    "wait_break",
    "writev",
    "zone_append",
    "zone_close",
    "zone_finish",
    "zone_open",
    "zone_report",
    "zone_reset",
];

/// The state commands run against.
struct Session {
    dev: std::sync::Arc<dyn BlockDevice>,
    /// The same image when it is qcow2 (compressed writes).
    qcow2: Option<std::sync::Arc<qcow2kit::Qcow2Image>>,
    read_only: bool,
    writethrough: bool,
    /// Discards reach the image (`-d unmap`, the default); `-d ignore` drops them.
    unmap: bool,
    quit: bool,
    out: Out,
}

impl Session {
    fn usage(&mut self, ci: &CmdInfo) -> i32 {
        out!(self.out, "{} {} -- {}\n", ci.name, ci.args, ci.oneline);
        -EINVAL
    }

    /// `qemuio_command`: splits `line` on spaces and runs it; returns 0 or a negative errno.
    fn command(&mut self, line: &str) -> i32 {
        let argv: Vec<&str> = line.split(' ').filter(|s| !s.is_empty()).collect();
        let Some(&name) = argv.first() else {
            return 0;
        };
        let Some(ci) = COMMANDS
            .iter()
            .find(|c| c.name == name || c.alt == Some(name))
        else {
            if UNSUPPORTED.contains(&name) {
                eprintln!("qcow2kit: io: command \"{name}\" is not supported by qcow2kit");
            } else {
                eprintln!("command \"{name}\" not found");
            }
            return -EINVAL;
        };
        let n = argv.len() - 1;
        if n < ci.argmin || ci.argmax.is_some_and(|m| n > m) {
            match ci.argmax {
                None => eprintln!(
                    "bad argument count {n} to {name}, expected at least {} arguments",
                    ci.argmin
                ),
                Some(m) if m == ci.argmin => {
                    eprintln!("bad argument count {n} to {name}, expected {m} arguments")
                }
                Some(m) => eprintln!(
                    "bad argument count {n} to {name}, expected between {} and {m} arguments",
                    ci.argmin
                ),
            }
            return -EINVAL;
        }
        if ci.writes && self.read_only {
            eprintln!("qcow2kit: Block node is read-only");
            return -EPERM;
        }
        match ci.name {
            "read" => self.read(ci, name, &argv[1..]),
            "write" => self.write(ci, name, &argv[1..]),
            "discard" => self.discard(ci, name, &argv[1..]),
            "flush" => match self.dev.flush() {
                Ok(()) => 0,
                Err(e) => -errno_of(&e),
            },
            "length" => {
                let s = cvtstr(self.dev.size() as f64);
                out!(self.out, "{s}\n");
                0
            }
            "quit" => {
                self.quit = true;
                0
            }
            _ => {
                // abort: no flush of the image nor of buffered output, as a crash.
                std::process::abort();
            }
        }
    }

    /// Parses `off len` operands; prints qemu-io's message on error.
    fn range(&mut self, off: &str, len: &str, max_msg: &str) -> Result<(i64, i64), i32> {
        let offset = cvtnum(off).map_err(|e| {
            print_cvtnum_err(&mut self.out, e, off);
            -e
        })?;
        let count = cvtnum(len).map_err(|e| {
            print_cvtnum_err(&mut self.out, e, len);
            -e
        })?;
        if count > REQUEST_MAX {
            out!(
                self.out,
                "length cannot exceed {REQUEST_MAX}{max_msg}, given {len}\n"
            );
            return Err(-EINVAL);
        }
        Ok((offset, count))
    }

    /// The block layer's request check: inside the device.
    fn in_range(&self, offset: i64, count: i64) -> bool {
        let size = self.dev.size();
        (offset as u64) <= size && size - offset as u64 >= count as u64
    }

    fn after_write(&mut self) -> Result<(), i32> {
        if self.writethrough {
            self.dev.flush().map_err(|e| errno_of(&e))?;
        }
        Ok(())
    }

    fn read(&mut self, ci: &CmdInfo, name: &str, args: &[&str]) -> i32 {
        let (opts, operands) = getopt(name, args, "bCl:pP:qrs:v");
        let (mut cflag, mut qflag, mut vflag, mut bflag) = (false, false, false, false);
        let mut pattern: Option<u8> = None;
        let (mut pat_off, mut pat_len): (Option<i64>, Option<i64>) = (None, None);
        for o in opts {
            match o {
                Opt::Bad(msg) => {
                    eprintln!("{msg}");
                    return self.usage(ci);
                }
                Opt::Flag('b', _) => bflag = true,
                Opt::Flag('C', _) => cflag = true,
                Opt::Flag('q', _) => qflag = true,
                Opt::Flag('v', _) => vflag = true,
                Opt::Flag('P', Some(v)) => match parse_pattern(&mut self.out, &v) {
                    Ok(p) => pattern = Some(p),
                    Err(e) => return -e,
                },
                Opt::Flag(c @ ('l' | 's'), Some(v)) => match cvtnum(&v) {
                    Ok(n) if c == 'l' => pat_len = Some(n),
                    Ok(n) => pat_off = Some(n),
                    Err(e) => {
                        print_cvtnum_err(&mut self.out, e, &v);
                        return -e;
                    }
                },
                Opt::Flag(_, _) => {} // -p, -r: no effect
            }
        }
        let [off, len] = operands.as_slice() else {
            return self.usage(ci);
        };
        let (offset, count) = match self.range(off, len, "") {
            Ok(r) => r,
            Err(e) => return e,
        };
        if pattern.is_none() && (pat_len.is_some() || pat_off.is_some()) {
            return self.usage(ci);
        }
        let pat_off = pat_off.unwrap_or(0);
        let pat_len = pat_len.unwrap_or(count - pat_off);
        if pat_len < 0 || pat_len + pat_off > count {
            out!(
                self.out,
                "pattern verification range exceeds end of read data\n"
            );
            return -EINVAL;
        }
        if bflag {
            if let Some(e) = self.sector_aligned(offset, count) {
                return e;
            }
        }
        let mut buf = vec![0xabu8; count as usize];
        let t0 = Instant::now();
        let r = if bflag {
            eprintln!("qcow2kit: io: the VM state (-b) is not supported");
            Err(ENOTSUP)
        } else if !self.in_range(offset, count) {
            Err(EIO)
        } else {
            self.dev
                .read_at(&mut buf, offset as u64)
                .map_err(|e| errno_of(&e))
        };
        let t = t0.elapsed();
        if let Err(e) = r {
            out!(self.out, "read failed: {}\n", strerror(e));
            return -e;
        }
        let mut ret = 0;
        if let Some(p) = pattern {
            let range = &buf[pat_off as usize..(pat_off + pat_len) as usize];
            if range.iter().any(|&b| b != p) {
                out!(
                    self.out,
                    "Pattern verification failed at offset {}, {pat_len} bytes\n",
                    offset + pat_off
                );
                ret = -EINVAL;
            }
        }
        if qflag {
            return ret;
        }
        if vflag {
            dump_buffer(&mut self.out, &buf, offset);
        }
        print_report(&mut self.out, "read", t, offset, count, cflag);
        ret
    }

    fn sector_aligned(&mut self, offset: i64, count: i64) -> Option<i32> {
        if offset % 512 != 0 {
            out!(
                self.out,
                "{offset} is not a sector-aligned value for 'offset'\n"
            );
            return Some(-EINVAL);
        }
        if count % 512 != 0 {
            out!(
                self.out,
                "{count} is not a sector-aligned value for 'count'\n"
            );
            return Some(-EINVAL);
        }
        None
    }

    fn write(&mut self, ci: &CmdInfo, name: &str, args: &[&str]) -> i32 {
        let (opts, operands) = getopt(name, args, "bcCfnpP:qrs:uz");
        let (mut bflag, mut cflag, mut big_c, mut fua, mut nflag) =
            (false, false, false, false, false);
        let (mut qflag, mut rflag, mut uflag, mut zflag) = (false, false, false, false);
        let mut pattern: Option<u8> = None;
        let mut source: Option<String> = None;
        for o in opts {
            match o {
                Opt::Bad(msg) => {
                    eprintln!("{msg}");
                    return self.usage(ci);
                }
                Opt::Flag('b', _) => bflag = true,
                Opt::Flag('c', _) => cflag = true,
                Opt::Flag('C', _) => big_c = true,
                Opt::Flag('f', _) => fua = true,
                Opt::Flag('n', _) => nflag = true,
                Opt::Flag('P', Some(v)) => match parse_pattern(&mut self.out, &v) {
                    Ok(p) => pattern = Some(p),
                    Err(e) => return -e,
                },
                Opt::Flag('q', _) => qflag = true,
                Opt::Flag('r', _) => rflag = true,
                Opt::Flag('s', v) => source = v,
                Opt::Flag('u', _) => uflag = true,
                Opt::Flag('z', _) => zflag = true,
                Opt::Flag(_, _) => {} // -p: no effect
            }
        }
        let [off, len] = operands.as_slice() else {
            return self.usage(ci);
        };
        if bflag && zflag {
            out!(self.out, "-b and -z cannot be specified at the same time\n");
            return -EINVAL;
        }
        if fua && (bflag || cflag) {
            out!(
                self.out,
                "-f and -b or -c cannot be specified at the same time\n"
            );
            return -EINVAL;
        }
        if nflag && !zflag {
            out!(self.out, "-n requires -z to be specified\n");
            return -EINVAL;
        }
        if uflag && !zflag {
            out!(self.out, "-u requires -z to be specified\n");
            return -EINVAL;
        }
        let n_src = zflag as u8 + pattern.is_some() as u8 + source.is_some() as u8;
        if n_src > 1 {
            out!(
                self.out,
                "Only one of -z, -P, and -s can be specified at the same time\n"
            );
            return -EINVAL;
        }
        if zflag && rflag {
            out!(
                self.out,
                "cannot combine zero write with registered I/O buffer\n"
            );
            return -EINVAL;
        }
        let offset = match cvtnum(off) {
            Ok(v) => v,
            Err(e) => {
                print_cvtnum_err(&mut self.out, e, off);
                return -e;
            }
        };
        let count = match cvtnum(len) {
            Ok(v) => v,
            Err(e) => {
                print_cvtnum_err(&mut self.out, e, len);
                return -e;
            }
        };
        if count > REQUEST_MAX && !nflag {
            out!(
                self.out,
                "length cannot exceed {REQUEST_MAX} without -n, given {len}\n"
            );
            return -EINVAL;
        }
        if bflag || cflag {
            if let Some(e) = self.sector_aligned(offset, count) {
                return e;
            }
        }
        let buf = if zflag {
            Vec::new()
        } else if let Some(file) = &source {
            match pattern_from_file(file, count as usize) {
                Some(b) => b,
                None => return -EINVAL,
            }
        } else {
            vec![pattern.unwrap_or(0xcd); count as usize]
        };

        let t0 = Instant::now();
        let r = if bflag {
            eprintln!("qcow2kit: io: the VM state (-b) is not supported");
            Err(ENOTSUP)
        } else if !self.in_range(offset, count) {
            Err(EIO)
        } else if zflag {
            self.dev
                .write_zeroes(offset as u64, count as u64)
                .map_err(|e| errno_of(&e))
        } else if cflag {
            self.write_compressed(&buf, offset as u64)
        } else {
            self.dev
                .write_at(&buf, offset as u64)
                .map_err(|e| errno_of(&e))
        };
        let r = r.and_then(|()| {
            if fua {
                self.dev.flush().map_err(|e| errno_of(&e))?;
            }
            self.after_write()
        });
        let t = t0.elapsed();
        if let Err(e) = r {
            out!(self.out, "write failed: {}\n", strerror(e));
            return -e;
        }
        if !qflag {
            print_report(&mut self.out, "wrote", t, offset, count, big_c);
        }
        0
    }

    /// `write -c`: each cluster of the (cluster-aligned) request compressed on its own, as
    /// qemu-io does; other formats refuse it.
    fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<(), i32> {
        let Some(q) = &self.qcow2 else {
            return Err(ENOTSUP);
        };
        let cs = q.cluster_size();
        let end = offset + buf.len() as u64;
        if offset % cs != 0 || (end % cs != 0 && end != self.dev.size()) {
            return Err(EINVAL);
        }
        let mut p = offset;
        while p < end {
            let n = cs.min(end - p) as usize;
            let at = (p - offset) as usize;
            q.write_compressed(p, &buf[at..at + n])
                .map_err(|e| errno_of(&e))?;
            p += n as u64;
        }
        Ok(())
    }

    fn discard(&mut self, ci: &CmdInfo, name: &str, args: &[&str]) -> i32 {
        let (opts, operands) = getopt(name, args, "Cq");
        let (mut cflag, mut qflag) = (false, false);
        for o in opts {
            match o {
                Opt::Bad(msg) => {
                    eprintln!("{msg}");
                    return self.usage(ci);
                }
                Opt::Flag('C', _) => cflag = true,
                Opt::Flag(_, _) => qflag = true,
            }
        }
        let [off, len] = operands.as_slice() else {
            return self.usage(ci);
        };
        let (offset, count) = match self.range(off, len, "") {
            Ok(r) => r,
            Err(e) => return e,
        };
        let t0 = Instant::now();
        let r = if !self.in_range(offset, count) {
            Err(EIO)
        } else if !self.unmap {
            Ok(())
        } else {
            self.dev
                .discard(offset as u64, count as u64)
                .map_err(|e| errno_of(&e))
        };
        let r = r.and_then(|()| self.after_write());
        let t = t0.elapsed();
        if let Err(e) = r {
            out!(self.out, "discard failed: {}\n", strerror(e));
            return -e;
        }
        if !qflag {
            print_report(&mut self.out, "discard", t, offset, count, cflag);
        }
        0
    }
}

/// qemu-io's `qemu_io_alloc_from_file`: the file's first `len` bytes, repeated to fill `len`.
fn pattern_from_file(file: &str, len: usize) -> Option<Vec<u8>> {
    let data = match std::fs::read(file) {
        Ok(d) => d,
        Err(e) => {
            let s = e.to_string();
            let s = s.rfind(" (os error ").map_or(s.as_str(), |i| &s[..i]);
            eprintln!("{file}: {s}");
            return None;
        }
    };
    if data.is_empty() {
        eprintln!("{file}: file is empty");
        return None;
    }
    let n = data.len().min(len);
    Some(data[..n].iter().copied().cycle().take(len).collect())
}

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    let p = match parse(args, SPECS) {
        Ok(p) => p,
        Err(e) => return fail(format!("io: {e}")),
    };
    if p.has("help") {
        print!("{HELP}");
        return 0;
    }
    if p.has("object") || p.has("image-opts") {
        return fail("io: --object and --image-opts are not supported");
    }
    if p.has("s") || p.has("C") {
        return fail("io: snapshot mode (-s) and copy-on-read (-C) are not supported");
    }
    let [file] = p.operands.as_slice() else {
        // qemu-io prints its usage on standard output.
        print!("{HELP}");
        return 1;
    };
    let mut writethrough = true;
    if p.has("n") {
        writethrough = false;
    }
    if let Some(t) = p.last("t") {
        writethrough = match t {
            "writethrough" | "directsync" => true,
            "none" | "off" | "writeback" | "unsafe" => false,
            other => return fail(format!("Invalid cache option: {other}")),
        };
    }
    let unmap = match p.last("d") {
        None | Some("on" | "unmap") => true,
        Some("off" | "ignore") => false,
        Some(other) => return fail(format!("Invalid discard option: {other}")),
    };
    let read_only = p.has("r");
    let opened = match open_image(file, p.last("f"), read_only) {
        Ok(o) => o,
        Err(e) => return fail(format!("can't open device {file}: {e}")),
    };
    let mut s = Session {
        dev: opened.device.clone(),
        qcow2: opened.qcow2.clone(),
        read_only,
        writethrough,
        unmap,
        quit: false,
        out: Out::new(),
    };
    let mut failed = false;
    let cmds = p.all("c");
    if cmds.is_empty() {
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        while !s.quit {
            s.out.print("qemu-io> ");
            s.out.flush();
            let Some(Ok(line)) = lines.next() else { break };
            failed |= s.command(&line) < 0;
        }
    } else {
        for c in cmds {
            if s.quit {
                break;
            }
            failed |= s.command(c) < 0;
        }
    }
    s.out.flush();
    drop(s);
    let closed = match &opened.qcow2 {
        Some(q) => q.close(),
        None => opened.device.flush(),
    };
    if let Err(e) = closed {
        return fail(format!("io: closing {file}: {e}"));
    }
    u8::from(failed)
}

/// Opens the image as qemu-io does: writable unless `read_only`, the chain followed.
fn open_image(file: &str, format: Option<&str>, read_only: bool) -> Result<Opened, String> {
    let path = Path::new(file);
    let lib = |e: qcow2kit::Error| match e {
        qcow2kit::Error::Io { source, .. } => {
            let s = source.to_string();
            let s = s
                .rfind(" (os error ")
                .map_or(s.as_str(), |i| &s[..i])
                .to_string();
            format!("Could not open '{file}': {s}")
        }
        other => other.to_string(),
    };
    let fmt = match format {
        Some(f) => parse_format(f).map_err(|_| format!("Unknown driver '{f}'"))?,
        None => {
            let f = probe_file(path).map_err(lib)?;
            if f == ImageFormat::Raw {
                eprintln!(
                    "WARNING: Image format was not specified for '{file}' and probing guessed raw.\n         \
                     Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
                     Specify the 'raw' format explicitly to remove the restrictions."
                );
            }
            f
        }
    };
    let opts = OpenOptions {
        writable: !read_only,
        ..OpenOptions::qemu_compatible()
    };
    open(path, fmt, &opts).map_err(lib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_like_qemu_strtosz() {
        assert_eq!(strtosz("4k"), Ok(4096));
        assert_eq!(strtosz("1M"), Ok(1 << 20));
        assert_eq!(strtosz("1.5k"), Ok(1536));
        assert_eq!(strtosz("0x1000"), Ok(4096));
        assert_eq!(strtosz("512b"), Ok(512));
        assert_eq!(strtosz("1.0"), Ok(1));
        assert_eq!(strtosz("1.5"), Err(EINVAL));
        assert_eq!(strtosz("0x1k"), Err(EINVAL));
        assert_eq!(strtosz("1x"), Err(EINVAL));
        assert_eq!(strtosz(""), Err(EINVAL));
        assert_eq!(strtosz("99999999999E"), Err(ERANGE));
        assert_eq!(cvtnum("8E"), Err(ERANGE));
    }

    #[test]
    fn report_strings() {
        assert_eq!(cvtstr(4096.0), "4 KiB");
        assert_eq!(cvtstr(1536.0), "1.500 KiB");
        assert_eq!(cvtstr(32.0), "32 bytes");
        assert_eq!(cvtstr(0.0), "0 bytes");
        assert_eq!(cvtstr(793.762928), "793.762928 bytes");
        assert_eq!(cvtstr(1048576.0), "1 MiB");
        assert_eq!(timestr(Duration::from_millis(20), false), "00.02 sec");
        assert_eq!(timestr(Duration::from_millis(1500), false), "0:00:01.50");
        assert_eq!(timestr(Duration::ZERO, true), "0:00:00.00");
    }

    #[test]
    fn getopt_permutes() {
        let (o, ops) = getopt("read", &["0", "-P", "5", "4k", "-v"], "P:v");
        assert_eq!(ops, vec!["0".to_string(), "4k".to_string()]);
        assert_eq!(o.len(), 2);
        let (o, _) = getopt("read", &["-x"], "P:v");
        assert!(matches!(&o[0], Opt::Bad(m) if m == "read: invalid option -- 'x'"));
    }
}
