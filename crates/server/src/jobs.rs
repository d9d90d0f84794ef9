//! The queue runner: one loop per GPU takes the oldest queued job and runs it in a `vidgen worker`
//! child process, turning the worker's JSON lines into progress, and its end (or death) into the
//! job's final status. Also the retention sweeper.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use vidgen_engine::pipeline::{ProgressEvent, Stage};

use crate::protocol::{codes, JobOutput, WorkerEnd, WorkerJob, WorkerLine};
use crate::state::{AppState, LiveProgress, Metrics, StopReason};
use crate::store::JobRow;

/// Starts one runner per configured GPU (one when none are named) and the retention sweeper.
pub fn start(state: &Arc<AppState>) {
    let gpus: Vec<Option<String>> = if state.config.queue.gpus.is_empty() {
        vec![None]
    } else {
        state.config.queue.gpus.iter().cloned().map(Some).collect()
    };
    for (slot, gpu) in gpus.into_iter().enumerate() {
        tokio::spawn(runner(state.clone(), slot, gpu));
    }
    tokio::spawn(retention_sweeper(state.clone()));
}

/// Where a worker's stderr goes, for the crash message.
fn stderr_log(state: &AppState, job_dir: &Path, slot: usize) -> PathBuf {
    if state.config.queue.warm_worker {
        state.data_dir.join(format!("worker-{slot}.log"))
    } else {
        job_dir.join("worker.log")
    }
}

