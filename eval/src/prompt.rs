//! Prompt text for every task. A prompt is a few-shot `prefix`, identical for all items of a
//! group (subject / language), and an item `body`; the model continues after the body.
//!
//! - MMLU (Hendrycks et al.'s format): "The following are multiple choice questions (with
//!   answers) about {subject}.\n\n", then `k` dev examples "{q}\nA. {a}\n…\nAnswer: {L}\n\n",
//!   then "{q}\nA. {a}\n…\nAnswer:"; scored on the continuations " A".." D".
//! - MMMLU: the same layout, 0-shot by default; with shots, the English MMLU dev examples of
//!   the row's subject.
//! - MGSM: the language's exemplars "{q}\n{a}\n\n" (native chain of thought), then
//!   "{question prefix}{q}\n{answer prefix}"; greedy generation until a blank line or the next
//!   question prefix.
//! - JSONL: multiple choice like MMLU without a subject, 0-shot; generation as
//!   "Question: {q}\nAnswer:".
//!
//! With `--chat`, prefix and body together are the user turn of the model's chat template:
//! the template's head joins the prefix and its tail (the generation prompt) joins the body,
//! so the prefix is still shared; choices are then "A".."D" (the assistant turn starts afresh).

use serde::{Deserialize, Serialize};

use crate::discovery::Suite;
use crate::error::{EvalError, Result};
use crate::item::{letter, Answer, Item, Shot, Task};

/// Prompting options (`--shots`, `--chat`, `--max-new-tokens`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptConfig {
    pub mmlu_shots: usize,
    pub mmmlu_shots: usize,
    pub mgsm_shots: usize,
    pub chat: bool,
    pub max_new_tokens: usize,
}

impl Default for PromptConfig {
    fn default() -> Self {
        PromptConfig {
            mmlu_shots: 5,
            mmmlu_shots: 0,
            mgsm_shots: 8,
            chat: false,
            max_new_tokens: 256,
        }
    }
}

impl PromptConfig {
    /// Apply `--shots`: `N` (every task) or `task=N[,task=N…]`.
    pub fn set_shots(&mut self, spec: &str) -> Result<()> {
        let bad = || EvalError::Config(format!("--shots {spec:?}: expected N or task=N[,task=N…]"));
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (task, n) = match part.split_once('=') {
                Some((t, n)) => (Some(t.parse::<Task>().map_err(EvalError::Config)?), n),
                None => (None, part),
            };
            let n: usize = n.trim().parse().map_err(|_| bad())?;
            match task {
                None => (self.mmlu_shots, self.mmmlu_shots, self.mgsm_shots) = (n, n, n),
                Some(Task::Mmlu) => self.mmlu_shots = n,
                Some(Task::Mmmlu) => self.mmmlu_shots = n,
                Some(Task::Mgsm) => self.mgsm_shots = n,
                Some(Task::Jsonl) => {
                    return Err(EvalError::Config(
                        "--shots: JSONL prompts are 0-shot".into(),
                    ))
                }
            }
        }
        Ok(())
    }
}

/// How the model's continuation is scored.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    /// Log-likelihood of each continuation string (" A", " B", …).
    Choice { continuations: Vec<String> },
    /// Greedy generation until a stop string.
    Generate { stop: Vec<String> },
}

/// One item's prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// Items of a group share `prefix` (its KV cache is computed once).
    pub group: String,
    pub prefix: String,
    pub body: String,
    pub completion: Completion,
}

const MC_HEADER: &str = "The following are multiple choice questions (with answers)";

fn mc_header(subject: Option<&str>) -> String {
    match subject {
        Some(s) if !s.is_empty() => format!("{MC_HEADER} about {}.\n\n", s.replace('_', " ")),
        _ => format!("{MC_HEADER}.\n\n"),
    }
}

/// "{q}\nA. {a}\nB. {b}…\nAnswer:" and, for a shot, " {L}\n\n".
pub fn mc_example(question: &str, choices: &[String], answer: Option<usize>) -> String {
    let mut s = question.to_string();
    for (j, c) in choices.iter().enumerate() {
        s.push_str(&format!("\n{}. {}", letter(j), c));
    }
    s.push_str("\nAnswer:");
    if let Some(a) = answer {
        s.push_str(&format!(" {}\n\n", letter(a)));
    }
    s
}

fn mc_shots(shots: &[Shot], k: usize) -> String {
    shots
        .iter()
        .take(k)
        .map(|s| mc_example(&s.question, &s.choices, Some(s.correct)))
        .collect()
}

