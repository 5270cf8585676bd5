//! Small fp32 CPU kernels of the fused decode step: dense matrix–vector rows (fp32 weights, or
//! bf16 weights widened as they are read), dot products and `y += a·x`, each with an AVX2 + FMA
//! version chosen at run time and a portable one.

use crate::quant::packed::Isa;

#[cfg(target_arch = "x86_64")]
fn simd(isa: Isa) -> bool {
    cfg!(target_arch = "x86_64") && matches!(isa, Isa::Avx2 | Isa::Avx512)
}

/// `y[i] = f(rows r0 + i)` four rows at a time through `four`, the rest through `one`.
fn by_fours<T>(
    w: &[T],
    cols: usize,
    r0: usize,
    y: &mut [f32],
    four: impl Fn([&[T]; 4]) -> [f32; 4],
    one: impl Fn(&[T]) -> f32,
) {
    let row = |r: usize| &w[r * cols..(r + 1) * cols];
    let mut i = 0;
    while i + 4 <= y.len() {
        let v = four(std::array::from_fn(|j| row(r0 + i + j)));
        y[i..i + 4].copy_from_slice(&v);
        i += 4;
    }
    for (j, yr) in y.iter_mut().enumerate().skip(i) {
        *yr = one(row(r0 + j));
    }
}

/// `y[i] = W[r0 + i]·x` for a row-major fp32 `[rows, cols]` matrix.
pub fn dense_rows(isa: Isa, w: &[f32], cols: usize, x: &[f32], r0: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd(isa) {
        // SAFETY: AVX2 + FMA detected at run time (Isa::available); rows and x have `cols`
        // values.
        let four = |rows: [&[f32]; 4]| unsafe { avx2::dot4(rows, x) };
        return by_fours(w, cols, r0, y, four, |r: &[f32]| dot(isa, r, x));
    }
    by_fours(
        w,
        cols,
        r0,
        y,
        |rows| rows.map(|r| dot(isa, r, x)),
        |r| dot(isa, r, x),
    );
}

/// [`dense_rows`] of a bf16 matrix (bits, row-major `[rows, cols]`): each weight widened to fp32
/// exactly, the same products summed in the same order, so the values equal [`dense_rows`] on
/// the widened matrix bit for bit.
pub fn bf16_rows(isa: Isa, w: &[u16], cols: usize, x: &[f32], r0: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd(isa) {
        // SAFETY: as in dense_rows.
        let four = |rows: [&[u16]; 4]| unsafe { avx2::dot4_bf16(rows, x) };
        let one = |r: &[u16]| unsafe { avx2::dot4_bf16([r], x)[0] };
        return by_fours(w, cols, r0, y, four, one);
    }
    let _ = isa;
    let one = |r: &[u16]| {
        let mut acc = [0f32; 8];
        for (i, (&wv, &xv)) in r.iter().zip(x).enumerate() {
            acc[i % 8] += bf16_to_f32(wv) * xv;
        }
        acc.iter().sum()
    };
    by_fours(w, cols, r0, y, |rows| rows.map(one), one);
}

/// bf16 bits → f32 (exact: the bits are the upper half).
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// `Σ a·b`.
pub fn dot(isa: Isa, a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd(isa) {
        // SAFETY: as in dense_rows.
        return unsafe { avx2::dot4([a], b)[0] };
    }
    let _ = isa;
    let mut acc = [0f32; 8];
    let n = a.len().min(b.len());
    for i in 0..n {
        acc[i % 8] += a[i] * b[i];
    }
    acc.iter().sum()
}

/// `out = Σ_t p[t]·v[t]` for the rows `v[t]` (`out.len()` values each) of a row-major `v`.
pub fn weighted_rows(isa: Isa, p: &[f32], v: &[f32], out: &mut [f32]) {
    let d = out.len();
    #[cfg(target_arch = "x86_64")]
    if simd(isa) && d.is_multiple_of(8) {
        // SAFETY: as in dense_rows; v holds p.len() rows of d values.
        unsafe { avx2::weighted_rows(p, v, out) };
        return;
    }
    out.fill(0.0);
    for (pt, row) in p.iter().zip(v.chunks_exact(d)) {
        axpy(isa, *pt, row, out);
    }
}

