//! Pillow's resampling and HF's SmolVLM image processor (`SmolVLMImageProcessorPil`, which
//! resizes with PIL) as references: `pil_resample` must give Pillow's bytes exactly, and the
//! processor HF's pixel values and crop grid exactly.

mod common;

use afm_vision::idefics3::{Idefics3Processor, Idefics3ProcessorConfig};
use afm_vision::pil_resample::{resize_rgb8, Filter};

const PIL_RESIZE: &str = r#"
import json, sys
import numpy as np
from PIL import Image
cases = json.loads(sys.argv[1])
out = []
for c in cases:
    img = Image.open(c["image"]).convert("RGB")
    f = {"lanczos": Image.LANCZOS, "bicubic": Image.BICUBIC}[c["filter"]]
    r = np.asarray(img.resize((c["w"], c["h"]), f), np.uint8)
    got = np.fromfile(c["got"], np.uint8).reshape(c["h"], c["w"], 3)
    d = np.abs(r.astype(np.int32) - got.astype(np.int32))
    out.append({"max": int(d.max()), "differ": int((d > 0).sum())})
print(json.dumps(out))
"#;

#[test]
fn resampling_is_pillows_to_the_byte() {
    let Some(py) = common::python_with(&["numpy", "PIL"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    // Up, down, one axis only, extreme shrink, odd sizes.
    let jobs = [
        (640, 427, 1024, 684, "lanczos"),
        (1024, 684, 512, 512, "lanczos"),
        (333, 777, 333, 1134, "lanczos"),
        (1500, 90, 1500, 37, "lanczos"),
        (2000, 1500, 61, 45, "lanczos"),
        (17, 9, 512, 512, "lanczos"),
        (640, 427, 300, 200, "bicubic"),
    ];
    for (i, (w, h, nw, nh, f)) in jobs.into_iter().enumerate() {
        let img = common::content_image(w, h, i as u32);
        let src = dir.path().join(format!("{i}.png"));
        img.save(&src).unwrap();
        let filter = if f == "lanczos" {
            Filter::Lanczos
        } else {
            Filter::Bicubic
        };
        let out = resize_rgb8(img.as_raw(), w as usize, h as usize, nw, nh, filter).unwrap();
        let got = dir.path().join(format!("{i}.raw"));
        std::fs::write(&got, &out).unwrap();
        cases.push(serde_json::json!({"image": src, "got": got, "w": nw, "h": nh, "filter": f}));
    }
    let stdout = common::run_python(&py, PIL_RESIZE, &[&serde_json::to_string(&cases).unwrap()]);
    let res: Vec<serde_json::Value> = serde_json::from_str(stdout.trim()).unwrap();
    for (c, r) in cases.iter().zip(&res) {
        eprintln!(
            "{} → {}×{} {}: {r}",
            c["image"], c["w"], c["h"], c["filter"]
        );
        assert_eq!(r["max"], 0, "{c}: {r}");
    }
}

const HF_PROCESSOR: &str = r#"
import json, sys
import numpy as np
from PIL import Image
from safetensors.numpy import load_file
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
cases = json.loads(sys.argv[1])
out = []
for c in cases:
    p = SmolVLMImageProcessorPil(**c["config"])
    img = Image.open(c["decoded"]).convert("RGB")
    # How far our JPEG decode is from PIL's (libjpeg-turbo), in 8-bit levels.
    pil = np.asarray(Image.open(c["image"]).convert("RGB"), np.int32)
    ours = np.asarray(img, np.int32)
    dec = np.abs(pil - ours) if pil.shape == ours.shape else None
    enc = p(images=[img], return_row_col_info=True, return_tensors="np")
    ref = enc["pixel_values"][0]
    got = load_file(c["got"])["pixel_values"]
    same = ref.shape == got.shape
    d = float(np.abs(ref - got).max()) if same else None
    out.append({"shape": list(ref.shape), "got": list(got.shape), "max": d,
                "decode_mean": float(dec.mean()) if dec is not None else None,
                "decode_max": int(dec.max()) if dec is not None else None,
                "rows": int(enc["rows"][0][0]), "cols": int(enc["cols"][0][0])})
print(json.dumps(out))
"#;

#[test]
fn processor_matches_hf_smolvlm_pil_processor() {
    let Some(py) = common::python_with(&["numpy", "PIL", "safetensors", "transformers"]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let configs = [
        serde_json::json!({"size": {"longest_edge": 1024}, "max_image_size": {"longest_edge": 512},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
        serde_json::json!({"size": {"longest_edge": 1134}, "max_image_size": {"longest_edge": 378},
            "image_mean": [0.48, 0.45, 0.40], "image_std": [0.27, 0.26, 0.28]}),
        serde_json::json!({"size": {"longest_edge": 512}, "max_image_size": {"longest_edge": 512},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
        serde_json::json!({"do_image_splitting": false, "max_image_size": {"longest_edge": 384},
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}),
    ];
    let mut images = vec![common::repo_root().join("assets/images/landscape.jpg")];
    for (i, (w, h)) in [(360, 540), (1600, 200), (90, 70)].into_iter().enumerate() {
        let p = dir.path().join(format!("img{i}.png"));
        common::content_image(w, h, i as u32).save(&p).unwrap();
        images.push(p);
    }
    let mut cases = Vec::new();
    let mut grids = Vec::new();
    for (ci, cfg) in configs.iter().enumerate() {
        let proc = Idefics3Processor::new(Idefics3ProcessorConfig::from_json(cfg).unwrap());
        for (ii, img) in images.iter().enumerate() {
            let out = proc.process_path(img).unwrap();
            // The processor is compared on the pixels we decoded (a lossless PNG of them), so
            // a JPEG decoder's rounding is measured apart from it.
            let decoded = dir.path().join(format!("c{ci}-i{ii}-decoded.png"));
            afm_vision::load_image(img, &Default::default())
                .unwrap()
                .save(&decoded)
                .unwrap();
            let got = dir.path().join(format!("c{ci}-i{ii}.safetensors"));
            tch::Tensor::write_safetensors(&[("pixel_values", out.to_tensor().unwrap())], &got)
                .unwrap();
            grids.push((out.rows, out.cols));
            cases.push(
                serde_json::json!({"config": cfg, "image": img, "decoded": decoded, "got": got}),
            );
        }
    }
    let stdout = common::run_python(
        &py,
        HF_PROCESSOR,
        &[&serde_json::to_string(&cases).unwrap()],
    );
    let res: Vec<serde_json::Value> = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(res.len(), cases.len());
    let mut worst = 0f64;
    for ((c, r), (rows, cols)) in cases.iter().zip(&res).zip(&grids) {
        eprintln!("{} {}: {r}", c["image"], c["config"]);
        assert_eq!(r["shape"], r["got"], "{c}");
        assert_eq!(
            (r["rows"].as_u64(), r["cols"].as_u64()),
            (Some(*rows as u64), Some(*cols as u64))
        );
        // JPEG decoders differ by a few levels where chroma is upsampled (PNGs: none).
        assert!(r["decode_mean"].as_f64().unwrap() <= 0.5, "{c}: decode {r}");
        let d = r["max"].as_f64().unwrap();
        worst = worst.max(d);
        assert!(d <= 1e-6, "{c}: max |Δ| {d}");
    }
    eprintln!(
        "SmolVLM processor vs HF: {} cases, worst max |Δ| = {worst:e}",
        res.len()
    );
}
