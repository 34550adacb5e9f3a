//! Compressed data for a streamed image, spooled before the metadata that points into it.
//!
//! With compression the host offset of every cluster depends on the sizes of the compressed
//! clusters before it, and the refcount blocks that precede the data count how many compressed
//! clusters share each host cluster; neither is known until the data has been compressed. The
//! data clusters are therefore compressed once (in parallel, in batches) into an unlinked
//! temporary file, with a 4-byte record per cluster in a second one; the metadata is then
//! computed from the records (replayed in order, never held in memory) and the spooled data
//! copied out after it. Memory stays bounded by one batch; disk use is the compressed size plus
//! 4 bytes per data cluster.
//!
//! Packing: compressed clusters follow each other byte by byte and may run across a host
//! cluster boundary (as QEMU packs them); a cluster that does not compress to fewer bytes than
//! a cluster is stored whole at the next cluster boundary; a cluster of zeros takes no
//! room. A host cluster is never shared by more compressed clusters than its refcount width
//! can count: the next one then starts a new host cluster.

use crate::codec::compress_cluster;
use crate::device::BlockDevice;
use crate::error::{Error, Result};
use crate::format::header::CompressionType;
use crate::format::refcount::max_value;
use crate::ops::convert::is_zero;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::fs::FileExt;

/// Bytes of guest data compressed per batch (spread over the workers): the batch's input and
/// output buffers are the spool's memory.
const BATCH_BYTES: u64 = 4 << 20;

/// Record flag: the cluster is stored uncompressed (its length is the cluster size).
const RAW: u32 = 1 << 31;
/// Record flag: the cluster is all zeros and stored nowhere.
const ZERO: u32 = 1 << 30;

fn io(context: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| Error::io(context, e)
}

/// A temporary file no one else can reach: created in the temporary directory and unlinked
/// at once.
fn anonymous_file() -> Result<File> {
    let dir = std::env::temp_dir();
    for attempt in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = dir.join(format!(
            ".qcow2kit-spool-{}-{nanos}-{attempt}",
            std::process::id()
        ));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => {
                std::fs::remove_file(&path).map_err(io("unlinking the spool file"))?;
                return Ok(f);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("creating the spool file", e)),
        }
    }
    Err(Error::InvalidArgument(
        "could not create a spool file in the temporary directory".into(),
    ))
}

/// Where one spooled cluster goes in the data area (offsets relative to its start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placed {
    /// Zeros: no cluster.
    Zero,
    /// Stored whole at this cluster-aligned offset.
    Raw(u64),
    /// Compressed: `len` bytes at this offset.
    Compressed(u64, u64),
}

/// The compressed data of a streamed image.
pub(super) struct Spool {
    data: File,
    index: File,
    cs: u64,
    max_refcount: u64,
}

/// How clusters of zeros are written.
#[derive(Debug, Clone, Copy)]
pub(super) enum Zeros {
    /// Stored nowhere ([`Placed::Zero`]: unallocated, or a zero entry over a backing file).
    Skip,
    /// Stored (compressed) like any other cluster: over a backing file without a zero flag.
    Store,
}

impl Spool {
    /// Compresses the guest clusters `clusters` (ascending) of `src` into a new spool.
    pub(super) fn build(
        src: &dyn BlockDevice,
        clusters: impl Iterator<Item = u64>,
        cs: u64,
        kind: CompressionType,
        refcount_order: u32,
        workers: usize,
        zeros: Zeros,
    ) -> Result<Spool> {
        let skip_zeros = matches!(zeros, Zeros::Skip);
        let data = anonymous_file()?;
        let index = anonymous_file()?;
        let mut dw = BufWriter::with_capacity(1 << 20, &data);
        let mut iw = BufWriter::with_capacity(64 << 10, &index);
        let size = src.size();
        let batch_clusters = (BATCH_BYTES / cs).max(1) as usize;
        let mut batch: Vec<u64> = Vec::with_capacity(batch_clusters);
        let mut input = vec![0u8; batch_clusters * cs as usize];
        let mut outs: Vec<Vec<u8>> = vec![Vec::new(); batch_clusters];
        let mut flags = vec![0u32; batch_clusters];
        let mut clusters = clusters.peekable();
        while clusters.peek().is_some() {
            batch.clear();
            batch.extend(clusters.by_ref().take(batch_clusters));
            for (i, &c) in batch.iter().enumerate() {
                let buf = &mut input[i * cs as usize..(i + 1) * cs as usize];
                buf.fill(0);
                let off = c * cs;
                let n = cs.min(size.saturating_sub(off)) as usize;
                if n > 0 {
                    src.read_at(&mut buf[..n], off)?;
                }
            }
            let per = batch.len().div_ceil(workers.max(1));
            std::thread::scope(|s| {
                for ((ins, os), fs) in input[..batch.len() * cs as usize]
                    .chunks(per * cs as usize)
                    .zip(outs.chunks_mut(per))
                    .zip(flags.chunks_mut(per))
                {
                    s.spawn(move || {
                        for ((cluster, out), flag) in ins
                            .chunks(cs as usize)
                            .zip(os.iter_mut())
                            .zip(fs.iter_mut())
                        {
                            *flag = if skip_zeros && is_zero(cluster) {
                                ZERO
                            } else if compress_cluster(kind, cluster, out) {
                                out.len() as u32
                            } else {
                                RAW
                            };
                        }
                    });
                }
            });
            for i in 0..batch.len() {
                let f = flags[i];
                let bytes: &[u8] = if f == RAW {
                    &input[i * cs as usize..(i + 1) * cs as usize]
                } else if f == ZERO {
                    &[]
                } else {
                    &outs[i]
                };
                dw.write_all(bytes).map_err(io("writing the spool file"))?;
                iw.write_all(&f.to_be_bytes())
                    .map_err(io("writing the spool index"))?;
            }
        }
        dw.flush().map_err(io("writing the spool file"))?;
        iw.flush().map_err(io("writing the spool index"))?;
        drop((dw, iw));
        Ok(Spool {
            data,
            index,
            cs,
            max_refcount: max_value(refcount_order),
        })
    }

