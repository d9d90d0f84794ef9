//! The Wan diffusion transformer (WanModel / WanTransformer3DModel).
use std::path::Path;

use anyhow::Result;

use crate::component::{ComponentOptions, Inputs, Outputs};

/// `run-component dit`.
pub fn run_component(_model: &Path, _inputs: &Inputs, _opts: &ComponentOptions) -> Result<Outputs> {
    anyhow::bail!("run-component dit: not implemented yet")
}
