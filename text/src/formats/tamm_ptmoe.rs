//! Apple's tamm PT-MoE checkpoints (`AFMParallelTrackMoEConfig`, tamm 0.2.0's
//! `models/afm_text/afm_pt_moe.py`): a directory with the tamm JSON config
//! (`{"__tamm_type__": "module_configs:AFMParallelTrackMoEConfig", …}`, only the fields that
//! differ from tamm's defaults) and a `.pt` state dict, translated at load time into our
//! [`PtMoeConfig`] and tensor names ([`crate::ptmoe::ptmoe_weight_shapes`]).
//!
//! tamm vectorises the tracks: every weight carries the track first and stores `[in, out]`
//! (`x · W`), experts `[T, E, in, out]`, norms `[T, dim]`. Names, for segment (our block) `s`
//! and layer `l` of the segment under `P = layers.segment_{s}.layer_{l}`:
//! `P.attention.norm.weight`, `P.attention.qkv_transform.fused_linear.weight [T, H, A + 2·kv]`
//! (q, k, v along the last axis), `P.attention.qk_norm.{query,key}_norm.weight [T, hd]` (with
//! `scale_qk_norm`), `P.attention.output_transform.weight [T, A, H]`; a dense FFN
//! `P.feed_forward.norm.weight`, `P.feed_forward.hidden_transform.linear_{0,1}.weight [T, H, F]`
//! (gate, up), `P.feed_forward.output_transform.weight [T, F, H]`; a sparse one
//! `P.feed_forward.router.input_transform.weight [T, H, E]`,
//! `P.feed_forward.experts.hidden_transform.linear_{0,1}.weight [T, E, H, F]`,
//! `P.feed_forward.experts.output_transform.weight [T, E, F, H]`; the optional norms
//! `P.{attention,feed_forward}.residual_connection.{pre_residual_norm,post_norm}.weight` and
//! `layers.segment_{s}.{input,output}_transform.norm.weight` (dispatch, combine); then
//! `embedding.weight`, `output_norm.weight` and `output_transform.weight` (the head, tied to
//! the embedding).
//!
//! Conventions translated: tamm's window W excludes the current token (our `sliding_window` is
//! W + 1); RoPE rotates adjacent pairs `(2i, 2i+1)`, ours halves, so q/k rows and QK-norm
//! weights are permuted per head ([`crate::tamm::pairs_to_halves`]; scores are invariant under
//! one permutation of queries and keys); QK-norm comes after RoPE; without `scale_qk_norm` the
//! QK-norms have no weights (ours are ones).

use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TextError};
use crate::lora::LoraAdapter;
use crate::pt::PtFile;
use crate::ptmoe_config::{AttnType, FfnType, NormType, PtMoeConfig, TrackMerge};
use crate::tamm::{pairs_to_halves, TAMM_CONTEXT};
use crate::tamm_adapter::{AdaptableLinear, TammLoraSpec};
use crate::weights::WeightMap;

/// The config type tamm writes for this model.
pub const TYPE_NAME: &str = "AFMParallelTrackMoEConfig";

/// A tamm PT-MoE configuration: ours, plus what only tamm's layout needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TammPtMoe {
    pub cfg: PtMoeConfig,
    /// The QK-norms have weights (`scale_qk_norm`).
    pub scale_qk_norm: bool,
    /// The config's `adapters` (tamm `LoRAModelAdapter`s), in order.
    pub adapters: Vec<TammLoraSpec>,
    /// The active adapter's id, when the config has adapters.
    pub active_adapter: Option<String>,
}

/// Fields that do not change the model's numbers at inference.
const INERT_FIELDS: &[&str] = &[
    "sdpa_implementation",
    "hidden_dropout_p",
    "attention_dropout_p",
    "output_hidden_states",
    "output_attentions",
    "output_expert_assignments",
    "device",
    "dtype",
    "pretrained",
    "pretrained_path",
    "freeze_params",
    "metadata",
];

