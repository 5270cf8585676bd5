//! GGUF's quantized blocks, run natively: the weights stay exactly as a GGUF file stores them
//! (llama.cpp's Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) and the matrix–vector kernels read them
//! directly, with the activations quantised on the fly per 32 values (int16 by default, int8
//! as llama.cpp does, or kept fp32: see "Activation precision" below).
//!
//! # Activations
//!
//! [`Q8Acts`]: for every 32 values `x`, `d = max|x| / 127`, `q = round(x / d)` (int8), and the
//! sums `Σq` per 16 and per 32 values. The scale stays fp32 (llama.cpp rounds it to fp16). The
//! int16 form uses `max|x| / 32767` the same way.
//!
//! # Dot products (per weight block; integer sums exact, one float multiply-add per block)
//!
//! | weights | value                    | block term                                        |
//! |---------|--------------------------|---------------------------------------------------|
//! | Q4_0    | `d·(q − 8)`              | `d·dₓ·(Σ q·qₓ − 8·Σqₓ)`                            |
//! | Q4_1    | `d·q + m`                | `d·dₓ·Σ q·qₓ + m·dₓ·Σqₓ`                           |
//! | Q8_0    | `d·q`                    | `d·dₓ·Σ q·qₓ`                                     |
//! | Q4_K    | `d·sⱼ·q − dmin·mⱼ` (32s) | `Σⱼ dₓⱼ·(d·sⱼ·Σ q·qₓ − dmin·mⱼ·Σqₓ)`                 |
//! | Q5_K    | as Q4_K, 5-bit `q`       | as Q4_K                                           |
//! | Q6_K    | `d·sⱼ·(q − 32)` (16s)    | `Σⱼ d·sⱼ·dₓ·(Σ q·qₓ − 32·Σqₓ)` over 16-value groups |
//!
//! [`row_dot_scalar`] is the portable reference; the AVX2, AVX-512 (`ggml_avx512.rs`) and NEON
//! (`ggml_neon.rs`) kernels compute the same integer sums (exactly) and differ only in the
//! order the float block terms are added.
//!
//! # Activation precision ([`Acts`])
//!
//! int8 is llama.cpp's arithmetic and the fastest. Its rounding (half a step of `max|x|/127`)
//! can flip a near-tie of the greedy choice against the dequantised fp32 model (SmolLM2's
//! Paris answer: a 0.08-logit tie). int16 (`max|x|/32767`, `vpmaddwd`) follows fp32 to ~1e-5 of
//! the logit scale at close to int8's speed, and is the default for Q4_0 / Q4_1 / Q8_0; fp32
//! multiplies the widened codes with the activations as given. The K-quants always use int8.

use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TextError};
use crate::gguf::GgmlType;
use crate::quant::packed::Isa;
use crate::sampling::Rng;
use crate::weights::WeightMap;

/// Values per activation block.
pub const QK: usize = 32;

#[cfg(target_arch = "aarch64")]
#[path = "ggml_neon.rs"]
mod neon;

#[cfg(target_arch = "x86_64")]
#[path = "ggml_avx512.rs"]
mod avx512;

/// The GGUF block types the kernels read (F32/F16/BF16 tensors are loaded dense instead).
pub fn is_block_type(ty: GgmlType) -> bool {
    BLOCK_TYPES.contains(&ty)
}

/// Activations quantised to int8 per 32 values (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Q8Acts {
    pub q: Vec<i8>,
    /// One scale per 32 values.
    pub d: Vec<f32>,
    /// `d·Σq` per 32 values (the offset term of Q4_1).
    pub s: Vec<f32>,
    /// `Σq` per 32 values.
    pub sum32: Vec<i32>,
    /// `Σq` per 16 values.
    pub sum16: Vec<i32>,
    /// With [`Q8Acts::prepare`]`(x, true)`: the activations as given and `Σx` per 32 values;
    /// Q4_0, Q4_1 and Q8_0 then multiply the dequantised weights with them in fp32 (the
    /// K-quants keep the int8 path).
    pub x: Vec<f32>,
    pub xsum: Vec<f32>,
    /// With [`Acts::Int16`]: the activations as int16 per 32 values, their scale and
    /// `scale·Σq` per 32 values.
    pub q16: Vec<i16>,
    pub d16: Vec<f32>,
    pub s16: Vec<f32>,
    /// Which of the above the Q4_0 / Q4_1 / Q8_0 kernels read.
    pub mode: Acts,
}

/// The activations' precision in the Q4_0 / Q4_1 / Q8_0 kernels (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acts {
    Int8,
    #[default]
    Int16,
    F32,
}

impl Acts {
    pub fn name(self) -> &'static str {
        match self {
            Acts::Int8 => "int8",
            Acts::Int16 => "int16",
            Acts::F32 => "f32",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Acts::Int8, Acts::Int16, Acts::F32]
            .into_iter()
            .find(|a| a.name() == s)
    }
}

static ACTS: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// The process's activation precision for the block kernels: [`set_activations`], else
/// `AFM_VL_GGML_ACTS` (`int8`, `int16`, `f32`), else int16.
pub fn activations() -> Acts {
    use std::sync::atomic::Ordering;
    const ALL: [Acts; 3] = [Acts::Int8, Acts::Int16, Acts::F32];
    match ACTS.load(Ordering::Relaxed) {
        0 => {
            let a = std::env::var("AFM_VL_GGML_ACTS")
                .ok()
                .and_then(|v| Acts::parse(&v))
                .unwrap_or_default();
            set_activations(a);
            a
        }
        i => ALL[(i as usize - 1).min(2)],
    }
}

/// Choose the block kernels' activation precision from now on.
pub fn set_activations(a: Acts) {
    let i = match a {
        Acts::Int8 => 1,
        Acts::Int16 => 2,
        Acts::F32 => 3,
    };
    ACTS.store(i, std::sync::atomic::Ordering::Relaxed);
}

impl Q8Acts {
    /// Quantise `x` (its length a multiple of 32) into `self`, reusing its buffers.
    pub fn quantize(&mut self, x: &[f32]) {
        let nb = x.len() / QK;
        self.q.resize(nb * QK, 0);
        self.d.resize(nb, 0.0);
        self.s.resize(nb, 0.0);
        self.sum32.resize(nb, 0);
        self.sum16.resize(2 * nb, 0);
        for b in 0..nb {
            let xs = &x[b * QK..(b + 1) * QK];
            let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let qs = &mut self.q[b * QK..(b + 1) * QK];
            for (q, v) in qs.iter_mut().zip(xs) {
                // Round half away from zero (as `f32::round`, without the libm call).
                let t = v * id;
                *q = (t + 0.5f32.copysign(t)).clamp(-127.0, 127.0) as i8;
            }
            let lo: i32 = qs[..16].iter().map(|&q| q as i32).sum();
            let hi: i32 = qs[16..].iter().map(|&q| q as i32).sum();
            self.d[b] = d;
            self.sum16[2 * b] = lo;
            self.sum16[2 * b + 1] = hi;
            self.sum32[b] = lo + hi;
            self.s[b] = d * (lo + hi) as f32;
        }
    }

