//! Refcount blocks: arrays of `2^refcount_order`-bit big-endian unsigned integers.
//!
//! Widths below 8 bits pack several entries per byte, the lowest-numbered entry in the least
//! significant bits (as QEMU does); widths of 8 bits and above are big-endian integers.

/// Reads entry `index` of width `1 << order` bits from `block`. The caller keeps `index` inside
/// the block (`index < block.len() * 8 >> order`).
pub fn get(block: &[u8], order: u32, index: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block[index / per_byte];
            let shift = (index % per_byte) * bits;
            u64::from(byte >> shift) & ((1 << bits) - 1)
        }
        3 => u64::from(block[index]),
        4 => u64::from(super::be_u16(block, index * 2)),
        5 => u64::from(super::be_u32(block, index * 4)),
        _ => super::be_u64(block, index * 8),
    }
}

/// Largest refcount a width of `1 << order` bits can hold.
pub(crate) fn max_value(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Writes `value` into entry `index`. Returns `false` (and writes nothing) if `value` does not
/// fit the width.
pub fn set(block: &mut [u8], order: u32, index: usize, value: u64) -> bool {
    if value > max_value(order) {
        return false;
    }
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) << shift) as u8;
            let b = &mut block[index / per_byte];
            *b = (*b & !mask) | ((value as u8) << shift);
        }
        3 => block[index] = value as u8,
        4 => super::bytes::put_u16(block, index * 2, value as u16),
        5 => super::bytes::put_u32(block, index * 4, value as u32),
        _ => super::bytes::put_u64(block, index * 8, value),
    }
    true
}

/// Number of entries in a refcount block of `cluster_size` bytes.
pub(crate) fn entries_per_block(cluster_size: u64, order: u32) -> u64 {
    (cluster_size * 8) >> order
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sub_byte_packing_is_lsb_first() {
        let mut b = [0u8; 2];
        assert!(set(&mut b, 0, 0, 1));
        assert!(set(&mut b, 0, 9, 1));
        assert_eq!(b, [0b0000_0001, 0b0000_0010]);
        let mut b = [0u8; 1];
        assert!(set(&mut b, 2, 1, 0xa));
        assert_eq!(b, [0xa0]);
        assert!(!set(&mut b, 2, 0, 16));
        assert_eq!(get(&b, 2, 1), 0xa);
    }

    #[test]
    fn wide_entries_are_big_endian() {
        let mut b = [0u8; 16];
        set(&mut b, 4, 1, 0x1234);
        assert_eq!(&b[2..4], &[0x12, 0x34]);
        set(&mut b, 6, 1, u64::MAX);
        assert_eq!(get(&b, 6, 1), u64::MAX);
    }

    proptest! {
        #[test]
        fn round_trip(order in 0u32..=6, idx in 0usize..64, v in any::<u64>(), fill in any::<u8>()) {
            let mut b = vec![fill; 512];
            let before: Vec<u64> = (0..64).map(|i| get(&b, order, i)).collect();
            let v = v & max_value(order);
            prop_assert!(set(&mut b, order, idx, v));
            for (i, &old) in before.iter().enumerate() {
                let want = if i == idx { v } else { old };
                prop_assert_eq!(get(&b, order, i), want);
            }
        }
    }
}
