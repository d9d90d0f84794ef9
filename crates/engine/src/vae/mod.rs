//! Wan VAE 2.1 (z16) and 2.2 (z48).
use std::path::Path;

use anyhow::Result;

use crate::component::{ComponentOptions, Inputs, Outputs};

/// `run-component vae-encode`.
pub fn run_component_encode(_model: &Path, _inputs: &Inputs, _opts: &ComponentOptions) -> Result<Outputs> {
    anyhow::bail!("run-component vae-encode: not implemented yet")
}

/// `run-component vae-decode`.
pub fn run_component_decode(_model: &Path, _inputs: &Inputs, _opts: &ComponentOptions) -> Result<Outputs> {
    anyhow::bail!("run-component vae-decode: not implemented yet")
}
