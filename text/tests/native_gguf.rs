//! The shipped Q4_1 GGUF run natively: `convert_gguf(keep_blocks)` keeps llama.cpp's blocks
//! byte for byte, the blocks dequantise to exactly the fp32 model's weights, and greedy
//! decoding with them (block kernels, int8 activations, the fused CPU step) follows the
//! dequantised fp32 model on the held prompts of `hf_parity.rs`; where a token differs, the
//! fp32 model itself had the two candidates within a stated margin (activation rounding).

mod common;

use afm_text::generation::{generate, ids_tensor};
use afm_text::gguf::GgufFile;
use afm_text::linear::LinearWeight;
use afm_text::quant::ggml::Acts;
use afm_text::{DType, GenerateOptions, Logits, TextModel};
use common::*;
use tch::{Device, Kind};

/// Largest top-1 − chosen logit gap under the fp32 model at a step where the native model
/// picked another token: activation rounding (int8 per 32 values) moves logits by ~0.5 on this
/// model (scale ~30), so only near-ties may flip.
const FLIP_MARGIN: f64 = 1.0;

/// The last position's logits after a libtorch prefill of `ids`, and those of one decode step
/// (the fused step) after it.
fn prefill_and_step(m: &TextModel, ids: &[u32]) -> (tch::Tensor, tch::Tensor) {
    let mut c = m.decoder.new_cache(1);
    let pre = m
        .decoder
        .forward(&ids_tensor(ids).unwrap(), None, &mut c, Logits::Last)
        .unwrap();
    assert!(m.decoder.fused_decode_applies(&c));
    let step = m
        .decoder
        .forward(&ids_tensor(&[ids[0]]).unwrap(), None, &mut c, Logits::Last)
        .unwrap();
    (pre, step)
}

