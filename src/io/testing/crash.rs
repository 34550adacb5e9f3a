//! A storage that simulates power loss.

use super::{crashed, OpCounts, OpKind, SplitMix};
use crate::io::Storage;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

/// Granularity of torn writes: a sector either reached the medium or did not.
const SECTOR: u64 = 512;

/// Unflushed sets at most this long also get one post-crash image per single operation.
const SMALL_SET: usize = 8;

/// When a [`CrashStorage`] loses power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrashPoint {
    /// During the write-type operation with this index (from 0; `write_at`, `set_len` and
    /// `punch_hole` counted together, as [`OpCounts::mutations`] does). The operation is in
    /// flight: it is recorded as the last unflushed operation (so a post-crash image may hold
    /// it whole, torn or not at all) and fails.
    Write(u64),
    /// During the flush with this index (from 0): it fails, and what it would have made durable
    /// is still only unflushed.
    Flush(u64),
}

/// A mutating operation made since the last completed flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PendingOp {
    /// `write_at(data, offset)`.
    Write {
        /// Where.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// `set_len(len)`.
    SetLen(u64),
    /// `punch_hole(offset, len)`.
    PunchHole {
        /// Where.
        offset: u64,
        /// How many bytes.
        len: u64,
    },
}

impl PendingOp {
    /// Where the operation lands and how many bytes it covers; `None` for `set_len`.
    fn span(&self) -> Option<(u64, u64)> {
        match self {
            PendingOp::Write { offset, data } => Some((*offset, data.len() as u64)),
            PendingOp::PunchHole { offset, len } => Some((*offset, *len)),
            PendingOp::SetLen(_) => None,
        }
    }

    /// Byte counts at which the operation can be torn: prefixes that end on a 512-byte
    /// boundary of the storage, strictly inside the operation. Empty for `set_len`.
    pub fn tear_points(&self) -> Vec<u64> {
        let Some((offset, len)) = self.span() else {
            return Vec::new();
        };
        let mut v = Vec::new();
        let mut b = (offset / SECTOR + 1) * SECTOR;
        while b < offset + len {
            v.push(b - offset);
            b += SECTOR;
        }
        v
    }

    /// The operation cut at the 512-byte boundaries of the storage: one byte range (relative
    /// to the operation's start) per storage sector it touches, in order. Each is the unit a
    /// disk persists or loses whole. Empty for `set_len` and for empty operations.
    pub fn pieces(&self) -> Vec<Range<u64>> {
        let Some((_, len)) = self.span() else {
            return Vec::new();
        };
        let mut start = 0;
        let mut v = Vec::new();
        for end in self.tear_points().into_iter().chain([len]) {
            if end > start {
                v.push(start..end);
            }
            start = end;
        }
        v
    }

    /// Which of [`pieces`](Self::pieces) reach the medium under `choice`.
    ///
    /// # Panics
    /// If `choice` is a [`Choice::Torn`] that is not one of [`tear_points`](Self::tear_points).
    pub fn kept_pieces(&self, choice: Choice) -> Vec<bool> {
        let pieces = self.pieces();
        match choice {
            Choice::Drop => vec![false; pieces.len()],
            Choice::Apply => vec![true; pieces.len()],
            Choice::Torn(n) => {
                assert!(
                    self.tear_points().contains(&n),
                    "{n} is not a tear point of {self:?}"
                );
                pieces.iter().map(|p| p.end <= n).collect()
            }
            Choice::Sectors(seed) => {
                let mut rng = SplitMix::new(seed);
                let mut bits = 0;
                (0..pieces.len())
                    .map(|i| {
                        if i % 64 == 0 {
                            bits = rng.next_u64();
                        }
                        bits >> (i % 64) & 1 == 1
                    })
                    .collect()
            }
        }
    }
}

/// What a post-crash image keeps of one unflushed operation.
///
/// A disk persists each 512-byte sector whole or not at all, but of a multi-sector write it may
/// persist any subset of the sectors ([`Sectors`](Self::Sectors)), not only a prefix
/// ([`Torn`](Self::Torn)). For `set_len`, every choice but [`Drop`](Self::Drop) applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Choice {
    /// Lost.
    Drop,
    /// Reached the medium whole.
    Apply,
    /// Only its first this-many bytes reached the medium (one of
    /// [`PendingOp::tear_points`]).
    Torn(u64),
    /// The subset of its [`pieces`](PendingOp::pieces) (one per storage sector) drawn from this
    /// seed reached the medium: piece `i` did if bit `i % 64` of the `i / 64`-th output of
    /// [`SplitMix::new(seed)`](SplitMix::new) is set. A seed rather than a bitmask, so that
    /// the choice stays `Copy` and small for operations of any length;
    /// [`PendingOp::kept_pieces`] tells which pieces a seed keeps.
    Sectors(u64),
}

