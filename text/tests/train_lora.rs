//! LoRA training on a frozen base: the response loss falls, the base weights do not move,
//! a killed-and-resumed run ends bit-identical to an uninterrupted one, and the saved adapter
//! loads back with the same effect.

mod common;

use afm_text::generation::ids_tensor;
use afm_text::lora::LoraAdapter;
use afm_text::train_lora::{train, Example, LoraTrainConfig};
use afm_text::{Decoder, Logits};
use common::max_abs_diff;
use tch::{Device, Kind};

/// tiny-dense with weights of std 0.3: unlike the default 0.02, its head can express a
/// confident prediction (with std 0.02 the logits span about ±1 whatever the adapter does).
fn tiny() -> Decoder {
    let cfg = afm_text::presets::preset("tiny-dense").unwrap();
    let shapes = afm_text::decoder::weight_shapes(&cfg);
    let w =
        afm_text::weights::WeightMap::random(&shapes, 7, 0.3, Device::Cpu, Kind::Float).unwrap();
    Decoder::new(&cfg, &w).unwrap()
}

/// Prompts of varying tokens, always answered with the fixed "format" [200, 201, 202].
fn data() -> Vec<Example> {
    (0..12u32)
        .map(|i| {
            let mut ids: Vec<u32> = (0..6).map(|j| (i * 13 + j * 7) % 190).collect();
            let prompt_len = ids.len();
            ids.extend([200, 201, 202]);
            Example { ids, prompt_len }
        })
        .collect()
}

fn cfg(steps: usize) -> LoraTrainConfig {
    LoraTrainConfig {
        rank: 4,
        alpha: 8.0,
        lr: 3e-2,
        steps,
        batch_size: 4,
        grad_accum: 2,
        save_every: 3,
        seed: 1,
        ..LoraTrainConfig::default()
    }
}

fn logits(d: &Decoder, ids: &[u32]) -> tch::Tensor {
    let _g = tch::no_grad_guard();
    let mut c = d.new_cache(1);
    d.forward(&ids_tensor(ids).unwrap(), None, &mut c, Logits::All)
        .unwrap()
}

