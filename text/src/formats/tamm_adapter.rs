//! LoRA adapters in tamm's layout (`tamm._adapters_v1`, what Apple's adapter toolkit trains),
//! translated to and from our overlays ([`crate::lora::LoraAdapter`]).
//!
//! tamm wraps each adapted linear layer: its weight moves to `<layer>.wrapped.weight` and the
//! adapter `<id>` adds `<layer>.adapters.<id>.a_transpose [in, r]` and `.b_transpose [r, out]`,
//! `y += (x·a_transpose)·b_transpose · α/r`. The fused q/k/v projection of segment 0 carries
//! three of them, `lora_0/1/2` (query, key, value). Ours are `A = a_transposeᵀ [r, in]`,
//! `B = b_transposeᵀ [out, r]` on the split q/k/v projections; B's rows of the query and key
//! projections get the same per-head RoPE permutation as their weights
//! ([`crate::tamm::pairs_to_halves`]), so the adapted model equals tamm's exactly.
//!
//! The toolkit's adapter checkpoints are `torch.save` of the adapter tensors only (loaded with
//! `strict=False`); α comes from the `LoRAModelAdapter` spec in the base config.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::Value as Json;
use tch::{Device, Kind, Tensor};

use crate::error::{Result, TextError};
use crate::lora::LoraAdapter;
use crate::pt::PtFile;
use crate::tamm::{pairs_to_halves, TammConfig};

/// The name of the adapter checkpoint `train lora` writes for tamm (the toolkit's format).
pub const ADAPTER_FILE: &str = "adapter.pt";
/// Beside it: the `LoRAModelAdapter` spec that tamm needs to build the adapter (tamm JSON).
pub const ADAPTER_SPEC_FILE: &str = "adapter-config.json";

/// One `LoRAModelAdapter` of a tamm config: which linear layers it adapts, at what rank and α.
#[derive(Debug, Clone, PartialEq)]
pub struct TammLoraSpec {
    /// The adapter id (its key in `adapters`, and in the state-dict names).
    pub id: String,
    pub rank: usize,
    /// tamm's default α is the rank (scale 1).
    pub alpha: f64,
    pub queries: bool,
    pub keys: bool,
    pub values: bool,
    pub outputs: bool,
    /// Both FFN input projections (gate and up).
    pub ffn_hidden: bool,
    pub ffn_outputs: bool,
    /// The experts of MoE layers too (`adapt_moe`, tamm's default true); the router never.
    pub moe: bool,
}

/// Fields of a `LoRAModelAdapter` that do not change an adapter's numbers at inference.
const INERT_SPEC_FIELDS: &[&str] = &[
    "__tamm_type__",
    "dropout_p",
    "layer_prefix",
    "pretrained",
    "device",
    "dtype",
    "freeze_params",
];

impl TammLoraSpec {
    /// A spec adapting every projection tamm can (q, k, v, o, gate, up, down).
    pub fn new(id: &str, rank: usize, alpha: f64) -> Self {
        TammLoraSpec {
            id: id.to_string(),
            rank,
            alpha,
            queries: true,
            keys: true,
            values: true,
            outputs: true,
            ffn_hidden: true,
            ffn_outputs: true,
            moe: true,
        }
    }

