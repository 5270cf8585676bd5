//! Uniform (affine) quantization: the QAT fake-quantizer of AFM 2025 and round-to-nearest.
//!
//! `W̃ = s·(clamp(⌊W/s + z⌉, qmin, qmax) − z)` with a per-output-channel scale
//! `s = f·max|W| / L`, where `L` is the largest level magnitude (`qmax − z`), so `f = 1` maps
//! the channel's largest weight onto the outermost level and `f < 1` clips. `f` is learnable
//! during QAT and initialised per channel by a small grid search minimising `‖W − W̃‖²`.
//! Rounding uses the straight-through estimator: `∂W̃/∂W = 1` where `W/s + z` lies inside the
//! clamp range and `0` outside.
//!
//! | bits | qmin | qmax | z   | levels `q − z`                 |
//! |------|------|------|-----|--------------------------------|
//! | 2    | 0    | 3    | 1.5 | −1.5, −0.5, 0.5, 1.5 (balanced)|
//! | 4    | −8   | 7    | 0   | −8 … 7                          |
//! | 8    | −128 | 127  | 0   | −128 … 127                      |
//!
//! Stored codes are `q − qmin ∈ [0, 2^bits)`, so a weight is `s·(code − c)` with
//! `c = z − qmin` ([`UniformSpec::code_offset`]).

use tch::{Kind, Tensor};

use crate::error::{Result, TextError};

/// Level layout of a uniform quantizer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UniformSpec {
    pub bits: u8,
    pub qmin: f64,
    pub qmax: f64,
    pub zero: f64,
}

impl UniformSpec {
    /// 2-bit balanced, 4-bit and 8-bit signed.
    pub fn new(bits: u8) -> Result<Self> {
        Ok(match bits {
            2 => Self {
                bits,
                qmin: 0.0,
                qmax: 3.0,
                zero: 1.5,
            },
            4 => Self {
                bits,
                qmin: -8.0,
                qmax: 7.0,
                zero: 0.0,
            },
            8 => Self {
                bits,
                qmin: -128.0,
                qmax: 127.0,
                zero: 0.0,
            },
            b => {
                return Err(TextError::InvalidArgument(format!(
                    "uniform quantization supports 2, 4 or 8 bits, not {b}"
                )))
            }
        })
    }

    /// The largest level magnitude `L` in `s = f·max|W|/L`.
    pub fn top_level(&self) -> f64 {
        self.qmax - self.zero
    }

    /// `c` in `w = s·(code − c)`.
    pub fn code_offset(&self) -> f64 {
        self.zero - self.qmin
    }

    /// The representable values `q − z` in units of `s`, ascending.
    pub fn levels(&self) -> Vec<f64> {
        let n = (self.qmax - self.qmin) as i64 + 1;
        (0..n).map(|i| self.qmin + i as f64 - self.zero).collect()
    }
}

/// A weight under quantization-aware training: full-precision `w` (`[out, in]`) and
/// clipping factors `f` (`[out, 1]`), both trainable; the layer uses [`fake_quant`]`(w, f)`.
#[derive(Debug)]
pub struct FakeQuantWeight {
    pub w: Tensor,
    pub f: Tensor,
    pub spec: UniformSpec,
}

/// Round with a straight-through gradient: forward `round(x)`, backward identity.
pub fn round_ste(x: &Tensor) -> Result<Tensor> {
    let r = x.f_round()?.f_sub(x)?.f_detach()?;
    Ok(x.f_add(&r)?)
}

/// Per-output-channel scale `s = f·max|W|/L` (`w: [out, in]`, `f: [out, 1]` or scalar).
pub fn scale(w: &Tensor, f: &Tensor, spec: &UniformSpec) -> Result<Tensor> {
    let amax = w
        .f_abs()?
        .f_amax(&[1i64][..], true)?
        .f_clamp_min(1e-12)?
        .f_detach()?; // [out, 1]
    Ok(amax.f_mul(f)?.f_div_scalar(spec.top_level())?)
}

