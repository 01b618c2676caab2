//! The ceiling the cipher puts on one core: how fast the AEAD that rustls's aws-lc-rs
//! provider uses seals and opens full TLS records (16 KiB of plaintext), for each
//! TLS 1.3 suite. A tunnel's bytes are sealed by one agent and opened by the other,
//! each on one core, so one stream can go no faster than the slower of the two.
//!
//! Run with `cargo bench -p weft-agent --bench cipher`; `cargo xtask bench` runs it
//! and keeps its output. Prints the CPU's AES and carry-less multiply instructions
//! (which aws-lc uses when present), then one line per suite:
//! `<suite> seal <Gbit/s> open <Gbit/s>`.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use aws_lc_rs::aead::{
    AES_128_GCM, AES_256_GCM, Aad, Algorithm, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey,
};

/// The largest TLS record's plaintext.
const RECORD: usize = 16 * 1024;
const MEASURE: Duration = Duration::from_millis(500);

fn main() {
    let flags = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|line| line.starts_with("flags"))
        .map(|line| {
            line.split_whitespace()
                .filter(|flag| {
                    ["aes", "pclmulqdq", "vaes", "vpclmulqdq", "avx2", "avx512f"].contains(flag)
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    println!("# AES-GCM instructions of this CPU: {flags}");
    println!("# suite, one core, 16 KiB records: seal Gbit/s, open Gbit/s");
    for (suite, algorithm) in [
        ("TLS_AES_128_GCM_SHA256", &AES_128_GCM),
        ("TLS_AES_256_GCM_SHA384", &AES_256_GCM),
        ("TLS_CHACHA20_POLY1305_SHA256", &CHACHA20_POLY1305),
    ] {
        let (seal, open) = throughput(algorithm);
        println!("{suite} seal {seal:.1} open {open:.1}");
    }
}

/// Gbit/s of plaintext sealed, then opened, by one core.
fn throughput(algorithm: &'static Algorithm) -> (f64, f64) {
    let key_bytes = vec![7u8; algorithm.key_len()];
    let key = LessSafeKey::new(UnboundKey::new(algorithm, &key_bytes).unwrap());
    let nonce = |sequence: u64| {
        let mut bytes = [0u8; 12];
        bytes[4..].copy_from_slice(&sequence.to_be_bytes());
        Nonce::assume_unique_for_key(bytes)
    };
    let header = [23u8, 3, 3, 0x40, 0x11];
    let mut record = vec![0x5au8; RECORD];
    let seal = rate(|sequence| {
        let tag = key
            .seal_in_place_separate_tag(nonce(sequence), Aad::from(header), &mut record)
            .unwrap();
        let _ = black_box(tag);
    });
    let mut sealed = vec![0x5au8; RECORD];
    let tag = key
        .seal_in_place_separate_tag(nonce(0), Aad::from(header), &mut sealed)
        .unwrap();
    sealed.extend_from_slice(tag.as_ref());
    let mut opening = sealed.clone();
    let open = rate(|_| {
        opening.copy_from_slice(&sealed);
        let plain = key
            .open_in_place(nonce(0), Aad::from(header), &mut opening)
            .unwrap();
        let _ = black_box(plain);
    });
    (seal, open)
}

/// Gbit/s of 16 KiB records `once` handles, over [`MEASURE`] after a warm-up.
fn rate(mut once: impl FnMut(u64)) -> f64 {
    for sequence in 0..1000 {
        once(sequence);
    }
    let started = Instant::now();
    let mut records = 0u64;
    while started.elapsed() < MEASURE {
        for _ in 0..64 {
            once(records);
            records += 1;
        }
    }
    (records * RECORD as u64 * 8) as f64 / started.elapsed().as_secs_f64() / 1e9
}
