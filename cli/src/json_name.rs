//! `json:{…}` image names as QEMU reads them: the text after `json:` parsed as QEMU's JSON
//! parser parses it (single-quoted strings too, nested objects and arrays, numbers, booleans,
//! `null`; the same messages for bad JSON), then flattened into the dotted option keys that
//! `--image-opts` takes (`{"file": {"filename": "a"}}` → `file.filename=a`, arrays as
//! `key.0.sub`), so that a `json:` name is handled by the option code and nothing else.
//!
//! Values become option text as QEMU's option parser sees them: strings as they are, integers
//! in decimal, other numbers as C's `%.17g`, booleans `on`/`off`. A `null`, an empty object
//! and an empty array have no text form: they are kept as [`NULL`], [`EMPTY_OBJECT`] and
//! [`EMPTY_ARRAY`], which start with a NUL character that no option text can hold.
//!
//! Bounds: the input is at most one command-line argument; objects and arrays nest at most
//! [`MAX_NESTING`] deep (QEMU's limit and message), so parsing recurses a bounded depth.

/// The prefix that makes a file name a JSON description of the image.
pub const PREFIX: &str = "json:";

/// A `null` value (for `backing`: no backing file).
pub const NULL: &str = "\0null";
/// An empty object (`{}`) as a value.
pub const EMPTY_OBJECT: &str = "\0{}";
/// An empty array (`[]`) as a value.
pub const EMPTY_ARRAY: &str = "\0[]";

/// QEMU's bound on the objects and arrays open at once.
pub const MAX_NESTING: usize = 1024;

/// Whether `value` is one of the values with no text form ([`NULL`], [`EMPTY_OBJECT`],
/// [`EMPTY_ARRAY`]).
pub fn is_structural(value: &str) -> bool {
    value.starts_with('\0')
}

/// The options of the image name `name` when it is a `json:` name (`None` otherwise), or
/// QEMU's reason for refusing it (`Could not parse the JSON options: …`, `Invalid JSON object
/// given`).
pub fn options_of(name: &str) -> Option<Result<Vec<(String, String)>, String>> {
    name.strip_prefix(PREFIX).map(parse_options)
}

/// The flattened options of the JSON text `text` (the part after `json:`).
pub fn parse_options(text: &str) -> Result<Vec<(String, String)>, String> {
    let value =
        parse_document(text).map_err(|e| format!("Could not parse the JSON options: {e}"))?;
    let Json::Object(members) = value else {
        return Err("Invalid JSON object given".into());
    };
    let mut out = Flat::default();
    flatten_object(&members, "", 0, &mut out);
    Ok(out.items.into_iter().map(|(k, v, _)| (k, v)).collect())
}

