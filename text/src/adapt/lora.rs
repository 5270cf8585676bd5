//! LoRA adapters: loaded from safetensors (PEFT layout: `adapter_config.json` +
//! `adapter_model.safetensors`), cached, activated on a decoder (an overlay on each targeted
//! [`crate::linear::Linear`]; no base weight is copied), deactivated, or merged into the base.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::checkpoint::read_safetensors_into;
use crate::decoder::Decoder;
use crate::error::{Result, TextError};
use crate::linear::{Linear, LoraOverlay};
use crate::ptmoe::PtMoe;
use crate::weights::WeightMap;

/// A model whose linear layers adapters can overlay: the on-device decoder and the PT-MoE
/// server model. Names are HF module paths (`model.layers.0.self_attn.q_proj`,
/// `model.blocks.0.tracks.1.layers.2.mlp.experts.3.up_proj`).
pub trait LoraTarget {
    fn lora_linears(&mut self) -> Vec<(String, &mut Linear)>;
}

impl LoraTarget for Decoder {
    fn lora_linears(&mut self) -> Vec<(String, &mut Linear)> {
        self.linears_mut()
    }
}

impl LoraTarget for PtMoe {
    fn lora_linears(&mut self) -> Vec<(String, &mut Linear)> {
        self.linears_mut()
    }
}

/// The linear layers LoRA targets by default (attention and FFN; segment-1 layers have only
/// q and o).
pub const DEFAULT_TARGETS: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

pub struct LoraAdapter {
    pub name: String,
    pub rank: usize,
    /// The overlay's multiplier (α/r for PEFT's default).
    pub scale: f64,
    pub source: PathBuf,
    /// HF module name (`model.layers.0.self_attn.q_proj`) → (A [r, in], B [out, r]).
    modules: BTreeMap<String, (Tensor, Tensor)>,
}

impl LoraAdapter {
    pub fn modules(&self) -> impl Iterator<Item = &String> {
        self.modules.keys()
    }
    /// (A [r, in], B [out, r]) of one module.
    pub fn module(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        self.modules.get(name).map(|(a, b)| (a, b))
    }
    pub fn num_params(&self) -> usize {
        self.modules
            .values()
            .map(|(a, b)| a.numel() + b.numel())
            .sum()
    }
    /// Whether every B is zero (a freshly initialised adapter: it changes nothing).
    pub fn is_zero(&self) -> bool {
        self.modules
            .values()
            .all(|(_, b)| b.abs().max().double_value(&[]) == 0.0)
    }
    pub fn bytes(&self) -> usize {
        self.modules
            .values()
            .map(|(a, b)| (a.numel() + b.numel()) * a.kind().elt_size_in_bytes())
            .sum()
    }

