//! qemu's number syntax as qemu-io parses it: sizes and pattern bytes.

use super::output::{Out, EINVAL, ERANGE};

/// qemu's `qemu_strtosz` (as qemu-io's `cvtnum` uses it): decimal with an optional fraction
/// and a B/K/M/G/T/P/E suffix (binary units), or hexadecimal without either. Errors are errno
/// values (`EINVAL`, `ERANGE`).
pub(crate) fn strtosz(s: &str) -> Result<u64, i32> {
    // strtoull skips leading white space (a tab between operands reaches here as such).
    let s = s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    if let Some(rest) = s.strip_prefix('-') {
        // A negative number is out of range; a minus sign before anything else is not one.
        return match strtosz(rest) {
            Err(EINVAL) if !rest.starts_with(|c: char| c.is_ascii_digit()) => Err(EINVAL),
            _ => Err(ERANGE),
        };
    }
    let b = s.as_bytes();
    let mut i = 0;
    if b.first() == Some(&b'+') {
        i = 1;
    }
    let start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = &s[start..i];
    if int_digits == "0" && matches!(b.get(i), Some(b'x' | b'X')) {
        let h = &s[i + 1..];
        if h.is_empty() || !h.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(EINVAL);
        }
        return u64::from_str_radix(h, 16).map_err(|_| ERANGE);
    }
    let mut frac_digits = "";
    if b.get(i) == Some(&b'.') {
        let f0 = i + 1;
        i += 1;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = &s[f0..i];
    }
    if int_digits.is_empty() && frac_digits.is_empty() {
        return Err(EINVAL);
    }
    let val: u64 = if int_digits.is_empty() {
        0
    } else {
        int_digits.parse().map_err(|_| ERANGE)?
    };
    let mul: u64 = match b.get(i).map(|c| c.to_ascii_lowercase()) {
        None => 1,
        Some(c) => {
            let m = match c {
                b'b' => 1,
                b'k' => 1 << 10,
                b'm' => 1 << 20,
                b'g' => 1 << 30,
                b't' => 1 << 40,
                b'p' => 1 << 50,
                b'e' => 1 << 60,
                _ => return Err(EINVAL),
            };
            i += 1;
            m
        }
    };
    if i != b.len() {
        return Err(EINVAL);
    }
    // The fraction as 0.64 fixed point, from a double as QEMU computes it.
    let frac: f64 = if frac_digits.is_empty() {
        0.0
    } else {
        format!("0.{frac_digits}").parse().map_err(|_| EINVAL)?
    };
    let valf = (frac * 18446744073709551616.0) as u64;
    if mul == 1 {
        return if valf != 0 { Err(EINVAL) } else { Ok(val) };
    }
    let whole = val as u128 * mul as u128;
    let f = valf as u128 * mul as u128;
    let total = whole + (f >> 64) + ((f >> 63) & 1);
    u64::try_from(total).map_err(|_| ERANGE)
}

/// qemu-io's `cvtnum`: [`strtosz`] limited to `i64`.
pub(super) fn cvtnum(s: &str) -> Result<i64, i32> {
    let v = strtosz(s)?;
    i64::try_from(v).map_err(|_| ERANGE)
}

pub(super) fn print_cvtnum_err(o: &mut Out, errno: i32, arg: &str) {
    match errno {
        EINVAL => out!(
            o,
            "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}\n"
        ),
        ERANGE => out!(o, "Parsing error: argument too large -- {arg}\n"),
        _ => out!(o, "Parsing error: {arg}\n"),
    }
}

/// Why a number was refused: not a number (`EINVAL`), or out of range (`ERANGE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NumError {
    Invalid,
    Range,
}

/// C's `strtoll(arg, &end, 0)` over the whole of `arg` (leading white space, a sign, and a
/// `0x` or `0` prefix for hexadecimal or octal); anything left over is [`NumError::Invalid`].
pub(crate) fn strtoll0(arg: &str) -> Result<i64, NumError> {
    let s = arg.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (digits, radix) =
        if let Some(h) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
            (h, 16)
        } else if body.len() > 1 && body.starts_with('0') {
            (&body[1..], 8)
        } else {
            (body, 10)
        };
    if digits.is_empty() || !digits.bytes().all(|c| (c as char).is_digit(radix)) {
        return Err(NumError::Invalid);
    }
    let v = i64::from_str_radix(digits, radix).map_err(|_| NumError::Range)?;
    Ok(if neg { -v } else { v })
}

/// [`strtoll0`], any error as `None`.
pub(super) fn strtol0(arg: &str) -> Option<i64> {
    strtoll0(arg).ok()
}

/// qemu-io's `parse_pattern`: `strtol(arg, &end, 0)` in 0..=255.
pub(super) fn parse_pattern(o: &mut Out, arg: &str) -> Result<u8, i32> {
    match strtol0(arg).and_then(|v| u8::try_from(v).ok()) {
        Some(v) => Ok(v),
        None => {
            out!(o, "{arg} is not a valid pattern byte\n");
            Err(EINVAL)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::output::{EINVAL, ERANGE};

    #[test]
    fn sizes_like_qemu_strtosz() {
        assert_eq!(strtosz("4k"), Ok(4096));
        assert_eq!(strtosz("1M"), Ok(1 << 20));
        assert_eq!(strtosz("1.5k"), Ok(1536));
        assert_eq!(strtosz("0x1000"), Ok(4096));
        assert_eq!(strtosz("512b"), Ok(512));
        assert_eq!(strtosz("1.0"), Ok(1));
        assert_eq!(strtosz("1.5"), Err(EINVAL));
        assert_eq!(strtosz("0x1k"), Err(EINVAL));
        assert_eq!(strtosz("1x"), Err(EINVAL));
        assert_eq!(strtosz(""), Err(EINVAL));
        assert_eq!(strtosz("99999999999E"), Err(ERANGE));
        assert_eq!(cvtnum("8E"), Err(ERANGE));
        assert_eq!(strtosz("-1"), Err(ERANGE));
        assert_eq!(strtosz("-0"), Err(ERANGE));
        assert_eq!(strtosz("-x"), Err(EINVAL));
        assert_eq!(strtol0("0x10"), Some(16));
        assert_eq!(strtol0("010"), Some(8));
        assert_eq!(strtol0("-0"), Some(0));
        assert_eq!(strtol0("-1"), Some(-1));
        assert_eq!(strtol0("12m"), None);
        assert_eq!(strtol0("--1"), None);
        assert_eq!(strtoll0("99999999999999999999"), Err(NumError::Range));
        assert_eq!(strtoll0(""), Err(NumError::Invalid));
        assert_eq!(strtoll0(" +5"), Ok(5));
    }
}
