//! MGSM: one TSV per language (`mgsm_xx.tsv`, `question<TAB>answer`, no header, no quoting)
//! and the 8 chain-of-thought exemplars per language in `exemplars.json`
//! (`{"MGSM_EXEMPLARS": {"en": {"1": {"q": "Question: …", "a": "Step-by-Step Answer: …"}}}}`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{EvalError, Result};
use crate::item::{Answer, Item, Shot, Task};
use crate::source::{utf8, BadRows, RawFile};

/// The language of an MGSM file name: `mgsm_en.tsv` → `en`.
pub fn language_of(file_name: &str) -> Option<String> {
    let lang = file_name.strip_prefix("mgsm_")?.strip_suffix(".tsv")?;
    let ok = !lang.is_empty() && lang.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    ok.then(|| lang.to_string())
}

/// Normalise a numeric answer: commas removed, must parse as a number.
pub fn normalise_number(s: &str) -> Option<String> {
    let t: String = s.trim().chars().filter(|&c| c != ',').collect();
    let v: f64 = t.parse().ok()?;
    v.is_finite().then_some(t)
}

/// Read one MGSM TSV file.
pub fn read_tsv(path: &Path, language: &str, bad: &mut BadRows) -> Result<(Vec<Item>, RawFile)> {
    let raw = RawFile::read(path)?;
    let mut items = Vec::new();
    for (index, (line, bytes)) in raw.lines().into_iter().enumerate() {
        let parsed = utf8(path, line, bytes).and_then(|text| {
            let fields: Vec<&str> = text.split('\t').collect();
            if fields.len() != 2 {
                return Err(EvalError::data(
                    path,
                    line,
                    format!(
                        "expected 2 tab-separated columns (question, answer), found {}",
                        fields.len()
                    ),
                ));
            }
            let value = normalise_number(fields[1]).ok_or_else(|| {
                EvalError::data(
                    path,
                    line,
                    format!("answer {:?} is not a number", fields[1]),
                )
            })?;
            Ok(Item {
                task: Task::Mgsm,
                subset: language.to_string(),
                subject: None,
                index,
                path: path.to_path_buf(),
                line,
                question: fields[0].to_string(),
                answer: Answer::Number { value },
            })
        });
        match parsed {
            Ok(item) => items.push(item),
            Err(e) => bad.handle(e)?,
        }
    }
    Ok((items, raw))
}

/// How one language writes its chain-of-thought prompts.
#[derive(Debug, Clone, PartialEq)]
pub struct MgsmStyle {
    /// Put before a question, e.g. `"Question: "`, `"問題："`, `"Question : "`.
    pub question_prefix: String,
    /// Ends the prompt; the model continues after it, e.g. `"Step-by-Step Answer:"`.
    pub answer_prefix: String,
    /// Exemplars in order; `question` and `solution` carry their prefixes.
    pub shots: Vec<Shot>,
}

impl MgsmStyle {
    /// English prompts without exemplars (0-shot when no exemplars file is present).
    pub fn english_default() -> Self {
        MgsmStyle {
            question_prefix: "Question: ".into(),
            answer_prefix: "Step-by-Step Answer:".into(),
            shots: Vec::new(),
        }
    }
}

/// `"Question: Roger…"` → `"Question: "`: up to the first `:`/`：` and the spaces after it.
fn prefix_of(s: &str) -> Option<&str> {
    let colon = s.find([':', '：'])?;
    let after = colon + s[colon..].chars().next()?.len_utf8();
    let spaces = s[after..].len() - s[after..].trim_start().len();
    Some(&s[..after + spaces])
}

/// Read `exemplars.json`: the style of every language it holds.
pub fn read_exemplars(path: &Path) -> Result<(BTreeMap<String, MgsmStyle>, RawFile)> {
    let raw = RawFile::read(path)?;
    let text = utf8(path, 1, &raw.bytes)?;
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| EvalError::data(path, e.line(), format!("invalid JSON: {e}")))?;
    let langs = json
        .get("MGSM_EXEMPLARS")
        .and_then(|v| v.as_object())
        .ok_or_else(|| EvalError::source(path, "no `MGSM_EXEMPLARS` object"))?;
    let mut out = BTreeMap::new();
    for (lang, ex) in langs {
        let ex = ex.as_object().ok_or_else(|| {
            EvalError::source(path, format!("MGSM_EXEMPLARS.{lang} is not an object"))
        })?;
        let mut numbered: Vec<(u64, &serde_json::Value)> = Vec::new();
        for (k, v) in ex {
            let n = k.parse().map_err(|_| {
                EvalError::source(
                    path,
                    format!("MGSM_EXEMPLARS.{lang}: key {k:?} is not a number"),
                )
            })?;
            numbered.push((n, v));
        }
        numbered.sort_by_key(|(n, _)| *n);
        let mut shots = Vec::new();
        let (mut qp, mut ap): (Option<String>, Option<String>) = (None, None);
        for (n, v) in numbered {
            let field = |name: &str| {
                v.get(name).and_then(|s| s.as_str()).ok_or_else(|| {
                    EvalError::source(
                        path,
                        format!("MGSM_EXEMPLARS.{lang}.{n}: no string `{name}`"),
                    )
                })
            };
            let (q, a) = (field("q")?, field("a")?);
            let (this_qp, this_ap) = match (prefix_of(q), prefix_of(a)) {
                (Some(x), Some(y)) => (x.to_string(), y.trim_end().to_string()),
                _ => {
                    return Err(EvalError::source(
                        path,
                        format!("MGSM_EXEMPLARS.{lang}.{n}: `q` and `a` must start with a prefix ending in ':'"),
                    ))
                }
            };
            for (seen, this, what) in [(&mut qp, this_qp, "question"), (&mut ap, this_ap, "answer")]
            {
                match seen {
                    Some(s) if *s != this => {
                        return Err(EvalError::source(
                            path,
                            format!(
                            "MGSM_EXEMPLARS.{lang}.{n}: {what} prefix {this:?} differs from {s:?}"
                        ),
                        ))
                    }
                    Some(_) => {}
                    None => *seen = Some(this),
                }
            }
            shots.push(Shot {
                question: q.to_string(),
                choices: Vec::new(),
                correct: 0,
                solution: a.to_string(),
            });
        }
        if let (Some(question_prefix), Some(answer_prefix)) = (qp, ap) {
            out.insert(
                lang.clone(),
                MgsmStyle {
                    question_prefix,
                    answer_prefix,
                    shots,
                },
            );
        }
    }
    Ok((out, raw))
}
