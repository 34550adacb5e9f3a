//! Format detection from a file's first bytes and its last sector: every format whose signature
//! a file carries (several means a *polyglot*). Used by `inspect` and by policies that allow
//! probing a file's format; opening an image never guesses on its own.
//!
//! ```
//! use qcow2kit::format::probe::{detect, probe};
//! use qcow2kit::Format;
//! let head = b"QFI\xfb\0\0\0\x03";
//! assert_eq!(detect(head, None), vec![Format::Qcow2]);
//! assert_eq!(probe(&detect(&[0u8; 512], None)), Some(Format::Raw));
//! ```

/// Bytes of a file's head examined for signatures (every signature lies within them).
///
/// ```
/// assert_eq!(qcow2kit::format::probe::HEAD_BYTES, 65536);
/// ```
pub const HEAD_BYTES: u64 = 64 << 10;
/// Bytes of a file's tail examined for signatures (a VHD footer, a DMG `koly` trailer).
///
/// ```
/// assert_eq!(qcow2kit::format::probe::TAIL_BYTES, 512);
/// ```
pub const TAIL_BYTES: u64 = 512;

/// A disk image format, as qemu-img names it.
///
/// ```
/// use qcow2kit::Format;
/// assert_eq!(Format::from_name("vhd"), Some(Format::Vpc));
/// assert_eq!(Format::Vpc.to_string(), "vpc");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// No signature: a raw disk (never *detected*, only the fallback or a declared format).
    Raw,
    /// qcow2 (`QFI\xfb`, version 2 or 3 — or any version but 1).
    Qcow2,
    /// qcow version 1.
    Qcow,
    /// VMDK sparse extent or descriptor.
    Vmdk,
    /// VHDX.
    Vhdx,
    /// VirtualBox VDI.
    Vdi,
    /// QED.
    Qed,
    /// LUKS.
    Luks,
    /// VHD (`conectix` at the head, or as a fixed-disk footer in the last 512 bytes).
    Vpc,
    /// Parallels.
    Parallels,
    /// ISO 9660 or UDF (`CD001`, `NSR02`, `NSR03` at byte 32769).
    Iso,
    /// A partition table: an MBR signature (`55 AA` at byte 510) that is not a FAT boot sector;
    /// OpenStack calls it `gpt`.
    Gpt,
    /// Bochs growing redolog (`Bochs Virtual HD Image`, `Redolog`, `Growing`, version 1 or 2).
    Bochs,
    /// Linux compressed loop (`cloop`): the V2.0 shell-script preamble.
    Cloop,
    /// Apple disk image (UDIF): a `koly` trailer in the last 512 bytes, or (as qemu probes it) a
    /// file name ending in `.dmg`.
    Dmg,
}

impl Format {
    /// The name qemu-img (or, for `gpt`, OpenStack) uses.
    ///
    /// ```
    /// assert_eq!(qcow2kit::Format::Qcow2.name(), "qcow2");
    /// ```
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Qcow => "qcow",
            Format::Vmdk => "vmdk",
            Format::Vhdx => "vhdx",
            Format::Vdi => "vdi",
            Format::Qed => "qed",
            Format::Luks => "luks",
            Format::Vpc => "vpc",
            Format::Parallels => "parallels",
            Format::Iso => "iso",
            Format::Gpt => "gpt",
            Format::Bochs => "bochs",
            Format::Cloop => "cloop",
            Format::Dmg => "dmg",
        }
    }

    /// Every format, in detection order.
    ///
    /// ```
    /// assert!(qcow2kit::Format::ALL.contains(&qcow2kit::Format::Vmdk));
    /// ```
    pub const ALL: [Format; 15] = [
        Format::Raw,
        Format::Qcow2,
        Format::Qcow,
        Format::Vmdk,
        Format::Vhdx,
        Format::Vdi,
        Format::Qed,
        Format::Luks,
        Format::Vpc,
        Format::Parallels,
        Format::Iso,
        Format::Gpt,
        Format::Bochs,
        Format::Cloop,
        Format::Dmg,
    ];

    /// Parses a format name (`vhd` is accepted for `vpc`).
    ///
    /// ```
    /// use qcow2kit::Format;
    /// assert_eq!(Format::from_name("qcow2"), Some(Format::Qcow2));
    /// assert_eq!(Format::from_name("nonsense"), None);
    /// ```
    pub fn from_name(name: &str) -> Option<Format> {
        Some(match name {
            "raw" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "qcow" => Format::Qcow,
            "vmdk" => Format::Vmdk,
            "vhdx" => Format::Vhdx,
            "vdi" => Format::Vdi,
            "qed" => Format::Qed,
            "luks" => Format::Luks,
            "vpc" | "vhd" => Format::Vpc,
            "parallels" => Format::Parallels,
            "iso" => Format::Iso,
            "gpt" => Format::Gpt,
            "bochs" => Format::Bochs,
            "cloop" => Format::Cloop,
            "dmg" => Format::Dmg,
            _ => return None,
        })
    }
}

