//! L1 and L2 table entries.
//!
//! L1 entry (64 bits): bits 9..=55 the L2 table's offset, bit 63 "COPIED" (refcount is exactly
//! one), all other bits reserved (zero).
//!
//! Standard L2 entry (64 bits): bit 62 says compressed. For an uncompressed cluster, bit 0 is the
//! zero flag (reads as zeros; with extended L2 it is reserved), bits 9..=55 the host cluster
//! offset, bit 63 COPIED, bits 1..=8 and 56..=61 reserved. For a compressed cluster, bits
//! 0..x-1 are the host byte offset and bits x..=61 the number of additional 512-byte sectors,
//! where `x = 62 - (cluster_bits - 8)`.
//!
//! Extended L2 entries add a 64-bit subcluster bitmap: bit `i` (0..32) says subcluster `i` is
//! allocated (data at the cluster's host offset + i × subcluster size), bit `32 + i` says it reads
//! as zeros; neither means it falls through to the backing file; both is invalid.

/// Bits 9..=55: an offset in an L1 or standard L2 entry.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the cluster's refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: the cluster reads as zeros.
pub const ZERO: u64 = 1;
/// Reserved bits of an L1 entry.
pub(crate) const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Reserved bits of an uncompressed standard L2 entry.
pub(crate) const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;

/// What an L2 entry says about its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// Not allocated in this image: falls through to the backing file (or zeros).
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster or 0.
    Zero {
        /// Preallocated host offset, 0 if none.
        host: u64,
    },
    /// Data at a host cluster offset.
    Normal {
        /// Host offset of the cluster.
        host: u64,
    },
    /// Compressed data.
    Compressed(CompressedDescriptor),
}

/// Decodes a standard (64-bit) L2 entry.
///
/// `extended` says the image has extended L2 entries (then bit 0 is not a zero flag);
/// `data_file` says it has an external data file (then offset 0 with COPIED is a real cluster).
#[inline]
pub fn classify(entry: u64, cluster_bits: u32, extended: bool, data_file: bool) -> ClusterKind {
    if entry & COMPRESSED != 0 {
        ClusterKind::Compressed(CompressedDescriptor::decode(entry, cluster_bits))
    } else if entry & ZERO != 0 && !extended {
        ClusterKind::Zero {
            host: entry & OFFSET_MASK,
        }
    } else if entry & OFFSET_MASK == 0 {
        if data_file && entry & COPIED != 0 {
            ClusterKind::Normal { host: 0 }
        } else {
            ClusterKind::Unallocated
        }
    } else {
        ClusterKind::Normal {
            host: entry & OFFSET_MASK,
        }
    }
}

/// Encodes a standard L2 entry for a normal cluster.
pub(crate) fn encode_normal(host: u64, copied: bool) -> u64 {
    (host & OFFSET_MASK) | if copied { COPIED } else { 0 }
}

/// The location and size of a compressed cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host byte offset where the compressed data starts (not aligned).
    pub host_offset: u64,
    /// Number of 512-byte sectors the data touches, counting the first (≥ 1).
    pub sectors: u64,
}

impl CompressedDescriptor {
    /// Bit position of the sector count: `62 - (cluster_bits - 8)`.
    #[inline]
    pub(crate) fn size_shift(cluster_bits: u32) -> u32 {
        62 - (cluster_bits - 8)
    }

    /// Decodes the descriptor bits (0..=61) of a compressed L2 entry.
    #[inline]
    pub(crate) fn decode(entry: u64, cluster_bits: u32) -> Self {
        let x = Self::size_shift(cluster_bits);
        let host_offset = entry & ((1u64 << x) - 1);
        let count_mask = (1u64 << (cluster_bits - 8)) - 1;
        let sectors = ((entry >> x) & count_mask) + 1;
        CompressedDescriptor {
            host_offset,
            sectors,
        }
    }

    /// Encodes into an L2 entry (with the compressed bit set). `None` if it does not fit.
    pub fn encode(self, cluster_bits: u32) -> Option<u64> {
        let x = Self::size_shift(cluster_bits);
        if self.host_offset >= 1u64 << x || self.sectors == 0 {
            return None;
        }
        let extra = self.sectors - 1;
        if extra >= 1u64 << (cluster_bits - 8) {
            return None;
        }
        Some(COMPRESSED | (extra << x) | self.host_offset)
    }

    /// The descriptor for `len` compressed bytes stored at `host_offset`.
    pub(crate) fn for_bytes(host_offset: u64, len: u64) -> Self {
        let first = host_offset & !511;
        let end = (host_offset + len).next_multiple_of(512);
        CompressedDescriptor {
            host_offset,
            sectors: (end - first) / 512,
        }
    }

