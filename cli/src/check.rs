//! `qcow2kit check` (to be written).

/// Runs the subcommand; returns the exit code.
pub fn run(_args: &[String]) -> u8 {
    crate::common::fail("check: not implemented yet")
}
