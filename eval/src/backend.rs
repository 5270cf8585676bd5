//! The model seen by the runner. The runner only needs tokens in, log-likelihoods and greedy
//! generations out; [`crate::text_backend`] implements this for afm-text decoders and
//! [`crate::fake_backend`] is a deterministic test double for runner properties.

use crate::error::Result;

/// A multiple-choice question: the item tokens after the shared prefix, and the token ids of
/// each continuation (" A", " B", …).
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceRequest {
    pub body: Vec<u32>,
    pub continuations: Vec<Vec<u32>>,
}

/// A generation request: the item tokens after the shared prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub body: Vec<u32>,
    pub max_new_tokens: usize,
    /// Generation stops at the first of these (and at end-of-sequence); it is removed.
    pub stop: Vec<String>,
}

/// A model that can be evaluated.
pub trait EvalBackend {
    /// Shown in reports.
    fn model_name(&self) -> String;

    /// The most tokens one forward pass may hold (prompt plus continuation), when limited.
    fn context_len(&self) -> Option<usize> {
        None
    }

    /// Token ids of `text`, without BOS or other special tokens.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;

    /// The chat template around one user turn, with the assistant generation prompt.
    fn chat_wrap(&self, user_text: &str) -> Result<String>;

    /// For each request, the summed log-likelihood of each continuation given
    /// `prefix ++ body`. With `reuse_prefix`, the prefix's KV cache is computed once and
    /// extended copies of it serve the requests; without, every request runs from scratch.
    /// The results must not depend on `reuse_prefix` or on how requests are batched (beyond
    /// floating-point noise).
    fn choice_loglikelihoods(
        &mut self,
        prefix: &[u32],
        requests: &[ChoiceRequest],
        reuse_prefix: bool,
    ) -> Result<Vec<Vec<f64>>>;

    /// Greedy generation after `prefix ++ body` for each request; returns the text with the
    /// stop string (and anything after it) removed.
    fn generate_greedy(
        &mut self,
        prefix: &[u32],
        requests: &[GenerateRequest],
        reuse_prefix: bool,
    ) -> Result<Vec<String>>;
}

/// Cut `text` at the first occurrence of any stop string; returns whether one was found.
pub fn cut_at_stop(text: &str, stop: &[String]) -> (String, bool) {
    let first = stop
        .iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min();
    match first {
        Some(i) => (text[..i].to_string(), true),
        None => (text.to_string(), false),
    }
}