/// The fake-quantized weight `W̃` (differentiable in `w` through the STE and in `f`).
pub fn fake_quant(w: &Tensor, f: &Tensor, spec: &UniformSpec) -> Result<Tensor> {
    let s = scale(w, f, spec)?;
    // Clamping before rounding gives the same values (integer bounds) and makes the gradient
    // exactly zero wherever W/s + z lies outside [qmin, qmax].
    let u = w
        .f_div(&s)?
        .f_add_scalar(spec.zero)?
        .f_clamp(spec.qmin, spec.qmax)?;
    let q = round_ste(&u)?.f_sub_scalar(spec.zero)?;
    Ok(q.f_mul(&s)?)
}

/// Candidate clipping factors for the initial search.
pub const F_GRID: [f64; 15] = [
    0.30, 0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95, 1.00,
];

/// Per-channel `f` (`[out, 1]`, fp32) from [`F_GRID`] minimising each row's `‖W − W̃‖²`.
pub fn search_f(w: &Tensor, spec: &UniformSpec) -> Result<Tensor> {
    let _g = tch::no_grad_guard();
    let w = w.f_to_kind(Kind::Float)?;
    let out = w.size()[0];
    let mut best_err = Tensor::f_full([out, 1], f64::INFINITY, (Kind::Float, w.device()))?;
    let mut best_f = Tensor::f_ones([out, 1], (Kind::Float, w.device()))?;
    for &f in F_GRID.iter() {
        let ft = Tensor::f_full([out, 1], f, (Kind::Float, w.device()))?;
        let err = w
            .f_sub(&fake_quant(&w, &ft, spec)?)?
            .f_square()?
            .f_sum_dim_intlist(&[1i64][..], true, Kind::Float)?;
        let better = err.f_lt_tensor(&best_err)?;
        best_err = best_err.f_where_self(&better.f_logical_not()?, &err)?;
        best_f = best_f.f_where_self(&better.f_logical_not()?, &ft)?;
    }
    Ok(best_f)
}

/// Round-to-nearest quantization with searched `f`: codes `[out, in]` (uint8, `q − qmin`)
/// and the per-channel scale `[out]` (fp32).
pub fn rtn(w: &Tensor, spec: &UniformSpec) -> Result<(Tensor, Tensor)> {
    let _g = tch::no_grad_guard();
    let w = w.f_to_kind(Kind::Float)?;
    let f = search_f(&w, spec)?;
    let s = scale(&w, &f, spec)?;
    let codes = w
        .f_div(&s)?
        .f_add_scalar(spec.zero)?
        .f_round()?
        .f_clamp(spec.qmin, spec.qmax)?
        .f_sub_scalar(spec.qmin)?
        .f_to_kind(Kind::Uint8)?;
    Ok((codes, s.f_squeeze_dim(1)?))
}

