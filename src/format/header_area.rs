//! Cluster 0 as a whole: the header, its extensions and the backing file name, laid out as
//! QEMU writes them (header, extensions ending with the end marker, then the name).

use super::extension::{Extensions, FeatureName};
use super::features::FeatureKind;
use super::header::{Header, V3_HEADER_LENGTH};

/// The feature name table QEMU writes into every version 3 image it creates or rewrites.
pub(crate) fn qemu_feature_table() -> Vec<FeatureName> {
    let f = |kind, bit, name: &str| FeatureName {
        kind,
        bit,
        name: name.into(),
    };
    vec![
        f(FeatureKind::Incompatible, 0, "dirty bit"),
        f(FeatureKind::Incompatible, 1, "corrupt bit"),
        f(FeatureKind::Incompatible, 2, "external data file"),
        f(FeatureKind::Incompatible, 3, "compression type"),
        f(FeatureKind::Incompatible, 4, "extended L2 entries"),
        f(FeatureKind::Compatible, 0, "lazy refcounts"),
        f(FeatureKind::Autoclear, 0, "bitmaps"),
        f(FeatureKind::Autoclear, 1, "raw external data"),
    ]
}

/// The feature name table QEMU writes into an image of `version` with `cluster_size` bytes
/// per cluster: its table for version 3 with clusters over 4 KiB (smaller clusters keep the
/// room for the backing file name), none otherwise.
pub(crate) fn qemu_feature_table_for(version: u32, cluster_size: u64) -> Vec<FeatureName> {
    if version >= 3 && cluster_size > 4096 {
        qemu_feature_table()
    } else {
        Vec::new()
    }
}

/// Encodes cluster 0 from `header`, `ext` and the backing file name, and returns it with the
/// header's `backing_file_offset`/`backing_file_size` set to where the name lands (both 0
/// without a name). The feature name table, being optional, is left out when everything does
/// not fit in `cluster_size` bytes with it (as QEMU does); `None` when it does not fit without.
///
/// The result is not padded: bytes after it up to the end of the cluster must read as zeros
/// or be ignored (nothing is read past the name).
pub(crate) fn encode_header_area(
    header: &Header,
    ext: &Extensions,
    backing: Option<&[u8]>,
    cluster_size: u64,
) -> Option<(Header, Vec<u8>)> {
    let build = |ext: &Extensions| {
        let mut h = header.clone();
        let mut out = h.encode();
        out.extend_from_slice(&ext.encode());
        match backing {
            Some(name) => {
                h.backing_file_offset = out.len() as u64;
                h.backing_file_size = u32::try_from(name.len()).ok()?;
                out.extend_from_slice(name);
                let encoded = h.encode();
                out[..encoded.len()].copy_from_slice(&encoded);
            }
            None => {
                h.backing_file_offset = 0;
                h.backing_file_size = 0;
                let encoded = h.encode();
                out[..encoded.len()].copy_from_slice(&encoded);
            }
        }
        (out.len() as u64 <= cluster_size).then_some((h, out))
    };
    build(ext).or_else(|| {
        if ext.feature_names.is_empty() {
            return None;
        }
        let without = Extensions {
            feature_names: Vec::new(),
            ..ext.clone()
        };
        build(&without)
    })
}

/// Where the header area of `cluster0` (the first bytes of an image, parsed as `header`) ends:
/// past the end of its extension list (the end marker included) or of its backing file name,
/// whichever is later. Bytes after it are not read by anything. Clamped to `cluster0.len()`.
pub(crate) fn area_end(cluster0: &[u8], header: &Header) -> usize {
    let len = cluster0.len();
    let mut off = (header.header_length as usize).min(len);
    let stop = if header.backing_file_offset != 0 {
        (header.backing_file_offset as usize).min(len)
    } else {
        len
    };
    while off + 8 <= stop {
        let kind = u32::from_be_bytes([
            cluster0[off],
            cluster0[off + 1],
            cluster0[off + 2],
            cluster0[off + 3],
        ]);
        let n = u32::from_be_bytes([
            cluster0[off + 4],
            cluster0[off + 5],
            cluster0[off + 6],
            cluster0[off + 7],
        ]) as usize;
        off += 8;
        if kind == 0 {
            break;
        }
        off = off.saturating_add(n.next_multiple_of(8)).min(stop);
    }
    let name_end = if header.backing_file_offset != 0 {
        (header.backing_file_offset as usize).saturating_add(header.backing_file_size as usize)
    } else {
        0
    };
    off.max(name_end).min(len)
}

