//! The AFM 2025 image tiler.
//!
//! | mode | tiles |
//! | --- | --- |
//! | `rapid` | the whole image at 224×224 |
//! | `balanced` | one 672×672 thumbnail |
//! | `high-res` | the image at 1344×1344 cut into four 672×672 crops (row-major), then the 672 thumbnail |
//! | `auto` | `high-res` when either side exceeds 672 px, else `balanced` (our choice, see SPEC.md) |
//!
//! Aspect ratio is kept by fitting the image inside the square (bicubic, Catmull-Rom — the same
//! kernel as PIL's `BICUBIC`) and padding the rest with the normalisation mean, i.e. exactly 0
//! after normalisation; the content is centred. `AspectMode::Stretch` resizes to the square
//! instead. Output: `[tiles, 3, S, S]` f32, `(x / 255 - mean) / std` per channel.
//!
//! Resizing uses `fast_image_resize` (SIMD); [`Tiler::tile_batch`] decodes and tiles many images
//! in parallel with `rayon` (on the current rayon pool, so callers pick the thread count).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;

use fast_image_resize::{images::Image, images::ImageRef, FilterType, PixelType};
use fast_image_resize::{ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Result, VisionError};
use crate::image_io::{load_image_hinted, LoadLimits};
use crate::jpeg_draft::SizeHint;

/// Which tiles the encoder sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TileMode {
    /// The whole image at `rapid_size` (224).
    Rapid,
    /// One `tile_size` (672) thumbnail.
    Balanced,
    /// Four `tile_size` crops of the image at `2 × tile_size`, row-major, then the thumbnail.
    HighRes,
    /// `HighRes` when either side exceeds `tile_size`, else `Balanced`.
    #[default]
    Auto,
}

impl TileMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TileMode::Rapid => "rapid",
            TileMode::Balanced => "balanced",
            TileMode::HighRes => "high-res",
            TileMode::Auto => "auto",
        }
    }

    /// All concrete modes (not `Auto`).
    pub const CONCRETE: [TileMode; 3] = [TileMode::Rapid, TileMode::Balanced, TileMode::HighRes];
}

impl std::fmt::Display for TileMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TileMode {
    type Err = VisionError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "rapid" => Ok(TileMode::Rapid),
            "balanced" => Ok(TileMode::Balanced),
            "high-res" | "highres" | "high" => Ok(TileMode::HighRes),
            "auto" => Ok(TileMode::Auto),
            other => Err(VisionError::Config(format!(
                "unknown tile mode `{other}` (expected rapid, balanced, high-res or auto)"
            ))),
        }
    }
}

/// How a non-square image becomes square.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AspectMode {
    /// Fit inside the square, centre, pad with the normalisation mean.
    #[default]
    Pad,
    /// Resize to the square, ignoring the aspect ratio.
    Stretch,
}

/// Largest tile side a config may ask for (AFM uses 672, SigLIP up to 512).
pub const MAX_TILE_SIDE: u32 = 4096;
/// Largest `high_res_grid` (AFM uses 2: four crops).
pub const MAX_HIGH_RES_GRID: u32 = 8;
/// Most bytes of f32 tiles one image may need (all crops and the thumbnail).
pub const MAX_TILED_BYTES: u64 = 1 << 30;

/// Tiler configuration (HF image-processor names for mean/std).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TilerConfig {
    pub mode: TileMode,
    pub aspect: AspectMode,
    /// Per-channel mean in [0, 1] units (default: CLIP's).
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation in [0, 1] units (default: CLIP's).
    pub image_std: [f32; 3],
    /// Side of the `rapid` tile (224).
    pub rapid_size: u32,
    /// Side of the `balanced` thumbnail and of each `high-res` crop (672).
    pub tile_size: u32,
    /// `high-res` grid: the image is resized to `grid × tile_size` and cut into `grid²` crops (2).
    pub high_res_grid: u32,
    /// Limits applied when loading files.
    pub limits: LoadLimits,
    /// Decode JPEGs much larger than the tiles at 1/4 or 1/8 size in the DCT domain (like
    /// PIL's `draft`); the decoded image always stays at least as large as the resize target.
    pub jpeg_draft: bool,
}

