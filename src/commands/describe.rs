//! `afm-vl describe`.

use super::{Context, NotBuilt};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Arguments (accepted and ignored until this subcommand lands).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

pub fn run(_ctx: &Context, _args: Args) -> anyhow::Result<()> {
    Err(NotBuilt("describe").into())
}
