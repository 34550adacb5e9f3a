//! qcow2's runtime options (`lazy-refcounts`, `overlap-check*`, the cache sizes, …), checked
//! as QEMU's qcow2 driver checks them when an image is opened or reopened, with its messages.
//!
//! Only the L2 cache size has an effect here. The others are accepted without one, which is
//! never less safe than QEMU: refcounts are always written at once (an image is never left
//! dirty, whatever `lazy-refcounts` says), every metadata overlap check stays on (whatever
//! `overlap-check` says), and the `pass-discard-*` choices change what the host file keeps,
//! not what the guest reads.

use super::qopts::{parse_bool, parse_number, parse_size, Opts};

/// What the checks need to know of the image.
pub(super) struct ImageFacts {
    /// Bytes per cluster.
    pub(super) cluster_size: u64,
    /// Guest size in bytes.
    pub(super) virtual_size: u64,
    /// Whether the image is encrypted.
    pub(super) encrypted: bool,
    /// qcow2 version (2 or 3).
    pub(super) version: u32,
}

/// The effect of the options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Qcow2Runtime {
    /// Bytes of L2 cache asked for (`cache-size`/`l2-cache-size`), when any was.
    pub(super) l2_cache_bytes: Option<u64>,
}

const BOOLS: &[&str] = &[
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
    "overlap-check.main-header",
    "overlap-check.active-l1",
    "overlap-check.active-l2",
    "overlap-check.refcount-table",
    "overlap-check.refcount-block",
    "overlap-check.snapshot-table",
    "overlap-check.inactive-l1",
    "overlap-check.inactive-l2",
    "overlap-check.bitmap-directory",
];
const SIZES: &[&str] = &[
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
];

/// qcow2's runtime options besides [`BOOLS`] and [`SIZES`].
const OTHERS: &[&str] = &[
    "cache-clean-interval",
    "overlap-check",
    "overlap-check.template",
];

/// Whether `key` is one of qcow2's runtime options.
pub(crate) fn is_runtime_key(key: &str) -> bool {
    key.starts_with("encrypt.") || BOOLS.iter().chain(SIZES).chain(OTHERS).any(|k| *k == key)
}

/// QEMU's smallest cluster size (`1 << MIN_CLUSTER_BITS`).
const MIN_CLUSTER: u64 = 512;
/// QEMU's default bound of the L2 cache.
const DEFAULT_L2_CACHE_MAX: u64 = 32 << 20;
/// Refcount blocks QEMU's refcount cache holds at least.
const MIN_REFCOUNT_CACHE: u64 = 4;
/// QEMU keeps cache entry counts in an `int`.
const INT_MAX: u64 = i32::MAX as u64;

/// Takes qcow2's runtime options out of `opts` and checks them as QEMU's
/// `qcow2_update_options_prepare` does; the first problem is returned in QEMU's words.
pub(super) fn take_qcow2_options(
    opts: &mut Opts,
    img: &ImageFacts,
) -> Result<Qcow2Runtime, String> {
    let mut set = std::collections::HashMap::new();
    for key in BOOLS.iter().chain(SIZES).chain(OTHERS) {
        if let Some(v) = opts.take(key) {
            set.insert(*key, v);
        }
    }
    let mut bools = std::collections::HashMap::new();
    for key in BOOLS {
        if let Some(v) = set.get(key) {
            bools.insert(*key, parse_bool(key, v)?);
        }
    }
    let mut sizes = std::collections::HashMap::new();
    for key in SIZES {
        if let Some(v) = set.get(key) {
            sizes.insert(*key, parse_size(key, v)?);
        }
    }
    let clean_interval = match set.get("cache-clean-interval") {
        Some(v) => Some(parse_number("cache-clean-interval", v)?),
        None => None,
    };
    let encrypt: Vec<String> = opts
        .keys()
        .filter(|k| k.starts_with("encrypt."))
        .map(str::to_string)
        .collect();
    // On an encrypted image the open checked `encrypt.format`; the other keys have no effect
    // on an opened image.
    let encrypt_format = opts.get("encrypt.format").map(str::to_string);
    for k in &encrypt {
        opts.take(k);
    }

    let l2_bytes = cache_sizes(&sizes, img)?;

    if clean_interval.is_some_and(|i| i > u64::from(u32::MAX)) {
        return Err("Cache clean interval too big".into());
    }
    if bools.get("lazy-refcounts") == Some(&true) && img.version < 3 {
        return Err(
            "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                .into(),
        );
    }
    let overlap = set.get("overlap-check").map(String::as_str);
    let template = set.get("overlap-check.template").map(String::as_str);
    if let (Some(o), Some(t)) = (overlap, template) {
        if o != t {
            return Err(format!(
                "Conflicting values for qcow2 options 'overlap-check' ('{o}') and \
                 'overlap-check.template' ('{t}')"
            ));
        }
    }
    if let Some(o) = overlap.or(template) {
        if !matches!(o, "none" | "constant" | "cached" | "all") {
            return Err(format!(
                "Unsupported value '{o}' for qcow2 option 'overlap-check'. Allowed are any of \
                 the following: none, constant, cached, all"
            ));
        }
    }
    if let Some(f) = encrypt_format.filter(|_| !img.encrypted) {
        return Err(format!(
            "No encryption in image header, but options specified format '{f}'"
        ));
    }
    Ok(Qcow2Runtime {
        l2_cache_bytes: l2_bytes,
    })
}

