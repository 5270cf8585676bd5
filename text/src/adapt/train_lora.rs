//! LoRA training on a frozen base: prompt/response pairs (JSONL), loss on the response tokens
//! only, AdamW with decoupled weight decay, gradient accumulation, periodic checkpoints in the
//! PEFT layout (so `LoraAdapter::load` and HF PEFT read them) and exact resume (adapter weights,
//! AdamW moments and the step counter are all saved).
//!
//! With a teacher (`distill_weight > 0`), the loss mixes in knowledge distillation: the KL
//! divergence from the teacher's next-token distribution (temperature T, scaled by T²) to the
//! student's at the same response positions — how an accuracy-recovery LoRA on a quantized
//! base learns from the full-precision model rather than from the data alone.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

use crate::checkpoint::{load_weights, write_safetensors};
use crate::decoder::Logits;
use crate::error::{Result, TextError};
use crate::generation::CausalLm;
use crate::lora::{deactivate, LoraAdapter, LoraTarget};
use crate::sampling::Rng;
use crate::tokenizer::{ChatMessage, Tokenizer};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoraTrainConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Suffixes of the module names to adapt (`q_proj`, …).
    pub targets: Vec<String>,
    /// Substrings of module names to leave alone although a target matches (`.experts.`: a
    /// PT-MoE adapter on attention and dense FFNs only).
    #[serde(default)]
    pub exclude: Vec<String>,
    pub lr: f64,
    pub weight_decay: f64,
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_len: usize,
    pub save_every: usize,
    pub seed: u64,
    /// Share of the distillation term in the loss: `(1 − w)·CE + w·T²·KL(teacher ‖ student)`
    /// (0: plain cross-entropy; needs a teacher when > 0).
    #[serde(default)]
    pub distill_weight: f64,
    /// Softmax temperature of the distillation term.
    #[serde(default = "one")]
    pub distill_temperature: f64,
}

fn one() -> f64 {
    1.0
}

impl LoraTrainConfig {
    /// Check the hyper-parameters; the message names the flag-like field that is wrong.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TextError::InvalidArgument(m));
        if self.rank == 0 || self.rank > 4096 {
            return bad(format!("rank must be in 1..=4096, got {}", self.rank));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!(
                "alpha must be a positive number, got {}",
                self.alpha
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("lr must be a positive number, got {}", self.lr));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight decay must be a number ≥ 0, got {}",
                self.weight_decay
            ));
        }
        for (name, v) in [
            ("steps", self.steps),
            ("batch size", self.batch_size),
            ("grad accum", self.grad_accum),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if self.max_len < 2 {
            return bad(format!(
                "max len must be at least 2 tokens, got {}",
                self.max_len
            ));
        }
        if !(self.distill_temperature.is_finite() && self.distill_temperature > 0.0) {
            return bad(format!(
                "distillation temperature must be a positive number, got {}",
                self.distill_temperature
            ));
        }
        if !(0.0..=1.0).contains(&self.distill_weight) {
            return bad(format!(
                "the distillation weight must be in [0, 1], got {}",
                self.distill_weight
            ));
        }
        Ok(())
    }
}

impl Default for LoraTrainConfig {
    fn default() -> Self {
        Self {
            rank: 32,
            alpha: 16.0,
            targets: crate::lora::DEFAULT_TARGETS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            exclude: Vec::new(),
            lr: 2e-4,
            weight_decay: 0.0,
            steps: 100,
            batch_size: 4,
            grad_accum: 1,
            max_len: 256,
            save_every: 50,
            seed: 0,
            distill_weight: 0.0,
            distill_temperature: 1.0,
        }
    }
}

/// One training pair, tokenised: `ids` = prompt ++ response, loss on `ids[prompt_len..]`.
#[derive(Debug, Clone)]
pub struct Example {
    pub ids: Vec<u32>,
    pub prompt_len: usize,
}

#[derive(Deserialize)]
struct Pair {
    prompt: String,
    response: String,
}

