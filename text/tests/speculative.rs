//! Speculative decoding keeps the target's distribution: greedy output is token-for-token
//! identical to plain greedy, and with sampling the generated tokens follow the target's
//! distribution (chi-square against the exact target probabilities, fixed seeds).

use afm_text::generation::{generate, generate_lm, ids_tensor, CausalLm};
use afm_text::ptmoe_config::ptmoe_preset;
use afm_text::sampling::Sampler;
use afm_text::speculative::{generate_speculative, Draft, SpeculativeLm};
use afm_text::{DType, Decoder, GenerateOptions, Logits, PtMoe, SamplingConfig, TextModel};
use tch::{Device, Kind};

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
    let (spec, _) = generate_speculative(
        &two,
        Draft::<Decoder>::SelfPrefix(2),
        None,
        &[1, 2, 3],
        &opts,
        4,
    )
    .unwrap();
    assert_eq!(spec.tokens, plain.tokens);
    assert!(
        generate_speculative(&two, Draft::<Decoder>::SelfPrefix(5), None, &[1], &opts, 4).is_err()
    );
}

/// A PT-MoE preset with random weights and the default caches (rings of exactly the window):
/// `generate_speculative` makes its own caches with the slack its rollbacks need.
fn ptmoe(preset: &str, seed: i64) -> PtMoe {
    let cfg = ptmoe_preset(preset).unwrap();
    PtMoe::random(&cfg, seed, Device::Cpu, Kind::Float, &[]).unwrap()
}

