//! The Wan diffusion transformer (official `WanModel` / diffusers `WanTransformer3DModel`).
//!
//! - [`config`]: `DitConfig` from either config.json flavour, or inferred from tensor shapes.
//! - [`keys`]: official / diffusers / ComfyUI key layouts -> canonical diffusers names.
//! - [`rope`]: the 3-axis RoPE (one frequency table per axis).
//! - [`model`]: the transformer, with per-request text context (cross-attention K/V) caching.

pub mod config;
pub mod cudnn_attention;
pub mod flash;
pub mod fused;
pub mod keys;
pub mod model;
pub mod random;
pub mod rope;
pub mod streaming;

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device};

pub use config::DitConfig;
pub use model::{TextContext, WanTransformer};
pub use rope::RopeTable;
pub use streaming::StreamOptions;

use crate::component::{ComponentOptions, Inputs, Outputs};
use crate::invalid;
use crate::weights::WeightMap;

/// Opens a transformer checkpoint as a weight map with canonical names, plus its config file if
/// there is one. `path`: a folder (`config.json` + safetensors, sharded or not — diffusers
/// `transformer/`, or an official model folder), or a single file: `.safetensors` (ComfyUI
/// repack, also scaled-fp8) or `.gguf` (city96/QuantStack quantisations: the map offers their
/// block-quantised tensors quantised, and the model keeps its block linears so); the config of a
/// single file is inferred from tensor shapes.
pub fn open_weights(path: &Path, device: &Device, dtype: DType) -> Result<(WeightMap, DitConfig)> {
    let source = crate::weights::open_any(path, dtype)?;
    let layout = keys::detect_layout(&source.keys());
    let wm = WeightMap::new(
        source,
        |k| Some(keys::canonical_name(k, layout)),
        device,
        dtype,
    )?;
    let config_file = if path.is_dir() {
        Some(path.join("config.json")).filter(|p| p.exists())
    } else {
        None
    };
    let cfg = match config_file {
        Some(f) => DitConfig::from_file(&f)?,
        None => DitConfig::infer(&wm)?,
    };
    Ok((wm, cfg))
}

/// Loads a transformer (see [`open_weights`] for `path`), strictly.
pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<WanTransformer> {
    load_with(path, device, dtype, &LoadOptions::default())
}

/// Loads a transformer with its blocks streamed from host memory (see [`streaming`]).
pub fn load_streamed(
    path: &Path,
    device: &Device,
    dtype: DType,
    opts: StreamOptions,
) -> Result<WanTransformer> {
    let options = LoadOptions {
        stream: Some(opts),
        ..LoadOptions::default()
    };
    load_with(path, device, dtype, &options)
}

/// How a transformer is held in memory. A GGUF checkpoint's block-quantised block linears are
/// always kept in their encoding (dequantised per use); to dequantise them on load instead, build
/// the model from [`open_weights`]'s map with `with_gguf_blocks(false)`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadOptions {
    /// Block linear weights in FP8 e4m3 with per-channel scales (half of bf16), quantised while
    /// loading, one layer at a time on the device it loads to (those a GGUF file stores
    /// block-quantised stay in their encoding).
    pub fp8_linears: bool,
    /// FP8 block linears (quantised on load or stored so) run as FP8 matmuls
    /// ([`crate::weights::fp8_matmul`]).
    pub fp8_matmul: bool,
    /// Blocks streamed from page-locked host memory: the checkpoint is read on the CPU, then
    /// everything but the streamed blocks moves to the device.
    pub stream: Option<StreamOptions>,
}

pub fn load_with(
    path: &Path,
    device: &Device,
    dtype: DType,
    options: &LoadOptions,
) -> Result<WanTransformer> {
    let load_device = if options.stream.is_some() {
        Device::Cpu
    } else {
        device.clone()
    };
    let (wm, cfg) = open_weights(path, &load_device, dtype)?;
    let wm = wm
        .with_fp8_linears(options.fp8_linears)
        .with_fp8_matmul(options.fp8_matmul);
    let model = WanTransformer::from_weights(cfg, &wm)?;
    match options.stream {
        Some(opts) => model.into_streamed(device, opts),
        None => Ok(model),
    }
}

/// `run-component dit`: inputs `hidden_states` [B,C,F,H,W], `timestep` [B] or [B,L],
/// `encoder_hidden_states` [B,L_text,text_dim]; output `output`.
pub fn run_component(model: &Path, inputs: &Inputs, opts: &ComponentOptions) -> Result<Outputs> {
    let x = inputs.float("hidden_states", &[5])?;
    let t = inputs.float("timestep", &[1, 2])?;
    let ctx = inputs.float("encoder_hidden_states", &[3])?;
    if ctx.dim(0)? != x.dim(0)? {
        return Err(invalid!(
            "encoder_hidden_states: batch {} differs from hidden_states batch {}",
            ctx.dim(0)?,
            x.dim(0)?
        ));
    }
    let dit = load(model, &opts.device, opts.dtype)?;
    let rope = dit.rope(x.dims())?;
    let context = dit.prepare_context(&ctx)?;
    let out = dit.forward(&x, &t, &context, &rope)?;
    Ok(vec![("output".to_string(), out)])
}
