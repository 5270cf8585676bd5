//! `afm_vl._native.Model`: a loaded text model (and, once the vision-language model lands, a
//! VLM) behind a mutex, so Python threads can share it while the GIL is released.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use afm_text::generation::{generate_lm, CausalLm, Generation};
use afm_text::lora::{AdapterCache, LoraAdapter};
use afm_text::ptmoe_model::{is_ptmoe_dir, PtMoeModel};
use afm_text::{
    DType, DeviceSpec, GenerateOptions, LanguageModel, Logits, SamplingConfig, StopReason,
    TextError, TextModel,
};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tch::{Device, Kind, Tensor};

use afm_fusion::VisionLanguageModel;
use afm_vision::{TileMode, TilerConfig};

use crate::bridge::{to_py, torch_err, PyTensor};
use crate::errors;
use crate::images::{self, ImageInput};

pub fn parse_device(device: &str) -> PyResult<Device> {
    let spec: DeviceSpec = device.parse().map_err(|e| errors::text(e, None))?;
    spec.resolve().map_err(|e| errors::text(e, None))
}

pub fn parse_dtype(dtype: Option<&str>, device: Device) -> PyResult<DType> {
    DType::parse(dtype.unwrap_or("auto"), device).map_err(|e| errors::text(e, None))
}

/// As the CLI's `generate`: `auto` is fp32 on a CPU (the fused decode step), bf16 on a GPU.
pub fn parse_decode_dtype(dtype: Option<&str>, device: Device) -> PyResult<DType> {
    DType::parse_decode(dtype.unwrap_or("auto"), device).map_err(|e| errors::text(e, None))
}

pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
    }
}

const VLM_ADAPTERS: &str = "LoRA adapters are for text models: a vision-language model's \
    text model carries its image LoRA";

fn not_a_vlm(source: &std::path::Path) -> PyErr {
    PyValueError::new_err(format!(
        "{} is a text model: describe and encode_image need a vision-language checkpoint (a \
         directory whose config.json has \"vision\" and \"adapter\" sections)",
        source.display()
    ))
}

/// A text decoder, the server model (PT-MoE), or a vision-language model around a decoder.
enum Engine {
    Text(Box<TextModel>),
    Server(Box<PtMoeModel>),
    Vlm(Box<VisionLanguageModel>),
    /// A SmolVLM checkpoint (HF layout).
    SmolVlm(Box<afm_fusion::SmolVlm>),
}

impl Engine {
    /// `f` on the text model's network, for engines that take user adapters.
    fn lora_target<R>(
        &mut self,
        f: impl FnOnce(&mut dyn afm_text::lora::LoraTarget) -> afm_text::Result<R>,
    ) -> PyResult<R> {
        match self {
            Engine::Text(t) => f(&mut t.decoder),
            Engine::Server(m) => f(&mut m.model),
            Engine::Vlm(_) | Engine::SmolVlm(_) => return Err(PyValueError::new_err(VLM_ADAPTERS)),
        }
        .map_err(|e| errors::text(e, None))
    }
}

struct Inner {
    engine: Engine,
    adapters: AdapterCache,
}

impl Inner {
    /// A user adapter for the model of a text-only engine (user LoRA adapters need the adapter
    /// slot that a VLM's image LoRA occupies).
    fn load_adapter(&self, path: &std::path::Path) -> PyResult<LoraAdapter> {
        let ctx = format!("loading adapter {}", path.display());
        match &self.engine {
            Engine::Text(t) => t.load_adapter(path),
            Engine::Server(m) => m.load_adapter(path),
            Engine::Vlm(_) | Engine::SmolVlm(_) => return Err(PyValueError::new_err(VLM_ADAPTERS)),
        }
        .map_err(|e| errors::text(e, Some(&ctx)))
    }

    fn vlm(&self) -> PyResult<&VisionLanguageModel> {
        match &self.engine {
            Engine::Vlm(v) => Ok(v),
            Engine::Text(t) => Err(not_a_vlm(&t.source)),
            Engine::Server(m) => Err(not_a_vlm(&m.source)),
            Engine::SmolVlm(_) => Err(PyValueError::new_err("not an afm-vl checkpoint")),
        }
    }

