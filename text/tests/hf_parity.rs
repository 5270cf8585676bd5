//! Acceptance 1 of the text issue: on the real SmolLM2-135M-Instruct, fp32 logits at every
//! position match HF transformers' LlamaForCausalLM loaded from the same GGUF (max |Δ| ≤ 1e-3)
//! for the 5 held prompts (`common::PROMPTS`), and 64-token greedy generations are identical. The reference is computed
//! by the test itself (tests/reference/hf_llama.py). Skipped, with a message, only when the
//! virtualenv lacks transformers or set-up has not converted the model.

mod common;

use afm_text::generation::{generate, ids_tensor};
use afm_text::{DType, GenerateOptions, Logits, TextModel};
use common::*;
use tch::Device;

#[test]
fn smollm2_matches_hf_transformers_fp32() {
    let (Some(py), Some(dir), Some(gguf)) = (
        venv_python_with("transformers"),
        fp32_model(),
        smollm2_gguf(),
    ) else {
        return;
    };
    let _g = tch::no_grad_guard();
    let model = TextModel::load(&dir, Device::Cpu, DType::F32).unwrap();
    let eos = model.config().eos_ids()[0];
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| model.prompt_ids(p, false).unwrap())
        .collect();

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ref.safetensors");
    let req = serde_json::json!({
        "gguf": gguf, "prompts": prompts, "gen_tokens": 64, "eos": eos, "out": out,
    });
    let req_path = tmp.path().join("req.json");
    std::fs::write(&req_path, req.to_string()).unwrap();
    let status = std::process::Command::new(&py)
        .arg(repo_root().join("text/tests/reference/hf_llama.py"))
        .arg(&req_path)
        .status()
        .unwrap();
    assert!(status.success(), "reference script failed");
    let reference: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(&out)
            .unwrap()
            .into_iter()
            .collect();

    let opts = GenerateOptions {
        max_new_tokens: 64,
        ..GenerateOptions::default()
    };
    for (i, ids) in prompts.iter().enumerate() {
        let mut cache = model.decoder.new_cache(1);
        let ours = model
            .decoder
            .forward(&ids_tensor(ids).unwrap(), None, &mut cache, Logits::All)
            .unwrap()
            .squeeze_dim(0);
        let theirs = &reference[&format!("logits_{i}")];
        let d = max_abs_diff(&ours, theirs);
        println!("prompt {i}: {} tokens, max |Δlogit| = {d:.2e}", ids.len());
        assert!(d <= 1e-3, "prompt {i}: max |Δ| = {d}");

        let g = generate(
            &model.decoder,
            model.tokenizer.as_ref(),
            ids,
            &opts,
            &mut |_| {},
        )
        .unwrap();
        let want: Vec<i64> = Vec::try_from(&reference[&format!("gen_{i}")]).unwrap();
        let got: Vec<i64> = g.tokens.iter().map(|&t| t as i64).collect();
        assert_eq!(got, want, "prompt {i}: greedy generations differ");
        println!(
            "prompt {i}: {} greedy tokens identical: {:?}",
            got.len(),
            g.text
        );
    }
}
