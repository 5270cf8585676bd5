//! ARM NEON kernels for our packed codes (`packed.rs`): LUT codes (2- and 4-bit palettes and
//! RTN levels, a table of up to 16 fp32 values per row group) and 8-bit codes.
//!
//! A 16-byte block holds `8 / bits` codes per byte: code `t` of byte `j` is value `16·t + j`.
//! The table lookup runs on bytes: the table's fp32 entries are split into four byte planes,
//! `tbl` looks each plane up with the 16 codes, and two rounds of `zip` put the four bytes of
//! each entry back together — 16 fp32 weights for four `tbl` and eight `zip`, then four FMAs.
//! The sums are fp32 like the portable kernels', added in another order.
//!
//! Self-contained (no parent items), so that it can also be built alone for an aarch64 check
//! under emulation (`text/bench/neon_check/`).

use core::arch::aarch64::*;

/// The four byte planes of a 16-entry fp32 table (entry `i`'s byte `k` is `planes[k][i]`).
#[inline(always)]
unsafe fn planes(lut: &[f32; 16]) -> [uint8x16_t; 4] {
    let mut p = [[0u8; 16]; 4];
    for (i, v) in lut.iter().enumerate() {
        for (k, b) in v.to_le_bytes().iter().enumerate() {
            p[k][i] = *b;
        }
    }
    core::array::from_fn(|k| vld1q_u8(p[k].as_ptr()))
}

/// `lut[code]` for 16 codes (each < 16), as four vectors of four fp32 (codes 0..4, 4..8, …).
#[inline(always)]
unsafe fn lookup(p: &[uint8x16_t; 4], codes: uint8x16_t) -> [float32x4_t; 4] {
    let b: [uint8x16_t; 4] = core::array::from_fn(|k| vqtbl1q_u8(p[k], codes));
    // Bytes 0, 1 of each entry as u16 pairs, then bytes 2, 3; then the u16 halves zipped.
    let (lo01, hi01) = (
        vreinterpretq_u16_u8(vzip1q_u8(b[0], b[1])),
        vreinterpretq_u16_u8(vzip2q_u8(b[0], b[1])),
    );
    let (lo23, hi23) = (
        vreinterpretq_u16_u8(vzip1q_u8(b[2], b[3])),
        vreinterpretq_u16_u8(vzip2q_u8(b[2], b[3])),
    );
    [
        vreinterpretq_f32_u16(vzip1q_u16(lo01, lo23)),
        vreinterpretq_f32_u16(vzip2q_u16(lo01, lo23)),
        vreinterpretq_f32_u16(vzip1q_u16(hi01, hi23)),
        vreinterpretq_f32_u16(vzip2q_u16(hi01, hi23)),
    ]
}

/// `Σ lut[code]·x` for `N` rows of `bits`-bit LUT codes (2 or 4), each block of `x` loaded
/// once for all rows.
///
/// # Safety
/// NEON is present (always on aarch64); the rows hold whole 16-byte blocks and `x` at least
/// `16·(8 / bits)` values per block.
#[target_feature(enable = "neon")]
pub unsafe fn rows_lut<const N: usize>(
    rows: [&[u8]; N],
    luts: &[[f32; 16]; N],
    bits: u8,
    x: &[f32],
) -> [f32; N] {
    let per = 8 / bits as usize;
    let nblk = (rows[0].len() / 16).min(x.len() / (16 * per));
    let p: [[uint8x16_t; 4]; N] = core::array::from_fn(|j| planes(&luts[j]));
    let mask = vdupq_n_u8((1u8 << bits) - 1);
    let mut acc = [[vdupq_n_f32(0.0); 4]; N];
    let xp = x.as_ptr();
    for b in 0..nblk {
        let xb = xp.add(16 * per * b);
        for j in 0..N {
            let v = vld1q_u8(rows[j].as_ptr().add(16 * b));
            for t in 0..per {
                let c = vandq_u8(vshlq_u8(v, vdupq_n_s8(-((bits as usize * t) as i8))), mask);
                let w = lookup(&p[j], c);
                for (q, wq) in w.iter().enumerate() {
                    acc[j][q] = vfmaq_f32(acc[j][q], *wq, vld1q_f32(xb.add(16 * t + 4 * q)));
                }
            }
        }
    }
    core::array::from_fn(|j| {
        let a = &acc[j];
        vaddvq_f32(vaddq_f32(vaddq_f32(a[0], a[1]), vaddq_f32(a[2], a[3])))
    })
}

/// `Σ code·x` over one row of 8-bit codes, 16 per step.
///
/// # Safety
/// NEON is present; `x` holds at least `row.len()` values (whole 16-code blocks).
#[target_feature(enable = "neon")]
pub unsafe fn row_u8(row: &[u8], x: &[f32]) -> f32 {
    let n = row.len().min(x.len()) / 16 * 16;
    let (p, xp) = (row.as_ptr(), x.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i < n {
        let v = vld1q_u8(p.add(i));
        let h = [vmovl_u8(vget_low_u8(v)), vmovl_high_u8(v)];
        let w = [
            vmovl_u16(vget_low_u16(h[0])),
            vmovl_high_u16(h[0]),
            vmovl_u16(vget_low_u16(h[1])),
            vmovl_high_u16(h[1]),
        ];
        for (q, wq) in w.iter().enumerate() {
            acc[q] = vfmaq_f32(acc[q], vcvtq_f32_u32(*wq), vld1q_f32(xp.add(i + 4 * q)));
        }
        i += 16;
    }
    vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ))
}
