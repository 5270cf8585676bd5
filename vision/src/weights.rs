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
/// Every tensor of a safetensors file as f32/f16/bf16 CPU tensors; the error is one readable
/// line (tch's own reader shows the safetensors library's debug names).
fn read_tensors(path: &Path) -> std::result::Result<Vec<(String, Tensor)>, String> {
    use safetensors::Dtype;
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    // SAFETY: read-only mapping; every tensor is copied out before the map is dropped.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("cannot map: {e}"))?;
    let st = safetensors::SafeTensors::deserialize(&mmap)
        .map_err(|e| format!("not a valid safetensors file ({e}); truncated or corrupt?"))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => tch::Kind::Float,
            Dtype::F16 => tch::Kind::Half,
            Dtype::BF16 => tch::Kind::BFloat16,
            Dtype::F64 => tch::Kind::Double,
            Dtype::I64 => tch::Kind::Int64,
            other => return Err(format!("tensor '{name}' has unsupported dtype {other:?}")),
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| format!("tensor '{name}': {e}"))?;
        out.push((name, t));
    }
    Ok(out)
}

pub fn load_safetensors(vs: &nn::VarStore, prefix: &str, path: &Path) -> Result<LoadReport> {
    let ck_err = |message: String| VisionError::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    if !path.is_file() {
        return Err(ck_err("checkpoint not found".into()));
    }
    let tensors = read_tensors(path).map_err(ck_err)?;
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
