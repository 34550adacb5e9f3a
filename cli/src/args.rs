//! A small getopt_long-style parser: options may come before or after operands (as with GNU
//! getopt, which qemu-img uses), `--` ends options, `--name=value` and `--name value` both work,
//! short options may be bundled (`-pU`) and take their argument attached or separate (`-Oraw`,
//! `-O raw`).
//!
//! Why it is written here rather than taken from a crate such as `clap`: a drop-in must accept
//! exactly what qemu-img's `getopt_long` calls accept and fail as they fail. That means GNU
//! permutation (operands and options in any order), unambiguous prefixes of long options
//! (`--out` for `--output`), options repeated with the last one winning (and some, like `-o`,
//! accumulating), `-` as an operand, qemu-img's own messages for an unknown or argument-less
//! option ("invalid option -- 'x'", "option requires an argument -- 'O'") printed before its
//! usage hint, and per-command option tables that differ from command to command. Argument
//! parsers that impose their own conventions (help generation, error wording, `--` handling,
//! subcommand syntax) would change exit statuses and messages that scripts and qemu-iotests
//! check.

use std::collections::HashMap;

/// One option a command accepts.
#[derive(Clone, Copy)]
pub struct Spec {
    /// Short letter, if any.
    pub short: Option<char>,
    /// Long name, if any.
    pub long: Option<&'static str>,
    /// Whether it takes an argument.
    pub takes_arg: bool,
    /// Key under which values are stored (the long name or the letter).
    pub key: &'static str,
}

/// The spec of long option `--name`: an exact match, else the one option `name` is a prefix
/// of (GNU getopt_long accepts unambiguous abbreviations), in getopt's words when there is none
/// or several.
fn long_option<'a>(specs: &'a [Spec], name: &str) -> Result<&'a Spec, String> {
    if let Some(s) = specs.iter().find(|s| s.long == Some(name)) {
        return Ok(s);
    }
    let matches: Vec<&Spec> = specs
        .iter()
        .filter(|s| s.long.is_some_and(|l| l.starts_with(name)))
        .collect();
    match matches.as_slice() {
        [] => Err(format!("unrecognized option '--{name}'")),
        [one] => Ok(one),
        // Several long names for one option (aliases) are not ambiguous.
        [first, rest @ ..] if rest.iter().all(|s| s.key == first.key) => Ok(first),
        several => Err(format!(
            "option '--{name}' is ambiguous; possibilities:{}",
            several
                .iter()
                .filter_map(|s| s.long)
                .map(|l| format!(" '--{l}'"))
                .collect::<String>()
        )),
    }
}

/// Shorthand for a spec.
pub const fn opt(
    short: Option<char>,
    long: Option<&'static str>,
    takes_arg: bool,
    key: &'static str,
) -> Spec {
    Spec {
        short,
        long,
        takes_arg,
        key,
    }
}

/// Parsed command line.
#[derive(Default, Debug)]
pub struct Parsed {
    values: HashMap<&'static str, Vec<String>>,
    /// Operands, in order.
    pub operands: Vec<String>,
}

impl Parsed {
    /// Whether the option was given.
    pub fn has(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// The last value of an option.
    pub fn last(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    /// All values of an option, in order.
    pub fn all(&self, key: &str) -> &[String] {
        self.values.get(key).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// Parses `args` (without the program and subcommand names) against `specs`.
pub fn parse(args: &[String], specs: &[Spec]) -> Result<Parsed, String> {
    let mut p = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            p.operands.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let spec = long_option(specs, name)?;
            let value = if spec.takes_arg {
                match inline {
                    Some(v) => v,
                    None => {
                        let v = args
                            .get(i)
                            .ok_or_else(|| format!("option '--{name}' requires an argument"))?;
                        i += 1;
                        v.clone()
                    }
                }
            } else {
                if inline.is_some() {
                    return Err(format!("option '--{name}' doesn't allow an argument"));
                }
                String::new()
            };
            p.values.entry(spec.key).or_default().push(value);
        } else if a.len() > 1 && a.starts_with('-') {
            let chars: Vec<char> = a[1..].chars().collect();
            let mut j = 0;
            while j < chars.len() {
                let c = chars[j];
                j += 1;
                let spec = specs
                    .iter()
                    .find(|s| s.short == Some(c))
                    .ok_or_else(|| format!("invalid option -- '{c}'"))?;
                if spec.takes_arg {
                    let rest: String = chars[j..].iter().collect();
                    let v = if !rest.is_empty() {
                        rest
                    } else {
                        let v = args
                            .get(i)
                            .ok_or_else(|| format!("option requires an argument -- '{c}'"))?;
                        i += 1;
                        v.clone()
                    };
                    p.values.entry(spec.key).or_default().push(v);
                    break;
                }
                p.values.entry(spec.key).or_default().push(String::new());
            }
        } else {
            p.operands.push(a.clone());
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    const SPECS: &[Spec] = &[
        opt(Some('f'), None, true, "f"),
        opt(Some('O'), None, true, "O"),
        opt(Some('p'), None, false, "p"),
        opt(Some('U'), Some("force-share"), false, "U"),
        opt(None, Some("output"), true, "output"),
    ];

    #[test]
    fn permutes_and_bundles() {
        let p = parse(
            &s(&["a", "-pU", "-Oraw", "--output=json", "b", "-f", "qcow2"]),
            SPECS,
        )
        .unwrap();
        assert_eq!(p.operands, s(&["a", "b"]));
        assert!(p.has("p") && p.has("U"));
        assert_eq!(p.last("O"), Some("raw"));
        assert_eq!(p.last("output"), Some("json"));
        assert_eq!(p.last("f"), Some("qcow2"));
    }

    #[test]
    fn errors() {
        assert!(parse(&s(&["-x"]), SPECS).is_err());
        assert!(parse(&s(&["-f"]), SPECS).is_err());
        assert!(parse(&s(&["--output"]), SPECS).is_err());
        assert!(parse(&s(&["--force-share=1"]), SPECS).is_err());
        let p = parse(&s(&["--", "-f"]), SPECS).unwrap();
        assert_eq!(p.operands, s(&["-f"]));
    }
}
