//! Loading encoder weights from safetensors into a VarStore by name.
//!
//! Accepted names are ours, which are HF `VitDetModel`'s (`embeddings.*`, `encoder.layer.*`),
//! optionally under one leading component such as `vitdet.`, `model.`, `backbone.` or
//! `vision_model.` (HF wrappers). Relative-position and residual-block tensors are not
//! supported and reported. Shapes are checked; a checkpoint without `register_tokens` keeps the
//! random registers (HF ViTDet has none) with a warning.

use std::collections::HashMap;
use std::path::Path;

use tch::{nn, Tensor};

use crate::error::{Result, VisionError};

/// What a load did.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub loaded: usize,
    /// Variables the checkpoint did not provide (kept at their initial values).
    pub kept_initial: Vec<String>,
    /// Checkpoint tensors not used.
    pub unused: Vec<String>,
}

const WRAPPERS: [&str; 7] = [
    "vitdet.",
    "model.",
    "backbone.",
    "vision_model.",
    "vision_tower.",
    "vision.",
    "encoder_model.",
];

/// Our name for a checkpoint tensor name, or `None` when it is not an encoder tensor.
pub fn map_checkpoint_name(name: &str) -> Option<String> {
    let ours = |n: &str| {
        n.starts_with("embeddings.")
            || n.starts_with("encoder.layer.")
            || n.starts_with("layernorm.")
    };
    if ours(name) {
        return Some(name.to_string());
    }
    WRAPPERS
        .iter()
        .find_map(|w| name.strip_prefix(w))
        .filter(|rest| ours(rest))
        .map(str::to_string)
}

/// Copies the tensors of `path` into the variables of `vs` whose names start with `prefix`
/// (`prefix` is stripped before matching; pass `""` for a VarStore holding only the encoder).
pub fn load_safetensors(vs: &nn::VarStore, prefix: &str, path: &Path) -> Result<LoadReport> {
    let ck_err = |message: String| VisionError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    if !path.is_file() {
        return Err(ck_err("checkpoint not found".into()));
    }
    let tensors = Tensor::read_safetensors(path)
        .map_err(|e| ck_err(format!("cannot read safetensors: {e}")))?;
    let mut by_name: HashMap<String, Tensor> = HashMap::new();
    let mut report = LoadReport::default();
    for (name, t) in tensors {
        match map_checkpoint_name(&name) {
            Some(ours) => {
                by_name.insert(ours, t);
            }
            None => report.unused.push(name),
        }
    }
    let mut missing = Vec::new();
    let vars = vs.variables();
    let _guard = tch::no_grad_guard();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for full in names {
        let Some(local) = full.strip_prefix(prefix) else {
            continue;
        };
        let local = local.trim_start_matches('.');
        let mut var = vars[full].shallow_clone();
        match by_name.remove(local) {
            Some(src) => {
                if src.size() != var.size() {
                    return Err(ck_err(format!(
                        "tensor `{local}` has shape {:?}, the model expects {:?}",
                        src.size(),
                        var.size()
                    )));
                }
                let src = src.f_to_kind(var.kind())?.f_to_device(var.device())?;
                var.f_copy_(&src)?;
                report.loaded += 1;
            }
            None if local.ends_with("register_tokens") => {
                tracing::warn!(
                    "{}: no `{local}`; register tokens keep their random init",
                    path.display()
                );
                report.kept_initial.push(local.to_string());
            }
            None => missing.push(local.to_string()),
        }
    }
    if !missing.is_empty() {
        let shown: Vec<&str> = missing.iter().take(8).map(String::as_str).collect();
        return Err(ck_err(format!(
            "{} encoder tensors missing (e.g. {})",
            missing.len(),
            shown.join(", ")
        )));
    }
    report.unused.extend(by_name.into_keys());
    report.unused.sort();
    if !report.unused.is_empty() {
        tracing::warn!(
            "{}: {} checkpoint tensors unused (e.g. {})",
            path.display(),
            report.unused.len(),
            report.unused[0]
        );
    }
    tracing::info!("{}: loaded {} tensors", path.display(), report.loaded);
    Ok(report)
}