/// Read `{"prompt", "response"}` lines; with `chat` the pair is rendered through the chat
/// template (user turn, then the assistant's answer ending with the template's end marker).
pub fn load_jsonl(
    path: &Path,
    tok: &Tokenizer,
    chat: bool,
    max_len: usize,
) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| TextError::io(path, e))?;
    let mut out = Vec::new();
    let mut cut = 0;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: Pair = serde_json::from_str(line).map_err(|e| {
            TextError::InvalidArgument(format!(
                "{}:{}: expected {{\"prompt\", \"response\"}}: {e}",
                path.display(),
                i + 1
            ))
        })?;
        // In the model's chat format (token ids as generation is fed them), or raw text.
        let (prompt_ids, mut ids) = if chat {
            let user = [ChatMessage::new("user", &p.prompt)];
            let both = [
                ChatMessage::new("user", &p.prompt),
                ChatMessage::new("assistant", &p.response),
            ];
            (
                tok.encode_chat(&user, true)?,
                tok.encode_chat(&both, false)?,
            )
        } else {
            (
                tok.encode(&p.prompt)?,
                tok.encode(&format!("{}{}", p.prompt, p.response))?,
            )
        };
        if !ids.starts_with(&prompt_ids) || ids.len() <= prompt_ids.len() {
            return Err(TextError::InvalidArgument(format!(
                "{}:{}: the response adds no tokens after the prompt",
                path.display(),
                i + 1
            )));
        }
        ids.truncate(max_len);
        if ids.len() > prompt_ids.len() {
            out.push(Example {
                prompt_len: prompt_ids.len(),
                ids,
            });
        } else {
            cut += 1;
        }
    }
    if out.is_empty() {
        return Err(TextError::InvalidArgument(if cut > 0 {
            format!(
                "{}: no training pairs: every prompt ({cut}) fills the --max-len of {max_len} tokens, leaving no response token",
                path.display()
            )
        } else {
            format!("{}: no training pairs", path.display())
        }));
    }
    Ok(out)
}

/// Trainable LoRA parameters and their AdamW state, by module name.
pub struct LoraTrainer {
    pub cfg: LoraTrainConfig,
    names: Vec<String>,
    params: Vec<(Tensor, Tensor)>, // (A [r, in], B [out, r]), fp32, requires grad
    moments: Vec<[Tensor; 4]>,     // m_A, v_A, m_B, v_B
    pub step: usize,
    rng: Rng,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub step: usize,
    pub config: LoraTrainConfig,
    pub losses: Vec<f64>,
}

