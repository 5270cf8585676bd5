//! What `afm-vl inspect` reports, computed from the configuration alone (no weights are
//! materialised, so the 3B preset is inspected in microseconds).

use serde::Serialize;

use crate::config::TextConfig;
use crate::decoder::weight_shapes;
use crate::ptmoe::ptmoe_weight_shapes;
use crate::ptmoe_config::PtMoeConfig;

#[derive(Debug, Clone, Serialize)]
pub struct ComponentParams {
    pub name: String,
    pub params: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub model_type: String,
    pub layers: usize,
    pub segment0_layers: usize,
    pub segment1_layers: usize,
    pub kv_source_layer: Option<usize>,
    pub components: Vec<ComponentParams>,
    pub total_params: u64,
    pub bytes_per_weight: usize,
    pub weight_bytes: u64,
    /// K/V bytes per token at `bytes_per_weight` (cache dtype = model dtype).
    pub kv_bytes_per_token: u64,
    /// Same depth with every layer owning its K/V.
    pub kv_bytes_per_token_dense: u64,
    pub kv_ratio: f64,
}

impl ModelReport {
    pub fn new(cfg: &TextConfig, bytes_per_weight: usize) -> Self {
        let mut emb = 0u64;
        let mut head = 0u64;
        let mut norms = 0u64;
        let (mut a0, mut f0, mut a1, mut f1) = (0u64, 0u64, 0u64, 0u64);
        for (name, shape) in weight_shapes(cfg) {
            let n: u64 = shape.iter().map(|&d| d as u64).product();
            if name == "model.embed_tokens.weight" {
                emb += n;
            } else if name == "lm_head.weight" {
                head += n;
            } else if name.ends_with("norm.weight") && !name.contains("self_attn") {
                norms += n;
            } else {
                let layer: usize = name
                    .strip_prefix("model.layers.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                let seg1 = cfg.is_segment1(layer);
                let attn = name.contains("self_attn");
                match (seg1, attn) {
                    (false, true) => a0 += n,
                    (false, false) => f0 += n,
                    (true, true) => a1 += n,
                    (true, false) => f1 += n,
                }
            }
        }
        let tied = if cfg.tie_word_embeddings {
            " (tied with the output head)"
        } else {
            ""
        };
        let mut components = vec![ComponentParams {
            name: format!("embedding{tied}"),
            params: emb,
        }];
        components.push(ComponentParams {
            name: "segment 0 attention".into(),
            params: a0,
        });
        components.push(ComponentParams {
            name: "segment 0 FFN".into(),
            params: f0,
        });
        if cfg.num_segment1_layers > 0 {
            components.push(ComponentParams {
                name: "segment 1 attention (Q, O only)".into(),
                params: a1,
            });
            components.push(ComponentParams {
                name: "segment 1 FFN".into(),
                params: f1,
            });
        }
        components.push(ComponentParams {
            name: "RMSNorms".into(),
            params: norms,
        });
        if head > 0 {
            components.push(ComponentParams {
                name: "output head".into(),
                params: head,
            });
        }
        let total: u64 = components.iter().map(|c| c.params).sum();
        let kv = cfg.kv_bytes_per_token(bytes_per_weight) as u64;
        let dense = TextConfig {
            num_segment1_layers: 0,
            ..cfg.clone()
        }
        .kv_bytes_per_token(bytes_per_weight) as u64;
        Self {
            model_type: cfg.model_type.clone(),
            layers: cfg.num_hidden_layers,
            segment0_layers: cfg.num_segment0_layers(),
            segment1_layers: cfg.num_segment1_layers,
            kv_source_layer: (cfg.num_segment1_layers > 0).then(|| cfg.kv_source()),
            components,
            total_params: total,
            bytes_per_weight,
            weight_bytes: total * bytes_per_weight as u64,
            kv_bytes_per_token: kv,
            kv_bytes_per_token_dense: dense,
            kv_ratio: kv as f64 / dense as f64,
        }
    }
}

/// What `afm-vl inspect` reports for a PT-MoE (server) configuration.
#[derive(Debug, Clone, Serialize)]
pub struct PtMoeReport {
    pub model_type: String,
    pub tracks: usize,
    pub track_blocks: usize,
    pub track_block_depth: usize,
    /// Layers on one track's path (blocks × depth) and in the whole model (× tracks).
    pub track_depth: usize,
    pub total_layers: usize,
    pub local_layers_per_track: usize,
    pub global_layers_per_track: usize,
    pub moe_layers_per_track: usize,
    pub components: Vec<ComponentParams>,
    pub total_params: u64,
    /// Parameters one token goes through: every track's attention and dense FFN, the routers
    /// and top-k of E experts per MoE layer, embedding and head.
    pub active_params_per_token: u64,
    pub bytes_per_weight: usize,
    pub weight_bytes: u64,
    /// Track merges per forward (= track blocks).
    pub sync_points_per_forward: usize,
    /// Tensor parallelism over the same depth: two all-reduces per layer.
    pub sync_points_tensor_parallel: usize,
    /// K/V bytes per token over all tracks, sliding-window layers and global layers.
    pub kv_bytes_per_token_local: u64,
    pub kv_bytes_per_token_global: u64,
    pub sliding_window: usize,
    /// (tokens, local-layer bytes, global-layer bytes) at 1×, 4× and 16× the window.
    pub kv_bytes_at_window_multiples: Vec<(usize, u64, u64)>,
}

impl PtMoeReport {
    pub fn new(cfg: &PtMoeConfig, bytes_per_weight: usize) -> Self {
        let (mut emb, mut head, mut norms, mut attn, mut dense, mut experts, mut routers) =
            (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        for (name, shape) in ptmoe_weight_shapes(cfg) {
            let n: u64 = shape.iter().map(|&d| d as u64).product();
            if name == "model.embed_tokens.weight" {
                emb += n;
            } else if name == "lm_head.weight" {
                head += n;
            } else if name.contains("self_attn") {
                attn += n;
            } else if name.ends_with("norm.weight") {
                norms += n;
            } else if name.contains(".mlp.experts.") {
                experts += n;
            } else if name.ends_with(".mlp.gate.weight") {
                routers += n;
            } else {
                dense += n;
            }
        }
        let tied = if cfg.tie_word_embeddings {
            " (tied with the output head)"
        } else {
            ""
        };
        let mut components = vec![
            ComponentParams {
                name: format!("embedding{tied}"),
                params: emb,
            },
            ComponentParams {
                name: "attention (all tracks)".into(),
                params: attn,
            },
            ComponentParams {
                name: "dense FFN".into(),
                params: dense,
            },
            ComponentParams {
                name: format!(
                    "MoE experts ({} × top-{})",
                    cfg.num_local_experts, cfg.num_experts_per_tok
                ),
                params: experts,
            },
            ComponentParams {
                name: "MoE routers".into(),
                params: routers,
            },
            ComponentParams {
                name: "RMSNorms".into(),
                params: norms,
            },
        ];
        if head > 0 {
            components.push(ComponentParams {
                name: "output head".into(),
                params: head,
            });
        }
        let total: u64 = components.iter().map(|c| c.params).sum();
        let active_experts =
            experts / cfg.num_local_experts as u64 * cfg.num_experts_per_tok as u64;
        let active = total - experts + active_experts;
        let (local, global) = cfg.local_global_layers();
        let (kl, kg) = cfg.kv_bytes_per_token(bytes_per_weight);
        let w = cfg.sliding_window;
        Self {
            model_type: cfg.model_type.clone(),
            tracks: cfg.num_tracks,
            track_blocks: cfg.num_track_blocks,
            track_block_depth: cfg.track_block_depth,
            track_depth: cfg.track_depth(),
            total_layers: cfg.total_layers(),
            local_layers_per_track: local,
            global_layers_per_track: global,
            moe_layers_per_track: (0..cfg.track_depth()).filter(|&j| cfg.is_moe(j)).count(),
            components,
            total_params: total,
            active_params_per_token: active,
            bytes_per_weight,
            weight_bytes: total * bytes_per_weight as u64,
            sync_points_per_forward: cfg.num_track_blocks,
            sync_points_tensor_parallel: 2 * cfg.track_depth(),
            kv_bytes_per_token_local: kl as u64,
            kv_bytes_per_token_global: kg as u64,
            sliding_window: w,
            kv_bytes_at_window_multiples: [1, 4, 16]
                .iter()
                .map(|m| {
                    let (l, g) = cfg.kv_bytes_at(m * w, bytes_per_weight);
                    (m * w, l, g)
                })
                .collect(),
        }
    }
}

/// 1234567 → "1.23M".
pub fn human_count(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.2}B", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.2}M", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1}K", f / 1e3)
    } else {
        n.to_string()
    }
}

