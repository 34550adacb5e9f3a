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

/// Standard output with C stdio's buffering: line-buffered on a terminal, in 4 KiB blocks
/// otherwise, so that `abort` loses what a C program would lose.
pub(super) struct Out {
    buf: Vec<u8>,
    tty: bool,
}

impl Out {
    pub(super) fn new() -> Self {
        Out {
            buf: Vec::new(),
            tty: std::io::stdout().is_terminal(),
        }
    }

    pub(super) fn print(&mut self, s: &str) {
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

    pub(super) fn write_out(&mut self) {
        crate::stdio::print_out(&self.buf);
        self.buf.clear();
    }

    pub(super) fn flush(&mut self) {
        self.write_out();
    }
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
        qcow2kit::Error::Io { source, .. } => {
            errln!("{}: {e}", crate::common::prog());
            source.raw_os_error().unwrap_or(EIO)
        }
        // qemu-io reports only the errno of a request the format cannot serve.
        qcow2kit::Error::Unsupported(_) => ENOTSUP,
        // Reported by the image's corruption reporter, as QEMU does.
        qcow2kit::Error::Corrupt(
            qcow2kit::Corruption::Inconsistent(_) | qcow2kit::Corruption::BadEntry { .. },
        ) => EIO,
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
