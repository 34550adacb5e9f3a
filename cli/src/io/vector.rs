//! qemu-io's `readv` and `writev`: one request over several buffers (`off len [len...]`),
//! reported as one operation of their total length.

use super::commands::{CmdInfo, Session};
use super::getopt::{getopt, Opt};
use super::numbers::{cvtnum, parse_pattern, print_cvtnum_err};
use super::open::Image;
use super::output::*;
use std::time::Instant;

impl Session {
    /// The buffers' total length, from the `len` operands (qemu-io's `create_iovec`), with
    /// its messages for a bad or too large length.
    fn vector_len(&mut self, lens: &[String]) -> Result<i64, i32> {
        let mut total: i64 = 0;
        for arg in lens {
            let len = cvtnum(arg).map_err(|e| {
                print_cvtnum_err(&mut self.out, e, arg);
                -e
            })?;
            if len > REQUEST_MAX {
                out!(
                    self.out,
                    "Argument '{arg}' exceeds maximum size {REQUEST_MAX}\n"
                );
                return Err(-EINVAL);
            }
            if total > REQUEST_MAX - len {
                out!(
                    self.out,
                    "The total number of bytes exceed the maximum size {REQUEST_MAX}\n"
                );
                return Err(-EINVAL);
            }
            total += len;
        }
        Ok(total)
    }

    /// `off len [len...]`: the offset and the buffers' total length.
    pub(super) fn vector_operands(
        &mut self,
        ci: &CmdInfo,
        operands: &[String],
    ) -> Result<(i64, i64), i32> {
        let Some((off, lens)) = operands.split_first().filter(|(_, l)| !l.is_empty()) else {
            return Err(self.usage(ci));
        };
        let offset = cvtnum(off).map_err(|e| {
            print_cvtnum_err(&mut self.out, e, off);
            -e
        })?;
        Ok((offset, self.vector_len(lens)?))
    }

    /// `readv [-Cqv] [-P pattern] off len [len...]`.
    pub(super) fn readv(&mut self, ci: &CmdInfo, name: &str, img: &Image, args: &[&str]) -> i32 {
        let (opts, operands) = getopt(name, args, "CP:qrv");
        let (mut cflag, mut qflag, mut vflag) = (false, false, false);
        let mut pattern: Option<u8> = None;
        for o in opts {
            match o {
                Opt::Bad(msg) => {
                    errln!("{msg}");
                    return self.usage(ci);
                }
                Opt::Flag('C', _) => cflag = true,
                Opt::Flag('q', _) => qflag = true,
                Opt::Flag('v', _) => vflag = true,
                Opt::Flag('P', Some(v)) => match parse_pattern(&mut self.out, &v) {
                    Ok(p) => pattern = Some(p),
                    Err(e) => return -e,
                },
                Opt::Flag(_, _) => {}
            }
        }
        let (offset, count) = match self.vector_operands(ci, &operands) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let mut buf = vec![0xabu8; count as usize];
        let t0 = Instant::now();
        let r = if !Self::in_range(img, offset, count) {
            Err(EIO)
        } else {
            img.dev
                .read_at(&mut buf, offset as u64)
                .map_err(|e| errno_of(&e))
        };
        let t = t0.elapsed();
        if let Err(e) = r {
            out!(self.out, "readv failed: {}\n", strerror(e));
            return -e;
        }
        let mut ret = 0;
        if let Some(p) = pattern {
            if buf.iter().any(|&b| b != p) {
                out!(
                    self.out,
                    "Pattern verification failed at offset {offset}, {count} bytes\n"
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

    /// `writev [-Cfq] [-P pattern] off len [len...]`.
    pub(super) fn writev(&mut self, ci: &CmdInfo, name: &str, img: &Image, args: &[&str]) -> i32 {
        let (opts, operands) = getopt(name, args, "CfqP:r");
        let (mut cflag, mut qflag, mut fua) = (false, false, false);
        let mut pattern = 0xcdu8;
        for o in opts {
            match o {
                Opt::Bad(msg) => {
                    errln!("{msg}");
                    return self.usage(ci);
                }
                Opt::Flag('C', _) => cflag = true,
                Opt::Flag('q', _) => qflag = true,
                Opt::Flag('f', _) => fua = true,
                Opt::Flag('P', Some(v)) => match parse_pattern(&mut self.out, &v) {
                    Ok(p) => pattern = p,
                    Err(e) => return -e,
                },
                Opt::Flag(_, _) => {}
            }
        }
        let (offset, count) = match self.vector_operands(ci, &operands) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let buf = vec![pattern; count as usize];
        let t0 = Instant::now();
        let r = if !Self::in_range(img, offset, count) {
            Err(EIO)
        } else {
            img.dev
                .write_at(&buf, offset as u64)
                .map_err(|e| errno_of(&e))
        };
        let r = Self::complete_write(img, r, fua);
        self.write_outcome("writev", r, t0, (offset, count), qflag, cflag)
    }
}
