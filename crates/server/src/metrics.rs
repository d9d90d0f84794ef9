//! `/metrics` in Prometheus' text format: queue depth, job and stage durations, failures by cause,
//! GPU memory (from `nvidia-smi`, when there is one).

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::state::AppState;

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut out = String::new();
    let counts = state.store.count_by_status().unwrap_or_default();
    let count = |s: &str| counts.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);

    gauge(
        &mut out,
        "vidgen_queue_depth",
        "Jobs waiting in the queue.",
        count("queued") as f64,
    );
    gauge(
        &mut out,
        "vidgen_jobs_running",
        "Jobs running now.",
        state.running_count() as f64,
    );
    gauge(
        &mut out,
        "vidgen_queue_capacity",
        "Most jobs that may wait (queue.max_queued).",
        state.config.queue.max_queued as f64,
    );
    let _ = writeln!(
        out,
        "# HELP vidgen_jobs Jobs stored, by status.\n# TYPE vidgen_jobs gauge"
    );
    for status in ["queued", "in_progress", "completed", "failed"] {
        let _ = writeln!(out, "vidgen_jobs{{status=\"{status}\"}} {}", count(status));
    }
    let m = &state.metrics;
    counter(
        &mut out,
        "vidgen_jobs_submitted_total",
        "Jobs accepted since start.",
        m.submitted.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "vidgen_jobs_completed_total",
        "Jobs completed since start.",
        m.completed.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "vidgen_queue_rejected_total",
        "Submissions refused with 429 (queue full).",
        m.rejected_queue_full.load(Ordering::Relaxed),
    );
    let _ = writeln!(
        out,
        "# HELP vidgen_job_failures_total Failed jobs since start, by cause.\n\
         # TYPE vidgen_job_failures_total counter"
    );
    for (cause, n) in m.failures() {
        let _ = writeln!(out, "vidgen_job_failures_total{{cause=\"{cause}\"}} {n}");
    }
    let (sum, n) = m.jobs();
    let _ = writeln!(
        out,
        "# HELP vidgen_job_duration_seconds Wall time of finished jobs (worker start to end).\n\
         # TYPE vidgen_job_duration_seconds summary\n\
         vidgen_job_duration_seconds_sum {sum}\nvidgen_job_duration_seconds_count {n}"
    );
    let _ = writeln!(
        out,
        "# HELP vidgen_stage_duration_seconds Time spent per pipeline stage.\n\
         # TYPE vidgen_stage_duration_seconds summary"
    );
    for (stage, (sum, n)) in m.stages() {
        let _ = writeln!(
            out,
            "vidgen_stage_duration_seconds_sum{{stage=\"{stage}\"}} {sum}"
        );
        let _ = writeln!(
            out,
            "vidgen_stage_duration_seconds_count{{stage=\"{stage}\"}} {n}"
        );
    }
    match gpu_memory().await {
        Some(gpus) => {
            let _ = writeln!(
                out,
                "# HELP vidgen_gpu_memory_used_bytes GPU memory in use (nvidia-smi).\n\
                 # TYPE vidgen_gpu_memory_used_bytes gauge"
            );
            for (idx, used, _) in &gpus {
                let _ = writeln!(out, "vidgen_gpu_memory_used_bytes{{gpu=\"{idx}\"}} {used}");
            }
            let _ = writeln!(
                out,
                "# HELP vidgen_gpu_memory_total_bytes GPU memory size (nvidia-smi).\n\
                 # TYPE vidgen_gpu_memory_total_bytes gauge"
            );
            for (idx, _, total) in &gpus {
                let _ = writeln!(
                    out,
                    "vidgen_gpu_memory_total_bytes{{gpu=\"{idx}\"}} {total}"
                );
            }
        }
        None => out.push_str("# vidgen_gpu_memory_*: no NVIDIA GPU visible (nvidia-smi)\n"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

fn gauge(out: &mut String, name: &str, help: &str, v: f64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

fn counter(out: &mut String, name: &str, help: &str, v: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

/// (index, used bytes, total bytes) per GPU, or None without `nvidia-smi`.
async fn gpu_memory() -> Option<Vec<(String, u64, u64)>> {
    let run = tokio::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=index,memory.used,memory.total",
            "--format=csv,noheader,nounits",
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(3), run)
        .await
        .ok()?
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let gpus: Vec<(String, u64, u64)> = text
        .lines()
        .filter_map(|l| {
            let mut parts = l.split(',').map(str::trim);
            let idx = parts.next()?.to_string();
            let used: u64 = parts.next()?.parse().ok()?;
            let total: u64 = parts.next()?.parse().ok()?;
            Some((idx, used << 20, total << 20))
        })
        .collect();
    (!gpus.is_empty()).then_some(gpus)
}
