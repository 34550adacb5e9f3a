//! Helpers shared by the fault-injection suites (`tests/crash_points.rs`,
//! `tests/crash_repair.rs`): the crash and failure points of a run, the tally of what passed,
//! and check-report summaries.

#![allow(dead_code)]

use qcow2kit::io::testing::{CrashPoint, Fault, FaultError, OpCounts, OpKind};
use qcow2kit::ops::check::CheckReport;

/// Every crash point of a run that made `counts` operations: each write-type operation, then
/// each flush.
pub(crate) fn crash_points(counts: &OpCounts) -> Vec<CrashPoint> {
    (0..counts.mutations())
        .map(CrashPoint::Write)
        .chain((0..counts.flushes).map(CrashPoint::Flush))
        .collect()
}

/// Every failure point of a run that made `counts` operations: each index of every kind of
/// mutating operation, with a one-shot `EIO` and with a sticky `ENOSPC`.
pub(crate) fn failure_points(counts: &OpCounts) -> Vec<Fault> {
    OpKind::ALL
        .iter()
        .flat_map(|&kind| (0..counts.get(kind)).map(move |i| (kind, i)))
        .flat_map(|(kind, index)| {
            [(FaultError::Eio, false), (FaultError::Enospc, true)].map(|(error, sticky)| Fault {
                kind,
                index,
                error,
                sticky,
            })
        })
        .collect()
}

/// A deterministic seed per crash point, for [`CrashStorage::choice_sets`].
///
/// [`CrashStorage::choice_sets`]: qcow2kit::io::testing::CrashStorage::choice_sets
pub(crate) fn crash_seed(point: CrashPoint) -> u64 {
    match point {
        CrashPoint::Write(i) => i,
        CrashPoint::Flush(i) => i | 1 << 32,
    }
}

/// What a suite tried and what passed.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) crash_points: usize,
    pub(crate) crash_images: usize,
    pub(crate) crash_passed: usize,
    pub(crate) failure_points: usize,
    pub(crate) failure_passed: usize,
    pub(crate) qemu_checks: usize,
    pub(crate) failures: Vec<String>,
}

impl Tally {
    /// Records the outcome of one judged point (a panic counts as a failure); returns whether
    /// it passed. The first eight failures are kept, named by `what`.
    pub(crate) fn record(
        &mut self,
        what: String,
        r: std::thread::Result<Result<(), String>>,
    ) -> bool {
        let msg = match r {
            Ok(Ok(())) => return true,
            Ok(Err(m)) => m,
            Err(p) => p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()),
        };
        if self.failures.len() < 8 {
            self.failures.push(format!("{what}: {msg}"));
        }
        false
    }

    /// Panics, listing the first failures, unless every point passed.
    pub(crate) fn assert_passed(&self, name: &str) {
        assert!(
            self.failures.is_empty(),
            "{name}: {} of {} crash points and {} of {} failure points failed; first failures:\n{}",
            self.crash_points - self.crash_passed,
            self.crash_points,
            self.failure_points - self.failure_passed,
            self.failure_points,
            self.failures.join("\n")
        );
    }
}

/// A check report without the leaks (which are allowed and can be many).
pub(crate) fn summary(r: &CheckReport) -> String {
    let serious: Vec<String> = r
        .findings
        .iter()
        .map(|f| format!("{f:?}"))
        .filter(|f| !f.starts_with("Leaked"))
        .take(6)
        .collect();
    format!(
        "{} corruptions, {} check errors, {} leaks, failure {:?}, dirty {}, marked corrupt {}: \
         {serious:?}",
        r.corruptions, r.check_errors, r.leaks, r.failure, r.dirty, r.marked_corrupt
    )
}

/// No corruption, check error, failure or corrupt bit (leaks allowed).
pub(crate) fn no_corruption(r: &CheckReport) -> bool {
    r.corruptions == 0 && r.check_errors == 0 && r.failure.is_none() && !r.marked_corrupt
}
