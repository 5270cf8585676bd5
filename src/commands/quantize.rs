//! `afm-vl quantize`: write a quantized copy of a model directory (packed low-bit weights in
//! safetensors, layout in `afm_text::quant`), loadable by every command's `--model`.

use std::path::PathBuf;

use afm_text::gguf::GgmlType;
use afm_text::quant::quantize::{quantize_dir, quantize_dir_blocks, BitPlan, QuantizeOptions};
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
    /// auto (q4_1 at --bits 4, rtn at 8, palette at 2 and mixed), rtn (uniform levels,
    /// per-channel scale with a searched clipping factor), palette (k-means look-up table per
    /// 16 rows), or GGUF blocks q4_1 / q4_0 (with --bits 4) / q8_0 (with --bits 8): a scale,
    /// and for q4_1 a minimum, per 32 weights, llama.cpp's layout, decoded by the block
    /// kernels; the embedding is q8_0 unless --embed-bits 4.
    #[arg(long, default_value = "auto")]
    pub method: String,
    /// Average bits per weight the mixed plan aims at (tables included).
    #[arg(long, default_value_t = 3.5)]
    pub target_bpw: f64,
    /// Bits of the token embedding (GGUF blocks: 8 unless 4 is asked; palettes: 4; rtn: 8).
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
    let plan = match a.bits.as_str() {
        "mixed" => BitPlan::Mixed {
            target_bpw: a.target_bpw,
        },
        b => match b.parse::<u8>() {
            Ok(b @ (2 | 4 | 8)) => BitPlan::Fixed(b),
            _ => anyhow::bail!("--bits must be 2, 4, 8 or mixed, not '{b}'"),
        },
    };
    let method_name = match (a.method.as_str(), plan) {
        ("auto", BitPlan::Fixed(4)) => "q4_1",
        ("auto", BitPlan::Fixed(8)) => "rtn",
        ("auto", _) => "palette",
        (m, _) => m,
    };
    let blocks = match (method_name, plan) {
        ("q4_1", _) => Some(GgmlType::Q4_1),
        ("q4_0", _) => Some(GgmlType::Q4_0),
        ("q8_0", _) => Some(GgmlType::Q8_0),
        _ => None,
    };
    if let Some(ty) = blocks {
        let bits = if ty == GgmlType::Q8_0 { 8 } else { 4 };
        if plan != BitPlan::Fixed(bits) {
            anyhow::bail!("--method {method_name} stores {bits}-bit blocks: use --bits {bits}");
        }
        let embed = match a.embed_bits {
            None | Some(8) => GgmlType::Q8_0,
            Some(4) => ty,
            Some(b) => anyhow::bail!("--embed-bits with GGUF blocks is 4 or 8, not {b}"),
        };
        return run_blocks(ctx, &a, ty, embed);
    }
    let method = match method_name {
        "rtn" | "uniform" => Method::Uniform,
        "palette" | "kmeans" => Method::Palette,
        m => anyhow::bail!("--method must be auto, rtn, palette, q4_1, q4_0 or q8_0, not '{m}'"),
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
    report(&a, &r, t0, quiet)
}

fn report(
    a: &Args,
    r: &afm_text::quant::quantize::QuantizeReport,
    t0: std::time::Instant,
    quiet: bool,
) -> anyhow::Result<()> {
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
                t.method,
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

/// `--method q4_1 | q4_0 | q8_0` (and auto at 4 bits): GGUF blocks.
fn run_blocks(ctx: &Context, a: &Args, ty: GgmlType, embed: GgmlType) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    let bar = super::progress::bar(0, "tensors", ctx.quiet);
    let r = quantize_dir_blocks(&a.input, &a.output, ty, embed, &mut |i, n, name| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
        bar.set_message(name.to_string());
    })
    .with_context(|| {
        format!(
            "quantizing {} into {}",
            a.input.display(),
            a.output.display()
        )
    })?;
    bar.finish_and_clear();
    report(a, &r, t0, ctx.quiet)
}
