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
    /// Dtypes to compare, comma-separated: each runs afm-vl and transformers with the whole
    /// model in it (afm-vl's encoder stays fp32 on a CPU without native bf16). `auto` is
    /// afm-vl's default here (bf16 on accelerators and CPUs with AVX512-BF16 / AMX, else fp32).
    #[arg(long, default_value = "fp32,auto", value_name = "LIST")]
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
    let mut dtypes: Vec<DType> = Vec::new();
    for d in a.dtypes.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let d = DType::parse(d, device)?;
        anyhow::ensure!(
            d != DType::F16,
            "--dtypes: fp16 is not compared (transformers' CPU fp16 is not a fast path)"
        );
        if !dtypes.contains(&d) {
            dtypes.push(d);
        }
    }
    anyhow::ensure!(!dtypes.is_empty(), "--dtypes is empty");
    let threads = tch::get_num_threads();
    // (dtype, afm-vl medians [total, preprocess, encode, prefill, decode], transformers' JSON).
    let mut results = Vec::new();
    for &dtype in &dtypes {
        let ours = time_ours(ctx, &a, device, dtype)?;
        let hf = if a.no_hf {
            None
        } else {
            Some(hf_reference(&a, dtype, threads)?)
        };
        results.push((dtype, ours, hf));
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
    println!(
        "| runtime | dtype (vision / text) | s / image | preprocess | encode | prefill | decode | vs transformers, same dtype | vs transformers fp32 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let secs =
        |h: &Option<serde_json::Value>| h.as_ref().and_then(|h| h["seconds_per_image"].as_f64());
    let hf_fp32 = results
        .iter()
        .find(|r| r.0 == DType::F32)
        .and_then(|r| secs(&r.2));
    let ratio = |h: Option<f64>, t: f64| h.map_or("–".to_string(), |h| format!("{:.2}×", h / t));
    for (dtype, ours, hf) in &results {
        if let Some(h) = hf {
            let t = secs(hf).unwrap_or(f64::NAN);
            println!(
                "| transformers | {0} / {0} | {1:.2} | {2:.3} | – | – | – | 1.00× | {3} |",
                dtype.name(),
                t,
                h["preprocess_s"].as_f64().unwrap_or(f64::NAN),
                ratio(hf_fp32, t)
            );
        }
        println!(
            "| afm-vl | {} / {} | {:.2} | {:.3} | {:.2} | {:.2} | {:.2} | {} | {} |",
            afm_fusion::smolvlm::vision_dtype(device, *dtype).name(),
            dtype.name(),
            ours[0],
            ours[1],
            ours[2],
            ours[3],
            ours[4],
            ratio(secs(hf), ours[0]),
            ratio(hf_fp32, ours[0])
        );
    }
    Ok(())
}

/// afm-vl's medians per image in `dtype`: [total, preprocess, encode, prefill, decode].
fn time_ours(
    ctx: &Context,
    a: &Args,
    device: tch::Device,
    dtype: DType,
) -> anyhow::Result<Vec<f64>> {
    let model = SmolVlm::load(&a.model, device, dtype)
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
        &format!("images ({})", dtype.name()),
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
