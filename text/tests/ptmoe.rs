//! The server decoder (PT-MoE), issue 7's acceptance tests:
//! 1. incremental decoding equals a full forward (≤ 1e-4, fp32) with prompts of 3× the window,
//!    so the sliding-window rings wrap;
//! 2. the MoE block matches HF transformers' `MixtralSparseMoeBlock` on the same weights
//!    (≤ 1e-5; the reference is built by tests/reference/hf_mixtral_moe.py);
//! 3. sliding-window attention through the ring cache matches dense attention with the
//!    equivalent band mask;
//! 4. (measured half) local-layer KV memory is flat beyond the window.
//!
//! Plus: concurrent tracks equal sequential ones exactly, left-padded batches, ring rollback
//! within its slack (and a clear error beyond it), and generation through `CausalLm`.

mod common;

use afm_text::attention::{Attention, StepMask};
use afm_text::decoder::weight_shapes;
use afm_text::generation::{generate_lm, CausalLm};
use afm_text::kv_cache::{CacheKind, KvCache};
use afm_text::moe::MoeFfn;
use afm_text::presets::preset;
use afm_text::ptmoe::{measure_local_kv_bytes, ptmoe_weight_shapes};
use afm_text::ptmoe_config::ptmoe_preset;
use afm_text::rope::Rope;
use afm_text::weights::WeightMap;
use afm_text::{GenerateOptions, Logits, PtMoe, TrackExec};
use common::{ids, max_abs_diff, repo_root, sequence, venv_python_with};
use tch::{Device, Kind, Tensor};

fn model(name: &str) -> PtMoe {
    let cfg = ptmoe_preset(name).unwrap();
    PtMoe::random(&cfg, 7, Device::Cpu, Kind::Float, &[]).unwrap()
}

/// Logits of every position, feeding `seq` in chunks of the given sizes (the rest one by one).
fn chunked(m: &PtMoe, seq: &[i64], chunks: &[usize]) -> Tensor {
    let mut cache = m.new_cache(1);
    let mut parts = Vec::new();
    let mut at = 0;
    for &c in chunks {
        parts.push(
            m.forward(&ids(&seq[at..at + c]), None, &mut cache, Logits::All)
                .unwrap(),
        );
        at += c;
    }
    for t in &seq[at..] {
        parts.push(
            m.forward(&ids(&[*t]), None, &mut cache, Logits::All)
                .unwrap(),
        );
    }
    Tensor::cat(&parts, 1)
}

#[test]
fn incremental_equals_full_forward_with_wrapped_rings() {
    let _g = tch::no_grad_guard();
    for name in ["tiny-ptmoe", "tiny-ptmoe-3track"] {
        let cfg = ptmoe_preset(name).unwrap();
        let weights = WeightMap::random(
            &ptmoe_weight_shapes(&cfg),
            7,
            0.02,
            Device::Cpu,
            Kind::Float,
        )
        .unwrap();
        let m = PtMoe::new(&cfg, &weights, &[]).unwrap();
        let w = m.cfg.sliding_window;
        let vocab = m.cfg.vocab_size as i64;
        let seq = sequence(3 * w + 5, 1, vocab);
        let mut cache = m.new_cache(1);
        let full = m
            .forward(&ids(&seq), None, &mut cache, Logits::All)
            .unwrap();
        let spread = full.std(false).double_value(&[]);
        assert!(spread > 0.1, "{name}: logits too flat ({spread})");
        // Prompt of 3× the window then token by token; window-straddling chunks; all single.
        for chunks in [vec![3 * w], vec![w + 3, 2 * w - 1, 1, 2], vec![1]] {
            let inc = chunked(&m, &seq, &chunks);
            let diff = max_abs_diff(&full, &inc);
            eprintln!("{name}, chunks {chunks:?}: max |Δ| = {diff:e}");
            assert!(diff <= 1e-4, "{name}, chunks {chunks:?}: max |Δ| = {diff}");
        }
        // The window matters: with a longer window the logits past it differ.
        let mut wide_cfg = m.cfg.clone();
        wide_cfg.sliding_window = 4 * w;
        // Same weights as `m` (one map: the global RNG is shared with parallel tests).
        let wide = PtMoe::new(&wide_cfg, &weights, &[]).unwrap();
        let mut c = wide.new_cache(1);
        let wl = wide.forward(&ids(&seq), None, &mut c, Logits::All).unwrap();
        let n = seq.len() as i64;
        assert!(max_abs_diff(&wl.narrow(1, 0, w as i64), &full.narrow(1, 0, w as i64)) <= 1e-5);
        assert!(
            max_abs_diff(
                &wl.narrow(1, w as i64, n - w as i64),
                &full.narrow(1, w as i64, n - w as i64)
            ) > 1e-3
        );
    }
}

