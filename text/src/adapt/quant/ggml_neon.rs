//! ARM NEON kernels for Q4_0 / Q4_1 / Q8_0 blocks and the K-quants Q4_K / Q5_K / Q6_K (every
//! aarch64 CPU has NEON; Apple's M series and most ARM servers): int8 activations
//! (`vmull_s8` / `vmlal_high_s8` pair products in int16, widened and summed in int32; with the ARMv8.2 dotprod extension — Apple M1 and
//! later, Graviton 2 and later — one `sdot` per 16 codes instead) and int16 activations
//! (`vmull_s16` / `vmlal_high_s16` into int32). The integer block sums are exact, as in the AVX2 kernels; the float block terms
//! are added in a different order than the portable reference.
//!
//! The K-quants take int8 activations only (as on x86), 32 or 16 codes per integer dot product.
//!
//! The file needs from its parent module only `QK`, `f16_at` (fp16 scale bytes → f32) and
//! `scale_min_k4` (a K-quant's packed 6-bit scale and min), so
//! that the kernels can also be built alone for an aarch64 check under emulation
//! (`text/bench/neon_check/`).

use core::arch::aarch64::*;

use super::{f16_at, scale_min_k4, QK};

pub const T_Q4_0: u8 = 0;
pub const T_Q4_1: u8 = 1;
pub const T_Q8_0: u8 = 2;

/// Bytes per 32-value block of Q4_0, Q4_1, Q8_0.
const BLOCK: [usize; 3] = [18, 20, 34];

/// The 32 codes of block `w` as two int8 vectors (values 0..16 and 16..32); Q4 codes are the
/// unsigned nibbles (Q4_0's −8 is folded in by the caller through Σx).
#[inline(always)]
unsafe fn codes<const TY: u8>(w: *const u8) -> (int8x16_t, int8x16_t) {
    match TY {
        T_Q8_0 => (
            vld1q_s8(w.add(2) as *const i8),
            vld1q_s8(w.add(18) as *const i8),
        ),
        _ => {
            let v = vld1q_u8(w.add(if TY == T_Q4_0 { 2 } else { 4 }));
            (
                vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F))),
                vreinterpretq_s8_u8(vshrq_n_u8::<4>(v)),
            )
        }
    }
}

/// The loop both kernels share: per block, the activations `x = load(b)`; per row, its codes
/// meet them in `sum` (their integer dot product, four int32 lanes), and the block's float
/// term is added: `d·dₓ·Σqqₓ`, plus the offset `m·dₓΣqₓ` (Q4_1) or `−8d·dₓΣqₓ` (Q4_0).
#[inline(always)]
unsafe fn rows_with<const TY: u8, const N: usize, X>(
    rows: [&[u8]; N],
    xd: &[f32],
    xs: &[f32],
    load: impl Fn(usize) -> X,
    sum: impl Fn((int8x16_t, int8x16_t), &X) -> int32x4_t,
) -> [f32; N] {
    let bb = BLOCK[TY as usize];
    let nb = xd.len().min(rows[0].len() / bb);
    let mut acc = [vdupq_n_f32(0.0); N];
    let mut offs = [0f32; N];
    for b in 0..nb {
        let x = load(b);
        for j in 0..N {
            let at = bb * b;
            let s = sum(codes::<TY>(rows[j].as_ptr().add(at)), &x);
            let d = f16_at(rows[j], at);
            acc[j] = vmlaq_n_f32(acc[j], vcvtq_f32_s32(s), d * xd[b]);
            match TY {
                T_Q4_1 => offs[j] += f16_at(rows[j], at + 2) * xs[b],
                T_Q4_0 => offs[j] -= 8.0 * d * xs[b],
                _ => {}
            }
        }
    }
    core::array::from_fn(|j| vaddvq_f32(acc[j]) + offs[j])
}

/// `Σ w·x` for `N` rows of `TY` blocks with int8 activations: `xq` (32 per block), their
/// scales `xd` and `xs = xd·Σxq` per block.
///
/// # Safety
/// NEON is present (always on aarch64); every row holds `xd.len()` whole blocks and `xq`
/// `32·xd.len()` values.
#[target_feature(enable = "neon")]
pub unsafe fn rows32<const TY: u8, const N: usize>(
    rows: [&[u8]; N],
    xq: &[i8],
    xd: &[f32],
    xs: &[f32],
) -> [f32; N] {
    let xp = xq.as_ptr();
    rows_with::<TY, N, _>(
        rows,
        xd,
        xs,
        |b| (vld1q_s8(xp.add(QK * b)), vld1q_s8(xp.add(QK * b + 16))),
        |(lo, hi), &(x0, x1)| {
            // Pair products in int16 (|q·x| ≤ 128·127: two of them fit), then int32.
            let p0 = vmlal_high_s8(vmull_s8(vget_low_s8(lo), vget_low_s8(x0)), lo, x0);
            let p1 = vmlal_high_s8(vmull_s8(vget_low_s8(hi), vget_low_s8(x1)), hi, x1);
            vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1))
        },
    )
}