/// The tamm config and weights of `dir` when it holds a tamm PT-MoE model.
pub fn tamm_ptmoe_files(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let (c, w) = crate::tamm::tamm_files(dir)?;
    let text = std::fs::read_to_string(&c).ok()?;
    let v: Json = serde_json::from_str(&text).ok()?;
    let ty = v.get("__tamm_type__")?.as_str()?;
    (ty.rsplit(':').next() == Some(TYPE_NAME)).then_some((c, w))
}

fn norm_spec(k: &str, v: &Json) -> std::result::Result<Option<NormType>, String> {
    match v {
        Json::Null => Ok(None),
        Json::String(s) if s == "rms_norm" => Ok(Some(NormType::RmsNorm)),
        Json::String(s) if s == "pre_scale_rms_norm" => Ok(Some(NormType::PreScaleRmsNorm)),
        _ => Err(format!(
            "{k} must be \"rms_norm\", \"pre_scale_rms_norm\" or null, got {v}"
        )),
    }
}

fn pattern<T>(
    k: &str,
    v: &Json,
    parse: impl Fn(&str) -> Option<T>,
    what: &str,
) -> std::result::Result<Vec<T>, String> {
    let items = v
        .as_array()
        .ok_or_else(|| format!("{k} must be a list, got {v}"))?;
    if items.is_empty() {
        return Err(format!("{k} must not be empty"));
    }
    items
        .iter()
        .map(|x| {
            x.as_str()
                .and_then(&parse)
                .ok_or_else(|| format!("{k}: {what} type {x} not recognized"))
        })
        .collect()
}

