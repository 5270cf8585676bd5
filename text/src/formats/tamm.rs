//! Apple's tamm checkpoints: a model directory in the layout of the Foundation Models adapter
//! toolkit's `assets/` (`base-model-config.json` + `base-model.pt`), translated at load time into
//! our decoder's configuration and tensor names.
//!
//! tamm (PyPI `tamm` 0.2.0) is the reference. Its `AFMTextV7` is our two-segment decoder with
//! two differences of convention that the translation handles:
//! - QK-norm comes *after* RoPE (`norm → qkv → RoPE → QK-norm → cache → attention`): the
//!   config gets `qk_norm_after_rope`.
//! - RoPE rotates adjacent pairs `(2i, 2i+1)` of each head; ours rotates halves `(i, i + d/2)`.
//!   The rows of every query/key projection (and the QK-norm weights) are permuted per head
//!   `[0, 2, 4, …, 1, 3, 5, …]`, which makes the two exactly equal (attention scores are
//!   invariant under one permutation of both queries and keys; values are untouched).
//!
//! Names: `layers.segment_0.layer_{i}.attention.qkv_transform.fused_linear.weight`
//! `[H + 2·kv, H]` is split into q/k/v; segment 1's `attention.q_transform.weight` and
//! `q_norm.query_norm.weight`; `feed_forward.hidden_transform.linear_{0,1}` are gate and up;
//! `output_transform` is tied to `embedding`.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use tch::{Device, Kind, Tensor};

use crate::config::TextConfig;
use crate::error::{Result, TextError};
use crate::lora::LoraAdapter;
use crate::pt::PtFile;
pub use crate::tamm_adapter::TammLoraSpec;
use crate::weights::WeightMap;

/// The toolkit's file names.
pub const CONFIG_FILE: &str = "base-model-config.json";
pub const WEIGHTS_FILE: &str = "base-model.pt";
pub const DRAFT_CONFIG_FILE: &str = "draft-model-config.json";
pub const DRAFT_WEIGHTS_FILE: &str = "draft-model.pt";
pub const TOKENIZER_MODEL: &str = "tokenizer.model";
pub const TOKENIZER_CONFIG: &str = "tokenizer-config.json";

/// Context length given to tamm models (tamm computes RoPE on the fly and has no limit; our
/// RoPE table is allocated for this many positions).
pub const TAMM_CONTEXT: usize = 32_768;

/// The tamm config and weights of a directory, if it is a tamm model directory: the toolkit's
/// `base-model-config.json` + `base-model.pt`, or a `config.json` with a `__tamm_type__`
/// beside a `*.pt`.
pub fn tamm_files(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let (c, w) = (dir.join(CONFIG_FILE), dir.join(WEIGHTS_FILE));
    if c.is_file() {
        return Some((c, w));
    }
    let c = dir.join("config.json");
    let text = std::fs::read_to_string(&c).ok()?;
    if !text.contains("__tamm_type__") {
        return None;
    }
    let v: Json = serde_json::from_str(&text).ok()?;
    v.get("__tamm_type__")?;
    let w = ["model.pt", WEIGHTS_FILE]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .unwrap_or_else(|| dir.join("model.pt"));
    Some((c, w))
}

/// The toolkit's draft model of a folder (`draft-model-config.json` + `draft-model.pt`), if it
/// has one.
pub fn draft_files(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let c = dir.join(DRAFT_CONFIG_FILE);
    c.is_file().then(|| (c, dir.join(DRAFT_WEIGHTS_FILE)))
}

/// The geometry of a tamm `AFMTextV7Config`, with tamm's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct TammConfig {
    pub vocab_size: usize,
    pub hidden_dim: usize,
    pub num_layers: usize,
    pub num_kv_reuse_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub hidden_dim_scale_factor: f64,
    pub rope_theta: f64,
    /// tamm's `KVQuantArchOptimizer`: keys and values of every segment-0 layer fake-quantised
    /// to int8 (one calibrated scale per tensor) before the cache.
    pub kv_quant: bool,
    /// `skip_quantize_for_first_token`: the first-token pass of generation (the prompt's
    /// prefill) attends to its own keys and values unquantised while caching them quantised.
    pub kv_quant_skip_first: bool,
    /// The config's `adapters` (tamm `LoRAModelAdapter`s), in order.
    pub adapters: Vec<TammLoraSpec>,
    /// The id of the active adapter (`active_adapter`, an index or an id; tamm's default is the
    /// first), when the config has adapters.
    pub active_adapter: Option<String>,
}

