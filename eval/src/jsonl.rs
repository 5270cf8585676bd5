//! A generic JSONL format, one object per line:
//! `{"question": "...", "choices": ["...", ...], "answer": 2 | "C" | "<choice text>"}` (multiple
//! choice) or `{"question": "...", "answer": "42" | 42 | "text"}` (generation; numbers are
//! scored like MGSM, text by exact match).

use std::path::Path;

use serde_json::Value;

use crate::error::{EvalError, Result};
use crate::item::{Answer, Item, Task};
use crate::mgsm::normalise_number;
use crate::source::{utf8, BadRows, RawFile};

fn parse_line(path: &Path, line: usize, text: &str) -> Result<(String, Answer)> {
    let err = |p: String| EvalError::data(path, line, p);
    let v: Value = serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?;
    let question = v
        .get("question")
        .and_then(Value::as_str)
        .ok_or_else(|| err("no string field `question`".into()))?
        .to_string();
    let answer = v
        .get("answer")
        .ok_or_else(|| err("no field `answer`".into()))?;
    match v.get("choices") {
        Some(Value::Array(cs)) => {
            let choices: Vec<String> = cs
                .iter()
                .map(|c| c.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| err("`choices` must be an array of strings".into()))?;
            if choices.len() < 2 || choices.len() > 26 {
                return Err(err(format!(
                    "`choices` has {} entries (2..=26 allowed)",
                    choices.len()
                )));
            }
            let correct = match answer {
                Value::Number(n) => n.as_u64().map(|n| n as usize),
                Value::String(s) => {
                    let s = s.trim();
                    let by_letter = (s.len() == 1)
                        .then(|| s.as_bytes()[0])
                        .filter(u8::is_ascii_uppercase)
                        .map(|b| (b - b'A') as usize);
                    by_letter.or_else(|| choices.iter().position(|c| c == s))
                }
                _ => None,
            }
            .filter(|&i| i < choices.len())
            .ok_or_else(|| {
                err(format!(
                    "answer {answer} is not a choice index, letter A..{} or choice text",
                    crate::item::letter(choices.len() - 1)
                ))
            })?;
            Ok((question, Answer::Choice { choices, correct }))
        }
        Some(_) => Err(err("`choices` must be an array of strings".into())),
        None => {
            let s = match answer {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                _ => return Err(err("`answer` must be a string or a number".into())),
            };
            Ok(match normalise_number(&s) {
                Some(value) => (question, Answer::Number { value }),
                None => (
                    question,
                    Answer::Text {
                        value: s.trim().to_string(),
                    },
                ),
            })
        }
    }
}

/// Read one JSONL file; the subset is the file stem.
pub fn read(path: &Path, subset: &str, bad: &mut BadRows) -> Result<(Vec<Item>, RawFile)> {
    let raw = RawFile::read(path)?;
    let mut items = Vec::new();
    let mut index = 0;
    for (line, bytes) in raw.lines() {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = utf8(path, line, bytes).and_then(|t| parse_line(path, line, t));
        match parsed {
            Ok((question, answer)) => items.push(Item {
                task: Task::Jsonl,
                subset: subset.to_string(),
                subject: None,
                index,
                path: path.to_path_buf(),
                line,
                question,
                answer,
            }),
            Err(e) => bad.handle(e)?,
        }
        index += 1;
    }
    Ok((items, raw))
}