#[test]
fn concurrent_tracks_equal_sequential_and_last_equals_all() {
    let _g = tch::no_grad_guard();
    let mut m = model("tiny-ptmoe");
    let seq = sequence(30, 2, 256);
    let mut c = m.new_cache(1);
    let conc = m.forward(&ids(&seq), None, &mut c, Logits::All).unwrap();
    let step_c = m.forward(&ids(&[5]), None, &mut c, Logits::All).unwrap();
    m.set_exec(TrackExec::Sequential);
    let mut c = m.new_cache(1);
    let seqv = m.forward(&ids(&seq), None, &mut c, Logits::All).unwrap();
    let step_s = m.forward(&ids(&[5]), None, &mut c, Logits::All).unwrap();
    assert!(max_abs_diff(&conc, &seqv) <= 1e-6);
    assert!(max_abs_diff(&step_c, &step_s) <= 1e-6);
    let mut c = m.new_cache(1);
    let last = m.forward(&ids(&seq), None, &mut c, Logits::Last).unwrap();
    assert!(max_abs_diff(&last, &seqv.narrow(1, 29, 1)) <= 1e-5);
    assert_eq!(m.sync_points_per_forward(), m.cfg.num_track_blocks);
}

#[test]
fn left_padded_batch_matches_each_row_alone() {
    let _g = tch::no_grad_guard();
    let m = model("tiny-ptmoe");
    let lens = [20usize, 9, 14];
    let total = 20;
    let rows: Vec<Vec<i64>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| sequence(n, i as i64, 256))
        .collect();
    let extra: Vec<Vec<i64>> = (0..3).map(|i| sequence(10, 10 + i as i64, 256)).collect();
    let mut flat = Vec::new();
    let mut mask = Vec::new();
    for r in &rows {
        flat.extend(std::iter::repeat_n(0i64, total - r.len()));
        flat.extend(r);
        mask.extend(std::iter::repeat_n(0i64, total - r.len()));
        mask.extend(std::iter::repeat_n(1i64, r.len()));
    }
    let mut cache = m.new_cache(3);
    let prefill = m
        .forward(
            &Tensor::from_slice(&flat).view([3, total as i64]),
            Some(&Tensor::from_slice(&mask).view([3, total as i64])),
            &mut cache,
            Logits::All,
        )
        .unwrap();
    let mut steps = Vec::new();
    for j in 0..10 {
        let col: Vec<i64> = extra.iter().map(|e| e[j]).collect();
        steps.push(
            m.forward(
                &Tensor::from_slice(&col).view([3, 1]),
                None,
                &mut cache,
                Logits::All,
            )
            .unwrap(),
        );
    }
    let decoded = Tensor::cat(&steps, 1);
    for (i, r) in rows.iter().enumerate() {
        let mut alone = r.clone();
        alone.extend(&extra[i]);
        let mut c1 = m.new_cache(1);
        let full = m
            .forward(&ids(&alone), None, &mut c1, Logits::All)
            .unwrap()
            .squeeze_dim(0);
        let n = r.len() as i64;
        let ours = prefill.get(i as i64).narrow(0, total as i64 - n, n);
        let d1 = max_abs_diff(&ours, &full.narrow(0, 0, n));
        let d2 = max_abs_diff(&decoded.get(i as i64), &full.narrow(0, n, 10));
        assert!(
            d1 <= 1e-4 && d2 <= 1e-4,
            "row {i}: prompt {d1}, decode {d2}"
        );
    }
}

