//! bf16 kernels of the SigLIP encoder for CPUs with AVX512-BF16: fused self-attention and the
//! tanh GELU.
//!
//! **Attention.** libtorch's CPU `scaled_dot_product_attention` runs bf16 at its fp32 speed
//! (~130 GFLOP/s on two Zen 4 cores, a third of the encoder's time), while `vdpbf16ps`
//! multiplies bf16 pairs into fp32 sums at twice the fp32 rate. [`attend`] computes, per image
//! and head,
//!
//! ```text
//! S = Q·Kᵀ (bf16 products, fp32 sums)   P = softmax(S / √d) (fp32, then rounded to bf16)
//! O = P·V (fp32 sums) / Σ exp            rounded to bf16
//! ```
//!
//! the same precision steps as libtorch's bf16 flash kernel. It reads the fused `[B, N, 3·C]`
//! output of the q/k/v projection in place and writes `[B, N, C]` in the layout the output
//! projection takes, so neither the head split nor the merge is copied.
//!
//! Work is split by (image, head); each task packs its K and V into `vdpbf16ps` pair order once
//! (`[d/2][N]` and `[N/2][d]` pairs, zero-padded to a multiple of 64 keys, ~256 KB: L2), then
//! walks blocks of 32 queries: scores for 4 queries × 64 keys at a time (16 accumulators),
//! softmax, then 4 queries × 64 dims of the output at a time.
//!
//! **GELU.** [`gelu_tanh`] is `x·σ(2u)`, `u = √(2/π)·(x + 0.044715·x³)` (the same function as
//! `0.5·x·(1 + tanh u)`), in fp32 on each bf16 value and rounded back in place: libtorch's bf16
//! GELU converts the same way but runs ~6× slower here.
//!
//! [`attend_reference`] and [`gelu_tanh_reference`] are the same algorithms in plain Rust (the
//! tests hold the kernels to them).

// Elsewhere than x86-64 the kernels are absent and `available` says false.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use rayon::prelude::*;

/// Keys per score block (two 16-lane vectors).
const KEY_BLOCK: usize = 64;
/// Queries per task step (scores of 32 × N stay in L2).
const QUERY_BLOCK: usize = 32;

/// The shape of one attention call: `qkv` is `[batch, tokens, 3, heads, head_dim]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl Geometry {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Keys padded to whole score blocks.
    fn padded_tokens(&self) -> usize {
        self.tokens.div_ceil(KEY_BLOCK) * KEY_BLOCK
    }

    /// Whether the kernel takes this shape: `head_dim` a multiple of 16 (whole vectors of
    /// output dims), at least one token.
    pub fn supported(&self) -> bool {
        self.head_dim.is_multiple_of(16)
            && self.head_dim > 0
            && self.tokens > 0
            && self.heads > 0
            && self.batch > 0
    }
}

/// Whether this CPU runs the kernel (AVX-512 F/BW/VL with BF16); `AFM_VL_ISA` naming anything
/// but `avx512` turns it off (the same switch as the text kernels').
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let forced_off = std::env::var("AFM_VL_ISA")
            .map(|v| v != "avx512")
            .unwrap_or(false);
        !forced_off
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// bf16 bits → f32.
#[inline]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 → bf16 bits, rounding to nearest even (NaN stays NaN).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

/// Attention of every image and head: `qkv` `[B, N, 3·C]` bf16 bits, `out` `[B, N, C]`
/// (`C = heads · head_dim`), on the calling rayon pool. Only where [`available`] says so.
pub fn attend(qkv: &[u16], out: &mut [u16], g: Geometry) {
    assert!(available(), "attend needs AVX512-BF16 (check available())");
    assert!(g.supported(), "unsupported attention geometry {g:?}");
    let c = g.width();
    assert_eq!(qkv.len(), g.batch * g.tokens * 3 * c, "qkv size");
    assert_eq!(out.len(), g.batch * g.tokens * c, "out size");
    let out_ptr = SharedOut(out.as_mut_ptr());
    (0..g.batch * g.heads).into_par_iter().for_each(|task| {
        let (b, h) = (task / g.heads, task % g.heads);
        // SAFETY: AVX512-BF16 checked above; task (b, h) writes only the columns
        // `h·d..(h+1)·d` of image b's rows, which no other task touches.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::head(qkv, out_ptr.get(), g, b, h)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (b, h, out_ptr);
    });
}