/// Exact target probabilities of the first two tokens after `prompt` under `cfg`.
fn exact_joint<M: CausalLm>(
    target: &M,
    prompt: &[u32],
    cfg: &SamplingConfig,
) -> Vec<((u32, u32), f64)> {
    let s = Sampler::new(cfg.clone());
    let _g = tch::no_grad_guard();
    let row = |ids: &[u32]| -> Vec<f32> {
        let mut c = target.new_lm_cache(1);
        let l = target
            .forward_lm(&ids_tensor(ids).unwrap(), None, &mut c, Logits::Last)
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

/// Draws the first two tokens after `prompt` `n` times (seeds 0..n) with speculative
/// sampling and checks them against the target's exact joint distribution with Pearson's
/// chi-square (cells with expected count < 5 pooled), at the 99.9% quantile. Returns the
/// acceptance rate.
fn check_sampled_distribution<T: SpeculativeLm, D: SpeculativeLm>(
    target: &T,
    draft: Draft<'_, D>,
    prompt: &[u32],
    n: u64,
) -> f64 {
    let base = SamplingConfig {
        temperature: 2.5, // flatten the tiny model's distribution so the test has spread
        top_k: 4,
        ..SamplingConfig::greedy()
    };
    let joint = exact_joint(target, prompt, &base);
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
        let (g, st) = generate_speculative(target, draft, None, prompt, &opts, 3).unwrap();
        accepted += st.accepted;
        proposed += st.proposed;
        *counts.entry((g.tokens[0], g.tokens[1])).or_insert(0usize) += 1;
    }
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
    let rate = accepted as f64 / proposed as f64;
    println!("chi2 = {chi2:.2} on {dof} dof; acceptance {rate:.2}");
    assert!(chi2 < 39.25, "chi2 {chi2} on {dof} dof");
    rate
}

#[test]
fn sampled_speculative_follows_the_target_distribution() {
    // Thousands of tiny forwards: one intra-op thread avoids OpenMP hand-off costs.
    tch::set_num_threads(1);
    let target = model("tiny-dense", 11);
    let draft = model("tiny-dense", 12);
    let rate = check_sampled_distribution(&target, Draft::Model(&draft), &[3, 14, 15], 3000);
    // The draft is a different model: some proposals were rejected.
    assert!(rate < 1.0);
}

#[test]
fn ptmoe_greedy_speculative_equals_plain_greedy() {
    // Prompts longer than the window (8) so the sliding-window rings wrap and rollbacks
    // happen inside wrapped rings; drafts: the target's first track block, another PT-MoE,
    // and a dense decoder with the same vocabulary.
    let k_max = 5;
    let target = ptmoe("tiny-ptmoe", 1);
    let other = ptmoe("tiny-ptmoe", 2);
    let dense = model("tiny-dense", 3);
    assert_eq!(dense.vocab_size(), target.vocab_size());
    let opts = GenerateOptions {
        max_new_tokens: 30,
        stop_on_eos: false,
        ..GenerateOptions::default()
    };
    for prompt in [
        vec![5u32, 9, 200, 3],
        (0..30).map(|i| (i * 7 + 1) % 256).collect(),
    ] {
        let plain = generate_lm(&target, None, &prompt, &opts, &mut |_| {}).unwrap();
        for k in [1, 3, k_max] {
            let runs = [
                generate_speculative(
                    &target,
                    Draft::<PtMoe>::SelfPrefix(1),
                    None,
                    &prompt,
                    &opts,
                    k,
                ),
                generate_speculative(&target, Draft::Model(&other), None, &prompt, &opts, k),
                generate_speculative(&target, Draft::Model(&target), None, &prompt, &opts, k),
                generate_speculative(&target, Draft::Model(&dense), None, &prompt, &opts, k),
            ];
            for (i, r) in runs.into_iter().enumerate() {
                let (spec, st) = r.unwrap();
                assert_eq!(spec.tokens, plain.tokens, "draft {i}, k={k}");
                assert!(st.target_forwards <= plain.tokens.len());
                if i == 2 {
                    assert_eq!(st.accepted, st.proposed, "the target drafting for itself");
                }
            }
        }
    }
    // A self-draft must be a strict prefix of the blocks.
    assert!(
        generate_speculative(&target, Draft::<PtMoe>::SelfPrefix(3), None, &[1], &opts, 4).is_err()
    );
    // A cache without slack cannot roll back once its rings have wrapped, and says so; with
    // slack it can, and continuing from the rolled-back cache equals a fresh forward.
    let _g = tch::no_grad_guard();
    let ids: Vec<u32> = (0..30).collect();
    let blocks = target.blocks.len();
    let mut tight = target.new_cache_slack(1, blocks, 0);
    let _ = target
        .forward_lm(&ids_tensor(&ids).unwrap(), None, &mut tight, Logits::Last)
        .unwrap();
    match PtMoe::truncate_cache(&mut tight, 27) {
        Err(e) => assert!(e.to_string().contains("ring"), "{e}"),
        Ok(_) => panic!("a wrapped ring without slack rolled back"),
    }
    let mut roomy = target.new_cache_slack(1, blocks, 3);
    let _ = target
        .forward_lm(&ids_tensor(&ids).unwrap(), None, &mut roomy, Logits::Last)
        .unwrap();
    PtMoe::truncate_cache(&mut roomy, 27).unwrap();
    let next = target
        .forward_lm(
            &ids_tensor(&[ids[27]]).unwrap(),
            None,
            &mut roomy,
            Logits::Last,
        )
        .unwrap();
    let mut fresh = target.new_cache_slack(1, blocks, 3);
    let want = target
        .forward_lm(
            &ids_tensor(&ids[..28]).unwrap(),
            None,
            &mut fresh,
            Logits::Last,
        )
        .unwrap();
    let d = (&next - &want).abs().max().double_value(&[]);
    assert!(d <= 1e-4, "rolled back and continued vs fresh: {d}");
}

#[test]
fn ptmoe_sampled_speculative_follows_the_target_distribution() {
    tch::set_num_threads(1);
    let target = ptmoe("tiny-ptmoe", 11);
    let rate =
        check_sampled_distribution(&target, Draft::<PtMoe>::SelfPrefix(1), &[3, 14, 15], 2000);
    assert!(rate < 1.0);
}
