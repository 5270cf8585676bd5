//! [`EvalBackend`] for afm-text models: the on-device decoder (SmolLM2 and every checkpoint
//! `TextModel` loads) and the server model (PT-MoE, ours or a tamm folder), one code path over
//! [`LanguageModel`].
//!
//! Multiple choice with single-token continuations (" A".." D") takes one forward per
//! question: the logits after the last prompt token give every choice's log-likelihood. With
//! prefix reuse the few-shot prefix runs once per group; each batch broadcasts that cache to
//! its rows (copy-on-extend: the prefix cache itself is never extended) and only the question
//! tokens run, left-padded between prefix and question so every row ends at the last
//! position. Multi-token continuations run once per continuation. Generation is greedy
//! decoding from a fork of the prefix cache.

use std::path::Path;

use afm_text::generation::{generate_from_logits_lm, CausalLm, GenerateOptions};
use afm_text::ptmoe_model::{is_ptmoe_dir, PtMoeModel};
use afm_text::{ChatMessage, DType, LanguageModel, Logits, SamplingConfig, TextModel};
use tch::{Device, Kind, Tensor};

use crate::backend::{cut_at_stop, ChoiceRequest, EvalBackend, GenerateRequest};
use crate::error::{EvalError, Result};

fn be<E: std::fmt::Display>(e: E) -> EvalError {
    EvalError::Backend(e.to_string())
}

/// The last component of a model or adapter directory, for report names.
fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// The cache of a model's network.
type CacheOf<L> = <<L as LanguageModel>::Net as CausalLm>::Cache;

/// A loaded text model and the KV cache of the last prefix it saw.
pub struct TextBackend<L: LanguageModel = TextModel> {
    model: L,
    name: String,
    prefix: Option<(Vec<u32>, CacheOf<L>, Tensor)>,
}

impl TextBackend<TextModel> {
    /// Load an on-device model folder (config.json, model.safetensors, tokenizer.json, or a
    /// tamm folder).
    pub fn load(dir: &Path, device: Device, dtype: DType) -> Result<Self> {
        Self::from_dir(dir, device, dtype).map_err(be)
    }
}

/// The backend for any model directory: PT-MoE folders (ours or tamm's) run the server model,
/// every other folder the on-device decoder; `adapter` (PEFT, or a toolkit `.pt` on a tamm
/// model) is put on it.
pub fn open_dir(
    dir: &Path,
    device: Device,
    dtype: DType,
    adapter: Option<&Path>,
) -> Result<Box<dyn EvalBackend>> {
    fn with<L: LanguageModel + 'static>(
        b: TextBackend<L>,
        adapter: Option<&Path>,
    ) -> Result<Box<dyn EvalBackend>> {
        Ok(Box::new(match adapter {
            Some(a) => b.with_adapter(a)?,
            None => b,
        }))
    }
    if is_ptmoe_dir(dir) {
        let b = TextBackend::<PtMoeModel>::from_dir(dir, device, dtype).map_err(be)?;
        with(b, adapter)
    } else {
        with(TextBackend::load(dir, device, dtype)?, adapter)
    }
}

impl<L: LanguageModel> TextBackend<L> {
    /// Load a model folder of kind `L` (see [`open_dir`] for the choice); a folder without a
    /// tokenizer is an error. The backend is named after the folder.
    pub fn from_dir(dir: &Path, device: Device, dtype: DType) -> afm_text::Result<Self> {
        let model = L::load_dir(dir, device, dtype)?;
        model.tokenizer_or_err()?;
        Ok(Self::new(model, dir_name(dir)))
    }

    /// Put the LoRA adapter at `dir` (PEFT layout, or a toolkit `.pt` on a tamm model) on the
    /// model for every later request; the backend's name becomes `MODEL+ADAPTER`.
    pub fn with_adapter(mut self, dir: &Path) -> Result<Self> {
        let adapter = self
            .model
            .load_adapter(dir)
            .map_err(|e| EvalError::Backend(format!("adapter {}: {e}", dir.display())))?;
        adapter.activate(self.model.net_mut()).map_err(be)?;
        self.name = format!("{}+{}", self.name, dir_name(dir));
        self.prefix = None; // a cached prefix was computed without the adapter
        Ok(self)
    }

    pub fn new(model: L, name: String) -> Self {
        TextBackend {
            model,
            name,
            prefix: None,
        }
    }

    fn decoder(&self) -> &L::Net {
        self.model.net()
    }

