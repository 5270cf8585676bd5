//! The vision-language model: tiler → encoder → adapter → visual tokens spliced into the text
//! model's token embeddings → the text generator.
//!
//! The encoder and adapter share one `VarStore` (names `vision.*`, `adapter.*`, fp32, trainable);
//! the text model is an ordinary loaded text model (frozen, any dtype): the on-device decoder
//! ([`TextModel`], the default) or the server model ([`afm_text::ptmoe_model::PtMoeModel`]);
//! any [`LanguageModel`] whose network takes embeddings.

use std::path::{Path, PathBuf};
use std::time::Instant;

use tch::{nn, Device, Kind, Tensor};

use afm_text::generation::{
    generate_from_logits_lm, generate_lm, CausalLm, GenerateOptions, Generation,
};
use afm_text::lora::{LoraAdapter, LoraTarget};
use afm_text::{DType, LanguageModel, Logits, TextModel};
use afm_vision::{TileMode, TiledImage, Tiler, TilerConfig, VisionEncoder};

use crate::adapter::Adapter;
use crate::config::{ImageLoraConfig, VlmConfig, CONFIG_FILE, WEIGHTS_FILE};
use crate::error::{FusionError, Result};
use crate::prompt::{assemble, splice, PromptLayout};

pub struct VisionLanguageModel<L: LanguageModel = TextModel> {
    pub config: VlmConfig,
    /// Encoder + adapter parameters.
    pub vs: nn::VarStore,
    pub encoder: VisionEncoder,
    pub adapter: Adapter,
    pub text: L,
    /// The image-conditioned LoRA (its tensors live in `vs`), when the config has one.
    pub image_lora: Option<LoraAdapter>,
    /// A user's LoRA adapter for the text model ([`Self::set_text_adapter`]), on for every
    /// prompt, with or without images.
    text_adapter: Option<LoraAdapter>,
    /// `image_lora` and `text_adapter` stacked into one overlay, when both exist.
    stacked: Option<LoraAdapter>,
    /// Whether `image_lora` is on the text model now.
    lora_active: bool,
    /// Where it was loaded from (`None` for a fresh model).
    pub dir: Option<PathBuf>,
}

impl<L: LanguageModel> std::fmt::Debug for VisionLanguageModel<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VisionLanguageModel")
            .field("dir", &self.dir)
            .field("tokens_per_tile", &self.config.tokens_per_tile())
            .finish()
    }
}

/// Seconds spent in each stage of one description.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Timings {
    pub tile_s: f64,
    pub encode_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// One image described.
#[derive(Debug, Clone)]
pub struct Description {
    pub text: String,
    /// How the image was cut: the AFM tile mode (`high-res`, …) or SmolVLM's crop grid
    /// (`2x3+global`, `single`).
    pub mode: String,
    pub tiles: usize,
    pub visual_tokens: usize,
    pub prompt_tokens: usize,
    pub generation: Generation,
    pub timings: Timings,
}

impl Description {
    /// A finished generation as a description (`stats.prompt_tokens` and `prefill_secs` set by
    /// the caller; `tile_s` is filled in by whoever decoded the image).
    pub(crate) fn new(
        generation: Generation,
        mode: String,
        tiles: usize,
        visual_tokens: usize,
        encode_s: f64,
    ) -> Self {
        Self {
            text: generation.text.trim().to_string(),
            mode,
            tiles,
            visual_tokens,
            prompt_tokens: generation.stats.prompt_tokens,
            timings: Timings {
                tile_s: 0.0,
                encode_s,
                prefill_s: generation.stats.prefill_secs,
                decode_s: generation.stats.decode_secs,
            },
            generation,
        }
    }
}

impl<L: LanguageModel> VisionLanguageModel<L> {
    /// Fresh encoder + adapter (seeded) around a loaded text model.
    pub fn new(config: VlmConfig, mut text: L, seed: i64) -> Result<Self> {
        let th = text.net().hidden_size() as i64;
        if config.adapter.text_hidden_size != th {
            return Err(FusionError::InvalidArgument(format!(
                "adapter output width {} differs from the text model's hidden size {th}",
                config.adapter.text_hidden_size
            )));
        }
        let device = text.net().lm_device();
        let _lock = afm_text::weights::seed_global_rng(seed);
        let vs = nn::VarStore::new(device);
        let encoder = VisionEncoder::new(&(vs.root() / "vision"), &config.vision)?;
        let adapter = Adapter::new(&(vs.root() / "adapter"), &config.vision, &config.adapter)?;
        let image_lora = match &config.image_lora {
            Some(lc) => Some(image_lora_vars(&vs, lc, &mut text)?),
            None => None,
        };
        let mut model = Self {
            config,
            vs,
            encoder,
            adapter,
            text,
            image_lora,
            text_adapter: None,
            stacked: None,
            lora_active: false,
            dir: None,
        };
        model.set_image_lora(true)?;
        Ok(model)
    }

