//! Acceptance 2 of the text issue: incremental decoding through the KV cache gives the same
//! logits as a full forward (≤ 1e-4, fp32) for a dense and a two-segment preset, batch 1 and
//! batch 3 with left padding. Also: the prefill shortcut (segment 1 only at the last position)
//! is exact, and snapshot/rollback restores the cache.

mod common;

use afm_text::{DType, Decoder, KvCache, Logits, TextModel};
use common::max_abs_diff;
use tch::{Device, Kind, Tensor};

fn model(preset: &str) -> Decoder {
    TextModel::from_preset(preset, 42, Device::Cpu, DType::F32)
        .unwrap()
        .decoder
}

fn ids(v: &[i64]) -> Tensor {
    Tensor::from_slice(v).view([1, v.len() as i64])
}

/// Logits for every position of `seq`: a prefill of `k` tokens, then one token at a time.
fn incremental(d: &Decoder, seq: &[i64], k: usize) -> Tensor {
    let mut cache = d.new_cache(1);
    let mut parts = vec![d
        .forward(&ids(&seq[..k]), None, &mut cache, Logits::All)
        .unwrap()];
    for t in &seq[k..] {
        parts.push(
            d.forward(&ids(&[*t]), None, &mut cache, Logits::All)
                .unwrap(),
        );
    }
    Tensor::cat(&parts, 1)
}

fn sequence(n: usize, seed: i64) -> Vec<i64> {
    (0..n as i64)
        .map(|i| (i * 37 + seed * 11 + 3) % 256)
        .collect()
}

#[test]
fn incremental_equals_full_forward_batch1() {
    let _g = tch::no_grad_guard();
    for preset in ["tiny-dense", "tiny-two-segment"] {
        let d = model(preset);
        let seq = sequence(40, 1);
        let mut cache = d.new_cache(1);
        let full = d
            .forward(&ids(&seq), None, &mut cache, Logits::All)
            .unwrap();
        // The logits must vary by far more than the tolerance for the comparison to mean anything.
        let spread = full.std(false).double_value(&[]);
        assert!(
            spread > 0.1,
            "{preset}: logits too flat ({spread}) to test anything"
        );
        for k in [1, 7, 39] {
            let inc = incremental(&d, &seq, k);
            let diff = max_abs_diff(&full, &inc);
            assert!(diff <= 1e-4, "{preset}, prefill {k}: max |Δ| = {diff}");
        }
        // The prefill shortcut (segment 1 for the last position only) is exact.
        let mut cache = d.new_cache(1);
        let last = d
            .forward(&ids(&seq), None, &mut cache, Logits::Last)
            .unwrap();
        let diff = max_abs_diff(&last, &full.narrow(1, 39, 1));
        assert!(diff <= 1e-5, "{preset}: Last vs All differ by {diff}");
    }
}

#[test]
fn left_padded_batch_matches_each_row_alone() {
    let _g = tch::no_grad_guard();
    for preset in ["tiny-dense", "tiny-two-segment"] {
        let d = model(preset);
        let lens = [12usize, 7, 10];
        let total = 12;
        let rows: Vec<Vec<i64>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| sequence(n, i as i64))
            .collect();
        let extra: Vec<Vec<i64>> = (0..3).map(|i| sequence(5, 10 + i as i64)).collect();

        // Batch: left-pad the prompts to 12, then decode 5 tokens one at a time.
        let mut flat = Vec::new();
        let mut mask = Vec::new();
        for r in &rows {
            flat.extend(std::iter::repeat_n(0i64, total - r.len()));
            flat.extend(r);
            mask.extend(std::iter::repeat_n(0i64, total - r.len()));
            mask.extend(std::iter::repeat_n(1i64, r.len()));
        }
        let batch_ids = Tensor::from_slice(&flat).view([3, total as i64]);
        let batch_mask = Tensor::from_slice(&mask).view([3, total as i64]);
        let mut cache = d.new_cache(3);
        let prefill = d
            .forward(&batch_ids, Some(&batch_mask), &mut cache, Logits::All)
            .unwrap();
        let mut steps = Vec::new();
        for j in 0..5 {
            let col: Vec<i64> = extra.iter().map(|e| e[j]).collect();
            steps.push(
                d.forward(
                    &Tensor::from_slice(&col).view([3, 1]),
                    None,
                    &mut cache,
                    Logits::All,
                )
                .unwrap(),
            );
        }
        let decoded = Tensor::cat(&steps, 1); // [3, 5, vocab]

        for (i, r) in rows.iter().enumerate() {
            let mut alone: Vec<i64> = r.clone();
            alone.extend(&extra[i]);
            let mut c1 = d.new_cache(1);
            let full = d
                .forward(&ids(&alone), None, &mut c1, Logits::All)
                .unwrap()
                .squeeze_dim(0);
            let n = r.len() as i64;
            let ours_prompt = prefill.get(i as i64).narrow(0, total as i64 - n, n);
            let diff = max_abs_diff(&ours_prompt, &full.narrow(0, 0, n));
            assert!(diff <= 1e-4, "{preset} row {i} prompt: max |Δ| = {diff}");
            let diff = max_abs_diff(&decoded.get(i as i64), &full.narrow(0, n, 5));
            assert!(diff <= 1e-4, "{preset} row {i} decode: max |Δ| = {diff}");
        }
    }
}

#[test]
fn rollback_then_redecode_is_identical() {
    let _g = tch::no_grad_guard();
    let d = model("tiny-two-segment");
    let seq = sequence(20, 3);
    let mut cache: KvCache = d.new_cache(1);
    let _ = d
        .forward(&ids(&seq[..10]), None, &mut cache, Logits::Last)
        .unwrap();
    let snap = cache.snapshot();
    let a = d
        .forward(&ids(&seq[10..15]), None, &mut cache, Logits::All)
        .unwrap();
    cache.rollback(&snap).unwrap();
    // A different continuation in between must leave no trace.
    let _ = d
        .forward(&ids(&[5, 6, 7]), None, &mut cache, Logits::All)
        .unwrap();
    cache.rollback(&snap).unwrap();
    let b = d
        .forward(&ids(&seq[10..15]), None, &mut cache, Logits::All)
        .unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // Fork: extending the copy leaves the original usable.
    let fork = cache.fork().unwrap();
    assert_eq!(fork.len(), cache.len());
    assert_eq!(a.kind(), Kind::Float);
}