impl Default for TammConfig {
    /// `AFMTextV7.create_basic_builder`'s defaults: the 3B on-device model.
    fn default() -> Self {
        TammConfig {
            vocab_size: 153_600,
            hidden_dim: 2048,
            num_layers: 56,
            num_kv_reuse_layers: 21,
            num_heads: 16,
            num_kv_heads: 2,
            hidden_dim_scale_factor: 3.25,
            rope_theta: 500_000.0,
            kv_quant: false,
            kv_quant_skip_first: false,
            adapters: Vec::new(),
            active_adapter: None,
        }
    }
}

/// One entry of `arch_optimizers`: only tamm's `KVQuantArchOptimizer` (int8, fp32 arithmetic)
/// is run; anything else is refused. Returns its `skip_quantize_for_first_token`.
fn parse_kv_quant(name: &str, o: &Json) -> std::result::Result<bool, String> {
    let obj = o
        .as_object()
        .ok_or_else(|| format!("arch_optimizers.{name} is not an object"))?;
    let ty = obj
        .get("__tamm_type__")
        .and_then(Json::as_str)
        .unwrap_or("");
    if ty.rsplit(':').next() != Some("KVQuantArchOptimizer") {
        return Err(format!(
            "arch_optimizers.{name}: {ty:?} is not supported (afm-vl runs KVQuantArchOptimizer)"
        ));
    }
    let mut skip_first = false;
    for (k, v) in obj {
        match k.as_str() {
            "__tamm_type__" | "freeze_qparams" => {}
            "cast_dtype" if v.as_str().is_some_and(|d| d.trim_start_matches("torch.") == "float32") => {}
            "skip_quantize_for_first_token" => {
                skip_first = v.as_bool().ok_or_else(|| {
                    format!("arch_optimizers.{name}: skip_quantize_for_first_token must be true or false, got {v}")
                })?
            }
            other => {
                return Err(format!(
                    "arch_optimizers.{name}: {other} = {v} is not supported (fp32 arithmetic)"
                ))
            }
        }
    }
    Ok(skip_first)
}

/// Fields of an `AFMTextV7Config` that do not change the model's numbers at inference.
const INERT_FIELDS: &[&str] = &[
    "attention_dropout_p",
    "hidden_dropout_p",
    "include_loss_layer",
    "output_hidden_states",
    "output_attentions",
    "sdpa_implementation",
    "device",
    "dtype",
    "pretrained",
    "pretrained_path",
    "freeze_params",
    "metadata",
];