    /// Load a PEFT-style adapter directory (or a bare `.safetensors` with `rank`/`alpha`
    /// given in its metadata-free form via `adapter_config.json` beside it).
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let (dir, file) = if path.is_dir() {
            (path.to_path_buf(), path.join("adapter_model.safetensors"))
        } else {
            (
                path.parent().map(Path::to_path_buf).unwrap_or_default(),
                path.to_path_buf(),
            )
        };
        let cfg_path = dir.join("adapter_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| TextError::checkpoint(&cfg_path, format!("bad JSON: {e}")))?,
            Err(e) => return Err(TextError::io(&cfg_path, e)),
        };
        let rank = cfg.get("r").and_then(|v| v.as_u64()).ok_or_else(|| {
            TextError::checkpoint(&cfg_path, "missing integer \"r\" (the LoRA rank)")
        })? as usize;
        let alpha = cfg
            .get("lora_alpha")
            .and_then(|v| v.as_f64())
            .unwrap_or(rank as f64);
        let rslora = cfg
            .get("use_rslora")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let mut map = WeightMap::new(device, kind);
        read_safetensors_into(&file, &mut map)?;
        let mut a_of = BTreeMap::new();
        let mut b_of = BTreeMap::new();
        let names: Vec<String> = map.names().cloned().collect();
        for name in names {
            let stripped = name
                .strip_prefix("base_model.model.")
                .unwrap_or(&name)
                .replace(".default", "");
            let (module, which) = if let Some(m) = stripped.strip_suffix(".lora_A.weight") {
                (m.to_string(), 'a')
            } else if let Some(m) = stripped.strip_suffix(".lora_B.weight") {
                (m.to_string(), 'b')
            } else {
                return Err(TextError::checkpoint(
                    &file,
                    format!("unexpected tensor '{name}' in a LoRA adapter"),
                ));
            };
            let t = map.get_any(&name)?;
            if which == 'a' {
                a_of.insert(module, t);
            } else {
                b_of.insert(module, t);
            }
        }
        let mut modules = BTreeMap::new();
        for (m, a) in a_of {
            let b = b_of.remove(&m).ok_or_else(|| {
                TextError::checkpoint(&file, format!("'{m}' has lora_A but no lora_B"))
            })?;
            if a.size()[0] as usize != rank || b.size()[1] as usize != rank {
                return Err(TextError::checkpoint(
                    &file,
                    format!(
                        "'{m}': A {:?} / B {:?} do not have rank {rank}",
                        a.size(),
                        b.size()
                    ),
                ));
            }
            modules.insert(m, (a, b));
        }
        if let Some(m) = b_of.keys().next() {
            return Err(TextError::checkpoint(
                &file,
                format!("'{m}' has lora_B but no lora_A"),
            ));
        }
        // PEFT: s = α/r, or α/√r with rank-stabilised LoRA.
        let scale = if rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        };
        Ok(Self {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default(),
            rank,
            scale,
            source: file,
            modules,
        })
    }

    /// An adapter over given (A, B) tensors, shared, not copied (e.g. the ones being trained).
    pub fn from_modules(
        name: &str,
        rank: usize,
        scale: f64,
        modules: impl IntoIterator<Item = (String, (Tensor, Tensor))>,
    ) -> Self {
        Self {
            name: name.to_string(),
            rank,
            scale,
            source: PathBuf::from(format!("<{name}>")),
            modules: modules.into_iter().collect(),
        }
    }

    /// Both adapters at once, as one overlay per module: A stacked along the rank, B scaled by
    /// each adapter's multiplier, so `B'·A' = s₁·B₁·A₁ + s₂·B₂·A₂` exactly (scale 1, rank
    /// r₁ + r₂; a module only one of them targets keeps just its part). The tensors are new
    /// (fp32 when the two differ in dtype); neither adapter changes.
    pub fn stack(&self, other: &LoraAdapter) -> Result<LoraAdapter> {
        let mut kinds = self
            .modules
            .values()
            .chain(other.modules.values())
            .map(|(a, _)| a.kind());
        let first = kinds.next().unwrap_or(Kind::Float);
        let kind = if kinds.all(|k| k == first) {
            first
        } else {
            Kind::Float
        };
        let part = |(a, b): &(Tensor, Tensor), s: f64| -> Result<(Tensor, Tensor)> {
            Ok((
                a.f_detach()?.f_to_kind(kind)?,
                b.f_detach()?.f_to_kind(kind)?.f_mul_scalar(s)?,
            ))
        };
        let mut modules = BTreeMap::new();
        let names: std::collections::BTreeSet<&String> =
            self.modules.keys().chain(other.modules.keys()).collect();
        for name in names {
            let parts = [
                self.modules.get(name).map(|m| part(m, self.scale)),
                other.modules.get(name).map(|m| part(m, other.scale)),
            ];
            let parts: Vec<(Tensor, Tensor)> =
                parts.into_iter().flatten().collect::<Result<_>>()?;
            let a: Vec<&Tensor> = parts.iter().map(|p| &p.0).collect();
            let b: Vec<&Tensor> = parts.iter().map(|p| &p.1).collect();
            // A: [r₁ + r₂, in], B: [out, r₁ + r₂]
            modules.insert(name.clone(), (Tensor::f_cat(&a, 0)?, Tensor::f_cat(&b, 1)?));
        }
        Ok(LoraAdapter {
            name: format!("{}+{}", self.name, other.name),
            rank: self.rank + other.rank,
            scale: 1.0,
            source: other.source.clone(),
            modules,
        })
    }

    /// A random adapter over `targets` of `decoder` (tests, benchmarks), seeded.
    pub fn random<M: LoraTarget + ?Sized>(
        decoder: &mut M,
        rank: usize,
        alpha: f64,
        targets: &[&str],
        seed: i64,
    ) -> Result<Self> {
        let _rng = crate::weights::seed_global_rng(seed);
        let mut modules = BTreeMap::new();
        for (name, lin) in decoder.lora_linears() {
            if !targets.iter().any(|t| name.ends_with(t)) {
                continue;
            }
            let opts = (lin.weight_kind(), lin.device());
            let a = Tensor::f_randn([rank as i64, lin.in_features()], opts)?.f_mul_scalar(0.05)?;
            let b = Tensor::f_randn([lin.out_features(), rank as i64], opts)?.f_mul_scalar(0.05)?;
            modules.insert(name, (a, b));
        }
        Ok(Self {
            name: format!("random-r{rank}-seed{seed}"),
            rank,
            scale: alpha / rank as f64,
            source: PathBuf::from("<random>"),
            modules,
        })
    }

    /// Every linear of `decoder` by name, after checking that each module this adapter
    /// targets is among them.
    fn linears_of<'m, M: LoraTarget + ?Sized>(
        &self,
        decoder: &'m mut M,
    ) -> Result<BTreeMap<String, &'m mut Linear>> {
        let linears: BTreeMap<String, _> = decoder.lora_linears().into_iter().collect();
        if let Some(m) = self.modules.keys().find(|m| !linears.contains_key(*m)) {
            return Err(TextError::checkpoint(
                &self.source,
                format!("adapter targets '{m}', which this model does not have"),
            ));
        }
        Ok(linears)
    }

    /// The overlay of module `name` (sharing storage), if this adapter targets it.
    fn overlay(&self, name: &str) -> Option<LoraOverlay> {
        self.modules.get(name).map(|(a, b)| LoraOverlay {
            a: a.shallow_clone(),
            b: b.shallow_clone(),
            scale: self.scale,
        })
    }

    /// Put this adapter's overlays on `decoder` (replacing any active adapter).
    pub fn activate<M: LoraTarget + ?Sized>(&self, decoder: &mut M) -> Result<()> {
        for (name, lin) in self.linears_of(decoder)? {
            lin.set_lora(self.overlay(&name))
                .map_err(|e| TextError::checkpoint(&self.source, format!("'{name}': {e}")))?;
        }
        Ok(())
    }
}

