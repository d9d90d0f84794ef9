//! `vidgen generate`: prompt (+ image) -> video file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vidgen_engine::pipeline::{GenerateRequest, ProgressSink};

#[derive(clap::Args)]
pub struct Args {}

/// What a finished generation made (reported by `generate --json`, the worker and the server).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerateSummary {
    pub output: PathBuf,
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub fps: u32,
    pub seed: u64,
    pub seconds: f64,
    /// Quality-guard warnings (noise-like frames etc.).
    pub warnings: Vec<String>,
}

/// Runs one request on `model` ("demo", a model folder, or a configured model name resolved by the
/// caller to a folder) and writes the video to `output` (.mp4 or .webm). Shared by `generate`, the
/// worker and tests. Errors: `InvalidInput` for the request, anything else is a runtime failure.
pub fn run_request(
    _model: &str,
    _request: &GenerateRequest,
    _output: &Path,
    _sink: &mut dyn ProgressSink,
) -> anyhow::Result<GenerateSummary> {
    anyhow::bail!("the generation pipeline is not wired yet")
}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("vidgen generate: not implemented yet")
}