/// A JSON value as QEMU's parser builds it; numbers are kept as their option text.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Number(String),
    Str(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

// ---------------------------------------------------------------------------------------------
// Flattening (QEMU's `qdict_flatten`)

/// Flattened options in order of first appearance, each with the depth it came from.
#[derive(Default)]
struct Flat {
    items: Vec<(String, String, usize)>,
}

impl Flat {
    /// Adds `key`; a value that came from deeper nesting replaces one given as a dotted key
    /// (`{"file": {"filename": "a"}, "file.filename": "b"}` names `a`, as in QEMU).
    fn put(&mut self, key: String, value: String, depth: usize) {
        match self.items.iter_mut().find(|(k, _, _)| *k == key) {
            Some(item) if depth >= item.2 => {
                item.1 = value;
                item.2 = depth;
            }
            Some(_) => {}
            None => self.items.push((key, value, depth)),
        }
    }
}

fn joined(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

fn flatten_object(members: &[(String, Json)], prefix: &str, depth: usize, out: &mut Flat) {
    for (key, value) in members {
        flatten_value(value, joined(prefix, key), depth, out);
    }
}

fn flatten_value(value: &Json, key: String, depth: usize, out: &mut Flat) {
    match value {
        Json::Object(m) if !m.is_empty() => flatten_object(m, &key, depth + 1, out),
        Json::Array(a) if !a.is_empty() => {
            for (i, item) in a.iter().enumerate() {
                flatten_value(item, joined(&key, &i.to_string()), depth + 1, out);
            }
        }
        Json::Object(_) => out.put(key, EMPTY_OBJECT.into(), depth),
        Json::Array(_) => out.put(key, EMPTY_ARRAY.into(), depth),
        Json::Null => out.put(key, NULL.into(), depth),
        Json::Bool(b) => out.put(key, if *b { "on" } else { "off" }.into(), depth),
        Json::Number(n) => out.put(key, n.clone(), depth),
        Json::Str(s) => out.put(key, s.clone(), depth),
    }
}

// ---------------------------------------------------------------------------------------------
// The lexer (QEMU's `json-lexer.c` as a hand-written scanner)

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    /// A string token, its quotes included (escapes are decoded by the parser).
    Str(String),
    Int(String),
    Float(String),
    Keyword(String),
    /// Text the lexer cannot take (`stray '…'`).
    Error(String),
}

/// The tokens of `text`, in order; a malformed token becomes [`Tok::Error`] and lexing goes
/// on after it.
fn lex(text: &str) -> Vec<Tok> {
    let chars: Vec<char> = text.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let single = match c {
            '{' => Some(Tok::LCurly),
            '}' => Some(Tok::RCurly),
            '[' => Some(Tok::LSquare),
            ']' => Some(Tok::RSquare),
            ':' => Some(Tok::Colon),
            ',' => Some(Tok::Comma),
            _ => None,
        };
        if let Some(t) = single {
            toks.push(t);
            i += 1;
            continue;
        }
        let (tok, next) = match c {
            ' ' | '\t' | '\r' | '\n' => {
                i += 1;
                continue;
            }
            '"' | '\'' => lex_string(&chars, i),
            '-' | '0'..='9' => lex_number(&chars, i),
            'a'..='z' => {
                let end = (i..chars.len())
                    .find(|&j| !chars[j].is_ascii_lowercase())
                    .unwrap_or(chars.len());
                (Tok::Keyword(chars[i..end].iter().collect()), end)
            }
            other => (Tok::Error(other.to_string()), i + 1),
        };
        toks.push(tok);
        i = next;
    }
    toks
}

/// A string from the quote at `start`: the token and where the next one starts. Characters
/// below a space end it as an error (QEMU's lexer takes 0x20 and up in strings).
fn lex_string(chars: &[char], start: usize) -> (Tok, usize) {
    let quote = chars[start];
    let mut i = start + 1;
    let mut escaped = false;
    while i < chars.len() {
        let c = chars[i];
        if (c as u32) < 0x20 {
            return (Tok::Error(chars[start..=i].iter().collect()), i + 1);
        }
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == quote {
            return (Tok::Str(chars[start..=i].iter().collect()), i + 1);
        }
        i += 1;
    }
    (Tok::Error(chars[start..].iter().collect()), chars.len())
}

/// A number from `start`: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`. A character that
/// cannot continue a number where one is needed makes the text so far, with it, an error.
fn lex_number(chars: &[char], start: usize) -> (Tok, usize) {
    let digit = |j: usize| chars.get(j).is_some_and(|c| c.is_ascii_digit());
    let error = |end: usize| {
        let end = end.min(chars.len());
        let stop = if end < chars.len() { end + 1 } else { end };
        (Tok::Error(chars[start..stop].iter().collect()), stop)
    };
    let mut i = start;
    if chars[i] == '-' {
        i += 1;
    }
    match chars.get(i) {
        Some('0') => {
            i += 1;
            if digit(i) {
                return error(i);
            }
        }
        Some(c) if c.is_ascii_digit() => {
            while digit(i) {
                i += 1;
            }
        }
        _ => return error(i),
    }
    let mut float = false;
    if chars.get(i) == Some(&'.') {
        float = true;
        i += 1;
        if !digit(i) {
            return error(i);
        }
        while digit(i) {
            i += 1;
        }
    }
    if matches!(chars.get(i), Some('e' | 'E')) {
        float = true;
        i += 1;
        if matches!(chars.get(i), Some('+' | '-')) {
            i += 1;
        }
        if !digit(i) {
            return error(i);
        }
        while digit(i) {
            i += 1;
        }
    }
    let text: String = chars[start..i].iter().collect();
    (
        if float {
            Tok::Float(text)
        } else {
            Tok::Int(text)
        },
        i,
    )
}

