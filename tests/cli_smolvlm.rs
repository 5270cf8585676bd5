//! SmolVLM checkpoints against HF transformers (fusion/tests/reference/smolvlm_ref.py builds
//! random-weight `SmolVLMForConditionalGeneration`s in HF's layout and runs them): the processor's
//! pixel values, the expanded prompt's token ids, the image features, the logits of the whole
//! prompt and greedy continuations, at SmolVLM-256M's geometry and at a second one (another
//! patch, tile and scale factor, non-square crop grids, an untied head); `describe --model`
//! on such a directory; bad checkpoints and images.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use afm_fusion::SmolVlm;
use afm_text::generation::GenerateOptions;
use afm_text::DType;
use tch::{Device, Kind, Tensor};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_afm-vl"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

const PROMPT: &str = "Describe this image.";

fn python(args: &[&std::ffi::OsStr]) {
    let o = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("fusion/tests/reference/smolvlm_ref.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The test images: the sample photo (as the PNG of our JPEG decode, so both sides start from
/// the same pixels; JPEG decoders differ by a few levels) and the portrait poster.
fn images() -> &'static [PathBuf] {
    static IMAGES: OnceLock<Vec<PathBuf>> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("smolvlm_images");
        std::fs::create_dir_all(&dir).unwrap();
        let photo = dir.join("landscape.png");
        afm_vision::load_image(
            &repo().join("assets/images/landscape.jpg"),
            &Default::default(),
        )
        .unwrap()
        .save(&photo)
        .unwrap();
        vec![photo, repo().join("assets/images/poster.png")]
    })
}

/// A model of `geometry` built and run by transformers once per test binary: its directory and
/// the reference outputs for the first `n_images` images. `GEOMETRY-bf16` saves the weights in
/// bf16 (transformers runs them in fp32).
fn reference(geometry: &'static str, n_images: usize) -> PathBuf {
    static DIRS: OnceLock<std::sync::Mutex<std::collections::HashMap<&'static str, PathBuf>>> =
        OnceLock::new();
    let dirs = DIRS.get_or_init(Default::default);
    let mut map = dirs.lock().unwrap_or_else(|p| p.into_inner());
    map.entry(geometry)
        .or_insert_with(|| {
            let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join("smolvlm")
                .join(geometry);
            let _ = std::fs::remove_dir_all(&dir);
            let mut build: Vec<&std::ffi::OsStr> = vec!["build".as_ref(), dir.as_os_str()];
            match geometry.split_once('-') {
                Some((g, dtype)) => build.extend([g, dtype].map(std::ffi::OsStr::new)),
                None => build.push(geometry.as_ref()),
            }
            python(&build);
            let out = ref_dir(&dir);
            let mut args: Vec<&std::ffi::OsStr> = vec![
                "run".as_ref(),
                dir.as_os_str(),
                out.as_os_str(),
                PROMPT.as_ref(),
            ];
            args.extend(images()[..n_images].iter().map(|p| p.as_os_str()));
            python(&args);
            dir
        })
        .clone()
}

fn ref_dir(model: &Path) -> PathBuf {
    model.join("reference")
}

