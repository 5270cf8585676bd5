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

/// Write a file via a temporary file and a rename, fsync'ed.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp).map_err(|e| EvalError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| EvalError::io(&tmp, e))?;
    f.sync_all().map_err(|e| EvalError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| EvalError::io(path, e))
}

/// Read the complete lines of a journal. Returns the records (first line per key wins) and the
/// byte length of the valid part (a torn or corrupt tail starts there).
pub fn read_records(path: &Path) -> Result<(BTreeMap<String, ItemResult>, u64)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((BTreeMap::new(), 0)),
        Err(e) => return Err(EvalError::io(path, e)),
    };
    let mut records = BTreeMap::new();
    let mut valid = 0usize;
    let mut pos = 0usize;
    while pos < bytes.len() {
        let Some(nl) = bytes[pos..].iter().position(|&b| b == b'\n') else {
            break; // torn last line: no newline yet
        };
        let line = &bytes[pos..pos + nl];
        let Ok(rec) = serde_json::from_slice::<ItemResult>(line) else {
            break;
        };
        records.entry(rec.key.clone()).or_insert(rec);
        pos += nl + 1;
        valid = pos;
    }
    if valid < bytes.len() {
        tracing::warn!(
            "{}: ignoring {} bytes of an incomplete last entry",
            path.display(),
            bytes.len() - valid
        );
    }
    Ok((records, valid as u64))
}

/// An open journal, appending.
pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Open `dir/journal.jsonl` for appending after cutting any torn tail; returns the records
    /// already there.
    pub fn open(dir: &Path) -> Result<(Self, BTreeMap<String, ItemResult>)> {
        let path = dir.join(JOURNAL);
        let (records, valid) = read_records(&path)?;
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
