//! The image operand as qemu-img takes it: a file name (with `-f`), or with `--image-opts` a
//! QEMU option string (`driver=qcow2,file.filename=PATH,encrypt.key-secret=ID,…`), plus the
//! `--object secret,…` definitions that keys refer to.

use qcow2kit::chain::OpenOptions;
use qcow2kit::crypto::secret::{SecretObject, Secrets};
use qcow2kit::crypto::{EncryptionFormat, Passphrase};
use qcow2kit::engine::EncryptionOptions;

/// The secrets of every `--object secret,…` (objects of other types are accepted and
/// ignored, as they do not concern images).
pub fn load_secrets<'a>(objects: impl IntoIterator<Item = &'a str>) -> Result<Secrets, String> {
    let mut secrets = Secrets::new();
    for spec in objects {
        let kind = spec.split(',').next().unwrap_or("");
        let kind = spec
            .split(',')
            .find_map(|kv| kv.strip_prefix("qom-type="))
            .unwrap_or(kind);
        if kind != "secret" {
            continue;
        }
        let obj = SecretObject::parse(spec).map_err(|e| e.to_string())?;
        secrets.add(&obj).map_err(|e| e.to_string())?;
    }
    Ok(secrets)
}

/// An image operand resolved: where it is, its format, and the keys of its layers.
#[derive(Debug, Clone, Default)]
pub struct ImageArg {
    /// The file name.
    pub path: String,
    /// The format (`driver`), when given.
    pub format: Option<String>,
    /// The top image's key (`encrypt.*`).
    pub encryption: EncryptionOptions,
    /// The id of the top image's `encrypt.key-secret`, as given.
    pub key_secret_id: Option<String>,
    /// A key secret that could not be found (QEMU's message): an error for every command
    /// but `info`, which does not use keys.
    pub secret_error: Option<String>,
    /// The backing files' keys (`backing.encrypt.*`, `backing.backing.encrypt.*`, …).
    pub backing_encryption: Vec<EncryptionOptions>,
}

impl ImageArg {
    /// The key options of the layer `depth` below the top (0: the top image).
    fn layer(&mut self, depth: usize) -> &mut EncryptionOptions {
        if depth == 0 {
            return &mut self.encryption;
        }
        if self.backing_encryption.len() < depth {
            self.backing_encryption
                .resize(depth, EncryptionOptions::default());
        }
        &mut self.backing_encryption[depth - 1]
    }

    /// Puts the keys into `opts`.
    pub fn apply(&self, opts: &mut OpenOptions) {
        opts.qcow2.encryption = self.encryption.clone();
        opts.backing_encryption = self.backing_encryption.clone();
    }
}

/// Splits QEMU's `key=value,key=value` option syntax (`,,` is a literal comma; an element
/// without `=` is returned as a key with an empty value).
pub fn split_opts(s: &str) -> Vec<(String, String)> {
    qcow2kit::format::qemu_opts::split_option_list(s)
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p, String::new()),
        })
        .collect()
}

/// The image operand `name`: a plain file name in `format`, or with `image_opts` an option
/// string. Keys name secrets of `secrets`; an unknown option is refused with QEMU's message.
pub fn image_arg(
    name: &str,
    image_opts: bool,
    format: Option<&str>,
    secrets: &Secrets,
) -> Result<ImageArg, String> {
    if !image_opts {
        return Ok(ImageArg {
            path: name.to_string(),
            format: format.map(str::to_string),
            ..Default::default()
        });
    }
    if format.is_some() {
        return Err("--image-opts and --format are mutually exclusive".into());
    }
    let mut arg = ImageArg::default();
    let mut path = None;
    for (key, value) in split_opts(name) {
        let (depth, rest) = backing_depth(&key);
        match rest {
            "encrypt.key-secret" => {
                match secrets.get(&value) {
                    Ok(pw) => arg.layer(depth).passphrase = Some(Passphrase::new(pw)),
                    Err(e) => {
                        arg.secret_error.get_or_insert(e.to_string());
                    }
                }
                if depth == 0 {
                    arg.key_secret_id = Some(value);
                }
            }
            "encrypt.format" => {
                let f = EncryptionFormat::from_name(&value).ok_or_else(|| {
                    format!("Parameter 'encrypt.format' does not accept value '{value}'")
                })?;
                arg.layer(depth).format = Some(f);
            }
            _ if depth > 0 => {}
            "driver" => arg.format = Some(value),
            "file.filename" | "file" => path = Some(value),
            "file.driver" if value == "file" => {}
            "file.locking" | "file.aio" | "cache.direct" | "cache.no-flush" | "read-only"
            | "force-share" => {}
            // qcow2's runtime options (cache sizes, overlap checks, …): no effect here.
            k if crate::io::is_runtime_key(k) => {}
            _ => {
                let driver = arg.format.as_deref().unwrap_or("qcow2");
                return Err(format!(
                    "Block format '{driver}' does not support the option '{key}'"
                ));
            }
        }
    }
    arg.path = path.ok_or("A block device must be specified for \"file\"")?;
    Ok(arg)
}

/// How many `backing.` prefixes `key` has, and the key after them.
fn backing_depth(key: &str) -> (usize, &str) {
    let mut depth = 0;
    let mut rest = key;
    while let Some(r) = rest.strip_prefix("backing.") {
        depth += 1;
        rest = r;
    }
    (depth, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_strings() {
        assert_eq!(
            split_opts("driver=qcow2,file.filename=a,,b,encrypt.key-secret=s0"),
            vec![
                ("driver".to_string(), "qcow2".to_string()),
                ("file.filename".to_string(), "a,b".to_string()),
                ("encrypt.key-secret".to_string(), "s0".to_string()),
            ]
        );
        assert!(load_secrets(["iothread,id=t"]).is_ok());
        assert!(load_secrets(["secret,data=pw"]).is_err());
    }

    #[test]
    fn keys_per_layer() {
        let secrets = load_secrets(["secret,id=a,data=top", "secret,id=b,data=low"]).unwrap();
        let arg = image_arg(
            "driver=qcow2,file.filename=x,,y.qcow2,encrypt.key-secret=a,backing.backing.encrypt.key-secret=b",
            true,
            None,
            &secrets,
        )
        .unwrap();
        assert_eq!(arg.path, "x,y.qcow2");
        assert_eq!(arg.format.as_deref(), Some("qcow2"));
        assert_eq!(
            arg.encryption.passphrase.as_ref().map(|p| p.as_bytes()),
            Some(&b"top"[..])
        );
        assert_eq!(arg.backing_encryption.len(), 2);
        assert!(arg.backing_encryption[0].passphrase.is_none());
        assert_eq!(
            arg.backing_encryption[1]
                .passphrase
                .as_ref()
                .map(|p| p.as_bytes()),
            Some(&b"low"[..])
        );
        let arg = image_arg("file.filename=x,encrypt.key-secret=z", true, None, &secrets);
        assert_eq!(
            arg.unwrap().secret_error.as_deref(),
            Some("No secret with id 'z'")
        );
        let err = image_arg("driver=qcow2,bogus=1,file.filename=x", true, None, &secrets);
        assert_eq!(
            err.unwrap_err(),
            "Block format 'qcow2' does not support the option 'bogus'"
        );
    }
}
