//! `afm_vl._native.Model`: a loaded text model (and, once the vision-language model lands, a
//! VLM) behind a mutex, so Python threads can share it while the GIL is released.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use afm_text::generation::{generate_lm, CausalLm, Generation};
use afm_text::lora::{AdapterCache, LoraAdapter};
use afm_text::{
    DType, Decoder, DeviceSpec, GenerateOptions, KvCache, Logits, SamplingConfig, StopReason,
    TextError, TextModel,
};
use pyo3::exceptions::{PyNotImplementedError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tch::{Device, Kind, Tensor};

use crate::bridge::{to_py, torch_err, PyTensor};
use crate::errors;

pub fn parse_device(device: &str) -> PyResult<Device> {
    let spec: DeviceSpec = device.parse().map_err(|e| errors::text(e, None))?;
    spec.resolve().map_err(|e| errors::text(e, None))
}

pub fn parse_dtype(dtype: Option<&str>, device: Device) -> PyResult<DType> {
    DType::parse(dtype.unwrap_or("auto"), device).map_err(|e| errors::text(e, None))
}

pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

struct Inner {
    text: TextModel,
    adapters: AdapterCache,
}

/// A loaded model. Build it with `afm_vl.load`.
#[pyclass(module = "afm_vl._native", name = "Model", frozen)]
pub struct Model {
    inner: Mutex<Inner>,
    device: Device,
    dtype: DType,
    source: PathBuf,
    has_tokenizer: bool,
}

impl Model {
    fn lock(&self) -> PyResult<MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| PyRuntimeError::new_err("the model is unusable after a panic"))
    }

    /// Run `f` on the model with the GIL released (a generation holding the lock may need the
    /// GIL for its streaming callback: never wait for the lock while holding the GIL).
    fn with_inner<R: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Inner) -> PyResult<R> + Send,
    ) -> PyResult<R> {
        py.allow_threads(|| f(&mut *self.lock()?))
    }

    fn wrap(text: TextModel, device: Device) -> Self {
        Model {
            device,
            dtype: text.dtype,
            source: text.source.clone(),
            has_tokenizer: text.tokenizer.is_some(),
            inner: Mutex::new(Inner {
                text,
                adapters: AdapterCache::default(),
            }),
        }
    }
}

/// The on-device decoder, checking for Ctrl-C (and for an error raised by a Python streaming
/// callback) before every forward pass, so a long generation stops between two tokens.
struct Interruptible<'a> {
    decoder: &'a Decoder,
    error: RefCell<Option<PyErr>>,
}

impl Interruptible<'_> {
    fn fail(&self, e: PyErr) {
        let mut slot = self.error.borrow_mut();
        if slot.is_none() {
            *slot = Some(e);
        }
    }
}

impl CausalLm for Interruptible<'_> {
    type Cache = KvCache;
    fn forward_lm(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut KvCache,
        logits: Logits,
    ) -> afm_text::Result<Tensor> {
        if self.error.borrow().is_none() {
            if let Err(e) = Python::with_gil(|py| py.check_signals()) {
                self.fail(e);
            }
        }
        if self.error.borrow().is_some() {
            return Err(TextError::InvalidArgument("generation interrupted".into()));
        }
        self.decoder.forward(ids, mask, cache, logits)
    }
    fn new_lm_cache(&self, batch: i64) -> KvCache {
        self.decoder.new_cache(batch)
    }
    fn cache_len(cache: &KvCache) -> i64 {
        cache.len()
    }
    fn eos_ids(&self) -> Vec<u32> {
        self.decoder.cfg.eos_ids()
    }
    fn context_len(&self) -> usize {
        self.decoder.cfg.max_position_embeddings
    }
}

fn stop_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos => "eos",
        StopReason::StopString => "stop_string",
        StopReason::MaxTokens => "max_tokens",
        StopReason::ContextFull => "context_full",
    }
}

fn generation_dict<'py>(py: Python<'py>, g: &Generation) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("text", &g.text)?;
    d.set_item("tokens", &g.tokens)?;
    d.set_item("stop_reason", stop_reason(g.stop_reason))?;
    d.set_item("prompt_tokens", g.stats.prompt_tokens)?;
    d.set_item("generated_tokens", g.stats.generated_tokens)?;
    d.set_item("prefill_s", g.stats.prefill_secs)?;
    d.set_item("decode_s", g.stats.decode_secs)?;
    d.set_item("prefill_tok_s", g.stats.prefill_tok_s())?;
    d.set_item("decode_tok_s", g.stats.decode_tok_s())?;
    Ok(d)
}