    /// The placements of the spooled clusters, in order, with room for the L2 tables made
    /// between them ([`Placements::table`]). Several may be read at once.
    pub(super) fn placements(&self) -> Placements<'_> {
        Placements {
            index: &self.index,
            buf: Vec::new(),
            at: 0,
            read: 0,
            cs: self.cs,
            max_refcount: self.max_refcount,
            pos: 0,
            tail: (u64::MAX, 0),
        }
    }

    /// The spooled bytes from the start, in the order of their placements.
    pub(super) fn data(&self) -> Result<BufReader<&File>> {
        let mut f = &self.data;
        std::io::Seek::rewind(&mut f).map_err(io("reading the spool file"))?;
        Ok(BufReader::with_capacity(1 << 20, f))
    }
}

/// Bytes of the index read at once.
const INDEX_CHUNK: usize = 64 << 10;

/// Replays the packing of the spooled clusters from their records (read with positioned
/// reads, so that several replays can run side by side).
pub(super) struct Placements<'a> {
    index: &'a File,
    buf: Vec<u8>,
    /// Next record's position in `buf`.
    at: usize,
    /// Bytes of the index read so far.
    read: u64,
    cs: u64,
    max_refcount: u64,
    /// Next free byte of the area.
    pos: u64,
    /// The host cluster the last compressed cluster ended in, and how many share it.
    tail: (u64, u64),
}

impl Placements<'_> {
    /// The next 4-byte record, `None` at the end of the index.
    fn record(&mut self) -> Result<Option<u32>> {
        if self.at + 4 > self.buf.len() {
            self.buf.drain(..self.at);
            self.at = 0;
            while self.buf.len() < 4 {
                let have = self.buf.len();
                self.buf.resize(have + INDEX_CHUNK, 0);
                let n = FileExt::read_at(self.index, &mut self.buf[have..], self.read)
                    .map_err(io("reading the spool index"))?;
                self.read += n as u64;
                self.buf.truncate(have + n);
                if n == 0 {
                    return Ok(None);
                }
            }
        }
        let rec = [0, 1, 2, 3].map(|i| self.buf[self.at + i]);
        self.at += 4;
        Ok(Some(u32::from_be_bytes(rec)))
    }

    /// Room for one L2 table: the next whole cluster. Returns its offset.
    pub(super) fn table(&mut self) -> u64 {
        let at = self.pos.next_multiple_of(self.cs);
        self.pos = at + self.cs;
        at
    }

    /// Bytes of the area placed so far.
    pub(super) fn end(&self) -> u64 {
        self.pos
    }

    /// The next placement, `None` after the last.
    pub(super) fn next_placed(&mut self) -> Result<Option<Placed>> {
        let Some(f) = self.record()? else {
            return Ok(None);
        };
        let cs = self.cs;
        Ok(Some(if f == ZERO {
            Placed::Zero
        } else if f == RAW {
            let at = self.pos.next_multiple_of(cs);
            self.pos = at + cs;
            Placed::Raw(at)
        } else {
            let len = u64::from(f);
            let mut at = self.pos;
            if at / cs == self.tail.0 && self.tail.1 >= self.max_refcount {
                at = at.next_multiple_of(cs);
            }
            let (first, last) = (at / cs, (at + len - 1) / cs);
            self.tail = if last == first && first == self.tail.0 {
                (last, self.tail.1 + 1)
            } else {
                (last, 1)
            };
            self.pos = at + len;
            Placed::Compressed(at, len)
        }))
    }
}
