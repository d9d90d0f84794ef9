//! UniPC multistep (predictor UniP + corrector UniC, B(h) form) for flow-matching models.
//!
//! Follows diffusers 0.42.1 `UniPCMultistepScheduler.step` / `multistep_uni_p_bh_update` /
//! `multistep_uni_c_bh_update` with `predict_x0=True`, `prediction_type="flow_prediction"` and flow sigmas
//! (α = 1 − σ). The official `FlowUniPCMultistepScheduler` (W22 `wan/utils/fm_solvers_unipc.py`) has the
//! same step, order and corrector logic line for line; only its sigma table differs (see [`super::sigmas`]).
//!
//! Scalar coefficients are computed in f32 like the references' 0-d float32 tensors, including the
//! ±∞ that appear at σ = 0 (final step) — they resolve to finite updates exactly as in torch.

use anyhow::Result;
use candle_core::Tensor;

use super::sigmas::Table;
use super::{check_step, div_scalar, lambda, scale, FlowScheduler, SchedulerSpec, UniPcVariant};

pub struct UniPc {
    table: Table,
    solver_order: usize,
    lower_order_final: bool,
    variant: UniPcVariant,
    disable_corrector: Vec<usize>,
    /// Converted (x0) predictions of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    /// The (corrected) sample the previous predictor started from.
    last_sample: Option<Tensor>,
    /// Order the previous predictor used; the corrector reuses it.
    this_order: usize,
    next_index: usize,
}

impl UniPc {
    pub fn new(spec: &SchedulerSpec, table: Table) -> Self {
        Self {
            table,
            solver_order: spec.solver_order,
            lower_order_final: spec.lower_order_final,
            variant: spec.unipc_variant,
            disable_corrector: spec.disable_corrector.clone(),
            model_outputs: vec![None; spec.solver_order],
            lower_order_nums: 0,
            last_sample: None,
            this_order: 0,
            next_index: 0,
        }
    }

    fn sigma(&self, index: usize) -> f32 {
        self.table.sigmas[index]
    }

    /// The k-th most recent stored x0 prediction (k = 1 is the newest).
    fn recent(&self, k: usize) -> Result<&Tensor> {
        self.model_outputs[self.solver_order - k]
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("UniPC: model output history is missing entry {k}"))
    }

    /// rks, hh, h·φ1, B(h) and the b vector shared by predictor and corrector.
    /// `t` is the target sigma index, `s0` the current, `history[i]` the sigma index of the (i+2)-th newest
    /// output (i = 0 .. order−2).
    fn coefficients(&self, t: usize, s0: usize, history: &[usize], order: usize) -> Coefficients {
        let (sigma_t, sigma_s0) = (self.sigma(t), self.sigma(s0));
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda(sigma_t) - lambda_s0;
        let mut rks: Vec<f32> = history
            .iter()
            .map(|&si| (lambda(self.sigma(si)) - lambda_s0) / h)
            .collect();
        rks.push(1.0);
        let hh = -h; // predict_x0
        let h_phi_1 = hh.exp_m1();
        let b_h = match self.variant {
            UniPcVariant::Bh1 => hh,
            UniPcVariant::Bh2 => hh.exp_m1(),
        };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial: u64 = 1;
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r.push(
                rks.iter()
                    .map(|&rk| rk.powi(i as i32 - 1))
                    .collect::<Vec<f32>>(),
            );
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= i as u64 + 1;
            // torch subtracts the Python float 1/factorial as a float32 scalar.
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        Coefficients {
            sigma_t,
            sigma_s0,
            alpha_t: 1.0 - sigma_t,
            rks,
            h_phi_1,
            b_h,
            r,
            b,
        }
    }

    /// Σ_k rhos[k] · D1s[k] (the references' einsum over the history axis).
    fn weighted_sum(rhos: &[f32], d1s: &[Tensor]) -> Result<Option<Tensor>> {
        let mut acc: Option<Tensor> = None;
        for (rho, d) in rhos.iter().zip(d1s) {
            let term = scale(d, *rho)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        Ok(acc)
    }

    /// UniP: predicts the sample at sigmas[i + 1] from `sample` at sigmas[i].
    fn predictor(&self, i: usize, sample: &Tensor, order: usize) -> Result<Tensor> {
        let history: Vec<usize> = (1..order).map(|k| i - k).collect();
        let c = self.coefficients(i + 1, i, &history, order);
        let m0 = self.recent(1)?;
        let mut d1s = Vec::with_capacity(order.saturating_sub(1));
        for (k, rk) in c.rks[..order - 1].iter().enumerate() {
            d1s.push(div_scalar(&(self.recent(k + 2)? - m0)?, *rk)?);
        }
        let x_t_ = (scale(sample, c.sigma_t / c.sigma_s0)? - scale(m0, c.alpha_t * c.h_phi_1)?)?;
        let rhos_p: Vec<f32> = match order {
            1 => Vec::new(),
            2 => vec![0.5],
            _ => {
                let k = order - 1;
                let r: Vec<Vec<f32>> = c.r[..k].iter().map(|row| row[..k].to_vec()).collect();
                solve(r, c.b[..k].to_vec())
            }
        };
        match Self::weighted_sum(&rhos_p, &d1s)? {
            Some(pred_res) => Ok((x_t_ - scale(&pred_res, c.alpha_t * c.b_h)?)?),
            None => Ok(x_t_),
        }
    }

    /// UniC: corrects `this_sample` (at sigmas[i]) using the new x0 prediction `model_t` and the sample
    /// the previous predictor started from.
    fn corrector(
        &self,
        i: usize,
        model_t: &Tensor,
        last_sample: &Tensor,
        order: usize,
    ) -> Result<Tensor> {
        let history: Vec<usize> = (1..order).map(|k| i - (k + 1)).collect();
        let c = self.coefficients(i, i - 1, &history, order);
        let m0 = self.recent(1)?;
        let mut d1s = Vec::with_capacity(order.saturating_sub(1));
        for (k, rk) in c.rks[..order - 1].iter().enumerate() {
            d1s.push(div_scalar(&(self.recent(k + 2)? - m0)?, *rk)?);
        }
        let x_t_ =
            (scale(last_sample, c.sigma_t / c.sigma_s0)? - scale(m0, c.alpha_t * c.h_phi_1)?)?;
        let rhos_c = if order == 1 {
            vec![0.5]
        } else {
            solve(c.r.clone(), c.b.clone())
        };
        let d1_t = (model_t - m0)?;
        let last_term = scale(&d1_t, rhos_c[order - 1])?;
        let total = match Self::weighted_sum(&rhos_c[..order - 1], &d1s)? {
            Some(corr_res) => (corr_res + last_term)?,
            None => last_term,
        };
        Ok((x_t_ - scale(&total, c.alpha_t * c.b_h)?)?)
    }
}

