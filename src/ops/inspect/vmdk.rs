//! VMDK: the sparse extent header (`KDMV`), its embedded descriptor, the stream-optimized
//! footer, legacy `COWD` extents and text descriptor files.
//!
//! OpenStack's `format_inspector` accepts only the `monolithicSparse` and `streamOptimized`
//! subformats (the others keep their data in files the descriptor names), refuses descriptor lines
//! it does not understand, extent lines containing `/`, descriptors without extents, and a
//! stream-optimized footer that disagrees with the header. qcow2kit also requires a sparse
//! file's descriptor to name exactly one `SPARSE` extent (the file itself: qemu reads a sparse
//! file as its own single extent, but another reader follows the descriptor), and reports a
//! `parentFileNameHint` as a backing file, which qemu opens.

use super::source::{le, Source};
use super::{FormatFacts, Violation};
use crate::error::Result;
use crate::format::probe::Format;

/// Where a sparse extent's descriptor must start (qemu and OpenStack agree).
const DESC_OFFSET: u64 = 0x200;
/// Largest descriptor read, in bytes.
const DESC_MAX: u64 = (1 << 20) - 1;
/// Grain directory offset meaning "look in the footer" (stream-optimized images).
const GD_AT_END: u64 = u64::MAX;
/// Bytes at the end of a stream-optimized file: footer marker, footer, end-of-stream marker.
pub(super) const FOOTER_BYTES: usize = 1536;

/// The parsed lines of a descriptor.
#[derive(Default)]
struct Descriptor {
    create_type: Option<String>,
    parent: Option<Vec<u8>>,
    /// Extent lines, lower-cased.
    extents: Vec<String>,
}

/// The fixed fields of a `KDMV` header.
struct SparseHeader {
    version: u64,
    capacity: u64,
    desc_offset: u64,
    desc_size: u64,
    gd_offset: u64,
}

fn sparse_header(b: &[u8]) -> Option<SparseHeader> {
    Some(SparseHeader {
        version: le(b, 4, 4)?,
        capacity: le(b, 12, 8)?,
        desc_offset: le(b, 28, 8)?,
        desc_size: le(b, 36, 8)?,
        gd_offset: le(b, 56, 8)?,
    })
}

/// VMDK facts from the file's head (its first 2 MiB), and its tail for a footer.
pub(super) fn facts(src: &mut dyn Source, head: &[u8]) -> Result<FormatFacts> {
    let mut f = FormatFacts::new(Format::Vmdk);
    if head.starts_with(b"COWD") {
        f.subformat = Some("vmdk3".into());
        f.virtual_size = le(head, 12, 4).map(|s| s * 512);
        f.findings
            .push(Violation::VmdkSubformat("vmdk3 (COWD extent)".into()));
        return Ok(f);
    }
    if !head.starts_with(b"KDMV") {
        // A text descriptor file: the extents it names hold the data.
        let text = &head[..head.len().min(DESC_MAX as usize)];
        let desc = parse(text, &mut f.findings);
        f.virtual_size = desc.extents.iter().try_fold(0u64, |acc, e| {
            let sectors: u64 = e.split(' ').nth(1)?.parse().ok()?;
            acc.checked_add(sectors.checked_mul(512)?)
        });
        finish(&mut f, desc);
        return Ok(f);
    }
    let Some(h) = sparse_header(head) else {
        return Ok(malformed(f, "truncated sparse extent header"));
    };
    f.virtual_size = h.capacity.checked_mul(512);
    if !(1..=3).contains(&h.version) {
        return Ok(malformed(f, &format!("unsupported version {}", h.version)));
    }
    if h.desc_offset.checked_mul(512) != Some(DESC_OFFSET) {
        return Ok(malformed(f, "descriptor not at sector 1"));
    }
    let size = h.desc_size.saturating_mul(512).min(DESC_MAX) as usize;
    let text = head
        .get(DESC_OFFSET as usize..)
        .map_or(&[][..], |d| &d[..d.len().min(size)]);
    let text = &text[..text.iter().position(|&b| b == 0).unwrap_or(text.len())];
    let desc = parse(text, &mut f.findings);
    let own = desc.extents.len() == 1 && desc.extents[0].split(' ').nth(2) == Some("sparse");
    if !desc.extents.is_empty() && !own {
        f.findings.push(Violation::VmdkExtent(
            "a sparse extent's descriptor names extents other than itself".into(),
        ));
    }
    finish(&mut f, desc);
    if h.gd_offset == GD_AT_END {
        if let Some(tail) = src.tail(FOOTER_BYTES)? {
            if let Err(why) = check_footer(&h, &tail) {
                f.findings.push(Violation::VmdkFooter(why));
            }
        }
    }
    Ok(f)
}

