//! Policies over inspection facts, and the rules a file breaks.

use super::{Encryption, Inspection};
use crate::error::Corruption;
use crate::format::features::{FeatureKind, IncompatibleFeatures};
use crate::format::probe::{is_hybrid_iso, Format};
use std::fmt;

impl Inspection {
    /// Applies `policy` and returns every rule the file breaks (empty: acceptable).
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// use qcow2kit::ops::inspect::{inspect, Policy};
    /// use std::sync::Arc;
    /// let upload = Arc::new(MemoryStorage::new());
    /// create_qcow2_on(upload.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
    /// let found = inspect(upload.as_ref())?;
    /// assert!(found.check(&Policy::openstack()).is_empty());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn check(&self, policy: &Policy) -> Vec<Violation> {
        let mut v = Vec::new();
        if let Some(declared) = policy.declared_format {
            if !format_matches(declared, &self.detected) {
                v.push(Violation::FormatMismatch {
                    declared,
                    detected: self.detected.clone(),
                });
            }
        }
        if !policy.allow_polyglot && self.is_polyglot() {
            v.push(Violation::Polyglot(self.detected.clone()));
        }
        if !self.complete {
            v.push(Violation::Incomplete);
        }
        if let Some(allowed) = &policy.allowed_formats {
            for &f in &self.detected {
                if !allowed.contains(&f) {
                    v.push(Violation::UnsupportedFormat(f));
                }
            }
        }
        for facts in &self.formats {
            v.extend(
                facts
                    .findings
                    .iter()
                    .filter(|f| policy.enforces(f))
                    .cloned(),
            );
        }
        let Some(q) = &self.qcow2 else {
            return v;
        };
        if policy.require_valid_header {
            v.extend(q.problems.iter().cloned().map(Violation::InvalidHeader));
        }
        if q.version != 2 && q.version != 3 {
            // Nothing else in the header means anything.
            v.push(Violation::UnsupportedVersion(q.version));
            return v;
        }
        if !policy.allow_backing_file && q.backing_file_offset != 0 {
            v.push(Violation::BackingFile {
                name: q.backing_file.clone(),
            });
        }
        if !policy.allow_data_file && q.has_data_file() {
            v.push(Violation::DataFile {
                name: q.data_file.clone(),
            });
        }
        let unknown_incompat = q.incompatible.bits & !policy.known_incompatible;
        if unknown_incompat != 0 {
            v.push(Violation::UnknownFeatures {
                kind: FeatureKind::Incompatible,
                bits: unknown_incompat,
            });
        }
        if !policy.allow_unknown_compatible && q.compatible.unknown != 0 {
            v.push(Violation::UnknownFeatures {
                kind: FeatureKind::Compatible,
                bits: q.compatible.unknown,
            });
        }
        if !policy.allow_unknown_autoclear && q.autoclear.unknown != 0 {
            v.push(Violation::UnknownFeatures {
                kind: FeatureKind::Autoclear,
                bits: q.autoclear.unknown,
            });
        }
        if !policy.allow_legacy_aes && q.encryption == Encryption::Aes {
            v.push(Violation::LegacyAes);
        }
        v
    }
}

fn format_matches(declared: Format, detected: &[Format]) -> bool {
    match declared {
        Format::Raw => detected.iter().all(|&f| f == Format::Gpt),
        Format::Iso => detected == [Format::Iso] || is_hybrid_iso(detected),
        d => detected == [d],
    }
}

/// Which rules [`Inspection::check`] applies. Build one from a preset and adjust its fields.
///
/// ```
/// use qcow2kit::io::MemoryStorage;
/// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// use qcow2kit::ops::inspect::{inspect, Policy};
/// use std::sync::Arc;
/// let upload = Arc::new(MemoryStorage::new());
/// create_qcow2_on(upload.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
/// let found = inspect(upload.as_ref())?;
/// // Glance's import: only what was declared, and nothing that names other files.
/// let policy = Policy::openstack().declared(qcow2kit::Format::Raw);
/// assert!(!found.check(&policy).is_empty()); // declared raw, is qcow2
/// # Ok::<(), qcow2kit::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The format the file claims to be (e.g. an upload's `disk_format`); when set, the detected
    /// signatures must match it ([`Violation::FormatMismatch`]).
    pub declared_format: Option<Format>,
    /// Accept qcow2 images that name a backing file.
    pub allow_backing_file: bool,
    /// Accept qcow2 images with an external data file.
    pub allow_data_file: bool,
    /// Incompatible feature bits considered known; any other set bit is a violation.
    pub known_incompatible: u64,
    /// Accept compatible feature bits qcow2kit does not know.
    pub allow_unknown_compatible: bool,
    /// Accept autoclear feature bits qcow2kit does not know.
    pub allow_unknown_autoclear: bool,
    /// Accept legacy AES encryption (crypt_method 1).
    pub allow_legacy_aes: bool,
    /// Refuse qcow2 headers that do not validate ([`Violation::InvalidHeader`]).
    pub require_valid_header: bool,
    /// Accept files carrying more than one format's signature.
    pub allow_polyglot: bool,
    /// The formats accepted at all (`None`: any); a detected format outside the list is
    /// [`Violation::UnsupportedFormat`].
    pub allowed_formats: Option<Vec<Format>>,
    /// Apply OpenStack's per-format safety rules: a VMDK's create type, descriptor, extents and
    /// footer, the LUKS version, the MBR's partition entries.
    pub format_rules: bool,
}

