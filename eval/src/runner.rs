//! The evaluation loop: prompts grouped by shared prefix, batches scored by the backend, every
//! verdict journaled before the next batch, a progress bar, and the reports at the end.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::backend::{ChoiceRequest, EvalBackend, GenerateRequest};
use crate::discovery::{Filters, Suite};
use crate::error::{EvalError, Result};
use crate::item::Item;
use crate::journal::{ItemResult, Journal, Manifest, JOURNAL, MANIFEST};
use crate::prompt::{self, ChatFrame, Completion, Prompt, PromptConfig};
use crate::report::{Results, Timings};
use crate::scoring::{score_choice, score_generation};
use crate::shard::Shard;
use crate::source::DataFile;

/// How to run an evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunConfig {
    pub prompt: PromptConfig,
    pub filters: Filters,
    /// MMLU split (`test`).
    pub split: String,
    pub skip_bad: bool,
    pub shard: Shard,
    /// Questions per backend call.
    pub batch_size: usize,
    /// Compute each few-shot prefix's KV cache once and extend copies of it.
    pub reuse_prefix: bool,
    /// Journal and reports go here.
    pub out: PathBuf,
    /// Continue the journal in `out` instead of refusing to overwrite it.
    pub resume: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            prompt: PromptConfig::default(),
            filters: Filters::default(),
            split: "test".into(),
            skip_bad: false,
            shard: Shard::default(),
            batch_size: 8,
            reuse_prefix: true,
            out: PathBuf::from("eval-out"),
            resume: false,
            progress: true,
        }
    }
}

impl RunConfig {
    /// The options that decide results (recorded in the manifest and the fingerprint).
    pub fn results_config(&self) -> serde_json::Value {
        serde_json::json!({
            "prompt": self.prompt,
            "filters": self.filters,
            "split": self.split,
            "skip_bad": self.skip_bad,
        })
    }

    /// The options that only decide speed.
    pub fn runtime_config(&self) -> serde_json::Value {
        serde_json::json!({ "batch_size": self.batch_size, "reuse_prefix": self.reuse_prefix })
    }
}

/// Build the manifest of a run over `suite` with `model`.
pub fn manifest(suite: &Suite, model: &str, cfg: &RunConfig) -> Manifest {
    let keys: Vec<String> = suite.items.iter().map(Item::key).collect();
    let config = cfg.results_config();
    // Checksums with file names only, so shards on machines with other paths still merge.
    let data_ids: Vec<DataFile> = suite
        .files
        .iter()
        .map(|f| DataFile {
            path: std::path::Path::new(&f.path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256: f.sha256.clone(),
        })
        .collect();
    Manifest {
        model: model.to_string(),
        fingerprint: Manifest::compute_fingerprint(model, &config, &data_ids, &keys),
        config,
        runtime: cfg.runtime_config(),
        data: suite.files.clone(),
        skipped: suite.skipped.clone(),
        items_all: keys.len(),
        shard: cfg.shard,
        items_shard: cfg.shard.range(keys.len()).len(),
    }
}

/// A group's first prompt (its prefix is everyone's) and its members.
type PromptGroup<'a> = (Prompt, Vec<(&'a Item, Prompt)>);

/// Prompts grouped by shared prefix, in first-seen order.
fn group_prompts<'a>(
    items: &[&'a Item],
    suite: &Suite,
    cfg: &PromptConfig,
    chat: Option<&ChatFrame>,
) -> Result<Vec<PromptGroup<'a>>> {
    let mut groups: Vec<PromptGroup> = Vec::new();
    let mut pos: HashMap<String, usize> = HashMap::new();
    for &item in items {
        let mut p = prompt::build(item, suite, cfg)?;
        if let Some(frame) = chat {
            frame.apply(&mut p);
        }
        let g = *pos.entry(p.group.clone()).or_insert_with(|| {
            groups.push((p.clone(), Vec::new()));
            groups.len() - 1
        });
        if groups[g].0.prefix != p.prefix {
            return Err(EvalError::Config(format!(
                "prompt group {} has two different prefixes",
                p.group
            )));
        }
        groups[g].1.push((item, p));
    }
    Ok(groups)
}

