//! Sizing a new image before it is written (qemu-img `measure`).
//!
//! Given the creation options of the target and either a virtual size or a source device, gives
//! qemu-img's three figures: `required` (the file size the converted image needs at most),
//! `fully-allocated` (every cluster of the target allocated) and, for qcow2 targets of a qcow2
//! v3 source, `bitmaps` (room for the source's persistent bitmaps). The source is read only
//! through its allocation map ([`chain_status`]); no data is read.
//!
//! The arithmetic is qemu-img's, figure for figure: the qcow2 metadata of a fully allocated
//! image is one header cluster, the L2 and L1 tables rounded up to whole clusters, and the
//! refcount table and blocks that cover all of it and themselves; `required` removes from that
//! the data clusters the source does not allocate (a cluster with any data counts whole).

use crate::device::{chain_status, BlockDevice, ExtentKind};
use crate::error::{Error, Result};
use crate::format::bitmap::{entry_size, table_entries, BitmapEntry};
use crate::format::{MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS};
use crate::io::Storage;
use std::sync::Arc;

/// The target format of a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasureFormat {
    /// A raw image.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

/// The type of a creation option's value, as QEMU parses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OptType {
    Str,
    Bool,
    Number,
    Size,
}

/// The creation options of the file protocol, which every format's list includes.
const FILE_OPTIONS: &[(&str, OptType)] = &[
    ("size", OptType::Size),
    ("preallocation", OptType::Str),
    ("nocow", OptType::Bool),
    ("extent_size_hint", OptType::Size),
];

/// qcow2's own creation options.
const QCOW2_OPTIONS: &[(&str, OptType)] = &[
    ("compat", OptType::Str),
    ("backing_file", OptType::Str),
    ("backing_fmt", OptType::Str),
    ("data_file", OptType::Str),
    ("data_file_raw", OptType::Bool),
    ("encryption", OptType::Bool),
    ("encrypt.format", OptType::Str),
    ("encrypt.key-secret", OptType::Str),
    ("encrypt.cipher-alg", OptType::Str),
    ("encrypt.cipher-mode", OptType::Str),
    ("encrypt.ivgen-alg", OptType::Str),
    ("encrypt.ivgen-hash-alg", OptType::Str),
    ("encrypt.hash-alg", OptType::Str),
    ("encrypt.iter-time", OptType::Number),
    ("cluster_size", OptType::Size),
    ("extended_l2", OptType::Bool),
    ("lazy_refcounts", OptType::Bool),
    ("refcount_bits", OptType::Number),
    ("compression_type", OptType::Str),
];

fn bad(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// Whether `arg` is a well-formed `-o` argument for qemu-img: not empty, not starting with a
/// comma, and not ending in an odd number of commas (`,,` is an escaped comma).
pub fn is_valid_option_list(arg: &str) -> bool {
    if arg.is_empty() || arg.starts_with(',') {
        return false;
    }
    let trailing = arg.len() - arg.trim_end_matches(',').len();
    trailing % 2 == 0
}

/// Splits `key=value,key=value` at single commas; `,,` stands for a comma in a value. A part
/// without `=` is a flag set to `on`.
fn split_options(arg: &str) -> Vec<(String, String)> {
    crate::format::qemu_opts::split_option_list(arg)
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p, "on".to_string()),
        })
        .collect()
}

/// QEMU's boolean option values.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// QEMU's number option values: decimal, `0x` hexadecimal or `0` octal.
fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if v.len() > 1 && v.starts_with('0') {
        u64::from_str_radix(&v[1..], 8).ok()
    } else {
        v.parse().ok()
    }
}

/// Typed creation options of one target format (qemu-img's `-o`), the last value of a key
/// winning as in QEMU.
#[derive(Debug, Clone)]
pub struct CreationOptions {
    format: MeasureFormat,
    values: Vec<(String, String)>,
    secrets: Vec<String>,
}

impl CreationOptions {
    /// No options, for a target of `format`.
    pub fn new(format: MeasureFormat) -> Self {
        CreationOptions {
            format,
            values: Vec::new(),
            secrets: Vec::new(),
        }
    }

