//! Shared server state: configuration, the store, the model table, live progress and metrics.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::{broadcast, watch, Notify};
use vidgen_engine::pipeline::ModelInfo;

use crate::config::Config;
use crate::store::Store;
use crate::uploads::path_inside;

/// A model the server offers.
#[derive(Debug, Clone)]
pub struct ModelSlot {
    /// Public name (the `model` field of requests).
    pub name: String,
    /// What the worker loads: `demo` or a model folder.
    pub path: String,
    pub info: ModelInfo,
}

/// What the embedding binary provides: how to start workers and what each model can do.
pub struct ServerEnv {
    /// The `vidgen` executable (`vidgen worker` runs jobs).
    pub worker_exe: PathBuf,
    /// Models in the config's order (the first is the default).
    pub models: Vec<ModelSlot>,
}

/// A message for the `/events` stream of one job: SSE event name and JSON data.
#[derive(Debug, Clone)]
pub struct LiveMsg {
    pub event: &'static str,
    pub data: String,
}

/// Progress of a running job that is not worth a database write per step.
#[derive(Debug, Clone, Default)]
pub struct LiveProgress {
    pub stage: Option<String>,
    pub step: Option<(u32, u32)>,
    pub eta_s: Option<f64>,
}

/// Why a running job is being stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancelled,
    Deleted,
}

pub struct AppState {
    pub config: Config,
    /// Canonical data directory; every file the server touches is inside it.
    pub data_dir: PathBuf,
    pub store: Store,
    pub env: ServerEnv,
    /// A job was queued.
    pub wake: Notify,
    channels: Mutex<HashMap<String, broadcast::Sender<LiveMsg>>>,
    progress: Mutex<HashMap<String, LiveProgress>>,
    running: Mutex<HashMap<String, watch::Sender<Option<StopReason>>>>,
    pub metrics: Metrics,
}

impl AppState {
    pub fn new(config: Config, data_dir: PathBuf, store: Store, env: ServerEnv) -> AppState {
        AppState {
            config,
            data_dir,
            store,
            env,
            wake: Notify::new(),
            channels: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
        }
    }

    pub fn model(&self, name: &str) -> Option<&ModelSlot> {
        self.env.models.iter().find(|m| m.name == name)
    }

    pub fn model_names(&self) -> String {
        self.env
            .models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The folder of a job (ids are server-made, and checked again here).
    pub fn job_dir(&self, id: &str) -> anyhow::Result<PathBuf> {
        if !is_job_id(id) {
            anyhow::bail!("malformed job id `{id}`");
        }
        path_inside(&self.data_dir, &Path::new("jobs").join(id))
    }

    /// Seconds from now when a job finishing now expires.
    pub fn expires_at(&self) -> i64 {
        crate::store::now() + (self.config.retention_hours * 3600.0).round() as i64
    }

    pub fn subscribe(&self, id: &str) -> broadcast::Receiver<LiveMsg> {
        let mut channels = lock(&self.channels);
        channels
            .entry(id.to_string())
            .or_insert_with(|| broadcast::channel(128).0)
            .subscribe()
    }

    pub fn publish(&self, id: &str, event: &'static str, data: String) {
        if let Some(tx) = lock(&self.channels).get(id) {
            let _ = tx.send(LiveMsg { event, data });
        }
    }

    /// Drops the job's channel: subscribers get what was sent, then the end of the stream.
    pub fn close_channel(&self, id: &str) {
        lock(&self.channels).remove(id);
    }

    pub fn live_progress(&self, id: &str) -> Option<LiveProgress> {
        lock(&self.progress).get(id).cloned()
    }

    pub fn set_live_progress(&self, id: &str, p: Option<LiveProgress>) {
        let mut map = lock(&self.progress);
        match p {
            Some(p) => {
                map.insert(id.to_string(), p);
            }
            None => {
                map.remove(id);
            }
        }
    }

    /// Registers a running job; the receiver tells the supervisor to stop it.
    pub fn register_running(&self, id: &str) -> watch::Receiver<Option<StopReason>> {
        let (tx, rx) = watch::channel(None);
        lock(&self.running).insert(id.to_string(), tx);
        rx
    }

    pub fn unregister_running(&self, id: &str) {
        lock(&self.running).remove(id);
    }

    /// Asks the running job `id` to stop; false when it is not running here.
    pub fn stop_running(&self, id: &str, reason: StopReason) -> bool {
        match lock(&self.running).get(id) {
            Some(tx) => {
                tx.send_replace(Some(reason));
                true
            }
            None => false,
        }
    }

    pub fn running_count(&self) -> usize {
        lock(&self.running).len()
    }
}

/// Server-made job ids: `video_` and 32 lowercase hex digits.
pub fn is_job_id(id: &str) -> bool {
    id.len() == 38
        && id.starts_with("video_")
        && id[6..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn new_job_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("video_{hex}")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub completed: AtomicU64,
    pub submitted: AtomicU64,
    pub rejected_queue_full: AtomicU64,
    failures: Mutex<BTreeMap<String, u64>>,
    /// Stage name -> (seconds, count).
    stages: Mutex<BTreeMap<String, (f64, u64)>>,
    /// Whole jobs: (seconds, count).
    jobs: Mutex<(f64, u64)>,
}

impl Metrics {
    pub fn failure(&self, cause: &str) {
        *lock(&self.failures).entry(cause.to_string()).or_default() += 1;
    }

    pub fn stage_done(&self, stage: &str, seconds: f64) {
        let mut stages = lock(&self.stages);
        let e = stages.entry(stage.to_string()).or_default();
        e.0 += seconds;
        e.1 += 1;
    }

    pub fn job_done(&self, seconds: f64) {
        let mut j = lock(&self.jobs);
        j.0 += seconds;
        j.1 += 1;
    }

    /// Mean job duration so far (None before the first job ends).
    pub fn mean_job_seconds(&self) -> Option<f64> {
        let j = lock(&self.jobs);
        (j.1 > 0).then(|| j.0 / j.1 as f64)
    }

    pub fn failures(&self) -> BTreeMap<String, u64> {
        lock(&self.failures).clone()
    }

    pub fn stages(&self) -> BTreeMap<String, (f64, u64)> {
        lock(&self.stages).clone()
    }

    pub fn jobs(&self) -> (f64, u64) {
        *lock(&self.jobs)
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids() {
        let id = new_job_id();
        assert!(is_job_id(&id), "{id}");
        for bad in [
            "video_",
            "video_../../etc/passwd",
            "video_ABCDEF",
            "file_0123",
        ] {
            assert!(!is_job_id(bad), "{bad}");
        }
    }
}
