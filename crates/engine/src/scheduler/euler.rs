//! Flow-matching Euler: x ← x + (σ_next − σ)·v.
//!
//! Follows diffusers 0.42.1 `FlowMatchEulerDiscreteScheduler.step` (deterministic path, no per-token
//! timesteps): the sample is upcast to float32 and dt = σ_next − σ is a float32 scalar.

use anyhow::Result;
use candle_core::Tensor;

use super::sigmas::Table;
use super::{check_step, scale, FlowScheduler};

pub struct Euler {
    table: Table,
    next_index: usize,
}

impl Euler {
    pub fn new(table: Table) -> Self {
        Self {
            table,
            next_index: 0,
        }
    }
}

impl FlowScheduler for Euler {
    fn timesteps(&self) -> &[f32] {
        &self.table.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.table.sigmas
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor> {
        let steps = self.table.timesteps.len();
        let (model_output, sample) = check_step(
            "Euler",
            self.next_index,
            steps,
            step_index,
            model_output,
            sample,
        )?;
        let dt = self.table.sigmas[step_index + 1] - self.table.sigmas[step_index];
        self.next_index += 1;
        Ok((sample + scale(&model_output, dt)?)?)
    }
}
