//! The server decoder (PT-MoE): a stack of track blocks, each running T independent tracks of
//! D layers on the same input and merging them (mean, option sum) only at the block boundary.
//!
//! Built from the on-device decoder's modules: [`Attention`] (with NoPE for the global layers
//! and a sliding window over a ring-buffer cache for the local ones), [`RmsNorm`], [`Rope`],
//! [`SwiGlu`] and [`MoeFfn`] (SwiGLU experts, all projections through [`Linear`]),
//! [`KvCache`] (one per track, `Rotating` layers for the sliding window) and [`StepMask`].
//!
//! Tracks run concurrently (a pool of one worker thread per track, intra-op threads split
//! between them; a track on a GPU runs on its own CUDA stream, so tracks sharing one GPU
//! overlap too) or sequentially; a track's weights and cache may live on their own device
//! (`--track-devices`).
//! One forward synchronises once per track block (the merge), against two all-reduces per layer
//! for tensor parallelism.
//!
//! Weight names (ours; documented in README.md):
//! `model.embed_tokens.weight`, `model.norm.weight`, `lm_head.weight` (untied only) and, for
//! block `b`, track `t`, layer `l` under `P = model.blocks.{b}.tracks.{t}.layers.{l}`:
//! `P.input_layernorm.weight`, `P.self_attn.{q,k,v,o}_proj.weight` (`q_norm`/`k_norm` with
//! QK-norm), `P.post_attention_layernorm.weight`, then either `P.mlp.{gate,up,down}_proj.weight`
//! (dense) or `P.mlp.gate.weight` and `P.mlp.experts.{e}.{gate,up,down}_proj.weight` (MoE).
//! The optional norms of the config: `P.{attn,ffn}_pre_residual_norm.weight`,
//! `P.{attn,ffn}_post_norm.weight`, and per block and track
//! `model.blocks.{b}.tracks.{t}.{dispatch,combine}_norm.weight`.
//!
//! A layer is `h = post(x + pre_res(attn(pre(x)))); y = post(h + pre_res(ffn(pre(h))))` with
//! each norm present only when the config names it (tamm's `NormalizedResidualConnection`).

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::attention::{Attention, StepMask};
use crate::checkpoint::load_weights;
use crate::cuda_stream::CudaStream;
use crate::decoder::Logits;
use crate::embedding::Embedding;
use crate::error::{Result, TextError};
use crate::kv_cache::{CacheKind, CacheSnapshot, KvCache};
use crate::linear::Linear;
use crate::mlp::SwiGlu;
use crate::moe::{moe_weight_shapes, MoeFfn};
use crate::norm::RmsNorm;
use crate::ptmoe_config::{NormType, PtMoeConfig, TrackMerge};
use crate::rope::Rope;
use crate::weights::WeightMap;

/// How the tracks of a block are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackExec {
    /// One thread per track (CPU intra-op threads split between them); tracks on different
    /// devices overlap.
    Concurrent,
    /// One track after the other on the calling thread.
    Sequential,
}

/// Every tensor name of a PT-MoE configuration with its shape.
pub fn ptmoe_weight_shapes(cfg: &PtMoeConfig) -> Vec<(String, Vec<i64>)> {
    let h = cfg.hidden_size as i64;
    let hd = cfg.head_dim() as i64;
    let q = cfg.num_attention_heads as i64 * hd;
    let kv = cfg.num_kv_heads() as i64 * hd;
    let f = cfg.intermediate_size as i64;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size as i64, h],
    )];
    for b in 0..cfg.num_track_blocks {
        for t in 0..cfg.num_tracks {
            for l in 0..cfg.track_block_depth {
                let j = b * cfg.track_block_depth + l;
                if l == 0 {
                    let tp = format!("model.blocks.{b}.tracks.{t}");
                    if cfg.tracks_dispatch_norm.is_some() {
                        out.push((format!("{tp}.dispatch_norm.weight"), vec![h]));
                    }
                    if cfg.tracks_combine_norm.is_some() {
                        out.push((format!("{tp}.combine_norm.weight"), vec![h]));
                    }
                }
                let p = format!("model.blocks.{b}.tracks.{t}.layers.{l}");
                for (slot, names) in [
                    (
                        cfg.pre_norm,
                        ["input_layernorm", "post_attention_layernorm"],
                    ),
                    (
                        cfg.pre_residual_norm,
                        ["attn_pre_residual_norm", "ffn_pre_residual_norm"],
                    ),
                    (cfg.post_norm, ["attn_post_norm", "ffn_post_norm"]),
                ] {
                    if slot.is_some() {
                        for n in names {
                            out.push((format!("{p}.{n}.weight"), vec![h]));
                        }
                    }
                }
                out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
                out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
                out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
                out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
                if cfg.qk_norm {
                    out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
                    out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
                }
                if cfg.is_moe(j) {
                    out.extend(moe_weight_shapes(
                        &format!("{p}.mlp"),
                        h,
                        cfg.moe_intermediate_size as i64,
                        cfg.num_local_experts,
                    ));
                } else {
                    out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, h]));
                    out.push((format!("{p}.mlp.up_proj.weight"), vec![f, h]));
                    out.push((format!("{p}.mlp.down_proj.weight"), vec![h, f]));
                }
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![cfg.vocab_size as i64, h]));
    }
    out
}