    pub fn from_json(id: &str, v: &Json) -> std::result::Result<Self, String> {
        let obj = v
            .as_object()
            .ok_or_else(|| format!("adapters.{id} is not an object"))?;
        let ty = obj
            .get("__tamm_type__")
            .and_then(Json::as_str)
            .unwrap_or("");
        if ty.rsplit(':').next() != Some("LoRAModelAdapter") {
            return Err(format!(
                "adapters.{id}: {ty:?} is not supported (afm-vl runs LoRAModelAdapter)"
            ));
        }
        // tamm's defaults: rank 8, α = the rank, every projection.
        let mut s = TammLoraSpec::new(id, 8, f64::NAN);
        for (k, val) in obj {
            let flag = || {
                val.as_bool()
                    .ok_or_else(|| format!("adapters.{id}.{k} must be true or false, got {val}"))
            };
            match k.as_str() {
                "rank" => {
                    s.rank = val
                        .as_u64()
                        .filter(|&r| (1..=65_536).contains(&r))
                        .ok_or_else(|| format!("adapters.{id}.rank must be 1..=65536, got {val}"))?
                        as usize
                }
                "alpha" if val.is_null() => {}
                "alpha" => {
                    s.alpha = val
                        .as_f64()
                        .filter(|a| a.is_finite())
                        .ok_or_else(|| format!("adapters.{id}.alpha must be a number, got {val}"))?
                }
                "adapt_attention_queries" => s.queries = flag()?,
                "adapt_attention_keys" => s.keys = flag()?,
                "adapt_attention_values" => s.values = flag()?,
                "adapt_attention_outputs" => s.outputs = flag()?,
                "adapt_feed_forward_hidden_states" => s.ffn_hidden = flag()?,
                "adapt_feed_forward_outputs" => s.ffn_outputs = flag()?,
                "adapt_moe" => s.moe = flag()?,
                "layer_pattern" | "pretrained_path" if val.is_null() => {}
                "layer_pattern" | "pretrained_path" => {
                    return Err(format!("adapters.{id}.{k} = {val} is not supported"))
                }
                f if INERT_SPEC_FIELDS.contains(&f) => {}
                other => {
                    return Err(format!(
                        "unknown LoRAModelAdapter field adapters.{id}.{other:?}"
                    ))
                }
            }
        }
        if s.alpha.is_nan() {
            s.alpha = s.rank as f64;
        }
        Ok(s)
    }

    /// The multiplier of the update, α/r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Whether it adapts our linear `name` (its suffix is a target; an expert's only with
    /// `moe`).
    pub fn adapts(&self, name: &str) -> bool {
        self.targets().iter().any(|t| name.ends_with(t.as_str()))
            && (self.moe || !name.contains(".experts."))
    }

    /// Substrings of module names it leaves alone although their suffix is a target
    /// (`.experts.` without `moe`), for `train lora`'s exclusions.
    pub fn excluded(&self) -> Vec<String> {
        if self.moe {
            Vec::new()
        } else {
            vec![".experts.".to_string()]
        }
    }

    /// Our module-name suffixes it adapts (`q_proj`, …), for `train lora`'s targets.
    pub fn targets(&self) -> Vec<String> {
        [
            (self.queries, "q_proj"),
            (self.keys, "k_proj"),
            (self.values, "v_proj"),
            (self.outputs, "o_proj"),
            (self.ffn_hidden, "gate_proj"),
            (self.ffn_hidden, "up_proj"),
            (self.ffn_outputs, "down_proj"),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, t)| t.to_string())
        .collect()
    }

    /// tamm JSON for this spec (`adapters:LoRAModelAdapter`).
    pub fn to_json(&self) -> Json {
        serde_json::json!({
            "__tamm_type__": "adapters:LoRAModelAdapter",
            "rank": self.rank,
            "alpha": self.alpha,
            "adapt_attention_queries": self.queries,
            "adapt_attention_keys": self.keys,
            "adapt_attention_values": self.values,
            "adapt_attention_outputs": self.outputs,
            "adapt_feed_forward_hidden_states": self.ffn_hidden,
            "adapt_feed_forward_outputs": self.ffn_outputs,
            "adapt_moe": self.moe,
        })
    }
}

/// A config's `adapters` object (tamm `LoRAModelAdapter`s by id, in order) and its
/// `active_adapter` (an index or an id; tamm's default is the first): the specs and the active
/// id (none without adapters).
pub fn parse_adapters(
    adapters: &Json,
    active: &Json,
) -> std::result::Result<(Vec<TammLoraSpec>, Option<String>), String> {
    let mut specs = Vec::new();
    if !adapters.is_null() {
        let obj = adapters.as_object().ok_or("adapters must be an object")?;
        for (id, spec) in obj {
            specs.push(TammLoraSpec::from_json(id, spec)?);
        }
    }
    if specs.is_empty() {
        return Ok((specs, None));
    }
    let id = match active {
        Json::Null => specs.first().map(|s| s.id.clone()),
        Json::Number(n) => n
            .as_u64()
            .and_then(|i| specs.get(i as usize))
            .map(|s| s.id.clone()),
        Json::String(s) => specs.iter().find(|a| &a.id == s).map(|a| a.id.clone()),
        _ => None,
    };
    let id =
        id.ok_or_else(|| format!("active_adapter {active} names none of the config's adapters"))?;
    Ok((specs, Some(id)))
}

