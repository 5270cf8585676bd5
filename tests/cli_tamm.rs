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

    for (case, needles) in [
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
}