/// A layer's FFN: dense SwiGLU or mixture of experts.
#[derive(Debug)]
pub enum Ffn {
    Dense(SwiGlu),
    Moe(MoeFfn),
}

impl Ffn {
    pub fn num_params(&self) -> i64 {
        match self {
            Ffn::Dense(m) => m.num_params(),
            Ffn::Moe(m) => m.num_params(),
        }
    }
    pub fn active_params(&self) -> i64 {
        match self {
            Ffn::Dense(m) => m.num_params(),
            Ffn::Moe(m) => m.active_params(),
        }
    }
}

/// One of the config's optional norms, `name` of width `dim`, if the config has it.
fn opt_norm(
    w: &WeightMap,
    name: &str,
    dim: i64,
    eps: f64,
    ty: Option<NormType>,
) -> Result<Option<RmsNorm>> {
    ty.map(|t| {
        let n = RmsNorm::new(w, name, dim, eps)?;
        Ok(match t {
            NormType::RmsNorm => n,
            NormType::PreScaleRmsNorm => n.into_pre_scale(),
        })
    })
    .transpose()
}

/// `norm(x)`, or `x` when the slot is empty.
fn apply_norm(norm: &Option<RmsNorm>, x: Tensor) -> Result<Tensor> {
    match norm {
        Some(n) => n.forward(&x),
        None => Ok(x),
    }
}

fn norm_params(norms: &[&Option<RmsNorm>]) -> i64 {
    norms
        .iter()
        .filter_map(|n| n.as_ref())
        .map(RmsNorm::num_params)
        .sum()
}

/// One layer of a track:
/// `h = post(x + pre_res(attn(norm(x)))); y = post(h + pre_res(ffn(norm(h))))`, each norm
/// present when the config has it (by default only the two pre-norms).
#[derive(Debug)]
pub struct TrackLayer {
    /// Attention's pre-norm (`input_layernorm`).
    pub input_norm: Option<RmsNorm>,
    pub attn: Attention,
    pub attn_pre_residual_norm: Option<RmsNorm>,
    pub attn_post_norm: Option<RmsNorm>,
    /// The FFN's pre-norm (`post_attention_layernorm`).
    pub ffn_norm: Option<RmsNorm>,
    pub ffn: Ffn,
    pub ffn_pre_residual_norm: Option<RmsNorm>,
    pub ffn_post_norm: Option<RmsNorm>,
    /// Sliding-window (RoPE) rather than global (NoPE).
    pub local: bool,
}

impl TrackLayer {
    pub fn num_params(&self) -> i64 {
        norm_params(&[
            &self.input_norm,
            &self.attn_pre_residual_norm,
            &self.attn_post_norm,
            &self.ffn_norm,
            &self.ffn_pre_residual_norm,
            &self.ffn_post_norm,
        ]) + self.attn.num_params()
            + self.ffn.num_params()
    }
    pub fn active_params(&self) -> i64 {
        self.num_params() - self.ffn.num_params() + self.ffn.active_params()
    }
}

/// What every layer of a track needs for one step, on the track's device.
struct StepInputs {
    cos: Tensor,
    sin: Tensor,
    global: StepMask,
    local: StepMask,
}

fn shallow_mask(m: &StepMask) -> StepMask {
    StepMask {
        mask: m.mask.as_ref().map(Tensor::shallow_clone),
        is_causal: m.is_causal,
    }
}

impl StepInputs {
    /// Another handle on the same tensors (for a worker thread).
    fn shallow(&self) -> Self {
        Self {
            cos: self.cos.shallow_clone(),
            sin: self.sin.shallow_clone(),
            global: shallow_mask(&self.global),
            local: shallow_mask(&self.local),
        }
    }

    fn to_device(&self, device: Device) -> Result<Self> {
        Ok(Self {
            cos: self.cos.f_to_device(device)?,
            sin: self.sin.f_to_device(device)?,
            global: self.global.to_device(device)?,
            local: self.local.to_device(device)?,
        })
    }
}

/// One track of one block: D layers with their own weights, on their own device.
#[derive(Debug)]
pub struct Track {
    /// A norm of the block input as this track receives it.
    pub dispatch_norm: Option<RmsNorm>,
    pub layers: Vec<TrackLayer>,
    /// A norm of this track's output before the merge.
    pub combine_norm: Option<RmsNorm>,
    device: Device,
    /// The track's own CUDA stream when it runs concurrently on a GPU (taken on first use).
    stream: std::sync::OnceLock<CudaStream>,
}

impl Track {
    pub fn device(&self) -> Device {
        self.device
    }

    /// The CUDA stream this track runs on when concurrent (none before its first such run, or
    /// off a GPU).
    pub fn cuda_stream(&self) -> Option<CudaStream> {
        self.stream.get().copied()
    }

