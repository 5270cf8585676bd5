//! Apple's tamm as the oracle for the server model (issue 21, acceptance 1 and 2, fp32): random
//! `AFMParallelTrackMoE` models built and saved by tamm itself (tests/reference/tamm_ptmoe.py:
//! 2 and 3 tracks, 2 and 3 segments, 4 experts, windows of 3 and 4 under 14-token prompts,
//! random norm weights including the QK-norms, router logits of order 30–100 so the soft cap
//! changes the routing weights, one model with every optional norm, another layer pattern,
//! sum combine and unscaled QK-norm, one saved with a tamm LoRA adapter on every track's
//! attention and dense FFN, one with the experts adapted too, whose reference is tamm with the
//! expert LoRAs merged into the expert weights since tamm 0.2.0 cannot run them) load through `PtMoe::load` and give tamm's logits: full
//! forward, incremental decoding through wrapped rings, a left-padded batch, concurrent tracks
//! = sequential, identical greedy continuations, and `convert tamm` gives the same model in our
//! safetensors layout. The default configuration's state-dict
//! keys and shapes equal tamm's on the meta device.

mod common;

use std::collections::HashMap;
use std::path::Path;

use afm_text::generation::{generate_lm, GenerateOptions};
use afm_text::tamm_ptmoe::TammPtMoe;
use afm_text::{Logits, PtMoe, TrackExec};
use common::*;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;

fn read(dir: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn i64s(t: &Tensor) -> Vec<i64> {
    Vec::try_from(t).unwrap()
}

/// Every position's logits feeding `seq` as `first` tokens, then one at a time.
fn incremental(m: &PtMoe, seq: &[i64], first: usize) -> Tensor {
    let mut c = m.new_cache(1);
    let mut rows = vec![m
        .forward(&ids(&seq[..first]), None, &mut c, Logits::All)
        .unwrap()];
    for &t in &seq[first..] {
        rows.push(m.forward(&ids(&[t]), None, &mut c, Logits::All).unwrap());
    }
    Tensor::cat(&rows, 1).squeeze_dim(0)
}

/// The three prompts left-padded into one batch, then their continuations one column at a
/// time: per row, the logits of its real positions (prompt + continuation).
fn batched(m: &PtMoe, prompts: &[Vec<i64>], gens: &[Vec<i64>]) -> Vec<Tensor> {
    let b = prompts.len() as i64;
    let total = prompts.iter().map(Vec::len).max().unwrap();
    let (mut flat, mut mask) = (Vec::new(), Vec::new());
    for p in prompts {
        flat.extend(std::iter::repeat_n(0i64, total - p.len()));
        flat.extend(p);
        mask.extend(std::iter::repeat_n(0i64, total - p.len()));
        mask.extend(std::iter::repeat_n(1i64, p.len()));
    }
    let mut c = m.new_cache(b);
    let pre = m
        .forward(
            &Tensor::from_slice(&flat).view([b, total as i64]),
            Some(&Tensor::from_slice(&mask).view([b, total as i64])),
            &mut c,
            Logits::All,
        )
        .unwrap();
    let mut steps = Vec::new();
    for j in 0..gens[0].len() {
        let col: Vec<i64> = gens.iter().map(|g| g[j]).collect();
        steps.push(
            m.forward(
                &Tensor::from_slice(&col).view([b, 1]),
                None,
                &mut c,
                Logits::All,
            )
            .unwrap(),
        );
    }
    let dec = Tensor::cat(&steps, 1);
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let n = p.len() as i64;
            Tensor::cat(
                &[
                    pre.get(i as i64).narrow(0, total as i64 - n, n),
                    dec.get(i as i64),
                ],
                0,
            )
        })
        .collect()
}