async fn runner(state: Arc<AppState>, slot: usize, gpu: Option<String>) {
    let mut warm: Option<WorkerProc> = None;
    loop {
        let job = match state.store.claim_next() {
            Ok(Some(job)) => job,
            Ok(None) => {
                // A submission wakes us; the timeout is a safety net against a missed wake-up.
                let _ = tokio::time::timeout(Duration::from_secs(1), state.wake.notified()).await;
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "claiming a job failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let id = job.id.clone();
        let span = tracing::info_span!("job", job_id = %id, slot);
        let _enter = span.enter();
        tracing::info!(model = %job.settings.model, "job started");
        drop(_enter);
        let started = Instant::now();
        let stop = state.register_running(&id);
        state.publish(&id, "video", video_json(&state, &id));
        let outcome = run_job(&state, &job, slot, gpu.as_deref(), &mut warm, stop).await;
        state.unregister_running(&id);
        state.set_live_progress(&id, None);
        finish(&state, &id, outcome, started.elapsed().as_secs_f64());
    }
}

/// How a job ended.
enum Outcome {
    Done(JobOutput),
    Failed(String, String),
    /// Deleted while running: nothing to record.
    Deleted,
}

fn finish(state: &AppState, id: &str, outcome: Outcome, seconds: f64) {
    let expires = state.expires_at();
    let result = match &outcome {
        Outcome::Done(output) => {
            Metrics::inc(&state.metrics.completed);
            state.metrics.job_done(seconds);
            tracing::info!(job_id = %id, seconds, frames = output.frames, "job completed");
            state.store.complete(id, output, expires)
        }
        Outcome::Failed(code, message) => {
            state.metrics.failure(code);
            tracing::warn!(job_id = %id, code = %code, message = %message, "job failed");
            state.store.fail(id, code, message, expires)
        }
        Outcome::Deleted => {
            tracing::info!(job_id = %id, "running job deleted");
            if let Ok(dir) = state.job_dir(id) {
                let _ = std::fs::remove_dir_all(dir);
            }
            Ok(())
        }
    };
    if let Err(e) = result {
        tracing::error!(job_id = %id, error = %e, "recording the job's end failed");
    }
    if !matches!(outcome, Outcome::Deleted) {
        state.publish(id, "video", video_json(state, id));
    }
    state.publish(id, "done", "{}".into());
    state.close_channel(id);
}

fn video_json(state: &AppState, id: &str) -> String {
    match state.store.get(id) {
        Ok(Some(row)) => crate::api::video_object(state, &row).to_string(),
        _ => "{}".into(),
    }
}

/// A running `vidgen worker` process.
struct WorkerProc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl WorkerProc {
    fn spawn(
        state: &AppState,
        job_file: Option<&Path>,
        gpu: Option<&str>,
        log: PathBuf,
    ) -> anyhow::Result<WorkerProc> {
        let mut cmd = Command::new(&state.env.worker_exe);
        cmd.arg("worker");
        match job_file {
            Some(file) => {
                cmd.arg("--job").arg(file).stdin(Stdio::null());
            }
            None => {
                cmd.arg("--serve").stdin(Stdio::piped());
            }
        }
        if let Some(gpu) = gpu {
            cmd.env("CUDA_VISIBLE_DEVICES", gpu);
        }
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            anyhow::anyhow!("starting worker {}: {e}", state.env.worker_exe.display())
        })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stdin = child.stdin.take();
        Ok(WorkerProc {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }
}

async fn run_job(
    state: &AppState,
    job: &JobRow,
    slot: usize,
    gpu: Option<&str>,
    warm: &mut Option<WorkerProc>,
    mut stop: watch::Receiver<Option<StopReason>>,
) -> Outcome {
    let id = &job.id;
    let prepared = prepare(state, job);
    let (worker_job, job_file) = match prepared {
        Ok(p) => p,
        Err(e) => return Outcome::Failed(codes::GENERATION_FAILED.into(), format!("{e:#}")),
    };
    let job_dir = job_file
        .parent()
        .expect("job file is in the job folder")
        .to_path_buf();
    let log = stderr_log(state, &job_dir, slot);

    // One-shot workers are fresh per job; the warm one is reused while it lives.
    let mut one_shot;
    let proc: &mut WorkerProc = if state.config.queue.warm_worker {
        if warm
            .as_mut()
            .is_some_and(|w| w.child.try_wait().ok().flatten().is_some())
        {
            *warm = None;
        }
        if warm.is_none() {
            match WorkerProc::spawn(state, None, gpu, log.clone()) {
                Ok(w) => *warm = Some(w),
                Err(e) => {
                    return Outcome::Failed(codes::WORKER_CRASHED.into(), format!("{e:#}"));
                }
            }
        }
        let w = warm.as_mut().expect("warm worker exists");
        let mut line = serde_json::to_string(&worker_job).expect("job serialises");
        line.push('\n');
        let sent = match w.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(line.as_bytes())
                .await
                .and(stdin.flush().await),
            None => Err(std::io::Error::other("no stdin")),
        };
        if let Err(e) = sent {
            *warm = None;
            return Outcome::Failed(
                codes::WORKER_CRASHED.into(),
                format!("the warm worker is gone ({e})"),
            );
        }
        w
    } else {
        match WorkerProc::spawn(state, Some(&job_file), gpu, log.clone()) {
            Ok(w) => {
                one_shot = w;
                &mut one_shot
            }
            Err(e) => return Outcome::Failed(codes::WORKER_CRASHED.into(), format!("{e:#}")),
        }
    };

    let grace = Duration::from_secs_f64(state.config.queue.cancel_grace_s);
    let timeout = (state.config.queue.job_timeout_s > 0.0)
        .then(|| Instant::now() + Duration::from_secs_f64(state.config.queue.job_timeout_s));
    let mut tracker = ProgressTracker::new();
    let mut stop_reason: Option<StopReason> = None;
    let mut kill_at: Option<Instant> = None;
    let mut timed_out = false;
    let mut end: Option<WorkerEnd> = None;
    loop {
        let deadline = match (kill_at, timeout) {
            (Some(k), Some(t)) => Some(k.min(t)),
            (k, t) => k.or(t),
        };
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            line = proc.lines.next_line() => match line {
                Ok(Some(line)) => match serde_json::from_str::<WorkerLine>(&line) {
                    Ok(WorkerLine::Progress(event)) => tracker.on_event(state, id, event),
                    Ok(WorkerLine::End(e)) => {
                        end = Some(e);
                        break;
                    }
                    Err(_) => tracing::debug!(job_id = %id, line = %line, "worker output ignored"),
                },
                // End of output without an end line: the worker died.
                Ok(None) | Err(_) => break,
            },
            changed = stop.changed(), if stop_reason.is_none() => {
                if changed.is_ok() {
                    stop_reason = *stop.borrow();
                    if stop_reason == Some(StopReason::Deleted) {
                        let _ = proc.child.start_kill();
                        kill_at = None;
                    } else {
                        // Ask first (the worker stops at its next step), kill after the grace.
                        let _ = std::fs::write(&worker_job.cancel_file, b"cancel");
                        kill_at = Some(Instant::now() + grace);
                    }
                }
            },
            _ = sleep => {
                if timeout.is_some_and(|t| Instant::now() >= t) && kill_at.is_none() {
                    timed_out = true;
                }
                let _ = proc.child.start_kill();
                kill_at = None;
            },
        }
    }
    tracker.finish(state);

    // A one-shot worker exits after its end line; a silent one is dead or being killed.
    let status: Option<ExitStatus> = if state.config.queue.warm_worker && end.is_some() {
        None
    } else {
        if end.is_some() {
            // Give it a moment to exit on its own, then make sure it is gone.
            if tokio::time::timeout(Duration::from_secs(10), proc.child.wait())
                .await
                .is_err()
            {
                let _ = proc.child.start_kill();
            }
        }
        let status = proc.child.wait().await.ok();
        if state.config.queue.warm_worker {
            *warm = None;
        }
        status
    };

    if stop_reason == Some(StopReason::Deleted) {
        return Outcome::Deleted;
    }
    match end {
        Some(WorkerEnd::Done(output)) if stop_reason.is_none() => Outcome::Done(output),
        Some(WorkerEnd::Failed { code, message }) if stop_reason.is_none() => {
            Outcome::Failed(code, message)
        }
        _ if stop_reason == Some(StopReason::Cancelled) => {
            Outcome::Failed(codes::CANCELLED.into(), "cancelled while running".into())
        }
        _ if timed_out => Outcome::Failed(
            codes::TIMEOUT.into(),
            format!(
                "the job ran longer than queue.job_timeout_s = {} s and was killed",
                state.config.queue.job_timeout_s
            ),
        ),
        _ => Outcome::Failed(codes::WORKER_CRASHED.into(), crash_message(status, &log)),
    }
}

