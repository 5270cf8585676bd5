//! `afm-vl quantize` end to end: a quantized directory is written and loads; a malformed
//! packed checkpoint fails with a one-line error naming the file and the tensor; bad flags
//! are user errors; `inspect --kv-bits 8` reports the halved KV bytes.

use std::path::Path;
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

fn tiny_model_dir(dir: &Path) {
    let cfg = afm_text::presets::preset("tiny-dense").unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), cfg.to_json_pretty()).unwrap();
    let tensors: Vec<(String, tch::Tensor)> = afm_text::decoder::weight_shapes(&cfg)
        .into_iter()
        .map(|(n, s)| {
            (
                n,
                tch::Tensor::randn(s.as_slice(), (tch::Kind::Float, tch::Device::Cpu)) * 0.05,
            )
        })
        .collect();
    afm_text::checkpoint::write_safetensors(&dir.join("model.safetensors"), &tensors, None)
        .unwrap();
}

#[test]
fn quantize_writes_a_loadable_directory_and_bad_files_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("full");
    tiny_model_dir(&src);
    let out = tmp.path().join("q4");
    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
    let r = afm(&["quantize", "--bits", "4", "--method", "palette", s, o]);
    assert!(r.status.success(), "{}", stderr(&r));
    let text = String::from_utf8_lossy(&r.stdout).to_string();
    assert!(text.contains("bits per quantized weight"), "{text}");
    let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(cfg.contains("afm-vl-packed-v1"), "{cfg}");
    let m = afm_text::TextModel::load(&out, tch::Device::Cpu, afm_text::DType::F32).unwrap();
    assert!(m.decoder.lm_head.is_quantized());

    // Bad flags.
    assert_user_error(&afm(&["quantize", "--bits", "3", s, o]), &["--bits"]);
    assert_user_error(
        &afm(&["quantize", "--bits", "8", "--method", "palette", s, o]),
        &["rtn"],
    );
    // Quantizing a quantized directory.
    let o2 = tmp.path().join("again");
    assert_user_error(
        &afm(&["quantize", o, o2.to_str().unwrap()]),
        &["already quantized"],
    );

    // A table of the wrong shape: the CLI names the file and the tensor.
    let map = afm_text::checkpoint::load_weights(&out, tch::Device::Cpu, tch::Kind::Float).unwrap();
    let bad = "model.layers.2.self_attn.q_proj.weight.qlut";
    let tensors: Vec<(String, tch::Tensor)> = map
        .names()
        .map(|n| {
            let t = map.raw(n).unwrap().shallow_clone();
            let t = if n == bad { t.narrow(0, 0, 1) } else { t };
            (n.clone(), t)
        })
        .collect();
    afm_text::checkpoint::write_safetensors(&out.join("model.safetensors"), &tensors, None)
        .unwrap();
    let g = afm(&["generate", "--model", o, "--raw", "hi"]);
    assert_user_error(&g, &["model.safetensors", bad, "bad LUT shape"]);
}

#[test]
fn inspect_reports_8_bit_kv_bytes() {
    let o = afm(&["inspect", "--preset", "tiny-dense", "--kv-bits", "8"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.contains("with --kv-bits 8"), "{text}");
    // Clap rejects other widths (usage error, exit 2).
    let bad = afm(&["generate", "--kv-bits", "4", "hi"]);
    assert!(!bad.status.success() && stderr(&bad).contains("--kv-bits"));
}

#[test]
fn quantize_to_gguf_blocks_loads_and_decodes_on_the_fused_step() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("full");
    tiny_model_dir(&src);
    let full = afm_text::TextModel::load(&src, tch::Device::Cpu, afm_text::DType::F32).unwrap();
    // `--bits 4` without a method is Q4_1 blocks (the default 4-bit format).
    for (method, bits, flag) in [
        ("q4_1", "4", None),
        ("q4_1", "4", Some("q4_1")),
        ("q4_0", "4", Some("q4_0")),
        ("q8_0", "8", Some("q8_0")),
    ] {
        let out = tmp.path().join(flag.unwrap_or("default"));
        let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
        let mut cmd = vec!["quantize", "--bits", bits, s, o];
        if let Some(m) = flag {
            cmd.extend(["--method", m]);
        }
        let r = afm(&cmd);
        assert!(r.status.success(), "{}", stderr(&r));
        let cfg = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert!(cfg.contains("ggml-blocks"), "{cfg}");
        let m = afm_text::TextModel::load(&out, tch::Device::Cpu, afm_text::DType::F32).unwrap();
        let afm_text::linear::LinearWeight::Ggml(g) = m.decoder.layers[0].mlp.up.weight() else {
            panic!("{method}: up_proj is not stored as blocks");
        };
        assert_eq!(g.ty().name().to_ascii_lowercase(), method);
        // The blocks stand for the full model's weights within the format's step.
        let afm_text::linear::LinearWeight::Dense(w) = full.decoder.layers[0].mlp.up.weight()
        else {
            unreachable!()
        };
        let d = g.dequantize(tch::Kind::Float).unwrap();
        let rel = f64::try_from((d - w).square().sum(tch::Kind::Double)).unwrap()
            / f64::try_from(w.square().sum(tch::Kind::Double)).unwrap();
        assert!(
            rel < if bits == "8" { 1e-4 } else { 2e-2 },
            "{method}: rel. error {rel}"
        );
        let mut cache = m.decoder.new_cache(1);
        let _ = m
            .decoder
            .forward(
                &afm_text::generation::ids_tensor(&[1, 2, 3]).unwrap(),
                None,
                &mut cache,
                afm_text::Logits::Last,
            )
            .unwrap();
        assert!(m.decoder.fused_decode_applies(&cache), "{method}");
        // A block model is read dequantised (exactly) and quantized again, to 8 bits here.
        let o2 = tmp
            .path()
            .join(format!("{}-again", flag.unwrap_or("default")));
        let r = afm(&["quantize", "--bits", "8", o, o2.to_str().unwrap()]);
        assert!(r.status.success(), "{}", stderr(&r));
        afm_text::TextModel::load(&o2, tch::Device::Cpu, afm_text::DType::F32).unwrap();
    }
    // Our packed codes are refused as a source (re-quantizing them would round twice).
    let pal = tmp.path().join("pal");
    let r = afm(&[
        "quantize",
        "--bits",
        "4",
        "--method",
        "palette",
        src.to_str().unwrap(),
        pal.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", stderr(&r));
    assert_user_error(
        &afm(&[
            "quantize",
            pal.to_str().unwrap(),
            tmp.path().join("pal2").to_str().unwrap(),
        ]),
        &["already quantized"],
    );
    let (s, o) = (src.to_str().unwrap(), tmp.path().join("bad"));
    assert_user_error(
        &afm(&[
            "quantize",
            "--bits",
            "8",
            "--method",
            "q4_1",
            s,
            o.to_str().unwrap(),
        ]),
        &["--bits 4"],
    );
}
