//! Seeded random DiT weights (the built-in demo model and tests).

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::config::DitConfig;
use super::model::weight_shapes;
use crate::weights::TensorSource;

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
    let source = RandomSource::new(cfg, seed, device, dtype)?;
    source
        .keys()
        .into_iter()
        .map(|name| {
            let t = source.load(&name, device)?;
            Ok((name, t))
        })
        .collect()
}

/// [`random_weights_on_device`] as a [`TensorSource`]: each tensor is drawn when it is loaded,
/// so a model built from it (e.g. with FP8 block linears) never holds the whole dense model.
pub struct RandomSource {
    shapes: std::collections::BTreeMap<String, Vec<usize>>,
    dtype: DType,
}

impl RandomSource {
    pub fn new(cfg: &DitConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        device.set_seed(seed)?;
        Ok(Self {
            shapes: weight_shapes(cfg).into_iter().collect(),
            dtype,
        })
    }
}

impl TensorSource for RandomSource {
    fn keys(&self) -> Vec<String> {
        self.shapes.keys().cloned().collect()
    }

    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.shapes.get(key).cloned()
    }

    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| crate::invalid!("random transformer: no tensor named `{name}`"))?;
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
        Ok(t.to_dtype(self.dtype)?)
    }

    fn describe(&self) -> String {
        "random transformer".into()
    }
}