/// Sampling options with the CLI's checks (`afm-vl generate --temperature ...`).
#[allow(clippy::too_many_arguments)]
fn options(
    max_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repetition_penalty: f32,
    seed: u64,
    stop: Vec<String>,
    ignore_eos: bool,
) -> PyResult<GenerateOptions> {
    if !(temperature >= 0.0 && temperature.is_finite()) {
        return Err(PyValueError::new_err(format!(
            "temperature must be ≥ 0, got {temperature}"
        )));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(PyValueError::new_err(format!(
            "top_p must be in (0, 1], got {top_p}"
        )));
    }
    if !(0.0..=1.0).contains(&min_p) {
        return Err(PyValueError::new_err(format!(
            "min_p must be in [0, 1], got {min_p}"
        )));
    }
    if repetition_penalty.is_nan() || repetition_penalty <= 0.0 {
        return Err(PyValueError::new_err(format!(
            "repetition_penalty must be > 0, got {repetition_penalty}"
        )));
    }
    Ok(GenerateOptions {
        max_new_tokens: max_tokens,
        sampling: SamplingConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            seed,
        },
        stop_strings: stop,
        stop_on_eos: !ignore_eos,
    })
}

#[pymethods]
impl Model {
    /// Load a checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[staticmethod]
    #[pyo3(signature = (path, device = "auto", dtype = None))]
    fn load(py: Python<'_>, path: PathBuf, device: &str, dtype: Option<&str>) -> PyResult<Self> {
        let device = parse_device(device)?;
        let dtype = parse_dtype(dtype, device)?;
        let text = py
            .allow_threads(|| TextModel::load(&path, device, dtype))
            .map_err(|e| errors::text(e, Some(&format!("loading model {}", path.display()))))?;
        Ok(Model::wrap(text, device))
    }

    /// A preset with seeded random weights and no tokenizer.
    #[staticmethod]
    #[pyo3(signature = (name, seed = 0, device = "auto", dtype = None))]
    fn from_preset(
        py: Python<'_>,
        name: &str,
        seed: i64,
        device: &str,
        dtype: Option<&str>,
    ) -> PyResult<Self> {
        let device = parse_device(device)?;
        let dtype = parse_dtype(dtype, device)?;
        let text = py
            .allow_threads(|| TextModel::from_preset(name, seed, device, dtype))
            .map_err(|e| errors::text(e, None))?;
        Ok(Model::wrap(text, device))
    }

    /// Where the model came from: its directory, or `preset:NAME`.
    #[getter]
    fn source(&self) -> PathBuf {
        self.source.clone()
    }

    #[getter]
    fn device(&self) -> String {
        device_name(self.device)
    }

