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
use crate::format::entry::{encode_normal, CompressedDescriptor};
use crate::format::header::CompressionType;
use crate::format::refcount::max_value;
use crate::ops::convert::is_zero;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};

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
    /// Bytes of the data area (the end of the last cluster stored).
    area: u64,
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
        let mut spool = Spool {
            data,
            index,
            cs,
            max_refcount: max_value(refcount_order),
            area: 0,
        };
        let mut end = 0u64;
        let mut r = spool.placements()?;
        while let Some(p) = r.next_placed()? {
            end = match p {
                Placed::Zero => end,
                Placed::Raw(o) => o + cs,
                Placed::Compressed(o, len) => o + len,
            };
        }
        spool.area = end.next_multiple_of(cs);
        Ok(spool)
    }

    /// Host clusters of the data area.
    pub(super) fn clusters(&self) -> u64 {
        self.area / self.cs
    }

    /// The placements of the spooled clusters, in order.
    pub(super) fn placements(&self) -> Result<Placements<'_>> {
        let mut f = &self.index;
        std::io::Seek::rewind(&mut f).map_err(io("reading the spool index"))?;
        Ok(Placements {
            index: BufReader::with_capacity(64 << 10, f),
            cs: self.cs,
            max_refcount: self.max_refcount,
            pos: 0,
            tail: (u64::MAX, 0),
        })
    }

    /// The L2 entry of a placement, the data area starting at host offset `start` (0 for
    /// [`Placed::Zero`], whose entry the caller decides).
    pub(super) fn entry(&self, p: Placed, start: u64, cluster_bits: u32) -> Result<u64> {
        Ok(match p {
            Placed::Zero => 0,
            Placed::Raw(o) => encode_normal(start + o, true),
            Placed::Compressed(o, len) => CompressedDescriptor::for_bytes(start + o, len)
                .encode(cluster_bits)
                .ok_or_else(|| {
                    Error::Unsupported(
                        "compressed cluster lies beyond what an L2 entry can address".into(),
                    )
                })?,
        })
    }

    /// The refcount of every host cluster of the data area, in order, to `emit`.
    pub(super) fn refcounts(&self, mut emit: impl FnMut(u64) -> Result<()>) -> Result<()> {
        let cs = self.cs;
        let (mut cur, mut count) = (0u64, 0u64);
        let mut r = self.placements()?;
        while let Some(p) = r.next_placed()? {
            let (first, last) = match p {
                Placed::Zero => continue,
                Placed::Raw(o) => (o / cs, o / cs),
                Placed::Compressed(o, len) => (o / cs, (o + len - 1) / cs),
            };
            for c in first..=last {
                while cur < c {
                    emit(count)?;
                    (cur, count) = (cur + 1, 0);
                }
                count += 1;
            }
        }
        while cur < self.clusters() {
            emit(count)?;
            (cur, count) = (cur + 1, 0);
        }
        Ok(())
    }

    /// Copies the data area to `out`: every stored cluster at its place, zeros between.
    pub(super) fn copy_out(&self, out: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let mut f = &self.data;
        std::io::Seek::rewind(&mut f).map_err(io("reading the spool file"))?;
        let mut data = BufReader::with_capacity(1 << 20, f);
        let mut buf = vec![0u8; self.cs as usize];
        let zeros = vec![0u8; self.cs as usize];
        let mut written = 0u64;
        let mut r = self.placements()?;
        let pad = |out: &mut dyn FnMut(&[u8]) -> Result<()>, written: &mut u64, to: u64| {
            while *written < to {
                let n = (to - *written).min(zeros.len() as u64);
                out(&zeros[..n as usize])?;
                *written += n;
            }
            Ok::<(), Error>(())
        };
        while let Some(p) = r.next_placed()? {
            let (at, len) = match p {
                Placed::Zero => continue,
                Placed::Raw(o) => (o, self.cs),
                Placed::Compressed(o, len) => (o, len),
            };
            pad(out, &mut written, at)?;
            let b = &mut buf[..len as usize];
            data.read_exact(b).map_err(io("reading the spool file"))?;
            out(b)?;
            written += len;
        }
        pad(out, &mut written, self.area)
    }
}

/// Replays the packing of the spooled clusters from their records.
pub(super) struct Placements<'a> {
    index: BufReader<&'a File>,
    cs: u64,
    max_refcount: u64,
    /// Next free byte of the data area.
    pos: u64,
    /// The host cluster the last compressed cluster ended in, and how many share it.
    tail: (u64, u64),
}

impl Placements<'_> {
    /// The next placement, `None` after the last.
    pub(super) fn next_placed(&mut self) -> Result<Option<Placed>> {
        let mut rec = [0u8; 4];
        match self.index.read_exact(&mut rec) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(Error::io("reading the spool index", e)),
        }
        let f = u32::from_be_bytes(rec);
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
