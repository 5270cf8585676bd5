//! RMSNorm: `x / sqrt(mean(x²) + ε) · g`, computed in fp32 as HF Llama does.

use tch::{Kind, Tensor};

use crate::error::Result;
use crate::weights::WeightMap;

#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    dim: i64,
}

impl RmsNorm {
    pub fn new(w: &WeightMap, name: &str, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(name, &[dim])?,
            eps,
            dim,
        })
    }

    pub fn num_params(&self) -> i64 {
        self.dim
    }

    // x: [..., dim] → [..., dim]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.kind() == Kind::Float {
            // One fused kernel (fp32 statistics, as HF computes them).
            return Ok(x.f_rms_norm([self.dim], Some(&self.weight), self.eps)?);
        }
        // Half precision: statistics in fp32, normalised value cast back before the gain,
        // exactly HF's LlamaRMSNorm order.
        let kind = x.kind();
        let xf = x.f_to_kind(Kind::Float)?;
        let normed = xf.f_rms_norm([self.dim], None::<Tensor>, self.eps)?;
        Ok(self.weight.f_mul(&normed.f_to_kind(kind)?)?)
    }
}
