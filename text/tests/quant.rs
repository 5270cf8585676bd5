//! Quantized model directories: quantize a tiny model, load it through `TextModel::load`,
//! compare logits with the full-precision model, check both matmul paths agree, and check that
//! malformed packed checkpoints fail with errors naming the file and the tensor.

mod common;

use std::path::{Path, PathBuf};

use afm_text::checkpoint::{load_weights, write_safetensors};
use afm_text::decoder::weight_shapes;
use afm_text::presets::preset;
use afm_text::quant::quantize::{quantize_dir, BitPlan, QuantizeOptions};
use afm_text::quant::Method;
use afm_text::weights::WeightMap;
use afm_text::{DType, Logits, TextModel};
use tch::{Device, Kind, Tensor};

/// Replaces a tensor (`Some`; an empty tensor drops it) or keeps it (`None`).
type Edit<'a> = Box<dyn Fn(&str) -> Option<Tensor> + 'a>;

fn write_tiny(dir: &Path) {
    let cfg = preset("tiny-dense").unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    let shapes = weight_shapes(&cfg);
    let w = WeightMap::random(&shapes, 7, 0.05, Device::Cpu, Kind::Float).unwrap();
    let tensors: Vec<(String, Tensor)> = shapes
        .iter()
        .map(|(n, _)| (n.clone(), w.get_any(n).unwrap()))
        .collect();
    write_safetensors(&dir.join("model.safetensors"), &tensors, None).unwrap();
}

fn ids() -> Tensor {
    Tensor::from_slice(&[5i64, 17, 99, 3, 200, 41, 7, 64, 128, 9, 250, 1]).view([1, 12])
}

fn logits(m: &TextModel) -> Tensor {
    let mut cache = m.decoder.new_cache(1);
    m.decoder
        .forward(&ids(), None, &mut cache, Logits::All)
        .unwrap()
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).square().sum(Kind::Double).double_value(&[]);
    (d / b.square().sum(Kind::Double).double_value(&[])).sqrt()
}

struct Dirs {
    _tmp: tempfile::TempDir,
    full: PathBuf,
    root: PathBuf,
}

fn setup() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let full = tmp.path().join("full");
    write_tiny(&full);
    Dirs {
        root: tmp.path().to_path_buf(),
        full,
        _tmp: tmp,
    }
}

fn quantize(d: &Dirs, name: &str, method: Method, plan: BitPlan) -> (PathBuf, f64) {
    let out = d.root.join(name);
    let opts = QuantizeOptions {
        method,
        plan,
        embed_bits: None,
        row_scale: true,
        seed: 0,
    };
    let r = quantize_dir(&d.full, &out, &opts, &mut |_, _, _| {}).unwrap();
    (out, r.avg_bpw)
}