/// The medium of one storage.
#[derive(Debug)]
struct State {
    /// What the medium holds as of the last completed flush.
    durable: Vec<u8>,
    /// What reads see: `durable` with every pending operation applied.
    live: Vec<u8>,
    pending: Vec<PendingOp>,
}

/// The power supply: operation counts and the crash, shared by the storages made with
/// [`CrashStorage::sibling`].
#[derive(Debug)]
struct Control {
    counts: OpCounts,
    crash_at: Option<CrashPoint>,
    crashed: bool,
}

/// An in-memory storage with the semantics of a disk with a volatile write cache, that loses
/// power at a chosen point.
///
/// Until the crash it behaves as [`MemoryStorage`](crate::io::MemoryStorage), recording every
/// mutation since the last completed flush. From the crash on, every mutation and flush fails
/// (reads still see the state just before the crash), and [`crash_image`](Self::crash_image)
/// builds what the medium may hold after power returns.
///
/// Several storages (an image and its external data file, say) can share one power supply:
/// see [`sibling`](Self::sibling).
#[derive(Debug)]
pub struct CrashStorage {
    /// Locked before `state` when both are needed.
    control: Arc<Mutex<Control>>,
    state: Mutex<State>,
}

/// Applies the bytes `r` (relative to the operation's start) of a write or a hole punch.
fn apply_range(image: &mut Vec<u8>, op: &PendingOp, r: Range<u64>) {
    match op {
        PendingOp::Write { offset, data } => {
            if r.is_empty() {
                return;
            }
            let start = (offset + r.start) as usize;
            let end = (offset + r.end) as usize;
            if image.len() < end {
                image.resize(end, 0);
            }
            image[start..end].copy_from_slice(&data[r.start as usize..r.end as usize]);
        }
        PendingOp::PunchHole { offset, .. } => {
            let end = offset.saturating_add(r.end).min(image.len() as u64);
            let start = offset.saturating_add(r.start).min(end);
            image[start as usize..end as usize].fill(0);
        }
        PendingOp::SetLen(_) => {}
    }
}

/// Applies `op` whole.
fn apply(image: &mut Vec<u8>, op: &PendingOp) {
    match op {
        PendingOp::SetLen(len) => image.resize(*len as usize, 0),
        _ => {
            if let Some((_, len)) = op.span() {
                apply_range(image, op, 0..len);
            }
        }
    }
}

/// Applies the pieces of `op` for which `keep` holds, consecutive ones in one copy.
fn apply_pieces(image: &mut Vec<u8>, op: &PendingOp, keep: impl Fn(usize) -> bool) {
    let mut run: Option<Range<u64>> = None;
    for (i, p) in op.pieces().into_iter().enumerate() {
        if !keep(i) {
            if let Some(r) = run.take() {
                apply_range(image, op, r);
            }
        } else if let Some(r) = &mut run {
            r.end = p.end;
        } else {
            run = Some(p);
        }
    }
    if let Some(r) = run {
        apply_range(image, op, r);
    }
}

impl CrashStorage {
    /// A storage whose durable content is `initial`, crashing at `crash_at` (never if `None`;
    /// [`crash_now`](Self::crash_now) crashes it at any moment).
    pub fn new(initial: Vec<u8>, crash_at: Option<CrashPoint>) -> Self {
        let control = Control {
            counts: OpCounts::default(),
            crash_at,
            crashed: false,
        };
        Self::with_control(Arc::new(Mutex::new(control)), initial)
    }

    /// A second storage (a second file on the same machine) whose durable content is
    /// `initial`, on the same power supply as `self`.
    ///
    /// The two count their operations together: [`counts`](Self::counts) of either is the
    /// total of both, and a [`CrashPoint`] indexes the operations of both in the order they
    /// were made, so one run that crashes at each index in turn crashes once in every operation
    /// of either file. At the crash both freeze. Each keeps its own medium: a flush makes only
    /// its own storage's writes durable (as `fsync` of one file does), so a post-crash state is
    /// a [`crash_image`](Self::crash_image) of each, with choices made independently.
    pub fn sibling(&self, initial: Vec<u8>) -> Self {
        Self::with_control(self.control.clone(), initial)
    }

