//! The dense two-segment decoder stack (AFM 2025 on-device).
//!
//! Layers `0..n0` (segment 0) are ordinary pre-norm layers with their own K/V cache. Layers
//! `n0..n` (segment 1) have no K/V projections and attend with the cache of `kv_source`
//! (default: the last segment-0 layer). During a multi-token prefill that only needs the last
//! position's logits, segment 1 runs for that position alone — no later token needs segment-1
//! K/V — so time-to-first-token drops toward n0/n of a standard stack. With `n - n0 = 0` this is
//! exactly a Llama-style decoder.

use tch::{Device, Kind, Tensor};

use crate::attention::StepMask;
use crate::config::TextConfig;
use crate::embedding::Embedding;
use crate::error::{Result, TextError};
use crate::kv_cache::KvCache;
use crate::layer::DecoderLayer;
use crate::linear::Linear;
use crate::norm::RmsNorm;
use crate::rope::Rope;
use crate::weights::WeightMap;

/// Which positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation, multiple-choice scoring): `[batch, 1, vocab]`.
    Last,
    /// Every position (perplexity, parity tests): `[batch, seq, vocab]`.
    All,
}

#[derive(Debug)]
pub struct Decoder {
    pub cfg: TextConfig,
    pub embed: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    rope: Rope,
    device: Device,
    kind: Kind,
    /// Decode single tokens through the fused CPU step ([`crate::cpu_decode`]) when the model
    /// and cache allow it (default on; `AFM_VL_FUSED_DECODE=0` turns it off).
    fused_decode: bool,
}

/// Every tensor name of a configuration with its shape (HF Llama names).
pub fn weight_shapes(cfg: &TextConfig) -> Vec<(String, Vec<i64>)> {
    let h = cfg.hidden_size as i64;
    let hd = cfg.head_dim() as i64;
    let q = cfg.num_attention_heads as i64 * hd;
    let kv = cfg.num_kv_heads() as i64 * hd;
    let f = cfg.intermediate_size as i64;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size as i64, h],
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        if !cfg.is_segment1(l) {
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        }
        if cfg.attention_bias {
            out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
            if !cfg.is_segment1(l) {
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
        }
        if cfg.qk_norm {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
            if !cfg.is_segment1(l) {
                out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
            }
        }
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![f, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size as i64, h]));
    }
    out
}

