//! Quantize a model directory: every attention/FFN projection, the untied head and the
//! embedding become packed codes ([`super::QuantizedWeight`]); norms stay dense. Uniform
//! round-to-nearest (`rtn`) or k-means palettes; a fixed width or a mixed 2/4-bit plan that
//! meets a target average of bits per weight by sending the layers that lose least at 2 bits
//! to 2 bits first.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::ggml::GgmlWeight;
use super::palette::{palettize, palettize_scaled};
use super::qat::{rtn, UniformSpec};
use super::{packed, Method, QuantizedWeight, FORMAT};
use crate::checkpoint::{load_weights, safetensors_files, write_safetensors};
use crate::config::TextConfig;
use crate::error::{Result, TextError};
use crate::gguf::GgmlType;

/// Bit widths to use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BitPlan {
    /// Every quantized linear at this width (2, 4 or 8).
    Fixed(u8),
    /// 4-bit, with the least sensitive linears at 2 bits until the average (tables and the
    /// 4-bit embedding included) is at most `target_bpw`.
    Mixed { target_bpw: f64 },
}

#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    pub method: Method,
    pub plan: BitPlan,
    /// Bits of the embedding (default: 4, or 8 with `Fixed(8)`).
    pub embed_bits: Option<u8>,
    /// Palettes fitted on row-normalised weights with a scale per row (see
    /// [`super::palette::palettize_scaled`]); `false` is the plain shared table.
    pub row_scale: bool,
    pub seed: u64,
}

/// What happened to one tensor.
#[derive(Debug, Clone)]
pub struct TensorReport {
    pub name: String,
    pub rows: i64,
    pub cols: i64,
    pub bits: u8,
    /// `uniform`, `palette`, or a GGUF block type (`Q4_1`, …).
    pub method: &'static str,
    /// ‖W − Ŵ‖² / ‖W‖².
    pub rel_error: f64,
    /// Stored bits per weight (tables included).
    pub bpw: f64,
}

#[derive(Debug, Clone)]
pub struct QuantizeReport {
    pub tensors: Vec<TensorReport>,
    /// Tensors kept dense (norms, widths the packing does not fit).
    pub dense: Vec<String>,
    /// Average stored bits per quantized weight.
    pub avg_bpw: f64,
    pub quantized_params: i64,
    pub dense_params: i64,
    /// Bytes of the written safetensors file.
    pub file_bytes: u64,
}

/// A tensor to quantize: name, rows, cols, and (bits, weight, relative error) per width tried.
type Candidate = (String, i64, i64, Vec<(u8, QuantizedWeight, f64)>);

/// The decoder's name of a checkpoint tensor: a vision-language checkpoint's text model
/// (SmolVLM / Idefics3: `model.text_model.*`) reads as the decoder's `model.*`; its vision
/// encoder and connector (`model.vision_model.*`, `model.connector.*`) are not the decoder's and
/// stay dense.
fn decoder_name(name: &str) -> Option<std::borrow::Cow<'_, str>> {
    if let Some(rest) = name.strip_prefix("model.text_model.") {
        return Some(format!("model.{rest}").into());
    }
    if name.starts_with("model.vision_model.") || name.starts_with("model.connector.") {
        return None;
    }
    Some(name.into())
}

fn is_embedding(name: &str) -> bool {
    decoder_name(name).is_some_and(|n| n == "model.embed_tokens.weight")
}

fn is_candidate(name: &str, shape: &[i64]) -> bool {
    let Some(name) = decoder_name(name) else {
        return false;
    };
    shape.len() == 2
        && (name.ends_with("_proj.weight")
            || name == "lm_head.weight"
            || name == "model.embed_tokens.weight")
}