impl LoraTrainer {
    /// Fresh adapter on `decoder`'s targeted linears: A ~ U(±1/√in) (Kaiming, as PEFT), B = 0.
    pub fn new<M: LoraTarget + ?Sized>(decoder: &mut M, cfg: LoraTrainConfig) -> Result<Self> {
        // Our own generator, not libtorch's global one: runs repeat whatever else draws.
        let mut init_rng = Rng::new(cfg.seed.wrapping_add(0x5eed));
        let mut names = Vec::new();
        let mut params = Vec::new();
        let mut moments = Vec::new();
        for (name, lin) in decoder.lora_linears() {
            if !cfg.targets.iter().any(|t| name.ends_with(t.as_str()))
                || cfg.exclude.iter().any(|x| name.contains(x.as_str()))
            {
                continue;
            }
            let dev = lin.device();
            let (r, i, o) = (cfg.rank as i64, lin.in_features(), lin.out_features());
            let bound = 1.0 / (i as f64).sqrt();
            let vals: Vec<f32> = (0..r * i)
                .map(|_| ((init_rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                .collect();
            let a = Tensor::f_from_slice(&vals)?
                .f_view([r, i])?
                .f_to_device(dev)?;
            let b = Tensor::f_zeros([o, r], (Kind::Float, dev))?;
            moments.push([
                a.zeros_like(),
                a.zeros_like(),
                b.zeros_like(),
                b.zeros_like(),
            ]);
            params.push((a.set_requires_grad(true), b.set_requires_grad(true)));
            names.push(name);
        }
        if names.is_empty() {
            return Err(TextError::InvalidArgument(format!(
                "no linear layer matches the targets {:?}",
                cfg.targets
            )));
        }
        let rng = Rng::new(cfg.seed);
        Ok(Self {
            cfg,
            names,
            params,
            moments,
            step: 0,
            rng,
        })
    }

    fn scale(&self) -> f64 {
        self.cfg.alpha / self.cfg.rank as f64
    }

    /// Put the trainable tensors on the decoder as overlays (sharing storage).
    pub fn attach<M: LoraTarget + ?Sized>(&self, decoder: &mut M) -> Result<()> {
        let modules = self
            .names
            .iter()
            .zip(&self.params)
            .map(|(n, (a, b))| (n.clone(), (a.shallow_clone(), b.shallow_clone())));
        LoraAdapter::from_modules("training", self.cfg.rank, self.scale(), modules)
            .activate(decoder)
    }

    /// The training loss of a batch (right-padded; padding ignored): the mean response-token
    /// cross-entropy, mixed with the distillation term when `teacher` is given and
    /// `distill_weight > 0` (see the module docs).
    pub fn loss<M: CausalLm>(
        &self,
        decoder: &M,
        batch: &[&Example],
        teacher: Option<&M>,
    ) -> Result<Tensor> {
        let len = batch.iter().map(|e| e.ids.len()).max().unwrap_or(1);
        let (mut ids, mut labels) = (Vec::new(), Vec::new());
        for e in batch {
            for t in 0..len {
                ids.push(*e.ids.get(t).unwrap_or(&0) as i64);
                // labels[t] is the token predicted at position t, i.e. ids[t + 1].
                let target = if t + 1 < e.ids.len() && t + 1 >= e.prompt_len {
                    e.ids[t + 1] as i64
                } else {
                    -100
                };
                labels.push(target);
            }
        }
        let b = batch.len() as i64;
        let ids = Tensor::f_from_slice(&ids)?.f_view([b, len as i64])?;
        let labels = Tensor::f_from_slice(&labels)?.f_to_device(decoder.lm_device())?;
        // Right padding never affects earlier positions under a causal mask: no mask needed.
        let mut cache = decoder.new_lm_cache(b);
        let logits = decoder.forward_lm(&ids, None, &mut cache, Logits::All)?; // [b, len, vocab]
        let vocab = logits.size()[2];
        let logits = logits.f_view([-1, vocab])?; // [b·len, vocab]
        let ce =
            logits.f_cross_entropy_loss::<Tensor>(&labels, None, Reduction::Mean, -100, 0.0)?;
        let w = self.cfg.distill_weight;
        let Some(teacher) = teacher.filter(|_| w > 0.0) else {
            return Ok(ce);
        };
        // The response positions only: [n, vocab] for student and teacher.
        let rows = labels.f_ne(-100)?.f_nonzero()?.f_view([-1])?;
        let t_logits = tch::no_grad(|| -> Result<Tensor> {
            let mut tc = teacher.new_lm_cache(b);
            let t = teacher.forward_lm(&ids, None, &mut tc, Logits::All)?;
            Ok(t.f_view([-1, vocab])?
                .f_index_select(0, &rows.f_to_device(t.device())?)?
                .f_to_device(logits.device())?)
        })?;
        let kl = distillation_kl(
            &logits.f_index_select(0, &rows)?,
            &t_logits,
            self.cfg.distill_temperature,
        )?;
        Ok(ce.f_mul_scalar(1.0 - w)?.f_add(&kl.f_mul_scalar(w)?)?)
    }

    fn next_batch<'a>(&mut self, data: &'a [Example]) -> Vec<&'a Example> {
        (0..self.cfg.batch_size)
            .map(|_| &data[(self.rng.next_u64() % data.len() as u64) as usize])
            .collect()
    }

    /// One optimiser step over `grad_accum` micro-batches; returns the mean loss.
    pub fn train_step<M: CausalLm>(
        &mut self,
        decoder: &M,
        data: &[Example],
        teacher: Option<&M>,
    ) -> Result<f64> {
        let mut total = 0.0;
        for _ in 0..self.cfg.grad_accum.max(1) {
            let batch = self.next_batch(data);
            let loss = self
                .loss(decoder, &batch, teacher)?
                .f_div_scalar(self.cfg.grad_accum.max(1) as f64)?;
            loss.f_backward()?;
            total += loss.double_value(&[]);
        }
        self.step += 1;
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        let lr = self.cfg.lr;
        let (c1, c2) = (
            1.0 - b1.powi(self.step as i32),
            1.0 - b2.powi(self.step as i32),
        );
        tch::no_grad(|| -> Result<()> {
            for ((a, b), m) in self.params.iter_mut().zip(self.moments.iter_mut()) {
                for (p, (mi, vi)) in [(a, (0, 1)), (b, (2, 3))] {
                    let g = p.grad();
                    if !g.defined() {
                        continue;
                    }
                    m[mi] = m[mi].f_mul_scalar(b1)?.f_add(&g.f_mul_scalar(1.0 - b1)?)?;
                    m[vi] = m[vi]
                        .f_mul_scalar(b2)?
                        .f_add(&g.f_square()?.f_mul_scalar(1.0 - b2)?)?;
                    let upd = m[mi]
                        .f_div_scalar(c1)?
                        .f_div(&m[vi].f_div_scalar(c2)?.f_sqrt()?.f_add_scalar(eps)?)?;
                    // Decoupled weight decay, then the Adam step.
                    let _ = p.f_mul_scalar_(1.0 - lr * self.cfg.weight_decay)?;
                    let _ = p.f_sub_(&upd.f_mul_scalar(lr)?)?;
                    p.zero_grad();
                }
            }
            Ok(())
        })?;
        Ok(total)
    }

    /// Write the adapter (PEFT layout) and, for resume, the optimiser state.
    pub fn save(&self, dir: &Path, losses: &[f64]) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| TextError::io(dir, e))?;
        let mut adapter = Vec::new();
        let mut state = Vec::new();
        for (i, (name, (a, b))) in self.names.iter().zip(&self.params).enumerate() {
            adapter.push((format!("base_model.model.{name}.lora_A.weight"), a.detach()));
            adapter.push((format!("base_model.model.{name}.lora_B.weight"), b.detach()));
            for (j, t) in self.moments[i].iter().enumerate() {
                state.push((format!("{name}.m{j}"), t.shallow_clone()));
            }
        }
        write_safetensors(&dir.join("adapter_model.safetensors"), &adapter, None)?;
        write_safetensors(&dir.join("optimizer.safetensors"), &state, None)?;
        let cfg = serde_json::json!({
            "peft_type": "LORA", "r": self.cfg.rank, "lora_alpha": self.cfg.alpha,
            "target_modules": self.cfg.targets, "lora_dropout": 0.0, "bias": "none",
            "task_type": "CAUSAL_LM", "use_rslora": false,
        });
        let write = |name: &str, v: serde_json::Value| -> Result<()> {
            let text = serde_json::to_string_pretty(&v).unwrap_or_default();
            crate::atomic_write::write_atomic(&dir.join(name), text.as_bytes())
        };
        write("adapter_config.json", cfg)?;
        let st = TrainState {
            step: self.step,
            config: self.cfg.clone(),
            losses: losses.to_vec(),
        };
        write(
            "trainer_state.json",
            serde_json::to_value(&st).unwrap_or_default(),
        )?;
        Ok(())
    }

    /// Resume from a directory written by [`LoraTrainer::save`].
    pub fn resume<M: CausalLm + LoraTarget>(
        decoder: &mut M,
        dir: &Path,
    ) -> Result<(Self, Vec<f64>)> {
        let sp = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| TextError::io(&sp, e))?;
        let st: TrainState = serde_json::from_str(&text)
            .map_err(|e| TextError::checkpoint(&sp, format!("bad JSON: {e}")))?;
        let mut me = Self::new(decoder, st.config.clone())?;
        let dev = decoder.lm_device();
        let adapter = load_weights(&dir.join("adapter_model.safetensors"), dev, Kind::Float)?;
        let state = load_weights(&dir.join("optimizer.safetensors"), dev, Kind::Float)?;
        tch::no_grad(|| -> Result<()> {
            for (i, name) in me.names.clone().iter().enumerate() {
                let (a, b) = &mut me.params[i];
                let ta =
                    adapter.get(&format!("base_model.model.{name}.lora_A.weight"), &a.size())?;
                let tb =
                    adapter.get(&format!("base_model.model.{name}.lora_B.weight"), &b.size())?;
                a.f_copy_(&ta)?;
                b.f_copy_(&tb)?;
                for j in 0..4 {
                    let shape = me.moments[i][j].size();
                    me.moments[i][j] = state.get(&format!("{name}.m{j}"), &shape)?;
                }
            }
            Ok(())
        })?;
        me.step = st.step;
        // Replay the data sampler to where it was.
        for _ in 0..st.step * me.cfg.grad_accum.max(1) * me.cfg.batch_size {
            me.rng.next_u64();
        }
        Ok((me, st.losses))
    }
}

