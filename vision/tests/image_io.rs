//! Image loading: formats, colour conversions, EXIF orientation, and bad input (acceptance 5).

use std::io::Cursor;
use std::path::{Path, PathBuf};

use afm_vision::{load_image, LoadLimits, VisionError};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A content-rich RGB image (gradients and stripes).
fn pattern(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        let stripe = if (x / 7 + y / 5) % 2 == 0 { 60 } else { 0 };
        Rgb([
            ((x * 255) / w.max(1)) as u8,
            ((y * 255) / h.max(1)) as u8,
            (((x + y) * 3) % 196) as u8 + stripe,
        ])
    })
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, format).expect("encode");
    buf.into_inner()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write");
    p
}

fn limits() -> LoadLimits {
    LoadLimits::default()
}

#[test]
fn loads_every_format_as_rgb8() {
    let dir = tempfile::tempdir().unwrap();
    let rgb = DynamicImage::ImageRgb8(pattern(40, 30));
    for (fmt, name) in [
        (ImageFormat::Png, "a.png"),
        (ImageFormat::Jpeg, "a.jpg"),
        (ImageFormat::WebP, "a.webp"),
        (ImageFormat::Gif, "a.gif"),
        (ImageFormat::Bmp, "a.bmp"),
        (ImageFormat::Tiff, "a.tiff"),
    ] {
        let img = if fmt == ImageFormat::Gif {
            DynamicImage::ImageRgba8(rgb.to_rgba8())
        } else {
            rgb.clone()
        };
        let p = write(dir.path(), name, &encode(&img, fmt));
        let out = load_image(&p, &limits()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(out.dimensions(), (40, 30), "{name}");
        if matches!(fmt, ImageFormat::Png | ImageFormat::Bmp | ImageFormat::Tiff) {
            assert_eq!(out.as_raw(), rgb.to_rgb8().as_raw(), "{name} is lossless");
        }
    }
}

#[test]
fn grey_alpha_and_16_bit_become_rgb8() {
    let dir = tempfile::tempdir().unwrap();
    // Grey.
    let grey = DynamicImage::ImageLuma8(image::GrayImage::from_fn(8, 4, |x, _| {
        image::Luma([(x * 30) as u8])
    }));
    let out = load_image(
        &write(dir.path(), "g.png", &encode(&grey, ImageFormat::Png)),
        &limits(),
    )
    .unwrap();
    assert_eq!(out.get_pixel(3, 1), &Rgb([90, 90, 90]));
    // Grey + alpha: fully transparent becomes white.
    let ga = DynamicImage::ImageLumaA8(image::GrayAlphaImage::from_fn(8, 4, |x, _| {
        image::LumaA([0, if x < 4 { 0 } else { 255 }])
    }));
    let out = load_image(
        &write(dir.path(), "ga.png", &encode(&ga, ImageFormat::Png)),
        &limits(),
    )
    .unwrap();
    assert_eq!(out.get_pixel(0, 0), &Rgb([255, 255, 255]));
    assert_eq!(out.get_pixel(7, 0), &Rgb([0, 0, 0]));
    // RGBA, half transparent red on white: (255, 128, 128).
    let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
        4,
        4,
        image::Rgba([255, 0, 0, 128]),
    ));
    let out = load_image(
        &write(dir.path(), "rgba.png", &encode(&rgba, ImageFormat::Png)),
        &limits(),
    )
    .unwrap();
    let p = out.get_pixel(1, 1);
    assert_eq!(p[0], 255);
    assert!((126..=128).contains(&p[1]) && p[1] == p[2], "{p:?}");
    // 16-bit RGB.
    let rgb16 = DynamicImage::ImageRgb16(image::ImageBuffer::from_pixel(
        4,
        4,
        Rgb([65535u16, 32896, 0]),
    ));
    let out = load_image(
        &write(dir.path(), "rgb16.png", &encode(&rgb16, ImageFormat::Png)),
        &limits(),
    )
    .unwrap();
    assert_eq!(out.get_pixel(0, 0), &Rgb([255, 128, 0]));
}

#[test]
fn cmyk_jpeg_and_tiff_become_rgb() {
    for name in ["cmyk.jpg", "cmyk.tif"] {
        // Made by PIL: CMYK (255, 0, 0, 0), i.e. cyan.
        let out = load_image(&fixture(name), &limits()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.dimensions(), (24, 12), "{name}");
        let p = out.get_pixel(5, 5);
        assert!(p[0] < 40 && p[1] > 215 && p[2] > 215, "{name}: {p:?}");
    }
}

#[test]
fn exif_orientation_is_applied() {
    // 32×16 stored, left half red / right half blue, EXIF orientation 6 (rotate 90° clockwise).
    let out = load_image(&fixture("exif_orient6.jpg"), &limits()).unwrap();
    assert_eq!(out.dimensions(), (16, 32));
    let top = out.get_pixel(8, 2);
    let bottom = out.get_pixel(8, 29);
    assert!(top[0] > 200 && top[2] < 60, "top should be red: {top:?}");
    assert!(
        bottom[2] > 200 && bottom[0] < 60,
        "bottom should be blue: {bottom:?}"
    );
}