fn quantize_one(
    w: &Tensor,
    bits: u8,
    method: Method,
    row_scale: bool,
    seed: u64,
) -> Result<(QuantizedWeight, f64)> {
    let (rows, cols) = (w.size()[0], w.size()[1]);
    let q = match method {
        Method::Uniform => {
            let (codes, scale) = rtn(w, &UniformSpec::new(bits)?)?;
            QuantizedWeight::from_uniform(&codes, &scale, bits)?
        }
        Method::Palette => {
            if bits == 8 {
                return Err(TextError::InvalidArgument(
                    "palettes are 2- or 4-bit (use --method rtn for 8 bits)".into(),
                ));
            }
            let v = Vec::<f32>::try_from(w.f_flatten(0, -1)?.f_to_kind(Kind::Float)?)?;
            let (r, c) = (rows as usize, cols as usize);
            let p = if row_scale {
                palettize_scaled(&v, r, c, bits, seed)
            } else {
                palettize(&v, r, c, bits, seed)
            };
            QuantizedWeight::from_palette(&p, bits)?
        }
    };
    let err = f64::try_from(
        w.f_sub(&q.dequantize(Kind::Float)?)?
            .f_square()?
            .f_sum(Kind::Double)?,
    )?;
    let norm = f64::try_from(w.f_square()?.f_sum(Kind::Double)?)?.max(1e-30);
    Ok((q, err / norm))
}

/// The source weights for quantizing: GGUF blocks (`NAME.q4_1`, …, as `convert gguf
/// --keep-blocks` and the default model keep them) are dequantised to `NAME` in fp32, which is
/// exact (they are what the fp32 conversion of the same GGUF holds); our packed codes are
/// refused, since re-quantizing them would compound two roundings.
fn source_weights(src: &Path) -> Result<crate::weights::WeightMap> {
    let mut weights = load_weights(src, Device::Cpu, Kind::Float)?;
    let names: Vec<String> = weights.names().cloned().collect();
    if let Some(n) = names.iter().find(|n| n.ends_with(".qcodes")) {
        return Err(TextError::checkpoint(
            src,
            format!("already quantized (has '{n}'); quantize the full-precision model"),
        ));
    }
    for name in names {
        let Some((base, ty)) = super::ggml::BLOCK_TYPES.iter().find_map(|&ty| {
            name.strip_suffix(&format!(".{}", super::ggml::suffix(ty)))
                .map(|b| (b.to_string(), ty))
        }) else {
            continue;
        };
        let size = weights.raw(&name).map(|t| t.size()).unwrap_or_default();
        let (bs, bb) = ty.block();
        let (rows, cols) = match size[..] {
            [rows, rb] if rb > 0 && (rb as usize).is_multiple_of(bb) => (rows, rb / bb as i64 * bs as i64),
            _ => {
                return Err(TextError::checkpoint(
                    weights.file_of(&name),
                    format!(
                        "tensor '{name}' has shape {size:?}: {} blocks are U8 [rows, a multiple of {bb}]",
                        ty.name()
                    ),
                ))
            }
        };
        let g = GgmlWeight::from_map(&weights, &base, rows, cols)?.ok_or_else(|| {
            TextError::checkpoint(
                weights.file_of(&name),
                format!("unreadable blocks '{name}'"),
            )
        })?;
        let w = g.dequantize(Kind::Float)?;
        let file = weights.remove(&name).map_or(0, |(_, f)| f);
        weights.insert(base, w, file);
    }
    Ok(weights)
}