fn malformed(mut f: FormatFacts, why: &str) -> FormatFacts {
    f.findings.push(Violation::Malformed {
        format: Format::Vmdk,
        reason: why.to_string(),
    });
    f
}

/// Records the create type, the parent and the descriptor-level rules.
fn finish(f: &mut FormatFacts, desc: Descriptor) {
    if let Some(p) = desc.parent {
        f.findings.push(Violation::BackingFile { name: Some(p) });
    }
    match desc.create_type.as_deref() {
        Some("monolithicsparse" | "streamoptimized") => {}
        Some(t) => f.findings.push(Violation::VmdkSubformat(t.to_string())),
        None => f
            .findings
            .push(Violation::VmdkSubformat("no createType".into())),
    }
    f.subformat = desc.create_type;
    for e in &desc.extents {
        if e.contains('/') {
            f.findings.push(Violation::VmdkExtent(e.clone()));
        }
    }
    if desc.extents.is_empty() {
        f.findings
            .push(Violation::VmdkDescriptor("no extents found".into()));
    }
}

/// Parses descriptor text as OpenStack does: every non-blank line must be a comment, a `ddb`
/// line, a `key=value` header field or an extent line (`rw`, `rdonly`, `noaccess`).
fn parse(text: &[u8], findings: &mut Vec<Violation>) -> Descriptor {
    let mut d = Descriptor::default();
    if !text.is_ascii() {
        findings.push(Violation::VmdkDescriptor("descriptor is not ASCII".into()));
        return d;
    }
    let lower = String::from_utf8_lossy(text).to_ascii_lowercase();
    let original = String::from_utf8_lossy(text);
    for (line, orig) in lower.split('\n').zip(original.split('\n')) {
        let (line, orig) = (line.trim(), orig.trim());
        if line.is_empty() || line.starts_with('#') || line.starts_with("ddb") {
            continue;
        }
        let key = line.split('=').next().unwrap_or("");
        if line.contains('=') && !key.contains(' ') {
            let value = orig[key.len() + 1..].trim_matches('"');
            match key {
                "createtype" => d.create_type = Some(value.to_ascii_lowercase()),
                "parentfilenamehint" if !value.is_empty() => {
                    d.parent = Some(value.as_bytes().to_vec())
                }
                _ => {}
            }
        } else if matches!(line.split(' ').next(), Some("rw" | "rdonly" | "noaccess")) {
            d.extents.push(line.to_string());
        } else {
            let shown: String = line.chars().take(64).collect();
            findings.push(Violation::VmdkDescriptor(format!(
                "unsupported line '{shown}'"
            )));
            return Descriptor::default();
        }
    }
    d
}

/// A stream-optimized file's last three sectors: a footer marker, a copy of the header that
/// agrees with the first one, and an end-of-stream marker.
fn check_footer(h: &SparseHeader, tail: &[u8]) -> std::result::Result<(), String> {
    if tail.len() < FOOTER_BYTES {
        return Err("file too short for a footer".into());
    }
    let marker_ok = |m: &[u8], ty: u64, val_zero: bool| {
        le(m, 8, 4) == Some(0)
            && le(m, 12, 4) == Some(ty)
            && m[16..512].iter().all(|&b| b == 0)
            && (!val_zero || le(m, 0, 8) == Some(0))
    };
    if !marker_ok(&tail[..512], 3, false) {
        return Err("footer marker is invalid".into());
    }
    let footer = &tail[512..1024];
    let Some(fh) = sparse_header(footer).filter(|_| footer.starts_with(b"KDMV")) else {
        return Err("header and footer signatures do not match".into());
    };
    if fh.version != h.version {
        return Err("header and footer versions do not match".into());
    }
    if (fh.desc_offset, fh.desc_size) != (h.desc_offset, h.desc_size) {
        return Err("footer names a different descriptor than the header".into());
    }
    if fh.gd_offset == GD_AT_END {
        return Err("footer points to another footer".into());
    }
    if !marker_ok(&tail[1024..], 0, true) {
        return Err("end-of-stream marker is invalid".into());
    }
    Ok(())
}
