//! `vidgen worker`.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("vidgen worker: not implemented yet")
}
