//! `vidgen run-component`: the contract lives in `vidgen_engine::component`.

use std::path::PathBuf;

use anyhow::Result;
use vidgen_engine::component::{self, ComponentOptions, Inputs, Settings};
use vidgen_engine::device::{parse_device, parse_dtype};

#[derive(clap::Args)]
pub struct Args {
    /// dit | vae-encode | vae-decode | text-encode | denoise
    component: String,
    /// Component folder or file (diffusers or official layout), or a pipeline folder for `denoise`.
    #[arg(long)]
    model: PathBuf,
    /// Input tensors (safetensors).
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write the output tensors (safetensors, f32).
    #[arg(long)]
    output: PathBuf,
    /// cpu | cuda | cuda:N
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 | bf16
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Component settings, e.g. `--set steps=4 guidance_scale=5`.
    #[arg(long = "set", num_args = 1.., value_name = "KEY=VALUE")]
    set: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    // Validate everything cheap before any weight is read.
    if !component::COMPONENTS.contains(&args.component.as_str()) {
        return Err(vidgen_engine::invalid!(
            "unknown component `{}`; valid components: {}",
            args.component,
            component::COMPONENTS.join(", ")
        ));
    }
    let opts = ComponentOptions {
        device: parse_device(&args.device)?,
        dtype: parse_dtype(&args.dtype)?,
        settings: Settings::parse(&args.set)?,
    };
    let inputs = Inputs::load(&args.inputs)?;
    let outputs = component::run(&args.component, &args.model, &inputs, &opts)?;
    component::write_outputs(&args.output, &outputs)?;
    Ok(())
}
