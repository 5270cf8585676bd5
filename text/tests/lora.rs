//! LoRA: the overlay equals the hand-merged weight W + (α/r)·B·A; activating, swapping,
//! deactivating and merging behave; and a PEFT adapter on a Llama-style model gives HF PEFT's
//! logits (the test builds the reference with tests/reference/peft_lora.py).

mod common;

use afm_text::generation::ids_tensor;
use afm_text::linear::Linear;
use afm_text::lora::{
    deactivate, merge_active, unmerge, AdapterCache, LoraAdapter, LoraTarget, DEFAULT_TARGETS,
};
use afm_text::ptmoe_config::ptmoe_preset;
use afm_text::{DType, Decoder, Logits, PtMoe, TextModel, TrackExec};
use common::*;
use tch::{Device, Kind, Tensor};

fn tiny(seed: i64) -> Decoder {
    TextModel::from_preset("tiny-two-segment", seed, Device::Cpu, DType::F32)
        .unwrap()
        .decoder
}

fn logits(d: &Decoder) -> Tensor {
    let _g = tch::no_grad_guard();
    let mut c = d.new_cache(1);
    d.forward(
        &ids_tensor(&[3, 1, 4, 1, 5, 9, 2, 6]).unwrap(),
        None,
        &mut c,
        Logits::All,
    )
    .unwrap()
}

/// Replace every linear of `model` that `adapter` targets by a dense one holding W + scale·B·A.
fn hand_merge<M: LoraTarget>(model: &mut M, adapter: &LoraAdapter, scale: f64) {
    for (name, lin) in model.lora_linears() {
        let Some((a, b)) = adapter.module(&name) else {
            continue;
        };
        let w = match lin.weight() {
            afm_text::linear::LinearWeight::Dense(w) => w.shallow_clone(),
            _ => unreachable!("dense base"),
        };
        *lin = Linear::from_dense(&w + b.matmul(a) * scale, None);
    }
}

#[test]
fn overlay_equals_hand_merged_weights() {
    let mut with = tiny(5);
    let base_logits = logits(&with);
    let adapter = LoraAdapter::random(&mut with, 4, 8.0, DEFAULT_TARGETS, 9).unwrap();
    // Segment-1 attention has only q and o (no k, v): 4 layers × 7 + 2 layers × 5.
    assert_eq!(adapter.modules().count(), 4 * 7 + 2 * 5);
    adapter.activate(&mut with).unwrap();
    let ours = logits(&with);
    assert!(
        max_abs_diff(&ours, &base_logits) > 1e-2,
        "the adapter must change the output"
    );

    // W + (α/r)·B·A by hand on an identical base.
    let mut merged = tiny(5);
    hand_merge(&mut merged, &adapter, 8.0 / 4.0);
    let d = max_abs_diff(&ours, &logits(&merged));
    assert!(d <= 1e-4, "overlay vs hand-merged: {d}");

    // merge_active folds the overlay in: same logits, no overlay left.
    let before = logits(&with);
    merge_active(&mut with).unwrap();
    assert!(max_abs_diff(&before, &logits(&with)) <= 1e-4);
    assert!(with.linears_mut().iter().all(|(_, l)| l.lora().is_none()));

    // unmerge takes it back out: the base model's logits again.
    unmerge(&mut with, &adapter).unwrap();
    let d = max_abs_diff(&logits(&with), &base_logits);
    assert!(d <= 1e-4, "merged then unmerged vs base: {d}");
}

/// Two adapters stacked into one overlay give W + s₁·B₁·A₁ + s₂·B₂·A₂: both hand-merged in
/// turn, one after the other. The second adapter covers only the attention projections, so
/// the MLP modules keep the first adapter's part alone.
#[test]
fn stacked_adapters_equal_both_merged_by_hand() {
    let mut with = tiny(5);
    let first = LoraAdapter::random(&mut with, 4, 8.0, DEFAULT_TARGETS, 9).unwrap();
    let second = LoraAdapter::random(&mut with, 2, 6.0, &["q_proj", "o_proj"], 11).unwrap();
    let stacked = first.stack(&second).unwrap();
    assert_eq!(stacked.modules().count(), first.modules().count());
    let (a, b) = stacked.module("model.layers.0.self_attn.q_proj").unwrap();
    assert_eq!((a.size()[0], b.size()[1]), (6, 6), "ranks 4 + 2 stacked");
    let (a, _) = stacked.module("model.layers.0.mlp.up_proj").unwrap();
    assert_eq!(a.size()[0], 4, "a module of the first adapter only");
    stacked.activate(&mut with).unwrap();
    let ours = logits(&with);

    let mut merged = tiny(5);
    hand_merge(&mut merged, &first, 8.0 / 4.0);
    hand_merge(&mut merged, &second, 6.0 / 2.0);
    let d = max_abs_diff(&ours, &logits(&merged));
    assert!(d <= 1e-4, "stacked overlay vs both merged by hand: {d}");

    // And it differs from the first adapter alone.
    first.activate(&mut with).unwrap();
    assert!(max_abs_diff(&ours, &logits(&with)) > 1e-3);
}

fn tiny_ptmoe(seed: i64) -> PtMoe {
    let cfg = ptmoe_preset("tiny-ptmoe").unwrap();
    PtMoe::random(&cfg, seed, Device::Cpu, Kind::Float, &[]).unwrap()
}

