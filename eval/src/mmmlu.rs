//! MMMLU (OpenAI's multilingual MMLU): one CSV per language, `mmlu_XX-YY.csv`, with the header
//! `,Question,A,B,C,D,Answer,Subject` (the first, unnamed column is a row index).

use std::path::Path;

use crate::error::{EvalError, Result};
use crate::item::{Answer, Item, Task};
use crate::mmlu::parse_letter;
use crate::source::{csv_rows, BadRows, RawFile};

/// The language of an MMMLU file name: `mmlu_FR-FR.csv` → `FR-FR`.
pub fn language_of(file_name: &str) -> Option<String> {
    let lang = file_name.strip_prefix("mmlu_")?.strip_suffix(".csv")?;
    let ok = !lang.is_empty()
        && lang.contains('-')
        && lang
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    ok.then(|| lang.to_string())
}

const COLUMNS: [&str; 7] = ["Question", "A", "B", "C", "D", "Answer", "Subject"];

/// Read one MMMLU language file. `keep_subject` filters on the `Subject` column.
pub fn read(
    path: &Path,
    language: &str,
    keep_subject: &dyn Fn(&str) -> bool,
    bad: &mut BadRows,
) -> Result<(Vec<Item>, RawFile)> {
    let raw = RawFile::read(path)?;
    let mut rows = csv_rows(&raw).into_iter();
    let (hline, header) = match rows.next() {
        None => {
            return Err(EvalError::source(
                path,
                "empty file (expected a header row)",
            ))
        }
        Some(h) => h?,
    };
    let header: Vec<String> = header
        .iter()
        .map(|h| h.trim_start_matches('\u{feff}').trim().to_string())
        .collect();
    let mut cols = [0usize; 7];
    for (k, name) in COLUMNS.iter().enumerate() {
        cols[k] = header.iter().position(|h| h == name).ok_or_else(|| {
            EvalError::data(
                path,
                hline,
                format!(
                    "header has no `{name}` column (expected `,Question,A,B,C,D,Answer,Subject`)"
                ),
            )
        })?;
    }
    let width = header.len();
    let mut items = Vec::new();
    for (index, rec) in rows.enumerate() {
        let parsed = rec.and_then(|(line, f)| {
            if f.len() != width {
                return Err(EvalError::data(
                    path,
                    line,
                    format!(
                        "expected {width} columns like the header, found {}",
                        f.len()
                    ),
                ));
            }
            let correct = parse_letter(path, line, &f[cols[5]])?;
            Ok(Item {
                task: Task::Mmmlu,
                subset: language.to_string(),
                subject: Some(f[cols[6]].trim().to_string()),
                index,
                path: path.to_path_buf(),
                line,
                question: f[cols[0]].clone(),
                answer: Answer::Choice {
                    choices: cols[1..5].iter().map(|&c| f[c].clone()).collect(),
                    correct,
                },
            })
        });
        match parsed {
            Ok(item) if keep_subject(item.subject.as_deref().unwrap_or("")) => items.push(item),
            Ok(_) => {}
            Err(e) => bad.handle(e)?,
        }
    }
    Ok((items, raw))
}
