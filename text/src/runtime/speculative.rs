//! Speculative decoding: a draft proposes K tokens, the target scores them all in one
//! forward, and rejection sampling (accept x with min(1, p(x)/q(x)), else draw from the
//! normalised residual max(0, p − q)) keeps the target's distribution exactly. Greedy is the
//! special case of one-hot p and q: accept on exact match. Rejected tokens are dropped from
//! both KV caches.
//!
//! The draft is a second model with the same vocabulary, or the target's own first N layers
//! (`self:N`, no second checkpoint).

use std::time::Instant;

use tch::Tensor;

use crate::decoder::{Decoder, Logits};
use crate::error::{Result, TextError};
use crate::generation::{
    ids_tensor, CausalLm, GenerateOptions, Generation, GenerationStats, StopReason,
};
use crate::kv_cache::KvCache;
use crate::ptmoe::{PtMoe, PtMoeCache};
use crate::sampling::Sampler;
use crate::tokenizer::Tokenizer;

/// What speculative decoding needs of a model beyond [`CausalLm`]: its vocabulary, rolling
/// its cache back, and (for self-speculation) running only a prefix of its stack. Implemented
/// by the on-device decoder (prefix = its first N layers) and PT-MoE (its first N track
/// blocks).
pub trait SpeculativeLm: CausalLm {
    /// Keep the first `len` tokens of `cache`.
    fn truncate_cache(cache: &mut Self::Cache, len: i64) -> Result<()>;
    /// Units (decoder layers, PT-MoE track blocks) of the whole model.
    fn depth(&self) -> usize;
    /// A cache over the first `depth` units (for [`SpeculativeLm::forward_prefix`], or the
    /// whole model at [`SpeculativeLm::depth`]) that [`SpeculativeLm::truncate_cache`] can roll
    /// back by up to `rollback` tokens at any length (sliding-window rings get the slots).
    fn new_rollback_cache(&self, batch: i64, depth: usize, rollback: i64) -> Self::Cache;
    /// `ids` through the first `depth` units (layers, or track blocks), then the final norm
    /// and head.
    fn forward_prefix(
        &self,
        ids: &Tensor,
        cache: &mut Self::Cache,
        logits: Logits,
        depth: usize,
    ) -> Result<Tensor>;
}

impl SpeculativeLm for Decoder {
    fn truncate_cache(cache: &mut KvCache, len: i64) -> Result<()> {
        cache.truncate(len)
    }
    fn depth(&self) -> usize {
        self.layers.len()
    }
    /// The decoder keeps every token (no rings): any rollback works.
    fn new_rollback_cache(&self, batch: i64, depth: usize, _rollback: i64) -> KvCache {
        self.new_cache_depth(batch, depth)
    }
    fn forward_prefix(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        logits: Logits,
        depth: usize,
    ) -> Result<Tensor> {
        self.forward_depth(ids, cache, logits, depth)
    }
}

impl SpeculativeLm for PtMoe {
    fn truncate_cache(cache: &mut PtMoeCache, len: i64) -> Result<()> {
        cache.truncate(len)
    }
    fn depth(&self) -> usize {
        self.blocks.len()
    }
    fn new_rollback_cache(&self, batch: i64, depth: usize, rollback: i64) -> PtMoeCache {
        self.new_cache_slack(batch, depth, rollback)
    }
    fn forward_prefix(
        &self,
        ids: &Tensor,
        cache: &mut PtMoeCache,
        logits: Logits,
        depth: usize,
    ) -> Result<Tensor> {
        Ok(self.forward_blocks(ids, None, cache, logits, depth)?.0)
    }
}

/// Where draft tokens come from.
pub enum Draft<'a, D> {
    /// A separate model sharing the tokenizer (its vocabulary must match the target's).
    Model(&'a D),
    /// The target's first N units (decoder layers, PT-MoE track blocks), then its final norm
    /// and head.
    SelfPrefix(usize),
}

impl<D> Clone for Draft<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<D> Copy for Draft<'_, D> {}

/// Parse `self:N` (anything else is a model directory for the caller to load).
pub fn parse_self_draft(spec: &str) -> Option<Result<usize>> {
    spec.strip_prefix("self:").map(|n| {
        n.parse::<usize>().map_err(|_| {
            TextError::InvalidArgument(format!(
                "bad draft '{spec}': expected self:N with N a layer count"
            ))
        })
    })
}

