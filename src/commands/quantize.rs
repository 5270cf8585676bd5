//! `afm-vl quantize`: write a quantized copy of a model directory (packed low-bit weights in
//! safetensors, layout in `afm_text::quant`), loadable by every command's `--model`.

use std::path::PathBuf;

use afm_text::quant::quantize::{quantize_dir, BitPlan, QuantizeOptions};
use afm_text::quant::Method;
use anyhow::Context as _;

use super::Context;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Full-precision model directory (config.json, model.safetensors, tokenizer.json).
    pub input: PathBuf,
    /// Output model directory.
    pub output: PathBuf,
    /// Bits per weight: 2, 4, 8, or mixed (2/4-bit per layer to meet --target-bpw).
    #[arg(long, default_value = "4")]
    pub bits: String,
    /// rtn (uniform levels, per-channel scale with a searched clipping factor) or palette
    /// (k-means look-up table per 16 rows).
    #[arg(long, default_value = "palette")]
    pub method: String,
    /// Average bits per weight the mixed plan aims at (tables included).
    #[arg(long, default_value_t = 3.5)]
    pub target_bpw: f64,
    /// Bits of the token embedding (default 4; 8 with --bits 8).
    #[arg(long)]
    pub embed_bits: Option<u8>,
    /// Plain shared palettes (no per-row scale: the AFM 2024 layout, 32 bits per row less).
    #[arg(long)]
    pub no_row_scale: bool,
    /// Seed of the k-means++ initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print every tensor's bits and relative error.
    #[arg(long)]
    pub verbose_plan: bool,
}

pub fn run(ctx: &Context, a: Args) -> anyhow::Result<()> {
    let method = match a.method.as_str() {
        "rtn" | "uniform" => Method::Uniform,
        "palette" | "kmeans" => Method::Palette,
        m => anyhow::bail!("--method must be rtn or palette, not '{m}'"),
    };
    let plan = match a.bits.as_str() {
        "mixed" => BitPlan::Mixed {
            target_bpw: a.target_bpw,
        },
        b => match b.parse::<u8>() {
            Ok(b @ (2 | 4 | 8)) => BitPlan::Fixed(b),
            _ => anyhow::bail!("--bits must be 2, 4, 8 or mixed, not '{b}'"),
        },
    };
    if method == Method::Palette && plan == BitPlan::Fixed(8) {
        anyhow::bail!("palettes are 2- or 4-bit; use --method rtn for 8 bits");
    }
    if let Some(b) = a.embed_bits {
        if ![2, 4, 8].contains(&b) {
            anyhow::bail!("--embed-bits must be 2, 4 or 8 (8 is uniform), not {b}");
        }
    }
    let opts = QuantizeOptions {
        method,
        plan,
        embed_bits: a.embed_bits,
        row_scale: !a.no_row_scale,
        seed: a.seed,
    };
    let t0 = std::time::Instant::now();
    let quiet = ctx.quiet;
    let bar = super::progress::bar(0, "tensors", quiet);
    let r = quantize_dir(&a.input, &a.output, &opts, &mut |i, n, name| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
        bar.set_message(name.to_string());
        tracing::info!("quantizing {name}");
    })
    .with_context(|| {
        format!(
            "quantizing {} into {}",
            a.input.display(),
            a.output.display()
        )
    })?;
    bar.finish_and_clear();
    if a.verbose_plan {
        outln!("| tensor | shape | bits | method | rel. error |")?;
        outln!("| --- | --- | ---: | --- | ---: |")?;
        for t in &r.tensors {
            outln!(
                "| {} | {}×{} | {} | {} | {:.2e} |",
                t.name,
                t.rows,
                t.cols,
                t.bits,
                t.method.name(),
                t.rel_error
            )?;
        }
    }
    if !quiet {
        let mut by_bits = std::collections::BTreeMap::new();
        for t in &r.tensors {
            *by_bits.entry(t.bits).or_insert(0i64) += t.rows * t.cols;
        }
        let split: Vec<String> = by_bits
            .iter()
            .map(|(b, n)| {
                format!(
                    "{b}-bit {:.1}%",
                    100.0 * *n as f64 / r.quantized_params as f64
                )
            })
            .collect();
        outln!(
            "wrote {} in {:.1}s: {} tensors quantized ({} weights; {}), {} dense ({} values); \
             {:.3} bits per quantized weight; model.safetensors {:.1} MiB",
            a.output.display(),
            t0.elapsed().as_secs_f64(),
            r.tensors.len(),
            r.quantized_params,
            split.join(", "),
            r.dense.len(),
            r.dense_params,
            r.avg_bpw,
            r.file_bytes as f64 / (1024.0 * 1024.0)
        )?;
    }
    Ok(())
}
