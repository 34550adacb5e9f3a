//! Raising a signal in this process, for qemu-io's `sigraise`.

use nix::sys::signal::{self, Signal};
use std::time::Duration;

/// Raises signal `sig` as C's `raise` does: its default action (ending or stopping the
/// process, or nothing) or its handler applies; numbers that are no signal do nothing.
pub(super) fn raise(sig: i32) {
    if sig <= 0 {
        return;
    }
    match Signal::try_from(sig) {
        Ok(s) => {
            let _ = signal::raise(s);
        }
        Err(_) if (SIGRTMIN..=SIGRTMAX).contains(&sig) => {
            // Real-time signals have no `Signal` value: kill(1) sends them, and they end the
            // process when delivered, which is waited for (boundedly).
            let sent = std::process::Command::new("kill")
                .args(["-s", &sig.to_string(), &std::process::id().to_string()])
                .status();
            if sent.is_ok_and(|s| s.success()) {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Err(_) => {}
    }
}

/// Linux's real-time signal range as glibc exposes it to programs.
const SIGRTMIN: i32 = 34;
const SIGRTMAX: i32 = 64;