/// Take every overlay off `decoder`.
pub fn deactivate<M: LoraTarget + ?Sized>(decoder: &mut M) -> Result<()> {
    for (_, lin) in decoder.lora_linears() {
        lin.set_lora(None)?;
    }
    Ok(())
}

/// Fold the active overlays into the base weights (the adapter is then permanent).
pub fn merge_active<M: LoraTarget + ?Sized>(decoder: &mut M) -> Result<()> {
    for (_, lin) in decoder.lora_linears() {
        lin.merge_lora()?;
    }
    Ok(())
}

/// Take `adapter`'s update back out of base weights it was merged into (by
/// [`merge_active`]): `W −= s·B·A` on each module it targets. Exact up to rounding in the
/// weights' dtype (fp32: ~1e-7 relative; bf16 loses more).
pub fn unmerge<M: LoraTarget + ?Sized>(decoder: &mut M, adapter: &LoraAdapter) -> Result<()> {
    for (name, lin) in adapter.linears_of(decoder)? {
        if let Some(overlay) = adapter.overlay(&name) {
            lin.unmerge_lora(&overlay)
                .map_err(|e| TextError::checkpoint(&adapter.source, format!("'{name}': {e}")))?;
        }
    }
    Ok(())
}

/// Loaded adapters by name, at most one active: load once, swap in microseconds, unload to
/// free the memory.
#[derive(Default)]
pub struct AdapterCache {
    adapters: BTreeMap<String, LoraAdapter>,
    active: Option<String>,
}

impl AdapterCache {
    pub fn insert(&mut self, adapter: LoraAdapter) -> String {
        let name = adapter.name.clone();
        self.adapters.insert(name.clone(), adapter);
        name
    }
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.adapters.keys()
    }
    pub fn active(&self) -> Option<&str> {
        self.active.as_deref()
    }
    pub fn bytes(&self) -> usize {
        self.adapters.values().map(LoraAdapter::bytes).sum()
    }
    /// Activate a cached adapter (or none) on `decoder`.
    pub fn activate<M: LoraTarget + ?Sized>(
        &mut self,
        decoder: &mut M,
        name: Option<&str>,
    ) -> Result<()> {
        match name {
            None => deactivate(decoder)?,
            Some(n) => self
                .adapters
                .get(n)
                .ok_or_else(|| TextError::InvalidArgument(format!("no cached adapter '{n}'")))?
                .activate(decoder)?,
        }
        self.active = name.map(str::to_string);
        Ok(())
    }
    /// Drop a cached adapter (deactivating it first when active) and hand the freed memory
    /// back to the operating system.
    pub fn unload<M: LoraTarget + ?Sized>(&mut self, decoder: &mut M, name: &str) -> Result<()> {
        if self.active.as_deref() == Some(name) {
            self.activate(decoder, None)?;
        }
        self.adapters
            .remove(name)
            .ok_or_else(|| TextError::InvalidArgument(format!("no cached adapter '{name}'")))?;
        release_freed_memory();
        Ok(())
    }
}

/// Return freed heap pages to the OS. An adapter is many small tensors that the allocator
/// keeps in its arenas after they are dropped; glibc's `malloc_trim` releases them.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory at the top of/inside glibc's heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}