fn check_case(name: &str, dir: &Path) {
    let _g = tch::no_grad_guard();
    let r = read(dir);
    let mut m = PtMoe::load(dir, Device::Cpu, Kind::Float, &[]).unwrap();
    let (mut prompts, mut gens) = (Vec::new(), Vec::new());
    for k in 0..3 {
        let p = i64s(&r[&format!("ids_{k}")]);
        let gen = i64s(&r[&format!("gen_{k}")]);
        let want = &r[&format!("logits_{k}")];
        let full_want = &r[&format!("full_{k}")];
        let scale = full_want.abs().max().double_value(&[]);

        let mut c = m.new_cache(1);
        let full = m
            .forward(&ids(&p), None, &mut c, Logits::All)
            .unwrap()
            .squeeze_dim(0);
        let d = max_abs_diff(&full, want);
        eprintln!("{name} prompt {k}: full forward max |Δ| {d:.2e} (logits up to {scale:.1})");
        assert!(d <= TOL, "{name} prompt {k}: full forward max |Δ| {d}");

        // Prompt + continuation through the cache: the rings (window 4–5) wrap several times.
        let mut seq = p.clone();
        seq.extend(&gen);
        let inc = incremental(&m, &seq, p.len().min(5));
        let d = max_abs_diff(&inc, full_want);
        eprintln!(
            "{name} prompt {k}: incremental ({} tokens) max |Δ| {d:.2e}",
            seq.len()
        );
        assert!(d <= TOL, "{name} prompt {k}: incremental max |Δ| {d}");

        let opts = GenerateOptions {
            max_new_tokens: gen.len(),
            stop_on_eos: false,
            ..GenerateOptions::default()
        };
        let pu: Vec<u32> = p.iter().map(|&x| x as u32).collect();
        let out = generate_lm(&m, None, &pu, &opts, &mut |_| {}).unwrap();
        let ours: Vec<i64> = out.tokens.iter().map(|&x| x as i64).collect();
        assert_eq!(ours, gen, "{name} prompt {k}: greedy continuation");
        prompts.push(p);
        gens.push(gen);
    }

    for (k, row) in batched(&m, &prompts, &gens).iter().enumerate() {
        let d = max_abs_diff(row, &r[&format!("full_{k}")]);
        eprintln!("{name} row {k}: left-padded batch max |Δ| {d:.2e}");
        assert!(d <= TOL, "{name} row {k}: left-padded batch max |Δ| {d}");
    }

    // Concurrent tracks (the default) = sequential, exactly.
    let seq = &prompts[0];
    let conc = m
        .forward(&ids(seq), None, &mut m.new_cache(1), Logits::All)
        .unwrap();
    m.set_exec(TrackExec::Sequential);
    let sequential = m
        .forward(&ids(seq), None, &mut m.new_cache(1), Logits::All)
        .unwrap();
    assert_eq!(max_abs_diff(&conc, &sequential), 0.0, "{name}");

    // `convert tamm`: our safetensors layout, the same model bit for bit.
    let conv = dir.join("converted");
    afm_text::convert_tamm::convert_tamm_ptmoe(dir, &conv, Kind::Float, |_, _| {}).unwrap();
    let mc = PtMoe::load(&conv, Device::Cpu, Kind::Float, &[]).unwrap();
    let lc = mc
        .forward(&ids(seq), None, &mut mc.new_cache(1), Logits::All)
        .unwrap();
    let d = max_abs_diff(&lc, &sequential);
    if name.starts_with("lora") {
        // The checkpoint's adapter merged into the weights: the same model up to rounding.
        assert!(d <= TOL, "{name}: converted model max |Δ| {d}");
    } else {
        assert_eq!(d, 0.0, "{name}: converted model");
    }

    // What the test depends on: without the router cap, or with the window read as ours,
    // the logits are not tamm's.
    let (cfg_path, pt) = afm_text::tamm_ptmoe::tamm_ptmoe_files(dir).unwrap();
    let t = TammPtMoe::read(&cfg_path).unwrap();
    let w = t.load_weights(&pt, Device::Cpu, Kind::Float).unwrap();
    let want = &r["logits_0"];
    if name.starts_with("lora") {
        // The adapter matters: the base weights alone are not tamm's adapted model.
        let base = PtMoe::new(&t.cfg, &w, &[]).unwrap();
        let l = base
            .forward(&ids(seq), None, &mut base.new_cache(1), Logits::All)
            .unwrap()
            .squeeze_dim(0);
        let d = max_abs_diff(&l, want);
        eprintln!("{name}: without the adapter the logits move by {d:.2e}");
        assert!(d > 1e-2, "{name}: the adapter changes nothing ({d})");
        let (_, a) = t
            .load_weights_and_adapter(&pt, Device::Cpu, Kind::Float)
            .unwrap();
        let experts = a
            .unwrap()
            .modules()
            .filter(|m| m.contains(".experts."))
            .count();
        // 2 tracks × 4 experts × 3 projections in each of the 2 MoE layers, or none.
        assert_eq!(experts, if name == "lora_moe" { 48 } else { 0 }, "{name}");
    }
    for (what, cfg) in [
        ("no router cap", {
            let mut c = t.cfg.clone();
            c.router_logits_cap = None;
            c
        }),
        ("window one shorter", {
            let mut c = t.cfg.clone();
            c.sliding_window -= 1;
            c
        }),
    ] {
        let other = PtMoe::new(&cfg, &w, &[]).unwrap();
        let l = other
            .forward(&ids(seq), None, &mut other.new_cache(1), Logits::All)
            .unwrap()
            .squeeze_dim(0);
        let d = max_abs_diff(&l, want);
        eprintln!("{name}: {what} moves the logits by {d:.2e}");
        assert!(d > 1e-2, "{name}: {what} changes nothing ({d})");
    }
}

#[test]
fn tamm_pt_moe_logits_batches_and_greedy_match() {
    tch::set_num_threads(1);
    let py = venv_python_with("tamm").expect("tamm is a pinned test requirement (make setup)");
    let tmp = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(py)
        .arg(repo_root().join("text/tests/reference/tamm_ptmoe.py"))
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(status.success(), "reference script failed");
    for name in ["plain", "norms", "lora", "lora_moe"] {
        check_case(name, &tmp.path().join(name));
    }

    // The server model's state dict: tamm's keys and shapes on the meta device.
    let text = std::fs::read_to_string(tmp.path().join("keys.json")).unwrap();
    let theirs: Vec<(String, Vec<i64>)> = serde_json::from_str(&text).unwrap();
    let t = TammPtMoe::from_json(
        &serde_json::json!({"__tamm_type__": "module_configs:AFMParallelTrackMoEConfig"}),
    )
    .unwrap();
    let ours = t.tensor_shapes();
    assert_eq!(ours.len(), theirs.len());
    for (a, b) in ours.iter().zip(&theirs) {
        assert_eq!(a, b);
    }
}