/// A raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct SharedOut(*mut u16);
// SAFETY: see `attend`: tasks write disjoint elements.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}
impl SharedOut {
    fn get(self) -> *mut u16 {
        self.0
    }
}

/// The kernel's algorithm in plain Rust, fp32 output before the final rounding:
/// `[B, N, C]`.
pub fn attend_reference(qkv: &[u16], g: Geometry) -> Vec<f32> {
    let (n, d, c) = (g.tokens, g.head_dim, g.width());
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; g.batch * n * c];
    let at = |b: usize, t: usize, part: usize, h: usize, i: usize| {
        bf16_to_f32(qkv[(b * n + t) * 3 * c + part * c + h * d + i])
    };
    let mut s = vec![0f32; n];
    for b in 0..g.batch {
        for h in 0..g.heads {
            for q in 0..n {
                for (k, sk) in s.iter_mut().enumerate() {
                    *sk = (0..d).map(|i| at(b, q, 0, h, i) * at(b, k, 1, h, i)).sum();
                }
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|&x| ((x - m) * scale).exp()).collect();
                let sum: f32 = e.iter().sum();
                for i in 0..d {
                    let o: f32 = e
                        .iter()
                        .enumerate()
                        .map(|(k, &ek)| bf16_to_f32(f32_to_bf16(ek)) * at(b, k, 2, h, i))
                        .sum();
                    out[(b * n + q) * c + h * d + i] = o / sum;
                }
            }
        }
    }
    out
}

/// Values per GELU task.
const GELU_CHUNK: usize = 1 << 16;

/// The tanh GELU of every bf16 value in place, on the calling rayon pool. Only where
/// [`available`] says so.
pub fn gelu_tanh(x: &mut [u16]) {
    assert!(
        available(),
        "gelu_tanh needs AVX512-BF16 (check available())"
    );
    x.par_chunks_mut(GELU_CHUNK).for_each(|chunk| {
        // SAFETY: AVX512-BF16 checked above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::gelu_tanh(chunk)
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = chunk;
    });
}

