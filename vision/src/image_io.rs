//! Image loading: JPEG, PNG, WebP, GIF (first frame), BMP and TIFF through the `image` crate,
//! with the EXIF orientation applied and every input converted to 8-bit RGB (grey expanded,
//! alpha composited on white, 16-bit and float scaled down, CMYK converted by the decoders).
//!
//! Limits on the image's sides and on the decoded size are checked from the header, before any
//! pixel is decoded, so a file that claims 100,000 × 100,000 px costs a few bytes of reading.
//! Decoder panics are caught and reported as errors.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{Result, VisionError};
use crate::jpeg_draft::{decode_scaled, SizeHint};
use crate::jpeg_scan::jpeg_is_complete;

/// Limits enforced before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoadLimits {
    /// Largest accepted width or height in pixels (default 16,384).
    pub max_side: u32,
    /// Largest accepted decoded buffer in bytes (default 512 MiB).
    pub max_decoded_bytes: u64,
}

impl Default for LoadLimits {
    fn default() -> Self {
        Self {
            max_side: 16_384,
            max_decoded_bytes: 512 * 1024 * 1024,
        }
    }
}

/// Loads an image file as 8-bit RGB at full size; see [`load_image_hinted`].
pub fn load_image(path: &Path, limits: &LoadLimits) -> Result<RgbImage> {
    Ok(load_image_hinted(path, limits, SizeHint::Full)?.0)
}

