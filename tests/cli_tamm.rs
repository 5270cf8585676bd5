//! A tamm model folder (the adapter toolkit's `assets/` layout) through the CLI: it loads as
//! `--model DIR`, and broken ones (a truncated `.pt`, a pickle holding a non-tensor, a global
//! that would run code, an unknown opcode, an unknown `__tamm_type__`, a missing tensor, a wrong
//! shape, no weights) are one-line errors naming the file and problem, exit 1; no pickle code is
//! ever run. Folders are written by tamm itself (text/tests/reference/tamm_cases.py).

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn tamm_folders_load_and_bad_ones_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let marker = tmp.path().join("PWNED");
    let root = tmp.path().join("cases");
    let py = repo().join(".venv/bin/python");
    let o = Command::new(&py)
        .arg(repo().join("text/tests/reference/tamm_cases.py"))
        .arg("bad")
        .arg(&root)
        .arg(&marker)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let run = |case: &str| {
        Command::new(env!("CARGO_BIN_EXE_afm-vl"))
            .args(["generate", "--raw", "--max-tokens", "2", "--model"])
            .arg(root.join(case))
            .arg("hi")
            .output()
            .unwrap()
    };
    // The good folder loads (it has no tokenizer yet, so generate stops there).
    let o = Command::new(env!("CARGO_BIN_EXE_afm-vl"))
        .args(["inspect", "--model"])
        .arg(root.join("good"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("afm_two_segment")
            && text.contains("2 segment-0")
            && text.contains("after RoPE"),
        "{text}"
    );

    // A tokenizer.model that is not SentencePiece, beside good weights.
    let bt = root.join("bad-tokenizer");
    std::fs::create_dir_all(&bt).unwrap();
    for f in ["base-model-config.json", "base-model.pt"] {
        std::fs::copy(root.join("good").join(f), bt.join(f)).unwrap();
    }
    std::fs::write(
        bt.join("tokenizer.model"),
        "this is not a sentencepiece model\n",
    )
    .unwrap();

    for (case, needles) in [
        (
            "bad-tokenizer",
            vec!["tokenizer.model", "not a SentencePiece model"],
        ),
        (
            "truncated",
            vec!["base-model.pt", "truncated, or not a torch.save checkpoint"],
        ),
        (
            "non-tensor",
            vec!["base-model.pt", "'note' is not a tensor"],
        ),
        (
            "evil-global",
            vec!["base-model.pt", "refusing the pickle global", "system"],
        ),
        ("bad-opcode", vec!["base-model.pt", "opcode 0xff"]),
        (
            "unknown-type",
            vec!["base-model-config.json", "AFMVisionV9Config"],
        ),
        (
            "missing-tensor",
            vec![
                "base-model.pt",
                "missing tensor 'layers.segment_1.layer_0.attention.q_transform.weight'",
            ],
        ),
        (
            "wrong-shape",
            vec![
                "base-model.pt",
                "layers.segment_0.layer_1.feed_forward.output_transform.weight",
                "[32, 7]",
            ],
        ),
        ("no-weights", vec!["base-model.pt"]),
    ] {
        let o = run(case);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{case}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{case}: {err}");
        for n in needles {
            assert!(err.contains(n), "{case}: stderr lacks {n:?}: {err}");
        }
    }
    assert!(!marker.exists(), "a pickle ran code");
}

