//! `afm-vl train demo`: train the demo vision encoder + adapter on generated scenes in front of
//! the frozen default text model (see `afm_fusion::train_demo`).

use std::io::Write as _;
use std::path::PathBuf;

use afm_fusion::train_demo::{demo_config, train_demo, DemoTrainConfig, TileFeature};
use afm_fusion::VisionLanguageModel;
use afm_text::DType;
use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};

use super::{load_model_dir, Context};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Output checkpoint directory (config.json, vision_adapter.safetensors, train_log.jsonl).
    /// Required: there is no default, so a run never overwrites the shipped checkpoint by
    /// accident (retraining it means `--out assets/models/afm-vl-demo`).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// The frozen text model (default: the converted SmolLM2-135M-Instruct).
    #[arg(long, value_name = "DIR")]
    pub text_model: Option<PathBuf>,
    /// How the checkpoint's config refers to the text model (default: a path relative to --out).
    #[arg(long, value_name = "PATH")]
    pub text_model_ref: Option<String>,
    /// Text-model dtype during training: auto (bf16 on CPUs that have it), fp32, bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Encoder pre-training steps (dense class, count and word heads; no language model).
    #[arg(long, default_value_t = 4000)]
    pub stage1_steps: usize,
    #[arg(long, default_value_t = 24)]
    pub stage1_batch: usize,
    #[arg(long, default_value_t = 1.5e-3)]
    pub stage1_lr: f64,
    /// Alignment steps (caption loss through the frozen text model).
    #[arg(long, default_value_t = 600)]
    pub stage2_steps: usize,
    #[arg(long, default_value_t = 8)]
    pub stage2_batch: usize,
    #[arg(long, default_value_t = 5e-4)]
    pub stage2_lr: f64,
    /// Save every N stage-2 steps (0: only at the end).
    #[arg(long, default_value_t = 50)]
    pub save_every: usize,
    /// Start from this checkpoint's encoder, adapter and image LoRA instead of random weights,
    /// e.g. to continue stage 2 with `--stage1-steps 0`; the log is then appended to. Modules
    /// the checkpoint lacks (a count token) start fresh; shapes must match.
    #[arg(long, value_name = "DIR")]
    pub init: Option<PathBuf>,
    /// Greedy-describe 24 held-out scenes every N stage-2 steps and log their pair F1 and
    /// exact-count rate (0: never).
    #[arg(long, default_value_t = 50)]
    pub eval_every: usize,
    /// Weight of the count words in the stage-2 caption loss (1: like every other token).
    #[arg(long, default_value_t = 3.0)]
    pub count_weight: f64,
    /// Weight of the stage-2 count/word read-out from the adapter's register token.
    #[arg(long, default_value_t = 2.0)]
    pub aux_weight: f64,
    /// What the stage-1 tile head (counts, word) reads: `register` (the register token) or
    /// `register-mean` (the register next to the mean token).
    #[arg(long, default_value = "register")]
    pub tile_feature: TileFeature,
    /// Side of the adapter's pooled grid per tile (pool × pool tokens, plus the register);
    /// default: the demo architecture's 3. The adapter has no weights that depend on it, so a
    /// checkpoint trained at one size can continue (`--init`) at another.
    #[arg(long, value_name = "N")]
    pub pool: Option<i64>,
    /// Leave out the adapter's count token (the architecture of the demo checkpoints before it).
    #[arg(long)]
    pub no_count_token: bool,
    /// Weight of the count token's detector losses (object centres, soft counts) in stage 2.
    #[arg(long, default_value_t = 1.0)]
    pub detector_weight: f64,
}

