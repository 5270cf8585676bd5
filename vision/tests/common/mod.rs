//! Helpers shared by the integration tests: the project's Python (for references) and images.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use image::{Rgb, RgbImage};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vision/ has a parent")
        .to_path_buf()
}

/// `<repo>/.venv/bin/python` if it exists and can import every module in `modules`;
/// otherwise prints why the reference check is skipped and returns `None`.
pub fn python_with(modules: &[&str]) -> Option<PathBuf> {
    let py = repo_root().join(".venv/bin/python");
    if !py.exists() {
        eprintln!(
            "SKIP: {} not found (run `make venv`); reference check skipped",
            py.display()
        );
        return None;
    }
    let check = format!("import {}", modules.join(", "));
    match Command::new(&py).args(["-c", &check]).output() {
        Ok(o) if o.status.success() => Some(py),
        Ok(o) => {
            eprintln!(
                "SKIP: the venv cannot `{check}`: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            None
        }
        Err(e) => {
            eprintln!("SKIP: cannot run {}: {e}", py.display());
            None
        }
    }
}

/// Runs an inline Python script with arguments; panics with its stderr on failure; returns stdout.
pub fn run_python(py: &Path, script: &str, args: &[&str]) -> String {
    let out = Command::new(py)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("spawn python");
    assert!(
        out.status.success(),
        "python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A content-rich test image: gradients, stripes, a disc and high-frequency texture.
pub fn content_image(w: u32, h: u32, seed: u32) -> RgbImage {
    let (cx, cy) = (w as f32 * 0.6, h as f32 * 0.4);
    let rad = (w.min(h) as f32) * 0.25;
    RgbImage::from_fn(w, h, |x, y| {
        let (xf, yf) = (x as f32, y as f32);
        let in_disc = (xf - cx).powi(2) + (yf - cy).powi(2) < rad * rad;
        let stripe = ((x / 9 + y / 13 + seed) % 2) as f32 * 50.0;
        let noise = ((x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503) ^ seed) >> 7) % 40;
        let r = 255.0 * xf / w as f32;
        let g = 255.0 * yf / h as f32;
        let b = if in_disc {
            230.0
        } else {
            stripe + noise as f32
        };
        Rgb([r as u8, g as u8, b.min(255.0) as u8])
    })
}