/// A linear layer tamm can adapt, in both namings.
#[derive(Debug, Clone)]
pub struct AdaptableLinear {
    /// tamm's module path (`layers.segment_0.layer_0.attention.qkv_transform`).
    pub module: String,
    /// For the fused q/k/v projection: which of its three LoRAs (`lora_0/1/2`).
    pub part: Option<usize>,
    /// Our module name (`model.layers.0.self_attn.q_proj`); for a vectorised layer one per
    /// index of `vec`, row-major.
    pub ours: Vec<String>,
    /// The leading dimensions of a vectorised layer's adapter tensors (PT-MoE: `[tracks]`, or
    /// `[tracks, experts]`); empty for a plain linear.
    pub vec: Vec<i64>,
    /// Query/key projections: the head count of their per-head RoPE permutation.
    pub rope_heads: Option<i64>,
    pub in_features: i64,
    pub out_features: i64,
}

impl AdaptableLinear {
    /// `<module>.adapters.<id>.[lora_k.]{a,b}_transpose`
    fn tensor_name(&self, id: &str, which: char) -> String {
        match self.part {
            Some(k) => format!("{}.adapters.{id}.lora_{k}.{which}_transpose", self.module),
            None => format!("{}.adapters.{id}.{which}_transpose", self.module),
        }
    }
}

/// Every linear layer of `t`'s AFMTextV7 that a LoRA adapter can target.
pub fn adaptable_linears(t: &TammConfig) -> Vec<AdaptableLinear> {
    let (h, hd, f) = (t.hidden_dim as i64, t.head_dim() as i64, t.ffn_dim() as i64);
    let (heads, kvh) = (t.num_heads as i64, t.num_kv_heads as i64);
    let n0 = t.num_layers - t.num_kv_reuse_layers;
    let mut out = Vec::new();
    let lin = |module: String, part, ours: String, rope_heads, i, o| AdaptableLinear {
        module,
        part,
        ours: vec![ours],
        vec: Vec::new(),
        rope_heads,
        in_features: i,
        out_features: o,
    };
    for layer in 0..t.num_layers {
        let p = if layer < n0 {
            t.segment0_prefix(layer)
        } else {
            format!("layers.segment_1.layer_{}", layer - n0)
        };
        let ours = format!("model.layers.{layer}");
        let a = format!("{p}.attention");
        if layer < n0 {
            let qkv = format!("{a}.qkv_transform");
            out.push(lin(
                qkv.clone(),
                Some(0),
                format!("{ours}.self_attn.q_proj"),
                Some(heads),
                h,
                h,
            ));
            out.push(lin(
                qkv.clone(),
                Some(1),
                format!("{ours}.self_attn.k_proj"),
                Some(kvh),
                h,
                kvh * hd,
            ));
            out.push(lin(
                qkv,
                Some(2),
                format!("{ours}.self_attn.v_proj"),
                None,
                h,
                kvh * hd,
            ));
        } else {
            out.push(lin(
                format!("{a}.q_transform"),
                None,
                format!("{ours}.self_attn.q_proj"),
                Some(heads),
                h,
                h,
            ));
        }
        out.push(lin(
            format!("{a}.output_transform"),
            None,
            format!("{ours}.self_attn.o_proj"),
            None,
            h,
            h,
        ));
        let ff = format!("{p}.feed_forward");
        out.push(lin(
            format!("{ff}.hidden_transform.linear_0"),
            None,
            format!("{ours}.mlp.gate_proj"),
            None,
            h,
            f,
        ));
        out.push(lin(
            format!("{ff}.hidden_transform.linear_1"),
            None,
            format!("{ours}.mlp.up_proj"),
            None,
            h,
            f,
        ));
        out.push(lin(
            format!("{ff}.output_transform"),
            None,
            format!("{ours}.mlp.down_proj"),
            None,
            f,
            h,
        ));
    }
    out
}