/// `y += s·x`.
pub fn axpy(isa: Isa, s: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd(isa) {
        // SAFETY: as in dense_rows.
        unsafe { avx2::axpy(s, x, y) };
        return;
    }
    let _ = isa;
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += s * xv;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// The sum of the 8 lanes (shared by every AVX2 kernel of the crate).
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0x55>(s, s));
        _mm_cvtss_f32(s)
    }

    /// Asks the cache for the lines covering `bytes` bytes from `p`, ahead of their use: the
    /// decode step's matrices are read once per token, from memory, in runs too short for the
    /// hardware prefetcher to ramp up (a 576-column Q4_1 row is 360 bytes), so the kernels
    /// fetch the rows they will read next while they compute on these (1.7× the decode speed
    /// of SmolLM2-135M's Q4_1 blocks on a 2-core AVX2 machine). A hint: any address is
    /// allowed, nothing faults.
    #[inline(always)]
    pub(crate) unsafe fn prefetch(p: *const u8, bytes: usize) {
        let mut o = 0;
        while o < bytes {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o) as *const i8);
            o += 64;
        }
    }

    /// The body of the `dot4` kernels: `N` dot products with one `x`, two accumulators per row,
    /// `$load8(ptr)` reading 8 weights (of `$elt` bytes each) as fp32 and `$widen(w)` one.
    macro_rules! dot_rows {
        ($rows:ident, $x:ident, $elt:expr, $load8:expr, $widen:expr) => {{
            let n = $x
                .len()
                .min($rows.iter().map(|r| r.len()).min().unwrap_or(0));
            let mut acc = [[_mm256_setzero_ps(); 2]; N];
            let xp = $x.as_ptr();
            let last = $rows[N - 1];
            let next = last.as_ptr().wrapping_add(last.len()) as *const u8;
            let mut i = 0;
            while i + 16 <= n {
                prefetch(next.wrapping_add($elt * N * i), 16 * $elt * N);
                let (x0, x1) = (_mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(xp.add(i + 8)));
                for j in 0..N {
                    let r = $rows[j].as_ptr();
                    acc[j][0] = _mm256_fmadd_ps($load8(r.add(i)), x0, acc[j][0]);
                    acc[j][1] = _mm256_fmadd_ps($load8(r.add(i + 8)), x1, acc[j][1]);
                }
                i += 16;
            }
            std::array::from_fn(|j| {
                let mut s = hsum(_mm256_add_ps(acc[j][0], acc[j][1]));
                for k in i..n {
                    s += $widen($rows[j][k]) * $x[k];
                }
                s
            })
        }};
    }

    /// `N` dot products with one `x`: two accumulators per row; the `N` rows after these
    /// (callers walk contiguous rows) are fetched meanwhile.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4<const N: usize>(rows: [&[f32]; N], x: &[f32]) -> [f32; N] {
        dot_rows!(rows, x, 4, |p: *const f32| _mm256_loadu_ps(p), |w: f32| w)
    }

    /// [`dot4`] of bf16 rows, each 8 weights widened (zero-extended to 32 bits, shifted into the
    /// upper half) before the same multiply-adds.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4_bf16<const N: usize>(rows: [&[u16]; N], x: &[f32]) -> [f32; N] {
        dot_rows!(
            rows,
            x,
            2,
            |p: *const u16| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                _mm_loadu_si128(p.cast())
            ))),
            super::bf16_to_f32
        )
    }

    /// Columns in blocks of 64 (eight accumulators: a 64-wide head in one pass), rows
    /// streamed once per block; the first pass fetches the rows 8 ahead.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_rows(p: &[f32], v: &[f32], out: &mut [f32]) {
        let d = out.len();
        let n = p.len().min(v.len() / d.max(1));
        let vp = v.as_ptr();
        let mut c = 0;
        while c < d {
            let w = (d - c).min(64) / 8; // 8-lane registers in this block
            let mut acc = [_mm256_setzero_ps(); 8];
            for (t, &pt) in p.iter().enumerate().take(n) {
                let s = _mm256_set1_ps(pt);
                let row = vp.add(t * d + c);
                if c == 0 {
                    prefetch(vp.wrapping_add((t + 8) * d) as *const u8, 4 * d);
                }
                for (k, a) in acc.iter_mut().enumerate().take(w) {
                    *a = _mm256_fmadd_ps(s, _mm256_loadu_ps(row.add(8 * k)), *a);
                }
            }
            for (k, a) in acc.iter().enumerate().take(w) {
                _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * k), *a);
            }
            c += 8 * w;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(s: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let sv = _mm256_set1_ps(s);
        let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_fmadd_ps(sv, _mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(yp.add(i)));
            _mm256_storeu_ps(yp.add(i), v);
            i += 8;
        }
        for k in i..n {
            y[k] += s * x[k];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_set_equals_the_portable_one() {
        let mut rng = crate::sampling::Rng::new(5);
        let mut f = || crate::quant::ggml::uniform_pm1(&mut rng);
        for isa in Isa::available() {
            for cols in [1usize, 7, 16, 33, 64, 200, 136] {
                let rows = 9;
                let w: Vec<f32> = (0..rows * cols).map(|_| f()).collect();
                let x: Vec<f32> = (0..cols).map(|_| f()).collect();
                let mut y = vec![0f32; rows - 2];
                dense_rows(isa, &w, cols, &x, 2, &mut y);
                // bf16 weights: the same values as fp32 rows of the widened weights, bit for bit.
                let wb: Vec<u16> = w.iter().map(|v| (v.to_bits() >> 16) as u16).collect();
                let widened: Vec<f32> = wb.iter().map(|&b| bf16_to_f32(b)).collect();
                let (mut yb, mut yw) = (vec![0f32; rows - 2], vec![0f32; rows - 2]);
                bf16_rows(isa, &wb, cols, &x, 2, &mut yb);
                dense_rows(isa, &widened, cols, &x, 2, &mut yw);
                assert_eq!(
                    yb.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    yw.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{} bf16 rows, {cols} columns",
                    isa.name()
                );
                for (i, v) in y.iter().enumerate() {
                    let r = i + 2;
                    let want: f64 = (0..cols)
                        .map(|c| w[r * cols + c] as f64 * x[c] as f64)
                        .sum();
                    assert!((*v as f64 - want).abs() < 1e-5, "{} {cols}", isa.name());
                }
                if cols % 8 == 0 {
                    let p: Vec<f32> = (0..rows).map(|_| f()).collect();
                    let mut o = vec![0f32; cols];
                    weighted_rows(isa, &p, &w, &mut o);
                    for c in 0..cols {
                        let want: f64 = (0..rows)
                            .map(|r| p[r] as f64 * w[r * cols + c] as f64)
                            .sum();
                        assert!(
                            (o[c] as f64 - want).abs() < 1e-5,
                            "{} weighted {cols}",
                            isa.name()
                        );
                    }
                }
                let mut a = x.clone();
                axpy(isa, 0.5, &w[..cols], &mut a);
                for c in 0..cols {
                    assert!((a[c] - (x[c] + 0.5 * w[c])).abs() < 1e-6);
                }
            }
        }
    }
}
