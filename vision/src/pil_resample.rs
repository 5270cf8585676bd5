//! Pillow's convolution resampling of 8-bit images (`Image.resize` without `reducing_gap`),
//! reproduced operation for operation so that the result is the same bytes: filter weights in
//! `f64`, normalised per output pixel, rounded to 22-bit fixed point, a horizontal pass into an
//! 8-bit image of just the rows the vertical pass reads, then the vertical pass, each sum rounded
//! and clipped to 0..=255 (Pillow's `Resample.c`: `precompute_coeffs`, `normalize_coeffs_8bpc`,
//! `ImagingResampleHorizontal_8bpc`, `ImagingResampleVertical_8bpc`).
//!
//! HF image processors that resample with PIL (Idefics3 / SmolVLM: `LANCZOS`) are matched
//! exactly by this, which an approximating resizer does not do.

use rayon::prelude::*;

use crate::error::{Result, VisionError};

/// Fixed-point precision of the 8-bit path (`32 - 8 - 2`).
const PRECISION_BITS: u32 = 22;

/// A Pillow resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.LANCZOS`: a sinc windowed by a sinc, support 3.
    Lanczos,
    /// `Image.BICUBIC`: Keys' cubic with a = -0.5, support 2.
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Lanczos => 3.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// The taps of one axis: for each output index the first input index, the tap count and
/// `ksize` fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for resampling `in_size` → `out_size`.
fn coeffs(in_size: usize, out_size: usize, filter: Filter) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's `(int)` truncates toward zero; `xmin` is clamped at 0 right after.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[xx * ksize..(xx + 1) * ksize];
        for x in 0..n {
            let w = if ww != 0.0 { k[x] / ww } else { k[x] };
            let f = w * f64::from(1u32 << PRECISION_BITS);
            row[x] = if w < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resample packed RGB8 `w × h` to `nw × nh` exactly as Pillow's `Image.resize(…, filter)`.
pub fn resize_rgb8(
    src: &[u8],
    w: usize,
    h: usize,
    nw: usize,
    nh: usize,
    filter: Filter,
) -> Result<Vec<u8>> {
    if w == 0 || h == 0 || nw == 0 || nh == 0 {
        return Err(VisionError::Resize(format!(
            "cannot resample {w}×{h} to {nw}×{nh}: empty image"
        )));
    }
    if src.len() < w * h * 3 {
        return Err(VisionError::Resize(format!(
            "{w}×{h} RGB image needs {} bytes, got {}",
            w * h * 3,
            src.len()
        )));
    }
    if (w, h) == (nw, nh) {
        return Ok(src[..w * h * 3].to_vec());
    }
    let vert = coeffs(h, nh, filter);
    let need_h = nw != w;
    let need_v = nh != h;
    // Rows of the source the vertical pass reads.
    let first = vert.bounds[0].0;
    let last = vert.bounds[nh - 1].0 + vert.bounds[nh - 1].1;
    let (tmp, tw, row0) = if need_h {
        let horiz = coeffs(w, nw, filter);
        let rows = last - first;
        let mut tmp = vec![0u8; rows * nw * 3];
        tmp.par_chunks_mut(nw * 3).enumerate().for_each(|(r, out)| {
            let line = &src[(first + r) * w * 3..(first + r + 1) * w * 3];
            for (xx, px) in out.chunks_exact_mut(3).enumerate() {
                let (xmin, n) = horiz.bounds[xx];
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + n];
                let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                for (x, &kx) in k.iter().enumerate() {
                    let p = &line[(xmin + x) * 3..(xmin + x) * 3 + 3];
                    for c in 0..3 {
                        ss[c] = ss[c].wrapping_add(i32::from(p[c]).wrapping_mul(kx));
                    }
                }
                for c in 0..3 {
                    px[c] = clip8(ss[c]);
                }
            }
        });
        (tmp, nw, first)
    } else {
        (src[..w * h * 3].to_vec(), w, 0)
    };
    if !need_v {
        return Ok(tmp);
    }
    let mut out = vec![0u8; nw * nh * 3];
    out.par_chunks_mut(tw * 3)
        .enumerate()
        .for_each(|(yy, line)| {
            let (ymin, n) = vert.bounds[yy];
            let ymin = ymin - row0;
            let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + n];
            for (i, px) in line.iter_mut().enumerate() {
                let mut ss = 1i32 << (PRECISION_BITS - 1);
                for (y, &ky) in k.iter().enumerate() {
                    ss = ss.wrapping_add(i32::from(tmp[(ymin + y) * tw * 3 + i]).wrapping_mul(ky));
                }
                *px = clip8(ss);
            }
        });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_of_each_output_sum_to_one_in_fixed_point() {
        for (i, o) in [(640, 1024), (1024, 512), (7, 3), (3, 11)] {
            for f in [Filter::Lanczos, Filter::Bicubic] {
                let c = coeffs(i, o, f);
                for xx in 0..o {
                    let s: i64 = c.weights[xx * c.ksize..(xx + 1) * c.ksize]
                        .iter()
                        .map(|&w| i64::from(w))
                        .sum();
                    assert!(
                        (s - (1 << PRECISION_BITS)).abs() <= c.ksize as i64,
                        "{i}->{o}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat() {
        let src = vec![77u8; 13 * 9 * 3];
        let out = resize_rgb8(&src, 13, 9, 31, 4, Filter::Lanczos).unwrap();
        assert!(out.iter().all(|&v| v == 77));
    }
}
