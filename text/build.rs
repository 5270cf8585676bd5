//! afm-text's build script: the shared rpath (`../build.rs`) and the CUDA-stream shim
//! (`src/runtime/cuda_stream.cpp`), compiled against the headers of the libtorch that torch-sys found.
#[path = "../build.rs"]
#[allow(dead_code)]
mod shared;

fn main() {
    shared::emit_rpath();
    println!("cargo:rerun-if-changed=src/runtime/cuda_stream.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("torch-sys did not report libtorch's folder (DEP_TCH_LIBTORCH_LIB)");
    };
    let lib = std::path::PathBuf::from(lib);
    let include = lib
        .parent()
        .map(|p| p.join("include"))
        .filter(|p| p.join("c10").is_dir())
        .unwrap_or_else(|| panic!("no libtorch headers (include/c10) beside {}", lib.display()));
    // PyTorch wheels since 2.7 use the C++11 ABI; torch-sys honours the same variable.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .file("src/runtime/cuda_stream.cpp")
        .include(&include)
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .warnings(false)
        .compile("afm_cuda_stream");
}
