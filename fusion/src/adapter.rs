//! The vision → language adapter (SPEC.md, "Adapter"):
//!
//! ```text
//! encoder tokens [B, gh, gw, Cv] (+ registers [B, R, Cv])
//!   → one transformer layer at vision width (global attention; registers join the sequence)
//!   → linear projection Cv → Ct                                  [B, gh, gw, Ct]
//!   → 3×3 conv (stride 1, padding 1) over the token grid          [B, Ct, gh, gw]
//!   → adaptive average pooling to pool × pool                     [B, Ct, P, P]
//!   → row-major tokens (+ projected registers when kept)          [B, P·P (+R), Ct]
//!   (+ the optional count token, below)                           [B, P·P (+R) (+1), Ct]
//!   → optional LayerNorm (our choice: puts visual tokens on the scale of the text embeddings)
//! ```
//!
//! The **count token** (our addition, off unless configured; the demo checkpoint uses it):
//! averages keep proportions and lose numbers (attention normalises, pooling averages), so a
//! small model reads "how many" poorly from them. The count token *sums* instead: a linear
//! detector gives each encoder token a softmax over `classes` + 1 (the last one: nothing), the
//! class probabilities are summed over the tile's grid (soft counts `c_k`), and each `c_k` picks,
//! by linear interpolation between its two nearest integers `0..=max_count`, rows of a learnt
//! table `[classes, max_count + 1, Ct]`; the token is the sum of the picked rows. Trained end to
//! end with the rest; the demo also supervises the detector with object centres.
//!
//! Parameters live in a `tch::nn::VarStore` (names `layer.*`, `proj.*`, `conv.*`, `norm.*`
//! under the caller's path), so the adapter trains with tch autograd.

use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Kind, Tensor};

use afm_vision::block::Block;
use afm_vision::VitConfig;

use crate::error::{FusionError, Result};

/// Adapter configuration (the `adapter` section of a VLM `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdapterConfig {
    /// Output width: the text model's hidden size.
    pub text_hidden_size: i64,
    /// Side of the pooled grid: `pool × pool` tokens per tile (default 12 → 144).
    pub pool: i64,
    /// Append the encoder's register tokens (projected) after the grid tokens of each tile.
    pub keep_registers: bool,
    /// LayerNorm on the output tokens.
    pub output_norm: bool,
    /// Initial gain of that LayerNorm (the text embeddings' typical RMS is a good value).
    pub output_norm_init: f64,
    /// Append a count token per tile (see the module docs); `None` (the default): no count token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count_token: Option<CountTokenConfig>,
}

/// The count token's sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CountTokenConfig {
    /// Kinds of thing the detector tells apart (besides "nothing").
    pub classes: i64,
    /// Largest count with its own table row; larger soft counts use it too.
    pub max_count: i64,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            text_hidden_size: 2048,
            pool: 12,
            keep_registers: false,
            output_norm: true,
            output_norm_init: 1.0,
            count_token: None,
        }
    }
}

impl AdapterConfig {
    /// Visual tokens per tile.
    pub fn tokens_per_tile(&self, num_registers: i64) -> i64 {
        self.pool * self.pool
            + if self.keep_registers {
                num_registers
            } else {
                0
            }
            + i64::from(self.count_token.is_some())
    }

    pub fn validate(&self) -> Result<()> {
        if self.pool < 1 || self.text_hidden_size < 1 {
            return Err(FusionError::InvalidArgument(format!(
                "adapter: pool ({}) and text_hidden_size ({}) must be positive",
                self.pool, self.text_hidden_size
            )));
        }
        if self.pool > 64 || self.text_hidden_size > 1 << 17 {
            return Err(FusionError::InvalidArgument(format!(
                "adapter: pool ({}) must be at most 64 and text_hidden_size ({}) at most {}",
                self.pool,
                self.text_hidden_size,
                1 << 17
            )));
        }
        if let Some(c) = &self.count_token {
            if c.classes > 4096 || c.max_count > 4096 {
                return Err(FusionError::InvalidArgument(format!(
                    "adapter.count_token: classes ({}) and max_count ({}) must be at most 4096",
                    c.classes, c.max_count
                )));
            }
            if c.classes < 1 || c.max_count < 1 {
                return Err(FusionError::InvalidArgument(format!(
                    "adapter.count_token: classes ({}) and max_count ({}) must be positive",
                    c.classes, c.max_count
                )));
            }
        }
        Ok(())
    }
}

/// The count token's parameters: the per-token detector and the (class, count) table.
#[derive(Debug)]
struct CountToken {
    config: CountTokenConfig,
    /// Encoder width → classes + 1 (the last logit: nothing).
    detector: nn::Linear,
    /// `[classes, max_count + 1, Ct]`.
    table: Tensor,
}

impl CountToken {
    fn new(p: &nn::Path, cv: i64, ct: i64, config: &CountTokenConfig) -> Result<Self> {
        let table = p.var(
            "table",
            &[config.classes, config.max_count + 1, ct],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        );
        // Count 0 starts at zero: an empty tile's token is then all bias-free zeros, and each
        // present class adds its own row.
        tch::no_grad(|| table.f_narrow(1, 0, 1)?.f_zero_().map(|_| ()))?;
        Ok(Self {
            config: config.clone(),
            detector: nn::linear(p / "detector", cv, config.classes + 1, Default::default()),
            table,
        })
    }