impl Default for TilerConfig {
    fn default() -> Self {
        Self {
            mode: TileMode::Auto,
            aspect: AspectMode::Pad,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_5, 0.261_302_6, 0.275_777_1],
            rapid_size: 224,
            tile_size: 672,
            high_res_grid: 2,
            limits: LoadLimits::default(),
            jpeg_draft: true,
        }
    }
}

/// What one tile shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum TileKind {
    /// The whole image (rapid mode).
    Whole,
    /// One crop of the high-res grid.
    Crop { row: u32, col: u32 },
    /// The thumbnail of the whole image.
    Thumbnail,
}

/// Metadata of one tile.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TileMeta {
    pub kind: TileKind,
    /// Side of the (square) tile in pixels.
    pub size: u32,
    /// Pixels of the tile holding image content, `[x0, y0, x1, y1)`; the rest is padding.
    pub content_box: [u32; 4],
    /// The region of the source image shown in `content_box`, `[x0, y0, x1, y1]` in source px.
    pub source_box: [f32; 4],
}

/// The tiles of one image.
#[derive(Debug, Clone)]
pub struct TiledImage {
    /// The mode actually used (`Auto` resolved).
    pub mode: TileMode,
    /// Tile side in pixels.
    pub tile_size: u32,
    /// Width and height of the source image (after EXIF orientation).
    pub source_size: (u32, u32),
    pub tiles: Vec<TileMeta>,
    /// `[tiles, 3, tile_size, tile_size]`, row-major.
    pub pixels: Vec<f32>,
}

impl TiledImage {
    pub fn num_tiles(&self) -> usize {
        self.tiles.len()
    }

    /// `[tiles, 3, S, S]` f32 on the CPU.
    pub fn to_tensor(&self) -> Result<tch::Tensor> {
        let s = i64::from(self.tile_size);
        Ok(tch::Tensor::from_slice(&self.pixels).f_view([self.tiles.len() as i64, 3, s, s])?)
    }

    /// `[tiles, 4]` i64 content boxes, for debugging dumps.
    pub fn content_boxes_tensor(&self) -> Result<tch::Tensor> {
        let v: Vec<i64> = self
            .tiles
            .iter()
            .flat_map(|t| t.content_box.map(i64::from))
            .collect();
        Ok(tch::Tensor::from_slice(&v).f_view([self.tiles.len() as i64, 4])?)
    }
}

/// A resized image placed in a square canvas.
struct Placed {
    /// RGB8 content, `w × h`.
    rgb: Vec<u8>,
    w: u32,
    h: u32,
    /// Offset of the content in the canvas.
    ox: u32,
    oy: u32,
}

/// The tiler: its configuration plus a pool of resizers whose scratch buffers are reused from
/// image to image (saves re-faulting tens of MB per image); share it across threads freely.
pub struct Tiler {
    config: TilerConfig,
    /// `lut[c][v] = (v / 255 - mean[c]) / std[c]`.
    lut: [[f32; 256]; 3],
    resizers: Mutex<Vec<Resizer>>,
}

impl Clone for Tiler {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            lut: self.lut,
            resizers: Mutex::new(Vec::new()),
        }
    }
}

impl std::fmt::Debug for Tiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tiler")
            .field("config", &self.config)
            .finish()
    }
}

