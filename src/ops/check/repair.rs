//! Repair: what `qemu-img check -r leaks|all` does, in QEMU's order (`qcow2_co_check_locked`,
//! `qcow2_check_refcounts`, qemu 10.0), so that what it prints and fixes is qemu-img's.
//!
//! One pass walks the metadata exactly as the read-only check does ([`Walk`]), which yields the
//! reference count every cluster should have, then:
//!
//! 0. with [`RepairMode::All`], reading the snapshot table drops what QEMU cannot keep
//!    (snapshots past the 65 536th or past 64 MiB of table: the header's count is lowered at
//!    once and their clusters become leaks; extra data past 1 KiB is cut in memory);
//! 1. compares the stored refcounts with it (read-only first, reporting as the check does);
//! 2. if the refcount structure itself is broken — a refcount table entry with reserved bits,
//!    unaligned, or naming a block that is also something else, or a referenced cluster whose
//!    refcount is 0 (no block, or a lost count) — only a rebuild can repair it: with
//!    [`RepairMode::All`] a new refcount table and blocks are written from the computed counts
//!    into clusters nothing references, flushed, and the header switched; the metadata is then
//!    walked again and the old structure, now leaked, freed. [`RepairMode::Leaks`] stops there
//!    ("need to rebuild", the check fails);
//! 3. otherwise compares again, now lowering refcounts above the references (leaks) and, with
//!    [`RepairMode::All`], raising those below them, and writes the changed blocks back;
//! 4. checks the COPIED flags of the active L1 and L2 tables against the (repaired) refcounts
//!    and corrects them — with [`RepairMode::Leaks`] only if the refcounts are now consistent,
//!    as QEMU does;
//! 5. with [`RepairMode::All`], writes the snapshot table anew if entries were cut or lack the
//!    16 bytes of extra data v3 requires (new clusters counted and flushed, table flushed,
//!    header switched and flushed, old table freed);
//! 6. with nothing left wrong, clears the dirty and corrupt bits.
//!
//! Before all that, unknown autoclear bits are cleared (QEMU does so when it opens the image
//! writable), even when nothing needs repairing.
//!
//! With [`RepairMode::All`], the walk also turns a misaligned preallocated zero cluster into a
//! plain zero cluster, and grows the file to hold a refcount block that lies past its end.
//!
//! Guest-visible content never changes: data clusters are never written or moved, refcounts
//! only change towards the computed reference counts, and flag repairs keep every mapping.
//! Write ordering: refcount increases reach the disk (flushed) before any COPIED flag that
//! relies on them; decreases only touch clusters nothing references; a rebuilt structure is
//! written and flushed before the header is switched (docs/design.md §3).

use super::report::{CheckFailure, CheckReport, Finding};
use super::walk::{Expected, Fix, Snapshots, Step, Stop, Walk};
use super::{Checker, MAX_REPORTED_FINDINGS};
use crate::engine::rebuild::{write_refcount_structure, RefcountArray};
use crate::engine::snapshot_table::write_snapshot_table;
use crate::error::{strerror, Error, Result};
use crate::format::features::{AutoclearFeatures, IncompatibleFeatures};
use crate::format::header::Header;
use crate::io::Storage;

/// What `qemu-img check -r` repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RepairMode {
    /// `-r leaks`: free leaked clusters (refcounts above the references). COPIED flags are
    /// corrected too when the refcounts are consistent afterwards.
    Leaks,
    /// `-r all`: also raise refcounts below the references, correct COPIED flags, and rebuild
    /// a broken refcount structure.
    All,
}

impl RepairMode {
    /// qemu-img's name of the mode (`leaks` / `all`).
    pub fn name(self) -> &'static str {
        match self {
            RepairMode::Leaks => "leaks",
            RepairMode::All => "all",
        }
    }

    fn fix(self) -> Fix {
        Fix {
            leaks: true,
            errors: self == RepairMode::All,
        }
    }
}

/// The outcome of a repair.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// The repair pass's report in qemu-img's terms: what it found and could not fix
    /// (`corruptions`, `leaks`, `check_errors`, `failure`) and what it fixed
    /// (`corruptions_fixed`, `leaks_fixed`). qemu-img prints it as is when nothing was fixed;
    /// otherwise it checks the image again and prints that check's report with these two
    /// counts.
    pub report: CheckReport,
    /// The refcount table and blocks were rebuilt.
    pub rebuilt: bool,
    /// The dirty and/or corrupt bits were cleared.
    pub marked_clean: bool,
}

impl RepairReport {
    /// Whether anything was fixed (qemu-img then prints "The following inconsistencies were
    /// found and repaired" and checks again).
    pub fn fixed_anything(&self) -> bool {
        self.report.corruptions_fixed > 0 || self.report.leaks_fixed > 0
    }
}