    /// Names the secrets that exist (qemu-img `--object secret,id=ID,…`): a LUKS target's
    /// `encrypt.key-secret` must be one of them.
    pub fn set_secrets(&mut self, ids: Vec<String>) {
        self.secrets = ids;
    }

    fn option_type(&self, key: &str) -> Option<OptType> {
        let own: &[(&str, OptType)] = match self.format {
            MeasureFormat::Raw => &[],
            MeasureFormat::Qcow2 => QCOW2_OPTIONS,
        };
        own.iter()
            .chain(FILE_OPTIONS)
            .find(|(k, _)| *k == key)
            .map(|(_, t)| *t)
    }

    /// Adds the options of one `-o` argument (already checked by [`is_valid_option_list`]),
    /// checking each name and value type the way QEMU's option parser does; `parse_size`
    /// reads sizes with suffixes. The error is the parser's message.
    pub fn add(&mut self, arg: &str, parse_size: impl Fn(&str) -> Option<u64>) -> Result<()> {
        for (k, v) in split_options(arg) {
            let t = self
                .option_type(&k)
                .ok_or_else(|| bad(format!("Invalid parameter '{k}'")))?;
            let ok = match t {
                OptType::Str => true,
                OptType::Bool => parse_bool(&v).is_some(),
                OptType::Number => parse_number(&v).is_some(),
                OptType::Size => parse_size(&v).is_some(),
            };
            if !ok {
                return Err(bad(match t {
                    OptType::Bool => format!("Parameter '{k}' expects 'on' or 'off'"),
                    OptType::Number => format!("Parameter '{k}' expects a number"),
                    _ => format!(
                        "Parameter '{k}' expects a non-negative number below 2^64\n\
                         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                         and exabytes, respectively."
                    ),
                }));
            }
            let v = match t {
                OptType::Size => parse_size(&v).unwrap_or(0).to_string(),
                OptType::Number => parse_number(&v).unwrap_or(0).to_string(),
                OptType::Bool => parse_bool(&v).unwrap_or(false).to_string(),
                OptType::Str => v,
            };
            self.values.push((k, v));
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn get_u64(&self, key: &str, default: u64) -> u64 {
        self.get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    fn get_bool(&self, key: &str) -> bool {
        self.get(key) == Some("true")
    }
}

/// The source of a measurement: the image to be converted.
pub struct MeasureSource<'a> {
    /// The image as the guest sees it, with its backing chain.
    pub device: &'a dyn BlockDevice,
    /// The persistent bitmaps of the top image when it can carry them (qcow2 v3); `None` for
    /// images that cannot (raw, qcow2 v2).
    pub bitmaps: Option<Vec<BitmapEntry>>,
    /// For each layer of the chain (the top first), the file its data clusters live in, when
    /// it is a qcow2 image keeping data in its own file: a data cluster over a hole of that
    /// file (metadata preallocation) reads as zeros and needs no room, as QEMU's block status
    /// finds by asking the file.
    pub data_files: Vec<Option<Arc<dyn Storage>>>,
}

impl std::fmt::Debug for MeasureSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeasureSource")
            .field("size", &self.device.size())
            .field("bitmaps", &self.bitmaps)
            .finish()
    }
}

/// qemu-img `measure`'s figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes the new image needs for the data the source holds (or, without a source, for an
    /// empty image), metadata for a fully allocated image included.
    pub required: u64,
    /// Bytes of the image with every cluster allocated.
    pub fully_allocated: u64,
    /// Bytes the source's persistent bitmaps would take, when both source and target can hold
    /// persistent bitmaps.
    pub bitmaps: Option<u64>,
}

fn overflow() -> Error {
    bad("The image size is too large (try using a larger cluster size)")
}