impl Tiler {
    pub fn new(config: TilerConfig) -> Result<Self> {
        if config
            .image_std
            .iter()
            .any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(VisionError::Config(format!(
                "image_std must be positive and finite, got {:?}",
                config.image_std
            )));
        }
        if config.image_mean.iter().any(|m| !m.is_finite()) {
            return Err(VisionError::Config(format!(
                "image_mean must be finite, got {:?}",
                config.image_mean
            )));
        }
        if config.rapid_size == 0 || config.tile_size == 0 || config.high_res_grid == 0 {
            return Err(VisionError::Config(
                "rapid_size, tile_size and high_res_grid must be positive".into(),
            ));
        }
        // Bounds before anything is allocated: a config (or a downloaded checkpoint's tiler
        // section) must not be able to ask for gigabytes of tiles.
        for (name, v, max) in [
            ("rapid_size", config.rapid_size, MAX_TILE_SIDE),
            ("tile_size", config.tile_size, MAX_TILE_SIDE),
            ("high_res_grid", config.high_res_grid, MAX_HIGH_RES_GRID),
        ] {
            if v > max {
                return Err(VisionError::Config(format!(
                    "{name} {v} is larger than the limit of {max}"
                )));
            }
        }
        let tiles = u64::from(config.high_res_grid).pow(2) + 1;
        let bytes = tiles * 3 * u64::from(config.tile_size).pow(2) * 4;
        if bytes > MAX_TILED_BYTES {
            return Err(VisionError::Config(format!(
                "tile_size {} with high_res_grid {} needs {} MiB of tiles per image, more than the limit of {} MiB",
                config.tile_size,
                config.high_res_grid,
                bytes >> 20,
                MAX_TILED_BYTES >> 20
            )));
        }
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = (v as f32 / 255.0 - config.image_mean[c]) / config.image_std[c];
            }
        }
        Ok(Self {
            config,
            lut,
            resizers: Mutex::new(Vec::new()),
        })
    }

    pub fn config(&self) -> &TilerConfig {
        &self.config
    }

    /// The concrete mode used for an image of this size.
    pub fn resolve_mode(&self, width: u32, height: u32) -> TileMode {
        match self.config.mode {
            TileMode::Auto if width.max(height) > self.config.tile_size => TileMode::HighRes,
            TileMode::Auto => TileMode::Balanced,
            m => m,
        }
    }

    /// Number of tiles and their side for an image of this size.
    pub fn tile_shape(&self, width: u32, height: u32) -> (usize, u32) {
        match self.resolve_mode(width, height) {
            TileMode::Rapid => (1, self.config.rapid_size),
            TileMode::HighRes => {
                let g = self.config.high_res_grid as usize;
                (g * g + 1, self.config.tile_size)
            }
            _ => (1, self.config.tile_size),
        }
    }

    /// The smallest decoded size the configured mode needs (for draft JPEG decoding).
    pub fn size_hint(&self) -> SizeHint {
        if !self.config.jpeg_draft {
            return SizeHint::Full;
        }
        let side = match self.config.mode {
            TileMode::Rapid => self.config.rapid_size,
            TileMode::Balanced => self.config.tile_size,
            // Auto: images that end up balanced (≤ tile_size) are too small to reduce anyway.
            TileMode::HighRes | TileMode::Auto => self.config.tile_size * self.config.high_res_grid,
        };
        match self.config.aspect {
            AspectMode::Pad => SizeHint::LongSide(side),
            AspectMode::Stretch => SizeHint::ShortSide(side),
        }
    }

    /// Loads and tiles one file.
    pub fn tile_path(&self, path: &Path) -> Result<TiledImage> {
        let (img, full) = load_image_hinted(path, &self.config.limits, self.size_hint())?;
        self.tile_image_as(&img, full)
    }

    /// Loads and tiles many files in parallel (on the current rayon pool); results keep the
    /// input order.
    pub fn tile_batch<P: AsRef<Path> + Sync>(&self, paths: &[P]) -> Vec<Result<TiledImage>> {
        paths
            .par_iter()
            .map(|p| self.tile_path(p.as_ref()))
            .collect()
    }

    /// Tiles many files in parallel and stacks them: `[sum of tiles, 3, S, S]` plus, per image,
    /// its range of tiles. All images must resolve to the same tile side (true unless modes mix
    /// `rapid` with others).
    pub fn tile_batch_tensor<P: AsRef<Path> + Sync>(
        &self,
        paths: &[P],
    ) -> Result<(tch::Tensor, Vec<TiledImage>)> {
        let results = self.tile_batch(paths);
        let mut tiled = Vec::with_capacity(results.len());
        for r in results {
            tiled.push(r?);
        }
        let tensors = tiled
            .iter()
            .map(|t| t.to_tensor())
            .collect::<Result<Vec<_>>>()?;
        if tensors.is_empty() {
            return Err(VisionError::Config("no images to tile".into()));
        }
        Ok((tch::Tensor::f_cat(&tensors, 0)?, tiled))
    }

    /// Tiles a decoded RGB image.
    pub fn tile_image(&self, img: &RgbImage) -> Result<TiledImage> {
        self.tile_image_as(img, img.dimensions())
    }

    /// Tiles `img`, a possibly reduced decode of an image of `full` size: geometry (mode, fit
    /// sizes, source boxes) follows the full size.
    pub fn tile_image_as(&self, img: &RgbImage, full: (u32, u32)) -> Result<TiledImage> {
        let (w, h) = full;
        if w == 0 || h == 0 || img.width() == 0 || img.height() == 0 {
            return Err(VisionError::Config(format!(
                "cannot tile an empty {w}×{h} image"
            )));
        }
        let mode = self.resolve_mode(w, h);
        let mut resizer = self
            .resizers
            .lock()
            .ok()
            .and_then(|mut pool| pool.pop())
            .unwrap_or_default();
        let (tiles, size, pixels) = match mode {
            TileMode::Rapid => {
                let s = self.config.rapid_size;
                let placed = self.place(&mut resizer, img, full, s)?;
                let mut px = vec![0f32; 3 * (s * s) as usize];
                let meta = self.write_tile(&placed, w, h, 0, 0, s, TileKind::Whole, &mut px);
                (vec![meta], s, px)
            }
            TileMode::Balanced | TileMode::Auto => {
                let s = self.config.tile_size;
                let placed = self.place(&mut resizer, img, full, s)?;
                let mut px = vec![0f32; 3 * (s * s) as usize];
                let meta = self.write_tile(&placed, w, h, 0, 0, s, TileKind::Thumbnail, &mut px);
                (vec![meta], s, px)
            }
            TileMode::HighRes => {
                let s = self.config.tile_size;
                let g = self.config.high_res_grid;
                let n = (g * g + 1) as usize;
                let per = 3 * (s * s) as usize;
                let big = self.place(&mut resizer, img, full, s * g)?;
                let thumb = self.place(&mut resizer, img, full, s)?;
                let mut px = vec![0f32; n * per];
                let mut metas = Vec::with_capacity(n);
                for (i, chunk) in px.chunks_exact_mut(per).enumerate() {
                    let i = i as u32;
                    let meta = if i < g * g {
                        let (row, col) = (i / g, i % g);
                        let kind = TileKind::Crop { row, col };
                        self.write_tile(&big, w, h, col * s, row * s, s, kind, chunk)
                    } else {
                        self.write_tile(&thumb, w, h, 0, 0, s, TileKind::Thumbnail, chunk)
                    };
                    metas.push(meta);
                }
                (metas, s, px)
            }
        };
        if let Ok(mut pool) = self.resizers.lock() {
            pool.push(resizer);
        }
        Ok(TiledImage {
            mode,
            tile_size: size,
            source_size: (w, h),
            tiles,
            pixels,
        })
    }

    /// Resizes `img` to fit a `side × side` canvas (or to fill it, when stretching).
    fn place(
        &self,
        resizer: &mut Resizer,
        img: &RgbImage,
        full: (u32, u32),
        side: u32,
    ) -> Result<Placed> {
        let (w, h) = img.dimensions();
        let (nw, nh) = match self.config.aspect {
            AspectMode::Stretch => (side, side),
            AspectMode::Pad => fit_size(full.0, full.1, side),
        };
        let rgb = resize_rgb(resizer, img.as_raw(), w, h, nw, nh)?;
        Ok(Placed {
            rgb,
            w: nw,
            h: nh,
            ox: (side - nw) / 2,
            oy: (side - nh) / 2,
        })
    }

    /// Writes the `s × s` window of the canvas at `(cx, cy)` into `out` (`[3, s, s]`, which
    /// must be zeroed: canvas padding stays 0, the mean), normalised.
    #[allow(clippy::too_many_arguments)]
    fn write_tile(
        &self,
        placed: &Placed,
        src_w: u32,
        src_h: u32,
        cx: u32,
        cy: u32,
        s: u32,
        kind: TileKind,
        out: &mut [f32],
    ) -> TileMeta {
        let plane = (s * s) as usize;
        // Intersection of the tile window with the content rectangle, in canvas coordinates.
        let x0 = cx.max(placed.ox);
        let y0 = cy.max(placed.oy);
        let x1 = (cx + s).min(placed.ox + placed.w);
        let y1 = (cy + s).min(placed.oy + placed.h);
        if x1 > x0 && y1 > y0 {
            let (r, rest) = out.split_at_mut(plane);
            let (g, b) = rest.split_at_mut(plane);
            let run = (x1 - x0) as usize;
            for y in y0..y1 {
                let src_row = ((y - placed.oy) * placed.w + (x0 - placed.ox)) as usize * 3;
                let src = &placed.rgb[src_row..src_row + run * 3];
                let dst = ((y - cy) * s + (x0 - cx)) as usize;
                let (dr, dg, db) = (
                    &mut r[dst..dst + run],
                    &mut g[dst..dst + run],
                    &mut b[dst..dst + run],
                );
                let [l0, l1, l2] = &self.lut;
                let planes = dr.iter_mut().zip(dg.iter_mut()).zip(db.iter_mut());
                for (px, ((r, g), b)) in src.chunks_exact(3).zip(planes) {
                    *r = l0[usize::from(px[0])];
                    *g = l1[usize::from(px[1])];
                    *b = l2[usize::from(px[2])];
                }
            }
        }
        let (bx0, by0, bx1, by1) = if x1 > x0 && y1 > y0 {
            (x0, y0, x1, y1)
        } else {
            (cx, cy, cx, cy)
        };
        let sx = src_w as f32 / placed.w as f32;
        let sy = src_h as f32 / placed.h as f32;
        TileMeta {
            kind,
            size: s,
            content_box: [bx0 - cx, by0 - cy, bx1 - cx, by1 - cy],
            source_box: [
                (bx0 - placed.ox) as f32 * sx,
                (by0 - placed.oy) as f32 * sy,
                (bx1 - placed.ox) as f32 * sx,
                (by1 - placed.oy) as f32 * sy,
            ],
        }
    }
}

