//! `convert tamm`: a tamm model folder (the adapter toolkit's `assets/`) → our layout,
//! `config.json` + `model.safetensors` (our names, q/k rows already in our RoPE layout) + the AFM
//! tokenizer files, so later loads skip the `.pt` translation and can memory-map safetensors.
//!
//! The result is the same model: the config keeps tamm's semantics (QK-norm after RoPE, the
//! KV quantiser and its calibrated ranges, fp32 norm gains), the tokenizer and its AFM chat
//! format are copied as they are, and a trained adapter saved inside the base checkpoint is
//! merged into the weights (tamm runs it; so does the converted model).

use std::path::Path;

use tch::{Kind, Tensor};

use crate::checkpoint::write_safetensors;
use crate::config::TokenIds;
use crate::convert::ConvertSummary;
use crate::error::{Result, TextError};
use crate::tamm;

/// Convert the tamm folder `dir` into `out` with weights stored as `kind` (fp32 or bf16; the
/// KV quantiser's ranges stay fp32). `progress(done, total)` counts tensors written.
pub fn convert_tamm(
    dir: &Path,
    out: &Path,
    kind: Kind,
    mut progress: impl FnMut(usize, usize),
) -> Result<ConvertSummary> {
    let (cfg_path, pt_path) = tamm::tamm_files(dir).ok_or_else(|| {
        TextError::checkpoint(
            dir,
            "not a tamm model folder (no base-model-config.json, nor a config.json with a __tamm_type__)",
        )
    })?;
    refuse_same_dir(dir, out)?;
    let (t, mut cfg) = tamm::read_config(&cfg_path)?;
    let (mut map, adapter) = tamm::load_weights(&pt_path, &t, tch::Device::Cpu, kind)?;
    if let Some(a) = &adapter {
        merge_into(&mut map, a, &pt_path, kind)?;
    }
    let names: Vec<String> = map.names().cloned().collect();
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(names.len());
    let mut params = 0u64;
    for (i, n) in names.iter().enumerate() {
        let t = map
            .raw(n)
            .ok_or_else(|| TextError::checkpoint(&pt_path, format!("missing tensor '{n}'")))?;
        // Already in `kind` (load_weights converts as it reads; the KV quantiser's calibrated
        // ranges stay fp32 and are no parameters).
        if !n.contains(".kv_quant.") && t.is_floating_point() {
            params += t.numel() as u64;
        }
        tensors.push((n.clone(), t.shallow_clone()));
        progress(i + 1, names.len());
    }
    // The tokenizer as it is (AFM SentencePiece + tamm's config); stop at EOS and <turn_end>.
    let tok_model = dir.join(tamm::TOKENIZER_MODEL);
    let tok_cfg = dir.join(tamm::TOKENIZER_CONFIG);
    if tok_model.is_file() {
        let tok = crate::tokenizer::Tokenizer::from_tamm(
            &tok_model,
            tok_cfg.is_file().then_some(tok_cfg.as_path()),
        )?;
        cfg.eos_token_id = Some(TokenIds::Many(tok.stop_ids()));
    }
    cfg.torch_dtype = Some(
        if kind == Kind::BFloat16 {
            "bfloat16"
        } else {
            "float32"
        }
        .into(),
    );
    let text = serde_json::to_string_pretty(&cfg).unwrap_or_default();
    write_converted(out, &pt_path, &tensors, &text)?;
    if tok_model.is_file() {
        crate::atomic_write::copy_atomic(&tok_model, &out.join(tamm::TOKENIZER_MODEL))?;
        if tok_cfg.is_file() {
            crate::atomic_write::copy_atomic(&tok_cfg, &out.join(tamm::TOKENIZER_CONFIG))?;
        }
    }
    Ok(ConvertSummary {
        out_dir: out.to_path_buf(),
        architecture: "tamm AFMTextV7".into(),
        tensors: tensors.len(),
        params,
        config: cfg,
    })
}

/// Write a converted model into `out`: `model.safetensors` (tagged with its tamm source) and
/// `config.json`.
fn write_converted(
    out: &Path,
    pt_path: &Path,
    tensors: &[(String, Tensor)],
    config_json: &str,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| TextError::io(out, e))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(
        "source".to_string(),
        format!(
            "converted by afm-vl from the tamm checkpoint {}",
            pt_path.display()
        ),
    );
    write_safetensors(&out.join("model.safetensors"), tensors, Some(meta))?;
    crate::atomic_write::write_atomic(&out.join("config.json"), config_json.as_bytes())
}