#[test]
fn first_gif_frame() {
    use image::codecs::gif::GifEncoder;
    use image::{Delay, Frame, RgbaImage};
    let mut buf = Vec::new();
    {
        let mut enc = GifEncoder::new(&mut buf);
        let red = RgbaImage::from_pixel(6, 6, image::Rgba([255, 0, 0, 255]));
        let green = RgbaImage::from_pixel(6, 6, image::Rgba([0, 255, 0, 255]));
        for f in [red, green] {
            enc.encode_frame(Frame::from_parts(
                f,
                0,
                0,
                Delay::from_numer_denom_ms(10, 1),
            ))
            .unwrap();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let out = load_image(&write(dir.path(), "anim.gif", &buf), &limits()).unwrap();
    let p = out.get_pixel(2, 2);
    assert!(p[0] > 200 && p[1] < 50, "{p:?}");
}

// ---- bad input (acceptance 5): a clear error naming the file, no panic, bounded memory ----

fn err_of(path: &Path) -> (VisionError, String) {
    let e = load_image(path, &limits()).expect_err("must fail");
    let msg = e.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "error names the file: {msg}"
    );
    (e, msg)
}

#[test]
fn zero_byte_file() {
    let dir = tempfile::tempdir().unwrap();
    let (e, msg) = err_of(&write(dir.path(), "empty.jpg", b""));
    assert!(matches!(e, VisionError::EmptyFile { .. }), "{msg}");
    assert!(msg.contains("empty"), "{msg}");
}

#[test]
fn truncated_jpeg() {
    let dir = tempfile::tempdir().unwrap();
    let full = encode(
        &DynamicImage::ImageRgb8(pattern(256, 192)),
        ImageFormat::Jpeg,
    );
    for cut in [full.len() / 2, 200, 20] {
        let (e, msg) = err_of(&write(dir.path(), "cut.jpg", &full[..cut]));
        assert!(matches!(e, VisionError::Decode { .. }), "{msg}");
        assert!(msg.contains("JPEG"), "{msg}");
    }
}

#[test]
fn text_renamed_jpg() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "notes.jpg",
        b"Shopping list:\n- milk\n- eggs\nThis is not a JPEG at all.\n",
    );
    let (e, msg) = err_of(&p);
    assert!(matches!(e, VisionError::UnknownFormat { .. }), "{msg}");
    assert!(msg.contains("not a recognised image"), "{msg}");
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    out.extend_from_slice(&body);
    out.extend_from_slice(&crc32(&body).to_be_bytes());
}

/// A well-formed PNG header claiming `w × h` RGB8, followed by a tiny IDAT and IEND.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    png_chunk(&mut out, b"IEND", &[]);
    out
}

#[test]
fn png_header_claiming_100000_px() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "huge.png", &png_claiming(100_000, 100_000));
    let t = std::time::Instant::now();
    let (e, msg) = err_of(&p);
    // Rejected from the header: no 30 GB allocation, no time spent decoding.
    assert!(t.elapsed().as_secs_f32() < 1.0);
    assert!(
        matches!(e, VisionError::TooLarge { .. } | VisionError::Decode { .. }),
        "{msg}"
    );
    assert!(msg.contains("limit"), "{msg}");
}

#[test]
fn configurable_limits() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "a.png",
        &encode(
            &DynamicImage::ImageRgb8(pattern(300, 200)),
            ImageFormat::Png,
        ),
    );
    let small_side = LoadLimits {
        max_side: 256,
        ..LoadLimits::default()
    };
    let e = load_image(&p, &small_side).unwrap_err();
    assert!(
        matches!(e, VisionError::TooLarge { .. } | VisionError::Decode { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("limit"), "{e}");
    let small_bytes = LoadLimits {
        max_decoded_bytes: 100_000,
        ..LoadLimits::default()
    };
    let e = load_image(&p, &small_bytes).unwrap_err();
    assert!(
        matches!(
            e,
            VisionError::TooManyBytes { .. } | VisionError::Decode { .. }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("limit"), "{e}");
    assert!(load_image(&p, &LoadLimits::default()).is_ok());
}

#[test]
fn directory_and_missing_path() {
    let dir = tempfile::tempdir().unwrap();
    let (e, msg) = err_of(dir.path());
    assert!(matches!(e, VisionError::IsDirectory { .. }), "{msg}");
    assert!(msg.contains("directory"), "{msg}");
    let missing = dir.path().join("nope.png");
    let (e, msg) = err_of(&missing);
    assert!(matches!(e, VisionError::NotFound { .. }), "{msg}");
    assert!(msg.contains("no such file"), "{msg}");
}