    /// `fp32`, `bf16` or `fp16`.
    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.name()
    }

    #[getter]
    fn has_tokenizer(&self) -> bool {
        self.has_tokenizer
    }

    /// `text` (a text decoder) — `vlm` once the vision-language model lands.
    #[getter]
    fn kind(&self) -> &'static str {
        "text"
    }

    /// The decoder configuration as JSON text (HF field names).
    fn config_json(&self, py: Python<'_>) -> PyResult<String> {
        self.with_inner(py, |inner| {
            serde_json::to_string(inner.text.config())
                .map_err(|e| PyRuntimeError::new_err(e.to_string()))
        })
    }

    /// Generate from a prompt; returns a dict (text, tokens, stop_reason, stats).
    #[pyo3(signature = (prompt, raw = false, max_tokens = 256, temperature = 0.0, top_k = 0,
        top_p = 1.0, min_p = 0.0, repetition_penalty = 1.0, seed = 0, stop = Vec::new(),
        ignore_eos = false, stream = None))]
    #[allow(clippy::too_many_arguments)]
    fn generate<'py>(
        &self,
        py: Python<'py>,
        prompt: &str,
        raw: bool,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repetition_penalty: f32,
        seed: u64,
        stop: Vec<String>,
        ignore_eos: bool,
        stream: Option<PyObject>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let opts = options(
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            seed,
            stop,
            ignore_eos,
        )?;
        let result = py.allow_threads(|| -> PyResult<Generation> {
            let inner = self.lock()?;
            let model = &inner.text;
            let ids = model
                .prompt_ids(prompt, raw)
                .map_err(|e| errors::text(e, None))?;
            let lm = Interruptible {
                decoder: &model.decoder,
                error: RefCell::new(None),
            };
            let mut on_text = |piece: &str| {
                if let Some(cb) = &stream {
                    if lm.error.borrow().is_some() {
                        return;
                    }
                    if let Err(e) = Python::with_gil(|py| cb.call1(py, (piece,)).map(drop)) {
                        lm.fail(e);
                    }
                }
            };
            let out = generate_lm(&lm, model.tokenizer.as_ref(), &ids, &opts, &mut on_text);
            if let Some(e) = lm.error.take() {
                return Err(e);
            }
            out.map_err(|e| errors::text(e, None))
        })?;
        generation_dict(py, &result)
    }

    /// fp32 logits `[seq, vocab]` of every position of `ids` (a 1-D int64 tensor).
    fn logits(&self, py: Python<'_>, ids: PyTensor) -> PyResult<PyObject> {
        let ids = ids.0;
        if ids.dim() != 1 {
            return Err(PyValueError::new_err(format!(
                "token ids must be 1-D, got shape {:?}",
                ids.size()
            )));
        }
        if ids.numel() == 0 {
            return Err(PyValueError::new_err("token ids are empty"));
        }
        let out = py.allow_threads(move || -> PyResult<Tensor> {
            let inner = self.lock()?;
            let decoder = &inner.text.decoder;
            let _guard = tch::no_grad_guard();
            let vocab = decoder.cfg.vocab_size as i64;
            let ctx = decoder.cfg.max_position_embeddings as i64;
            let n = ids.size()[0];
            if n > ctx {
                return Err(PyValueError::new_err(format!(
                    "{n} tokens exceed the context of {ctx} tokens"
                )));
            }
            let ids = ids.f_to_kind(Kind::Int64).map_err(torch_err)?;
            let (lo, hi) = (
                ids.f_min().map_err(torch_err)?.int64_value(&[]),
                ids.f_max().map_err(torch_err)?.int64_value(&[]),
            );
            if lo < 0 || hi >= vocab {
                return Err(PyValueError::new_err(format!(
                    "token ids must be in [0, {vocab}), got values in [{lo}, {hi}]"
                )));
            }
            let ids = ids.f_view([1, n]).map_err(torch_err)?;
            let mut cache = decoder.new_cache(1);
            let logits = decoder
                .forward(&ids, None, &mut cache, Logits::All)
                .map_err(|e| errors::text(e, None))?;
            logits
                .f_select(0, 0)
                .and_then(|t| t.f_to_kind(Kind::Float))
                .map_err(torch_err)
        })?;
        to_py(py, &out)
    }

    /// Load a LoRA adapter (PEFT layout) into the cache under `name` (default: its folder
    /// name); it is not activated. Returns the name.
    #[pyo3(signature = (path, name = None))]
    fn load_adapter(
        &self,
        py: Python<'_>,
        path: PathBuf,
        name: Option<String>,
    ) -> PyResult<String> {
        let (device, kind) = (self.device, self.dtype.kind());
        let mut adapter = py
            .allow_threads(|| LoraAdapter::load(&path, device, kind))
            .map_err(|e| errors::text(e, Some(&format!("loading adapter {}", path.display()))))?;
        if let Some(n) = name {
            adapter.name = n;
        }
        self.with_inner(py, |inner| Ok(inner.adapters.insert(adapter)))
    }

    /// Activate a cached adapter, or none with `None` (no weights are copied).
    #[pyo3(signature = (name))]
    fn use_adapter(&self, py: Python<'_>, name: Option<&str>) -> PyResult<()> {
        self.with_inner(py, |inner| {
            let Inner { text, adapters } = inner;
            adapters
                .activate(&mut text.decoder, name)
                .map_err(|e| errors::text(e, None))
        })
    }

    /// Drop a cached adapter (deactivated first when active).
    fn unload_adapter(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.with_inner(py, |inner| {
            let Inner { text, adapters } = inner;
            adapters
                .unload(&mut text.decoder, name)
                .map_err(|e| errors::text(e, None))
        })
    }

    /// Names of the cached adapters.
    #[getter]
    fn adapters(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.with_inner(py, |inner| Ok(inner.adapters.names().cloned().collect()))
    }

    /// The active adapter's name, or None.
    #[getter]
    fn active_adapter(&self, py: Python<'_>) -> PyResult<Option<String>> {
        self.with_inner(py, |inner| Ok(inner.adapters.active().map(str::to_string)))
    }

    /// Visual tokens of an image: needs the vision-language model.
    fn encode_image(&self) -> PyResult<PyObject> {
        Err(PyNotImplementedError::new_err(NO_VLM))
    }

    /// Describe an image: needs the vision-language model.
    fn describe(&self) -> PyResult<PyObject> {
        Err(PyNotImplementedError::new_err(NO_VLM))
    }

    fn __repr__(&self) -> String {
        format!(
            "Model(source={:?}, device={:?}, dtype={:?})",
            self.source.display().to_string(),
            device_name(self.device),
            self.dtype.name()
        )
    }
}

pub const NO_VLM: &str = "describe and encode_image need the vision-language model \
    (crate afm-fusion), which this build of afm_vl does not include yet";