    /// Put the image LoRA on the text model (`true`, the state for image prompts) or take it
    /// off (`false`: the text model as loaded, with the user's adapter if one is set).
    pub fn set_image_lora(&mut self, on: bool) -> Result<()> {
        if self.image_lora.is_none() || on == self.lora_active {
            return Ok(());
        }
        self.apply_overlays(on)?;
        self.lora_active = on;
        Ok(())
    }

    /// Put the overlays of an image prompt (`image`: the image LoRA, stacked with the text
    /// adapter if one is set) or of a text-only prompt (the text adapter or none) on the text
    /// model.
    fn apply_overlays(&mut self, image: bool) -> Result<()> {
        let overlay = match image {
            true => self.stacked.as_ref().or(self.image_lora.as_ref()),
            false => self.text_adapter.as_ref(),
        };
        match overlay {
            Some(l) => l.activate(self.text.net_mut())?,
            None => afm_text::lora::deactivate(self.text.net_mut())?,
        }
        Ok(())
    }

    /// Put a LoRA adapter of the text model (e.g. `LoraAdapter::load` of a PEFT directory) on
    /// for every later prompt, or take it off with `None`. With an image LoRA both run as one
    /// stacked overlay on image prompts ([`LoraAdapter::stack`]: the sum of their updates);
    /// text-only prompts get the adapter alone.
    pub fn set_text_adapter(&mut self, adapter: Option<LoraAdapter>) -> Result<()> {
        self.stacked = match (&self.image_lora, &adapter) {
            (Some(img), Some(user)) => Some(img.stack(user)?),
            _ => None,
        };
        self.text_adapter = adapter;
        // Re-apply the current state with the new overlays (without an image LoRA,
        // `lora_active` stays false: the text-only state).
        self.apply_overlays(self.lora_active)
    }

    /// A text-only prompt: the unchanged text model (the image LoRA is off meanwhile).
    pub fn generate_text(
        &mut self,
        prompt: &str,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        self.set_image_lora(false)?;
        let out = self
            .text
            .tokenizer_or_err()
            .and_then(|t| t.prompt_ids(prompt, false))
            .and_then(|ids| {
                generate_lm(
                    self.text.net(),
                    self.text.tokenizer_opt(),
                    &ids,
                    opts,
                    on_text,
                )
            });
        self.set_image_lora(true)?;
        Ok(out?)
    }

    /// Load a checkpoint directory (see [`crate::config`]) whose text model is an `L`
    /// ([`has_ptmoe_text`] tells which); [`VisionLanguageModel::load`] for the on-device one.
    pub fn load_any(dir: &Path, device: Device, dtype: DType) -> Result<Self> {
        if !dir.is_dir() {
            return Err(FusionError::checkpoint(
                dir,
                "model directory not found (expected config.json and vision_adapter.safetensors)",
            ));
        }
        let config = VlmConfig::from_file(&dir.join(CONFIG_FILE))?;
        let text_dir = config.text_dir(dir);
        if !text_dir.join("config.json").is_file() {
            return Err(FusionError::checkpoint(
                dir,
                format!(
                    "text model `{}` not found at {} (run `make setup` to convert the default model)",
                    config.text_model,
                    text_dir.display()
                ),
            ));
        }
        let text = L::load_dir(&text_dir, device, dtype)?;
        let mut model = Self::new(config, text, 0)?;
        model.load_weights(&dir.join(WEIGHTS_FILE))?;
        model.dir = Some(dir.to_path_buf());
        Ok(model)
    }

    /// Copy encoder + adapter tensors from a safetensors file; every variable must be present
    /// with its exact shape.
    pub fn load_weights(&mut self, path: &Path) -> Result<()> {
        self.copy_weights(path, false).map(|_| ())
    }

    /// Start training from a checkpoint of an architecture that lacks some of this model's
    /// modules (e.g. the count token): tensors it has are copied (exact shapes required), the
    /// others keep their fresh initialisation; returns their names.
    pub fn init_from(&mut self, path: &Path) -> Result<Vec<String>> {
        self.copy_weights(path, true)
    }