    fn with_control(control: Arc<Mutex<Control>>, initial: Vec<u8>) -> Self {
        CrashStorage {
            control,
            state: Mutex::new(State {
                live: initial.clone(),
                durable: initial,
                pending: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Operations attempted so far, by kind (the one in flight at the crash included), over
    /// every storage on this power supply.
    pub fn counts(&self) -> OpCounts {
        self.control().counts
    }

    /// Loses power now (every storage on this power supply).
    pub fn crash_now(&self) {
        self.control().crashed = true;
    }

    /// Whether power was lost.
    pub fn is_crashed(&self) -> bool {
        self.control().crashed
    }

    /// The operations made since the last completed flush, oldest first.
    pub fn pending(&self) -> Vec<PendingOp> {
        self.lock().pending.clone()
    }

    /// The medium as of the last completed flush.
    pub fn durable(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// What reads see now.
    pub fn live(&self) -> Vec<u8> {
        self.lock().live.clone()
    }

    /// A post-crash medium: the flushed state plus the unflushed operations as `choices` says,
    /// applied in their original order (`choices[i]` for the `i`-th pending operation; missing
    /// choices are [`Choice::Drop`]), under the rule of one sector below.
    ///
    /// Writes that share a storage sector reach the medium in order. A sector reaches the disk
    /// whole, from a page cache that holds every write made to it so far: after a crash it holds
    /// what it held after some prefix of the unflushed operations that touch it, never a later
    /// one without an earlier one. So where `choices` keep an operation's piece of a sector, the
    /// earlier operations' pieces of that sector are applied too, whatever their choice. (For
    /// writes of whole sectors this changes nothing: the kept later piece covers the earlier
    /// ones. It matters for partial-sector writes: a dropped first write of bytes 0..8 and a
    /// kept second write of bytes 8..16 of one sector leave both.) A `set_len` is applied or
    /// not on its own.
    ///
    /// # Panics
    /// If a [`Choice::Torn`] is not one of its operation's tear points.
    pub fn crash_image(&self, choices: &[Choice]) -> Vec<u8> {
        let s = self.lock();
        let choice = |i: usize| choices.get(i).copied().unwrap_or(Choice::Drop);
        // Each operation's pieces, as storage sectors, and whether `choices` keep them.
        let pieces: Vec<Vec<(u64, bool)>> = s
            .pending
            .iter()
            .enumerate()
            .map(|(i, op)| {
                let offset = op.span().map_or(0, |(o, _)| o);
                op.pieces()
                    .iter()
                    .zip(op.kept_pieces(choice(i)))
                    .map(|(p, k)| ((offset + p.start) / SECTOR, k))
                    .collect()
            })
            .collect();
        // The last operation whose piece of each sector is kept.
        let mut last = std::collections::HashMap::new();
        for (i, ps) in pieces.iter().enumerate() {
            for &(sector, _) in ps.iter().filter(|p| p.1) {
                last.insert(sector, i);
            }
        }
        let mut image = s.durable.clone();
        for (i, op) in s.pending.iter().enumerate() {
            match op {
                PendingOp::SetLen(_) if choice(i) != Choice::Drop => apply(&mut image, op),
                PendingOp::SetLen(_) => {}
                _ => apply_pieces(&mut image, op, |j| {
                    last.get(&pieces[i][j].0).is_some_and(|&l| i <= l)
                }),
            }
        }
        image
    }

    /// Deterministic sets of choices worth trying: none of the unflushed operations, all of
    /// them, all with the last one torn, all with the last one reduced to a random subset of
    /// its sectors; for at most 8 unflushed operations each one alone (and each tearable one
    /// alone and torn); then `random` sets drawn from `seed`, where each operation is dropped,
    /// applied, torn at a random sector boundary or reduced to a random subset of its sectors
    /// ([`Choice::Sectors`]; the last two only for operations over more than one sector).
    /// Duplicates removed.
    pub fn choice_sets(&self, seed: u64, random: usize) -> Vec<Vec<Choice>> {
        let pending = self.pending();
        let n = pending.len();
        let tears: Vec<Vec<u64>> = pending.iter().map(PendingOp::tear_points).collect();
        let mut rng = SplitMix::new(seed ^ (n as u64).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let pick = |t: &[u64], rng: &mut SplitMix| t[rng.below(t.len() as u64) as usize];
        let mut sets = vec![vec![Choice::Drop; n], vec![Choice::Apply; n]];
        if let Some(t) = tears.last().filter(|t| !t.is_empty()) {
            let mut s = vec![Choice::Apply; n];
            s[n - 1] = Choice::Torn(pick(t, &mut rng));
            sets.push(s.clone());
            s[n - 1] = Choice::Sectors(rng.next_u64());
            sets.push(s);
        }
        if n <= SMALL_SET {
            for i in 0..n {
                let mut s = vec![Choice::Drop; n];
                s[i] = Choice::Apply;
                sets.push(s.clone());
                if !tears[i].is_empty() {
                    s[i] = Choice::Torn(pick(&tears[i], &mut rng));
                    sets.push(s);
                }
            }
        }
        for _ in 0..random {
            let s = tears
                .iter()
                .map(|t| match rng.below(4) {
                    0 => Choice::Drop,
                    1 => Choice::Apply,
                    _ if t.is_empty() => Choice::Apply,
                    2 => Choice::Torn(pick(t, &mut rng)),
                    _ => Choice::Sectors(rng.next_u64()),
                })
                .collect();
            sets.push(s);
        }
        let mut seen = std::collections::HashSet::new();
        sets.retain(|s| seen.insert(s.clone()));
        sets
    }

    /// Counts a mutation; records and applies it unless power is (or is now) lost.
    fn mutate(&self, kind: OpKind, op: PendingOp) -> io::Result<()> {
        let mut c = self.control();
        let index = c.counts.mutations();
        c.counts.bump(kind);
        if c.crashed {
            return Err(crashed());
        }
        let mut s = self.lock();
        if c.crash_at == Some(CrashPoint::Write(index)) {
            c.crashed = true;
            s.pending.push(op);
            return Err(crashed());
        }
        apply(&mut s.live, &op);
        s.pending.push(op);
        Ok(())
    }
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let s = self.lock();
        let len = s.live.len() as u64;
        buf.fill(0);
        if offset < len {
            let start = offset as usize;
            let n = (s.live.len() - start).min(buf.len());
            buf[..n].copy_from_slice(&s.live[start..start + n]);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        usize::try_from(offset.saturating_add(buf.len() as u64))
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        self.mutate(
            OpKind::Write,
            PendingOp::Write {
                offset,
                data: buf.to_vec(),
            },
        )
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().live.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
        self.mutate(OpKind::SetLen, PendingOp::SetLen(len))
    }

    fn flush(&self) -> io::Result<()> {
        let mut c = self.control();
        let index = c.counts.bump(OpKind::Flush);
        if c.crashed {
            return Err(crashed());
        }
        if c.crash_at == Some(CrashPoint::Flush(index)) {
            c.crashed = true;
            return Err(crashed());
        }
        let mut s = self.lock();
        let pending = std::mem::take(&mut s.pending);
        for op in &pending {
            apply(&mut s.durable, op);
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.mutate(OpKind::PunchHole, PendingOp::PunchHole { offset, len })
    }

    fn data_run(&self, offset: u64) -> io::Result<Option<(bool, u64)>> {
        let len = self.lock().live.len() as u64;
        Ok(Some(if offset >= len {
            (false, u64::MAX)
        } else {
            (true, len)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushed_state_survives_and_unflushed_is_chosen() {
        let s = CrashStorage::new(vec![0; 1024], Some(CrashPoint::Flush(1)));
        s.write_at(&[1; 512], 0).unwrap();
        s.flush().unwrap();
        s.write_at(&[2; 1024], 0).unwrap();
        s.set_len(2048).unwrap();
        assert!(s.flush().is_err());
        assert!(s.is_crashed());
        assert!(s.write_at(&[3], 0).is_err());
        let mut b = [0u8; 1];
        s.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [2]);
        let none = s.crash_image(&[]);
        assert_eq!(&none[..512], &[1; 512][..]);
        assert_eq!(none.len(), 1024);
        let torn = s.crash_image(&[Choice::Torn(512), Choice::Apply]);
        assert_eq!(&torn[..512], &[2; 512][..]);
        assert_eq!(&torn[512..1024], &[0; 512][..]);
        assert_eq!(torn.len(), 2048);
        let sets = s.choice_sets(7, 4);
        assert!(sets.contains(&vec![Choice::Drop, Choice::Drop]));
        assert!(sets.contains(&vec![Choice::Apply, Choice::Apply]));
        assert!(sets.contains(&vec![Choice::Drop, Choice::Apply]));
        assert_eq!(sets, s.choice_sets(7, 4), "deterministic");
    }

    #[test]
    fn the_write_in_flight_is_pending() {
        let s = CrashStorage::new(Vec::new(), Some(CrashPoint::Write(1)));
        s.write_at(&[1; 100], 0).unwrap();
        assert!(s.write_at(&[2; 1000], 100).is_err());
        assert_eq!(s.pending().len(), 2);
        assert_eq!(s.pending()[1].tear_points(), vec![412, 924]);
        assert_eq!(s.live().len(), 100);
        let img = s.crash_image(&[Choice::Apply, Choice::Torn(412)]);
        assert_eq!(img.len(), 512);
        assert_eq!(s.counts().writes, 2);
    }

    #[test]
    fn a_write_can_persist_any_subset_of_its_sectors() {
        let s = CrashStorage::new(vec![0; 2048], None);
        // Four pieces: 412 bytes up to the first boundary, two whole sectors, 100 bytes.
        s.write_at(&[7; 1536], 100).unwrap();
        let op = &s.pending()[0];
        assert_eq!(op.pieces(), vec![0..412, 412..924, 924..1436, 1436..1536]);
        // A seed that keeps a subset no prefix tear can: the second and fourth pieces only.
        let seed = (0..)
            .find(|&seed| op.kept_pieces(Choice::Sectors(seed)) == [false, true, false, true])
            .unwrap();
        let img = s.crash_image(&[Choice::Sectors(seed)]);
        let mut want = vec![0u8; 2048];
        want[512..1024].fill(7);
        want[1536..1636].fill(7);
        assert_eq!(img, want);
        assert_eq!(
            op.kept_pieces(Choice::Torn(924)),
            [true, true, false, false]
        );
        // Pieces past the 64th draw further bits of the same seed.
        let long = PendingOp::PunchHole {
            offset: 0,
            len: 100 * SECTOR,
        };
        let kept = long.kept_pieces(Choice::Sectors(seed));
        assert_eq!(kept.len(), 100);
        assert_eq!(kept, long.kept_pieces(Choice::Sectors(seed)));
        // Random choice sets scatter some operations over their sectors, deterministically.
        s.write_at(&[8; 1024], 0).unwrap();
        let sets = s.choice_sets(3, 16);
        assert!(sets
            .iter()
            .any(|c| c.iter().any(|c| matches!(c, Choice::Sectors(_)))));
        assert_eq!(sets, s.choice_sets(3, 16));
    }

    #[test]
    fn writes_into_one_sector_reach_the_medium_in_order() {
        let s = CrashStorage::new(vec![0; 1024], None);
        s.write_at(&[1; 8], 0).unwrap();
        s.write_at(&[2; 8], 8).unwrap();
        s.write_at(&[3; 512], 512).unwrap();
        s.write_at(&[4; 512], 512).unwrap();
        // The second partial write cannot reach the medium without the first.
        let img = s.crash_image(&[Choice::Drop, Choice::Apply]);
        assert_eq!(&img[..16], &[[1; 8], [2; 8]].concat()[..]);
        let img = s.crash_image(&[Choice::Apply, Choice::Drop]);
        assert_eq!(&img[..16], &[[1; 8], [0; 8]].concat()[..]);
        // A later whole-sector write covers an earlier one: that sector is unchanged by the rule.
        let img = s.crash_image(&[Choice::Drop, Choice::Drop, Choice::Drop, Choice::Apply]);
        assert_eq!(&img[..16], &[0; 16][..]);
        assert_eq!(&img[512..], &[4; 512][..]);
    }

    #[test]
    fn siblings_share_the_power_supply_but_not_their_flushes() {
        // Crash at the third write-type operation over both: the data file's second write.
        let image = CrashStorage::new(vec![0; 512], Some(CrashPoint::Write(2)));
        let data = image.sibling(vec![0; 512]);
        data.write_at(&[1; 512], 0).unwrap();
        image.write_at(&[2; 512], 0).unwrap();
        // A flush of the image leaves the data file's write unflushed.
        image.flush().unwrap();
        assert_eq!(image.pending().len(), 0);
        assert_eq!(data.pending().len(), 1);
        assert!(data.write_at(&[3; 512], 0).is_err());
        assert!(image.is_crashed() && data.is_crashed());
        assert!(image.write_at(&[4; 512], 0).is_err());
        assert!(image.flush().is_err());
        let c = image.counts();
        assert_eq!((c.writes, c.flushes), (4, 2));
        assert_eq!(data.counts(), c);
        assert_eq!(image.crash_image(&[]), vec![2; 512]);
        assert_eq!(data.crash_image(&[]), vec![0; 512]);
        assert_eq!(
            data.crash_image(&[Choice::Apply, Choice::Apply]),
            vec![3; 512]
        );
        // Flush indices are global too.
        let a = CrashStorage::new(Vec::new(), Some(CrashPoint::Flush(1)));
        let b = a.sibling(Vec::new());
        a.flush().unwrap();
        assert!(b.flush().is_err());
        assert!(a.is_crashed());
    }
}
