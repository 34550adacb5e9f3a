//! Standard output and error as QEMU's tools use them.
//!
//! qemu-img and qemu-io ignore `SIGPIPE` and never check what C stdio fails to write: a command
//! whose output goes to a full disk or a closed pipe still does its work, prints nothing about
//! the failure and exits with its own status. Every line the CLI prints goes through here, so the
//! same holds for qcow2kit and no write failure can panic (`out!`'s behaviour).

use std::io::Write;

/// Writes `s` to standard output and flushes it; a failure is ignored, as QEMU's tools do.
pub fn print_out(s: impl AsRef<[u8]>) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(s.as_ref()).and_then(|()| o.flush());
}

/// Writes `s` to standard error; a failure is ignored, as QEMU's tools do.
pub fn print_err(s: &str) {
    let _ = std::io::stderr().lock().write_all(s.as_bytes());
}

/// A buffered standard output for long listings, with the same rule: after the first failed
/// write nothing more is attempted and the command carries on.
pub struct BufferedOut {
    w: Option<std::io::BufWriter<std::io::StdoutLock<'static>>>,
}

impl BufferedOut {
    /// Locks standard output for the listing.
    pub fn new() -> Self {
        BufferedOut {
            w: Some(std::io::BufWriter::new(std::io::stdout().lock())),
        }
    }

    /// Appends `s`.
    pub fn write(&mut self, s: &str) {
        if let Some(w) = &mut self.w {
            if w.write_all(s.as_bytes()).is_err() {
                self.w = None;
            }
        }
    }

    /// Writes out what is buffered (before a message on standard error).
    pub fn flush(&mut self) {
        if let Some(w) = &mut self.w {
            if w.flush().is_err() {
                self.w = None;
            }
        }
    }
}

impl Drop for BufferedOut {
    fn drop(&mut self) {
        self.flush();
    }
}

/// `out!` that never panics (see the module docs).
macro_rules! out {
    ($($arg:tt)*) => { $crate::stdio::print_out(&format!($($arg)*)) };
}

/// `outln!` that never panics (see the module docs).
macro_rules! outln {
    () => { $crate::stdio::print_out("\n") };
    ($($arg:tt)*) => { $crate::stdio::print_out(&format!("{}\n", format_args!($($arg)*))) };
}

/// `err!` that never panics (see the module docs).
macro_rules! err {
    ($($arg:tt)*) => { $crate::stdio::print_err(&format!($($arg)*)) };
}

/// `errln!` that never panics (see the module docs).
macro_rules! errln {
    ($($arg:tt)*) => { $crate::stdio::print_err(&format!("{}\n", format_args!($($arg)*))) };
}
