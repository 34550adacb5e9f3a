//! Opening, closing and reopening the image qemu-io works on (the command line's FILE or
//! `--image-opts`, and the `open`, `close` and `reopen` commands), with qemu-io 10's messages.
//! A `json:{…}` name stands for its flattened options ([`crate::json_name`]); options given
//! beside it (`-f`, `open -o`) win over the name's own, as in QEMU.
//!
//! Block options (`-o`) understood: `driver` (qcow2, raw), `file.filename`, `file.driver`
//! (`file`), `file.locking`, `data-file.filename` and `data-file.driver` (`file`), `read-only`,
//! `force-share`, `backing` (empty: no backing file), `backing.driver` (the backing file's own
//! format), `discard`, `node-name`, `file.node-name`, `backing.node-name`, `cache.direct`,
//! `cache.no-flush` and `auto-read-only` (no effect here), qcow2's runtime options
//! ([`super::qcow2_opts`]), and the blkdebug filter on the file or the data file
//! ([`super::blkdebug`]). Anything else QEMU would take (`backing.*`, other drivers) is refused
//! with a message naming it.

use super::blkdebug::Filters;
use super::qcow2_opts::{take_qcow2_options, ImageFacts, Qcow2Runtime};
use super::qopts::{parse_bool, Opts};
use qcow2kit::chain::{open, probe_file, BackingPolicy, Locking, Opened, FORCE_SHARE_WRITABLE};
use qcow2kit::Format;
use qcow2kit::{BlockDevice, Qcow2Image};
use std::path::Path;
use std::sync::Arc;

/// How to open an image: the name and options as given, and the mode.
#[derive(Clone, Debug)]
pub(super) struct OpenSpec {
    /// The file name operand (`None`: the file is named by `file.filename`).
    pub(super) name: Option<String>,
    /// The block options the user gave (explicit options, kept for `reopen`).
    pub(super) opts: Opts,
    /// Open read-only (`-r`).
    pub(super) read_only: bool,
    /// Share everything with other users of the file (`-U`).
    pub(super) force_share: bool,
}

/// The open image.
#[derive(Clone)]
pub(super) struct Image {
    /// The image with its chain.
    pub(super) dev: Arc<dyn BlockDevice>,
    /// The same image when it is qcow2.
    pub(super) qcow2: Option<Arc<Qcow2Image>>,
    /// The driver it was opened with: its format's name, or a protocol's (`file`, …).
    pub(super) driver: String,
    /// Opened without write access.
    pub(super) read_only: bool,
    /// Every write is followed by a flush (cache mode writethrough or directsync).
    pub(super) writethrough: bool,
    /// Discards reach the image (`-d unmap`, the default); `-d ignore` drops them.
    pub(super) unmap: bool,
    /// How it was opened.
    pub(super) spec: OpenSpec,
    /// The qcow2 runtime options in effect.
    pub(super) runtime: Qcow2Runtime,
    /// The format of its backing file, when it has one open.
    pub(super) backing_format: Option<Format>,
    /// Its blkdebug filters.
    pub(super) filters: Filters,
}

/// A cache mode (`-t`, `-c`): whether it is writethrough, or QEMU's message.
pub(super) fn parse_cache(mode: &str) -> Result<bool, String> {
    match mode {
        "writethrough" | "directsync" => Ok(true),
        "none" | "off" | "writeback" | "unsafe" => Ok(false),
        other => Err(format!("Invalid cache option: {other}")),
    }
}

/// A discard mode (`-d`, `discard=`): whether discards reach the image.
pub(super) fn parse_discard(mode: &str) -> Option<bool> {
    match mode {
        "on" | "unmap" => Some(true),
        "off" | "ignore" => Some(false),
        _ => None,
    }
}

/// What went wrong opening: a reason for `can't open device NAME: REASON`, or a message
/// printed as it is (qemu-io's checks before it tries to open).
pub(super) enum OpenError {
    Reason(String),
    Plain(String),
}

impl From<String> for OpenError {
    fn from(s: String) -> Self {
        OpenError::Reason(s)
    }
}

/// The `--object secret,…` definitions of the command line, which `encrypt.key-secret` names.
static SECRETS: std::sync::OnceLock<qcow2kit::crypto::secret::Secrets> = std::sync::OnceLock::new();

/// Records the command line's secrets (once, at start).
pub(super) fn set_secrets(s: qcow2kit::crypto::secret::Secrets) {
    let _ = SECRETS.set(s);
}