struct Coefficients {
    sigma_t: f32,
    sigma_s0: f32,
    alpha_t: f32,
    rks: Vec<f32>,
    h_phi_1: f32,
    b_h: f32,
    /// R[i][k] = rks[k]^i.
    r: Vec<Vec<f32>>,
    b: Vec<f32>,
}

/// Solves R·x = b in f32 by Gaussian elimination with partial pivoting (LAPACK `sgesv`'s method, which
/// `torch.linalg.solve` uses on CPU). Systems here are at most 3×3.
fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Vec<f32> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).fold(col, |best, row| {
            if a[row][col].abs() > a[best][col].abs() {
                row
            } else {
                best
            }
        });
        a.swap(col, pivot);
        b.swap(col, pivot);
        let inv = 1.0 / a[col][col];
        let (upper, lower) = a.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for (offset, row) in lower.iter_mut().enumerate() {
            let factor = row[col] * inv;
            for (value, pivot_value) in row[col + 1..].iter_mut().zip(&pivot_row[col + 1..]) {
                *value -= factor * pivot_value;
            }
            b[col + 1 + offset] -= factor * b[col];
        }
    }
    let mut x = vec![0.0f32; n];
    for row in (0..n).rev() {
        let tail: f32 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - tail) / a[row][row];
    }
    x
}

impl FlowScheduler for UniPc {
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
            "UniPC",
            self.next_index,
            steps,
            step_index,
            model_output,
            sample,
        )?;
        let i = step_index;
        // convert_model_output: x0 = x − σ·v.
        let x0 = (&sample - scale(&model_output, self.sigma(i))?)?;
        let use_corrector =
            i > 0 && !self.disable_corrector.contains(&(i - 1)) && self.last_sample.is_some();
        let sample = match (&self.last_sample, use_corrector) {
            (Some(last), true) => self.corrector(i, &x0, last, self.this_order)?,
            _ => sample,
        };
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0));
        let this_order = if self.lower_order_final {
            self.solver_order.min(steps - i)
        } else {
            self.solver_order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev = self.predictor(i, &sample, self.this_order)?;
        self.last_sample = Some(sample);
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_index += 1;
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::solve;

    #[test]
    fn solve_pivots_and_solves() {
        let x = solve(vec![vec![1e-3, 1.0], vec![1.0, 1.0]], vec![1.0, 2.0]);
        // Exact solution: x1 = 1/(1 - 1e-3)·..., check the residual instead.
        assert!((1e-3 * x[0] + x[1] - 1.0).abs() < 1e-6);
        assert!((x[0] + x[1] - 2.0).abs() < 1e-6);
        let x = solve(
            vec![
                vec![2.0, 0.0, 1.0],
                vec![1.0, 3.0, 0.0],
                vec![0.0, 1.0, 4.0],
            ],
            vec![5.0, 7.0, 14.0],
        );
        for (got, want) in x.iter().zip([1.0, 2.0, 3.0]) {
            assert!((got - want).abs() < 1e-5, "{x:?}");
        }
    }
}
