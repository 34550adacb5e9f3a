//! How Glance's interoperable image import vets and converts uploads (the `image_conversion`
//! plugin, with the format inspector checks added for OSSA-2024-001 / CVE-2024-32498), done
//! with qcow2kit instead of qemu-img.
//!
//! | step                                        | what it replaces                                     |
//! |---------------------------------------------|------------------------------------------------------|
//! | vet the staged upload before any reader     | `format_inspector.detect_file_format(path)` + `safety_check()`, and the `disk_format` match |
//! | refuse images that name other files         | `qemu-img info --output=json -f FMT path` (backing-filename, data-file) |
//! | convert to the store's format               | `qemu-img convert -f FMT -O raw path store/ID`        |
//!
//! Each upload below is inspected under [`Policy::openstack`] with its declared `disk_format`;
//! a refused one is never opened as an image, an accepted one is opened under the library's
//! default policy (which opens no file an image names: a second line of defence) and
//! converted to raw, and the result is compared with the upload. Every verdict is checked
//! against the one expected.
//!
//! ```text
//! cargo run --release --example glance_import
//! ```

mod common;

use common::{make_guest_image, noise, same_content, Res, Scratch};
use qcow2kit::chain::{open, OpenOptions};
use qcow2kit::io::{FileStorage, MemoryStorage, Storage};
use qcow2kit::ops::convert::{convert, ConvertOptions, Target};
use qcow2kit::ops::create::{create_qcow2, create_qcow2_on, CreateOptions};
use qcow2kit::ops::inspect::{inspect_path, Policy};
use qcow2kit::Format;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

/// One upload: its file name, the `disk_format` it was declared with, and the rules it must
/// be refused by (none: accepted).
struct Upload {
    name: &'static str,
    disk_format: &'static str,
    refused_by: &'static [&'static str],
}

const UPLOADS: [Upload; 7] = [
    Upload {
        name: "cirros.qcow2",
        disk_format: "qcow2",
        refused_by: &[],
    },
    Upload {
        name: "appliance.raw",
        disk_format: "raw",
        refused_by: &[],
    },
    Upload {
        name: "backing.qcow2",
        disk_format: "qcow2",
        refused_by: &["backing_file"],
    },
    Upload {
        name: "data-file.qcow2",
        disk_format: "qcow2",
        refused_by: &["data_file"],
    },
    Upload {
        name: "raw-as-qcow2.img",
        disk_format: "qcow2",
        refused_by: &["format_mismatch"],
    },
    Upload {
        name: "flat.vmdk",
        disk_format: "vmdk",
        refused_by: &["vmdk_subformat", "vmdk_extent"],
    },
    Upload {
        name: "polyglot.qcow2",
        disk_format: "qcow2",
        refused_by: &["format_mismatch", "polyglot"],
    },
];

/// A VMDK descriptor whose only extent is a host file the attacker wants to read.
const FLAT_VMDK: &str = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
createType=\"monolithicFlat\"\n\nRW 2048 FLAT \"/etc/shadow\" 0\n\n\
ddb.virtualHWVersion = \"4\"\nddb.adapterType = \"ide\"\n";

fn main() -> Res<()> {
    let dir = Scratch::new("glance-import")?;
    let staging = dir.path("staging");
    let store = dir.path("store");
    std::fs::create_dir(&staging)?;
    std::fs::create_dir(&store)?;
    make_uploads(&staging)?;

    let mut wrong = 0;
    for u in &UPLOADS {
        let path = staging.join(u.name);
        let declared = Format::from_name(u.disk_format).ok_or("unknown disk_format")?;
        let ins = inspect_path(&path)?;
        let violations = ins.check(&Policy::openstack().declared(declared));
        let rules: Vec<&str> = violations.iter().map(|v| v.rule()).collect();
        let verdict = if violations.is_empty() {
            let size = import(&path, declared, &store.join(u.name))?;
            format!("accepted, {size} bytes raw in the store")
        } else {
            let why: Vec<String> = violations.iter().map(ToString::to_string).collect();
            format!("refused: {}", why.join("; "))
        };
        println!(
            "{:<17} {:<6} detected {:<6} {verdict}",
            u.name,
            u.disk_format,
            ins.format().name()
        );
        if rules != u.refused_by {
            eprintln!("  expected {:?}, got {rules:?}", u.refused_by);
            wrong += 1;
        }
    }
    if wrong > 0 {
        return Err(format!("{wrong} uploads got an unexpected verdict").into());
    }
    Ok(())
}

/// Opens an accepted upload as its declared format, without any file it might name, converts
/// it to raw at `target` and checks the copy reads as the upload. Returns the copy's size.
fn import(upload: &Path, declared: Format, target: &Path) -> Res<u64> {
    let format = Format::openable(declared.name().as_bytes())?;
    let src = open(upload, format, &OpenOptions::default())?;
    convert(
        src.device.as_ref(),
        Target::NewFile(target),
        &ConvertOptions::default(),
    )?;
    let copy = open(target, Format::Raw, &OpenOptions::default())?;
    same_content(
        "upload vs. stored copy",
        src.device.as_ref(),
        copy.device.as_ref(),
    )?;
    Ok(std::fs::metadata(target)?.len())
}

/// Writes the uploads of [`UPLOADS`] into `dir`.
fn make_uploads(dir: &Path) -> Res<()> {
    make_guest_image(&dir.join("cirros.qcow2"))?;
    std::fs::write(dir.join("appliance.raw"), noise(1, 3 << 20))?;
    // CVE-2024-32498: an image whose backing file is a host file, read through the guest.
    let named = CreateOptions {
        size: Some(16 << 20),
        backing_file: Some("/etc/passwd".into()),
        backing_format: Some("raw".into()),
        ..CreateOptions::default()
    };
    create_qcow2(&dir.join("backing.qcow2"), &named)?;
    // The same through an external data file. Only the name is recorded: the data file given
    // to the library is in memory, so no host file is created or touched.
    let named = CreateOptions {
        data_file: Some("/etc/shadow".into()),
        ..CreateOptions::default()
    };
    let image: Arc<dyn Storage> = Arc::new(FileStorage::create(dir.join("data-file.qcow2"))?);
    create_qcow2_on(
        image,
        Some(Arc::new(MemoryStorage::new())),
        16 << 20,
        &named,
    )?;
    // Raw bytes declared as qcow2: a reader told "qcow2" would refuse it, one probing would not.
    std::fs::write(dir.join("raw-as-qcow2.img"), noise(2, 1 << 20))?;
    std::fs::write(dir.join("flat.vmdk"), FLAT_VMDK)?;
    // A valid qcow2 image with a fixed-VHD footer appended: a VHD reader sees another disk.
    std::fs::copy(dir.join("cirros.qcow2"), dir.join("polyglot.qcow2"))?;
    let mut footer = vec![0u8; 512];
    footer[..8].copy_from_slice(b"conectix");
    std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("polyglot.qcow2"))?
        .write_all(&footer)?;
    Ok(())
}
