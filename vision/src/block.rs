//! A pre-norm transformer block (HF `encoder.layer.{i}`): `x + attn(norm1(x))`, then
//! `x + mlp(norm2(x))`, with window or global attention and optional register tokens.

use tch::{nn, nn::Module, Tensor};

use crate::attention::Attention;
use crate::error::Result;
use crate::mlp::Mlp;
use crate::register_window::{global_attention, window_attention};
use crate::vit_config::VitConfig;

#[derive(Debug)]
pub struct Block {
    norm1: nn::LayerNorm,
    attention: Attention,
    norm2: nn::LayerNorm,
    mlp: Mlp,
    /// Window side in tokens; `None` for a global block.
    pub window: Option<i64>,
    /// Two-pass register-window attention (see [`crate::register_window`]).
    two_pass: bool,
}

impl Block {
    pub fn new(p: nn::Path, cfg: &VitConfig, index: i64) -> Self {
        let ln = nn::LayerNormConfig {
            eps: cfg.layer_norm_eps,
            ..Default::default()
        };
        let c = cfg.hidden_size;
        Self {
            norm1: nn::layer_norm(&p / "norm1", vec![c], ln),
            attention: Attention::new(&p / "attention", cfg),
            norm2: nn::layer_norm(&p / "norm2", vec![c], ln),
            mlp: Mlp::new(&p / "mlp", cfg),
            window: cfg.is_window_block(index).then_some(cfg.window_size),
            two_pass: cfg.register_two_pass,
        }
    }

    /// `x`: `[B, H, W, C]`; `regs`: `[B, R, C]` or `None`. Returns both updated.
    pub fn forward(&self, x: &Tensor, regs: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let xn = self.norm1.forward(x);
        let rn = regs.map(|r| self.norm1.forward(r));
        let (a, ra) = match self.window {
            Some(w) => window_attention(&self.attention, &xn, rn.as_ref(), w, self.two_pass)?,
            None => global_attention(&self.attention, &xn, rn.as_ref())?,
        };
        let x = x.f_add(&a)?;
        let x = x.f_add(&self.mlp.forward(&self.norm2.forward(&x))?)?;
        let regs = match (regs, ra) {
            (Some(r), Some(ra)) => {
                let r = r.f_add(&ra)?;
                Some(r.f_add(&self.mlp.forward(&self.norm2.forward(&r))?)?)
            }
            _ => None,
        };
        Ok((x, regs))
    }
}