impl TammPtMoe {
    /// Parse tamm's JSON, filling tamm's defaults. An unknown type or field, or a value tamm
    /// itself would refuse, is an error naming it.
    pub fn from_json(v: &Json) -> std::result::Result<Self, String> {
        let obj = v.as_object().ok_or("not a JSON object")?;
        let ty = obj
            .get("__tamm_type__")
            .and_then(Json::as_str)
            .ok_or("no \"__tamm_type__\" (not a tamm config)")?;
        if ty.rsplit(':').next() != Some(TYPE_NAME) {
            return Err(format!(
                "__tamm_type__ {ty:?} is not supported here (expected {TYPE_NAME})"
            ));
        }
        // tamm's defaults (the server model).
        let (mut vocab, mut tracks, mut layers, mut per_sync) = (153_600, 8, 48, 4);
        let (mut hidden, mut attn_hidden, mut dense_ffn, mut sparse_ffn) = (2048, 512, 5888, 2944);
        let (mut heads, mut kv_heads) = (4usize, None::<usize>);
        let mut theta = 500_000.0;
        let mut attn_pattern = vec![
            AttnType::LocalRope,
            AttnType::LocalRope,
            AttnType::LocalRope,
            AttnType::GlobalNope,
        ];
        let mut window = 4096usize;
        let mut ffn_pattern = vec![FfnType::Dense, FfnType::Sparse];
        let (mut experts, mut top_k) = (40usize, 2usize);
        let mut cap = Some(50.0);
        let mut pre_norm = Some(NormType::RmsNorm);
        let (mut post_norm, mut pre_residual_norm) = (None, None);
        let (mut dispatch_norm, mut combine_norm) = (None, None);
        let mut scale_qk_norm = true;
        let mut eps = 1e-5;
        let mut merge = TrackMerge::Mean;
        let (mut adapters, mut active) = (Json::Null, Json::Null);
        for (k, val) in obj {
            let int = || -> std::result::Result<usize, String> {
                val.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| format!("{k} must be a non-negative integer, got {val}"))
            };
            let float = || -> std::result::Result<f64, String> {
                val.as_f64()
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| format!("{k} must be a number, got {val}"))
            };
            match k.as_str() {
                "__tamm_type__" => {}
                "vocab_size" => vocab = int()?,
                "num_tracks" => tracks = int()?,
                "num_layers_per_track" => layers = int()?,
                "num_layers_per_track_per_sync_point" => per_sync = int()?,
                "hidden_dim" => hidden = int()?,
                "attention_hidden_dim" => attn_hidden = int()?,
                "dense_feed_forward_hidden_dim" => dense_ffn = int()?,
                "sparse_feed_forward_hidden_dim" => sparse_ffn = int()?,
                "num_heads" => heads = int()?,
                "num_kv_heads" => kv_heads = if val.is_null() { None } else { Some(int()?) },
                "rope_theta" => theta = float()?,
                "attention_layer_pattern" => {
                    attn_pattern = pattern(
                        k,
                        val,
                        |s| match s {
                            "local" | "local_rope" => Some(AttnType::LocalRope),
                            "global_nope" => Some(AttnType::GlobalNope),
                            _ => None,
                        },
                        "attention",
                    )?
                }
                "local_attention_window_size" => window = int()?,
                "feed_forward_layer_pattern" => {
                    ffn_pattern = pattern(
                        k,
                        val,
                        |s| match s {
                            "dense" => Some(FfnType::Dense),
                            "sparse" => Some(FfnType::Sparse),
                            _ => None,
                        },
                        "feed forward",
                    )?
                }
                "num_experts" => experts = int()?,
                "num_experts_per_token" => top_k = int()?,
                "experts_router_logits_cap" => {
                    cap = if val.is_null() { None } else { Some(float()?) }
                }
                "pre_norm" => pre_norm = norm_spec(k, val)?,
                "post_norm" => post_norm = norm_spec(k, val)?,
                "pre_residual_norm" => pre_residual_norm = norm_spec(k, val)?,
                "tracks_dispatch_norm" => dispatch_norm = norm_spec(k, val)?,
                "tracks_combine_norm" => combine_norm = norm_spec(k, val)?,
                "scale_qk_norm" => {
                    scale_qk_norm = val
                        .as_bool()
                        .ok_or_else(|| format!("{k} must be true or false, got {val}"))?
                }
                "norm_eps" => eps = float()?,
                "tracks_combine_op" => {
                    merge = match val.as_str().map(str::to_ascii_lowercase).as_deref() {
                        Some("mean") => TrackMerge::Mean,
                        Some("sum") => TrackMerge::Sum,
                        _ => return Err(format!("{k} must be \"mean\" or \"sum\", got {val}")),
                    }
                }
                "adapters" => adapters = val.clone(),
                "active_adapter" => active = val.clone(),
                "arch_optimizers" if val.is_null() => {}
                "arch_optimizers" => {
                    return Err(format!("{k} on a PT-MoE config is not supported"))
                }
                f if INERT_FIELDS.contains(&f) => {}
                other => return Err(format!("unknown {TYPE_NAME} field {other:?}")),
            }
        }
        if heads == 0 || !attn_hidden.is_multiple_of(heads) {
            return Err(format!(
                "num_heads ({heads}) does not evenly divide attention_hidden_dim ({attn_hidden})"
            ));
        }
        if per_sync == 0 || !layers.is_multiple_of(per_sync) {
            return Err(format!(
                "num_layers_per_track_per_sync_point ({per_sync}) does not evenly divide \
                 num_layers_per_track ({layers})"
            ));
        }
        if let Some(kv) = kv_heads {
            if kv == 0 || !heads.is_multiple_of(kv) {
                return Err(format!(
                    "num_kv_heads ({kv}) does not evenly divide num_heads ({heads})"
                ));
            }
        }
        let cfg = PtMoeConfig {
            model_type: "afm_ptmoe".into(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: dense_ffn,
            moe_intermediate_size: sparse_ffn,
            num_local_experts: experts,
            num_experts_per_tok: top_k,
            norm_topk_prob: true,
            num_tracks: tracks,
            num_track_blocks: layers / per_sync,
            track_block_depth: per_sync,
            track_merge: merge,
            num_attention_heads: heads,
            num_key_value_heads: Some(kv_heads.unwrap_or(heads)),
            head_dim: Some(attn_hidden / heads),
            // tamm's window excludes the current token.
            sliding_window: window.saturating_add(1),
            global_attn_every: attn_pattern.len(),
            rms_norm_eps: eps,
            rope_theta: theta,
            max_position_embeddings: TAMM_CONTEXT,
            tie_word_embeddings: true,
            qk_norm: true,
            qk_norm_after_rope: true,
            attention_layer_pattern: Some(attn_pattern),
            feed_forward_layer_pattern: Some(ffn_pattern),
            router_logits_cap: cap,
            pre_norm,
            pre_residual_norm,
            post_norm,
            tracks_dispatch_norm: dispatch_norm,
            tracks_combine_norm: combine_norm,
            router_aux_loss_coef: 0.0,
            bos_token_id: None,
            eos_token_id: None,
        };
        cfg.validate()?;
        let (adapters, active_adapter) = crate::tamm_adapter::parse_adapters(&adapters, &active)?;
        Ok(Self {
            cfg,
            scale_qk_norm,
            adapters,
            active_adapter,
        })
    }

    /// Every linear layer a tamm LoRA adapter can target, vectorised over tracks (and experts):
    /// the fused q/k/v (`lora_0/1/2`), the attention output, the dense FFN's `linear_{0,1}` and
    /// output, the experts' `linear_{0,1}` and output. The router is never adapted.
    pub fn adaptable_linears(&self) -> Vec<AdaptableLinear> {
        let c = &self.cfg;
        let (t, h, hd) = (
            c.num_tracks as i64,
            c.hidden_size as i64,
            c.head_dim() as i64,
        );
        let (heads, kvh) = (c.num_attention_heads as i64, c.num_kv_heads() as i64);
        let (f, fe, e) = (
            c.intermediate_size as i64,
            c.moe_intermediate_size as i64,
            c.num_local_experts as i64,
        );
        let mut out = Vec::new();
        for s in 0..c.num_track_blocks {
            for l in 0..c.track_block_depth {
                let j = s * c.track_block_depth + l;
                let p = format!("layers.segment_{s}.layer_{l}");
                let per_track = |rest: &str| -> Vec<String> {
                    (0..t)
                        .map(|tr| format!("model.blocks.{s}.tracks.{tr}.layers.{l}.{rest}"))
                        .collect()
                };
                let lin = |module: String, part, ours, vec, rope_heads, i, o| AdaptableLinear {
                    module,
                    part,
                    ours,
                    vec,
                    rope_heads,
                    in_features: i,
                    out_features: o,
                };
                let qkv = format!("{p}.attention.qkv_transform");
                for (k, name, rope, width) in [
                    (0, "q_proj", heads, heads * hd),
                    (1, "k_proj", kvh, kvh * hd),
                    (2, "v_proj", 0, kvh * hd),
                ] {
                    out.push(lin(
                        qkv.clone(),
                        Some(k),
                        per_track(&format!("self_attn.{name}")),
                        vec![t],
                        (rope > 0).then_some(rope),
                        h,
                        width,
                    ));
                }
                out.push(lin(
                    format!("{p}.attention.output_transform"),
                    None,
                    per_track("self_attn.o_proj"),
                    vec![t],
                    None,
                    heads * hd,
                    h,
                ));
                let ff = format!("{p}.feed_forward");
                if c.is_moe(j) {
                    let per_expert = |proj: &str| -> Vec<String> {
                        per_track("mlp")
                            .into_iter()
                            .flat_map(|m| (0..e).map(move |x| format!("{m}.experts.{x}.{proj}")))
                            .collect()
                    };
                    for (module, proj, i, o) in [
                        ("hidden_transform.linear_0", "gate_proj", h, fe),
                        ("hidden_transform.linear_1", "up_proj", h, fe),
                        ("output_transform", "down_proj", fe, h),
                    ] {
                        out.push(lin(
                            format!("{ff}.experts.{module}"),
                            None,
                            per_expert(proj),
                            vec![t, e],
                            None,
                            i,
                            o,
                        ));
                    }
                } else {
                    for (module, proj, i, o) in [
                        ("hidden_transform.linear_0", "gate_proj", h, f),
                        ("hidden_transform.linear_1", "up_proj", h, f),
                        ("output_transform", "down_proj", f, h),
                    ] {
                        out.push(lin(
                            format!("{ff}.{module}"),
                            None,
                            per_track(&format!("mlp.{proj}")),
                            vec![t],
                            None,
                            i,
                            o,
                        ));
                    }
                }
            }
        }
        out
    }

    /// The adapters in a tamm state dict (of a base checkpoint saved with its adapters, or of
    /// an adapter checkpoint), as our overlays on the PT-MoE module names.
    pub fn read_adapters(
        &self,
        pt: &PtFile,
        device: Device,
        kind: Kind,
    ) -> Result<Vec<LoraAdapter>> {
        crate::tamm_adapter::read_adapters_of(
            pt,
            &self.adaptable_linears(),
            &self.adapters,
            "AFMParallelTrackMoE",
            device,
            kind,
        )
    }

    /// Read a tamm config file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TextError::io(path, e))?;
        let bad = |msg: String| TextError::Config {
            path: path.to_path_buf(),
            msg,
        };
        let v: Json = serde_json::from_str(&text).map_err(|e| bad(format!("bad JSON: {e}")))?;
        Self::from_json(&v).map_err(bad)
    }

    /// Every tensor of tamm's state dict for this configuration with its shape, in the order
    /// `AFMParallelTrackMoE.state_dict()` holds them.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let c = &self.cfg;
        let (t, h, v) = (
            c.num_tracks as i64,
            c.hidden_size as i64,
            c.vocab_size as i64,
        );
        let hd = c.head_dim() as i64;
        let a = c.num_attention_heads as i64 * hd;
        let kv = c.num_kv_heads() as i64 * hd;
        let (f, fe, e) = (
            c.intermediate_size as i64,
            c.moe_intermediate_size as i64,
            c.num_local_experts as i64,
        );
        let mut out = vec![("embedding.weight".to_string(), vec![v, h])];
        let residual = |out: &mut Vec<(String, Vec<i64>)>, p: &str| {
            if c.pre_residual_norm.is_some() {
                out.push((
                    format!("{p}.residual_connection.pre_residual_norm.weight"),
                    vec![t, h],
                ));
            }
            if c.post_norm.is_some() {
                out.push((
                    format!("{p}.residual_connection.post_norm.weight"),
                    vec![t, h],
                ));
            }
        };
        for s in 0..c.num_track_blocks {
            let seg = format!("layers.segment_{s}");
            if c.tracks_dispatch_norm.is_some() {
                out.push((format!("{seg}.input_transform.norm.weight"), vec![t, h]));
            }
            for l in 0..c.track_block_depth {
                let j = s * c.track_block_depth + l;
                let p = format!("{seg}.layer_{l}.attention");
                if c.pre_norm.is_some() {
                    out.push((format!("{p}.norm.weight"), vec![t, h]));
                }
                out.push((
                    format!("{p}.qkv_transform.fused_linear.weight"),
                    vec![t, h, a + 2 * kv],
                ));
                if self.scale_qk_norm {
                    out.push((format!("{p}.qk_norm.query_norm.weight"), vec![t, hd]));
                    out.push((format!("{p}.qk_norm.key_norm.weight"), vec![t, hd]));
                }
                out.push((format!("{p}.output_transform.weight"), vec![t, a, h]));
                residual(&mut out, &p);
                let p = format!("{seg}.layer_{l}.feed_forward");
                if c.pre_norm.is_some() {
                    out.push((format!("{p}.norm.weight"), vec![t, h]));
                }
                if c.is_moe(j) {
                    out.push((format!("{p}.router.input_transform.weight"), vec![t, h, e]));
                    for i in 0..2 {
                        out.push((
                            format!("{p}.experts.hidden_transform.linear_{i}.weight"),
                            vec![t, e, h, fe],
                        ));
                    }
                    out.push((
                        format!("{p}.experts.output_transform.weight"),
                        vec![t, e, fe, h],
                    ));
                } else {
                    for i in 0..2 {
                        out.push((
                            format!("{p}.hidden_transform.linear_{i}.weight"),
                            vec![t, h, f],
                        ));
                    }
                    out.push((format!("{p}.output_transform.weight"), vec![t, f, h]));
                }
                residual(&mut out, &p);
            }
            if c.tracks_combine_norm.is_some() {
                out.push((format!("{seg}.output_transform.norm.weight"), vec![t, h]));
            }
        }
        out.push(("output_norm.weight".into(), vec![h]));
        // The head, tied to the embedding (the state dict lists it under its own name).
        out.push(("output_transform.weight".into(), vec![v, h]));
        out
    }

    /// Load a tamm `.pt` state dict into our tensor names: every tensor tamm has must be there
    /// with its shape, and nothing else; weights are transposed to `[out, in]` per track and
    /// expert, q/k rows and QK-norm weights permuted to our RoPE layout.
    pub fn load_weights(&self, pt_path: &Path, device: Device, kind: Kind) -> Result<WeightMap> {
        Ok(self.load_weights_and_adapter(pt_path, device, kind)?.0)
    }

    /// [`TammPtMoe::load_weights`], also giving the checkpoint's active adapter when it was
    /// saved with its adapters (base weights under `….wrapped.…`) and that adapter is not zero.
    pub fn load_weights_and_adapter(
        &self,
        pt_path: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<(WeightMap, Option<LoraAdapter>)> {
        let pt = PtFile::open(pt_path)?;
        let err = |m: String| TextError::checkpoint(pt_path, m);
        let by_name = crate::tamm::base_tensors(&pt, &self.tensor_shapes(), "AFMParallelTrackMoE")?;
        let get = |name: &str| -> Result<Tensor> {
            let t = pt.tensor(by_name[name])?;
            if !t.is_floating_point() {
                return Err(err(format!("tensor '{name}' is not floating point")));
            }
            Ok(t.f_to_kind(kind)?)
        };
        let c = &self.cfg;
        let mut map = WeightMap::new(device, kind);
        let file = map.add_file(pt_path);
        let hd = c.head_dim() as i64;
        let (heads, kvh) = (c.num_attention_heads as i64, c.num_kv_heads() as i64);
        let emb = get("embedding.weight")?;
        crate::tamm::check_tied_head(&pt, &by_name, &emb, || get("output_transform.weight"))?;
        map.insert("model.embed_tokens.weight", emb, file);
        map.insert("model.norm.weight", get("output_norm.weight")?, file);
        // [T, in, out] → track t's [out, in], its own storage.
        let track_t = |w: &Tensor, t: i64| -> Result<Tensor> {
            Ok(w.f_select(0, t)?.f_transpose(-1, -2)?.f_contiguous()?)
        };
        let norm_perm = |w: Tensor| -> Result<Tensor> {
            Ok(pairs_to_halves(&w.f_reshape([hd, 1])?, 1)?.f_reshape([hd])?)
        };
        let ones = || Tensor::f_ones([hd], (kind, Device::Cpu));
        for s in 0..c.num_track_blocks {
            let seg = format!("layers.segment_{s}");
            let per_track = |theirs: &str, ours: &str, map: &mut WeightMap| -> Result<()> {
                let w = get(theirs)?;
                for t in 0..c.num_tracks as i64 {
                    let name = format!("model.blocks.{s}.tracks.{t}.{ours}");
                    map.insert(name, w.f_select(0, t)?.f_contiguous()?, file);
                }
                Ok(())
            };
            if c.tracks_dispatch_norm.is_some() {
                per_track(
                    &format!("{seg}.input_transform.norm.weight"),
                    "dispatch_norm.weight",
                    &mut map,
                )?;
            }
            if c.tracks_combine_norm.is_some() {
                per_track(
                    &format!("{seg}.output_transform.norm.weight"),
                    "combine_norm.weight",
                    &mut map,
                )?;
            }
            for l in 0..c.track_block_depth {
                let j = s * c.track_block_depth + l;
                let a = format!("{seg}.layer_{l}.attention");
                let f = format!("{seg}.layer_{l}.feed_forward");
                let ours =
                    |t: i64, rest: &str| format!("model.blocks.{s}.tracks.{t}.layers.{l}.{rest}");
                let mut norms: Vec<(String, &str)> = Vec::new();
                if c.pre_norm.is_some() {
                    norms.push((format!("{a}.norm.weight"), "input_layernorm.weight"));
                    norms.push((
                        format!("{f}.norm.weight"),
                        "post_attention_layernorm.weight",
                    ));
                }
                for (slot, theirs, attn_ours, ffn_ours) in [
                    (
                        c.pre_residual_norm,
                        "pre_residual_norm",
                        "attn_pre_residual_norm.weight",
                        "ffn_pre_residual_norm.weight",
                    ),
                    (
                        c.post_norm,
                        "post_norm",
                        "attn_post_norm.weight",
                        "ffn_post_norm.weight",
                    ),
                ] {
                    if slot.is_some() {
                        let rc = "residual_connection";
                        norms.push((format!("{a}.{rc}.{theirs}.weight"), attn_ours));
                        norms.push((format!("{f}.{rc}.{theirs}.weight"), ffn_ours));
                    }
                }
                for (theirs, our) in &norms {
                    let w = get(theirs)?;
                    for t in 0..c.num_tracks as i64 {
                        map.insert(ours(t, our), w.f_select(0, t)?.f_contiguous()?, file);
                    }
                }
                let qkv = get(&format!("{a}.qkv_transform.fused_linear.weight"))?;
                let out_w = get(&format!("{a}.output_transform.weight"))?;
                let qk_norms = if self.scale_qk_norm {
                    Some((
                        get(&format!("{a}.qk_norm.query_norm.weight"))?,
                        get(&format!("{a}.qk_norm.key_norm.weight"))?,
                    ))
                } else {
                    None
                };
                for t in 0..c.num_tracks as i64 {
                    let w = track_t(&qkv, t)?; // [A + 2·kv, H]
                    let parts = w.f_split_with_sizes([heads * hd, kvh * hd, kvh * hd], 0)?;
                    let att = |rest: &str| ours(t, &format!("self_attn.{rest}"));
                    map.insert(
                        att("q_proj.weight"),
                        pairs_to_halves(&parts[0], heads)?,
                        file,
                    );
                    map.insert(att("k_proj.weight"), pairs_to_halves(&parts[1], kvh)?, file);
                    map.insert(att("v_proj.weight"), parts[2].copy(), file);
                    map.insert(att("o_proj.weight"), track_t(&out_w, t)?, file);
                    let (qn, kn) = match &qk_norms {
                        Some((q, k)) => (q.f_select(0, t)?, k.f_select(0, t)?),
                        None => (ones()?, ones()?),
                    };
                    map.insert(att("q_norm.weight"), norm_perm(qn)?, file);
                    map.insert(att("k_norm.weight"), norm_perm(kn)?, file);
                }
                if c.is_moe(j) {
                    let router = get(&format!("{f}.router.input_transform.weight"))?;
                    let gate = get(&format!("{f}.experts.hidden_transform.linear_0.weight"))?;
                    let up = get(&format!("{f}.experts.hidden_transform.linear_1.weight"))?;
                    let down = get(&format!("{f}.experts.output_transform.weight"))?;
                    for t in 0..c.num_tracks as i64 {
                        map.insert(ours(t, "mlp.gate.weight"), track_t(&router, t)?, file);
                        let (g, u, d) = (
                            gate.f_select(0, t)?,
                            up.f_select(0, t)?,
                            down.f_select(0, t)?,
                        );
                        for e in 0..c.num_local_experts as i64 {
                            let ex = |rest: &str| ours(t, &format!("mlp.experts.{e}.{rest}"));
                            map.insert(ex("gate_proj.weight"), track_t(&g, e)?, file);
                            map.insert(ex("up_proj.weight"), track_t(&u, e)?, file);
                            map.insert(ex("down_proj.weight"), track_t(&d, e)?, file);
                        }
                    }
                } else {
                    let gate = get(&format!("{f}.hidden_transform.linear_0.weight"))?;
                    let up = get(&format!("{f}.hidden_transform.linear_1.weight"))?;
                    let down = get(&format!("{f}.output_transform.weight"))?;
                    for t in 0..c.num_tracks as i64 {
                        map.insert(ours(t, "mlp.gate_proj.weight"), track_t(&gate, t)?, file);
                        map.insert(ours(t, "mlp.up_proj.weight"), track_t(&up, t)?, file);
                        map.insert(ours(t, "mlp.down_proj.weight"), track_t(&down, t)?, file);
                    }
                }
            }
        }
        let active = self
            .read_adapters(&pt, device, kind)?
            .into_iter()
            .find(|a| Some(&a.name) == self.active_adapter.as_ref())
            .filter(|a| !a.is_zero());
        Ok((map, active))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: Json) -> std::result::Result<TammPtMoe, String> {
        let mut v =
            serde_json::json!({"__tamm_type__": "module_configs:AFMParallelTrackMoEConfig"});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        TammPtMoe::from_json(&v)
    }

    #[test]
    fn defaults_are_the_server_model() {
        let t = cfg(serde_json::json!({})).unwrap();
        let n: i64 = t
            .tensor_shapes()
            .iter()
            .filter(|(n, _)| n != "output_transform.weight")
            .map(|(_, s)| s.iter().product::<i64>())
            .sum();
        assert_eq!(n, 147_803_703_296);
        assert_eq!(t.cfg.sliding_window, 4097);
        assert_eq!(t.cfg.num_track_blocks, 12);
        assert_eq!(t.cfg.head_dim(), 128);
        // The preset is the same model.
        let p = crate::ptmoe_config::ptmoe_preset("afm-server-ptmoe").unwrap();
        for j in 0..48 {
            assert_eq!(p.is_global(j), t.cfg.is_global(j), "layer {j}");
            assert_eq!(p.is_moe(j), t.cfg.is_moe(j), "layer {j}");
        }
        let ours: i64 = crate::ptmoe::ptmoe_weight_shapes(&p)
            .iter()
            .map(|(_, s)| s.iter().product::<i64>())
            .sum();
        assert_eq!(ours, n);
    }

    #[test]
    fn bad_fields_name_themselves() {
        for (extra, needle) in [
            (serde_json::json!({"colour": 1}), "\"colour\""),
            (
                serde_json::json!({"attention_layer_pattern": ["local_rope", "sideways"]}),
                "attention type \"sideways\" not recognized",
            ),
            (
                serde_json::json!({"feed_forward_layer_pattern": ["dense", "moe"]}),
                "feed forward type \"moe\"",
            ),
            (
                serde_json::json!({"pre_norm": "layer_norm"}),
                "pre_norm must be",
            ),
            (
                serde_json::json!({"tracks_combine_op": "max"}),
                "tracks_combine_op",
            ),
            (
                serde_json::json!({"num_layers_per_track": 6}),
                "does not evenly divide num_layers_per_track (6)",
            ),
            (serde_json::json!({"num_heads": 3}), "num_heads (3)"),
            (
                serde_json::json!({"experts_router_logits_cap": -1}),
                "router_logits_cap",
            ),
        ] {
            let e = cfg(extra.clone()).unwrap_err();
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let mut v = serde_json::json!({"__tamm_type__": "module_configs:AFMTextV7Config"});
        v["x"] = 1.into();
        assert!(TammPtMoe::from_json(&v)
            .unwrap_err()
            .contains("AFMTextV7Config"));
    }
}
