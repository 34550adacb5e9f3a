//! Local time for snapshot dates, as the C library computes it: `TZ` (a zoneinfo name, a path,
//! or a POSIX rule string) or `/etc/localtime`, in TZif format with its POSIX footer for times
//! after the last transition.

use std::path::Path;

/// A POSIX TZ rule: standard offset and optional daylight-saving rule.
#[derive(Debug, Clone)]
struct Rule {
    /// Seconds east of UTC in standard time.
    std_off: i64,
    /// Seconds east of UTC in daylight time, with the start and end (date, seconds after
    /// local midnight) when daylight time applies.
    dst: Option<(i64, Date, i64, Date, i64)>,
}

#[derive(Debug, Clone, Copy)]
enum Date {
    /// `Jn`: day 1..=365, February 29 never counted.
    Julian1(i64),
    /// `n`: day 0..=365, counting February 29.
    Julian0(i64),
    /// `Mm.w.d`: day `d` (0 = Sunday) of week `w` (5 = last) of month `m`.
    Month(i64, i64, i64),
}

/// A time zone.
#[derive(Debug, Clone, Default)]
pub(super) struct Zone {
    transitions: Vec<(i64, usize)>,
    types: Vec<i64>,
    footer: Option<Rule>,
}

impl Zone {
    /// The zone the C library would use.
    pub(super) fn load() -> Zone {
        match std::env::var("TZ") {
            Err(_) => from_file(Path::new("/etc/localtime")).unwrap_or_default(),
            Ok(tz) => {
                let name = tz.strip_prefix(':').unwrap_or(&tz);
                if name.is_empty() {
                    return Zone::default();
                }
                let file = if name.starts_with('/') {
                    from_file(Path::new(name))
                } else if name.contains("..") {
                    None
                } else {
                    let dir = std::env::var("TZDIR")
                        .unwrap_or_else(|_| "/usr/share/zoneinfo".to_string());
                    from_file(&Path::new(&dir).join(name))
                };
                file.or_else(|| {
                    parse_rule(name).map(|r| Zone {
                        footer: Some(r),
                        ..Zone::default()
                    })
                })
                .unwrap_or_default()
            }
        }
    }

    /// Seconds east of UTC at UTC time `t`.
    fn offset(&self, t: i64) -> i64 {
        let after = self.transitions.partition_point(|&(at, _)| at <= t);
        if after == self.transitions.len() {
            if let Some(r) = &self.footer {
                return r.offset(t);
            }
        }
        let idx = match after {
            0 => 0,
            n => self.transitions[n - 1].1,
        };
        self.types.get(idx).copied().unwrap_or(0)
    }

    /// `%Y-%m-%d %H:%M:%S` of UTC time `t` in this zone.
    pub(super) fn format(&self, t: i64) -> String {
        let local = t + self.offset(t);
        let (y, m, d) = civil_from_days(local.div_euclid(86400));
        let s = local.rem_euclid(86400);
        format!(
            "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
            s / 3600,
            s / 60 % 60,
            s % 60
        )
    }
}

fn be32(b: &[u8], at: usize) -> Option<i64> {
    let x = b.get(at..at + 4)?;
    Some(i64::from(i32::from_be_bytes([x[0], x[1], x[2], x[3]])))
}

fn be64(b: &[u8], at: usize) -> Option<i64> {
    let x = b.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(x);
    Some(i64::from_be_bytes(a))
}

/// Parses a TZif file (RFC 8536), preferring the 64-bit data of version 2 and later.
fn from_file(path: &Path) -> Option<Zone> {
    let b = std::fs::read(path).ok()?;
    if b.len() > 1 << 20 || b.get(0..4)? != b"TZif" {
        return None;
    }
    let counts = |at: usize| -> Option<[usize; 6]> {
        let mut c = [0usize; 6];
        for (i, v) in c.iter_mut().enumerate() {
            *v = usize::try_from(be32(&b, at + 20 + 4 * i)?).ok()?;
        }
        Some(c)
    };
    let c1 = counts(0)?;
    let v1_len = c1[3] * 5 + c1[4] * 6 + c1[5] + c1[2] * 8 + c1[1] + c1[0];
    let (base, c, tsize) = if b[4] >= b'2' {
        let at = 44 + v1_len;
        if b.get(at..at + 4)? != b"TZif" {
            return None;
        }
        (at + 44, counts(at)?, 8)
    } else {
        (44, c1, 4)
    };
    let [isut, isstd, leap, timecnt, typecnt, charcnt] = c;
    let idx_at = base + timecnt * tsize;
    let types_at = idx_at + timecnt;
    let mut transitions = Vec::with_capacity(timecnt);
    for i in 0..timecnt {
        let at = if tsize == 8 {
            be64(&b, base + 8 * i)?
        } else {
            be32(&b, base + 4 * i)?
        };
        transitions.push((at, usize::from(*b.get(idx_at + i)?)));
    }
    let mut types = Vec::with_capacity(typecnt);
    for i in 0..typecnt {
        types.push(be32(&b, types_at + 6 * i)?);
    }
    let end = types_at + typecnt * 6 + charcnt + leap * (tsize + 4) + isstd + isut;
    let footer = if tsize == 8 {
        b.get(end..).and_then(|f| {
            let f = std::str::from_utf8(f).ok()?;
            let line = f.strip_prefix('\n')?.split('\n').next()?;
            parse_rule(line)
        })
    } else {
        None
    };
    Some(Zone {
        transitions,
        types,
        footer,
    })
}

