//! The Idefics3 / SmolVLM image processor (HF `SmolVLMImageProcessorPil`), step for step:
//!
//! 1. resize so the longest edge is `size.longest_edge` (up or down; the other edge keeps the
//!    aspect ratio, truncated and rounded up to even; both capped at 4096),
//! 2. resize to multiples of `max_image_size` (each edge rounded up),
//! 3. split into `max_image_size` squares, row-major, and add the whole image resized to one
//!    square (the global image); an image that is one square already is used alone,
//! 4. rescale (`× rescale_factor`, in f64 then f32) and normalise (`(x − mean) / std`, f32).
//!
//! Every resize is Pillow's (LANCZOS by default) on 8-bit RGB, through [`crate::pil_resample`],
//! so the pixel values are HF's exactly. The sizes follow HF's float arithmetic (`int()` of an
//! f64 quotient).

use std::path::Path;

use serde_json::Value;
use tch::Tensor;

use crate::error::{Result, VisionError};
use crate::image_io::{load_image, LoadLimits};
use crate::pil_resample::{resize_rgb8, Filter};

/// HF's absolute cap on an edge after the first resize.
pub const MAX_IMAGE_SIZE: usize = 4096;

/// `preprocessor_config.json` of an Idefics3 / SmolVLM checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Idefics3ProcessorConfig {
    /// Resize first so that the longest edge is `longest_edge` (`do_resize`, `size`).
    pub longest_edge: Option<usize>,
    /// Side of a crop and of the global image (`max_image_size.longest_edge`).
    pub max_image_size: usize,
    /// Split into crops + the global image (`do_image_splitting`); else one square image.
    pub split: bool,
    /// Pillow filter of every resize (`resample`: 1 = LANCZOS, 3 = BICUBIC).
    pub filter: Filter,
    /// `rescale_factor` when `do_rescale`.
    pub rescale: Option<f64>,
    /// `(image_mean, image_std)` when `do_normalize`.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

impl Default for Idefics3ProcessorConfig {
    /// SmolVLM-256M-Instruct's processor.
    fn default() -> Self {
        Self {
            longest_edge: Some(2048),
            max_image_size: 512,
            split: true,
            filter: Filter::Lanczos,
            rescale: Some(1.0 / 255.0),
            normalize: Some(([0.5; 3], [0.5; 3])),
        }
    }
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> VisionError {
    VisionError::Checkpoint {
        path: path.to_path_buf(),
        message: msg.to_string(),
    }
}

/// Keys of the file we read or know to be irrelevant to preprocessing one image.
const KNOWN_KEYS: &[&str] = &[
    "do_convert_rgb",
    "do_image_splitting",
    "do_normalize",
    "do_pad",
    "do_rescale",
    "do_resize",
    "image_mean",
    "image_std",
    "image_processor_type",
    "max_image_size",
    "processor_class",
    "resample",
    "rescale_factor",
    "size",
    "return_row_col_info",
    "video_sampling",
    "data_format",
    "input_data_format",
    "default_to_square",
];

impl Idefics3ProcessorConfig {
    /// Read `preprocessor_config.json` (HF's keys; unknown keys, unsupported filters and
    /// impossible sizes are errors naming the file).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| VisionError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| bad(path, format!("bad JSON: {e}")))?;
        Self::from_json(&v).map_err(|m| bad(path, m))
    }

