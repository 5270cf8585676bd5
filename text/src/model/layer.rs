//! One pre-norm decoder layer: `h = x + attn(norm(x)); y = h + ffn(norm(h))`.

use tch::Tensor;

use crate::attention::{Attention, StepMask};
use crate::config::TextConfig;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::mlp::SwiGlu;
use crate::norm::RmsNorm;
use crate::weights::WeightMap;

#[derive(Debug)]
pub struct DecoderLayer {
    pub input_norm: RmsNorm,
    pub attn: Attention,
    pub post_norm: RmsNorm,
    pub mlp: SwiGlu,
}

impl DecoderLayer {
    pub fn new(cfg: &TextConfig, w: &WeightMap, layer: usize) -> Result<Self> {
        let p = format!("model.layers.{layer}");
        let hidden = cfg.hidden_size as i64;
        Ok(Self {
            input_norm: RmsNorm::for_text(cfg, w, &format!("{p}.input_layernorm.weight"), hidden)?,
            attn: Attention::new(cfg, w, layer)?,
            post_norm: RmsNorm::for_text(
                cfg,
                w,
                &format!("{p}.post_attention_layernorm.weight"),
                hidden,
            )?,
            mlp: SwiGlu::new(w, &format!("{p}.mlp"), hidden, cfg.intermediate_size as i64)?,
        })
    }

    pub fn num_params(&self) -> i64 {
        self.input_norm.num_params()
            + self.attn.num_params()
            + self.post_norm.num_params()
            + self.mlp.num_params()
    }

    // x: [batch, seq, hidden] → [batch, seq, hidden]
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &StepMask,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let h =
            x.f_add(
                &self
                    .attn
                    .forward(&self.input_norm.forward(x)?, cos, sin, mask, cache)?,
            )?;
        Ok(h.f_add(&self.mlp.forward(&self.post_norm.forward(&h)?)?)?)
    }
}
