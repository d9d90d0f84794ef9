//! Device and dtype selection from user-facing names.

use anyhow::Result;
use candle_core::{DType, Device};

use crate::invalid;

/// `cpu` or `cuda` (GPU 0) / `cuda:N`.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        n if n == "cuda" || n.starts_with("cuda:") => {
            let ordinal = match n.strip_prefix("cuda:") {
                Some(i) => i
                    .parse::<usize>()
                    .map_err(|_| invalid!("--device: `{n}` is not cuda or cuda:N"))?,
                None => 0,
            };
            cuda_device(ordinal)
        }
        other => Err(invalid!(
            "--device: `{other}` is not one of cpu, cuda, cuda:N"
        )),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Ok(Device::new_cuda(ordinal)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize) -> Result<Device> {
    Err(invalid!(
        "--device cuda: this vidgen was built without CUDA; rebuild with `cargo build --release --features cuda`"
    ))
}

/// `f32`, `bf16` (and `f16`).
pub fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(invalid!("--dtype: `{other}` is not one of f32, bf16, f16")),
    }
}