/// Quantize the model in `src` into a new model directory `dst`. `progress` hears each tensor.
pub fn quantize_dir(
    src: &Path,
    dst: &Path,
    opts: &QuantizeOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<QuantizeReport> {
    crate::atomic_write::check_output_dir(src, dst, "quantize")?;
    let _cfg = TextConfig::from_file(&src.join("config.json"))?;
    let weights = source_weights(src)?;
    let mut names: Vec<String> = weights.names().cloned().collect();
    names.sort();
    let embed_bits = opts.embed_bits.unwrap_or(match opts.plan {
        BitPlan::Fixed(8) => 8,
        _ => 4,
    });
    let embed_method = if embed_bits == 8 {
        Method::Uniform
    } else {
        opts.method
    };

    let mut dense: Vec<(String, Tensor)> = Vec::new();
    let mut dense_names = Vec::new();
    let mut dense_params = 0i64;
    // name → candidate quantizations (bits → (weight, error))
    let mut cands: Vec<Candidate> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        progress(i, names.len(), name);
        let t = weights.get_any(name)?;
        let shape = t.size();
        let fits = shape.len() == 2 && shape[1] % packed::block_codes(2) as i64 == 0;
        if !is_candidate(name, &shape) || !fits {
            if is_candidate(name, &shape) {
                tracing::warn!("{name} {shape:?}: width not a multiple of 64, kept dense");
            }
            dense_params += t.numel() as i64;
            dense_names.push(name.clone());
            dense.push((name.clone(), t));
            continue;
        }
        let embed = is_embedding(name);
        let widths: Vec<u8> = match (embed, opts.plan) {
            (true, _) => vec![embed_bits],
            (false, BitPlan::Fixed(b)) => vec![b],
            (false, BitPlan::Mixed { .. }) => vec![4, 2],
        };
        let method = if embed { embed_method } else { opts.method };
        let mut qs = Vec::new();
        for b in widths {
            let (q, e) = quantize_one(&t, b, method, opts.row_scale, opts.seed)?;
            qs.push((b, q, e));
        }
        cands.push((name.clone(), shape[0], shape[1], qs));
    }

    // Choose a width per tensor: the first candidate, or the mixed plan.
    let mut choice: Vec<usize> = vec![0; cands.len()];
    if let BitPlan::Mixed { target_bpw } = opts.plan {
        let total: f64 = cands.iter().map(|c| (c.1 * c.2) as f64).sum();
        let mut bits_sum: f64 = cands
            .iter()
            .map(|c| c.3[0].1.bits_per_weight() * (c.1 * c.2) as f64)
            .sum();
        let mut order: Vec<usize> = (0..cands.len()).filter(|&i| cands[i].3.len() > 1).collect();
        // Smallest loss first: the relative error added by going to 2 bits.
        order.sort_by(|&a, &b| {
            let da = cands[a].3[1].2 - cands[a].3[0].2;
            let db = cands[b].3[1].2 - cands[b].3[0].2;
            da.total_cmp(&db)
        });
        for i in order {
            if bits_sum / total <= target_bpw {
                break;
            }
            let n = (cands[i].1 * cands[i].2) as f64;
            bits_sum += (cands[i].3[1].1.bits_per_weight() - cands[i].3[0].1.bits_per_weight()) * n;
            choice[i] = 1;
        }
    }

    let mut out: Vec<(String, Tensor)> = dense;
    let mut reports = Vec::new();
    let mut plan_json = serde_json::Map::new();
    let (mut qparams, mut qbits) = (0i64, 0f64);
    for ((name, rows, cols, qs), &c) in cands.iter().zip(&choice) {
        let (bits, q, err) = &qs[c];
        out.extend(q.tensors(name)?);
        let n = rows * cols;
        qparams += n;
        qbits += q.bits_per_weight() * n as f64;
        plan_json.insert(
            name.clone(),
            serde_json::json!({"bits": bits, "method": q.method().name()}),
        );
        reports.push(TensorReport {
            name: name.clone(),
            rows: *rows,
            cols: *cols,
            bits: *bits,
            method: q.method().name(),
            rel_error: *err,
            bpw: q.bits_per_weight(),
        });
    }
    let avg_bpw = qbits / qparams.max(1) as f64;

    let quant = serde_json::json!({
        "format": FORMAT,
        "method": opts.method.name(),
        "plan": match opts.plan {
            BitPlan::Fixed(b) => format!("{b}-bit"),
            BitPlan::Mixed { target_bpw } => format!("mixed 2/4-bit, target {target_bpw} bpw"),
        },
        "group_rows": super::palette::GROUP_ROWS,
        "row_scale": opts.row_scale && opts.method == Method::Palette,
        "avg_bits_per_weight": avg_bpw,
        "tensors": plan_json,
    });
    let file_bytes = write_model_dir(src, dst, &out, quant)?;
    Ok(QuantizeReport {
        tensors: reports,
        dense: dense_names,
        avg_bpw,
        quantized_params: qparams,
        dense_params,
        file_bytes,
    })
}