#[test]
fn quantized_models_load_and_track_full_precision() {
    let d = setup();
    let full = TextModel::load(&d.full, Device::Cpu, DType::F32).unwrap();
    let want = logits(&full);
    let cases = [
        ("rtn8", Method::Uniform, BitPlan::Fixed(8), 0.05, (8.0, 8.6)),
        ("pal4", Method::Palette, BitPlan::Fixed(4), 0.4, (4.0, 5.0)),
        ("rtn4", Method::Uniform, BitPlan::Fixed(4), 0.5, (4.0, 4.6)),
        (
            "mixed",
            Method::Palette,
            BitPlan::Mixed { target_bpw: 3.5 },
            1.0,
            (3.0, 3.5),
        ),
        ("pal2", Method::Palette, BitPlan::Fixed(2), 2.0, (2.0, 3.5)),
    ];
    let mut errs = vec![];
    for (name, method, plan, tol, (lo, hi)) in cases {
        let (dir, bpw) = quantize(&d, name, method, plan);
        assert!(bpw >= lo && bpw <= hi, "{name}: {bpw} bits per weight");
        let m = TextModel::load(&dir, Device::Cpu, DType::F32).unwrap();
        assert!(m.decoder.layers[0].attn.q_proj.is_quantized());
        assert!(m.decoder.embed.quantized().is_some() && m.decoder.lm_head.is_quantized());
        let got = logits(&m);
        let e = rel_diff(&got, &want);
        eprintln!("{name}: {bpw:.3} bits per weight, relative logit error {e:.4}");
        assert!(e < tol, "{name}: relative logit error {e}");
        errs.push(e);

        // Decode steps (packed kernel) agree with the full-sequence forward (unpacking path).
        let mut cache = m.decoder.new_cache(1);
        let n = ids().size()[1];
        let _ = m
            .decoder
            .forward(&ids().narrow(1, 0, n - 2), None, &mut cache, Logits::Last)
            .unwrap();
        for j in n - 2..n {
            let step = m
                .decoder
                .forward(&ids().narrow(1, j, 1), None, &mut cache, Logits::Last)
                .unwrap();
            let d = common::max_abs_diff(&step.squeeze(), &got.get(0).get(j));
            assert!(d < 1e-4, "{name}: decode vs prefill logits differ by {d}");
        }
    }
    // More bits, less error.
    assert!(
        errs[0] < errs[1] && errs[1] < errs[3] && errs[3] < errs[4],
        "{errs:?}"
    );

    // A quantized directory cannot be quantized again.
    let opts = QuantizeOptions {
        method: Method::Palette,
        plan: BitPlan::Fixed(4),
        embed_bits: None,
        row_scale: true,
        seed: 0,
    };
    let err = quantize_dir(
        &d.root.join("pal4"),
        &d.root.join("x"),
        &opts,
        &mut |_, _, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("already quantized"), "{err}");

    // Malformed packed checkpoints: clear errors naming the file and the tensor.
    let (good, _) = (d.root.join("pal4"), ());
    let map = load_weights(&good, Device::Cpu, Kind::Float).unwrap();
    let mut names: Vec<String> = map.names().cloned().collect();
    names.sort();
    let raw = |n: &str| map.raw(n).unwrap().shallow_clone();
    let target = "model.layers.1.mlp.up_proj.weight";
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "short codes",
            Box::new(|n: &str| (n == format!("{target}.qcodes")).then(|| raw(n).narrow(1, 0, 31))),
            "wrong packed length",
        ),
        (
            "bad lut",
            Box::new(|n: &str| (n == format!("{target}.qlut")).then(|| raw(n).narrow(1, 0, 8))),
            "bad LUT shape",
        ),
        (
            "float codes",
            Box::new(|n: &str| {
                (n == format!("{target}.qcodes")).then(|| raw(n).to_kind(Kind::Float))
            }),
            "expected U8",
        ),
        (
            "no table",
            Box::new(|n: &str| {
                (n == format!("{target}.qlut") || n == format!("{target}.qscale"))
                    .then(|| Tensor::zeros([0], (Kind::Float, Device::Cpu)))
            }),
            "neither",
        ),
        (
            "bad scale",
            Box::new(|n: &str| (n == format!("{target}.qscale")).then(|| raw(n).narrow(0, 0, 5))),
            "one scale per row",
        ),
    ];
    for (what, edit, needle) in cases {
        let dir = d.root.join(format!("bad-{}", what.replace(' ', "-")));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(good.join("config.json"), dir.join("config.json")).unwrap();
        let tensors: Vec<(String, Tensor)> = names
            .iter()
            .filter_map(|n| match edit(n) {
                Some(t) if t.numel() == 0 => None,
                Some(t) => Some((n.clone(), t)),
                None => Some((n.clone(), raw(n))),
            })
            .collect();
        write_safetensors(&dir.join("model.safetensors"), &tensors, None).unwrap();
        let err = TextModel::load(&dir, Device::Cpu, DType::F32)
            .err()
            .unwrap_or_else(|| panic!("{what}: loaded"))
            .to_string();
        assert!(
            err.contains(needle) && err.contains(target) && err.contains("model.safetensors"),
            "{what}: {err}"
        );
    }
}

