//! `afm-vl convert gguf IN OUT_DIR`.

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
    },
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Gguf {
            input,
            out_dir,
            dtype,
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
            let summary = convert_gguf(&input, &out_dir, dtype.kind(), |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })
            .with_context(|| format!("converting {}", input.display()))?;
            bar.finish_and_clear();
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
            Ok(())
        }
    }
}