    fn copy_weights(&mut self, path: &Path, allow_missing: bool) -> Result<Vec<String>> {
        if !path.is_file() {
            return Err(FusionError::checkpoint(path, "weights file not found"));
        }
        let tensors = afm_text::checkpoint::read_safetensors_file(path)?;
        let file: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
        let vars = self.vs.variables();
        let mut names: Vec<&String> = vars.keys().collect();
        names.sort();
        let mut missing = Vec::new();
        for name in names {
            let var = &vars[name];
            let Some(src) = file.get(name) else {
                if allow_missing {
                    missing.push(name.clone());
                    continue;
                }
                return Err(FusionError::checkpoint(
                    path,
                    format!("missing tensor `{name}` (truncated or not an afm-vl checkpoint?)"),
                ));
            };
            if src.size() != var.size() {
                return Err(FusionError::checkpoint(
                    path,
                    format!(
                        "tensor `{name}` has shape {:?}, the config needs {:?}",
                        src.size(),
                        var.size()
                    ),
                ));
            }
            tch::no_grad(|| var.shallow_clone().f_copy_(src))?;
        }
        let unused: Vec<&String> = file.keys().filter(|k| !vars.contains_key(*k)).collect();
        if !unused.is_empty() {
            tracing::warn!("{}: {} unused tensors", path.display(), unused.len());
        }
        Ok(missing)
    }