/// transformers' tensors for image `k` of the model at `dir` (pixel values, ids, features,
/// logits, greedy tokens).
fn ref_tensors(dir: &Path, k: usize) -> std::collections::HashMap<String, Tensor> {
    Tensor::read_safetensors(ref_dir(dir).join(format!("ref_{k}.safetensors")))
        .unwrap()
        .into_iter()
        .collect()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

fn ids_of(t: &Tensor) -> Vec<u32> {
    Vec::<i64>::try_from(t)
        .unwrap()
        .into_iter()
        .map(|i| i as u32)
        .collect()
}

/// Every stage of our SmolVLM equals transformers' on `n` images of `geometry`.
fn parity(geometry: &'static str, n: usize) {
    let dir = reference(geometry, n);
    let model = SmolVlm::load(&dir, Device::Cpu, DType::F32).unwrap();
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ref_dir(&dir).join("ref.json")).unwrap())
            .unwrap();
    let mut last_logits = Vec::new();
    for (k, img_path) in images()[..n].iter().enumerate() {
        let r = ref_tensors(&dir, k);
        let img = model.process_path(img_path).unwrap();
        assert_eq!(
            (img.rows as u64, img.cols as u64),
            (
                refs[k]["rows"].as_u64().unwrap(),
                refs[k]["cols"].as_u64().unwrap()
            )
        );
        let pixels = max_abs(&img.to_tensor().unwrap(), &r["pixel_values"]);
        let ids = model.prompt_ids(Some(PROMPT), &img).unwrap();
        assert_eq!(
            ids,
            ids_of(&r["input_ids"]),
            "{geometry} image {k}: prompt ids"
        );
        let features = max_abs(&model.encode(&img).unwrap(), &r["image_features"]);
        let logits = max_abs(
            &model.prompt_logits(Some(PROMPT), &img).unwrap(),
            &r["logits"],
        );
        let opts = GenerateOptions {
            max_new_tokens: 24,
            ..Default::default()
        };
        let d = model
            .describe_processed(&img, Some(PROMPT), &opts, &mut |_| {})
            .unwrap();
        let greedy = ids_of(&r["greedy"]);
        eprintln!(
            "{geometry} image {k} ({}x{} crops, {} prompt tokens): pixels max |Δ| {pixels:e}, \
             features {features:e}, logits {logits:e}, greedy {} tokens {}",
            img.rows,
            img.cols,
            ids.len(),
            greedy.len(),
            if d.generation.tokens == greedy {
                "identical"
            } else {
                "DIFFER"
            }
        );
        assert!(pixels <= 1e-6, "pixels {pixels}");
        assert!(features <= 1e-4, "features {features}");
        assert!(logits <= 1e-4, "logits {logits}");
        assert_eq!(d.generation.tokens, greedy, "{geometry} image {k}: greedy");
        assert_eq!(d.tiles, img.frames);
        last_logits.push(model.prompt_logits(Some(PROMPT), &img).unwrap().get(-1));
    }
    // The test is not vacuous: the image moves the logits.
    if n > 1 {
        let moved = max_abs(&last_logits[0], &last_logits[1]);
        eprintln!("{geometry}: the image moves the last logits by {moved:.3}");
        assert!(moved > 1e-2, "{moved}");
    }
}

#[test]
fn smolvlm_256m_geometry_matches_transformers() {
    parity("256m", 1);
}

#[test]
fn smolvlm_second_geometry_matches_transformers() {
    parity("alt", 2);
}

/// A checkpoint saved in bf16 (as the public ones are), loaded in fp32: the text model keeps its
/// weights in bf16 (half the bytes per decode step) and still matches transformers' fp32 run.
#[test]
fn bf16_checkpoint_in_fp32_matches_transformers() {
    let dir = reference("alt-bf16", 1);
    let model = SmolVlm::load(&dir, Device::Cpu, DType::F32).unwrap();
    let stored = model
        .text
        .decoder
        .layers
        .iter()
        .flat_map(|l| [&l.attn.q_proj, &l.mlp.gate, &l.mlp.up, &l.mlp.down])
        .chain([&model.text.decoder.lm_head])
        .filter(|l| matches!(l.weight(), afm_text::linear::LinearWeight::Bf16(_)))
        .count();
    assert_eq!(
        stored,
        4 * model.text.decoder.layers.len() + 1,
        "bf16-stored weights"
    );
    drop(model);
    parity("alt-bf16", 1);
}

/// Loaded in bf16, the encoder runs in bf16 where the CPU has native bf16 arithmetic (else fp32)
/// and its image features follow transformers' fp32 ones to bf16 precision. Where the CPU has
/// AVX512-BF16 the encoder's own attention and GELU kernels run, and they are as close to fp32
/// as libtorch's bf16 ops (run on the same weights beside them).
#[test]
fn bf16_encoder_follows_fp32_features() {
    let dir = reference("alt", 2);
    let mut model = SmolVlm::load(&dir, Device::Cpu, DType::BF16).unwrap();
    let want = if afm_text::model::cpu_has_bf16() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let kernels = want == Kind::BFloat16 && afm_vision::cpu_bf16::available();
    for (k, img_path) in images()[..2].iter().enumerate() {
        let r = ref_tensors(&dir, k);
        let img = model.process_path(img_path).unwrap();
        let errors = |f: &Tensor| {
            let err = max_abs(f, &r["image_features"]);
            // Mean error, not only the worst element: a wrong operation moves all of them.
            let mean = (f.to_kind(Kind::Double) - r["image_features"].to_kind(Kind::Double))
                .abs()
                .mean(Kind::Double)
                .double_value(&[]);
            (err, mean)
        };
        model.encoder.set_bf16_kernels(true);
        let f = model.encode(&img).unwrap();
        assert_eq!(f.kind(), want, "image {k}: encoder dtype");
        let scale = r["image_features"].abs().max().double_value(&[]);
        let (err, mean) = errors(&f);
        let mean_ref = r["image_features"]
            .abs()
            .mean(Kind::Double)
            .double_value(&[]);
        eprintln!(
            "bf16 encoder, image {k}: features max |Δ| {err:.4} (max |f| {scale:.3}), mean |Δ| \
             {mean:.5} (mean |f| {mean_ref:.4}), own kernels {kernels}"
        );
        if want == Kind::Float {
            assert!(err <= 1e-4, "{err}");
            continue;
        }
        assert!(err <= 0.03 * scale, "{err} vs max |f| {scale}");
        assert!(mean <= 0.015 * mean_ref, "{mean} vs mean |f| {mean_ref}");
        if kernels {
            model.encoder.set_bf16_kernels(false);
            let (err_torch, mean_torch) = errors(&model.encode(&img).unwrap());
            model.encoder.set_bf16_kernels(true);
            eprintln!("  libtorch's bf16 ops: max |Δ| {err_torch:.4}, mean |Δ| {mean_torch:.5}");
            assert!(
                mean <= 1.1 * mean_torch && err <= 1.5 * err_torch,
                "image {k}: own kernels max |Δ| {err}, mean {mean}; libtorch's {err_torch}, \
                 {mean_torch}"
            );
        }
    }
}