/// The formats OpenStack's `format_inspector` knows and does not ban (QED it bans; parallels,
/// bochs, cloop and DMG it does not know). qcow (version 1) is matched there by the qcow2
/// inspector, which refuses it by version.
const OPENSTACK_FORMATS: [Format; 10] = [
    Format::Raw,
    Format::Qcow2,
    Format::Qcow,
    Format::Vpc,
    Format::Vhdx,
    Format::Vmdk,
    Format::Vdi,
    Format::Iso,
    Format::Gpt,
    Format::Luks,
];

impl Policy {
    /// For untrusted images: no backing file, no data file, no feature bit qcow2kit does not
    /// know (in any field), no legacy AES, a valid header (every format's structure), not a
    /// polyglot, only the formats OpenStack accepts, OpenStack's per-format rules, and — once
    /// [`declared`](Policy::declared) — the declared format.
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// use qcow2kit::ops::inspect::{inspect, Policy};
    /// use std::sync::Arc;
    /// let upload = Arc::new(MemoryStorage::new());
    /// create_qcow2_on(upload.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
    /// let found = inspect(upload.as_ref())?;
    /// assert!(found.check(&Policy::strict()).is_empty());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn strict() -> Self {
        Policy {
            declared_format: None,
            allow_backing_file: false,
            allow_data_file: false,
            known_incompatible: IncompatibleFeatures::all().bits(),
            allow_unknown_compatible: false,
            allow_unknown_autoclear: false,
            allow_legacy_aes: false,
            require_valid_header: true,
            allow_polyglot: false,
            allowed_formats: Some(OPENSTACK_FORMATS.to_vec()),
            format_rules: true,
        }
    }

    /// The qcow2 rules of OpenStack's `format_inspector` (`QcowInspector`): no backing file
    /// (a non-zero backing file offset), no data file (incompatible bit 2), version 2 or 3, and
    /// no incompatible bit beyond the four it knows (dirty, corrupt, data file, compression
    /// type — so extended L2 counts as unknown); plus its `InspectWrapper` rule that a file
    /// matching several formats is refused, and — once declared — the format match its callers
    /// (Glance, Nova) require. The rest of the qcow2 header is not validated, as there. For the
    /// other formats: only those it knows and does not ban, its VMDK, LUKS and MBR rules, and
    /// the structure it parses (a VMDK header and descriptor location, a VHDX region and
    /// metadata table) must be sound. qcow2kit adds one rule of its own for every format: no
    /// backing file (a VMDK parent, a QED backing file, a differencing VHD/VHDX/VDI), where
    /// `format_inspector` checks only qcow2's.
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// use qcow2kit::ops::inspect::{inspect, Policy};
    /// use std::sync::Arc;
    /// let upload = Arc::new(MemoryStorage::new());
    /// create_qcow2_on(upload.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
    /// let found = inspect(upload.as_ref())?;
    /// assert!(found.check(&Policy::openstack()).is_empty());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn openstack() -> Self {
        Policy {
            declared_format: None,
            allow_backing_file: false,
            allow_data_file: false,
            known_incompatible: 0x0f,
            allow_unknown_compatible: true,
            allow_unknown_autoclear: true,
            allow_legacy_aes: true,
            require_valid_header: false,
            allow_polyglot: false,
            allowed_formats: Some(OPENSTACK_FORMATS.to_vec()),
            format_rules: true,
        }
    }

    /// For images made locally by a trusted user: backing and data files, legacy AES, any
    /// format and any VMDK subformat are fine; invalid headers, unknown incompatible features
    /// and polyglots are still refused.
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// use qcow2kit::ops::inspect::{inspect, Policy};
    /// use std::sync::Arc;
    /// let upload = Arc::new(MemoryStorage::new());
    /// create_qcow2_on(upload.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
    /// let found = inspect(upload.as_ref())?;
    /// assert!(found.check(&Policy::trusted_local()).is_empty());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn trusted_local() -> Self {
        Policy {
            declared_format: None,
            allow_backing_file: true,
            allow_data_file: true,
            known_incompatible: IncompatibleFeatures::all().bits(),
            allow_unknown_compatible: true,
            allow_unknown_autoclear: true,
            allow_legacy_aes: true,
            require_valid_header: true,
            allow_polyglot: false,
            allowed_formats: None,
            format_rules: false,
        }
    }

    /// Whether a format's finding breaks a rule of this policy.
    fn enforces(&self, finding: &Violation) -> bool {
        match finding {
            Violation::BackingFile { .. } => !self.allow_backing_file,
            Violation::Malformed { .. } => self.require_valid_header || self.format_rules,
            Violation::VmdkSubformat(_)
            | Violation::VmdkDescriptor(_)
            | Violation::VmdkExtent(_)
            | Violation::VmdkFooter(_)
            | Violation::LuksVersion(_)
            | Violation::PartitionTable(_) => self.format_rules,
            _ => true,
        }
    }

    /// The same policy, requiring the file to be a `format` image.
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// use qcow2kit::ops::inspect::{inspect, Policy};
    /// use std::sync::Arc;
    /// let upload = Arc::new(MemoryStorage::new());
    /// create_qcow2_on(upload.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
    /// let found = inspect(upload.as_ref())?;
    /// let qcow2 = Policy::openstack().declared(qcow2kit::Format::Qcow2);
    /// assert!(found.check(&qcow2).is_empty());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn declared(mut self, format: Format) -> Self {
        self.declared_format = Some(format);
        self
    }
}