#[test]
fn recovery_lora_trains_on_a_frozen_quantized_base() {
    use afm_text::lora::LoraAdapter;
    use afm_text::train_lora::{train, Example, LoraTrainConfig};
    let d = setup();
    let (dir, _) = quantize(&d, "pal4-lora", Method::Palette, BitPlan::Fixed(4));
    let mut m = TextModel::load(&dir, Device::Cpu, DType::F32).unwrap();
    let before = logits(&m);
    let ex = Example {
        ids: (0..24).map(|i| (i * 37 % 256) as u32).collect(),
        prompt_len: 4,
    };
    let cfg = LoraTrainConfig {
        rank: 4,
        alpha: 8.0,
        lr: 1e-2,
        steps: 8,
        batch_size: 2,
        save_every: 0,
        ..LoraTrainConfig::default()
    };
    let out = d.root.join("recovery");
    let (_, losses) = train(&mut m.decoder, &[ex], cfg, &out, false, None, |_, _| {}).unwrap();
    assert!(
        losses.last().unwrap() < &(losses[0] * 0.9),
        "loss did not fall: {losses:?}"
    );
    // The base stayed packed and unchanged; the adapter loads on top of it.
    assert!(m.decoder.layers[0].mlp.up.is_quantized());
    assert!(common::max_abs_diff(&logits(&m), &before) == 0.0);
    LoraAdapter::load(&out, Device::Cpu, Kind::Float)
        .unwrap()
        .activate(&mut m.decoder)
        .unwrap();
    assert!(common::max_abs_diff(&logits(&m), &before) > 1e-4);
    // Merging into packed weights is refused with a clear error.
    let err = afm_text::lora::merge_active(&mut m.decoder)
        .unwrap_err()
        .to_string();
    assert!(err.contains("quantized"), "{err}");
}

#[test]
fn qat_trains_and_exports_a_packed_model() {
    use afm_text::quant::qat_train::{train_qat, QatConfig};
    let d = setup();
    // One window to fit: the loss must fall steadily through the fake-quantizer.
    let windows: Vec<Vec<u32>> = vec![(0..32).map(|i| ((i * 7 + 3) % 256) as u32).collect()];
    let cfg = QatConfig {
        bits: 4,
        embed_bits: 4,
        lr: 3e-3,
        f_lr: 1e-2,
        steps: 12,
        batch_size: 2,
        seq_len: 32,
        seed: 0,
        time_limit: None,
    };
    // A spent time limit: no step, the starting point exported (and labelled so).
    let spent = QatConfig {
        time_limit: Some(std::time::Duration::ZERO),
        ..cfg.clone()
    };
    let out0 = d.root.join("qat4-0");
    let none = train_qat(&d.full, &out0, &windows, &spent, Device::Cpu, |_, _| {}).unwrap();
    assert!(none.is_empty());
    let meta = std::fs::read_to_string(out0.join("config.json")).unwrap();
    assert!(meta.contains("4-bit QAT, 0 steps"), "{meta}");
    let out = d.root.join("qat4");
    let losses = train_qat(&d.full, &out, &windows, &cfg, Device::Cpu, |_, _| {}).unwrap();
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    assert!(
        mean(&losses[losses.len() - 3..]) < 0.8 * mean(&losses[..3]),
        "QAT loss did not fall: {losses:?}"
    );
    let m = TextModel::load(&out, Device::Cpu, DType::F32).unwrap();
    for (_, lin) in TextModel::load(&out, Device::Cpu, DType::F32)
        .unwrap()
        .decoder
        .linears_mut()
    {
        assert!(lin.is_quantized());
    }
    assert!(m.decoder.embed.quantized().is_some());
    let cfg_json = std::fs::read_to_string(out.join("config.json")).unwrap();
    assert!(cfg_json.contains("\"qat\""), "{cfg_json}");
    // The exported 4-bit model fits the training text better than 4-bit RTN of the base.
    let (rtn4, _) = quantize(&d, "rtn4", Method::Uniform, BitPlan::Fixed(4));
    let rtn = TextModel::load(&rtn4, Device::Cpu, DType::F32).unwrap();
    let nll = |m: &TextModel| {
        let ids = Tensor::from_slice(&windows[0].iter().map(|&t| t as i64).collect::<Vec<_>>())
            .view([1, -1]);
        let mut c = m.decoder.new_cache(1);
        let lg = m.decoder.forward(&ids, None, &mut c, Logits::All).unwrap();
        lg.narrow(1, 0, 31)
            .reshape([-1, 256])
            .cross_entropy_for_logits(&ids.narrow(1, 1, 31).reshape([-1]))
            .double_value(&[])
    };
    assert!(nll(&m) < nll(&rtn), "qat {} vs rtn {}", nll(&m), nll(&rtn));
}