impl TammConfig {
    /// Parse tamm's JSON (`{"__tamm_type__": "module_configs:AFMTextV7Config", …}`). An unknown
    /// type or field is an error naming it; so is a part we do not run yet.
    pub fn from_json(v: &Json) -> std::result::Result<Self, String> {
        let obj = v.as_object().ok_or("not a JSON object")?;
        let ty = obj
            .get("__tamm_type__")
            .and_then(Json::as_str)
            .ok_or("no \"__tamm_type__\" (not a tamm config)")?;
        let name = ty.rsplit(':').next().unwrap_or(ty);
        if name != "AFMTextV7Config" {
            return Err(format!(
                "__tamm_type__ {ty:?} is not supported (afm-vl reads AFMTextV7Config and \
                 AFMParallelTrackMoEConfig)"
            ));
        }
        let mut c = TammConfig::default();
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
                "vocab_size" => c.vocab_size = int()?,
                "hidden_dim" => c.hidden_dim = int()?,
                "num_layers" => c.num_layers = int()?,
                "num_kv_reuse_layers" => c.num_kv_reuse_layers = int()?,
                "num_heads" => c.num_heads = int()?,
                "num_kv_heads" => c.num_kv_heads = if val.is_null() { c.num_heads } else { int()? },
                "hidden_dim_scale_factor" => c.hidden_dim_scale_factor = float()?,
                "rope_theta" => c.rope_theta = float()?,
                "arch_optimizers" if val.is_null() => {}
                "adapters" => adapters = val.clone(),
                "active_adapter" => active = val.clone(),
                "arch_optimizers" => {
                    let opts = val.as_object().ok_or("arch_optimizers must be an object")?;
                    for (name, o) in opts {
                        c.kv_quant_skip_first = parse_kv_quant(name, o)?;
                        c.kv_quant = true;
                    }
                }
                f if INERT_FIELDS.contains(&f) => {}
                other => return Err(format!("unknown AFMTextV7Config field {other:?}")),
            }
        }
        (c.adapters, c.active_adapter) = crate::tamm_adapter::parse_adapters(&adapters, &active)?;
        if c.num_heads == 0 || !c.hidden_dim.is_multiple_of(c.num_heads) {
            return Err(format!(
                "hidden_dim {} is not a multiple of num_heads {}",
                c.hidden_dim, c.num_heads
            ));
        }
        if c.num_kv_reuse_layers >= c.num_layers {
            return Err(format!(
                "num_kv_reuse_layers {} leaves no regular layer out of {}",
                c.num_kv_reuse_layers, c.num_layers
            ));
        }
        Ok(c)
    }

    /// FFN width: Python's `round(hidden_dim * hidden_dim_scale_factor)` (ties to even).
    pub fn ffn_dim(&self) -> usize {
        (self.hidden_dim as f64 * self.hidden_dim_scale_factor).round_ties_even() as usize
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_dim / self.num_heads.max(1)
    }

    /// Our decoder configuration for this model.
    pub fn text_config(&self) -> TextConfig {
        let mut cfg = crate::presets::preset("afm-2025-ondevice-3b")
            .unwrap_or_else(|_| unreachable!("the AFM preset exists"));
        cfg.vocab_size = self.vocab_size;
        cfg.hidden_size = self.hidden_dim;
        cfg.intermediate_size = self.ffn_dim();
        cfg.num_hidden_layers = self.num_layers;
        cfg.num_segment1_layers = self.num_kv_reuse_layers;
        cfg.num_attention_heads = self.num_heads;
        cfg.num_key_value_heads = Some(self.num_kv_heads);
        cfg.head_dim = Some(self.head_dim());
        cfg.rope_theta = self.rope_theta;
        cfg.rms_norm_eps = 1e-5;
        cfg.max_position_embeddings = TAMM_CONTEXT;
        cfg.tie_word_embeddings = true;
        cfg.qk_norm = true;
        cfg.qk_norm_after_rope = true;
        cfg.kv_source_layer = None;
        cfg.attention_bias = false;
        cfg.kv_fake_quant = self.kv_quant;
        cfg.kv_fake_quant_skip_first = self.kv_quant && self.kv_quant_skip_first;
        cfg.norm_gain_fp32 = true;
        cfg
    }

    /// Where the KV quantiser's observers sit in an attention layer's state dict: tamm inserts a
    /// `kv_quantizer` before the cacher, or wraps the cacher (`kv_cacher.quantizer`) when the
    /// first token is left unquantised.
    pub fn kv_quantizer_module(&self) -> &'static str {
        if self.kv_quant_skip_first {
            "kv_cacher.quantizer"
        } else {
            "kv_quantizer"
        }
    }

    /// The state-dict prefix of layer `i` of segment 0: `layers.segment_0.layer_{i}`, or
    /// `layers.layer_{i}` when the model has no KV-reuse layers (a uniform stack, e.g. the draft).
    pub fn segment0_prefix(&self, i: usize) -> String {
        if self.num_kv_reuse_layers == 0 {
            format!("layers.layer_{i}")
        } else {
            format!("layers.segment_0.layer_{i}")
        }
    }

    /// Every tensor of tamm's state dict for this geometry, with its shape (what
    /// `AFMTextV7.state_dict()` holds, in its order).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (h, v, f) = (
            self.hidden_dim as i64,
            self.vocab_size as i64,
            self.ffn_dim() as i64,
        );
        let hd = self.head_dim() as i64;
        let kv = self.num_kv_heads as i64 * hd;
        let n0 = self.num_layers - self.num_kv_reuse_layers;
        let mut out = vec![("embedding.weight".to_string(), vec![v, h])];
        let ffn = |out: &mut Vec<(String, Vec<i64>)>, p: &str| {
            out.push((format!("{p}.feed_forward.norm.weight"), vec![h]));
            for i in 0..2 {
                out.push((
                    format!("{p}.feed_forward.hidden_transform.linear_{i}.weight"),
                    vec![f, h],
                ));
            }
            out.push((
                format!("{p}.feed_forward.output_transform.weight"),
                vec![h, f],
            ));
        };
        for i in 0..n0 {
            let p = self.segment0_prefix(i);
            out.push((format!("{p}.attention.norm.weight"), vec![h]));
            out.push((
                format!("{p}.attention.qkv_transform.fused_linear.weight"),
                vec![h + 2 * kv, h],
            ));
            out.push((format!("{p}.attention.qk_norm.query_norm.weight"), vec![hd]));
            out.push((format!("{p}.attention.qk_norm.key_norm.weight"), vec![hd]));
            out.push((format!("{p}.attention.output_transform.weight"), vec![h, h]));
            if self.kv_quant {
                for q in ["key", "value"] {
                    let o = format!(
                        "{p}.attention.{}.{q}_quantizer.activation_post_process",
                        self.kv_quantizer_module()
                    );
                    out.push((format!("{o}.range"), vec![2]));
                    out.push((format!("{o}.num_samples"), vec![]));
                }
            }
            ffn(&mut out, &p);
        }
        for j in 0..self.num_kv_reuse_layers {
            let p = format!("layers.segment_1.layer_{j}");
            out.push((format!("{p}.attention.norm.weight"), vec![h]));
            out.push((format!("{p}.attention.q_transform.weight"), vec![h, h]));
            out.push((format!("{p}.attention.q_norm.query_norm.weight"), vec![hd]));
            out.push((format!("{p}.attention.output_transform.weight"), vec![h, h]));
            ffn(&mut out, &p);
        }
        out.push(("output_norm.weight".into(), vec![h]));
        out.push(("output_transform.weight".into(), vec![v, h]));
        out
    }
}

