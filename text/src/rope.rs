//! Rotary position embedding (HF "rotate_half" layout), with linear / NTK / dynamic scaling.

use tch::{Device, Kind, Tensor};

use crate::config::{RopeScalingKind, TextConfig};
use crate::error::Result;

#[derive(Debug)]
pub struct Rope {
    inv_freq: Tensor, // [head_dim / 2], fp32
    head_dim: i64,
    theta: f64,
    scaling: Option<(RopeScalingKind, f64)>,
    max_positions: i64,
}

fn inv_freq(theta: f64, head_dim: i64, device: Device) -> Result<Tensor> {
    // 1 / θ^(2i/d)
    let exps = Tensor::f_arange_start_step(0, head_dim, 2, (Kind::Float, device))?
        .f_div_scalar(head_dim as f64)?;
    Ok(Tensor::f_full(&[] as &[i64], theta, (Kind::Float, device))?
        .f_pow(&exps)?
        .f_reciprocal()?)
}

impl Rope {
    pub fn new(cfg: &TextConfig, device: Device) -> Result<Self> {
        let head_dim = cfg.head_dim() as i64;
        let scaling = cfg.rope_scaling.map(|s| (s.kind, s.factor));
        let theta = match scaling {
            Some((RopeScalingKind::Ntk, f)) => {
                cfg.rope_theta * f.powf(head_dim as f64 / (head_dim as f64 - 2.0))
            }
            _ => cfg.rope_theta,
        };
        Ok(Self {
            inv_freq: inv_freq(theta, head_dim, device)?,
            head_dim,
            theta: cfg.rope_theta,
            scaling,
            max_positions: cfg.max_position_embeddings as i64,
        })
    }

    /// cos and sin for `positions` [batch, seq] → each [batch, 1, seq, head_dim] in `kind`.
    /// `seq_len_hint` is the total sequence length (for dynamic NTK).
    pub fn cos_sin(
        &self,
        positions: &Tensor,
        seq_len_hint: i64,
        kind: Kind,
    ) -> Result<(Tensor, Tensor)> {
        let mut inv = self.inv_freq.shallow_clone();
        let mut pos = positions.f_to_kind(Kind::Float)?;
        match self.scaling {
            Some((RopeScalingKind::Linear, f)) => pos = pos.f_div_scalar(f)?,
            Some((RopeScalingKind::Dynamic, f)) if seq_len_hint > self.max_positions => {
                let d = self.head_dim as f64;
                let base = self.theta
                    * ((f * seq_len_hint as f64 / self.max_positions as f64) - (f - 1.0))
                        .powf(d / (d - 2.0));
                inv = inv_freq(base, self.head_dim, positions.device())?;
            }
            _ => {}
        }
        // [batch, seq, 1] * [half] → [batch, seq, half]
        let freqs = pos.f_unsqueeze(-1)?.f_mul(&inv)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?.f_unsqueeze(1)?; // [batch, 1, seq, d]
        Ok((emb.f_cos()?.f_to_kind(kind)?, emb.f_sin()?.f_to_kind(kind)?))
    }

    // x: [batch, heads, seq, head_dim]; cos/sin: [batch, 1, seq, head_dim]
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.size()[3] / 2;
        let x1 = x.f_narrow(-1, 0, half)?;
        let x2 = x.f_narrow(-1, half, half)?;
        let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
        Ok(x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)?)
    }
}
