//! Sigma and timestep tables, reproducing each reference's `set_timesteps` bit for bit.
//!
//! All references build the table in float64 (numpy) and round to float32 at the end, except where noted.

use super::{FinalSigma, SchedulerKind, SchedulerSpec, SigmaConvention};

/// A schedule: what the transformer receives per step, and σ per step plus the final one.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
}

/// The table `spec` uses for `steps` steps (steps ≥ 1).
pub fn table(spec: &SchedulerSpec, steps: usize) -> Table {
    let shift = spec.flow_shift;
    let train = spec.num_train_timesteps;
    match (spec.kind, spec.convention) {
        (SchedulerKind::UniPc, SigmaConvention::Diffusers) => {
            unipc_diffusers(steps, shift, train, spec.final_sigma)
        }
        (SchedulerKind::UniPc, SigmaConvention::Official) => unipc_official(steps, shift, train),
        (SchedulerKind::DpmPlusPlus, SigmaConvention::Diffusers) => {
            dpm_diffusers(steps, shift, train)
        }
        (SchedulerKind::DpmPlusPlus, SigmaConvention::Official) => {
            dpm_official(steps, shift, train)
        }
        // The official repo has no Euler solver; diffusers' table serves both conventions.
        (SchedulerKind::Euler, _) => euler_diffusers(steps, shift, train),
    }
}

/// `numpy.linspace(start, stop, num)` (endpoint included): i·step + start, last element = stop.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    match num {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let div = (num - 1) as f64;
            let delta = stop - start;
            let step = delta / div;
            let mut y: Vec<f64> = if step == 0.0 {
                (0..num).map(|i| i as f64 / div * delta + start).collect()
            } else {
                (0..num).map(|i| i as f64 * step + start).collect()
            };
            y[num - 1] = stop;
            y
        }
    }
}

/// The flow shift σ' = s·σ / (1 + (s − 1)·σ), evaluated in the reference's operation order.
pub fn shift_sigma(shift: f64, sigma: f64) -> f64 {
    shift * sigma / (1.0 + (shift - 1.0) * sigma)
}

/// Integer timesteps: σ·num_train in float64, truncated by the int64 cast.
fn truncated_timesteps(sigmas: &[f64], train: usize) -> Vec<f32> {
    sigmas
        .iter()
        .map(|s| (s * train as f64) as i64 as f32)
        .collect()
}

fn with_final(sigmas: &[f64], last: f64) -> Vec<f32> {
    sigmas
        .iter()
        .chain(std::iter::once(&last))
        .map(|&s| s as f32)
        .collect()
}

/// diffusers `UniPCMultistepScheduler.set_timesteps`, `use_flow_sigmas` branch (wan-facts §7.2):
/// linspace(1, 1/T, N+1)[:-1], shifted, the top sigma nudged below 1 by 1e-6.
fn unipc_diffusers(steps: usize, shift: f64, train: usize, final_sigma: FinalSigma) -> Table {
    let mut sig: Vec<f64> = linspace(1.0, 1.0 / train as f64, steps + 1)[..steps]
        .iter()
        .map(|&s| shift_sigma(shift, s))
        .collect();
    const EPS: f64 = 1e-6;
    if (sig[0] - 1.0).abs() < EPS {
        sig[0] -= EPS;
    }
    let last = match final_sigma {
        FinalSigma::Zero => 0.0,
        FinalSigma::SigmaMin => sig[steps - 1],
    };
    Table {
        timesteps: truncated_timesteps(&sig, train),
        sigmas: with_final(&sig, last),
    }
}

/// Official `FlowUniPCMultistepScheduler` (W22 `wan/utils/fm_solvers_unipc.py`, wan-facts §7.1): the
/// constructor's training sigmas 1 − linspace(1, 1/T, T) reversed are stored as float32, so
/// sigma_max = f32(1 − 1/T) = 0.9990000128746033 and sigma_min = 0; set_timesteps takes
/// linspace(sigma_max, sigma_min, N+1)[:-1] and shifts it.
fn unipc_official(steps: usize, shift: f64, train: usize) -> Table {
    let sigma_max = (1.0 - 1.0 / train as f64) as f32 as f64;
    let sigma_min = 0.0;
    let sig: Vec<f64> = linspace(sigma_max, sigma_min, steps + 1)[..steps]
        .iter()
        .map(|&s| shift_sigma(shift, s))
        .collect();
    Table {
        timesteps: truncated_timesteps(&sig, train),
        sigmas: with_final(&sig, 0.0),
    }
}