/// The key options (`encrypt.key-secret`, `encrypt.format`) taken out of `opts`.
fn take_encryption(opts: &mut Opts) -> Result<qcow2kit::engine::EncryptionOptions, String> {
    let mut enc = qcow2kit::engine::EncryptionOptions::default();
    if let Some(id) = opts.take("encrypt.key-secret") {
        let secrets = SECRETS.get_or_init(Default::default);
        let pw = secrets.get(&id).map_err(|e| e.to_string())?;
        enc.passphrase = Some(qcow2kit::crypto::Passphrase::new(pw));
    }
    if let Some(f) = opts.take("encrypt.format") {
        enc.format = Some(
            qcow2kit::crypto::EncryptionFormat::from_name(&f)
                .ok_or_else(|| format!("Parameter 'encrypt.format' does not accept value '{f}'"))?,
        );
    }
    Ok(enc)
}

/// Opens the image `spec` describes; `writethrough` and `unmap` are the cache and discard
/// modes of the command.
pub(super) fn open_image(
    spec: &OpenSpec,
    writethrough: bool,
    unmap: bool,
) -> Result<Image, OpenError> {
    let mut opts = spec.opts.clone();
    // A `json:{…}` name is its options; options given beside it win (QEMU's join).
    let mut name = spec.name.clone();
    if let Some(json) = name.as_deref().and_then(crate::json_name::options_of) {
        for (k, v) in json? {
            if opts.get(&k).is_none() {
                opts.set(&k, v);
            }
        }
        name = None;
    }
    if let Some(k) = structural_key(&opts) {
        let driver = opts.get("driver").unwrap_or("qcow2");
        return Err(crate::image_opts::unsupported_option(driver, k).into());
    }
    if spec.force_share {
        if opts.get("force-share").is_some_and(|v| v != "on") {
            return Err(OpenError::Plain("-U conflicts with image options".into()));
        }
        opts.set("force-share", "on".into());
    }
    let driver = opts.take("driver");
    if let Some(d) = &driver {
        crate::image_opts::check_driver("driver", d)?;
    }
    if let Some(proto) = driver.as_deref().filter(|d| PROTOCOLS.contains(d)) {
        return open_protocol(name, spec, proto, opts, writethrough, unmap);
    }
    let blkdebug = super::blkdebug::take_blkdebug(&mut name, &mut opts)?;
    if let Some(d) = opts.take("file.driver") {
        crate::image_opts::check_driver("file.driver", &d)?;
    }
    let file_name = opts.take("file.filename");
    let path = match (&name, file_name) {
        (Some(_), Some(_)) => {
            return Err(
                "Can't specify 'file' and 'filename' options at the same time"
                    .to_string()
                    .into(),
            )
        }
        (Some(n), None) => n.clone(),
        (None, Some(f)) => f,
        (None, None) if driver.is_some() => {
            return Err("A block device must be specified for \"file\""
                .to_string()
                .into())
        }
        (None, None) => return Err("Must specify either driver or file".to_string().into()),
    };
    let mut qopts = crate::common::qemu_options();
    qopts.qcow2.encryption = take_encryption(&mut opts)?;
    let locking = match opts.take("file.locking").as_deref() {
        None | Some("auto" | "on") => Locking::Qemu,
        Some("off") => Locking::Off,
        Some(v) => return Err(format!("invalid parameter value: {v}").into()),
    };
    let read_only = match opts.take("read-only") {
        Some(v) => match (parse_bool("read-only", &v)?, spec.read_only) {
            (true, false) => return Err("Block node is read-only".to_string().into()),
            (ro, _) => ro,
        },
        None => spec.read_only,
    };
    let force_share = match opts.take("force-share") {
        Some(v) => parse_bool("force-share", &v)?,
        None => false,
    };
    if force_share && !read_only {
        return Err(FORCE_SHARE_WRITABLE.to_string().into());
    }
    let unmap = match opts.take("discard") {
        Some(v) => parse_discard(&v).ok_or_else(|| "Invalid discard option".to_string())?,
        None => unmap,
    };
    for key in NO_EFFECT_BOOLS {
        if let Some(v) = opts.take(key) {
            parse_bool(key, &v)?;
        }
    }
    opts.take("node-name");
    opts.take("file.node-name");
    let backing_node_name = opts.take("backing.node-name");
    let backing_driver = opts.take("backing.driver");
    // The backing file named again by options: only the file the image names is supported.
    let backing_file = opts.take("backing.file.filename");
    if let Some(d) = opts.take("backing.file.driver") {
        crate::image_opts::check_driver("backing.file.driver", &d)?;
    }
    if let Some(id) = opts.take("backing.encrypt.key-secret") {
        let secrets = SECRETS.get_or_init(Default::default);
        let pw = secrets.get(&id).map_err(|e| e.to_string())?;
        qopts.backing_encryption = vec![qcow2kit::engine::EncryptionOptions {
            passphrase: Some(qcow2kit::crypto::Passphrase::new(pw)),
            ..Default::default()
        }];
    }
    match opts.take("backing").as_deref() {
        None => {}
        Some(crate::json_name::NULL) => qopts.backing = BackingPolicy::Ignore,
        Some("") => {
            crate::image_opts::warn_empty_backing();
            qopts.backing = BackingPolicy::Ignore;
        }
        Some(node) => {
            return Err(format!(
                "Could not open backing file: Cannot find device='{node}' nor node-name='{node}'"
            )
            .into())
        }
    }
    if let Some(node) = opts.take("data-file") {
        return Err(format!("Cannot find device='{node}' nor node-name='{node}'").into());
    }
    if let Some(f) = opts.take("data-file.filename") {
        qopts.data_file = Some(f.into());
    }
    if let Some(d) = opts.take("data-file.driver") {
        crate::image_opts::check_driver("data-file.driver", &d)?;
    }
    if let Some(k) = opts
        .keys()
        .find(|k| k.starts_with("backing.") || *k == "data-file" || k.starts_with("data-file."))
    {
        return Err(format!("Option '{k}' is not supported by qcow2kit").into());
    }

    let format = match driver.as_deref() {
        Some(d) => Format::openable(d.as_bytes()).map_err(|_| format!("Unknown driver '{d}'"))?,
        None => {
            let f = probe_file(Path::new(&path)).map_err(|e| lib_error(&path, e))?;
            if f == Format::Raw {
                errln!(
                    "WARNING: Image format was not specified for '{path}' and probing guessed raw.\n         \
                     Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         \
                     Specify the 'raw' format explicitly to remove the restrictions."
                );
            }
            f
        }
    };
    if format == Format::Raw && qopts.data_file.is_some() {
        return Err(unsupported_option(format, "data-file.filename").into());
    }
    qopts.writable = !read_only;
    qopts.locking = if force_share {
        Locking::ForceShare
    } else {
        locking
    };
    let filters = match blkdebug.interpose() {
        Some((hook, filters)) => {
            qopts.interpose = Some(hook);
            filters
        }
        None => Filters::default(),
    };
    let opened = open(Path::new(&path), format, &qopts).map_err(|e| lib_error(&path, e))?;

    let runtime = match &opened.qcow2 {
        Some(q) => {
            let h = q.header();
            let facts = ImageFacts {
                cluster_size: q.cluster_size(),
                virtual_size: h.size,
                version: h.version,
                encrypted: q.encryption().is_some(),
            };
            let checked = take_qcow2_options(&mut opts, &facts);
            let runtime = match checked {
                Ok(r) => r,
                Err(e) => {
                    close_opened(&opened);
                    return Err(e.into());
                }
            };
            if let Some(k) = opts.keys().next() {
                close_opened(&opened);
                return Err(unsupported_option(format, k).into());
            }
            runtime
        }
        None => {
            if let Some(k) = opts.keys().next() {
                return Err(unsupported_option(format, k).into());
            }
            Qcow2Runtime::default()
        }
    };
    let backing_format = opened.layers.get(1).map(|l| l.format);
    if let Some(want) = backing_file {
        if let Err(e) = crate::image_opts::check_backing_file(&opened, &want) {
            close_opened(&opened);
            return Err(e.into());
        }
    }
    let checked = match (backing_driver, backing_node_name) {
        (Some(d), _) => crate::image_opts::check_backing_driver(&opened, &d),
        (None, Some(_)) if backing_format.is_none() => {
            Err("Could not open backing file: Must specify either driver or file".to_string())
        }
        _ => Ok(()),
    };
    if let Err(e) = checked {
        close_opened(&opened);
        return Err(e.into());
    }
    let opened = match runtime.l2_cache_bytes {
        Some(bytes) => {
            close_opened(&opened);
            drop(opened);
            qopts.qcow2.l2_cache_bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
            open(Path::new(&path), format, &qopts).map_err(|e| lib_error(&path, e))?
        }
        None => opened,
    };
    Ok(Image {
        dev: opened.device.clone(),
        qcow2: opened.qcow2.clone(),
        driver: format.name().to_string(),
        read_only,
        writethrough,
        unmap,
        spec: spec.clone(),
        runtime,
        backing_format,
        filters,
    })
}