/// Bytes in binary units.
pub fn human_bytes(n: u64) -> String {
    let f = n as f64;
    if f >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", f / (1u64 << 30) as f64)
    } else if f >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", f / (1u64 << 20) as f64)
    } else if f >= 1024.0 {
        format!("{:.1} KiB", f / 1024.0)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::preset;

    #[test]
    fn two_segment_16_kv_ratio_is_exactly_0_625() {
        let r = ModelReport::new(&preset("bench-two-segment-16").unwrap(), 2);
        assert_eq!(r.segment0_layers, 10);
        assert_eq!(
            r.kv_bytes_per_token * 1000,
            r.kv_bytes_per_token_dense * 625
        );
        assert_eq!(r.kv_ratio, 0.625);
    }

    #[test]
    fn ptmoe_report_counts_active_params_and_sync_points() {
        let cfg = crate::ptmoe_config::ptmoe_preset("tiny-ptmoe").unwrap();
        let r = PtMoeReport::new(&cfg, 4);
        let m =
            crate::ptmoe::PtMoe::random(&cfg, 0, tch::Device::Cpu, tch::Kind::Float, &[]).unwrap();
        assert_eq!(r.total_params, m.num_params() as u64);
        let expert = 3 * 64 * 64u64;
        let moe_layers = (r.moe_layers_per_track * r.tracks) as u64;
        assert_eq!(
            r.total_params - r.active_params_per_token,
            moe_layers * 2 * expert
        );
        assert_eq!(r.sync_points_per_forward, 2);
        assert_eq!(r.sync_points_tensor_parallel, 16);
        let at = &r.kv_bytes_at_window_multiples;
        assert_eq!((at[0].1, at[1].1), (at[1].1, at[2].1));
    }

    #[test]
    fn draft_preset_is_48_77m() {
        let r = ModelReport::new(&preset("afm-draft-48m").unwrap(), 2);
        assert_eq!(human_count(r.total_params), "48.77M");
    }
}
