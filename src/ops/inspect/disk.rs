//! What OpenStack treats as disks rather than image formats: ISO 9660 / UDF file systems and
//! partition tables (`gpt`, which covers a plain MBR too). qemu reads both as raw.

use super::source::le;
use super::{FormatFacts, Violation};
use crate::format::probe::Format;

/// The primary volume descriptor's offset.
const PVD: usize = 32 << 10;

/// ISO: the primary volume descriptor's block count × block size (both little-endian halves
/// of their both-endian fields); unknown unless the first descriptor is a primary one.
pub(super) fn iso(head: &[u8]) -> FormatFacts {
    let mut f = FormatFacts::new(Format::Iso);
    if head.get(PVD) == Some(&1) {
        if let (Some(blocks), Some(block)) = (le(head, PVD + 80, 4), le(head, PVD + 128, 2)) {
            f.virtual_size = Some(blocks * block);
        }
    }
    f
}

/// The partition type of a GPT's protective MBR entry.
const PROTECTIVE: u8 = 0xee;

/// A partition table: the disk is raw data of the file's size. OpenStack's rules on the four
/// MBR entries: boot flags 0x00 or 0x80, at least one partition, and a protective GPT entry
/// starting at CHS 0/2/0 and LBA 1 as the only partition. qcow2kit also wants the GPT header
/// (`EFI PART`) the protective entry announces, at LBA 1 of 512- or 4096-byte sectors.
pub(super) fn partition_table(head: &[u8], file_size: u64) -> FormatFacts {
    let mut f = FormatFacts::new(Format::Gpt);
    f.virtual_size = Some(file_size);
    if let Err(why) = check_mbr(head) {
        f.findings.push(Violation::PartitionTable(why));
    }
    f
}

fn check_mbr(head: &[u8]) -> std::result::Result<(), String> {
    let mut used = Vec::new();
    let mut gpt = false;
    for i in 0..4 {
        let Some(e) = head.get(446 + 16 * i..446 + 16 * (i + 1)) else {
            return Err("truncated MBR".into());
        };
        if e[0] != 0 && e[0] != 0x80 {
            return Err(format!("MBR entry {i} has an invalid boot flag"));
        }
        if e[4] != 0 {
            used.push(i);
        }
        if e[4] == PROTECTIVE {
            gpt = true;
            if e[1..4] != [0, 2, 0] {
                return Err("protective MBR entry has an invalid start CHS".into());
            }
            if le(e, 8, 4) != Some(1) {
                return Err("protective MBR entry has an invalid start LBA".into());
            }
        }
    }
    if gpt && used != [0] {
        return Err("protective MBR defines other partitions".into());
    }
    if used.is_empty() {
        return Err("MBR defines no partition".into());
    }
    let has_header = |at: usize| head.get(at..at + 8) == Some(&b"EFI PART"[..]);
    if gpt && !has_header(512) && !has_header(4096) {
        return Err("protective MBR without a GPT header".into());
    }
    Ok(())
}
