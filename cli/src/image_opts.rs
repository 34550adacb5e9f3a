//! The image operand as qemu-img takes it: a file name (with `-f`), or with `--image-opts` a
//! QEMU option string (`driver=qcow2,file.filename=PATH,encrypt.key-secret=ID,…`), plus the
//! `--object secret,…` definitions that keys refer to.
//!
//! Hand-written because QEMU's option syntax has no crate: QemuOpts lists with `,,` escaping,
//! dotted keys flattened from `json:{…}` names, and QEMU's exact messages for unknown or
//! invalid keys.

use qcow2kit::chain::OpenOptions;
use qcow2kit::crypto::secret::{SecretObject, Secrets};
use qcow2kit::crypto::{EncryptionFormat, Passphrase};
use qcow2kit::engine::EncryptionOptions;
use qcow2kit::io::blkdebug::BlkdebugConfig;

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
    /// Every option of an `--image-opts` or `json:` operand, flattened to dotted keys
    /// (`file.filename`, `data-file.driver`, `data-file.inject-error.0.iotype`, …) in the order
    /// given, `-f` included; empty for a plain file name. A JSON `null`, `{}` or `[]` value is
    /// kept as [`crate::json_name::NULL`], [`crate::json_name::EMPTY_OBJECT`] or
    /// [`crate::json_name::EMPTY_ARRAY`].
    pub options: Vec<(String, String)>,
    /// `backing: null` (or the deprecated `backing=`): the image is opened without its
    /// backing file.
    pub no_backing: bool,
    /// The external data file named by `data-file.filename`.
    pub data_file: Option<String>,
    /// The backing file named again by `backing.file.filename` (it must be the one the image
    /// names: see [`check_backing_file`]).
    pub backing_file: Option<String>,
    /// The backing file's format named by `backing.driver` (it must be the one it is opened
    /// in).
    pub backing_driver: Option<String>,
    /// The rules of a blkdebug filter over the image's file (`file.driver=blkdebug`).
    pub blkdebug_file: Option<BlkdebugConfig>,
    /// The rules of a blkdebug filter over its data file (`data-file.driver=blkdebug`).
    pub blkdebug_data_file: Option<BlkdebugConfig>,
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

    /// Puts the keys, the data file and the blkdebug filters into `opts`.
    pub fn apply(&self, opts: &mut OpenOptions) {
        opts.qcow2.encryption = self.encryption.clone();
        opts.backing_encryption = self.backing_encryption.clone();
        if let Some(d) = &self.data_file {
            opts.data_file = Some(d.into());
        }
        if self.blkdebug_file.is_some() || self.blkdebug_data_file.is_some() {
            opts.interpose = Some(crate::blkdebug_rules::interpose(
                self.blkdebug_file.clone(),
                self.blkdebug_data_file.clone(),
                None,
                |_| {},
            ));
        }
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

/// Whether the driver `driver` given as option `key` (`driver`, `file.driver`,
/// `data-file.driver`, `backing.driver`, …) is one qcow2kit opens there: formats (`qcow2`,
/// `raw`) for the image and its backing files, the `file` protocol under them, and the
/// protocols qemu-io opens by themselves (`file`, `host_device`, `host_cdrom`) as the image.
/// Every driver option of an image operand is checked here, and only here: QEMU's message for
/// a driver it does not know, ours for one it has and qcow2kit does not implement.
pub fn check_driver(key: &str, driver: &str) -> Result<(), String> {
    let node = key.strip_suffix("driver").unwrap_or(key);
    let node = node.strip_suffix('.').unwrap_or(node);
    let last = node.rsplit('.').next().unwrap_or("");
    let supported = match last {
        "" => matches!(
            driver,
            "qcow2" | "raw" | "file" | "host_device" | "host_cdrom"
        ),
        "file" | "data-file" => driver == "file",
        "backing" => matches!(driver, "qcow2" | "raw"),
        _ => false,
    };
    if supported {
        Ok(())
    } else if !crate::option_help::is_qemu_format(driver) {
        Err(format!("Unknown driver '{driver}'"))
    } else if node.is_empty() {
        Err(format!("Driver '{driver}' is not supported by qcow2kit"))
    } else {
        Err(format!(
            "Driver '{driver}' for '{node}' is not supported by qcow2kit"
        ))
    }
}

/// QEMU's message for an option no node of the image takes: a key of the image's `file` child
/// (`file.x`) is named by its protocol, any other by the image's format.
pub fn unsupported_option(format: &str, key: &str) -> String {
    match key.strip_prefix("file.") {
        Some(k) => format!("Block protocol 'file' doesn't support the option '{k}'"),
        None => format!("Block format '{format}' does not support the option '{key}'"),
    }
}

/// Checks the options of `arg` that name the backing file of `opened` again
/// ([`check_backing_file`], [`check_backing_driver`]).
pub fn check_backing(arg: &ImageArg, opened: &qcow2kit::chain::Opened) -> Result<(), String> {
    if let Some(f) = &arg.backing_file {
        check_backing_file(opened, f)?;
    }
    match &arg.backing_driver {
        Some(d) => check_backing_driver(opened, d),
        None => Ok(()),
    }
}

/// Checks the options that name the backing file of `opened` again: `backing.file.filename`
/// must be the file the image names (opening another one in its place is not supported), or
/// be given to an image with a raw data file and no backing file, which never reads one.
pub fn check_backing_file(opened: &qcow2kit::chain::Opened, want: &str) -> Result<(), String> {
    let same =
        |a: &std::path::Path| match (a.canonicalize(), std::path::Path::new(want).canonicalize()) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        };
    // An image whose data file is raw never reads a backing file (QEMU lets one be given at
    // run time without effect): nothing to open.
    let raw_data = opened.layers.len() == 1
        && opened.qcow2.as_ref().is_some_and(|q| {
            q.header()
                .autoclear
                .contains(qcow2kit::format::features::AutoclearFeatures::DATA_FILE_RAW)
        });
    if raw_data || opened.layers.get(1).is_some_and(|l| same(&l.path)) {
        Ok(())
    } else {
        Err(format!(
            "Option 'backing.file.filename' naming another file than the image's backing \
             file is not supported by qcow2kit ('{want}')"
        ))
    }
}

