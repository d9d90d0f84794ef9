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
