//! `afm-vl bench tiler`.

use super::{Context, NotBuilt};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Arguments (accepted and ignored until this benchmark lands).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

pub fn run(_ctx: &Context, _args: Args) -> anyhow::Result<()> {
    Err(NotBuilt("bench tiler").into())
}