/// [`gelu_tanh`] in plain Rust, fp32 before the rounding to bf16.
pub fn gelu_tanh_reference(x: f32) -> f32 {
    let u = (2.0 / std::f32::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
    x / (1.0 + (-2.0 * u).exp())
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Geometry, KEY_BLOCK, QUERY_BLOCK};
    use std::arch::x86_64::*;

    /// One (image, head): pack K and V, then every block of queries.
    ///
    /// # Safety
    /// AVX512-F/BW/VL/BF16 present; `qkv` holds the whole `[B, N, 3·C]` input; `out` points at
    /// `[B, N, C]` elements of which this call writes head `h` of image `b` only.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn head(qkv: &[u16], out: *mut u16, g: Geometry, b: usize, h: usize) {
        let (n, d, c) = (g.tokens, g.head_dim, g.width());
        let np = g.padded_tokens();
        let row = |t: usize, part: usize| (b * n + t) * 3 * c + part * c + h * d;
        let pair = |at: usize| qkv.as_ptr().add(at).cast::<u32>().read_unaligned();
        // K as [d/2][np] bf16 pairs: for dim pair p, 16 consecutive keys fill one vector.
        // A blocked transpose: 16 keys' rows stay in L1 while their pairs are written out.
        let mut kp = vec![0u32; d / 2 * np];
        for t0 in (0..n).step_by(16) {
            let keys = 16.min(n - t0);
            for p in 0..d / 2 {
                for t in t0..t0 + keys {
                    kp[p * np + t] = pair(row(t, 1) + 2 * p);
                }
            }
        }
        // V as [np/2][d] bf16 pairs: for key pair j, 16 consecutive dims fill one vector.
        let mut vp = vec![0u32; np / 2 * d];
        for j in 0..n.div_ceil(2) {
            let even = &qkv[row(2 * j, 2)..row(2 * j, 2) + d];
            let dst = &mut vp[j * d..(j + 1) * d];
            if 2 * j + 1 < n {
                let odd = &qkv[row(2 * j + 1, 2)..row(2 * j + 1, 2) + d];
                for ((o, &a), &b) in dst.iter_mut().zip(even).zip(odd) {
                    *o = a as u32 | (b as u32) << 16;
                }
            } else {
                for (o, &a) in dst.iter_mut().zip(even) {
                    *o = a as u32;
                }
            }
        }
        let scale = 1.0 / (d as f32).sqrt();
        let mut s = vec![0f32; QUERY_BLOCK * np];
        let mut pr = vec![0u16; QUERY_BLOCK * np];
        let mut inv_sum = [0f32; QUERY_BLOCK];
        let mut q0 = 0;
        while q0 < n {
            let rows = QUERY_BLOCK.min(n - q0);
            let q_ptr = |r: usize| qkv.as_ptr().add(row(q0 + r, 0));
            // S = Q·Kᵀ, 8 queries at a time, then the rest one by one.
            let mut r = 0;
            while r + 4 <= rows {
                scores::<4>(&q_ptr, r, &kp, np, d, s.as_mut_ptr());
                r += 4;
            }
            while r < rows {
                scores::<1>(&q_ptr, r, &kp, np, d, s.as_mut_ptr());
                r += 1;
            }
            // P = exp((S − max) / √d) over the real keys, zero over the padding.
            for r in 0..rows {
                let sr = &s[r * np..r * np + n];
                inv_sum[r] = 1.0 / softmax_row(sr, scale, &mut pr[r * np..(r + 1) * np]);
            }
            // O = P·V / Σ, 4 queries at a time.
            let at = |r: usize| ((b * n + q0 + r) * c + h * d) as isize;
            let mut r = 0;
            while r + 4 <= rows {
                output_rows::<4>(&pr, r, np, &vp, d, &inv_sum, out, &at);
                r += 4;
            }
            while r < rows {
                output_rows::<1>(&pr, r, np, &vp, d, &inv_sum, out, &at);
                r += 1;
            }
            q0 += rows;
        }
    }

    /// The microkernel of both products: for rows `a[i]` (bf16) and a packed `b` whose step
    /// `t` is `V` vectors of 16 bf16 pairs at `b + t·stride`, `acc[i][v] = Σ_t a[i][2t..2t+2] ·
    /// b[t][v]` (each row's pair broadcast, `vdpbf16ps` into fp32 sums).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pair_products<const R: usize, const V: usize>(
        a: [*const u16; R],
        b: *const u16,
        stride: usize,
        steps: usize,
    ) -> [[__m512; V]; R] {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for t in 0..steps {
            let base = b.add(t * stride);
            let bv: [__m512bh; V] = std::array::from_fn(|v| {
                std::mem::transmute(_mm512_loadu_si512(base.add(32 * v).cast()))
            });
            for i in 0..R {
                let pair = a[i].add(2 * t).cast::<i32>().read_unaligned();
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                for v in 0..V {
                    acc[i][v] = _mm512_dpbf16_ps(acc[i][v], av, bv[v]);
                }
            }
        }
        acc
    }

    /// Scores of queries `r0..r0+R` against every (padded) key into `s` rows of `np`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn scores<const R: usize>(
        q_ptr: &impl Fn(usize) -> *const u16,
        r0: usize,
        kp: &[u32],
        np: usize,
        d: usize,
        s: *mut f32,
    ) {
        const V: usize = KEY_BLOCK / 16;
        let q: [*const u16; R] = std::array::from_fn(|i| q_ptr(r0 + i));
        let mut k0 = 0;
        while k0 < np {
            let b = kp.as_ptr().add(k0).cast::<u16>();
            let acc = pair_products::<R, V>(q, b, 2 * np, d / 2);
            for (i, a) in acc.iter().enumerate() {
                let dst = s.add((r0 + i) * np + k0);
                for (v, av) in a.iter().enumerate() {
                    _mm512_storeu_ps(dst.add(16 * v), *av);
                }
            }
            k0 += KEY_BLOCK;
        }
    }

    /// `exp((x − max)·scale)` of one row into bf16 `p` (zeros past `x.len()`); returns the fp32
    /// sum of the exponentials.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn softmax_row(x: &[f32], scale: f32, p: &mut [u16]) -> f32 {
        let n = x.len();
        let whole = n / 16 * 16;
        let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < whole {
            mv = _mm512_max_ps(mv, _mm512_loadu_ps(x.as_ptr().add(i)));
            i += 16;
        }
        let mut m = _mm512_reduce_max_ps(mv);
        for &v in &x[whole..] {
            m = m.max(v);
        }
        let (mv, sv) = (_mm512_set1_ps(m), _mm512_set1_ps(scale));
        let mut sum = _mm512_setzero_ps();
        let mut i = 0;
        while i < n {
            let mask = first_lanes(n - i);
            let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(i));
            let e = _mm512_maskz_mov_ps(mask, exp(_mm512_mul_ps(_mm512_sub_ps(v, mv), sv)));
            sum = _mm512_add_ps(sum, e);
            let bits: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
            _mm256_storeu_si256(p.as_mut_ptr().add(i).cast(), bits);
            i += 16;
        }
        // The padding past the last whole vector (up to the next key block) is zero.
        let len = p.len();
        p[i.min(len)..].fill(0);
        _mm512_reduce_add_ps(sum)
    }

    /// The mask of the first `min(n, 16)` lanes.
    #[inline]
    fn first_lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    }

    /// [`super::gelu_tanh`] of one chunk.
    ///
    /// # Safety
    /// AVX512-F/BW/VL/BF16 present.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn gelu_tanh(x: &mut [u16]) {
        let k = _mm512_set1_ps(-2.0 * (2.0 / std::f32::consts::PI).sqrt());
        let (c3, one) = (_mm512_set1_ps(0.044715), _mm512_set1_ps(1.0));
        let mut i = 0;
        while i < x.len() {
            let mask = first_lanes(x.len() - i);
            let ptr = x.as_mut_ptr().add(i);
            let bits = _mm256_maskz_loadu_epi16(mask, ptr.cast());
            // bf16 → fp32: the bits in the upper half.
            let v = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)));
            // −2u = k·(x + c·x³) = k·x·(1 + c·x²)
            let m2u = _mm512_mul_ps(
                _mm512_mul_ps(k, v),
                _mm512_fmadd_ps(c3, _mm512_mul_ps(v, v), one),
            );
            let y = _mm512_div_ps(v, _mm512_add_ps(one, exp(m2u)));
            let out: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(y));
            _mm256_mask_storeu_epi16(ptr.cast(), mask, out);
            i += 16;
        }
    }

    /// `eˣ` to ~1e-7 relative (0 below −104, ∞ past the fp32 range): `2^(x·log2 e)` split
    /// into an integer power (scalef) and a degree-7 polynomial on [−½, ½].
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
        let t = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let f = _mm512_sub_ps(t, n);
        // 2^f = Σ (f·ln 2)^k / k!
        const C: [f32; 8] = [
            1.0,
            std::f32::consts::LN_2,
            0.240_226_5,
            0.055_504_11,
            0.009_618_129,
            0.001_333_355_8,
            0.000_154_035_3,
            0.000_015_252_73,
        ];
        let mut p = _mm512_set1_ps(C[7]);
        for &ck in C[..7].iter().rev() {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(ck));
        }
        _mm512_scalef_ps(p, n)
    }

    /// Output rows `r0..r0+R`, dims `d0..d0+16·W`: `(P·V)·inv_sum` rounded to bf16 at
    /// `out + at(r)`.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn output<const R: usize, const W: usize>(
        pr: &[u16],
        r0: usize,
        np: usize,
        vp: &[u32],
        d: usize,
        d0: usize,
        inv_sum: &[f32],
        out: *mut u16,
        at: &impl Fn(usize) -> isize,
    ) {
        let p: [*const u16; R] = std::array::from_fn(|i| pr.as_ptr().add((r0 + i) * np));
        let b = vp.as_ptr().add(d0).cast::<u16>();
        let acc = pair_products::<R, W>(p, b, 2 * d, np / 2);
        for (i, a) in acc.iter().enumerate() {
            let s = _mm512_set1_ps(inv_sum[r0 + i]);
            let dst = out.offset(at(r0 + i)).add(d0);
            for (w, aw) in a.iter().enumerate() {
                let bits: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_mul_ps(*aw, s)));
                _mm256_storeu_si256(dst.add(16 * w).cast(), bits);
            }
        }
    }

    /// Output rows `r0..r0+R`, every dim: 64 at a time, then 16.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn output_rows<const R: usize>(
        pr: &[u16],
        r0: usize,
        np: usize,
        vp: &[u32],
        d: usize,
        inv_sum: &[f32],
        out: *mut u16,
        at: &impl Fn(usize) -> isize,
    ) {
        let mut d0 = 0;
        while d0 + 64 <= d {
            output::<R, 4>(pr, r0, np, vp, d, d0, inv_sum, out, at);
            d0 += 64;
        }
        while d0 < d {
            output::<R, 1>(pr, r0, np, vp, d, d0, inv_sum, out, at);
            d0 += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_bits(len: usize, seed: u64) -> Vec<u16> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((s >> 33) as f32) / (1u64 << 31) as f32; // [0, 1)
                f32_to_bf16((u - 0.5) * 4.0)
            })
            .collect()
    }

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: ties to even (1.0).
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3·2⁻⁸ lies halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: ties to even (1 + 2⁻⁶).
        assert_eq!(f32_to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16_to_f32(f32_to_bf16(-2.5)), -2.5);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    }

    /// The GELU kernel equals its reference (to one bf16 rounding of a ~1e-7 difference) over
    /// every finite bf16 value, on a ragged length (subnormal results flush to zero).
    #[test]
    fn gelu_equals_the_reference() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let mut x: Vec<u16> = (0..=u16::MAX)
            .filter(|&b| bf16_to_f32(b).is_finite())
            .collect();
        x.truncate(x.len() - 3); // not a whole number of vectors
        let input = x.clone();
        gelu_tanh(&mut x);
        let mut off = 0;
        for (&i, &o) in input.iter().zip(&x) {
            let r = gelu_tanh_reference(bf16_to_f32(i));
            let got = bf16_to_f32(o);
            // `vcvtneps2bf16` flushes subnormal results to zero.
            if o != f32_to_bf16(r) && r.abs() >= f32::MIN_POSITIVE {
                off += 1;
                // A different rounding only when the reference lies next to a rounding edge.
                let ulp = bf16_to_f32(f32_to_bf16(r.abs()) + 1) - bf16_to_f32(f32_to_bf16(r.abs()));
                assert!(
                    (got - r).abs() <= ulp,
                    "gelu({}) = {got}, reference {r}",
                    bf16_to_f32(i)
                );
            }
        }
        assert!(off * 1000 <= x.len(), "{off} of {} values differ", x.len());
        // Spot values: gelu(0) = 0, gelu(x) ≈ x for large x, ≈ 0 for very negative x.
        let mut spot = [0.0f32, 1.0, 30.0, -30.0, -1.0].map(f32_to_bf16);
        gelu_tanh(&mut spot);
        let spot = spot.map(bf16_to_f32);
        assert_eq!(spot[0], 0.0);
        assert_eq!(spot[2], 30.0);
        assert_eq!(spot[3], 0.0);
        assert!(
            (spot[1] - 0.8412).abs() < 4e-3 && (spot[4] + 0.1588).abs() < 2e-3,
            "{spot:?}"
        );
    }

    /// The kernel equals its reference on ragged shapes: token counts that are not whole key
    /// or query blocks, head widths of one and of several output vectors.
    #[test]
    fn kernel_equals_the_reference() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for (i, g) in [
            (1, 37, 2, 64),
            (2, 64, 3, 16),
            (1, 70, 1, 80),
            (3, 5, 2, 128),
            (1, 1, 1, 32),
        ]
        .into_iter()
        .enumerate()
        {
            let g = Geometry {
                batch: g.0,
                tokens: g.1,
                heads: g.2,
                head_dim: g.3,
            };
            let qkv = random_bits(g.batch * g.tokens * 3 * g.width(), i as u64 + 1);
            let mut out = vec![0u16; g.batch * g.tokens * g.width()];
            attend(&qkv, &mut out, g);
            let reference = attend_reference(&qkv, g);
            let mut worst = 0f32;
            for (&o, &r) in out.iter().zip(&reference) {
                // One bf16 rounding of the reference's value, plus fp32 summation order.
                let err = (bf16_to_f32(o) - r).abs() / (r.abs().max(1e-3));
                worst = worst.max(err);
            }
            assert!(worst <= 1.0 / 128.0, "{g:?}: worst relative error {worst}");
            let exact = out
                .iter()
                .zip(&reference)
                .filter(|(&o, &r)| o == f32_to_bf16(r))
                .count();
            assert!(
                exact * 100 >= out.len() * 97,
                "{g:?}: only {exact} of {} outputs are the reference's rounding",
                out.len()
            );
        }
    }
}