// ---------------------------------------------------------------------------------------------
// The streamer (QEMU's `json-streamer.c`) and the document rule of `qobject_from_json`

/// The one JSON value of `text`, or QEMU's message (without the prefix the caller adds).
fn parse_document(text: &str) -> Result<Json, String> {
    let mut result: Option<Json> = None;
    let mut error: Option<String> = None;
    let mut consume = |r: Result<Json, String>| {
        if result.is_some() {
            result = None;
            error = Some("Expecting at most one JSON value".into());
        } else if error.is_none() {
            match r {
                Ok(v) => result = Some(v),
                Err(e) => error = Some(e),
            }
        }
    };
    let mut group: Vec<Tok> = Vec::new();
    let (mut braces, mut brackets) = (0i64, 0i64);
    for tok in lex(text) {
        if let Tok::Error(t) = tok {
            consume(Err(format!("JSON parse error, stray '{t}'")));
            group.clear();
            (braces, brackets) = (0, 0);
            continue;
        }
        match tok {
            Tok::LCurly => braces += 1,
            Tok::RCurly => braces -= 1,
            Tok::LSquare => brackets += 1,
            Tok::RSquare => brackets -= 1,
            _ => {}
        }
        group.push(tok);
        if braces + brackets > MAX_NESTING as i64 {
            consume(Err("JSON nesting depth limit exceeded".into()));
            group.clear();
            (braces, brackets) = (0, 0);
            continue;
        }
        if braces < 0 || brackets < 0 || (braces == 0 && brackets == 0) {
            consume(parse_group(&group));
            group.clear();
            (braces, brackets) = (0, 0);
        }
    }
    if !group.is_empty() {
        consume(parse_group(&group));
    }
    match (result, error) {
        (_, Some(e)) => Err(e),
        (Some(v), None) => Ok(v),
        (None, None) => Err("Expecting a JSON value".into()),
    }
}

