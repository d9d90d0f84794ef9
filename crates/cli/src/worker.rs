//! `vidgen worker`: runs jobs for `vidgen serve` in a child process, so GPU memory goes back to the
//! system when a job ends, crashes or is killed.
//!
//! `--job FILE` runs one job (a `WorkerJob` JSON file) and exits; `--serve` reads jobs as JSON
//! lines on stdin and stays alive between them (models stay warm). Either way stdout carries one
//! JSON object per line: progress events, then the job's end (`done` with what was made, or
//! `failed` with a code and message). A job stops at its next step once its cancel file exists.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use vidgen_engine::memory::Offload;
use vidgen_engine::pipeline::{ProgressEvent, ProgressSink};

use crate::generate::{MemoryOptions, RunOptions};
use vidgen_server::protocol::{codes, JobOutput, WorkerEnd, WorkerJob, WorkerLine};

#[derive(clap::Args)]
pub struct Args {
    /// Job file written by the server.
    #[arg(long, required_unless_present = "serve", conflicts_with = "serve")]
    job: Option<PathBuf>,
    /// Stay alive and read jobs (JSON lines) from stdin.
    #[arg(long)]
    serve: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    exit_with_parent();
    if args.serve {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let line = line.context("reading a job from stdin")?;
            if line.trim().is_empty() {
                continue;
            }
            let end = match serde_json::from_str::<WorkerJob>(&line) {
                Ok(job) => run_job(&job),
                Err(e) => WorkerEnd::Failed {
                    code: codes::INVALID_REQUEST.into(),
                    message: format!("malformed job: {e}"),
                },
            };
            emit(&WorkerLine::End(end))?;
        }
        return Ok(());
    }
    let path = args.job.expect("clap requires --job without --serve");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading job file {}", path.display()))?;
    let job: WorkerJob = serde_json::from_str(&text)
        .map_err(|e| vidgen_engine::invalid!("job file {}: {e}", path.display()))?;
    let end = run_job(&job);
    emit(&WorkerLine::End(end.clone()))?;
    match end {
        WorkerEnd::Done(_) => Ok(()),
        WorkerEnd::Failed { code, message } if code == codes::INVALID_REQUEST => {
            Err(vidgen_engine::invalid!("{message}"))
        }
        WorkerEnd::Failed { code, message } => Err(anyhow::anyhow!("{code}: {message}")),
    }
}

/// A worker outlives nothing: if the server dies (even by SIGKILL, which runs no cleanup), the
/// worker exits within a moment instead of holding the GPU for a job nobody will collect.
fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(250));
        if std::os::unix::process::parent_id() != parent {
            eprintln!("vidgen worker: the server (pid {parent}) is gone; exiting");
            std::process::exit(1);
        }
    });
}

/// One JSON line on stdout, flushed (the server reads it as it comes). An error here means the
/// server is gone: the job stops.
fn emit(line: &WorkerLine) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, line)?;
    out.write_all(b"\n")?;
    out.flush().context("writing to the server")?;
    Ok(())
}

/// Forwards progress to the server (previews included: the portal shows them) and stops the run
/// at the next event once the server has asked to cancel.
struct ServerSink<'a> {
    cancel_file: &'a Path,
}

impl ProgressSink for ServerSink<'_> {
    fn event(&mut self, event: ProgressEvent) -> anyhow::Result<()> {
        emit(&WorkerLine::Progress(event))?;
        if self.cancel_file.exists() {
            anyhow::bail!("cancelled");
        }
        Ok(())
    }

    fn wants_previews(&self) -> bool {
        true
    }
}

fn run_job(job: &WorkerJob) -> WorkerEnd {
    let cancelled = || job.cancel_file.exists();
    let mut sink = ServerSink {
        cancel_file: &job.cancel_file,
    };
    let result = generate_job(job, &mut sink);
    match result {
        Ok(output) => WorkerEnd::Done(output),
        Err(_) if cancelled() => WorkerEnd::Failed {
            code: codes::CANCELLED.into(),
            message: "cancelled while running".into(),
        },
        Err(e) => {
            let message = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            let code = if vidgen_engine::error::is_invalid_input(&e) {
                codes::INVALID_REQUEST
            } else {
                codes::GENERATION_FAILED
            };
            WorkerEnd::Failed {
                code: code.into(),
                message,
            }
        }
    }
}