pub fn run(ctx: &Context, mut a: DemoArgs) -> anyhow::Result<()> {
    let Some(out) = a.out.take() else {
        anyhow::bail!(
            "train demo needs --out DIR (no default, so the shipped checkpoint is never overwritten by accident)"
        );
    };
    let device = ctx.device()?;
    let text_dir = super::model_or_default(&a.text_model)?;
    let dtype = DType::parse(&a.dtype, device)?;
    let text = load_model_dir(&text_dir, device, dtype)?;
    let text_ref = match &a.text_model_ref {
        Some(r) => r.clone(),
        None => relative_ref(&out, &text_dir),
    };
    let mut config = demo_config(&text, &text_ref)?;
    if let Some(p) = a.pool {
        anyhow::ensure!((1..=16).contains(&p), "--pool must be 1 to 16, got {p}");
        config.adapter.pool = p;
    }
    if a.no_count_token {
        config.adapter.count_token = None;
    }
    let mut model = VisionLanguageModel::new(config, text, a.seed as i64)?;
    if let Some(init) = &a.init {
        let weights = init.join("vision_adapter.safetensors");
        let fresh = model
            .init_from(&weights)
            .with_context(|| format!("starting from {}", init.display()))?;
        if !fresh.is_empty() {
            tracing::warn!(
                "{} lacks {} tensors of this architecture; they start fresh: {}",
                weights.display(),
                fresh.len(),
                fresh.join(", ")
            );
        }
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let cfg = DemoTrainConfig {
        seed: a.seed,
        stage1_steps: a.stage1_steps,
        stage1_batch: a.stage1_batch,
        stage1_lr: a.stage1_lr,
        stage2_steps: a.stage2_steps,
        stage2_batch: a.stage2_batch,
        stage2_lr: a.stage2_lr,
        save_every: a.save_every,
        eval_every: a.eval_every,
        count_weight: a.count_weight,
        aux_weight: a.aux_weight,
        detector_weight: a.detector_weight,
        tile_feature: a.tile_feature,
        out: out.clone(),
        ..DemoTrainConfig::default()
    };
    let log_path = out.join("train_log.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(a.init.is_some())
        .truncate(a.init.is_none())
        .open(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    writeln!(
        log,
        "{}",
        serde_json::json!({ "config": &cfg, "init": a.init.as_ref().map(|p| p.display().to_string()) })
    )?;
    let style = ProgressStyle::with_template(
        "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} (eta {eta})",
    )?;
    let mut bar: Option<(u8, ProgressBar)> = None;
    let t0 = std::time::Instant::now();
    let mut log_err = None;
    train_demo(&model, &cfg, &mut |ev| {
        if bar.as_ref().map(|b| b.0) != Some(ev.stage) {
            if let Some((_, b)) = bar.take() {
                b.finish();
            }
            let b = if ctx.quiet {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(ev.steps as u64)
            };
            b.set_style(style.clone());
            b.set_prefix(if ev.stage == 1 {
                "stage 1 (encoder)"
            } else {
                "stage 2 (captions)"
            });
            bar = Some((ev.stage, b));
        }
        if let Some((_, b)) = &bar {
            b.set_position(ev.step as u64);
            let mut msg = format!("loss {:.3} acc {:.2}", ev.loss, ev.accuracy);
            if let Some(aux) = ev.aux_accuracy {
                msg.push_str(&format!(" aux {aux:.2}"));
            }
            if let Some(c) = ev.token_counts {
                msg.push_str(&format!(" count-token {c:.2}"));
            }
            if let (Some(f1), Some(counts)) = (ev.eval_f1, ev.eval_counts) {
                msg.push_str(&format!(" held-out F1 {f1:.2} counts {counts:.2}"));
                b.println(format!(
                    "stage {} step {}: loss {:.3}, held-out pair F1 {:.3}, exact counts {:.3}",
                    ev.stage, ev.step, ev.loss, f1, counts
                ));
            }
            b.set_message(msg);
        }
        if let Err(e) = writeln!(log, "{}", serde_json::to_string(ev).unwrap_or_default()) {
            log_err = Some(e);
        }
    })
    .context("training the demo checkpoint")?;
    if let Some((_, b)) = bar.take() {
        b.finish();
    }
    if let Some(e) = log_err {
        tracing::warn!("{}: {e}", log_path.display());
    }
    outln!(
        "trained in {:.1} min; checkpoint written to {} ({} encoder + adapter parameters)",
        t0.elapsed().as_secs_f64() / 60.0,
        out.display(),
        model.vision_parameters()
    )?;
    Ok(())
}

/// `target` as seen from `from` (a relative path when both are relative or share a root).
fn relative_ref(from: &std::path::Path, target: &std::path::Path) -> String {
    let abs = |p: &std::path::Path| {
        std::fs::canonicalize(p).unwrap_or_else(|_| {
            std::env::current_dir()
                .map(|c| c.join(p))
                .unwrap_or(p.to_path_buf())
        })
    };
    let (f, t) = (abs(from), abs(target));
    let fc: Vec<_> = f.components().collect();
    let tc: Vec<_> = t.components().collect();
    let common = fc.iter().zip(&tc).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return t.display().to_string();
    }
    let mut rel = PathBuf::new();
    for _ in common..fc.len() {
        rel.push("..");
    }
    for c in &tc[common..] {
        rel.push(c.as_os_str());
    }
    rel.display().to_string()
}
