//! Tiler geometry and pixels (acceptance 3).

mod common;

use afm_vision::{AspectMode, TileKind, TileMode, Tiler, TilerConfig};

fn tiler(mode: TileMode) -> Tiler {
    Tiler::new(TilerConfig {
        mode,
        ..TilerConfig::default()
    })
    .unwrap()
}

#[test]
fn tile_counts_and_shapes() {
    // (name, w, h): landscape, portrait, tiny (< 224), huge.
    let cases = [
        ("landscape", 1200, 800),
        ("portrait", 500, 900),
        ("tiny", 100, 60),
        ("small-square", 600, 600),
        ("huge", 6000, 4000),
    ];
    for (name, w, h) in cases {
        let img = common::content_image(w, h, 1);
        let big = w.max(h) > 672;
        for mode in [
            TileMode::Rapid,
            TileMode::Balanced,
            TileMode::HighRes,
            TileMode::Auto,
        ] {
            let t = tiler(mode).tile_image(&img).unwrap();
            let (n, s) = match mode {
                TileMode::Rapid => (1, 224),
                TileMode::Balanced => (1, 672),
                TileMode::HighRes => (5, 672),
                TileMode::Auto if big => (5, 672),
                TileMode::Auto => (1, 672),
            };
            assert_eq!(t.num_tiles(), n, "{name} {mode}");
            assert_eq!(t.tile_size, s, "{name} {mode}");
            assert_eq!(t.pixels.len(), n * 3 * (s * s) as usize);
            assert_eq!(t.source_size, (w, h));
            let tensor = t.to_tensor().unwrap();
            assert_eq!(tensor.size(), vec![n as i64, 3, s as i64, s as i64]);
            if mode == TileMode::Auto {
                let want = if big {
                    TileMode::HighRes
                } else {
                    TileMode::Balanced
                };
                assert_eq!(t.mode, want, "{name}");
            }
            if n == 5 {
                let kinds: Vec<TileKind> = t.tiles.iter().map(|m| m.kind).collect();
                assert_eq!(
                    kinds,
                    vec![
                        TileKind::Crop { row: 0, col: 0 },
                        TileKind::Crop { row: 0, col: 1 },
                        TileKind::Crop { row: 1, col: 0 },
                        TileKind::Crop { row: 1, col: 1 },
                        TileKind::Thumbnail,
                    ]
                );
            }
            // The padded area is exactly the mean (0 after normalisation); content is not.
            let last = t.tiles.last().unwrap();
            let [x0, y0, x1, y1] = last.content_box;
            if w > h {
                assert_eq!((x0, x1), (0, s), "{name} {mode}");
                assert!(y0 > 0 && y1 < s);
            } else if h > w {
                assert_eq!((y0, y1), (0, s));
                assert!(x0 > 0 && x1 < s);
            }
            let plane = (s * s) as usize;
            let base = (n - 1) * 3 * plane;
            assert_eq!(t.pixels[base], if w == h { t.pixels[base] } else { 0.0 });
            let mid = base + ((y0 + y1) / 2 * s + (x0 + x1) / 2) as usize;
            assert!(t.pixels[mid] != 0.0);
        }
    }
}

#[test]
fn stretch_fills_the_square() {
    let img = common::content_image(900, 300, 2);
    let t = Tiler::new(TilerConfig {
        mode: TileMode::Balanced,
        aspect: AspectMode::Stretch,
        ..TilerConfig::default()
    })
    .unwrap()
    .tile_image(&img)
    .unwrap();
    assert_eq!(t.tiles[0].content_box, [0, 0, 672, 672]);
}

#[test]
fn batch_keeps_order_and_reports_errors() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.png");
    let b = dir.path().join("b.png");
    common::content_image(800, 400, 3).save(&a).unwrap();
    common::content_image(300, 200, 4).save(&b).unwrap();
    let missing = dir.path().join("missing.png");
    let paths = vec![a, missing, b];
    let out = tiler(TileMode::Auto).tile_batch(&paths);
    assert_eq!(out.len(), 3);
    assert_eq!(out[0].as_ref().unwrap().num_tiles(), 5);
    assert!(out[1]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("missing.png"));
    assert_eq!(out[2].as_ref().unwrap().num_tiles(), 1);
    let (tensor, tiled) = tiler(TileMode::Auto)
        .tile_batch_tensor(&[&paths[0], &paths[2]])
        .unwrap();
    assert_eq!(tensor.size(), vec![6, 3, 672, 672]);
    assert_eq!(tiled.len(), 2);
}

