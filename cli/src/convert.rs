//! `qcow2kit convert`: copy an image (with its backing chain flattened) into a new image.
//!
//! Output formats raw and qcow2. Options as qemu-img: `-f FMT`, `-O FMT`, `-o OPTIONS` (qcow2
//! creation options), `-c` (compressed qcow2), `-B BACKING` and `-F FMT` (the target keeps a
//! backing file: only the source's top layer is copied), `-p`, `-q`, `-S SIZE` (zero detection
//! granularity, 0 = off), `-m N` (parallel workers), `-W` (accepted: writes are always allowed
//! out of order), `-l SNAPSHOT` (`snapshot.name=`, `snapshot.id=` or a plain name), `-n` (target
//! exists; nothing is created), `-U` (the source is read while others may write it; without it,
//! no one else may write the source meanwhile, as with qemu-img), `-C` (copy offloading: refused
//! with `-c` and `-S` as qemu-img refuses it, otherwise the ordinary copy, which is what
//! qemu-img falls back to) and `-t`/`-T` (accepted, no effect).

use crate::args::{opt, Spec};
use crate::common::{open_image, parse_format};
use crate::create::{cvtnum, parse_settings, target_options};
use crate::image_opts::load_secrets;
use crate::option_help::parse_list;
use crate::option_help::{accumulate, create_options, has_help_option, print_create_help};
use crate::qemu_errors::convert_error_text;
use qcow2kit::chain::{FileRole, Locking};
use qcow2kit::io::lock::{lock_error, LockRequest};
use qcow2kit::io::{FileStorage, Storage};
use qcow2kit::ops::convert::{self as copy, ConvertOptions, Target, TargetFormat};
use qcow2kit::ops::create::CreateOptions;
use qcow2kit::Format;
use qcow2kit::SnapshotRef;
use std::path::Path;
use std::sync::Arc;

const SPECS: &[Spec] = &[
    opt(Some('f'), None, true, "f"),
    opt(Some('O'), None, true, "O"),
    opt(Some('o'), None, true, "o"),
    opt(Some('c'), None, false, "c"),
    opt(Some('C'), None, false, "C"),
    opt(Some('p'), None, false, "p"),
    opt(Some('q'), None, false, "q"),
    opt(Some('S'), None, true, "S"),
    opt(Some('m'), None, true, "m"),
    opt(Some('W'), None, false, "W"),
    opt(Some('l'), None, true, "l"),
    opt(Some('s'), None, true, "s"),
    opt(Some('n'), None, false, "n"),
    opt(Some('U'), Some("force-share"), false, "U"),
    opt(Some('t'), None, true, "t"),
    opt(Some('T'), None, true, "T"),
    opt(Some('B'), None, true, "B"),
    opt(Some('F'), None, true, "F"),
    opt(None, Some("object"), true, "object"),
    opt(None, Some("image-opts"), false, "image-opts"),
    opt(None, Some("target-image-opts"), false, "target-image-opts"),
    opt(None, Some("bitmaps"), false, "bitmaps"),
    opt(None, Some("salvage"), false, "salvage"),
    opt(None, Some("target-is-zero"), false, "target-is-zero"),
    opt(
        None,
        Some("skip-broken-bitmaps"),
        false,
        "skip-broken-bitmaps",
    ),
];

/// qemu-img's refusal of `--target-is-zero` with `-B`: its words, and its exit status 0, with
/// nothing copied.
fn refuse_zero_target_with_backing() -> Result<(), String> {
    errln!(
        "{}: Cannot use --target-is-zero when the destination image has a backing file",
        crate::common::prog()
    );
    Ok(())
}

/// qemu-img's checks of a new image's backing file: its format must be named, and it must
/// open (qemu-img opens the new image with its backing file before copying). qemu-img creates
/// the target before it finds the backing file missing; qcow2kit refuses first and creates
/// nothing.
fn check_target_backing(dst: &str, create: &CreateOptions) -> Result<(), String> {
    let Some(backing) = &create.backing_file else {
        return Ok(());
    };
    let Some(fmt) = &create.backing_format else {
        return Err("Use of backing file requires explicit backing format".into());
    };
    if !crate::option_help::is_qemu_format(fmt) {
        return Err(format!(
            "{dst}: error while converting qcow2: Parameter 'backing-fmt' does not accept value '{fmt}'"
        ));
    }
    crate::create::open_backing(Path::new(dst), backing, Some(fmt))
        .map(|_| ())
        .map_err(|e| format!("Could not open '{dst}': Could not open backing file: {e}"))
}

