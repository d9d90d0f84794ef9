//! vidgen-server: the HTTP edge. It never touches tensors: jobs run in `vidgen worker` processes.
//!
//! - [`api`]: OpenAI's Videos API plus vidgen's knobs, models, events, metrics, portal.
//! - [`store`]: the SQLite job table (the queue survives restarts).
//! - [`jobs`]: one runner per GPU supervising worker processes; retention.
//! - [`protocol`]: the job file and JSON-lines protocol shared with `vidgen worker`.
//! - [`uploads`]: image checks (magic bytes, pixel limit, EXIF orientation, metadata stripped).

pub mod api;
pub mod config;
pub mod error;
pub mod forms;
pub mod jobs;
pub mod metrics;
pub mod protocol;
pub mod state;
pub mod store;
pub mod uploads;

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;

pub use config::Config;
pub use state::{ModelSlot, ServerEnv};

/// Runs the server until `shutdown` resolves. Prints `listening on http://ADDR` once bound (the
/// port is the real one when the config asks for port 0).
pub async fn serve(
    config: Config,
    env: ServerEnv,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    if env.models.is_empty() {
        anyhow::bail!("no models to serve");
    }
    std::fs::create_dir_all(config.data_dir.join("jobs"))
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let data_dir = config.data_dir.canonicalize()?;
    let store = store::Store::open(&data_dir.join("vidgen.sqlite"))?;
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("binding {}", config.bind))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(state::AppState::new(config, data_dir, store, env));
    jobs::recover(&state)?;
    jobs::start(&state);
    let app = api::router(state.clone());
    tracing::info!(
        %addr,
        data_dir = %state.data_dir.display(),
        models = %state.model_names(),
        auth = !state.config.api_keys.is_empty(),
        "vidgen serve started"
    );
    println!("listening on http://{addr}");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    tracing::info!("vidgen serve stopped");
    Ok(())
}

/// [`serve`] on its own Tokio runtime until Ctrl-C or SIGTERM. Running workers are killed on the
/// way out; their jobs are found `interrupted` at the next start.
pub fn serve_blocking(config: Config, env: ServerEnv) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(config, env, shutdown_signal()))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}