/// Parses one streamer group: QEMU's message, `JSON parse error, …`, on failure.
fn parse_group(tokens: &[Tok]) -> Result<Json, String> {
    let mut p = Parser {
        tokens,
        at: 0,
        error: None,
    };
    match p.value() {
        Some(v) => Ok(v),
        None => Err(format!(
            "JSON parse error, {}",
            p.error.unwrap_or_else(|| "expecting value".into())
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// The parser (QEMU's `json-parser.c`: its grammar and its first error)

struct Parser<'a> {
    tokens: &'a [Tok],
    at: usize,
    error: Option<String>,
}

impl Parser<'_> {
    /// Records `msg` unless an error is already recorded (the first one is reported).
    fn fail(&mut self, msg: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(msg.into());
        }
    }

    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.at)
    }

    fn pop(&mut self) -> Option<Tok> {
        let t = self.tokens.get(self.at).cloned();
        if t.is_some() {
            self.at += 1;
        }
        t
    }

    fn value(&mut self) -> Option<Json> {
        let Some(tok) = self.peek().cloned() else {
            self.fail("premature EOI");
            return None;
        };
        match tok {
            Tok::LCurly => self.object(),
            Tok::LSquare => self.array(),
            Tok::Int(n) => {
                self.at += 1;
                Some(Json::Number(integer_text(&n)))
            }
            Tok::Float(n) => {
                self.at += 1;
                let f: f64 = n.parse().unwrap_or(f64::NAN);
                Some(Json::Number(format_g17(f)))
            }
            Tok::Str(s) => {
                self.at += 1;
                match decode_string(&s) {
                    Ok(s) => Some(Json::Str(s)),
                    Err(e) => {
                        self.fail(e);
                        None
                    }
                }
            }
            Tok::Keyword(k) => {
                self.at += 1;
                match k.as_str() {
                    "true" => Some(Json::Bool(true)),
                    "false" => Some(Json::Bool(false)),
                    "null" => Some(Json::Null),
                    _ => {
                        self.fail(format!("invalid keyword '{k}'"));
                        None
                    }
                }
            }
            _ => {
                self.fail("expecting value");
                None
            }
        }
    }

    /// The next token, or `None` after recording `premature EOI`.
    fn next_or_eoi(&mut self) -> Option<Tok> {
        let t = self.pop();
        if t.is_none() {
            self.fail("premature EOI");
        }
        t
    }

    fn object(&mut self) -> Option<Json> {
        self.pop();
        let mut members = Vec::new();
        let Some(peek) = self.peek() else {
            self.fail("premature EOI");
            return None;
        };
        if *peek == Tok::RCurly {
            self.pop();
            return Some(Json::Object(members));
        }
        self.pair(&mut members)?;
        let mut tok = self.next_or_eoi()?;
        while tok != Tok::RCurly {
            if tok != Tok::Comma {
                self.fail("expected separator in dict");
                return None;
            }
            self.pair(&mut members)?;
            tok = self.next_or_eoi()?;
        }
        Some(Json::Object(members))
    }

    fn pair(&mut self, members: &mut Vec<(String, Json)>) -> Option<()> {
        if self.peek().is_none() {
            self.fail("premature EOI");
            return None;
        }
        let key = match self.value() {
            Some(Json::Str(k)) => k,
            _ => {
                self.fail("key is not a string in object");
                return None;
            }
        };
        if self.next_or_eoi()? != Tok::Colon {
            self.fail("missing : in object pair");
            return None;
        }
        let Some(value) = self.value() else {
            self.fail("Missing value in dict");
            return None;
        };
        if members.iter().any(|(k, _)| *k == key) {
            self.fail("duplicate key");
            return None;
        }
        members.push((key, value));
        Some(())
    }

    fn array(&mut self) -> Option<Json> {
        self.pop();
        let mut items = Vec::new();
        let Some(peek) = self.peek() else {
            self.fail("premature EOI");
            return None;
        };
        if *peek == Tok::RSquare {
            self.pop();
            return Some(Json::Array(items));
        }
        let Some(first) = self.value() else {
            self.fail("expecting value");
            return None;
        };
        items.push(first);
        let mut tok = self.next_or_eoi()?;
        while tok != Tok::RSquare {
            if tok != Tok::Comma {
                self.fail("expected separator in list");
                return None;
            }
            let Some(item) = self.value() else {
                self.fail("expecting value");
                return None;
            };
            items.push(item);
            tok = self.next_or_eoi()?;
        }
        Some(Json::Array(items))
    }
}

/// An integer token as QEMU keeps it: a signed 64-bit number when it fits, else an unsigned
/// one, else a double (printed as `%.17g`).
fn integer_text(n: &str) -> String {
    if let Ok(v) = n.parse::<i64>() {
        return v.to_string();
    }
    if let Ok(v) = n.parse::<u64>() {
        return v.to_string();
    }
    format_g17(n.parse::<f64>().unwrap_or(f64::NAN))
}

/// C's `printf("%.17g", x)`.
fn format_g17(x: f64) -> String {
    if x.is_nan() {
        return if x.is_sign_negative() { "-nan" } else { "nan" }.into();
    }
    if x.is_infinite() {
        return if x < 0.0 { "-inf" } else { "inf" }.into();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.into();
    }
    let sci = format!("{x:.16e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..17).contains(&exp) {
        let m = strip_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{m}e{sign}{:02}", exp.abs());
    }
    let decimals = usize::try_from(16 - exp).unwrap_or(0);
    strip_zeros(&format!("{x:.decimals$}")).to_string()
}

