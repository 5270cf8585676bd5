//! One file per subcommand. Each `run` returns `anyhow::Result`; `main` turns an error into a
//! one-line cause chain and exit code 1 (2 for a subcommand that is not built yet).

#[macro_use]
pub mod output;

pub mod bench;
pub mod bench_kernels;
pub mod bench_llama;
pub mod bench_lora;
pub mod bench_ptmoe;
pub mod bench_smolvlm;
pub mod bench_text;
pub mod bench_tiler;
pub mod convert;
pub mod describe;
pub mod eval;
pub mod eval_demo;
pub mod generate;
pub mod inspect;
pub mod progress;
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
    /// Parse `--device`, and for an explicit GPU check that it exists.
    pub fn check_device(&self) -> anyhow::Result<()> {
        let spec: DeviceSpec = self.device.parse()?;
        if !matches!(spec, DeviceSpec::Auto | DeviceSpec::Cpu) {
            spec.resolve()?;
        }
        Ok(())
    }

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

/// The default text model directory (see [`find_default_dir`]).
pub fn default_model_dir() -> anyhow::Result<PathBuf> {
    find_default_dir("AFM_VL_MODEL", DEFAULT_MODEL_REL, "--model", "text model")
}

/// The directory a `--model`-style flag names, else the default text model.
pub fn model_or_default(flag: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match flag {
        Some(p) => Ok(p.clone()),
        None => default_model_dir(),
    }
}

/// The data directory: `$XDG_DATA_HOME/afm-vl`, else `~/.local/share/afm-vl`.
pub fn data_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("afm-vl"));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".local/share/afm-vl"))
}

/// Where a command finds a model it was not given, the same rule for every command (the flag
/// itself is handled by the caller):
/// 1. `$env`, when set (used as is, so a wrong value gives an error naming it);
/// 2. `rel` (e.g. `assets/models/smollm2-135m-instruct`) under the nearest ancestor of the
///    executable that has `rel/config.json` (a build inside the checkout finds its assets);
/// 3. `DATA/rel` with DATA the data directory ([`data_dir`]), when it has a config.json.
///
/// The working directory is never searched. When nothing is found the error names every place
/// looked at and how to fix it.
pub fn find_default_dir(env: &str, rel: &str, flag: &str, what: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut looked = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            let cand = dir.join(rel);
            if cand.join("config.json").is_file() {
                return Ok(cand);
            }
        }
        if let Some(d) = exe.parent() {
            looked.push(format!("{} and its parents", d.join(rel).display()));
        }
    }
    if let Some(data) = data_dir() {
        let cand = data.join(rel);
        if cand.join("config.json").is_file() {
            return Ok(cand);
        }
        looked.push(cand.display().to_string());
    }
    anyhow::bail!(
        "no {what} found: pass {flag} DIR, set ${env}, or run `make setup` in the checkout \
         (looked in {})",
        looked.join(", ")
    )
}

/// How a command picks its text model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json). Default: $AFM_VL_MODEL,
    /// else the converted SmolLM2-135M-Instruct in the checkout's assets/models/, else in the
    /// data directory (README, "Default paths").
    #[arg(long, value_name = "DIR", conflicts_with = "preset")]
    pub model: Option<PathBuf>,
    /// A named preset with random weights instead of a checkpoint (see `inspect --list-presets`).
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// Inference dtype: auto, fp32, bf16, fp16. auto: fp32 on a CPU (the fused decode step
    /// reads fp32 weights and quantized blocks; bf16 decodes through libtorch, slower) and bf16
    /// on a GPU; a PT-MoE model: bf16 on a GPU and where the CPU's bf16 matrix products
    /// measure faster than fp32 ones, else fp32.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// KV-cache bits: 16 (the compute dtype) or 8 (int8 with a scale per head and token).
    #[arg(long, default_value_t = 16, value_parser = parse_kv_bits)]
    pub kv_bits: u8,
}

impl ModelArgs {
    pub fn model_dir(&self) -> anyhow::Result<PathBuf> {
        model_or_default(&self.model)
    }

