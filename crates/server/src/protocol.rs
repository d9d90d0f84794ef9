//! What the server stores about a job, and the protocol between the server and `vidgen worker`.
//!
//! The server writes a [`WorkerJob`] (JSON) for the worker; the worker answers on stdout with one
//! JSON object per line: [`ProgressEvent`]s while it runs, then one [`WorkerEnd`]. In `--serve`
//! mode (the warm worker) jobs arrive as JSON lines on stdin, one at a time.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vidgen_engine::pipeline::{GenerateRequest, ProgressEvent};

/// Container of the produced video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Mp4,
    Webm,
}

impl OutputFormat {
    pub const NAMES: &'static str = "mp4, webm";

    pub fn parse(s: &str) -> Option<OutputFormat> {
        match s {
            "mp4" => Some(OutputFormat::Mp4),
            "webm" => Some(OutputFormat::Webm),
            _ => None,
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Mp4 => "mp4",
            OutputFormat::Webm => "webm",
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            OutputFormat::Mp4 => "video/mp4",
            OutputFormat::Webm => "video/webm",
        }
    }
}

/// Transformer weight format asked for (`vidgen generate --weights`). A GGUF checkpoint keeps its
/// block-quantised linears whatever this says (FP8 applies only to linears it stores unquantised).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weights {
    /// bf16 on a GPU (f32 on the CPU).
    #[default]
    Bf16,
    /// Transformer block linears in FP8 e4m3 with per-channel scales: half the weight memory.
    Fp8,
    /// The same FP8 weights computed as FP8 matmuls (per-token activation scales): faster on
    /// GPUs with FP8 tensor cores, a little less accurate.
    #[serde(rename = "fp8-matmul")]
    Fp8Matmul,
}

impl Weights {
    pub const NAMES: [&'static str; 3] = ["bf16", "fp8", "fp8-matmul"];

    pub fn parse(s: &str) -> Option<Weights> {
        match s {
            "bf16" => Some(Weights::Bf16),
            "fp8" => Some(Weights::Fp8),
            "fp8-matmul" => Some(Weights::Fp8Matmul),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Weights::Bf16 => "bf16",
            Weights::Fp8 => "fp8",
            Weights::Fp8Matmul => "fp8-matmul",
        }
    }

    /// (FP8 block linears, FP8 matmuls): the engine's `MemoryOptions::fp8` and `fp8_matmul`.
    pub fn fp8_flags(self) -> (bool, bool) {
        match self {
            Weights::Bf16 => (false, false),
            Weights::Fp8 => (true, false),
            Weights::Fp8Matmul => (true, true),
        }
    }
}

/// VAE precision asked for (`vidgen generate --vae-dtype`): `auto` is bf16 on a GPU and f32 on
/// the CPU; `bf16` needs a GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VaeDtype {
    #[default]
    Auto,
    Bf16,
    F32,
}

impl VaeDtype {
    pub const NAMES: [&'static str; 3] = ["auto", "bf16", "f32"];

    pub fn parse(s: &str) -> Option<VaeDtype> {
        match s {
            "auto" => Some(VaeDtype::Auto),
            "bf16" => Some(VaeDtype::Bf16),
            "f32" => Some(VaeDtype::F32),
            _ => None,
        }
    }

    /// The value as `vidgen generate --vae-dtype` spells it.
    pub fn name(self) -> &'static str {
        match self {
            VaeDtype::Auto => "auto",
            VaeDtype::Bf16 => "bf16",
            VaeDtype::F32 => "f32",
        }
    }
}

/// A job's settings as stored in the database: every value decided at submission (seed included),
/// so the worker makes exactly what the API reported, and a restart or remix repeats it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSettings {
    /// The model's public name (a key of the server's model table).
    pub model: String,
    /// Fully resolved: every option is `Some`; `image` is `Some("input.png")` (relative to the job
    /// folder) when the job has a conditioning image.
    pub request: GenerateRequest,
    pub output_format: OutputFormat,
    /// For `/v1/videos/extensions`: the completed video this job continues.
    #[serde(default)]
    pub extend_from: Option<String>,
    /// Adjustments validation made (e.g. seconds -> frames), shown to the user.
    #[serde(default)]
    pub notes: Vec<String>,
    /// Where the job's weights live and in what precision (stored as top-level fields).
    #[serde(flatten)]
    pub memory: MemorySettings,
}

/// A job's memory and precision knobs, as the native API takes them; they travel together from the
/// request through the stored settings to the worker's job file (flattened in both).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemorySettings {
    /// Placement mode asked for (`none`, `cond`, `cond-diffusion`, `aggressive`, `stream`);
    /// `None` lets the worker's planner choose from the free GPU memory.
    #[serde(default)]
    pub offload: Option<String>,
    /// Transformer weight format (absent in rows stored before it existed: bf16).
    #[serde(default)]
    pub weights: Weights,
    /// VAE precision (absent in rows stored before it existed: auto).
    #[serde(default)]
    pub vae_dtype: VaeDtype,
}