/// Token ids of `body` as it continues `prefix`: the joint encoding's tail when the prefix
/// tokens are a prefix of it (so tokens match encoding the whole prompt), else `encode(body)`.
fn body_tokens(
    backend: &dyn EvalBackend,
    prefix: &str,
    prefix_ids: &[u32],
    body: &str,
) -> Result<Vec<u32>> {
    if !prefix.is_empty() {
        let joint = backend.encode(&format!("{prefix}{body}"))?;
        if joint.starts_with(prefix_ids) {
            return Ok(joint[prefix_ids.len()..].to_vec());
        }
    }
    backend.encode(body)
}

fn progress_bar(cfg: &RunConfig, len: usize, done: usize) -> ProgressBar {
    let target = if cfg.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len as u64), target);
    if let Ok(style) = ProgressStyle::with_template(
        "{elapsed_precise} [{bar:30}] {pos}/{len} items  {per_sec}  ETA {eta}  {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_position(done as u64);
    bar.reset_eta();
    bar
}

/// One item's request to the backend.
#[derive(Debug, Clone)]
pub enum Request {
    Choice(ChoiceRequest),
    Generate(GenerateRequest),
}

impl Request {
    fn body_len(&self) -> usize {
        match self {
            Request::Choice(r) => r.body.len(),
            Request::Generate(r) => r.body.len(),
        }
    }
}

/// A prompt group in tokens: the shared prefix and each item's request.
pub struct TokenGroup<'a> {
    pub name: String,
    pub prefix: Vec<u32>,
    pub requests: Vec<(&'a Item, Request)>,
}

fn chat_frame(backend: &dyn EvalBackend, cfg: &RunConfig) -> Result<Option<ChatFrame>> {
    if cfg.prompt.chat {
        Ok(Some(ChatFrame::new(|u| backend.chat_wrap(u))?))
    } else {
        Ok(None)
    }
}

/// Tokenize a group of prompts.
pub fn tokenize_group<'a>(
    backend: &dyn EvalBackend,
    head: &Prompt,
    members: &[(&'a Item, Prompt)],
    max_new_tokens: usize,
) -> Result<TokenGroup<'a>> {
    let prefix = backend.encode(&head.prefix)?;
    let mut cont_ids: HashMap<String, Vec<u32>> = HashMap::new();
    let mut requests = Vec::with_capacity(members.len());
    for (item, p) in members {
        let body = body_tokens(backend, &head.prefix, &prefix, &p.body)?;
        let req = match &p.completion {
            Completion::Choice { continuations } => {
                let mut conts = Vec::with_capacity(continuations.len());
                for c in continuations {
                    if !cont_ids.contains_key(c) {
                        cont_ids.insert(c.clone(), backend.encode(c)?);
                    }
                    conts.push(cont_ids[c].clone());
                }
                Request::Choice(ChoiceRequest {
                    body,
                    continuations: conts,
                })
            }
            Completion::Generate { stop } => Request::Generate(GenerateRequest {
                body,
                max_new_tokens,
                stop: stop.clone(),
            }),
        };
        requests.push((*item, req));
    }
    Ok(TokenGroup {
        name: head.group.clone(),
        prefix,
        requests,
    })
}