/// Bytes of refcount table and blocks that count `clusters` clusters and themselves
/// (QEMU's `qcow2_refcount_metadata_size` without the generous increase): the fixed point of
/// "blocks cover everything, the table covers the blocks".
pub(crate) fn refcount_metadata_size(
    clusters: u64,
    cluster_size: u64,
    refcount_order: u32,
) -> Option<u64> {
    let per_table_cluster = cluster_size / 8;
    let per_block = (cluster_size * 8) >> refcount_order;
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = clusters
            .checked_add(table)?
            .checked_add(blocks)?
            .div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters.checked_add(blocks)?.checked_add(table)?;
        if n == last {
            return (blocks + table).checked_mul(cluster_size);
        }
    }
}

/// Bytes of a fully allocated qcow2 image of `virtual_size` bytes (QEMU's
/// `qcow2_calc_prealloc_size`): header, L2 and L1 tables, refcount metadata and data.
pub(crate) fn qcow2_fully_allocated(
    virtual_size: u64,
    cluster_size: u64,
    refcount_order: u32,
    extended_l2: bool,
) -> Option<u64> {
    let l2e: u64 = if extended_l2 { 16 } else { 8 };
    let aligned = virtual_size.checked_next_multiple_of(cluster_size)?;
    let mut meta = cluster_size;
    let nl2e = (aligned / cluster_size).checked_next_multiple_of(cluster_size / l2e)?;
    meta = meta.checked_add(nl2e.checked_mul(l2e)?)?;
    let nl1e = (nl2e * l2e / cluster_size).checked_next_multiple_of(cluster_size / 8)?;
    meta = meta.checked_add(nl1e.checked_mul(8)?)?;
    let clusters = meta.checked_add(aligned)? / cluster_size;
    meta = meta.checked_add(refcount_metadata_size(
        clusters,
        cluster_size,
        refcount_order,
    )?)?;
    meta.checked_add(aligned)
}

/// Bytes the persistent bitmaps `bitmaps` of a disk of `disk_size` bytes take in a new image
/// with clusters of `cluster_size` bytes: every bitmap fully allocated, its table, and the
/// directory (QEMU's `qcow2_get_persistent_dirty_bitmap_size`).
pub(crate) fn bitmaps_size(
    bitmaps: &[BitmapEntry],
    disk_size: u64,
    cluster_size: u64,
) -> Option<u64> {
    let mut total = 0u64;
    let mut dir = 0u64;
    for b in bitmaps {
        let clusters = table_entries(disk_size, b.granularity_bits, cluster_size);
        total = total.checked_add(clusters.checked_mul(cluster_size)?)?;
        total = total.checked_add(
            clusters
                .checked_mul(8)?
                .checked_next_multiple_of(cluster_size)?,
        )?;
        dir = dir.checked_add(entry_size(b.name.len(), 0) as u64)?;
    }
    total.checked_add(dir.checked_next_multiple_of(cluster_size)?)
}

/// Bytes of the source's data clusters, for a target with clusters of `cluster_size` bytes:
/// every target cluster some layer of the chain holds data in counts whole; zeros and
/// unallocated ranges count nothing. `size` is the source's size.
fn allocated_bytes(src: &MeasureSource<'_>, size: u64, cluster_size: u64) -> Result<u64> {
    let mut required = 0u64;
    let mut offset = 0u64;
    while offset < size {
        let e = chain_status(src.device, offset, size - offset)?;
        if e.len == 0 {
            return Err(bad("Unable to get block status"));
        }
        let mut n = e.len;
        let mut data = e.kind == ExtentKind::Data;
        let file = src
            .data_files
            .get(e.depth as usize)
            .and_then(Option::as_ref);
        if let (true, Some(host), Some(file)) = (data, e.host_offset, file) {
            if let Some((is_data, end)) = file
                .data_run(host)
                .map_err(|err| Error::io("Unable to get block status", err))?
            {
                if end > host {
                    n = n.min(end - host);
                }
                data = is_data;
            }
        }
        if data {
            // The rest of the last cluster is taken with it: the next look starts after it.
            let end = offset
                .checked_add(n)
                .and_then(|x| x.checked_next_multiple_of(cluster_size))
                .ok_or_else(overflow)?;
            n = end - offset;
            required = required
                .checked_add(offset % cluster_size + n)
                .ok_or_else(overflow)?;
        }
        offset += n;
    }
    Ok(required)
}

