//! `afm-vl bench`: benchmarks that print a table.

use clap::Subcommand;

use super::{bench_tiler, Context, NotBuilt};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub which: Which,
}

#[derive(Subcommand, Debug)]
pub enum Which {
    /// Text decoding: prefill and decode tokens/s, two-segment vs dense, vs HF transformers.
    Text {
        /// Arguments (accepted and ignored until this benchmark lands).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
    /// The image tiler: images/s per mode, single-thread and all threads.
    Tiler(bench_tiler::Args),
}

pub fn run(ctx: &Context, args: Args) -> anyhow::Result<()> {
    match args.which {
        Which::Text { .. } => Err(NotBuilt("bench text").into()),
        Which::Tiler(a) => bench_tiler::run(ctx, a),
    }
}