    /// Per-token class logits: `[B, gh, gw, Cv]` → `[B, gh·gw, classes + 1]`.
    fn logits(&self, tokens: &Tensor) -> Result<Tensor> {
        let k = self.config.classes + 1;
        Ok(self
            .detector
            .forward(tokens)
            .f_reshape([tokens.size()[0], -1, k])?)
    }

    /// Soft counts `[B, classes]`: class probabilities summed over the grid.
    fn counts(&self, logits: &Tensor) -> Result<Tensor> {
        Ok(logits
            .f_softmax(-1, Kind::Float)?
            .f_narrow(2, 0, self.config.classes)?
            .f_sum_dim_intlist(1, false, Kind::Float)?)
    }

    /// The token `[B, Ct]` of soft counts `[B, classes]`.
    fn token(&self, counts: &Tensor) -> Result<Tensor> {
        let m = self.config.max_count;
        // Linear interpolation weights: 1 − |c − v| clipped at 0, for c clamped to [0, M].
        let levels = Tensor::f_arange(m + 1, (Kind::Float, counts.device()))?; // [M+1]
        let w = counts
            .f_clamp(0.0, m as f64)?
            .f_unsqueeze(-1)?
            .f_sub(&levels)?
            .f_abs()?
            .f_neg()?
            .f_add_scalar(1.0)?
            .f_clamp_min(0.0)?; // [B, K, M+1]
        let (b, k, _) = w.size3()?;
        let table = self.table.f_reshape([k * (m + 1), -1])?; // [K·(M+1), Ct]
        Ok(w.f_reshape([b, k * (m + 1)])?.f_matmul(&table)?) // [B, Ct]
    }
}

#[derive(Debug)]
pub struct Adapter {
    pub config: AdapterConfig,
    layer: Block,
    proj: nn::Linear,
    conv: nn::Conv2D,
    norm: Option<nn::LayerNorm>,
    count: Option<CountToken>,
}

impl Adapter {
    /// Parameters under `p`; the transformer layer takes width, heads and MLP size from `vision`.
    pub fn new(p: &nn::Path, vision: &VitConfig, config: &AdapterConfig) -> Result<Self> {
        config.validate()?;
        let layer_cfg = VitConfig {
            window_size: 0,
            global_block_indices: Vec::new(),
            ..vision.clone()
        };
        let ct = config.text_hidden_size;
        let conv = nn::conv2d(
            p / "conv",
            ct,
            ct,
            3,
            nn::ConvConfig {
                stride: 1,
                padding: 1,
                ..Default::default()
            },
        );
        let norm = config.output_norm.then(|| {
            let ln = nn::LayerNormConfig {
                ws_init: nn::Init::Const(config.output_norm_init),
                ..Default::default()
            };
            nn::layer_norm(p / "norm", vec![ct], ln)
        });
        Ok(Self {
            config: config.clone(),
            layer: Block::new(p / "layer", &layer_cfg, 0),
            proj: nn::linear(p / "proj", vision.hidden_size, ct, Default::default()),
            conv,
            norm,
            count: config
                .count_token
                .as_ref()
                .map(|c| CountToken::new(&(p / "count"), vision.hidden_size, ct, c))
                .transpose()?,
        })
    }

    /// The count token's detector logits `[B, gh·gw, classes + 1]` for encoder tokens
    /// `[B, gh, gw, Cv]` (the last class: nothing), or `None` without a count token.
    pub fn count_logits(&self, tokens: &Tensor) -> Result<Option<Tensor>> {
        self.count.as_ref().map(|c| c.logits(tokens)).transpose()
    }

    /// Soft counts `[B, classes]` of detector logits from [`Self::count_logits`].
    pub fn soft_counts(&self, logits: &Tensor) -> Result<Tensor> {
        match &self.count {
            Some(c) => c.counts(logits),
            None => Err(FusionError::InvalidArgument(
                "this adapter has no count token".into(),
            )),
        }
    }

    /// `tokens`: `[B, gh, gw, Cv]`; `registers`: `[B, R, Cv]`. Returns `[B, tokens_per_tile, Ct]`.
    pub fn forward(&self, tokens: &Tensor, registers: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, _, _) = tokens.size4()?;
        let count = match &self.count {
            Some(c) => Some(c.token(&c.counts(&c.logits(tokens)?)?)?), // [B, Ct]
            None => None,
        };
        let (x, regs) = self.layer.forward(tokens, registers)?;
        let x = self.proj.forward(&x); // [B, gh, gw, Ct]
        let x = x.f_permute([0, 3, 1, 2])?; // [B, Ct, gh, gw]
        let x = self.conv.forward(&x);
        let p = self.config.pool;
        let x = x.f_adaptive_avg_pool2d([p, p])?; // [B, Ct, P, P]
        let mut x = x.f_flatten(2, 3)?.f_transpose(1, 2)?; // [B, P·P, Ct]
        if self.config.keep_registers {
            if let Some(r) = regs {
                x = Tensor::f_cat(&[x, self.proj.forward(&r)], 1)?; // [B, P·P + R, Ct]
            }
        }
        if let Some(c) = count {
            x = Tensor::f_cat(&[x, c.f_unsqueeze(1)?], 1)?; // [B, … + 1, Ct]
        }
        if let Some(norm) = &self.norm {
            x = norm.forward(&x);
        }
        debug_assert_eq!(x.size()[0], b);
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn vision() -> VitConfig {
        VitConfig {
            hidden_size: 8,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 16,
            patch_size: 4,
            image_size: 16,
            pretrain_image_size: 16,
            window_size: 0,
            global_block_indices: Vec::new(),
            num_register_tokens: 1,
            conv_stem: Vec::new(),
            ..VitConfig::default()
        }
    }

