//! qemu-io's `alloc off [len]`: how many bytes of a range the image itself allocates (data or
//! zeros in this layer, not its backing file), counted up to the end of the device.

use super::commands::{CmdInfo, Session};
use super::numbers::{cvtnum, print_cvtnum_err};
use super::open::Image;
use super::output::*;
use qcow2kit::ExtentKind;

impl Session {
    /// `alloc off [len]` (len defaults to one sector).
    pub(super) fn alloc(&mut self, _ci: &CmdInfo, img: &Image, args: &[&str]) -> i32 {
        let number = |s: &mut Self, arg: &str| {
            cvtnum(arg).map_err(|e| {
                print_cvtnum_err(&mut s.out, e, arg);
                -e
            })
        };
        let start = match number(self, args[0]) {
            Ok(v) => v,
            Err(e) => return e,
        };
        let mut count = match args.get(1) {
            Some(a) => match number(self, a) {
                Ok(v) => v,
                Err(e) => return e,
            },
            None => 512,
        };
        let size = img.dev.size();
        let mut offset = start as u64;
        let mut remaining = count as u64;
        let mut allocated: u64 = 0;
        while remaining > 0 {
            if offset >= size {
                // Past the end: the rest is not counted at all.
                count -= remaining as i64;
                break;
            }
            let len = remaining.min(size - offset);
            let e = match img.dev.block_status(offset, len) {
                Ok(e) => e,
                Err(e) => {
                    let errno = errno_of(&e);
                    out!(self.out, "is_allocated failed: {}\n", strerror(errno));
                    return -errno;
                }
            };
            if e.kind != ExtentKind::Unallocated {
                allocated += e.len;
            }
            offset += e.len;
            remaining -= e.len;
        }
        let at = cvtstr(start as f64);
        out!(
            self.out,
            "{allocated}/{count} bytes allocated at offset {at}\n"
        );
        0
    }
}

impl Session {
    /// `map`: the image's runs of bytes it allocates itself and does not, merged while the
    /// answer stays the same, as qemu-io prints them.
    pub(super) fn map(&mut self, img: &Image) -> i32 {
        let size = img.dev.size();
        let mut offset = 0u64;
        while offset < size {
            let mut first: Option<bool> = None;
            let mut num = 0u64;
            while offset + num < size {
                let at = offset + num;
                let e = match img.dev.block_status(at, size - at) {
                    Ok(e) => e,
                    Err(e) => {
                        let errno = errno_of(&e);
                        errln!(
                            "{}: Failed to get allocation status: {}",
                            crate::common::prog(),
                            strerror(errno)
                        );
                        return -errno;
                    }
                };
                let allocated = e.kind != ExtentKind::Unallocated;
                if *first.get_or_insert(allocated) != allocated {
                    break;
                }
                num += e.len;
            }
            let state = if first == Some(true) {
                "    allocated"
            } else {
                "not allocated"
            };
            out!(
                self.out,
                "{} ({num:#x}) bytes {state} at offset {} ({offset:#x})\n",
                cvtstr(num as f64),
                cvtstr(offset as f64)
            );
            offset += num;
        }
        0
    }
}