/// Checks `backing.driver` against the format the backing file of `opened` was opened in.
pub fn check_backing_driver(opened: &qcow2kit::chain::Opened, want: &str) -> Result<(), String> {
    match opened.layers.get(1) {
        None => Err("Could not open backing file: Must specify either driver or file".into()),
        Some(l) if l.format.name() != want => Err(format!(
            "Option 'backing.driver={want}' is not supported by qcow2kit"
        )),
        Some(_) => Ok(()),
    }
}

/// QEMU's warning for `backing=` (an empty string) instead of `backing: null`.
pub fn warn_empty_backing() {
    errln!(
        "{}: warning: Use of \"backing\": \"\" is deprecated; use \"backing\": null instead",
        crate::common::prog()
    );
}

/// The image operand `name`: a plain file name in `format`, a `json:{…}` name (flattened, with
/// `format` as its driver when given), or with `image_opts` an option string. Keys name secrets
/// of `secrets`. The error is QEMU's reason (to follow `Could not open 'NAME': `), but for
/// `--image-opts` with `--format`.
pub fn image_arg(
    name: &str,
    image_opts: bool,
    format: Option<&str>,
    secrets: &Secrets,
) -> Result<ImageArg, String> {
    let options = if image_opts {
        if format.is_some() {
            return Err("--image-opts and --format are mutually exclusive".into());
        }
        let mut options = split_opts(name);
        // A first element without `=` is the value of the implied key `file` (QemuOpts).
        if let Some(first) = options.first_mut() {
            if first.1.is_empty() && !name.split(',').next().unwrap_or("").contains('=') {
                *first = ("file".into(), std::mem::take(&mut first.0));
            }
        }
        options
    } else {
        match crate::json_name::options_of(name) {
            None => {
                return Ok(ImageArg {
                    path: name.to_string(),
                    format: format.map(str::to_string),
                    ..Default::default()
                })
            }
            Some(json) => {
                let mut options = json?;
                // Options given beside the name win over the name's own (QEMU's join).
                if let Some(f) = format {
                    options.retain(|(k, _)| k != "driver");
                    options.insert(0, ("driver".into(), f.to_string()));
                }
                options
            }
        }
    };
    image_arg_of_options(options, secrets)
}