    /// 3 classes, counts up to 3, output width 3 · 4 = 12, so that an identity table shows the
    /// interpolation weights themselves.
    fn adapter(vs: &nn::VarStore) -> Adapter {
        let cfg = AdapterConfig {
            text_hidden_size: 12,
            pool: 2,
            keep_registers: true,
            output_norm: false,
            output_norm_init: 1.0,
            count_token: Some(CountTokenConfig {
                classes: 3,
                max_count: 3,
            }),
        };
        Adapter::new(&vs.root(), &vision(), &cfg).unwrap()
    }

    #[test]
    fn count_token_interpolates_between_the_nearest_counts() {
        let vs = nn::VarStore::new(Device::Cpu);
        let a = adapter(&vs);
        let c = a.count.as_ref().unwrap();
        tch::no_grad(|| {
            let eye = Tensor::eye(12, (Kind::Float, Device::Cpu)).reshape([3, 4, 12]);
            c.table.shallow_clone().copy_(&eye)
        });
        let counts = Tensor::from_slice(&[0.0f32, 2.5, 7.0, 1.0, 0.25, -1.0]).reshape([2, 3]);
        let got: Vec<f32> = Vec::try_from(c.token(&counts).unwrap().flatten(0, -1)).unwrap();
        #[rustfmt::skip]
        let want = [
            1.0, 0.0, 0.0, 0.0,   0.0, 0.0, 0.5, 0.5,    0.0, 0.0, 0.0, 1.0,
            0.0, 1.0, 0.0, 0.0,   0.75, 0.25, 0.0, 0.0,  1.0, 0.0, 0.0, 0.0f32,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn soft_counts_sum_the_detections_and_the_token_is_appended() {
        let vs = nn::VarStore::new(Device::Cpu);
        let a = adapter(&vs);
        let c = a.count.as_ref().unwrap();
        // Class 1 fires where channel 0 is 1 (logit 40 against "nothing" at 20), nothing else.
        tch::no_grad(|| {
            let w = Tensor::zeros([4, 8], (Kind::Float, Device::Cpu));
            let _ = w.get(1).get(0).fill_(40.0);
            c.detector.ws.shallow_clone().copy_(&w);
            let b = Tensor::from_slice(&[-20.0f32, 0.0, -20.0, 20.0]);
            c.detector.bs.as_ref().unwrap().shallow_clone().copy_(&b);
        });
        // [1, 4, 4, 8]: three tokens with channel 0 set.
        let tokens = Tensor::zeros([1, 4, 4, 8], (Kind::Float, Device::Cpu));
        for (i, j) in [(0, 0), (1, 3), (3, 2)] {
            let _ = tokens.get(0).get(i).get(j).get(0).fill_(1.0);
        }
        let logits = a.count_logits(&tokens).unwrap().unwrap();
        assert_eq!(logits.size(), [1, 16, 4]);
        let counts: Vec<f32> =
            Vec::try_from(a.soft_counts(&logits).unwrap().flatten(0, -1)).unwrap();
        assert!(
            (counts[0]).abs() < 1e-6 && (counts[1] - 3.0).abs() < 1e-5 && counts[2].abs() < 1e-6,
            "{counts:?}"
        );
        let regs = Tensor::zeros([1, 1, 8], (Kind::Float, Device::Cpu));
        let out = a.forward(&tokens, Some(&regs)).unwrap();
        assert_eq!(a.config.tokens_per_tile(1), 2 * 2 + 1 + 1);
        assert_eq!(out.size(), [1, 6, 12]);
        // The last token is the table row of (class 1, count 3) plus the zero rows of count 0.
        let last = out.get(0).get(5);
        let want = c.table.get(1).get(3).detach();
        assert!(last.allclose(&want, 1e-4, 1e-5, false));
    }

    #[test]
    fn configs_without_a_count_token_load_and_save_unchanged() {
        let old = r#"{"text_hidden_size": 576, "pool": 3, "keep_registers": true}"#;
        let cfg: AdapterConfig = serde_json::from_str(old).unwrap();
        assert_eq!(cfg.count_token, None);
        assert_eq!(cfg.tokens_per_tile(1), 10);
        assert!(!serde_json::to_string(&cfg).unwrap().contains("count_token"));
    }
}
