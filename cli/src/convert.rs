//! `qcow2kit convert` (to be written).

/// Runs the subcommand; returns the exit code.
pub fn run(_args: &[String]) -> u8 {
    crate::common::fail("convert: not implemented yet")
}
