//! Every fuzz seed, and every crash a fuzzer found (kept as seeds in `fuzz/seeds/<target>/`),
//! replayed through its target's function, so that `cargo test` catches a regression without
//! cargo-fuzz. Each function asserts its own invariants (no panic, repair keeps guest data,
//! post-crash images sound, ...).

use std::fs;
use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    assert!(!entries.is_empty(), "no seeds in {}", dir.display());
    for path in &entries {
        let data = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let r = std::panic::catch_unwind(|| run(&data));
        assert!(r.is_ok(), "{target}: seed {} fails", path.display());
    }
    println!("{target}: {} seeds replayed", entries.len());
}

#[test]
fn open_read_seeds() {
    replay("open_read", qcow2kit::fuzzing::open_and_read);
}

#[test]
fn check_repair_seeds() {
    replay("check_repair", qcow2kit::fuzzing::check_repair);
}

#[test]
fn decompress_seeds() {
    replay("decompress", qcow2kit::fuzzing::decompress);
}

#[test]
fn inspect_seeds() {
    replay("inspect", qcow2kit::fuzzing::inspect);
}

#[test]
fn inspect_stream_seeds() {
    replay("inspect_stream", qcow2kit::fuzzing::inspect_stream);
}

#[test]
fn write_sequence_seeds() {
    replay("write_sequence", qcow2kit::fuzzing::write_sequence);
}

#[test]
fn write_damaged_seeds() {
    replay("write_damaged", qcow2kit::fuzzing::write_damaged);
}

#[test]
fn crash_reopen_seeds() {
    replay("crash_reopen", qcow2kit::fuzzing::crash_reopen);
}

#[test]
fn luks_header_seeds() {
    replay("luks_header", qcow2kit::crypto::fuzz::luks_header);
}

/// Every fuzz target has its seeds replayed here.
#[test]
fn every_target_is_replayed() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/fuzz_targets");
    let mut targets: Vec<String> = fs::read_dir(&root)
        .expect("reading fuzz/fuzz_targets")
        .map(|e| {
            let p = e.expect("directory entry").path();
            p.file_stem()
                .expect("file name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        [
            "check_repair",
            "crash_reopen",
            "decompress",
            "inspect",
            "inspect_stream",
            "luks_header",
            "open_read",
            "write_damaged",
            "write_sequence"
        ],
        "a fuzz target was added or renamed: replay its seeds in tests/fuzz_seeds.rs"
    );
}