    /// Bytes from `host_offset` to the end of the last sector: the most that may hold data.
    #[inline]
    pub(crate) fn stored_len(self) -> u64 {
        self.sectors * 512 - (self.host_offset & 511)
    }
}

/// The subcluster bitmap of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubclusterBitmap(pub u64);

/// State of one subcluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterState {
    /// Falls through to the backing file.
    Unallocated,
    /// Reads as zeros.
    Zero,
    /// Data at the cluster's host offset plus the subcluster's offset.
    Allocated,
    /// Both the allocation and the zero bit are set: corrupt.
    Invalid,
}

impl SubclusterBitmap {
    /// State of subcluster `i` (0..32).
    #[inline]
    pub fn state(self, i: u32) -> SubclusterState {
        let alloc = self.0 >> i & 1 != 0;
        let zero = self.0 >> (32 + i) & 1 != 0;
        match (alloc, zero) {
            (false, false) => SubclusterState::Unallocated,
            (false, true) => SubclusterState::Zero,
            (true, false) => SubclusterState::Allocated,
            (true, true) => SubclusterState::Invalid,
        }
    }

    /// Number of consecutive subclusters from `i` that share subcluster `i`'s state.
    #[inline]
    pub(crate) fn run_len(self, i: u32) -> u32 {
        let s = self.state(i);
        let mut j = i + 1;
        while j < 32 && self.state(j) == s {
            j += 1;
        }
        j - i
    }

    /// Sets subcluster `i`'s state.
    pub fn set(&mut self, i: u32, state: SubclusterState) {
        let (a, z) = match state {
            SubclusterState::Unallocated => (false, false),
            SubclusterState::Zero => (false, true),
            SubclusterState::Allocated => (true, false),
            SubclusterState::Invalid => (true, true),
        };
        self.0 &= !(1 << i | 1 << (32 + i));
        self.0 |= u64::from(a) << i | u64::from(z) << (32 + i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn classify_standard() {
        assert_eq!(classify(0, 16, false, false), ClusterKind::Unallocated);
        assert_eq!(
            classify(COPIED | 0x50000, 16, false, false),
            ClusterKind::Normal { host: 0x50000 }
        );
        assert_eq!(
            classify(ZERO, 16, false, false),
            ClusterKind::Zero { host: 0 }
        );
        assert_eq!(
            classify(ZERO | 0x50000, 16, false, false),
            ClusterKind::Zero { host: 0x50000 }
        );
        // With extended L2 bit 0 is not a zero flag.
        assert_eq!(classify(ZERO, 16, true, false), ClusterKind::Unallocated);
        // External data files: offset 0 with COPIED is a cluster.
        assert_eq!(
            classify(COPIED, 16, false, true),
            ClusterKind::Normal { host: 0 }
        );
        assert_eq!(classify(COPIED, 16, false, false), ClusterKind::Unallocated);
    }

    #[test]
    fn compressed_layout_matches_spec() {
        // 64 KiB clusters: x = 54; one additional sector.
        let e = COMPRESSED | 1 << 54 | 0x12345;
        let d = CompressedDescriptor::decode(e, 16);
        assert_eq!(
            d,
            CompressedDescriptor {
                host_offset: 0x12345,
                sectors: 2
            }
        );
        assert_eq!(d.stored_len(), 1024 - 0x145);
        assert_eq!(d.encode(16), Some(e));
    }

    proptest! {
        #[test]
        fn compressed_round_trip(cb in 9u32..=21, off in 0u64..(1 << 40), len in 1u64..4096) {
            let cs = 1u64 << cb;
            let len = len.min(cs);
            let d = CompressedDescriptor::for_bytes(off, len);
            prop_assert!(d.stored_len() >= len);
            let e = d.encode(cb).unwrap();
            prop_assert_eq!(CompressedDescriptor::decode(e, cb), d);
            prop_assert!(matches!(classify(e, cb, false, false), ClusterKind::Compressed(x) if x == d));
        }

        #[test]
        fn bitmap_set_get(states in proptest::collection::vec(0u8..3, 32)) {
            let mut b = SubclusterBitmap::default();
            let st = |s: u8| match s { 0 => SubclusterState::Unallocated, 1 => SubclusterState::Zero, _ => SubclusterState::Allocated };
            for (i, s) in states.iter().enumerate() { b.set(i as u32, st(*s)); }
            for (i, s) in states.iter().enumerate() {
                prop_assert_eq!(b.state(i as u32), st(*s));
                let run = b.run_len(i as u32) as usize;
                prop_assert!(states[i..i + run].iter().all(|x| x == s));
                prop_assert!(i + run == 32 || states[i + run] != *s);
            }
        }
    }
}
