//! `afm-vl bench`: benchmarks that print a table.

use clap::Subcommand;

use super::{bench_kernels, bench_lora, bench_smolvlm, bench_text, bench_tiler, Context};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub which: Which,
}

#[derive(Subcommand, Debug)]
pub enum Which {
    /// Text decoding: prefill and decode tokens/s, two-segment vs dense, vs HF transformers.
    Text(bench_text::Args),
    /// LoRA adapters: swap latency between cached adapters, memory returned on unload.
    Adapters(bench_lora::Args),
    /// The image tiler: images/s per mode, single-thread and all threads.
    Tiler(bench_tiler::Args),
    /// Packed-weight matrix-vector kernels per instruction set vs the portable ones and
    /// libtorch's dense fp32 product.
    Kernels(bench_kernels::Args),
    /// A SmolVLM checkpoint: seconds per image (preprocess, encode, prefill, decode) beside HF
    /// transformers on the same checkpoint and images.
    Smolvlm(bench_smolvlm::Args),
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    match args.which {
        Which::Text(a) => bench_text::run(ctx, a),
        Which::Tiler(a) => bench_tiler::run(ctx, a),
        Which::Adapters(a) => bench_lora::run(ctx, a),
        Which::Kernels(a) => bench_kernels::run(ctx, a),
        Which::Smolvlm(a) => bench_smolvlm::run(ctx, a),
    }
}