/// Whether a state-dict name is an adapter tensor (`….adapters.<id>.…`).
pub fn is_adapter_tensor(name: &str) -> bool {
    name.contains(".adapters.")
}

/// The adapters in a tamm state dict (a toolkit adapter checkpoint, or the adapter tensors of a
/// base checkpoint), by id in the file's order: our overlays, on `device` in `kind`.
/// Each id needs its spec (its α) in `t.adapters`; an id without one is an error naming the file.
pub fn read_adapters(
    pt: &PtFile,
    t: &TammConfig,
    device: Device,
    kind: Kind,
) -> Result<Vec<LoraAdapter>> {
    read_adapters_of(
        pt,
        &adaptable_linears(t),
        &t.adapters,
        "AFMTextV7",
        device,
        kind,
    )
}

/// [`read_adapters`] for any tamm model: the layers it can adapt (`linears`), the config's
/// adapter specs and the model's name for messages.
pub fn read_adapters_of(
    pt: &PtFile,
    linears: &[AdaptableLinear],
    specs: &[TammLoraSpec],
    model: &str,
    device: Device,
    kind: Kind,
) -> Result<Vec<LoraAdapter>> {
    let err = |m: String| TextError::checkpoint(&pt.path, m);
    let by_module: HashMap<(&str, Option<usize>), &AdaptableLinear> = linears
        .iter()
        .map(|l| ((l.module.as_str(), l.part), l))
        .collect();
    // Per adapter id, in the file's order: tamm's module and part → (its layer,
    // [a_transpose, b_transpose]).
    type Found<'l> = BTreeMap<(String, Option<usize>), (&'l AdaptableLinear, [Option<Tensor>; 2])>;
    let mut found: Vec<(String, Found)> = Vec::new();
    for (name, r) in &pt.tensors {
        let Some((module, rest)) = name.split_once(".adapters.") else {
            continue;
        };
        let unknown = || {
            err(format!(
                "unexpected adapter tensor '{name}' (no layer of this {model} has it)"
            ))
        };
        let (id, rest) = rest.split_once('.').ok_or_else(unknown)?;
        let (part, which) = match rest.split_once('.') {
            Some((lora, w)) => (
                Some(
                    lora.strip_prefix("lora_")
                        .and_then(|k| k.parse::<usize>().ok())
                        .ok_or_else(unknown)?,
                ),
                w,
            ),
            None => (None, rest),
        };
        let slot = match which {
            "a_transpose" => 0,
            "b_transpose" => 1,
            _ => return Err(unknown()),
        };
        let l = *by_module.get(&(module, part)).ok_or_else(unknown)?;
        let nv = l.vec.len();
        let mut want = l.vec.clone();
        if slot == 0 {
            want.extend([l.in_features, r.size.last().copied().unwrap_or(0)]);
        } else {
            want.extend([r.size.get(nv).copied().unwrap_or(0), l.out_features]);
        }
        if r.size != want || want.contains(&0) {
            let lead: String = l.vec.iter().map(|d| format!("{d}, ")).collect();
            return Err(err(format!(
                "adapter tensor '{name}' has shape {:?}; the layer needs {}",
                r.size,
                if slot == 0 {
                    format!("[{lead}{}, rank]", l.in_features)
                } else {
                    format!("[{lead}rank, {}]", l.out_features)
                }
            )));
        }
        let at = match found.iter().position(|(x, _)| x == id) {
            Some(at) => at,
            None => {
                found.push((id.to_string(), BTreeMap::new()));
                found.len() - 1
            }
        };
        let (_, pair) = found[at]
            .1
            .entry((l.module.clone(), l.part))
            .or_insert((l, [None, None]));
        pair[slot] = Some(pt.tensor(r)?);
    }
    let mut out = Vec::new();
    for (id, layers) in found {
        let spec = specs.iter().find(|s| s.id == id).ok_or_else(|| {
            err(format!(
                "adapter '{id}' has no LoRAModelAdapter spec in the base config (its α is unknown); the config has {}",
                if specs.is_empty() {
                    "none".to_string()
                } else {
                    specs.iter().map(|s| format!("'{}'", s.id)).collect::<Vec<_>>().join(", ")
                }
            ))
        })?;
        let mut modules = BTreeMap::new();
        for (_, (l, [a, b])) in layers {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(err(format!(
                    "adapter '{id}' on {}{}: a_transpose and b_transpose must both be there",
                    l.module,
                    l.part.map(|k| format!(".lora_{k}")).unwrap_or_default()
                )));
            };
            let nv = l.vec.len();
            let rank = a.size()[nv + 1];
            if b.size()[nv] != rank || rank as usize != spec.rank {
                return Err(err(format!(
                    "adapter '{id}' on {}: rank {} / {} but the spec says {}",
                    l.module,
                    rank,
                    b.size()[nv],
                    spec.rank
                )));
            }
            // One [in, r] / [r, out] pair per index of the vectorised dimensions.
            let a = a.f_reshape([-1, l.in_features, rank])?;
            let b = b.f_reshape([-1, rank, l.out_features])?;
            for (i, ours) in l.ours.iter().enumerate() {
                let i = i as i64;
                // Ours: A [r, in], B [out, r] (rows of q/k permuted like their weights).
                let ai = a.f_select(0, i)?.f_transpose(0, 1)?.f_contiguous()?;
                let mut bi = b.f_select(0, i)?.f_transpose(0, 1)?.f_contiguous()?;
                if let Some(heads) = l.rope_heads {
                    bi = pairs_to_halves(&bi, heads)?;
                }
                modules.insert(
                    ours.clone(),
                    (
                        ai.f_to_kind(kind)?.f_to_device(device)?,
                        bi.f_to_kind(kind)?.f_to_device(device)?,
                    ),
                );
            }
        }
        let mut adapter = LoraAdapter::from_modules(&id, spec.rank, spec.scale(), modules);
        adapter.source = pt.path.clone();
        out.push(adapter);
    }
    Ok(out)
}

