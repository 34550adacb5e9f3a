//! Local time for snapshot dates, as the C library computes it (`localtime_r`): the zone `TZ`
//! names (a zoneinfo name, `:`-prefixed or not, a path to a TZif file, or a POSIX rule string),
//! or `/etc/localtime` when `TZ` is unset; UTC when neither gives a zone. `jiff` reads them the
//! way the C library does.

use jiff::tz::TimeZone;
use jiff::Timestamp;

/// A time zone.
#[derive(Debug, Clone)]
pub(super) struct Zone(TimeZone);

impl Zone {
    /// The zone the C library would use.
    pub(super) fn load() -> Zone {
        Zone(TimeZone::try_system().unwrap_or(TimeZone::UTC))
    }

    /// `%Y-%m-%d %H:%M:%S` of UTC time `t` (seconds since the epoch) in this zone, as qemu-img
    /// prints a snapshot's date.
    pub(super) fn format(&self, t: i64) -> String {
        match Timestamp::from_second(t) {
            Ok(ts) => ts
                .to_zoned_datetime(self.0.clone())
                .strftime("%Y-%m-%d %H:%M:%S")
                .to_string(),
            // Outside jiff's range (±9999 years): as UTC seconds, never a panic.
            Err(_) => t.to_string(),
        }
    }
}