/// Options of the node QEMU takes that change nothing here: `cache.direct` (the host page
/// cache is a matter of speed), `cache.no-flush` (flushes are always done, which is never less
/// safe) and `auto-read-only`.
pub(super) const NO_EFFECT_BOOLS: &[&str] = &["cache.direct", "cache.no-flush", "auto-read-only"];

/// QEMU's protocol drivers that open a file's bytes as the image (`driver=file,filename=…`).
pub(super) const PROTOCOLS: &[&str] = &["file", "host_device", "host_cdrom"];

/// Opens the bytes of a file through a protocol driver, with QEMU's checks of the file's type:
/// `file` takes regular files, `host_device` and `host_cdrom` devices (block devices only
/// here: a character device is refused).
fn open_protocol(
    name: Option<String>,
    spec: &OpenSpec,
    proto: &str,
    mut opts: Opts,
    writethrough: bool,
    unmap: bool,
) -> Result<Image, OpenError> {
    let name = match (&name, opts.take("filename")) {
        (Some(n), None) => n.clone(),
        (None, Some(f)) => f,
        (Some(_), Some(_)) => {
            return Err(
                "Can't specify 'file' and 'filename' options at the same time"
                    .to_string()
                    .into(),
            )
        }
        (None, None) => {
            return Err(format!("The '{proto}' block driver requires a file name").into())
        }
    };
    let locking = match opts.take("locking").as_deref() {
        None | Some("auto" | "on") => Locking::Qemu,
        Some("off") => Locking::Off,
        Some(v) => return Err(format!("invalid parameter value: {v}").into()),
    };
    opts.take("node-name");
    if let Some(k) = opts.keys().next() {
        return Err(format!("Block protocol '{proto}' doesn't support the option '{k}'").into());
    }
    let meta = std::fs::metadata(&name).map_err(|e| io_text(&name, &e))?;
    let ft = meta.file_type();
    // QEMU opens the file first (a directory fails to open for writing), then checks its type.
    if ft.is_dir() && !spec.read_only {
        let e = std::io::Error::from_raw_os_error(21);
        return Err(io_text(&name, &e).into());
    }
    use std::os::unix::fs::FileTypeExt;
    let fits = if proto == "file" {
        ft.is_file()
    } else {
        ft.is_block_device() || ft.is_char_device()
    };
    if !fits {
        let want = if proto == "file" {
            "a regular file"
        } else {
            "either a character or block device"
        };
        return Err(format!("'{proto}' driver requires '{name}' to be {want}").into());
    }
    if ft.is_char_device() {
        return Err(format!("Character device '{name}' is not supported by qcow2kit").into());
    }
    let mut qopts = crate::common::qemu_options();
    qopts.writable = !spec.read_only;
    qopts.locking = if spec.force_share {
        Locking::ForceShare
    } else {
        locking
    };
    let opened = open(Path::new(&name), Format::Raw, &qopts).map_err(|e| lib_error(&name, e))?;
    Ok(Image {
        dev: opened.device.clone(),
        qcow2: None,
        driver: proto.to_string(),
        read_only: spec.read_only,
        writethrough,
        unmap,
        spec: spec.clone(),
        runtime: Qcow2Runtime::default(),
        backing_format: None,
        filters: Filters::default(),
    })
}

