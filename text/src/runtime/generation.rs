//! Generation: prefill, then decode token by token through the KV cache, with sampling,
//! stopping (EOS, stop strings, max tokens, context) and streaming of text as it is decided.
//!
//! Apart from the model (it only calls [`CausalLm::forward_lm`], which the on-device
//! [`Decoder`] and the server [`PtMoe`] implement) and from preprocessing.

use std::time::Instant;

use tch::{Kind, Tensor};

use crate::decoder::{Decoder, Logits};
use crate::error::{Result, TextError};
use crate::kv_cache::KvCache;
use crate::ptmoe::{PtMoe, PtMoeCache};
use crate::sampling::{Sampler, SamplingConfig};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Stop when the text contains one of these (it is cut before the stop string).
    pub stop_strings: Vec<String>,
    /// Stop on the model's EOS ids.
    pub stop_on_eos: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: SamplingConfig::greedy(),
            stop_strings: Vec::new(),
            stop_on_eos: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    ContextFull,
}

#[derive(Debug, Clone, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl GenerationStats {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    /// Decode speed: tokens after the first, over the time spent decoding them.
    pub fn decode_tok_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// Generated ids (EOS excluded).
    pub tokens: Vec<u32>,
    /// Decoded text, cut before any stop string.
    pub text: String,
    pub stop_reason: StopReason,
    pub stats: GenerationStats,
}

/// Incremental detokenisation that emits only text that can no longer change: it holds back
/// an incomplete UTF-8 sequence and anything that could still become a stop string.
struct TextStream<'a> {
    tokenizer: Option<&'a Tokenizer>,
    stop: &'a [String],
    emitted: usize,
}

impl TextStream<'_> {
    /// Full text so far and, if a stop string occurred, where it starts.
    fn text(&self, ids: &[u32]) -> Result<(String, Option<usize>)> {
        let Some(tok) = self.tokenizer else {
            return Ok((String::new(), None));
        };
        let text = tok.decode(ids, true)?;
        let cut = self.stop.iter().filter_map(|s| text.find(s.as_str())).min();
        Ok((text, cut))
    }

    /// New safe text to emit.
    fn advance(&mut self, text: &str, cut: Option<usize>, finished: bool) -> String {
        let mut end = match cut {
            Some(c) => c,
            None if finished => text.len(),
            None => {
                let hold = self
                    .stop
                    .iter()
                    .map(|s| s.len().saturating_sub(1))
                    .max()
                    .unwrap_or(0);
                let mut e = text.len().saturating_sub(hold);
                // A trailing U+FFFD is an incomplete multi-byte character: wait for the rest.
                if text.ends_with('\u{FFFD}') {
                    e = e.min(text.len() - '\u{FFFD}'.len_utf8());
                }
                e
            }
        };
        while end > 0 && !text.is_char_boundary(end) {
            end -= 1;
        }
        if end <= self.emitted {
            return String::new();
        }
        let out = text[self.emitted..end].to_string();
        self.emitted = end;
        out
    }
}

/// What generation needs of a causal language model.
pub trait CausalLm {
    type Cache;
    /// Run `ids` ([batch, seq]) extending `cache`; fp32 logits.
    fn forward_lm(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut Self::Cache,
        logits: Logits,
    ) -> Result<Tensor>;
    /// A fresh cache for `batch` rows.
    fn new_lm_cache(&self, batch: i64) -> Self::Cache;
    /// Tokens the cache holds.
    fn cache_len(cache: &Self::Cache) -> i64;
    /// Mark (or end) generation's first-token pass, the prompt's prefill (a model with tamm's
    /// `skip_quantize_for_first_token` attends to the prompt unquantised then). No-op by default.
    fn set_first_token_pass(_cache: &mut Self::Cache, _on: bool) {}
    fn eos_ids(&self) -> Vec<u32>;
    /// The context length in tokens.
    fn context_len(&self) -> usize;
    /// The vocabulary size (the logits' last dimension).
    fn vocab_size(&self) -> usize;
    /// An independent copy of `cache` (extending it leaves the original untouched).
    fn fork_cache(cache: &Self::Cache) -> Result<Self::Cache>;
    /// A batch-1 cache broadcast to `n` rows (a shared prefix for a batch of requests).
    fn repeat_cache(cache: &Self::Cache, n: i64) -> Result<Self::Cache>;
    /// The device of its embedding and head (where inputs and logits live).
    fn lm_device(&self) -> tch::Device;
    /// The dtype of its weights.
    fn lm_kind(&self) -> tch::Kind;
    /// The width of its token embeddings.
    fn hidden_size(&self) -> usize;
    /// Token embeddings `[batch, seq, hidden]` of `ids` (`[batch, seq]`).
    fn embed_ids(&self, ids: &Tensor) -> Result<Tensor>;
    /// [`CausalLm::forward_lm`] from embeddings (token embeddings with, e.g., visual tokens
    /// spliced in).
    fn forward_embeds_lm(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut Self::Cache,
        logits: Logits,
    ) -> Result<Tensor>;
}