/// Size of a `w × h` image fitted inside a `side` square, aspect kept (rounded, at least 1 px).
pub fn fit_size(w: u32, h: u32, side: u32) -> (u32, u32) {
    let (w64, h64, s64) = (u64::from(w), u64::from(h), u64::from(side));
    if w >= h {
        let nh = ((h64 * s64 * 2 + w64) / (w64 * 2)).clamp(1, s64) as u32;
        (side, nh)
    } else {
        let nw = ((w64 * s64 * 2 + h64) / (h64 * 2)).clamp(1, s64) as u32;
        (nw, side)
    }
}

/// Bicubic (Catmull-Rom, PIL's `BICUBIC`) resize of packed RGB8.
pub fn resize_rgb(
    resizer: &mut Resizer,
    src: &[u8],
    w: u32,
    h: u32,
    nw: u32,
    nh: u32,
) -> Result<Vec<u8>> {
    if (w, h) == (nw, nh) {
        return Ok(src[..(w * h * 3) as usize].to_vec());
    }
    let src_ref = ImageRef::new(w, h, src, PixelType::U8x3)
        .map_err(|e| VisionError::Resize(e.to_string()))?;
    let mut dst = Image::new(nw, nh, PixelType::U8x3);
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom));
    resizer
        .resize(&src_ref, &mut dst, &opts)
        .map_err(|e| VisionError::Resize(e.to_string()))?;
    Ok(dst.into_vec())
}

/// Convenience: tile one file with a configuration.
pub fn tile_file(path: &Path, config: &TilerConfig) -> Result<TiledImage> {
    Tiler::new(config.clone())?.tile_path(path)
}

/// Lists the image files (by extension) directly inside a folder, sorted.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|source| VisionError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|source| VisionError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let p = entry.path();
        let ext = p
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase());
        if p.is_file()
            && matches!(
                ext.as_deref(),
                Some("jpg" | "jpeg" | "png" | "webp" | "gif" | "bmp" | "tif" | "tiff")
            )
        {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}