/// `acc + (four int8 products summed per int32 lane)`: ARMv8.2's `sdot` (its intrinsic
/// `vdotq_s32` is not stable Rust yet, hence the one instruction of assembly).
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    core::arch::asm!(
        "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
        acc = inout(vreg) acc,
        a = in(vreg) a,
        b = in(vreg) b,
        options(pure, nomem, nostack, preserves_flags)
    );
    acc
}

/// [`rows32`] with the dotprod extension: `sdot` sums four int8 products into each int32 lane
/// in one instruction (the same exact integer sums).
///
/// # Safety
/// As [`rows32`], and the CPU has dotprod (`is_aarch64_feature_detected!("dotprod")`).
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn rows32_dot<const TY: u8, const N: usize>(
    rows: [&[u8]; N],
    xq: &[i8],
    xd: &[f32],
    xs: &[f32],
) -> [f32; N] {
    let xp = xq.as_ptr();
    rows_with::<TY, N, _>(
        rows,
        xd,
        xs,
        |b| (vld1q_s8(xp.add(QK * b)), vld1q_s8(xp.add(QK * b + 16))),
        |(lo, hi), &(x0, x1)| sdot(sdot(vdupq_n_s32(0), lo, x0), hi, x1),
    )
}

/// [`rows32`] with int16 activations (`xq` int16, scales `xd`, `xs = xd·Σxq`).
///
/// # Safety
/// As [`rows32`].
#[target_feature(enable = "neon")]
pub unsafe fn rows32_i16<const TY: u8, const N: usize>(
    rows: [&[u8]; N],
    xq: &[i16],
    xd: &[f32],
    xs: &[f32],
) -> [f32; N] {
    let xp = xq.as_ptr();
    rows_with::<TY, N, _>(
        rows,
        xd,
        xs,
        |b| -> [int16x8_t; 4] { core::array::from_fn(|k| vld1q_s16(xp.add(QK * b + 8 * k))) },
        |(lo, hi), x| {
            let w = [
                vmovl_s8(vget_low_s8(lo)),
                vmovl_high_s8(lo),
                vmovl_s8(vget_low_s8(hi)),
                vmovl_high_s8(hi),
            ];
            let mut s = vdupq_n_s32(0);
            for k in 0..4 {
                s = vmlal_s16(s, vget_low_s16(w[k]), vget_low_s16(x[k]));
                s = vmlal_high_s16(s, w[k], x[k]);
            }
            s
        },
    )
}

/// `Σ q·x` over 16 int8 pairs: `vmull_s8` pair products (|q·x| ≤ 63·128 here: two fit in
/// int16), widened and summed.
#[inline(always)]
unsafe fn dot16_mull(q: int8x16_t, x: int8x16_t) -> i32 {
    let p = vmlal_high_s8(vmull_s8(vget_low_s8(q), vget_low_s8(x)), q, x);
    vaddvq_s32(vpaddlq_s16(p))
}

/// `Σ q·x` over 16 int8 pairs with `sdot`.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn dot16_sdot(q: int8x16_t, x: int8x16_t) -> i32 {
    vaddvq_s32(sdot(vdupq_n_s32(0), q, x))
}

/// Q4_K / Q5_K (`FIVE`) super-blocks of 256 values (144 / 176 bytes) against int8
/// activations `xq` with scales `xd` and `Σxq` `sum32` per 32 values, `dot` summing 16 pairs:
/// `Σⱼ dₓ·(d·scⱼ·Σqqₓ − dmin·mⱼ·Σqₓ)` over the 8 sub-blocks of 32 (sub-block `2i` is the low
/// nibbles of bytes `32i..32i + 32`, `2i + 1` their high nibbles; Q5_K's fifth bit of value `l`
/// in sub-block `j` is bit `j` of `qh[l]`).
#[inline(always)]
unsafe fn q45_k_with<const FIVE: bool>(
    row: &[u8],
    xq: &[i8],
    xd: &[f32],
    sum32: &[i32],
    dot: impl Fn(int8x16_t, int8x16_t) -> i32,
) -> f32 {
    let (bb, qs) = if FIVE { (176, 48) } else { (144, 16) };
    let nb = (row.len() / bb).min(xd.len() / 8).min(sum32.len() / 8);
    let m4 = vdupq_n_u8(0x0F);
    let one = vdupq_n_u8(1);
    let mut acc = 0f32;
    for b in 0..nb {
        let w = &row[bb * b..bb * (b + 1)];
        let (d, dmin) = (f16_at(w, 0), f16_at(w, 2));
        let ql = w.as_ptr().add(qs);
        let qh = if FIVE {
            [vld1q_u8(w.as_ptr().add(16)), vld1q_u8(w.as_ptr().add(32))]
        } else {
            [vdupq_n_u8(0); 2]
        };
        for i in 0..4 {
            let v = [vld1q_u8(ql.add(32 * i)), vld1q_u8(ql.add(32 * i + 16))];
            for (j, hi_nibble) in [(2 * i, false), (2 * i + 1, true)] {
                let xb = 8 * b + j;
                let x = xq.as_ptr().add(QK * xb);
                let mut isum = 0i32;
                for h in 0..2 {
                    let mut q = if hi_nibble {
                        vshrq_n_u8::<4>(v[h])
                    } else {
                        vandq_u8(v[h], m4)
                    };
                    if FIVE {
                        let bit = vandq_u8(vshlq_u8(qh[h], vdupq_n_s8(-(j as i8))), one);
                        q = vorrq_u8(q, vshlq_n_u8::<4>(bit));
                    }
                    isum += dot(vreinterpretq_s8_u8(q), vld1q_s8(x.add(16 * h)));
                }
                let (sc, m) = scale_min_k4(j, &w[4..16]);
                acc += xd[xb] * (d * sc as f32 * isum as f32 - dmin * m as f32 * sum32[xb] as f32);
            }
        }
    }
    acc
}

