//! VDI, QED, LUKS, Parallels, Bochs, cloop and DMG: one header each, at the head (DMG: at the
//! tail). OpenStack's `format_inspector` reads VDI, QED (to ban it) and LUKS; the rest it does
//! not know, so an upload carrying them would pass there as raw data.

use super::source::{be, le, Source};
use super::{FormatFacts, Violation};
use crate::error::Result;
use crate::format::probe::Format;

fn malformed(f: &mut FormatFacts, reason: impl Into<String>) {
    f.findings.push(Violation::Malformed {
        format: f.format,
        reason: reason.into(),
    });
}

/// VDI: the disk size at 0x170, rounded down to whole sectors as qemu does; a link or parent
/// UUID makes a differencing image.
pub(super) fn vdi(head: &[u8]) -> FormatFacts {
    let mut f = FormatFacts::new(Format::Vdi);
    let Some(size) = le(head, 0x170, 8) else {
        malformed(&mut f, "truncated header");
        return f;
    };
    f.virtual_size = Some(size / 512 * 512);
    f.subformat = match le(head, 0x4c, 4) {
        Some(1) => Some("dynamic".into()),
        Some(2) => Some("static".into()),
        _ => None,
    };
    let uuid_set = |off: usize| {
        head.get(off..off + 16)
            .is_some_and(|u| u.iter().any(|&b| b != 0))
    };
    if uuid_set(0x1a8) || uuid_set(0x1b8) {
        f.findings.push(Violation::BackingFile { name: None });
    }
    f
}

/// QED feature bits qemu knows: backing file, needs check, backing format not probed.
const QED_FEATURES: u64 = 0x7;

/// QED: the image size at 48; feature bit 0 names a backing file (its name inside the header
/// clusters).
pub(super) fn qed(src: &mut dyn Source, head: &[u8]) -> Result<FormatFacts> {
    let mut f = FormatFacts::new(Format::Qed);
    let field = |off, n| le(head, off, n);
    let (Some(cluster), Some(header_clusters), Some(features), Some(size)) =
        (field(4, 4), field(12, 4), field(16, 8), field(48, 8))
    else {
        malformed(&mut f, "truncated header");
        return Ok(f);
    };
    f.virtual_size = Some(size);
    if features & !QED_FEATURES != 0 {
        malformed(
            &mut f,
            format!("unknown feature bits {:#x}", features & !QED_FEATURES),
        );
    }
    if features & 1 != 0 {
        let off = field(56, 4).unwrap_or(0);
        let len = field(60, 4).unwrap_or(0);
        let name = if off + len > cluster.saturating_mul(header_clusters) || len > 1023 {
            malformed(&mut f, "backing file name outside the header");
            None
        } else {
            src.read(off, len as usize)?
        };
        f.findings.push(Violation::BackingFile { name });
    }
    Ok(f)
}

/// LUKS: version (big-endian at 6) and payload offset in sectors (at 104); the volume is what
/// follows the payload offset, so its size needs the file's length.
pub(super) fn luks(src: &dyn Source, head: &[u8]) -> FormatFacts {
    let mut f = FormatFacts::new(Format::Luks);
    let (Some(version), Some(payload)) = (be(head, 6, 2), be(head, 104, 4)) else {
        malformed(&mut f, "truncated header");
        return f;
    };
    f.subformat = Some(format!("luks{version}"));
    if version != 1 {
        f.findings.push(Violation::LuksVersion(version as u16));
    } else {
        match src.file_size().checked_sub(payload * 512) {
            Some(size) => f.virtual_size = Some(size),
            None => malformed(&mut f, "payload offset past the end of the file"),
        }
    }
    f
}

/// Parallels: sectors at 36 (only 32 bits of them with the old `WithoutFreeSpace` magic);
/// qemu needs version 2.
pub(super) fn parallels(head: &[u8]) -> FormatFacts {
    let mut f = FormatFacts::new(Format::Parallels);
    let (Some(version), Some(sectors)) = (le(head, 16, 4), le(head, 36, 8)) else {
        malformed(&mut f, "truncated header");
        return f;
    };
    let sectors = if head.starts_with(b"WithoutFreeSpace") {
        sectors & 0xffff_ffff
    } else {
        sectors
    };
    f.virtual_size = sectors.checked_mul(512);
    if version != 2 {
        malformed(&mut f, format!("unsupported version {version}"));
    }
    f
}

/// Bochs: the disk size in bytes, at 84 (version 1) or 88 (version 2), in whole sectors.
pub(super) fn bochs(head: &[u8]) -> FormatFacts {
    let mut f = FormatFacts::new(Format::Bochs);
    let off = if le(head, 64, 4) == Some(0x0001_0000) {
        84
    } else {
        88
    };
    f.virtual_size = le(head, off, 8).map(|d| d / 512 * 512);
    f
}

/// cloop: block size and block count (big-endian at 128 and 132); qemu wants a block size
/// that is a non-zero multiple of 512 up to 64 MiB.
pub(super) fn cloop(head: &[u8]) -> FormatFacts {
    let mut f = FormatFacts::new(Format::Cloop);
    let (Some(block), Some(blocks)) = (be(head, 128, 4), be(head, 132, 4)) else {
        malformed(&mut f, "truncated header");
        return f;
    };
    if block == 0 || block % 512 != 0 || block > 64 << 20 {
        malformed(&mut f, format!("block size {block}"));
    } else {
        f.virtual_size = Some(block * blocks);
    }
    f
}

/// DMG: the sector count of the `koly` trailer (big-endian at 0x1ec of the last 512 bytes).
pub(super) fn dmg(src: &mut dyn Source) -> Result<FormatFacts> {
    let mut f = FormatFacts::new(Format::Dmg);
    if let Some(t) = src.tail(512)? {
        if t.len() == 512 && t.starts_with(b"koly") {
            f.virtual_size = be(&t, 0x1ec, 8).and_then(|s| s.checked_mul(512));
        }
    }
    Ok(f)
}