/// Writes the worker's job file and returns it with its path.
fn prepare(state: &AppState, job: &JobRow) -> anyhow::Result<(WorkerJob, PathBuf)> {
    let dir = state.job_dir(&job.id)?;
    std::fs::create_dir_all(&dir)?;
    let model = state
        .model(&job.settings.model)
        .ok_or_else(|| anyhow::anyhow!("model `{}` is no longer configured", job.settings.model))?;
    let mut request = job.settings.request.clone();
    if request.image.is_some() {
        request.image = Some(dir.join("input.png"));
    }
    let extend_from = match &job.settings.extend_from {
        Some(src) => {
            let row = state
                .store
                .get(src)?
                .ok_or_else(|| anyhow::anyhow!("the source video {src} was deleted"))?;
            if row.expired {
                anyhow::bail!("the source video {src} has expired");
            }
            Some(
                state
                    .job_dir(src)?
                    .join(format!("video.{}", row.settings.output_format.extension())),
            )
        }
        None => None,
    };
    let ext = job.settings.output_format.extension();
    let cancel_file = dir.join("cancel");
    let _ = std::fs::remove_file(&cancel_file);
    let worker_job = WorkerJob {
        id: job.id.clone(),
        model: model.path.clone(),
        request,
        output: dir.join(format!("video.{ext}")),
        thumbnail: dir.join("thumbnail.webp"),
        spritesheet: dir.join("spritesheet.jpg"),
        cancel_file,
        extend_from,
        memory: job.settings.memory.clone(),
        device: state.config.queue.device.clone(),
    };
    let file = dir.join("job.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&worker_job)?)?;
    Ok((worker_job, file))
}

/// Why a worker ended without reporting: the signal (OOM killer, kill) or exit code, and the tail
/// of its stderr.
fn crash_message(status: Option<ExitStatus>, log: &Path) -> String {
    use std::os::unix::process::ExitStatusExt;
    let how = match status {
        Some(s) => match (s.code(), s.signal()) {
            (_, Some(9)) => {
                "the worker was killed by SIGKILL (out of memory, or killed externally)".to_string()
            }
            (_, Some(sig)) => format!("the worker died from signal {sig}"),
            (Some(code), _) => format!("the worker exited with code {code} without a result"),
            _ => "the worker ended without a result".to_string(),
        },
        None => "the worker ended without a result".to_string(),
    };
    let tail = std::fs::read(log)
        .map(|bytes| {
            let text =
                String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(4096)..]).into_owned();
            text.lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .unwrap_or_default();
    if tail.trim().is_empty() {
        how
    } else {
        format!("{how}; stderr: {tail}")
    }
}

/// Maps stage/step events to the 0–100 `progress`, records stage timings, and forwards events.
struct ProgressTracker {
    progress: u32,
    stored: u32,
    /// The current stage and when its event arrived. Timed here rather than from the worker's
    /// `elapsed_s`, so the last stage (encoding, stills, an extension's stitching) ends when the
    /// worker's end line arrives instead of counting as zero.
    stage: Option<(Stage, Instant)>,
}

fn stage_name(stage: Stage) -> String {
    serde_json::to_value(stage)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The share of a job each stage ends at (denoising dominates).
fn stage_span(stage: Stage) -> (f64, f64) {
    match stage {
        Stage::Validate => (0.0, 1.0),
        Stage::TextEncode => (1.0, 5.0),
        Stage::ImageEncode => (5.0, 8.0),
        Stage::Denoise => (8.0, 90.0),
        Stage::VaeDecode => (90.0, 97.0),
        Stage::Encode => (97.0, 99.0),
    }
}

impl ProgressTracker {
    fn new() -> Self {
        ProgressTracker {
            progress: 0,
            stored: 0,
            stage: None,
        }
    }

    fn on_event(&mut self, state: &AppState, id: &str, event: ProgressEvent) {
        let mut live = state.live_progress(id).unwrap_or_default();
        let (name, new_progress) = match &event {
            ProgressEvent::Stage { stage, .. } => {
                self.finish(state);
                self.stage = Some((*stage, Instant::now()));
                live = LiveProgress {
                    stage: Some(stage_name(*stage)),
                    step: None,
                    eta_s: None,
                };
                ("stage", Some(stage_span(*stage).0))
            }
            ProgressEvent::Step {
                stage,
                step,
                total,
                eta_s,
                ..
            } => {
                live.stage = Some(stage_name(*stage));
                live.step = Some((*step, *total));
                live.eta_s = *eta_s;
                let (a, b) = stage_span(*stage);
                let frac = if *total > 0 {
                    f64::from(*step) / f64::from(*total)
                } else {
                    0.0
                };
                ("step", Some(a + (b - a) * frac.clamp(0.0, 1.0)))
            }
            ProgressEvent::Preview { .. } => ("preview", None),
            ProgressEvent::Warning { message } => {
                tracing::warn!(job_id = %id, message = %message, "worker warning");
                ("warning", None)
            }
        };
        if let Some(p) = new_progress {
            // Never goes backwards (a retry of a stage must not make the bar jump back).
            self.progress = self.progress.max(p.floor() as u32).min(99);
        }
        state.set_live_progress(id, Some(live.clone()));
        if self.progress != self.stored {
            self.stored = self.progress;
            if let Err(e) = state
                .store
                .set_progress(id, self.progress, live.stage.as_deref())
            {
                tracing::warn!(job_id = %id, error = %e, "storing progress failed");
            }
        }
        let mut data = serde_json::to_value(&event).unwrap_or_default();
        if let Some(obj) = data.as_object_mut() {
            obj.insert("progress".into(), self.progress.into());
        }
        state.publish(id, name, data.to_string());
    }

    /// Records the current stage's duration (it ended: the next began, or the job did).
    fn finish(&mut self, state: &AppState) {
        if let Some((stage, started)) = self.stage.take() {
            state
                .metrics
                .stage_done(&stage_name(stage), started.elapsed().as_secs_f64());
        }
    }
}

/// Deletes outputs past their `expires_at`, checking every minute (or sooner for short retention).
async fn retention_sweeper(state: Arc<AppState>) {
    let period = (state.config.retention_hours * 3600.0 / 4.0).clamp(1.0, 60.0);
    loop {
        sweep_expired(&state);
        tokio::time::sleep(Duration::from_secs_f64(period)).await;
    }
}

pub fn sweep_expired(state: &AppState) {
    let ids = match state.store.expired_jobs(crate::store::now()) {
        Ok(ids) => ids,
        Err(e) => {
            tracing::error!(error = %e, "listing expired jobs failed");
            return;
        }
    };
    for id in ids {
        if let Ok(dir) = state.job_dir(&id) {
            if dir.exists() {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!(job_id = %id, error = %e, "deleting expired outputs failed");
                    continue;
                }
            }
        }
        tracing::info!(job_id = %id, "outputs expired and deleted");
        let _ = state.store.mark_expired(&id);
    }
}

/// After a restart: interrupted jobs are failed (or requeued once) before the runners start.
pub fn recover(state: &AppState) -> anyhow::Result<()> {
    let (requeued, failed) = state
        .store
        .recover_interrupted(state.config.queue.requeue_interrupted, state.expires_at())?;
    if requeued + failed > 0 {
        tracing::warn!(requeued, failed, "jobs interrupted by the last shutdown");
    }
    for _ in 0..failed {
        state.metrics.failure(codes::INTERRUPTED);
    }
    let queued = state.store.count_queued()?;
    if queued > 0 {
        tracing::info!(queued, "queued jobs resume");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::Value;

    fn state(dir: &Path) -> AppState {
        let store = crate::store::Store::open(&dir.join("db.sqlite")).unwrap();
        let env = crate::state::ServerEnv {
            worker_exe: PathBuf::from("/nonexistent"),
            models: Vec::new(),
        };
        AppState::new(crate::Config::default(), dir.to_path_buf(), store, env)
    }

    fn next(rx: &mut tokio::sync::broadcast::Receiver<crate::state::LiveMsg>) -> (String, Value) {
        let msg = rx.try_recv().expect("an event was published");
        (
            msg.event.to_string(),
            serde_json::from_str(&msg.data).unwrap(),
        )
    }

    /// The worker's events reach `/events` subscribers: stage, step (total, ETA, progress) and
    /// the preview frame as a decodable PNG; stage durations land in the metrics.
    #[test]
    fn worker_events_are_forwarded_with_progress_and_stage_timings() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path());
        let id = "video_0123456789abcdef0123456789abcdef";
        let mut rx = state.subscribe(id);
        let mut tracker = ProgressTracker::new();

        tracker.on_event(
            &state,
            id,
            ProgressEvent::Stage {
                stage: Stage::Denoise,
                elapsed_s: 0.5,
            },
        );
        let (name, data) = next(&mut rx);
        assert_eq!(name, "stage");
        assert_eq!(data["stage"], "denoise");
        assert_eq!(data["progress"], 8);

        tracker.on_event(
            &state,
            id,
            ProgressEvent::Step {
                stage: Stage::Denoise,
                step: 2,
                total: 4,
                elapsed_s: 1.0,
                eta_s: Some(1.5),
            },
        );
        let (name, data) = next(&mut rx);
        assert_eq!(name, "step");
        assert_eq!(
            (data["step"].as_u64(), data["total"].as_u64()),
            (Some(2), Some(4))
        );
        assert_eq!(data["eta_s"], 1.5);
        assert_eq!(
            data["progress"], 49,
            "halfway through denoise (8..90): {data}"
        );
        let live = state.live_progress(id).unwrap();
        assert_eq!(live.step, Some((2, 4)));
        assert_eq!(live.eta_s, Some(1.5));

        let mut png = Vec::new();
        image::RgbImage::from_fn(8, 6, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 9]))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        tracker.on_event(
            &state,
            id,
            ProgressEvent::Preview {
                step: 2,
                width: 8,
                height: 6,
                png_base64: base64::engine::general_purpose::STANDARD.encode(&png),
            },
        );
        let (name, data) = next(&mut rx);
        assert_eq!(name, "preview");
        assert_eq!(data["step"], 2);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data["png_base64"].as_str().unwrap())
            .unwrap();
        let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap();
        assert_eq!((img.width(), img.height()), (8, 6));
        assert_eq!(data["progress"], 49, "a preview does not move the bar");

        std::thread::sleep(Duration::from_millis(20));
        tracker.on_event(
            &state,
            id,
            ProgressEvent::Stage {
                stage: Stage::VaeDecode,
                elapsed_s: 2.0,
            },
        );
        tracker.finish(&state);
        let stages = state.metrics.stages();
        let (denoise_s, n) = stages["denoise"];
        assert_eq!(n, 1);
        assert!(denoise_s >= 0.02, "{denoise_s}");
        assert_eq!(stages["vae_decode"].1, 1, "the last stage is counted too");
    }
}