/// Q6_K super-blocks of 256 values (210 bytes: `ql[128]`, `qh[64]`, 16 int8 scales, `d`)
/// against int8 activations with `Σxq` `sum16` per 16 values: value `128h + 32k + l` is
/// `(lo | hi << 4) − 32`, `lo` the low (k < 2) or high nibble of `ql[64h + 32(k mod 2) + l]`,
/// `hi = (qh[32h + l] >> 2k) & 3`; 16-value group `g` has scale `sc[8h + l/16 + 2k]`.
#[inline(always)]
unsafe fn q6_k_with(
    row: &[u8],
    xq: &[i8],
    xd: &[f32],
    sum16: &[i32],
    dot: impl Fn(int8x16_t, int8x16_t) -> i32,
) -> f32 {
    let nb = (row.len() / 210).min(xd.len() / 8).min(sum16.len() / 16);
    let m4 = vdupq_n_u8(0x0F);
    let m2 = vdupq_n_u8(3);
    let mut acc = 0f32;
    for b in 0..nb {
        let w = &row[210 * b..210 * (b + 1)];
        let d = f16_at(w, 208);
        for h in 0..2 {
            let qh = [
                vld1q_u8(w.as_ptr().add(128 + 32 * h)),
                vld1q_u8(w.as_ptr().add(128 + 32 * h + 16)),
            ];
            for k in 0..4 {
                let base = 64 * h + 32 * (k % 2);
                let xb = 8 * b + 4 * h + k;
                let x = xq.as_ptr().add(QK * xb);
                let mut t = 0i32;
                for half in 0..2 {
                    let v = vld1q_u8(w.as_ptr().add(base + 16 * half));
                    let lo = if k < 2 {
                        vandq_u8(v, m4)
                    } else {
                        vshrq_n_u8::<4>(v)
                    };
                    let hi = vandq_u8(vshlq_u8(qh[half], vdupq_n_s8(-(2 * k as i8))), m2);
                    let q = vorrq_u8(lo, vshlq_n_u8::<4>(hi));
                    let isum = dot(vreinterpretq_s8_u8(q), vld1q_s8(x.add(16 * half)));
                    let s = w[192 + 8 * h + half + 2 * k] as i8 as i32;
                    t += s * (isum - 32 * sum16[2 * xb + half]);
                }
                acc += d * xd[xb] * t as f32;
            }
        }
    }
    acc
}

/// One row of Q4_K or Q5_K (`FIVE`) blocks with int8 activations (`xq`, `xd`, `sum32` = Σxq
/// per 32 values).
///
/// # Safety
/// NEON is present (always on aarch64).
#[target_feature(enable = "neon")]
pub unsafe fn q45_k<const FIVE: bool>(row: &[u8], xq: &[i8], xd: &[f32], sum32: &[i32]) -> f32 {
    q45_k_with::<FIVE>(row, xq, xd, sum32, |q, x| dot16_mull(q, x))
}

/// [`q45_k`] with dotprod's `sdot`.
///
/// # Safety
/// As [`q45_k`], and the CPU has dotprod.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn q45_k_dot<const FIVE: bool>(row: &[u8], xq: &[i8], xd: &[f32], sum32: &[i32]) -> f32 {
    q45_k_with::<FIVE>(row, xq, xd, sum32, |q, x| dot16_sdot(q, x))
}

/// One row of Q6_K blocks with int8 activations (`xq`, `xd`, `sum16` = Σxq per 16 values).
///
/// # Safety
/// NEON is present (always on aarch64).
#[target_feature(enable = "neon")]
pub unsafe fn q6_k(row: &[u8], xq: &[i8], xd: &[f32], sum16: &[i32]) -> f32 {
    q6_k_with(row, xq, xd, sum16, |q, x| dot16_mull(q, x))
}

/// [`q6_k`] with dotprod's `sdot`.
///
/// # Safety
/// As [`q6_k`], and the CPU has dotprod.
#[target_feature(enable = "neon,dotprod")]
pub unsafe fn q6_k_dot(row: &[u8], xq: &[i8], xd: &[f32], sum16: &[i32]) -> f32 {
    q6_k_with(row, xq, xd, sum16, |q, x| dot16_sdot(q, x))
}