/// A rule an inspected file breaks.
///
/// ```
/// use qcow2kit::io::MemoryStorage;
/// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
/// use qcow2kit::ops::inspect::{inspect, Policy};
/// use std::sync::Arc;
/// let upload = Arc::new(MemoryStorage::new());
/// create_qcow2_on(upload.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
/// let found = inspect(upload.as_ref())?;
/// let v = found.check(&Policy::openstack().declared(qcow2kit::Format::Vmdk));
/// println!("refused: {}", v[0]);
/// # Ok::<(), qcow2kit::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// The qcow2 header or its extensions do not validate.
    InvalidHeader(Corruption),
    /// A `QFI\xfb` file whose version is neither 2 nor 3.
    UnsupportedVersion(u32),
    /// The image names a backing file (name as stored, if readable).
    BackingFile {
        /// The name's bytes.
        name: Option<Vec<u8>>,
    },
    /// The image keeps its data in an external file.
    DataFile {
        /// The data file name's bytes, if the image records one.
        name: Option<Vec<u8>>,
    },
    /// Feature bits the policy does not know.
    UnknownFeatures {
        /// Which field.
        kind: FeatureKind,
        /// The bits.
        bits: u64,
    },
    /// Legacy AES-CBC encryption.
    LegacyAes,
    /// The detected signatures do not match the declared format.
    FormatMismatch {
        /// What the file claims to be.
        declared: Format,
        /// What was found.
        detected: Vec<Format>,
    },
    /// The file carries the signatures of several formats.
    Polyglot(Vec<Format>),
    /// The policy does not accept this format (OpenStack bans QED and does not know parallels,
    /// bochs, cloop or DMG).
    UnsupportedFormat(Format),
    /// A structure of a non-qcow2 format is unsound (qemu or OpenStack would refuse to parse
    /// it).
    Malformed {
        /// The format.
        format: Format,
        /// What is wrong.
        reason: String,
    },
    /// A VMDK whose create type is not `monolithicSparse` or `streamOptimized` (its data lives
    /// in files its descriptor names), or a legacy `COWD` extent.
    VmdkSubformat(String),
    /// A VMDK descriptor that is missing, not ASCII, has a line OpenStack does not understand,
    /// or names no extent.
    VmdkDescriptor(String),
    /// A VMDK extent line naming a path (`/`), or a sparse file's descriptor naming extents
    /// other than the file itself.
    VmdkExtent(String),
    /// A stream-optimized VMDK whose footer disagrees with its header or is malformed.
    VmdkFooter(String),
    /// A LUKS header of a version other than 1.
    LuksVersion(u16),
    /// MBR partition entries OpenStack refuses (invalid boot flag, no partition, a protective
    /// GPT entry that is not alone or not at LBA 1) or a protective MBR without a GPT header.
    PartitionTable(String),
    /// A streaming inspection let bytes pass that a fact needed, so it cannot vouch for the file.
    Incomplete,
}