/// `describe --model` on a SmolVLM directory: a folder of images with `--prompt`, `--json` and
/// `--stats` gives transformers' greedy text for every image; a glob pattern the same.
#[test]
fn describe_cli_on_a_smolvlm_directory() {
    let dir = reference("alt", 2);
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ref_dir(&dir).join("ref.json")).unwrap())
            .unwrap();
    let folder = tempfile::tempdir().unwrap();
    for (k, p) in images().iter().enumerate() {
        std::fs::copy(p, folder.path().join(format!("{k}.png"))).unwrap();
    }
    let o = Command::new(bin())
        .args(["describe", "--model"])
        .arg(&dir)
        // fp32 as the reference (`auto` runs the encoder in bf16 on CPUs with native bf16).
        .args([
            "--dtype",
            "fp32",
            "--prompt",
            PROMPT,
            "--json",
            "--stats",
            "--max-tokens",
            "24",
        ])
        .arg(folder.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (k, line) in lines.iter().enumerate() {
        let want = refs[k]["greedy_text"].as_str().unwrap().trim();
        assert_eq!(line["description"], want, "{line}");
        let grid = format!("{}x{}+global", refs[k]["rows"], refs[k]["cols"]);
        assert_eq!(line["mode"], grid.as_str());
        assert_eq!(line["tiles"], refs[k]["n_tiles"]);
        assert_eq!(
            line["visual_tokens"].as_u64(),
            Some(refs[k]["n_tiles"].as_u64().unwrap() * 81)
        );
        assert_eq!(line["generated_tokens"], 24);
        assert!(line["stats"]["encode_s"].as_f64().unwrap() > 0.0);
    }
    // A glob pattern, plain text output.
    let pattern = folder.path().join("1.*");
    let o = Command::new(bin())
        .args(["describe", "--model"])
        .arg(&dir)
        .args([
            "--dtype",
            "fp32",
            "--prompt",
            PROMPT,
            "--max-tokens",
            "24",
            "-q",
        ])
        .arg(&pattern)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let want = refs[1]["greedy_text"].as_str().unwrap().trim();
    assert!(text.trim_end().ends_with(want), "{text}");
    assert_eq!(text.lines().count(), 1);
}

/// A change to a JSON file.
type Edit = dyn Fn(&mut serde_json::Value);

/// A copy of the `alt` model made of links to its files.
fn linked_copy() -> tempfile::TempDir {
    let src = reference("alt", 2);
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::os::unix::fs::symlink(&p, dir.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    dir
}

/// A copy of the `alt` model whose `file` is replaced by `edit` of it (the other files are
/// links to the original).
fn broken_copy(file: &str, edit: &Edit) -> tempfile::TempDir {
    let dir = linked_copy();
    let path = dir.path().join(file);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, v.to_string()).unwrap();
    dir
}

