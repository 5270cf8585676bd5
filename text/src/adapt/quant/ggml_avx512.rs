//! AVX-512 kernels for GGUF blocks (x86-64 with AVX-512 F + BW + VL + VNNI: Intel Ice Lake and
//! later, AMD Zen 4 and later). A 512-bit register holds two 32-value blocks of int8
//! activations or one of fp32 pairs, so each block term costs about half the instructions of
//! the AVX2 kernels:
//!
//! - int8 activations: two blocks at a time, `vpdpbusd` (unsigned × signed bytes, summed in
//!   fours into int32) — Q4 codes are unsigned nibbles; Q8_0's signed codes go in as `|q|`
//!   with the activations carrying `q`'s sign; lanes 0..8 hold the first block's sums, 8..16
//!   the second's, scaled by a two-valued vector.
//! - int16 activations run the AVX2 kernels: a one-block-per-`vpdpwssd` AVX-512 version
//!   measured 3–7% slower than them on a Zen 4 EPYC (`bench kernels`, three shapes) and was
//!   removed.
//! - fp32 activations: the codes widen to fp32, two FMAs per block.
//! - Q4_K / Q5_K: two 32-value sub-blocks per `vpdpbusd`; Q6_K: two sub-blocks per
//!   `vpmaddubsw` + `vpmaddwd` with the 16-value scales.
//!
//! The integer block sums are exact, as in every kernel set; only the order the float block
//! terms are added differs from the portable reference. A CPU with AVX-512F but without
//! BW/VL/VNNI (Skylake-X) runs the AVX2 kernels ([`available`]).

use std::arch::x86_64::*;

use crate::runtime::cpu_kernels::avx2::prefetch;

use super::avx2::f16;
use super::{Q8Acts, QK};

pub const T_Q4_0: u8 = 0;
pub const T_Q4_1: u8 = 1;
pub const T_Q8_0: u8 = 2;

/// Bytes per 32-value block of Q4_0, Q4_1, Q8_0.
const BLOCK: [usize; 3] = [18, 20, 34];

/// Whether this CPU has what these kernels use (checked once).
pub fn available() -> bool {
    static HAVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAVE.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("f16c")
    })
}

/// Block `wb`'s offset term with activations of sum `sx = dₓΣqₓ`: Q4_1's `m·sx`, Q4_0's
/// `−8d·sx` (its codes are stored unsigned), none for Q8_0.
#[inline(always)]
unsafe fn offset<const TY: u8>(wb: *const u8, d: f32, sx: f32) -> f32 {
    match TY {
        T_Q4_1 => f16(wb.add(2)) * sx,
        T_Q4_0 => -8.0 * d * sx,
        _ => 0.0,
    }
}

/// Lanes 0..8 = `a`, lanes 8..16 = `b`.
#[inline(always)]
unsafe fn halves(a: f32, b: f32) -> __m512 {
    _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(a), _mm512_set1_ps(b))
}

/// The 32 codes of a Q4 block (16 bytes of nibbles at `p`) as bytes: values 0..16 (the low
/// nibbles) then 16..32 (the high ones), unmasked above the nibble (callers mask).
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let v = _mm_loadu_si128(p as *const __m128i);
    _mm256_set_m128i(_mm_srli_epi16::<4>(v), v)
}