impl Format {
    /// Parses the name of a format [`chain::open`](crate::chain::open) opens (`qcow2`, `raw`);
    /// any other name, known or not, is [`Error::Unsupported`](crate::Error::Unsupported).
    ///
    /// ```
    /// use qcow2kit::Format;
    /// assert_eq!(Format::openable(b"qcow2")?, Format::Qcow2);
    /// assert!(Format::openable(b"vmdk").is_err());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn openable(name: &[u8]) -> crate::Result<Format> {
        match name {
            b"qcow2" => Ok(Format::Qcow2),
            b"raw" => Ok(Format::Raw),
            other => Err(crate::Error::Unsupported(format!(
                "image format '{}'",
                String::from_utf8_lossy(other)
            ))),
        }
    }

    /// Whether [`chain::open`](crate::chain::open) opens images of this format.
    ///
    /// ```
    /// assert!(qcow2kit::Format::Raw.is_openable() && !qcow2kit::Format::Vmdk.is_openable());
    /// ```
    pub fn is_openable(self) -> bool {
        matches!(self, Format::Qcow2 | Format::Raw)
    }

    /// [`Error::Unsupported`](crate::Error::Unsupported) for a format `open` does not open.
    pub(crate) fn ensure_openable(self) -> crate::Result<()> {
        if self.is_openable() {
            Ok(())
        } else {
            Err(crate::Error::Unsupported(format!("image format '{self}'")))
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Every format whose signature appears in `head` (the file's first bytes; 64 KiB covers all of
/// them) or in `tail` (its last 512 bytes, where a fixed VHD keeps its footer and a DMG its
/// `koly` trailer), head signatures first. Empty for raw data.
///
/// Every signature one of qemu's `block/*.c` probe functions accepts is detected (bochs, cloop,
/// parallels, qcow, qcow2, qed, vdi, vhdx, vmdk including text descriptors, vpc, luks), some more
/// broadly than qemu (a LUKS header of any version, a VHD footer at the tail, a `koly` trailer),
/// so that nothing qemu would read as an image is ever taken for raw data.
///
/// ```
/// use qcow2kit::format::probe::detect;
/// use qcow2kit::Format;
/// // A qcow2 header that also ends in a VHD footer is a polyglot: both are reported.
/// let mut tail = [0u8; 512];
/// tail[..8].copy_from_slice(b"conectix");
/// assert_eq!(detect(b"QFI\xfb\0\0\0\x03", Some(&tail)), vec![Format::Qcow2, Format::Vpc]);
/// ```
pub fn detect(head: &[u8], tail: Option<&[u8]>) -> Vec<Format> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let mut v = Vec::new();
    let mut add = |f: Format| {
        if !v.contains(&f) {
            v.push(f);
        }
    };
    if at(0, b"QFI\xfb") {
        match head
            .get(4..8)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        {
            Some(1) => add(Format::Qcow),
            _ => add(Format::Qcow2),
        }
    }
    if at(0, b"KDMV") || at(0, b"COWD") || at(0, b"# Disk DescriptorFile") || is_vmdk_text(head) {
        add(Format::Vmdk);
    }
    if at(0, b"vhdxfile") {
        add(Format::Vhdx);
    }
    // VDI: signature 0xbeda107f (little-endian) at offset 64.
    if at(64, &[0x7f, 0x10, 0xda, 0xbe]) {
        add(Format::Vdi);
    }
    if at(0, b"QED\0") {
        add(Format::Qed);
    }
    if at(0, b"LUKS\xba\xbe") {
        add(Format::Luks);
    }
    if at(0, b"conectix") {
        add(Format::Vpc);
    }
    if at(0, b"WithoutFreeSpace") || at(0, b"WithouFreSpacExt") {
        add(Format::Parallels);
    }
    if is_bochs(head) {
        add(Format::Bochs);
    }
    if is_cloop(head) {
        add(Format::Cloop);
    }
    if at(32769, b"CD001") || at(32769, b"NSR02") || at(32769, b"NSR03") {
        add(Format::Iso);
    }
    if has_partition_table(head) {
        add(Format::Gpt);
    }
    if let Some(t) = tail {
        if t.starts_with(b"conectix") {
            add(Format::Vpc);
        }
        if t.starts_with(b"koly") {
            add(Format::Dmg);
        }
    }
    v
}

/// The first bytes of a cloop V2.0 image: a shell script that mounts it.
pub(crate) const CLOOP_MAGIC: &[u8] =
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n";

/// qemu's `cloop_probe`: the file starts with [`CLOOP_MAGIC`], or with a prefix of it when the
/// file is shorter (qemu compares only the bytes it has).
fn is_cloop(head: &[u8]) -> bool {
    let n = CLOOP_MAGIC.len().min(head.len());
    n > 0 && head[..n] == CLOOP_MAGIC[..n]
}

/// qemu's `bochs_probe`: a 512-byte header whose NUL-terminated magic, type and subtype are
/// `Bochs Virtual HD Image`, `Redolog` and `Growing`, version 1.0 or 2.0 (little-endian 32 bits
/// at byte 64).
fn is_bochs(head: &[u8]) -> bool {
    let cstr = |off: usize, len: usize, want: &[u8]| {
        head.get(off..off + len).is_some_and(|f| {
            let end = f.iter().position(|&b| b == 0);
            end.is_some_and(|e| &f[..e] == want)
        })
    };
    head.len() >= 512
        && cstr(0, 32, b"Bochs Virtual HD Image")
        && cstr(32, 16, b"Redolog")
        && cstr(48, 16, b"Growing")
        && matches!(head[64..68], [0, 0, 1 | 2, 0])
}

/// qemu's `vmdk_probe` for text descriptors: after comment lines (`#`) and blank lines made of
/// spaces, the first line is `version=1`, `version=2` or `version=3` (LF or CRLF).
fn is_vmdk_text(head: &[u8]) -> bool {
    let probe = &head[..head.len().min(2048)];
    let mut p = 0;
    while p < probe.len() {
        match probe[p] {
            b'#' => {
                while p < probe.len() && probe[p] != b'\n' {
                    p += 1;
                }
                p += 1;
            }
            b' ' => {
                while p < probe.len() && probe[p] == b' ' {
                    p += 1;
                }
                if p < probe.len() && probe[p] == b'\r' {
                    p += 1;
                }
                if p == probe.len() || probe[p] != b'\n' {
                    return false;
                }
                p += 1;
            }
            _ => {
                let rest = &probe[p..];
                return [b'1', b'2', b'3'].iter().any(|&d| {
                    let line = [b'v', b'e', b'r', b's', b'i', b'o', b'n', b'=', d];
                    rest.starts_with(&line)
                        && (rest[9..].starts_with(b"\n") || rest[9..].starts_with(b"\r\n"))
                });
            }
        }
    }
    false
}

/// An MBR signature at 510 that is not the boot sector of a FAT file system (OpenStack's
/// `GPTInspector.format_match`).
fn has_partition_table(head: &[u8]) -> bool {
    if head.len() < 512 || head[510..512] != [0x55, 0xaa] {
        return false;
    }
    let is_fat = head[0x10] == 2 && head[0x15] == 0xf8;
    !is_fat
}

/// Whether `detected` is a hybrid ISO: an ISO 9660 image that also carries a partition table so
/// it boots from a USB stick. It is one image, not a polyglot.
pub(crate) fn is_hybrid_iso(detected: &[Format]) -> bool {
    detected.len() == 2 && detected.contains(&Format::Iso) && detected.contains(&Format::Gpt)
}

/// Whether a file name makes qemu probe the file as DMG (`dmg_probe` goes by the `.dmg` suffix
/// alone, whatever the content).
pub(crate) fn dmg_by_name(name: &[u8]) -> bool {
    name.len() > 4 && name.ends_with(b".dmg")
}

/// The block driver a qemu-style probe reads a file with, given what [`detect`] found: raw when
/// nothing was detected or only signatures qemu has no driver for (ISO file systems and
/// partition tables are raw disks to qemu); `None` for a polyglot, which a careful reader must
/// not guess at (qemu picks one by its drivers' scores; which one differs between tools, and that
/// difference is what a polyglot attack exploits).
///
/// ```
/// use qcow2kit::format::probe::probe;
/// use qcow2kit::Format;
/// assert_eq!(probe(&[Format::Qcow2]), Some(Format::Qcow2));
/// assert_eq!(probe(&[]), Some(Format::Raw));
/// ```
pub fn probe(detected: &[Format]) -> Option<Format> {
    let drivers: Vec<Format> = detected
        .iter()
        .copied()
        .filter(|f| !matches!(f, Format::Iso | Format::Gpt | Format::Raw))
        .collect();
    match drivers.as_slice() {
        [] => Some(Format::Raw),
        [one] => Some(*one),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_and_flags_polyglots() {
        let mut b = vec![0u8; 40000];
        b[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        assert_eq!(detect(&b, None), vec![Format::Qcow2]);
        assert_eq!(probe(&detect(&b, None)), Some(Format::Qcow2));
        b[64..68].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        b[32769..32774].copy_from_slice(b"CD001");
        let d = detect(&b, None);
        assert_eq!(d, vec![Format::Qcow2, Format::Vdi, Format::Iso]);
        assert_eq!(probe(&d), None);
        assert_eq!(detect(&[0u8; 10], None), vec![]);
        assert_eq!(probe(&[]), Some(Format::Raw));
        assert_eq!(detect(b"LUKS\xba\xbe\0\x01", None), vec![Format::Luks]);
    }

    #[test]
    fn iso_and_partition_tables_probe_as_raw() {
        let mut b = vec![0u8; 40000];
        b[32769..32774].copy_from_slice(b"NSR03");
        b[510..512].copy_from_slice(&[0x55, 0xaa]);
        let d = detect(&b, None);
        assert_eq!(d, vec![Format::Iso, Format::Gpt]);
        assert!(is_hybrid_iso(&d));
        assert_eq!(probe(&d), Some(Format::Raw));
    }

    #[test]
    fn vhd_footer_in_the_tail() {
        let mut tail = vec![0u8; 512];
        tail[..8].copy_from_slice(b"conectix");
        assert_eq!(detect(&[0u8; 1024], Some(&tail)), vec![Format::Vpc]);
    }
}