/// `-S`: a size, a multiple of 512 bytes up to 16 MiB (qemu-img's messages).
fn sparse_size(s: &str) -> Result<u64, String> {
    let v = cvtnum("buffer size for sparse output", s, true, 0, i64::MAX as u64)?;
    if v % 512 != 0 || v > 16 << 20 {
        return Err(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples \
                    of 512 up to 16777216. Select 0 to disable sparse detection (fully \
                    allocates output)."
                .into(),
        );
    }
    Ok(v)
}

/// `-l`: `snapshot.id=ID` and/or `snapshot.name=NAME` (an option list), or an id or name.
fn snapshot_param(s: &str) -> Result<SnapshotRef, String> {
    if !s.starts_with("snapshot.") {
        return Ok(SnapshotRef::IdOrName(s.to_string()));
    }
    let (mut id, mut name) = (None, None);
    for (k, v) in parse_list(s) {
        match k.as_str() {
            "snapshot.id" => id = Some(v),
            "snapshot.name" => name = Some(v),
            _ => {
                return Err(format!(
                    "Invalid parameter '{k}'\n{}: Failed in parsing snapshot param '{s}'",
                    crate::common::prog()
                ))
            }
        }
    }
    Ok(match (id, name) {
        (Some(i), _) => SnapshotRef::Id(i),
        (None, Some(n)) => SnapshotRef::Name(n),
        (None, None) => SnapshotRef::IdOrName(s.to_string()),
    })
}

/// Runs the subcommand; returns the exit code.
pub fn run(args: &[String]) -> u8 {
    crate::common::exit_code(convert(args))
}

