//! `results.json` (every item, per-subset and per-task accuracy, micro and macro averages,
//! model, config, data checksums, timings) and `results.md` (a model × MMLU / MMMLU / MGSM
//! table shaped like the AFM report's, then per-subject and per-language tables).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::item::{Skipped, Task};
use crate::journal::{write_durably, ItemResult, Manifest};
use crate::shard::Shard;
use crate::source::DataFile;

/// Correct out of n.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
}

impl Tally {
    fn add(&mut self, ok: bool) {
        self.n += 1;
        self.correct += usize::from(ok);
        self.accuracy = self.correct as f64 / self.n as f64;
    }
}

/// One task's scores.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskSummary {
    pub n: usize,
    pub correct: usize,
    /// Correct over all items.
    pub micro: f64,
    /// Mean of the per-subset accuracies.
    #[serde(rename = "macro")]
    pub macro_: f64,
    /// `subject` (MMLU), `language` (MMMLU, MGSM) or `file` (JSONL).
    pub subset_kind: String,
    pub subsets: BTreeMap<String, Tally>,
    /// MMMLU: by the `Subject` column over all languages.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subjects: BTreeMap<String, Tally>,
}

/// Wall-clock figures of the process that wrote the report (not part of run equality).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    pub wall_s: f64,
    /// Items scored by this process (resumed items excluded).
    pub scored: usize,
    pub items_per_s: f64,
    /// CPU seconds (all threads, user + system) this process spent scoring; with
    /// contention for the CPU, items per CPU second compares runs more fairly than items/s.
    #[serde(default)]
    pub cpu_s: f64,
    #[serde(default)]
    pub items_per_cpu_s: f64,
    pub by_task: BTreeMap<String, TaskTiming>,
}

/// CPU time of this process so far (Linux `/proc/self/stat`, clock ticks of 1/100 s);
/// 0 where unavailable.
pub fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskTiming {
    pub scored: usize,
    pub seconds: f64,
    pub items_per_s: f64,
}

/// The content of `results.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub model: String,
    pub config: serde_json::Value,
    pub runtime: serde_json::Value,
    pub fingerprint: String,
    pub shards: Vec<Shard>,
    pub data: Vec<DataFile>,
    pub skipped: Vec<Skipped>,
    pub tasks: BTreeMap<Task, TaskSummary>,
    pub timings: Timings,
    pub items: Vec<ItemResult>,
}

/// Summarise records (in any order; they are sorted canonically).
pub fn summarise(records: &[ItemResult]) -> BTreeMap<Task, TaskSummary> {
    let mut tasks: BTreeMap<Task, TaskSummary> = BTreeMap::new();
    for r in records {
        let t = tasks.entry(r.task).or_default();
        t.subset_kind = r.task.subset_kind().to_string();
        t.n += 1;
        t.correct += usize::from(r.correct);
        t.subsets
            .entry(r.subset.clone())
            .or_default()
            .add(r.correct);
        if r.task == Task::Mmmlu {
            if let Some(s) = &r.subject {
                t.subjects.entry(s.clone()).or_default().add(r.correct);
            }
        }
    }
    for t in tasks.values_mut() {
        t.micro = t.correct as f64 / t.n.max(1) as f64;
        t.macro_ =
            t.subsets.values().map(|s| s.accuracy).sum::<f64>() / t.subsets.len().max(1) as f64;
    }
    tasks
}

impl Results {
    pub fn build(
        manifest: &Manifest,
        shards: Vec<Shard>,
        mut items: Vec<ItemResult>,
        timings: Timings,
    ) -> Self {
        items.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        Results {
            model: manifest.model.clone(),
            config: manifest.config.clone(),
            runtime: manifest.runtime.clone(),
            fingerprint: manifest.fingerprint.clone(),
            shards,
            data: manifest.data.clone(),
            skipped: manifest.skipped.clone(),
            tasks: summarise(&items),
            timings,
            items,
        }
    }

    /// Write `results.json` and `results.md` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| crate::error::EvalError::journal(dir, e.to_string()))?;
        write_durably(&dir.join("results.json"), json.as_bytes())?;
        write_durably(&dir.join("results.md"), self.markdown().as_bytes())
    }

    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let pct = |x: f64| format!("{:.2}", 100.0 * x);
        let mut md = String::from("# Evaluation results\n\n");
        let mut cols: Vec<Task> = vec![Task::Mmlu, Task::Mmmlu, Task::Mgsm];
        if self.tasks.contains_key(&Task::Jsonl) {
            cols.push(Task::Jsonl);
        }
        md.push_str("| Model |");
        for t in &cols {
            md.push_str(&format!(" {} |", t.title()));
        }
        md.push_str("\n| --- |");
        md.push_str(&" ---: |".repeat(cols.len()));
        md.push_str(&format!("\n| {} |", self.model));
        for t in &cols {
            let v = self.tasks.get(t).map_or("—".to_string(), |s| pct(s.micro));
            md.push_str(&format!(" {v} |"));
        }
        md.push_str("\n\nAccuracy in %, micro average over items (macro averages below).\n");
        let shots = |key: &str| {
            self.config
                .get("prompt")
                .and_then(|p| p.get(key))
                .and_then(|v| v.as_u64())
        };
        for (task, s) in &self.tasks {
            let mode = match task {
                Task::Mmlu => shots("mmlu_shots").map(|k| format!(", {k}-shot")),
                Task::Mmmlu => shots("mmmlu_shots").map(|k| format!(", {k}-shot")),
                Task::Mgsm => shots("mgsm_shots").map(|k| format!(", {k}-shot chain of thought")),
                Task::Jsonl => Some(", 0-shot".to_string()),
            }
            .unwrap_or_default();
            md.push_str(&format!(
                "\n## {}{mode}\n\n{} items: micro {} %, macro {} % over {} {}s.\n\n",
                task.title(),
                s.n,
                pct(s.micro),
                pct(s.macro_),
                s.subsets.len(),
                s.subset_kind
            ));
            md.push_str(&tally_table(&s.subset_kind, &s.subsets));
            if !s.subjects.is_empty() {
                md.push('\n');
                md.push_str(&tally_table("subject", &s.subjects));
            }
        }
        if !self.skipped.is_empty() {
            md.push_str(&format!("\n## Skipped ({})\n\n", self.skipped.len()));
            for s in &self.skipped {
                md.push_str(&format!("- `{}:{}`: {}\n", s.path, s.line, s.problem));
            }
        }
        md
    }
}

fn tally_table(title: &str, rows: &BTreeMap<String, Tally>) -> String {
    let mut cap = title.to_string();
    if let Some(c) = cap.get_mut(0..1) {
        c.make_ascii_uppercase();
    }
    let mut md = format!("| {cap} | Items | Correct | Accuracy |\n| --- | ---: | ---: | ---: |\n");
    for (name, t) in rows {
        md.push_str(&format!(
            "| {name} | {} | {} | {:.2} |\n",
            t.n,
            t.correct,
            100.0 * t.accuracy
        ));
    }
    md
}
