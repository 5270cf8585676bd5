//! A text model as users see it: a checkpoint directory (config.json, safetensors,
//! tokenizer.json) or a preset with random weights, on a device in a dtype.

use std::path::{Path, PathBuf};

use tch::{Device, Kind};

use crate::checkpoint::load_weights;
use crate::config::TextConfig;
use crate::decoder::Decoder;
use crate::error::{Result, TextError};
use crate::generation::{generate, GenerateOptions, Generation};
use crate::presets::preset;
use crate::tokenizer::Tokenizer;

/// Inference dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub fn kind(self) -> Kind {
        match self {
            DType::F32 => Kind::Float,
            DType::BF16 => Kind::BFloat16,
            DType::F16 => Kind::Half,
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            _ => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "fp32",
            DType::BF16 => "bf16",
            DType::F16 => "fp16",
        }
    }

    /// bf16 on GPUs and on CPUs where bf16 matrix products are faster than fp32 ones (native
    /// bf16 arithmetic, AVX512-BF16 / AMX, and measured: [`cpu_bf16_matmul_is_faster`]), else
    /// fp32.
    pub fn auto(device: Device) -> Self {
        match device {
            Device::Cpu => {
                if cpu_bf16_matmul_is_faster() {
                    DType::BF16
                } else {
                    DType::F32
                }
            }
            _ => DType::BF16,
        }
    }

    /// The default for generating with the on-device decoder: bf16 on GPUs; fp32 on every CPU.
    /// A CPU decode step is bound by the bytes it reads, and the fused step
    /// (`runtime/cpu_decode.rs`) reads fp32, GGUF blocks and our packed codes; a bf16 model
    /// decodes through libtorch instead (2.4× slower on an AVX512-BF16 CPU: 36 vs 87 tok/s for
    /// the default model). [`DType::auto`] stays the default where matrix products dominate
    /// (scoring, vision encoders, the PT-MoE model).
    pub fn auto_decode(device: Device) -> Self {
        match device {
            Device::Cpu => DType::F32,
            _ => DType::BF16,
        }
    }

    /// [`DType::parse`] with `auto` meaning [`DType::auto_decode`].
    pub fn parse_decode(s: &str, device: Device) -> Result<Self> {
        if s.eq_ignore_ascii_case("auto") {
            Ok(Self::auto_decode(device))
        } else {
            Self::parse(s, device)
        }
    }

    /// `auto`, `fp32`/`f32`, `bf16`, `fp16`/`f16`.
    pub fn parse(s: &str, device: Device) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" => Self::auto(device),
            "fp32" | "f32" | "float32" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "fp16" | "f16" | "float16" => DType::F16,
            other => {
                return Err(TextError::InvalidArgument(format!(
                    "unknown dtype '{other}' (expected auto, fp32, bf16 or fp16)"
                )))
            }
        })
    }
}

/// Whether this CPU does bf16 arithmetic natively.
pub fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // Read once: `auto` asks for every model it loads (and SmolVLM's twice).
        static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAVE.get_or_init(|| {
            std::fs::read_to_string("/proc/cpuinfo")
                .map(|s| s.contains("avx512_bf16") || s.contains("amx_bf16"))
                .unwrap_or(false)
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        // Apple silicon and recent Arm cores have BF16 instructions.
        cfg!(target_arch = "aarch64")
    }
}

/// Whether a bf16 matrix product beats an fp32 one on this CPU, measured once per process
/// (a `[512, 768] × [768, 768]` product, best of 3 after a warm-up, on libtorch's threads).
/// Native bf16 is not enough: on a Zen 4 EPYC bf16 products ran 2.7× fp32's, on an AVX512-BF16
/// Xeon without AMX an earlier session measured them at 0.7×. `false` without native bf16.
pub fn cpu_bf16_matmul_is_faster() -> bool {
    static FASTER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FASTER.get_or_init(|| {
        if !cpu_has_bf16() {
            return false;
        }
        let _g = tch::no_grad_guard();
        let best = |kind: Kind| -> Option<f64> {
            let a = tch::Tensor::f_randn([512, 768], (kind, Device::Cpu)).ok()?;
            let b = tch::Tensor::f_randn([768, 768], (kind, Device::Cpu)).ok()?;
            let _ = a.f_matmul(&b).ok()?;
            (0..3)
                .map(|_| {
                    let t0 = std::time::Instant::now();
                    let _ = a.f_matmul(&b).ok()?;
                    Some(t0.elapsed().as_secs_f64())
                })
                .try_fold(f64::INFINITY, |m, t| t.map(|t| m.min(t)))
        };
        match (best(Kind::BFloat16), best(Kind::Float)) {
            (Some(b), Some(f)) => {
                tracing::debug!("bf16 matmul {:.2} ms, fp32 {:.2} ms", b * 1e3, f * 1e3);
                b < 0.8 * f
            }
            _ => false,
        }
    })
}

