//! Issue 19, acceptance 6: a 3B-shaped fp32 `.pt` (tamm's default AFMTextV7, 12.4 GB, written by
//! torch.save) loads with peak resident memory below 1.2× its size: the checkpoint is memory
//! mapped and each tensor's pages are released once it is copied out, so it is resident once
//! (and a bf16 load of it peaks below 0.7× the file: tensors are converted as they are read).
//! Alone in its test binary (so nothing else runs beside it); it needs ~13 GB of memory and
//! ~13 GB of disk for the file.

mod common;

use afm_text::{DType, Logits, TextModel};
use common::*;
use tch::Device;

/// The process's peak resident set (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[cfg(target_os = "linux")]
#[test]
fn three_b_fp32_checkpoint_loads_with_peak_memory_below_1_2x_its_size() {
    let py = venv_python_with("tamm").expect("tamm is a pinned test requirement (make setup)");
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(py)
        .arg(repo_root().join("text/tests/reference/tamm_cases.py"))
        .arg("big")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "tamm_cases.py big failed");
    let size = std::fs::metadata(dir.path().join("base-model.pt"))
        .unwrap()
        .len();
    assert!(size > 12_000_000_000, "{size} bytes is not the 3B model");
    let before = peak_rss();
    // bf16 first (its peak is the lower one): each tensor is converted as it is read.
    let m16 = TextModel::load(dir.path(), Device::Cpu, DType::BF16).unwrap();
    let peak16 = peak_rss();
    assert_eq!(m16.decoder.param_breakdown().total(), 3_111_368_064);
    drop(m16);
    let m = TextModel::load(dir.path(), Device::Cpu, DType::F32).unwrap();
    let after = peak_rss();
    assert_eq!(m.decoder.param_breakdown().total(), 3_111_368_064);
    // It runs: one token through all 56 layers.
    let _g = tch::no_grad_guard();
    let mut c = m.decoder.new_cache(1);
    let out = m
        .decoder
        .forward(&ids(&[1, 2, 3]), None, &mut c, Logits::Last)
        .unwrap();
    assert_eq!(out.size(), [1, 1, 153_600]);
    let ratio = after as f64 / size as f64;
    eprintln!(
        "3B fp32 .pt of {:.2} GB: peak resident {:.2} GB after loading ({:.2} GB before), {ratio:.3}× the file",
        size as f64 / 1e9,
        after as f64 / 1e9,
        before as f64 / 1e9
    );
    eprintln!(
        "the same loaded as bf16: peak resident {:.2} GB ({:.3}× the file)",
        peak16 as f64 / 1e9,
        peak16 as f64 / size as f64
    );
    assert!(peak16 as f64 / (size as f64) < 0.7, "bf16 peak {peak16}");
    assert!(
        ratio < 1.2,
        "peak resident memory {ratio:.3}× the file size"
    );
}