#[test]
fn ring_rollback_within_slack_and_refused_beyond() {
    let _g = tch::no_grad_guard();
    let mut m = model("tiny-ptmoe");
    m.set_ring_slack(4);
    let seq = sequence(40, 3, 256);
    let mut cache = m.new_cache(1);
    let _ = m
        .forward(&ids(&seq[..30]), None, &mut cache, Logits::Last)
        .unwrap();
    let snap = cache.snapshot();
    let a = m
        .forward(&ids(&seq[30..33]), None, &mut cache, Logits::All)
        .unwrap();
    cache.rollback(&snap).unwrap();
    let _ = m
        .forward(&ids(&[9, 8]), None, &mut cache, Logits::All)
        .unwrap();
    cache.rollback(&snap).unwrap();
    let b = m
        .forward(&ids(&seq[30..33]), None, &mut cache, Logits::All)
        .unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    // The same continuation from a fresh cache.
    let mut fresh = m.new_cache(1);
    let _ = m
        .forward(&ids(&seq[..30]), None, &mut fresh, Logits::Last)
        .unwrap();
    let c = m
        .forward(&ids(&seq[30..33]), None, &mut fresh, Logits::All)
        .unwrap();
    assert!(max_abs_diff(&a, &c) <= 1e-5);
    // Beyond the slack the ring has lost keys: refused, cache untouched.
    let snap = cache.snapshot();
    let len = cache.len();
    let _ = m
        .forward(&ids(&seq[33..39]), None, &mut cache, Logits::All)
        .unwrap();
    let err = cache.rollback(&snap).unwrap_err().to_string();
    assert!(err.contains("sliding-window"), "{err}");
    assert_eq!(cache.len(), len + 6);
}

#[test]
fn local_kv_memory_is_flat_beyond_the_window() {
    let _g = tch::no_grad_guard();
    let m = model("tiny-ptmoe");
    let w = m.cfg.sliding_window;
    let per_layer_token = m.cfg.kv_bytes_per_token_per_layer(4);
    let mut local = Vec::new();
    for mult in [1usize, 4, 16] {
        let mut cache = m.new_cache(1);
        let seq = sequence(mult * w, 4, 256);
        let _ = m
            .forward(&ids(&seq), None, &mut cache, Logits::Last)
            .unwrap();
        let c = &cache.tracks[0];
        let (mut l, mut g) = (0, 0);
        for j in 0..c.num_layers() {
            if m.cfg.is_global(j) {
                g += c.layer_bytes(j);
            } else {
                l += c.layer_bytes(j);
            }
        }
        let (nl, _) = m.cfg.local_global_layers();
        assert_eq!(l, nl * w * per_layer_token, "local bytes at {mult}× window");
        assert!(
            g >= mult * w * per_layer_token,
            "global layers hold every token"
        );
        local.push(l);
    }
    assert_eq!(local[0], local[1]);
    assert_eq!(local[1], local[2]);
    // The server preset's geometry, measured on a real ring (what `inspect` prints).
    let cfg = ptmoe_preset("afm-server-ptmoe").unwrap();
    let w = cfg.sliding_window;
    let measured: Vec<u64> = [1, 4, 16]
        .iter()
        .map(|m| measure_local_kv_bytes(&cfg, m * w, Kind::BFloat16).unwrap())
        .collect();
    assert_eq!(measured, vec![cfg.kv_bytes_at(w, 2).0; 3]);
}

