//! qcow2 through pipes: a writer that lays a whole image out in one forward pass over any
//! [`std::io::Write`], and a reader that takes such an image from any [`std::io::Read`].
//!
//! The image is planned from the source's allocation map before a byte is written, so every
//! byte of the output is written once, in order: cluster 0 (header, extensions, backing name),
//! the refcount table, the refcount blocks, the L1 table, then each L2 table in guest order,
//! directly followed by the data clusters it maps in ascending guest order, so that a reader
//! holds one L2 table's references at a time. Without compression every cluster of the file is
//! in use exactly once, so all refcounts are 1; every L2 entry carries the COPIED flag; the
//! output is the same bytes on every run for the same source and options.

mod chunks;
mod reader;
mod spool;
mod walk;
mod writer;

pub use reader::{StreamReader, DEFAULT_MAX_PENDING};
pub use writer::{write_qcow2_stream, StreamWriteOptions};
