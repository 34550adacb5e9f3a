//! `qcow2kit bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval N] [--no-drain] [-n]
//! [-i AIO] [-o OFFSET] [--pattern P] [-q] [-s SIZE] [-S STEP] [-t CACHE] [-w] [-U]
//! [--image-opts] [--object] FILE`: qemu-img bench, the request-path benchmark.
//!
//! COUNT requests of SIZE bytes go to the opened image, DEPTH of them in flight at once
//! (requests really run in parallel on a pool of worker threads, see [`pool`]), the first at
//! OFFSET and each next one STEP further, wrapping at the image's end as qemu-img 10.0 wraps
//! (`offset % size`; a request that then crosses the end fails as it fails there). Writes
//! (`-w`) write the pattern byte. The output lines, the option checks and their messages, and
//! the exit statuses are qemu-img bench's; only the elapsed time differs.
//!
//! `--mmap` (qcow2kit only) reads the image file through a memory mapping
//! ([`qcow2kit::io::MmapStorage`]) instead of `pread`; reads only, no backing file.

mod pool;

use crate::args::{opt, Spec};
use crate::common::{
    fail, image_format, image_operand, locking, open_image_arg, parse_args, try_help,
    warn_probed_raw,
};
use crate::io::{strtoll0, strtosz, NumError};
use pool::{Job, Outcome};
use qcow2kit::Format;
use std::time::Instant;

const SPECS: &[Spec] = &[
    opt(Some('h'), Some("help"), false, "help"),
    opt(Some('c'), Some("count"), true, "c"),
    opt(Some('d'), Some("depth"), true, "d"),
    opt(Some('f'), Some("format"), true, "f"),
    opt(None, Some("flush-interval"), true, "flush-interval"),
    opt(None, Some("no-drain"), false, "no-drain"),
    opt(Some('n'), Some("native"), false, "n"),
    opt(Some('i'), Some("aio"), true, "i"),
    opt(Some('o'), Some("offset"), true, "o"),
    opt(None, Some("pattern"), true, "pattern"),
    opt(Some('q'), Some("quiet"), false, "q"),
    opt(Some('s'), Some("buffer-size"), true, "s"),
    opt(Some('S'), Some("step-size"), true, "S"),
    opt(Some('t'), Some("cache"), true, "t"),
    opt(Some('w'), Some("write"), false, "w"),
    opt(Some('U'), Some("force-share"), false, "U"),
    opt(None, Some("image-opts"), false, "image-opts"),
    opt(None, Some("object"), true, "object"),
    opt(None, Some("mmap"), false, "mmap"),
];

const HELP: &str = "usage: qcow2kit bench [-c COUNT] [-d DEPTH] [-f FMT] [--flush-interval N] \
[--no-drain] [-n] [-i AIO] [-o OFFSET] [--pattern P] [-q] [-s SIZE] [-S STEP] [-t CACHE] [-w] \
[-U] [--image-opts] [--object OBJ] [--mmap] FILE

Sends COUNT read (or, with -w, write) requests of SIZE bytes to the image, DEPTH in flight at
once, from OFFSET on in steps of STEP bytes, and prints the time the run took, as qemu-img bench
does. Defaults: -c 75000 -d 64 -s 4096 -S SIZE -o 0 --pattern 0.
--mmap reads the image file through a memory mapping instead of pread (reads only).
";

/// Most requests really in flight: qemu's thread pool (aio=threads) runs at most 64 too.
const MAX_WORKERS: usize = 64;

/// What a run does, from the command line.
#[derive(Debug, Clone, Copy)]
struct Params {
    count: u64,
    depth: u64,
    bufsize: u64,
    /// Never zero: qemu-img's `-S 0` means SIZE.
    step: u64,
    offset: u64,
    pattern: u8,
    /// Flush after every this many requests (writes only); 0: never.
    flush_interval: u64,
    /// Wait for the requests in flight before each flush (not with `--no-drain`).
    drain: bool,
    write: bool,
    /// Cache mode writethrough or directsync: every write is flushed.
    writethrough: bool,
    /// The cache mode bypasses the host page cache (`none`, `directsync`).
    direct: bool,
    /// `-n` or `-i native`.
    native_aio: bool,
}

/// qemu-img's checked integer option (`strtol` with base 0) in `min..=max`.
fn int_option(name: &str, value: &str, min: i64, max: i64) -> Result<u64, String> {
    match strtoll0(value) {
        Err(NumError::Invalid) => Err(format!("Invalid {name} specified: '{value}'.")),
        Ok(v) if (min..=max).contains(&v) => Ok(v as u64),
        _ => Err(format!(
            "Invalid {name} specified. Must be between {min} and {max}."
        )),
    }
}

