//! Progress events of a generation, one JSON object per line in `--json` mode and on the worker's
//! stdout (the server reads them).

use serde::{Deserialize, Serialize};

/// Pipeline stages in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Validate,
    TextEncode,
    ImageEncode,
    Denoise,
    VaeDecode,
    Encode,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProgressEvent {
    /// A stage started.
    Stage { stage: Stage, elapsed_s: f64 },
    /// A unit of work inside a stage finished (denoising step, decoded latent frame).
    Step {
        stage: Stage,
        step: u32,
        total: u32,
        elapsed_s: f64,
        eta_s: Option<f64>,
    },
    /// A small preview frame (PNG, base64) of the current estimate.
    Preview {
        step: u32,
        width: u32,
        height: u32,
        png_base64: String,
    },
    /// Something the user should know (aligned frames, demo model, quality warning).
    Warning { message: String },
}

/// Receives progress; returning `Err` (e.g. cancelled) stops the run at the next step.
pub trait ProgressSink {
    fn event(&mut self, event: ProgressEvent) -> anyhow::Result<()>;

    /// Whether [`ProgressEvent::Preview`] frames are wanted (they cost a one-time VAE probe and
    /// a small matmul per preview).
    fn wants_previews(&self) -> bool {
        false
    }
}

/// Discards events.
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn event(&mut self, _event: ProgressEvent) -> anyhow::Result<()> {
        Ok(())
    }
}

impl<F: FnMut(ProgressEvent) -> anyhow::Result<()>> ProgressSink for F {
    fn event(&mut self, event: ProgressEvent) -> anyhow::Result<()> {
        self(event)
    }
}