pub struct TextModel {
    pub decoder: Decoder,
    pub tokenizer: Option<Tokenizer>,
    pub dtype: DType,
    pub source: PathBuf,
    /// The tamm geometry of a model loaded from a tamm folder (its adapters' names need it).
    pub tamm: Option<crate::tamm::TammConfig>,
}

impl TextModel {
    /// The decoder configuration of a model directory, without loading weights: `config.json`,
    /// or a tamm directory's config translated.
    pub fn dir_config(dir: &Path) -> Result<TextConfig> {
        match crate::tamm::tamm_files(dir) {
            Some((tcfg, _)) => Ok(crate::tamm::read_config(&tcfg)?.1),
            None => TextConfig::from_file(&dir.join("config.json")),
        }
    }

    /// The adapter toolkit's draft model in `dir` (`draft-model-config.json` +
    /// `draft-model.pt`), with the folder's tokenizer when it has one (for speculative decoding).
    pub fn load_tamm_draft(dir: &Path, device: Device, dtype: DType) -> Result<Self> {
        let (cfg_path, pt) = crate::tamm::draft_files(dir).ok_or_else(|| {
            TextError::checkpoint(dir, "no draft-model-config.json in this folder")
        })?;
        let (t, cfg) = crate::tamm::read_config(&cfg_path)?;
        let (weights, adapter) = crate::tamm::load_weights(&pt, &t, device, dtype.kind())?;
        let mut decoder = Decoder::new(&cfg, &weights)?;
        if let Some(a) = adapter {
            a.activate(&mut decoder)?;
        }
        Ok(Self {
            decoder,
            tokenizer: None,
            dtype,
            source: pt,
            tamm: Some(t),
        })
    }

