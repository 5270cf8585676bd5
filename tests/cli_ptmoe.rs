//! End-to-end CLI behaviour of the server decoder (PT-MoE): `inspect` reports sync points per
//! forward = track blocks (vs 2 per layer for tensor parallelism) and local-layer KV flat at
//! 1×, 4×, 16× the window; `bench text --preset` runs tracks concurrent vs sequential; bad
//! track devices and non-PT-MoE presets are one-line user errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

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

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The models text/tests/reference/tamm_ptmoe.py builds and saves with tamm, once per run of
/// this test binary (the tests share them).
fn tamm_models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli_ptmoe_tamm");
        let _ = std::fs::remove_dir_all(&dir);
        let o = Command::new(repo().join(".venv/bin/python"))
            .arg(repo().join("text/tests/reference/tamm_ptmoe.py"))
            .arg(&dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        dir
    })
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
    let dir = tamm_models().join("cli");
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

/// fp32 logits `[seq, vocab]` of a full forward over the 1-D `ids`.
fn full_logits(m: &afm_text::ptmoe_model::PtMoeModel, ids: &tch::Tensor) -> tch::Tensor {
    use afm_text::generation::CausalLm;
    m.model
        .forward_lm(
            &ids.view([1, -1]),
            None,
            &mut m.model.new_lm_cache(1),
            afm_text::Logits::All,
        )
        .unwrap()
        .squeeze_dim(0)
}

