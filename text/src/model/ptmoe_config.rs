//! Configuration of the server decoder (PT-MoE), HF-style `config.json` field names, and its
//! presets.
//!
//! The stack is `num_track_blocks` track blocks; each runs `num_tracks` independent tracks of
//! `track_block_depth` layers on the same input and merges them (mean, option sum) at the block
//! boundary. Depth inside a track counts across blocks (`j = block · D + layer`):
//! - layer `j` has a MoE FFN when `j` is odd (dense, MoE, dense, MoE, …), else a dense SwiGLU;
//! - layer `j` is global (causal, no positional encoding) when `(j + 1) % global_attn_every == 0`,
//!   else sliding-window with RoPE (`sliding_window` tokens, ring-buffer KV cache).

use serde::{Deserialize, Serialize};

use crate::config::{TextConfig, TokenIds};
use crate::error::{Result, TextError};

/// How track outputs are merged at a block boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackMerge {
    #[default]
    Mean,
    Sum,
}

fn default_model_type() -> String {
    "afm_ptmoe".into()
}
fn default_top_k() -> usize {
    2
}
fn default_true() -> bool {
    true
}
fn default_window() -> usize {
    4096
}
fn default_every() -> usize {
    4
}
fn default_eps() -> f64 {
    1e-5
}
fn default_theta() -> f64 {
    500_000.0
}
fn default_ctx() -> usize {
    65_536
}
fn default_aux() -> f64 {
    0.01
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PtMoeConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// FFN width of the dense layers.
    pub intermediate_size: usize,
    /// FFN width of each expert.
    pub moe_intermediate_size: usize,
    /// Experts per MoE layer (E; Mixtral's name).
    pub num_local_experts: usize,
    /// Top-k routing (default 2).
    #[serde(default = "default_top_k")]
    pub num_experts_per_tok: usize,
    /// Renormalise the top-k gates to sum to 1 (Mixtral; Qwen2-MoE's `norm_topk_prob`).
    #[serde(default = "default_true")]
    pub norm_topk_prob: bool,
    /// Tracks per block (T).
    pub num_tracks: usize,
    /// Track blocks in the stack.
    pub num_track_blocks: usize,
    /// Layers of one track inside one block (D).
    pub track_block_depth: usize,
    #[serde(default)]
    pub track_merge: TrackMerge,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Sliding window of the local layers, in tokens.
    #[serde(default = "default_window")]
    pub sliding_window: usize,
    /// Every this many layers of a track, the last one is global (NoPE).
    #[serde(default = "default_every")]
    pub global_attn_every: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub qk_norm: bool,
    /// Weight of the load-balancing loss in training.
    #[serde(default = "default_aux")]
    pub router_aux_loss_coef: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
}

