//! The fused CPU decode step ([`afm_text::cpu_decode`]) computes what the libtorch path
//! computes: the same prompt through libtorch's prefill, then decode steps through each path,
//! logits compared step by step, for every weight format and layer option the step handles.

use afm_text::decoder::Decoder;
use afm_text::generation::ids_tensor;
use afm_text::gguf::GgmlType;
use afm_text::kv_cache::KvCache;
use afm_text::linear::LinearWeight;
use afm_text::presets::preset;
use afm_text::quant::ggml::GgmlWeight;
use afm_text::quant::{palette, qat, QuantizedWeight};
use afm_text::{Logits, TextConfig};
use tch::{Device, Kind, Tensor};

const STEPS: u32 = 12;

/// Logits of `STEPS` decode steps after a `prompt`-token prefill, through the fused step or not.
fn decode(dec: &mut Decoder, fused: bool, prompt: u32) -> Vec<Tensor> {
    let _g = tch::no_grad_guard();
    dec.set_fused_decode(fused);
    let mut cache = dec.new_cache(1);
    let prompt: Vec<u32> = (0..prompt).map(|i| (3 + 17 * i) % 250).collect();
    let _ = dec
        .forward(
            &ids_tensor(&prompt).unwrap(),
            None,
            &mut cache,
            Logits::Last,
        )
        .unwrap();
    assert_eq!(
        dec.fused_decode_applies(&cache),
        fused,
        "fused path availability"
    );
    (0..STEPS)
        .map(|i| {
            dec.forward(
                &ids_tensor(&[(7 + 29 * i) % 250]).unwrap(),
                None,
                &mut cache,
                Logits::Last,
            )
            .unwrap()
        })
        .collect()
}

/// max |Δ| between the two paths over all steps after a 9-token prompt, and the logits' scale.
fn compare(dec: &mut Decoder) -> (f64, f64) {
    compare_after(dec, 9)
}

fn compare_after(dec: &mut Decoder, prompt: u32) -> (f64, f64) {
    let a = decode(dec, false, prompt);
    let b = decode(dec, true, prompt);
    let mut worst = 0f64;
    let mut scale = 0f64;
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.size(), y.size());
        worst = worst.max(f64::try_from(x.f_sub(y).unwrap().abs().max()).unwrap());
        scale = scale.max(f64::try_from(x.abs().max()).unwrap());
    }
    (worst, scale)
}

fn random(cfg: &TextConfig, seed: i64) -> Decoder {
    Decoder::random(cfg, seed, Device::Cpu, Kind::Float).unwrap()
}

/// Random weights large enough that the logits are of order 1–10 (N(0, 0.02²) gives ~0.1).
fn scaled(cfg: &TextConfig, seed: i64) -> Decoder {
    let mut d = random(cfg, seed);
    for (_, l) in d.linears_mut() {
        if let LinearWeight::Dense(w) = l.weight() {
            let w = w.f_mul_scalar(4.0).unwrap();
            l.set_weight(LinearWeight::Dense(w));
        }
    }
    d
}

#[test]
fn dense_layers_match_libtorch() {
    // GQA (4 heads over 2 KV heads), tied head.
    let cfg = preset("tiny-dense").unwrap();
    let (d, s) = compare(&mut scaled(&cfg, 1));
    assert!(d <= 1e-4 * s.max(1.0), "tiny-dense: {d} (scale {s})");
    // A context long enough that the attention splits each kv head's keys into ranges.
    let (d, s) = compare_after(&mut scaled(&cfg, 1), 300);
    assert!(
        d <= 1e-4 * s.max(1.0),
        "tiny-dense, 300 tokens: {d} (scale {s})"
    );
    // Biases on every projection.
    let mut cfg_b = cfg.clone();
    cfg_b.attention_bias = true;
    let mut dec = scaled(&cfg_b, 2);
    let (d, s) = compare(&mut dec);
    assert!(d <= 1e-4 * s.max(1.0), "attention bias: {d} (scale {s})");
}

#[test]
fn two_segment_qk_norm_both_orders_match_libtorch() {
    // Segment 1 reads segment 0's cache; QK-norm with random gains, before and after RoPE.
    let cfg = preset("tiny-two-segment").unwrap();
    assert!(cfg.qk_norm && cfg.num_segment0_layers() < cfg.num_hidden_layers);
    for after in [false, true] {
        let mut c = cfg.clone();
        c.qk_norm_after_rope = after;
        let mut dec = scaled(&c, 3);
        let (d, s) = compare(&mut dec);
        assert!(
            d <= 1e-4 * s.max(1.0),
            "after_rope={after}: {d} (scale {s})"
        );
    }
}

