//! `afm-vl eval-demo`: caption accuracy of a vision-language checkpoint on held-out generated
//! scenes, per tiling mode, as a table.

use std::path::PathBuf;

use afm_fusion::eval_demo::{evaluate_with_progress, EvalReport};
use afm_fusion::scene::{generate_scene, HELDOUT_SEED_BASE};
use afm_fusion::VisionLanguageModel;
use afm_text::DType;
use afm_vision::TileMode;
use anyhow::Context as _;

use super::describe::default_vlm_dir;
use super::Context;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Vision-language checkpoint directory (default: the demo checkpoint).
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Held-out scenes per mode.
    #[arg(short = 'n', long, default_value_t = 200)]
    pub scenes: usize,
    /// Modes to evaluate (comma-separated).
    #[arg(long, default_value = "rapid,balanced,high-res", value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Offset into the held-out seeds (scene i uses seed 2^40 + offset + i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens per caption.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    /// Text-model dtype: auto, fp32, bf16, fp16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Also write the full reports (every scene's true and generated caption) as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the first N held-out scenes as PNG files with their true captions into DIR.
    #[arg(long, value_name = "DIR")]
    pub save_scenes: Option<PathBuf>,
    /// How many scenes --save-scenes writes.
    #[arg(long, default_value_t = 8)]
    pub save_count: usize,
    /// Print a few (truth → output) examples per mode.
    #[arg(long)]
    pub examples: bool,
}

pub fn run(ctx: &Context, a: Args) -> anyhow::Result<()> {
    let modes: Vec<TileMode> = a
        .modes
        .iter()
        .map(|m| m.parse::<TileMode>())
        .collect::<Result<_, _>>()?;
    if let Some(dir) = &a.save_scenes {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cfg = afm_fusion::train_demo::demo_scenes();
        for i in 0..a.save_count as u64 {
            let scene = generate_scene(&cfg, HELDOUT_SEED_BASE + a.seed + i);
            let path = dir.join(format!("scene-{i:02}.png"));
            scene
                .image
                .save(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            outln!("{}: {}", path.display(), scene.caption())?;
        }
        if a.scenes == 0 {
            return Ok(());
        }
    }
    let device = ctx.device()?;
    let dtype = DType::parse(&a.dtype, device)?;
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => default_vlm_dir()?,
    };
    let model = VisionLanguageModel::load(&dir, device, dtype)
        .with_context(|| format!("loading {}", dir.display()))?;
    let mut reports: Vec<EvalReport> = Vec::new();
    for mode in modes {
        if mode == TileMode::Auto {
            anyhow::bail!("eval-demo needs concrete modes (rapid, balanced, high-res), not auto");
        }
        if !ctx.quiet {
            eprintln!("evaluating {} held-out scenes in {mode} mode…", a.scenes);
        }
        let bar = super::progress::bar(a.scenes as u64, "scenes", ctx.quiet);
        bar.set_message(mode.to_string());
        let r = evaluate_with_progress(&model, a.scenes, mode, a.max_tokens, a.seed, &mut |n| {
            bar.set_position(n as u64)
        })
        .with_context(|| format!("evaluating {mode} mode"))?;
        bar.finish_and_clear();
        if a.examples {
            for e in r.examples.iter().take(5) {
                outln!(
                    "[{mode}] truth:  {}\n[{mode}] output: {}",
                    e.truth,
                    e.output
                )?;
            }
        }
        reports.push(r);
    }
    outln!(
        "\n| mode | scenes | tiles | visual tokens | pair precision | pair recall | exact counts | counts too few / many | exact captions | words read | time |"
    )?;
    outln!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    for r in &reports {
        outln!(
            "| {} | {} | {} | {} | {:.1}% | {:.1}% | {:.1}% | {:.1}% / {:.1}% | {:.1}% | {}/{} | {:.0} s |",
            r.mode,
            r.scenes,
            r.tiles_per_scene,
            r.visual_tokens,
            100.0 * r.precision,
            100.0 * r.recall,
            100.0 * r.exact_counts,
            100.0 * r.score.counts_too_few as f64 / r.score.truth_pairs.max(1) as f64,
            100.0 * r.score.counts_too_many as f64 / r.score.truth_pairs.max(1) as f64,
            100.0 * r.exact_captions as f64 / r.scenes.max(1) as f64,
            r.words_right,
            r.word_scenes,
            r.seconds
        )?;
    }
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&reports)?;
        afm_text::atomic_write::write_atomic(path, (text + "\n").as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
