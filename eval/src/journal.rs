//! The run journal in `--out DIR`: `run.json` (what this run is) and `journal.jsonl`, one line
//! per scored item, appended, flushed and fsync'ed after every batch. A killed run resumes with
//! `--resume`: complete lines are kept, a torn last line is cut off, and only items without a
//! line are scored, so no item is scored twice.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::item::{Item, Skipped, Task};
use crate::shard::Shard;
use crate::source::DataFile;

pub const MANIFEST: &str = "run.json";
pub const JOURNAL: &str = "journal.jsonl";

/// The verdict on one item (one journal line, and one entry of `results.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    pub key: String,
    pub task: Task,
    pub subset: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub index: usize,
    pub target: String,
    pub prediction: String,
    pub correct: bool,
    /// Multiple choice: log-likelihood of each continuation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logliks: Option<Vec<f64>>,
    /// Generation: the generated text (stop string removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<String>,
}

impl ItemResult {
    /// The identifying fields of `item`, with an empty verdict.
    pub fn for_item(item: &Item) -> Self {
        ItemResult {
            key: item.key(),
            task: item.task,
            subset: item.subset.clone(),
            subject: item.subject.clone(),
            index: item.index,
            target: item.target(),
            prediction: String::new(),
            correct: false,
            logliks: None,
            generation: None,
        }
    }

    /// Canonical order: task, subset, index.
    pub fn order_key(&self) -> (Task, &str, usize) {
        (self.task, &self.subset, self.index)
    }
}

/// What a run is: everything that decides its items and their scores. A journal can only be
/// resumed by a run with the same fingerprint; shards merge when they share it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub model: String,
    /// Options that decide the results (prompting, filters, split, …).
    pub config: serde_json::Value,
    /// Options that only decide speed (batch size, prefix reuse).
    pub runtime: serde_json::Value,
    pub data: Vec<DataFile>,
    pub skipped: Vec<Skipped>,
    /// Items over all shards (after filtering).
    pub items_all: usize,
    pub shard: Shard,
    /// Items of this shard.
    pub items_shard: usize,
    /// SHA-256 over model, config, data checksums and the keys of all items (not the shard).
    pub fingerprint: String,
}

impl Manifest {
    pub fn compute_fingerprint(
        model: &str,
        config: &serde_json::Value,
        data: &[DataFile],
        keys: &[String],
    ) -> String {
        let canon =
            serde_json::json!({ "model": model, "config": config, "data": data, "keys": keys });
        crate::source::sha256_hex(canon.to_string().as_bytes())
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| EvalError::io(&path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| EvalError::data(&path, e.line(), format!("invalid run manifest: {e}")))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(MANIFEST);
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| EvalError::journal(&path, e.to_string()))?;
        write_durably(&path, text.as_bytes())
    }
}

/// Write a file via a temporary file and a rename, fsync'ed (see `afm_text::atomic_write`).
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    afm_text::atomic_write::write_atomic(path, bytes).map_err(|e| match e {
        afm_text::TextError::Io { path, source } => EvalError::io(&path, source),
        other => EvalError::journal(path, other.to_string()),
    })
}

/// Read the complete lines of a journal. Returns the records (first line per key wins) and the
/// byte length of the valid part (a torn last line, one without its newline, starts there and
/// is cut off when the journal is reopened).
///
/// Every complete line must be a journal entry whose verdict agrees with its own evidence
/// (see [`check_record`]); a line that is not is an error naming `journal.jsonl:LINE`, never
/// silently dropped together with the lines after it.
pub fn read_records(path: &Path) -> Result<(BTreeMap<String, ItemResult>, u64)> {
    let (records, valid) = read_records_lines(path)?;
    Ok((
        records.into_iter().map(|(k, (_, r))| (k, r)).collect(),
        valid,
    ))
}

/// Journal records by key, each with its 1-based line number.
pub type NumberedRecords = BTreeMap<String, (usize, ItemResult)>;

