//! qemu-img's secrets: `--object secret,id=ID,data=…|file=…[,format=raw|base64][,keyid=…,iv=…]`,
//! parsed and loaded as QEMU's `crypto/secret.c` and `secret_common.c` do, with their messages.
//!
//! A secret is bytes; a passphrase is a secret that is valid UTF-8 without NUL bytes
//! ([`Secrets::passphrase`]). With `keyid`, the data is AES-256-CBC ciphertext under another
//! secret (32 bytes) with the given `iv` (16 bytes, base64), padded PKCS#7-style.

use super::cipher::{CipherAlg, CipherMode, CipherSpec, IvGenAlg, SectorCipher};
use super::CryptoError;
use std::collections::HashMap;
use std::path::PathBuf;

/// Where a secret's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `data=`: the bytes of the option value.
    Data(String),
    /// `file=`: the whole content of the file.
    File(PathBuf),
}

/// How a secret's bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecretFormat {
    /// As they are.
    #[default]
    Raw,
    /// Base64 (glib's lenient decoder: `\n` allowed, incomplete groups dropped).
    Base64,
}

/// One `--object secret,...` as given on a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretObject {
    /// The `id`.
    pub id: String,
    /// `data=` or `file=`.
    pub source: SecretSource,
    /// `format=`.
    pub format: SecretFormat,
    /// `keyid=`: the secret the data is encrypted with.
    pub keyid: Option<String>,
    /// `iv=`: base64 IV of the encrypted data.
    pub iv: Option<String>,
}

/// Splits a QEMU option string into `key=value` pairs, `,,` standing for a literal comma; the
/// first element may be a bare value (the implied key `qom-type`).
fn split_options(spec: &str) -> Vec<(Option<String>, String)> {
    crate::format::qemu_opts::split_option_list(spec)
        .into_iter()
        .map(|item| match item.split_once('=') {
            Some((k, v)) => (Some(k.to_string()), v.to_string()),
            None => (None, item),
        })
        .collect()
}

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

impl SecretObject {
    /// Parses the argument of `--object` for a secret (`secret,id=…` or `qom-type=secret,…`).
    /// A key given twice takes its last value, as in QEMU.
    pub fn parse(spec: &str) -> Result<SecretObject, CryptoError> {
        let err = |m: String| CryptoError::Secret(m);
        let mut qom_type = None;
        let (mut id, mut data, mut file, mut format, mut keyid, mut iv) =
            (None, None, None, SecretFormat::Raw, None, None);
        for (i, (key, value)) in split_options(spec).into_iter().enumerate() {
            let key = match key {
                Some(k) => k,
                None if i == 0 => "qom-type".to_string(),
                None => return Err(err(format!("Invalid parameter '{value}'"))),
            };
            match key.as_str() {
                "qom-type" => qom_type = Some(value),
                "id" => id = Some(value),
                "data" => data = Some(value),
                "file" => file = Some(PathBuf::from(value)),
                "keyid" => keyid = Some(value),
                "iv" => iv = Some(value),
                "format" => {
                    format = match value.as_str() {
                        "raw" => SecretFormat::Raw,
                        "base64" => SecretFormat::Base64,
                        _ => {
                            return Err(err(format!(
                                "Parameter 'format' does not accept value '{value}'"
                            )))
                        }
                    }
                }
                _ => return Err(err(format!("Parameter '{key}' is unexpected"))),
            }
        }
        match qom_type.as_deref() {
            Some("secret") => {}
            Some(t) => return Err(err(format!("invalid object type: {t}"))),
            None => return Err(err("Parameter 'qom-type' is missing".into())),
        }
        let id = id.ok_or_else(|| err("Parameter 'id' is missing".into()))?;
        if !is_identifier(&id) {
            return Err(err(
                "Parameter 'id' expects an identifier\nIdentifiers consist of \
                 letters, digits, '-', '.', '_', starting with a letter."
                    .into(),
            ));
        }
        let source = match (data, file) {
            (Some(_), Some(_)) => {
                return Err(err("'file' and 'data' are mutually exclusive".into()))
            }
            (Some(d), None) => SecretSource::Data(d),
            (None, Some(f)) => SecretSource::File(f),
            (None, None) => return Err(err("Either 'file' or 'data' must be provided".into())),
        };
        Ok(SecretObject {
            id,
            source,
            format,
            keyid,
            iv,
        })
    }
}

