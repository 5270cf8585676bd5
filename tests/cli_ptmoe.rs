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
    assert!(
        out.contains(
            "sync points per forward: 4 (one per track block) vs 32 for tensor parallelism"
        ),
        "{out}"
    );
    assert!(out.contains("**active per token**"), "{out}");
    for row in [
        "| 4096 (1× window) | 384.0 MiB | 384.0 MiB | 128.0 MiB |",
        "| 16384 (4× window) | 384.0 MiB | 384.0 MiB | 512.0 MiB |",
        "| 65536 (16× window) | 384.0 MiB | 384.0 MiB | 2.00 GiB |",
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
