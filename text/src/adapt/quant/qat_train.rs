//! Quantization-aware training (AFM 2025): every attention/FFN projection runs through the
//! fake-quantizer `W̃ = s·(clamp(⌊W/s + z⌉, qmin, qmax) − z)`, `s = f·max|W|/L`, with the
//! straight-through estimator; the weights and the per-channel clipping factors `f` train with
//! Adam on next-token prediction over plain text. The result is written as a packed uniform
//! model directory (the codes the trained `W` and `f` give), loadable like any quantized one.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::qat::{scale, search_f, FakeQuantWeight, UniformSpec};
use super::quantize::write_model_dir;
use super::{QuantizedWeight, FORMAT};
use crate::checkpoint::load_weights;
use crate::decoder::Logits;
use crate::error::{Result, TextError};
use crate::linear::LinearWeight;
use crate::model::{DType, TextModel};
use crate::sampling::Rng;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone)]
pub struct QatConfig {
    /// Bits of the projections (2, 4 or 8).
    pub bits: u8,
    /// Bits of the (not trained) embedding, round-to-nearest.
    pub embed_bits: u8,
    pub lr: f64,
    /// Learning rate of the clipping factors.
    pub f_lr: f64,
    pub steps: usize,
    pub batch_size: usize,
    /// Tokens per training window.
    pub seq_len: usize,
    pub seed: u64,
    /// Stop training after this much wall time and export what was trained (`steps` is then
    /// an upper bound).
    pub time_limit: Option<std::time::Duration>,
}

impl Default for QatConfig {
    fn default() -> Self {
        Self {
            bits: 4,
            embed_bits: 4,
            lr: 1e-5,
            f_lr: 1e-3,
            steps: 100,
            batch_size: 4,
            seq_len: 128,
            seed: 0,
            time_limit: None,
        }
    }
}

/// Training text: a folder of `.txt`/`.md` files, a JSONL file (`"text"`, or `"prompt"` +
/// `"response"` per line), or one plain text file; tokenised and cut into `seq_len` windows.
pub fn load_text_windows(path: &Path, tok: &Tokenizer, seq_len: usize) -> Result<Vec<Vec<u32>>> {
    let mut docs = Vec::new();
    if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| TextError::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "txt" || x == "md" || x == "text")
            })
            .collect();
        files.sort();
        for f in files {
            docs.push(std::fs::read_to_string(&f).map_err(|e| TextError::io(&f, e))?);
        }
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| TextError::io(path, e))?;
        if path.extension().is_some_and(|x| x == "jsonl") {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                    TextError::checkpoint(path, format!("line {}: bad JSON: {e}", i + 1))
                })?;
                let field = |k: &str| v.get(k).and_then(|x| x.as_str());
                match (field("text"), field("prompt"), field("response")) {
                    (Some(t), _, _) => docs.push(t.to_string()),
                    (None, Some(p), Some(r)) => docs.push(format!("{p}\n{r}")),
                    _ => {
                        return Err(TextError::checkpoint(
                            path,
                            format!(
                                "line {}: expected a \"text\" or \"prompt\"/\"response\" field",
                                i + 1
                            ),
                        ))
                    }
                }
            }
        } else {
            docs.push(text);
        }
    }
    let ids = tok.encode(&docs.join("\n\n"))?;
    cut_windows(&ids, seq_len)
        .ok_or_else(|| TextError::InvalidArgument(format!("{}: no training text", path.display())))
}

/// Windows of exactly `seq_len` tokens (the remainder dropped: a batch takes the shortest
/// window's length), or one window of all the text when it is shorter; `None` under 2 tokens.
pub fn cut_windows(ids: &[u32], seq_len: usize) -> Option<Vec<Vec<u32>>> {
    let n = seq_len.max(2);
    let windows: Vec<Vec<u32>> = if ids.len() >= n {
        ids.chunks_exact(n).map(|w| w.to_vec()).collect()
    } else if ids.len() >= 2 {
        vec![ids.to_vec()]
    } else {
        Vec::new()
    };
    (!windows.is_empty()).then_some(windows)
}