/// [`read_records`] with the 1-based line number of each record.
pub fn read_records_lines(path: &Path) -> Result<(NumberedRecords, u64)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((BTreeMap::new(), 0)),
        Err(e) => return Err(EvalError::io(path, e)),
    };
    let mut records = BTreeMap::new();
    let mut valid = 0usize;
    let mut pos = 0usize;
    let mut line_no = 0usize;
    while pos < bytes.len() {
        line_no += 1;
        let Some(nl) = bytes[pos..].iter().position(|&b| b == b'\n') else {
            break; // torn last line: no newline yet
        };
        let line = &bytes[pos..pos + nl];
        let rec = serde_json::from_slice::<ItemResult>(line).map_err(|e| {
            EvalError::data(
                path,
                line_no,
                format!(
                    "not a journal entry ({e}); delete this line to resume, or use another --out"
                ),
            )
        })?;
        check_record(&rec).map_err(|problem| EvalError::data(path, line_no, problem))?;
        records.entry(rec.key.clone()).or_insert((line_no, rec));
        pos += nl + 1;
        valid = pos;
    }
    if valid < bytes.len() {
        tracing::warn!(
            "{}:{line_no}: ignoring {} bytes of an incomplete last entry (a run was interrupted while writing it)",
            path.display(),
            bytes.len() - valid
        );
    }
    Ok((records, valid as u64))
}

/// Whether a record's verdict follows from its own evidence: a multiple-choice record's
/// prediction is the letter of its highest log-likelihood and `correct` is prediction ==
/// target; a generation record's `correct` needs a prediction. (The runner re-scores each record
/// against its item as well.)
pub fn check_record(r: &ItemResult) -> std::result::Result<(), String> {
    match (&r.logliks, &r.generation) {
        (Some(lls), None) => {
            let pred = crate::scoring::argmax(lls)
                .map(crate::item::letter)
                .unwrap_or_default();
            if pred != r.prediction {
                return Err(format!(
                    "entry for {} predicts {:?} but its log-likelihoods pick {pred:?}",
                    r.key, r.prediction
                ));
            }
            if r.correct != (r.prediction == r.target) {
                return Err(format!(
                    "entry for {} says correct={} for prediction {:?} and target {:?}",
                    r.key, r.correct, r.prediction, r.target
                ));
            }
        }
        (None, Some(_)) => {
            if r.correct && r.prediction.is_empty() {
                return Err(format!(
                    "entry for {} is marked correct without a prediction",
                    r.key
                ));
            }
        }
        _ => {
            return Err(format!(
                "entry for {} has neither log-likelihoods nor a generation",
                r.key
            ))
        }
    }
    Ok(())
}

/// An open journal, appending.
pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Open `dir/journal.jsonl` for appending after cutting any torn tail; returns the records
    /// already there.
    pub fn open(dir: &Path) -> Result<(Self, NumberedRecords)> {
        let path = dir.join(JOURNAL);
        let (records, valid) = read_records_lines(&path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| EvalError::io(&path, e))?;
        let len = file.metadata().map_err(|e| EvalError::io(&path, e))?.len();
        if len > valid {
            file.set_len(valid).map_err(|e| EvalError::io(&path, e))?;
        }
        Ok((Journal { path, file }, records))
    }

    /// Append records, one line each, then flush and fsync.
    pub fn append(&mut self, records: &[ItemResult]) -> Result<()> {
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r)
                .map_err(|e| EvalError::journal(&self.path, e.to_string()))?;
            buf.push(b'\n');
        }
        self.file
            .write_all(&buf)
            .map_err(|e| EvalError::io(&self.path, e))?;
        self.file
            .flush()
            .map_err(|e| EvalError::io(&self.path, e))?;
        self.file
            .sync_data()
            .map_err(|e| EvalError::io(&self.path, e))
    }
}
