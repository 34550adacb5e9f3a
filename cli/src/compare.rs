//! `qcow2kit compare [-f FMT] [-F FMT] [-s] [-q] [-p] [-U] FILE1 FILE2`: compares the guest
//! contents of two images, with qemu-img compare's messages and exit codes: 0 identical,
//! 1 different, 2 an image could not be opened, 3 an allocation status query failed, 4 a read
//! failed.

use crate::args::{opt, Spec};
use crate::common::{fail, image_operand, locking, open_image_arg};
use crate::image_opts::ImageArg;
use crate::progress::Meter;
use qcow2kit::chain::Locking;
use qcow2kit::ops::compare::{compare_with_progress, CompareResult, CompareStage};

const SPECS: &[Spec] = &[
    opt(Some('f'), Some("a-format"), true, "f"),
    opt(Some('F'), Some("b-format"), true, "F"),
    opt(Some('s'), Some("strict"), false, "s"),
    opt(Some('q'), Some("quiet"), false, "q"),
    opt(Some('p'), Some("progress"), false, "p"),
    opt(Some('T'), Some("cache"), true, "T"),
    opt(Some('U'), Some("force-share"), false, "U"),
    opt(None, Some("image-opts"), false, "image-opts"),
    opt(None, Some("object"), true, "object"),
    opt(Some('h'), Some("help"), false, "help"),
];

const HELP: &str = "usage: qcow2kit compare [-f FMT] [-F FMT] [-s] [-q] [-p] [-U] FILE1 FILE2

Compares the guest contents of two images. Exit codes: 0 identical, 1 different,
2 an image could not be opened, 3 an allocation query failed, 4 a read failed.
";

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    let p = match crate::common::parse_args(args, SPECS, "compare") {
        Ok(p) => p,
        Err(_) => return 1,
    };
    if p.has("help") {
        out!("{HELP}");
        return 0;
    }
    if p.operands.len() != 2 {
        return fail("Expecting two image file names");
    }
    let quiet = p.has("q");
    let strict = p.has("s");
    let mut progress = Meter::new(p.has("p") && !quiet);
    let operand = |i: usize, fmt: Option<&str>| image_operand(&p, &p.operands[i], fmt);
    let args = match operand(0, p.last("f")).and_then(|a| Ok((a, operand(1, p.last("F"))?))) {
        Ok(a) => a,
        Err(e) => {
            fail(e);
            return 2;
        }
    };
    let code = compare_files(
        [
            (&args.0, p.operands[0].as_str()),
            (&args.1, p.operands[1].as_str()),
        ],
        locking(p.has("U")),
        strict,
        quiet,
        &mut progress,
    );
    progress.end();
    code
}

fn compare_files(
    [(arg1, name1), (arg2, name2)]: [(&ImageArg, &str); 2],
    locking: Locking,
    strict: bool,
    quiet: bool,
    progress: &mut Meter,
) -> u8 {
    let a = match open_image_arg(arg1, name1, |o| o.locking = locking) {
        Ok(o) => o,
        Err(e) => {
            fail(e);
            return 2;
        }
    };
    let b = match open_image_arg(arg2, name2, |o| o.locking = locking) {
        Ok(o) => o,
        Err(e) => {
            fail(e);
            return 2;
        }
    };
    let (size1, size2) = (a.device.size(), b.device.size());
    let (common, base) = (size1.min(size2), size1.max(size2));
    let mut done = 0u64;
    let mut warned = false;
    // qemu-img warns about differing sizes when it has compared the common part and goes on to
    // check the rest of the larger image, between two progress reports.
    let result =
        compare_with_progress(a.device.as_ref(), b.device.as_ref(), strict, &mut |d, _| {
            let chunk = d - done;
            done = d;
            // The first report is qemu-img's `qemu_progress_print(0, 100)` (also for empty
            // images); later ones add each chunk as a fraction of the larger size.
            let delta = if chunk == 0 {
                0.0
            } else {
                chunk as f32 / base as f32 * 100.0
            };
            progress.advance(delta);
            if d == common && size1 != size2 && !strict && !warned {
                warned = true;
                if !quiet {
                    outln!("Warning: Image size mismatch!");
                }
            }
            true
        });
    let say = |msg: &str| {
        if !quiet {
            outln!("{msg}");
        }
    };
    match result {
        Ok(CompareResult::Identical) => {
            say("Images are identical.");
            0
        }
        Ok(CompareResult::ContentMismatch { offset }) => {
            say(&format!("Content mismatch at offset {offset}!"));
            1
        }
        Ok(CompareResult::SizeMismatch) => {
            say("Strict mode: Image size mismatch!");
            1
        }
        Ok(CompareResult::StatusMismatch { offset }) => {
            say(&format!(
                "Strict mode: Offset {offset} block status mismatch!"
            ));
            1
        }
        Err(e) => {
            let name = if e.image == 1 { name1 } else { name2 };
            match e.stage {
                CompareStage::BlockStatus => {
                    fail(format!(
                        "Sector allocation test failed for {name}: {}",
                        e.source
                    ));
                    3
                }
                CompareStage::Read => {
                    fail(format!(
                        "Error while reading offset {} of {name}: {}",
                        e.offset,
                        crate::qemu_errors::request_errno_text(&e.source)
                    ));
                    4
                }
                // The callback above never cancels.
                CompareStage::Progress => {
                    fail(e.to_string());
                    4
                }
            }
        }
    }
}
