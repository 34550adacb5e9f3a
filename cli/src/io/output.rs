//! qemu-io's output: C stdio buffering, `strerror`, the timing report and buffer dumps.

use std::io::IsTerminal;
use std::time::Duration;

/// Largest request qemu's block layer accepts (`BDRV_REQUEST_MAX_BYTES`).
pub(super) const REQUEST_MAX: i64 = 2147483136;

pub(super) const EINVAL: i32 = 22;
pub(super) const ERANGE: i32 = 34;
pub(super) const EIO: i32 = 5;
pub(super) const EPERM: i32 = 1;
pub(super) const ENOTSUP: i32 = 95;
pub(super) const ENOMEDIUM: i32 = 123;

/// Standard output with C stdio's buffering: line-buffered on a terminal, in 4 KiB blocks
/// otherwise, so that `abort` loses what a C program would lose. The buffer is the process's
/// (as C's `stdout` is): lines printed by request threads (blkdebug's) keep their place.
pub(super) struct Out {
    tty: bool,
}

/// The bytes printed and not yet written.
static STDOUT_BUF: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

fn stdout_buf() -> std::sync::MutexGuard<'static, Vec<u8>> {
    STDOUT_BUF.lock().unwrap_or_else(|e| e.into_inner())
}

impl Out {
    pub(super) fn new() -> Self {
        Out {
            tty: std::io::stdout().is_terminal(),
        }
    }

    pub(super) fn print(&mut self, s: &str) {
        print_buffered(s, self.tty);
    }

    pub(super) fn write_out(&mut self) {
        let mut buf = stdout_buf();
        crate::stdio::print_out(&buf[..]);
        buf.clear();
    }

    pub(super) fn flush(&mut self) {
        self.write_out();
    }
}

/// Prints `s` into the process's stdout buffer (see [`Out`]), from any thread.
pub(super) fn print_buffered(s: &str, tty: bool) {
    let mut buf = stdout_buf();
    buf.extend_from_slice(s.as_bytes());
    let keep = if tty {
        match buf.iter().rposition(|&b| b == b'\n') {
            Some(i) => buf.len() - (i + 1),
            None => return,
        }
    } else if buf.len() >= 4096 {
        buf.len() % 4096
    } else {
        return;
    };
    let at = buf.len() - keep;
    let rest = buf.split_off(at);
    crate::stdio::print_out(&buf[..]);
    *buf = rest;
}

/// Whether standard output is a terminal (line buffering).
pub(super) fn stdout_is_tty() -> bool {
    std::io::stdout().is_terminal()
}

/// C's `strerror` for the errno values the commands report.
pub(super) fn strerror(errno: i32) -> String {
    qcow2kit::error::strerror(&std::io::Error::from_raw_os_error(errno))
}

/// The errno a library error stands for, printing details QEMU would have logged.
pub(super) fn errno_of(e: &qcow2kit::Error) -> i32 {
    match e {
        qcow2kit::Error::OutOfRange { .. } => EIO,
        qcow2kit::Error::ReadOnly => EPERM,
        qcow2kit::Error::InvalidArgument(_) => EINVAL,
        // qemu-io reports only the errno of a failed request.
        qcow2kit::Error::Io { source, .. } => source.raw_os_error().unwrap_or(EIO),
        // qemu-io reports only the errno of a request the format cannot serve.
        qcow2kit::Error::Unsupported(_) => ENOTSUP,
        // Reported by the image's corruption reporter, as QEMU does.
        qcow2kit::Error::Corrupt(
            qcow2kit::Corruption::Inconsistent(_) | qcow2kit::Corruption::BadEntry { .. },
        ) => EIO,
        // QEMU drops the driver of an image it marked corrupt: requests fail with ENOMEDIUM.
        qcow2kit::Error::Corrupt(qcow2kit::Corruption::MarkedCorrupt) => ENOMEDIUM,
        // QEMU fails a compressed cluster it cannot inflate with EIO and no message.
        qcow2kit::Error::Corrupt(qcow2kit::Corruption::BadCompressedCluster { .. }) => EIO,
        _ => {
            errln!("{}: {e}", crate::common::prog());
            EIO
        }
    }
}

/// qemu's `cvtstr`: a byte count with a binary unit, `.000` dropped.
pub(super) fn cvtstr(value: f64) -> String {
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
pub(super) fn timestr(t: Duration, fixed: bool) -> String {
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
pub(super) fn print_report(
    o: &mut Out,
    op: &str,
    t: Duration,
    offset: i64,
    count: i64,
    cflag: bool,
) {
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
pub(super) fn dump_buffer(o: &mut Out, buf: &[u8], offset: i64) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