/// QEMU's `qbase64_decode`: only base64 characters, `=` and `\n` are accepted; decoding is
/// glib's (groups of four, an incomplete last group dropped, each of the last two characters
/// that is `=` dropping one output byte).
pub(crate) fn qemu_base64_decode(input: &[u8]) -> Result<Vec<u8>, CryptoError> {
    fn rank(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            b'=' => Some(0),
            _ => None,
        }
    }
    if input.contains(&0) {
        return Err(CryptoError::Secret(
            "Base64 data contains embedded NUL characters".into(),
        ));
    }
    if input.iter().any(|&c| c != b'\n' && rank(c).is_none()) {
        return Err(CryptoError::Secret(
            "Base64 data contains invalid characters".into(),
        ));
    }
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    let (mut acc, mut n) = (0u32, 0);
    for r in input.iter().filter_map(|&c| rank(c)) {
        acc = (acc << 6) | r;
        n += 1;
        if n == 4 {
            out.extend_from_slice(&acc.to_be_bytes()[1..]);
            acc = 0;
            n = 0;
        }
    }
    let tail = input.iter().rev().filter(|&&c| c != b'\n').take(2);
    for &c in tail {
        if c == b'=' {
            out.pop();
        }
    }
    Ok(out)
}

/// The secrets given on a command line, loaded, by id.
#[derive(Default)]
pub struct Secrets {
    loaded: HashMap<String, Vec<u8>>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.loaded.keys().collect();
        ids.sort();
        f.debug_struct("Secrets").field("ids", &ids).finish()
    }
}

impl Secrets {
    /// No secrets.
    pub fn new() -> Secrets {
        Secrets::default()
    }

    /// Loads `obj` (reading its file, decoding, decrypting with an earlier secret) and keeps it
    /// under its id, as QEMU does when it creates the object.
    pub fn add(&mut self, obj: &SecretObject) -> Result<(), CryptoError> {
        if self.loaded.contains_key(&obj.id) {
            return Err(CryptoError::Secret(format!(
                "attempt to add duplicate property '{}' to object (type 'container')",
                obj.id
            )));
        }
        let input = match &obj.source {
            SecretSource::Data(d) => d.as_bytes().to_vec(),
            SecretSource::File(p) => std::fs::read(p).map_err(|e| {
                let why = if e.kind() == std::io::ErrorKind::NotFound {
                    "No such file or directory".to_string()
                } else {
                    e.to_string()
                };
                CryptoError::Secret(format!(
                    "Unable to read {}: Failed to open file “{}”: {why}",
                    p.display(),
                    p.display()
                ))
            })?,
        };
        let bytes = match &obj.keyid {
            Some(keyid) => self.decrypt(obj, keyid, &input)?,
            None if obj.format == SecretFormat::Base64 => qemu_base64_decode(&input)?,
            None => input,
        };
        self.loaded.insert(obj.id.clone(), bytes);
        Ok(())
    }

