//! Shared helpers of the eval tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The real benchmark data (`../shared/bench`, or `AFM_BENCH_DIR`); `None` when absent.
pub fn bench() -> Option<PathBuf> {
    let dir = std::env::var_os("AFM_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench"));
    if dir.join("mmlu/test").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "skipped: no benchmark data at {} (set AFM_BENCH_DIR)",
            dir.display()
        );
        None
    }
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}
