//! `afm-vl eval FOLDER...` and `afm-vl eval merge SHARD_DIR...`.

use std::path::PathBuf;
use std::time::Duration;

use afm_eval::discovery::{self, Filters, LoadOptions};
use afm_eval::item::Task;
use afm_eval::prompt::PromptConfig;
use afm_eval::runner::{self, RunConfig};
use afm_eval::shard::Shard;
use afm_eval::EvalBackend;
use anyhow::Context as _;

use super::Context;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<EvalCommand>,
    /// Boxed: keeps the CLI's command enum small.
    #[command(flatten)]
    pub run: Box<RunArgs>,
}

#[derive(clap::Subcommand, Debug)]
pub enum EvalCommand {
    /// Combine the output folders of `--shard K/N` runs into one report.
    Merge(MergeArgs),
}

#[derive(clap::Args, Debug)]
pub struct MergeArgs {
    /// Output folders of the shards (each with run.json and journal.jsonl).
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Where to write results.json and results.md.
    #[arg(long, default_value = "eval-merged")]
    pub out: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Benchmark folders or files: MMLU (dev/ + test/), mmlu_XX-YY.csv (MMMLU), mgsm_xx.tsv
    /// (MGSM, with exemplars.json beside), *.jsonl.
    #[arg(required = true)]
    pub folders: Vec<PathBuf>,
    /// Model folder (config.json, model.safetensors, tokenizer.json). Default: $AFM_VL_MODEL,
    /// else the converted SmolLM2-135M-Instruct next to the executable, else in the data
    /// directory (README, "Default paths").
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// A LoRA adapter directory (PEFT layout) put on the model for the whole run; the report's
    /// model name then reads `MODEL+ADAPTER`.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Inference dtype: fp32 (default; matches the HF reference), bf16, fp16 or auto.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// Tasks to run, comma-separated: mmlu, mmmlu, mgsm, jsonl (default: all found).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// MMLU subjects / MMMLU Subject values, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub subjects: Vec<String>,
    /// MMMLU / MGSM languages, comma-separated; `fr` matches `fr` and `FR-FR` (default: all).
    #[arg(long, value_delimiter = ',')]
    pub languages: Vec<String>,
    /// At most N items per subject / language / file (the first ones).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Few-shot examples: N for every task, or task=N[,task=N] (defaults mmlu=5, mmmlu=0, mgsm=8).
    #[arg(long)]
    pub shots: Option<String>,
    /// Wrap prompts in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Generation length limit (MGSM, JSONL generation).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// MMLU split to evaluate.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// English MMLU folder (or its dev/) for few-shot MMMLU prompts (default: an MMLU folder given).
    #[arg(long)]
    pub dev_dir: Option<PathBuf>,
    /// Questions per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Recompute the few-shot prefix for every question (for speed comparisons).
    #[arg(long)]
    pub no_prefix_reuse: bool,
    /// Output folder: journal.jsonl, run.json, results.json, results.md.
    #[arg(long, default_value = "eval-out")]
    pub out: PathBuf,
    /// Continue an interrupted run in --out (items already journaled are not scored again).
    #[arg(long)]
    pub resume: bool,
    /// Run only shard K of N (0-based K; contiguous ranges in a fixed order).
    #[arg(long)]
    pub shard: Option<String>,
    /// Record and skip malformed rows and files instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
    /// Write the exact token ids of every prompt (JSON) to FILE and exit without scoring
    /// (feeds reference implementations such as eval/reference/hf_reference.py).
    #[arg(long, value_name = "FILE")]
    pub dump_requests: Option<PathBuf>,
    /// Backend: `model` (the text model) or `hash` (a deterministic test double, no model).
    #[arg(long, default_value = "model", hide = true)]
    pub backend: String,
    /// With `--backend hash`: sleep this long per item (tests kill a run midway).
    #[arg(long, default_value_t = 0, hide = true)]
    pub fake_delay_ms: u64,
    /// With `--backend hash`: report this context length (tests of the prompt-length check).
    #[arg(long, hide = true)]
    pub fake_context: Option<usize>,
}

