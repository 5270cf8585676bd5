//! Rotary position embedding (HF "rotate_half" layout), with linear / NTK / dynamic scaling.

use tch::{Device, Kind, Tensor};

use crate::config::{RopeScalingKind, TextConfig};
use crate::error::Result;

#[derive(Debug)]
pub struct Rope {
    /// cos and sign-folded sin for every position: [max_positions, head_dim] in the model dtype.
    cos_table: Tensor,
    sin_table: Tensor,
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

/// cos and sin of `positions` ([n], fp32) with `sin`'s first half negated, so that
/// `rotate_half(x)·sin == roll(x, d/2)·sin_signed`: [n, head_dim] each.
fn tables(positions: &Tensor, inv: &Tensor) -> Result<(Tensor, Tensor)> {
    let freqs = positions.f_unsqueeze(-1)?.f_mul(inv)?; // [n, d/2]
    let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
    let sin = freqs.f_sin()?;
    Ok((emb.f_cos()?, Tensor::f_cat(&[&sin.f_neg()?, &sin], -1)?))
}

impl Rope {
    pub fn new(cfg: &TextConfig, device: Device, kind: Kind) -> Result<Self> {
        let head_dim = cfg.head_dim() as i64;
        let scaling = cfg.rope_scaling.map(|s| (s.kind, s.factor));
        let theta = match scaling {
            Some((RopeScalingKind::Ntk, f)) => {
                cfg.rope_theta * f.powf(head_dim as f64 / (head_dim as f64 - 2.0))
            }
            _ => cfg.rope_theta,
        };
        let inv = inv_freq(theta, head_dim, device)?;
        let mut pos = Tensor::f_arange(cfg.max_position_embeddings as i64, (Kind::Float, device))?;
        if let Some((RopeScalingKind::Linear, f)) = scaling {
            pos = pos.f_div_scalar(f)?;
        }
        let (cos, sin) = tables(&pos, &inv)?;
        Ok(Self {
            cos_table: cos.f_to_kind(kind)?,
            sin_table: sin.f_to_kind(kind)?,
            head_dim,
            theta: cfg.rope_theta,
            scaling,
            max_positions: cfg.max_position_embeddings as i64,
        })
    }

    /// cos and sign-folded sin of position `pos` as fp32 rows of `head_dim`, when the tables
    /// are fp32 CPU tensors and the position lies in them without dynamic rescaling.
    pub fn row_f32(&self, pos: i64) -> Option<(&[f32], &[f32])> {
        let dynamic = matches!(self.scaling, Some((RopeScalingKind::Dynamic, _)));
        if dynamic || pos < 0 || pos >= self.max_positions {
            return None;
        }
        let ok = |t: &Tensor| crate::quant::packed::is_cpu_contiguous(t, Kind::Float);
        if !ok(&self.cos_table) || !ok(&self.sin_table) {
            return None;
        }
        let d = self.head_dim as usize;
        let p = pos as usize;
        // SAFETY: contiguous fp32 CPU tables owned by self (checked above).
        let (c, s) = unsafe {
            (
                crate::quant::packed::cpu_slice::<f32>(&self.cos_table),
                crate::quant::packed::cpu_slice::<f32>(&self.sin_table),
            )
        };
        Some((&c[p * d..(p + 1) * d], &s[p * d..(p + 1) * d]))
    }

    /// cos and sign-folded sin for `positions` [batch, seq] → each [batch, 1, seq, head_dim]
    /// in `kind`. `seq_len_hint` is the total sequence length (for dynamic NTK).
    pub fn cos_sin(
        &self,
        positions: &Tensor,
        seq_len_hint: i64,
        kind: Kind,
    ) -> Result<(Tensor, Tensor)> {
        let (b, s) = (positions.size()[0], positions.size()[1]);
        if let Some((RopeScalingKind::Dynamic, f)) = self.scaling {
            if seq_len_hint > self.max_positions {
                let d = self.head_dim as f64;
                let base = self.theta
                    * ((f * seq_len_hint as f64 / self.max_positions as f64) - (f - 1.0))
                        .powf(d / (d - 2.0));
                let inv = inv_freq(base, self.head_dim, positions.device())?;
                let (c, sn) = tables(&positions.f_flatten(0, -1)?.f_to_kind(Kind::Float)?, &inv)?;
                let shape = [b, 1, s, self.head_dim];
                return Ok((
                    c.f_view(shape)?.f_to_kind(kind)?,
                    sn.f_view(shape)?.f_to_kind(kind)?,
                ));
            }
        }
        let idx = positions.f_flatten(0, -1)?;
        let shape = [b, 1, s, self.head_dim];
        let cos = self.cos_table.f_index_select(0, &idx)?.f_view(shape)?;
        let sin = self.sin_table.f_index_select(0, &idx)?.f_view(shape)?;
        if cos.kind() != kind {
            return Ok((cos.f_to_kind(kind)?, sin.f_to_kind(kind)?));
        }
        Ok((cos, sin))
    }

    /// `x·cos + rotate_half(x)·sin` with rotate_half(x) = [−x₂, x₁], computed as
    /// `x·cos + roll(x, d/2)·sin_signed`.
    // x: [batch, heads, seq, head_dim]; cos/sin: [batch, 1, seq, head_dim]
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.size()[3] / 2;
        let rolled = x.f_roll([half], [-1])?;
        Ok(x.f_mul(cos)?.f_add(&rolled.f_mul(sin)?)?)
    }
}
