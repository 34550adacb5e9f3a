//! Per-buffer codecs: compression of one cluster.

mod compress;

pub use compress::{compress_cluster, decompress_cluster, ZLIB_LEVEL, ZSTD_LEVEL};