/// The job file handed to a worker (absolute paths, all inside the job's folder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerJob {
    pub id: String,
    /// What `run_request` loads: `demo` or a model folder.
    pub model: String,
    /// Fully resolved request; `image` is an absolute path to the sanitised upload.
    pub request: GenerateRequest,
    pub output: PathBuf,
    pub thumbnail: PathBuf,
    pub spritesheet: PathBuf,
    /// The worker stops at its next step once this file exists.
    pub cancel_file: PathBuf,
    /// For extensions: the source video; its last frame conditions the new segment, and the result
    /// is the source followed by the new segment in one file.
    #[serde(default)]
    pub extend_from: Option<PathBuf>,
    /// The job's memory knobs (see [`MemorySettings`]).
    #[serde(flatten)]
    pub memory: MemorySettings,
    /// Device to run on (`cpu`, `cuda`, `cuda:N`); `None`: the build's default (the GPU when
    /// built with CUDA).
    #[serde(default)]
    pub device: Option<String>,
}

/// What was actually made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobOutput {
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub fps: u32,
    pub seconds: f64,
    pub seed: u64,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Whether the thumbnail / spritesheet files were produced.
    #[serde(default)]
    pub thumbnail: bool,
    #[serde(default)]
    pub spritesheet: bool,
}

/// The worker's last line for a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WorkerEnd {
    Done(JobOutput),
    Failed { code: String, message: String },
}

/// One line of worker output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WorkerLine {
    Progress(ProgressEvent),
    End(WorkerEnd),
}

/// Failure codes a job can end with (the `error.code` of the video object).
pub mod codes {
    /// The request was rejected by the model at run time (exit 2).
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// The generation returned an error.
    pub const GENERATION_FAILED: &str = "generation_failed";
    /// The worker process died (signal, OOM kill, panic) without reporting.
    pub const WORKER_CRASHED: &str = "worker_crashed";
    pub const CANCELLED: &str = "cancelled";
    /// The server stopped while the job was running.
    pub const INTERRUPTED: &str = "interrupted";
    pub const TIMEOUT: &str = "timeout";
}

#[cfg(test)]
mod tests {
    use super::*;
    use vidgen_engine::pipeline::Stage;

    #[test]
    fn settings_stored_before_weights_and_vae_dtype_still_load() {
        let old = r#"{"model": "demo", "request": {"prompt": "p"}, "output_format": "mp4",
            "offload": "cond"}"#;
        let s: JobSettings = serde_json::from_str(old).unwrap();
        assert_eq!(
            (s.memory.weights, s.memory.vae_dtype),
            (Weights::Bf16, VaeDtype::Auto)
        );
        assert_eq!(s.memory.offload.as_deref(), Some("cond"));
        let mut new = s;
        new.memory.weights = Weights::Fp8;
        new.memory.vae_dtype = VaeDtype::F32;
        let text = serde_json::to_string(&new).unwrap();
        assert!(
            text.contains(r#""weights":"fp8""#) && text.contains(r#""vae_dtype":"f32""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<JobSettings>(&text).unwrap(), new);
        for name in Weights::NAMES {
            let w = Weights::parse(name).unwrap();
            assert_eq!(w.name(), name);
            // The JSON spelling is the CLI's.
            assert_eq!(serde_json::to_value(w).unwrap(), name);
        }
        for name in VaeDtype::NAMES {
            assert_eq!(VaeDtype::parse(name).unwrap().name(), name);
        }
        assert_eq!(Weights::parse("fp16"), None);
        assert_eq!(VaeDtype::parse("F32"), None);
    }

    #[test]
    fn worker_lines_round_trip() {
        let lines = [
            WorkerLine::Progress(ProgressEvent::Step {
                stage: Stage::Denoise,
                step: 2,
                total: 8,
                elapsed_s: 1.5,
                eta_s: Some(4.5),
            }),
            WorkerLine::End(WorkerEnd::Failed {
                code: "cancelled".into(),
                message: "x".into(),
            }),
            WorkerLine::End(WorkerEnd::Done(JobOutput {
                width: 256,
                height: 256,
                frames: 17,
                fps: 16,
                seconds: 1.0625,
                seed: 7,
                warnings: vec![],
                thumbnail: true,
                spritesheet: false,
            })),
        ];
        for line in lines {
            let text = serde_json::to_string(&line).unwrap();
            let back: WorkerLine = serde_json::from_str(&text).unwrap();
            assert_eq!(back, line, "{text}");
        }
    }
}