fn describe_err(dir: &Path, image: &Path) -> String {
    let o = Command::new(bin())
        .args(["describe", "-q", "--max-tokens", "2", "--model"])
        .arg(dir)
        .arg(image)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Bad checkpoints and images: one line naming the file and the problem, exit 1.
#[test]
fn bad_smolvlm_inputs_are_one_line_errors() {
    let img = &images()[1];
    let cases: Vec<(&str, Box<Edit>, &str)> = vec![
        (
            "config.json",
            Box::new(|v| v["vision_config"]["use_magic"] = true.into()),
            "unknown vision_config field \"use_magic\"",
        ),
        (
            "config.json",
            Box::new(|v| v["perceiver_config"] = serde_json::json!({})),
            "unknown field \"perceiver_config\"",
        ),
        (
            "config.json",
            Box::new(|v| v["scale_factor"] = 4.into()),
            "scale_factor 4 does not divide the 27×27 patch grid",
        ),
        (
            "config.json",
            Box::new(|v| v["vision_config"]["intermediate_size"] = 1000.into()),
            "tensor 'model.vision_model.encoder.layers.0.mlp.fc1.weight' has shape [1536, 384], expected [1000, 384]",
        ),
        (
            "config.json",
            Box::new(|v| v["text_config"]["num_hidden_layers"] = 5.into()),
            "missing tensor 'model.layers.4",
        ),
        (
            "processor_config.json",
            Box::new(|v| v["image_seq_len"] = 64.into()),
            "image_seq_len 64 differs from the 81 tokens a frame gives",
        ),
        (
            "processor_config.json",
            Box::new(|v| v["image_processor"]["resample"] = 2.into()),
            "resample 2 is not supported",
        ),
    ];
    for (file, edit, want) in cases {
        let dir = broken_copy(file, &*edit);
        let err = describe_err(dir.path(), img);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(want), "{want}: {err}");
        assert!(err.contains(file) || err.contains("tensor"), "{err}");
    }
    // An image that splits into more crops than the tokenizer has row/column tokens for.
    let dir = broken_copy("processor_config.json", &|v| {
        v["image_processor"]["size"]["longest_edge"] = 4096.into()
    });
    let o = Command::new(bin())
        .args(["describe", "-q", "--json", "--max-tokens", "2", "--model"])
        .arg(dir.path())
        .arg(img)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("splits into 11×8 crops, but the tokenizer has no <row_11_col_8> token"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // A truncated weights file.
    let dir = linked_copy();
    let src = reference("alt", 2);
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::remove_file(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = describe_err(dir.path(), img);
    assert!(
        err.contains("model.safetensors") && err.contains("truncated or corrupt"),
        "{err}"
    );
    // A corrupt image among good ones: its error line (and JSON error object), the good one
    // is still described, exit 1.
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let o = Command::new(bin())
        .args(["describe", "-q", "--json", "--max-tokens", "2", "--model"])
        .arg(&src)
        .arg(&junk)
        .arg(img)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("junk.png") && !err.contains("panicked"),
        "{err}"
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0]["error"].as_str().unwrap().contains("junk.png"));
    assert_eq!(lines[1]["generated_tokens"], 2);
}

/// `quantize` on a SmolVLM directory packs the text model's projections and embedding (GGUF
/// q8_0 blocks, read by the block kernels) and leaves the vision encoder and connector dense:
/// the image features stay transformers' exactly, the logits move by the weights' rounding.
#[test]
fn quantized_text_model_of_a_smolvlm() {
    let dir = reference("alt", 2);
    let out = tempfile::tempdir().unwrap();
    let q = out.path().join("q8");
    let o = Command::new(bin())
        .args(["quantize", "--bits", "8", "--method", "q8_0"])
        .arg(&dir)
        .arg(&q)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let model = SmolVlm::load(&q, Device::Cpu, DType::F32).unwrap();
    assert!(model.text.decoder.lm_head.is_quantized());
    let r: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(ref_dir(&dir).join("ref_0.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let img = model.process_path(&images()[0]).unwrap();
    assert_eq!(
        max_abs(&model.encode(&img).unwrap(), &r["image_features"]),
        0.0
    );
    let logits = model.prompt_logits(Some(PROMPT), &img).unwrap();
    let scale = r["logits"].abs().max().double_value(&[]);
    let d = max_abs(&logits, &r["logits"]);
    let agree = logits
        .argmax(-1, false)
        .eq_tensor(&r["logits"].argmax(-1, false))
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    eprintln!("q8_0 text model: logits max |Δ| {d:.4} (logits up to {scale:.1}), argmax agreement {agree:.3}");
    assert!(d <= 0.05 * scale, "{d} vs {scale}");
    assert!(agree >= 0.95, "{agree}");
    let opts = GenerateOptions {
        max_new_tokens: 8,
        ..Default::default()
    };
    let d = model
        .describe_processed(&img, Some(PROMPT), &opts, &mut |_| {})
        .unwrap();
    assert_eq!(d.generation.tokens.len(), 8);
}
