//! `afm-vl train qat`: quantization-aware training of a text model on plain text, written as a
//! packed quantized model directory.

use std::path::PathBuf;

use afm_text::quant::qat_train::{load_text_windows, train_qat, QatConfig};
use afm_text::{DType, TextModel};
use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use super::Context;

#[derive(clap::Args, Debug)]
pub struct QatArgs {
    /// Training text: a folder of .txt/.md files, a JSONL file ("text", or "prompt" +
    /// "response" per line) or one text file.
    #[arg(long, value_name = "PATH")]
    pub data: PathBuf,
    /// Output model directory (packed weights, loadable with --model).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Full-precision base model (default: the converted SmolLM2-135M-Instruct).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Bits of the attention/FFN projections: 2 (balanced levels), 4 or 8.
    #[arg(long, default_value_t = 4)]
    pub bits: u8,
    /// Bits of the embedding (round-to-nearest, not trained).
    #[arg(long, default_value_t = 4)]
    pub embed_bits: u8,
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
    /// Learning rate of the per-channel clipping factors f.
    #[arg(long, default_value_t = 1e-3)]
    pub f_lr: f64,
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Tokens per training window.
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop after this many minutes of training and export what was trained (--steps is then
    /// an upper bound).
    #[arg(long, value_name = "MINUTES")]
    pub max_minutes: Option<f64>,
}

pub fn run(ctx: &Context, a: QatArgs) -> anyhow::Result<()> {
    if ![2, 4, 8].contains(&a.bits) || ![2, 4, 8].contains(&a.embed_bits) {
        anyhow::bail!("--bits and --embed-bits must be 2, 4 or 8");
    }
    let src = super::model_or_default(&a.model)?;
    let device = ctx.device()?;
    let tok_model = TextModel::load(&src, tch::Device::Cpu, DType::F32)
        .with_context(|| format!("loading model {}", src.display()))?;
    let windows = load_text_windows(&a.data, tok_model.tokenizer()?, a.seq_len)?;
    drop(tok_model);
    let cfg = QatConfig {
        bits: a.bits,
        embed_bits: a.embed_bits,
        lr: a.lr,
        f_lr: a.f_lr,
        steps: a.steps,
        batch_size: a.batch_size.max(1),
        seq_len: a.seq_len,
        seed: a.seed,
        time_limit: match a.max_minutes {
            Some(m) if m.is_finite() && m > 0.0 => {
                Some(std::time::Duration::from_secs_f64(m * 60.0))
            }
            Some(m) => anyhow::bail!("--max-minutes must be a positive number, got {m}"),
            None => None,
        },
    };
    let bar = if ctx.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(a.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "train qat [{bar:30}] {pos}/{len} steps, {msg} ({elapsed}, ETA {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let losses = train_qat(&src, &a.out, &windows, &cfg, device, |step, loss| {
        bar.set_position(step as u64);
        bar.set_message(format!("loss {loss:.4}"));
    })
    .with_context(|| format!("QAT into {}", a.out.display()))?;
    bar.finish_and_clear();
    // The loss curve beside the model, for the record.
    let log = a.out.join("qat_log.json");
    let record = serde_json::json!({
        "bits": a.bits, "embed_bits": a.embed_bits, "lr": a.lr, "f_lr": a.f_lr,
        "batch_size": cfg.batch_size, "seq_len": a.seq_len, "seed": a.seed,
        "windows": windows.len(), "steps": losses.len(), "losses": losses,
    });
    afm_text::atomic_write::write_atomic(&log, serde_json::to_string(&record)?.as_bytes())
        .with_context(|| format!("writing {}", log.display()))?;
    if !ctx.quiet {
        let k = losses.len().min(5);
        let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len().max(1) as f64;
        eprintln!(
            "wrote {} ({} windows, {} steps; mean loss of the first {k}: {:.4}, last {k}: {:.4})",
            a.out.display(),
            windows.len(),
            losses.len(),
            mean(&losses[..k]),
            mean(&losses[losses.len() - k..])
        );
    }
    Ok(())
}