fn convert(args: &[String]) -> Result<(), String> {
    let p = crate::common::parse_args(args, SPECS, "convert")?;
    // qemu-img's option loop (every -o list valid, every value of -S, -m and -l, every
    // --object), then its checks in its order, then help.
    let options = accumulate(p.all("o"))?;
    let mut zero_granularity = 4096;
    for s in p.all("S") {
        zero_granularity = sparse_size(s)?;
    }
    let mut workers = 0;
    for m in p.all("m") {
        workers = cvtnum("number of coroutines", m, false, 1, 16)? as usize;
    }
    let mut snapshot = None;
    for l in p.all("l").iter().chain(p.all("s")) {
        snapshot = Some(snapshot_param(l)?);
    }
    let secrets = load_secrets(p.all("object").iter().map(|s| s.as_str()))?;
    if p.has("skip-broken-bitmaps") && !p.has("bitmaps") {
        return Err("Use of --skip-broken-bitmaps requires --bitmaps".into());
    }
    // Copy offloading: the copy is made by reads and writes either way (qemu-img falls back to
    // them where the storage cannot offload); its refusals are qemu-img's.
    if p.has("C") && p.has("c") {
        return Err("Cannot enable copy offloading when -c is used".into());
    }
    if p.has("C") && p.has("S") {
        return Err("Cannot enable copy offloading when -S is used".into());
    }
    if p.has("C") && p.has("salvage") {
        return Err("Cannot use copy offloading in salvaging mode".into());
    }
    if p.has("target-image-opts") && !p.has("n") {
        return Err("--target-image-opts requires use of -n flag".into());
    }
    if p.has("target-is-zero") && !p.has("n") {
        return Err("--target-is-zero requires use of -n flag".into());
    }
    if p.has("n") && options.is_some() {
        return Err("-o has no effect when skipping image creation".into());
    }
    if options.as_deref().is_some_and(has_help_option) {
        let target = match p.operands.as_slice() {
            [_, .., t] => Some(t.as_str()),
            _ => None,
        };
        return match p.last("O") {
            Some(f) => print_create_help(target, f),
            None if p.has("target-image-opts") => {
                Err("Option help requires a format be specified".into())
            }
            None => print_create_help(target, "raw"),
        };
    }
    let [src, dst] = p.operands.as_slice() else {
        return Err(if p.operands.len() > 2 {
            "convert: more than one source image is not supported".into()
        } else {
            "Must specify image file name".into()
        });
    };
    if p.has("salvage") {
        return Err(
            "--salvage (reading unreadable source areas as zeros) is not supported by qcow2kit"
                .into(),
        );
    }
    let mut out_fmt = parse_format(p.last("O").unwrap_or("raw"))?;
    // The target as an option string (`driver=…,file.filename=…,encrypt.key-secret=…`): an
    // existing image only, as in qemu-img.
    let target_arg = if p.has("target-image-opts") {
        let arg = crate::image_opts::image_arg(dst, true, None, &secrets)?;
        if let Some(e) = &arg.secret_error {
            return Err(format!("Could not open '{dst}': {e}"));
        }
        if let Some(f) = &arg.format {
            out_fmt = parse_format(f)?;
        }
        Some(arg)
    } else {
        None
    };
    let dst: &str = target_arg
        .as_ref()
        .map_or(dst.as_str(), |a| a.path.as_str());
    let source = crate::common::image_operand(&p, src, p.last("f"))?;
    let mut create = CreateOptions::default();
    if out_fmt == Format::Raw {
        if p.has("c") {
            return Err("Compression not supported for this file format".into());
        }
        // With -n nothing is created: qemu-img does not look at -B then.
        if p.has("B") && !p.has("n") {
            return Err("Backing file not supported for file format 'raw'".into());
        }
        parse_settings(options.as_deref().unwrap_or(""), &create_options(out_fmt))?;
    } else {
        let set = parse_settings(options.as_deref().unwrap_or(""), &create_options(out_fmt))?;
        create = target_options(&set, &secrets)?;
        if create.encryption.is_some() && p.has("c") {
            return Err("Compression and encryption not supported at the same time".into());
        }
        if let Some(b) = p.last("B") {
            create.backing_file = Some(b.to_string());
        }
        if let Some(f) = p.last("F") {
            create.backing_format = Some(f.to_string());
        }
    }
    if src == "-" {
        if p.has("n") || snapshot.is_some() || p.last("f").is_some_and(|f| f != "qcow2") {
            return Err("a streamed source is a qcow2 image read whole: -n, -l and -f other than qcow2 do not apply".into());
        }
        return stream::read(dst, out_fmt, create);
    }
    // qemu-img convert refuses other writers of its source while it copies.
    let source_locking = if p.has("U") {
        Locking::ForceShare
    } else {
        Locking::Exclusive
    };
    let image = crate::common::open_image_arg(&source, src, |o| {
        o.snapshot = snapshot.clone();
        o.locking = source_locking;
    })?;
    let dev = image.device;
    if !p.has("n") {
        check_target_backing(dst, &create)?;
    }
    let bitmaps = match (&image.qcow2, p.has("bitmaps")) {
        (Some(q), true) => Some(bitmaps::to_copy(q, p.has("skip-broken-bitmaps"))?),
        _ => None,
    };

    let quiet = p.has("q");
    let streamed = out_fmt == Format::Qcow2 && !p.has("n") && stream::is_stream_target(dst);
    if streamed && p.has("bitmaps") {
        return Err("--bitmaps is not supported with a streamed target".into());
    }
    // Progress goes to standard output, which a streamed image may be.
    let show = p.has("p") && !quiet && !(streamed && dst == "-");
    let print = |d: u64, t: u64| {
        let pct = if t == 0 {
            100.0
        } else {
            d as f64 * 100.0 / t as f64
        };
        out!("    ({pct:.2}/100%)\r");
        true
    };
    if show {
        print(0, 1);
    }
    let progress: Option<qcow2kit::ops::convert::Progress<'_>> =
        if show { Some(&print) } else { None };
    let exists = p.has("n");
    // The caller promises that the existing target reads as zeros: zeros are not written.
    let target_is_zero = p.has("target-is-zero");
    if streamed {
        let opts = qcow2kit::ops::stream::StreamWriteOptions {
            create,
            compress: p.has("c"),
            workers,
            keep_zeros: zero_granularity == 0,
        };
        stream::write(dev.as_ref(), dst, &opts)?;
        if show {
            print(1, 1);
            outln!();
        }
        return Ok(());
    }
    if out_fmt == Format::Qcow2 {
        let opts = ConvertOptions {
            format: TargetFormat::Qcow2(create),
            workers,
            zero_granularity,
            compress: p.has("c"),
            target_is_zero,
            progress,
        };
        if exists {
            let target = match &target_arg {
                Some(arg) => crate::common::open_image_arg(arg, dst, |o| o.writable = true)?,
                None => open_image(dst, Some("qcow2"), |o| o.writable = true)?,
            };
            let q = target.qcow2.ok_or("target is not a qcow2 image")?;
            if target_is_zero && p.has("B") {
                return refuse_zero_target_with_backing();
            }
            copy::convert(dev.as_ref(), Target::Image(&q), &opts).map_err(|e| {
                convert_error_text(&e, || format!("error while writing '{dst}': {e}"))
            })?;
            bitmaps::copy(&image.qcow2, &q, &bitmaps)?;
            q.close()
                .map_err(|e| format!("error while writing '{dst}': {e}"))?;
        } else {
            // The new image replaces the file: no one may be using it (qemu-img's create lock),
            // and no one may start to until the new one is in place.
            let _replaced = lock_replaced(dst)
                .map_err(|e| format!("{dst}: error while converting qcow2: {e}"))?;
            copy::convert(dev.as_ref(), Target::NewFile(Path::new(dst)), &opts).map_err(|e| {
                convert_error_text(&e, || format!("error while converting qcow2: {e}"))
            })?;
            if bitmaps.as_ref().is_some_and(|b| !b.is_empty()) {
                let target = open_image(dst, Some("qcow2"), |o| o.writable = true)?;
                let q = target.qcow2.ok_or("target is not a qcow2 image")?;
                bitmaps::copy(&image.qcow2, &q, &bitmaps)?;
                q.close()
                    .map_err(|e| format!("error while writing '{dst}': {e}"))?;
            }
        }
    } else {
        let target = if exists {
            // A raw target shares everything, as in qemu-img.
            FileStorage::open_with(dst, true, Locking::Qemu.request(FileRole::Raw, true))
        } else {
            FileStorage::create(dst)
        }
        .map_err(|e| match lock_error(&e) {
            Some(_) if !exists => format!("{dst}: error while converting raw: {e}"),
            _ => format!("Could not open '{dst}': {e}"),
        })?;
        if p.has("bitmaps") {
            return Err("Format driver 'raw' does not support bitmaps".into());
        }
        let opts = ConvertOptions {
            format: TargetFormat::Raw,
            workers,
            zero_granularity,
            compress: false,
            target_is_zero: !exists || target_is_zero,
            progress,
        };
        if target_is_zero && p.has("B") {
            return refuse_zero_target_with_backing();
        }
        let target: Arc<dyn Storage> = Arc::new(target);
        copy::convert(dev.as_ref(), Target::Storage(target.clone()), &opts)
            .map_err(|e| convert_error_text(&e, || format!("error while converting raw: {e}")))?;
        target
            .flush()
            .map_err(|e| format!("error while flushing '{dst}': {e}"))?;
    }
    if show {
        print(1, 1);
        outln!();
    }
    Ok(())
}