/// `eval --model` on a tamm PT-MoE folder: every item's log-likelihoods (few-shot MMLU with a
/// shared prefix, MMMLU, JSONL multiple choice with multi-token continuations) within 1e-4 of
/// tamm's and the JSONL generations identical, scored by tamm from the exact token ids eval
/// dumps (`tamm_ptmoe.py score`, one full forward per token).
#[test]
fn eval_on_a_tamm_pt_moe_folder_scores_as_tamm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tamm_models().join("cli");
    let data = tmp.path().join("data");
    let fixtures = repo().join("eval/tests/fixtures");
    for (sub, file, text) in [
        (
            "mmlu/dev",
            "astronomy_dev.csv",
            "What is the sun?,A star,A planet,A moon,A comet,A\nHow many moons has Mars?,0,1,2,3,C\n",
        ),
        (
            "mmlu/test",
            "astronomy_test.csv",
            "Which planet is largest?,Earth,Jupiter,Mars,Venus,B\nWhat orbits the Earth?,The Sun,The Moon,Mars,Venus,B\nIs Pluto a planet?,Yes,No,Sometimes,Unknown,B\n",
        ),
    ] {
        std::fs::create_dir_all(data.join(sub)).unwrap();
        std::fs::write(data.join(sub).join(file), text).unwrap();
    }
    for sub in ["mmmlu", "jsonl"] {
        std::fs::create_dir_all(data.join(sub)).unwrap();
        for e in std::fs::read_dir(fixtures.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), data.join(sub).join(e.file_name())).unwrap();
        }
    }
    let folders: Vec<String> = ["mmlu", "mmmlu", "jsonl"]
        .iter()
        .map(|s| data.join(s).display().to_string())
        .collect();
    let (out, req) = (tmp.path().join("out"), tmp.path().join("requests.json"));
    let common = [
        "--device",
        "cpu",
        "eval",
        "--model",
        dir.to_str().unwrap(),
        "--dtype",
        "fp32",
        "--shots",
        "mmlu=2",
        "--max-new-tokens",
        "8",
    ];
    for extra in [
        vec!["--batch-size", "3", "--out", out.to_str().unwrap()],
        vec!["--dump-requests", req.to_str().unwrap()],
    ] {
        let mut args: Vec<&str> = common.to_vec();
        args.extend(extra);
        args.extend(folders.iter().map(String::as_str));
        let o = afm(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let scores = tmp.path().join("tamm.json");
    let o = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("text/tests/reference/tamm_ptmoe.py"))
        .args([
            "score".as_ref(),
            dir.as_os_str(),
            req.as_os_str(),
            scores.as_os_str(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let ours = read(&out.join("results.json"));
    let tamm = read(&scores);
    let ours: std::collections::HashMap<&str, &serde_json::Value> = ours["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["key"].as_str().unwrap(), i))
        .collect();
    let theirs = tamm["items"].as_object().unwrap();
    assert_eq!(ours.len(), theirs.len());
    assert!(ours.len() >= 16);
    let (mut worst, mut generations) = (0f64, 0);
    for (key, t) in theirs {
        let r = ours[key.as_str()];
        if let Some(lls) = t["logliks"].as_array() {
            let mine = r["logliks"].as_array().unwrap();
            assert_eq!(mine.len(), lls.len(), "{key}");
            for (a, b) in mine.iter().zip(lls) {
                worst = worst.max((a.as_f64().unwrap() - b.as_f64().unwrap()).abs());
            }
        } else {
            assert_eq!(r["generation"], t["generation"], "{key}");
            generations += 1;
        }
    }
    eprintln!("{} items, worst log-likelihood |Δ| {worst:.2e}", ours.len());
    assert!(worst <= 1e-4, "{worst}");
    assert!(generations >= 2);
}

/// The adapter toolkit's way of shipping a PT-MoE adapter: the base folder (adapter spec in its
/// config, B = 0) runs as tamm's base, and `--adapter adapter.pt` gives tamm's adapted logits
/// (`lora/reference.safetensors`) and greedy tokens; the same file on a base without the spec,
/// or a corrupt one, is a one-line error.
#[test]
fn toolkit_adapter_file_on_a_tamm_pt_moe_gives_tamms_adapted_logits() {
    use afm_text::ptmoe_model::PtMoeModel;
    use afm_text::DType;
    let models = tamm_models();
    let base = models.join("lora/toolkit");
    let adapter = base.join("adapter.pt");
    let adapted = tch::Tensor::read_safetensors(models.join("lora/reference.safetensors")).unwrap();
    let plain = tch::Tensor::read_safetensors(base.join("reference.safetensors")).unwrap();
    let get = |v: &[(String, tch::Tensor)], k: &str| {
        v.iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t.shallow_clone())
            .unwrap()
    };
    let mut m = PtMoeModel::load(&base, tch::Device::Cpu, DType::F32).unwrap();
    let a = m.load_adapter(&adapter).unwrap();
    for k in 0..3 {
        let ids = get(&adapted, &format!("ids_{k}"));
        let d = (full_logits(&m, &ids) - get(&plain, &format!("base_{k}")))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d <= 1e-4, "base {k}: {d}");
    }
    a.activate(&mut m.model).unwrap();
    for k in 0..3 {
        let ids = get(&adapted, &format!("ids_{k}"));
        let d = (full_logits(&m, &ids) - get(&adapted, &format!("logits_{k}")))
            .abs()
            .max()
            .double_value(&[]);
        assert!(d <= 1e-4, "adapted {k}: {d}");
    }
    // The CLI: `generate --adapter` continues as tamm's adapted model does.
    let ids: Vec<i64> = Vec::try_from(&get(&adapted, "ids_0")).unwrap();
    let gen: Vec<i64> = Vec::try_from(&get(&adapted, "gen_0")).unwrap();
    let mut g = m
        .generate_ids(
            &ids.iter().map(|&i| i as u32).collect::<Vec<_>>(),
            &afm_text::GenerateOptions {
                max_new_tokens: gen.len(),
                stop_on_eos: false,
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(
        g.tokens.drain(..).map(i64::from).collect::<Vec<_>>(),
        gen,
        "adapted greedy tokens"
    );
    // A toolkit adapter on a base whose config has no spec for it, and a truncated file.
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("adapter.pt");
    let bytes = std::fs::read(&adapter).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    for (model, file, needle) in [
        (
            models.join("plain"),
            adapter.clone(),
            "no LoRAModelAdapter spec",
        ),
        (base.clone(), bad.clone(), "adapter.pt"),
    ] {
        let o = afm(&[
            "--device",
            "cpu",
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            file.to_str().unwrap(),
            "--max-tokens",
            "2",
            "--raw",
            "hi",
        ]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

/// The eval backend on PT-MoE: single-token choices for rows of different lengths in one
/// left-padded batch after a shared prefix cache (broadcast to the rows; the window of 3 keys
/// wraps the local layers' rings) equal one full forward per row, with and without prefix reuse.
#[test]
fn eval_backend_batches_pt_moe_rows_as_full_forwards() {
    use afm_eval::backend::{ChoiceRequest, EvalBackend};
    use afm_eval::text_backend::TextBackend;
    use afm_text::generation::CausalLm;
    let dir = tamm_models().join("cli");
    let mut b = TextBackend::<afm_text::ptmoe_model::PtMoeModel>::from_dir(
        &dir,
        tch::Device::Cpu,
        afm_text::DType::F32,
    )
    .unwrap();
    let m = afm_text::ptmoe_model::PtMoeModel::load(&dir, tch::Device::Cpu, afm_text::DType::F32)
        .unwrap();
    let prefix: Vec<u32> = (0..20).map(|i| 40 + 7 * i).collect();
    let bodies: Vec<Vec<u32>> = vec![vec![11, 12, 13], (60..67).collect(), vec![99]];
    let choices = [5u32, 9, 33, 120];
    let reqs: Vec<ChoiceRequest> = bodies
        .iter()
        .map(|body| ChoiceRequest {
            body: body.clone(),
            continuations: choices.iter().map(|&c| vec![c]).collect(),
        })
        .collect();
    for reuse in [true, false] {
        let got = b.choice_loglikelihoods(&prefix, &reqs, reuse).unwrap();
        for (row, body) in got.iter().zip(&bodies) {
            let ids: Vec<i64> = prefix.iter().chain(body).map(|&t| i64::from(t)).collect();
            let n = ids.len() as i64;
            let lp = m
                .model
                .forward_lm(
                    &tch::Tensor::from_slice(&ids).view([1, n]),
                    None,
                    &mut m.model.new_lm_cache(1),
                    afm_text::Logits::Last,
                )
                .unwrap()
                .log_softmax(-1, tch::Kind::Float);
            for (ll, &c) in row.iter().zip(&choices) {
                let want = lp.double_value(&[0, 0, i64::from(c)]);
                assert!((ll - want).abs() <= 1e-4, "reuse {reuse}: {ll} vs {want}");
            }
        }
    }
}

/// `train lora --model` on a tamm PT-MoE folder: the loss falls, and the adapter it writes in
/// the toolkit's format (adapter.pt + adapter-config.json, experts left alone as tamm 0.2.0
/// needs) is read by tamm itself (`tamm_ptmoe.py check`: load_state_dict(strict=False), no key
/// unexpected or missing) with tamm's adapted logits = ours from either file ≤ 1e-4.
#[test]
fn train_lora_on_a_tamm_pt_moe_folder_writes_an_adapter_tamm_runs() {
    use afm_text::ptmoe_model::PtMoeModel;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tamm_models().join("cli");
    let data = tmp.path().join("train.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"Once upon\", \"response\": \" a time there was a model.\"}\n\
         {\"prompt\": \"The quick\", \"response\": \" brown fox jumps.\"}\n\
         {\"prompt\": \"Apple models\", \"response\": \" run on device.\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("adapter");
    let o = afm(&[
        "--device",
        "cpu",
        "train",
        "lora",
        "--model",
        dir.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "8",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--lr",
        "1e-2",
        "--batch-size",
        "2",
        "--no-chat",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("trainer_state.json")).unwrap()).unwrap();
    let losses: Vec<f64> = state["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(losses.len(), 8);
    assert!(losses[7] < losses[0] - 0.5, "{losses:?}");
    let reference = tmp.path().join("tamm.safetensors");
    let o = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("text/tests/reference/tamm_ptmoe.py"))
        .args([
            "check".as_ref(),
            dir.as_os_str(),
            out.as_os_str(),
            reference.as_os_str(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let r: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(&reference)
            .unwrap()
            .into_iter()
            .collect();
    let mut m = PtMoeModel::load(&dir, tch::Device::Cpu, afm_text::DType::F32).unwrap();
    let base: Vec<tch::Tensor> = (0..3)
        .map(|k| full_logits(&m, &r[&format!("ids_{k}")]))
        .collect();
    for file in [out.clone(), out.join("adapter.pt")] {
        let a = m.load_adapter(&file).unwrap();
        assert!(a.modules().all(|n| !n.contains(".experts.")));
        a.activate(&mut m.model).unwrap();
        for (k, b) in base.iter().enumerate() {
            let got = full_logits(&m, &r[&format!("ids_{k}")]);
            let want = &r[&format!("logits_{k}")];
            let d = (&got - want).abs().max().double_value(&[]);
            let moved = (&got - b).abs().max().double_value(&[]);
            eprintln!(
                "{}: prompt {k}: |Δ| vs tamm {d:.2e}, adapter moves {moved:.2e}",
                file.display()
            );
            assert!(d <= 1e-4 && moved > 1e-2, "{d} {moved}");
        }
        afm_text::lora::deactivate(&mut m.model).unwrap();
    }
}

/// A PT-MoE text model behind `describe`: a vision-language checkpoint (the demo architecture,
/// random encoder/adapter/image-LoRA weights) whose `text_model` is a tamm PT-MoE folder.
/// `describe --json` prints what the library describes, whose greedy tokens equal a fresh full
/// forward over the spliced embeddings at every step (the visual tokens outnumber the window:
/// the incremental rings wrap), and the image reaches the logits.
#[test]
fn describe_runs_a_pt_moe_text_model_behind_the_encoder() {
    use afm_fusion::VisionLanguageModel;
    use afm_text::generation::CausalLm;
    use afm_text::ptmoe_model::PtMoeModel;
    use afm_text::LanguageModel;
    let tmp = tempfile::tempdir().unwrap();
    let text_dir = tamm_models().join("cli");
    let text = PtMoeModel::load(&text_dir, tch::Device::Cpu, afm_text::DType::F32).unwrap();
    let hidden = text.model.cfg.hidden_size as i64;
    let cfg = afm_fusion::train_demo::demo_config_for(hidden, 1.0, text_dir.to_str().unwrap());
    let vlm_dir = tmp.path().join("vlm");
    VisionLanguageModel::new(cfg, text, 5)
        .unwrap()
        .save(&vlm_dir)
        .unwrap();
    assert!(afm_fusion::model::has_ptmoe_text(&vlm_dir));
    let image = repo().join("assets/images/landscape.jpg");
    let o = afm(&[
        "--device",
        "cpu",
        "describe",
        "--model",
        vlm_dir.to_str().unwrap(),
        "--dtype",
        "fp32",
        "--max-tokens",
        "8",
        "--json",
        image.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();

    let m = VisionLanguageModel::<PtMoeModel>::load_any(
        &vlm_dir,
        tch::Device::Cpu,
        afm_text::DType::F32,
    )
    .unwrap();
    let tiled = m
        .tiler(afm_vision::TileMode::Auto)
        .unwrap()
        .tile_path(&image)
        .unwrap();
    let opts = afm_text::GenerateOptions {
        max_new_tokens: 8,
        stop_on_eos: false,
        ..Default::default()
    };
    let d = m.describe_tiled(&tiled, None, &opts, &mut |_| {}).unwrap();
    assert_eq!(v["description"], d.text.as_str());
    assert_eq!(v["visual_tokens"], d.visual_tokens);
    assert!(d.visual_tokens > 4 * m.text.model.cfg.sliding_window);

    // The reference: no cache reuse, one full forward over the spliced sequence per token.
    let _g = tch::no_grad_guard();
    let layout = m.assemble(None, tiled.num_tiles()).unwrap();
    let ids = afm_text::generation::ids_tensor(&layout.ids).unwrap();
    let visual = m.encode_image(&tiled).unwrap().unsqueeze(0);
    let net = m.text.net();
    let step_logits = |x: &tch::Tensor| {
        net.forward_embeds_lm(x, None, &mut net.new_lm_cache(1), afm_text::Logits::Last)
            .unwrap()
    };
    let mut x = m
        .embed_with_image(&ids, &visual, layout.image_start as i64)
        .unwrap();
    let mut want = Vec::new();
    for _ in 0..8 {
        let next = step_logits(&x).argmax(-1, false).int64_value(&[0, 0]);
        want.push(next as u32);
        let e = net
            .embed_ids(&tch::Tensor::from_slice(&[next]).view([1, 1]))
            .unwrap();
        x = tch::Tensor::cat(&[&x, &e], 1);
    }
    assert_eq!(d.generation.tokens, want);
    // The image reaches the logits: the visual tokens zeroed move them.
    let plain = m
        .embed_with_image(&ids, &visual.zeros_like(), layout.image_start as i64)
        .unwrap();
    let with = m
        .embed_with_image(&ids, &visual, layout.image_start as i64)
        .unwrap();
    let moved = (step_logits(&with) - step_logits(&plain))
        .abs()
        .max()
        .double_value(&[]);
    assert!(moved > 1e-3, "{moved}");
}