/// The draft's model and cache during one generation.
enum DraftState<'a, T: SpeculativeLm, D: SpeculativeLm> {
    Model(&'a D, D::Cache),
    Prefix(&'a T, usize, T::Cache),
}

impl<T: SpeculativeLm, D: SpeculativeLm> DraftState<'_, T, D> {
    fn forward(&mut self, ids: &Tensor, logits: Logits) -> Result<Tensor> {
        match self {
            DraftState::Model(d, c) => d.forward_lm(ids, None, c, logits),
            DraftState::Prefix(t, depth, c) => t.forward_prefix(ids, c, logits, *depth),
        }
    }
    fn len(&self) -> i64 {
        match self {
            DraftState::Model(_, c) => D::cache_len(c),
            DraftState::Prefix(_, _, c) => T::cache_len(c),
        }
    }
    fn truncate(&mut self, len: i64) -> Result<()> {
        match self {
            DraftState::Model(_, c) => D::truncate_cache(c, len),
            DraftState::Prefix(_, _, c) => T::truncate_cache(c, len),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SpeculativeStats {
    pub target_forwards: usize,
    pub draft_forwards: usize,
    pub proposed: usize,
    pub accepted: usize,
}

impl SpeculativeStats {
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted as f64 / self.proposed.max(1) as f64
    }
}

fn rows(logits: &Tensor) -> Result<Vec<Vec<f32>>> {
    // [1, n, vocab] → n rows
    let l = logits.f_select(0, 0)?.f_to_device(tch::Device::Cpu)?;
    (0..l.size()[0])
        .map(|i| Ok(Vec::<f32>::try_from(l.f_select(0, i)?)?))
        .collect()
}

fn prob(dist: &[(usize, f64)], x: u32) -> f64 {
    dist.iter().find(|d| d.0 == x as usize).map_or(0.0, |d| d.1)
}

/// max(0, p − q), normalised (falls back to p when p ≤ q everywhere).
fn residual(p: &[(usize, f64)], q: &[(usize, f64)]) -> Vec<(usize, f64)> {
    let r: Vec<(usize, f64)> = p
        .iter()
        .map(|&(i, pi)| (i, (pi - prob(q, i as u32)).max(0.0)))
        .filter(|d| d.1 > 0.0)
        .collect();
    if r.is_empty() {
        p.to_vec()
    } else {
        r
    }
}

/// Generate with speculative decoding (batch 1). Output tokens follow the target's
/// distribution exactly (identical to plain greedy when greedy). Target and draft may be
/// different model types (a dense draft for a PT-MoE target) as long as the vocabularies match.
pub fn generate_speculative<T: SpeculativeLm, D: SpeculativeLm>(
    target: &T,
    draft: Draft<'_, D>,
    tokenizer: Option<&Tokenizer>,
    prompt: &[u32],
    opts: &GenerateOptions,
    k: usize,
) -> Result<(Generation, SpeculativeStats)> {
    let _guard = tch::no_grad_guard();
    if prompt.is_empty() {
        return Err(TextError::InvalidArgument("the prompt is empty".into()));
    }
    if k == 0 {
        return Err(TextError::InvalidArgument(
            "draft tokens must be at least 1 (the draft proposes k tokens per target forward)"
                .into(),
        ));
    }
    if let Draft::SelfPrefix(n) = draft {
        if n == 0 || n >= target.depth() {
            return Err(TextError::InvalidArgument(format!(
                "draft self:{n}: N must be between 1 and {} (the target has {} layers; a draft of all of them is the target itself)",
                target.depth().saturating_sub(1),
                target.depth()
            )));
        }
    }
    if let Draft::Model(d) = draft {
        if d.vocab_size() != target.vocab_size() {
            return Err(TextError::InvalidArgument(format!(
                "the draft's vocabulary ({}) differs from the target's ({})",
                d.vocab_size(),
                target.vocab_size()
            )));
        }
    }
    if !opts.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(TextError::InvalidArgument(
            "stop strings need a tokenizer".into(),
        ));
    }
    let ctx = target.context_len();
    if prompt.len() >= ctx {
        return Err(TextError::ContextOverflow {
            tokens: prompt.len(),
            requested: opts.max_new_tokens,
            context: ctx,
        });
    }
    let k = k.max(1);
    let eos = if opts.stop_on_eos {
        target.eos_ids()
    } else {
        Vec::new()
    };
    // A round scores the pending token and K drafts, then may undo up to K + 1 of them.
    let rollback = k as i64 + 1;
    let mut tc = target.new_rollback_cache(1, target.depth(), rollback);
    let mut dc: DraftState<'_, T, D> = match draft {
        Draft::Model(d) => DraftState::Model(d, d.new_rollback_cache(1, d.depth(), rollback)),
        Draft::SelfPrefix(n) => {
            DraftState::Prefix(target, n, target.new_rollback_cache(1, n, rollback))
        }
    };
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut stats = SpeculativeStats::default();

    // Prefill everything but the last prompt token, which becomes the first "pending" token.
    let t0 = Instant::now();
    let n = prompt.len();
    if n > 1 {
        let head = ids_tensor(&prompt[..n - 1])?;
        let _ = target.forward_lm(&head, None, &mut tc, Logits::Last)?;
        let _ = dc.forward(&head, Logits::Last)?;
    }
    let prefill_secs = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let mut context: Vec<u32> = prompt.to_vec();
    let mut pending = prompt[n - 1];
    let mut draft_lag: Vec<u32> = Vec::new(); // accepted tokens the draft has not seen yet
    let mut generated: Vec<u32> = Vec::new();
    let mut text = String::new();
    let reason = 'outer: loop {
        let remaining = opts.max_new_tokens - generated.len();
        if remaining == 0 {
            break StopReason::MaxTokens;
        }
        let base_t = T::cache_len(&tc);
        let room = ctx.saturating_sub(base_t as usize + 1);
        if base_t as usize + 1 > ctx {
            break StopReason::ContextFull;
        }
        let kk = k.min(remaining - 1).min(room);
        // 1. The draft proposes kk tokens.
        let mut drafts = Vec::with_capacity(kk);
        let mut qs = Vec::with_capacity(kk);
        let mut ctx_d = context.clone();
        let mut feed: Vec<u32> = std::mem::take(&mut draft_lag);
        feed.push(pending);
        let base_d = dc.len() + feed.len() as i64 - 1; // draft cache length holding `pending`'s predecessors
        for _ in 0..kk {
            let l = dc.forward(&ids_tensor(&feed)?, Logits::Last)?;
            stats.draft_forwards += 1;
            let row = rows(&l)?.pop().unwrap_or_default();
            let q = sampler.distribution(&row, &ctx_d);
            let x = sampler.draw(&q);
            drafts.push(x);
            qs.push(q);
            ctx_d.push(x);
            feed = vec![x];
        }
        // 2. The target scores pending + drafts in one forward.
        let mut verify = vec![pending];
        verify.extend(&drafts);
        let l = target.forward_lm(&ids_tensor(&verify)?, None, &mut tc, Logits::All)?;
        stats.target_forwards += 1;
        stats.proposed += kk;
        let prow = rows(&l)?;
        // 3. Accept / reject left to right.
        let mut ctx_t = context.clone();
        let mut new_tokens = Vec::with_capacity(kk + 1);
        let mut all_accepted = true;
        for (i, &x) in drafts.iter().enumerate() {
            let p = sampler.distribution(&prow[i], &ctx_t);
            let (px, qx) = (prob(&p, x), prob(&qs[i], x));
            if qx > 0.0 && sampler.uniform() < (px / qx).min(1.0) {
                new_tokens.push(x);
                ctx_t.push(x);
                stats.accepted += 1;
            } else {
                new_tokens.push(sampler.draw(&residual(&p, &qs[i])));
                all_accepted = false;
                break;
            }
        }
        if all_accepted {
            let p = sampler.distribution(&prow[kk], &ctx_t);
            new_tokens.push(sampler.draw(&p));
        }
        let m = new_tokens.len() - 1; // accepted drafts
                                      // 4. Caches keep pending + the accepted drafts; the last new token is the next pending.
        T::truncate_cache(&mut tc, base_t + 1 + m as i64)?;
        if kk == 0 {
            // The draft saw nothing this round: feed it everything next round.
            draft_lag = feed;
        } else if all_accepted {
            // The draft saw pending .. x_{kk-2}; x_{kk-1} is fed next round.
            draft_lag.push(drafts[kk - 1]);
        } else {
            dc.truncate(base_d + 1 + m as i64)?;
        }
        // 5. Emit, stopping on EOS / max tokens / stop strings.
        for &t in &new_tokens {
            if eos.contains(&t) {
                break 'outer StopReason::Eos;
            }
            generated.push(t);
            context.push(t);
            if let Some(tok) = tokenizer {
                let full = tok.decode(&generated, true)?;
                if let Some(cut) = opts
                    .stop_strings
                    .iter()
                    .filter_map(|s| full.find(s.as_str()))
                    .min()
                {
                    text = full[..cut].to_string();
                    break 'outer StopReason::StopString;
                }
                text = full;
            }
            if generated.len() >= opts.max_new_tokens {
                break 'outer StopReason::MaxTokens;
            }
        }
        pending = *new_tokens.last().unwrap_or(&pending);
    };
    if reason != StopReason::StopString {
        if let Some(tok) = tokenizer {
            text = tok.decode(&generated, true)?;
        }
    }
    let decode_secs = t0.elapsed().as_secs_f64();
    Ok((
        Generation {
            tokens: generated.clone(),
            text,
            stop_reason: reason,
            stats: GenerationStats {
                prompt_tokens: prompt.len(),
                generated_tokens: generated.len(),
                prefill_secs,
                decode_secs,
            },
        },
        stats,
    ))
}
