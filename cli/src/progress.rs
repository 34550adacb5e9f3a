//! qemu-img's progress meter (`-p`): percentages accumulated in `f32`, printed as
//! `    (NN.NN/100%)\r` when they move by more than 2 points, and at 0 and 100.

/// A progress meter; prints nothing unless enabled.
pub struct Meter {
    enabled: bool,
    current: f32,
    last_print: f32,
    /// Bytes reported so far through [`Meter::bytes`].
    done: u64,
}

impl Meter {
    /// A meter at 0 that prints when `enabled`.
    pub fn new(enabled: bool) -> Self {
        Meter {
            enabled,
            current: 0.0,
            last_print: 0.0,
            done: 0,
        }
    }

    /// Adds `delta` percentage points.
    pub fn advance(&mut self, delta: f32) {
        self.set(self.current + delta / 100.0 * 100.0);
    }

    /// Moves the meter to `percent` (qemu-img's `qemu_progress_print(percent, 0)`).
    pub fn set(&mut self, percent: f32) {
        let mut current = percent;
        if current > 100.0 {
            current = 100.0;
        }
        self.current = current;
        if current > self.last_print + 2.0
            || current < self.last_print - 2.0
            || current == 100.0
            || current == 0.0
        {
            self.last_print = current;
            if self.enabled {
                out!("    ({:.2}/100%)\r", f64::from(current));
            }
        }
    }

    /// Reports that `done` of `total` bytes are processed (`done` only grows).
    pub fn bytes(&mut self, done: u64, total: u64) {
        let delta = done.saturating_sub(self.done);
        self.done = self.done.max(done);
        if total > 0 && delta > 0 {
            self.advance(delta as f32 / total as f32 * 100.0);
        }
    }

    /// Ends the meter's line.
    pub fn end(&self) {
        if self.enabled {
            outln!();
        }
    }
}
