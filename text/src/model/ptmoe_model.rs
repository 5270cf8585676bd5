//! A loaded server model (PT-MoE) with its tokenizer: what `generate` and `chat` run when
//! `--model` names a PT-MoE directory (ours, `model_type` `afm_ptmoe`, or a tamm folder with an
//! `AFMParallelTrackMoEConfig`) or `--preset` a PT-MoE preset.

use std::path::{Path, PathBuf};

use tch::Device;

use crate::error::{Result, TextError};
use crate::generation::{generate_lm, GenerateOptions, Generation};
use crate::model::DType;
use crate::ptmoe::PtMoe;
use crate::tokenizer::Tokenizer;

/// Whether `dir` holds a PT-MoE model (ours or tamm's); reads only the config.
pub fn is_ptmoe_dir(dir: &Path) -> bool {
    if crate::tamm_ptmoe::tamm_ptmoe_files(dir).is_some() {
        return true;
    }
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("model_type")?.as_str().map(|t| t == "afm_ptmoe"))
        .unwrap_or(false)
}

pub struct PtMoeModel {
    pub model: PtMoe,
    pub tokenizer: Option<Tokenizer>,
    pub dtype: DType,
    pub source: PathBuf,
    /// The tamm configuration of a model loaded from a tamm folder (its adapters' names need it).
    pub tamm: Option<crate::tamm_ptmoe::TammPtMoe>,
}

impl PtMoeModel {
    /// Load a PT-MoE directory and its tokenizer (tamm's AFM tokenizer files, or
    /// tokenizer.json); with an AFM tokenizer generation stops at EOS and `<turn_end>`.
    pub fn load(dir: &Path, device: Device, dtype: DType) -> Result<Self> {
        let (mut model, tamm) = match crate::tamm_ptmoe::tamm_ptmoe_files(dir) {
            Some((cfg, pt)) => {
                let t = crate::tamm_ptmoe::TammPtMoe::read(&cfg)?;
                (
                    PtMoe::from_tamm(&t, &pt, device, dtype.kind(), &[])?,
                    Some(t),
                )
            }
            None => (PtMoe::load(dir, device, dtype.kind(), &[])?, None),
        };
        let tokenizer =
            super::text_model::dir_tokenizer(dir, tamm.is_some(), model.cfg.vocab_size)?;
        if let Some(t) = &tokenizer {
            let stops = t.stop_ids();
            if !stops.is_empty() && (t.is_afm() || model.cfg.eos_token_id.is_none()) {
                model.cfg.eos_token_id = Some(crate::config::TokenIds::Many(stops));
            }
        }
        Ok(Self {
            model,
            tokenizer,
            dtype,
            source: dir.to_path_buf(),
            tamm,
        })
    }

    /// Load a LoRA adapter for this model: a PEFT directory under our PT-MoE module names, or,
    /// for a tamm model, the toolkit's adapter checkpoint (a `.pt` of tamm adapter tensors, or a
    /// folder holding `adapter.pt`; the base config's adapter spec, or the `adapter-config.json`
    /// beside the file, gives its α). Not activated.
    pub fn load_adapter(&self, path: &Path) -> Result<crate::lora::LoraAdapter> {
        let (device, kind) = (self.model.device(), self.dtype.kind());
        match (crate::tamm_adapter::toolkit_adapter_file(path), &self.tamm) {
            (Some(f), Some(t)) => crate::tamm_adapter::load_adapter_of(
                &f,
                &t.adaptable_linears(),
                &t.adapters,
                t.active_adapter.as_deref(),
                "AFMParallelTrackMoE",
                device,
                kind,
            ),
            (Some(f), None) => Err(TextError::checkpoint(
                &f,
                "a tamm adapter checkpoint needs a tamm base model (a folder with tamm's config)",
            )),
            (None, _) => crate::lora::LoraAdapter::load(path, device, kind),
        }
    }

    /// A PT-MoE preset with seeded random weights (no tokenizer).
    pub fn from_preset(name: &str, seed: i64, device: Device, dtype: DType) -> Result<Self> {
        let cfg = crate::ptmoe_config::ptmoe_preset(name)?;
        Ok(Self {
            model: PtMoe::random(&cfg, seed, device, dtype.kind(), &[])?,
            tokenizer: None,
            dtype,
            source: PathBuf::from(format!("preset:{name}")),
            tamm: None,
        })
    }

    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            TextError::InvalidArgument(format!(
                "{} has no tokenizer (tokenizer.json, or tamm's tokenizer.model)",
                self.source.display()
            ))
        })
    }

    /// The prompt's token ids: as is with `raw`, else in the chat format.
    pub fn prompt_ids(&self, prompt: &str, raw: bool) -> Result<Vec<u32>> {
        self.tokenizer()?.prompt_ids(prompt, raw)
    }

    /// Generate from token ids, streaming text pieces to `on_text` (a prompt that fills the
    /// context is refused by [`generate_lm`]).
    pub fn generate_ids(
        &self,
        ids: &[u32],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        generate_lm(&self.model, self.tokenizer.as_ref(), ids, opts, on_text)
    }

    /// Generate from a text prompt.
    pub fn generate_text(
        &self,
        prompt: &str,
        raw: bool,
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generation> {
        let ids = self.prompt_ids(prompt, raw)?;
        self.generate_ids(&ids, opts, on_text)
    }
}
