//! `vidgen serve`: the OpenAI-compatible API, the native API and the browser portal.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use vidgen_server::{Config, ModelSlot, ServerEnv};

#[derive(clap::Args)]
pub struct Args {
    /// Configuration file (TOML): models, data_dir, limits, api_keys, bind, retention.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (overrides the config), e.g. 127.0.0.1:8080; port 0 picks a free one.
    #[arg(long)]
    bind: Option<SocketAddr>,
    /// Data directory: database, uploads, outputs (overrides the config).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Serve on a non-loopback address without API keys.
    #[arg(long)]
    allow_unauthenticated: bool,
    /// Logs as JSON lines (for log collectors) instead of text.
    #[arg(long)]
    log_json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    crate::init_logging(args.log_json, "info");
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(bind) = args.bind {
        config.bind = bind;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    config.allow_unauthenticated |= args.allow_unauthenticated;
    if args.config.is_none() {
        eprintln!(
            "vidgen serve: no --config; serving the built-in demo model on {} with data in {} \
             (SQLite, WAL), no API keys (loopback only)",
            config.bind,
            config.data_dir.display()
        );
    }
    let mut models = Vec::new();
    for entry in config.model_entries() {
        let info = crate::generate::model_info(&entry.path)
            .with_context(|| format!("model `{}` ({})", entry.name, entry.path))?;
        models.push(ModelSlot {
            name: entry.name,
            path: entry.path,
            info,
        });
    }
    let worker_exe = std::env::current_exe().context("locating the vidgen executable")?;
    vidgen_server::serve_blocking(config, ServerEnv { worker_exe, models })
}