    /// Run `f` on the plain text model (`g` on the server model): a VLM's image LoRA is taken
    /// off meanwhile, so text prompts see the text model exactly as loaded (as
    /// `VisionLanguageModel::generate_text`).
    fn text_only<R>(
        &mut self,
        f: impl FnOnce(&TextModel) -> PyResult<R>,
        g: impl FnOnce(&PtMoeModel) -> PyResult<R>,
    ) -> PyResult<R> {
        match &mut self.engine {
            Engine::Text(t) => f(t),
            Engine::Server(m) => g(m),
            Engine::SmolVlm(s) => f(&s.text),
            Engine::Vlm(v) => {
                v.set_image_lora(false)
                    .map_err(|e| errors::fusion(e, None))?;
                let out = f(&v.text);
                v.set_image_lora(true)
                    .map_err(|e| errors::fusion(e, None))?;
                out
            }
        }
    }
}

/// A loaded model. Build it with `afm_vl.load`.
#[pyclass(module = "afm_vl._native", name = "Model", frozen)]
pub struct Model {
    inner: Mutex<Inner>,
    device: Device,
    dtype: DType,
    source: PathBuf,
    has_tokenizer: bool,
    /// `decoder`, `ptmoe` or `vlm` (the engine's kind, fixed at load).
    architecture: &'static str,
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

    fn wrap(engine: Engine, device: Device) -> Self {
        let (dtype, has_tokenizer, source, architecture) = match &engine {
            Engine::Text(t) => (t.dtype, t.tokenizer.is_some(), t.source.clone(), "decoder"),
            Engine::Server(m) => (m.dtype, m.tokenizer.is_some(), m.source.clone(), "ptmoe"),
            Engine::Vlm(v) => (
                v.text.dtype,
                v.text.tokenizer.is_some(),
                v.dir.clone().unwrap_or_else(|| v.text.source.clone()),
                "vlm",
            ),
            Engine::SmolVlm(s) => (s.text.dtype, true, s.dir.clone(), "smolvlm"),
        };
        Model {
            device,
            dtype,
            source,
            has_tokenizer,
            architecture,
            inner: Mutex::new(Inner {
                engine,
                adapters: AdapterCache::default(),
            }),
        }
    }
}

/// A model's network, checking for Ctrl-C (and for an error raised by a Python streaming
/// callback) before every forward pass, so a long generation stops between two tokens.
struct Interruptible<'a, M> {
    decoder: &'a M,
    error: RefCell<Option<PyErr>>,
}

impl<M> Interruptible<'_, M> {
    fn fail(&self, e: PyErr) {
        let mut slot = self.error.borrow_mut();
        if slot.is_none() {
            *slot = Some(e);
        }
    }
}

impl<M: CausalLm> CausalLm for Interruptible<'_, M> {
    type Cache = M::Cache;
    fn forward_lm(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut M::Cache,
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
        self.decoder.forward_lm(ids, mask, cache, logits)
    }
    fn new_lm_cache(&self, batch: i64) -> M::Cache {
        self.decoder.new_lm_cache(batch)
    }
    fn cache_len(cache: &M::Cache) -> i64 {
        M::cache_len(cache)
    }
    fn set_first_token_pass(cache: &mut M::Cache, on: bool) {
        M::set_first_token_pass(cache, on);
    }
    fn eos_ids(&self) -> Vec<u32> {
        self.decoder.eos_ids()
    }
    fn context_len(&self) -> usize {
        self.decoder.context_len()
    }
    fn vocab_size(&self) -> usize {
        self.decoder.vocab_size()
    }
    fn fork_cache(cache: &M::Cache) -> afm_text::Result<M::Cache> {
        M::fork_cache(cache)
    }
    fn repeat_cache(cache: &M::Cache, n: i64) -> afm_text::Result<M::Cache> {
        M::repeat_cache(cache, n)
    }
    fn lm_device(&self) -> Device {
        self.decoder.lm_device()
    }
    fn lm_kind(&self) -> Kind {
        self.decoder.lm_kind()
    }
    fn hidden_size(&self) -> usize {
        self.decoder.hidden_size()
    }
    fn embed_ids(&self, ids: &Tensor) -> afm_text::Result<Tensor> {
        self.decoder.embed_ids(ids)
    }
    fn forward_embeds_lm(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: &mut M::Cache,
        logits: Logits,
    ) -> afm_text::Result<Tensor> {
        self.decoder.forward_embeds_lm(x, mask, cache, logits)
    }
}

