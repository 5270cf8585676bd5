//! ARM NEON kernels for Q4_0 / Q4_1 / Q8_0 blocks (every aarch64 CPU has NEON; Apple's M
//! series and most ARM servers): int8 activations (`vmull_s8` / `vmlal_high_s8` pair products
//! in int16, widened and summed in int32; with the ARMv8.2 dotprod extension — Apple M1 and
//! later, Graviton 2 and later — one `sdot` per 16 codes instead) and int16 activations
//! (`vmull_s16` / `vmlal_high_s16` into int32). The integer block sums are exact, as in the AVX2 kernels; the float block terms
//! are added in a different order than the portable reference.
//!
//! The file needs from its parent module only `QK` and `f16_at` (fp16 scale bytes → f32), so
//! that the kernels can also be built alone for an aarch64 check under emulation
//! (`text/bench/neon_check/`).

use core::arch::aarch64::*;

use super::{f16_at, QK};

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