#[test]
fn int8_kv_cache_tracks_the_full_precision_cache() {
    use afm_text::kv_cache::{CacheKind, KvCache};
    let full = TextModel::from_preset("tiny-dense", 3, Device::Cpu, DType::F32).unwrap();
    let n_layers = full.config().num_hidden_layers;
    let run = |bits: u8| {
        let mut cache =
            KvCache::with_kinds_bits(&vec![CacheKind::Normal; n_layers], 1, Device::Cpu, bits);
        let d = &full.decoder;
        let mut out = vec![d
            .forward(&ids().narrow(1, 0, 8), None, &mut cache, Logits::Last)
            .unwrap()];
        for j in 8..12 {
            out.push(
                d.forward(&ids().narrow(1, j, 1), None, &mut cache, Logits::Last)
                    .unwrap(),
            );
        }
        (Tensor::cat(&out, 1), cache.allocated_bytes())
    };
    let (a, bytes16) = run(16);
    let (b, bytes8) = run(8);
    let e = rel_diff(&b, &a);
    assert!(e < 0.02, "int8 KV changes the logits by {e}");
    // fp32 K/V here: int8 codes plus an fp32 scale per head and token (head_dim 16).
    assert_eq!(bytes8 * 4 * 16, bytes16 * (16 + 4));
}

/// Distillation: a recovery LoRA trained against the full-precision teacher (KL only, no
/// labels) brings the 2-bit model's next-token distributions on held-out sequences much closer
/// to the teacher's; the KL of a model against itself is 0; distilling without a teacher is
/// refused.
#[test]
fn distillation_recovery_lora_pulls_the_quantized_model_toward_the_teacher() {
    use afm_text::lora::LoraAdapter;
    use afm_text::train_lora::{distillation_kl, train, Example, LoraTrainConfig};
    let d = setup();
    let teacher = TextModel::load(&d.full, Device::Cpu, DType::F32).unwrap();
    let (dir, _) = quantize(&d, "pal2-distill", Method::Palette, BitPlan::Fixed(2));
    let mut m = TextModel::load(&dir, Device::Cpu, DType::F32).unwrap();
    // Pseudo-random token sequences (a 64-bit LCG per sequence).
    let seq = |s: u64| -> Vec<u32> {
        let mut x = s.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..24)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((x >> 33) % 256) as u32
            })
            .collect()
    };
    let all_logits = |m: &TextModel, seqs: &[Vec<u32>]| -> Tensor {
        let _g = tch::no_grad_guard();
        let rows: Vec<Tensor> = seqs
            .iter()
            .map(|s| {
                let ids: Vec<i64> = s.iter().map(|&t| t as i64).collect();
                let mut c = m.decoder.new_cache(1);
                m.decoder
                    .forward(
                        &Tensor::from_slice(&ids).view([1, -1]),
                        None,
                        &mut c,
                        Logits::All,
                    )
                    .unwrap()
                    .squeeze_dim(0)
            })
            .collect();
        Tensor::cat(&rows, 0)
    };
    let held: Vec<Vec<u32>> = (1000..1008).map(seq).collect();
    let t_held = all_logits(&teacher, &held);
    let kl = |m: &TextModel| {
        distillation_kl(&all_logits(m, &held), &t_held, 1.0)
            .unwrap()
            .double_value(&[])
    };
    assert!(
        distillation_kl(&t_held, &t_held, 2.0)
            .unwrap()
            .double_value(&[])
            < 1e-6
    );
    let before = kl(&m);
    assert!(
        before > 1e-3,
        "2-bit should differ from the teacher: {before}"
    );

    let data: Vec<Example> = (0..64)
        .map(|s| Example {
            ids: seq(s),
            prompt_len: 0,
        })
        .collect();
    let cfg = LoraTrainConfig {
        rank: 8,
        alpha: 16.0,
        lr: 3e-3,
        steps: 200,
        batch_size: 4,
        save_every: 0,
        distill_weight: 1.0,
        ..LoraTrainConfig::default()
    };
    let out = d.root.join("distilled");
    let err = train(
        &mut m.decoder,
        &data,
        cfg.clone(),
        &out,
        false,
        None,
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("teacher"), "{err}");
    let (_, losses) = train(
        &mut m.decoder,
        &data,
        cfg,
        &out,
        false,
        Some(&teacher.decoder),
        |_, _| {},
    )
    .unwrap();
    assert!(
        (losses[0] - before).abs() < before,
        "{losses:?} vs {before}"
    );
    LoraAdapter::load(&out, Device::Cpu, Kind::Float)
        .unwrap()
        .activate(&mut m.decoder)
        .unwrap();
    let after = kl(&m);
    eprintln!("held-out KL(teacher ‖ student): {before:.4} without the LoRA, {after:.4} with");
    assert!(
        after < 0.5 * before,
        "held-out KL(teacher ‖ 2-bit + LoRA) {after} vs {before} without"
    );
}