/// The [`CausalLm`] items the on-device decoder and PT-MoE implement alike (same method
/// names on the model, its config and its cache `$cache`).
macro_rules! causal_lm_common {
    ($cache:ty) => {
        type Cache = $cache;
        fn forward_lm(
            &self,
            ids: &Tensor,
            mask: Option<&Tensor>,
            cache: &mut $cache,
            logits: Logits,
        ) -> Result<Tensor> {
            self.forward(ids, mask, cache, logits)
        }
        fn new_lm_cache(&self, batch: i64) -> $cache {
            self.new_cache(batch)
        }
        fn cache_len(cache: &$cache) -> i64 {
            cache.len()
        }
        fn eos_ids(&self) -> Vec<u32> {
            self.cfg.eos_ids()
        }
        fn context_len(&self) -> usize {
            self.cfg.max_position_embeddings
        }
        fn vocab_size(&self) -> usize {
            self.cfg.vocab_size
        }
        fn fork_cache(cache: &$cache) -> Result<$cache> {
            cache.fork()
        }
        fn repeat_cache(cache: &$cache, n: i64) -> Result<$cache> {
            cache.repeat_batch(n)
        }
        fn lm_device(&self) -> tch::Device {
            self.device()
        }
        fn lm_kind(&self) -> tch::Kind {
            self.kind()
        }
        fn hidden_size(&self) -> usize {
            self.cfg.hidden_size
        }
        fn forward_embeds_lm(
            &self,
            x: &Tensor,
            mask: Option<&Tensor>,
            cache: &mut $cache,
            logits: Logits,
        ) -> Result<Tensor> {
            self.forward_embeds(x, mask, cache, logits)
        }
    };
}

impl CausalLm for Decoder {
    causal_lm_common!(KvCache);
    fn set_first_token_pass(cache: &mut KvCache, on: bool) {
        cache.set_first_token_pass(on);
    }
    fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed.forward(&ids.f_to_device(self.device())?)
    }
}

impl CausalLm for PtMoe {
    causal_lm_common!(PtMoeCache);
    fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        PtMoe::embed_ids(self, ids)
    }
}

/// Greedy/sampled generation from a prompt of token ids (fresh cache, batch 1).
pub fn generate(
    decoder: &Decoder,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    generate_lm(decoder, tokenizer, prompt, opts, on_text)
}

/// [`generate`] for any [`CausalLm`] (the on-device decoder, PT-MoE).
pub fn generate_lm<M: CausalLm>(
    decoder: &M,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let _guard = tch::no_grad_guard();
    if prompt.is_empty() {
        return Err(TextError::InvalidArgument("the prompt is empty".into()));
    }
    let ctx = decoder.context_len();
    if prompt.len() >= ctx {
        return Err(TextError::ContextOverflow {
            tokens: prompt.len(),
            requested: opts.max_new_tokens,
            context: ctx,
        });
    }
    let mut cache = decoder.new_lm_cache(1);
    let t0 = Instant::now();
    let ids = ids_tensor(prompt)?;
    M::set_first_token_pass(&mut cache, true);
    let logits = decoder.forward_lm(&ids, None, &mut cache, Logits::Last);
    M::set_first_token_pass(&mut cache, false);
    let logits = logits?;
    let prefill_secs = t0.elapsed().as_secs_f64();
    let mut out = generate_from_logits_lm(
        decoder, tokenizer, &mut cache, &logits, prompt, opts, on_text,
    )?;
    out.stats.prompt_tokens = prompt.len();
    out.stats.prefill_secs = prefill_secs;
    Ok(out)
}