/// `T²·KL(softmax(teacher/T) ‖ softmax(student/T))`, the mean over rows of `[n, vocab]`
/// logits (Hinton et al.'s distillation term; T² keeps its gradients on the scale of T = 1).
pub fn distillation_kl(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    let t = temperature.max(1e-6);
    let log_p = teacher
        .f_to_kind(Kind::Float)?
        .f_div_scalar(t)?
        .f_log_softmax(-1, Kind::Float)?;
    let log_q = student
        .f_to_kind(Kind::Float)?
        .f_div_scalar(t)?
        .f_log_softmax(-1, Kind::Float)?;
    let n = student.size().first().copied().unwrap_or(1).max(1);
    Ok(log_p
        .f_exp()?
        .f_mul(&log_p.f_sub(&log_q)?)?
        .f_sum(Kind::Float)?
        .f_div_scalar(n as f64)?
        .f_mul_scalar(t * t)?)
}

/// Train (or resume) and checkpoint into `out`. `progress(step, loss)` after each step.
/// `teacher`: the model to distil from when `cfg.distill_weight > 0` (same vocabulary).
pub fn train<M: CausalLm + LoraTarget>(
    decoder: &mut M,
    data: &[Example],
    cfg: LoraTrainConfig,
    out: &Path,
    resume: bool,
    teacher: Option<&M>,
    mut progress: impl FnMut(usize, f64),
) -> Result<(PathBuf, Vec<f64>)> {
    if decoder.lm_kind() != Kind::Float {
        return Err(TextError::InvalidArgument(
            "LoRA training needs the base model in fp32 (--dtype fp32)".into(),
        ));
    }
    cfg.validate()?;
    let (mut trainer, mut losses) = if resume && out.join("trainer_state.json").exists() {
        LoraTrainer::resume(decoder, out)?
    } else {
        (LoraTrainer::new(decoder, cfg.clone())?, Vec::new())
    };
    // The distillation settings the run uses (a resumed run keeps its saved ones).
    let w = trainer.cfg.distill_weight;
    if !(0.0..=1.0).contains(&w) {
        return Err(TextError::InvalidArgument(format!(
            "the distillation weight must be in [0, 1], got {w}"
        )));
    }
    if w > 0.0 {
        let Some(t) = teacher else {
            return Err(TextError::InvalidArgument(
                "distillation (distill_weight > 0) needs a teacher model".into(),
            ));
        };
        if t.vocab_size() != decoder.vocab_size() {
            return Err(TextError::InvalidArgument(format!(
                "the teacher's vocabulary ({}) differs from the student's ({})",
                t.vocab_size(),
                decoder.vocab_size()
            )));
        }
    }
    trainer.cfg.steps = cfg.steps;
    trainer.attach(decoder)?;
    while trainer.step < trainer.cfg.steps {
        let loss = trainer.train_step(decoder, data, teacher)?;
        if !loss.is_finite() {
            deactivate(decoder)?;
            return Err(TextError::InvalidArgument(format!(
                "step {}: the loss became {loss}; training stopped without writing this state \
                 (try a lower learning rate{})",
                trainer.step,
                if trainer.step > trainer.cfg.save_every && trainer.cfg.save_every > 0 {
                    "; the last checkpoint in the output folder is kept"
                } else {
                    ""
                }
            )));
        }
        losses.push(loss);
        progress(trainer.step, loss);
        if trainer.cfg.save_every > 0 && trainer.step % trainer.cfg.save_every == 0 {
            trainer.save(out, &losses)?;
        }
    }
    trainer.save(out, &losses)?;
    deactivate(decoder)?;
    Ok((out.to_path_buf(), losses))
}
