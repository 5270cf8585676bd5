//! Finding benchmarks in folders and loading them, with the `--tasks`, `--subjects`,
//! `--languages` and `--limit` filters.
//!
//! Recognised (a folder is searched up to 4 levels deep):
//! - MMLU: a folder with `test/<subject>_test.csv` (and `dev/<subject>_dev.csv` for shots);
//! - MMMLU: `mmlu_XX-YY.csv` files;
//! - MGSM: `mgsm_xx.tsv` files, with `exemplars.json` beside them;
//! - JSONL: `*.jsonl` files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::item::{Item, Shot, Skipped, Task};
use crate::mgsm::MgsmStyle;
use crate::source::{BadRows, DataFile};
use crate::{jsonl, mgsm, mmlu, mmmlu};

/// Which items to evaluate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Filters {
    /// Tasks to run (empty: all found).
    pub tasks: Vec<Task>,
    /// MMLU subjects / MMMLU `Subject` values (empty: all).
    pub subjects: Vec<String>,
    /// MMMLU / MGSM languages (empty: all). `fr` matches `fr` and `FR-FR`.
    pub languages: Vec<String>,
    /// At most this many items per subset (subject or language or file), the first ones.
    pub limit: Option<usize>,
}

fn primary(lang: &str) -> (String, bool) {
    let lower = lang.to_ascii_lowercase();
    let mut parts = lower.splitn(2, ['-', '_']);
    let first = parts.next().unwrap_or("").to_string();
    (first, parts.next().is_some())
}

impl Filters {
    pub fn task(&self, t: Task) -> bool {
        self.tasks.is_empty() || self.tasks.contains(&t)
    }

    pub fn subject(&self, s: &str) -> bool {
        self.subjects.is_empty() || self.subjects.iter().any(|f| f.eq_ignore_ascii_case(s))
    }

    pub fn language(&self, l: &str) -> bool {
        self.languages.is_empty()
            || self.languages.iter().any(|f| {
                if f.eq_ignore_ascii_case(l) {
                    return true;
                }
                let ((fp, fr), (lp, lr)) = (primary(f), primary(l));
                fp == lp && (!fr || !lr)
            })
    }
}

/// Options of loading that depend on prompting.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub filters: Filters,
    /// MMLU split to evaluate (`test`; `val` also works).
    pub split: String,
    /// MMLU prompts are few-shot: read `dev/`.
    pub mmlu_dev: bool,
    /// MMMLU prompts are few-shot: read English MMLU dev from a found MMLU folder or `dev_dir`.
    pub mmmlu_dev: bool,
    /// An MMLU root (or its `dev/`) for MMMLU few-shot prompts.
    pub dev_dir: Option<PathBuf>,
    /// `--skip-bad`: record malformed rows and files and go on.
    pub skip_bad: bool,
}

/// Everything to evaluate, loaded.
#[derive(Debug, Clone, Default)]
pub struct Suite {
    /// In canonical order: task, subset, index.
    pub items: Vec<Item>,
    /// English MMLU dev shots by subject.
    pub mmlu_dev: BTreeMap<String, Vec<Shot>>,
    /// MGSM prompt style by language.
    pub mgsm: BTreeMap<String, MgsmStyle>,
    /// Files read, with checksums, sorted by path.
    pub files: Vec<DataFile>,
    /// Rows and files skipped under `--skip-bad`.
    pub skipped: Vec<Skipped>,
}

#[derive(Default)]
struct Found {
    mmlu: Vec<PathBuf>,
    mmmlu: Vec<(PathBuf, String)>,
    mgsm: Vec<(PathBuf, String)>,
    jsonl: Vec<(PathBuf, String)>,
}

impl Found {
    fn len(&self) -> usize {
        self.mmlu.len() + self.mmmlu.len() + self.mgsm.len() + self.jsonl.len()
    }

    fn file(&mut self, path: &Path) -> bool {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(lang) = mmmlu::language_of(&name) {
            self.mmmlu.push((path.to_path_buf(), lang));
        } else if let Some(lang) = mgsm::language_of(&name) {
            self.mgsm.push((path.to_path_buf(), lang));
        } else if let Some(stem) = name.strip_suffix(".jsonl") {
            self.jsonl.push((path.to_path_buf(), stem.to_string()));
        } else {
            return false;
        }
        true
    }

    fn walk(&mut self, dir: &Path, depth: usize) -> Result<()> {
        if mmlu::is_mmlu_root(dir) {
            self.mmlu.push(dir.to_path_buf());
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| EvalError::io(dir, e))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            let hidden = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if hidden {
                continue;
            }
            if p.is_dir() {
                if depth < 4 {
                    self.walk(&p, depth + 1)?;
                }
            } else {
                self.file(&p);
            }
        }
        Ok(())
    }
}

