//! Helpers shared by qcow2kit's integration tests (`tests/`, `cli/tests/`) and benches: running
//! qemu-img, qemu-io and qcow2kit the same way everywhere, with one panic message when a tool
//! is missing.
//!
//! Every helper panics with the command that failed: a missing or failing qemu tool is a test
//! failure, never a silent skip.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// qemu-img, found in `PATH`.
pub const QEMU_IMG: &str = "qemu-img";
/// qemu-io, found in `PATH`.
pub const QEMU_IO: &str = "qemu-io";

/// Runs `prog args…` in `dir` with argv[0] `name` and standard input closed (so that a tool
/// waiting for input ends at once); panics if it cannot be started.
pub fn exec_as(prog: impl AsRef<OsStr>, name: &str, args: &[&str], dir: &Path) -> Output {
    let prog = prog.as_ref();
    Command::new(prog)
        .arg0(name)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{}` ({e}); these tests need qemu-img and qemu-io (Debian package \
                 qemu-utils, 10.x) in PATH",
                prog.to_string_lossy()
            )
        })
}

/// [`exec_as`] with argv[0] `prog`.
pub fn exec(prog: &str, args: &[&str], dir: &Path) -> Output {
    exec_as(prog, prog, args, dir)
}

/// Runs a tool that must succeed (building and judging images) and returns its standard
/// output. Besides a failing exit status, a qemu-io request that failed counts as a failure
/// (qemu-io reports `… failed` on stdout, or its name on stderr, and may still exit 0).
pub fn tool(prog: &str, args: &[&str], dir: &Path) -> String {
    String::from_utf8_lossy(&tool_output(prog, args, dir).stdout).into_owned()
}

/// [`tool`], returning the whole output.
pub fn tool_output(prog: &str, args: &[&str], dir: &Path) -> Output {
    let out = exec(prog, args, dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stdout.contains(" failed") || stderr.contains("qemu-io:") {
        panic!(
            "`{prog} {}` failed with {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            args.join(" "),
            out.status
        );
    }
    out
}
