//! MMLU in the original Hendrycks layout: `dev/<subject>_dev.csv`, `test/<subject>_test.csv`
//! (and `val/`), no header, six columns `question,A,B,C,D,answer`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{EvalError, Result};
use crate::item::{Answer, Item, Shot, Task};
use crate::source::{csv_rows, BadRows, DataFile, RawFile};

/// One parsed multiple-choice row.
#[derive(Debug, Clone, PartialEq)]
pub struct McRow {
    /// 0-based record index in the file (bad rows keep their slot).
    pub index: usize,
    pub line: usize,
    pub question: String,
    pub choices: Vec<String>,
    pub correct: usize,
}

/// Parse an answer letter `A`..`D`.
pub fn parse_letter(path: &Path, line: usize, s: &str) -> Result<usize> {
    match s.trim() {
        "A" => Ok(0),
        "B" => Ok(1),
        "C" => Ok(2),
        "D" => Ok(3),
        other => Err(EvalError::data(
            path,
            line,
            format!("answer {other:?} is not one of A, B, C, D"),
        )),
    }
}

/// Read an MMLU CSV (`question,A,B,C,D,answer`, no header).
pub fn read_csv(raw: &RawFile, bad: &mut BadRows) -> Result<Vec<McRow>> {
    let mut rows = Vec::new();
    for (index, rec) in csv_rows(raw).into_iter().enumerate() {
        let parsed = rec.and_then(|(line, f)| {
            if f.len() != 6 {
                return Err(EvalError::data(
                    &raw.path,
                    line,
                    format!(
                        "expected 6 columns (question,A,B,C,D,answer), found {}",
                        f.len()
                    ),
                ));
            }
            let correct = parse_letter(&raw.path, line, &f[5])?;
            Ok(McRow {
                index,
                line,
                question: f[0].clone(),
                choices: f[1..5].to_vec(),
                correct,
            })
        });
        match parsed {
            Ok(r) => rows.push(r),
            Err(e) => bad.handle(e)?,
        }
    }
    Ok(rows)
}

/// Is `dir` an MMLU root (has `test/` with `*_test.csv` files)?
pub fn is_mmlu_root(dir: &Path) -> bool {
    !subject_files(&dir.join("test"), "_test.csv").is_empty()
}

/// `<subject>_<split>.csv` files in a folder, by subject.
pub fn subject_files(dir: &Path, suffix: &str) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(subject) = name.strip_suffix(suffix) {
                if !subject.is_empty() && e.path().is_file() {
                    out.insert(subject.to_string(), e.path());
                }
            }
        }
    }
    out
}

/// Dev shots by subject.
pub type DevShots = BTreeMap<String, Vec<Shot>>;

/// What an MMLU root yields: test items and dev shots per subject, and the files read.
#[derive(Debug, Default)]
pub struct MmluData {
    pub items: Vec<Item>,
    pub dev: BTreeMap<String, Vec<Shot>>,
    pub files: Vec<DataFile>,
}

/// Read the dev shots of one subject file.
pub fn read_dev(path: &Path, bad: &mut BadRows) -> Result<(Vec<Shot>, DataFile)> {
    let raw = RawFile::read(path)?;
    let rows = read_csv(&raw, bad)?;
    let shots = rows
        .into_iter()
        .map(|r| Shot {
            question: r.question,
            choices: r.choices,
            correct: r.correct,
            solution: String::new(),
        })
        .collect();
    Ok((shots, raw.data_file()))
}

/// Load the `split` (usually `test`) of an MMLU root, for the subjects `keep` accepts, with
/// the dev shots of those subjects when `need_dev`.
pub fn load(
    root: &Path,
    split: &str,
    keep: &dyn Fn(&str) -> bool,
    need_dev: bool,
    bad: &mut BadRows,
) -> Result<MmluData> {
    let mut data = MmluData::default();
    let tests = subject_files(&root.join(split), &format!("_{split}.csv"));
    let devs = subject_files(&root.join("dev"), "_dev.csv");
    for (subject, path) in tests.iter().filter(|(s, _)| keep(s)) {
        if need_dev {
            match devs.get(subject) {
                Some(dev) => {
                    let (shots, file) = read_dev(dev, bad)?;
                    data.files.push(file);
                    data.dev.insert(subject.clone(), shots);
                }
                None => bad.handle(EvalError::source(
                    &root.join("dev").join(format!("{subject}_dev.csv")),
                    "missing: few-shot prompting needs the dev split (or use --shots mmlu=0)",
                ))?,
            }
        }
        let raw = RawFile::read(path)?;
        for r in read_csv(&raw, bad)? {
            data.items.push(Item {
                task: Task::Mmlu,
                subset: subject.clone(),
                subject: Some(subject.clone()),
                index: r.index,
                path: path.clone(),
                line: r.line,
                question: r.question,
                answer: Answer::Choice {
                    choices: r.choices,
                    correct: r.correct,
                },
            });
        }
        data.files.push(raw.data_file());
    }
    Ok(data)
}

/// Dev shots for every subject of an MMLU root (used for MMMLU few-shot prompting).
pub fn load_dev_all(root: &Path, bad: &mut BadRows) -> Result<(DevShots, Vec<DataFile>)> {
    let mut dev = BTreeMap::new();
    let mut files = Vec::new();
    for (subject, path) in subject_files(&root.join("dev"), "_dev.csv") {
        let (shots, file) = read_dev(&path, bad)?;
        dev.insert(subject, shots);
        files.push(file);
    }
    Ok((dev, files))
}