    /// Run the track on a worker thread of concurrent tracks: on a GPU with its own stream
    /// (so that tracks sharing one device overlap), elsewhere as is.
    fn forward_concurrent(
        &self,
        x: &Tensor,
        step: &StepInputs,
        cache: &mut KvCache,
    ) -> Result<TrackOutput> {
        let Device::Cuda(index) = self.device else {
            return self.forward(x, step, cache);
        };
        let stream = match self.stream.get() {
            Some(s) => *s,
            None => {
                let s = CudaStream::from_pool(index)?;
                *self.stream.get_or_init(|| s)
            }
        };
        stream.run(|| self.forward(x, step, cache))
    }

    /// Run the track's layers; returns the output and the MoE layers' auxiliary losses.
    fn forward(&self, x: &Tensor, step: &StepInputs, cache: &mut KvCache) -> Result<TrackOutput> {
        let mut x = apply_norm(&self.dispatch_norm, x.f_to_device(self.device)?)?;
        let mut aux = Vec::new();
        for layer in &self.layers {
            let mask = if layer.local {
                &step.local
            } else {
                &step.global
            };
            let n = apply_norm(&layer.input_norm, x.shallow_clone())?;
            let a = layer.attn.forward(&n, &step.cos, &step.sin, mask, cache)?;
            let a = apply_norm(&layer.attn_pre_residual_norm, a)?;
            let h = apply_norm(&layer.attn_post_norm, x.f_add(&a)?)?;
            let n = apply_norm(&layer.ffn_norm, h.shallow_clone())?;
            let f = match &layer.ffn {
                Ffn::Dense(m) => m.forward(&n)?,
                Ffn::Moe(m) => {
                    let o = m.forward_full(&n)?;
                    aux.push(o.aux_loss);
                    o.hidden
                }
            };
            let f = apply_norm(&layer.ffn_pre_residual_norm, f)?;
            x = apply_norm(&layer.ffn_post_norm, h.f_add(&f)?)?;
        }
        Ok((apply_norm(&self.combine_norm, x)?, aux))
    }
}

/// A track's output and its MoE layers' auxiliary losses.
type TrackOutput = (Tensor, Vec<Tensor>);

/// A reference to a track that a worker thread may hold.
struct TrackRef<'a>(&'a Track);

// SAFETY: during the scope in `PtMoe::run_block` each track is used by exactly one worker
// thread, and only read (its tensors are weights no op mutates); libtorch tensors may be
// read from any thread. `Tensor` is `Send` but not `Sync`, hence the wrapper.
unsafe impl Send for TrackRef<'_> {}

impl<'a> TrackRef<'a> {
    fn get(&self) -> &'a Track {
        self.0
    }
}

/// The PT-MoE cache: one [`KvCache`] per track index (its layers `b·D + l` across blocks;
/// `Rotating` rings for the sliding-window layers), all advancing together.
#[derive(Debug)]
pub struct PtMoeCache {
    pub tracks: Vec<KvCache>,
}

