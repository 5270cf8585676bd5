//! Decoder configuration, mirroring an HF-style `config.json`.
//!
//! One struct covers Llama / SmolLM2 / Qwen3 checkpoints and the AFM two-segment decoder:
//! `num_segment1_layers = 0` and `qk_norm = false` is exactly a Llama-style stack.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, TextError};

/// RoPE frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RopeScalingKind {
    /// Positions divided by `factor` (position interpolation).
    Linear,
    /// Static NTK-aware scaling: θ' = θ · factor^(d/(d−2)).
    Ntk,
    /// HF "dynamic" NTK: θ grows with the sequence length once it exceeds the trained context.
    Dynamic,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type", alias = "rope_type")]
    pub kind: RopeScalingKind,
    pub factor: f64,
}

/// EOS as one id or a list (HF allows both).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_ctx() -> usize {
    4096
}

/// Limits of [`TextConfig::validate`] (generous: about 10× the largest open models).
pub const MAX_VOCAB: usize = 4 << 20;
pub const MAX_WIDTH: usize = 1 << 17;
pub const MAX_FFN: usize = 1 << 20;
pub const MAX_LAYERS: usize = 1024;
pub const MAX_HEADS: usize = 1024;
pub const MAX_HEAD_DIM: usize = 1024;
/// Longest context (the RoPE table is allocated for all of it).
pub const MAX_CONTEXT: usize = 1 << 21;
pub const MAX_PARAMS: u128 = 10_000_000_000_000;

/// The text decoder's configuration (HF field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    /// `llama`, `qwen3` (implies QK-norm) or `afm_two_segment`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    /// Total layers: segment 0 followed by segment 1.
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers ≥ 5 writes `rope_parameters: {rope_theta, rope_type, factor}` instead.
    #[serde(default, skip_serializing)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// RMSNorm over head_dim on queries and keys (AFM 2025, Qwen3).
    #[serde(default)]
    pub qk_norm: bool,
    /// QK-norm after RoPE (tamm's AFMTextV7: norm → qkv → RoPE → QK-norm → cache); the default
    /// (false) normalises before RoPE, as HF Qwen3 does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qk_norm_after_rope: bool,
    /// Keys and values of layers with their own K/V fake-quantised to int8 before the cache,
    /// one scale per tensor from the calibrated range in `self_attn.kv_quant.{key,value}_range`
    /// (tamm's `KVQuantArchOptimizer`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kv_fake_quant: bool,
    /// With `kv_fake_quant`: in generation's first-token pass (the prefill), each layer attends
    /// to the prompt's own keys and values unquantised while the cache keeps them quantised
    /// (tamm's `skip_quantize_for_first_token`); later steps read the quantised cache. A forward
    /// outside generation quantises everything, as tamm does without its first-token flag.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kv_fake_quant_skip_first: bool,
    /// RMSNorm in half precision applies its gain in fp32 and rounds once (tamm: the input is
    /// cast to fp32, normalised and scaled, then cast back); the default (false) rounds the
    /// normalised value before the gain, as HF Llama does. Same result in fp32.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub norm_gain_fp32: bool,
    /// Layers at the end of the stack that have no K/V projections and read the K/V cache of
    /// `kv_source_layer` (AFM 2025 segment 1). 0 = a standard stack.
    #[serde(default)]
    pub num_segment1_layers: usize,
    /// The segment-0 layer whose K/V cache segment 1 reads (default: the last segment-0 layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_source_layer: Option<usize>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
}

