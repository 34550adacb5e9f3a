//! glibc `getopt` as qemu-io's commands use it.

/// One result of [`getopt`].
pub(super) enum Opt {
    /// A valid option with its argument.
    Flag(char, Option<String>),
    /// What glibc's getopt prints for a bad option.
    Bad(String),
}

/// glibc `getopt` with argument permutation: options (in order, stopping after the first bad
/// one) and operands. `spec` is getopt's option string.
pub(super) fn getopt(cmd: &str, args: &[&str], spec: &str) -> (Vec<Opt>, Vec<String>) {
    let mut opts = Vec::new();
    let mut operands = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = args[i];
        i += 1;
        if a == "--" {
            operands.extend(args[i..].iter().map(|s| s.to_string()));
            break;
        }
        if a.len() < 2 || !a.starts_with('-') {
            operands.push(a.to_string());
            continue;
        }
        let chars: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < chars.len() {
            let c = chars[j];
            j += 1;
            let pos = spec.find(c).filter(|_| c != ':');
            let Some(pos) = pos else {
                opts.push(Opt::Bad(format!("{cmd}: invalid option -- '{c}'")));
                return (opts, operands);
            };
            if spec[pos + 1..].starts_with(':') {
                let rest: String = chars[j..].iter().collect();
                let v = if !rest.is_empty() {
                    rest
                } else if let Some(v) = args.get(i) {
                    i += 1;
                    v.to_string()
                } else {
                    opts.push(Opt::Bad(format!(
                        "{cmd}: option requires an argument -- '{c}'"
                    )));
                    return (opts, operands);
                };
                opts.push(Opt::Flag(c, Some(v)));
                break;
            }
            opts.push(Opt::Flag(c, None));
        }
    }
    (opts, operands)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getopt_permutes() {
        let (o, ops) = getopt("read", &["0", "-P", "5", "4k", "-v"], "P:v");
        assert_eq!(ops, vec!["0".to_string(), "4k".to_string()]);
        assert_eq!(o.len(), 2);
        let (o, _) = getopt("read", &["-x"], "P:v");
        assert!(matches!(&o[0], Opt::Bad(m) if m == "read: invalid option -- 'x'"));
    }
}