    /// [`Q8Acts::quantize`] (the K-quants read int8 in every mode), and what `mode` adds: `x`
    /// and `Σx` for the fp32 kernels, or the int16 quantisation.
    pub fn prepare(&mut self, x: &[f32], mode: Acts) {
        self.quantize(x);
        self.mode = mode;
        match mode {
            Acts::Int8 => {}
            Acts::F32 => {
                self.x.clear();
                self.x.extend_from_slice(x);
                self.xsum.clear();
                self.xsum
                    .extend(x.chunks(QK).map(|b| b.iter().sum::<f32>()));
            }
            Acts::Int16 => {
                let nb = x.len() / QK;
                self.q16.resize(nb * QK, 0);
                self.d16.resize(nb, 0.0);
                self.s16.resize(nb, 0.0);
                for b in 0..nb {
                    let xs = &x[b * QK..(b + 1) * QK];
                    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 32767.0;
                    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                    let mut sum = 0i32;
                    for (q, v) in self.q16[b * QK..(b + 1) * QK].iter_mut().zip(xs) {
                        let t = v * id;
                        *q = (t + 0.5f32.copysign(t)).clamp(-32767.0, 32767.0) as i16;
                        sum += *q as i32;
                    }
                    self.d16[b] = d;
                    self.s16[b] = d * sum as f32;
                }
            }
        }
    }

    /// `x` with int8 activations only.
    pub fn from_slice(x: &[f32]) -> Self {
        let mut a = Self::default();
        a.prepare(x, Acts::Int8);
        a
    }

    /// The quantised values back as floats (what the kernels effectively multiply with).
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .iter()
            .enumerate()
            .map(|(i, &q)| self.d[i / QK] * q as f32)
            .collect()
    }
}