/// qemu-img's checked size option (`qemu_strtosz`: suffixes, fractions) in `min..=max`.
fn size_option(name: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    match strtosz(value) {
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        Err(EINVAL) => Err(format!("Invalid {name} specified: '{value}'.")),
        _ => Err(format!(
            "Invalid {name} specified. Must be between {min} and {max}."
        )),
    }
}

/// `strtosz`'s error for a value that is not a size.
const EINVAL: i32 = 22;

/// Every value given for `key` is checked, in order (qemu-img stops at the first bad one);
/// the last one counts.
fn each<T>(
    p: &crate::args::Parsed,
    key: &str,
    default: T,
    check: impl Fn(&str) -> Result<T, String>,
) -> Result<T, String> {
    let mut v = default;
    for s in p.all(key) {
        v = check(s)?;
    }
    Ok(v)
}

/// The cache mode's (writethrough, direct), or qemu-img bench's message.
fn cache_mode(mode: &str) -> Result<(bool, bool), String> {
    match mode {
        "writeback" => Ok((false, false)),
        "unsafe" => Ok((false, false)),
        "none" | "off" => Ok((false, true)),
        "writethrough" => Ok((true, false)),
        "directsync" => Ok((true, true)),
        _ => Err("Invalid cache mode".into()),
    }
}

fn params(p: &crate::args::Parsed) -> Result<Params, String> {
    const INT_MAX: i64 = i32::MAX as i64;
    let count = each(p, "c", 75000, |v| {
        int_option("request count", v, 1, INT_MAX)
    })?;
    let depth = each(p, "d", 64, |v| int_option("queue depth", v, 1, INT_MAX))?;
    let native_aio = each(p, "i", p.has("n"), |v| match v {
        "native" => Ok(true),
        "threads" | "io_uring" => Ok(false),
        _ => Err(format!("Invalid aio option: {v}")),
    })?;
    let offset = each(p, "o", 0, |v| size_option("offset", v, 0, i64::MAX as u64))?;
    let bufsize = each(p, "s", 4096, |v| {
        size_option("buffer size", v, 1, INT_MAX as u64)
    })?;
    let step = each(p, "S", 0, |v| {
        size_option("step size", v, 0, INT_MAX as u64)
    })?;
    let (writethrough, direct) = each(p, "t", (false, false), cache_mode)?;
    let pattern = each(p, "pattern", 0, |v| int_option("pattern byte", v, 0, 255))?;
    let flush_interval = each(p, "flush-interval", 0, |v| {
        int_option("flush interval", v, 0, INT_MAX)
    })?;
    Ok(Params {
        count,
        depth,
        bufsize,
        step: if step == 0 { bufsize } else { step },
        offset,
        pattern: pattern as u8,
        flush_interval,
        drain: !p.has("no-drain"),
        write: p.has("w"),
        writethrough,
        direct,
        native_aio,
    })
}

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    let p = match parse_args(args, SPECS, "bench") {
        Ok(p) => p,
        Err(_) => return 1,
    };
    if p.has("help") {
        out!("{HELP}");
        return 0;
    }
    let params = match params(&p) {
        Ok(v) => v,
        Err(e) => return fail(e),
    };
    if p.operands.len() != 1 {
        errln!(
            "{}: Expecting one image file name\n{}",
            crate::common::prog(),
            try_help("bench")
        );
        return 1;
    }
    if !params.write && params.flush_interval > 0 {
        return fail("--flush-interval is only available in write tests");
    }
    if params.flush_interval > 0 && params.flush_interval < params.depth {
        return fail("Flush interval can't be smaller than depth");
    }
    let name = &p.operands[0];
    let device = match open(&p, name, &params) {
        Ok(d) => d,
        Err(e) => return fail(e),
    };
    bench(device, &params)
}

/// Opens the image operand `name` as qemu-img bench does.
fn open(
    p: &crate::args::Parsed,
    name: &str,
    params: &Params,
) -> Result<std::sync::Arc<dyn qcow2kit::BlockDevice>, String> {
    let arg = image_operand(p, name, p.last("f"))?;
    if params.write && p.has("U") {
        return Err(format!(
            "Could not open '{name}': force-share=on can only be used with read-only images"
        ));
    }
    if params.write && p.has("image-opts") && read_only_node(name) {
        return Err(format!("Could not open '{name}': Block node is read-only"));
    }
    if params.native_aio && !params.direct {
        return Err(format!(
            "Could not open '{name}': aio=native was specified, but it requires \
             cache.direct=on, which was not specified."
        ));
    }
    if params.write && arg.format.is_none() && image_format(&arg.path, None)? == Format::Raw {
        warn_probed_raw(name);
    }
    if p.has("mmap") {
        return mmap_open(&arg, name, params, p.has("U"));
    }
    let opened = open_image_arg(&arg, name, |o| {
        o.writable = params.write;
        o.locking = locking(p.has("U"));
    })?;
    Ok(opened.device)
}

