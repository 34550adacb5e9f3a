//! Format detection from the first bytes of a file (used by `inspect` and by policies that
//! allow probing a backing file's format; opening an image never guesses on its own).

/// Formats recognised by their magic numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Detected {
    /// qcow2 (`QFI\xfb`, version 2 or 3).
    Qcow2,
    /// qcow version 1 (`QFI\xfb`, version 1).
    Qcow1,
    /// VMDK sparse extent (`KDMV`) or descriptor file (`# Disk DescriptorFile`).
    Vmdk,
    /// VHDX (`vhdxfile`).
    Vhdx,
    /// VirtualBox VDI.
    Vdi,
    /// QED (`QED\0`).
    Qed,
    /// LUKS (`LUKS\xba\xbe`).
    Luks,
    /// VHD / VPC (`conectix`).
    Vpc,
    /// Parallels (`WithoutFreeSpace` / `WithouFreSpacExt`).
    Parallels,
    /// ISO 9660 (`CD001` at 32769).
    Iso,
}

impl Detected {
    /// Format name as qemu-img spells it.
    pub fn name(self) -> &'static str {
        match self {
            Detected::Qcow2 => "qcow2",
            Detected::Qcow1 => "qcow",
            Detected::Vmdk => "vmdk",
            Detected::Vhdx => "vhdx",
            Detected::Vdi => "vdi",
            Detected::Qed => "qed",
            Detected::Luks => "luks",
            Detected::Vpc => "vpc",
            Detected::Parallels => "parallels",
            Detected::Iso => "iso",
        }
    }
}

/// Every format whose signature appears in `head` (the file's first bytes; 64 KiB is enough
/// for all of them). More than one entry means a polyglot.
pub fn detect_all(head: &[u8]) -> Vec<Detected> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let mut v = Vec::new();
    if at(0, b"QFI\xfb") {
        match head
            .get(4..8)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        {
            Some(1) => v.push(Detected::Qcow1),
            _ => v.push(Detected::Qcow2),
        }
    }
    if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        v.push(Detected::Vmdk);
    }
    if at(0, b"vhdxfile") {
        v.push(Detected::Vhdx);
    }
    // VDI: signature 0xbeda107f (little-endian) at offset 64.
    if at(64, &[0x7f, 0x10, 0xda, 0xbe]) {
        v.push(Detected::Vdi);
    }
    if at(0, b"QED\0") {
        v.push(Detected::Qed);
    }
    if at(0, b"LUKS\xba\xbe") {
        v.push(Detected::Luks);
    }
    if at(0, b"conectix") {
        v.push(Detected::Vpc);
    }
    if at(0, b"WithoutFreeSpace") || at(0, b"WithouFreSpacExt") {
        v.push(Detected::Parallels);
    }
    if at(32769, b"CD001") {
        v.push(Detected::Iso);
    }
    v
}

/// The format a qemu-style probe picks: the first detected one, or raw (`None`).
pub fn probe(head: &[u8]) -> Option<Detected> {
    detect_all(head).into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_and_flags_polyglots() {
        let mut b = vec![0u8; 40000];
        b[..8].copy_from_slice(b"QFI\xfb\0\0\0\x03");
        assert_eq!(detect_all(&b), vec![Detected::Qcow2]);
        b[64..68].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        b[32769..32774].copy_from_slice(b"CD001");
        assert_eq!(
            detect_all(&b),
            vec![Detected::Qcow2, Detected::Vdi, Detected::Iso]
        );
        assert_eq!(probe(&[0u8; 10]), None);
        assert_eq!(probe(b"LUKS\xba\xbe\0\x01"), Some(Detected::Luks));
    }
}