/// `N` rows of Q4_0 / Q4_1 / Q8_0 blocks with int8 activations, two blocks per step.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn rows32<const TY: u8, const N: usize>(rows: [&[u8]; N], a: &Q8Acts) -> [f32; N] {
    let bb = BLOCK[TY as usize];
    let nb = a.d.len().min(rows[0].len() / bb);
    let (xq, xd, xs) = (a.q.as_ptr(), a.d.as_ptr(), a.s.as_ptr());
    let m4 = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    let mut acc = [_mm512_setzero_ps(); N];
    let mut offs = [0f32; N];
    let next = rows[N - 1].as_ptr().wrapping_add(rows[N - 1].len());
    let mut b = 0;
    while b < nb {
        // Two blocks, or the last one alone (its second half then multiplies zeros).
        let two = b + 1 < nb;
        prefetch(next.wrapping_add(b * N * bb), 2 * N * bb);
        let x = if two {
            _mm512_loadu_si512(xq.add(QK * b) as *const __m512i)
        } else {
            _mm512_zextsi256_si512(_mm256_loadu_si256(xq.add(QK * b) as *const __m256i))
        };
        let (dx0, dx1) = (*xd.add(b), if two { *xd.add(b + 1) } else { 0.0 });
        let (sx0, sx1) = (*xs.add(b), if two { *xs.add(b + 1) } else { 0.0 });
        for j in 0..N {
            let w0 = rows[j].as_ptr().add(bb * b);
            // The second block's address only when it exists (the row may end here).
            let w1 = if two { w0.add(bb) } else { w0 };
            let (d0, d1) = (f16(w0), if two { f16(w1) } else { 0.0 });
            let p = match TY {
                T_Q8_0 => {
                    let lo = _mm256_loadu_si256(w0.add(2) as *const __m256i);
                    let hi = if two {
                        _mm256_loadu_si256(w1.add(2) as *const __m256i)
                    } else {
                        _mm256_setzero_si256()
                    };
                    let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                    // Signed × signed as |q| × (x with q's sign).
                    let neg = _mm512_movepi8_mask(q);
                    let sx = _mm512_mask_sub_epi8(x, neg, zero, x);
                    _mm512_dpbusd_epi32(zero, _mm512_abs_epi8(q), sx)
                }
                _ => {
                    let off = if TY == T_Q4_0 { 2 } else { 4 };
                    let lo = nibbles(w0.add(off));
                    let hi = if two {
                        nibbles(w1.add(off))
                    } else {
                        _mm256_setzero_si256()
                    };
                    let q = _mm512_and_si512(
                        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi),
                        m4,
                    );
                    _mm512_dpbusd_epi32(zero, q, x)
                }
            };
            acc[j] = _mm512_fmadd_ps(halves(d0 * dx0, d1 * dx1), _mm512_cvtepi32_ps(p), acc[j]);
            offs[j] += offset::<TY>(w0, d0, sx0);
            if two {
                offs[j] += offset::<TY>(w1, d1, sx1);
            }
        }
        b += 2;
    }
    std::array::from_fn(|j| _mm512_reduce_add_ps(acc[j]) + offs[j])
}

/// `N` rows of Q4_0 / Q4_1 / Q8_0 blocks with fp32 activations (`a.x`, `a.xsum`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn rows32_f32<const TY: u8, const N: usize>(rows: [&[u8]; N], a: &Q8Acts) -> [f32; N] {
    let bb = BLOCK[TY as usize];
    let nb = a.xsum.len().min(rows[0].len() / bb);
    let (xp, xs) = (a.x.as_ptr(), a.xsum.as_ptr());
    let m4 = _mm_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); N];
    let mut offs = [0f32; N];
    let next = rows[N - 1].as_ptr().wrapping_add(rows[N - 1].len());
    for b in 0..nb {
        prefetch(next.wrapping_add(b * N * bb), N * bb);
        let x0 = _mm512_loadu_ps(xp.add(QK * b));
        let x1 = _mm512_loadu_ps(xp.add(QK * b + 16));
        let sx = *xs.add(b);
        for j in 0..N {
            let wb = rows[j].as_ptr().add(bb * b);
            let d = f16(wb);
            let (lo, hi) = match TY {
                T_Q8_0 => (
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(wb.add(2) as *const __m128i)),
                    _mm512_cvtepi8_epi32(_mm_loadu_si128(wb.add(18) as *const __m128i)),
                ),
                _ => {
                    let off = if TY == T_Q4_0 { 2 } else { 4 };
                    let v = _mm_loadu_si128(wb.add(off) as *const __m128i);
                    (
                        _mm512_cvtepu8_epi32(_mm_and_si128(v, m4)),
                        _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16::<4>(v), m4)),
                    )
                }
            };
            let s = _mm512_fmadd_ps(
                _mm512_cvtepi32_ps(hi),
                x1,
                _mm512_mul_ps(_mm512_cvtepi32_ps(lo), x0),
            );
            acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(d), s, acc[j]);
            offs[j] += offset::<TY>(wb, d, sx);
        }
    }
    std::array::from_fn(|j| _mm512_reduce_add_ps(acc[j]) + offs[j])
}

