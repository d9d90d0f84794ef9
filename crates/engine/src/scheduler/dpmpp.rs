//! DPM-Solver++ multistep (orders 1–3) for flow-matching models.
//!
//! Follows diffusers 0.42.1 `DPMSolverMultistepScheduler.step` with `algorithm_type="dpmsolver++"`,
//! `prediction_type="flow_prediction"` and flow sigmas (α = 1 − σ). The official
//! `FlowDPMSolverMultistepScheduler` (W22 `wan/utils/fm_solvers.py`) has the same step and order logic;
//! only its sigma table differs (top sigma exactly 1, see [`super::sigmas`]). With σ = 1, λ = −∞ and the
//! f32 arithmetic below turns the first step into x ← σ_next·x + α_next·x0 and the second step's
//! correction term into 0, exactly as torch does.

use anyhow::Result;
use candle_core::Tensor;

use super::sigmas::Table;
use super::{check_step, lambda, scale, DpmVariant, FinalSigma, FlowScheduler, SchedulerSpec};

pub struct DpmSolverPP {
    table: Table,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    variant: DpmVariant,
    /// Converted (x0) predictions of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    next_index: usize,
}

impl DpmSolverPP {
    pub fn new(spec: &SchedulerSpec, table: Table) -> Self {
        Self {
            table,
            solver_order: spec.solver_order,
            lower_order_final: spec.lower_order_final,
            euler_at_final: spec.euler_at_final,
            final_sigma_zero: spec.final_sigma == FinalSigma::Zero,
            variant: spec.dpm_variant,
            model_outputs: vec![None; spec.solver_order],
            lower_order_nums: 0,
            next_index: 0,
        }
    }

    /// The k-th most recent x0 prediction (k = 1 is the newest).
    fn recent(&self, k: usize) -> Result<&Tensor> {
        self.model_outputs[self.solver_order - k]
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("DPM++: model output history is missing entry {k}"))
    }

    fn first_order(&self, i: usize, sample: &Tensor) -> Result<Tensor> {
        let (sigma_t, sigma_s) = (self.table.sigmas[i + 1], self.table.sigmas[i]);
        let h = lambda(sigma_t) - lambda(sigma_s);
        let alpha_t = 1.0 - sigma_t;
        Ok((scale(sample, sigma_t / sigma_s)?
            - scale(self.recent(1)?, alpha_t * ((-h).exp() - 1.0))?)?)
    }

    fn second_order(&self, i: usize, sample: &Tensor) -> Result<Tensor> {
        let s = &self.table.sigmas;
        let (sigma_t, sigma_s0, sigma_s1) = (s[i + 1], s[i], s[i - 1]);
        let (lambda_t, lambda_s0, lambda_s1) =
            (lambda(sigma_t), lambda(sigma_s0), lambda(sigma_s1));
        let alpha_t = 1.0 - sigma_t;
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let (m0, m1) = (self.recent(1)?, self.recent(2)?);
        let d1 = scale(&(m0 - m1)?, 1.0 / r0)?;
        let em1 = (-h).exp() - 1.0;
        let x = (scale(sample, sigma_t / sigma_s0)? - scale(m0, alpha_t * em1)?)?;
        Ok(match self.variant {
            DpmVariant::Midpoint => (x - scale(&d1, 0.5 * (alpha_t * em1))?)?,
            DpmVariant::Heun => (x + scale(&d1, alpha_t * (em1 / h + 1.0))?)?,
        })
    }

    fn third_order(&self, i: usize, sample: &Tensor) -> Result<Tensor> {
        let s = &self.table.sigmas;
        let (sigma_t, sigma_s0) = (s[i + 1], s[i]);
        let (lambda_t, lambda_s0, lambda_s1, lambda_s2) = (
            lambda(sigma_t),
            lambda(sigma_s0),
            lambda(s[i - 1]),
            lambda(s[i - 2]),
        );
        let alpha_t = 1.0 - sigma_t;
        let (h, h_0, h_1) = (
            lambda_t - lambda_s0,
            lambda_s0 - lambda_s1,
            lambda_s1 - lambda_s2,
        );
        let (r0, r1) = (h_0 / h, h_1 / h);
        let (m0, m1, m2) = (self.recent(1)?, self.recent(2)?, self.recent(3)?);
        let d1_0 = scale(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = scale(&(m1 - m2)?, 1.0 / r1)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + scale(&diff, r0 / (r0 + r1))?)?;
        let d2 = scale(&diff, 1.0 / (r0 + r1))?;
        let em1 = (-h).exp() - 1.0;
        let x = (scale(sample, sigma_t / sigma_s0)? - scale(m0, alpha_t * em1)?)?;
        let x = (x + scale(&d1, alpha_t * (em1 / h + 1.0))?)?;
        Ok((x - scale(&d2, alpha_t * ((em1 + h) / (h * h) - 0.5))?)?)
    }
}

impl FlowScheduler for DpmSolverPP {
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
            "DPM++",
            self.next_index,
            steps,
            step_index,
            model_output,
            sample,
        )?;
        let i = step_index;
        let few_steps = self.lower_order_final && steps < 15;
        let lower_order_final =
            i == steps - 1 && (self.euler_at_final || few_steps || self.final_sigma_zero);
        let lower_order_second = i + 2 == steps && few_steps;
        // convert_model_output: x0 = x − σ·v.
        let x0 = (&sample - scale(&model_output, self.table.sigmas[i])?)?;
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0));
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(i, &sample)?
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(i, &sample)?
        } else {
            self.third_order(i, &sample)?
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_index += 1;
        Ok(prev)
    }
}