/// Score one batch of a group (all requests of one kind, as a group's are).
fn score_batch(
    backend: &mut dyn EvalBackend,
    prefix: &[u32],
    batch: &[(&Item, Request)],
    reuse: bool,
) -> Result<Vec<ItemResult>> {
    let mismatch =
        |n: usize| EvalError::Backend(format!("{n} results for {} questions", batch.len()));
    let choices: Vec<ChoiceRequest> = batch
        .iter()
        .filter_map(|(_, r)| match r {
            Request::Choice(c) => Some(c.clone()),
            Request::Generate(_) => None,
        })
        .collect();
    if choices.len() == batch.len() {
        let lls = backend.choice_loglikelihoods(prefix, &choices, reuse)?;
        if lls.len() != batch.len() {
            return Err(mismatch(lls.len()));
        }
        return Ok(batch
            .iter()
            .zip(lls)
            .map(|((item, _), ll)| score_choice(item, ll))
            .collect());
    }
    let gens: Vec<GenerateRequest> = batch
        .iter()
        .filter_map(|(_, r)| match r {
            Request::Generate(g) => Some(g.clone()),
            Request::Choice(_) => None,
        })
        .collect();
    if gens.len() != batch.len() {
        return Err(EvalError::Config(
            "a prompt group mixes scoring kinds".into(),
        ));
    }
    let texts = backend.generate_greedy(prefix, &gens, reuse)?;
    if texts.len() != batch.len() {
        return Err(mismatch(texts.len()));
    }
    Ok(batch
        .iter()
        .zip(texts)
        .map(|((item, _), t)| score_generation(item, t))
        .collect())
}

/// The exact token ids of every prompt of `suite` (this shard), for reference
/// implementations (`--dump-requests`): `{"model", "groups": {name: prefix ids},
/// "items": [{"key", "group", "body", "continuations" | "stop" + "max_new_tokens"}]}`.
pub fn dump_requests(
    suite: &Suite,
    backend: &dyn EvalBackend,
    cfg: &RunConfig,
) -> Result<serde_json::Value> {
    let mine: Vec<&Item> = suite.items[cfg.shard.range(suite.items.len())]
        .iter()
        .collect();
    let chat = chat_frame(backend, cfg)?;
    let groups = group_prompts(&mine, suite, &cfg.prompt, chat.as_ref())?;
    let mut prefixes = serde_json::Map::new();
    let mut items = Vec::new();
    for (head, members) in &groups {
        let g = tokenize_group(backend, head, members, cfg.prompt.max_new_tokens)?;
        prefixes.insert(g.name.clone(), serde_json::json!(g.prefix));
        for (item, r) in g.requests {
            items.push(match r {
                Request::Choice(c) => serde_json::json!({
                    "key": item.key(), "group": g.name, "target": item.target(),
                    "body": c.body, "continuations": c.continuations,
                }),
                Request::Generate(q) => serde_json::json!({
                    "key": item.key(), "group": g.name, "target": item.target(),
                    "body": q.body, "stop": q.stop, "max_new_tokens": q.max_new_tokens,
                }),
            });
        }
    }
    Ok(serde_json::json!({
        "model": backend.model_name(),
        "groups": prefixes,
        "items": items,
    }))
}

/// Tokens one request needs in a forward pass: prefix, body and the longest continuation
/// (multiple choice) or at least one generated token.
fn request_tokens(prefix: usize, r: &Request) -> usize {
    match r {
        Request::Choice(c) => {
            prefix + c.body.len() + c.continuations.iter().map(Vec::len).max().unwrap_or(0)
        }
        Request::Generate(g) => prefix + g.body.len() + 1,
    }
}

/// Token groups, and the items too long for the context with the tokens each needs.
type TokenizedSuite<'a> = (Vec<TokenGroup<'a>>, Vec<(&'a Item, usize)>);

/// Every prompt of `suite` in tokens, and the items too long for `context` (with the tokens
/// each needs). Checked for the whole suite, not one shard, so every shard skips the same items.
fn tokenize_suite<'a>(
    suite: &'a Suite,
    backend: &dyn EvalBackend,
    cfg: &RunConfig,
    chat: Option<&ChatFrame>,
) -> Result<TokenizedSuite<'a>> {
    let all: Vec<&Item> = suite.items.iter().collect();
    let groups = group_prompts(&all, suite, &cfg.prompt, chat)?;
    let mut tokenized = Vec::with_capacity(groups.len());
    let mut too_long = Vec::new();
    for (head, members) in &groups {
        let g = tokenize_group(backend, head, members, cfg.prompt.max_new_tokens)?;
        if let Some(ctx) = backend.context_len() {
            for (item, r) in &g.requests {
                let n = request_tokens(g.prefix.len(), r);
                if n > ctx {
                    too_long.push((*item, n));
                }
            }
        }
        tokenized.push(g);
    }
    Ok((tokenized, too_long))
}