#[test]
fn shipped_q4_1_runs_natively_and_follows_the_fp32_model() {
    let (Some(dir), Some(gguf)) = (fp32_model(), smollm2_gguf()) else {
        return;
    };
    let _g = tch::no_grad_guard();
    let tmp = tempfile::tempdir().unwrap();
    let native_dir = tmp.path().join("q4_1");
    afm_text::convert::convert_gguf(&gguf, &native_dir, Kind::Float, true, |_, _| {}).unwrap();

    // Byte for byte: a tensor llama.cpp did not permute is the GGUF's own bytes.
    let g = GgufFile::open(&gguf).unwrap();
    let info = g
        .tensors
        .iter()
        .find(|t| t.name == "blk.3.ffn_down.weight")
        .unwrap();
    let (ty, bytes) = g.raw_bytes(info).unwrap();
    assert_eq!(ty.name(), "Q4_1");
    let mut native = TextModel::load(&native_dir, Device::Cpu, DType::F32).unwrap();
    let LinearWeight::Ggml(down) = native.decoder.layers[3].mlp.down.weight() else {
        panic!("ffn_down is not kept as blocks");
    };
    assert_eq!(down.bytes(), bytes);

    // Every projection and the tied Q8_0 head dequantise to exactly the fp32 model's weights
    // (q/k rows reordered the same way in both).
    let mut fp32 = TextModel::load(&dir, Device::Cpu, DType::F32).unwrap();
    let mut blocks = 0;
    let same_weights = |name: &str, a: &LinearWeight, b: &LinearWeight| {
        let (LinearWeight::Ggml(q), LinearWeight::Dense(w)) = (a, b) else {
            panic!("{name}: expected blocks vs dense");
        };
        let diff = max_abs_diff(&q.dequantize(Kind::Float).unwrap(), w);
        assert_eq!(diff, 0.0, "{name}");
    };
    same_weights(
        "lm_head",
        native.decoder.lm_head.weight(),
        fp32.decoder.lm_head.weight(),
    );
    blocks += 1;
    for ((name, a), (_, b)) in native
        .decoder
        .linears_mut()
        .into_iter()
        .zip(fp32.decoder.linears_mut())
    {
        same_weights(&name, a.weight(), b.weight());
        blocks += 1;
    }
    assert_eq!(blocks, 30 * 7 + 1);
    let bytes_native = native.decoder.decode_bytes_per_token();
    let bytes_fp32 = fp32.decoder.decode_bytes_per_token();
    println!("decode reads {bytes_native} bytes/token natively vs {bytes_fp32} as fp32");
    assert!(bytes_native * 5 < bytes_fp32);

    // Greedy, 32 tokens, held prompts, int8 activations (llama.cpp's arithmetic).
    afm_text::quant::ggml::set_activations(Acts::Int8);
    let opts = GenerateOptions {
        max_new_tokens: 32,
        stop_on_eos: false,
        ..GenerateOptions::default()
    };
    let mut identical = 0;
    for p in PROMPTS {
        let ids = fp32.prompt_ids(p, false).unwrap();
        // The native model's last-position logits after the prompt (libtorch prefill with the
        // blocks dequantised) and the first decode step (fused, int8 activations).
        let (ln, sn) = prefill_and_step(&native, &ids);
        let (lf, sf) = prefill_and_step(&fp32, &ids);
        // The layers ran dequantised (a 9+-token prefill); the last position's head ran the
        // Q8_0 block kernel with int8 activations.
        let dpre = max_abs_diff(&ln, &lf);
        let scale = f64::try_from(lf.abs().max()).unwrap();
        println!("{p:?}: prefill last-position max |Δlogit| {dpre:.3} (scale {scale:.1})");
        assert!(dpre < 0.02 * scale, "prefill logits");
        let dstep = max_abs_diff(&sn, &sf);
        let scale = f64::try_from(sf.abs().max()).unwrap();
        println!("{p:?}: fused int8 step vs fp32 max |Δlogit| {dstep:.3} (scale {scale:.1})");
        assert!(dstep < 0.05 * scale, "decode step logits");

        let a = generate(&native.decoder, None, &ids, &opts, &mut |_| {}).unwrap();
        let b = generate(&fp32.decoder, None, &ids, &opts, &mut |_| {}).unwrap();
        let same = a
            .tokens
            .iter()
            .zip(&b.tokens)
            .take_while(|(x, y)| x == y)
            .count();
        if same == a.tokens.len() {
            identical += 1;
            continue;
        }
        // The fp32 model's view of the step where they part: both candidates near the top.
        let mut ctx = ids.clone();
        ctx.extend(&b.tokens[..same]);
        let mut c = fp32.decoder.new_cache(1);
        let l = fp32
            .decoder
            .forward(&ids_tensor(&ctx).unwrap(), None, &mut c, Logits::Last)
            .unwrap()
            .flatten(0, -1);
        let gap =
            l.double_value(&[b.tokens[same] as i64]) - l.double_value(&[a.tokens[same] as i64]);
        println!("{p:?}: same first {same} tokens; fp32 margin there {gap:.3}");
        assert!(
            gap <= FLIP_MARGIN,
            "{p:?}: token {same} differs by a margin of {gap}"
        );
    }
    println!(
        "{identical}/{} prompts: 32 greedy tokens identical",
        PROMPTS.len()
    );

    // With int16 (the default) or fp32 activations the block kernels follow the dequantised
    // model to fp32 rounding: the same greedy tokens on every held prompt, and Paris.
    for mode in [Acts::Int16, Acts::F32] {
        afm_text::quant::ggml::set_activations(mode);
        for p in PROMPTS {
            let ids = fp32.prompt_ids(p, false).unwrap();
            let (_, sn) = prefill_and_step(&native, &ids);
            let (_, sf) = prefill_and_step(&fp32, &ids);
            let d = max_abs_diff(&sn, &sf);
            println!(
                "{p:?}: {}-activation step vs fp32 model max |Δlogit| {d:.2e}",
                mode.name()
            );
            // int16 rounds each activation to 1/65534 of its block's range (a few 1e-3 on a
            // logit scale of 22–28); fp32 differs only in summation order.
            let bound = if mode == Acts::F32 { 1e-3 } else { 1e-2 };
            assert!(d < bound, "{p:?}: {d}");
            let tok = native.tokenizer.as_ref();
            let a = generate(&native.decoder, tok, &ids, &opts, &mut |_| {}).unwrap();
            let b = generate(
                &fp32.decoder,
                fp32.tokenizer.as_ref(),
                &ids,
                &opts,
                &mut |_| {},
            )
            .unwrap();
            assert_eq!(a.tokens, b.tokens, "{p:?} ({})", mode.name());
            if p.contains("France") {
                assert!(a.text.contains("Paris"), "{:?}", a.text);
            }
        }
    }
    afm_text::quant::ggml::set_activations(Acts::default());
}