/// A decimal fraction without its trailing zeros (and without a point left bare).
fn strip_zeros(s: &str) -> &str {
    if !s.contains('.') {
        return s;
    }
    s.trim_end_matches('0').trim_end_matches('.')
}

/// The value of a string token (its quotes included), with QEMU's messages for a bad escape.
fn decode_string(token: &str) -> Result<String, String> {
    let bytes = token.as_bytes();
    let body = &token[1..token.len() - 1];
    let mut out = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let Some((_, e)) = chars.next() else {
            return Err("invalid escape sequence in string".into());
        };
        match e {
            '"' | '\'' | '\\' | '/' => out.push(e),
            'b' => out.push('\u{8}'),
            'f' => out.push('\u{c}'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'u' => {
                // Offsets in `token`: the backslash is at 1 + i.
                let start = 1 + i;
                let hex4 = |at: usize| -> Option<u32> {
                    let h = bytes.get(at..at + 4)?;
                    let h = std::str::from_utf8(h).ok()?;
                    if !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return None;
                    }
                    u32::from_str_radix(h, 16).ok()
                };
                let mut consumed = 6;
                let mut cp = hex4(start + 2);
                if let Some(lead @ 0xD800..=0xDBFF) = cp {
                    if bytes.get(start + 6..start + 8) == Some(b"\\u") {
                        cp = match hex4(start + 8) {
                            Some(t @ 0xDC00..=0xDFFF) => {
                                consumed = 12;
                                Some(0x10000 + ((lead & 0x3FF) << 10) + (t & 0x3FF))
                            }
                            _ => None,
                        };
                    }
                }
                let shown = || {
                    let end = (start + 6).min(bytes.len());
                    String::from_utf8_lossy(&bytes[start..end]).into_owned()
                };
                match cp.and_then(char::from_u32) {
                    Some('\0') => {
                        return Err(format!(
                            "{} (the NUL character) is not supported by qcow2kit",
                            shown()
                        ))
                    }
                    Some(ch) => out.push(ch),
                    None => return Err(format!("{} is not a valid Unicode character", shown())),
                }
                // The hex digits (and a trailing surrogate) are ASCII: skip them.
                for _ in 0..consumed - 2 {
                    chars.next();
                }
            }
            _ => return Err("invalid escape sequence in string".into()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(text: &str) -> Vec<(String, String)> {
        parse_options(text).expect("valid JSON options")
    }

    fn err(text: &str) -> String {
        parse_options(text).expect_err("invalid JSON options")
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn flattening() {
        assert_eq!(
            opts(r#"{"driver":"qcow2","file":{"driver":"file","filename":"t.qcow2"}}"#),
            pairs(&[
                ("driver", "qcow2"),
                ("file.driver", "file"),
                ("file.filename", "t.qcow2")
            ])
        );
        assert_eq!(
            opts(r#"{'a':[{'b':1},true,null,{},[]],'c':-0.5,"d":1e3,'e':"x'y"}"#),
            pairs(&[
                ("a.0.b", "1"),
                ("a.1", "on"),
                ("a.2", NULL),
                ("a.3", EMPTY_OBJECT),
                ("a.4", EMPTY_ARRAY),
                ("c", "-0.5"),
                ("d", "1000"),
                ("e", "x'y"),
            ])
        );
        // A nested value wins over a dotted key, whichever comes first.
        for t in [
            r#"{"file":{"filename":"a"},"file.filename":"b"}"#,
            r#"{"file.filename":"b","file":{"filename":"a"}}"#,
        ] {
            assert_eq!(opts(t), pairs(&[("file.filename", "a")]));
        }
    }

    #[test]
    fn numbers_as_qemu_prints_them() {
        assert_eq!(format_g17(0.1), "0.10000000000000001");
        assert_eq!(format_g17(1.5), "1.5");
        assert_eq!(format_g17(1e300), "1.0000000000000001e+300");
        assert_eq!(format_g17(1e-7), "9.9999999999999995e-08");
        assert_eq!(format_g17(f64::INFINITY), "inf");
        assert_eq!(integer_text("18446744073709551615"), "18446744073709551615");
        assert_eq!(integer_text("-9223372036854775808"), "-9223372036854775808");
        assert_eq!(
            integer_text("18446744073709551616"),
            "1.8446744073709552e+19"
        );
    }

    #[test]
    fn strings() {
        assert_eq!(
            opts(r#"{"a":"\u0041\ud83d\ude00\/\"\n"}"#),
            pairs(&[("a", "A\u{1F600}/\"\n")])
        );
        assert_eq!(
            err(r#"{"a":"\u12"}"#),
            "Could not parse the JSON options: JSON parse error, \\u12\" is not a valid Unicode character"
        );
        assert!(err(r#"{"a":"\u0000"}"#).contains("not supported by qcow2kit"));
        assert!(
            err(r#"{"a":"\ud800\u0041"}"#).ends_with("\\ud800 is not a valid Unicode character")
        );
    }

    #[test]
    fn qemu_messages() {
        let parse = "Could not parse the JSON options: ";
        for (text, msg) in [
            (r#"{"driver":"qcow2","#, "JSON parse error, premature EOI"),
            ("", "Expecting a JSON value"),
            ("  ", "Expecting a JSON value"),
            (r#"{"a":1}x"#, "Expecting at most one JSON value"),
            (r#"{"a":1}}"#, "Expecting at most one JSON value"),
            (r#"{"a" 1}"#, "JSON parse error, missing : in object pair"),
            (r#"{"a":tru}"#, "JSON parse error, invalid keyword 'tru'"),
            (r#"{"a":1,}"#, "JSON parse error, expecting value"),
            (
                r#"{"a":"b\q"}"#,
                "JSON parse error, invalid escape sequence in string",
            ),
            (r#"{"a":@}"#, "JSON parse error, stray '@'"),
            (r#"{"a":01}"#, "JSON parse error, stray '01'"),
            (r#"{"a":-}"#, "JSON parse error, stray '-}'"),
            (r#"{"a":1.}"#, "JSON parse error, stray '1.}'"),
            (r#"{"a":1e}"#, "JSON parse error, stray '1e}'"),
            (r#"{"a":"x"#, "JSON parse error, stray '\"x'"),
            ("{\"a\":\"b\tc\"}", "JSON parse error, stray '\"b\t'"),
            ("}", "JSON parse error, expecting value"),
            (
                r#"{"a":[1,2}"#,
                "JSON parse error, expected separator in list",
            ),
            (
                r#"{1:2}"#,
                "JSON parse error, key is not a string in object",
            ),
            (
                r#"{"a":1 "b":2}"#,
                "JSON parse error, expected separator in dict",
            ),
            (r#"{"a":1,"a":2}"#, "JSON parse error, duplicate key"),
            (r#"{"a":True}"#, "JSON parse error, stray 'T'"),
            ("[", "JSON parse error, premature EOI"),
        ] {
            assert_eq!(err(text), format!("{parse}{msg}"), "for {text:?}");
        }
        for text in ["[1]", "1", "\"s\"", "null", "true"] {
            assert_eq!(err(text), "Invalid JSON object given");
        }
        assert!(options_of("t.qcow2").is_none());
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = |n: usize| format!("{{\"a\":{}{}}}", "[".repeat(n), "]".repeat(n));
        assert!(parse_options(&deep(MAX_NESTING - 1)).is_ok());
        assert_eq!(
            err(&deep(MAX_NESTING)),
            "Could not parse the JSON options: JSON nesting depth limit exceeded"
        );
        // Far deeper than the stack could take if it were followed: refused at once.
        assert!(err(&"[".repeat(100_000)).contains("nesting depth limit"));
    }
}
