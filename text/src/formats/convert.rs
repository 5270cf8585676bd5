//! `convert gguf`: a GGUF file → `config.json` + `model.safetensors` + `tokenizer.json`
//! (+ `tokenizer_config.json` with the chat template), with HF tensor names.
//!
//! llama.cpp's converter permutes the rows of Q and K for its RoPE layout; we undo that for
//! `llama` so the result matches HF checkpoints (and HF's own GGUF loader).

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::checkpoint::write_safetensors;
use crate::config::{TextConfig, TokenIds};
use crate::error::{Result, TextError};
use crate::gguf::{GgufFile, Value};
use crate::tokenizer::tokenizer_files_from_gguf;

/// What a conversion produced.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    pub out_dir: PathBuf,
    pub architecture: String,
    pub tensors: usize,
    pub params: u64,
    pub config: TextConfig,
}

/// GGUF tensor name → HF name.
fn hf_name(name: &str) -> Option<String> {
    let direct = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(d) = direct {
        return Some(d.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = tail.rsplit_once('.')?; // kind: weight | bias
    let hf = match part {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// Undo llama.cpp's `permute(w, n_head)`: rows grouped as [head, 2, d/2] → [head, d/2, 2].
fn unpermute(w: &Tensor, n_head: i64) -> Result<Tensor> {
    let s = w.size();
    let rows = s[0];
    let rest: Vec<i64> = s[1..].to_vec();
    let mut shape = vec![n_head, rows / n_head / 2, 2];
    shape.extend(&rest);
    Ok(w.f_reshape(shape.as_slice())?
        .f_transpose(1, 2)?
        .f_reshape(s.as_slice())?)
}

/// The text config a GGUF describes.
pub fn config_from_gguf(g: &GgufFile) -> Result<TextConfig> {
    let arch = g
        .require("general.architecture")?
        .as_str()
        .unwrap_or_default()
        .to_string();
    if !matches!(arch.as_str(), "llama" | "qwen2" | "qwen3") {
        return Err(TextError::gguf(
            &g.path,
            format!("architecture '{arch}' is not supported (llama, qwen2, qwen3)"),
        ));
    }
    let num = |key: &str| -> Result<u64> {
        let k = format!("{arch}.{key}");
        g.require(&k)?
            .as_u64()
            .ok_or_else(|| TextError::gguf(&g.path, format!("metadata '{k}' is not an integer")))
    };
    let opt_num = |key: &str| g.get(&format!("{arch}.{key}")).and_then(Value::as_u64);
    let float = |key: &str, default: f64| {
        g.get(&format!("{arch}.{key}"))
            .and_then(Value::as_f64)
            .unwrap_or(default)
    };
    let hidden = num("embedding_length")? as usize;
    let heads = num("attention.head_count")? as usize;
    let vocab = match g.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
        Some(t) => t.len(),
        None => num("vocab_size")? as usize,
    };
    let tied = !g.tensors.iter().any(|t| t.name == "output.weight");
    let cfg = TextConfig {
        model_type: arch.clone(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: num("feed_forward_length")? as usize,
        num_hidden_layers: num("block_count")? as usize,
        num_attention_heads: heads,
        num_key_value_heads: Some(
            opt_num("attention.head_count_kv").unwrap_or(heads as u64) as usize
        ),
        head_dim: Some(
            opt_num("attention.key_length").unwrap_or((hidden / heads.max(1)) as u64) as usize,
        ),
        rms_norm_eps: float("attention.layer_norm_rms_epsilon", 1e-6) as f32 as f64,
        rope_theta: float("rope.freq_base", 10_000.0) as f32 as f64,
        rope_scaling: None,
        rope_parameters: None,
        max_position_embeddings: opt_num("context_length").unwrap_or(4096) as usize,
        tie_word_embeddings: tied,
        qk_norm: arch == "qwen3",
        qk_norm_after_rope: false,
        kv_fake_quant: false,
        kv_fake_quant_skip_first: false,
        norm_gain_fp32: false,
        num_segment1_layers: 0,
        kv_source_layer: None,
        attention_bias: arch == "qwen2",
        bos_token_id: g
            .get("tokenizer.ggml.bos_token_id")
            .and_then(Value::as_u64)
            .map(|v| v as u32),
        eos_token_id: g
            .get("tokenizer.ggml.eos_token_id")
            .and_then(Value::as_u64)
            .map(|v| TokenIds::One(v as u32)),
        pad_token_id: g
            .get("tokenizer.ggml.padding_token_id")
            .and_then(Value::as_u64)
            .map(|v| v as u32),
        torch_dtype: Some("float32".into()),
        architectures: Some(vec![match arch.as_str() {
            "qwen2" => "Qwen2ForCausalLM".into(),
            "qwen3" => "Qwen3ForCausalLM".into(),
            _ => "LlamaForCausalLM".into(),
        }]),
    };
    cfg.validate()
        .map_err(|m| TextError::gguf(&g.path, format!("bad model geometry: {m}")))?;
    Ok(cfg)
}

/// Convert `gguf` into a model directory `out`. `progress(done, total)` is called per tensor.
/// `kind` is the stored dtype (fp32 keeps dequantised values exact).
/// The files a conversion writes into its output directory.
pub const OUTPUT_FILES: [&str; 4] = [
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
];

///
/// With `keep_blocks`, 2-D weights stored in GGUF's quantized blocks (Q4_0, Q4_1, Q8_0, Q4_K,
/// Q5_K, Q6_K) are written byte for byte as U8 `NAME.{type}` tensors (rows reordered for our
/// RoPE layout where llama.cpp permuted them), which the block kernels read directly
/// ([`crate::quant::ggml`]); other tensors are stored in `kind`.
pub fn convert_gguf(
    gguf: &Path,
    out: &Path,
    kind: Kind,
    keep_blocks: bool,
    mut progress: impl FnMut(usize, usize),
) -> Result<ConvertSummary> {
    for name in OUTPUT_FILES {
        if crate::atomic_write::same_file(gguf, &out.join(name)) {
            return Err(TextError::InvalidArgument(format!(
                "{}: the output {name} would overwrite the GGUF being converted (choose another OUT_DIR)",
                out.display()
            )));
        }
    }
    let g = GgufFile::open(gguf)?;
    let cfg = config_from_gguf(&g)?;
    let (tok, tok_cfg) = tokenizer_files_from_gguf(&g)?;
    let arch = cfg.model_type.clone();
    let mut tensors = Vec::with_capacity(g.tensors.len());
    let mut params = 0u64;
    for (i, info) in g.tensors.iter().enumerate() {
        let Some(name) = hf_name(&info.name) else {
            tracing::warn!(
                "{}: skipping unknown tensor '{}'",
                gguf.display(),
                info.name
            );
            continue;
        };
        let shape = info.shape();
        let (ty, bytes) = g.raw_bytes(info)?;
        let native = keep_blocks && shape.len() == 2 && crate::quant::ggml::is_block_type(ty);
        let (name, mut t) = if native {
            params += info.numel();
            let rows = shape[0];
            let t = Tensor::f_from_slice(bytes)?.f_view([rows, -1])?;
            (format!("{name}.{}", crate::quant::ggml::suffix(ty)), t)
        } else {
            let data = g.dequantize(info)?;
            params += data.len() as u64;
            (
                name,
                Tensor::f_from_slice(&data)?.f_reshape(shape.as_slice())?,
            )
        };
        if arch == "llama" {
            if name.contains("q_proj.weight") {
                t = unpermute(&t, cfg.num_attention_heads as i64)?;
            } else if name.contains("k_proj.weight") {
                t = unpermute(&t, cfg.num_kv_heads() as i64)?;
            }
        }
        let t = if native { t } else { t.f_to_kind(kind)? };
        tensors.push((name, t));
        progress(i + 1, g.tensors.len());
    }
    std::fs::create_dir_all(out).map_err(|e| TextError::io(out, e))?;
    let write_json = |name: &str, v: &serde_json::Value| -> Result<()> {
        let p = out.join(name);
        let text = serde_json::to_string_pretty(v).unwrap_or_default();
        crate::atomic_write::write_atomic(&p, text.as_bytes())
    };
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        "source".to_string(),
        format!("converted by afm-vl from {}", gguf.display()),
    );
    write_safetensors(&out.join("model.safetensors"), &tensors, Some(meta))?;
    let mut cfg_out = cfg.clone();
    cfg_out.torch_dtype = Some(
        match kind {
            Kind::BFloat16 => "bfloat16",
            Kind::Half => "float16",
            _ => "float32",
        }
        .into(),
    );
    write_json(
        "config.json",
        &serde_json::to_value(&cfg_out).unwrap_or_default(),
    )?;
    write_json("tokenizer.json", &tok)?;
    write_json("tokenizer_config.json", &tok_cfg)?;
    Ok(ConvertSummary {
        out_dir: out.to_path_buf(),
        architecture: arch,
        tensors: tensors.len(),
        params,
        config: cfg,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(
            hf_name("blk.0.ffn_norm.weight").unwrap(),
            "model.layers.0.post_attention_layernorm.weight"
        );
        assert_eq!(
            hf_name("token_embd.weight").unwrap(),
            "model.embed_tokens.weight"
        );
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(h, 2, r/h/2, c).swapaxes(1, 2).reshape(r, c)
        let (h, r, c) = (3i64, 12i64, 5i64);
        let w = Tensor::arange(r * c, (Kind::Float, tch::Device::Cpu)).reshape([r, c]);
        let permuted = w
            .reshape([h, 2, r / h / 2, c])
            .transpose(1, 2)
            .reshape([r, c]);
        let back = unpermute(&permuted, h).unwrap();
        assert!(back.equal(&w));
    }
}
