//! Shared build script: every crate that links libtorch uses it (`build = "../build.rs"`;
//! afm-text's own `build.rs` calls [`emit_rpath`] too).
//!
//! torch-sys exports the folder holding libtorch's shared libraries as `DEP_TCH_LIBTORCH_LIB`
//! to its direct dependents. We bake it into the binaries' runpath *relative to the binary*
//! (`$ORIGIN/../../.venv/lib/python3.X/site-packages/torch/lib` for `target/release/afm-vl`,
//! one `..` more for test binaries in `target/release/deps/`), so that `afm-vl` and the test
//! binaries run without `LD_LIBRARY_PATH` and keep working when the checkout (target folder and
//! virtualenv together) is moved. The folder is also passed to the crates as
//! `AFM_LIBTORCH_LIB`.
use std::path::{Component, Path, PathBuf};

/// `to` relative to `from` (both absolute), e.g. `../../.venv/lib/...`.
fn relative(from: &Path, to: &Path) -> Option<PathBuf> {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return None;
    }
    let mut rel = PathBuf::new();
    for _ in common..from.len() {
        rel.push("..");
    }
    for c in &to[common..] {
        rel.push(c.as_os_str());
    }
    Some(rel)
}

pub fn emit_rpath() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-env=AFM_LIBTORCH_LIB={dir}");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let origin = match os.as_str() {
        "linux" => "$ORIGIN",
        "macos" => "@loader_path",
        _ => return,
    };
    let lib = Path::new(&dir)
        .canonicalize()
        .unwrap_or_else(|_| PathBuf::from(&dir));
    // OUT_DIR = <target>/<profile>/build/<package>-<hash>/out: binaries land in <profile>,
    // tests and benches in <profile>/deps, examples in <profile>/examples.
    let profile = std::env::var("OUT_DIR").ok().and_then(|o| {
        let o = PathBuf::from(o);
        let p = o.ancestors().nth(3)?.to_path_buf();
        Some(p.canonicalize().unwrap_or(p))
    });
    let mut rels: Vec<PathBuf> = match &profile {
        Some(p) => [p.clone(), p.join("deps"), p.join("examples")]
            .iter()
            .filter_map(|from| relative(from, &lib))
            .collect(),
        None => Vec::new(),
    };
    rels.dedup();
    if rels.is_empty() {
        // Different roots (no common prefix): only an absolute path can work.
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
        return;
    }
    for rel in rels {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{origin}/{}", rel.display());
    }
}

#[allow(dead_code)]
fn main() {
    emit_rpath();
}