/// Into the tamm folder itself, config.json could replace the source's; a folder inside it is
/// fine (no source file has an output's name there).
fn refuse_same_dir(dir: &Path, out: &Path) -> Result<()> {
    let (rin, rout) = (
        crate::atomic_write::resolve(dir),
        crate::atomic_write::resolve(out),
    );
    if rin == rout || crate::atomic_write::same_file(dir, out) {
        return Err(TextError::InvalidArgument(format!(
            "{}: the output directory is the tamm folder itself; choose another OUT_DIR",
            out.display()
        )));
    }
    Ok(())
}

/// Merge a checkpoint's adapter into the weights: `W += s·B·A` in fp32, stored back in `kind`.
fn merge_into(
    map: &mut crate::weights::WeightMap,
    a: &crate::lora::LoraAdapter,
    pt_path: &Path,
    kind: Kind,
) -> Result<()> {
    let file = map.add_file(pt_path);
    for m in a.modules() {
        let Some((la, lb)) = a.module(m) else {
            continue;
        };
        let name = format!("{m}.weight");
        let w = map.get_any(&name)?.f_to_kind(Kind::Float)?;
        let delta = lb
            .f_to_kind(Kind::Float)?
            .f_matmul(&la.f_to_kind(Kind::Float)?)?
            .f_mul_scalar(a.scale)?;
        map.insert(name, w.f_add(&delta)?.f_to_kind(kind)?, file);
    }
    tracing::info!(
        "{}: merged the checkpoint's adapter '{}' into the weights",
        pt_path.display(),
        a.name
    );
    Ok(())
}

/// What [`convert_tamm_ptmoe`] wrote.
#[derive(Debug)]
pub struct PtMoeConvertSummary {
    pub out_dir: std::path::PathBuf,
    pub tensors: usize,
    pub params: u64,
    pub config: crate::ptmoe_config::PtMoeConfig,
}

/// Convert a tamm PT-MoE folder (`AFMParallelTrackMoEConfig` JSON + `.pt`,
/// [`crate::tamm_ptmoe`]) into `out`: `config.json` (our [`crate::PtMoeConfig`], tamm's
/// semantics kept: router cap, patterns, norms, QK-norm after RoPE, window W + 1) and
/// `model.safetensors` under our names (per-track `[out, in]` weights, q/k rows in our RoPE
/// layout), and tamm's tokenizer files when the folder has them. An adapter trained into the
/// checkpoint is merged into the weights. `progress(done, total)` counts tensors collected.
pub fn convert_tamm_ptmoe(
    dir: &Path,
    out: &Path,
    kind: Kind,
    mut progress: impl FnMut(usize, usize),
) -> Result<PtMoeConvertSummary> {
    let (cfg_path, pt_path) = crate::tamm_ptmoe::tamm_ptmoe_files(dir).ok_or_else(|| {
        TextError::checkpoint(
            dir,
            "not a tamm PT-MoE folder (no AFMParallelTrackMoEConfig)",
        )
    })?;
    refuse_same_dir(dir, out)?;
    let t = crate::tamm_ptmoe::TammPtMoe::read(&cfg_path)?;
    let (mut map, adapter) = t.load_weights_and_adapter(&pt_path, tch::Device::Cpu, kind)?;
    if let Some(a) = &adapter {
        merge_into(&mut map, a, &pt_path, kind)?;
    }
    let mut names: Vec<String> = map.names().cloned().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    let mut params = 0u64;
    for (i, n) in names.iter().enumerate() {
        let t = map
            .raw(n)
            .ok_or_else(|| TextError::checkpoint(&pt_path, format!("missing tensor '{n}'")))?;
        params += t.numel() as u64;
        tensors.push((n.clone(), t.shallow_clone()));
        progress(i + 1, names.len());
    }
    write_converted(out, &pt_path, &tensors, &t.cfg.to_json_pretty())?;
    // tamm's tokenizer files as they are (the loader recognises them beside our config).
    for name in [tamm::TOKENIZER_MODEL, tamm::TOKENIZER_CONFIG] {
        let src = dir.join(name);
        if src.is_file() {
            crate::atomic_write::copy_atomic(&src, &out.join(name))?;
        }
    }
    Ok(PtMoeConvertSummary {
        out_dir: out.to_path_buf(),
        tensors: tensors.len(),
        params,
        config: t.cfg,
    })
}
