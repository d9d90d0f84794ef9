//! `vidgen probe FILE`: what is in a video file, and the quality guard's verdict.

#[derive(clap::Args)]
pub struct Args {
    /// Video file to inspect.
    pub file: std::path::PathBuf,
}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("vidgen probe: not implemented yet")
}