/// Generate on `model` from `prompt`, streaming pieces to `stream` (Ctrl-C and an error the
/// callback raises stop it between two tokens).
fn generate_on<L: LanguageModel>(
    model: &L,
    prompt: &str,
    raw: bool,
    opts: &GenerateOptions,
    stream: &Option<PyObject>,
) -> PyResult<Generation> {
    let ids = model
        .tokenizer_or_err()
        .and_then(|t| t.prompt_ids(prompt, raw))
        .map_err(|e| errors::text(e, None))?;
    let lm = Interruptible {
        decoder: model.net(),
        error: RefCell::new(None),
    };
    let mut on_text = |piece: &str| {
        if let Some(cb) = stream {
            if lm.error.borrow().is_some() {
                return;
            }
            if let Err(e) = Python::with_gil(|py| cb.call1(py, (piece,)).map(drop)) {
                lm.fail(e);
            }
        }
    };
    let out = generate_lm(&lm, model.tokenizer_opt(), &ids, opts, &mut on_text);
    if let Some(e) = lm.error.take() {
        return Err(e);
    }
    out.map_err(|e| errors::text(e, None))
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

/// fp32 logits `[seq, vocab]` of `ids` (1-D) at every position.
fn logits_of<M: CausalLm>(decoder: &M, ids: Tensor) -> PyResult<Tensor> {
    let _guard = tch::no_grad_guard();
    let vocab = decoder.vocab_size() as i64;
    let ctx = decoder.context_len() as i64;
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
    let mut cache = decoder.new_lm_cache(1);
    let logits = decoder
        .forward_lm(&ids, None, &mut cache, Logits::All)
        .map_err(|e| errors::text(e, None))?;
    logits
        .f_select(0, 0)
        .and_then(|t| t.f_to_kind(Kind::Float))
        .map_err(torch_err)
}

#[pymethods]
impl Model {
    /// Load a checkpoint directory (config.json, model.safetensors, tokenizer.json; a tamm
    /// folder; a PT-MoE directory, ours or tamm's, loads the server model).
    #[staticmethod]
    #[pyo3(signature = (path, device = "auto", dtype = None))]
    fn load(py: Python<'_>, path: PathBuf, device: &str, dtype: Option<&str>) -> PyResult<Self> {
        let device = parse_device(device)?;
        if is_ptmoe_dir(&path) {
            let dtype = parse_dtype(dtype, device)?;
            let m = py
                .allow_threads(|| PtMoeModel::load(&path, device, dtype))
                .map_err(|e| errors::text(e, Some(&format!("loading model {}", path.display()))))?;
            return Ok(Model::wrap(Engine::Server(Box::new(m)), device));
        }
        let dtype = parse_decode_dtype(dtype, device)?;
        let text = py
            .allow_threads(|| TextModel::load(&path, device, dtype))
            .map_err(|e| errors::text(e, Some(&format!("loading model {}", path.display()))))?;
        Ok(Model::wrap(Engine::Text(Box::new(text)), device))
    }

    /// Load a vision-language checkpoint directory (config.json with a "vision" section,
    /// vision_adapter.safetensors, and the text model it names).
    #[staticmethod]
    #[pyo3(signature = (path, device = "auto", dtype = None))]
    fn load_vlm(
        py: Python<'_>,
        path: PathBuf,
        device: &str,
        dtype: Option<&str>,
    ) -> PyResult<Self> {
        let device = parse_device(device)?;
        if afm_fusion::smolvlm::is_smolvlm_dir(&path) {
            let (text, vision) = afm_fusion::smolvlm::parse_dtypes(dtype.unwrap_or("auto"), device)
                .map_err(|e| errors::text(e, None))?;
            let m = py
                .allow_threads(|| afm_fusion::SmolVlm::load_with(&path, device, text, vision))
                .map_err(|e| errors::fusion(e, Some(&format!("loading {}", path.display()))))?;
            return Ok(Model::wrap(Engine::SmolVlm(Box::new(m)), device));
        }
        if afm_fusion::model::has_ptmoe_text(&path) {
            return Err(PyValueError::new_err(format!(
                "{}: its text model is a PT-MoE model; the wheel describes with an on-device \
                 text model (run `afm-vl describe --model {}` for this checkpoint)",
                path.display(),
                path.display()
            )));
        }
        let dtype = parse_decode_dtype(dtype, device)?;
        let vlm = py
            .allow_threads(|| VisionLanguageModel::load(&path, device, dtype))
            .map_err(|e| errors::fusion(e, Some(&format!("loading {}", path.display()))))?;
        Ok(Model::wrap(Engine::Vlm(Box::new(vlm)), device))
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
        if afm_text::ptmoe_config::is_ptmoe_preset(name) {
            let dtype = parse_dtype(dtype, device)?;
            let m = py
                .allow_threads(|| PtMoeModel::from_preset(name, seed, device, dtype))
                .map_err(|e| errors::text(e, None))?;
            return Ok(Model::wrap(Engine::Server(Box::new(m)), device));
        }
        let dtype = parse_decode_dtype(dtype, device)?;
        let text = py
            .allow_threads(|| TextModel::from_preset(name, seed, device, dtype))
            .map_err(|e| errors::text(e, None))?;
        Ok(Model::wrap(Engine::Text(Box::new(text)), device))
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

    /// `text` (a text decoder, on-device or PT-MoE) or `vlm` (a vision-language model).
    #[getter]
    fn kind(&self) -> &'static str {
        if self.architecture == "vlm" || self.architecture == "smolvlm" {
            "vlm"
        } else {
            "text"
        }
    }

    /// `decoder` (the on-device two-segment decoder, SmolLM2 and the like), `ptmoe` (the
    /// server model), `vlm` (an afm-vl checkpoint) or `smolvlm` (a HF SmolVLM checkpoint).
    #[getter]
    fn architecture(&self) -> &'static str {
        self.architecture
    }

    /// The checkpoint's tiler configuration as JSON (None for a text model: the default).
    fn tiler_config_json(&self, py: Python<'_>) -> PyResult<Option<String>> {
        self.with_inner(py, |inner| match &inner.engine {
            Engine::Text(_) | Engine::Server(_) | Engine::SmolVlm(_) => Ok(None),
            Engine::Vlm(v) => serde_json::to_string(&v.config.tiler)
                .map(Some)
                .map_err(|e| PyRuntimeError::new_err(e.to_string())),
        })
    }

    /// The decoder configuration as JSON text (HF field names; a PT-MoE model's has
    /// `model_type` `afm_ptmoe`).
    fn config_json(&self, py: Python<'_>) -> PyResult<String> {
        self.with_inner(py, |inner| {
            match &inner.engine {
                Engine::Text(t) => serde_json::to_string(t.config()),
                Engine::Server(m) => serde_json::to_string(&m.model.cfg),
                Engine::Vlm(v) => serde_json::to_string(v.text.config()),
                Engine::SmolVlm(s) => serde_json::to_string(s.text.config()),
            }
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
        let result = self.with_inner(py, |inner| {
            inner.text_only(
                |model| generate_on(model, prompt, raw, &opts, &stream),
                |model| generate_on(model, prompt, raw, &opts, &stream),
            )
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
            let mut inner = self.lock()?;
            inner.text_only(
                |model| logits_of(&model.decoder, ids.shallow_clone()),
                |model| logits_of(&model.model, ids.shallow_clone()),
            )
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
        if self.architecture == "vlm" {
            return Err(PyValueError::new_err(VLM_ADAPTERS));
        }
        // A PEFT directory, or a tamm adapter checkpoint for a tamm model.
        let mut adapter = self.with_inner(py, |inner| inner.load_adapter(&path))?;
        if let Some(n) = name {
            adapter.name = n;
        }
        self.with_inner(py, |inner| Ok(inner.adapters.insert(adapter)))
    }

    /// Activate a cached adapter, or none with `None` (no weights are copied).
    #[pyo3(signature = (name))]
    fn use_adapter(&self, py: Python<'_>, name: Option<&str>) -> PyResult<()> {
        self.with_inner(py, |inner| {
            let Inner { engine, adapters } = inner;
            engine.lora_target(|net| adapters.activate(net, name))
        })
    }

    /// Drop a cached adapter (deactivated first when active).
    fn unload_adapter(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.with_inner(py, |inner| {
            let Inner { engine, adapters } = inner;
            engine.lora_target(|net| adapters.unload(net, name))
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

    /// Visual tokens `[tiles × tokens_per_tile, hidden]` (fp32, no autograd) of an image
    /// tiled in `mode` with the checkpoint's tiler.
    #[pyo3(signature = (kind, payload, width, height, mode = "auto"))]
    fn encode_image(
        &self,
        py: Python<'_>,
        kind: &str,
        payload: &Bound<'_, PyAny>,
        width: u32,
        height: u32,
        mode: &str,
    ) -> PyResult<PyObject> {
        let image = ImageInput::from_parts(kind, payload, width, height)?;
        let out = self.with_inner(py, |inner| {
            if let Engine::SmolVlm(s) = &inner.engine {
                check_auto(mode)?;
                let img = images::smolvlm_process(&s.processor, &image)?;
                return s.encode(&img).map_err(|e| errors::fusion(e, None));
            }
            let vlm = inner.vlm()?;
            let tiled = tile_for(vlm, &image, mode)?;
            vlm.encode_image(&tiled)
                .map_err(|e| errors::fusion(e, None))
        })?;
        to_py(py, &out)
    }

    /// Describe an image (as `afm-vl describe`); returns a dict (text, mode, tiles,
    /// visual_tokens, prompt_tokens, tokens, stop_reason, timings).
    #[pyo3(signature = (kind, payload, width, height, mode = "auto", prompt = None,
        max_tokens = 256, temperature = 0.0, top_k = 0, top_p = 1.0, min_p = 0.0,
        repetition_penalty = 1.0, seed = 0, stop = Vec::new(), stream = None))]
    #[allow(clippy::too_many_arguments)]
    fn describe<'py>(
        &self,
        py: Python<'py>,
        kind: &str,
        payload: &Bound<'py, PyAny>,
        width: u32,
        height: u32,
        mode: &str,
        prompt: Option<&str>,
        max_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repetition_penalty: f32,
        seed: u64,
        stop: Vec<String>,
        stream: Option<PyObject>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let image = ImageInput::from_parts(kind, payload, width, height)?;
        let opts = options(
            max_tokens,
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            seed,
            stop,
            false,
        )?;
        let d = self.with_inner(py, |inner| {
            let t0 = std::time::Instant::now();
            let mut error: Option<PyErr> = None;
            let mut on_text = |piece: &str| {
                if let (Some(cb), None) = (&stream, &error) {
                    if let Err(e) = Python::with_gil(|py| cb.call1(py, (piece,)).map(drop)) {
                        error = Some(e);
                    }
                }
            };
            let (out, tile_s) = match &inner.engine {
                Engine::SmolVlm(s) => {
                    check_auto(mode)?;
                    let img = images::smolvlm_process(&s.processor, &image)?;
                    let tile_s = t0.elapsed().as_secs_f64();
                    (
                        s.describe_processed(&img, prompt, &opts, &mut on_text),
                        tile_s,
                    )
                }
                _ => {
                    let vlm = inner.vlm()?;
                    let tiled = tile_for(vlm, &image, mode)?;
                    let tile_s = t0.elapsed().as_secs_f64();
                    (
                        vlm.describe_tiled(&tiled, prompt, &opts, &mut on_text),
                        tile_s,
                    )
                }
            };
            if let Some(e) = error {
                return Err(e);
            }
            let mut d = out.map_err(|e| errors::fusion(e, None))?;
            d.timings.tile_s = tile_s;
            Ok(d)
        })?;
        let out = PyDict::new(py);
        out.set_item("text", &d.text)?;
        out.set_item("mode", d.mode.as_str())?;
        out.set_item("tiles", d.tiles)?;
        out.set_item("visual_tokens", d.visual_tokens)?;
        out.set_item("prompt_tokens", d.prompt_tokens)?;
        out.set_item("tokens", &d.generation.tokens)?;
        out.set_item("generated_tokens", d.generation.tokens.len())?;
        out.set_item("stop_reason", stop_reason(d.generation.stop_reason))?;
        let t = PyDict::new(py);
        t.set_item("tile_s", d.timings.tile_s)?;
        t.set_item("encode_s", d.timings.encode_s)?;
        t.set_item("prefill_s", d.timings.prefill_s)?;
        t.set_item("decode_s", d.timings.decode_s)?;
        out.set_item("timings", t)?;
        Ok(out)
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

/// SmolVLM's processor decides how an image is split: only `mode="auto"` applies.
fn check_auto(mode: &str) -> PyResult<()> {
    match mode {
        "auto" => Ok(()),
        m => Err(PyValueError::new_err(format!(
            "mode={m:?} applies to afm-vl checkpoints; a SmolVLM checkpoint splits images as its \
             processor config says (use mode=\"auto\")"
        ))),
    }
}

/// Tile `image` in `mode` with the VLM's own tiler (sizes and normalisation of its config).
fn tile_for(
    vlm: &VisionLanguageModel,
    image: &ImageInput,
    mode: &str,
) -> PyResult<afm_vision::TiledImage> {
    let mode: TileMode = mode
        .parse()
        .map_err(|e: afm_vision::VisionError| PyValueError::new_err(e.to_string()))?;
    let cfg = TilerConfig {
        mode,
        ..vlm.config.tiler.clone()
    };
    images::tile(cfg, image)
}
