//! `afm-vl describe` end to end with the demo checkpoint: good images are described, bad ones
//! (corrupt, not an image, missing) get an error line naming them, and the exit code is 1.

use std::path::PathBuf;
use std::process::{Command, Output};

use afm_fusion::caption::parse_caption;
use afm_fusion::scene::{write_scenes, HELDOUT_SEED_BASE};
use afm_fusion::train_demo::demo_scenes;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn afm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_afm-vl"))
        .args(args)
        .env_remove("AFM_VL_VLM")
        .env_remove("AFM_VL_MODEL")
        .output()
        .expect("run afm-vl")
}

fn demo_present() -> bool {
    let ok = repo()
        .join("assets/models/afm-vl-demo/config.json")
        .exists()
        && repo()
            .join("assets/models/smollm2-135m-instruct/model.safetensors")
            .exists();
    assert!(
        ok,
        "demo checkpoint or default text model missing (run `make setup`)"
    );
    ok
}

#[test]
fn folder_with_a_corrupt_file_and_a_missing_file() {
    demo_present();
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    let written = write_scenes(&imgs, 2, HELDOUT_SEED_BASE + 900, &demo_scenes()).unwrap();
    std::fs::remove_file(imgs.join("captions.jsonl")).ok();
    std::fs::write(
        imgs.join("broken.png"),
        b"\x89PNG\r\n\x1a\nnot really a png",
    )
    .unwrap();
    let missing = dir.path().join("missing.jpg");
    let o = afm(&[
        "describe",
        imgs.to_str().unwrap(),
        missing.to_str().unwrap(),
        "--json",
        "--max-tokens",
        "40",
    ]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "stdout {out}\nstderr {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("broken.png"), "{err}");
    assert!(
        err.contains("missing.jpg") && err.contains("no such file"),
        "{err}"
    );
    // The two good scenes are described (one JSON object each, with shapes in them).
    let described: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("description").is_some())
        .collect();
    assert_eq!(described.len(), 2, "{out}");
    for (v, (path, _truth)) in described.iter().zip(&written) {
        assert_eq!(v["image"].as_str().unwrap(), path.to_str().unwrap());
        let text = v["description"].as_str().unwrap();
        assert!(!parse_caption(text).pairs.is_empty(), "{text}");
        // auto mode: 256 px > the 128 px tile → high-res, 5 tiles of 11 tokens (3×3 pooled, the
        // register, the count token).
        assert_eq!(v["mode"], "high-res");
        assert_eq!(v["visual_tokens"], 55);
    }
}

#[test]
fn describe_with_a_missing_adapter_names_it() {
    demo_present();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-adapter");
    let img = repo().join("assets/images");
    let o = afm(&[
        "describe",
        "--adapter",
        missing.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no-such-adapter") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn not_an_image_is_a_clear_error() {
    demo_present();
    let dir = tempfile::tempdir().unwrap();
    let txt = dir.path().join("notes.txt");
    std::fs::write(&txt, "hello").unwrap();
    let o = afm(&["describe", txt.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("notes.txt") && err.contains("not a recognised image"),
        "{err}"
    );
}

#[test]
fn modes_and_stats() {
    demo_present();
    let dir = tempfile::tempdir().unwrap();
    let written = write_scenes(dir.path(), 1, HELDOUT_SEED_BASE + 901, &demo_scenes()).unwrap();
    let img = written[0].0.to_str().unwrap().to_string();
    for (mode, tokens) in [("rapid", 11), ("balanced", 11), ("high-res", 55)] {
        let o = afm(&[
            "describe",
            &img,
            "--mode",
            mode,
            "--json",
            "--stats",
            "--max-tokens",
            "40",
        ]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim()).unwrap();
        assert_eq!(v["mode"], mode);
        assert_eq!(v["visual_tokens"], tokens);
        for k in ["tile_s", "encode_s", "prefill_s", "decode_s"] {
            assert!(v["stats"][k].as_f64().unwrap() >= 0.0, "{v}");
        }
    }
    // A glob pattern (quoted, so no shell expands it) finds the file.
    let pattern = format!("{}/*.png", dir.path().display());
    let o = afm(&["describe", &pattern, "--max-tokens", "40"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("scene-000.png: "));
}