#[test]
fn packed_and_ggml_weights_match_libtorch() {
    let cfg = preset("tiny-dense").unwrap();
    // Our packed formats: 4- and 2-bit palettes, 8-bit uniform (float activations in both
    // paths: same kernels, so agreement is as tight as dense).
    for (label, bits, pal) in [
        ("palette4", 4u8, true),
        ("palette2", 2, true),
        ("rtn8", 8, false),
    ] {
        let mut dec = scaled(&cfg, 4);
        for (_, l) in dec.linears_mut() {
            let LinearWeight::Dense(w) = l.weight() else {
                unreachable!()
            };
            let (rows, cols) = (w.size()[0] as usize, w.size()[1] as usize);
            let q = if pal {
                let v = Vec::<f32>::try_from(w.flatten(0, -1)).unwrap();
                QuantizedWeight::from_palette(&palette::palettize(&v, rows, cols, bits, 0), bits)
                    .unwrap()
            } else {
                let spec = qat::UniformSpec::new(bits).unwrap();
                let (codes, scale) = qat::rtn(w, &spec).unwrap();
                QuantizedWeight::from_uniform(&codes, &scale, bits).unwrap()
            };
            l.set_weight(LinearWeight::Quantized(Box::new(q)));
        }
        let (d, s) = compare(&mut dec);
        assert!(d <= 1e-4 * s.max(1.0), "{label}: {d} (scale {s})");
    }
    // GGUF blocks: both paths quantise activations to int8, and a value lying on a rounding
    // boundary in one path's summation order may round the other way in the other's, so the
    // two differ by activation-rounding noise, not by 1e-4: bound at 3% of the logit scale
    // (8-bit weights; the dense model differs from either by the same order).
    for ty in [GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q4_0] {
        let mut dec = scaled(&cfg, 5);
        for (_, l) in dec.linears_mut() {
            let LinearWeight::Dense(w) = l.weight() else {
                unreachable!()
            };
            let (rows, cols) = (w.size()[0], w.size()[1]);
            let v = Vec::<f32>::try_from(w.flatten(0, -1)).unwrap();
            let g = GgmlWeight::quantize(ty, &v, rows, cols).unwrap();
            l.set_weight(LinearWeight::Ggml(Box::new(g)));
        }
        let (d, s) = compare(&mut dec);
        assert!(d <= 0.03 * s, "{}: {d} (scale {s})", ty.name());
    }
}

/// bf16-stored weights ([`LinearWeight::Bf16`], a bf16 checkpoint loaded in fp32): the same
/// logits as the fp32 model, bit for bit, through libtorch's prefill and the fused step; the
/// lossless conversion leaves weights that are not bf16 values alone.
#[test]
fn bf16_stored_weights_equal_the_fp32_model() {
    let cfg = preset("tiny-dense").unwrap();
    let mut cfg_b = cfg.clone();
    cfg_b.attention_bias = true;
    for cfg in [cfg, cfg_b] {
        let round_one = |l: &mut afm_text::linear::Linear| {
            let LinearWeight::Dense(w) = l.weight() else {
                unreachable!()
            };
            let w = w.to_kind(Kind::BFloat16).to_kind(Kind::Float);
            l.set_weight(LinearWeight::Dense(w));
        };
        let round = |d: &mut Decoder| {
            for (_, l) in d.linears_mut() {
                round_one(l);
            }
            round_one(&mut d.lm_head);
        };
        // Full fp32 weights: nothing is lossless.
        let mut full = scaled(&cfg, 6);
        assert_eq!(full.store_weights_bf16(true).unwrap(), 0);
        let mut fp32 = scaled(&cfg, 6);
        round(&mut fp32);
        let mut stored = scaled(&cfg, 6);
        round(&mut stored);
        let n = stored.store_weights_bf16(true).unwrap();
        // Every projection and the head.
        assert_eq!(n, 7 * cfg.num_hidden_layers + 1, "weights stored in bf16");
        assert!(stored.decode_bytes_per_token() < fp32.decode_bytes_per_token());
        for fused in [false, true] {
            let (a, b) = (decode(&mut fp32, fused, 9), decode(&mut stored, fused, 9));
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(
                    x.equal(y),
                    "fused {fused}, step {i}: max |Δ| {}",
                    f64::try_from(x.f_sub(y).unwrap().abs().max()).unwrap()
                );
            }
        }
    }
}

