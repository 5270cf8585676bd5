//! `afm-vl train lora`: LoRA fine-tuning of a frozen text model on prompt/response pairs.

use std::path::PathBuf;

use afm_text::ptmoe_model::PtMoeModel;
use afm_text::train_lora::{load_jsonl, train, LoraTrainConfig};
use afm_text::{DType, LanguageModel};
use anyhow::Context as _;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use super::{load_model_dir, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Subcommand, Debug)]
pub enum What {
    /// Train a LoRA adapter (PEFT layout) on JSONL lines {"prompt": ..., "response": ...};
    /// loss on the response tokens only; the base stays frozen.
    Lora(LoraArgs),
    /// Train the demo vision encoder + adapter on generated scenes in front of the frozen
    /// default text model (two stages; writes a checkpoint `describe` uses by default).
    Demo(super::train_demo::DemoArgs),
    /// Quantization-aware training (fake-quantized projections, learnable clipping) on plain
    /// text; writes a packed quantized model directory.
    Qat(super::train_qat::QatArgs),
}

#[derive(clap::Args, Debug)]
pub struct LoraArgs {
    /// Training data: JSONL with "prompt" and "response" fields.
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Output directory: adapter_config.json, adapter_model.safetensors, optimizer and trainer
    /// state; on a tamm model also adapter.pt + adapter-config.json, the adapter toolkit's
    /// format (tamm's `load_state_dict(strict=False)` reads it).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Base model directory (default: the converted SmolLM2-135M-Instruct). A quantized
    /// directory (`afm-vl quantize`) stays packed and frozen: the adapter is an
    /// accuracy-recovery LoRA (`--base` is the same flag). A PT-MoE directory (ours, or a tamm
    /// folder) trains the server model: every track's attention and FFN projections, and the
    /// experts unless a tamm folder's spec leaves them out (the router is never adapted).
    #[arg(long, value_name = "DIR", alias = "base")]
    pub model: Option<PathBuf>,
    /// LoRA rank [default: 32, or the rank of a tamm model's adapter spec].
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA α (the update is scaled by α/rank) [default: 16, or the tamm spec's].
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Optimiser steps.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Tokens per example (longer ones are cut).
    #[arg(long, default_value_t = 256)]
    pub max_len: usize,
    /// Checkpoint every N steps (0 = only at the end).
    #[arg(long, default_value_t = 50)]
    pub save_every: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue from the checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Use the pairs as raw text instead of through the chat template.
    #[arg(long)]
    pub no_chat: bool,
    /// Distil from this model (e.g. the full-precision model a quantized --base came from):
    /// the loss adds KL(teacher ‖ student) on the response tokens. Same tokenizer needed.
    #[arg(long, value_name = "DIR")]
    pub teacher: Option<PathBuf>,
    /// Share of the distillation term with --teacher: (1 − w)·cross-entropy + w·T²·KL.
    #[arg(long, default_value_t = 1.0, requires = "teacher")]
    pub distill_weight: f64,
    /// Softmax temperature T of the distillation term.
    #[arg(long, default_value_t = 1.0, requires = "teacher")]
    pub distill_temperature: f64,
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Lora(a) => run_lora(ctx, a),
        What::Demo(a) => super::train_demo::run(ctx, a),
        What::Qat(a) => super::train_qat::run(ctx, a),
    }
}

fn run_lora(ctx: &Context, a: LoraArgs) -> anyhow::Result<()> {
    if a.rank == Some(0) {
        anyhow::bail!("--rank must be at least 1");
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        anyhow::bail!("--lr must be a positive number, got {}", a.lr);
    }
    if let Some(alpha) = a.alpha.filter(|x| !(x.is_finite() && *x > 0.0)) {
        anyhow::bail!("--alpha must be a positive number, got {alpha}");
    }
    for (flag, v) in [
        ("--steps", a.steps),
        ("--batch-size", a.batch_size),
        ("--grad-accum", a.grad_accum),
    ] {
        if v == 0 {
            anyhow::bail!("{flag} must be at least 1");
        }
    }
    let dir = super::model_or_default(&a.model)?;
    let device = ctx.device()?;
    if afm_text::ptmoe_model::is_ptmoe_dir(&dir) {
        let load = |d: &std::path::Path| {
            PtMoeModel::load(d, device, DType::F32)
                .with_context(|| format!("loading {}", d.display()))
        };
        let model = load(&dir)?;
        // tamm 0.2.0 cannot run LoRAs on its experts (its batched LoRA meets the dispatched
        // expert inputs with mismatched shapes): a folder without a spec gets one without.
        let tamm = model.tamm.as_ref().map(|t| TammTarget {
            specs: t.adapters.clone(),
            active: t.active_adapter.clone(),
            linears: t.adaptable_linears(),
            default_moe: false,
        });
        let teacher = match &a.teacher {
            Some(t) if !afm_text::ptmoe_model::is_ptmoe_dir(t) => anyhow::bail!(
                "--teacher {}: a PT-MoE student distils from a PT-MoE teacher",
                t.display()
            ),
            Some(t) => {
                Some(load(t).with_context(|| format!("loading the teacher {}", t.display()))?)
            }
            None => None,
        };
        return train_on(ctx, &a, model, tamm, teacher);
    }
    let model = load_model_dir(&dir, device, DType::F32)?;
    let tamm = model.tamm.as_ref().map(|t| TammTarget {
        specs: t.adapters.clone(),
        active: t.active_adapter.clone(),
        linears: afm_text::tamm_adapter::adaptable_linears(t),
        default_moe: true,
    });
    let teacher = match &a.teacher {
        Some(t) => Some(
            load_model_dir(t, device, DType::F32)
                .with_context(|| format!("loading the teacher {}", t.display()))?,
        ),
        None => None,
    };
    train_on(ctx, &a, model, tamm, teacher)
}

