//! `afm-vl convert gguf IN OUT_DIR` and `afm-vl convert tamm ASSETS_DIR OUT_DIR`.

use std::path::PathBuf;

use afm_text::convert::convert_gguf;
use afm_text::DType;
use anyhow::Context as _;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use super::Context;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Subcommand, Debug)]
pub enum What {
    /// GGUF (llama / qwen2 / qwen3) → config.json + model.safetensors + tokenizer.json +
    /// tokenizer_config.json (with the chat template), HF tensor names.
    Gguf {
        /// The .gguf file.
        input: PathBuf,
        /// Output directory (created).
        out_dir: PathBuf,
        /// Stored dtype: fp32 keeps dequantised weights exact; bf16 halves the size.
        #[arg(long, default_value = "fp32")]
        dtype: String,
        /// Keep GGUF's quantized blocks (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) byte for byte
        /// instead of dequantising them: the model is as small as the GGUF and decodes with
        /// the block kernels (int8 activations, as llama.cpp). Norms and unquantized tensors
        /// are stored in --dtype.
        #[arg(long)]
        keep_blocks: bool,
    },
    /// A tamm model folder (Apple's adapter toolkit `assets/`: base-model-config.json +
    /// base-model.pt + tokenizer files) → config.json + model.safetensors (our names and RoPE
    /// layout) + the AFM tokenizer files; same model, faster to load. An adapter trained into
    /// the base checkpoint is merged.
    Tamm {
        /// The tamm folder.
        input: PathBuf,
        /// Output directory (created).
        out_dir: PathBuf,
        /// Stored dtype: fp32 (the toolkit's, 12.4 GB for the 3B model) or bf16 (6.2 GB).
        #[arg(long, default_value = "fp32", value_parser = ["fp32", "bf16"])]
        dtype: String,
    },
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Gguf {
            input,
            out_dir,
            dtype,
            keep_blocks,
        } => {
            let dtype = DType::parse(&dtype, tch::Device::Cpu)?;
            let bar = if ctx.quiet {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(0)
            };
            bar.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} tensors ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_message("converting");
            let summary = convert_gguf(
                &input,
                &out_dir,
                dtype.kind(),
                keep_blocks,
                |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                },
            )
            .with_context(|| format!("converting {}", input.display()))?;
            bar.finish_and_clear();
            report(ctx, &summary);
            Ok(())
        }
        What::Tamm {
            input,
            out_dir,
            dtype,
        } => {
            let dtype = DType::parse(&dtype, tch::Device::Cpu)?;
            let bar = if ctx.quiet {
                ProgressBar::hidden()
            } else {
                ProgressBar::new_spinner()
            };
            bar.set_message(format!("reading {}", input.display()));
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            let progress = |done: usize, total: usize| {
                bar.set_message(format!("collected {done}/{total} tensors; writing"));
            };
            if afm_text::tamm_ptmoe::tamm_ptmoe_files(&input).is_some() {
                let s = afm_text::convert_tamm::convert_tamm_ptmoe(
                    &input,
                    &out_dir,
                    dtype.kind(),
                    progress,
                )
                .with_context(|| format!("converting {}", input.display()))?;
                bar.finish_and_clear();
                if !ctx.quiet {
                    let c = &s.config;
                    eprintln!(
                        "wrote {} (tamm PT-MoE, {} tensors, {:.1}M parameters, {} tracks × {} blocks × {} layers, vocab {})",
                        s.out_dir.display(),
                        s.tensors,
                        s.params as f64 / 1e6,
                        c.num_tracks,
                        c.num_track_blocks,
                        c.track_block_depth,
                        c.vocab_size
                    );
                }
                return Ok(());
            }
            let summary =
                afm_text::convert_tamm::convert_tamm(&input, &out_dir, dtype.kind(), progress)
                    .with_context(|| format!("converting {}", input.display()))?;
            bar.finish_and_clear();
            report(ctx, &summary);
            Ok(())
        }
    }
}

fn report(ctx: &Context, summary: &afm_text::convert::ConvertSummary) {
    if !ctx.quiet {
        eprintln!(
            "wrote {} ({}, {} tensors, {:.1}M parameters, {} layers, vocab {})",
            summary.out_dir.display(),
            summary.architecture,
            summary.tensors,
            summary.params as f64 / 1e6,
            summary.config.num_hidden_layers,
            summary.config.vocab_size
        );
    }
}