    /// The server model (PT-MoE) when `--preset` is a PT-MoE preset or the model directory
    /// holds one (ours or a tamm folder); `None` for every other model.
    pub fn load_ptmoe(
        &self,
        ctx: &Context,
    ) -> anyhow::Result<Option<afm_text::ptmoe_model::PtMoeModel>> {
        use afm_text::ptmoe_model::{is_ptmoe_dir, PtMoeModel};
        let device = ctx.device()?;
        let dtype = DType::parse(&self.dtype, device)?;
        if let Some(p) = &self.preset {
            if !afm_text::ptmoe_config::is_ptmoe_preset(p) {
                return Ok(None);
            }
            return Ok(Some(PtMoeModel::from_preset(p, 0, device, dtype)?));
        }
        let dir = self.model_dir()?;
        if !is_ptmoe_dir(&dir) {
            return Ok(None);
        }
        afm_text::kv_cache::set_default_kv_bits(self.kv_bits)?;
        let t0 = std::time::Instant::now();
        let m = PtMoeModel::load(&dir, device, dtype)
            .with_context(|| format!("loading {}", dir.display()))?;
        tracing::info!(
            "loaded the PT-MoE model {} in {:.2}s",
            dir.display(),
            t0.elapsed().as_secs_f64()
        );
        Ok(Some(m))
    }

    pub fn load(&self, ctx: &Context) -> anyhow::Result<TextModel> {
        let device = ctx.device()?;
        let dtype = DType::parse_decode(&self.dtype, device)?;
        afm_text::kv_cache::set_default_kv_bits(self.kv_bits)?;
        if let Some(p) = &self.preset {
            return Ok(TextModel::from_preset(p, 0, device, dtype)?);
        }
        let dir = self.model_dir()?;
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
    // chose a thread count, a quantized model on the CPU runs libtorch on one intra-op thread —
    // unless its decode steps take the fused CPU path, where libtorch runs only the prefill
    // (which wants every core) and the step runs on its own pool.
    let default_threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as i32;
    if device == tch::Device::Cpu
        && m.decoder.lm_head.is_quantized()
        && !m.decoder.fused_decode_possible()
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

/// `--threads N`: 1 to 4 × the cores (more threads than that only thrash, and libtorch crashes
/// on absurd counts).
pub fn parse_threads(s: &str) -> Result<usize, String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let max = 4 * cores;
    match s.trim().parse::<i64>() {
        Ok(n) if (1..=max as i64).contains(&n) => Ok(n as usize),
        Ok(n) => Err(format!(
            "{n} threads: the value must be between 1 and {max} (4 × the {cores} cores)"
        )),
        Err(_) => Err(format!("'{s}' is not a whole number")),
    }
}

/// A clap usage error as one line: its first line (without `error: `), a negative number
/// explained as such, no `-- -1` tip, no usage block.
pub fn one_line_clap_error(rendered: &str) -> String {
    let first = rendered.lines().next().unwrap_or("").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    // `invalid value '-3' for '--max-tokens <N>': invalid digit found in string`
    let msg = if first.contains("invalid digit found in string") && first.contains("'-") {
        first.replace("invalid digit found in string", "the value must be ≥ 0")
    } else {
        first.to_string()
    };
    format!("error: {msg} (see --help)")
}

/// The one-line form of an error: its cause chain joined by ": ", without a cause whose text
/// the line already ends with (`path: Permission denied (os error 13)` is not followed by
/// `Permission denied (os error 13)` again).
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.trim();
        if text.is_empty() || line.ends_with(text) || line.contains(&format!("{text}: ")) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(text);
    }
    line.replace('\n', " ")
}

/// `--kv-bits`: 8 or 16, nothing between.
pub fn parse_kv_bits(s: &str) -> Result<u8, String> {
    match s.trim() {
        "8" => Ok(8),
        "16" => Ok(16),
        other => Err(format!("'{other}': the KV cache is 8 or 16 bits")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_line_drops_a_cause_the_line_already_ends_with() {
        let io = std::io::Error::from_raw_os_error(13);
        let e = anyhow::Error::new(afm_text::TextError::io("/m/config.json", io))
            .context("loading model /m");
        let line = error_line(&e);
        assert_eq!(
            line,
            "loading model /m: /m/config.json: Permission denied (os error 13)"
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_line(&e), "outer: inner");
    }

    #[test]
    fn clap_errors_become_one_line() {
        let rendered = "error: invalid value '-3' for '--max-tokens <N>': invalid digit found in string\n\nFor more information, try '--help'.\n";
        assert_eq!(
            one_line_clap_error(rendered),
            "error: invalid value '-3' for '--max-tokens <N>': the value must be ≥ 0 (see --help)"
        );
    }
}