/// Load a toolkit adapter checkpoint (`.pt` of adapter tensors) for the model `t`. With several
/// adapters in the file, `id` picks one (default: the config's active adapter, else the first).
pub fn load_adapter(
    path: &Path,
    t: &TammConfig,
    device: Device,
    kind: Kind,
) -> Result<LoraAdapter> {
    load_adapter_of(
        path,
        &adaptable_linears(t),
        &t.adapters,
        t.active_adapter.as_deref(),
        "AFMTextV7",
        device,
        kind,
    )
}

/// [`load_adapter`] for any tamm model (see [`read_adapters_of`] for `linears`, `specs` and
/// `model`); `active` is the base config's active adapter id. The specs of the
/// `adapter-config.json` beside the file (what `afm-vl train lora` writes for a base whose
/// config has none) count too; a spec of the base config wins over one of the same id there.
pub fn load_adapter_of(
    path: &Path,
    linears: &[AdaptableLinear],
    specs: &[TammLoraSpec],
    active: Option<&str>,
    model: &str,
    device: Device,
    kind: Kind,
) -> Result<LoraAdapter> {
    let mut specs = specs.to_vec();
    with_specs_beside(path, &mut specs)?;
    let pt = PtFile::open(path)?;
    if let Some((name, _)) = pt.tensors.iter().find(|(n, _)| !is_adapter_tensor(n)) {
        return Err(TextError::checkpoint(
            path,
            format!("'{name}' is not an adapter tensor (a toolkit adapter checkpoint holds only `….adapters.<id>.…`)"),
        ));
    }
    let mut all = read_adapters_of(&pt, linears, &specs, model, device, kind)?;
    if all.is_empty() {
        return Err(TextError::checkpoint(
            path,
            "no adapter tensors in the file",
        ));
    }
    let pick = active
        .and_then(|id| all.iter().position(|a| a.name == id))
        .unwrap_or(0);
    Ok(all.swap_remove(pick))
}

