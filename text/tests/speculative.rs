//! Speculative decoding keeps the target's distribution: greedy output is token-for-token
//! identical to plain greedy, and with sampling the generated tokens follow the target's
//! distribution (chi-square against the exact target probabilities, fixed seeds).

use afm_text::generation::{generate, ids_tensor};
use afm_text::sampling::Sampler;
use afm_text::speculative::{generate_speculative, Draft};
use afm_text::{DType, Decoder, GenerateOptions, Logits, SamplingConfig, TextModel};
use tch::Device;

fn model(preset: &str, seed: i64) -> Decoder {
    TextModel::from_preset(preset, seed, Device::Cpu, DType::F32)
        .unwrap()
        .decoder
}

#[test]
fn greedy_speculative_equals_plain_greedy() {
    let target = model("tiny-dense", 1);
    let other = model("tiny-dense", 2); // a poor draft: many rejections
    let opts = GenerateOptions {
        max_new_tokens: 40,
        stop_on_eos: false,
        ..GenerateOptions::default()
    };
    for prompt in [
        vec![5u32, 9, 200, 3],
        vec![7u32],
        (0..30).collect::<Vec<u32>>(),
    ] {
        let plain = generate(&target, None, &prompt, &opts, &mut |_| {}).unwrap();
        for draft in [
            Draft::SelfPrefix(1),
            Draft::SelfPrefix(3),
            Draft::Model(&other),
            Draft::Model(&target),
        ] {
            for k in [1, 3, 5] {
                let (spec, st) =
                    generate_speculative(&target, draft, None, &prompt, &opts, k).unwrap();
                assert_eq!(spec.tokens, plain.tokens, "k={k}");
                assert!(st.target_forwards <= plain.tokens.len());
                if let Draft::Model(d) = draft {
                    if std::ptr::eq(d, &target) {
                        // The target drafting for itself is always accepted.
                        assert_eq!(st.accepted, st.proposed);
                    }
                }
            }
        }
    }
    // Two-segment targets too (draft = part of segment 0).
    let two = model("tiny-two-segment", 3);
    let plain = generate(&two, None, &[1, 2, 3], &opts, &mut |_| {}).unwrap();
    let (spec, _) =
        generate_speculative(&two, Draft::SelfPrefix(2), None, &[1, 2, 3], &opts, 4).unwrap();
    assert_eq!(spec.tokens, plain.tokens);
    assert!(generate_speculative(&two, Draft::SelfPrefix(5), None, &[1], &opts, 4).is_err());
}

/// Exact target probabilities of the first two tokens after `prompt` under `cfg`.
fn exact_joint(target: &Decoder, prompt: &[u32], cfg: &SamplingConfig) -> Vec<((u32, u32), f64)> {
    let s = Sampler::new(cfg.clone());
    let _g = tch::no_grad_guard();
    let row = |ids: &[u32]| -> Vec<f32> {
        let mut c = target.new_cache(1);
        let l = target
            .forward(&ids_tensor(ids).unwrap(), None, &mut c, Logits::Last)
            .unwrap();
        Vec::<f32>::try_from(l.squeeze()).unwrap()
    };
    let mut out = Vec::new();
    for (t1, p1) in s.distribution(&row(prompt), prompt) {
        let mut ctx = prompt.to_vec();
        ctx.push(t1 as u32);
        for (t2, p2) in s.distribution(&row(&ctx), &ctx) {
            out.push(((t1 as u32, t2 as u32), p1 * p2));
        }
    }
    out
}

#[test]
fn sampled_speculative_follows_the_target_distribution() {
    // Thousands of tiny forwards: one intra-op thread avoids OpenMP hand-off costs.
    tch::set_num_threads(1);
    let target = model("tiny-dense", 11);
    let draft = model("tiny-dense", 12);
    let prompt = [3u32, 14, 15];
    let base = SamplingConfig {
        temperature: 2.5, // flatten the tiny model's distribution so the test has spread
        top_k: 4,
        ..SamplingConfig::greedy()
    };
    let joint = exact_joint(&target, &prompt, &base);
    let n = 3000;
    let mut counts = std::collections::HashMap::new();
    let mut accepted = 0;
    let mut proposed = 0;
    for seed in 0..n {
        let opts = GenerateOptions {
            max_new_tokens: 2,
            stop_on_eos: false,
            sampling: SamplingConfig {
                seed,
                ..base.clone()
            },
            ..GenerateOptions::default()
        };
        let (g, st) =
            generate_speculative(&target, Draft::Model(&draft), None, &prompt, &opts, 3).unwrap();
        accepted += st.accepted;
        proposed += st.proposed;
        *counts.entry((g.tokens[0], g.tokens[1])).or_insert(0usize) += 1;
    }
    // Pearson chi-square, pooling cells with expected count < 5.
    let (mut chi2, mut cells, mut pool_e, mut pool_o) = (0.0, 0usize, 0.0, 0.0);
    for (pair, p) in &joint {
        let e = p * n as f64;
        let o = *counts.get(pair).unwrap_or(&0) as f64;
        if e < 5.0 {
            pool_e += e;
            pool_o += o;
        } else {
            chi2 += (o - e).powi(2) / e;
            cells += 1;
        }
    }
    if pool_e > 0.0 {
        chi2 += (pool_o - pool_e).powi(2) / pool_e.max(1e-9);
        cells += 1;
    }
    let seen: usize = counts.values().sum();
    assert_eq!(seen, n as usize);
    // Every generated pair is one the target can produce.
    assert!(counts.keys().all(|k| joint.iter().any(|(p, _)| p == k)));
    // 99.9% quantile of chi-square with up to 16 degrees of freedom is 39.25.
    let dof = cells - 1;
    assert!((3..=16).contains(&dof), "dof {dof}");
    println!(
        "chi2 = {chi2:.2} on {dof} dof; acceptance {:.2}",
        accepted as f64 / proposed as f64
    );
    assert!(chi2 < 39.25, "chi2 {chi2} on {dof} dof");
    // And the draft is a different model: some proposals were rejected.
    assert!(accepted < proposed);
}