/// Find and load the benchmarks under `paths`.
pub fn load(paths: &[PathBuf], opts: &LoadOptions) -> Result<Suite> {
    let f = &opts.filters;
    let mut bad = BadRows::new(opts.skip_bad);
    let mut found = Found::default();
    for p in paths {
        let before = found.len();
        if p.is_dir() {
            found.walk(p, 0)?;
        } else if !p.exists() {
            bad.handle(EvalError::source(p, "no such file or folder"))?;
            continue;
        } else {
            found.file(p);
        }
        if found.len() == before {
            bad.handle(EvalError::source(
                p,
                "no benchmark files found (expected an MMLU folder with dev/ and test/, \
                 mmlu_XX-YY.csv, mgsm_xx.tsv or *.jsonl)",
            ))?;
        }
    }
    let mut suite = Suite::default();
    let split = if opts.split.is_empty() {
        "test"
    } else {
        &opts.split
    };
    for root in &found.mmlu {
        if f.task(Task::Mmlu) {
            let keep = |s: &str| f.subject(s);
            let data = mmlu::load(root, split, &keep, opts.mmlu_dev, &mut bad)?;
            suite.items.extend(data.items);
            suite.mmlu_dev.extend(data.dev);
            suite.files.extend(data.files);
        }
    }
    if f.task(Task::Mmmlu) && !found.mmmlu.is_empty() {
        for (path, lang) in found.mmmlu.iter().filter(|(_, l)| f.language(l)) {
            let keep = |s: &str| f.subject(s);
            let (items, raw) = mmmlu::read(path, lang, &keep, &mut bad)?;
            suite.items.extend(items);
            suite.files.push(raw.data_file());
        }
        if opts.mmmlu_dev {
            let root = match (&opts.dev_dir, found.mmlu.first()) {
                (Some(d), _) if d.file_name().is_some_and(|n| n == "dev") => {
                    d.parent().map(Path::to_path_buf).unwrap_or_default()
                }
                (Some(d), _) => d.clone(),
                (None, Some(r)) => r.clone(),
                (None, None) => return Err(EvalError::Config(
                    "MMMLU few-shot prompts need English MMLU dev: add an MMLU folder or --dev-dir"
                        .into(),
                )),
            };
            let (dev, files) = mmlu::load_dev_all(&root, &mut bad)?;
            for (subject, shots) in dev {
                suite.mmlu_dev.entry(subject).or_insert(shots);
            }
            suite.files.extend(files);
        }
    }
    if f.task(Task::Mgsm) {
        let mut exemplar_files: Vec<PathBuf> = Vec::new();
        for (path, lang) in found.mgsm.iter().filter(|(_, l)| f.language(l)) {
            let (items, raw) = mgsm::read_tsv(path, lang, &mut bad)?;
            suite.items.extend(items);
            suite.files.push(raw.data_file());
            let ex = path.with_file_name("exemplars.json");
            if ex.is_file() && !exemplar_files.contains(&ex) {
                exemplar_files.push(ex);
            }
        }
        for ex in exemplar_files {
            let (styles, raw) = mgsm::read_exemplars(&ex)?;
            for (lang, style) in styles {
                suite.mgsm.entry(lang).or_insert(style);
            }
            suite.files.push(raw.data_file());
        }
    }
    if f.task(Task::Jsonl) {
        for (path, stem) in &found.jsonl {
            let (items, raw) = jsonl::read(path, stem, &mut bad)?;
            suite.items.extend(items);
            suite.files.push(raw.data_file());
        }
    }
    suite
        .items
        .sort_by(|a, b| (a.task, &a.subset, a.index).cmp(&(b.task, &b.subset, b.index)));
    suite.items.dedup_by(|a, b| a.key() == b.key());
    // A subject filter that matches nothing is a typo, not a request for less work.
    for want in &f.subjects {
        let found = suite.items.iter().any(|it| {
            it.subset.eq_ignore_ascii_case(want)
                || it
                    .subject
                    .as_deref()
                    .is_some_and(|s| s.eq_ignore_ascii_case(want))
        });
        if !found && !want.trim().is_empty() {
            return Err(EvalError::Config(format!(
                "--subjects: no item has the subject '{want}' in the given folders (check the spelling)"
            )));
        }
    }
    if let Some(limit) = f.limit {
        let mut counts: BTreeMap<(Task, String), usize> = BTreeMap::new();
        suite.items.retain(|it| {
            let n = counts.entry((it.task, it.subset.clone())).or_default();
            *n += 1;
            *n <= limit
        });
    }
    suite.files.sort();
    suite.files.dedup();
    suite.skipped = bad.skipped;
    if suite.items.is_empty() {
        return Err(EvalError::Config(
            "nothing to evaluate: no items left after reading and filtering".into(),
        ));
    }
    tracing::info!(
        items = suite.items.len(),
        files = suite.files.len(),
        "benchmarks loaded"
    );
    Ok(suite)
}