struct Adam {
    m: Tensor,
    v: Tensor,
}

/// Train and write the quantized directory `dst`; `progress(step, loss)` after each step.
/// Returns the losses.
pub fn train_qat(
    src: &Path,
    dst: &Path,
    data: &[Vec<u32>],
    cfg: &QatConfig,
    device: Device,
    mut progress: impl FnMut(usize, f64),
) -> Result<Vec<f64>> {
    let spec = UniformSpec::new(cfg.bits)?;
    let mut model = TextModel::load(src, device, DType::F32)?;
    // Swap every projection for its fake-quantized, trainable form.
    let mut params: Vec<(String, Tensor, Tensor)> = Vec::new();
    for (name, lin) in model.decoder.linears_mut() {
        let LinearWeight::Dense(w) = lin.weight() else {
            return Err(TextError::InvalidArgument(format!(
                "{name} is already quantized; QAT starts from a full-precision model"
            )));
        };
        // A copy (×1) that owns its storage and becomes a trainable leaf.
        let w = w.f_detach()?.f_mul_scalar(1.0)?.set_requires_grad(true);
        let f = search_f(&w, &spec)?.set_requires_grad(true);
        params.push((name, w.shallow_clone(), f.shallow_clone()));
        lin.set_weight(LinearWeight::FakeQuant(Box::new(FakeQuantWeight {
            w,
            f,
            spec,
        })));
    }
    let mut state: Vec<(Adam, Adam)> = params
        .iter()
        .map(|(_, w, f)| -> Result<_> {
            Ok((
                Adam {
                    m: w.f_zeros_like()?,
                    v: w.f_zeros_like()?,
                },
                Adam {
                    m: f.f_zeros_like()?,
                    v: f.f_zeros_like()?,
                },
            ))
        })
        .collect::<Result<_>>()?;
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let mut rng = Rng::new(cfg.seed);
    let mut losses = Vec::with_capacity(cfg.steps);
    // Batches of equal-length windows: the shortest window's length (the same every step).
    let len = data
        .iter()
        .map(Vec::len)
        .min()
        .unwrap_or(0)
        .min(cfg.seq_len);
    let t0 = std::time::Instant::now();
    for step in 1..=cfg.steps {
        if cfg.time_limit.is_some_and(|limit| t0.elapsed() >= limit) {
            tracing::info!("QAT: time limit reached after {} steps", step - 1);
            break;
        }
        if len < 2 {
            return Err(TextError::InvalidArgument(
                "training windows are too short".into(),
            ));
        }
        let mut ids = Vec::with_capacity(cfg.batch_size * len);
        for _ in 0..cfg.batch_size.max(1) {
            let w = &data[(rng.next_u64() % data.len() as u64) as usize];
            ids.extend(w[..len].iter().map(|&t| t as i64));
        }
        let ids = Tensor::f_from_slice(&ids)?
            .f_view([cfg.batch_size.max(1) as i64, len as i64])?
            .f_to_device(device)?;
        let mut cache = model.decoder.new_cache(cfg.batch_size.max(1) as i64);
        let logits = model.decoder.forward(&ids, None, &mut cache, Logits::All)?;
        let n = len as i64;
        let loss = logits
            .f_narrow(1, 0, n - 1)?
            .f_reshape([-1, logits.size()[2]])?
            .f_cross_entropy_loss::<Tensor>(
                &ids.f_narrow(1, 1, n - 1)?.f_reshape([-1])?,
                None,
                tch::Reduction::Mean,
                -100,
                0.0,
            )?;
        loss.f_backward()?;
        {
            let _g = tch::no_grad_guard();
            let t = step as f64;
            let (c1, c2) = (1.0 - b1.powf(t), 1.0 - b2.powf(t));
            for ((_, w, f), (aw, af)) in params.iter_mut().zip(state.iter_mut()) {
                for (p, a, lr) in [(&mut *w, aw, cfg.lr), (&mut *f, af, cfg.f_lr)] {
                    let g = p.grad();
                    if !g.defined() {
                        continue;
                    }
                    a.m = a.m.f_mul_scalar(b1)?.f_add(&g.f_mul_scalar(1.0 - b1)?)?;
                    a.v =
                        a.v.f_mul_scalar(b2)?
                            .f_add(&g.f_square()?.f_mul_scalar(1.0 - b2)?)?;
                    let upd =
                        a.m.f_div_scalar(c1)?
                            .f_div(&a.v.f_div_scalar(c2)?.f_sqrt()?.f_add_scalar(eps)?)?
                            .f_mul_scalar(lr)?;
                    let _ = p.f_sub_(&upd)?;
                    p.zero_grad();
                }
                // Keep the clipping factor in a sane range.
                let _ = f.f_clamp_(0.05, 1.5)?;
            }
        }
        let l = loss.f_double_value(&[])?;
        losses.push(l);
        progress(step, l);
    }

    // Export: the codes the trained weights and clipping factors give.
    let _g = tch::no_grad_guard();
    let weights = load_weights(src, Device::Cpu, Kind::Float)?;
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let mut done = std::collections::HashSet::new();
    let mut plan = serde_json::Map::new();
    for (name, w, f) in &params {
        let w = w.f_to_device(Device::Cpu)?;
        let s = scale(&w, &f.f_to_device(Device::Cpu)?, &spec)?;
        let codes = w
            .f_div(&s)?
            .f_add_scalar(spec.zero)?
            .f_clamp(spec.qmin, spec.qmax)?
            .f_round()?
            .f_sub_scalar(spec.qmin)?
            .f_to_kind(Kind::Uint8)?;
        let q = QuantizedWeight::from_uniform(&codes, &s.f_squeeze_dim(1)?, cfg.bits)?;
        let key = format!("{name}.weight");
        out.extend(q.tensors(&key)?);
        plan.insert(
            key.clone(),
            serde_json::json!({"bits": cfg.bits, "method": "qat"}),
        );
        done.insert(key);
    }
    let mut names: Vec<String> = weights.names().cloned().collect();
    names.sort();
    for name in names {
        if done.contains(&name) {
            continue;
        }
        let t = weights.get_any(&name)?;
        let embed_like = name == "model.embed_tokens.weight" || name == "lm_head.weight";
        if embed_like && t.size()[1] % super::packed::block_codes(cfg.embed_bits) as i64 == 0 {
            let espec = UniformSpec::new(cfg.embed_bits)?;
            let (codes, s) = super::qat::rtn(&t, &espec)?;
            out.extend(QuantizedWeight::from_uniform(&codes, &s, cfg.embed_bits)?.tensors(&name)?);
            plan.insert(
                name.clone(),
                serde_json::json!({"bits": cfg.embed_bits, "method": "uniform"}),
            );
        } else {
            out.push((name, t));
        }
    }
    write_model_dir(
        src,
        dst,
        &out,
        serde_json::json!({
            "format": FORMAT,
            "method": "qat",
            "plan": format!("{}-bit QAT, {} steps", cfg.bits, losses.len()),
            "tensors": plan,
        }),
    )?;
    Ok(losses)
}

#[cfg(test)]
mod tests {
    use super::cut_windows;

    #[test]
    fn windows_are_full_length_and_short_text_is_one_window() {
        let ids: Vec<u32> = (0..10).collect();
        // 10 tokens in windows of 4: two full windows, the remainder (8, 9) dropped.
        assert_eq!(
            cut_windows(&ids, 4).unwrap(),
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]
        );
        assert_eq!(cut_windows(&ids, 16).unwrap(), vec![ids.clone()]);
        assert!(cut_windows(&ids[..1], 4).is_none());
    }
}
