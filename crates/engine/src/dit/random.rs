//! Seeded random DiT weights (the built-in demo model and tests).

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::config::DitConfig;
use super::model::weight_shapes;

/// Weights ~ N(0, 1/fan_in) for matrices, norm gains 1, biases and modulation tables small
/// N(0, 0.02²); deterministic for a seed (the host RNG of [`crate::rng`]).
pub fn random_weights(
    cfg: &DitConfig,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    weight_shapes(cfg)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let s = seed
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(i as u64);
            let t = if name.contains("norm") && name.ends_with("weight") {
                Tensor::ones(shape.as_slice(), DType::F32, device)?
            } else if shape.len() >= 2 && !name.ends_with("scale_shift_table") {
                let fan_in: usize = shape[1..].iter().product();
                (crate::rng::gaussian_noise(s, shape.as_slice(), device)? / (fan_in as f64).sqrt())?
            } else {
                (crate::rng::gaussian_noise(s, shape.as_slice(), device)? * 0.02)?
            };
            Ok((name, t))
        })
        .collect()
}

/// Random weights drawn on `device` itself and stored in `dtype` tensor by tensor (same layout and
/// scales as [`random_weights`]): full-size models (a 14B expert is 28 GB in bf16) for benchmarks,
/// without host-side generation or an f32 copy of the whole model. Values depend on the device's
/// generator, so they differ between devices; use [`random_weights`] where values must be fixed.
pub fn random_weights_on_device(
    cfg: &DitConfig,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<HashMap<String, Tensor>> {
    device.set_seed(seed)?;
    weight_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let t = if name.contains("norm") && name.ends_with("weight") {
                Tensor::ones(shape.as_slice(), DType::F32, device)?
            } else if shape.len() >= 2 && !name.ends_with("scale_shift_table") {
                let fan_in: usize = shape[1..].iter().product();
                Tensor::randn(
                    0f32,
                    (1.0 / fan_in as f64).sqrt() as f32,
                    shape.as_slice(),
                    device,
                )?
            } else {
                Tensor::randn(0f32, 0.02, shape.as_slice(), device)?
            };
            Ok((name, t.to_dtype(dtype)?))
        })
        .collect()
}
