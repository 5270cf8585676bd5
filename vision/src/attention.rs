//! Multi-head self-attention over a token sequence (HF `attention.qkv` / `attention.proj`).

use tch::{nn, nn::Module, Tensor};

use crate::error::Result;
use crate::vit_config::VitConfig;

#[derive(Debug)]
pub struct Attention {
    qkv: nn::Linear,
    proj: nn::Linear,
    heads: i64,
}

impl Attention {
    pub fn new(p: nn::Path, cfg: &VitConfig) -> Self {
        let c = cfg.hidden_size;
        let qkv_cfg = nn::LinearConfig {
            bias: cfg.qkv_bias,
            ..Default::default()
        };
        Self {
            qkv: nn::linear(&p / "qkv", c, 3 * c, qkv_cfg),
            proj: nn::linear(&p / "proj", c, c, Default::default()),
            heads: cfg.num_attention_heads,
        }
    }

    /// `[N, L, C]` → `[N, L, C]`, every token attending to every token of its sequence.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, l, c) = x.size3()?;
        let hd = c / self.heads;
        let qkv = self
            .qkv
            .forward(x)
            .f_reshape([n, l, 3, self.heads, hd])?
            .f_permute([2, 0, 3, 1, 4])?; // [3, N, heads, L, hd]
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let o = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        )?; // [N, heads, L, hd]
        let o = o.f_permute([0, 2, 1, 3])?.f_reshape([n, l, c])?;
        Ok(self.proj.forward(&o))
    }
}
