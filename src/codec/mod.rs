//! Per-buffer codecs: compression of one cluster.

mod compress;

pub use compress::decompress_cluster;