#[test]
fn sliding_window_attention_matches_band_mask() {
    let _g = tch::no_grad_guard();
    let cfg = preset("tiny-dense").unwrap();
    let shapes: Vec<_> = weight_shapes(&cfg)
        .into_iter()
        .filter(|(n, _)| n.starts_with("model.layers.0.self_attn"))
        .collect();
    let w = WeightMap::random(&shapes, 3, 0.2, Device::Cpu, Kind::Float).unwrap();
    let attn = Attention::new(&cfg, &w, 0).unwrap();
    let rope = Rope::new(&cfg, Device::Cpu, Kind::Float).unwrap();
    let window = 5i64;
    let n = 23i64;
    tch::manual_seed(11);
    let x = Tensor::randn([1, n, 64], (Kind::Float, Device::Cpu));

    // Dense reference: the whole sequence, band mask i − window < j ≤ i.
    let mut band = Vec::new();
    for i in 0..n {
        for j in 0..n {
            band.push(u8::from(j <= i && i - j < window));
        }
    }
    let band = Tensor::from_slice(&band)
        .view([1, 1, n, n])
        .to_kind(Kind::Bool);
    let mut dense = KvCache::new(&[None], 1, Device::Cpu);
    let pos = dense.begin_step(n, None).unwrap();
    let (cos, sin) = rope.cos_sin(&pos, n, Kind::Float).unwrap();
    let reference = attn
        .forward(
            &x,
            &cos,
            &sin,
            &StepMask {
                mask: Some(band),
                is_causal: false,
            },
            &mut dense,
        )
        .unwrap();

    // Ring cache, chunks shorter and longer than the window, and single tokens.
    for slack in [0i64, 3] {
        let mut ring =
            KvCache::with_kinds(&[CacheKind::Rotating { window, slack }], 1, Device::Cpu);
        let mut outs = Vec::new();
        let mut at = 0i64;
        for c in [3i64, 1, 1, 7, 1, 1, 1, 6, 1, 1] {
            let past = ring.len();
            let pos = ring.begin_step(c, None).unwrap();
            let (cos, sin) = rope.cos_sin(&pos, past + c, Kind::Float).unwrap();
            let mask = StepMask::sliding(
                c,
                past,
                window,
                window + slack,
                ring.key_mask(),
                Device::Cpu,
            )
            .unwrap();
            outs.push(
                attn.forward(&x.narrow(1, at, c), &cos, &sin, &mask, &mut ring)
                    .unwrap(),
            );
            at += c;
        }
        assert_eq!(at, n);
        let ours = Tensor::cat(&outs, 1);
        let diff = max_abs_diff(&ours, &reference);
        eprintln!("sliding window vs band mask (slack {slack}): max |Δ| = {diff:e}");
        assert!(diff <= 1e-5, "slack {slack}: max |Δ| = {diff}");
        assert_eq!(
            ring.allocated_bytes(),
            (2 * 2 * (window + slack) * 16 * 4) as usize
        );
    }
}

#[test]
fn moe_matches_hf_mixtral_sparse_moe_block() {
    let Some(py) = venv_python_with("transformers") else {
        return;
    };
    let _g = tch::no_grad_guard();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("moe.safetensors");
    let script = repo_root().join("text/tests/reference/hf_mixtral_moe.py");
    let status = std::process::Command::new(&py)
        .arg(&script)
        .arg(&out)
        .env("OMP_NUM_THREADS", "1")
        .status()
        .unwrap();
    assert!(status.success(), "{} failed", script.display());
    let tensors = Tensor::read_safetensors(&out).unwrap();
    let mut w = WeightMap::new(Device::Cpu, Kind::Float);
    let file = w.add_file(&out);
    for (name, t) in tensors {
        w.insert(name, t, file);
    }
    let meta: Vec<i64> = Vec::try_from(w.get_kind("meta", &[4], Kind::Int64).unwrap()).unwrap();
    let (h, f, e, k) = (meta[0], meta[1], meta[2] as usize, meta[3] as usize);
    let moe = MoeFfn::new(&w, "moe", h, f, e, k, true).unwrap();
    let x = w.get("x", &[3, 7, h]).unwrap();
    let o = moe.forward_full(&x).unwrap();
    let y = w.get("y", &[3, 7, h]).unwrap();
    let diff = max_abs_diff(&o.hidden, &y);
    let ldiff = max_abs_diff(
        &o.router_logits,
        &w.get("router_logits", &[21, e as i64]).unwrap(),
    );
    let aux_ref = w.get("aux", &[1]).unwrap().double_value(&[0]);
    let aux = o.aux_loss.double_value(&[]);
    eprintln!(
        "MoE vs HF Mixtral: max |Δ| = {diff:e}, router logits {ldiff:e}, aux {aux} vs {aux_ref}"
    );
    assert!(
        y.abs().max().double_value(&[]) > 0.1,
        "reference output too small to test"
    );
    assert!(diff <= 1e-5, "MoE output max |Δ| = {diff}");
    assert!(ldiff <= 1e-5);
    assert!((aux - aux_ref).abs() <= 1e-5, "aux {aux} vs HF {aux_ref}");
}

