//! `qcow2kit rebase` and `qcow2kit commit` judged by qemu-img 10.x, differentially: each case
//! builds a chain with qemu-img / qemu-io (depths 1–4; qcow2 v2 and v3 and raw layers; cluster
//! sizes from 512 bytes to 2 MiB; extended L2; zero-flagged, discarded and compressed ranges;
//! internal snapshots; layers of different virtual sizes), records the content before, copies
//! the whole set into `q/` and `k/`, runs the same command line with qemu-img in `q/` and with
//! qcow2kit in `k/`, and requires:
//! - the same exit status, standard output (progress records aside, which vary from run to run
//!   in qemu-img itself) and standard error (program name aside);
//! - the results reading the same on both sides (`qemu-img compare`) and as the content before
//!   where the operation keeps it;
//! - every qcow2 image of both sets checking clean (`qemu-img check`, status 0);
//! - the same backing fields, virtual size and snapshots in `qemu-img info`.
//!
//! Where qcow2kit may do better than qemu-img (fewer bytes written, a refusal before copying),
//! the files are not compared byte for byte; the case says so.
//!
//! A missing or failing qemu-img / qemu-io fails the tests; it never skips them.

#[path = "chain/commit.rs"]
mod commit;
#[path = "chain/harness.rs"]
mod harness;
#[path = "chain/rebase.rs"]
mod rebase;