/// What `train lora` needs of a tamm base to write the toolkit's adapter format too.
struct TammTarget {
    /// The config's `LoRAModelAdapter` specs and its active adapter.
    specs: Vec<afm_text::tamm::TammLoraSpec>,
    active: Option<String>,
    /// Every linear layer tamm can adapt, with tamm's names.
    linears: Vec<afm_text::tamm_adapter::AdaptableLinear>,
    /// `adapt_moe` of the spec used when the config has none.
    default_moe: bool,
}

fn train_on<L: LanguageModel>(
    ctx: &Context,
    a: &LoraArgs,
    mut model: L,
    tamm: Option<TammTarget>,
    teacher: Option<L>,
) -> anyhow::Result<()> {
    let tok = model.tokenizer_or_err()?;
    let data = load_jsonl(&a.data, tok, !a.no_chat, a.max_len)?;
    // A tamm model: the adapter's layers, rank and α follow the config's LoRA spec (what the
    // toolkit's tamm model builds), unless given.
    let tamm_spec = tamm.as_ref().map(|t| {
        let active = t.specs.iter().find(|s| Some(&s.id) == t.active.as_ref());
        let mut spec = active.cloned().unwrap_or_else(|| {
            let mut s = afm_text::tamm::TammLoraSpec::new("adapter", 32, 16.0);
            s.moe = t.default_moe;
            s
        });
        if let Some(r) = a.rank {
            spec.rank = r;
        }
        if let Some(al) = a.alpha {
            spec.alpha = al;
        }
        if let Some(c) = active.filter(|c| c.rank != spec.rank) {
            tracing::warn!(
                "the base config's adapter '{}' has rank {}; tamm needs --out's adapter-config.json to load a rank-{} adapter",
                spec.id,
                c.rank,
                spec.rank
            );
        }
        spec
    });
    let (rank, alpha) = match &tamm_spec {
        Some(s) => (s.rank, s.alpha),
        None => (a.rank.unwrap_or(32), a.alpha.unwrap_or(16.0)),
    };
    let cfg = LoraTrainConfig {
        rank,
        alpha,
        targets: tamm_spec
            .as_ref()
            .map_or_else(|| LoraTrainConfig::default().targets, |s| s.targets()),
        exclude: tamm_spec.as_ref().map(|s| s.excluded()).unwrap_or_default(),
        lr: a.lr,
        weight_decay: a.weight_decay,
        steps: a.steps,
        batch_size: a.batch_size,
        grad_accum: a.grad_accum,
        max_len: a.max_len,
        save_every: a.save_every,
        seed: a.seed,
        distill_weight: if teacher.is_some() {
            a.distill_weight
        } else {
            0.0
        },
        distill_temperature: a.distill_temperature,
    };
    let bar = if ctx.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(a.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "train lora [{bar:30}] {pos}/{len} steps, {msg} ({elapsed}, ETA {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let (out, losses) = train(
        model.net_mut(),
        &data,
        cfg,
        &a.out,
        a.resume,
        teacher.as_ref().map(|t| t.net()),
        |step, loss| {
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss:.4}"));
        },
    )
    .with_context(|| format!("training a LoRA adapter into {}", a.out.display()))?;
    bar.finish_and_clear();
    if let (Some(t), Some(spec)) = (&tamm, &tamm_spec) {
        // The toolkit's format too, from the adapter just written.
        let adapter = model.load_adapter(&out)?;
        afm_text::tamm_adapter::save_adapter(&out, &adapter, &t.linears, spec)
            .with_context(|| format!("writing the tamm adapter into {}", out.display()))?;
        if !ctx.quiet {
            eprintln!(
                "wrote {} (tamm adapter '{}', rank {}, alpha {}: tamm's load_state_dict(strict=False) reads it)",
                out.join(afm_text::tamm_adapter::ADAPTER_FILE).display(),
                spec.id,
                spec.rank,
                spec.alpha
            );
        }
    }
    if !ctx.quiet {
        let tail = &losses[losses.len().saturating_sub(10)..];
        eprintln!(
            "wrote {} ({} examples, {} steps; mean loss of the last {}: {:.4})",
            out.display(),
            data.len(),
            losses.len(),
            tail.len(),
            tail.iter().sum::<f64>() / tail.len().max(1) as f64
        );
    }
    Ok(())
}
