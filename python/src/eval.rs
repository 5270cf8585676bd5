//! `afm_vl.eval.run`: `afm-vl eval FOLDER...` as a function returning results.json's content.

use std::path::PathBuf;
use std::time::Duration;

use afm_eval::discovery::{self, Filters, LoadOptions};
use afm_eval::item::Task;
use afm_eval::prompt::PromptConfig;
use afm_eval::runner::{self, RunConfig};
use afm_eval::shard::Shard;
use afm_eval::text_backend::TextBackend;
use afm_eval::EvalBackend;
use afm_text::ptmoe_model::PtMoeModel;
use afm_text::TextModel;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::errors;
use crate::model::parse_device;

/// The CLI's `RunArgs`, field for field.
pub struct EvalArgs {
    pub folders: Vec<PathBuf>,
    pub model: PathBuf,
    pub device: String,
    pub dtype: String,
    pub tasks: Vec<String>,
    pub subjects: Vec<String>,
    pub languages: Vec<String>,
    pub limit: Option<usize>,
    pub shots: Option<String>,
    pub chat: bool,
    pub max_new_tokens: usize,
    pub split: String,
    pub dev_dir: Option<PathBuf>,
    pub batch_size: usize,
    pub reuse_prefix: bool,
    pub out: PathBuf,
    pub resume: bool,
    pub shard: Option<String>,
    pub skip_bad: bool,
    pub progress: bool,
    pub backend: String,
}

fn open_backend(a: &EvalArgs) -> PyResult<Box<dyn EvalBackend>> {
    match a.backend.as_str() {
        "hash" => Ok(Box::new(afm_eval::fake_backend::HashBackend {
            delay: Duration::ZERO,
            ..Default::default()
        })),
        "model" => {
            let device = parse_device(&a.device)?;
            let dtype = afm_eval::text_backend::parse_dtype(&a.dtype, device)
                .map_err(|e| errors::eval(e, None))?;
            let dir = &a.model;
            let context = format!("loading the model {}", dir.display());
            let err = |e| errors::text(e, Some(&context));
            // The server model for PT-MoE folders (ours or tamm's), else the decoder.
            Ok(if afm_text::ptmoe_model::is_ptmoe_dir(dir) {
                Box::new(TextBackend::<PtMoeModel>::from_dir(dir, device, dtype).map_err(err)?)
            } else {
                Box::new(TextBackend::<TextModel>::from_dir(dir, device, dtype).map_err(err)?)
            })
        }
        other => Err(PyValueError::new_err(format!(
            "unknown backend {other:?} (model or hash)"
        ))),
    }
}

/// Run the evaluation (GIL released by the caller); results.json as JSON text.
pub fn run(a: &EvalArgs) -> PyResult<String> {
    let eval_err = |e| errors::eval(e, None);
    let mut prompt = PromptConfig {
        chat: a.chat,
        max_new_tokens: a.max_new_tokens,
        ..PromptConfig::default()
    };
    if let Some(spec) = &a.shots {
        prompt.set_shots(spec).map_err(eval_err)?;
    }
    let tasks = a
        .tasks
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.parse::<Task>().map_err(PyValueError::new_err))
        .collect::<PyResult<Vec<_>>>()?;
    let filters = Filters {
        tasks,
        subjects: a.subjects.clone(),
        languages: a.languages.clone(),
        limit: a.limit,
    };
    let shard: Shard = match &a.shard {
        Some(s) => s.parse().map_err(eval_err)?,
        None => Shard::default(),
    };
    let cfg = RunConfig {
        prompt: prompt.clone(),
        filters: filters.clone(),
        split: a.split.clone(),
        skip_bad: a.skip_bad,
        shard,
        batch_size: a.batch_size,
        reuse_prefix: a.reuse_prefix,
        out: a.out.clone(),
        resume: a.resume,
        progress: a.progress,
    };
    let load = LoadOptions {
        filters,
        split: a.split.clone(),
        mmlu_dev: prompt.mmlu_shots > 0,
        mmmlu_dev: prompt.mmmlu_shots > 0,
        dev_dir: a.dev_dir.clone(),
        skip_bad: a.skip_bad,
    };
    let suite = discovery::load(&a.folders, &load).map_err(eval_err)?;
    let mut backend = open_backend(a)?;
    let results = runner::run(&suite, backend.as_mut(), &cfg)
        .map_err(|e| errors::eval(e, Some(&format!("evaluation into {}", a.out.display()))))?;
    serde_json::to_string(&results).map_err(|e| PyRuntimeError::new_err(e.to_string()))
}
