//! Images from Python (a path, encoded bytes, or raw RGB8 pixels) through the tiler.

use std::io::Write;
use std::path::{Path, PathBuf};

use afm_vision::{AspectMode, LoadLimits, TileMode, TiledImage, Tiler, TilerConfig};
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::errors;

/// An image as the Python layer hands it over (see `afm_vl/_images.py`).
pub enum ImageInput {
    Path(PathBuf),
    /// An encoded file's bytes (JPEG, PNG, ...).
    Bytes(Vec<u8>),
    /// Decoded 8-bit RGB, row-major `height × width × 3`.
    Rgb {
        data: Vec<u8>,
        width: u32,
        height: u32,
    },
}

impl ImageInput {
    /// From the `(kind, payload, width, height)` tuple the Python layer builds.
    pub fn from_parts(kind: &str, payload: &Bound<'_, PyAny>, w: u32, h: u32) -> PyResult<Self> {
        Ok(match kind {
            "path" => ImageInput::Path(payload.extract::<PathBuf>()?),
            "bytes" => ImageInput::Bytes(payload.extract::<Vec<u8>>()?),
            "rgb" => ImageInput::Rgb {
                data: payload.extract::<Vec<u8>>()?,
                width: w,
                height: h,
            },
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown image kind {other:?}"
                )))
            }
        })
    }
}

/// Tiler options shared by `afm_vl.tile` and `Model.tile` (the CLI's `tile` flags).
#[derive(Clone, Debug)]
pub struct TileOptions {
    pub mode: String,
    pub stretch: bool,
    pub config: Option<PathBuf>,
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    pub max_side: u32,
    pub max_mib: u64,
}

/// The tiler configuration exactly as `afm-vl tile` builds it from the same flags.
pub fn tiler_config(base: TilerConfig, o: &TileOptions) -> PyResult<TilerConfig> {
    let mut cfg = match &o.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| {
                let msg = format!("cannot read {}: {e}", p.display());
                match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        pyo3::exceptions::PyFileNotFoundError::new_err(msg)
                    }
                    _ => PyOSError::new_err(msg),
                }
            })?;
            serde_json::from_str::<TilerConfig>(&text).map_err(|e| {
                PyValueError::new_err(format!("{}: not a valid tiler config: {e}", p.display()))
            })?
        }
        None => base,
    };
    if let Some(m) = o.mean {
        cfg.image_mean = m;
    }
    if let Some(s) = o.std {
        cfg.image_std = s;
    }
    cfg.mode = o
        .mode
        .parse::<TileMode>()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    if o.stretch {
        cfg.aspect = AspectMode::Stretch;
    }
    cfg.limits = LoadLimits {
        max_side: o.max_side,
        max_decoded_bytes: o.max_mib.saturating_mul(1024 * 1024),
    };
    Ok(cfg)
}

/// Tile one image (no GIL needed). Bytes go through a temporary file so that they take
/// exactly the path the CLI takes (format sniffing, limits, reduced JPEG decoding); error
/// messages name `<bytes>` instead of the temporary file.
pub fn tile(cfg: TilerConfig, image: &ImageInput) -> PyResult<TiledImage> {
    let tiler = Tiler::new(cfg).map_err(errors::vision)?;
    match image {
        ImageInput::Path(p) => tiler.tile_path(p).map_err(errors::vision),
        ImageInput::Bytes(b) => {
            let mut f = tempfile::Builder::new()
                .prefix("afm_vl-image-")
                .tempfile()
                .map_err(|e| PyOSError::new_err(format!("cannot create a temporary file: {e}")))?;
            f.write_all(b)
                .and_then(|_| f.flush())
                .map_err(|e| PyOSError::new_err(format!("cannot write a temporary file: {e}")))?;
            tiler
                .tile_path(f.path())
                .map_err(|e| rename_path(e, f.path()))
        }
        ImageInput::Rgb {
            data,
            width,
            height,
        } => {
            let img =
                image::RgbImage::from_raw(*width, *height, data.clone()).ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "RGB buffer of {} bytes does not hold a {width}×{height} image",
                        data.len()
                    ))
                })?;
            tiler.tile_image(&img).map_err(errors::vision)
        }
    }
}

fn rename_path(e: afm_vision::VisionError, tmp: &Path) -> PyErr {
    let tmp = tmp.display().to_string();
    errors::vision_with(e, |m| m.replace(&tmp, "<bytes>"))
}

/// Run a SmolVLM checkpoint's image processor on one image (no GIL needed).
pub fn smolvlm_process(
    processor: &afm_vision::idefics3::Idefics3Processor,
    image: &ImageInput,
) -> PyResult<afm_vision::idefics3::ProcessedImage> {
    match image {
        ImageInput::Path(p) => processor.process_path(p).map_err(errors::vision),
        ImageInput::Bytes(b) => {
            let img = afm_vision::load_image_from_bytes(b, Path::new("<bytes>"), &processor.limits)
                .map_err(errors::vision)?;
            processor
                .process_rgb(img.as_raw(), img.width(), img.height())
                .map_err(errors::vision)
        }
        ImageInput::Rgb {
            data,
            width,
            height,
        } => processor
            .process_rgb(data, *width, *height)
            .map_err(errors::vision),
    }
}
