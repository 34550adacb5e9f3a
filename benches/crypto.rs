//! Sector-cipher throughput on 64 KiB runs (one default cluster): XTS-AES-256-plain64 (QEMU's
//! LUKS default) both ways, CBC-ESSIV and legacy qcow AES-CBC decryption, and LUKS unlock cost
//! per 1000 PBKDF2 iterations.
//!
//! Run: `cargo bench --bench crypto`. Groups: `sector_cipher/{xts_aes256_decrypt,
//! xts_aes256_encrypt,ecb_aes256_decrypt,cbc_essiv_aes256_decrypt,legacy_aes128_cbc_decrypt}`,
//! `pbkdf2/sha256_1000_iterations`.
//!
//! The `aes` crate picks AES-NI at run time when the CPU has it; the figures tell which path
//! ran (AES-NI XTS runs at several GB/s per core, the portable path at a few hundred MB/s).

use criterion::{black_box, Criterion, Throughput};
use qcow2kit::crypto::{CipherAlg, CipherMode, CipherSpec, HashAlg, IvGenAlg, SectorCipher};
use std::time::Duration;

const RUN: usize = 64 << 10;

fn cipher(alg: CipherAlg, mode: CipherMode, ivgen: IvGenAlg) -> SectorCipher {
    let spec = CipherSpec {
        alg,
        mode,
        ivgen,
        ivgen_hash: Some(HashAlg::Sha256),
    };
    let key: Vec<u8> = (0..spec.key_len()).map(|i| (i * 37 + 11) as u8).collect();
    SectorCipher::new(&spec, &key).expect("a valid cipher")
}

fn sector_ciphers(c: &mut Criterion) {
    let mut g = c.benchmark_group("sector_cipher");
    g.warm_up_time(Duration::from_millis(700))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
        .throughput(Throughput::Bytes(RUN as u64));
    let mut buf = vec![0x5au8; RUN];
    // A host offset of 1 GiB: sector numbers past 32 bits.
    let first = (1u64 << 30) / 512;
    let xts = cipher(CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64);
    g.bench_function("xts_aes256_decrypt", |b| {
        b.iter(|| xts.decrypt(black_box(first), black_box(&mut buf)))
    });
    g.bench_function("xts_aes256_encrypt", |b| {
        b.iter(|| xts.encrypt(black_box(first), black_box(&mut buf)))
    });
    // The block cipher alone (no IVs): the ceiling the modes above work under.
    let ecb = cipher(CipherAlg::Aes256, CipherMode::Ecb, IvGenAlg::Plain64);
    g.bench_function("ecb_aes256_decrypt", |b| {
        b.iter(|| ecb.decrypt(black_box(first), black_box(&mut buf)))
    });
    let essiv = cipher(CipherAlg::Aes256, CipherMode::Cbc, IvGenAlg::Essiv);
    g.bench_function("cbc_essiv_aes256_decrypt", |b| {
        b.iter(|| essiv.decrypt(black_box(first), black_box(&mut buf)))
    });
    let legacy = SectorCipher::legacy_qcow(b"passphrase");
    g.bench_function("legacy_aes128_cbc_decrypt", |b| {
        b.iter(|| legacy.decrypt(black_box(first), black_box(&mut buf)))
    });
    g.finish();
}

fn pbkdf2(c: &mut Criterion) {
    let mut g = c.benchmark_group("pbkdf2");
    g.warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    let mut out = [0u8; 64];
    g.bench_function("sha256_1000_iterations", |b| {
        b.iter(|| qcow2kit::crypto::pbkdf::pbkdf2(HashAlg::Sha256, b"pw", &[7; 32], 1000, &mut out))
    });
    g.finish();
}

fn main() {
    // What criterion_main! does, without its undocumented `pub fn`.
    let mut c = Criterion::default().configure_from_args();
    sector_ciphers(&mut c);
    pbkdf2(&mut c);
    c.final_summary();
}
