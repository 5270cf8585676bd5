//! Palettization (AFM 2024): every group of [`GROUP_ROWS`] rows of a weight matrix shares a
//! look-up table of `2^bits` values found by 1-D k-means (k-means++ initialisation, then Lloyd
//! iterations); each weight stores the index of its nearest entry. Groups are independent and
//! run in parallel with rayon.
//!
//! 1-D k-means is done on the sorted values: clusters are contiguous ranges split at the
//! midpoints between centres, so a Lloyd step is `k` binary searches and prefix-sum means.
//!
//! With `row_scale` ([`palettize_scaled`]) each row is first divided by its largest magnitude
//! and the shared table is fitted to the normalised rows; the row's scale is stored beside the
//! codes (`w = scale_r·lut_g[code]`, 32 bits per row). Rows of one group often differ in range
//! by several times, and a table shared as is spends its entries on the widest row.

use rayon::prelude::*;

use crate::sampling::Rng;

/// Rows that share one look-up table.
pub const GROUP_ROWS: usize = 16;

/// Lloyd iterations at most (stops earlier when the centres stop moving).
const MAX_ITERS: usize = 60;
/// k-means++ seeds from at most this many (evenly spaced, sorted) samples per group.
const INIT_SAMPLES: usize = 4096;

/// A palettized matrix: `codes` row-major `[rows, cols]`, `lut` `[groups, k]` row-major
/// (group `g` covers rows `g·GROUP_ROWS ..`).
#[derive(Debug, Clone)]
pub struct Palette {
    pub codes: Vec<u8>,
    pub lut: Vec<f32>,
    /// Per-row scales (`w = scale·lut[code]`), when fitted with row scaling.
    pub scales: Option<Vec<f32>>,
    pub k: usize,
    pub rows: usize,
    pub cols: usize,
}

impl Palette {
    pub fn groups(&self) -> usize {
        self.rows.div_ceil(GROUP_ROWS)
    }

    /// Weight `(r, c)` as the table says.
    pub fn value(&self, r: usize, c: usize) -> f32 {
        let v = self.lut[(r / GROUP_ROWS) * self.k + self.codes[r * self.cols + c] as usize];
        self.scales.as_ref().map_or(v, |s| v * s[r])
    }

    /// Sum of squared differences to `w` (row-major `[rows, cols]`).
    pub fn sq_error(&self, w: &[f32]) -> f64 {
        w.par_chunks(self.cols)
            .enumerate()
            .map(|(r, row)| {
                row.iter()
                    .enumerate()
                    .map(|(c, &x)| {
                        let d = (x - self.value(r, c)) as f64;
                        d * d
                    })
                    .sum::<f64>()
            })
            .sum()
    }
}

/// Palettize `w` (row-major `[rows, cols]`) with `2^bits` entries per group of rows.
pub fn palettize(w: &[f32], rows: usize, cols: usize, bits: u8, seed: u64) -> Palette {
    palettize_inner(w, rows, cols, bits, seed, None)
}

/// Like [`palettize`] on rows normalised by their largest magnitude (see the module docs).
pub fn palettize_scaled(w: &[f32], rows: usize, cols: usize, bits: u8, seed: u64) -> Palette {
    let scales: Vec<f32> = w
        .chunks(cols.max(1))
        .map(|r| r.iter().fold(0f32, |m, &x| m.max(x.abs())).max(1e-12))
        .collect();
    let norm: Vec<f32> = w
        .par_chunks(cols.max(1))
        .zip(&scales)
        .flat_map_iter(|(r, &s)| r.iter().map(move |&x| x / s))
        .collect();
    palettize_inner(&norm, rows, cols, bits, seed, Some(scales))
}