fn ptmoe_logits(m: &PtMoe) -> Tensor {
    let _g = tch::no_grad_guard();
    let mut c = m.new_cache(1);
    // 12 tokens: beyond the 8-token window, so local layers run on wrapped rings.
    let ids: Vec<u32> = (0..12).map(|i| (i * 29 + 3) % 256).collect();
    m.forward(&ids_tensor(&ids).unwrap(), None, &mut c, Logits::All)
        .unwrap()
}

#[test]
fn ptmoe_overlay_equals_hand_merged_weights() {
    // The server model takes the same adapters: every attention projection and every dense
    // and expert FFN projection of every track (the routers are left alone).
    let mut with = tiny_ptmoe(5);
    let base_logits = ptmoe_logits(&with);
    let adapter = LoraAdapter::random(&mut with, 4, 8.0, DEFAULT_TARGETS, 9).unwrap();
    let cfg = &with.cfg;
    let layers = cfg.num_track_blocks * cfg.num_tracks * cfg.track_block_depth;
    let moe_layers = layers / 2; // every other layer of a track
    let expected = layers * 4 + (layers - moe_layers) * 3 + moe_layers * cfg.num_local_experts * 3;
    assert_eq!(adapter.modules().count(), expected);
    assert!(adapter.modules().all(|m| !m.ends_with("mlp.gate")));
    assert!(adapter
        .modules()
        .any(|m| m == "model.blocks.1.tracks.1.layers.3.mlp.experts.2.down_proj"));
    adapter.activate(&mut with).unwrap();
    let ours = ptmoe_logits(&with);
    assert!(
        max_abs_diff(&ours, &base_logits) > 1e-2,
        "the adapter must change the output"
    );
    // Concurrent tracks see the same overlays as sequential ones.
    with.set_exec(TrackExec::Sequential);
    assert!(max_abs_diff(&ours, &ptmoe_logits(&with)) <= 1e-5);

    let mut merged = tiny_ptmoe(5);
    hand_merge(&mut merged, &adapter, 8.0 / 4.0);
    let d = max_abs_diff(&ours, &ptmoe_logits(&merged));
    assert!(d <= 1e-4, "overlay vs hand-merged: {d}");

    // Deactivating restores the base exactly; merging folds the overlay in.
    deactivate(&mut with).unwrap();
    assert_eq!(max_abs_diff(&base_logits, &ptmoe_logits(&with)), 0.0);
    adapter.activate(&mut with).unwrap();
    merge_active(&mut with).unwrap();
    assert!(max_abs_diff(&ours, &ptmoe_logits(&with)) <= 1e-4);
    assert!(with.linears_mut().iter().all(|(_, l)| l.lora().is_none()));
}

#[test]
fn cache_swaps_and_unloads() {
    let mut d = tiny(6);
    let base = logits(&d);
    let a1 = LoraAdapter::random(&mut d, 4, 8.0, DEFAULT_TARGETS, 1).unwrap();
    let mut a2 = LoraAdapter::random(&mut d, 8, 16.0, &["q_proj", "v_proj"], 2).unwrap();
    a2.name = "second".into();
    let mut cache = AdapterCache::default();
    let n1 = cache.insert(a1);
    let n2 = cache.insert(a2);
    cache.activate(&mut d, Some(&n1)).unwrap();
    let l1 = logits(&d);
    cache.activate(&mut d, Some(&n2)).unwrap();
    let l2 = logits(&d);
    assert!(max_abs_diff(&l1, &l2) > 1e-3);
    cache.activate(&mut d, Some(&n1)).unwrap();
    assert_eq!(
        max_abs_diff(&l1, &logits(&d)),
        0.0,
        "swapping back is exact"
    );
    cache.unload(&mut d, &n1).unwrap();
    assert_eq!(cache.active(), None);
    assert_eq!(
        max_abs_diff(&base, &logits(&d)),
        0.0,
        "unloading restores the base"
    );
    assert!(cache.activate(&mut d, Some(&n1)).is_err());
    deactivate(&mut d).unwrap();
}

#[test]
fn peft_adapter_matches_hf_peft() {
    let Some(py) = venv_python_with("peft") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let st = std::process::Command::new(&py)
        .arg(repo_root().join("text/tests/reference/peft_lora.py"))
        .arg(tmp.path())
        .status()
        .unwrap();
    assert!(st.success(), "reference failed");
    let _g = tch::no_grad_guard();
    let mut m = TextModel::load(&tmp.path().join("base"), Device::Cpu, DType::F32).unwrap();
    let adapter =
        LoraAdapter::load(&tmp.path().join("adapter"), Device::Cpu, tch::Kind::Float).unwrap();
    assert_eq!((adapter.rank, adapter.scale), (4, 2.0));
    let reference: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(tmp.path().join("ref.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let ids: Vec<u32> = Vec::<i64>::try_from(&reference["ids"])
        .unwrap()
        .iter()
        .map(|&i| i as u32)
        .collect();
    let run = |d: &Decoder| {
        let mut c = d.new_cache(1);
        d.forward(&ids_tensor(&ids).unwrap(), None, &mut c, Logits::All)
            .unwrap()
            .squeeze_dim(0)
    };
    let base = run(&m.decoder);
    adapter.activate(&mut m.decoder).unwrap();
    let ours = run(&m.decoder);
    let d = max_abs_diff(&ours, &reference["logits"]);
    println!(
        "PEFT parity: max |Δ| = {d:.2e} (base vs adapted differ by {:.2e})",
        max_abs_diff(&base, &ours)
    );
    assert!(d <= 1e-4, "max |Δ| {d}");
    assert!(max_abs_diff(&base, &ours) > 1e-3);
}