/// Run (or resume) an evaluation of `suite` with `backend`; writes the journal and reports
/// into `cfg.out` and returns the results.
///
/// The output folder is locked for the whole run (an OS file lock on `.lock`): a second run on
/// the same folder is refused with the holder's pid. Prompts are tokenized and their lengths
/// checked against the model's context before anything is scored: an item that does not fit is
/// an error naming `path:line` (recorded as skipped under `--skip-bad`). A resumed journal's
/// lines are re-scored from their evidence (log-likelihoods, generations) against the items; a
/// line whose verdict disagrees is refused.
pub fn run(suite: &Suite, backend: &mut dyn EvalBackend, cfg: &RunConfig) -> Result<Results> {
    let started = Instant::now();
    let out = &cfg.out;
    std::fs::create_dir_all(out).map_err(|e| EvalError::io(out, e))?;
    let _lock = crate::lock::OutLock::acquire(out)?;

    let chat = chat_frame(backend, cfg)?;
    let (all_groups, too_long) = tokenize_suite(suite, &*backend, cfg, chat.as_ref())?;
    let ctx_len = backend.context_len().unwrap_or(usize::MAX);
    let too_long_problem = |item: &Item, n: usize| {
        format!(
            "item {} needs {n} tokens, more than the model's context of {ctx_len}",
            item.key()
        )
    };
    if let Some((item, n)) = too_long.first().filter(|_| !cfg.skip_bad) {
        return Err(EvalError::data(
            &item.path,
            item.line,
            format!(
                "{}{} (--skip-bad skips such items)",
                too_long_problem(item, *n),
                if too_long.len() > 1 {
                    format!("; {} more items are too long", too_long.len() - 1)
                } else {
                    String::new()
                }
            ),
        ));
    }
    // Under --skip-bad the long items leave the suite before its manifest is made, exactly like
    // malformed rows, and are listed as skipped.
    let filtered;
    let suite = if too_long.is_empty() {
        suite
    } else {
        let drop: std::collections::HashSet<String> =
            too_long.iter().map(|(it, _)| it.key()).collect();
        let mut s = suite.clone();
        s.items.retain(|it| !drop.contains(&it.key()));
        for (item, n) in &too_long {
            let sk = crate::item::Skipped {
                path: item.path.display().to_string(),
                line: item.line,
                problem: too_long_problem(item, *n),
            };
            tracing::warn!("skipped {}:{}: {}", sk.path, sk.line, sk.problem);
            s.skipped.push(sk);
        }
        filtered = s;
        &filtered
    };

    let manifest = manifest(suite, &backend.model_name(), cfg);
    let manifest_path = out.join(MANIFEST);
    let journal_path = out.join(JOURNAL);
    if manifest_path.exists() {
        if cfg.resume {
            let old = Manifest::read(out)?;
            if old.fingerprint != manifest.fingerprint || old.shard != manifest.shard {
                return Err(EvalError::journal(
                    &manifest_path,
                    "the journal belongs to a different run (model, options, data or shard differ); \
                     use another --out",
                ));
            }
        } else {
            let (records, _) = crate::journal::read_records(&journal_path)?;
            if !records.is_empty() {
                return Err(EvalError::journal(
                    &journal_path,
                    format!(
                        "holds {} results of an earlier run: add --resume, or use another --out",
                        records.len()
                    ),
                ));
            }
        }
    } else if cfg.resume {
        let has_journal = std::fs::metadata(&journal_path).is_ok_and(|m| m.len() > 0);
        if has_journal {
            return Err(EvalError::journal(
                &journal_path,
                "cannot resume: run.json is missing, so nothing shows which run this journal \
                 belongs to; use another --out (or delete the journal to start afresh)",
            ));
        }
        tracing::warn!("{}: nothing to resume, starting afresh", out.display());
    }
    if !cfg.resume {
        let _ = std::fs::remove_file(&journal_path);
    }
    manifest.write(out)?;
    let (mut journal, done) = Journal::open(out)?;

    let mine = &suite.items[cfg.shard.range(suite.items.len())];
    let mut records: BTreeMap<String, ItemResult> = BTreeMap::new();
    let mut pending: std::collections::HashSet<String> = std::collections::HashSet::new();
    for item in mine {
        match done.get(&item.key()) {
            Some((line, r)) => {
                rescore_check(item, r).map_err(|p| EvalError::data(&journal_path, *line, p))?;
                records.insert(r.key.clone(), r.clone());
            }
            None => {
                pending.insert(item.key());
            }
        }
    }
    tracing::info!(
        shard = %cfg.shard,
        items = mine.len(),
        resumed = records.len(),
        pending = pending.len(),
        "evaluation"
    );

    let cpu_start = crate::report::process_cpu_seconds();
    let bar = progress_bar(cfg, mine.len(), records.len());
    let mut correct = records.values().filter(|r| r.correct).count();
    let mut timings = Timings::default();
    let batch_size = cfg.batch_size.max(1);
    for mut group in all_groups {
        group
            .requests
            .retain(|(item, _)| pending.contains(&item.key()));
        if group.requests.is_empty() {
            continue;
        }
        // Similar lengths together: less padding in a batch. Order does not change results.
        group.requests.sort_by_key(|(_, r)| r.body_len());
        for batch in group.requests.chunks(batch_size) {
            let t0 = Instant::now();
            let results = score_batch(backend, &group.prefix, batch, cfg.reuse_prefix)?;
            journal.append(&results)?;
            let dt = t0.elapsed().as_secs_f64();
            for r in results {
                correct += usize::from(r.correct);
                let tt = timings
                    .by_task
                    .entry(r.task.name().to_string())
                    .or_default();
                tt.scored += 1;
                tt.seconds += dt / batch.len() as f64;
                records.insert(r.key.clone(), r);
            }
            timings.scored += batch.len();
            bar.inc(batch.len() as u64);
            bar.set_message(format!(
                "acc {:.2}%  [{}]",
                100.0 * correct as f64 / records.len().max(1) as f64,
                group.name
            ));
        }
    }
    bar.finish_and_clear();
    timings.wall_s = started.elapsed().as_secs_f64();
    timings.cpu_s = crate::report::process_cpu_seconds() - cpu_start;
    timings.items_per_cpu_s = timings.scored as f64 / timings.cpu_s.max(1e-9);
    for tt in timings.by_task.values_mut() {
        tt.items_per_s = tt.scored as f64 / tt.seconds.max(1e-9);
    }
    let scoring_s: f64 = timings.by_task.values().map(|t| t.seconds).sum();
    timings.items_per_s = timings.scored as f64 / scoring_s.max(1e-9);
    let results = Results::build(
        &manifest,
        vec![cfg.shard],
        records.into_values().collect(),
        timings,
    );
    results.write(out)?;
    Ok(results)
}

/// Re-score a journaled record from its own evidence against its item: the target must be the
/// item's, and prediction and `correct` must be what scoring the stored log-likelihoods or
/// generation gives.
fn rescore_check(item: &Item, r: &ItemResult) -> std::result::Result<(), String> {
    if r.target != item.target() {
        return Err(format!(
            "entry for {} has target {:?}, but the item's answer is {:?}",
            r.key,
            r.target,
            item.target()
        ));
    }
    let again = match (&r.logliks, &r.generation) {
        (Some(lls), _) if matches!(item.answer, crate::item::Answer::Choice { .. }) => {
            score_choice(item, lls.clone())
        }
        (_, Some(text)) if !matches!(item.answer, crate::item::Answer::Choice { .. }) => {
            score_generation(item, text.clone())
        }
        _ => {
            return Err(format!(
                "entry for {} lacks the evidence its item is scored from",
                r.key
            ))
        }
    };
    if again.prediction != r.prediction || again.correct != r.correct {
        return Err(format!(
            "entry for {} says prediction {:?} (correct={}), but its evidence gives {:?} (correct={})",
            r.key, r.prediction, r.correct, again.prediction, again.correct
        ));
    }
    Ok(())
}