    /// Parse HF's preprocessor JSON; the error is the problem without the file.
    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let obj = v.as_object().ok_or("not a JSON object")?;
        if let Some(k) = obj.keys().find(|k| !KNOWN_KEYS.contains(&k.as_str())) {
            return Err(format!("unknown image-processor field \"{k}\""));
        }
        let flag = |k: &str, default: bool| -> std::result::Result<bool, String> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(o) => Err(format!("\"{k}\" must be true or false, got {o}")),
            }
        };
        let edge = |k: &str| -> std::result::Result<Option<usize>, String> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Object(m)) => match m.get("longest_edge").and_then(Value::as_u64) {
                    Some(n) if (1..=MAX_IMAGE_SIZE as u64).contains(&n) => Ok(Some(n as usize)),
                    _ => Err(format!(
                        "\"{k}\" must be {{\"longest_edge\": 1..={MAX_IMAGE_SIZE}}}, got {}",
                        Value::Object(m.clone())
                    )),
                },
                Some(o) => Err(format!("\"{k}\" must be {{\"longest_edge\": N}}, got {o}")),
            }
        };
        let triple = |k: &str| -> std::result::Result<[f32; 3], String> {
            let a = obj.get(k).and_then(Value::as_array);
            match a.map(|a| a.iter().filter_map(Value::as_f64).collect::<Vec<_>>()) {
                Some(x) if x.len() == 3 => Ok([x[0] as f32, x[1] as f32, x[2] as f32]),
                _ => Err(format!("\"{k}\" must be three numbers")),
            }
        };
        let max_image_size = edge("max_image_size")?.unwrap_or(364);
        let longest_edge = if flag("do_resize", true)? {
            Some(edge("size")?.unwrap_or(4 * 364))
        } else {
            None
        };
        let filter = match obj.get("resample").map(|r| r.as_u64()) {
            None | Some(Some(1)) => Filter::Lanczos,
            Some(Some(3)) => Filter::Bicubic,
            Some(_) => {
                return Err(format!(
                    "resample {} is not supported (1 = LANCZOS or 3 = BICUBIC)",
                    obj["resample"]
                ))
            }
        };
        let rescale = if flag("do_rescale", true)? {
            match obj.get("rescale_factor") {
                None => Some(1.0 / 255.0),
                Some(r) => match r.as_f64() {
                    Some(f) if f.is_finite() && f > 0.0 => Some(f),
                    _ => {
                        return Err(format!(
                            "\"rescale_factor\" must be a positive number, got {r}"
                        ))
                    }
                },
            }
        } else {
            None
        };
        let normalize = if flag("do_normalize", true)? {
            let std = triple("image_std")?;
            if std.iter().any(|s| !s.is_finite() || *s == 0.0) {
                return Err(format!(
                    "\"image_std\" must be finite and non-zero, got {std:?}"
                ));
            }
            Some((triple("image_mean")?, std))
        } else {
            None
        };
        Ok(Self {
            longest_edge,
            max_image_size,
            split: flag("do_image_splitting", true)?,
            filter,
            rescale,
            normalize,
        })
    }
}

/// One image as the model's frames.
#[derive(Debug, Clone)]
pub struct ProcessedImage {
    /// `[frames, 3, side, side]`, row-major crops then the global image, normalised.
    pub pixels: Vec<f32>,
    pub frames: usize,
    /// `max_image_size`.
    pub side: usize,
    /// The crop grid (`0 × 0` when the image is one square and not split).
    pub rows: usize,
    pub cols: usize,
    /// The decoded image's size.
    pub source_size: (u32, u32),
}

impl ProcessedImage {
    pub fn to_tensor(&self) -> Result<Tensor> {
        let s = self.side as i64;
        Ok(Tensor::f_from_slice(&self.pixels)?.f_reshape([self.frames as i64, 3, s, s])?)
    }
}

/// `_resize_output_size_rescale_to_max_len` then `_resize_output_size_scale_below_upper_bound`
/// (HF's order and float arithmetic): `(height, width)`.
pub fn longest_edge_size(height: usize, width: usize, max_len: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let (mut h, mut w) = (height, width);
    if w >= h {
        w = max_len;
        h = (w as f64 / aspect) as usize;
        if h % 2 != 0 {
            h += 1;
        }
    } else {
        h = max_len;
        w = (h as f64 * aspect) as usize;
        if w % 2 != 0 {
            w += 1;
        }
    }
    let (h, w) = (h.max(1), w.max(1));
    let aspect = w as f64 / h as f64;
    let (mut h2, mut w2) = (h, w);
    if w >= h && w > MAX_IMAGE_SIZE {
        w2 = MAX_IMAGE_SIZE;
        h2 = (w2 as f64 / aspect) as usize;
    } else if h > w && h > MAX_IMAGE_SIZE {
        h2 = MAX_IMAGE_SIZE;
        w2 = (h2 as f64 * aspect) as usize;
    }
    (h2.max(1), w2.max(1))
}