/// Bytes of one row of `cols` values of `ty`.
pub fn row_bytes(ty: GgmlType, cols: usize) -> usize {
    let (bs, bb) = ty.block();
    cols / bs * bb
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` in a K-quant's packed `scales[12]`.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `Σ w·x` for one row of `ty` blocks and its quantised activations: the portable reference.
pub fn row_dot_scalar(ty: GgmlType, row: &[u8], a: &Q8Acts) -> f32 {
    let (bs, bb) = ty.block();
    let mut acc = 0f32;
    for (b, w) in row.chunks_exact(bb).enumerate() {
        let x0 = b * bs / QK; // first activation block
        acc += match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let off = if ty == GgmlType::Q4_0 { 2 } else { 4 };
                let qs = &w[off..off + 16];
                let xq = &a.q[x0 * QK..(x0 + 1) * QK];
                let mut isum = 0i32;
                for j in 0..16 {
                    isum += (qs[j] & 0xF) as i32 * xq[j] as i32;
                    isum += (qs[j] >> 4) as i32 * xq[j + 16] as i32;
                }
                let d = f16_at(w, 0);
                if ty == GgmlType::Q4_0 {
                    d * a.d[x0] * (isum - 8 * a.sum32[x0]) as f32
                } else {
                    d * a.d[x0] * isum as f32 + f16_at(w, 2) * a.s[x0]
                }
            }
            GgmlType::Q8_0 => {
                let xq = &a.q[x0 * QK..(x0 + 1) * QK];
                let isum: i32 = w[2..34]
                    .iter()
                    .zip(xq)
                    .map(|(&q, &x)| (q as i8) as i32 * x as i32)
                    .sum();
                f16_at(w, 0) * a.d[x0] * isum as f32
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                let (d, dmin) = (f16_at(w, 0), f16_at(w, 2));
                let scales = &w[4..16];
                let five = ty == GgmlType::Q5K;
                let (qh, ql) = if five {
                    (&w[16..48], &w[48..176])
                } else {
                    (&w[0..0], &w[16..144])
                };
                let mut t = 0f32;
                for j in 0..8 {
                    // Sub-block j: 32 values, low nibbles of ql[32·(j/2)..] for even j, high
                    // nibbles for odd j; the fifth bit is bit j of qh[l].
                    let (sc, m) = scale_min_k4(j, scales);
                    let q = &ql[32 * (j / 2)..32 * (j / 2) + 32];
                    let xb = x0 + j;
                    let xq = &a.q[xb * QK..(xb + 1) * QK];
                    let mut isum = 0i32;
                    for l in 0..32 {
                        let mut v = if j % 2 == 0 { q[l] & 0xF } else { q[l] >> 4 } as i32;
                        if five && qh[l] & (1 << j) != 0 {
                            v += 16;
                        }
                        isum += v * xq[l] as i32;
                    }
                    t += a.d[xb]
                        * (d * sc as f32 * isum as f32 - dmin * m as f32 * a.sum32[xb] as f32);
                }
                t
            }
            GgmlType::Q6K => {
                let d = f16_at(w, 208);
                let (ql, qh, sc) = (&w[0..128], &w[128..192], &w[192..208]);
                let mut t = 0f32;
                // Values n = 128·h + 32·k + l (h half, k quarter, l < 32).
                for g in 0..16 {
                    // 16-value group g covers values 16g..16g+16.
                    let (h, k, l0) = (g / 8, (g / 2) % 4, 16 * (g % 2));
                    let xb = x0 + g / 2;
                    let xq = &a.q[xb * QK + l0..xb * QK + l0 + 16];
                    let mut isum = 0i32;
                    for (i, &x) in xq.iter().enumerate() {
                        let l = l0 + i;
                        let lo = ql[64 * h + l + 32 * (k % 2)];
                        let lo = if k < 2 { lo & 0xF } else { lo >> 4 };
                        let hi = (qh[32 * h + l] >> (2 * k)) & 3;
                        isum += ((lo | (hi << 4)) as i32) * x as i32;
                    }
                    let sub = a.sum16[2 * xb + (g % 2)];
                    // Scale index: 8·h + (l / 16) + 2·k.
                    let s = sc[8 * h + l0 / 16 + 2 * k] as i8 as f32;
                    t += d * s * a.d[xb] * (isum - 32 * sub) as f32;
                }
                t
            }
            _ => 0.0,
        };
    }
    acc
}

/// Whether `ty` has fp32- and int16-activation kernels.
fn has_float_kernel(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
}

/// `Σ w·x` over one row of Q4_0 / Q4_1 / Q8_0 blocks with int16 activations (`a.q16`): the
/// portable reference, integer block sums `Σ q·qₓ`, then `d·dₓ·Σqqₓ (+ m·dₓΣqₓ | − 8d·dₓΣqₓ)`.
pub fn row_dot_i16_scalar(ty: GgmlType, row: &[u8], a: &Q8Acts) -> f32 {
    let (_, bb) = ty.block();
    let mut acc = 0f32;
    for (b, w) in row.chunks_exact(bb).enumerate() {
        let x = &a.q16[b * QK..(b + 1) * QK];
        let d = f16_at(w, 0);
        acc += match ty {
            GgmlType::Q8_0 => {
                let s: i32 = w[2..34]
                    .iter()
                    .zip(x)
                    .map(|(&q, &v)| (q as i8) as i32 * v as i32)
                    .sum();
                d * a.d16[b] * s as f32
            }
            _ => {
                let off = if ty == GgmlType::Q4_0 { 2 } else { 4 };
                let qs = &w[off..off + 16];
                let mut s = 0i32;
                for j in 0..16 {
                    s +=
                        (qs[j] & 0xF) as i32 * x[j] as i32 + (qs[j] >> 4) as i32 * x[j + 16] as i32;
                }
                if ty == GgmlType::Q4_0 {
                    d * a.d16[b] * s as f32 - 8.0 * d * a.s16[b]
                } else {
                    d * a.d16[b] * s as f32 + f16_at(w, 2) * a.s16[b]
                }
            }
        };
    }
    acc
}

/// `Σ w·x` over one row of Q4_0 / Q4_1 / Q8_0 blocks with fp32 activations (`a.x`): the
/// portable reference, block sums `Σ q·x` in fp32, then `d·Σqx (+ m·Σx | − 8d·Σx)`.
pub fn row_dot_f32_scalar(ty: GgmlType, row: &[u8], a: &Q8Acts) -> f32 {
    let (_, bb) = ty.block();
    let mut acc = 0f32;
    for (b, w) in row.chunks_exact(bb).enumerate() {
        let x = &a.x[b * QK..(b + 1) * QK];
        let d = f16_at(w, 0);
        acc += match ty {
            GgmlType::Q8_0 => {
                d * w[2..34]
                    .iter()
                    .zip(x)
                    .map(|(&q, &v)| (q as i8) as f32 * v)
                    .sum::<f32>()
            }
            _ => {
                let off = if ty == GgmlType::Q4_0 { 2 } else { 4 };
                let qs = &w[off..off + 16];
                let mut s = 0f32;
                for j in 0..16 {
                    s += (qs[j] & 0xF) as f32 * x[j] + (qs[j] >> 4) as f32 * x[j + 16];
                }
                if ty == GgmlType::Q4_0 {
                    d * (s - 8.0 * a.xsum[b])
                } else {
                    d * s + f16_at(w, 2) * a.xsum[b]
                }
            }
        };
    }
    acc
}

/// `N` rows of Q4_0 / Q4_1 / Q8_0 blocks with `isa`'s SIMD kernels, in `a`'s activation
/// precision: AVX-512 (F/BW/VL/VNNI, `Isa::Avx512`) for int8 and fp32 (int16, and CPUs
/// without VNNI, run the AVX2 ones), AVX2 (+ FMA + F16C) for all three precisions, NEON for
/// int8 and int16. `None` where `isa` has no such kernel (the portable set, the K-quants,
/// fp32 activations on NEON).
fn simd_rows<const N: usize>(
    isa: Isa,
    ty: GgmlType,
    rows: [&[u8]; N],
    a: &Q8Acts,
) -> Option<[f32; N]> {
    if !has_float_kernel(ty) {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && avx512::available() && a.mode != Acts::Int16 {
        use avx512::{T_Q4_0, T_Q4_1, T_Q8_0};
        // SAFETY: AVX-512 F/BW/VL/VNNI and F16C were detected at run time; the rows hold
        // whole blocks and the activations cover them (the kernels take the shorter of the two).
        // int16 activations run the AVX2 kernels below (ggml_avx512.rs's module docs).
        return Some(unsafe {
            match (ty, a.mode) {
                (GgmlType::Q4_0, Acts::Int8) => avx512::rows32::<T_Q4_0, N>(rows, a),
                (GgmlType::Q4_1, Acts::Int8) => avx512::rows32::<T_Q4_1, N>(rows, a),
                (_, Acts::Int8) => avx512::rows32::<T_Q8_0, N>(rows, a),
                (GgmlType::Q4_0, _) => avx512::rows32_f32::<T_Q4_0, N>(rows, a),
                (GgmlType::Q4_1, _) => avx512::rows32_f32::<T_Q4_1, N>(rows, a),
                _ => avx512::rows32_f32::<T_Q8_0, N>(rows, a),
            }
        });
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512) && std::arch::is_x86_feature_detected!("f16c") {
        use avx2::{T_Q4_0, T_Q4_1, T_Q8_0};
        // SAFETY: AVX2 + FMA + F16C were detected at run time (Isa::available requires AVX2
        // and FMA; every such CPU has F16C, checked again here); the rows hold whole blocks and
        // the activations cover them (the kernels take the shorter of the two).
        return Some(unsafe {
            match (ty, a.mode) {
                (GgmlType::Q4_0, Acts::Int8) => avx2::rows32::<T_Q4_0, N>(rows, a),
                (GgmlType::Q4_1, Acts::Int8) => avx2::rows32::<T_Q4_1, N>(rows, a),
                (_, Acts::Int8) => avx2::rows32::<T_Q8_0, N>(rows, a),
                (GgmlType::Q4_0, Acts::Int16) => avx2::rows32_i16::<T_Q4_0, N>(rows, a),
                (GgmlType::Q4_1, Acts::Int16) => avx2::rows32_i16::<T_Q4_1, N>(rows, a),
                (_, Acts::Int16) => avx2::rows32_i16::<T_Q8_0, N>(rows, a),
                (GgmlType::Q4_0, Acts::F32) => avx2::rows32_f32::<T_Q4_0, N>(rows, a),
                (GgmlType::Q4_1, Acts::F32) => avx2::rows32_f32::<T_Q4_1, N>(rows, a),
                (_, Acts::F32) => avx2::rows32_f32::<T_Q8_0, N>(rows, a),
            }
        });
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon && a.mode != Acts::F32 {
        use neon::{T_Q4_0, T_Q4_1, T_Q8_0};
        let (q, d, s) = (&a.q, &a.d, &a.s);
        let (q16, d16, s16) = (&a.q16, &a.d16, &a.s16);
        let dot = std::arch::is_aarch64_feature_detected!("dotprod");
        // SAFETY: NEON was detected (Isa::Neon is only available with it), dotprod where its
        // kernel runs; the rows hold whole blocks and the activations cover them (the kernels
        // take the shorter of the two).
        return Some(unsafe {
            match (ty, a.mode) {
                (GgmlType::Q4_0, Acts::Int8) if dot => neon::rows32_dot::<T_Q4_0, N>(rows, q, d, s),
                (GgmlType::Q4_1, Acts::Int8) if dot => neon::rows32_dot::<T_Q4_1, N>(rows, q, d, s),
                (_, Acts::Int8) if dot => neon::rows32_dot::<T_Q8_0, N>(rows, q, d, s),
                (GgmlType::Q4_0, Acts::Int16) => neon::rows32_i16::<T_Q4_0, N>(rows, q16, d16, s16),
                (GgmlType::Q4_1, Acts::Int16) => neon::rows32_i16::<T_Q4_1, N>(rows, q16, d16, s16),
                (_, Acts::Int16) => neon::rows32_i16::<T_Q8_0, N>(rows, q16, d16, s16),
                (GgmlType::Q4_0, _) => neon::rows32::<T_Q4_0, N>(rows, q, d, s),
                (GgmlType::Q4_1, _) => neon::rows32::<T_Q4_1, N>(rows, q, d, s),
                _ => neon::rows32::<T_Q8_0, N>(rows, q, d, s),
            }
        });
    }
    let _ = (isa, rows, a);
    None
}

/// `Σ w·x` for one row with the kernels of `isa` (one of [`Isa::available`]).
pub fn row_dot(isa: Isa, ty: GgmlType, row: &[u8], a: &Q8Acts) -> f32 {
    if let Some([v]) = simd_rows(isa, ty, [row], a) {
        return v;
    }
    if has_float_kernel(ty) {
        match a.mode {
            Acts::Int16 => return row_dot_i16_scalar(ty, row, a),
            Acts::F32 => return row_dot_f32_scalar(ty, row, a),
            Acts::Int8 => {}
        }
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon && matches!(ty, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K) {
        let (q, d) = (a.q.as_slice(), a.d.as_slice());
        // SAFETY: NEON was detected (Isa::Neon requires it), dotprod where its kernels run;
        // the kernels take the shorter of the row and the activations.
        return unsafe {
            match (ty, std::arch::is_aarch64_feature_detected!("dotprod")) {
                (GgmlType::Q4K, true) => neon::q45_k_dot::<false>(row, q, d, &a.sum32),
                (GgmlType::Q5K, true) => neon::q45_k_dot::<true>(row, q, d, &a.sum32),
                (_, true) => neon::q6_k_dot(row, q, d, &a.sum16),
                (GgmlType::Q4K, false) => neon::q45_k::<false>(row, q, d, &a.sum32),
                (GgmlType::Q5K, false) => neon::q45_k::<true>(row, q, d, &a.sum32),
                (_, false) => neon::q6_k(row, q, d, &a.sum16),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 && avx512::available() {
        // SAFETY: as in simd_rows (AVX-512 F/BW/VL/VNNI detected).
        match ty {
            GgmlType::Q4K => return unsafe { avx512::q45_k::<false>(row, a) },
            GgmlType::Q5K => return unsafe { avx512::q45_k::<true>(row, a) },
            GgmlType::Q6K => return unsafe { avx512::q6_k(row, a) },
            _ => {}
        }
    }
    #[cfg(target_arch = "x86_64")]
    if matches!(isa, Isa::Avx2 | Isa::Avx512) && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: as in simd_rows.
        match ty {
            GgmlType::Q4K => return unsafe { avx2::q45_k::<false>(row, a) },
            GgmlType::Q5K => return unsafe { avx2::q45_k::<true>(row, a) },
            GgmlType::Q6K => return unsafe { avx2::q6_k(row, a) },
            _ => {}
        }
    }
    row_dot_scalar(ty, row, a)
}

/// `y[r] = Σ_c W[r, c]·x[c]` for rows `r0..r0 + y.len()` of a `[rows, cols]` matrix of `ty`
/// blocks (no threading: callers split the rows).
pub fn gemv_rows(
    isa: Isa,
    ty: GgmlType,
    data: &[u8],
    cols: usize,
    a: &Q8Acts,
    r0: usize,
    y: &mut [f32],
) {
    let rb = row_bytes(ty, cols);
    let row = |r: usize| &data[(r0 + r) * rb..(r0 + r + 1) * rb];
    let mut done = 0;
    while done + 4 <= y.len() {
        let Some(v) = simd_rows::<4>(isa, ty, std::array::from_fn(|j| row(done + j)), a) else {
            break;
        };
        y[done..done + 4].copy_from_slice(&v);
        done += 4;
    }
    for (i, yr) in y.iter_mut().enumerate().skip(done) {
        *yr = row_dot(isa, ty, row(i), a);
    }
}

/// [`gemv_rows`] over all rows, rayon-parallel.
pub fn gemv(isa: Isa, ty: GgmlType, data: &[u8], cols: usize, a: &Q8Acts, y: &mut [f32]) {
    const ROWS_PER_TASK: usize = 64;
    y.par_chunks_mut(ROWS_PER_TASK)
        .enumerate()
        .for_each(|(t, ys)| gemv_rows(isa, ty, data, cols, a, t * ROWS_PER_TASK, ys));
}

/// One row of `ty` blocks as floats, `out.len() = cols` (an embedding lookup).
pub fn dequantize_row(ty: GgmlType, row: &[u8], out: &mut [f32]) {
    crate::gguf::dequantize_into(ty, row, out);
}

/// Quantise one row to `ty` blocks as llama.cpp's reference quantisers do (Q4_0, Q4_1, Q8_0;
/// the K-quants' search-based quantisers are not reimplemented). `x.len()` is a multiple of 32.
pub fn quantize_row(ty: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(row_bytes(ty, x.len()));
    let f16 = |v: f32| half::f16::from_f32(v).to_le_bytes();
    for b in x.chunks(QK) {
        if b.len() != QK {
            return Err(TextError::InvalidArgument(format!(
                "{} rows are whole 32-value blocks, got {} values",
                ty.name(),
                x.len()
            )));
        }
        match ty {
            GgmlType::Q8_0 => {
                let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16(d));
                out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
            }
            GgmlType::Q4_0 => {
                // The value of largest magnitude maps to −8.
                let max = b
                    .iter()
                    .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16(d));
                let q = |v: f32| ((v * id + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
            GgmlType::Q4_1 => {
                let min = b.iter().fold(f32::INFINITY, |m, &v| m.min(v));
                let max = b.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16(d));
                out.extend(f16(min));
                let q = |v: f32| (((v - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(b[j]) | (q(b[j + 16]) << 4)));
            }
            _ => {
                return Err(TextError::InvalidArgument(format!(
                    "quantising to {} is not supported (Q4_0, Q4_1, Q8_0 are)",
                    ty.name()
                )))
            }
        }
    }
    Ok(out)
}

/// The tensor-name suffix a weight `NAME` of `ty` blocks is stored under (`NAME.q4_1`, …).
pub fn suffix(ty: GgmlType) -> String {
    ty.name().to_ascii_lowercase()
}

/// A `[rows, cols]` weight kept as GGUF blocks: uint8 `[rows, row_bytes]`, each row its
/// blocks in order, byte for byte as the GGUF file holds them.
#[derive(Debug)]
pub struct GgmlWeight {
    data: Tensor,
    ty: GgmlType,
    rows: i64,
    cols: i64,
}

impl GgmlWeight {
    /// From the raw bytes of a GGUF tensor of PyTorch shape `[rows, cols]`.
    pub fn from_bytes(ty: GgmlType, bytes: &[u8], rows: i64, cols: i64) -> Result<Self> {
        let rb = Self::check(ty, rows, cols, bytes.len())?;
        let data = Tensor::f_from_slice(bytes)?.f_view([rows, rb as i64])?;
        Ok(Self {
            data,
            ty,
            rows,
            cols,
        })
    }

    /// Quantise a row-major fp32 `[rows, cols]` matrix ([`quantize_row`]).
    pub fn quantize(ty: GgmlType, w: &[f32], rows: i64, cols: i64) -> Result<Self> {
        if rows <= 0 || cols <= 0 || w.len() != (rows * cols) as usize {
            return Err(TextError::InvalidArgument(format!(
                "{} values for a [{rows}, {cols}] weight",
                w.len()
            )));
        }
        let mut bytes = Vec::new();
        for r in w.chunks(cols as usize) {
            bytes.extend(quantize_row(ty, r)?);
        }
        Self::from_bytes(ty, &bytes, rows, cols)
    }

    fn check(ty: GgmlType, rows: i64, cols: i64, len: usize) -> Result<usize> {
        if !is_block_type(ty)
            || rows <= 0
            || cols <= 0
            || !(cols as usize).is_multiple_of(ty.block().0)
        {
            return Err(TextError::InvalidArgument(format!(
                "{} blocks cannot hold a [{rows}, {cols}] weight (rows of whole {}-value blocks)",
                ty.name(),
                ty.block().0
            )));
        }
        let rb = row_bytes(ty, cols as usize);
        if len != rows as usize * rb {
            return Err(TextError::InvalidArgument(format!(
                "{len} bytes for a [{rows}, {cols}] {} weight (expected {})",
                ty.name(),
                rows as usize * rb
            )));
        }
        Ok(rb)
    }

    /// `name.{type}` (U8 `[rows, row_bytes]`) from a weight map, if present for one of the
    /// block types; the shape is checked, errors name the file and tensor.
    pub fn from_map(w: &WeightMap, name: &str, rows: i64, cols: i64) -> Result<Option<Self>> {
        for ty in BLOCK_TYPES {
            let tname = format!("{name}.{}", suffix(ty));
            let Some(t) = w.raw(&tname) else { continue };
            let err = |msg: String| TextError::checkpoint(w.file_of(&tname), msg);
            let ok_shape = cols > 0 && (cols as usize).is_multiple_of(ty.block().0) && {
                let rb = row_bytes(ty, cols as usize) as i64;
                t.size() == [rows, rb]
            };
            if t.kind() != Kind::Uint8 || !ok_shape {
                return Err(err(format!(
                    "tensor '{tname}' is {:?} {:?}: a [{rows}, {cols}] weight in {} blocks is U8 \
                     [{rows}, {}]",
                    t.kind(),
                    t.size(),
                    ty.name(),
                    if cols > 0 && (cols as usize).is_multiple_of(ty.block().0) {
                        row_bytes(ty, cols as usize).to_string()
                    } else {
                        format!("(columns not a multiple of {})", ty.block().0)
                    }
                )));
            }
            let data = t.f_to_device(Device::Cpu)?.f_contiguous()?;
            return Ok(Some(Self {
                data,
                ty,
                rows,
                cols,
            }));
        }
        Ok(None)
    }

    /// The tensor this weight is stored as under `name`.
    pub fn tensors(&self, name: &str) -> Vec<(String, Tensor)> {
        vec![(
            format!("{name}.{}", suffix(self.ty)),
            self.data.shallow_clone(),
        )]
    }

    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    pub fn rows(&self) -> i64 {
        self.rows
    }
    pub fn cols(&self) -> i64 {
        self.cols
    }
    pub fn stored_bytes(&self) -> usize {
        self.data.numel()
    }
    pub fn bits_per_weight(&self) -> f64 {
        let (bs, bb) = self.ty.block();
        8.0 * bb as f64 / bs as f64
    }

    /// The blocks, row after row.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `data` is a contiguous CPU uint8 tensor (checked on construction) owned by
        // self.
        unsafe { crate::quant::packed::cpu_slice::<u8>(&self.data) }
    }

    pub fn shallow_clone(&self) -> Self {
        Self {
            data: self.data.shallow_clone(),
            ..*self
        }
    }

    /// Rows `idx` (any shape, int64) as floats in `kind`: `[..idx, cols]` (embedding lookups).
    pub fn rows_of(&self, idx: &Tensor, kind: Kind) -> Result<Tensor> {
        let ids = Vec::<i64>::try_from(idx.f_flatten(0, -1)?.f_to_device(Device::Cpu)?)?;
        let (cols, rb) = (self.cols as usize, row_bytes(self.ty, self.cols as usize));
        let bytes = self.bytes();
        let mut out = vec![0f32; ids.len() * cols];
        for (o, &r) in out.chunks_exact_mut(cols).zip(&ids) {
            if r < 0 || r >= self.rows {
                return Err(TextError::InvalidArgument(format!(
                    "row {r} of a {}-row table",
                    self.rows
                )));
            }
            let r = r as usize;
            dequantize_row(self.ty, &bytes[r * rb..(r + 1) * rb], o);
        }
        let mut shape = idx.size();
        shape.push(self.cols);
        Ok(Tensor::f_from_slice(&out)?
            .f_view(shape.as_slice())?
            .f_to_kind(kind)?)
    }

    /// The whole `[rows, cols]` matrix in `kind` (bit-exact fp32 values, as gguf-py gives).
    ///
    /// Written straight into the new tensor on the calling thread: a prefill alternates this
    /// with libtorch's matmuls, and waking the decode pool here would leave its workers
    /// spinning on the cores OpenMP's threads need next (measured: the matmul after a pooled
    /// dequantisation ran at half speed on 2 cores).
    pub fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        let out = Tensor::f_empty([self.rows, self.cols], (Kind::Float, Device::Cpu))?;
        // SAFETY: `out` is a fresh contiguous fp32 [rows, cols] tensor that nothing else holds.
        let y = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, out.numel()) };
        crate::gguf::dequantize_into(self.ty, self.bytes(), y);
        Ok(out.f_to_kind(kind)?)
    }

    /// `x·Wᵀ (+ b)` for `x: [..., cols]`: a decode step or a small batch (at most
    /// [`crate::quant::GEMV_MAX_ROWS`] rows, CPU, no autograd) runs the block kernels
    /// (several rows: tile by tile, the weights read once for all, [`crate::quant::batched_rows`]);
    /// longer inputs dequantise the matrix and run one matmul.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let n = x.numel() as i64 / self.cols.max(1);
        if n > crate::quant::GEMV_MAX_ROWS || x.device() != Device::Cpu || x.requires_grad() {
            let w = self.dequantize(x.kind())?.f_to_device(x.device())?;
            return Ok(x.f_linear(
                &w,
                bias.map(|b| b.f_to_device(x.device()))
                    .transpose()?
                    .as_ref(),
            )?);
        }
        let shape = x.size();
        let xf = x
            .f_reshape([n, self.cols])?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?;
        let xs = Vec::<f32>::try_from(xf.f_flatten(0, -1)?)?;
        let (rows, cols) = (self.rows as usize, self.cols as usize);
        let mut y = vec![0f32; n as usize * rows];
        let isa = Isa::current();
        let acts: Vec<Q8Acts> = xs
            .chunks_exact(cols)
            .map(|xr| {
                let mut a = Q8Acts::default();
                a.prepare(xr, activations());
                a
            })
            .collect();
        if n == 1 {
            gemv(isa, self.ty, self.bytes(), cols, &acts[0], &mut y);
        } else {
            // A small batch (several tokens or sequences): the weights are read once for all.
            let (ty, bytes) = (self.ty, self.bytes());
            crate::quant::batched_rows(n as usize, rows, &mut y, |i, r0, out| {
                gemv_rows(isa, ty, bytes, cols, &acts[i], r0, out)
            });
        }
        crate::quant::gemv_output(&y, shape, self.rows, bias, x.kind())
    }
}

/// Every block type the kernels read.
pub const BLOCK_TYPES: [GgmlType; 6] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Random blocks for `rows` rows of `ty` with sane fp16 scales in every block (kernel tests
/// and benchmarks), seeded.
pub fn random_blocks(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let (_, bb) = ty.block();
    let mut out = vec![0u8; rows * row_bytes(ty, cols)];
    for blk in out.chunks_exact_mut(bb) {
        for v in blk.iter_mut() {
            *v = rng.next_u64() as u8;
        }
        let mut put = |at: usize, v: f32| {
            blk[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes())
        };
        match ty {
            GgmlType::Q4_0 | GgmlType::Q8_0 => put(0, 0.01 + 0.02 * uniform_pm1(&mut rng).abs()),
            GgmlType::Q4_1 | GgmlType::Q4K | GgmlType::Q5K => {
                put(0, 0.01 + 0.02 * uniform_pm1(&mut rng).abs());
                put(2, 0.02 * uniform_pm1(&mut rng));
            }
            GgmlType::Q6K => put(208, 0.001 + 0.002 * uniform_pm1(&mut rng).abs()),
            _ => {}
        }
    }
    out
}

/// Uniform in [−1, 1) from the project's seeded generator (tests and benchmarks).
pub fn uniform_pm1(rng: &mut Rng) -> f32 {
    rng.next_f64() as f32 * 2.0 - 1.0
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::runtime::cpu_kernels::avx2::{hsum, prefetch};

    use super::{Q8Acts, QK};

    /// The fp16 at `p` (a block's scale or min) as f32 (also the AVX-512 kernels').
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn f16(p: *const u8) -> f32 {
        let h = std::ptr::read_unaligned(p as *const u16);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    /// 16 bytes of nibbles → 32 bytes: low nibbles in the low lane, high nibbles in the high.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let v = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(v), v);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// Σ u·s over 32 unsigned × signed byte pairs, as 8 i32 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_us(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    /// Block `b` of a 32-value block row: its integer sums with the activations (8 lanes),
    /// and its scale `d` (and min `m` for Q4_1; Q4_0's −8 offset is folded in by the caller).
    #[inline(always)]
    unsafe fn block32<const TY: u8>(w: *const u8, xq: *const i8, b: usize) -> (__m256i, f32, f32) {
        let x = _mm256_loadu_si256(xq.add(QK * b) as *const __m256i);
        match TY {
            T_Q4_0 => {
                let wb = w.add(18 * b);
                (dot_us(nibbles(wb.add(2)), x), f16(wb), 0.0)
            }
            T_Q4_1 => {
                let wb = w.add(20 * b);
                (dot_us(nibbles(wb.add(4)), x), f16(wb), f16(wb.add(2)))
            }
            _ => {
                let wb = w.add(34 * b);
                let q = _mm256_loadu_si256(wb.add(2) as *const __m256i);
                // Signed × signed through maddubs: |q| × (x with q's sign).
                (
                    dot_us(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q)),
                    f16(wb),
                    0.0,
                )
            }
        }
    }

    pub const T_Q4_0: u8 = 0;
    pub const T_Q4_1: u8 = 1;
    pub const T_Q8_0: u8 = 2;

    /// `N` rows of 32-value blocks at once: `N` independent accumulator chains; the
    /// activations' per-block factors are read once for all rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows32<const TY: u8, const N: usize>(rows: [&[u8]; N], a: &Q8Acts) -> [f32; N] {
        let nb = a.d.len().min(rows[0].len() / [18, 20, 34][TY as usize]);
        let (xq, xd, xs) = (a.q.as_ptr(), a.d.as_ptr(), a.s.as_ptr());
        let mut acc = [_mm256_setzero_ps(); N];
        let mut offs = [0f32; N];
        // The rows after these (callers walk contiguous rows) are fetched while these compute,
        // N blocks' bytes per step, so the next group is in cache when it starts.
        let bs = [18, 20, 34][TY as usize];
        let next = rows[N - 1].as_ptr().wrapping_add(rows[N - 1].len());
        for b in 0..nb {
            prefetch(next.wrapping_add(b * N * bs), N * bs);
            let (dx, sx) = (*xd.add(b), *xs.add(b));
            for j in 0..N {
                let (p, d, m) = block32::<TY>(rows[j].as_ptr(), xq, b);
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(p), acc[j]);
                match TY {
                    T_Q4_1 => offs[j] += m * sx,
                    T_Q4_0 => offs[j] -= 8.0 * d * sx,
                    _ => {}
                }
            }
        }
        std::array::from_fn(|j| hsum(acc[j]) + offs[j])
    }

    /// [`rows32`] with int16 activations (`a.q16`, `a.d16`, `a.s16`): codes widen to int16
    /// and meet the activations in `vpmaddwd`; the integer block sums are exact.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows32_i16<const TY: u8, const N: usize>(
        rows: [&[u8]; N],
        a: &Q8Acts,
    ) -> [f32; N] {
        let bb = [18usize, 20, 34][TY as usize];
        let nb = a.d16.len().min(rows[0].len() / bb);
        let (xq, xd, xs) = (a.q16.as_ptr(), a.d16.as_ptr(), a.s16.as_ptr());
        let m4 = _mm_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut offs = [0f32; N];
        let next = rows[N - 1].as_ptr().wrapping_add(rows[N - 1].len());
        for b in 0..nb {
            prefetch(next.wrapping_add(b * N * bb), N * bb);
            let x0 = _mm256_loadu_si256(xq.add(QK * b) as *const __m256i);
            let x1 = _mm256_loadu_si256(xq.add(QK * b + 16) as *const __m256i);
            let (dx, sx) = (*xd.add(b), *xs.add(b));
            for j in 0..N {
                let wb = rows[j].as_ptr().add(bb * b);
                let d = f16(wb);
                let (lo, hi) = match TY {
                    T_Q8_0 => (
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.add(2) as *const __m128i)),
                        _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.add(18) as *const __m128i)),
                    ),
                    _ => {
                        let off = if TY == T_Q4_0 { 2 } else { 4 };
                        let v = _mm_loadu_si128(wb.add(off) as *const __m128i);
                        (
                            _mm256_cvtepu8_epi16(_mm_and_si128(v, m4)),
                            _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(v), m4)),
                        )
                    }
                };
                let p = _mm256_add_epi32(_mm256_madd_epi16(lo, x0), _mm256_madd_epi16(hi, x1));
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(p), acc[j]);
                match TY {
                    T_Q4_1 => offs[j] += f16(wb.add(2)) * sx,
                    T_Q4_0 => offs[j] -= 8.0 * d * sx,
                    _ => {}
                }
            }
        }
        std::array::from_fn(|j| hsum(acc[j]) + offs[j])
    }

    /// 16 bytes → 16 lanes of fp32 in two registers (unsigned or signed bytes).
    #[inline(always)]
    unsafe fn widen16(v: __m128i, signed: bool) -> [__m256; 2] {
        let hi = _mm_srli_si128::<8>(v);
        if signed {
            [
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)),
            ]
        } else {
            [
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)),
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)),
            ]
        }
    }

    /// [`rows32`] with fp32 activations (`a.x`, `a.xsum`): the codes widen to fp32 and meet
    /// `x` in FMAs; one `d·Σqx` per block (and `m·Σx` / `−8d·Σx`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rows32_f32<const TY: u8, const N: usize>(
        rows: [&[u8]; N],
        a: &Q8Acts,
    ) -> [f32; N] {
        let bb = [18usize, 20, 34][TY as usize];
        let nb = a.xsum.len().min(rows[0].len() / bb);
        let (xp, xs) = (a.x.as_ptr(), a.xsum.as_ptr());
        let m4 = _mm_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut offs = [0f32; N];
        let next = rows[N - 1].as_ptr().wrapping_add(rows[N - 1].len());
        for b in 0..nb {
            prefetch(next.wrapping_add(b * N * bb), N * bb);
            let xb = xp.add(QK * b);
            let x: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(xb.add(8 * k)));
            let sx = *xs.add(b);
            for j in 0..N {
                let wb = rows[j].as_ptr().add(bb * b);
                let d = f16(wb);
                let q: [__m256; 4] = match TY {
                    T_Q8_0 => {
                        let lo = widen16(_mm_loadu_si128(wb.add(2) as *const __m128i), true);
                        let hi = widen16(_mm_loadu_si128(wb.add(18) as *const __m128i), true);
                        [lo[0], lo[1], hi[0], hi[1]]
                    }
                    _ => {
                        let off = if TY == T_Q4_0 { 2 } else { 4 };
                        let v = _mm_loadu_si128(wb.add(off) as *const __m128i);
                        let lo = widen16(_mm_and_si128(v, m4), false);
                        let hi = widen16(_mm_and_si128(_mm_srli_epi16::<4>(v), m4), false);
                        [lo[0], lo[1], hi[0], hi[1]]
                    }
                };
                let s = _mm256_fmadd_ps(
                    q[3],
                    x[3],
                    _mm256_fmadd_ps(
                        q[2],
                        x[2],
                        _mm256_fmadd_ps(q[1], x[1], _mm256_mul_ps(q[0], x[0])),
                    ),
                );
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc[j]);
                match TY {
                    T_Q4_1 => offs[j] += f16(wb.add(2)) * sx,
                    T_Q4_0 => offs[j] -= 8.0 * d * sx,
                    _ => {}
                }
            }
        }
        std::array::from_fn(|j| hsum(acc[j]) + offs[j])
    }

    /// Q4_K, or Q5_K with `FIVE` (the fifth bit of sub-block `j` is bit `j` of `qh[l]`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q45_k<const FIVE: bool>(row: &[u8], a: &Q8Acts) -> f32 {
        let (bb, qs) = if FIVE { (176, 48) } else { (144, 16) };
        let nb = row.len() / bb;
        let xq = a.q.as_ptr();
        let mut acc = _mm256_setzero_ps();
        let mut offs = 0f32;
        let m4 = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        let next = row.as_ptr().wrapping_add(row.len());
        for b in 0..nb {
            prefetch(next.wrapping_add(bb * b), bb);
            let w = &row[bb * b..bb * (b + 1)];
            let (d, dmin) = (f16(w.as_ptr()), f16(w.as_ptr().add(2)));
            let ql = w.as_ptr().add(qs);
            let qh = if FIVE {
                _mm256_loadu_si256(w.as_ptr().add(16) as *const __m256i)
            } else {
                _mm256_setzero_si256()
            };
            for jj in 0..4 {
                // Sub-blocks 2·jj (low nibbles) and 2·jj + 1 (high nibbles) share 32 bytes.
                let v = _mm256_loadu_si256(ql.add(32 * jj) as *const __m256i);
                let lo = _mm256_and_si256(v, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                for (h, q) in [(0, lo), (1, hi)] {
                    let j = 2 * jj + h;
                    let q = if FIVE {
                        let bit = _mm256_and_si256(
                            _mm256_srl_epi16(qh, _mm_cvtsi32_si128(j as i32)),
                            one,
                        );
                        _mm256_or_si256(q, _mm256_slli_epi16::<4>(bit))
                    } else {
                        q
                    };
                    let xb = 8 * b + j;
                    let (sc, m) = super::scale_min_k4(j, &w[4..16]);
                    let p = dot_us(q, _mm256_loadu_si256(xq.add(QK * xb) as *const __m256i));
                    acc = _mm256_fmadd_ps(
                        _mm256_set1_ps(a.d[xb] * d * sc as f32),
                        _mm256_cvtepi32_ps(p),
                        acc,
                    );
                    offs -= a.d[xb] * dmin * m as f32 * a.sum32[xb] as f32;
                }
            }
        }
        hsum(acc) + offs
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q6_k(row: &[u8], a: &Q8Acts) -> f32 {
        let nb = row.len() / 210;
        let xq = a.q.as_ptr();
        let mut acc = _mm256_setzero_ps();
        let mut offs = 0f32;
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(3);
        let next = row.as_ptr().wrapping_add(row.len());
        for b in 0..nb {
            prefetch(next.wrapping_add(210 * b), 210);
            let w = row.as_ptr().add(210 * b);
            let d = f16(w.add(208));
            let sc = w.add(192) as *const i8;
            for h in 0..2 {
                let ql0 = _mm256_loadu_si256(w.add(64 * h) as *const __m256i);
                let ql1 = _mm256_loadu_si256(w.add(64 * h + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(w.add(128 + 32 * h) as *const __m256i);
                for k in 0..4 {
                    let lo = match k {
                        0 => _mm256_and_si256(ql0, m4),
                        1 => _mm256_and_si256(ql1, m4),
                        2 => _mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4),
                        _ => _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
                    };
                    let hi =
                        _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * k as i32)), m2);
                    let q = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hi));
                    let xb = 8 * b + 4 * h + k;
                    let x = _mm256_loadu_si256(xq.add(QK * xb) as *const __m256i);
                    // i16 pair sums: lanes 0..8 are values 0..16, lanes 8..16 values 16..32.
                    let p16 = _mm256_maddubs_epi16(q, x);
                    let s0 = *sc.add(8 * h + 2 * k) as i16;
                    let s1 = *sc.add(8 * h + 2 * k + 1) as i16;
                    let scales = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                    let p = _mm256_madd_epi16(p16, scales);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d[xb]), _mm256_cvtepi32_ps(p), acc);
                    let sub = s0 as i32 * a.sum16[2 * xb] + s1 as i32 * a.sum16[2 * xb + 1];
                    offs -= d * a.d[xb] * (32 * sub) as f32;
                }
            }
        }
        hsum(acc) + offs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_blocks(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
        super::random_blocks(ty, rows, cols, rng.next_u64())
    }

    const TYPES: [GgmlType; 6] = BLOCK_TYPES;

    #[test]
    fn scalar_reference_equals_the_dequantized_dot_product() {
        // Σ dequant(w)·dequant(x_q) in f64 = the block-wise integer formula.
        let mut rng = Rng::new(7);
        for ty in TYPES {
            let cols = ty.block().0 * 3;
            let w = random_blocks(ty, 5, cols, &mut rng);
            let x: Vec<f32> = (0..cols).map(|_| uniform_pm1(&mut rng) * 3.0).collect();
            let a = Q8Acts::from_slice(&x);
            let xd = a.dequantize();
            for r in 0..5 {
                let row = &w[r * row_bytes(ty, cols)..(r + 1) * row_bytes(ty, cols)];
                let wd = crate::gguf::dequantize(ty, row);
                let want: f64 = wd.iter().zip(&xd).map(|(&a, &b)| a as f64 * b as f64).sum();
                let scale: f64 = wd
                    .iter()
                    .zip(&xd)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum();
                let got = row_dot_scalar(ty, row, &a) as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * scale + 1e-6,
                    "{}: {got} vs {want} (scale {scale})",
                    ty.name()
                );
            }
        }
    }

    #[test]
    fn reference_quantisers_round_trip_within_half_a_step() {
        let mut rng = Rng::new(9);
        let x: Vec<f32> = (0..96).map(|_| uniform_pm1(&mut rng) * 2.0).collect();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let b = quantize_row(ty, &x).unwrap();
            assert_eq!(b.len(), row_bytes(ty, 96));
            let back = crate::gguf::dequantize(ty, &b);
            for (blk, (xs, ys)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
                let (lo, hi) = xs
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, c), &v| (a.min(v), c.max(v)));
                let step = match ty {
                    GgmlType::Q8_0 => lo.abs().max(hi.abs()) / 127.0,
                    GgmlType::Q4_0 => lo.abs().max(hi.abs()) / 8.0,
                    _ => (hi - lo) / 15.0,
                };
                // Half a step, plus the fp16 rounding of the scale (and min); Q4_0 maps the
                // largest magnitude to −8, so the other end (+8) clamps to 7: one step there.
                let bound = if ty == GgmlType::Q4_0 {
                    step
                } else {
                    0.5 * step
                };
                for (a, b) in xs.iter().zip(ys) {
                    assert!(
                        (a - b).abs() <= bound * 1.01 + 2e-3,
                        "{} block {blk}",
                        ty.name()
                    );
                }
            }
        }
        assert!(quantize_row(GgmlType::Q6K, &x).is_err());
        assert!(quantize_row(GgmlType::Q8_0, &x[..40]).is_err());
    }

    /// fp32 and int16 activations: every kernel set equals its portable reference, and the
    /// reference equals the dequantised dot product (int16: to its rounding, half a step per
    /// activation times |w|).
    #[test]
    fn fp32_and_int16_activation_kernels_equal_their_references() {
        let mut rng = Rng::new(13);
        type Reference = fn(GgmlType, &[u8], &Q8Acts) -> f32;
        let modes: [(Acts, Reference); 2] = [
            (Acts::F32, row_dot_f32_scalar),
            (Acts::Int16, row_dot_i16_scalar),
        ];
        for (mode, reference) in modes {
            for isa in Isa::available() {
                for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
                    for nblk in [1usize, 2, 5, 18] {
                        let cols = 32 * nblk;
                        let rows = 1 + (rng.next_u64() % 9) as usize;
                        let w = random_blocks(ty, rows, cols, &mut rng);
                        let x: Vec<f32> = (0..cols).map(|_| uniform_pm1(&mut rng) * 2.0).collect();
                        let mut a = Q8Acts::default();
                        a.prepare(&x, mode);
                        let mut got = vec![0f32; rows];
                        gemv(isa, ty, &w, cols, &a, &mut got);
                        let rb = row_bytes(ty, cols);
                        for (r, g) in got.iter().enumerate() {
                            let row = &w[r * rb..(r + 1) * rb];
                            let wd = crate::gguf::dequantize(ty, row);
                            let want: f64 =
                                wd.iter().zip(&x).map(|(&p, &q)| p as f64 * q as f64).sum();
                            let scale: f64 = wd
                                .iter()
                                .zip(&x)
                                .map(|(&p, &q)| (p as f64 * q as f64).abs())
                                .sum();
                            let rounding: f64 = match mode {
                                Acts::Int16 => wd
                                    .iter()
                                    .enumerate()
                                    .map(|(i, &p)| p.abs() as f64 * a.d16[i / QK] as f64 * 0.5)
                                    .sum(),
                                _ => 0.0,
                            };
                            let refv = reference(ty, row, &a) as f64;
                            assert!(
                                (refv - want).abs() <= rounding + 1e-5 * scale + 1e-6,
                                "{} {} reference: {refv} vs {want}",
                                mode.name(),
                                ty.name()
                            );
                            assert!(
                                (*g as f64 - refv).abs() <= 2e-6 * scale + 1e-6,
                                "{} {} {}: {g} vs {refv}",
                                mode.name(),
                                isa.name(),
                                ty.name()
                            );
                        }
                    }
                }
            }
        }
        // A mode name round-trips; unknown names are refused.
        for m in [Acts::Int8, Acts::Int16, Acts::F32] {
            assert_eq!(Acts::parse(m.name()), Some(m));
        }
        assert_eq!(Acts::parse("int4"), None);
    }

    #[test]
    fn activation_quantization_is_within_half_a_step() {
        let mut rng = Rng::new(3);
        let x: Vec<f32> = (0..96)
            .map(|i| uniform_pm1(&mut rng) * (1 + i % 7) as f32)
            .collect();
        let a = Q8Acts::from_slice(&x);
        for (i, (v, q)) in x.iter().zip(a.dequantize()).enumerate() {
            assert!((v - q).abs() <= a.d[i / QK] * 0.5 + 1e-7);
        }
        assert_eq!(
            a.sum32[1],
            a.q[32..64].iter().map(|&q| q as i32).sum::<i32>()
        );
        assert_eq!(
            a.sum16[3],
            a.q[48..64].iter().map(|&q| q as i32).sum::<i32>()
        );
        // An all-zero block quantises to zeros with a zero scale (no NaN).
        let z = Q8Acts::from_slice(&[0.0; 32]);
        assert_eq!((z.d[0], z.q.iter().all(|&q| q == 0)), (0.0, true));
    }

    /// A small batch (2..=GEMV_MAX_ROWS input rows) gives exactly the single-vector products,
    /// for every block type, on a matrix of several row tiles with a ragged last one.
    #[test]
    fn batched_forward_equals_one_vector_at_a_time() {
        let mut rng = Rng::new(21);
        let (rows, cols) = (2 * crate::quant::BATCH_TILE_ROWS + 13, 256);
        for ty in TYPES {
            let w = GgmlWeight::from_bytes(
                ty,
                &random_blocks(ty, rows, cols, &mut rng),
                rows as i64,
                cols as i64,
            )
            .unwrap();
            for n in [2usize, 3, crate::quant::GEMV_MAX_ROWS as usize] {
                let xs: Vec<f32> = (0..n * cols).map(|_| uniform_pm1(&mut rng)).collect();
                let x = Tensor::from_slice(&xs).view([1, n as i64, cols as i64]);
                let got =
                    Vec::<f32>::try_from(w.forward(&x, None).unwrap().flatten(0, -1)).unwrap();
                assert_eq!(got.len(), n * rows);
                for i in 0..n {
                    let one = w
                        .forward(&x.get(0).get(i as i64).view([1, -1]), None)
                        .unwrap();
                    let one = Vec::<f32>::try_from(one.flatten(0, -1)).unwrap();
                    assert_eq!(
                        &got[i * rows..(i + 1) * rows],
                        &one[..],
                        "{} n {n} row {i}",
                        ty.name()
                    );
                }
            }
        }
    }

    #[test]
    fn every_kernel_set_equals_the_scalar_reference() {
        let mut rng = Rng::new(11);
        for isa in Isa::available() {
            for ty in TYPES {
                let bs = ty.block().0;
                for nblk in [1usize, 2, 3, 7, 18] {
                    let cols = bs * nblk;
                    let rows = 1 + (rng.next_u64() % 9) as usize;
                    let w = random_blocks(ty, rows, cols, &mut rng);
                    let x: Vec<f32> = (0..cols).map(|_| uniform_pm1(&mut rng) * 2.0).collect();
                    let a = Q8Acts::from_slice(&x);
                    let mut got = vec![0f32; rows];
                    gemv(isa, ty, &w, cols, &a, &mut got);
                    let rb = row_bytes(ty, cols);
                    for (r, g) in got.iter().enumerate() {
                        let row = &w[r * rb..(r + 1) * rb];
                        let want = row_dot_scalar(ty, row, &a);
                        // Same integer block sums; only the order of the float block terms
                        // differs: bound by the size of the terms.
                        let wd = crate::gguf::dequantize(ty, row);
                        let scale: f32 = wd
                            .iter()
                            .zip(a.dequantize())
                            .map(|(a, b)| (a * b).abs())
                            .sum();
                        assert!(
                            (g - want).abs() <= 2e-6 * scale + 1e-6,
                            "{} {} {rows}x{cols} row {r}: {g} vs {want}",
                            isa.name(),
                            ty.name()
                        );
                    }
                }
            }
        }
    }
}