fn parse_tasks(names: &[String]) -> anyhow::Result<Vec<Task>> {
    names
        .iter()
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.parse::<Task>().map_err(anyhow::Error::msg))
        .collect()
}

fn open_backend(ctx: &Context, a: &RunArgs) -> anyhow::Result<Box<dyn EvalBackend>> {
    match a.backend.as_str() {
        "hash" => Ok(Box::new(afm_eval::fake_backend::HashBackend {
            delay: Duration::from_millis(a.fake_delay_ms),
            context: a.fake_context,
            ..Default::default()
        })),
        "model" => {
            let device = ctx.device()?;
            let dtype = afm_eval::text_backend::parse_dtype(&a.dtype, device)?;
            let dir = super::model_or_default(&a.model)?;
            afm_eval::text_backend::open_dir(&dir, device, dtype, a.adapter.as_deref())
                .with_context(|| format!("loading the model {}", dir.display()))
        }
        other => anyhow::bail!("unknown --backend {other:?} (model or hash)"),
    }
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    if let Some(EvalCommand::Merge(m)) = args.command {
        let results = afm_eval::merge::merge(&m.dirs, &m.out)?;
        if !ctx.quiet {
            outln!("{}", results.markdown())?;
            eprintln!("wrote {}/results.json and results.md", m.out.display());
        }
        return Ok(());
    }
    let a = *args.run;
    if a.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    if a.max_new_tokens == 0 {
        anyhow::bail!("--max-new-tokens must be at least 1");
    }
    let mut prompt = PromptConfig {
        chat: a.chat,
        max_new_tokens: a.max_new_tokens,
        ..PromptConfig::default()
    };
    if let Some(spec) = &a.shots {
        prompt.set_shots(spec)?;
    }
    let filters = Filters {
        tasks: parse_tasks(&a.tasks)?,
        subjects: a.subjects.clone(),
        languages: a.languages.clone(),
        limit: a.limit,
    };
    let shard: Shard = match &a.shard {
        Some(s) => s.parse()?,
        None => Shard::default(),
    };
    let cfg = RunConfig {
        prompt: prompt.clone(),
        filters: filters.clone(),
        split: a.split.clone(),
        skip_bad: a.skip_bad,
        shard,
        batch_size: a.batch_size,
        reuse_prefix: !a.no_prefix_reuse,
        out: a.out.clone(),
        resume: a.resume,
        progress: !ctx.quiet,
    };
    let load = LoadOptions {
        filters,
        split: a.split.clone(),
        mmlu_dev: prompt.mmlu_shots > 0,
        mmmlu_dev: prompt.mmmlu_shots > 0,
        dev_dir: a.dev_dir.clone(),
        skip_bad: a.skip_bad,
    };
    // (discovery warns once per skipped row itself.)
    let suite = discovery::load(&a.folders, &load)?;
    let mut backend = open_backend(ctx, &a)?;
    if let Some(path) = &a.dump_requests {
        let dump = runner::dump_requests(&suite, backend.as_ref(), &cfg)?;
        afm_text::atomic_write::write_atomic(path, &serde_json::to_vec(&dump)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "wrote the requests of {} items to {}",
            suite.items.len(),
            path.display()
        );
        return Ok(());
    }
    let results = runner::run(&suite, backend.as_mut(), &cfg)
        .with_context(|| format!("evaluation into {}", a.out.display()))?;
    if !ctx.quiet {
        outln!("{}", results.markdown())?;
        eprintln!(
            "{} items scored in {:.1} s ({:.2} items/s); wrote {}/results.json and results.md",
            results.timings.scored,
            results.timings.wall_s,
            results.timings.items_per_s,
            a.out.display()
        );
    }
    Ok(())
}