impl Violation {
    /// The rule's short name (OpenStack's check names where it has one).
    ///
    /// ```
    /// use qcow2kit::io::MemoryStorage;
    /// use qcow2kit::ops::create::{create_qcow2_on, CreateOptions};
    /// use qcow2kit::ops::inspect::{inspect, Policy};
    /// use std::sync::Arc;
    /// let upload = Arc::new(MemoryStorage::new());
    /// create_qcow2_on(upload.clone(), None, 1 << 20, &CreateOptions::default())?.close()?;
    /// let found = inspect(upload.as_ref())?;
    /// let v = found.check(&Policy::openstack().declared(qcow2kit::Format::Vmdk));
    /// assert!(!v[0].rule().is_empty());
    /// # Ok::<(), qcow2kit::Error>(())
    /// ```
    pub fn rule(&self) -> &'static str {
        match self {
            Violation::InvalidHeader(_) => "invalid_header",
            Violation::UnsupportedVersion(_) => "unsupported_version",
            Violation::BackingFile { .. } => "backing_file",
            Violation::DataFile { .. } => "data_file",
            Violation::UnknownFeatures { .. } => "unknown_features",
            Violation::LegacyAes => "legacy_aes",
            Violation::FormatMismatch { .. } => "format_mismatch",
            Violation::Polyglot(_) => "polyglot",
            Violation::UnsupportedFormat(_) => "unsupported_format",
            Violation::Malformed { .. } => "malformed",
            Violation::VmdkSubformat(_) => "vmdk_subformat",
            Violation::VmdkDescriptor(_) => "vmdk_descriptor",
            Violation::VmdkExtent(_) => "vmdk_extent",
            Violation::VmdkFooter(_) => "vmdk_footer",
            Violation::LuksVersion(_) => "luks_version",
            Violation::PartitionTable(_) => "partition_table",
            Violation::Incomplete => "incomplete",
        }
    }
}

fn names(formats: &[Format]) -> String {
    if formats.is_empty() {
        return "raw".into();
    }
    formats
        .iter()
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.rule())?;
        match self {
            Violation::InvalidHeader(c) => write!(f, "invalid qcow2 header: {c}"),
            Violation::UnsupportedVersion(v) => write!(f, "unsupported qcow2 version {v}"),
            Violation::BackingFile { name } => match name {
                Some(n) => write!(
                    f,
                    "image has a backing file '{}'",
                    String::from_utf8_lossy(n)
                ),
                None => write!(f, "image has a backing file"),
            },
            Violation::DataFile { name } => match name {
                Some(n) => write!(
                    f,
                    "image has an external data file '{}'",
                    String::from_utf8_lossy(n)
                ),
                None => write!(f, "image has an external data file"),
            },
            Violation::UnknownFeatures { kind, bits } => {
                let field = match kind {
                    FeatureKind::Incompatible => "incompatible",
                    FeatureKind::Compatible => "compatible",
                    FeatureKind::Autoclear => "autoclear",
                };
                write!(f, "unknown {field} feature bits {bits:#x}")
            }
            Violation::LegacyAes => write!(f, "image uses legacy AES encryption"),
            Violation::FormatMismatch { declared, detected } => write!(
                f,
                "declared format {declared} but the content is {}",
                names(detected)
            ),
            Violation::Polyglot(d) => write!(f, "multiple formats detected: {}", names(d)),
            Violation::UnsupportedFormat(fmt) => write!(f, "format {fmt} is not allowed"),
            Violation::Malformed { format, reason } => {
                write!(f, "invalid {format} image: {reason}")
            }
            Violation::VmdkSubformat(t) => write!(f, "unsupported VMDK subformat '{t}'"),
            Violation::VmdkDescriptor(why) => write!(f, "invalid VMDK descriptor: {why}"),
            Violation::VmdkExtent(e) => write!(f, "unsafe VMDK extent: {e}"),
            Violation::VmdkFooter(why) => write!(f, "invalid VMDK footer: {why}"),
            Violation::LuksVersion(v) => write!(f, "LUKS version {v} is not supported"),
            Violation::PartitionTable(why) => write!(f, "invalid partition table: {why}"),
            Violation::Incomplete => {
                write!(f, "the stream passed bytes the inspection needed")
            }
        }
    }
}