/// Add to `specs` the `LoRAModelAdapter` specs of the `adapter-config.json` beside the adapter
/// checkpoint `file` that `specs` has no id of.
fn with_specs_beside(file: &Path, specs: &mut Vec<TammLoraSpec>) -> Result<()> {
    let Some(path) = file.parent().map(|d| d.join(ADAPTER_SPEC_FILE)) else {
        return Ok(());
    };
    if !path.is_file() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| TextError::io(&path, e))?;
    let v: Json = serde_json::from_str(&text)
        .map_err(|e| TextError::checkpoint(&path, format!("bad JSON: {e}")))?;
    let (beside, _) =
        parse_adapters(&v, &Json::Null).map_err(|m| TextError::checkpoint(&path, m))?;
    for s in beside {
        if !specs.iter().any(|x| x.id == s.id) {
            specs.push(s);
        }
    }
    Ok(())
}

/// The toolkit adapter checkpoint `path` names, if it names one: a `.pt`/`.pth` file, or a
/// folder holding `adapter.pt` and no PEFT `adapter_config.json`. `None` means a PEFT adapter.
pub fn toolkit_adapter_file(path: &Path) -> Option<std::path::PathBuf> {
    if path.is_dir() {
        let f = path.join(ADAPTER_FILE);
        (!path.join("adapter_config.json").is_file() && f.is_file()).then_some(f)
    } else {
        path.extension()
            .is_some_and(|e| e == "pt" || e == "pth")
            .then(|| path.to_path_buf())
    }
}

/// `[rows = heads · d, cols]` back from our RoPE halves to tamm's adjacent pairs (the inverse of
/// [`pairs_to_halves`]).
pub fn halves_to_pairs(w: &Tensor, heads: i64) -> Result<Tensor> {
    let size = w.size();
    let (rows, rest) = (size[0], &size[1..]);
    let d = rows / heads;
    let mut shape = vec![heads, 2, d / 2];
    shape.extend_from_slice(rest);
    Ok(w.f_reshape(shape.as_slice())?
        .f_transpose(1, 2)?
        .f_contiguous()?
        .f_reshape(size.as_slice())?)
}