#[test]
fn loss_falls_and_base_is_frozen() {
    tch::set_num_threads(1);
    let mut d = tiny();
    let probe = [5u32, 17, 33, 2, 9, 11];
    let before = logits(&d, &probe);
    let tmp = tempfile::tempdir().unwrap();
    let (_, losses) = train(&mut d, &data(), cfg(60), tmp.path(), false, None, |_, _| {}).unwrap();
    let first: f64 = losses[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = losses[losses.len() - 4..].iter().sum::<f64>() / 4.0;
    println!("loss {first:.3} → {last:.3}");
    assert!(last < 0.3 * first, "loss {first} → {last}");
    // Training leaves no overlay behind and never touched the base weights.
    assert_eq!(max_abs_diff(&before, &logits(&d, &probe)), 0.0);

    // The saved adapter moves a held-out prompt's next-token mass onto the learned answer.
    let held_out = [150u32, 3, 77, 120, 64, 8];
    let mass = |d: &Decoder| {
        let p = logits(d, &held_out).get(0).get(5).softmax(0, Kind::Float);
        [200i64, 201, 202]
            .iter()
            .map(|&t| p.double_value(&[t]))
            .sum::<f64>()
    };
    let base_mass = mass(&d);
    let adapter = LoraAdapter::load(tmp.path(), Device::Cpu, Kind::Float).unwrap();
    adapter.activate(&mut d).unwrap();
    let tuned_mass = mass(&d);
    println!(
        "answer-token mass on a held-out prompt: base {base_mass:.3}, adapted {tuned_mass:.3}"
    );
    assert!(
        base_mass < 0.1 && tuned_mass > 0.5,
        "{base_mass} → {tuned_mass}"
    );
}

#[test]
fn resume_is_identical_to_an_uninterrupted_run() {
    tch::set_num_threads(1);
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut d = tiny();
    let (_, straight) = train(&mut d, &data(), cfg(6), &a, false, None, |_, _| {}).unwrap();
    // "Killed" after step 3 (the checkpoint of save_every = 3), then resumed to 6.
    let _ = train(&mut d, &data(), cfg(3), &b, false, None, |_, _| {}).unwrap();
    let (_, resumed) = train(&mut d, &data(), cfg(6), &b, true, None, |_, _| {}).unwrap();
    assert_eq!(straight, resumed, "losses of every step");
    let wa = afm_text::checkpoint::load_weights(
        &a.join("adapter_model.safetensors"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let wb = afm_text::checkpoint::load_weights(
        &b.join("adapter_model.safetensors"),
        Device::Cpu,
        Kind::Float,
    )
    .unwrap();
    let names: Vec<String> = wa.names().cloned().collect();
    assert!(!names.is_empty());
    for n in names {
        let (x, y) = (wa.get_any(&n).unwrap(), wb.get_any(&n).unwrap());
        assert_eq!(max_abs_diff(&x, &y), 0.0, "{n}");
    }
}

#[test]
fn bad_hyper_parameters_are_refused_and_a_diverging_loss_stops_training() {
    tch::set_num_threads(1);
    let mut d = tiny();
    let tmp = tempfile::tempdir().unwrap();
    let bad = |c: LoraTrainConfig| -> String {
        let mut d = tiny();
        train(&mut d, &data(), c, tmp.path(), false, None, |_, _| {})
            .unwrap_err()
            .to_string()
    };
    assert!(bad(LoraTrainConfig { rank: 0, ..cfg(2) }).contains("rank"));
    let e = bad(LoraTrainConfig {
        lr: f64::NAN,
        ..cfg(2)
    });
    assert!(e.contains("lr"), "{e}");
    assert!(bad(LoraTrainConfig { lr: -1.0, ..cfg(2) }).contains("lr"));
    assert!(bad(LoraTrainConfig {
        alpha: 0.0,
        ..cfg(2)
    })
    .contains("alpha"));
    assert!(bad(LoraTrainConfig { steps: 0, ..cfg(2) }).contains("steps"));
    assert!(bad(LoraTrainConfig {
        batch_size: 0,
        ..cfg(2)
    })
    .contains("batch"));
    // Nothing was written by the refused runs.
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);

    // A learning rate this large makes the loss infinite or NaN within a few steps: training
    // stops with an error naming the step, and writes no adapter of NaNs.
    let out = tmp.path().join("diverged");
    let e = train(
        &mut d,
        &data(),
        LoraTrainConfig {
            lr: 1e30,
            save_every: 0,
            ..cfg(20)
        },
        &out,
        false,
        None,
        |_, _| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("step ") && e.contains("loss became"), "{e}");
    assert!(!out.join("adapter_model.safetensors").exists());
}

/// LoRA training on the server model (tiny-ptmoe, every track's attention, dense FFN and expert
/// projections): the loss falls, the base is frozen, a resumed run ends bit-identical to an
/// uninterrupted one, and the saved adapter loads back with the trained overlay's logits.
#[test]
fn pt_moe_trains_resumes_and_reloads() {
    use afm_text::generation::CausalLm;
    use afm_text::PtMoe;
    let cfg_m = afm_text::ptmoe_config::ptmoe_preset("tiny-ptmoe").unwrap();
    let build = || {
        let shapes = afm_text::ptmoe::ptmoe_weight_shapes(&cfg_m);
        let w = afm_text::weights::WeightMap::random(&shapes, 7, 0.3, Device::Cpu, Kind::Float)
            .unwrap();
        let mut m = PtMoe::new(&cfg_m, &w, &[]).unwrap();
        // Bit-exact comparisons across runs: concurrent tracks split the intra-op threads
        // between them as they start, which changes float summation order from run to run.
        m.set_exec(afm_text::TrackExec::Sequential);
        m
    };
    let lm_logits = |m: &PtMoe, ids: &[u32]| {
        m.forward_lm(
            &ids_tensor(ids).unwrap(),
            None,
            &mut m.new_lm_cache(1),
            Logits::All,
        )
        .unwrap()
    };
    let data: Vec<Example> = data()
        .into_iter()
        .map(|mut e| {
            e.ids.iter_mut().for_each(|t| *t %= cfg_m.vocab_size as u32);
            e
        })
        .collect();
    let probe = &data[0].ids;
    let tmp = tempfile::tempdir().unwrap();
    let mut m = build();
    let before = lm_logits(&m, probe);
    let (out, losses) = train(
        &mut m,
        &data,
        cfg(6),
        &tmp.path().join("a"),
        false,
        None,
        |_, _| {},
    )
    .unwrap();
    assert!(losses[5] < losses[0], "{losses:?}");
    // Frozen base: without the adapter the logits are the untouched model's.
    assert_eq!(max_abs_diff(&lm_logits(&m, probe), &before), 0.0);
    let a = LoraAdapter::load(&out, Device::Cpu, Kind::Float).unwrap();
    assert!(a.modules().any(|n| n.contains(".experts.")));
    assert!(a.modules().any(|n| n.contains(".tracks.1.")));
    a.activate(&mut m).unwrap();
    let adapted = lm_logits(&m, probe);
    assert!(max_abs_diff(&adapted, &before) > 1e-2);
    afm_text::lora::deactivate(&mut m).unwrap();
    // 3 steps, then a resume to 6 = 6 straight.
    let mut r = build();
    let half = tmp.path().join("b");
    train(&mut r, &data, cfg(3), &half, false, None, |_, _| {}).unwrap();
    let (_, resumed) = train(&mut r, &data, cfg(6), &half, true, None, |_, _| {}).unwrap();
    assert_eq!(resumed, losses);
    let b = LoraAdapter::load(&half, Device::Cpu, Kind::Float).unwrap();
    b.activate(&mut r).unwrap();
    assert_eq!(max_abs_diff(&lm_logits(&r, probe), &adapted), 0.0);
}
