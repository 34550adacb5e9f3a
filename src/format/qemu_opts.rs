//! QEMU's option-list text (`key=value,key=value`, as in `-o`, `--object`, `--image-opts`).

/// Splits `s` at every single comma; `,,` stands for a comma inside a part. Every part is
/// returned, empty ones included (callers decide what an empty part or one without `=` means).
pub fn split_option_list(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

#[cfg(test)]
mod tests {
    use super::split_option_list;

    #[test]
    fn commas_escape_and_empty_parts_stay() {
        assert_eq!(split_option_list("a=x,,y,b"), ["a=x,y", "b"]);
        assert_eq!(split_option_list("a,,,b"), ["a,", "b"]);
        assert_eq!(split_option_list("a,,,,b"), ["a,,b"]);
        assert_eq!(split_option_list("a,,b"), ["a,b"]);
        assert_eq!(split_option_list(""), [""]);
        assert_eq!(split_option_list("k=v,"), ["k=v", ""]);
    }
}
