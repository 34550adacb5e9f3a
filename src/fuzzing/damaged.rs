//! The `write_damaged` fuzz target: guest writes on an image damaged the way a hostile guest or
//! a bad disk damages one (metadata clusters counted free, entries pointing into metadata,
//! misaligned entries and refcount blocks, compressed descriptors at offset 0 or oversized).
//! Whatever the damage, no write may land on the header, and every acknowledged write must read
//! back after the image is closed and reopened (QEMU's rules, docs/design.md §3, rules 7 and 8).

use super::GuestOp;
use crate::device::BlockDevice;
use crate::engine::{CorruptionReporter, Qcow2Image, Qcow2Options};
use crate::error::{Corruption, Error};
use crate::format::header::Header;
use crate::format::parse_first_cluster;
use crate::format::refcount;
use crate::io::{MemoryStorage, Storage};
use std::sync::Arc;

const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Where the undamaged image keeps its metadata.
struct Layout {
    header: Header,
    /// Offset of the first refcount block.
    refblock: u64,
    /// Offset of the L2 table of guest cluster 0.
    l2: u64,
}

fn be64(b: &[u8], off: u64) -> u64 {
    let o = off as usize;
    b.get(o..o + 8)
        .map_or(0, |w| u64::from_be_bytes(w.try_into().unwrap_or([0; 8])))
}

fn poke(mem: &MemoryStorage, off: u64, value: u64) {
    let _ = mem.write_at(&value.to_be_bytes(), off);
}

impl Layout {
    fn read(bytes: &[u8]) -> Option<Layout> {
        let (header, _) = parse_first_cluster(bytes).ok()?;
        let refblock = be64(bytes, header.refcount_table_offset) & !0x1ff;
        let l2 = be64(bytes, header.l1_table_offset) & OFFSET_MASK;
        (refblock != 0 && l2 != 0).then_some(Layout {
            header,
            refblock,
            l2,
        })
    }

    fn cs(&self) -> u64 {
        self.header.cluster_size()
    }

    /// The metadata cluster `choice` picks: header, refcount table, refcount block, L1, L2.
    fn structure(&self, choice: u8) -> u64 {
        let h = &self.header;
        match choice % 5 {
            0 => 0,
            1 => h.refcount_table_offset,
            2 => self.refblock,
            3 => h.l1_table_offset,
            _ => self.l2,
        }
    }

    /// Applies one damage (three fuzz bytes: kind, index, choice) to the image in `mem`.
    fn damage(&self, mem: &MemoryStorage, kind: u8, index: u8, choice: u8) {
        let cs = self.cs();
        let h = &self.header;
        let entry_bytes = h.l2_entry_size();
        let l2_entry = self.l2 + u64::from(index % 16) * entry_bytes;
        let bytes = mem.to_bytes();
        match kind % 6 {
            0 => {
                // A metadata cluster counted free.
                let cluster = self.structure(choice) / cs;
                let mut block = bytes
                    .get(self.refblock as usize..(self.refblock + cs) as usize)
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default();
                if refcount::set(&mut block, h.refcount_order, cluster as usize, 0) {
                    let _ = mem.write_at(&block, self.refblock);
                }
            }
            1 => {
                // An L2 entry pointing into metadata, owned or not.
                let flags = if choice & 0x80 != 0 { COPIED } else { 0 };
                poke(mem, l2_entry, flags | self.structure(choice));
            }
            2 => {
                // A misaligned cluster offset, as data or as a preallocated zero cluster.
                if cs == 512 {
                    return; // Every 512-byte offset is a cluster boundary.
                }
                let e = be64(&bytes, l2_entry);
                let sectors = cs / 512 - 1;
                // Misaligned whatever the entry was (a damage applied twice stays misaligned
                // instead of naming another whole cluster: an entry naming a cluster counted
                // free is damaged refcounts, which neither QEMU nor qcow2kit can see without a
                // scan of every table).
                let base = (e & OFFSET_MASK & !(cs - 1)).max(cs);
                let host = base + 512 * (1 + u64::from(choice) % sectors);
                let zero = if choice & 0x80 != 0 && !h.has_extended_l2() {
                    ZERO
                } else {
                    0
                };
                poke(mem, l2_entry, COPIED | host | zero);
            }
            3 => {
                // A compressed descriptor at offset 0, or covering every sector it can.
                let e = be64(&bytes, l2_entry);
                if e & COMPRESSED != 0 {
                    let x = 62 - (h.cluster_bits - 8);
                    let offset = e & ((1 << x) - 1);
                    let sectors = (1u64 << (h.cluster_bits - 8)) - 1;
                    let d = if choice & 1 == 0 {
                        COMPRESSED | (e & !((1 << x) - 1) & !COMPRESSED)
                    } else {
                        COMPRESSED | (sectors << x) | offset
                    };
                    poke(mem, l2_entry, d);
                }
            }
            4 => {
                // The L1 entry pointing at another structure, or misaligned.
                let target = match choice % 4 {
                    3 => self.l2 + 512,
                    c => self.structure(c + 1),
                };
                poke(mem, h.l1_table_offset, COPIED | target);
            }
            _ => {
                // The first refcount table entry cleared, misaligned or pointing at metadata.
                let v = match choice % 4 {
                    0 => 0,
                    1 => self.refblock + 512,
                    2 => h.refcount_table_offset,
                    _ => h.l1_table_offset,
                };
                poke(mem, h.refcount_table_offset, v);
            }
        }
    }
}

