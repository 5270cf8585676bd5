//! The vision → language adapter (SPEC.md, "Adapter"):
//!
//! ```text
//! encoder tokens [B, gh, gw, Cv] (+ registers [B, R, Cv])
//!   → one transformer layer at vision width (global attention; registers join the sequence)
//!   → linear projection Cv → Ct                                  [B, gh, gw, Ct]
//!   → 3×3 conv (stride 1, padding 1) over the token grid          [B, Ct, gh, gw]
//!   → adaptive average pooling to pool × pool                     [B, Ct, P, P]
//!   → row-major tokens (+ projected registers when kept)          [B, P·P (+R), Ct]
//!   → optional LayerNorm (our choice: puts visual tokens on the scale of the text embeddings)
//! ```
//!
//! Parameters live in a `tch::nn::VarStore` (names `layer.*`, `proj.*`, `conv.*`, `norm.*`
//! under the caller's path), so the adapter trains with tch autograd.

use serde::{Deserialize, Serialize};
use tch::{nn, nn::Module, Tensor};

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
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            text_hidden_size: 2048,
            pool: 12,
            keep_registers: false,
            output_norm: true,
            output_norm_init: 1.0,
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
    }

    pub fn validate(&self) -> Result<()> {
        if self.pool < 1 || self.text_hidden_size < 1 {
            return Err(FusionError::InvalidArgument(format!(
                "adapter: pool ({}) and text_hidden_size ({}) must be positive",
                self.pool, self.text_hidden_size
            )));
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Adapter {
    pub config: AdapterConfig,
    layer: Block,
    proj: nn::Linear,
    conv: nn::Conv2D,
    norm: Option<nn::LayerNorm>,
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
        })
    }

    /// `tokens`: `[B, gh, gw, Cv]`; `registers`: `[B, R, Cv]`. Returns `[B, tokens_per_tile, Ct]`.
    pub fn forward(&self, tokens: &Tensor, registers: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, _, _) = tokens.size4()?;
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
        if let Some(norm) = &self.norm {
            x = norm.forward(&x);
        }
        debug_assert_eq!(x.size()[0], b);
        Ok(x)
    }
}
