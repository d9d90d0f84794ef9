//! UMT5-XXL text encoder, tokenizer and prompt cleaning.
use std::path::Path;

use anyhow::Result;

use crate::component::{ComponentOptions, Inputs, Outputs};

/// `run-component text-encode`.
pub fn run_component(_model: &Path, _inputs: &Inputs, _opts: &ComponentOptions) -> Result<Outputs> {
    anyhow::bail!("run-component text-encode: not implemented yet")
}