/// The default text model set-up writes keeps the GGUF's blocks: every projection is a block
/// weight and a tensor llama.cpp did not permute is the file's own bytes.
#[test]
fn default_model_is_the_shipped_blocks() {
    let (Some(dir), Some(gguf)) = (default_model(), smollm2_gguf()) else {
        return;
    };
    let mut m = TextModel::load(&dir, Device::Cpu, DType::F32).unwrap();
    let g = GgufFile::open(&gguf).unwrap();
    for (layer, name) in [(0, "blk.0.ffn_down.weight"), (29, "blk.29.ffn_down.weight")] {
        let info = g.tensors.iter().find(|t| t.name == name).unwrap();
        let (_, bytes) = g.raw_bytes(info).unwrap();
        let LinearWeight::Ggml(down) = m.decoder.layers[layer].mlp.down.weight() else {
            panic!("{name} is not kept as blocks in {}", dir.display());
        };
        assert_eq!(down.bytes(), bytes, "{name}");
    }
    let dense: Vec<String> = m
        .decoder
        .linears_mut()
        .into_iter()
        .filter(|(_, l)| !matches!(l.weight(), LinearWeight::Ggml(_)))
        .map(|(n, _)| n)
        .collect();
    assert!(
        dense.is_empty(),
        "dense projections in the default model: {dense:?}"
    );
    assert!(matches!(m.decoder.lm_head.weight(), LinearWeight::Ggml(_)));
}

/// `quantize` reads the default model's blocks dequantised exactly: quantizing it writes the
/// same tensors as quantizing the fp32 conversion of the same GGUF.
#[test]
fn quantizing_the_blocks_equals_quantizing_the_fp32_conversion() {
    use afm_text::quant::quantize::{quantize_dir, BitPlan, QuantizeOptions};
    use afm_text::quant::Method;
    let (Some(native), Some(fp32)) = (default_model(), fp32_model()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let opts = QuantizeOptions {
        method: Method::Uniform,
        plan: BitPlan::Fixed(8),
        embed_bits: None,
        row_scale: false,
        seed: 0,
    };
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let ra = quantize_dir(&native, &a, &opts, &mut |_, _, _| {}).unwrap();
    let rb = quantize_dir(&fp32, &b, &opts, &mut |_, _, _| {}).unwrap();
    assert_eq!(ra.quantized_params, rb.quantized_params);
    let ta = afm_text::checkpoint::load_weights(&a, Device::Cpu, Kind::Float).unwrap();
    let tb = afm_text::checkpoint::load_weights(&b, Device::Cpu, Kind::Float).unwrap();
    let mut names: Vec<&String> = ta.names().collect();
    names.sort();
    let mut nb: Vec<&String> = tb.names().collect();
    nb.sort();
    assert_eq!(names, nb);
    for n in names {
        let (x, y) = (ta.raw(n).unwrap(), tb.raw(n).unwrap());
        assert!(x.equal(y), "{n} differs");
    }
}