/// QEMU's `Could not open 'NAME': REASON` for an error of the operating system.
fn io_text(name: &str, e: &std::io::Error) -> String {
    format!("Could not open '{name}': {}", qcow2kit::error::strerror(e))
}

/// QEMU's message for an option no part of the image takes.
fn unsupported_option(format: Format, key: &str) -> String {
    crate::image_opts::unsupported_option(format.name(), key)
}

/// The first option whose value has no text form (a JSON `null`, `{}` or `[]`), but for
/// `backing: null`: no option takes such a value.
fn structural_key(opts: &Opts) -> Option<&str> {
    opts.iter()
        .find(|(k, v)| {
            crate::json_name::is_structural(v) && !(*k == "backing" && *v == crate::json_name::NULL)
        })
        .map(|(k, _)| k)
}

/// A library error met opening `path`, in QEMU's words.
fn lib_error(path: &str, e: qcow2kit::Error) -> String {
    match e {
        qcow2kit::Error::Io { source, context } => {
            let s = source.to_string();
            let s = s.rfind(" (os error ").map_or(s.as_str(), |i| &s[..i]);
            // The file that failed to open (a data file, say) when the library names it.
            let file = context
                .strip_prefix("opening '")
                .and_then(|c| c.strip_suffix('\''))
                .unwrap_or(path);
            format!("Could not open '{file}': {s}")
        }
        qcow2kit::Error::InvalidArgument(m) => m,
        other => crate::common::open_error_text(&other),
    }
}

/// Closes an image that is being given up because of a bad option (nothing was written).
fn close_opened(o: &Opened) {
    let _ = match &o.qcow2 {
        Some(q) => q.close(),
        None => o.device.flush(),
    };
}

/// Flushes and closes the image. An image marked corrupt while open is closed silently, as by
/// qemu-io: the corruption was reported when it was found, and nothing more is written.
pub(super) fn close_image(img: Image) -> Result<(), String> {
    let closed = match &img.qcow2 {
        Some(q) => q.close(),
        None => img.dev.flush(),
    };
    let marked = img.qcow2.as_ref().is_some_and(|q| {
        q.header()
            .incompatible
            .contains(qcow2kit::format::features::IncompatibleFeatures::CORRUPT)
    });
    match (closed, marked) {
        (Err(e), false) => Err(e.to_string()),
        _ => Ok(()),
    }
}