impl PtMoeCache {
    pub fn len(&self) -> i64 {
        self.tracks.first().map_or(0, KvCache::len)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn batch(&self) -> i64 {
        self.tracks.first().map_or(0, KvCache::batch)
    }
    pub fn allocated_bytes(&self) -> usize {
        self.tracks.iter().map(KvCache::allocated_bytes).sum()
    }
    pub fn snapshot(&self) -> Vec<CacheSnapshot> {
        self.tracks.iter().map(KvCache::snapshot).collect()
    }
    /// Roll every track back; an error (nothing changed) if a sliding-window ring has already
    /// overwritten keys it would need.
    pub fn rollback(&mut self, snap: &[CacheSnapshot]) -> Result<()> {
        if snap.len() != self.tracks.len() {
            return Err(TextError::InvalidArgument(
                "snapshot does not belong to this cache".into(),
            ));
        }
        // Check every track first so that a refusal leaves the cache untouched.
        let mut forks = Vec::with_capacity(self.tracks.len());
        for (c, s) in self.tracks.iter().zip(snap) {
            let mut f = c.fork()?;
            f.rollback(s)?;
            forks.push(f);
        }
        self.tracks = forks;
        Ok(())
    }
    /// Forget every token after the first `len` (speculative decoding's rollback), in place;
    /// an error (nothing changed) when a sliding-window ring has overwritten keys it would
    /// need. Every track's cache has the same layer kinds and length, so either the first
    /// track refuses (before changing anything) or all succeed.
    pub fn truncate(&mut self, len: i64) -> Result<()> {
        for c in &mut self.tracks {
            c.truncate(len)?;
        }
        Ok(())
    }
    pub fn fork(&self) -> Result<Self> {
        Ok(Self {
            tracks: self
                .tracks
                .iter()
                .map(KvCache::fork)
                .collect::<Result<_>>()?,
        })
    }
    /// Broadcast a batch-1 cache to `n` rows (every track's cache).
    pub fn repeat_batch(&self, n: i64) -> Result<Self> {
        Ok(Self {
            tracks: self
                .tracks
                .iter()
                .map(|c| c.repeat_batch(n))
                .collect::<Result<_>>()?,
        })
    }
}

#[derive(Debug)]
pub struct PtMoe {
    pub cfg: PtMoeConfig,
    pub embed: Embedding,
    /// `blocks[b][t]`.
    pub blocks: Vec<Vec<Track>>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    rope: Rope,
    device: Device,
    kind: Kind,
    exec: TrackExec,
    /// Extra ring slots per sliding-window layer (how far a wrapped ring can roll back).
    ring_slack: i64,
    /// One worker thread per track for [`TrackExec::Concurrent`] (created on first use).
    pool: std::sync::OnceLock<rayon::ThreadPool>,
}

impl PtMoe {
    /// Build from a weight map; track `t`'s weights go to `track_devices[t % len]` (empty: the
    /// map's device).
    pub fn new(cfg: &PtMoeConfig, w: &WeightMap, track_devices: &[Device]) -> Result<Self> {
        cfg.validate().map_err(TextError::InvalidArgument)?;
        let acfg = cfg.attn_config();
        let h = cfg.hidden_size as i64;
        let vocab = cfg.vocab_size as i64;
        let d = cfg.track_block_depth;
        let dev_of = |t: usize| {
            if track_devices.is_empty() {
                w.device()
            } else {
                track_devices[t % track_devices.len()]
            }
        };
        let maps: Vec<WeightMap> = (0..cfg.num_tracks)
            .map(|t| w.on_device(dev_of(t)))
            .collect();
        let mut blocks = Vec::with_capacity(cfg.num_track_blocks);
        for b in 0..cfg.num_track_blocks {
            let mut tracks = Vec::with_capacity(cfg.num_tracks);
            for (t, tw) in maps.iter().enumerate() {
                let mut layers = Vec::with_capacity(d);
                for l in 0..d {
                    let j = b * d + l;
                    let p = format!("model.blocks.{b}.tracks.{t}.layers.{l}");
                    let local = !cfg.is_global(j);
                    let ffn = if cfg.is_moe(j) {
                        Ffn::Moe(
                            MoeFfn::new(
                                tw,
                                &format!("{p}.mlp"),
                                h,
                                cfg.moe_intermediate_size as i64,
                                cfg.num_local_experts,
                                cfg.num_experts_per_tok,
                                cfg.norm_topk_prob,
                            )?
                            .with_logits_cap(cfg.router_logits_cap),
                        )
                    } else {
                        Ffn::Dense(SwiGlu::new(
                            tw,
                            &format!("{p}.mlp"),
                            h,
                            cfg.intermediate_size as i64,
                        )?)
                    };
                    let norm = |name: &str, ty| {
                        opt_norm(tw, &format!("{p}.{name}.weight"), h, cfg.rms_norm_eps, ty)
                    };
                    layers.push(TrackLayer {
                        input_norm: norm("input_layernorm", cfg.pre_norm)?,
                        attn: Attention::new_at(
                            &acfg,
                            tw,
                            &format!("{p}.self_attn"),
                            j,
                            true,
                            local,
                        )?,
                        attn_pre_residual_norm: norm(
                            "attn_pre_residual_norm",
                            cfg.pre_residual_norm,
                        )?,
                        attn_post_norm: norm("attn_post_norm", cfg.post_norm)?,
                        ffn_norm: norm("post_attention_layernorm", cfg.pre_norm)?,
                        ffn,
                        ffn_pre_residual_norm: norm(
                            "ffn_pre_residual_norm",
                            cfg.pre_residual_norm,
                        )?,
                        ffn_post_norm: norm("ffn_post_norm", cfg.post_norm)?,
                        local,
                    });
                }
                let tp = format!("model.blocks.{b}.tracks.{t}");
                let eps = cfg.rms_norm_eps;
                tracks.push(Track {
                    dispatch_norm: opt_norm(
                        tw,
                        &format!("{tp}.dispatch_norm.weight"),
                        h,
                        eps,
                        cfg.tracks_dispatch_norm,
                    )?,
                    combine_norm: opt_norm(
                        tw,
                        &format!("{tp}.combine_norm.weight"),
                        h,
                        eps,
                        cfg.tracks_combine_norm,
                    )?,
                    layers,
                    device: tw.device(),
                    stream: std::sync::OnceLock::new(),
                });
            }
            blocks.push(tracks);
        }
        let embed = Embedding::new(w, "model.embed_tokens.weight", vocab, h)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed.tied_head()
        } else {
            Linear::new(w, "lm_head", h, vocab, false)?
        };
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm: RmsNorm::new(w, "model.norm.weight", h, cfg.rms_norm_eps)?,
            lm_head,
            rope: Rope::new(&acfg, w.device(), w.kind())?,
            device: w.device(),
            kind: w.kind(),
            exec: TrackExec::Concurrent,
            ring_slack: 0,
            pool: std::sync::OnceLock::new(),
        })
    }

    /// Load a checkpoint directory: `config.json` (a [`PtMoeConfig`], `model_type`
    /// `afm_ptmoe`) and `model.safetensors` (or shards) under the names of
    /// [`ptmoe_weight_shapes`]; or a tamm PT-MoE directory (tamm's JSON config and `.pt` state
    /// dict, [`crate::tamm_ptmoe`]).
    pub fn load(dir: &Path, device: Device, kind: Kind, track_devices: &[Device]) -> Result<Self> {
        if let Some((cfg_path, pt)) = crate::tamm_ptmoe::tamm_ptmoe_files(dir) {
            let t = crate::tamm_ptmoe::TammPtMoe::read(&cfg_path)?;
            return Self::from_tamm(&t, &pt, device, kind, track_devices);
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| TextError::io(&path, e))?;
        let cfg = PtMoeConfig::from_json_str(&text).map_err(|msg| TextError::Config {
            path: path.clone(),
            msg,
        })?;
        let w = load_weights(dir, device, kind)?;
        Self::new(&cfg, &w, track_devices)
    }

    /// The model of a tamm config `t` with the weights of its `.pt` state dict; a checkpoint
    /// saved with a trained adapter runs with it, as in tamm.
    pub fn from_tamm(
        t: &crate::tamm_ptmoe::TammPtMoe,
        pt: &Path,
        device: Device,
        kind: Kind,
        track_devices: &[Device],
    ) -> Result<Self> {
        let (w, adapter) = t.load_weights_and_adapter(pt, device, kind)?;
        let mut m = Self::new(&t.cfg, &w, track_devices)?;
        if let Some(a) = adapter {
            tracing::info!(
                "{}: the checkpoint's adapter '{}' is active",
                pt.display(),
                a.name
            );
            a.activate(&mut m)?;
        }
        Ok(m)
    }

    /// Random weights (N(0, 0.02²)), seeded.
    pub fn random(
        cfg: &PtMoeConfig,
        seed: i64,
        device: Device,
        kind: Kind,
        track_devices: &[Device],
    ) -> Result<Self> {
        let w = WeightMap::random(&ptmoe_weight_shapes(cfg), seed, 0.02, device, kind)?;
        Self::new(cfg, &w, track_devices)
    }

    pub fn device(&self) -> Device {
        self.device
    }
    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn exec(&self) -> TrackExec {
        self.exec
    }
    pub fn set_exec(&mut self, exec: TrackExec) {
        self.exec = exec;
    }
    /// Extra slots per sliding-window ring in later [`PtMoe::new_cache`]s (roll back up to
    /// `slack` tokens); [`PtMoe::new_cache_slack`] chooses per cache.
    pub fn set_ring_slack(&mut self, slack: i64) {
        self.ring_slack = slack.max(0);
    }

    /// A fresh cache: per track, a ring of `window + slack` for local layers, a growing
    /// buffer for global ones, on the track's device.
    pub fn new_cache(&self, batch: i64) -> PtMoeCache {
        self.new_cache_blocks(batch, self.blocks.len())
    }

    /// A cache for [`PtMoe::forward_blocks`] over the first `blocks` track blocks.
    pub fn new_cache_blocks(&self, batch: i64, blocks: usize) -> PtMoeCache {
        self.new_cache_slack(batch, blocks, self.ring_slack)
    }

    /// A cache over the first `blocks` track blocks whose rings keep `slack` extra slots, so
    /// that [`PtMoeCache::truncate`] can undo up to `slack` tokens after they wrap (speculative
    /// decoding asks for its draft length + 1). The forward reads the ring size from the cache.
    pub fn new_cache_slack(&self, batch: i64, blocks: usize, slack: i64) -> PtMoeCache {
        let window = self.cfg.sliding_window as i64;
        let layers = blocks.min(self.blocks.len()) * self.cfg.track_block_depth;
        let kinds: Vec<CacheKind> = (0..layers)
            .map(|j| {
                if self.cfg.is_global(j) {
                    CacheKind::Normal
                } else {
                    CacheKind::Rotating {
                        window,
                        slack: slack.max(0),
                    }
                }
            })
            .collect();
        let tracks = (0..self.cfg.num_tracks)
            .map(|t| {
                let dev = self.blocks.first().map_or(self.device, |b| b[t].device);
                KvCache::with_kinds(&kinds, batch, dev)
            })
            .collect();
        PtMoeCache { tracks }
    }

    /// Every linear layer of attention and FFN with its module name, for adapters:
    /// `model.blocks.{b}.tracks.{t}.layers.{l}.self_attn.{q,k,v,o}_proj`, then
    /// `mlp.{gate,up,down}_proj` (dense) or `mlp.experts.{e}.{gate,up,down}_proj` (MoE). The
    /// router (`mlp.gate`) is left out: adapting it would change which experts a token uses.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (b, block) in self.blocks.iter_mut().enumerate() {
            for (t, track) in block.iter_mut().enumerate() {
                for (l, layer) in track.layers.iter_mut().enumerate() {
                    let p = format!("model.blocks.{b}.tracks.{t}.layers.{l}");
                    out.extend(layer.attn.named_linears(&p));
                    match &mut layer.ffn {
                        Ffn::Dense(m) => {
                            out.push((format!("{p}.mlp.gate_proj"), &mut m.gate));
                            out.push((format!("{p}.mlp.up_proj"), &mut m.up));
                            out.push((format!("{p}.mlp.down_proj"), &mut m.down));
                        }
                        Ffn::Moe(moe) => {
                            for (e, m) in moe.experts.iter_mut().enumerate() {
                                let q = format!("{p}.mlp.experts.{e}");
                                out.push((format!("{q}.gate_proj"), &mut m.gate));
                                out.push((format!("{q}.up_proj"), &mut m.up));
                                out.push((format!("{q}.down_proj"), &mut m.down));
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Number of synchronisation points (track merges) per forward.
    pub fn sync_points_per_forward(&self) -> usize {
        self.blocks.len()
    }

    pub fn num_params(&self) -> i64 {
        let layers: i64 = self
            .blocks
            .iter()
            .flatten()
            .map(|t| {
                norm_params(&[&t.dispatch_norm, &t.combine_norm])
                    + t.layers.iter().map(TrackLayer::num_params).sum::<i64>()
            })
            .sum();
        let head = if self.cfg.tie_word_embeddings {
            0
        } else {
            self.lm_head.num_params()
        };
        self.embed.num_params() + layers + self.norm.num_params() + head
    }

    /// Run `ids` ([batch, seq], int64), extending `cache`; fp32 logits.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut PtMoeCache,
        logits: Logits,
    ) -> Result<Tensor> {
        Ok(self.forward_with_aux(ids, mask, cache, logits)?.0)
    }

    /// Like [`PtMoe::forward`], also returning the load-balancing auxiliary loss: the mean over
    /// every MoE layer of every track of `E · Σₑ fₑ·Pₑ` (scale by `router_aux_loss_coef`).
    pub fn forward_with_aux(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut PtMoeCache,
        logits: Logits,
    ) -> Result<(Tensor, Tensor)> {
        self.forward_blocks(ids, mask, cache, logits, self.blocks.len())
    }

    /// Like [`PtMoe::forward_with_aux`] through only the first `blocks` track blocks, then the
    /// final norm and head: the model's own prefix as a draft (self-speculation). Use a cache
    /// from [`PtMoe::new_cache_blocks`] with the same `blocks`.
    pub fn forward_blocks(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut PtMoeCache,
        logits: Logits,
        blocks: usize,
    ) -> Result<(Tensor, Tensor)> {
        let size = ids.size();
        if size.len() != 2 {
            return Err(TextError::InvalidArgument(format!(
                "token ids must be [batch, seq], got {size:?}"
            )));
        }
        let x = self.embed_ids(ids)?;
        self.forward_embeds_blocks(&x, mask, cache, logits, blocks)
    }

    /// Token embeddings `[batch, seq, hidden]` of `ids` in the compute dtype.
    pub fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self
            .embed
            .forward(&ids.f_to_device(self.device)?)?
            .f_to_kind(self.kind)?)
    }

    /// Run embeddings `x` (`[batch, seq, hidden]`: token embeddings with, e.g., visual tokens
    /// spliced in), extending `cache`; fp32 logits.
    pub fn forward_embeds(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut PtMoeCache,
        logits: Logits,
    ) -> Result<Tensor> {
        let x = x.f_to_device(self.device)?.f_to_kind(self.kind)?;
        Ok(self
            .forward_embeds_blocks(&x, mask, cache, logits, self.blocks.len())?
            .0)
    }

    /// [`PtMoe::forward_blocks`] from embeddings `x` (`[batch, seq, hidden]`).
    fn forward_embeds_blocks(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut PtMoeCache,
        logits: Logits,
        blocks: usize,
    ) -> Result<(Tensor, Tensor)> {
        if blocks == 0 || blocks > self.blocks.len() {
            return Err(TextError::InvalidArgument(format!(
                "a PT-MoE prefix needs 1 to {} track blocks, got {blocks}",
                self.blocks.len()
            )));
        }
        let size = x.size();
        if size.len() != 3 || size[2] != self.cfg.hidden_size as i64 {
            return Err(TextError::InvalidArgument(format!(
                "embeddings must be [batch, seq, {}], got {size:?}",
                self.cfg.hidden_size
            )));
        }
        let (b, s) = (size[0], size[1]);
        if cache.tracks.len() != self.cfg.num_tracks {
            return Err(TextError::InvalidArgument(format!(
                "cache has {} tracks, the model {}",
                cache.tracks.len(),
                self.cfg.num_tracks
            )));
        }
        if b != cache.batch() {
            return Err(TextError::InvalidArgument(format!(
                "input batch {b} differs from the cache's batch {}",
                cache.batch()
            )));
        }
        let past = cache.len();
        let ctx = self.cfg.max_position_embeddings as i64;
        if past + s > ctx {
            return Err(TextError::ContextOverflow {
                tokens: (past + s) as usize,
                requested: 0,
                context: ctx as usize,
            });
        }
        let mut x = x.shallow_clone();
        let mut positions = None;
        for c in &mut cache.tracks {
            let p = c.begin_step(s, mask)?;
            positions.get_or_insert(p);
        }
        // On the first track's device: to the main one, where the RoPE table lives.
        let positions = positions
            .ok_or_else(|| {
                TextError::InvalidArgument("a PT-MoE model needs at least one track".into())
            })?
            .f_to_device(self.device)?;
        let key_mask = cache.tracks[0].key_mask().map(|m| m.shallow_clone());
        let key_mask = match key_mask {
            Some(m) => Some(m.f_to_device(self.device)?),
            None => None,
        };
        let window = self.cfg.sliding_window as i64;
        // The rings of this cache (its own slack), for the band mask over ring slots.
        let ring = cache.tracks[0]
            .ring_capacity()
            .unwrap_or(window + self.ring_slack);
        let (cos, sin) = self.rope.cos_sin(&positions, past + s, self.kind)?;
        let step = StepInputs {
            cos,
            sin,
            global: StepMask::build(s, past, key_mask.as_ref(), self.device)?,
            local: StepMask::sliding(s, past, window, ring, key_mask.as_ref(), self.device)?,
        };
        // The step inputs on each track's device (shared when it is the main one).
        let steps: Vec<StepInputs> = (0..self.cfg.num_tracks)
            .map(|t| step.to_device(self.blocks[0][t].device))
            .collect::<Result<_>>()?;

        let mut aux_all = Vec::new();
        for block in &self.blocks[..blocks] {
            let outs = self.run_block(block, &x, &steps, &mut cache.tracks)?;
            let mut merged: Option<Tensor> = None;
            for (o, aux) in outs {
                let o = o.f_to_device(self.device)?;
                merged = Some(match merged {
                    None => o,
                    Some(m) => m.f_add(&o)?,
                });
                for a in aux {
                    aux_all.push(a.f_to_device(self.device)?);
                }
            }
            x = merged.ok_or_else(|| TextError::InvalidArgument("empty track block".into()))?;
            if self.cfg.track_merge == TrackMerge::Mean {
                x = x.f_div_scalar(block.len() as f64)?;
            }
        }
        if logits == Logits::Last && s > 1 {
            x = x.f_narrow(1, s - 1, 1)?;
        }
        let x = self.norm.forward(&x)?;
        let out = self.lm_head.forward(&x)?.f_to_kind(Kind::Float)?;
        let aux = if aux_all.is_empty() {
            Tensor::f_zeros([], (Kind::Float, self.device))?
        } else {
            Tensor::f_stack(&aux_all, 0)?.f_mean(Kind::Float)?
        };
        Ok((out, aux))
    }

    /// Run one block's tracks on `x`, concurrently or one after the other.
    fn run_block(
        &self,
        block: &[Track],
        x: &Tensor,
        steps: &[StepInputs],
        caches: &mut [KvCache],
    ) -> Result<Vec<TrackOutput>> {
        if self.exec == TrackExec::Sequential || block.len() == 1 {
            return block
                .iter()
                .zip(steps)
                .zip(caches.iter_mut())
                .map(|((t, st), c)| t.forward(x, st, c))
                .collect();
        }
        let grad = crate::runtime::device::grad_enabled()?;
        let pool = self.track_pool(block)?;
        let mut results: Vec<Option<Result<TrackOutput>>> =
            (0..block.len()).map(|_| None).collect();
        // Everything a worker needs, prepared here so the scope only captures `Send` data.
        let jobs: Vec<_> = block
            .iter()
            .zip(steps)
            .zip(caches.iter_mut())
            .zip(results.iter_mut())
            .map(|(((track, st), cache), slot)| {
                (
                    TrackRef(track),
                    x.shallow_clone(),
                    st.shallow(),
                    cache,
                    slot,
                )
            })
            .collect();
        pool.scope(move |scope| {
            for (track, x, st, cache, slot) in jobs {
                scope.spawn(move |_| {
                    let track = track.get();
                    let _guard = (!grad).then(tch::no_grad_guard);
                    *slot = Some(track.forward_concurrent(&x, &st, cache));
                });
            }
        });
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(TextError::InvalidArgument("a track did not run".into())))
            })
            .collect()
    }

    /// The worker threads of concurrent tracks: one per track, created on first use, each
    /// with its share of the caller's intra-op threads (set once: libtorch's setting is
    /// per thread for OpenMP, and resizing pools on every step would cost more than it saves).
    fn track_pool(&self, block: &[Track]) -> Result<&rayon::ThreadPool> {
        if let Some(p) = self.pool.get() {
            return Ok(p);
        }
        let threads = tch::get_num_threads().max(1);
        let cpu_tracks = block.iter().filter(|t| t.device == Device::Cpu).count();
        let per_track = (threads / cpu_tracks.max(1) as i32).max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(block.len())
            .thread_name(|i| format!("ptmoe-track-{i}"))
            .build()
            .map_err(|e| TextError::InvalidArgument(format!("track thread pool: {e}")))?;
        pool.broadcast(|_| tch::set_num_threads(per_track));
        // The workers touched the process-wide parts of the setting (MKL, thread pools).
        tch::set_num_threads(threads);
        Ok(self.pool.get_or_init(|| pool))
    }
}