impl Decoder {
    /// Build the stack from a weight map (shapes checked against `cfg`).
    pub fn new(cfg: &TextConfig, w: &WeightMap) -> Result<Self> {
        let h = cfg.hidden_size as i64;
        let vocab = cfg.vocab_size as i64;
        let embed = Embedding::new(w, "model.embed_tokens.weight", vocab, h)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| DecoderLayer::new(cfg, w, l))
            .collect::<Result<Vec<_>>>()?;
        // Checkpoints may carry an lm_head even when tied (and some tie by omission).
        // The head as stored: dense, packed codes or GGUF blocks (`lm_head.weight.<format>`).
        let has_head = w.names().any(|n| n.starts_with("lm_head.weight"));
        let lm_head = if !cfg.tie_word_embeddings && has_head {
            Linear::new(w, "lm_head", h, vocab, false)?
        } else if !cfg.tie_word_embeddings {
            return Err(TextError::checkpoint(
                "<weights>",
                "missing tensor 'lm_head.weight' (tie_word_embeddings is false)",
            ));
        } else {
            embed.tied_head()
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm: RmsNorm::for_text(cfg, w, "model.norm.weight", h)?,
            lm_head,
            rope: Rope::new(cfg, w.device(), w.kind())?,
            device: w.device(),
            kind: w.kind(),
            fused_decode: std::env::var("AFM_VL_FUSED_DECODE").map_or(true, |v| v != "0"),
        })
    }

    /// Turn the fused CPU decode step on or off (both paths compute the same function).
    pub fn set_fused_decode(&mut self, on: bool) {
        self.fused_decode = on;
    }

    /// Whether the model's weights allow the fused CPU step (the cache decides the rest).
    pub fn fused_decode_possible(&self) -> bool {
        self.fused_decode && crate::cpu_decode::Plan::new(self).is_some()
    }

    /// Whether a one-token step with `cache` would take the fused CPU path.
    pub fn fused_decode_applies(&self, cache: &KvCache) -> bool {
        self.fused_decode && crate::cpu_decode::Plan::new(self).is_some_and(|p| p.fits(cache))
    }

    /// RoPE's cos and sign-folded sin at `pos` as fp32 rows (fused CPU step).
    pub fn rope_row_f32(&self, pos: i64) -> Option<(&[f32], &[f32])> {
        self.rope.row_f32(pos)
    }

    /// Random weights (N(0, 0.02²)) for a configuration, seeded: presets for tests and benches.
    pub fn random(cfg: &TextConfig, seed: i64, device: Device, kind: Kind) -> Result<Self> {
        let w = WeightMap::random(&weight_shapes(cfg), seed, 0.02, device, kind)?;
        Self::new(cfg, &w)
    }

    pub fn device(&self) -> Device {
        self.device
    }
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// A fresh cache for `batch` rows (segment-1 layers share their source's buffer).
    pub fn new_cache(&self, batch: i64) -> KvCache {
        let src = self.cfg.kv_source();
        let kinds: Vec<Option<usize>> = (0..self.cfg.num_hidden_layers)
            .map(|l| self.cfg.is_segment1(l).then_some(src))
            .collect();
        KvCache::new(&kinds, batch, self.device)
    }

    /// Run `ids` ([batch, seq], int64) through the stack, extending `cache`.
    /// `mask` ([batch, seq], 1 = real token) marks left padding. Returns fp32 logits.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor> {
        let size = ids.size();
        if size.len() != 2 {
            return Err(TextError::InvalidArgument(format!(
                "token ids must be [batch, seq], got {size:?}"
            )));
        }
        let x = self.embed.forward(&ids.f_to_device(self.device)?)?; // [batch, seq, hidden]
        self.forward_embeds(&x, mask, cache, logits)
    }

    /// Like [`Decoder::forward`] from input embeddings `[batch, seq, hidden]` (visual tokens
    /// spliced into token embeddings enter here).
    pub fn forward_embeds(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor> {
        self.forward_embeds_depth(x, mask, cache, logits, self.layers.len())
    }

    /// Token ids through only the first `depth` layers, then the final norm and head: the
    /// target's own prefix as a draft model (self-speculation). `depth` must be at most the
    /// number of segment-0 layers, or the full depth. Use a cache from [`Decoder::new_cache_depth`].
    pub fn forward_depth(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        logits: Logits,
        depth: usize,
    ) -> Result<Tensor> {
        let x = self.embed.forward(&ids.f_to_device(self.device)?)?;
        self.forward_embeds_depth(&x, None, cache, logits, depth)
    }

    /// A cache for [`Decoder::forward_depth`] with `depth` layers.
    pub fn new_cache_depth(&self, batch: i64, depth: usize) -> KvCache {
        if depth >= self.layers.len() {
            return self.new_cache(batch);
        }
        KvCache::new(&vec![None; depth], batch, self.device)
    }

    /// Like [`Decoder::forward_embeds`] with every position, returning the final-normed hidden
    /// states `[batch, seq, hidden]` instead of logits: training losses that need the head at a
    /// few positions only (captions after many visual tokens) apply `lm_head` themselves.
    pub fn forward_embeds_hidden(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.forward_stack(x, mask, cache, Logits::All, self.layers.len())
    }

    fn forward_embeds_depth(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        logits: Logits,
        depth: usize,
    ) -> Result<Tensor> {
        if let Some(l) = self.try_fused_step(x, mask, cache, depth)? {
            return Ok(l);
        }
        let x = self.forward_stack(x, mask, cache, logits, depth)?;
        Ok(self.lm_head.forward(&x)?.f_to_kind(Kind::Float)?)
    }

    /// One token of one sequence on the CPU through [`crate::cpu_decode::step`], when the
    /// model, the input and the cache allow it; `None` sends the step through libtorch.
    fn try_fused_step(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        depth: usize,
    ) -> Result<Option<Tensor>> {
        let h = self.cfg.hidden_size as i64;
        if !self.fused_decode
            || depth < self.layers.len()
            || mask.is_some()
            || x.size() != [1, 1, h]
            || x.requires_grad()
            || cache.len() + 1 > self.cfg.max_position_embeddings as i64
        {
            return Ok(None);
        }
        let Some(plan) = crate::cpu_decode::Plan::new(self) else {
            return Ok(None);
        };
        if !plan.fits(cache) || !plan.may_run()? {
            return Ok(None);
        }
        let xv = Vec::<f32>::try_from(x.f_to_kind(Kind::Float)?.f_flatten(0, -1)?)?;
        let logits = crate::cpu_decode::step(self, &plan, &xv, cache)?;
        Ok(Some(crate::cpu_decode::f32_tensor(
            &logits,
            &[1, 1, self.cfg.vocab_size as i64],
        )?))
    }

    /// The layers and the final norm (no head).
    fn forward_stack(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        logits: Logits,
        depth: usize,
    ) -> Result<Tensor> {
        let n0 = self.cfg.num_segment0_layers();
        let full = depth >= self.layers.len();
        if !full && (depth == 0 || depth > n0) {
            return Err(TextError::InvalidArgument(format!(
                "a prefix draft needs 1..={n0} layers (segment 0), or the full {}; got {depth}",
                self.layers.len()
            )));
        }
        let size = x.size();
        if size.len() != 3 || size[2] != self.cfg.hidden_size as i64 {
            return Err(TextError::InvalidArgument(format!(
                "input embeddings must be [batch, seq, {}], got {size:?}",
                self.cfg.hidden_size
            )));
        }
        let (b, s) = (size[0], size[1]);
        if b != cache.batch() {
            return Err(TextError::InvalidArgument(format!(
                "input batch {b} differs from the cache's batch {}",
                cache.batch()
            )));
        }
        let ctx = self.cfg.max_position_embeddings as i64;
        let past = cache.len();
        if past + s > ctx {
            return Err(TextError::ContextOverflow {
                tokens: (past + s) as usize,
                requested: 0,
                context: ctx as usize,
            });
        }
        let positions = cache.begin_step(s, mask)?; // [batch, seq]
        let step_mask = StepMask::build(s, past, cache.key_mask(), self.device)?;
        let (cos, sin) = self.rope.cos_sin(&positions, past + s, self.kind)?;

        let mut x = x.f_to_kind(self.kind)?;
        let n0 = if full { n0 } else { depth };
        for layer in &self.layers[..n0] {
            x = layer.forward(&x, &cos, &sin, &step_mask, cache)?;
        }
        let last_only = logits == Logits::Last && s > 1;
        if last_only {
            x = x.f_narrow(1, s - 1, 1)?; // [batch, 1, hidden]
        }
        if full && n0 < self.layers.len() {
            // Segment 1: attends with the source layer's cache; during prefill only the last
            // position runs when that is all the caller needs.
            let (mask1, cos1, sin1) = if last_only {
                (
                    step_mask.last_row()?,
                    cos.f_narrow(2, s - 1, 1)?,
                    sin.f_narrow(2, s - 1, 1)?,
                )
            } else {
                (
                    StepMask {
                        mask: step_mask.mask.as_ref().map(|m| m.shallow_clone()),
                        is_causal: step_mask.is_causal,
                    },
                    cos.shallow_clone(),
                    sin.shallow_clone(),
                )
            };
            for layer in &self.layers[n0..] {
                x = layer.forward(&x, &cos1, &sin1, &mask1, cache)?;
            }
        }
        self.norm.forward(&x)
    }

    /// Every linear layer of the stack with its HF module name
    /// (`model.layers.{i}.self_attn.q_proj`, `...mlp.down_proj`, ...), for adapters.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            out.extend(l.attn.named_linears(&p));
            out.push((format!("{p}.mlp.gate_proj"), &mut l.mlp.gate));
            out.push((format!("{p}.mlp.up_proj"), &mut l.mlp.up));
            out.push((format!("{p}.mlp.down_proj"), &mut l.mlp.down));
        }
        out
    }

    /// Store the projections' and the head's fp32 weights in bf16 ([`Linear::store_bf16`]):
    /// decode steps read half the bytes. With `lossless_only`, only weights that are bf16
    /// values already (a bf16 checkpoint loaded in fp32). Only fp32 CPU weights are stored
    /// (where the fused decode step reads them); returns how many weights were converted.
    pub fn store_weights_bf16(&mut self, lossless_only: bool) -> Result<usize> {
        let mut n = 0;
        for (_, l) in self.linears_mut() {
            n += l.store_bf16(lossless_only)? as usize;
        }
        n += self.lm_head.store_bf16(lossless_only)? as usize;
        Ok(n)
    }

    /// Weight bytes a decode step reads: every layer's projections and the head (the bandwidth
    /// floor of decoding is this over the memory bandwidth).
    pub fn decode_bytes_per_token(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.attn;
                [
                    Some(&a.q_proj),
                    a.k_proj.as_ref(),
                    a.v_proj.as_ref(),
                    Some(&a.o_proj),
                ]
                .into_iter()
                .flatten()
                .chain([&l.mlp.gate, &l.mlp.up, &l.mlp.down])
                .map(Linear::weight_bytes)
                .sum::<usize>()
            })
            .sum();
        layers + self.lm_head.weight_bytes()
    }

    /// Parameter counts: (embedding, segment-0 layers, segment-1 layers, final norm, untied head).
    pub fn param_breakdown(&self) -> ParamBreakdown {
        let n0 = self.cfg.num_segment0_layers();
        let tied = self.cfg.tie_word_embeddings || self.lm_head.weight_bytes() == 0;
        ParamBreakdown {
            embedding: self.embed.num_params(),
            segment0: self.layers[..n0].iter().map(DecoderLayer::num_params).sum(),
            segment1: self.layers[n0..].iter().map(DecoderLayer::num_params).sum(),
            final_norm: self.norm.num_params(),
            lm_head: if tied { 0 } else { self.lm_head.num_params() },
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ParamBreakdown {
    pub embedding: i64,
    pub segment0: i64,
    pub segment1: i64,
    pub final_norm: i64,
    pub lm_head: i64,
}

impl ParamBreakdown {
    pub fn total(&self) -> i64 {
        self.embedding + self.segment0 + self.segment1 + self.final_norm + self.lm_head
    }
}
