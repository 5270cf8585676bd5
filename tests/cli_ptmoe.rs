//! End-to-end CLI behaviour of the server decoder (PT-MoE): `inspect` reports sync points per
//! forward = track blocks (vs 2 per layer for tensor parallelism) and local-layer KV flat at
//! 1×, 4×, 16× the window; `bench text --preset` runs tracks concurrent vs sequential; bad
//! track devices and non-PT-MoE presets are one-line user errors.

use std::process::{Command, Output};

fn afm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_afm-vl"))
        .args(args)
        .env_remove("AFM_VL_MODEL")
        .output()
        .expect("run afm-vl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn inspect_reports_sync_points_and_flat_local_kv() {
    let o = afm(&["inspect", "--preset", "afm-server-ptmoe"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    // tamm's AFMParallelTrackMoEConfig() defaults.
    for row in [
        "sync points per forward: 12 (one per track block) vs 96 for tensor parallelism",
        "| **total** | **147.80B** (147803703296) |",
        "| **active per token** | **15.83B** (15834122240) |",
        "window 4097 keys: tamm's local_attention_window_size 4096 + the current token",
        "| 4097 (1× window) | 2.25 GiB | 2.25 GiB | 768.2 MiB |",
        "| 16388 (4× window) | 2.25 GiB | 2.25 GiB | 3.00 GiB |",
        "| 65552 (16× window) | 2.25 GiB | 2.25 GiB | 12.00 GiB |",
    ] {
        assert!(out.contains(row), "missing {row:?} in\n{out}");
    }
    let o = afm(&["inspect", "--preset", "tiny-ptmoe", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["report"]["sync_points_per_forward"], 2);
    assert_eq!(v["config"]["model_type"], "afm_ptmoe");
}

#[test]
fn bench_compares_concurrent_and_sequential_tracks() {
    let o = afm(&[
        "--threads",
        "2",
        "bench",
        "text",
        "--preset",
        "tiny-ptmoe",
        "--tokens",
        "4",
        "--prompt",
        "16",
        "--repeats",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("| concurrent (one thread per track) |"),
        "{out}"
    );
    assert!(out.contains("concurrent / sequential: prefill"), "{out}");
}

#[test]
fn bad_track_devices_and_presets_are_user_errors() {
    for (args, needle) in [
        (
            vec![
                "bench",
                "text",
                "--preset",
                "tiny-ptmoe",
                "--track-devices",
                "gpu7",
            ],
            "bad track device 'gpu7'",
        ),
        (
            vec!["bench", "text", "--preset", "tiny-dense"],
            "takes a PT-MoE preset",
        ),
    ] {
        let o = afm(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{err}");
    }
}

/// A tamm PT-MoE folder (tamm's JSON + a `.pt` state dict in tamm's layout, written by our
/// `.pt` writer with random values) for `config`.
fn tamm_folder(dir: &std::path::Path, config: &serde_json::Value) {
    use afm_text::tamm_ptmoe::TammPtMoe;
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let t = TammPtMoe::from_json(config).unwrap();
    let _g = afm_text::weights::seed_global_rng(3);
    let tensors: Vec<(String, tch::Tensor)> = t
        .tensor_shapes()
        .into_iter()
        .map(|(n, s)| (n, tch::Tensor::randn(s.as_slice(), tch::kind::FLOAT_CPU)))
        .collect();
    // The head tied to the embedding, as tamm saves it.
    let emb = tensors[0].1.shallow_clone();
    let tensors: Vec<(String, tch::Tensor)> = tensors
        .into_iter()
        .map(|(n, x)| {
            let x = if n == "output_transform.weight" {
                emb.shallow_clone()
            } else {
                x
            };
            (n, x)
        })
        .collect();
    afm_text::pt_write::write_state_dict(&dir.join("model.pt"), &tensors).unwrap();
}

#[test]
fn tamm_folders_inspect_bench_convert_and_bad_ones_fail_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = serde_json::json!({
        "__tamm_type__": "module_configs:AFMParallelTrackMoEConfig",
        "vocab_size": 50, "num_tracks": 2, "num_layers_per_track": 4,
        "num_layers_per_track_per_sync_point": 2, "hidden_dim": 16, "attention_hidden_dim": 16,
        "dense_feed_forward_hidden_dim": 24, "sparse_feed_forward_hidden_dim": 8,
        "num_heads": 2, "num_experts": 4, "local_attention_window_size": 3,
        "post_norm": "rms_norm", "tracks_combine_norm": "pre_scale_rms_norm"
    });
    let good = tmp.path().join("good");
    tamm_folder(&good, &cfg);
    let o = afm(&["inspect", "--model", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("2 track blocks × 2 tracks × 2 layers"),
        "{}",
        stdout(&o)
    );
    let o = afm(&[
        "--threads",
        "2",
        "bench",
        "text",
        "--model",
        good.to_str().unwrap(),
        "--tokens",
        "2",
        "--prompt",
        "4",
        "--repeats",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("concurrent / sequential: prefill"),
        "{}",
        stdout(&o)
    );
    let conv = tmp.path().join("conv");
    let o = afm(&[
        "convert",
        "tamm",
        good.to_str().unwrap(),
        conv.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(conv.join("config.json")).unwrap()).unwrap();
    assert_eq!(c["model_type"], "afm_ptmoe");
    assert_eq!(c["sliding_window"], 4);
    assert_eq!(c["tracks_combine_norm"], "pre_scale_rms_norm");

    // Bad folders: a truncated .pt, a tensor of the wrong shape, an unknown type, an unknown
    // attention type in the pattern. Each is one line naming the file, exit 1, nothing written.
    let cut = tmp.path().join("cut");
    tamm_folder(&cut, &cfg);
    let pt = std::fs::read(cut.join("model.pt")).unwrap();
    std::fs::write(cut.join("model.pt"), &pt[..pt.len() / 2]).unwrap();
    let shape = tmp.path().join("shape");
    let mut wide = cfg.clone();
    wide["dense_feed_forward_hidden_dim"] = 32.into();
    tamm_folder(&shape, &wide);
    std::fs::write(shape.join("config.json"), cfg.to_string()).unwrap();
    let ty = tmp.path().join("type");
    tamm_folder(&ty, &cfg);
    let mut v = cfg.clone();
    v["__tamm_type__"] = "module_configs:AFMParallelTrackMoEConfigV9".into();
    std::fs::write(ty.join("config.json"), v.to_string()).unwrap();
    let pat = tmp.path().join("pattern");
    tamm_folder(&pat, &cfg);
    let mut v = cfg.clone();
    v["attention_layer_pattern"] = serde_json::json!(["local_rope", "global_rope"]);
    std::fs::write(pat.join("config.json"), v.to_string()).unwrap();
    for (dir, needle) in [
        (&cut, "model.pt"),
        (&shape, "the config needs [2, 16, 24]"),
        (&ty, "AFMParallelTrackMoEConfigV9"),
        (&pat, "attention type \"global_rope\" not recognized"),
    ] {
        let out = tmp.path().join("out");
        let o = afm(&[
            "convert",
            "tamm",
            dir.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{}: {err}", dir.display());
        assert!(err.contains(needle), "{}: {err}", dir.display());
        assert!(
            !err.contains("panicked") && err.trim().lines().count() == 1,
            "{err}"
        );
        assert!(!out.join("model.safetensors").exists());
    }
}

/// `generate --model` on a tamm PT-MoE folder with tamm's AFM tokenizer (built by tamm in
/// text/tests/reference/tamm_ptmoe.py): the greedy text is tamm's, with and without
/// self-speculative decoding (the first track block drafting), and from the folder
/// `convert tamm` writes (our layout, the tokenizer files copied).
#[test]
fn generate_on_a_tamm_pt_moe_folder_gives_tamms_greedy_text() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let o = Command::new(repo.join(".venv/bin/python"))
        .arg(repo.join("text/tests/reference/tamm_ptmoe.py"))
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = tmp.path().join("cli");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("cli_reference.json")).unwrap()).unwrap();
    let prompt = r["prompt"].as_str().unwrap();
    let want = format!("{}\n", r["text"].as_str().unwrap());
    for extra in [vec![], vec!["--draft", "self:1"]] {
        let mut args = vec![
            "--device",
            "cpu",
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--dtype",
            "fp32",
            "--raw",
            "--max-tokens",
            "12",
        ];
        args.extend(&extra);
        args.push(prompt);
        let o = afm(&args);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        assert_eq!(stdout(&o), want, "{extra:?}");
    }
    let conv = tmp.path().join("converted");
    let o = afm(&[
        "convert",
        "tamm",
        dir.to_str().unwrap(),
        conv.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = afm(&[
        "--device",
        "cpu",
        "generate",
        "--model",
        conv.to_str().unwrap(),
        "--dtype",
        "fp32",
        "--raw",
        "--max-tokens",
        "12",
        prompt,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), want, "converted");
    // A draft directory is refused in one line for a PT-MoE target.
    let o = afm(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--draft",
        dir.to_str().unwrap(),
        "hi",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("self:N"), "{}", stderr(&o));
}