/// Repairs the qcow2 image on `storage` (which must be writable), keeping the first
/// [`MAX_REPORTED_FINDINGS`] findings in the report. Fails only when the header cannot be
/// opened or on I/O errors; a repair that cannot be done is in the report's `failure`.
pub fn repair(storage: &dyn Storage, mode: RepairMode) -> Result<RepairReport> {
    let mut kept = Vec::new();
    let mut omitted = 0u64;
    let mut out = Checker::new(storage)?.repair(mode, &mut |f: &Finding| {
        if kept.len() < MAX_REPORTED_FINDINGS {
            kept.push(f.clone());
        } else {
            omitted += 1;
        }
    })?;
    out.report.findings = kept;
    out.report.findings_omitted = omitted;
    Ok(out)
}

impl Checker<'_> {
    /// Repairs the image (see [`repair`]), passing each finding — those of the
    /// check and the "Repairing …" lines — to `sink`. The storage must be writable. Errors are
    /// I/O errors (a failed write leaves an image that a later repair can finish: every
    /// step is ordered so).
    pub fn repair(self, mode: RepairMode, sink: &mut dyn FnMut(&Finding)) -> Result<RepairReport> {
        clear_unknown_autoclear(&self)?;
        let h = &self.header;
        let mut out = RepairReport {
            report: CheckReport {
                dirty: h.incompatible.contains(IncompatibleFeatures::DIRTY),
                marked_corrupt: h.incompatible.contains(IncompatibleFeatures::CORRUPT),
                ..CheckReport::default()
            },
            ..RepairReport::default()
        };
        match repair_pass(&self, mode, &mut out.report, sink) {
            Ok(rebuilt) => out.rebuilt = rebuilt,
            Err(Stop::Failed(f)) => {
                out.report.failure = Some(f);
                return Ok(out);
            }
            Err(Stop::Io(e)) => return Err(e),
        }
        let r = &out.report;
        if r.check_errors == 0 && r.corruptions == 0 {
            out.marked_clean = mark_clean(&self)?;
        }
        Ok(out)
    }
}

/// The counts of a report that the steps of a pass save and restore (QEMU copies its
/// `BdrvCheckResult` around the same way).
fn counts(r: &CheckReport) -> CheckReport {
    CheckReport {
        findings: Vec::new(),
        ..r.clone()
    }
}

/// One repair pass; returns whether the refcount structure was rebuilt.
fn repair_pass(
    c: &Checker<'_>,
    mode: RepairMode,
    report: &mut CheckReport,
    sink: &mut dyn FnMut(&Finding),
) -> Step<bool> {
    let fix = mode.fix();
    let mut w = Walk::new(c, report, sink, fix);
    w.writable = true;
    let snapshots = w.start(c)?;
    // The snapshot table's findings are kept apart from the refcount check's, as in QEMU,
    // and added back at the end.
    let snapshot_corruptions = std::mem::take(&mut w.report.corruptions);
    let mut reader = w.calculate(c, &snapshots)?;
    let pre_compare = counts(w.report);
    w.fix = Fix::NONE;
    let mut compared = w.compare(&mut reader)?;
    w.fix = fix;

    if w.rebuild && fix.errors {
        w.emit(&Finding::RebuildingRefcounts, 1);
        let before = counts(w.report);
        let mut nb_clusters = w.nb_clusters;
        let storage = w.storage;
        let (cb, order) = (w.cb, w.order);
        write_refcount_structure(storage, cb, order, &mut w.expected, &mut nb_clusters).map_err(
            |e| {
                w.report.check_errors += 1;
                Stop::Io(e)
            },
        )?;
        drop(w);

        // The new structure replaces the old one: count everything again, against it.
        let c2 = Checker::new(storage).map_err(Stop::Io)?;
        let report = &mut *report;
        report.corruptions = 0;
        report.leaks = 0;
        // So are the errors of comparing against the old structure (refcounts it could not
        // give, an unaligned block): they went with it. Kept, they would leave the corrupt
        // bit that the comparison set on an image the rebuild made sound.
        report.check_errors = pre_compare.check_errors;
        let mut w = Walk::new(&c2, report, sink, Fix::NONE);
        w.writable = true;
        w.prepare()?;
        let mut reader = w.calculate(&c2, &snapshots)?;
        // The old structure is leaked now: free it. What cannot be freed was leaked by the
        // rebuild itself.
        let saved = counts(w.report);
        *w.report = CheckReport::default();
        w.fix = Fix {
            leaks: true,
            errors: false,
        };
        compared = w.compare(&mut reader)?;
        if w.rebuild {
            w.emit(&Finding::RebuildStillBroken, 1);
        }
        let fresh_leaks = w.report.leaks;
        *w.report = saved;
        let r = &mut *w.report;
        r.corruptions_fixed += before.corruptions.saturating_sub(r.corruptions);
        r.leaks_fixed += before.leaks.saturating_sub(r.leaks);
        r.leaks += fresh_leaks;
        w.fix = fix;
        w.check_copied(&c2.header, &mut reader, &compared.is_one, true)?;
        w.report.image_end_offset = (compared.highest + 1) << w.cb;
        fix_snapshot_table(&mut w, &c2.header, &snapshots, snapshot_corruptions)?;
        return Ok(true);
    }
    if w.rebuild {
        w.emit(&Finding::NeedRebuild, 1);
        w.report.check_errors += 1;
        return Err(Stop::Failed(CheckFailure::RepairFailed(
            "the refcount structure needs a rebuild (-r all)".into(),
        )));
    }
    if w.report.leaks > 0 || w.report.corruptions > 0 {
        *w.report = pre_compare;
        compared = w.compare(&mut reader)?;
    }
    let r = &*w.report;
    // With -r leaks, flags are corrected only where the refcounts are now known right.
    let repair_copied = fix.errors || (r.check_errors == 0 && r.corruptions == 0 && r.leaks == 0);
    w.check_copied(&c.header, &mut reader, &compared.is_one, repair_copied)?;
    w.report.image_end_offset = (compared.highest + 1) << w.cb;
    fix_snapshot_table(&mut w, &c.header, &snapshots, snapshot_corruptions)?;
    Ok(false)
}