/// The header as QEMU rewrites it: a version 3 header grows to the current length (the
/// compression type byte included); unknown trailing fields are kept.
pub(crate) fn normalized_for_rewrite(header: &Header) -> Header {
    let mut h = header.clone();
    if h.version >= 3 && h.header_length < V3_HEADER_LENGTH {
        h.header_length = V3_HEADER_LENGTH;
        let want = (V3_HEADER_LENGTH - 105) as usize;
        if h.extra_bytes.len() < want {
            h.extra_bytes.resize(want, 0);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::header::Header;

    fn parse(area: &[u8]) -> (Header, Extensions, Option<Vec<u8>>) {
        let h = Header::parse(area).expect("valid header");
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset as usize
        } else {
            area.len()
        };
        let ext = Extensions::parse(&area[h.header_length as usize..ext_end]).expect("valid");
        let name = (h.backing_file_offset != 0).then(|| {
            let s = h.backing_file_offset as usize;
            area[s..s + h.backing_file_size as usize].to_vec()
        });
        (h, ext, name)
    }

    fn sample() -> (Header, Extensions) {
        let mut b = [0u8; 112];
        b[..4].copy_from_slice(&crate::format::QCOW2_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        let h = Header::parse(&b).expect("valid header");
        let ext = Extensions {
            backing_format: Some(b"qcow2".to_vec()),
            feature_names: qemu_feature_table(),
            unknown: vec![(0x1234_5678, vec![1, 2, 3])],
            ..Extensions::default()
        };
        (h, ext)
    }

    #[test]
    fn name_and_extensions_round_trip() {
        let (h, ext) = sample();
        let (h2, area) =
            encode_header_area(&h, &ext, Some(b"base.qcow2"), 65536).expect("fits in a cluster");
        let (h3, ext3, name) = parse(&area);
        assert_eq!(h3, h2);
        assert_eq!(ext3, ext);
        assert_eq!(name.as_deref(), Some(&b"base.qcow2"[..]));
        assert_eq!(h2.backing_file_size, 10);
        assert_eq!(h2.backing_file_offset as usize + 10, area.len());
    }

    #[test]
    fn no_name_clears_the_pointer() {
        let (mut h, ext) = sample();
        h.backing_file_offset = 4000;
        h.backing_file_size = 7;
        let (h2, area) = encode_header_area(&h, &ext, None, 65536).expect("fits");
        assert_eq!((h2.backing_file_offset, h2.backing_file_size), (0, 0));
        assert_eq!(parse(&area).2, None);
    }

    #[test]
    fn feature_table_dropped_first_then_refused() {
        let (h, ext) = sample();
        let name = vec![b'x'; 150];
        let (_, area) = encode_header_area(&h, &ext, Some(&name), 512).expect("fits without table");
        assert!(parse(&area).1.feature_names.is_empty());
        assert!(area.len() <= 512);
        let long = vec![b'x'; 400];
        assert!(encode_header_area(&h, &ext, Some(&long), 512).is_none());
    }

    #[test]
    fn area_end_covers_extensions_and_name() {
        let (h, ext) = sample();
        let (h2, area) = encode_header_area(&h, &ext, Some(b"base.qcow2"), 65536).expect("fits");
        let mut cluster = area.clone();
        cluster.resize(4096, 0xee);
        assert_eq!(area_end(&cluster, &h2), area.len());
        let (h3, area) = encode_header_area(&h, &ext, None, 65536).expect("fits");
        let mut cluster = area.clone();
        cluster.resize(4096, 0);
        assert_eq!(area_end(&cluster, &h3), area.len());
    }

    #[test]
    fn short_v3_header_grows_to_current_length() {
        let (mut h, _) = sample();
        h.header_length = 104;
        h.extra_bytes.clear();
        let n = normalized_for_rewrite(&h);
        assert_eq!(n.header_length, V3_HEADER_LENGTH);
        assert_eq!(n.encode().len(), V3_HEADER_LENGTH as usize);
    }
}
