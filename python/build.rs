//! Bake libtorch's folder (from torch-sys, i.e. the torch in the virtualenv) into the
//! extension's rpath. `afm_vl/__init__.py` imports torch first, so in practice the libraries
//! are already loaded; the rpath makes the module importable on its own too.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
        if os == "linux" || os == "macos" {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
}