/// Whether the `--image-opts` string `opts` asks for a read-only node (`read-only=on`).
fn read_only_node(opts: &str) -> bool {
    crate::image_opts::split_opts(opts)
        .iter()
        .any(|(k, v)| k == "read-only" && crate::create::parse_bool(v) == Some(true))
}

/// `--mmap`: the image file through a read-only mapping, without a backing file.
fn mmap_open(
    arg: &crate::image_opts::ImageArg,
    name: &str,
    params: &Params,
    force_share: bool,
) -> Result<std::sync::Arc<dyn qcow2kit::BlockDevice>, String> {
    if params.write {
        return Err("--mmap is only available in read tests".into());
    }
    let format = image_format(&arg.path, arg.format.as_deref())?;
    let lib = |e: qcow2kit::Error| {
        format!(
            "Could not open '{name}': {}",
            crate::common::open_error_text(&e)
        )
    };
    let could_not = |e| {
        lib(qcow2kit::Error::storage(
            format!("opening '{}'", arg.path),
            e,
        ))
    };
    let path = std::path::Path::new(&arg.path);
    // The read lock of a read-only image, none with -U (as FileStorage opens take them).
    let role = match format {
        Format::Raw => qcow2kit::chain::FileRole::Raw,
        _ => qcow2kit::chain::FileRole::Qcow2,
    };
    let lock = locking(force_share).request(role, false);
    let file = qcow2kit::io::FileStorage::open_with(path, false, lock).map_err(could_not)?;
    let storage =
        std::sync::Arc::new(qcow2kit::io::MmapStorage::from_file_storage(file).map_err(could_not)?);
    Ok(match format {
        Format::Raw => std::sync::Arc::new(qcow2kit::RawImage::open(storage, false).map_err(lib)?),
        _ => {
            let mut opts = crate::common::qemu_options();
            arg.apply(&mut opts);
            let img = qcow2kit::Qcow2Image::open(storage, &opts.qcow2).map_err(lib)?;
            if img.backing_file_name().is_some() {
                return Err(format!(
                    "Could not open '{name}': --mmap opens no backing file"
                ));
            }
            std::sync::Arc::new(img)
        }
    })
}

/// Runs the requests and prints qemu-img bench's lines; returns the exit code.
fn bench(device: std::sync::Arc<dyn qcow2kit::BlockDevice>, params: &Params) -> u8 {
    outln!(
        "Sending {} {} requests, {} bytes each, {} in parallel (starting at offset {}, step size {})",
        params.count,
        if params.write { "write" } else { "read" },
        params.bufsize,
        params.depth,
        params.offset,
        params.step
    );
    if params.flush_interval > 0 {
        outln!("Sending flush every {} requests", params.flush_interval);
    }
    let workers = params.depth.min(params.count).min(MAX_WORKERS as u64) as usize;
    let job = Job {
        device: device.as_ref(),
        size: device.size(),
        count: params.count,
        bufsize: params.bufsize as usize,
        step: params.step,
        offset: params.offset,
        pattern: params.pattern,
        write: params.write,
        writethrough: params.writethrough,
        flush_interval: params.flush_interval,
        drain: params.drain,
    };
    let start = Instant::now();
    let outcome = pool::run(&job, workers);
    let elapsed = start.elapsed();
    match outcome {
        Outcome::Done => {}
        Outcome::Failed(msg) => return fail(msg),
    }
    outln!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
    if params.write {
        if let Err(e) = device.flush() {
            return fail(format!("Failed flush request: {}", pool::error_text(&e)));
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_numbers() {
        assert_eq!(int_option("x", "0x10", 1, 5000), Ok(16));
        assert_eq!(int_option("x", "010", 1, 5000), Ok(8));
        assert!(int_option("x", "1k", 1, 5000)
            .unwrap_err()
            .ends_with("'1k'."));
        assert!(int_option("x", "0", 1, 5000)
            .unwrap_err()
            .contains("between 1 and 5000"));
        assert_eq!(size_option("x", "1.5k", 0, 1 << 20), Ok(1536));
        assert!(size_option("x", "-1", 0, 9)
            .unwrap_err()
            .contains("between 0 and 9"));
        assert!(size_option("x", "1.5", 0, 9)
            .unwrap_err()
            .ends_with("'1.5'."));
    }
}