    /// The cache after `prefix` (batch 1) and its last-position logits, computed once per
    /// distinct prefix.
    fn prefix_state(&mut self, prefix: &[u32]) -> Result<(&CacheOf<L>, &Tensor)> {
        let fresh = !matches!(&self.prefix, Some((p, _, _)) if p == prefix);
        if fresh {
            let mut cache = self.decoder().new_lm_cache(1);
            let ids = ids_2d(&[prefix.to_vec()])?;
            let logits = self
                .decoder()
                .forward_lm(&ids, None, &mut cache, Logits::Last)
                .map_err(be)?;
            self.prefix = Some((prefix.to_vec(), cache, logits));
        }
        match &self.prefix {
            Some((_, c, l)) => Ok((c, l)),
            None => Err(EvalError::Backend("prefix cache missing".into())),
        }
    }

    /// Last-position log-probabilities `[batch, vocab]` after `prefix ++ rows[i]`, all rows in
    /// one forward (left padding). With `reuse`, the prefix comes from its cache.
    fn last_logprobs(&mut self, prefix: &[u32], rows: &[Vec<u32>], reuse: bool) -> Result<Tensor> {
        let b = rows.len() as i64;
        let reuse = reuse && !prefix.is_empty() && rows.iter().all(|r| !r.is_empty());
        let (mut cache, seqs): (CacheOf<L>, Vec<Vec<u32>>) = if reuse {
            let (pc, _) = self.prefix_state(prefix)?;
            let cache = if b == 1 {
                L::Net::fork_cache(pc)
            } else {
                L::Net::repeat_cache(pc, b)
            }
            .map_err(be)?;
            (cache, rows.to_vec())
        } else {
            let seqs = rows
                .iter()
                .map(|r| [prefix, r.as_slice()].concat())
                .collect();
            (self.decoder().new_lm_cache(b), seqs)
        };
        let (ids, mask) = left_pad(&seqs)?;
        let logits = self
            .decoder()
            .forward_lm(&ids, mask.as_ref(), &mut cache, Logits::Last)
            .map_err(be)?; // [b, 1, vocab]
        logits
            .f_select(1, 0)
            .and_then(|l| l.f_log_softmax(-1, Kind::Float))
            .map_err(be)
    }

    /// Summed log-likelihood of `cont` after `prefix ++ body` (multi-token continuations).
    fn continuation_ll(
        &mut self,
        prefix: &[u32],
        body: &[u32],
        cont: &[u32],
        reuse: bool,
    ) -> Result<f64> {
        let (mut cache, ctx_last, rest): (CacheOf<L>, Tensor, Vec<u32>) =
            if reuse && !prefix.is_empty() {
                let (pc, pl) = self.prefix_state(prefix)?;
                (
                    L::Net::fork_cache(pc).map_err(be)?,
                    pl.shallow_clone(),
                    [body, cont].concat(),
                )
            } else {
                let all = [prefix, body, cont].concat();
                let first = all
                    .first()
                    .copied()
                    .ok_or_else(|| EvalError::Backend("empty prompt".into()))?;
                let mut cache = self.decoder().new_lm_cache(1);
                let l = self
                    .decoder()
                    .forward_lm(&ids_2d(&[vec![first]])?, None, &mut cache, Logits::Last)
                    .map_err(be)?;
                (cache, l, all[1..].to_vec())
            };
        // Logits for every position of `rest`; position i predicts rest[i + 1].
        let logits = self
            .decoder()
            .forward_lm(
                &ids_2d(std::slice::from_ref(&rest))?,
                None,
                &mut cache,
                Logits::All,
            )
            .map_err(be)?; // [1, n, vocab]
        let all = Tensor::f_cat(&[&ctx_last, &logits], 1).map_err(be)?; // [1, n+1, vocab]
        let lp = all.f_log_softmax(-1, Kind::Float).map_err(be)?;
        let n_rest = rest.len();
        let mut total = 0.0;
        for (k, &tok) in cont.iter().enumerate() {
            // cont[k] sits at rest[n_rest - cont.len() + k]; it is predicted by the position
            // before it, which in `all` (shifted by one) has the same index.
            let pos = (n_rest - cont.len() + k) as i64;
            total += lp.f_double_value(&[0, pos, tok as i64]).map_err(be)?;
        }
        Ok(total)
    }
}

fn ids_2d(rows: &[Vec<u32>]) -> Result<Tensor> {
    let n = rows.first().map_or(0, Vec::len) as i64;
    let flat: Vec<i64> = rows.iter().flatten().map(|&t| i64::from(t)).collect();
    Tensor::f_from_slice(&flat)
        .and_then(|t| t.f_view([rows.len() as i64, n]))
        .map_err(be)
}

