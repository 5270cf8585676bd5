//! The vision-language checkpoint's `config.json`.
//!
//! A VLM checkpoint directory holds:
//! - `config.json`: this struct — `vision` (a [`VitConfig`]), `adapter`, `tiler` (modes, tile
//!   sizes, normalisation), `image_token` settings and `text_model`;
//! - `vision_adapter.safetensors`: encoder tensors under `vision.` (HF `VitDetModel` names) and
//!   adapter tensors under `adapter.`;
//! - the text model either inside (`text_model: "."` with its own files) or referenced by a path
//!   relative to the checkpoint directory (`"../smollm2-135m-instruct"`) or absolute.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use afm_vision::{TilerConfig, VitConfig};

use crate::adapter::AdapterConfig;
use crate::error::{FusionError, Result};

/// How images appear in the prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageTokenConfig {
    /// Marker in the user message where the image goes (one run of placeholders per tile,
    /// in tile order).
    pub marker: String,
    /// Token id written at placeholder positions (their embeddings are replaced).
    pub placeholder_id: u32,
    /// Where the marker sits when the user's prompt has none: before the text.
    pub image_first: bool,
}

impl Default for ImageTokenConfig {
    fn default() -> Self {
        Self {
            marker: "<image>".into(),
            placeholder_id: 0,
            image_first: true,
        }
    }
}

/// A LoRA on the text model that is active while images are in the prompt (trained with the
/// adapter; text-only prompts run the unchanged text model). Tensors are stored in the weights
/// file as `lora.{module}.lora_A` `[rank, in]` and `lora.{module}.lora_B` `[out, rank]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageLoraConfig {
    pub rank: i64,
    pub alpha: f64,
    /// Module-name suffixes (`q_proj`, `v_proj`, ...).
    pub targets: Vec<String>,
}

impl Default for ImageLoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VlmConfig {
    #[serde(default = "model_type")]
    pub model_type: String,
    pub vision: VitConfig,
    pub adapter: AdapterConfig,
    #[serde(default)]
    pub tiler: TilerConfig,
    #[serde(default)]
    pub image_token: ImageTokenConfig,
    /// Image-conditioned LoRA on the text model (none: the text model is used as is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_lora: Option<ImageLoraConfig>,
    /// The text model directory: relative to the checkpoint directory, or absolute.
    pub text_model: String,
    /// The prompt `describe` uses when none is given.
    #[serde(default = "default_prompt")]
    pub default_prompt: String,
    /// Free-form notes (what the checkpoint was trained on).
    #[serde(default)]
    pub notes: String,
    /// A demonstration checkpoint (trained on generated scenes only): commands say so once
    /// per run, since it describes real photos as coloured shapes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub demo: bool,
}

impl VlmConfig {
    /// Whether this is a demo checkpoint: `"demo": true`, or (checkpoints written before the
    /// flag) notes that say so.
    pub fn is_demo(&self) -> bool {
        self.demo || self.notes.contains("demo checkpoint")
    }
}

fn model_type() -> String {
    "afm-vl".into()
}

fn default_prompt() -> String {
    "Describe the image.".into()
}

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "vision_adapter.safetensors";

impl VlmConfig {
    /// Whether `dir/config.json` is a VLM config (it has a `vision` section).
    pub fn is_vlm_dir(dir: &Path) -> bool {
        std::fs::read_to_string(dir.join(CONFIG_FILE))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .is_some_and(|v| v.get("vision").is_some() && v.get("adapter").is_some())
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| FusionError::io(path, e))?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| FusionError::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        cfg.vision.validate()?;
        cfg.adapter.validate()?;
        // The tiler section is bounded too (tile sizes, grid) before any image is tiled.
        afm_vision::Tiler::new(cfg.tiler.clone()).map_err(|e| FusionError::Config {
            path: path.to_path_buf(),
            msg: format!("tiler: {e}"),
        })?;
        Ok(cfg)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| FusionError::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        afm_text::atomic_write::write_atomic(path, (text + "\n").as_bytes())?;
        Ok(())
    }

    /// The text model's directory for a checkpoint in `dir`.
    pub fn text_dir(&self, dir: &Path) -> PathBuf {
        let p = Path::new(&self.text_model);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        }
    }

    /// Visual tokens per tile.
    pub fn tokens_per_tile(&self) -> i64 {
        self.adapter
            .tokens_per_tile(self.vision.num_register_tokens)
    }
}