/// Quantize the model in `src` into `dst` as GGUF blocks ([`super::ggml`], llama.cpp's
/// reference quantisers): every projection and the untied head as `ty`, the embedding (and the
/// head tied to it) as `embed_ty`; tensors whose width is not a multiple of 32 and the norms
/// stay dense. The decode kernels and the fused CPU step read the blocks directly.
pub fn quantize_dir_blocks(
    src: &Path,
    dst: &Path,
    ty: GgmlType,
    embed_ty: GgmlType,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<QuantizeReport> {
    crate::atomic_write::check_output_dir(src, dst, "quantize")?;
    let _cfg = TextConfig::from_file(&src.join("config.json"))?;
    let weights = source_weights(src)?;
    let mut names: Vec<String> = weights.names().cloned().collect();
    names.sort();
    let (mut out, mut reports, mut dense_names) = (Vec::new(), Vec::new(), Vec::new());
    let (mut qparams, mut qbits, mut dense_params) = (0i64, 0f64, 0i64);
    let mut plan_json = serde_json::Map::new();
    for (i, name) in names.iter().enumerate() {
        progress(i, names.len(), name);
        let t = weights.get_any(name)?;
        let shape = t.size();
        if !is_candidate(name, &shape) || shape[1] % super::ggml::QK as i64 != 0 {
            if is_candidate(name, &shape) {
                tracing::warn!("{name} {shape:?}: width not a multiple of 32, kept dense");
            }
            dense_params += t.numel() as i64;
            dense_names.push(name.clone());
            out.push((name.clone(), t));
            continue;
        }
        let bty = if is_embedding(name) { embed_ty } else { ty };
        let (rows, cols) = (shape[0], shape[1]);
        let v = Vec::<f32>::try_from(t.f_flatten(0, -1)?.f_to_kind(Kind::Float)?)?;
        let g = GgmlWeight::quantize(bty, &v, rows, cols)?;
        let back = g.dequantize(Kind::Float)?;
        let err = f64::try_from(t.f_sub(&back)?.f_square()?.f_sum(Kind::Double)?)?
            / f64::try_from(t.f_square()?.f_sum(Kind::Double)?)?.max(1e-30);
        let n = rows * cols;
        qparams += n;
        qbits += g.bits_per_weight() * n as f64;
        plan_json.insert(
            name.clone(),
            serde_json::json!({"bits": g.bits_per_weight(), "method": bty.name()}),
        );
        reports.push(TensorReport {
            name: name.clone(),
            rows,
            cols,
            bits: if matches!(bty, GgmlType::Q8_0) { 8 } else { 4 },
            method: bty.name(),
            rel_error: err,
            bpw: g.bits_per_weight(),
        });
        out.extend(g.tensors(name));
    }
    let avg_bpw = qbits / qparams.max(1) as f64;
    let quant = serde_json::json!({
        "format": "ggml-blocks",
        "method": ty.name(),
        "embedding": embed_ty.name(),
        "avg_bits_per_weight": avg_bpw,
        "tensors": plan_json,
    });
    let file_bytes = write_model_dir(src, dst, &out, quant)?;
    Ok(QuantizeReport {
        tensors: reports,
        dense: dense_names,
        avg_bpw,
        quantized_params: qparams,
        dense_params,
        file_bytes,
    })
}

/// Write a quantized model directory: `tensors` into model.safetensors (with the format tag in
/// its metadata), the tokenizer and other files of `src` as they are, and `src`'s config.json
/// with a `"quantization"` entry. Returns the safetensors file's size.
pub fn write_model_dir(
    src: &Path,
    dst: &Path,
    tensors: &[(String, Tensor)],
    quantization: serde_json::Value,
) -> Result<u64> {
    std::fs::create_dir_all(dst).map_err(|e| TextError::io(dst, e))?;
    let st = dst.join("model.safetensors");
    let meta = HashMap::from([("afm.quant.format".to_string(), FORMAT.to_string())]);
    write_safetensors(&st, tensors, Some(meta))?;
    let skip: Vec<_> = safetensors_files(src)?;
    for entry in std::fs::read_dir(src).map_err(|e| TextError::io(src, e))? {
        let path = entry.map_err(|e| TextError::io(src, e))?.path();
        let fname = path
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default();
        if !path.is_file()
            || skip.contains(&path)
            || fname == "config.json"
            || fname == "model.safetensors.index.json"
        {
            continue;
        }
        crate::atomic_write::copy_atomic(&path, &dst.join(&fname))?;
    }
    let cfg_path = src.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| TextError::io(&cfg_path, e))?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TextError::checkpoint(&cfg_path, format!("bad JSON: {e}")))?;
    if let Some(obj) = cfg.as_object_mut() {
        obj.insert("quantization".into(), quantization);
    }
    let dst_cfg = dst.join("config.json");
    crate::atomic_write::write_atomic(
        &dst_cfg,
        serde_json::to_string_pretty(&cfg)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(std::fs::metadata(&st)
        .map_err(|e| TextError::io(&st, e))?
        .len())
}