/// `afm-vl generate --model DIR` on a tamm folder with its tokenizer: the text equals tamm's
/// greedy continuation decoded by tamm's AFMTokenizer.
#[test]
fn generate_on_a_tamm_folder_equals_tamm() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("text/tests/reference/tamm_afm.py"))
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("cli_reference.json")).unwrap(),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_afm-vl"))
        .args([
            "-q",
            "--device",
            "cpu",
            "generate",
            "--raw",
            "--dtype",
            "fp32",
            "--max-tokens",
            "32",
            "--model",
        ])
        .arg(tmp.path())
        .arg(r["prompt"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(
        text.strip_suffix('\n').unwrap(),
        r["text"].as_str().unwrap()
    );
    assert!(!r["ids"].as_array().unwrap().is_empty());
    // Speculative decoding with the folder's draft-model-* gives the same text.
    let o = Command::new(env!("CARGO_BIN_EXE_afm-vl"))
        .args([
            "-q", "--device", "cpu", "generate", "--raw", "--dtype", "fp32",
        ])
        .args(["--max-tokens", "32", "--model"])
        .arg(tmp.path())
        .arg("--draft")
        .arg(tmp.path())
        .arg(r["prompt"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let spec = String::from_utf8(o.stdout).unwrap();
    assert_eq!(
        spec.strip_suffix('\n').unwrap(),
        r["text"].as_str().unwrap()
    );
    // `convert tamm`: our layout, same model, same tokenizer: the same text.
    for dtype in ["fp32", "bf16"] {
        let conv = tmp.path().join(format!("converted-{dtype}"));
        let o = Command::new(env!("CARGO_BIN_EXE_afm-vl"))
            .args(["-q", "convert", "tamm"])
            .arg(tmp.path())
            .arg(&conv)
            .args(["--dtype", dtype])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.model",
            "tokenizer-config.json",
        ] {
            assert!(conv.join(f).is_file(), "{f} missing");
        }
        let o = Command::new(env!("CARGO_BIN_EXE_afm-vl"))
            .args([
                "-q", "--device", "cpu", "generate", "--raw", "--dtype", dtype,
            ])
            .args(["--max-tokens", "32", "--model"])
            .arg(&conv)
            .arg(r["prompt"].as_str().unwrap())
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8(o.stdout).unwrap();
        if dtype == "fp32" {
            assert_eq!(
                text.strip_suffix('\n').unwrap(),
                r["text"].as_str().unwrap()
            );
        } else {
            // bf16 on the original folder and on its bf16 conversion: one model.
            let o = Command::new(env!("CARGO_BIN_EXE_afm-vl"))
                .args([
                    "-q", "--device", "cpu", "generate", "--raw", "--dtype", "bf16",
                ])
                .args(["--max-tokens", "32", "--model"])
                .arg(tmp.path())
                .arg(r["prompt"].as_str().unwrap())
                .output()
                .unwrap();
            assert_eq!(String::from_utf8(o.stdout).unwrap(), text);
        }
    }
    // Into the tamm folder itself: refused, nothing written.
    let o = Command::new(env!("CARGO_BIN_EXE_afm-vl"))
        .args(["-q", "convert", "tamm"])
        .arg(tmp.path())
        .arg(tmp.path().join("."))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!tmp.path().join("config.json").exists());
}

fn max_abs_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Our fp32 logits `[T, vocab]` for one prompt (a full forward).
fn our_logits(m: &afm_text::TextModel, ids: &tch::Tensor) -> tch::Tensor {
    let _g = tch::no_grad_guard();
    let mut c = m.decoder.new_cache(1);
    m.decoder
        .forward(&ids.view([1, -1]), None, &mut c, afm_text::Logits::All)
        .unwrap()
        .squeeze_dim(0)
}

/// Issue 19, acceptance 5: tamm LoRA adapters both ways. A toolkit-style folder (the adapter
/// spec rank 32, α 16 on every target tamm adapts in the base config; the base checkpoint with
/// its adapter still zero, base weights under `.wrapped.`) loads and gives tamm's base logits;
/// the toolkit's adapter checkpoint (`.pt` of adapter tensors) as an overlay, merged, and
/// saved inside the base checkpoint gives tamm's adapted logits; and an adapter trained here by
/// `afm-vl train lora` is written in the toolkit's format, which tamm loads with
/// `strict=False` to reproduce our logits.
#[test]
fn tamm_lora_adapters_both_ways() {
    use afm_text::{DType, TextModel};
    use tch::{Device, Tensor};
    const TOL: f64 = 1e-4;
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let py = repo().join(".venv/bin/python");
    let reference = repo().join("text/tests/reference");
    let o = Command::new(&py)
        .arg(reference.join("tamm_afm.py"))
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new(&py)
        .arg(reference.join("tamm_adapter.py"))
        .arg("make")
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = tmp.path().join("adapted");
    let r: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let ids: Vec<Tensor> = (0..3)
        .map(|i| r[&format!("ids_{i}")].shallow_clone())
        .collect();

    // The base folder: its zero adapter is not applied (it changes nothing) — tamm's base.
    let mut m = TextModel::load(&dir, Device::Cpu, DType::F32).unwrap();
    for (i, x) in ids.iter().enumerate() {
        let d = max_abs_diff(&our_logits(&m, x), &r[&format!("base_{i}")]);
        eprintln!("adapter folder, base: prompt {i} max |Δ| {d:.2e}");
        assert!(d <= TOL, "base prompt {i}: {d}");
    }
    // The toolkit's adapter checkpoint as an overlay.
    let adapter = m.load_adapter(&dir.join("adapter.pt")).unwrap();
    let t = m.tamm.clone().unwrap();
    let n0 = t.num_layers - t.num_kv_reuse_layers;
    assert_eq!(
        (adapter.rank, adapter.scale, adapter.modules().count()),
        (32, 0.5, 7 * n0 + 5 * t.num_kv_reuse_layers)
    );
    adapter.activate(&mut m.decoder).unwrap();
    for (i, x) in ids.iter().enumerate() {
        let want = &r[&format!("adapted_{i}")];
        let d = max_abs_diff(&our_logits(&m, x), want);
        let effect = max_abs_diff(want, &r[&format!("base_{i}")]);
        eprintln!("tamm adapter overlay: prompt {i} max |Δ| {d:.2e} (the adapter moves logits by {effect:.2e})");
        assert!(d <= TOL, "adapted prompt {i}: {d}");
        assert!(effect > 0.1, "the adapter has no effect");
    }
    // Merged into the base weights: the same.
    afm_text::lora::merge_active(&mut m.decoder).unwrap();
    for (i, x) in ids.iter().enumerate() {
        let d = max_abs_diff(&our_logits(&m, x), &r[&format!("adapted_{i}")]);
        eprintln!("tamm adapter merged: prompt {i} max |Δ| {d:.2e}");
        assert!(d <= TOL, "merged prompt {i}: {d}");
    }
    // A base checkpoint saved with its (trained) adapter inside runs with it, as in tamm.
    let e = TextModel::load(&tmp.path().join("embedded"), Device::Cpu, DType::F32).unwrap();
    for (i, x) in ids.iter().enumerate() {
        let d = max_abs_diff(&our_logits(&e, x), &r[&format!("adapted_{i}")]);
        eprintln!("adapter inside the base checkpoint: prompt {i} max |Δ| {d:.2e}");
        assert!(d <= TOL, "embedded prompt {i}: {d}");
    }

    // Through the CLI: generate and chat with the toolkit adapter give the same reply, and it
    // is not the base model's.
    let reply = |cmd: &str, adapter: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_afm-vl"));
        c.args(["-q", "--device", "cpu", cmd, "--max-tokens", "8", "--model"])
            .arg(&dir);
        if adapter {
            c.arg("--adapter").arg(dir.join("adapter.pt"));
        }
        if cmd == "generate" {
            c.arg("hello");
        }
        c.stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = c.spawn().unwrap();
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().unwrap();
            if cmd == "chat" {
                stdin.write_all(b"hello\n").unwrap();
            }
        }
        let o = child.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    let adapted = reply("generate", true);
    assert_eq!(reply("chat", true), adapted);
    assert_ne!(reply("generate", false), adapted);

    // Broken adapter checkpoints: one-line errors naming the file and the problem.
    {
        let pt = afm_text::pt::PtFile::open(&dir.join("adapter.pt")).unwrap();
        let tensors: Vec<(String, Tensor)> = pt
            .tensors
            .iter()
            .map(|(n, r)| (n.clone(), pt.tensor(r).unwrap()))
            .collect();
        let bad_dir = tmp.path().join("bad-adapters");
        std::fs::create_dir_all(&bad_dir).unwrap();
        let write = |name: &str, t: Vec<(String, Tensor)>| {
            let p = bad_dir.join(name);
            afm_text::pt_write::write_state_dict(&p, &t).unwrap();
            p
        };
        let renamed = tensors
            .iter()
            .map(|(n, t)| (n.replace("base_adapter", "other"), t.shallow_clone()))
            .collect();
        let mut reshaped: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        reshaped[0].1 = reshaped[0].1.narrow(0, 0, 3).contiguous();
        let mut with_base: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        with_base.push((
            "embedding.weight".into(),
            Tensor::zeros([2, 2], (tch::Kind::Float, Device::Cpu)),
        ));
        let truncated = bad_dir.join("truncated.pt");
        let bytes = std::fs::read(dir.join("adapter.pt")).unwrap();
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let cases = [
            (
                write("unknown-id.pt", renamed),
                "'other' has no LoRAModelAdapter spec",
            ),
            (write("wrong-shape.pt", reshaped), "has shape [3, 32]"),
            (
                write("base-tensor.pt", with_base),
                "'embedding.weight' is not an adapter tensor",
            ),
            (truncated.clone(), "not a readable zip archive"),
        ];
        for (path, want) in cases {
            let o = Command::new(env!("CARGO_BIN_EXE_afm-vl"))
                .args([
                    "-q",
                    "--device",
                    "cpu",
                    "generate",
                    "--raw",
                    "--max-tokens",
                    "2",
                ])
                .arg("--model")
                .arg(&dir)
                .arg("--adapter")
                .arg(&path)
                .arg("x")
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(1), "{}: {err}", path.display());
            assert_eq!(err.trim().lines().count(), 1, "{err}");
            assert!(
                err.contains(want) && err.contains(path.file_name().unwrap().to_str().unwrap()),
                "{err}"
            );
        }
    }

    // `eval --chat` on a tamm model: the prompt frame is tokenized as tamm's AFM chat
    // preprocessor does (leading EOS, no dummy prefix), not as plain text.
    {
        use afm_eval::backend::EvalBackend;
        let b = afm_eval::text_backend::TextBackend::new(
            TextModel::load(&dir, Device::Cpu, DType::F32).unwrap(),
            "tamm".into(),
        );
        let user = "Question: 2 + 2 = ?\nAnswer:";
        let tok = m.tokenizer().unwrap();
        let want = tok
            .encode_chat(&[afm_text::ChatMessage::new("user", user)], true)
            .unwrap();
        assert_eq!(b.encode(&b.chat_wrap(user).unwrap()).unwrap(), want);
        assert_ne!(tok.encode(&b.chat_wrap(user).unwrap()).unwrap(), want);
    }

    // Converted to our layout, the embedded adapter is merged: still tamm's adapted logits.
    let conv = tmp.path().join("embedded-converted");
    let o = Command::new(env!("CARGO_BIN_EXE_afm-vl"))
        .args(["-q", "convert", "tamm"])
        .arg(tmp.path().join("embedded"))
        .arg(&conv)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = TextModel::load(&conv, Device::Cpu, DType::F32).unwrap();
    for (i, x) in ids.iter().enumerate() {
        let d = max_abs_diff(&our_logits(&c, x), &r[&format!("adapted_{i}")]);
        eprintln!("converted, adapter merged: prompt {i} max |Δ| {d:.2e}");
        assert!(d <= TOL, "converted prompt {i}: {d}");
    }

    // The other way: train here, save in the toolkit format, tamm reloads it.
    let data = tmp.path().join("train.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\": \"Once upon a time\", \"response\": \"there was a small model.\"}\n\
         {\"prompt\": \"The quick brown fox\", \"response\": \"jumps over the lazy dog.\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("trained");
    let o = Command::new(env!("CARGO_BIN_EXE_afm-vl"))
        .args(["-q", "--device", "cpu", "train", "lora", "--model"])
        .arg(&dir)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args([
            "--steps",
            "4",
            "--batch-size",
            "2",
            "--lr",
            "0.01",
            "--max-len",
            "160",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut ours = TextModel::load(&dir, Device::Cpu, DType::F32).unwrap();
    let trained = ours.load_adapter(&out.join("adapter.pt")).unwrap();
    assert_eq!((trained.rank, trained.scale), (32, 0.5));
    // The toolkit file and our PEFT file beside it hold the same adapter.
    let peft = ours.load_adapter(&out).unwrap();
    trained.activate(&mut ours.decoder).unwrap();
    let from_pt: Vec<Tensor> = ids.iter().map(|x| our_logits(&ours, x)).collect();
    peft.activate(&mut ours.decoder).unwrap();
    let check = tmp.path().join("tamm_check.safetensors");
    let o = Command::new(&py)
        .arg(reference.join("tamm_adapter.py"))
        .arg("check")
        .arg(&dir)
        .arg(out.join("adapter.pt"))
        .arg(&check)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let theirs: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&check)
        .unwrap()
        .into_iter()
        .collect();
    for (i, x) in ids.iter().enumerate() {
        let peft_logits = our_logits(&ours, x);
        assert!(max_abs_diff(&peft_logits, &from_pt[i]) <= 1e-5);
        let want = &theirs[&format!("logits_{i}")];
        let d = max_abs_diff(&peft_logits, want);
        let effect = max_abs_diff(want, &r[&format!("base_{i}")]);
        eprintln!("trained here, loaded by tamm: prompt {i} max |Δ| {d:.2e} (training moved logits by {effect:.2e})");
        assert!(d <= TOL, "round trip prompt {i}: {d}");
        assert!(effect > 1e-3, "training changed nothing");
    }
}