fn continuations(n: usize, chat: bool) -> Vec<String> {
    (0..n)
        .map(|i| {
            if chat {
                letter(i)
            } else {
                format!(" {}", letter(i))
            }
        })
        .collect()
}

/// Build the prompt of `item` (without the chat template; see [`ChatFrame`]).
pub fn build(item: &Item, suite: &Suite, cfg: &PromptConfig) -> Result<Prompt> {
    let subject = item.subject.as_deref();
    match (&item.answer, item.task) {
        (Answer::Choice { choices, .. }, task) => {
            let (group, shots) = match task {
                Task::Mmlu => (format!("mmlu/{}", item.subset), cfg.mmlu_shots),
                Task::Mmmlu => (
                    format!("mmmlu/{}/{}", item.subset, subject.unwrap_or("")),
                    cfg.mmmlu_shots,
                ),
                _ => (format!("{}/{}/choice", item.task, item.subset), 0),
            };
            let mut prefix = mc_header(if task == Task::Jsonl { None } else { subject });
            if shots > 0 {
                let s = subject.unwrap_or("");
                let dev = suite.mmlu_dev.get(s).ok_or_else(|| {
                    EvalError::data(
                        &item.path,
                        item.line,
                        format!("no MMLU dev examples for subject {s:?} ({shots}-shot prompt)"),
                    )
                })?;
                if dev.len() < shots {
                    return Err(EvalError::data(
                        &item.path,
                        item.line,
                        format!(
                            "{shots}-shot prompt but subject {s:?} has {} dev examples",
                            dev.len()
                        ),
                    ));
                }
                prefix.push_str(&mc_shots(dev, shots));
            }
            Ok(Prompt {
                group,
                prefix,
                body: mc_example(&item.question, choices, None),
                completion: Completion::Choice {
                    continuations: continuations(choices.len(), cfg.chat),
                },
            })
        }
        (_, Task::Mgsm) => {
            let fallback;
            let style = match suite.mgsm.get(&item.subset) {
                Some(s) => s,
                None if cfg.mgsm_shots == 0 => {
                    fallback = crate::mgsm::MgsmStyle::english_default();
                    &fallback
                }
                None => {
                    return Err(EvalError::data(
                        &item.path,
                        item.line,
                        format!("no exemplars for language {:?}: put exemplars.json beside the TSV or use --shots mgsm=0", item.subset),
                    ))
                }
            };
            if style.shots.len() < cfg.mgsm_shots {
                return Err(EvalError::data(
                    &item.path,
                    item.line,
                    format!(
                        "{}-shot prompt but language {:?} has {} exemplars",
                        cfg.mgsm_shots,
                        item.subset,
                        style.shots.len()
                    ),
                ));
            }
            let prefix: String = style.shots[..cfg.mgsm_shots]
                .iter()
                .map(|s| format!("{}\n{}\n\n", s.question, s.solution))
                .collect();
            Ok(Prompt {
                group: format!("mgsm/{}", item.subset),
                prefix,
                body: format!(
                    "{}{}\n{}",
                    style.question_prefix, item.question, style.answer_prefix
                ),
                completion: Completion::Generate {
                    stop: vec!["\n\n".into(), style.question_prefix.trim_end().to_string()],
                },
            })
        }
        _ => Ok(Prompt {
            group: format!("{}/{}/generate", item.task, item.subset),
            prefix: String::new(),
            body: format!("Question: {}\nAnswer:", item.question),
            completion: Completion::Generate {
                stop: vec!["\n\n".into(), "Question:".into()],
            },
        }),
    }
}

/// The chat template split around the user text: `head + user + tail`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatFrame {
    pub head: String,
    pub tail: String,
}

const SENTINEL: &str = "\u{1}AFM_EVAL_USER_TEXT\u{1}";

impl ChatFrame {
    /// Find head and tail by wrapping a sentinel with `wrap` (the backend's chat template).
    pub fn new(wrap: impl Fn(&str) -> Result<String>) -> Result<Self> {
        let wrapped = wrap(SENTINEL)?;
        let (head, tail) = wrapped.split_once(SENTINEL).ok_or_else(|| {
            EvalError::Backend("the chat template does not contain the user text verbatim".into())
        })?;
        Ok(ChatFrame {
            head: head.to_string(),
            tail: tail.to_string(),
        })
    }

    /// Put a prompt inside the template: the head joins the prefix, the tail the body.
    pub fn apply(&self, p: &mut Prompt) {
        p.prefix = format!("{}{}", self.head, p.prefix);
        p.body = format!("{}{}", p.body, self.tail);
    }
}
