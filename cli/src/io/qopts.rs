//! Block options as qemu-io takes them (`open -o`, `reopen -o`, `--image-opts`): QEMU's
//! QemuOpts syntax `key=value,key=value`, with `,,` standing for a comma inside a value, and
//! a bare `key` (or `nokey`) meaning `key=on` (`key=off`) after a deprecation warning.

/// Options in the order their keys first appeared; a repeated key keeps its last value (QEMU
/// merges every `-o` of a command into one dictionary).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Opts {
    items: Vec<(String, String)>,
}

impl Opts {
    /// Adds the options of `text`, printing QEMU's warnings for short-form booleans. An `id`
    /// key is refused, as QemuOpts refuses it in these lists.
    pub(super) fn parse_into(&mut self, text: &str) -> Result<(), String> {
        let mut rest = text;
        while !rest.is_empty() {
            let name_len = rest.find(['=', ',']).unwrap_or(rest.len());
            let (key, value);
            if rest[name_len..].starts_with('=') {
                key = rest[..name_len].to_string();
                let (v, after) = value_until_comma(&rest[name_len + 1..]);
                value = v;
                rest = after;
            } else {
                let name = &rest[..name_len];
                (key, value) = match name.strip_prefix("no") {
                    Some(k) => (k.to_string(), "off".to_string()),
                    None => (name.to_string(), "on".to_string()),
                };
                errln!(
                    "{}: warning: short-form boolean option '{name}' deprecated\n\
                     Please use {key}={value} instead",
                    crate::common::prog()
                );
                rest = rest[name_len..].strip_prefix(',').unwrap_or("");
            }
            if key == "id" {
                return Err("Invalid parameter 'id'".into());
            }
            self.set(&key, value);
        }
        Ok(())
    }

    /// Sets `key` to `value`, keeping the key's place when it is already there.
    pub(super) fn set(&mut self, key: &str, value: String) {
        match self.items.iter_mut().find(|(k, _)| k == key) {
            Some(item) => item.1 = value,
            None => self.items.push((key.to_string(), value)),
        }
    }

    /// The value of `key`.
    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Removes `key` and returns its value.
    pub(super) fn take(&mut self, key: &str) -> Option<String> {
        let at = self.items.iter().position(|(k, _)| k == key)?;
        Some(self.items.remove(at).1)
    }

    /// The keys, in order.
    pub(super) fn keys(&self) -> impl Iterator<Item = &str> {
        self.items.iter().map(|(k, _)| k.as_str())
    }

    /// Every option, in order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.items.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// `self` with the options of `newer` laid over it.
    pub(super) fn overlaid(&self, newer: &Opts) -> Opts {
        let mut all = self.clone();
        for (k, v) in newer.iter() {
            all.set(k, v.to_string());
        }
        all
    }
}

/// A value up to the first lone comma (`,,` is a comma of the value) and what follows it.
fn value_until_comma(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == ',' {
            if chars.peek().is_some_and(|&(_, n)| n == ',') {
                chars.next();
                value.push(',');
                continue;
            }
            return (value, &s[i + 1..]);
        }
        value.push(c);
    }
    (value, "")
}

/// A boolean option's value, with QEMU's message for anything but `on`/`off`.
pub(crate) fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// A size option's value (`qemu_strtosz`: bytes, or a k/M/G/T/P/E suffix), with QEMU's
/// messages.
pub(super) fn parse_size(key: &str, value: &str) -> Result<u64, String> {
    let bad = || {
        format!(
            "Parameter '{key}' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
        )
    };
    let v = value.trim_start();
    if v.starts_with('-') {
        return Err(format!(
            "Value '{value}' is out of range for parameter '{key}'"
        ));
    }
    let split = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(bad()),
    };
    if num.is_empty() || num.starts_with('.') {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(1u64 << shift).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let bytes = f * (1u64 << shift) as f64;
    if shift == 0 || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// A number option's value (`qemu_strtou64`: a negative number wraps around, as in QEMU).
pub(crate) fn parse_number(key: &str, value: &str) -> Result<u64, String> {
    let bad = || format!("Parameter '{key}' expects a number");
    let v = value.trim_start();
    let (neg, digits) = match v.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, v.strip_prefix('+').unwrap_or(v)),
    };
    let n = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16).map_err(|_| bad())?
    } else if digits.len() > 1 && digits.starts_with('0') {
        u64::from_str_radix(&digits[1..], 8).map_err(|_| bad())?
    } else {
        digits.parse::<u64>().map_err(|_| bad())?
    };
    Ok(if neg { n.wrapping_neg() } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(s: &str) -> Vec<(String, String)> {
        let mut o = Opts::default();
        o.parse_into(s).expect("valid options");
        o.items
    }

    #[test]
    fn commas_and_repeats() {
        let p = parsed("a=1,b=x,,y,a=2,");
        assert_eq!(
            p,
            vec![("a".into(), "2".into()), ("b".into(), "x,y".into())]
        );
        assert_eq!(parsed("flag,nolazy"), {
            vec![("flag".into(), "on".into()), ("lazy".into(), "off".into())]
        });
        assert!(Opts::default().parse_into("id=x").is_err());
    }

    #[test]
    fn values() {
        assert_eq!(parse_size("s", "1M"), Ok(1 << 20));
        assert_eq!(parse_size("s", "1.5k"), Ok(1536));
        assert!(parse_size("s", "-1").unwrap_err().contains("out of range"));
        assert!(parse_size("s", "x").unwrap_err().contains("expects"));
        assert_eq!(parse_number("n", "-1"), Ok(u64::MAX));
        assert_eq!(parse_number("n", "0x10"), Ok(16));
        assert!(parse_number("n", "x").is_err());
        assert!(parse_bool("b", "42").is_err());
    }
}
