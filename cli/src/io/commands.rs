//! The session that runs qemu-io commands against an open image.

use super::getopt::{getopt, Opt};
use super::numbers::{cvtnum, parse_pattern, print_cvtnum_err};
use super::open::Image;
use super::output::*;
pub(super) use super::table::CmdInfo;
use super::table::{find, oneline};
use std::time::Instant;

/// The state commands run against.
pub(super) struct Session {
    /// The open image, if any.
    pub(super) img: Option<Image>,
    /// `--image-opts`: `open` takes its operand as options, and refuses `-o`.
    pub(super) image_opts: bool,
    pub(super) quit: bool,
    pub(super) out: Out,
    /// The asynchronous requests in flight.
    pub(super) aio: super::aio::Queue,
}

impl Session {
    pub(super) fn usage(&mut self, ci: &CmdInfo) -> i32 {
        self.out.print(&oneline(ci, ci.name));
        -EINVAL
    }

    /// Prints a blkdebug command's failure, if any (qemu-io reports them on stdout), and fails
    /// the command then.
    fn say(&mut self, msg: Option<String>) -> i32 {
        match msg {
            Some(m) => {
                self.out.print(&m);
                -EINVAL
            }
            None => 0,
        }
    }

    /// `qemuio_command`: splits `line` on spaces and runs it; returns 0 or a negative errno.
    pub(super) fn command(&mut self, line: &str) -> i32 {
        let argv: Vec<&str> = line.split(' ').filter(|s| !s.is_empty()).collect();
        let Some(&name) = argv.first() else {
            return 0;
        };
        let Some(ci) = find(name) else {
            errln!("command \"{name}\" not found");
            return -EINVAL;
        };
        if ci.unsupported {
            errln!(
                "{}: io: command \"{name}\" is not supported by qcow2kit",
                crate::common::prog()
            );
            return -EINVAL;
        }
        // Commands other than these run after every request in flight has completed (see
        // `aio`); `abort` and `sigraise` end the process as a crash would, losing them.
        // The blkdebug commands neither: they drive requests in flight.
        if !matches!(
            ci.name,
            "aio_read"
                | "aio_write"
                | "abort"
                | "sigraise"
                | "help"
                | "quit"
                | "sleep"
                | "break"
                | "wait_break"
                | "resume"
                | "remove_break"
        ) {
            self.complete_aio(true);
        }
        if self.img.is_none() && !ci.nofile {
            errln!("no file open, try 'help open'");
            return -EINVAL;
        }
        let n = argv.len() - 1;
        if n < ci.argmin || ci.argmax.is_some_and(|m| n > m) {
            match ci.argmax {
                None => errln!(
                    "bad argument count {n} to {name}, expected at least {} arguments",
                    ci.argmin
                ),
                Some(m) if m == ci.argmin => {
                    errln!("bad argument count {n} to {name}, expected {m} arguments")
                }
                Some(m) => errln!(
                    "bad argument count {n} to {name}, expected between {} and {m} arguments",
                    ci.argmin
                ),
            }
            return -EINVAL;
        }
        let args = &argv[1..];
        // `close` and `reopen` replace the image: they hold no copy of it.
        match ci.name {
            "close" => return self.close_cmd(),
            "reopen" => return self.reopen_cmd(ci, name, args),
            _ => {}
        }
        match (ci.name, self.img.clone()) {
            ("quit", _) => {
                self.quit = true;
                0
            }
            ("abort", _) => {
                // No flush of the image nor of buffered output, as a crash.
                std::process::abort();
            }
            ("open", _) => self.open_cmd(ci, name, args),
            ("sigraise", _) => self.sigraise(args[0]),
            ("help", _) => self.help_cmd(args),
            ("sleep", _) => self.sleep_cmd(args[0]),
            (_, Some(img)) => self.image_command(ci, name, &img, args),
            // Commands needing an image returned above when there was none.
            (_, None) => -EINVAL,
        }
    }