/// diffusers `DPMSolverMultistepScheduler.set_timesteps`, `use_flow_sigmas` branch:
/// σ = 1 − linspace(1, 1/T, N+1), shifted, reversed, last (σ = 0) dropped.
fn dpm_diffusers(steps: usize, shift: f64, train: usize) -> Table {
    let alphas = linspace(1.0, 1.0 / train as f64, steps + 1);
    let sig: Vec<f64> = alphas
        .iter()
        .rev()
        .take(steps)
        .map(|&a| shift_sigma(shift, 1.0 - a))
        .collect();
    Table {
        timesteps: truncated_timesteps(&sig, train),
        sigmas: with_final(&sig, 0.0),
    }
}

/// Official dpm++ (W22 `wan/text2video.py` + `wan/utils/fm_solvers.py`): `get_sampling_sigmas` gives
/// shift(linspace(1, 0, N+1)[:N]), passed as custom sigmas to a scheduler built with shift=1 (whose own
/// shift is then the identity). The top sigma is exactly 1, so the first timestep is T.
fn dpm_official(steps: usize, shift: f64, train: usize) -> Table {
    let sig: Vec<f64> = linspace(1.0, 0.0, steps + 1)[..steps]
        .iter()
        .map(|&s| shift_sigma(shift, s))
        .collect();
    Table {
        timesteps: truncated_timesteps(&sig, train),
        sigmas: with_final(&sig, 0.0),
    }
}

/// diffusers `FlowMatchEulerDiscreteScheduler`. The constructor shifts its float32 training sigmas
/// (t/T for t = T..1) in float32 and keeps sigma_max/sigma_min from them; set_timesteps then spaces
/// timesteps linearly between those (already shifted) ends and shifts again in float64 — the ends are
/// shifted twice, as diffusers does. Timesteps are σ·T computed in float32 (not truncated).
fn euler_diffusers(steps: usize, shift: f64, train: usize) -> Table {
    let shift32 = shift as f32;
    let shift_minus_one32 = (shift - 1.0) as f32;
    let train32 = train as f32;
    let init_shift = |t: f32| {
        let s = t / train32;
        shift32 * s / (1.0 + shift_minus_one32 * s)
    };
    let sigma_max = init_shift(train32) as f64;
    let sigma_min = init_shift(1.0) as f64;
    let sig32: Vec<f32> = linspace(sigma_max * train as f64, sigma_min * train as f64, steps)
        .iter()
        .map(|&t| shift_sigma(shift, t / train as f64) as f32)
        .collect();
    let timesteps = sig32.iter().map(|&s| s * train32).collect();
    let sigmas = sig32.iter().copied().chain(std::iter::once(0.0)).collect();
    Table { timesteps, sigmas }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_endpoints() {
        assert_eq!(linspace(1.0, 0.0, 5), vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(linspace(3.0, 3.0, 3), vec![3.0, 3.0, 3.0]);
        assert_eq!(linspace(2.0, 7.0, 1), vec![2.0]);
        assert!(linspace(0.0, 1.0, 0).is_empty());
    }

    #[test]
    fn tables_have_steps_plus_one_sigmas_and_end_at_zero() {
        for kind in [
            SchedulerKind::UniPc,
            SchedulerKind::Euler,
            SchedulerKind::DpmPlusPlus,
        ] {
            for spec in [
                SchedulerSpec::diffusers(kind, 5.0),
                SchedulerSpec::official(kind, 5.0),
            ] {
                for steps in [1, 2, 7, 50] {
                    let t = table(&spec, steps);
                    assert_eq!(t.timesteps.len(), steps);
                    assert_eq!(t.sigmas.len(), steps + 1);
                    assert_eq!(*t.sigmas.last().unwrap(), 0.0);
                    assert!(
                        t.sigmas.windows(2).all(|w| w[0] >= w[1]),
                        "{kind} {steps}: not decreasing"
                    );
                }
            }
        }
    }
}