impl TextConfig {
    /// Read and validate `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TextError::io(path, e))?;
        Self::from_json_str(&text).map_err(|msg| TextError::Config {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// Parse and validate; the error is a message without the path.
    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        // Text configs of VLM checkpoints may nest under "text_config".
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let value = match value.get("text_config") {
            Some(inner) => inner.clone(),
            None => value,
        };
        let mut cfg: TextConfig = serde_json::from_value(value).map_err(|e| e.to_string())?;
        cfg.normalise();
        cfg.validate()?;
        Ok(cfg)
    }

    fn normalise(&mut self) {
        if self.model_type == "qwen3" {
            self.qk_norm = true;
        }
        if let Some(p) = self.rope_parameters.take() {
            if let Some(theta) = p.get("rope_theta").and_then(|v| v.as_f64()) {
                self.rope_theta = theta;
            }
            let kind = p.get("rope_type").and_then(|v| v.as_str());
            let factor = p.get("factor").and_then(|v| v.as_f64());
            if let (Some(kind), Some(factor)) = (kind, factor) {
                let kind = match kind {
                    "linear" => Some(RopeScalingKind::Linear),
                    "dynamic" => Some(RopeScalingKind::Dynamic),
                    "ntk" => Some(RopeScalingKind::Ntk),
                    _ => None,
                };
                if let Some(kind) = kind {
                    self.rope_scaling = Some(RopeScaling { kind, factor });
                }
            }
        }
    }

    /// Check the geometry; the message says which field is wrong.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(format!("{name} must be > 0"));
            }
        }
        // Upper bounds, checked before anything is allocated: a config must not be able to ask
        // for more memory than any machine has (generous: 10× today's largest open models).
        let bounded = [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_FFN),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_kv_heads(), MAX_HEADS),
            ("head_dim", self.head_dim(), MAX_HEAD_DIM),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_CONTEXT,
            ),
        ];
        for (name, v, max) in bounded {
            if v > max {
                return Err(format!("{name} {v} is larger than the limit of {max}"));
            }
        }
        let params = self.approx_params();
        if params > MAX_PARAMS {
            return Err(format!(
                "the geometry has about {:.3e} parameters, more than the limit of {MAX_PARAMS:.0e}",
                params as f64
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            ));
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                self.num_attention_heads
            ));
        }
        if self.num_segment1_layers >= self.num_hidden_layers {
            return Err(format!(
                "num_segment1_layers {} leaves no segment-0 layer out of {}",
                self.num_segment1_layers, self.num_hidden_layers
            ));
        }
        if let Some(src) = self.kv_source_layer {
            if src >= self.num_segment0_layers() {
                return Err(format!(
                    "kv_source_layer {src} is not a segment-0 layer (0..{})",
                    self.num_segment0_layers()
                ));
            }
        }
        if let Some(s) = self.rope_scaling {
            if !(s.factor.is_finite() && s.factor >= 1.0) {
                return Err(format!("rope_scaling.factor {} must be ≥ 1", s.factor));
            }
        }
        Ok(())
    }

    /// Parameters of this geometry (embedding, head, attention, MLP), computed in u128 so an
    /// absurd config cannot overflow.
    pub fn approx_params(&self) -> u128 {
        let (h, v, f) = (
            self.hidden_size as u128,
            self.vocab_size as u128,
            self.intermediate_size as u128,
        );
        let hd = self.head_dim.unwrap_or(1).max(1) as u128;
        let hd = if self.head_dim.is_some() {
            hd
        } else {
            h / (self.num_attention_heads.max(1) as u128)
        };
        let q = self.num_attention_heads as u128 * hd;
        let kv = self.num_key_value_heads.unwrap_or(self.num_attention_heads) as u128 * hd;
        let layer = h * (q + 2 * kv) + q * h + 3 * h * f;
        2 * v * h + self.num_hidden_layers as u128 * layer
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn num_segment0_layers(&self) -> usize {
        self.num_hidden_layers - self.num_segment1_layers
    }
    /// The layer whose K/V segment 1 reads.
    pub fn kv_source(&self) -> usize {
        self.kv_source_layer
            .unwrap_or(self.num_segment0_layers() - 1)
    }
    pub fn is_segment1(&self, layer: usize) -> bool {
        layer >= self.num_segment0_layers()
    }
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// K/V bytes cached per token at `bytes_per_elem` (only segment-0 layers own a cache).
    pub fn kv_bytes_per_token(&self, bytes_per_elem: usize) -> usize {
        self.num_segment0_layers() * 2 * self.num_kv_heads() * self.head_dim() * bytes_per_elem
    }

    pub fn to_json_pretty(&self) -> String {
        // Serialising a plain struct of numbers and strings cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_llama_and_v5_rope_parameters() {
        let cfg = TextConfig::from_json_str(
            r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,
                "num_attention_heads":2,"num_key_value_heads":1,
                "rope_parameters":{"rope_theta":500000.0,"rope_type":"linear","factor":2.0},
                "eos_token_id":[2,3]}"#,
        )
        .unwrap();
        assert_eq!(cfg.rope_theta, 500000.0);
        assert_eq!(
            cfg.rope_scaling,
            Some(RopeScaling {
                kind: RopeScalingKind::Linear,
                factor: 2.0
            })
        );
        assert_eq!(cfg.head_dim(), 4);
        assert_eq!(cfg.eos_ids(), vec![2, 3]);
    }

    #[test]
    fn rejects_bad_geometry() {
        let bad = r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,
                "num_attention_heads":3}"#;
        let err = TextConfig::from_json_str(bad).unwrap_err();
        assert!(err.contains("not divisible"), "{err}");
        let bad = r#"{"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":2,
                "num_attention_heads":2,"num_segment1_layers":2}"#;
        assert!(TextConfig::from_json_str(bad)
            .unwrap_err()
            .contains("segment"));
    }

    #[test]
    fn qwen3_implies_qk_norm() {
        let cfg = TextConfig::from_json_str(
            r#"{"model_type":"qwen3","vocab_size":10,"hidden_size":8,"intermediate_size":16,
                "num_hidden_layers":2,"num_attention_heads":2,"head_dim":8}"#,
        )
        .unwrap();
        assert!(cfg.qk_norm);
        assert_eq!(cfg.head_dim(), 8);
    }
}