/// Q4_K, or Q5_K with `FIVE` (the fifth bit of sub-block `j` is bit `j` of `qh[l]`): the two
/// sub-blocks sharing 32 bytes of nibbles in one `vpdpbusd`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q45_k<const FIVE: bool>(row: &[u8], a: &Q8Acts) -> f32 {
    let (bb, qs) = if FIVE { (176, 48) } else { (144, 16) };
    let nb = row.len() / bb;
    let xq = a.q.as_ptr();
    let zero = _mm512_setzero_si512();
    let m4 = _mm512_set1_epi8(0x0F);
    let one = _mm512_set1_epi8(1);
    let mut acc = _mm512_setzero_ps();
    let mut offs = 0f32;
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
            // Lanes 0..8: sub-block 2·jj (low nibbles); lanes 8..16: 2·jj + 1 (high nibbles).
            let v = _mm256_loadu_si256(ql.add(32 * jj) as *const __m256i);
            let both =
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(v), _mm256_srli_epi16::<4>(v));
            let mut q = _mm512_and_si512(both, m4);
            if FIVE {
                // Bit 2·jj of qh for the first half, bit 2·jj + 1 for the second.
                let bits = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * jj as i32))),
                    _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * jj as i32 + 1)),
                );
                q = _mm512_or_si512(q, _mm512_slli_epi16::<4>(_mm512_and_si512(bits, one)));
            }
            let (j0, j1) = (2 * jj, 2 * jj + 1);
            let (xb0, xb1) = (8 * b + j0, 8 * b + j1);
            let x = _mm512_loadu_si512(xq.add(QK * xb0) as *const __m512i);
            let p = _mm512_dpbusd_epi32(zero, q, x);
            let (sc0, m0) = super::scale_min_k4(j0, &w[4..16]);
            let (sc1, m1) = super::scale_min_k4(j1, &w[4..16]);
            acc = _mm512_fmadd_ps(
                halves(a.d[xb0] * d * sc0 as f32, a.d[xb1] * d * sc1 as f32),
                _mm512_cvtepi32_ps(p),
                acc,
            );
            offs -= a.d[xb0] * dmin * m0 as f32 * a.sum32[xb0] as f32;
            offs -= a.d[xb1] * dmin * m1 as f32 * a.sum32[xb1] as f32;
        }
    }
    _mm512_reduce_add_ps(acc) + offs
}

/// Q6_K: two 32-value sub-blocks per `vpmaddubsw`, their four 16-value scales in `vpmaddwd`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q6_k(row: &[u8], a: &Q8Acts) -> f32 {
    let nb = row.len() / 210;
    let xq = a.q.as_ptr();
    let m4 = _mm512_set1_epi8(0x0F);
    let m2 = _mm512_set1_epi8(3);
    let mut acc = _mm512_setzero_ps();
    let mut offs = 0f32;
    let next = row.as_ptr().wrapping_add(row.len());
    for b in 0..nb {
        prefetch(next.wrapping_add(210 * b), 210);
        let w = row.as_ptr().add(210 * b);
        let d = f16(w.add(208));
        let sc = w.add(192) as *const i8;
        for h in 0..2 {
            // ql: [ql0 | ql1] (64 bytes), qh 32 bytes in both halves.
            let ql = _mm512_loadu_si512(w.add(64 * h) as *const __m512i);
            let qh = _mm256_loadu_si256(w.add(128 + 32 * h) as *const __m256i);
            let qh = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), qh);
            for kk in 0..2 {
                let lo = if kk == 0 {
                    _mm512_and_si512(ql, m4)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4)
                };
                // AVX2's order k (0: ql0 low, 1: ql1 low, 2: ql0 high, 3: ql1 high): the first
                // half holds sub-block ka (from ql0), the second kb (ql1); k's high bits are
                // qh >> 2k.
                let (ka, kb) = if kk == 0 { (0, 1) } else { (2, 3) };
                let shifted = _mm512_mask_blend_epi64(
                    0xF0,
                    _mm512_srl_epi16(qh, _mm_cvtsi32_si128(2 * ka as i32)),
                    _mm512_srl_epi16(qh, _mm_cvtsi32_si128(2 * kb as i32)),
                );
                let q = _mm512_or_si512(lo, _mm512_slli_epi16::<4>(_mm512_and_si512(shifted, m2)));
                let (xa, xb) = (8 * b + 4 * h + ka, 8 * b + 4 * h + kb);
                let x = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(xq.add(QK * xa) as *const __m256i)),
                    _mm256_loadu_si256(xq.add(QK * xb) as *const __m256i),
                );
                let p16 = _mm512_maddubs_epi16(q, x);
                let s = |k: usize, i: usize| *sc.add(8 * h + 2 * k + i) as i16;
                let scales = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_set_m128i(
                        _mm_set1_epi16(s(ka, 1)),
                        _mm_set1_epi16(s(ka, 0)),
                    )),
                    _mm256_set_m128i(_mm_set1_epi16(s(kb, 1)), _mm_set1_epi16(s(kb, 0))),
                );
                let p = _mm512_madd_epi16(p16, scales);
                acc = _mm512_fmadd_ps(halves(d * a.d[xa], d * a.d[xb]), _mm512_cvtepi32_ps(p), acc);
                for (k, xk) in [(ka, xa), (kb, xb)] {
                    let sub =
                        s(k, 0) as i32 * a.sum16[2 * xk] + s(k, 1) as i32 * a.sum16[2 * xk + 1];
                    offs -= d * a.d[xk] * (32 * sub) as f32;
                }
            }
        }
    }
    _mm512_reduce_add_ps(acc) + offs
}