/// `--bitmaps`: which bitmaps to copy, and copying them.
mod bitmaps {
    use crate::common::prog;
    use qcow2kit::format::bitmap::BitmapEntry;
    use qcow2kit::ops::convert::{bitmaps_to_copy, copy_bitmaps};
    use qcow2kit::Qcow2Image;
    use std::sync::Arc;

    fn text(e: qcow2kit::Error) -> String {
        match e {
            qcow2kit::Error::InvalidArgument(m) | qcow2kit::Error::Unsupported(m) => m,
            other => other.to_string(),
        }
    }

    /// The bitmaps of `src` to copy; warns of those skipped, refuses inconsistent ones unless
    /// `skip_broken`, with qemu-img's words.
    pub fn to_copy(src: &Qcow2Image, skip_broken: bool) -> Result<Vec<BitmapEntry>, String> {
        let (keep, skipped) = bitmaps_to_copy(src, skip_broken).map_err(|e| {
            format!(
                "{}\nTry --skip-broken-bitmaps, or use '{} bitmap --remove' to delete it",
                text(e),
                prog()
            )
        })?;
        for s in skipped {
            errln!("{}: warning: Skipping inconsistent bitmap '{s}'", prog());
        }
        Ok(keep)
    }

    /// Copies `which` (when `--bitmaps` was given) from `src` into `dst`.
    pub fn copy(
        src: &Option<Arc<Qcow2Image>>,
        dst: &Qcow2Image,
        which: &Option<Vec<BitmapEntry>>,
    ) -> Result<(), String> {
        match (src, which) {
            (Some(s), Some(w)) => copy_bitmaps(s, dst, w).map_err(text),
            _ => Ok(()),
        }
    }
}