/// QEMU's `read_cache_sizes` and the limits checked after it; the L2 cache size asked for.
fn cache_sizes(
    sizes: &std::collections::HashMap<&str, u64>,
    img: &ImageFacts,
) -> Result<Option<u64>, String> {
    let cs = img.cluster_size;
    let combined = sizes.get("cache-size").copied();
    let l2_set = sizes.get("l2-cache-size").copied();
    let refcount_set = sizes.get("refcount-cache-size").copied();
    let entry_set = sizes.get("l2-cache-entry-size").copied();

    let l2_entries = img.virtual_size.div_ceil(cs);
    let max_l2_cache = l2_entries.saturating_mul(8).div_ceil(cs).saturating_mul(cs);
    let l2_max_setting = l2_set.unwrap_or(DEFAULT_L2_CACHE_MAX);
    let mut refcount = refcount_set.unwrap_or(0);
    let mut entry = entry_set.unwrap_or(cs);
    let mut l2 = max_l2_cache.min(l2_max_setting);

    if let Some(combined) = combined {
        if l2_set.is_some() && refcount_set.is_some() {
            return Err(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
                    .into(),
            );
        } else if l2_set.is_some() && l2_max_setting > combined {
            return Err("l2-cache-size may not exceed cache-size".into());
        } else if refcount > combined {
            return Err("refcount-cache-size may not exceed cache-size".into());
        }
        let min_refcount = MIN_REFCOUNT_CACHE * cs;
        if l2_set.is_some() {
            refcount = combined - l2.min(combined);
        } else if refcount_set.is_some() {
            l2 = combined - refcount;
        } else if combined >= max_l2_cache.saturating_add(min_refcount) {
            l2 = max_l2_cache;
            refcount = combined - l2;
        } else {
            refcount = combined.min(min_refcount);
            l2 = combined - refcount;
        }
    }
    if l2 < max_l2_cache && entry_set.is_none() {
        entry = cs.min(4096);
    }
    if entry < MIN_CLUSTER || entry > cs || !entry.is_power_of_two() {
        return Err(format!(
            "L2 cache entry size must be a power of two between {MIN_CLUSTER} and the cluster \
             size ({cs})"
        ));
    }
    if l2 / entry > INT_MAX {
        return Err("L2 cache size too big".into());
    }
    if refcount / cs > INT_MAX {
        return Err("Refcount cache size too big".into());
    }
    Ok((combined.is_some() || l2_set.is_some()).then_some(l2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &str) -> Result<Qcow2Runtime, String> {
        let mut o = Opts::default();
        o.parse_into(s).expect("valid syntax");
        let img = ImageFacts {
            cluster_size: 65536,
            virtual_size: 64 << 20,
            version: 3,
            encrypted: false,
        };
        take_qcow2_options(&mut o, &img)
    }

    #[test]
    fn qemu_limits() {
        assert!(check("lazy-refcounts=on,overlap-check=none").is_ok());
        assert_eq!(
            check("cache-size=1M,l2-cache-size=2M").unwrap_err(),
            "l2-cache-size may not exceed cache-size"
        );
        assert!(check("l2-cache-entry-size=33k").is_err());
        assert!(check("refcount-cache-size=256T").is_err());
        assert!(check("cache-clean-interval=-1").is_err());
        assert!(check("cache-clean-interval=4294967295").is_ok());
        assert_eq!(
            check("l2-cache-size=512k").map(|r| r.l2_cache_bytes),
            Ok(Some(65536))
        );
    }
}