/// Loads an image file as 8-bit RGB (the file is read into memory first; its size counts
/// against `max_decoded_bytes`) with its EXIF orientation applied.
///
/// `hint` tells how small the image may come out: JPEGs much larger than needed are decoded at
/// 1/4 or 1/8 size in the DCT domain (see [`crate::jpeg_draft`]); other formats ignore it.
/// Returns the image and the full size it stands for (equal to its size unless reduced).
pub fn load_image_hinted(
    path: &Path,
    limits: &LoadLimits,
    hint: SizeHint,
) -> Result<(RgbImage, (u32, u32))> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => VisionError::NotFound {
            path: path.to_path_buf(),
        },
        _ => VisionError::Io {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    if meta.is_dir() {
        return Err(VisionError::IsDirectory {
            path: path.to_path_buf(),
        });
    }
    if !meta.is_file() {
        return Err(VisionError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    if meta.len() == 0 {
        return Err(VisionError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    if meta.len() > limits.max_decoded_bytes {
        return Err(VisionError::TooManyBytes {
            path: path.to_path_buf(),
            bytes: meta.len(),
            max_bytes: limits.max_decoded_bytes,
        });
    }
    let bytes = std::fs::read(path).map_err(|source| VisionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(Cursor::new(bytes.as_slice()), path, limits, hint)
}

/// Decodes an in-memory encoded image; `name` is used in error messages only.
pub fn load_image_from_bytes(bytes: &[u8], name: &Path, limits: &LoadLimits) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(VisionError::EmptyFile {
            path: name.to_path_buf(),
        });
    }
    Ok(decode(Cursor::new(bytes), name, limits, SizeHint::Full)?.0)
}

fn decode(
    reader: Cursor<&[u8]>,
    path: &Path,
    limits: &LoadLimits,
    hint: SizeHint,
) -> Result<(RgbImage, (u32, u32))> {
    let owned: PathBuf = path.to_path_buf();
    let data: &[u8] = reader.get_ref();
    let mut reader = ImageReader::new(reader)
        .with_guessed_format()
        .map_err(|source| VisionError::Io {
            path: owned.clone(),
            source,
        })?;
    // Only the file's contents decide the format; a `.jpg` holding text is not an image.
    let format = reader.format().ok_or_else(|| VisionError::UnknownFormat {
        path: owned.clone(),
    })?;
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(limits.max_side);
    image_limits.max_image_height = Some(limits.max_side);
    image_limits.max_alloc = Some(limits.max_decoded_bytes);
    reader.limits(image_limits);
    // JPEG decoders fill a truncated scan with grey and succeed; reject such files up front.
    if format == ImageFormat::Jpeg && !jpeg_is_complete(data) {
        return Err(VisionError::Decode {
            path: owned,
            format: format_name(format),
            message: "truncated or corrupt JPEG (no end-of-image marker after the scan data)"
                .into(),
        });
    }
    if format == ImageFormat::Jpeg && hint != SizeHint::Full {
        let scaled = std::panic::catch_unwind(|| decode_scaled(data, path, limits, hint))
            .unwrap_or_else(|_| {
                Err(VisionError::Decode {
                    path: owned.clone(),
                    format: format_name(format),
                    message: "the decoder panicked on malformed data".into(),
                })
            })?;
        if let Some(found) = scaled {
            return Ok(found);
        }
    }

    let fmt_name = format_name(format);
    let decode_err = |e: image::ImageError| match e {
        image::ImageError::Limits(l) => VisionError::Decode {
            path: owned.clone(),
            format: fmt_name.clone(),
            message: format!(
                "exceeds the decoding limits ({} px a side, {} bytes decoded): {l}",
                limits.max_side, limits.max_decoded_bytes
            ),
        },
        other => VisionError::Decode {
            path: owned.clone(),
            format: fmt_name.clone(),
            message: tidy_decoder_message(&other.to_string()),
        },
    };

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<RgbImage> {
        // Full-size decode.
        let mut decoder = reader.into_decoder().map_err(decode_err)?;
        let (width, height) = decoder.dimensions();
        if width == 0 || height == 0 {
            // The WebP decoder reports 0×0 when it cannot use a header it has read (e.g. one
            // that claims 16384² with no data behind it): say what the header claims.
            if let Some((w, h)) = webp_header_size(data).filter(|&(w, h)| w > 0 && h > 0) {
                if w > limits.max_side || h > limits.max_side {
                    return Err(VisionError::TooLarge {
                        path: owned.clone(),
                        width: w,
                        height: h,
                        max_side: limits.max_side,
                    });
                }
                return Err(VisionError::Decode {
                    path: owned.clone(),
                    format: fmt_name.clone(),
                    message: format!(
                        "the header claims {w}×{h} pixels but the image data is missing or corrupt"
                    ),
                });
            }
            return Err(VisionError::ZeroSized {
                path: owned.clone(),
                width,
                height,
            });
        }
        if width > limits.max_side || height > limits.max_side {
            return Err(VisionError::TooLarge {
                path: owned.clone(),
                width,
                height,
                max_side: limits.max_side,
            });
        }
        let bytes = decoder.total_bytes();
        // The RGB output buffer is allocated on top of the decoded one.
        let rgb_bytes = u64::from(width) * u64::from(height) * 3;
        if bytes > limits.max_decoded_bytes || rgb_bytes > limits.max_decoded_bytes {
            return Err(VisionError::TooManyBytes {
                path: owned.clone(),
                bytes: bytes.max(rgb_bytes),
                max_bytes: limits.max_decoded_bytes,
            });
        }
        let orientation = decoder
            .orientation()
            .unwrap_or(image::metadata::Orientation::NoTransforms);
        let mut img = DynamicImage::from_decoder(decoder).map_err(decode_err)?;
        img.apply_orientation(orientation);
        Ok(to_rgb8(img))
    }));
    match result {
        Ok(r) => r.map(|img| {
            let size = img.dimensions();
            (img, size)
        }),
        Err(_) => Err(VisionError::Decode {
            path: owned.clone(),
            format: format_name(format),
            message: "the decoder panicked on malformed data".into(),
        }),
    }
}

/// Decoder messages without Rust debug text: the png crate prints chunk types as
/// `ChunkType { type: IDAT, critical: true, … }`; that becomes `IDAT chunk`.
pub fn tidy_decoder_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find("ChunkType {") {
        out.push_str(&rest[..i]);
        let after = &rest[i..];
        let Some(end) = after.find('}') else {
            out.push_str(after);
            return out;
        };
        let name = after["ChunkType {".len()..end]
            .split(',')
            .next()
            .and_then(|f| f.trim().strip_prefix("type:"))
            .map(str::trim)
            .unwrap_or("PNG");
        out.push_str(&format!("{name} chunk"));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The canvas size a WebP file's header claims (VP8, VP8L or VP8X), read without decoding.
pub fn webp_header_size(data: &[u8]) -> Option<(u32, u32)> {
    if data.len() < 30 || &data[0..4] != b"RIFF" || &data[8..12] != b"WEBP" {
        return None;
    }
    let le16 = |i: usize| u32::from(data[i]) | u32::from(data[i + 1]) << 8;
    let le24 = |i: usize| le16(i) | u32::from(data[i + 2]) << 16;
    match &data[12..16] {
        // Lossy: frame tag (3 bytes), start code 9d 01 2a, 14-bit width and height.
        b"VP8 " if data[23..26] == [0x9d, 0x01, 0x2a] => {
            Some((le16(26) & 0x3fff, le16(28) & 0x3fff))
        }
        // Lossless: signature 0x2f, then (width − 1) and (height − 1) in 14 bits each.
        b"VP8L" if data[20] == 0x2f => {
            let bits = le16(21) | le16(23) << 16;
            Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
        }
        // Extended: 4 bytes of flags, then (width − 1) and (height − 1) in 24 bits each.
        b"VP8X" => Some((le24(24) + 1, le24(27) + 1)),
        _ => None,
    }
}

fn format_name(format: ImageFormat) -> String {
    format!("{format:?}").to_uppercase()
}

/// Converts any decoded image to 8-bit RGB; alpha is composited on white.
pub fn to_rgb8(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other if other.color().has_alpha() => composite_on_white(&other.to_rgba8()),
        other => other.to_rgb8(),
    }
}

fn composite_on_white(rgba: &image::RgbaImage) -> RgbImage {
    let (w, h) = rgba.dimensions();
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    for px in rgba.as_raw().chunks_exact(4) {
        let a = u32::from(px[3]);
        for &c in &px[..3] {
            let v = (u32::from(c) * a + 255 * (255 - a) + 127) / 255;
            out.push(v as u8);
        }
    }
    RgbImage::from_raw(w, h, out).expect("buffer sized from the image")
}