/// Holds qemu-img create's lock on `dst` if it is an existing regular file (`None` otherwise:
/// opening anything else, a FIFO say, could block).
fn lock_replaced(dst: &str) -> std::io::Result<Option<FileStorage>> {
    match std::fs::metadata(dst) {
        Ok(m) if m.is_file() => {}
        _ => return Ok(None),
    }
    FileStorage::open_with(dst, false, Some(LockRequest::create())).map(Some)
}

/// Targets that cannot seek (`-`, a FIFO): the image is written in one forward pass.
mod stream {
    use qcow2kit::io::{FileStorage, Storage};
    use qcow2kit::ops::convert::is_zero;
    use qcow2kit::ops::create::create_qcow2_on;
    use qcow2kit::ops::create::CreateOptions;
    use qcow2kit::ops::stream::{write_qcow2_stream, StreamReader, StreamWriteOptions};
    use qcow2kit::BlockDevice;
    use qcow2kit::Format;
    use std::os::unix::fs::FileTypeExt;
    use std::sync::Arc;

    /// Whether `dst` names standard output (`-`) or a FIFO.
    pub fn is_stream_target(dst: &str) -> bool {
        dst == "-" || std::fs::metadata(dst).is_ok_and(|m| m.file_type().is_fifo())
    }

    /// Writes `src` as qcow2 to `dst` in one pass.
    pub fn write(
        src: &dyn BlockDevice,
        dst: &str,
        opts: &StreamWriteOptions,
    ) -> Result<(), String> {
        let result = if dst == "-" {
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
            write_qcow2_stream(src, &mut w, opts).and_then(|_| {
                std::io::Write::flush(&mut w)
                    .map_err(|e| qcow2kit::Error::io("writing the image stream", e))
            })
        } else {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(dst)
                .map_err(|e| format!("Could not open '{dst}': {e}"))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            write_qcow2_stream(src, &mut w, opts).and_then(|_| {
                std::io::Write::flush(&mut w)
                    .map_err(|e| qcow2kit::Error::io("writing the image stream", e))
            })
        };
        result
            .map(|_| ())
            .map_err(|e| format!("error while converting qcow2: {e}"))
    }

    /// Reads a qcow2 image from standard input (in one forward pass) into a new `fmt` image
    /// at `dst`; clusters of zeros are not written.
    pub fn read(dst: &str, fmt: Format, create: CreateOptions) -> Result<(), String> {
        let stdin = std::io::stdin();
        let mut input = std::io::BufReader::with_capacity(1 << 20, stdin.lock());
        let reader =
            StreamReader::open(&mut input).map_err(|e| format!("Could not open '-': {e}"))?;
        let size = reader.header().size;
        let fail = |e: qcow2kit::Error| format!("error while converting {}: {e}", fmt.name());
        let file = FileStorage::create(dst).map_err(|e| format!("Could not open '{dst}': {e}"))?;
        let storage: Arc<dyn Storage> = Arc::new(file);
        if fmt == Format::Qcow2 {
            let img = create_qcow2_on(storage.clone(), None, size, &create).map_err(fail)?;
            reader
                .copy_to(|off, data| {
                    if is_zero(data) {
                        Ok(())
                    } else {
                        img.write_at(data, off)
                    }
                })
                .map_err(fail)?;
            img.close().map_err(fail)?;
        } else {
            storage
                .set_len(size)
                .map_err(|e| fail(qcow2kit::Error::io("sizing target", e)))?;
            reader
                .copy_to(|off, data| {
                    if is_zero(data) {
                        return Ok(());
                    }
                    storage
                        .write_at(data, off)
                        .map_err(|e| qcow2kit::Error::io("writing target", e))
                })
                .map_err(fail)?;
        }
        storage
            .flush()
            .map_err(|e| format!("error while flushing '{dst}': {e}"))
    }
}