/// Measures a new image of `format` with the creation options `opts`, of `size` bytes
/// (`--size`, which takes precedence over the `size` option) or converted from `source`.
pub fn measure(
    format: MeasureFormat,
    opts: &CreationOptions,
    size: Option<u64>,
    source: Option<&MeasureSource<'_>>,
) -> Result<Measurement> {
    let size = size.unwrap_or_else(|| opts.get_u64("size", 0));
    match format {
        MeasureFormat::Raw => {
            let required = match source {
                Some(s) => s.device.size().checked_next_multiple_of(512),
                None => size.checked_next_multiple_of(512),
            }
            .ok_or_else(overflow)?;
            Ok(Measurement {
                required,
                fully_allocated: required,
                bitmaps: None,
            })
        }
        MeasureFormat::Qcow2 => measure_qcow2(opts, size, source),
    }
}

/// Bytes of the LUKS header QEMU writes for the `encrypt.*` options: the 4 KiB header and
/// eight key slots, each the master key split into 4000 stripes, rounded up to 4 KiB (QEMU's
/// `qcrypto_block_calculate_payload_offset`). The cipher and mode give the key length; the key
/// secret must be named and exist.
fn luks_header_bytes(opts: &CreationOptions) -> Result<u64> {
    const STRIPES: u64 = 4000;
    const SLOTS: u64 = 8;
    const ALIGN: u64 = 4096;
    let alg = opts.get("encrypt.cipher-alg").unwrap_or("aes-256");
    let key: u64 = match alg {
        "aes-128" | "serpent-128" | "twofish-128" | "cast5-128" | "sm4" => 16,
        "aes-192" | "serpent-192" | "twofish-192" | "3des" => 24,
        "aes-256" | "serpent-256" | "twofish-256" => 32,
        "des" => 8,
        _ => {
            return Err(bad(format!(
                "Parameter 'cipher-alg' does not accept value '{alg}'"
            )))
        }
    };
    let key = match opts.get("encrypt.cipher-mode").unwrap_or("xts") {
        "xts" => key * 2,
        "cbc" | "ecb" | "ctr" => key,
        other => {
            return Err(bad(format!(
                "Parameter 'cipher-mode' does not accept value '{other}'"
            )))
        }
    };
    let Some(secret) = opts.get("encrypt.key-secret") else {
        return Err(bad("Parameter 'encrypt.key-secret' is required for cipher"));
    };
    if !opts.secrets.iter().any(|s| s == secret) {
        return Err(bad(format!("No secret with id '{secret}'")));
    }
    Ok(ALIGN + SLOTS * (STRIPES * key).next_multiple_of(ALIGN))
}

