//! Reduced-size JPEG decoding ("draft" mode, as PIL's `Image.draft`): when the tiler only needs
//! a fraction of a JPEG's pixels, decode with a 1/4 or 1/8 inverse DCT (`jpeg-decoder`),
//! which low-pass filters and subsamples in one step and skips most of the decoding work. The
//! chosen scale always keeps the decoded image at least as large as the resize target, so the
//! bicubic resize that follows still only shrinks.

use image::{DynamicImage, RgbImage};

use crate::error::{Result, VisionError};
use crate::image_io::LoadLimits;

/// The smallest decoded size a caller needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SizeHint {
    /// Decode at full size.
    #[default]
    Full,
    /// The longer side must stay ≥ this (fit-and-pad resizing).
    LongSide(u32),
    /// The shorter side must stay ≥ this (stretching to a square).
    ShortSide(u32),
}

/// Reductions below this denominator are not worth a second decoder.
pub const MIN_DRAFT_SCALE: u32 = 4;

/// The largest DCT scale denominator (8, 4, 2; 1 = no gain) that keeps the hint satisfied.
pub fn draft_scale(width: u32, height: u32, hint: SizeHint) -> u32 {
    let (side, need) = match hint {
        SizeHint::Full => return 1,
        SizeHint::LongSide(s) => (width.max(height), s),
        SizeHint::ShortSide(s) => (width.min(height), s),
    };
    [8, 4, 2]
        .into_iter()
        .find(|d| side.div_ceil(*d) >= need.max(1))
        .unwrap_or(1)
}

/// Decodes `data` at reduced size when that helps, returning the image and the full size it
/// stands for (both after EXIF orientation). `Ok(None)`: no reduction possible or a pixel
/// format this path does not handle (the caller decodes normally).
pub fn decode_scaled(
    data: &[u8],
    path: &std::path::Path,
    limits: &LoadLimits,
    hint: SizeHint,
) -> Result<Option<(RgbImage, (u32, u32))>> {
    let err = |message: String| VisionError::Decode {
        path: path.to_path_buf(),
        format: "JPEG".into(),
        message,
    };
    let mut dec = jpeg_decoder::Decoder::new(data);
    dec.read_info().map_err(|e| err(e.to_string()))?;
    let Some(info) = dec.info() else {
        return Ok(None);
    };
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    if w == 0 || h == 0 {
        return Err(VisionError::ZeroSized {
            path: path.to_path_buf(),
            width: w,
            height: h,
        });
    }
    if w > limits.max_side || h > limits.max_side {
        return Err(VisionError::TooLarge {
            path: path.to_path_buf(),
            width: w,
            height: h,
            max_side: limits.max_side,
        });
    }
    let pixel_ok = matches!(
        info.pixel_format,
        jpeg_decoder::PixelFormat::RGB24 | jpeg_decoder::PixelFormat::L8
    );
    let d = draft_scale(w, h, hint);
    // At 1/2 the full-size SIMD decoder (zune-jpeg, used by `image`) is still faster than
    // jpeg-decoder's reduced IDCT: only 1/4 and 1/8 pay off.
    if d < MIN_DRAFT_SCALE || !pixel_ok {
        return Ok(None);
    }
    let (sw, sh) = dec
        .scale(w.div_ceil(d) as u16, h.div_ceil(d) as u16)
        .map_err(|e| err(e.to_string()))?;
    let (sw, sh) = (u32::from(sw), u32::from(sh));
    let pixels = dec.decode().map_err(|e| err(e.to_string()))?;
    let rgb = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => RgbImage::from_raw(sw, sh, pixels),
        _ => image::GrayImage::from_raw(sw, sh, pixels)
            .map(|g| DynamicImage::ImageLuma8(g).to_rgb8()),
    }
    .ok_or_else(|| err("decoded buffer has the wrong size".into()))?;
    let orientation = dec
        .exif_data()
        .and_then(image::metadata::Orientation::from_exif_chunk)
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::ImageRgb8(rgb);
    img.apply_orientation(orientation);
    let full = if img.width() == sw { (w, h) } else { (h, w) };
    Ok(Some((img.to_rgb8(), full)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_choice() {
        assert_eq!(draft_scale(4032, 3024, SizeHint::LongSide(1344)), 2);
        assert_eq!(draft_scale(4032, 3024, SizeHint::LongSide(672)), 4);
        assert_eq!(draft_scale(4032, 3024, SizeHint::LongSide(224)), 8);
        assert_eq!(draft_scale(1920, 1080, SizeHint::LongSide(1344)), 1);
        assert_eq!(draft_scale(1920, 1080, SizeHint::ShortSide(672)), 1);
        assert_eq!(draft_scale(4032, 3024, SizeHint::ShortSide(672)), 4);
        assert_eq!(draft_scale(100, 100, SizeHint::Full), 1);
    }
}
