//! `afm_vl._native`: the Rust side of the `afm_vl` Python package (pyo3). The pure-Python
//! layer in `python/afm_vl/` turns images and token ids into what these functions take and
//! documents the public API; see `afm_vl/__init__.pyi`.
//!
//! Tensors cross the boundary without copies (see [`bridge`]); long Rust work runs with the
//! GIL released; Rust errors become Python exceptions carrying the CLI's messages
//! (see [`errors`]).

mod bridge;
mod errors;
mod eval;
mod images;
mod model;
mod tokenizer;

use std::path::PathBuf;

use afm_vision::TilerConfig;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::bridge::{to_py, PyTensor};

/// Tile an image as `afm-vl tile` does: `(pixel_values [tiles, 3, S, S] f32,
/// content_boxes [tiles, 4] i64, info dict)`. `base`: a tiler config as JSON (a VLM
/// checkpoint's) that the options then modify, instead of the default one.
#[pyfunction]
#[pyo3(signature = (kind, payload, width, height, mode = "auto".to_string(), stretch = false,
    config = None, mean = None, std = None, max_side = 16_384, max_mib = 512, base = None))]
#[allow(clippy::too_many_arguments)]
fn tile<'py>(
    py: Python<'py>,
    kind: &str,
    payload: &Bound<'py, PyAny>,
    width: u32,
    height: u32,
    mode: String,
    stretch: bool,
    config: Option<PathBuf>,
    mean: Option<[f32; 3]>,
    std: Option<[f32; 3]>,
    max_side: u32,
    max_mib: u64,
    base: Option<String>,
) -> PyResult<(PyObject, PyObject, Bound<'py, PyDict>)> {
    let base = match base {
        Some(json) => serde_json::from_str::<TilerConfig>(&json)
            .map_err(|e| PyValueError::new_err(format!("not a valid tiler config: {e}")))?,
        None => TilerConfig::default(),
    };
    let image = images::ImageInput::from_parts(kind, payload, width, height)?;
    let opts = images::TileOptions {
        mode,
        stretch,
        config,
        mean,
        std,
        max_side,
        max_mib,
    };
    let tiled = py.allow_threads(|| {
        let cfg = images::tiler_config(base, &opts)?;
        images::tile(cfg, &image)
    })?;
    let pixels = tiled.to_tensor().map_err(errors::vision)?;
    let boxes = tiled.content_boxes_tensor().map_err(errors::vision)?;
    let info = PyDict::new(py);
    info.set_item("mode", tiled.mode.as_str())?;
    info.set_item("tile_size", tiled.tile_size)?;
    info.set_item("source_size", tiled.source_size)?;
    info.set_item("num_tiles", tiled.num_tiles())?;
    Ok((to_py(py, &pixels)?, to_py(py, &boxes)?, info))
}

/// Eval entry point; see `afm_vl.eval.run`. Returns results.json as JSON text.
#[pyfunction]
#[pyo3(signature = (folders, model, out, device = "auto".to_string(), dtype = "fp32".to_string(),
    tasks = Vec::new(), subjects = Vec::new(), languages = Vec::new(), limit = None, shots = None,
    chat = false, max_new_tokens = 256, split = "test".to_string(), dev_dir = None,
    batch_size = 8, reuse_prefix = true, resume = false, shard = None, skip_bad = false,
    progress = false, backend = "model".to_string()))]
#[allow(clippy::too_many_arguments)]
fn eval_run(
    py: Python<'_>,
    folders: Vec<PathBuf>,
    model: PathBuf,
    out: PathBuf,
    device: String,
    dtype: String,
    tasks: Vec<String>,
    subjects: Vec<String>,
    languages: Vec<String>,
    limit: Option<usize>,
    shots: Option<String>,
    chat: bool,
    max_new_tokens: usize,
    split: String,
    dev_dir: Option<PathBuf>,
    batch_size: usize,
    reuse_prefix: bool,
    resume: bool,
    shard: Option<String>,
    skip_bad: bool,
    progress: bool,
    backend: String,
) -> PyResult<String> {
    let args = eval::EvalArgs {
        folders,
        model,
        device,
        dtype,
        tasks,
        subjects,
        languages,
        limit,
        shots,
        chat,
        max_new_tokens,
        split,
        dev_dir,
        batch_size,
        reuse_prefix,
        out,
        resume,
        shard,
        skip_bad,
        progress,
        backend,
    };
    py.allow_threads(|| eval::run(&args))
}

/// Write an untrained vision-language checkpoint with the demo architecture
/// (`afm_fusion::train_demo::demo_config`) around the text model in `text_model`.
#[pyfunction]
#[pyo3(signature = (out, text_model, seed = 0, device = "cpu", dtype = None))]
fn init_vlm(
    py: Python<'_>,
    out: PathBuf,
    text_model: PathBuf,
    seed: i64,
    device: &str,
    dtype: Option<&str>,
) -> PyResult<()> {
    let device = model::parse_device(device)?;
    let dtype = model::parse_dtype(dtype, device)?;
    py.allow_threads(|| {
        let context = format!("loading model {}", text_model.display());
        let text = afm_text::TextModel::load(&text_model, device, dtype)
            .map_err(|e| errors::text(e, Some(&context)))?;
        let text_ref = std::path::absolute(&text_model)
            .unwrap_or_else(|_| text_model.clone())
            .display()
            .to_string();
        let config = afm_fusion::train_demo::demo_config(&text, &text_ref)
            .map_err(|e| errors::fusion(e, None))?;
        let vlm = afm_fusion::VisionLanguageModel::new(config, text, seed)
            .map_err(|e| errors::fusion(e, None))?;
        vlm.save(&out).map_err(|e| errors::fusion(e, None))
    })
}

/// Hand a tensor to Rust and back (the same storage both ways): a self-test of the bridge.
#[pyfunction]
fn _roundtrip(py: Python<'_>, t: PyTensor) -> PyResult<PyObject> {
    to_py(py, &t.0)
}

/// Whether libtorch (as linked into this module) sees CUDA.
#[pyfunction]
fn cuda_is_available() -> bool {
    afm_text::device::cuda_available()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<model::Model>()?;
    m.add_class::<tokenizer::Tokenizer>()?;
    m.add_function(wrap_pyfunction!(tile, m)?)?;
    m.add_function(wrap_pyfunction!(eval_run, m)?)?;
    m.add_function(wrap_pyfunction!(_roundtrip, m)?)?;
    m.add_function(wrap_pyfunction!(init_vlm, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_is_available, m)?)?;
    Ok(())
}