/// Parse `--track-devices`: a comma list of `cpu`, `cuda`, `cuda:N`, `mps`.
pub fn parse_track_devices(spec: &str) -> Result<Vec<Device>> {
    spec.split(',')
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            let bad = || TextError::InvalidArgument(format!("bad track device '{s}'"));
            let dev = match s {
                "cpu" => Device::Cpu,
                "mps" => Device::Mps,
                "cuda" => Device::Cuda(0),
                _ => match s.strip_prefix("cuda:") {
                    Some(n) => Device::Cuda(n.parse().map_err(|_| bad())?),
                    None => return Err(bad()),
                },
            };
            if let Device::Cuda(n) = dev {
                let present = crate::device::cuda_device_count();
                if n >= present {
                    return Err(TextError::InvalidArgument(format!(
                        "track device {s}: only {present} CUDA device(s) present"
                    )));
                }
            }
            Ok(dev)
        })
        .collect()
}

/// Local-layer K/V bytes actually allocated after `tokens` tokens, all tracks: one real
/// sliding-window ring of the configuration's geometry is filled (window-sized chunks of
/// zeros, in `kind`) and its allocation multiplied by the number of local layers. No weights
/// are needed, so this measures even the server preset.
pub fn measure_local_kv_bytes(cfg: &PtMoeConfig, tokens: usize, kind: Kind) -> Result<u64> {
    let window = cfg.sliding_window as i64;
    let mut cache =
        KvCache::with_kinds(&[CacheKind::Rotating { window, slack: 0 }], 1, Device::Cpu);
    let (kv, hd) = (cfg.num_kv_heads() as i64, cfg.head_dim() as i64);
    let mut left = tokens as i64;
    while left > 0 {
        let n = left.min(window);
        let _ = cache.begin_step(n, None)?;
        let z = Tensor::f_zeros([1, kv, n, hd], (kind, Device::Cpu))?;
        let _ = cache.append(0, &z, &z)?;
        left -= n;
    }
    let (local, _) = cfg.local_global_layers();
    Ok(cache.layer_bytes(0) as u64 * (local * cfg.num_tracks) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_a_saved_checkpoint() {
        let _g = tch::no_grad_guard();
        let cfg = crate::ptmoe_config::ptmoe_preset("tiny-ptmoe").unwrap();
        let shapes = ptmoe_weight_shapes(&cfg);
        let w = WeightMap::random(&shapes, 5, 0.02, Device::Cpu, Kind::Float).unwrap();
        let named: Vec<(String, Tensor)> = shapes
            .iter()
            .map(|(n, s)| (n.clone(), w.get(n, s).unwrap()))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        Tensor::write_safetensors(&named, dir.path().join("model.safetensors")).unwrap();
        std::fs::write(dir.path().join("config.json"), cfg.to_json_pretty()).unwrap();
        let a = PtMoe::new(&cfg, &w, &[]).unwrap();
        let b = PtMoe::load(dir.path(), Device::Cpu, Kind::Float, &[]).unwrap();
        let ids = Tensor::from_slice(&[7i64, 8, 9, 10, 11]).view([1, 5]);
        let la = a
            .forward(&ids, None, &mut a.new_cache(1), Logits::All)
            .unwrap();
        let lb = b
            .forward(&ids, None, &mut b.new_cache(1), Logits::All)
            .unwrap();
        assert!((la - lb).abs().max().double_value(&[]) <= 1e-6);
        // A missing expert names the tensor.
        let partial: Vec<_> = named
            .into_iter()
            .filter(|(n, _)| !n.ends_with("experts.3.down_proj.weight"))
            .collect();
        Tensor::write_safetensors(&partial, dir.path().join("model.safetensors")).unwrap();
        let err = PtMoe::load(dir.path(), Device::Cpu, Kind::Float, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("experts.3.down_proj"), "{err}");
    }

    #[test]
    fn track_devices_parse_and_reject() {
        assert_eq!(
            parse_track_devices("cpu, cpu").unwrap(),
            vec![Device::Cpu, Device::Cpu]
        );
        assert!(parse_track_devices("gpu0").is_err());
        assert!(parse_track_devices("cuda:x").is_err());
        if !crate::device::cuda_available() {
            let err = parse_track_devices("cuda:0").unwrap_err().to_string();
            assert!(err.contains("CUDA"), "{err}");
        }
    }

    #[test]
    fn explicit_track_devices_give_the_same_logits() {
        let _g = tch::no_grad_guard();
        let cfg = crate::ptmoe_config::ptmoe_preset("tiny-ptmoe-3track").unwrap();
        // One weight map for both (the global RNG is shared with tests running in parallel).
        let w = WeightMap::random(
            &ptmoe_weight_shapes(&cfg),
            1,
            0.02,
            Device::Cpu,
            Kind::Float,
        )
        .unwrap();
        let a = PtMoe::new(&cfg, &w, &[]).unwrap();
        let b = PtMoe::new(&cfg, &w, &[Device::Cpu; 3]).unwrap();
        let ids = Tensor::from_slice(&[3i64, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]).view([1, 11]);
        let la = a
            .forward(&ids, None, &mut a.new_cache(1), Logits::All)
            .unwrap();
        let lb = b
            .forward(&ids, None, &mut b.new_cache(1), Logits::All)
            .unwrap();
        assert!((la - lb).abs().max().double_value(&[]) <= 1e-6);
        // The sum merge with 3 tracks, and the aux loss is a finite positive scalar.
        let (_, aux) = a
            .forward_with_aux(&ids, None, &mut a.new_cache(1), Logits::Last)
            .unwrap();
        let aux = aux.double_value(&[]);
        assert!(aux.is_finite() && aux > 0.0, "{aux}");
    }
}
