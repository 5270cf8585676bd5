//! `afm_vl._native.Tokenizer`: the model's tokenizer.json with its chat template.

use std::path::PathBuf;

use afm_text::ChatMessage;
use pyo3::prelude::*;

use crate::errors;

/// A tokenizer loaded from a model directory (tokenizer.json, tokenizer_config.json; tamm's
/// tokenizer.model in a tamm folder).
#[pyclass(module = "afm_vl._native", name = "Tokenizer", frozen)]
pub struct Tokenizer {
    inner: afm_text::Tokenizer,
    dir: PathBuf,
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py
            .allow_threads(|| afm_text::model::model_dir_tokenizer(&path))
            .map_err(|e| errors::text(e, Some(&format!("loading tokenizer {}", path.display()))))?;
        Ok(Tokenizer { inner, dir: path })
    }

    /// The directory it was loaded from.
    #[getter]
    fn path(&self) -> PathBuf {
        self.dir.clone()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    #[getter]
    fn eos_token(&self) -> Option<String> {
        self.inner.eos_token().map(str::to_string)
    }

    #[getter]
    fn chat_template(&self) -> Option<String> {
        self.inner.chat_template().map(str::to_string)
    }

    /// Token ids of `text` (no special tokens added).
    fn encode(&self, py: Python<'_>, text: &str) -> PyResult<Vec<u32>> {
        py.allow_threads(|| self.inner.encode(text))
            .map_err(|e| errors::text(e, None))
    }

    /// Text of `ids`.
    #[pyo3(signature = (ids, skip_special_tokens = true))]
    fn decode(&self, py: Python<'_>, ids: Vec<u32>, skip_special_tokens: bool) -> PyResult<String> {
        py.allow_threads(|| self.inner.decode(&ids, skip_special_tokens))
            .map_err(|e| errors::text(e, None))
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Render the chat template over `(role, content)` pairs.
    #[pyo3(signature = (messages, add_generation_prompt = true))]
    fn apply_chat_template(
        &self,
        messages: Vec<(String, String)>,
        add_generation_prompt: bool,
    ) -> PyResult<String> {
        let msgs: Vec<ChatMessage> = messages
            .iter()
            .map(|(r, c)| ChatMessage::new(r, c))
            .collect();
        self.inner
            .apply_chat_template(&msgs, add_generation_prompt)
            .map_err(|e| errors::text(e, None))
    }

    fn __repr__(&self) -> String {
        format!(
            "Tokenizer(path={:?}, vocab_size={})",
            self.dir.display().to_string(),
            self.inner.vocab_size()
        )
    }
}