/// LoRA overlays (describe's adapter, `--adapter`) on every projection of the fused step, over
/// dense and GGUF-block bases: the fused step adds `s·B·(A·x)` per row as libtorch does.
#[test]
fn lora_overlays_match_libtorch() {
    let cfg = preset("tiny-dense").unwrap();
    for blocks in [false, true] {
        let mut dec = scaled(&cfg, 9);
        let mut seed = 0;
        for (_, l) in dec.linears_mut() {
            let (i, o) = (l.in_features(), l.out_features());
            if blocks {
                let LinearWeight::Dense(w) = l.weight() else {
                    unreachable!()
                };
                let v = Vec::<f32>::try_from(w.flatten(0, -1)).unwrap();
                let g = GgmlWeight::quantize(GgmlType::Q8_0, &v, o, i).unwrap();
                l.set_weight(LinearWeight::Ggml(Box::new(g)));
            }
            seed += 1;
            tch::manual_seed(seed);
            l.set_lora(Some(afm_text::linear::LoraOverlay {
                a: Tensor::randn([3, i], (Kind::Float, Device::Cpu)) * 0.3,
                b: Tensor::randn([o, 3], (Kind::Float, Device::Cpu)) * 0.3,
                scale: 0.5,
            }))
            .unwrap();
        }
        let (d, s) = compare(&mut dec);
        let bound = if blocks { 0.03 * s } else { 1e-4 * s.max(1.0) };
        assert!(d <= bound, "LoRA (blocks: {blocks}): {d} (scale {s})");
        // The overlay matters: without it the logits move by far more than that.
        let with = decode(&mut dec, true, 9);
        for (_, l) in dec.linears_mut() {
            l.set_lora(None).unwrap();
        }
        let without = decode(&mut dec, true, 9);
        let moved = f64::try_from(with[0].f_sub(&without[0]).unwrap().abs().max()).unwrap();
        assert!(moved > 10.0 * d, "the overlay moved logits by only {moved}");
    }
    // A trainable overlay (train lora): with autograd recording, the libtorch path runs (its
    // logits carry the graph); under no_grad the fused step serves it.
    let mut dec = scaled(&cfg, 10);
    for (_, l) in dec.linears_mut() {
        let (i, o) = (l.in_features(), l.out_features());
        l.set_lora(Some(afm_text::linear::LoraOverlay {
            a: Tensor::randn([2, i], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            b: Tensor::zeros([o, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            scale: 1.0,
        }))
        .unwrap();
    }
    let mut cache = dec.new_cache(1);
    let step = |dec: &Decoder, cache: &mut KvCache, ids: &[u32]| {
        dec.forward(&ids_tensor(ids).unwrap(), None, cache, Logits::Last)
            .unwrap()
    };
    let _ = step(&dec, &mut cache, &[1, 2]);
    assert!(
        step(&dec, &mut cache, &[3]).requires_grad(),
        "the decode step lost the autograd graph"
    );
    let _g = tch::no_grad_guard();
    assert!(!step(&dec, &mut cache, &[4]).requires_grad());
    assert!(dec.fused_decode_applies(&cache));
}

#[test]
fn steps_the_fused_path_does_not_take_fall_back() {
    let cfg = preset("tiny-dense").unwrap();
    let _g = tch::no_grad_guard();
    // Batches and padded caches: libtorch path.
    let dec = random(&cfg, 7);
    let mut cache = dec.new_cache(2);
    let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).view([2, 2]);
    let _ = dec.forward(&ids, None, &mut cache, Logits::Last).unwrap();
    assert!(!dec.fused_decode_applies(&cache));
    // bf16: libtorch path.
    let dec = Decoder::random(&cfg, 8, Device::Cpu, Kind::BFloat16).unwrap();
    let mut cache = dec.new_cache(1);
    let _ = dec
        .forward(
            &ids_tensor(&[1, 2, 3]).unwrap(),
            None,
            &mut cache,
            Logits::Last,
        )
        .unwrap();
    assert!(!dec.fused_decode_applies(&cache));
}