fn measure_qcow2(
    opts: &CreationOptions,
    size: u64,
    source: Option<&MeasureSource<'_>>,
) -> Result<Measurement> {
    let extended_l2 = opts.get_bool("extended_l2");
    let cs = opts.get_u64("cluster_size", 65536);
    if !cs.is_power_of_two()
        || !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cs.trailing_zeros())
    {
        return Err(bad(
            "Cluster size must be a power of two between 512 and 2048k",
        ));
    }
    if extended_l2 && cs < 512 * 32 {
        return Err(bad(
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
        ));
    }
    let version = match opts.get("compat") {
        None | Some("1.1") | Some("v3") => 3,
        Some("0.10") | Some("v2") => 2,
        Some(other) => return Err(bad(format!("Invalid compatibility level: '{other}'"))),
    };
    let refcount_bits = opts.get_u64("refcount_bits", 16);
    if refcount_bits > 64 || !refcount_bits.is_power_of_two() {
        return Err(bad(
            "Refcount width must be a power of two and may not exceed 64 bits",
        ));
    }
    if version < 3 && refcount_bits != 16 {
        return Err(bad("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)"));
    }
    let prealloc_all = match opts.get("preallocation") {
        None | Some("off") | Some("metadata") => false,
        Some("falloc") | Some("full") => true,
        Some(other) => return Err(bad(format!("invalid parameter value: {other}"))),
    };
    let has_backing = opts.get("backing_file").is_some();
    let luks_payload = if opts.get("encrypt.format") == Some("luks") {
        luks_header_bytes(opts)?
            .checked_next_multiple_of(cs)
            .ok_or_else(overflow)?
    } else {
        0
    };
    let l2e: u64 = if extended_l2 { 16 } else { 8 };
    let mut virtual_size = size.checked_next_multiple_of(cs).ok_or_else(overflow)?;
    let l2_tables = (virtual_size / cs).div_ceil(cs / l2e);
    if l2_tables.checked_mul(8).is_none_or(|b| b > MAX_L1_BYTES) {
        return Err(overflow());
    }
    let mut required = 0u64;
    if let Some(s) = source {
        let ssize = s.device.size();
        virtual_size = ssize.checked_next_multiple_of(cs).ok_or_else(overflow)?;
        required = if has_backing {
            // Nothing is known of what the new backing file shares: every cluster may be
            // written.
            virtual_size
        } else {
            allocated_bytes(s, ssize, cs)?
        };
    }
    if prealloc_all {
        required = virtual_size;
    }
    let fully_allocated = qcow2_fully_allocated(
        virtual_size,
        cs,
        refcount_bits.trailing_zeros(),
        extended_l2,
    )
    .and_then(|f| f.checked_add(luks_payload))
    .ok_or_else(overflow)?;
    let bitmaps = match source {
        Some(MeasureSource {
            bitmaps: Some(b),
            device,
            ..
        }) if version >= 3 => Some(bitmaps_size(b, device.size(), cs).ok_or_else(overflow)?),
        _ => None,
    };
    Ok(Measurement {
        required: fully_allocated - virtual_size + required,
        fully_allocated,
        bitmaps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2(size: u64, o: &str) -> Result<Measurement> {
        let mut opts = CreationOptions::new(MeasureFormat::Qcow2);
        if !o.is_empty() {
            opts.add(o, |v| v.parse().ok())?;
        }
        measure(MeasureFormat::Qcow2, &opts, Some(size), None)
    }

    #[test]
    fn figures_of_qemu_iotest_178() {
        // (size, required, fully allocated) as qemu-img 10 prints them.
        for (size, req, full) in [
            (0u64, 196_608u64, 196_608u64),
            (2 << 30, 589_824, 2_148_073_472),
            (64 << 30, 10_747_904, 68_730_224_640),
            (1 << 40, 168_034_304, 1_099_679_662_080),
            (2 << 50, 343_650_009_088, 2_252_143_463_694_336),
        ] {
            let m = qcow2(size, "").unwrap();
            assert_eq!((m.required, m.fully_allocated), (req, full), "{size}");
            assert_eq!(m.bitmaps, None);
        }
        assert!(qcow2(7 << 60, "").is_err());
    }

    #[test]
    fn options_are_checked_as_qemu_does() {
        let mut o = CreationOptions::new(MeasureFormat::Raw);
        assert!(o.add("cluster_size=65536", |v| v.parse().ok()).is_err());
        let mut o = CreationOptions::new(MeasureFormat::Qcow2);
        assert!(o.add("extended_l2=maybe", |v| v.parse().ok()).is_err());
        assert!(o.add("refcount_bits=x", |v| v.parse().ok()).is_err());
        assert!(qcow2(1 << 30, "cluster_size=1000").is_err());
        assert!(qcow2(1 << 30, "compat=0.10,refcount_bits=8").is_err());
        assert!(qcow2(1 << 30, "preallocation=foo").is_err());
        assert!(!is_valid_option_list(","));
        assert!(!is_valid_option_list("a=1,"));
        assert!(is_valid_option_list("a=1,,"));
        assert_eq!(
            split_options("backing_file=a,,b,compat=v3"),
            vec![
                ("backing_file".to_string(), "a,b".to_string()),
                ("compat".to_string(), "v3".to_string())
            ]
        );
    }
}