    /// A command that works on the open image.
    fn image_command(&mut self, ci: &CmdInfo, name: &str, img: &Image, args: &[&str]) -> i32 {
        if ci.writes && img.read_only {
            errln!("{}: Block node is read-only", crate::common::prog());
            return -EPERM;
        }
        match ci.name {
            "break" => self.say(super::blkdebug::break_cmd(&img.filters, args[0], args[1])),
            "remove_break" => self.say(super::blkdebug::remove_break_cmd(&img.filters, args[0])),
            "resume" => self.say(super::blkdebug::resume_cmd(&img.filters, args[0])),
            "wait_break" => {
                super::blkdebug::wait_break_cmd(&img.filters, args[0]);
                0
            }
            "read" => self.read(ci, name, img, args),
            "readv" => self.readv(ci, name, img, args),
            "alloc" => self.alloc(ci, img, args),
            "map" => self.map(img),
            "writev" => self.writev(ci, name, img, args),
            "write" => self.write(ci, name, img, args),
            "discard" => self.discard(ci, name, img, args),
            "aio_read" => self.aio_read(ci, name, img, args),
            "aio_write" => self.aio_write(ci, name, img, args),
            "truncate" => self.truncate(ci, name, img, args),
            "info" => self.info(img),
            "length" => self.length(img),
            "flush" => match img.dev.flush() {
                Ok(()) => 0,
                Err(e) => -errno_of(&e),
            },
            // aio_flush: the requests in flight completed before the command ran.
            _ => 0,
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
    pub(super) fn in_range(img: &Image, offset: i64, count: i64) -> bool {
        let size = img.dev.size();
        (offset as u64) <= size && size - offset as u64 >= count as u64
    }

    fn after_write(img: &Image) -> Result<(), i32> {
        if img.writethrough {
            img.dev.flush().map_err(|e| errno_of(&e))?;
        }
        Ok(())
    }

    fn read(&mut self, ci: &CmdInfo, name: &str, img: &Image, args: &[&str]) -> i32 {
        let (opts, operands) = getopt(name, args, "bCl:pP:qrs:v");
        let (mut cflag, mut qflag, mut vflag, mut bflag) = (false, false, false, false);
        let mut pattern: Option<u8> = None;
        let (mut pat_off, mut pat_len): (Option<i64>, Option<i64>) = (None, None);
        for o in opts {
            match o {
                Opt::Bad(msg) => {
                    errln!("{msg}");
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
            errln!(
                "{}: io: the VM state (-b) is not supported",
                crate::common::prog()
            );
            Err(ENOTSUP)
        } else if !Self::in_range(img, offset, count) {
            Err(EIO)
        } else {
            img.dev
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

    fn write(&mut self, ci: &CmdInfo, name: &str, img: &Image, args: &[&str]) -> i32 {
        let (opts, operands) = getopt(name, args, "bcCfnpP:qrs:uz");
        let (mut bflag, mut cflag, mut big_c, mut fua, mut nflag) =
            (false, false, false, false, false);
        let (mut qflag, mut rflag, mut uflag, mut zflag) = (false, false, false, false);
        let mut pattern: Option<u8> = None;
        let mut source: Option<String> = None;
        for o in opts {
            match o {
                Opt::Bad(msg) => {
                    errln!("{msg}");
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
            errln!(
                "{}: io: the VM state (-b) is not supported",
                crate::common::prog()
            );
            Err(ENOTSUP)
        } else if !Self::in_range(img, offset, count) {
            Err(EIO)
        } else if zflag && nflag && needs_fallback(img, offset as u64, count as u64) {
            Err(ENOTSUP)
        } else if zflag {
            zero_write(img, offset as u64, count as u64, uflag)
        } else if cflag {
            Self::write_compressed(img, &buf, offset as u64)
        } else {
            img.dev
                .write_at(&buf, offset as u64)
                .map_err(|e| errno_of(&e))
        };
        let r = Self::complete_write(img, r, fua);
        self.write_outcome("write", r, t0, (offset, count), qflag, big_c)
    }

    /// Completes a write request `r`: the flush `-f` (FUA) asks for, then the one a
    /// writethrough cache mode makes after every write.
    pub(super) fn complete_write(img: &Image, r: Result<(), i32>, fua: bool) -> Result<(), i32> {
        r.and_then(|()| {
            if fua {
                img.dev.flush().map_err(|e| errno_of(&e))?;
            }
            Self::after_write(img)
        })
    }

    /// Prints the outcome of the write command `name` started at `t0` over `(offset, count)`
    /// as qemu-io does (`NAME failed: …`, or the report unless `quiet`), and returns its status.
    pub(super) fn write_outcome(
        &mut self,
        name: &str,
        r: Result<(), i32>,
        t0: Instant,
        (offset, count): (i64, i64),
        quiet: bool,
        csv: bool,
    ) -> i32 {
        let t = t0.elapsed();
        if let Err(e) = r {
            out!(self.out, "{name} failed: {}\n", strerror(e));
            return -e;
        }
        if !quiet {
            print_report(&mut self.out, "wrote", t, offset, count, csv);
        }
        0
    }

    /// `write -c`: each cluster of the (cluster-aligned) request compressed on its own, as
    /// qemu-io does; other formats refuse it.
    fn write_compressed(img: &Image, buf: &[u8], offset: u64) -> Result<(), i32> {
        let Some(q) = &img.qcow2 else {
            return Err(ENOTSUP);
        };
        let cs = q.cluster_size();
        let end = offset + buf.len() as u64;
        if offset % cs != 0 || (end % cs != 0 && end != img.dev.size()) {
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

    fn discard(&mut self, ci: &CmdInfo, name: &str, img: &Image, args: &[&str]) -> i32 {
        let (opts, operands) = getopt(name, args, "Cq");
        let (mut cflag, mut qflag) = (false, false);
        for o in opts {
            match o {
                Opt::Bad(msg) => {
                    errln!("{msg}");
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
        let r = if !Self::in_range(img, offset, count) {
            Err(EIO)
        } else if !img.unmap {
            Ok(())
        } else {
            img.dev
                .discard(offset as u64, count as u64)
                .map_err(|e| errno_of(&e))
        };
        let r = r.and_then(|()| Self::after_write(img));
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

/// A zero write as qemu-io's `write -z` makes it: on qcow2, clusters left unallocated are
/// marked zero as well, and without `-u` (`unmap`) clusters keep their space.
pub(super) fn zero_write(img: &Image, offset: u64, count: u64, unmap: bool) -> Result<(), i32> {
    match &img.qcow2 {
        Some(q) if unmap => q.write_zeroes_flagged(offset, count),
        Some(q) => q.write_zeroes_keeping_allocation(offset, count),
        None => img.dev.write_zeroes(offset, count),
    }
    .map_err(|e| errno_of(&e))
}

/// Whether QEMU's qcow2 driver would need its slow fallback (writing a buffer of zeros) for a
/// zero write of `count` bytes at `offset`, which `write -z -n` forbids: always on a version 2
/// image (no zero flag); otherwise when a (sub)cluster the request covers in part holds data
/// in this image, or its remainder does not read as zeros.
fn needs_fallback(img: &Image, offset: u64, count: u64) -> bool {
    let Some(q) = &img.qcow2 else {
        return false;
    };
    let h = q.header();
    if h.version < 3 {
        return true;
    }
    let unit = if h.has_extended_l2() {
        q.cluster_size() / 32
    } else {
        q.cluster_size()
    };
    let (size, end) = (img.dev.size(), offset + count);
    let head = offset - offset % unit;
    let tail = end.div_ceil(unit).saturating_mul(unit).min(size);
    let mut partial = Vec::new();
    if head != offset {
        partial.push((head, offset));
    }
    if tail != end {
        partial.push((end, tail));
    }
    partial.into_iter().any(|(from, to)| {
        let unit_start = from - from % unit;
        let unit_end = (unit_start + unit).min(size);
        let here_clear = all_extents(img.dev.as_ref(), unit_start, unit_end, false, |k| {
            k != qcow2kit::ExtentKind::Data
        });
        let reads_zero = all_extents(img.dev.as_ref(), from, to, true, |k| {
            k != qcow2kit::ExtentKind::Data
        });
        !(here_clear && reads_zero)
    })
}

/// Whether every extent of `from..to` (through the backing chain with `chain`) is `ok`; an
/// error reads as not.
fn all_extents(
    dev: &dyn qcow2kit::BlockDevice,
    from: u64,
    to: u64,
    chain: bool,
    ok: impl Fn(qcow2kit::ExtentKind) -> bool,
) -> bool {
    let mut p = from;
    while p < to {
        let e = if chain {
            qcow2kit::device::chain_status(dev, p, to - p)
        } else {
            dev.block_status(p, to - p)
        };
        match e {
            Ok(e) if e.len > 0 && ok(e.kind) => p += e.len,
            _ => return false,
        }
    }
    true
}

/// Most bytes read from a `-s` source in one call.
const SOURCE_CHUNK: usize = 1 << 20;

/// qemu-io's `qemu_io_alloc_from_file`: up to `len` bytes of the file (read in bounded chunks,
/// never past `len`: the source may be endless, as `/dev/urandom` is), repeated to fill `len`.
pub(super) fn pattern_from_file(file: &str, len: usize) -> Option<Vec<u8>> {
    use std::io::Read;
    let report = |e: &std::io::Error| errln!("{file}: {}", qcow2kit::error::strerror(e));
    let mut f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) => {
            report(&e);
            return None;
        }
    };
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let end = len.min(got + SOURCE_CHUNK);
        match f.read(&mut buf[got..end]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                report(&e);
                return None;
            }
        }
    }
    if got == 0 {
        errln!("{file}: file is empty");
        return None;
    }
    // Doubling copies keep `filled` a multiple of `got`, so the pattern repeats seamlessly.
    let mut filled = got;
    while filled < len {
        let n = filled.min(len - filled);
        buf.copy_within(0..n, filled);
        filled += n;
    }
    Some(buf)
}