/// `s·(code − c)`: the weight a set of uniform codes stands for.
pub fn dequant_uniform(codes: &Tensor, scale: &Tensor, spec: &UniformSpec) -> Result<Tensor> {
    Ok(codes
        .f_to_kind(Kind::Float)?
        .f_sub_scalar(spec.code_offset())?
        .f_mul(&scale.f_unsqueeze(1)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn vals(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.f_flatten(0, -1).unwrap().f_to_kind(Kind::Float).unwrap()).unwrap()
    }

    #[test]
    fn two_bit_levels_are_balanced() {
        let spec = UniformSpec::new(2).unwrap();
        assert_eq!(spec.levels(), vec![-1.5, -0.5, 0.5, 1.5]);
        assert_eq!(UniformSpec::new(4).unwrap().levels().len(), 16);
        assert_eq!(UniformSpec::new(8).unwrap().levels().len(), 256);
        assert!(UniformSpec::new(3).is_err());
        // A row with max |w| = 3 and f = 1: s = 2, every output is s·level.
        let w = Tensor::from_slice(&[-3.0f32, -1.2, -0.1, 0.1, 0.9, 2.2, 3.0, 1.0]).view([1, 8]);
        let f = Tensor::ones([1, 1], (Kind::Float, Device::Cpu));
        let out = vals(&fake_quant(&w, &f, &spec).unwrap());
        assert_eq!(out, vec![-3.0, -1.0, -1.0, 1.0, 1.0, 3.0, 3.0, 1.0]);
        for v in out {
            assert!([-3.0, -1.0, 1.0, 3.0].contains(&v), "{v} is not a level");
        }
    }

    #[test]
    fn four_and_eight_bit_levels_and_error_bounds() {
        let _rng = crate::weights::seed_global_rng(1);
        let w = Tensor::randn([64, 256], (Kind::Float, Device::Cpu));
        for bits in [2u8, 4, 8] {
            let spec = UniformSpec::new(bits).unwrap();
            let f = Tensor::ones([64, 1], (Kind::Float, Device::Cpu));
            let s = scale(&w, &f, &spec).unwrap();
            let wq = fake_quant(&w, &f, &spec).unwrap();
            // Outputs are integer (half-integer for 2-bit) multiples of s within the range.
            let lv = wq.f_div(&s).unwrap().f_add_scalar(spec.zero).unwrap();
            let frac = lv.f_sub(&lv.f_round().unwrap()).unwrap().abs().max();
            assert!(f64::try_from(frac).unwrap() < 1e-4, "bits {bits}");
            assert!(f64::try_from(lv.min()).unwrap() >= spec.qmin - 1e-4);
            assert!(f64::try_from(lv.max()).unwrap() <= spec.qmax + 1e-4);
            // With f = 1 nothing clips (except 2-bit's max|w| that lands on 1.5 exactly), so the
            // error is at most half a step.
            let err = w.f_sub(&wq).unwrap().abs().f_div(&s).unwrap().max();
            assert!(f64::try_from(err).unwrap() <= 0.5 + 1e-4, "bits {bits}");
            // RTN (searched f) beats or ties f = 1 and its codes decode to the fake-quant output.
            let (codes, sc) = rtn(&w, &spec).unwrap();
            assert_eq!(codes.kind(), Kind::Uint8);
            assert!(i64::try_from(codes.max()).unwrap() < (1 << bits));
            let deq = dequant_uniform(&codes, &sc, &spec).unwrap();
            let e_rtn = f64::try_from(w.f_sub(&deq).unwrap().square().sum(Kind::Float)).unwrap();
            let e_one = f64::try_from(w.f_sub(&wq).unwrap().square().sum(Kind::Float)).unwrap();
            assert!(
                e_rtn <= e_one * (1.0 + 1e-6),
                "bits {bits}: {e_rtn} > {e_one}"
            );
            let rel = e_rtn / f64::try_from(w.square().sum(Kind::Float)).unwrap();
            let bound = match bits {
                2 => 0.15,
                4 => 0.02,
                _ => 1e-4,
            };
            assert!(rel < bound, "bits {bits}: relative error {rel}");
            let f = search_f(&w, &spec).unwrap();
            let deq2 = fake_quant(&w, &f, &spec).unwrap();
            assert!(f64::try_from(deq.f_sub(&deq2).unwrap().abs().max()).unwrap() < 1e-5);
        }
    }

    #[test]
    fn ste_gradient_is_identity_inside_and_zero_outside() {
        for bits in [2u8, 4, 8] {
            let spec = UniformSpec::new(bits).unwrap();
            // max |w| = 4; f = 0.5 clips everything beyond 2 in magnitude.
            let w = Tensor::from_slice(&[-4.0f32, -2.5, -1.3, -0.2, 0.0, 0.7, 1.9, 4.0])
                .view([1, 8])
                .set_requires_grad(true);
            let f = Tensor::full([1, 1], 0.5, (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let out = fake_quant(&w, &f, &spec).unwrap();
            // Weighted sum so each gradient entry is checked against its own weight.
            let coef =
                Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).view([1, 8]);
            out.f_mul(&coef).unwrap().sum(Kind::Float).backward();
            let g = vals(&w.grad());
            let s = 0.5 * 4.0 / spec.top_level();
            let wv = [-4.0f64, -2.5, -1.3, -0.2, 0.0, 0.7, 1.9, 4.0];
            for (i, &x) in wv.iter().enumerate() {
                let u = x / s + spec.zero;
                let inside = u >= spec.qmin && u <= spec.qmax;
                let want = if inside { (i + 1) as f32 } else { 0.0 };
                // (w/s)·s is 1 up to rounding.
                assert!(
                    (g[i] - want).abs() <= 1e-5 * want,
                    "bits {bits} w {x}: u {u}: {}",
                    g[i]
                );
            }
            // f receives a gradient (it is learnable).
            assert!(f.grad().defined());
            assert!(f64::try_from(f.grad().abs().sum(Kind::Float)).unwrap() > 0.0);
        }
    }
}
