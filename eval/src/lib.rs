//! afm-eval: benchmark formats (MMLU, MMMLU, MGSM, JSONL), prompting, scoring, runner, reports.
//! `afm-vl eval`.
//!
//! Flow: [`discovery::load`] finds and parses benchmark folders into a [`discovery::Suite`];
//! [`runner::run`] builds prompts ([`prompt`]), asks an [`backend::EvalBackend`] for
//! continuation log-likelihoods or greedy generations, scores them ([`scoring`]), journals
//! every verdict ([`journal`]) and writes the reports ([`report`]); [`merge::merge`] combines
//! the output folders of `--shard K/N` runs.

pub mod backend;
pub mod discovery;
pub mod error;
pub mod fake_backend;
pub mod item;
pub mod journal;
pub mod jsonl;
pub mod lock;
pub mod merge;
pub mod mgsm;
pub mod mmlu;
pub mod mmmlu;
pub mod prompt;
pub mod report;
pub mod runner;
pub mod scoring;
pub mod shard;
pub mod source;
pub mod text_backend;

pub use backend::EvalBackend;
pub use error::{EvalError, Result};