/// `resize_for_vision_encoder`: each edge up to a multiple of `side`, `(height, width)`.
pub fn vision_encoder_size(height: usize, width: usize, side: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let up = |x: usize| x.div_ceil(side) * side;
    if width >= height {
        let w = up(width);
        let h = (w as f64 / aspect) as usize;
        (up(h), w)
    } else {
        let h = up(height);
        let w = (h as f64 * aspect) as usize;
        (h, up(w))
    }
}

/// The Idefics3 processor of one checkpoint.
#[derive(Debug, Clone)]
pub struct Idefics3Processor {
    pub config: Idefics3ProcessorConfig,
    pub limits: LoadLimits,
}

impl Idefics3Processor {
    pub fn new(config: Idefics3ProcessorConfig) -> Self {
        Self {
            config,
            limits: LoadLimits::default(),
        }
    }

    /// The crop grid `(rows, cols)` an image of `width × height` gets (`(0, 0)`: not split).
    pub fn grid(&self, width: u32, height: u32) -> (usize, usize) {
        let (h, w) = self.sizes(width as usize, height as usize).1;
        let s = self.config.max_image_size;
        if self.config.split && (h > s || w > s) {
            (h.div_ceil(s), w.div_ceil(s))
        } else {
            (0, 0)
        }
    }

    /// `(after the first resize, after the resize to multiples)` as `(height, width)`.
    fn sizes(&self, width: usize, height: usize) -> ((usize, usize), (usize, usize)) {
        let first = match self.config.longest_edge {
            Some(l) => longest_edge_size(height, width, l),
            None => (height, width),
        };
        let second = if self.config.split {
            vision_encoder_size(first.0, first.1, self.config.max_image_size)
        } else {
            (self.config.max_image_size, self.config.max_image_size)
        };
        (first, second)
    }

    /// Decode and process an image file.
    pub fn process_path(&self, path: &Path) -> Result<ProcessedImage> {
        let img = load_image(path, &self.limits)?;
        self.process_rgb(img.as_raw(), img.width(), img.height())
    }

    /// Process packed RGB8.
    pub fn process_rgb(&self, rgb: &[u8], width: u32, height: u32) -> Result<ProcessedImage> {
        let (w0, h0) = (width as usize, height as usize);
        let f = self.config.filter;
        let ((h1, w1), (h2, w2)) = self.sizes(w0, h0);
        if w0 == 0 || h0 == 0 || rgb.len() < w0 * h0 * 3 {
            return Err(VisionError::Shape(format!(
                "{width}×{height} RGB image needs {} bytes, got {}",
                w0 * h0 * 3,
                rgb.len()
            )));
        }
        let mut img = rgb[..w0 * h0 * 3].to_vec();
        if self.config.longest_edge.is_some() {
            img = resize_rgb8(&img, w0, h0, w1, h1, f)?;
        }
        let (w1, h1) = if self.config.longest_edge.is_some() {
            (w1, h1)
        } else {
            (w0, h0)
        };
        let img = resize_rgb8(&img, w1, h1, w2, h2, f)?;
        let s = self.config.max_image_size;
        let mut frames: Vec<Vec<u8>> = Vec::new();
        let (rows, cols) = if self.config.split && (h2 > s || w2 > s) {
            let (rows, cols) = ((h2 - s) / s + 1, (w2 - s) / s + 1);
            for r in 0..rows {
                for c in 0..cols {
                    let mut crop = Vec::with_capacity(s * s * 3);
                    for y in r * s..(r + 1) * s {
                        crop.extend_from_slice(
                            &img[(y * w2 + c * s) * 3..(y * w2 + (c + 1) * s) * 3],
                        );
                    }
                    frames.push(crop);
                }
            }
            frames.push(resize_rgb8(&img, w2, h2, s, s, f)?);
            (rows, cols)
        } else {
            frames.push(img);
            (0, 0)
        };
        let mut pixels = Vec::with_capacity(frames.len() * 3 * s * s);
        for frame in &frames {
            for c in 0..3 {
                pixels.extend(frame.iter().skip(c).step_by(3).map(|&v| self.value(v, c)));
            }
        }
        Ok(ProcessedImage {
            pixels,
            frames: frames.len(),
            side: s,
            rows,
            cols,
            source_size: (width, height),
        })
    }