    /// QEMU's `qcrypto_secret_decrypt`.
    fn decrypt(
        &self,
        obj: &SecretObject,
        keyid: &str,
        input: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        let key = self.get(keyid)?;
        if key.len() != 32 {
            return Err(CryptoError::Secret(
                "Key should be 32 bytes in length".into(),
            ));
        }
        let iv = obj
            .iv
            .as_ref()
            .ok_or_else(|| CryptoError::Secret("IV is required to decrypt secret".into()))?;
        let iv = qemu_base64_decode(iv.as_bytes())?;
        let iv: [u8; 16] = iv.as_slice().try_into().map_err(|_| {
            CryptoError::Secret(format!("IV should be 16 bytes in length not {}", iv.len()))
        })?;
        let mut data = match obj.format {
            SecretFormat::Base64 => qemu_base64_decode(input)?,
            SecretFormat::Raw => input.to_vec(),
        };
        if data.is_empty() || data.len() % 16 != 0 {
            return Err(CryptoError::Secret(format!(
                "Length {} must be a multiple of block size 16",
                data.len()
            )));
        }
        // CBC with one IV for the whole buffer: the buffer as one "sector" whose IV is `iv`
        // would need a 512-byte bound, so chain by hand over ECB.
        let ecb = CipherSpec {
            alg: CipherAlg::Aes256,
            mode: CipherMode::Ecb,
            ivgen: IvGenAlg::Plain64,
            ivgen_hash: None,
        };
        let ciphertext = data.clone();
        SectorCipher::new(&ecb, key)?.decrypt(0, &mut data)?;
        for (i, block) in data.chunks_exact_mut(16).enumerate() {
            let prev = if i == 0 {
                &iv[..]
            } else {
                &ciphertext[(i - 1) * 16..i * 16]
            };
            for (d, p) in block.iter_mut().zip(prev) {
                *d ^= p;
            }
        }
        let pad = usize::from(data[data.len() - 1]);
        if pad > data.len() {
            return Err(CryptoError::Secret(format!(
                "Incorrect number of padding bytes ({pad}) found on decrypted data"
            )));
        }
        data.truncate(data.len() - pad);
        Ok(data)
    }

    /// The bytes of secret `id`, or QEMU's "No secret with id 'ID'".
    pub fn get(&self, id: &str) -> Result<&[u8], CryptoError> {
        self.loaded
            .get(id)
            .map(Vec::as_slice)
            .ok_or_else(|| CryptoError::Secret(format!("No secret with id '{id}'")))
    }

