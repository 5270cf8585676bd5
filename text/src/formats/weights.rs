//! A name → tensor map that modules are built from (`new(cfg, &weights)` per block).
//!
//! Names are HF Llama names (`model.layers.3.self_attn.q_proj.weight`), which are also ours:
//! Llama, SmolLM2 and Qwen3 checkpoints load without renaming; GGUF is renamed on import.
//! Every lookup checks the shape and names the file the tensor came from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::error::{Result, TextError};

pub struct WeightMap {
    tensors: HashMap<String, (Tensor, usize)>,
    /// Files the tensors came from (index into this list is stored per tensor).
    files: Vec<PathBuf>,
    device: Device,
    kind: Kind,
}

impl WeightMap {
    pub fn new(device: Device, kind: Kind) -> Self {
        Self {
            tensors: HashMap::new(),
            files: Vec::new(),
            device,
            kind,
        }
    }

    pub fn device(&self) -> Device {
        self.device
    }
    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn len(&self) -> usize {
        self.tensors.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// The same tensors (shared storage) handed out on `device` instead: a PT-MoE track whose
    /// weights live on another device loads through this.
    pub fn on_device(&self, device: Device) -> Self {
        Self {
            tensors: self
                .tensors
                .iter()
                .map(|(k, (t, f))| (k.clone(), (t.shallow_clone(), *f)))
                .collect(),
            files: self.files.clone(),
            device,
            kind: self.kind,
        }
    }

    /// Register a source file; returns its index for [`WeightMap::insert`].
    pub fn add_file(&mut self, path: &Path) -> usize {
        self.files.push(path.to_path_buf());
        self.files.len() - 1
    }

    /// Insert a tensor (kept as given; converted on [`WeightMap::get`]).
    pub fn insert(&mut self, name: impl Into<String>, t: Tensor, file: usize) {
        self.tensors.insert(name.into(), (t, file));
    }

    /// Take `name` out of the map (with the index of its file).
    pub fn remove(&mut self, name: &str) -> Option<(Tensor, usize)> {
        self.tensors.remove(name)
    }

    fn origin(&self, file: Option<usize>) -> PathBuf {
        file.and_then(|i| self.files.get(i).cloned())
            .or_else(|| self.files.first().cloned())
            .unwrap_or_else(|| PathBuf::from("<weights>"))
    }

    /// The tensor `name` as stored (its file's dtype, on the CPU), if present.
    pub fn raw(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name).map(|(t, _)| t)
    }

    /// The file `name` came from (the first file when unknown), for error messages.
    pub fn file_of(&self, name: &str) -> PathBuf {
        self.origin(self.tensors.get(name).map(|(_, f)| *f))
    }

    /// The tensor `name` whatever its shape, on the map's device in the map's dtype.
    pub fn get_any(&self, name: &str) -> Result<Tensor> {
        let (t, _) = self.tensors.get(name).ok_or_else(|| {
            TextError::checkpoint(self.origin(None), format!("missing tensor '{name}'"))
        })?;
        Ok(t.f_to_device(self.device)?.f_to_kind(self.kind)?)
    }

    /// The tensor `name` with exactly `shape`, on the map's device in the map's dtype.
    pub fn get(&self, name: &str, shape: &[i64]) -> Result<Tensor> {
        self.get_kind(name, shape, self.kind)
    }

    /// Like [`WeightMap::get`] with an explicit dtype (norm weights stay fp32, say).
    pub fn get_kind(&self, name: &str, shape: &[i64], kind: Kind) -> Result<Tensor> {
        let (t, file) = self.tensors.get(name).ok_or_else(|| {
            TextError::checkpoint(self.origin(None), format!("missing tensor '{name}'"))
        })?;
        if t.size() != shape {
            return Err(TextError::checkpoint(
                self.origin(Some(*file)),
                format!(
                    "tensor '{name}' has shape {:?}, expected {:?}",
                    t.size(),
                    shape
                ),
            ));
        }
        Ok(t.f_to_device(self.device)?.f_to_kind(kind)?)
    }

    /// Random weights for every name in `shapes` (N(0, std²), norms at 1), seeded.
    pub fn random(
        shapes: &[(String, Vec<i64>)],
        seed: i64,
        std: f64,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let _rng = seed_global_rng(seed);
        let mut map = Self::new(device, kind);
        let file = map.add_file(Path::new(&format!("<random seed {seed}>")));
        for (name, shape) in shapes {
            let t = if name.contains("norm") {
                // Norm gains near 1 so activations stay well scaled.
                Tensor::f_ones(shape.as_slice(), (Kind::Float, Device::Cpu))?.f_add(
                    &(Tensor::f_randn(shape.as_slice(), (Kind::Float, Device::Cpu))? * 0.1),
                )?
            } else {
                Tensor::f_randn(shape.as_slice(), (Kind::Float, Device::Cpu))? * std
            };
            map.insert(name.clone(), t, file);
        }
        Ok(map)
    }
}

/// Serialises use of libtorch's process-global generator: holding the guard, the draws that
/// follow `manual_seed(seed)` are not interleaved with another thread's seeded draws, so seeded
/// initialisation repeats even when tests run concurrently.
pub fn seed_global_rng(seed: i64) -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed);
    guard
}