/// Read and translate a tamm config file.
pub fn read_config(path: &Path) -> Result<(TammConfig, TextConfig)> {
    let text = std::fs::read_to_string(path).map_err(|e| TextError::io(path, e))?;
    let bad = |msg: String| TextError::Config {
        path: path.to_path_buf(),
        msg,
    };
    let v: Json = serde_json::from_str(&text).map_err(|e| bad(format!("bad JSON: {e}")))?;
    let t = TammConfig::from_json(&v).map_err(bad)?;
    let cfg = t.text_config();
    cfg.validate().map_err(bad)?;
    Ok((t, cfg))
}

/// `[rows = heads · d, cols]` with each head's rows reordered from tamm's adjacent RoPE pairs
/// to our halves: new row `j` = old `2j`, new row `d/2 + j` = old `2j + 1`.
pub fn pairs_to_halves(w: &Tensor, heads: i64) -> Result<Tensor> {
    let size = w.size();
    let (rows, rest) = (size[0], &size[1..]);
    let d = rows / heads;
    let mut shape = vec![heads, d / 2, 2];
    shape.extend_from_slice(rest);
    let mut back = vec![rows];
    back.extend_from_slice(rest);
    Ok(w.f_reshape(shape.as_slice())?
        .f_transpose(1, 2)?
        .f_contiguous()?
        .f_reshape(back.as_slice())?)
}

/// The base tensors of a tamm state dict by name (tamm's adapter wrapper `.wrapped.` taken out
/// of the names, adapter tensors left for the adapter reader), checked against `expected`:
/// every tensor there with its shape, nothing else (`model` names the model in the message).
pub fn base_tensors<'a>(
    pt: &'a PtFile,
    expected: &[(String, Vec<i64>)],
    model: &str,
) -> Result<std::collections::HashMap<String, &'a crate::pt::TensorRef>> {
    let err = |m: String| TextError::checkpoint(&pt.path, m);
    let by_name: std::collections::HashMap<String, &crate::pt::TensorRef> = pt
        .tensors
        .iter()
        .filter(|(n, _)| !crate::tamm_adapter::is_adapter_tensor(n))
        .map(|(n, r)| (n.replacen(".wrapped.", ".", 1), r))
        .collect();
    for (name, shape) in expected {
        let r = by_name
            .get(name.as_str())
            .ok_or_else(|| err(format!("missing tensor '{name}'")))?;
        if &r.size != shape {
            return Err(err(format!(
                "tensor '{name}' has shape {:?}, the config needs {shape:?}",
                r.size
            )));
        }
    }
    if by_name.len() != expected.len() {
        let names: std::collections::HashSet<&str> =
            expected.iter().map(|(n, _)| n.as_str()).collect();
        // In the file's order, for a stable message.
        let extra = pt
            .tensors
            .iter()
            .filter(|(n, _)| !crate::tamm_adapter::is_adapter_tensor(n))
            .map(|(n, _)| n.replacen(".wrapped.", ".", 1))
            .find(|n| !names.contains(n.as_str()))
            .unwrap_or_default();
        return Err(err(format!(
            "unexpected tensor '{extra}' (not part of an {model} of this config)"
        )));
    }
    Ok(by_name)
}