    pub fn load(dir: &Path, device: Device, dtype: DType) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        if !dir.is_dir() {
            return Err(TextError::checkpoint(
                dir,
                "model directory not found (expected config.json, model.safetensors, tokenizer.json)",
            ));
        }
        // A tamm model directory (the adapter toolkit's `assets/`): translated at load time.
        let tamm = crate::tamm::tamm_files(dir);
        let (cfg, weights, tamm_cfg, embedded) = match &tamm {
            Some((tcfg, tpt)) => {
                let (t, cfg) = crate::tamm::read_config(tcfg)?;
                let (w, adapter) = crate::tamm::load_weights(tpt, &t, device, dtype.kind())?;
                (cfg, w, Some(t), adapter)
            }
            None => (
                TextConfig::from_file(&cfg_path)?,
                load_weights(dir, device, dtype.kind())?,
                None,
                None,
            ),
        };
        let mut decoder = Decoder::new(&cfg, &weights).map_err(|e| match e {
            // Name the directory for shape/missing-tensor errors from a map of several files.
            TextError::Checkpoint { path, msg } if path.as_os_str() == "<weights>" => {
                TextError::Checkpoint {
                    path: dir.to_path_buf(),
                    msg,
                }
            }
            e => e,
        })?;
        // A base checkpoint saved with a trained adapter runs with it, as in tamm.
        if let Some(a) = embedded {
            tracing::info!(
                "{}: the checkpoint's adapter '{}' is active",
                dir.display(),
                a.name
            );
            a.activate(&mut decoder)?;
        }
        let tokenizer = dir_tokenizer(dir, tamm.is_some(), cfg.vocab_size)?;
        if let Some(t) = tokenizer.as_ref().filter(|t| t.is_afm()) {
            // Generation stops at EOS and at the end of the assistant's turn.
            decoder.cfg.eos_token_id = Some(crate::config::TokenIds::Many(t.stop_ids()));
        }
        Ok(Self {
            decoder,
            tokenizer,
            dtype,
            source: dir.to_path_buf(),
            tamm: tamm_cfg,
        })
    }

    /// Load a LoRA adapter for this model: a PEFT directory (`adapter_config.json` +
    /// `adapter_model.safetensors`), or, for a tamm model, the adapter toolkit's checkpoint (a
    /// `.pt` of tamm adapter tensors, or a folder holding `adapter.pt`). Not activated.
    pub fn load_adapter(&self, path: &Path) -> Result<crate::lora::LoraAdapter> {
        let tamm_file = crate::tamm_adapter::toolkit_adapter_file(path);
        let device = self.decoder.device();
        match (tamm_file, &self.tamm) {
            (Some(f), Some(t)) => {
                crate::tamm_adapter::load_adapter(&f, t, device, self.dtype.kind())
            }
            (Some(f), None) => Err(TextError::checkpoint(
                &f,
                "a tamm adapter checkpoint needs a tamm base model (the toolkit's assets/ folder)",
            )),
            (None, _) => crate::lora::LoraAdapter::load(path, device, self.dtype.kind()),
        }
    }

    /// A preset with seeded random weights (no tokenizer).
    pub fn from_preset(name: &str, seed: i64, device: Device, dtype: DType) -> Result<Self> {
        let cfg = preset(name)?;
        Ok(Self {
            decoder: Decoder::random(&cfg, seed, device, dtype.kind())?,
            tokenizer: None,
            dtype,
            source: PathBuf::from(format!("preset:{name}")),
            tamm: None,
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.decoder.cfg
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            TextError::InvalidArgument(format!("{} has no tokenizer.json", self.source.display()))
        })
    }

    /// The prompt's token ids: through the chat template (one user turn) unless `raw`.
    pub fn prompt_ids(&self, prompt: &str, raw: bool) -> Result<Vec<u32>> {
        self.tokenizer()?.prompt_ids(prompt, raw)
    }

    /// Generate from a text prompt, streaming text pieces to `on_text`.
    pub fn generate_text(
        &self,
        prompt: &str,
        raw: bool,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let ids = self.prompt_ids(prompt, raw)?;
        generate(&self.decoder, self.tokenizer.as_ref(), &ids, opts, on_text)
    }
}

/// The tokenizer of any model directory (ours, a tamm folder of either model): as
/// [`dir_tokenizer`], an error naming the directory when it has none.
pub fn model_dir_tokenizer(dir: &Path) -> Result<Tokenizer> {
    let tamm = crate::tamm::tamm_files(dir).is_some()
        || crate::tamm_ptmoe::tamm_ptmoe_files(dir).is_some();
    dir_tokenizer(dir, tamm, usize::MAX)?.ok_or_else(|| {
        TextError::checkpoint(
            dir,
            "no tokenizer (tokenizer.json, or tamm's tokenizer.model + tokenizer-config.json)",
        )
    })
}

/// The tokenizer of a model directory: tamm's AFM tokenizer (a tamm folder's
/// `tokenizer.model` + `tokenizer-config.json`, or those `convert tamm` copied: recognised by
/// tamm's hyphenated `tokenizer-config.json` and no tokenizer.json), else `tokenizer.json`,
/// else none. An AFM tokenizer larger than the model's vocabulary is an error.
pub fn dir_tokenizer(dir: &Path, tamm_folder: bool, vocab: usize) -> Result<Option<Tokenizer>> {
    let model = dir.join(crate::tamm::TOKENIZER_MODEL);
    let config = dir.join(crate::tamm::TOKENIZER_CONFIG);
    let afm = model.is_file()
        && (tamm_folder || (config.is_file() && !dir.join("tokenizer.json").exists()));
    if afm {
        let t = Tokenizer::from_tamm(&model, config.is_file().then_some(config.as_path()))?;
        if t.vocab_size() > vocab {
            return Err(TextError::Tokenizer(format!(
                "{}: {} pieces, more than the model's vocabulary of {vocab}",
                model.display(),
                t.vocab_size(),
            )));
        }
        Ok(Some(t))
    } else if dir.join("tokenizer.json").exists() {
        Ok(Some(Tokenizer::from_dir(dir)?))
    } else {
        Ok(None)
    }
}
