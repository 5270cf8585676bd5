//! `afm-vl bench smolvlm --model DIR IMAGE...`: time per image of a SmolVLM checkpoint
//! (decode + preprocess + encode + prefill + N new tokens, greedy, exactly N), afm-vl beside HF
//! transformers (`fusion/tests/reference/smolvlm_ref.py bench`: PIL, the PIL image processor,
//! `generate`) on the same checkpoint and images, in one run, per dtype (`--dtypes`); medians
//! over the rounds.

use std::path::PathBuf;
use std::time::Instant;

use afm_fusion::SmolVlm;
use afm_text::{DType, GenerateOptions};
use anyhow::Context as _;

use super::bench_text::{median, reference_json};
use super::Context;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// SmolVLM checkpoint directory (HF layout).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Images to describe (each round describes every one).
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    /// New tokens per image (exactly: EOS does not stop the timed runs).
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Timed rounds over all images, after one warm-up image (the median is reported).
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    /// afm-vl's `--dtype`s to compare, comma-separated (as `describe --dtype`: `auto` is the
    /// default, the text model in fp32 on a CPU and the encoder in bf16 where bf16 is native).
    /// transformers runs with the whole model in fp32, and in bf16 too when a row uses it.
    #[arg(long, default_value = "fp32,bf16,auto", value_name = "LIST")]
    pub dtypes: String,
    /// The instruction.
    #[arg(long, default_value = afm_fusion::smolvlm::DEFAULT_PROMPT)]
    pub prompt: String,
    /// Skip the transformers row.
    #[arg(long)]
    pub no_hf: bool,
}

pub fn run(ctx: &Context, a: Args) -> anyhow::Result<()> {
    if a.repeats == 0 || a.tokens == 0 {
        anyhow::bail!("--repeats and --tokens must be at least 1");
    }
    let device = ctx.device()?;
    // afm-vl's (text, vision) dtypes per entry, and the dtypes transformers runs in.
    let mut configs: Vec<(String, DType, DType)> = Vec::new();
    let mut hf_dtypes = vec![DType::F32];
    for d in a.dtypes.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (text, vision) = afm_fusion::smolvlm::parse_dtypes(d, device)?;
        anyhow::ensure!(
            text != DType::F16 && vision != DType::F16,
            "--dtypes: fp16 is not compared (transformers' CPU fp16 is not a fast path)"
        );
        if !configs.iter().any(|c| (c.1, c.2) == (text, vision)) {
            configs.push((d.to_ascii_lowercase(), text, vision));
        }
        for x in [text, vision] {
            if !hf_dtypes.contains(&x) {
                hf_dtypes.push(x);
            }
        }
    }
    anyhow::ensure!(!configs.is_empty(), "--dtypes is empty");
    let threads = tch::get_num_threads();
    let mut ours = Vec::new();
    for (_, text, vision) in &configs {
        ours.push(time_ours(ctx, &a, device, *text, *vision)?);
    }
    let mut hf: Vec<(DType, f64, f64)> = Vec::new();
    if !a.no_hf {
        for &d in &hf_dtypes {
            let h = hf_reference(&a, d, threads)?;
            hf.push((
                d,
                h["seconds_per_image"].as_f64().unwrap_or(f64::NAN),
                h["preprocess_s"].as_f64().unwrap_or(f64::NAN),
            ));
        }
    }
    println!(
        "SmolVLM {}: {} images × {} rounds, {} new tokens, {} threads, per image (median)",
        a.model.display(),
        a.images.len(),
        a.repeats,
        a.tokens,
        threads
    );
    println!();
    let vs: Vec<String> = hf
        .iter()
        .map(|h| format!(" vs transformers {} |", h.0.name()))
        .collect();
    println!(
        "| runtime | --dtype | vision / text | s / image | preprocess | encode | prefill | decode |{}",
        vs.concat()
    );
    println!(
        "|---|---|---|---|---|---|---|---|{}",
        "---|".repeat(hf.len())
    );
    let ratios = |t: f64| -> String {
        hf.iter()
            .map(|h| format!(" {:.2}× |", h.1 / t))
            .collect::<String>()
    };
    for h in &hf {
        println!(
            "| transformers | {0} | {0} / {0} | {1:.2} | {2:.3} | – | – | – |{3}",
            h.0.name(),
            h.1,
            h.2,
            ratios(h.1)
        );
    }
    for ((name, text, vision), o) in configs.iter().zip(&ours) {
        println!(
            "| afm-vl | {name} | {} / {} | {:.2} | {:.3} | {:.2} | {:.2} | {:.2} |{}",
            vision.name(),
            text.name(),
            o[0],
            o[1],
            o[2],
            o[3],
            o[4],
            ratios(o[0])
        );
    }
    Ok(())
}

/// afm-vl's medians per image with the text model in `text` and the encoder in `vision`:
/// [total, preprocess, encode, prefill, decode].
fn time_ours(
    ctx: &Context,
    a: &Args,
    device: tch::Device,
    text: DType,
    vision: DType,
) -> anyhow::Result<Vec<f64>> {
    let model = SmolVlm::load_with(&a.model, device, text, vision)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let opts = GenerateOptions {
        max_new_tokens: a.tokens,
        stop_on_eos: false,
        ..Default::default()
    };
    let describe = |path: &PathBuf| -> anyhow::Result<[f64; 5]> {
        let t0 = Instant::now();
        let img = model.process_path(path)?;
        let pre = t0.elapsed().as_secs_f64();
        let d = model.describe_processed(&img, Some(&a.prompt), &opts, &mut |_| {})?;
        anyhow::ensure!(
            d.generation.tokens.len() == a.tokens,
            "generation stopped early"
        );
        let total = t0.elapsed().as_secs_f64();
        Ok([
            total,
            pre,
            d.timings.encode_s,
            d.timings.prefill_s,
            d.timings.decode_s,
        ])
    };
    describe(&a.images[0])?; // warm-up
    let mut rows: Vec<[f64; 5]> = Vec::new();
    let bar = super::progress::bar(
        (a.repeats * a.images.len()) as u64,
        &format!("images ({} / {})", vision.name(), text.name()),
        ctx.quiet,
    );
    for _ in 0..a.repeats {
        for p in &a.images {
            rows.push(describe(p).with_context(|| p.display().to_string())?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok((0..5)
        .map(|i| median(rows.iter().map(|r| r[i]).collect()))
        .collect())
}

fn hf_reference(a: &Args, dtype: DType, threads: i32) -> anyhow::Result<serde_json::Value> {
    reference_json(
        "fusion/tests/reference/smolvlm_ref.py",
        "transformers reference",
        |c| {
            c.arg("bench")
                .arg(&a.model)
                .arg(dtype.name())
                .arg(&a.prompt)
                .arg(a.tokens.to_string())
                .arg(a.repeats.to_string())
                .args(&a.images)
                .env("OMP_NUM_THREADS", threads.to_string());
        },
    )
}