/// Write `adapter` (ours, on a tamm model whose adaptable layers are `linears`) as the toolkit's
/// adapter checkpoint
/// `dir/adapter.pt` (adapter id `spec.id`, tamm's names and layout, fp32) and `spec` as tamm
/// JSON beside it. The update is kept exactly: when our scale differs from the spec's α/r, B
/// carries the ratio. Every module of `adapter` must be one tamm's spec adapts. `linears`:
/// [`adaptable_linears`], or `TammPtMoe::adaptable_linears`; a vectorised layer's per-track (and
/// per-expert) pairs are stacked into tamm's `[T, (E,) in, r]` / `[T, (E,) r, out]` tensors, so all of them must be
/// adapted or none.
pub fn save_adapter(
    dir: &Path,
    adapter: &LoraAdapter,
    linears: &[AdaptableLinear],
    spec: &TammLoraSpec,
) -> Result<()> {
    let file = dir.join(ADAPTER_FILE);
    let err = |m: String| TextError::checkpoint(&file, m);
    if adapter.rank != spec.rank {
        return Err(err(format!(
            "the adapter has rank {}, the tamm spec '{}' rank {}",
            adapter.rank, spec.rank, spec.id
        )));
    }
    let ratio = adapter.scale / spec.scale();
    let mut tensors = Vec::new();
    let mut used = 0;
    for l in linears {
        let pairs: Vec<Option<(&Tensor, &Tensor)>> =
            l.ours.iter().map(|o| adapter.module(o)).collect();
        let n = pairs.iter().filter(|p| p.is_some()).count();
        if n == 0 {
            continue;
        }
        if n != pairs.len() {
            return Err(err(format!(
                "{} is adapted on {n} of its {} tracks/experts; tamm adapts all of them or none",
                l.module,
                pairs.len()
            )));
        }
        let ours = &l.ours[0];
        if !spec.adapts(ours) {
            return Err(err(format!(
                "{ours} is adapted, but the tamm spec '{}' does not adapt {}",
                spec.id,
                if ours.contains(".experts.") && !spec.moe {
                    "the experts (adapt_moe is false)"
                } else {
                    ours.rsplit('.').next().unwrap_or("")
                }
            )));
        }
        used += n;
        let (mut a_all, mut b_all) = (Vec::new(), Vec::new());
        for (a, b) in pairs.into_iter().flatten() {
            a_all.push(
                a.f_detach()?
                    .f_to_kind(Kind::Float)?
                    .f_transpose(0, 1)?
                    .f_contiguous()?,
            );
            let mut b = b.f_detach()?.f_to_kind(Kind::Float)?;
            if let Some(heads) = l.rope_heads {
                b = halves_to_pairs(&b, heads)?;
            }
            if ratio != 1.0 {
                b = b.f_mul_scalar(ratio)?;
            }
            b_all.push(b.f_transpose(0, 1)?.f_contiguous()?);
        }
        // A plain linear: [in, r] / [r, out]; a vectorised one: [vec..., in, r] / [vec..., r, out].
        let stack = |v: Vec<Tensor>| -> Result<Tensor> {
            if l.vec.is_empty() {
                return Ok(v.into_iter().next().unwrap_or_default());
            }
            let s = Tensor::f_stack(&v, 0)?;
            let mut shape = l.vec.clone();
            shape.extend(&s.size()[1..]);
            Ok(s.f_reshape(shape.as_slice())?.f_contiguous()?)
        };
        tensors.push((l.tensor_name(&spec.id, 'a'), stack(a_all)?));
        tensors.push((l.tensor_name(&spec.id, 'b'), stack(b_all)?));
    }
    if used != adapter.modules().count() {
        let known: std::collections::HashSet<&String> =
            linears.iter().flat_map(|l| &l.ours).collect();
        let odd = adapter
            .modules()
            .find(|m| !known.contains(*m))
            .cloned()
            .unwrap_or_default();
        return Err(err(format!("{odd} is not a linear layer tamm can adapt")));
    }
    std::fs::create_dir_all(dir).map_err(|e| TextError::io(dir, e))?;
    crate::pt_write::write_state_dict(&file, &tensors)?;
    let spec_json = serde_json::json!({ spec.id.clone(): spec.to_json() });
    let text = serde_json::to_string_pretty(&spec_json).unwrap_or_default();
    crate::atomic_write::write_atomic(&dir.join(ADAPTER_SPEC_FILE), text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_to_pairs_undoes_pairs_to_halves() {
        let w = Tensor::arange(48, (Kind::Float, Device::Cpu)).reshape([12, 4]);
        for heads in [1, 2, 3] {
            let there = pairs_to_halves(&w, heads).unwrap();
            assert!(!there.equal(&w));
            assert!(halves_to_pairs(&there, heads).unwrap().equal(&w));
        }
    }

    #[test]
    fn spec_fields() {
        let v = serde_json::json!({"__tamm_type__": "adapters:LoRAModelAdapter", "rank": 32, "alpha": 16,
            "adapt_attention_keys": false, "dropout_p": 0.1});
        let s = TammLoraSpec::from_json("base", &v).unwrap();
        assert_eq!((s.rank, s.scale(), s.keys), (32, 0.5, false));
        assert!(!s.targets().contains(&"k_proj".to_string()));
        assert_eq!(TammLoraSpec::from_json("base", &s.to_json()).unwrap(), s);
        let v = serde_json::json!({"__tamm_type__": "adapters:LoRAModelAdapter", "rank": 4});
        assert_eq!(TammLoraSpec::from_json("x", &v).unwrap().scale(), 1.0);
        let bad = serde_json::json!({"__tamm_type__": "adapters:LoRAModelAdapter", "rnak": 4});
        assert!(TammLoraSpec::from_json("x", &bad)
            .unwrap_err()
            .contains("rnak"));
        let bad = serde_json::json!({"__tamm_type__": "adapters:BottleneckModelAdapter"});
        assert!(TammLoraSpec::from_json("x", &bad)
            .unwrap_err()
            .contains("Bottleneck"));
    }
}