const PIL_REFERENCE: &str = r#"
import json, sys
import numpy as np
from PIL import Image
from safetensors.numpy import load_file

cases = json.loads(sys.argv[1])
out = {}
for c in cases:
    img = Image.open(c["image"]).convert("RGB")
    mean = np.array(c["mean"], np.float32); std = np.array(c["std"], np.float32)
    stretch = c["stretch"]
    def place(side):
        w, h = img.size
        if stretch:
            nw, nh = side, side
        elif w >= h:
            nw, nh = side, min(side, max(1, (h * side * 2 + w) // (2 * w)))
        else:
            nw, nh = min(side, max(1, (w * side * 2 + h) // (2 * h))), side
        r = img if (nw, nh) == (w, h) else img.resize((nw, nh), Image.BICUBIC)
        r = (np.asarray(r, np.float32) / 255.0 - mean) / std
        canvas = np.zeros((side, side, 3), np.float32)
        ox, oy = (side - nw) // 2, (side - nh) // 2
        canvas[oy:oy + nh, ox:ox + nw] = r
        return canvas.transpose(2, 0, 1)
    w, h = img.size
    mode = c["mode"]
    if mode == "auto":
        mode = "high-res" if max(w, h) > 672 else "balanced"
    if mode == "rapid":
        ref = place(224)[None]
    elif mode == "balanced":
        ref = place(672)[None]
    else:
        big = place(1344)
        crops = [big[:, r * 672:(r + 1) * 672, q * 672:(q + 1) * 672] for r in range(2) for q in range(2)]
        ref = np.stack(crops + [place(672)])
    got = load_file(c["tiles"])["pixel_values"]
    assert got.shape == ref.shape, (c, got.shape, ref.shape)
    d = np.abs(got - ref)
    out[c["tiles"]] = {"mean": float(d.mean()), "max": float(d.max())}
print(json.dumps(out))
"#;

#[test]
fn pixels_match_pil_bicubic_reference() {
    let Some(py) = common::python_with(&["numpy", "PIL", "safetensors"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // PNGs test the resize exactly; the JPEG also covers draft (1/4, 1/8 DCT) decoding against
    // PIL's full decode.
    let sizes = [
        ("landscape", 1000, 640, "png"),
        ("portrait", 360, 820, "png"),
        ("tiny", 150, 90, "png"),
        ("huge", 3000, 2000, "png"),
        ("photo", 4000, 3000, "jpg"),
    ];
    let mut cases = Vec::new();
    for (i, (name, w, h, ext)) in sizes.into_iter().enumerate() {
        let img_path = dir.path().join(format!("{name}.{ext}"));
        if ext == "jpg" {
            let img = afm_vision::synth::synth_image(w, h, i as u64);
            afm_vision::synth::write_jpeg(&img, &img_path, 92).unwrap();
        } else {
            common::content_image(w, h, i as u32)
                .save(&img_path)
                .unwrap();
        }
        for (mode, stretch) in [
            (TileMode::Rapid, false),
            (TileMode::Balanced, false),
            (TileMode::HighRes, false),
            (TileMode::Auto, false),
            (TileMode::Balanced, true),
        ] {
            let config = TilerConfig {
                mode,
                aspect: if stretch {
                    AspectMode::Stretch
                } else {
                    AspectMode::Pad
                },
                ..TilerConfig::default()
            };
            let t = Tiler::new(config.clone())
                .unwrap()
                .tile_path(&img_path)
                .unwrap();
            let out = dir
                .path()
                .join(format!("{name}-{mode}-{stretch}.safetensors"));
            tch::Tensor::write_safetensors(&[("pixel_values", t.to_tensor().unwrap())], &out)
                .unwrap();
            cases.push(serde_json::json!({
                "image": img_path, "tiles": out, "mode": mode.as_str(), "stretch": stretch,
                "mean": config.image_mean, "std": config.image_std,
            }));
        }
    }
    let arg = serde_json::to_string(&cases).unwrap();
    let stdout = common::run_python(&py, PIL_REFERENCE, &[&arg]);
    let res: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let mut worst = 0f64;
    for (k, v) in res.as_object().unwrap() {
        let mean = v["mean"].as_f64().unwrap();
        eprintln!("{k}: mean |Δ| {mean:.5}, max |Δ| {:.4}", v["max"]);
        assert!(mean <= 0.02, "{k}: mean |Δ| {mean} > 0.02");
        worst = worst.max(mean);
    }
    assert_eq!(res.as_object().unwrap().len(), cases.len());
    eprintln!("tiler vs PIL bicubic: worst mean |Δ| = {worst:.5} (normalised units)");
}
