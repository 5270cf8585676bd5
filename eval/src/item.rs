//! One benchmark question, whatever format it came from.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The benchmark family an item belongs to; it decides prompting and scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Mmlu,
    Mmmlu,
    Mgsm,
    Jsonl,
}

impl Task {
    pub const ALL: [Task; 4] = [Task::Mmlu, Task::Mmmlu, Task::Mgsm, Task::Jsonl];

    pub fn name(self) -> &'static str {
        match self {
            Task::Mmlu => "mmlu",
            Task::Mmmlu => "mmmlu",
            Task::Mgsm => "mgsm",
            Task::Jsonl => "jsonl",
        }
    }

    /// The display name used in reports.
    pub fn title(self) -> &'static str {
        match self {
            Task::Mmlu => "MMLU",
            Task::Mmmlu => "MMMLU",
            Task::Mgsm => "MGSM",
            Task::Jsonl => "JSONL",
        }
    }

    /// What a subset of this task is called in reports.
    pub fn subset_kind(self) -> &'static str {
        match self {
            Task::Mmlu => "subject",
            Task::Mmmlu | Task::Mgsm => "language",
            Task::Jsonl => "file",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Task::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| format!("unknown task `{s}` (expected mmlu, mmmlu, mgsm or jsonl)"))
    }
}

/// What is asked and how the answer is checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Answer {
    /// Multiple choice: `choices[correct]` is right; scored by log-likelihood of the letters.
    Choice {
        choices: Vec<String>,
        correct: usize,
    },
    /// A number (MGSM): scored by the last number of a greedy generation.
    Number { value: String },
    /// Free text: scored by exact match of the trimmed first line of a greedy generation.
    Text { value: String },
}

/// A question with its provenance.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub task: Task,
    /// Subject (MMLU), language (MMMLU, MGSM) or file stem (JSONL).
    pub subset: String,
    /// MMMLU's `Subject` column (the MMLU subject); for MMLU the subject itself.
    pub subject: Option<String>,
    /// 0-based position among the subset's items as read (skipped rows keep their slot).
    pub index: usize,
    pub path: PathBuf,
    pub line: usize,
    pub question: String,
    pub answer: Answer,
}

impl Item {
    /// A key that names the item across runs, shards and journals.
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.task, self.subset, self.index)
    }

    /// The target as written in reports: the letter, or the number/text.
    pub fn target(&self) -> String {
        match &self.answer {
            Answer::Choice { correct, .. } => letter(*correct),
            Answer::Number { value } | Answer::Text { value } => value.clone(),
        }
    }
}

/// `0 → "A"`, `1 → "B"`, …
pub fn letter(i: usize) -> String {
    if i < 26 {
        char::from(b'A' + i as u8).to_string()
    } else {
        format!("#{i}")
    }
}

/// A solved example used to build few-shot prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct Shot {
    pub question: String,
    /// Multiple choice: the options and the correct letter index.
    pub choices: Vec<String>,
    pub correct: usize,
    /// Chain-of-thought answer text (MGSM exemplars), already including its answer prefix.
    pub solution: String,
}

/// A row that was malformed and skipped under `--skip-bad`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub line: usize,
    pub problem: String,
}
