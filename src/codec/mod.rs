//! Per-buffer codecs: compression of one cluster.

mod compress;

pub(crate) use compress::{compress_cluster, decompress_cluster};
