//! `afm-vl train lora`: LoRA fine-tuning of a frozen text model on prompt/response pairs.

use std::path::PathBuf;

use afm_text::train_lora::{load_jsonl, train, LoraTrainConfig};
use afm_text::DType;
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
    /// Output directory: adapter_config.json, adapter_model.safetensors, optimizer and trainer state.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Base model directory (default: the converted SmolLM2-135M-Instruct). A quantized
    /// directory (`afm-vl quantize`) stays packed and frozen: the adapter is an
    /// accuracy-recovery LoRA (`--base` is the same flag).
    #[arg(long, value_name = "DIR", alias = "base")]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
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
    if a.rank == 0 {
        anyhow::bail!("--rank must be at least 1");
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        anyhow::bail!("--lr must be a positive number, got {}", a.lr);
    }
    if !(a.alpha.is_finite() && a.alpha > 0.0) {
        anyhow::bail!("--alpha must be a positive number, got {}", a.alpha);
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
    let mut model = load_model_dir(&dir, ctx.device()?, DType::F32)?;
    let tok = model.tokenizer()?;
    let data = load_jsonl(&a.data, tok, !a.no_chat, a.max_len)?;
    let teacher = match &a.teacher {
        Some(t) => Some(
            load_model_dir(t, ctx.device()?, DType::F32)
                .with_context(|| format!("loading the teacher {}", t.display()))?,
        ),
        None => None,
    };
    let cfg = LoraTrainConfig {
        rank: a.rank,
        alpha: a.alpha,
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
        ..LoraTrainConfig::default()
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
        &mut model.decoder,
        &data,
        cfg,
        &a.out,
        a.resume,
        teacher.as_ref().map(|t| &t.decoder),
        |step, loss| {
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss:.4}"));
        },
    )
    .with_context(|| format!("training a LoRA adapter into {}", a.out.display()))?;
    bar.finish_and_clear();
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