/// The job's device and memory options: the server's `queue.device` (else the build's default),
/// the request's `offload` (else chosen by the planner from the free GPU memory), `weights`
/// (`fp8`: transformer block linears in FP8) and `vae_dtype` (`auto`: bf16 on a GPU, f32 on the
/// CPU; `bf16` on the CPU is an invalid request, as `vidgen generate --vae-dtype bf16` is there).
fn run_options(job: &WorkerJob) -> anyhow::Result<RunOptions> {
    let device = job
        .device
        .as_deref()
        .unwrap_or(vidgen_engine::device::default_device());
    let device = vidgen_engine::device::parse_device(device)?;
    let offload = match &job.memory.offload {
        Some(mode) => Offload::parse(mode)?,
        None => None,
    };
    let vae_bf16 = vidgen_engine::memory::vae_bf16(
        "vae_dtype",
        job.memory.vae_dtype.name(),
        !device.is_cpu(),
    )?;
    let (fp8, fp8_matmul) = job.memory.weights.fp8_flags();
    Ok(RunOptions {
        device,
        memory: MemoryOptions {
            offload,
            fp8,
            fp8_matmul,
            vae_bf16,
            ..MemoryOptions::default()
        },
        ..RunOptions::default()
    })
}

fn generate_job(job: &WorkerJob, sink: &mut dyn ProgressSink) -> anyhow::Result<JobOutput> {
    let options = run_options(job)?;
    let Some(source) = &job.extend_from else {
        let summary =
            crate::generate::run_request(&job.model, &job.request, &options, &job.output, sink)?;
        let (thumbnail, spritesheet) = still_images(job, &job.output, sink);
        return Ok(JobOutput {
            width: summary.width,
            height: summary.height,
            frames: summary.frames,
            fps: summary.fps,
            seconds: summary.seconds,
            seed: summary.seed,
            warnings: summary.warnings,
            thumbnail,
            spritesheet,
        });
    };

    // Extension: the source's last frame conditions a new segment (image-to-video), and the
    // result is the source followed by the segment, in one file.
    let (_, source_frames) = vidgen_media::decode(source)
        .with_context(|| format!("decoding the source video {}", source.display()))?;
    let image = job
        .request
        .image
        .as_ref()
        .context("an extension job has an image path")?;
    let last = source_frames
        .len()
        .checked_sub(1)
        .context("the source video has no frames")?;
    vidgen_media::thumbnail_frame(&source_frames, last, image)?;
    let segment = job.output.with_file_name(format!(
        "segment.{}",
        job.output
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("mp4")
    ));
    let summary = crate::generate::run_request(&job.model, &job.request, &options, &segment, sink)?;
    let (_, new_frames) = vidgen_media::decode(&segment)
        .with_context(|| format!("decoding the new segment {}", segment.display()))?;
    if (new_frames.width(), new_frames.height()) != (source_frames.width(), source_frames.height())
    {
        anyhow::bail!(
            "the new segment is {}x{} but the source is {}x{}",
            new_frames.width(),
            new_frames.height(),
            source_frames.width(),
            source_frames.height()
        );
    }
    // The segment's first frame re-creates the conditioning frame: drop it so the seam does not
    // show the same picture twice.
    let skip = usize::from(new_frames.len() > 1);
    let count = source_frames.len() + new_frames.len() - skip;
    let mut data = source_frames.into_data();
    data.extend_from_slice(&new_frames.data()[skip * new_frames.frame_bytes()..]);
    let joined =
        vidgen_media::Frames::from_rgb(data, new_frames.width(), new_frames.height(), count)?;
    let format = vidgen_media::Format::from_path(&job.output)?;
    vidgen_media::encode(&joined, f64::from(summary.fps), &job.output, format)?;
    let _ = std::fs::remove_file(&segment);
    let (thumbnail, spritesheet) = still_images(job, &job.output, sink);
    Ok(JobOutput {
        width: summary.width,
        height: summary.height,
        frames: count as u32,
        fps: summary.fps,
        seconds: count as f64 / f64::from(summary.fps),
        seed: summary.seed,
        warnings: summary.warnings,
        thumbnail,
        spritesheet,
    })
}