/// Header bytes a header update may change: the L1 and refcount table switches, the
/// incompatible feature bits (dirty, corrupt) and the autoclear bits of a v3 header.
fn header_field_may_change(i: usize, v3: bool) -> bool {
    (36..60).contains(&i) || (v3 && ((72..80).contains(&i) || (88..96).contains(&i)))
}

/// Interprets `data` as creation options, up to four damages and a sequence of guest
/// operations (each write followed by a flush, as qemu-io does); see the module docs for what
/// must hold afterwards.
pub fn write_damaged(data: &[u8]) {
    use crate::ops::create::create_qcow2_on;
    let [a, b, n, rest @ ..] = data else { return };
    let mut opts = super::fuzz_create_options(*a, *b);
    // A lazy-refcounts image is rebuilt at open, which would undo the damage to refcounts.
    opts.lazy_refcounts = false;
    let size = 1u64 << 20;
    let mem = Arc::new(MemoryStorage::new());
    let Ok(img) = create_qcow2_on(mem.clone(), None, size, &opts) else {
        return;
    };
    let cs = img.cluster_size();
    // Data in the first clusters; a compressed cluster last in the file.
    let prefix = img
        .write_at(&vec![0x11; (2 * cs).min(size) as usize], 0)
        .and_then(|()| {
            if 4 * cs < size {
                img.write_compressed(4 * cs, &vec![0x22; cs as usize])
            } else {
                Ok(())
            }
        })
        .and_then(|()| img.close());
    drop(img);
    if prefix.is_err() {
        return;
    }
    let Some(layout) = Layout::read(&mem.to_bytes()) else {
        return;
    };
    let damages = usize::from(*n % 5).min(rest.len() / 3);
    let (damage, ops) = rest.split_at(damages * 3);
    for d in damage.chunks_exact(3) {
        layout.damage(&mem, d[0], d[1], d[2]);
    }
    let damaged = mem.to_bytes();

    let fatal_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = fatal_seen.clone();
    let rw = Qcow2Options {
        on_corruption: Some(CorruptionReporter::new(move |e| {
            if e.fatal {
                seen.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        })),
        ..Qcow2Options::default()
    };
    let Ok(img) = Qcow2Image::open_writable(mem.clone(), &rw) else {
        return;
    };
    let v3 = layout.header.version >= 3;
    // What acknowledged (written and flushed) operations make the guest read.
    let mut known: Vec<Option<u8>> = vec![None; size as usize];
    for op in ops.chunks_exact(6).take(32) {
        let op = GuestOp::decode(op, size);
        let (r, range, value) = match op {
            GuestOp::Write { off, len, byte } => (
                img.write_at(&vec![byte; len as usize], off),
                off..off + len,
                Some(byte),
            ),
            GuestOp::Zero { off, len } => (img.write_zeroes(off, len), off..off + len, Some(0)),
            GuestOp::Discard { off, len } => (img.discard(off, len), off..off + len, None),
            GuestOp::Flush | GuestOp::Grow(_) => (Ok(()), 0..0, None),
        };
        let r = r.and_then(|()| img.flush());
        match r {
            Ok(()) => {
                for i in range {
                    known[i as usize] = value;
                }
            }
            Err(Error::Corrupt(Corruption::Inconsistent(m))) if v3 => {
                // A fatal corruption event: the bit is on disk, and the event reported.
                let hdr = mem.to_bytes();
                assert!(
                    hdr.get(79).is_some_and(|b| b & 2 != 0),
                    "refused ({m}) without marking the image corrupt"
                );
                assert!(
                    fatal_seen.load(std::sync::atomic::Ordering::SeqCst),
                    "refused ({m}) without a fatal event"
                );
                // Unacknowledged: the range may read as before or as the write.
                for i in range {
                    known[i as usize] = None;
                }
            }
            Err(_) => {
                for i in range {
                    known[i as usize] = None;
                }
            }
        }
    }
    let _ = img.close();
    drop(img);

    let after = mem.to_bytes();
    let hdr_len = (cs as usize).min(damaged.len()).min(after.len());
    for i in 0..hdr_len {
        assert!(
            after[i] == damaged[i] || header_field_may_change(i, v3),
            "header byte {i} changed from {:#04x} to {:#04x}",
            damaged[i],
            after[i]
        );
    }
    if known.iter().all(Option::is_none) {
        return;
    }
    let ro = Qcow2Image::open(mem, &Qcow2Options::default());
    let Ok(ro) = ro else {
        panic!("the image no longer opens after acknowledged writes: {ro:?}");
    };
    let mut buf = vec![0u8; cs as usize];
    for c in 0..size / cs {
        let want = &known[(c * cs) as usize..((c + 1) * cs) as usize];
        if want.iter().all(Option::is_none) {
            continue;
        }
        let r = ro.read_at(&mut buf, c * cs);
        assert!(r.is_ok(), "acknowledged cluster {c} unreadable: {r:?}");
        for (i, w) in want.iter().enumerate() {
            if let Some(v) = w {
                assert_eq!(buf[i], *v, "acknowledged byte {} lost", c * cs + i as u64);
            }
        }
    }
}
