//! What `afm-vl inspect` reports, computed from the configuration alone (no weights are
//! materialised, so the 3B preset is inspected in microseconds).

use serde::Serialize;

use crate::config::TextConfig;
use crate::decoder::weight_shapes;

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
    fn draft_preset_is_48_77m() {
        let r = ModelReport::new(&preset("afm-draft-48m").unwrap(), 2);
        assert_eq!(human_count(r.total_params), "48.77M");
    }
}
