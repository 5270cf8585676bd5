//! What every loaded text model offers, whichever network it runs: the on-device decoder
//! ([`TextModel`]) or the server model ([`PtMoeModel`]). Evaluation, LoRA training and the
//! Python wheel are written once against this trait.

use std::path::Path;

use crate::error::Result;
use crate::generation::CausalLm;
use crate::lora::{LoraAdapter, LoraTarget};
use crate::model::ptmoe_model::PtMoeModel;
use crate::model::{DType, TextModel};
use crate::tokenizer::Tokenizer;

pub trait LanguageModel: Sized {
    /// Load a model directory of this kind with its tokenizer.
    fn load_dir(dir: &Path, device: tch::Device, dtype: DType) -> Result<Self>;
    /// The network: a causal LM whose linear layers take LoRA overlays.
    type Net: CausalLm + LoraTarget;
    fn net(&self) -> &Self::Net;
    fn net_mut(&mut self) -> &mut Self::Net;
    /// The tokenizer, when the checkpoint has one.
    fn tokenizer_opt(&self) -> Option<&Tokenizer>;
    /// A LoRA adapter for this model (PEFT directory, or a toolkit `.pt` on a tamm model), not
    /// activated.
    fn load_adapter(&self, path: &Path) -> Result<LoraAdapter>;
    /// The tokenizer, or an error naming the checkpoint.
    fn tokenizer_or_err(&self) -> Result<&Tokenizer>;
}

impl LanguageModel for TextModel {
    type Net = crate::decoder::Decoder;
    fn load_dir(dir: &Path, device: tch::Device, dtype: DType) -> Result<Self> {
        TextModel::load(dir, device, dtype)
    }
    fn net(&self) -> &Self::Net {
        &self.decoder
    }
    fn net_mut(&mut self) -> &mut Self::Net {
        &mut self.decoder
    }
    fn tokenizer_opt(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }
    fn tokenizer_or_err(&self) -> Result<&Tokenizer> {
        self.tokenizer()
    }
    fn load_adapter(&self, path: &Path) -> Result<LoraAdapter> {
        TextModel::load_adapter(self, path)
    }
}

impl LanguageModel for PtMoeModel {
    type Net = crate::ptmoe::PtMoe;
    fn load_dir(dir: &Path, device: tch::Device, dtype: DType) -> Result<Self> {
        PtMoeModel::load(dir, device, dtype)
    }
    fn net(&self) -> &Self::Net {
        &self.model
    }
    fn net_mut(&mut self) -> &mut Self::Net {
        &mut self.model
    }
    fn tokenizer_opt(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }
    fn tokenizer_or_err(&self) -> Result<&Tokenizer> {
        self.tokenizer()
    }
    fn load_adapter(&self, path: &Path) -> Result<LoraAdapter> {
        PtMoeModel::load_adapter(self, path)
    }
}