#[test]
fn generation_runs_through_causal_lm() {
    let m = model("tiny-ptmoe");
    let prompt: Vec<u32> = (0..20).map(|i| (i * 13 + 5) % 256).collect();
    let opts = GenerateOptions {
        max_new_tokens: 6,
        stop_on_eos: false,
        ..GenerateOptions::default()
    };
    let g = generate_lm(&m, None, &prompt, &opts, &mut |_| {}).unwrap();
    assert_eq!(g.tokens.len(), 6);
    // Greedy: each token is the argmax of a full forward over everything before it.
    let _g = tch::no_grad_guard();
    let mut all: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    for &t in &g.tokens {
        let mut c = m.new_lm_cache(1);
        let l = m
            .forward_lm(&ids(&all), None, &mut c, Logits::Last)
            .unwrap();
        assert_eq!(l.argmax(-1, false).int64_value(&[0, 0]), t as i64);
        all.push(t as i64);
    }
}

/// Experts, router, attention and head held as GGUF Q8_0 blocks: decode steps read them with
/// the block kernels (int16 activations) and follow a dense model holding the blocks'
/// dequantised values, prefill and incremental steps alike.
#[test]
fn experts_and_router_run_on_the_block_kernels() {
    use afm_text::gguf::GgmlType;
    use afm_text::linear::LinearWeight;
    use afm_text::quant::ggml::GgmlWeight;
    let _g = tch::no_grad_guard();
    let (mut q, mut d) = (model("tiny-ptmoe"), model("tiny-ptmoe"));
    let mut blocks = 0;
    for ((name, lq), (_, ld)) in q.linears_mut().into_iter().zip(d.linears_mut()) {
        let LinearWeight::Dense(w) = lq.weight() else {
            unreachable!()
        };
        let (o, i) = (w.size()[0], w.size()[1]);
        if i % 32 != 0 {
            continue;
        }
        // Weights of order 1 (N(0, 0.02²) would leave logits of order 0.01).
        let v: Vec<f32> = Vec::<f32>::try_from(w.flatten(0, -1))
            .unwrap()
            .iter()
            .map(|x| x * 25.0)
            .collect();
        let g = GgmlWeight::quantize(GgmlType::Q8_0, &v, o, i).unwrap();
        ld.set_weight(LinearWeight::Dense(g.dequantize(Kind::Float).unwrap()));
        lq.set_weight(LinearWeight::Ggml(Box::new(g)));
        blocks += name.contains("experts") as usize;
    }
    assert!(blocks > 0, "no expert projection was quantized");
    let seq = sequence(24, 3, q.cfg.vocab_size as i64);
    let (a, b) = (chunked(&q, &seq, &[8]), chunked(&d, &seq, &[8]));
    let scale = f64::try_from(b.abs().max()).unwrap();
    let diff = max_abs_diff(&a, &b);
    // int16 activations: ~1e-3 of the logit scale (a wrong kernel is off by the scale itself).
    assert!(
        scale > 0.1 && diff <= 5e-3 * scale,
        "blocks vs dequantised: {diff} (scale {scale})"
    );
}