/// Parses a POSIX TZ string such as `CET-1CEST,M3.5.0,M10.5.0/3` or `<+03>-3`.
fn parse_rule(s: &str) -> Option<Rule> {
    let mut p = s.as_bytes();
    skip_name(&mut p)?;
    let std_off = -parse_offset(&mut p)?;
    if p.is_empty() {
        return Some(Rule { std_off, dst: None });
    }
    skip_name(&mut p)?;
    let dst_off = if !p.is_empty() && p[0] != b',' {
        -parse_offset(&mut p)?
    } else {
        std_off + 3600
    };
    let (start, start_t, end, end_t) = if p.is_empty() {
        (Date::Month(3, 2, 0), 7200, Date::Month(11, 1, 0), 7200)
    } else {
        p = p.strip_prefix(b",")?;
        let (a, at) = parse_date(&mut p)?;
        p = p.strip_prefix(b",")?;
        let (e, et) = parse_date(&mut p)?;
        (a, at, e, et)
    };
    if !p.is_empty() {
        return None;
    }
    Some(Rule {
        std_off,
        dst: Some((dst_off, start, start_t, end, end_t)),
    })
}

fn skip_name(p: &mut &[u8]) -> Option<()> {
    if p.first() == Some(&b'<') {
        let close = p.iter().position(|&c| c == b'>')?;
        *p = &p[close + 1..];
    } else {
        let n = p.iter().take_while(|c| c.is_ascii_alphabetic()).count();
        if n < 3 {
            return None;
        }
        *p = &p[n..];
    }
    Some(())
}

fn parse_num(p: &mut &[u8]) -> Option<i64> {
    let n = p.iter().take_while(|c| c.is_ascii_digit()).count();
    if n == 0 {
        return None;
    }
    let v = std::str::from_utf8(&p[..n]).ok()?.parse().ok()?;
    *p = &p[n..];
    Some(v)
}

/// `[+-]hh[:mm[:ss]]` in seconds.
fn parse_offset(p: &mut &[u8]) -> Option<i64> {
    let sign = match p.first() {
        Some(b'-') => {
            *p = &p[1..];
            -1
        }
        Some(b'+') => {
            *p = &p[1..];
            1
        }
        _ => 1,
    };
    let mut v = parse_num(p)? * 3600;
    for mult in [60, 1] {
        if p.first() == Some(&b':') {
            *p = &p[1..];
            v += parse_num(p)? * mult;
        } else {
            break;
        }
    }
    Some(sign * v)
}

fn parse_date(p: &mut &[u8]) -> Option<(Date, i64)> {
    let d = match p.first()? {
        b'J' => {
            *p = &p[1..];
            Date::Julian1(parse_num(p)?)
        }
        b'M' => {
            *p = &p[1..];
            let m = parse_num(p)?;
            *p = p.strip_prefix(b".")?;
            let w = parse_num(p)?;
            *p = p.strip_prefix(b".")?;
            Date::Month(m, w, parse_num(p)?)
        }
        _ => Date::Julian0(parse_num(p)?),
    };
    let t = if p.first() == Some(&b'/') {
        *p = &p[1..];
        parse_offset(p)?
    } else {
        7200
    };
    Some((d, t))
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl Date {
    /// Days since the epoch of this rule date in year `y`.
    fn day(self, y: i64) -> i64 {
        let jan1 = days_from_civil(y, 1, 1);
        match self {
            Date::Julian1(n) => {
                let n = n.clamp(1, 365);
                jan1 + n - 1 + i64::from(is_leap(y) && n >= 60)
            }
            Date::Julian0(n) => jan1 + n.clamp(0, 365),
            Date::Month(m, w, d) => {
                let m = m.clamp(1, 12);
                let first = days_from_civil(y, m, 1);
                // 1970-01-01 was a Thursday (4).
                let wday = (first + 4).rem_euclid(7);
                let mut day = first + (d - wday).rem_euclid(7) + 7 * (w.clamp(1, 5) - 1);
                let next = if m == 12 {
                    days_from_civil(y + 1, 1, 1)
                } else {
                    days_from_civil(y, m + 1, 1)
                };
                while day >= next {
                    day -= 7;
                }
                day
            }
        }
    }
}

impl Rule {
    fn offset(&self, t: i64) -> i64 {
        let Some((dst_off, start, start_t, end, end_t)) = self.dst else {
            return self.std_off;
        };
        let (y, _, _) = civil_from_days((t + self.std_off).div_euclid(86400));
        let begin = start.day(y) * 86400 + start_t - self.std_off;
        let finish = end.day(y) * 86400 + end_t - dst_off;
        let in_dst = if begin < finish {
            begin <= t && t < finish
        } else {
            !(finish <= t && t < begin)
        };
        if in_dst {
            dst_off
        } else {
            self.std_off
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        let z = Zone {
            footer: parse_rule("CET-1CEST,M3.5.0,M10.5.0/3"),
            ..Zone::default()
        };
        assert_eq!(z.format(1_700_000_000), "2023-11-14 23:13:20");
        assert_eq!(z.format(1_690_000_000), "2023-07-22 06:26:40");
        let z = Zone {
            footer: parse_rule("<+0530>-5:30"),
            ..Zone::default()
        };
        assert_eq!(z.format(0), "1970-01-01 05:30:00");
        let z = Zone {
            footer: parse_rule("EST5EDT"),
            ..Zone::default()
        };
        assert_eq!(z.format(1_690_000_000), "2023-07-22 00:26:40");
        assert_eq!(Zone::default().format(1_795_407_984), "2026-11-23 04:26:24");
    }
}