/// The thumbnail and spritesheet variants, from the finished video. A failure here is reported
/// as a warning and leaves the video itself usable.
fn still_images(
    job: &WorkerJob,
    video: &std::path::Path,
    sink: &mut dyn ProgressSink,
) -> (bool, bool) {
    let frames = match vidgen_media::decode(video) {
        Ok((_, frames)) => frames,
        Err(e) => {
            let _ = sink.event(ProgressEvent::Warning {
                message: format!("no thumbnail or spritesheet: decoding the video failed: {e:#}"),
            });
            return (false, false);
        }
    };
    let mut warn = |what: &str, e: anyhow::Error| {
        let _ = sink.event(ProgressEvent::Warning {
            message: format!("no {what}: {e:#}"),
        });
        false
    };
    let thumbnail = vidgen_media::thumbnail(&frames, &job.thumbnail)
        .map(|()| true)
        .unwrap_or_else(|e| warn("thumbnail", e));
    let spritesheet = vidgen_media::spritesheet(&frames, &job.spritesheet, &Default::default())
        .map(|()| true)
        .unwrap_or_else(|e| warn("spritesheet", e));
    (thumbnail, spritesheet)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vidgen_server::protocol::{MemorySettings, VaeDtype, Weights};

    fn job(weights: Weights, vae_dtype: VaeDtype) -> WorkerJob {
        WorkerJob {
            id: "video_0".into(),
            model: "demo".into(),
            request: Default::default(),
            output: "video.mp4".into(),
            thumbnail: "thumbnail.webp".into(),
            spritesheet: "spritesheet.jpg".into(),
            cancel_file: "cancel".into(),
            extend_from: None,
            memory: MemorySettings {
                offload: Some("aggressive".into()),
                weights,
                vae_dtype,
            },
            device: Some("cpu".into()),
        }
    }

    #[test]
    fn run_options_apply_weights_and_vae_dtype() {
        let o = run_options(&job(Weights::Fp8, VaeDtype::F32)).unwrap();
        assert!(o.memory.fp8 && !o.memory.fp8_matmul && !o.memory.vae_bf16);
        let o = run_options(&job(Weights::Fp8Matmul, VaeDtype::F32)).unwrap();
        assert!(o.memory.fp8 && o.memory.fp8_matmul);
        assert_eq!(o.memory.offload, Some(Offload::Aggressive));
        // auto on the CPU: f32.
        let o = run_options(&job(Weights::Bf16, VaeDtype::Auto)).unwrap();
        assert!(!o.memory.fp8 && !o.memory.vae_bf16);
        // bf16 on the CPU is the request's fault, as with `vidgen generate`.
        let err = run_options(&job(Weights::Bf16, VaeDtype::Bf16)).unwrap_err();
        assert!(vidgen_engine::error::is_invalid_input(&err), "{err:#}");
        assert!(err.to_string().starts_with("vae_dtype: bf16"), "{err:#}");
    }

    #[test]
    fn job_files_without_the_knobs_still_parse() {
        let text = r#"{"id": "video_0", "model": "demo", "request": {"prompt": "p"},
            "output": "v.mp4", "thumbnail": "t.webp", "spritesheet": "s.jpg", "cancel_file": "c"}"#;
        let job: WorkerJob = serde_json::from_str(text).unwrap();
        assert_eq!(
            (job.memory.weights, job.memory.vae_dtype),
            (Weights::Bf16, VaeDtype::Auto)
        );
    }
}