    /// Secret `id` as a passphrase: valid UTF-8 without NUL bytes, as QEMU's
    /// `qcrypto_secret_lookup_as_utf8` demands.
    pub fn passphrase(&self, id: &str) -> Result<&str, CryptoError> {
        let bytes = self.get(id)?;
        match std::str::from_utf8(bytes) {
            Ok(s) if !bytes.contains(&0) => Ok(s),
            _ => Err(CryptoError::Secret(format!(
                "Data from secret {id} is not valid UTF-8"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(specs: &[&str]) -> Result<Secrets, CryptoError> {
        let mut s = Secrets::new();
        for spec in specs {
            s.add(&SecretObject::parse(spec)?)?;
        }
        Ok(s)
    }

    fn err(specs: &[&str]) -> String {
        load(specs).unwrap_err().to_string()
    }

    #[test]
    fn qemu_messages_for_bad_objects() {
        assert_eq!(
            err(&["secret,id=s"]),
            "Either 'file' or 'data' must be provided"
        );
        assert_eq!(
            err(&["secret,id=s,data=pw,file=/x"]),
            "'file' and 'data' are mutually exclusive"
        );
        assert_eq!(
            err(&["secret,id=s,data=!!!,format=base64"]),
            "Base64 data contains invalid characters"
        );
        assert_eq!(
            err(&["secret,id=s,data=pw,format=hex"]),
            "Parameter 'format' does not accept value 'hex'"
        );
        assert_eq!(
            err(&["secret,id=s,data=pw,bogus=1"]),
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(err(&["secret,data=pw"]), "Parameter 'id' is missing");
        assert!(err(&["secret,id=1s,data=pw"]).starts_with("Parameter 'id' expects an identifier"));
        assert_eq!(
            err(&["secret,id=s,data=pw,keyid=k"]),
            "No secret with id 'k'"
        );
        assert_eq!(
            err(&["secret,id=s,data=a", "secret,id=s,data=b"]),
            "attempt to add duplicate property 's' to object (type 'container')"
        );
        assert_eq!(
            err(&["secret,id=s,file=/nonexistent/x"]),
            "Unable to read /nonexistent/x: Failed to open file “/nonexistent/x”: No such file or directory"
        );
    }

    #[test]
    fn data_raw_base64_commas_and_last_value_wins() {
        let s = load(&[
            "secret,id=a,data=pw",
            "qom-type=secret,id=b,data=cHc=,format=base64",
            "secret,id=c,data=a,,b",
            "secret,id=d,data=x,data=pw",
            "secret,id=e,data=cHc,format=base64",
            "secret,id=f,data=,format=raw",
        ])
        .unwrap();
        assert_eq!(s.get("a").unwrap(), b"pw");
        assert_eq!(s.get("b").unwrap(), b"pw");
        assert_eq!(s.get("c").unwrap(), b"a,b");
        assert_eq!(s.get("d").unwrap(), b"pw");
        // glib drops an incomplete group: qemu-img takes this secret as the empty passphrase.
        assert_eq!(s.get("e").unwrap(), b"");
        assert_eq!(s.get("f").unwrap(), b"");
    }

    #[test]
    fn base64_decoding_is_glibs() {
        assert_eq!(qemu_base64_decode(b"cHc=\n").unwrap(), b"pw");
        assert_eq!(qemu_base64_decode(b"cHd4").unwrap(), b"pwx");
        assert_eq!(qemu_base64_decode(b"cA==").unwrap(), b"p");
        assert_eq!(qemu_base64_decode(b"").unwrap(), b"");
        assert!(qemu_base64_decode(b"cH c=").is_err());
        assert!(qemu_base64_decode(b"cH\0c=").is_err());
    }

    #[test]
    fn passphrases_must_be_utf8_without_nul() {
        let mut s = Secrets::new();
        s.loaded.insert("n".into(), b"p\0w".to_vec());
        s.loaded.insert("x".into(), vec![0xff]);
        s.loaded.insert("ok".into(), "pässword".as_bytes().to_vec());
        assert_eq!(
            s.passphrase("n").unwrap_err().to_string(),
            "Data from secret n is not valid UTF-8"
        );
        assert!(s.passphrase("x").is_err());
        assert_eq!(s.passphrase("ok").unwrap(), "pässword");
    }

    /// A secret encrypted as QEMU's docs describe (`openssl enc -aes-256-cbc`), produced by
    /// openssl for key `Gd7B…` and IV `EH+J…`: it decrypts to "pw".
    #[test]
    fn keyid_secrets_decrypt_as_qemu_does() {
        let key = "secret,id=k,data=Gd7Bahk5yM9A16gDZqKLOU/FXUs5dV/hxExXOlXXKtE=,format=base64";
        let data = "data=oMK7KgQaYgM4CxQi+X3Ntg==";
        let s = load(&[
            key,
            &format!("secret,id=s,{data},format=base64,keyid=k,iv=EH+JaU+TqXDzc2mx1ZCgrA=="),
        ])
        .unwrap();
        assert_eq!(s.passphrase("s").unwrap(), "pw");
        let no_iv = format!("secret,id=s,{data},format=base64,keyid=k");
        assert_eq!(err(&[key, &no_iv]), "IV is required to decrypt secret");
        let short_iv = format!("secret,id=s,{data},format=base64,keyid=k,iv=AAAA");
        assert_eq!(
            err(&[key, &short_iv]),
            "IV should be 16 bytes in length not 3"
        );
        let raw = format!("secret,id=s,{data},keyid=k,iv=EH+JaU+TqXDzc2mx1ZCgrA==");
        assert_eq!(
            err(&[key, &raw]),
            "Length 24 must be a multiple of block size 16"
        );
        let short_key = format!("secret,id=s,{data},format=base64,keyid=k,iv=AAAA");
        assert_eq!(
            err(&["secret,id=k,data=short", &short_key]),
            "Key should be 32 bytes in length"
        );
    }
}
