//! Configuration of the server decoder (PT-MoE), HF-style `config.json` field names, and its
//! presets.
//!
//! The stack is `num_track_blocks` track blocks; each runs `num_tracks` independent tracks of
//! `track_block_depth` layers on the same input and merges them (mean, option sum) at the block
//! boundary. Depth inside a track counts across blocks (`j = block · D + layer`):
//! - layer `j`'s FFN is `feed_forward_layer_pattern[j % len]` (`dense` SwiGLU or `sparse`
//!   mixture of experts); without a pattern, MoE when `j` is odd (dense, MoE, dense, MoE, …);
//! - layer `j`'s attention is `attention_layer_pattern[j % len]`: `local_rope` (sliding window
//!   with RoPE, ring-buffer KV cache) or `global_nope` (causal, no positional encoding);
//!   without a pattern, global when `(j + 1) % global_attn_every == 0`.
//!
//! This is Apple's `AFMParallelTrackMoEConfig` (tamm 0.2.0) in our field names; reading a tamm
//! config ([`crate::tamm_ptmoe`]) maps every field. One convention differs: our
//! `sliding_window` counts the keys a query sees *including itself* (query `i` sees
//! `i − window < j ≤ i`), tamm's `local_attention_window_size` W excludes it (`|i − j| ≤ W`),
//! so tamm's W is our `W + 1`.

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

/// A layer's attention (tamm's `attention_layer_pattern` entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttnType {
    /// Sliding window + RoPE.
    #[serde(rename = "local_rope", alias = "local")]
    LocalRope,
    /// Causal over everything, no positional encoding.
    #[serde(rename = "global_nope")]
    GlobalNope,
}

/// A layer's FFN (tamm's `feed_forward_layer_pattern` entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FfnType {
    Dense,
    Sparse,
}

/// A norm of the optional norm slots (tamm's norm specs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormType {
    /// `x / rms(x) · g`.
    RmsNorm,
    /// `rms_norm(x · g)`: the gain scales the input.
    PreScaleRmsNorm,
}

fn default_pre_norm() -> Option<NormType> {
    Some(NormType::RmsNorm)
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
    /// RMSNorm of each head's queries and keys (weights `[head_dim]`).
    #[serde(default)]
    pub qk_norm: bool,
    /// QK-norm after RoPE (tamm's order) rather than before it.
    #[serde(default)]
    pub qk_norm_after_rope: bool,
    /// Attention type per layer, cycled (`local_rope` / `global_nope`); none: every
    /// `global_attn_every`-th layer global.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_layer_pattern: Option<Vec<AttnType>>,
    /// FFN type per layer, cycled (`dense` / `sparse`); none: odd layers sparse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed_forward_layer_pattern: Option<Vec<FfnType>>,
    /// Router logits soft-capped to `cap · tanh(x / cap)` (in fp32) before the softmax; none:
    /// no cap (tamm's `experts_router_logits_cap`, 50 in tamm's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_logits_cap: Option<f64>,
    /// The norm at the start of attention and FFN (`input_layernorm`,
    /// `post_attention_layernorm`); null: none.
    #[serde(default = "default_pre_norm")]
    pub pre_norm: Option<NormType>,
    /// A norm of attention's / the FFN's output before the residual add
    /// (`attn_pre_residual_norm`, `ffn_pre_residual_norm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_residual_norm: Option<NormType>,
    /// A norm after each residual add (`attn_post_norm`, `ffn_post_norm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_norm: Option<NormType>,
    /// A per-track norm of the block input as each track receives it (`dispatch_norm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracks_dispatch_norm: Option<NormType>,
    /// A per-track norm of each track's output before the merge (`combine_norm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracks_combine_norm: Option<NormType>,
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
        if self
            .attention_layer_pattern
            .as_ref()
            .is_some_and(Vec::is_empty)
        {
            return Err("attention_layer_pattern must not be empty".into());
        }
        if self
            .feed_forward_layer_pattern
            .as_ref()
            .is_some_and(Vec::is_empty)
        {
            return Err("feed_forward_layer_pattern must not be empty".into());
        }
        if let Some(c) = self.router_logits_cap {
            if !(c.is_finite() && c > 0.0) {
                return Err(format!(
                    "router_logits_cap must be a positive number, got {c}"
                ));
            }
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
        match &self.attention_layer_pattern {
            Some(p) if !p.is_empty() => p[j % p.len()] == AttnType::GlobalNope,
            _ => (j + 1).is_multiple_of(self.global_attn_every.max(1)),
        }
    }
    /// Layer `j` of a track has a MoE FFN.
    pub fn is_moe(&self, j: usize) -> bool {
        match &self.feed_forward_layer_pattern {
            Some(p) if !p.is_empty() => p[j % p.len()] == FfnType::Sparse,
            _ => j % 2 == 1,
        }
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
            qk_norm_after_rope: self.qk_norm_after_rope,
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
        "PT-MoE server, tamm's AFMParallelTrackMoEConfig defaults: 8 tracks × 12 blocks × 4 layers, width 2048, attention 4 × 128, 40 experts × 2944 top-2, window 4096 (+1), 147.8B / 15.8B active",
    ),
    (
        "bench-ptmoe",
        "PT-MoE bench (tamm's structure): 2 tracks × 2 blocks × 4 layers, width 256, 8 experts top-2, window 64",
    ),
    (
        "tiny-ptmoe",
        "test preset (tamm's structure): 2 tracks × 2 blocks × 4 layers, width 64, 4 experts top-2, window 8",
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
        qk_norm_after_rope: false,
        attention_layer_pattern: None,
        feed_forward_layer_pattern: None,
        router_logits_cap: None,
        pre_norm: default_pre_norm(),
        pre_residual_norm: None,
        post_norm: None,
        tracks_dispatch_norm: None,
        tracks_combine_norm: None,
        router_aux_loss_coef: 0.01,
        bos_token_id: Some(1),
        eos_token_id: Some(TokenIds::One(2)),
    }
}

/// tamm's per-layer structure on a geometry: QK-norm with weights after RoPE, router logits
/// soft-capped at 50.
fn tamm_structure(c: PtMoeConfig) -> PtMoeConfig {
    PtMoeConfig {
        qk_norm: true,
        qk_norm_after_rope: true,
        router_logits_cap: Some(50.0),
        ..c
    }
}

/// Look a PT-MoE preset up by name.
pub fn ptmoe_preset(name: &str) -> Result<PtMoeConfig> {
    Ok(match name {
        // tamm's `AFMParallelTrackMoEConfig()`: vocabulary 153,600, 8 tracks × 48 layers, a
        // sync point every 4 (12 blocks), width 2048, attention 512 = 4 heads × 128 (no GQA),
        // dense FFN 5888, 40 experts × 2944 top-2 with the router capped at 50, RoPE θ 500,000
        // on the local layers, window 4096 excluding the current token (our 4097), every
        // 4th layer global NoPE, odd layers sparse, QK-norm with weights after RoPE, tied head.
        "afm-server-ptmoe" => tamm_structure(ptmoe(
            153_600, 2048, 5888, 2944, 40, 8, 12, 4, 4, 4, 128, 4097, 65_536,
        )),
        "bench-ptmoe" => tamm_structure(ptmoe(8192, 256, 768, 384, 8, 2, 2, 4, 4, 2, 64, 64, 4096)),
        "tiny-ptmoe" => tamm_structure(ptmoe(256, 64, 128, 64, 4, 2, 2, 4, 4, 2, 16, 8, 512)),
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