    /// Write `config.json` and `vision_adapter.safetensors` (atomically) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| FusionError::io(dir, e))?;
        self.config.save(&dir.join(CONFIG_FILE))?;
        let vars = self.vs.variables();
        let mut named: Vec<(String, Tensor)> = vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.f_detach()?.f_to_device(Device::Cpu)?)))
            .collect::<Result<_>>()?;
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let path = dir.join(WEIGHTS_FILE);
        afm_text::checkpoint::write_safetensors(&path, &named, None)?;
        Ok(())
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Visual tokens per tile.
    pub fn tokens_per_tile(&self) -> usize {
        self.config.tokens_per_tile() as usize
    }

    /// The tiler of this checkpoint in `mode` (sizes and normalisation from the config).
    pub fn tiler(&self, mode: TileMode) -> Result<Tiler> {
        Ok(Tiler::new(TilerConfig {
            mode,
            ..self.config.tiler.clone()
        })?)
    }

    /// Tiles `[T, 3, S, S]` → visual tokens `[T, tokens_per_tile, text_hidden]` (fp32, with
    /// autograd when enabled by the caller).
    pub fn encode_tiles(&self, pixels: &Tensor) -> Result<Tensor> {
        let out = self.encoder.forward(&pixels.f_to_device(self.device())?)?;
        let grid = out.grid_tokens()?; // [T, gh, gw, Cv]
        self.adapter.forward(&grid, out.registers.as_ref())
    }

    /// The visual tokens of a tiled image, `[tiles × tokens_per_tile, text_hidden]`, fp32.
    pub fn encode_image(&self, tiled: &TiledImage) -> Result<Tensor> {
        let _guard = tch::no_grad_guard();
        let v = self.encode_tiles(&tiled.to_tensor()?)?;
        let (t, n, h) = v.size3()?;
        Ok(v.f_reshape([t * n, h])?)
    }

    /// The prompt with `tiles` runs of placeholders.
    pub fn assemble(&self, prompt: Option<&str>, tiles: usize) -> Result<PromptLayout> {
        let tok = self.text.tokenizer_or_err()?;
        let prompt = prompt.unwrap_or(&self.config.default_prompt);
        assemble(
            tok,
            &self.config.image_token,
            prompt,
            tiles,
            self.tokens_per_tile(),
        )
    }

    /// Token embeddings of `layout` with `visual` (`[B, n, H]`) spliced in: `[B, S, H]`.
    pub fn embed_with_image(&self, ids: &Tensor, visual: &Tensor, start: i64) -> Result<Tensor> {
        let emb = self
            .text
            .net()
            .embed_ids(&ids.f_to_device(self.device())?)?;
        splice(&emb, visual, start)
    }

    /// Describe an already tiled image.
    pub fn describe_tiled(
        &self,
        tiled: &TiledImage,
        prompt: Option<&str>,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Description> {
        let _guard = tch::no_grad_guard();
        let t0 = Instant::now();
        let visual = self.encode_image(tiled)?; // [N, H]
        let encode_s = t0.elapsed().as_secs_f64();
        let layout = self.assemble(prompt, tiled.num_tiles())?;
        let ctx = self.text.net().context_len();
        if layout.ids.len() >= ctx {
            return Err(afm_text::TextError::ContextOverflow {
                tokens: layout.ids.len(),
                requested: opts.max_new_tokens,
                context: ctx,
            }
            .into());
        }
        let t1 = Instant::now();
        let ids = afm_text::generation::ids_tensor(&layout.ids)?;
        let x = self.embed_with_image(&ids, &visual.f_unsqueeze(0)?, layout.image_start as i64)?;
        let decoder = self.text.net();
        let mut cache = decoder.new_lm_cache(1);
        let logits = decoder.forward_embeds_lm(&x, None, &mut cache, Logits::Last)?;
        let prefill_s = t1.elapsed().as_secs_f64();
        let mut generation = generate_from_logits_lm(
            decoder,
            self.text.tokenizer_opt(),
            &mut cache,
            &logits,
            &layout.ids,
            opts,
            on_text,
        )?;
        generation.stats.prompt_tokens = layout.ids.len();
        generation.stats.prefill_secs = prefill_s;
        Ok(Description::new(
            generation,
            tiled.mode.to_string(),
            tiled.num_tiles(),
            layout.image_len,
            encode_s,
        ))
    }

    /// Describe an image file in `mode`.
    pub fn describe_path(
        &self,
        path: &Path,
        mode: TileMode,
        prompt: Option<&str>,
        opts: &GenerateOptions,
    ) -> Result<Description> {
        let t0 = Instant::now();
        let tiled = self.tiler(mode)?.tile_path(path)?;
        let tile_s = t0.elapsed().as_secs_f64();
        let mut d = self.describe_tiled(&tiled, prompt, opts, &mut |_| {})?;
        d.timings.tile_s = tile_s;
        Ok(d)
    }

    /// Number of encoder + adapter parameters.
    pub fn vision_parameters(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    /// The text model's compute kind.
    pub fn text_kind(&self) -> Kind {
        self.text.net().lm_kind()
    }
}

impl VisionLanguageModel<TextModel> {
    /// Load a checkpoint directory (see [`crate::config`]) with an on-device text model.
    pub fn load(dir: &Path, device: Device, dtype: DType) -> Result<Self> {
        Self::load_any(dir, device, dtype)
    }
}

/// Whether the vision-language checkpoint in `dir` puts a PT-MoE model (ours or a tamm
/// folder) behind its vision encoder; reads only the configs (a broken one reads as `false`,
/// and loading reports it).
pub fn has_ptmoe_text(dir: &Path) -> bool {
    VlmConfig::from_file(&dir.join(CONFIG_FILE))
        .map(|c| afm_text::ptmoe_model::is_ptmoe_dir(&c.text_dir(dir)))
        .unwrap_or(false)
}

/// LoRA variables under `lora.{module}` in `vs` for every text linear matching a target (A
/// small random, B zero: the text model starts unchanged), as an adapter sharing them.
fn image_lora_vars<L: LanguageModel>(
    vs: &nn::VarStore,
    cfg: &ImageLoraConfig,
    text: &mut L,
) -> Result<LoraAdapter> {
    if cfg.rank < 1 {
        return Err(FusionError::InvalidArgument(format!(
            "image_lora.rank must be ≥ 1, got {}",
            cfg.rank
        )));
    }
    let mut modules = Vec::new();
    for (name, lin) in text.net_mut().lora_linears() {
        if !cfg.targets.iter().any(|t| name.ends_with(t.as_str())) {
            continue;
        }
        let mut p = vs.root() / "lora";
        for part in name.split('.') {
            p = p / part;
        }
        let a = p.var(
            "lora_A",
            &[cfg.rank, lin.in_features()],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0 / (lin.in_features() as f64).sqrt(),
            },
        );
        let b = p.zeros("lora_B", &[lin.out_features(), cfg.rank]);
        modules.push((name, (a, b)));
    }
    if modules.is_empty() {
        return Err(FusionError::InvalidArgument(format!(
            "image_lora targets {:?} match no layer of the text model",
            cfg.targets
        )));
    }
    Ok(LoraAdapter::from_modules(
        "image",
        cfg.rank as usize,
        cfg.alpha / cfg.rank as f64,
        modules,
    ))
}