impl PtMoeConfig {
    pub fn from_json_str(text: &str) -> std::result::Result<Self, String> {
        let cfg: PtMoeConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let nonzero = [
            ("num_tracks", self.num_tracks),
            ("num_track_blocks", self.num_track_blocks),
            ("track_block_depth", self.track_block_depth),
            ("num_local_experts", self.num_local_experts),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("sliding_window", self.sliding_window),
            ("global_attn_every", self.global_attn_every),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(format!("{name} must be > 0"));
            }
        }
        let bounded = [
            ("num_tracks", self.num_tracks, 256),
            ("num_track_blocks", self.num_track_blocks, 1024),
            ("track_block_depth", self.track_block_depth, 256),
            ("num_local_experts", self.num_local_experts, 4096),
            ("moe_intermediate_size", self.moe_intermediate_size, 1 << 20),
        ];
        for (name, v, max) in bounded {
            if v > max {
                return Err(format!("{name} {v} is larger than the limit of {max}"));
            }
        }
        if self.total_layers() > crate::config::MAX_LAYERS * 4 {
            return Err(format!(
                "{} layers in all (tracks × blocks × depth) is more than the limit of {}",
                self.total_layers(),
                crate::config::MAX_LAYERS * 4
            ));
        }
        if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_local_experts {
            return Err(format!(
                "num_experts_per_tok {} must be in 1..={}",
                self.num_experts_per_tok, self.num_local_experts
            ));
        }
        self.attn_config().validate()
    }

    /// Layers on one track's path through the stack (B · D).
    pub fn track_depth(&self) -> usize {
        self.num_track_blocks * self.track_block_depth
    }
    /// Layers in the whole model (T · B · D).
    pub fn total_layers(&self) -> usize {
        self.num_tracks * self.track_depth()
    }
    /// Layer `j` of a track (counted across blocks) is global attention with NoPE.
    pub fn is_global(&self, j: usize) -> bool {
        (j + 1).is_multiple_of(self.global_attn_every)
    }
    /// Layer `j` of a track has a MoE FFN.
    pub fn is_moe(&self, j: usize) -> bool {
        j % 2 == 1
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }
    /// Local (sliding-window) and global layers on one track's path.
    pub fn local_global_layers(&self) -> (usize, usize) {
        let g = (0..self.track_depth())
            .filter(|&j| self.is_global(j))
            .count();
        (self.track_depth() - g, g)
    }

    /// The attention / RoPE geometry as the shared modules read it (a Llama-style config).
    pub fn attn_config(&self) -> TextConfig {
        TextConfig {
            model_type: "llama".into(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.track_depth(),
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            rope_scaling: None,
            rope_parameters: None,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qk_norm: self.qk_norm,
            qk_norm_after_rope: false,
            kv_fake_quant: false,
            kv_fake_quant_skip_first: false,
            norm_gain_fp32: false,
            num_segment1_layers: 0,
            kv_source_layer: None,
            attention_bias: false,
            bos_token_id: self.bos_token_id,
            eos_token_id: self.eos_token_id.clone(),
            pad_token_id: None,
            torch_dtype: None,
            architectures: None,
        }
    }

    /// K/V bytes one token adds to one layer.
    pub fn kv_bytes_per_token_per_layer(&self, bytes_per_elem: usize) -> usize {
        2 * self.num_kv_heads() * self.head_dim() * bytes_per_elem
    }

    /// K/V bytes per token over all tracks: (local layers, global layers).
    pub fn kv_bytes_per_token(&self, bytes_per_elem: usize) -> (usize, usize) {
        let per = self.kv_bytes_per_token_per_layer(bytes_per_elem) * self.num_tracks;
        let (l, g) = self.local_global_layers();
        (l * per, g * per)
    }

    /// K/V bytes held after `tokens` tokens: (local layers, bounded by the window; global).
    pub fn kv_bytes_at(&self, tokens: usize, bytes_per_elem: usize) -> (u64, u64) {
        let (l, g) = self.kv_bytes_per_token(bytes_per_elem);
        (
            (l * tokens.min(self.sliding_window)) as u64,
            (g * tokens) as u64,
        )
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// The PT-MoE presets with a one-line description.
pub const PTMOE_PRESETS: &[(&str, &str)] = &[
    (
        "afm-server-ptmoe",
        "PT-MoE server (illustrative sizes, none published): 4 tracks × 4 blocks × 4 layers, width 3072, 16 experts top-2, window 4096",
    ),
    (
        "bench-ptmoe",
        "PT-MoE bench: 2 tracks × 2 blocks × 4 layers, width 256, 8 experts top-2, window 64",
    ),
    (
        "tiny-ptmoe",
        "test preset: 2 tracks × 2 blocks × 4 layers, width 64, 4 experts top-2, window 8",
    ),
    (
        "tiny-ptmoe-3track",
        "test preset: 3 tracks × 3 blocks × 2 layers (sum merge), width 32, 3 experts top-2, window 5",
    ),
];

pub fn is_ptmoe_preset(name: &str) -> bool {
    PTMOE_PRESETS.iter().any(|(n, _)| *n == name)
}

#[allow(clippy::too_many_arguments)]
fn ptmoe(
    vocab: usize,
    hidden: usize,
    ffn: usize,
    moe_ffn: usize,
    experts: usize,
    tracks: usize,
    blocks: usize,
    depth: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: usize,
    ctx: usize,
) -> PtMoeConfig {
    PtMoeConfig {
        model_type: default_model_type(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: ffn,
        moe_intermediate_size: moe_ffn,
        num_local_experts: experts,
        num_experts_per_tok: 2,
        norm_topk_prob: true,
        num_tracks: tracks,
        num_track_blocks: blocks,
        track_block_depth: depth,
        track_merge: TrackMerge::Mean,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: Some(head_dim),
        sliding_window: window,
        global_attn_every: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 500_000.0,
        max_position_embeddings: ctx,
        tie_word_embeddings: true,
        qk_norm: false,
        router_aux_loss_coef: 0.01,
        bos_token_id: Some(1),
        eos_token_id: Some(TokenIds::One(2)),
    }
}

/// Look a PT-MoE preset up by name.
pub fn ptmoe_preset(name: &str) -> Result<PtMoeConfig> {
    Ok(match name {
        // Illustrative: 153,600 vocabulary (as on-device), width 3072 = 24 × 128 heads, 4 KV
        // heads, dense FFN 8192, 16 experts × 2048 top-2, 4 tracks of 4 blocks × 4 layers.
        "afm-server-ptmoe" => ptmoe(
            153_600, 3072, 8192, 2048, 16, 4, 4, 4, 24, 4, 128, 4096, 65_536,
        ),
        "bench-ptmoe" => ptmoe(8192, 256, 768, 384, 8, 2, 2, 4, 4, 2, 64, 64, 4096),
        "tiny-ptmoe" => ptmoe(256, 64, 128, 64, 4, 2, 2, 4, 4, 2, 16, 8, 512),
        "tiny-ptmoe-3track" => PtMoeConfig {
            num_local_experts: 3,
            track_merge: TrackMerge::Sum,
            ..ptmoe(128, 32, 64, 32, 3, 3, 3, 2, 2, 1, 16, 5, 256)
        },
        _ => {
            return Err(TextError::UnknownPreset {
                name: name.into(),
                known: PTMOE_PRESETS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_layouts_interleave() {
        for (name, _) in PTMOE_PRESETS {
            ptmoe_preset(name).unwrap().validate().unwrap();
        }
        let c = ptmoe_preset("tiny-ptmoe").unwrap();
        let global: Vec<bool> = (0..8).map(|j| c.is_global(j)).collect();
        assert_eq!(
            global,
            [false, false, false, true, false, false, false, true]
        );
        let moe: Vec<bool> = (0..4).map(|j| c.is_moe(j)).collect();
        assert_eq!(moe, [false, true, false, true]);
        assert_eq!(c.local_global_layers(), (6, 2));
        let json = c.to_json_pretty();
        assert_eq!(PtMoeConfig::from_json_str(&json).unwrap(), c);
    }

    #[test]
    fn local_kv_is_flat_beyond_the_window() {
        let c = ptmoe_preset("afm-server-ptmoe").unwrap();
        let w = c.sliding_window;
        let (l1, g1) = c.kv_bytes_at(w, 2);
        let (l4, g4) = c.kv_bytes_at(4 * w, 2);
        let (l16, g16) = c.kv_bytes_at(16 * w, 2);
        assert_eq!((l1, l4), (l4, l16));
        assert_eq!((g4, g16), (4 * g1, 16 * g1));
    }
}