/// The head saved tied to the embedding: one view of one storage, or (saved untied) equal
/// values; else an error, since the model ties them.
pub fn check_tied_head(
    pt: &PtFile,
    by_name: &std::collections::HashMap<String, &crate::pt::TensorRef>,
    emb: &Tensor,
    read_head: impl FnOnce() -> Result<Tensor>,
) -> Result<()> {
    let (e, h) = (
        by_name["embedding.weight"],
        by_name["output_transform.weight"],
    );
    let same_view = e.key == h.key && e.offset == h.offset && e.stride == h.stride;
    if !same_view && !emb.equal(&read_head()?) {
        return Err(TextError::checkpoint(
            &pt.path,
            "output_transform.weight differs from embedding.weight (the model ties them)",
        ));
    }
    Ok(())
}

/// Load a tamm `.pt` state dict into our tensor names, for `t`'s geometry: every tensor tamm
/// has must be there with its shape; q/k rows and QK-norm weights are permuted (module docs).
/// A model saved with its adapters (base weights under `….wrapped.…`, adapter tensors beside
/// them) also gives its active adapter, unless that adapter is still zero (an untrained one
/// changes nothing).
pub fn load_weights(
    pt_path: &Path,
    t: &TammConfig,
    device: Device,
    kind: Kind,
) -> Result<(WeightMap, Option<LoraAdapter>)> {
    let pt = PtFile::open(pt_path)?;
    let by_name = base_tensors(&pt, &t.tensor_shapes(), "AFMTextV7")?;
    // Each tensor in the load dtype as soon as it is read (a bf16 load of an fp32 file holds
    // the bf16 model plus one fp32 tensor at a time); the KV quantiser's calibrated ranges stay
    // fp32.
    let get = |name: &str| -> Result<Tensor> {
        let t = pt.tensor(by_name[name])?;
        if name.contains("_quantizer.") || !t.is_floating_point() {
            return Ok(t);
        }
        Ok(t.f_to_kind(kind)?)
    };
    let mut map = WeightMap::new(device, kind);
    let file = map.add_file(pt_path);
    let (h, hd) = (t.hidden_dim as i64, t.head_dim() as i64);
    let (heads, kvh) = (t.num_heads as i64, t.num_kv_heads as i64);
    let n0 = t.num_layers - t.num_kv_reuse_layers;
    // Read once: used for the embedding and for the tied-head check below (3B: 1.2 GB fp32).
    let emb = get("embedding.weight")?;
    map.insert("model.embed_tokens.weight", emb.shallow_clone(), file);
    map.insert("model.norm.weight", get("output_norm.weight")?, file);
    let norm_perm = |w: Tensor| -> Result<Tensor> {
        Ok(pairs_to_halves(&w.f_reshape([hd, 1])?, 1)?.f_reshape([hd])?)
    };
    for layer in 0..t.num_layers {
        let (p, ours) = if layer < n0 {
            (t.segment0_prefix(layer), format!("model.layers.{layer}"))
        } else {
            (
                format!("layers.segment_1.layer_{}", layer - n0),
                format!("model.layers.{layer}"),
            )
        };
        let a = format!("{p}.attention");
        map.insert(
            format!("{ours}.input_layernorm.weight"),
            get(&format!("{a}.norm.weight"))?,
            file,
        );
        if layer < n0 {
            let qkv = get(&format!("{a}.qkv_transform.fused_linear.weight"))?;
            let parts = qkv.f_split_with_sizes([h, kvh * hd, kvh * hd], 0)?;
            map.insert(
                format!("{ours}.self_attn.q_proj.weight"),
                pairs_to_halves(&parts[0], heads)?,
                file,
            );
            map.insert(
                format!("{ours}.self_attn.k_proj.weight"),
                pairs_to_halves(&parts[1], kvh)?,
                file,
            );
            map.insert(
                format!("{ours}.self_attn.v_proj.weight"),
                // Its own storage: a view would keep the whole fused q/k/v alive.
                parts[2].copy(),
                file,
            );
            map.insert(
                format!("{ours}.self_attn.q_norm.weight"),
                norm_perm(get(&format!("{a}.qk_norm.query_norm.weight"))?)?,
                file,
            );
            map.insert(
                format!("{ours}.self_attn.k_norm.weight"),
                norm_perm(get(&format!("{a}.qk_norm.key_norm.weight"))?)?,
                file,
            );
            if t.kv_quant {
                for q in ["key", "value"] {
                    let r = get(&format!(
                        "{a}.{}.{q}_quantizer.activation_post_process.range",
                        t.kv_quantizer_module()
                    ))?;
                    map.insert(format!("{ours}.self_attn.kv_quant.{q}_range"), r, file);
                }
            }
        } else {
            map.insert(
                format!("{ours}.self_attn.q_proj.weight"),
                pairs_to_halves(&get(&format!("{a}.q_transform.weight"))?, heads)?,
                file,
            );
            map.insert(
                format!("{ours}.self_attn.q_norm.weight"),
                norm_perm(get(&format!("{a}.q_norm.query_norm.weight"))?)?,
                file,
            );
        }
        map.insert(
            format!("{ours}.self_attn.o_proj.weight"),
            get(&format!("{a}.output_transform.weight"))?,
            file,
        );
        let f = format!("{p}.feed_forward");
        map.insert(
            format!("{ours}.post_attention_layernorm.weight"),
            get(&format!("{f}.norm.weight"))?,
            file,
        );
        for (ours_name, theirs) in [
            ("mlp.gate_proj", "hidden_transform.linear_0"),
            ("mlp.up_proj", "hidden_transform.linear_1"),
            ("mlp.down_proj", "output_transform"),
        ] {
            map.insert(
                format!("{ours}.{ours_name}.weight"),
                get(&format!("{f}.{theirs}.weight"))?,
                file,
            );
        }
    }
    // The head is tied to the embedding in AFMTextV7; a checkpoint whose head differs is not
    // an AFMTextV7.
    check_tied_head(&pt, &by_name, &emb, || get("output_transform.weight"))?;
    let adapters = crate::tamm_adapter::read_adapters(&pt, t, device, kind)?;
    let active = adapters
        .into_iter()
        .find(|a| Some(&a.name) == t.active_adapter.as_ref())
        .filter(|a| !a.is_zero());
    Ok((map, active))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_permutation_maps_adjacent_pairs_to_halves() {
        // One head of 6 rows: pairs (0,1) (2,3) (4,5) → halves [0,2,4 | 1,3,5].
        let w = Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([6, 2]);
        let p = pairs_to_halves(&w, 1).unwrap();
        let rows: Vec<f32> = Vec::try_from(p.select(1, 0)).unwrap();
        assert_eq!(rows, vec![0., 4., 8., 2., 6., 10.]);
        // Two heads permute independently.
        let w = Tensor::arange(8, (Kind::Float, Device::Cpu)).reshape([8, 1]);
        let p: Vec<f32> = Vec::try_from(pairs_to_halves(&w, 2).unwrap().flatten(0, -1)).unwrap();
        assert_eq!(p, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    }

    #[test]
    fn config_fields_and_errors() {
        let v: Json = serde_json::json!({
            "__tamm_type__": "module_configs:AFMTextV7Config",
            "hidden_dim": 32, "num_heads": 4, "num_kv_reuse_layers": 1, "num_layers": 3,
            "vocab_size": 64
        });
        let c = TammConfig::from_json(&v).unwrap();
        assert_eq!((c.hidden_dim, c.num_kv_heads, c.ffn_dim()), (32, 2, 104));
        let mut bad = v.clone();
        bad["colour"] = 1.into();
        assert!(TammConfig::from_json(&bad)
            .unwrap_err()
            .contains("\"colour\""));
        let mut bad = v.clone();
        bad["__tamm_type__"] = "models:SomethingElse".into();
        assert!(TammConfig::from_json(&bad)
            .unwrap_err()
            .contains("SomethingElse"));
        // The default geometry is the 3B model: 3,111,368,064 parameters without the tied head.
        let d = TammConfig::default();
        let n: i64 = d
            .tensor_shapes()
            .iter()
            .filter(|(n, _)| n != "output_transform.weight")
            .map(|(_, s)| s.iter().product::<i64>())
            .sum();
        assert_eq!(n, 3_111_368_064);
    }
}
