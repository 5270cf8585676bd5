//! Named decoder configurations: the AFM models of SPEC.md and tiny presets for tests.

use crate::config::{TextConfig, TokenIds};
use crate::error::{Result, TextError};

#[allow(clippy::too_many_arguments)]
fn base(
    model_type: &str,
    vocab: usize,
    hidden: usize,
    ffn: usize,
    layers: usize,
    seg1: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    qk_norm: bool,
    theta: f64,
    ctx: usize,
) -> TextConfig {
    TextConfig {
        model_type: model_type.into(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv_heads),
        head_dim: Some(head_dim),
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        rope_scaling: None,
        rope_parameters: None,
        max_position_embeddings: ctx,
        tie_word_embeddings: true,
        qk_norm,
        qk_norm_after_rope: false,
        kv_fake_quant: false,
        kv_fake_quant_skip_first: false,
        norm_gain_fp32: false,
        num_segment1_layers: seg1,
        kv_source_layer: None,
        attention_bias: false,
        bos_token_id: Some(1),
        eos_token_id: Some(TokenIds::One(2)),
        pad_token_id: None,
        torch_dtype: None,
        architectures: None,
    }
}

/// Every preset name with a one-line description.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "afm-2025-ondevice-3b",
        "AFM 2025 on-device: 56 layers = 35 + 21 (KV reuse), width 2048, 16×128 heads, 2 KV heads, QK-norm",
    ),
    (
        "afm-2024-ondevice",
        "AFM 2024 on-device: 26 layers, width 3072, 24×128 heads, 8 KV heads, vocab 49k",
    ),
    (
        "afm-draft-48m",
        "speculative-decoding draft: 12 layers, width 256, 8×32 heads, 4 KV heads, FFN 768",
    ),
    (
        "bench-two-segment-16",
        "16 layers = 10 + 6, width 512: two-segment side of the TTFT benchmark",
    ),
    (
        "bench-dense-16",
        "16 dense layers, width 512: dense side of the TTFT benchmark",
    ),
    ("tiny-dense", "test preset: 4 dense layers, width 64"),
    (
        "tiny-two-segment",
        "test preset: 6 layers = 4 + 2, width 64, QK-norm",
    ),
];

/// Look a preset up by name.
pub fn preset(name: &str) -> Result<TextConfig> {
    let cfg = match name {
        "afm-2025-ondevice-3b" => base(
            "afm_two_segment",
            153_600,
            2048,
            6656,
            56,
            21,
            16,
            2,
            128,
            true,
            500_000.0,
            4096,
        ),
        "afm-2024-ondevice" => base(
            "llama", 49_152, 3072, 8192, 26, 0, 24, 8, 128, false, 500_000.0, 4096,
        ),
        "afm-draft-48m" => base(
            "llama", 153_600, 256, 768, 12, 0, 8, 4, 32, false, 500_000.0, 4096,
        ),
        "bench-two-segment-16" => base(
            "afm_two_segment",
            8192,
            512,
            1536,
            16,
            6,
            8,
            2,
            64,
            true,
            500_000.0,
            4096,
        ),
        "bench-dense-16" => base(
            "afm_two_segment",
            8192,
            512,
            1536,
            16,
            0,
            8,
            2,
            64,
            true,
            500_000.0,
            4096,
        ),
        "tiny-dense" => base("llama", 256, 64, 128, 4, 0, 4, 2, 16, false, 10_000.0, 512),
        "tiny-two-segment" => base(
            "afm_two_segment",
            256,
            64,
            128,
            6,
            2,
            4,
            2,
            16,
            true,
            500_000.0,
            512,
        ),
        _ => {
            return Err(TextError::UnknownPreset {
                name: name.into(),
                known: PRESETS
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
        }
    };
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_valid() {
        for (name, _) in PRESETS {
            let cfg = preset(name).unwrap();
            cfg.validate().unwrap();
        }
        assert!(preset("nope").is_err());
    }

    #[test]
    fn afm_2025_geometry() {
        let c = preset("afm-2025-ondevice-3b").unwrap();
        assert_eq!(c.num_segment0_layers(), 35);
        assert_eq!(c.kv_source(), 34);
        // K/V projections 2048 → 256.
        assert_eq!(c.num_kv_heads() * c.head_dim(), 256);
        // KV cache is 35/56 = 62.5% of the same stack without reuse.
        let dense = TextConfig {
            num_segment1_layers: 0,
            ..c.clone()
        };
        assert_eq!(
            c.kv_bytes_per_token(2) * 1000 / dense.kv_bytes_per_token(2),
            625
        );
    }
}