    /// HF's `rescale` (`astype(float64) * scale`, then float32) and `normalize` (float32).
    fn value(&self, v: u8, c: usize) -> f32 {
        let x = match self.config.rescale {
            Some(r) => (f64::from(v) * r) as f32,
            None => f32::from(v),
        };
        match self.config.normalize {
            Some((mean, std)) => (x - mean[c]) / std[c],
            None => x,
        }
    }
}

/// The processor configuration of a checkpoint directory (`preprocessor_config.json`).
pub fn processor_of_dir(dir: &Path) -> Result<Idefics3Processor> {
    let path = dir.join("preprocessor_config.json");
    if !path.is_file() {
        return Err(bad(
            dir,
            "no preprocessor_config.json (the image processor's settings)",
        ));
    }
    Ok(Idefics3Processor::new(Idefics3ProcessorConfig::from_file(
        &path,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_hf_arithmetic() {
        // 640×427 to a longest edge of 1024: 1024 / (640/427) = 683.2 → 683 → even 684.
        assert_eq!(longest_edge_size(427, 640, 1024), (684, 1024));
        assert_eq!(vision_encoder_size(684, 1024, 512), (1024, 1024));
        // Portrait 360×540 at 1134: width int(1134 · 2/3) = 755 (float) → 756.
        let (h, w) = longest_edge_size(540, 360, 1134);
        assert_eq!(h, 1134);
        assert_eq!(w, ((1134.0 * (360.0 / 540.0)) as usize + 1) & !1);
        assert_eq!(vision_encoder_size(4, 5000, 512).1, 5120);
    }

    #[test]
    fn a_square_image_of_one_crop_is_not_split() {
        let p = Idefics3Processor::new(Idefics3ProcessorConfig {
            longest_edge: Some(32),
            max_image_size: 32,
            ..Default::default()
        });
        let out = p.process_rgb(&vec![255u8; 20 * 20 * 3], 20, 20).unwrap();
        assert_eq!((out.rows, out.cols, out.frames), (0, 0, 1));
        assert!(out.pixels.iter().all(|&v| (v - 1.0).abs() < 1e-6));
        let wide = p.process_rgb(&vec![0u8; 40 * 10 * 3], 40, 10).unwrap();
        assert_eq!((wide.rows, wide.cols, wide.frames), (0, 0, 1));
        let p2 = Idefics3Processor::new(Idefics3ProcessorConfig {
            longest_edge: Some(64),
            max_image_size: 32,
            ..Default::default()
        });
        let big = p2.process_rgb(&vec![0u8; 70 * 20 * 3], 70, 20).unwrap();
        assert_eq!((big.rows, big.cols, big.frames), (1, 2, 3));
        assert_eq!(p2.grid(70, 20), (1, 2));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let v = serde_json::json!({"max_image_size": {"longest_edge": 512}, "tile_mode": "x"});
        let e = Idefics3ProcessorConfig::from_json(&v).unwrap_err();
        assert!(e.contains("tile_mode"), "{e}");
    }
}
