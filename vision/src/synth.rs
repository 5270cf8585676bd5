//! Procedural, content-rich test images (gradients, shapes, text-like rows, sensor-like noise)
//! for benchmarks and samples: JPEG-compressible like photos, never flat colour.

use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::RgbImage;
use rayon::prelude::*;

use crate::error::{Result, VisionError};

/// A small deterministic PRNG (SplitMix64).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[derive(Debug, Clone, Copy)]
enum Shape {
    Disc { cx: f32, cy: f32, r: f32 },
    Rect { x0: f32, y0: f32, x1: f32, y1: f32 },
}

/// A `w × h` image from `seed`.
pub fn synth_image(w: u32, h: u32, seed: u64) -> RgbImage {
    let mut rng = Rng(seed ^ 0xA5A5_5A5A_1234_5678);
    let (wf, hf) = (w as f32, h as f32);
    let base: [[f32; 3]; 2] = [
        [rng.unit() * 255.0, rng.unit() * 255.0, rng.unit() * 255.0],
        [rng.unit() * 255.0, rng.unit() * 255.0, rng.unit() * 255.0],
    ];
    let freq = 2.0 + rng.unit() * 6.0;
    let shapes: Vec<(Shape, [f32; 3])> = (0..12)
        .map(|i| {
            let colour = [rng.unit() * 255.0, rng.unit() * 255.0, rng.unit() * 255.0];
            let (cx, cy) = (rng.unit() * wf, rng.unit() * hf);
            let s = (0.05 + rng.unit() * 0.2) * wf.min(hf);
            let shape = if i % 2 == 0 {
                Shape::Disc { cx, cy, r: s }
            } else {
                Shape::Rect {
                    x0: cx - s,
                    y0: cy - s * 0.6,
                    x1: cx + s,
                    y1: cy + s * 0.6,
                }
            };
            (shape, colour)
        })
        .collect();
    // A "text" panel: rows of dark glyph blocks on a light band.
    let text_y0 = (0.65 + rng.unit() * 0.2) * hf;
    let glyph = (hf / 60.0).max(3.0);
    let mut buf = vec![0u8; w as usize * h as usize * 3];
    buf.par_chunks_mut(w as usize * 3)
        .enumerate()
        .for_each(|(y, row)| {
            let yf = y as f32;
            let ty = (yf - text_y0) / glyph;
            let in_text = (0.0..6.0).contains(&ty) && ty.fract() < 0.7;
            for x in 0..w as usize {
                let xf = x as f32;
                let t = (xf / wf + yf / hf) * 0.5;
                let wave = ((xf / wf * freq).sin() * (yf / hf * freq * 0.7).cos()) * 30.0;
                let mut c = [0f32; 3];
                for (k, ck) in c.iter_mut().enumerate() {
                    *ck = base[0][k] * (1.0 - t) + base[1][k] * t + wave;
                }
                for (shape, colour) in &shapes {
                    let inside = match *shape {
                        Shape::Disc { cx, cy, r } => (xf - cx).powi(2) + (yf - cy).powi(2) < r * r,
                        Shape::Rect { x0, y0, x1, y1 } => {
                            xf >= x0 && xf < x1 && yf >= y0 && yf < y1
                        }
                    };
                    if inside {
                        c = *colour;
                    }
                }
                if in_text && xf > wf * 0.05 && xf < wf * 0.95 {
                    let gx = (xf / glyph) as u64;
                    let gy = ty as u64;
                    let on = (gx.wrapping_mul(2_654_435_761) ^ gy.wrapping_mul(97) ^ seed) % 5 < 3
                        && (xf / glyph).fract() < 0.75;
                    c = if on {
                        [25.0, 25.0, 30.0]
                    } else {
                        [235.0, 232.0, 225.0]
                    };
                }
                // Sensor-like noise.
                let n = ((x as u64).wrapping_mul(0x9E37_79B9)
                    ^ (y as u64).wrapping_mul(0x85EB_CA6B))
                .wrapping_add(seed)
                .wrapping_mul(0xC2B2_AE35)
                    >> 27;
                let noise = (n % 17) as f32 - 8.0;
                for k in 0..3 {
                    row[x * 3 + k] = (c[k] + noise).clamp(0.0, 255.0) as u8;
                }
            }
        });
    RgbImage::from_raw(w, h, buf).expect("buffer sized from the image")
}

/// Writes `img` as a JPEG of the given quality.
pub fn write_jpeg(img: &RgbImage, path: &Path, quality: u8) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|source| VisionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut enc = JpegEncoder::new_with_quality(std::io::BufWriter::new(file), quality);
    enc.encode_image(img).map_err(|e| VisionError::Decode {
        path: path.to_path_buf(),
        format: "JPEG".into(),
        message: format!("cannot encode: {e}"),
    })
}

/// Writes `n` benchmark JPEGs into `dir`: alternately 4032×3024 (12 MP photo) and 1920×1080.
pub fn write_bench_images(dir: &Path, n: usize) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|source| VisionError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    (0..n)
        .into_par_iter()
        .map(|i| {
            let (w, h) = if i % 2 == 0 {
                (4032, 3024)
            } else {
                (1920, 1080)
            };
            let path = dir.join(format!("bench-{i:03}-{w}x{h}.jpg"));
            if !path.exists() {
                write_jpeg(&synth_image(w, h, i as u64 + 1), &path, 90)?;
            }
            Ok(path)
        })
        .collect()
}