fn palettize_inner(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u8,
    seed: u64,
    scales: Option<Vec<f32>>,
) -> Palette {
    assert_eq!(
        w.len(),
        rows * cols,
        "palettize: {} values for {rows}×{cols}",
        w.len()
    );
    let k = 1usize << bits;
    let groups = rows.div_ceil(GROUP_ROWS);
    let per_group: Vec<(Vec<f32>, Vec<u8>)> = (0..groups)
        .into_par_iter()
        .map(|g| {
            let r0 = g * GROUP_ROWS;
            let r1 = (r0 + GROUP_ROWS).min(rows);
            let vals = &w[r0 * cols..r1 * cols];
            let centres = kmeans_1d(vals, k, seed ^ (g as u64).wrapping_mul(0x9E37_79B9));
            let codes = vals.iter().map(|&x| nearest(&centres, x) as u8).collect();
            (centres, codes)
        })
        .collect();
    let mut lut = Vec::with_capacity(groups * k);
    let mut codes = Vec::with_capacity(rows * cols);
    for (c, q) in per_group {
        lut.extend(c);
        codes.extend(q);
    }
    Palette {
        codes,
        lut,
        scales,
        k,
        rows,
        cols,
    }
}

/// Index of the centre nearest to `x` (`centres` ascending).
pub fn nearest(centres: &[f32], x: f32) -> usize {
    // First centre whose midpoint with its successor lies above x.
    let mut lo = 0;
    let mut hi = centres.len() - 1;
    while lo < hi {
        let mid = (lo + hi) / 2;
        if x > 0.5 * (centres[mid] + centres[mid + 1]) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// `k` centres (ascending) for the values `xs` by k-means++ then Lloyd.
pub fn kmeans_1d(xs: &[f32], k: usize, seed: u64) -> Vec<f32> {
    let mut sorted: Vec<f32> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if sorted.is_empty() {
        return vec![0.0; k];
    }
    sorted.sort_by(f32::total_cmp);
    let n = sorted.len();
    // Prefix sums (f64) for range means.
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push(0.0f64);
    for &x in &sorted {
        prefix.push(prefix.last().unwrap() + x as f64);
    }

    // k-means++ on an evenly spaced subsample of the sorted values.
    let step = n.div_ceil(INIT_SAMPLES).max(1);
    let sample: Vec<f32> = sorted.iter().step_by(step).copied().collect();
    let mut rng = Rng::new(seed);
    let mut centres = vec![sample[(rng.next_u64() % sample.len() as u64) as usize]];
    let mut d2: Vec<f64> = sample
        .iter()
        .map(|&x| ((x - centres[0]) as f64).powi(2))
        .collect();
    while centres.len() < k {
        let total: f64 = d2.iter().sum();
        let c = if total <= 0.0 {
            // Fewer distinct values than centres: repeat one (its cluster stays empty).
            sample[(rng.next_u64() % sample.len() as u64) as usize]
        } else {
            let mut t = rng.next_f64() * total;
            let mut pick = sample.len() - 1;
            for (i, &d) in d2.iter().enumerate() {
                t -= d;
                if t < 0.0 {
                    pick = i;
                    break;
                }
            }
            sample[pick]
        };
        for (d, &x) in d2.iter_mut().zip(&sample) {
            *d = d.min(((x - c) as f64).powi(2));
        }
        centres.push(c);
    }
    centres.sort_by(f32::total_cmp);
    // With 16 or more entries the outermost ones stay on the group's extremes: plain k-means
    // pulls them into the bulk and crushes the few large weights that LLMs depend on.
    let pin = k >= 16 && n >= k;
    if pin {
        centres[0] = sorted[0];
        centres[k - 1] = sorted[n - 1];
        centres.sort_by(f32::total_cmp);
    }

    // Lloyd: cluster j = sorted[b_j .. b_{j+1}) with b at the midpoints.
    for _ in 0..MAX_ITERS {
        let mut bounds = Vec::with_capacity(k + 1);
        bounds.push(0usize);
        for j in 0..k - 1 {
            let mid = 0.5 * (centres[j] + centres[j + 1]);
            bounds.push(sorted.partition_point(|&x| x <= mid).max(bounds[j]));
        }
        bounds.push(n);
        let mut moved = false;
        for j in 0..k {
            let (a, b) = (bounds[j], bounds[j + 1]);
            if pin && (j == 0 || j == k - 1) {
                continue;
            }
            if b > a {
                let m = ((prefix[b] - prefix[a]) / (b - a) as f64) as f32;
                if m != centres[j] {
                    moved = true;
                    centres[j] = m;
                }
            }
        }
        centres.sort_by(f32::total_cmp);
        if !moved {
            break;
        }
    }
    centres
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        (0..n)
            .map(|_| {
                let (u, v) = (rng.next_f64().max(1e-12), rng.next_f64());
                ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
            })
            .collect()
    }

    #[test]
    fn recovers_exact_clusters() {
        // Values drawn from exactly 4 points: 2-bit k-means finds them and the error is zero.
        let pts = [-0.7f32, -0.1, 0.25, 0.9];
        let w: Vec<f32> = (0..32 * 64).map(|i| pts[(i * 7 + i / 5) % 4]).collect();
        let p = palettize(&w, 32, 64, 2, 0);
        assert_eq!(p.groups(), 2);
        assert_eq!(p.lut.len(), 8);
        for g in 0..2 {
            assert_eq!(&p.lut[g * 4..g * 4 + 4], &pts);
        }
        assert_eq!(p.sq_error(&w), 0.0);
    }

    #[test]
    fn error_bounds_and_group_sharing() {
        let (rows, cols) = (40, 96); // 3 groups, the last one partial
        let w = gaussian(rows * cols, 3);
        let norm: f64 = w.iter().map(|&x| (x as f64).powi(2)).sum();
        let p4 = palettize(&w, rows, cols, 4, 0);
        let p2 = palettize(&w, rows, cols, 2, 0);
        assert_eq!((p4.groups(), p4.lut.len(), p2.lut.len()), (3, 48, 12));
        assert!(p4.codes.iter().all(|&c| c < 16) && p2.codes.iter().all(|&c| c < 4));
        // Lloyd–Max for a unit Gaussian: 16 levels 0.0095, 4 levels 0.1175 (relative MSE).
        let (e4, e2) = (p4.sq_error(&w) / norm, p2.sq_error(&w) / norm);
        assert!(e4 < 0.013, "4-bit relative error {e4}");
        assert!(e2 < 0.13, "2-bit relative error {e2}");
        // Every weight maps to its nearest entry of its own group's table.
        for r in 0..rows {
            let lut = &p4.lut[(r / GROUP_ROWS) * 16..(r / GROUP_ROWS + 1) * 16];
            assert!(lut.windows(2).all(|x| x[0] <= x[1]));
            for c in 0..cols {
                let x = w[r * cols + c];
                let best = lut
                    .iter()
                    .map(|&l| (x - l).abs())
                    .fold(f32::INFINITY, f32::min);
                assert!(((x - p4.value(r, c)).abs() - best).abs() < 1e-6);
            }
        }
        // Deterministic for a seed.
        assert_eq!(palettize(&w, rows, cols, 4, 0).lut, p4.lut);

        // Rows of very different ranges: row scaling fits each row, the shared table cannot.
        let w2: Vec<f32> = w
            .chunks(cols)
            .enumerate()
            .flat_map(|(r, row)| row.iter().map(move |&x| x * (1.0 + 9.0 * (r % 2) as f32)))
            .collect();
        let norm2: f64 = w2.iter().map(|&x| (x as f64).powi(2)).sum();
        let plain = palettize(&w2, rows, cols, 4, 0);
        let scaled = palettize_scaled(&w2, rows, cols, 4, 0);
        assert_eq!(scaled.scales.as_ref().unwrap().len(), rows);
        // The narrow rows' error, relative to their own size.
        let narrow_err = |p: &Palette| -> f64 {
            (0..rows)
                .step_by(2)
                .flat_map(|r| (0..cols).map(move |c| (r, c)))
                .map(|(r, c)| ((w2[r * cols + c] - p.value(r, c)) as f64).powi(2))
                .sum::<f64>()
        };
        let narrow_norm: f64 = (0..rows)
            .step_by(2)
            .flat_map(|r| w2[r * cols..(r + 1) * cols].iter())
            .map(|&x| (x as f64).powi(2))
            .sum();
        let (ep, es) = (
            narrow_err(&plain) / narrow_norm,
            narrow_err(&scaled) / narrow_norm,
        );
        assert!(es < 0.5 * ep, "narrow rows: scaled {es} vs plain {ep}");
        assert!(scaled.sq_error(&w2) / norm2 < 0.02);
    }
}
