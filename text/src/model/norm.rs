//! RMSNorm: `x / sqrt(mean(x²) + ε) · g`, computed in fp32 as HF Llama does; or, in tamm's
//! pre-scale mode (`"pre_scale_rms_norm"`), `rms_norm(x · g)`: the gain scales the input and
//! nothing scales the output.

use tch::{Kind, Tensor};

use crate::config::TextConfig;
use crate::error::Result;
use crate::weights::WeightMap;

#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    dim: i64,
    /// Half precision: the gain is applied in fp32 before the one rounding (tamm's order).
    gain_fp32: bool,
    /// The gain multiplies the input before the normalisation (tamm's `PRE_SCALE`).
    pre_scale: bool,
}

impl RmsNorm {
    pub fn new(w: &WeightMap, name: &str, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(name, &[dim])?,
            eps,
            dim,
            gain_fp32: false,
            pre_scale: false,
        })
    }

    /// The same norm in tamm's pre-scale mode: `rms_norm(x · g)`, computed in fp32.
    pub fn into_pre_scale(mut self) -> Self {
        self.pre_scale = true;
        self
    }

    /// A norm of the text decoder: ε and the rounding order from its config.
    pub fn for_text(cfg: &TextConfig, w: &WeightMap, name: &str, dim: i64) -> Result<Self> {
        let mut n = Self::new(w, name, dim, cfg.rms_norm_eps)?;
        n.gain_fp32 = cfg.norm_gain_fp32;
        Ok(n)
    }

    pub fn num_params(&self) -> i64 {
        self.dim
    }

    /// The gain `[dim]` and ε.
    pub fn parts(&self) -> (&Tensor, f64) {
        (&self.weight, self.eps)
    }

    // x: [..., dim] → [..., dim]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pre_scale {
            let kind = x.kind();
            let xs = x
                .f_to_kind(Kind::Float)?
                .f_mul(&self.weight.f_to_kind(Kind::Float)?)?;
            return Ok(xs
                .f_rms_norm([self.dim], None::<Tensor>, self.eps)?
                .f_to_kind(kind)?);
        }
        if x.kind() == Kind::Float {
            // One fused kernel (fp32 statistics, as HF computes them).
            return Ok(x.f_rms_norm([self.dim], Some(&self.weight), self.eps)?);
        }
        let kind = x.kind();
        let xf = x.f_to_kind(Kind::Float)?;
        if self.gain_fp32 {
            // tamm: all in fp32 (the gain as stored, promoted), one rounding at the end.
            let w = self.weight.f_to_kind(Kind::Float)?;
            return Ok(xf
                .f_rms_norm([self.dim], Some(&w), self.eps)?
                .f_to_kind(kind)?);
        }
        // Half precision: statistics in fp32, normalised value cast back before the gain,
        // exactly HF's LlamaRMSNorm order.
        let normed = xf.f_rms_norm([self.dim], None::<Tensor>, self.eps)?;
        Ok(self.weight.f_mul(&normed.f_to_kind(kind)?)?)
    }
}
