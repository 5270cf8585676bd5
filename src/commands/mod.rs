//! One file per subcommand. Each `run` returns `anyhow::Result`; `main` turns an error into a
//! one-line cause chain and exit code 1 (2 for a subcommand that is not built yet).

pub mod bench;
pub mod bench_lora;
pub mod bench_ptmoe;
pub mod bench_text;
pub mod bench_tiler;
pub mod convert;
pub mod describe;
pub mod eval;
pub mod eval_demo;
pub mod generate;
pub mod inspect;
pub mod quantize;
pub mod tile;
pub mod train;
pub mod train_demo;
pub mod train_qat;

use std::path::{Path, PathBuf};

use afm_text::{DType, DeviceSpec, TextModel};
use anyhow::Context as _;

/// Options shared by every subcommand.
#[derive(Debug, Clone)]
pub struct Context {
    pub device: String,
    pub quiet: bool,
}

impl Context {
    pub fn device(&self) -> anyhow::Result<tch::Device> {
        let spec: DeviceSpec = self.device.parse()?;
        Ok(spec.resolve()?)
    }
}

/// Returned by subcommands whose implementation has not landed; `main` exits with code 2.
#[derive(Debug)]
pub struct NotBuilt(pub &'static str);

impl std::fmt::Display for NotBuilt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` is not built yet (see the open issues)", self.0)
    }
}

impl std::error::Error for NotBuilt {}

/// Where set-up puts the default text model, relative to the repository root.
pub const DEFAULT_MODEL_REL: &str = "assets/models/smollm2-135m-instruct";

/// The default text model directory: `$AFM_VL_MODEL`, else `assets/models/...` next to the
/// repository this binary was built in (found from the executable's path), else relative to
/// the working directory.
pub fn default_model_dir() -> PathBuf {
    find_default_dir("AFM_VL_MODEL", DEFAULT_MODEL_REL)
}

/// `$env`, else `rel` under the nearest ancestor of the executable that has `rel/config.json`,
/// else `rel` relative to the working directory.
pub fn find_default_dir(env: &str, rel: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            let cand = dir.join(rel);
            if cand.join("config.json").exists() {
                return cand;
            }
        }
    }
    PathBuf::from(rel)
}

/// How a command picks its text model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json). Default: the
    /// converted SmolLM2-135M-Instruct in assets/models/ (or $AFM_VL_MODEL).
    #[arg(long, value_name = "DIR", conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// A named preset with random weights instead of a checkpoint (see `inspect --list-presets`).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Inference dtype: auto (bf16 where the CPU/GPU does bf16 natively, else fp32), fp32, bf16, fp16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// KV-cache bits: 16 (the compute dtype) or 8 (int8 with a scale per head and token).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(8..=16))]
    pub kv_bits: u8,
}

impl ModelArgs {
    pub fn model_dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(default_model_dir)
    }

    pub fn load(&self, ctx: &Context) -> anyhow::Result<TextModel> {
        let device = ctx.device()?;
        let dtype = DType::parse(&self.dtype, device)?;
        afm_text::kv_cache::set_default_kv_bits(self.kv_bits)?;
        if let Some(p) = &self.preset {
            return Ok(TextModel::from_preset(p, 0, device, dtype)?);
        }
        let dir = self.model_dir();
        load_model_dir(&dir, device, dtype)
    }
}

/// Load a model directory with a hint when it is the missing default.
pub fn load_model_dir(dir: &Path, device: tch::Device, dtype: DType) -> anyhow::Result<TextModel> {
    let t0 = std::time::Instant::now();
    let m = TextModel::load(dir, device, dtype).with_context(|| {
        if dir.ends_with(DEFAULT_MODEL_REL) && !dir.exists() {
            format!(
                "loading the default model (run `make setup` to create {})",
                dir.display()
            )
        } else {
            format!("loading model {}", dir.display())
        }
    })?;
    // Packed layers decode with a rayon kernel; libtorch's OpenMP workers spin between ops and
    // starve it (measured 3 ms vs 26 ms for the 49152×576 head on 2 cores). Unless the user
    // chose a thread count, a quantized model on the CPU runs libtorch on one intra-op thread.
    let default_threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    if device == tch::Device::Cpu
        && m.decoder.lm_head.is_quantized()
        && tch::get_num_threads() == default_threads
        && std::env::var_os("OMP_NUM_THREADS").is_none()
    {
        tch::set_num_threads(1);
        tracing::info!(
            "quantized model: libtorch intra-op threads set to 1 (--threads to override)"
        );
    }
    tracing::info!(
        "loaded {} ({}, {:?}) in {:.2}s",
        dir.display(),
        dtype.name(),
        device,
        t0.elapsed().as_secs_f64()
    );
    Ok(m)
}