/// `[1, n]` int64 tensor of ids.
pub fn ids_tensor(ids: &[u32]) -> Result<Tensor> {
    let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    Ok(Tensor::f_from_slice(&v)?.f_view([1, v.len() as i64])?)
}

fn last_logits(logits: &Tensor) -> Result<Vec<f32>> {
    // [1, seq, vocab] → the last position's [vocab]
    let s = logits.size();
    let row = logits
        .f_select(0, 0)?
        .f_select(0, s[1] - 1)?
        .f_to_kind(Kind::Float)?
        .f_to_device(tch::Device::Cpu)?;
    Ok(Vec::<f32>::try_from(row)?)
}

/// The decode loop, after a prefill the caller did (prefix reuse, image embeddings...):
/// `logits` are the prefill's last-position logits, `context` the tokens so far (for the
/// repetition penalty), `cache` holds them.
pub fn generate_from_logits(
    decoder: &Decoder,
    tokenizer: Option<&Tokenizer>,
    cache: &mut KvCache,
    logits: &Tensor,
    context: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    generate_from_logits_lm(decoder, tokenizer, cache, logits, context, opts, on_text)
}

/// [`generate_from_logits`] for any [`CausalLm`].
pub fn generate_from_logits_lm<M: CausalLm>(
    decoder: &M,
    tokenizer: Option<&Tokenizer>,
    cache: &mut M::Cache,
    logits: &Tensor,
    context: &[u32],
    opts: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let _guard = tch::no_grad_guard();
    if !opts.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(TextError::InvalidArgument(
            "stop strings need a tokenizer".into(),
        ));
    }
    let eos = if opts.stop_on_eos {
        decoder.eos_ids()
    } else {
        Vec::new()
    };
    let ctx = decoder.context_len() as i64;
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut stream = TextStream {
        tokenizer,
        stop: &opts.stop_strings,
        emitted: 0,
    };
    let mut all: Vec<u32> = context.to_vec();
    let mut generated: Vec<u32> = Vec::new();
    let mut row = last_logits(logits)?;
    let mut first_token_at = None;
    let mut text = String::new();
    let reason = loop {
        if generated.len() >= opts.max_new_tokens {
            break StopReason::MaxTokens;
        }
        let next = sampler.sample(&row, &all);
        if eos.contains(&next) {
            break StopReason::Eos;
        }
        generated.push(next);
        all.push(next);
        if first_token_at.is_none() {
            first_token_at = Some(Instant::now());
        }
        let (t, cut) = stream.text(&generated)?;
        if cut.is_some() {
            on_text(&stream.advance(&t, cut, true));
            text = t[..cut.unwrap_or(t.len())].to_string();
            break StopReason::StopString;
        }
        let piece = stream.advance(&t, None, false);
        if !piece.is_empty() {
            on_text(&piece);
        }
        text = t;
        if generated.len() >= opts.max_new_tokens {
            break StopReason::MaxTokens;
        }
        if M::cache_len(cache) + 1 > ctx {
            break StopReason::ContextFull;
        }
        let logits = decoder.forward_lm(&ids_tensor(&[next])?, None, cache, Logits::Last)?;
        row = last_logits(&logits)?;
    };
    if reason != StopReason::StopString {
        let (t, _) = stream.text(&generated)?;
        let rest = stream.advance(&t, None, true);
        if !rest.is_empty() {
            on_text(&rest);
        }
        text = t;
    }
    let decode_secs = first_token_at.map_or(0.0, |t| t.elapsed().as_secs_f64());
    Ok(Generation {
        tokens: generated.clone(),
        text,
        stop_reason: reason,
        stats: GenerationStats {
            prompt_tokens: context.len(),
            generated_tokens: generated.len(),
            prefill_secs: 0.0,
            decode_secs,
        },
    })
}