/// Left-pad rows to one length: ids `[b, n]` and a mask (1 = real) when any row is padded.
fn left_pad(rows: &[Vec<u32>]) -> Result<(Tensor, Option<Tensor>)> {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let padded = rows.iter().any(|r| r.len() != n);
    let mut ids = Vec::with_capacity(rows.len() * n);
    let mut mask = Vec::with_capacity(rows.len() * n);
    for r in rows {
        let pad = n - r.len();
        ids.extend(std::iter::repeat_n(0i64, pad).chain(r.iter().map(|&t| i64::from(t))));
        mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1i64, r.len())));
    }
    let shape = [rows.len() as i64, n as i64];
    let ids = Tensor::f_from_slice(&ids)
        .and_then(|t| t.f_view(shape))
        .map_err(be)?;
    let mask = if padded {
        Some(
            Tensor::f_from_slice(&mask)
                .and_then(|t| t.f_view(shape))
                .map_err(be)?,
        )
    } else {
        None
    };
    Ok((ids, mask))
}

impl<L: LanguageModel> EvalBackend for TextBackend<L> {
    fn model_name(&self) -> String {
        self.name.clone()
    }

    fn context_len(&self) -> Option<usize> {
        Some(self.decoder().context_len())
    }

    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // A prompt that opens with the AFM chat frame (`--chat` on a tamm model) is tokenized
        // as tamm's chat preprocessor does (leading EOS, no dummy prefix).
        self.model
            .tokenizer_or_err()
            .and_then(|t| {
                if t.chat_format() == afm_text::tokenizer::ChatFormat::AfmV6
                    && text.starts_with(afm_text::tokenizer::AFM_TURN_START)
                {
                    t.encode_formatted(text)
                } else {
                    t.encode(text)
                }
            })
            .map_err(be)
    }

    fn chat_wrap(&self, user_text: &str) -> Result<String> {
        self.model
            .tokenizer_or_err()
            .and_then(|t| t.apply_chat_template(&[ChatMessage::new("user", user_text)], true))
            .map_err(be)
    }

    fn choice_loglikelihoods(
        &mut self,
        prefix: &[u32],
        requests: &[ChoiceRequest],
        reuse_prefix: bool,
    ) -> Result<Vec<Vec<f64>>> {
        let _guard = tch::no_grad_guard();
        let single = requests
            .iter()
            .all(|r| r.continuations.iter().all(|c| c.len() == 1));
        if single && !requests.is_empty() {
            let bodies: Vec<Vec<u32>> = requests.iter().map(|r| r.body.clone()).collect();
            let lp = self
                .last_logprobs(prefix, &bodies, reuse_prefix)?
                .f_to_device(Device::Cpu)
                .map_err(be)?;
            return requests
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    r.continuations
                        .iter()
                        .map(|c| lp.f_double_value(&[i as i64, i64::from(c[0])]).map_err(be))
                        .collect()
                })
                .collect();
        }
        let mut out = Vec::with_capacity(requests.len());
        for r in requests {
            let mut lls = Vec::with_capacity(r.continuations.len());
            for c in &r.continuations {
                lls.push(self.continuation_ll(prefix, &r.body, c, reuse_prefix)?);
            }
            out.push(lls);
        }
        Ok(out)
    }

    fn generate_greedy(
        &mut self,
        prefix: &[u32],
        requests: &[GenerateRequest],
        reuse_prefix: bool,
    ) -> Result<Vec<String>> {
        let _guard = tch::no_grad_guard();
        let mut out = Vec::with_capacity(requests.len());
        for r in requests {
            let context = [prefix, r.body.as_slice()].concat();
            let (mut cache, logits) = if reuse_prefix && !prefix.is_empty() && !r.body.is_empty() {
                let (pc, _) = self.prefix_state(prefix)?;
                let mut cache = L::Net::fork_cache(pc).map_err(be)?;
                let l = self
                    .decoder()
                    .forward_lm(
                        &ids_2d(std::slice::from_ref(&r.body))?,
                        None,
                        &mut cache,
                        Logits::Last,
                    )
                    .map_err(be)?;
                (cache, l)
            } else {
                let mut cache = self.decoder().new_lm_cache(1);
                let l = self
                    .decoder()
                    .forward_lm(
                        &ids_2d(std::slice::from_ref(&context))?,
                        None,
                        &mut cache,
                        Logits::Last,
                    )
                    .map_err(be)?;
                (cache, l)
            };
            let opts = GenerateOptions {
                max_new_tokens: r.max_new_tokens,
                sampling: SamplingConfig::greedy(),
                stop_strings: r.stop.clone(),
                stop_on_eos: true,
            };
            let g = generate_from_logits_lm(
                self.decoder(),
                self.model.tokenizer_opt(),
                &mut cache,
                &logits,
                &context,
                &opts,
                &mut |_| {},
            )
            .map_err(be)?;
            out.push(cut_at_stop(&g.text, &r.stop).0);
        }
        Ok(out)
    }
}

/// Parse `auto|fp32|bf16|fp16` for `device`.
pub fn parse_dtype(s: &str, device: Device) -> Result<DType> {
    DType::parse(s, device).map_err(|e| EvalError::Config(e.to_string()))
}
