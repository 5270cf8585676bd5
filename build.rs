//! Shared build script: every crate that links libtorch uses it (`build = "../build.rs"`;
//! afm-text's own `build.rs` calls [`emit_rpath`] too).
//!
//! torch-sys exports the folder holding libtorch's shared libraries as `DEP_TCH_LIBTORCH_LIB`
//! to its direct dependents. We bake it into the binaries' rpath so that `afm-vl` and the
//! test binaries run without `LD_LIBRARY_PATH`, and pass it to the crates as
//! `AFM_LIBTORCH_LIB` (where `afm_text::device` finds libtorch's CUDA backend to load).
pub fn emit_rpath() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
        if os == "linux" || os == "macos" {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
        println!("cargo:rustc-env=AFM_LIBTORCH_LIB={dir}");
    }
}

#[allow(dead_code)]
fn main() {
    emit_rpath();
}