/// The image operand the flattened `options` describe.
fn image_arg_of_options(
    mut options: Vec<(String, String)>,
    secrets: &Secrets,
) -> Result<ImageArg, String> {
    let mut arg = ImageArg {
        blkdebug_file: crate::blkdebug_rules::split_blkdebug(&mut options, "file")?,
        blkdebug_data_file: crate::blkdebug_rules::split_blkdebug(&mut options, "data-file")?,
        ..ImageArg::default()
    };
    let mut path = None;
    let given = |key: &str| {
        options
            .iter()
            .find(|(k, v)| k == key && !crate::json_name::is_structural(v))
            .map(|(_, v)| v.as_str())
    };
    // QEMU's order: the driver, then the image's file, then the other options.
    if let Some(d) = given("driver") {
        check_driver("driver", d)?;
    }
    if given("file.filename").is_none() && given("file").is_none() {
        return Err(match given("driver") {
            Some(_) => "A block device must be specified for \"file\"".into(),
            None => "Must specify either driver or file".into(),
        });
    }
    let driver = given("driver").unwrap_or("qcow2").to_string();
    for (key, value) in &options {
        let (depth, rest) = backing_depth(key);
        let value = value.clone();
        if crate::json_name::is_structural(&value)
            && !(key == "backing" && value == crate::json_name::NULL)
        {
            return Err(unsupported_option(&driver, key));
        }
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
            "file.filename" if depth == 1 => arg.backing_file = Some(value),
            "file.driver" if depth == 1 => check_driver(key, &value)?,
            "driver" if depth == 1 => {
                check_driver(key, &value)?;
                arg.backing_driver = Some(value);
            }
            _ if depth > 0 => {
                return Err(format!("Option '{key}' is not supported by qcow2kit"));
            }
            "driver" => {
                check_driver(key, &value)?;
                if matches!(value.as_str(), "file" | "host_device" | "host_cdrom") {
                    return Err(format!(
                        "Driver '{value}' as the image's format is not supported by qcow2kit"
                    ));
                }
                arg.format = Some(value);
            }
            "file.filename" => path = Some(value),
            "file" | "data-file" => {
                return Err(format!(
                    "Cannot find device='{value}' nor node-name='{value}'"
                ))
            }
            "backing" => match value.as_str() {
                crate::json_name::NULL => arg.no_backing = true,
                "" => {
                    warn_empty_backing();
                    arg.no_backing = true;
                }
                node => {
                    return Err(format!(
                        "Could not open backing file: Cannot find device='{node}' nor node-name='{node}'"
                    ))
                }
            },
            "data-file.filename" => arg.data_file = Some(value),
            "file.driver" | "data-file.driver" => check_driver(key, &value)?,
            "file.locking" | "file.aio" | "cache.direct" | "cache.no-flush" | "read-only"
            | "force-share" => {}
            // qcow2's runtime options (cache sizes, overlap checks, …): no effect here.
            k if crate::io::is_runtime_key(k) => {}
            _ => return Err(unsupported_option(&driver, key)),
        }
    }
    arg.path = path.ok_or("A block device must be specified for \"file\"")?;
    arg.options = options;
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

    #[test]
    fn drivers_by_layer() {
        assert!(check_driver("driver", "qcow2").is_ok());
        assert!(check_driver("file.driver", "file").is_ok());
        assert!(check_driver("data-file.driver", "file").is_ok());
        assert!(check_driver("backing.driver", "raw").is_ok());
        assert!(check_driver("backing.file.driver", "file").is_ok());
        assert_eq!(
            check_driver("file.driver", "qcow2").unwrap_err(),
            "Driver 'qcow2' for 'file' is not supported by qcow2kit"
        );
        assert_eq!(
            check_driver("data-file.driver", "blkdebug").unwrap_err(),
            "Driver 'blkdebug' for 'data-file' is not supported by qcow2kit"
        );
        assert_eq!(
            check_driver("driver", "zzz").unwrap_err(),
            "Unknown driver 'zzz'"
        );
    }

    #[test]
    fn json_names_and_implied_file() {
        let none = Secrets::new();
        let arg = image_arg(
            r#"json:{"driver":"qcow2","file":{"filename":"a"},"data-file":{"driver":"file","filename":"d"},"backing":null}"#,
            false,
            Some("raw"),
            &none,
        )
        .unwrap();
        assert_eq!(arg.path, "a");
        assert_eq!(
            arg.format.as_deref(),
            Some("raw"),
            "-f wins over the name's driver"
        );
        assert_eq!(arg.data_file.as_deref(), Some("d"));
        assert!(arg.no_backing);
        assert!(arg
            .options
            .iter()
            .any(|(k, v)| k == "data-file.driver" && v == "file"));
        assert_eq!(
            image_arg("a.qcow2,driver=qcow2", true, None, &none).unwrap_err(),
            "Cannot find device='a.qcow2' nor node-name='a.qcow2'"
        );
        assert_eq!(
            image_arg(r#"json:{"file.filename":"a","x":{}}"#, false, None, &none).unwrap_err(),
            "Block format 'qcow2' does not support the option 'x'"
        );
        assert!(image_arg(
            r#"json:{"file.filename":"a","backing.x":1}"#,
            false,
            None,
            &none
        )
        .unwrap_err()
        .contains("not supported by qcow2kit"));
    }
}
