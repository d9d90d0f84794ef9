//! The sampling loop: classifier-free guidance and the A14B expert switch.
use std::path::Path;

use anyhow::Result;

use crate::component::{ComponentOptions, Inputs, Outputs};

/// `run-component denoise`.
pub fn run_component(_model: &Path, _inputs: &Inputs, _opts: &ComponentOptions) -> Result<Outputs> {
    anyhow::bail!("run-component denoise: not implemented yet")
}
