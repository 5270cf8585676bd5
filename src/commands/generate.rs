//! `afm-vl generate` and `afm-vl chat`.

use super::{Context, NotBuilt};

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// The prompt.
    pub prompt: String,
}

#[derive(clap::Args, Debug)]
pub struct ChatArgs {}

pub fn run_generate(_ctx: &Context, _args: GenerateArgs) -> anyhow::Result<()> {
    Err(NotBuilt("generate").into())
}

pub fn run_chat(_ctx: &Context, _args: ChatArgs) -> anyhow::Result<()> {
    Err(NotBuilt("chat").into())
}