/// QEMU's `qcow2_check_fix_snapshot_table`: the snapshot table's remaining corruptions (entries
/// whose extra data was cut, v3 entries lacking theirs) are repaired with `-r all` by writing
/// the table anew, once the refcounts it allocates from are repaired; otherwise they count as
/// corruptions.
fn fix_snapshot_table(
    w: &mut Walk<'_, '_>,
    header: &Header,
    snapshots: &Snapshots,
    corruptions: u64,
) -> Step {
    if corruptions == 0 || !w.fix.errors {
        w.report.corruptions += corruptions;
        return Ok(());
    }
    // The old table's clusters are freed only if this walk counted them.
    let old = (header.snapshots_offset, snapshots.size);
    let old_counted = w.is_countable(old.0, old.1);
    match write_snapshot_table(
        w.storage,
        header,
        &snapshots.list,
        old_counted.then_some(old),
        w.uncounted,
    ) {
        Ok(_) => {
            w.report.corruptions_fixed += corruptions;
            Ok(())
        }
        Err(e) => {
            w.report.corruptions += corruptions;
            w.report.check_errors += 1;
            let reason = match &e {
                Error::Io { source, .. } => strerror(source),
                other => other.to_string(),
            };
            w.emit(&Finding::SnapshotTableUpdateFailed { reason }, 1);
            Err(Stop::Io(e))
        }
    }
}

/// Clears the autoclear bits this writer does not know, as QEMU's writable open does before
/// the repair starts (whether or not anything needs repairing): they name structures that
/// whoever set them can no longer trust once another writer has touched the image.
fn clear_unknown_autoclear(c: &Checker<'_>) -> Result<()> {
    let known = AutoclearFeatures::all().bits();
    let bits = c.header.autoclear.bits();
    if c.header.version < 3 || bits & !known == 0 {
        return Ok(());
    }
    c.storage
        .write_at(&(bits & known).to_be_bytes(), 88)
        .and_then(|()| c.storage.flush())
        .map_err(|e| Error::io("clearing unknown autoclear bits", e))
}

/// Clears the dirty and corrupt bits of a repaired version 3 image (QEMU's
/// `qcow2_mark_clean` and `qcow2_mark_consistent`); returns whether it changed the header.
fn mark_clean(c: &Checker<'_>) -> Result<bool> {
    if c.header.version < 3 {
        return Ok(false);
    }
    // The repair itself may have marked the image corrupt: read the bits as they are now.
    let mut raw = [0u8; 8];
    c.storage
        .read_at(&mut raw, 72)
        .map_err(|e| Error::io("reading the incompatible feature bits", e))?;
    let now = IncompatibleFeatures::from_bits_retain(u64::from_be_bytes(raw));
    let stale = IncompatibleFeatures::DIRTY | IncompatibleFeatures::CORRUPT;
    if !now.intersects(stale) {
        return Ok(false);
    }
    // Everything the repair wrote is flushed already; the bits go last.
    let bits = now.difference(stale).bits();
    c.storage
        .write_at(&bits.to_be_bytes(), 72)
        .and_then(|()| c.storage.flush())
        .map_err(|e| Error::io("clearing the dirty and corrupt bits", e))?;
    Ok(true)
}

impl RefcountArray for Expected {
    fn get(&self, cluster: u64) -> u64 {
        Expected::get(self, cluster)
    }

    fn set(&mut self, cluster: u64, value: u64) {
        Expected::set(self, cluster, value);
    }
}
