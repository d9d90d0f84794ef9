//! Flow-matching schedulers behind one step interface.
//!
//! Three solvers, each matching a reference implementation to f32 rounding:
//! - [`SchedulerKind::UniPc`]: diffusers `UniPCMultistepScheduler` (`use_flow_sigmas=True`,
//!   `prediction_type="flow_prediction"`, bh2, order 2) and the official `FlowUniPCMultistepScheduler`
//!   (Wan2.2 `wan/utils/fm_solvers_unipc.py`). Their step math is line-for-line the same; only the sigma
//!   table differs, so one implementation serves both ([`unipc`]).
//! - [`SchedulerKind::DpmPlusPlus`]: diffusers `DPMSolverMultistepScheduler` (`algorithm_type="dpmsolver++"`,
//!   flow sigmas) and the official `FlowDPMSolverMultistepScheduler` (`wan/utils/fm_solvers.py`); again the
//!   step math is identical and only the table differs ([`dpmpp`]).
//! - [`SchedulerKind::Euler`]: diffusers `FlowMatchEulerDiscreteScheduler` ([`euler`]). The official repo
//!   has no Euler solver, so both conventions use diffusers' table.
//!
//! The sigma tables of every variant are built in [`sigmas`]. Where the official and diffusers tables
//! differ ([`SigmaConvention`]), a diffusers folder's `scheduler_config.json` selects diffusers' table
//! ([`SchedulerSpec::from_diffusers_config`]) and an official release the official one
//! ([`SchedulerSpec::official`]).
//!
//! Precision follows the references: tables in float64 then rounded to f32, per-step scalar
//! coefficients in f32 (the references compute them on 0-d float32 tensors), tensor updates in f32.

pub mod dpmpp;
pub mod euler;
pub mod sigmas;
pub mod unipc;

use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use serde_json::{Map, Value};

use crate::invalid;

/// Which solver integrates the flow ODE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    UniPc,
    Euler,
    DpmPlusPlus,
}

impl SchedulerKind {
    /// The names accepted by [`FromStr`], in the order they are listed in errors.
    pub const NAMES: [&'static str; 3] = ["unipc", "euler", "dpm++"];

    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::UniPc => "unipc",
            SchedulerKind::Euler => "euler",
            SchedulerKind::DpmPlusPlus => "dpm++",
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "unipc" => Ok(SchedulerKind::UniPc),
            "euler" => Ok(SchedulerKind::Euler),
            "dpm++" => Ok(SchedulerKind::DpmPlusPlus),
            _ => Err(invalid!(
                "sample_solver: unknown scheduler {s:?}; valid values: {}",
                SchedulerKind::NAMES.join(", ")
            )),
        }
    }
}

/// Whose sigma table to use where the official Wan code and diffusers differ (wan-facts §7.1/§7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigmaConvention {
    /// diffusers 0.42.1 (`scheduler_config.json` of a `*-Diffusers` folder). UniPC: sigmas from
    /// linspace(1, 1/1000) with the top one nudged down by 1e-6; DPM++: linspace(0.999, 0).
    Diffusers,
    /// The official Wan2.1/2.2 `generate.py` pipelines. UniPC: linspace(0.999, 0) (float32 0.999);
    /// DPM++: linspace(1, 0) through `get_sampling_sigmas`.
    Official,
}

/// UniPC's B(h) variant (`solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UniPcVariant {
    Bh1,
    Bh2,
}

/// DPM-Solver++'s second-order formula (`solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpmVariant {
    Midpoint,
    Heun,
}

/// The sigma after the last step (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigma {
    /// 0: the last step lands on the clean sample.
    Zero,
    /// The last scheduled sigma repeated (UniPC with flow sigmas only).
    SigmaMin,
}

/// Everything needed to build a scheduler; mirrors the fields diffusers reads from `scheduler_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerSpec {
    pub kind: SchedulerKind,
    /// σ' = shift·σ / (1 + (shift − 1)·σ). diffusers: `flow_shift` (UniPC, DPM) or `shift` (Euler);
    /// official: `sample_shift`.
    pub flow_shift: f64,
    pub num_train_timesteps: usize,
    pub convention: SigmaConvention,
    /// Multistep order for UniPC and DPM++ (1..=3; Wan uses 2). Ignored by Euler.
    pub solver_order: usize,
    /// Drop to lower order on the final steps (UniPC: always near the end; DPM++: with < 15 steps).
    pub lower_order_final: bool,
    pub final_sigma: FinalSigma,
    pub unipc_variant: UniPcVariant,
    /// Steps (0-based) after which UniPC's corrector is skipped (`disable_corrector`).
    pub disable_corrector: Vec<usize>,
    pub dpm_variant: DpmVariant,
    /// DPM++: first-order final step regardless of the step count (`euler_at_final`).
    pub euler_at_final: bool,
}

impl SchedulerSpec {
    /// diffusers' defaults for `kind` as the Wan `*-Diffusers` repos configure it
    /// (DFS `scripts/convert_wan_to_diffusers.py`: flow_prediction, use_flow_sigmas, 1000 train steps).
    pub fn diffusers(kind: SchedulerKind, flow_shift: f64) -> Self {
        Self {
            kind,
            flow_shift,
            num_train_timesteps: 1000,
            convention: SigmaConvention::Diffusers,
            solver_order: 2,
            lower_order_final: true,
            final_sigma: FinalSigma::Zero,
            unipc_variant: UniPcVariant::Bh2,
            disable_corrector: Vec::new(),
            dpm_variant: DpmVariant::Midpoint,
            euler_at_final: false,
        }
    }

    /// The official pipelines' scheduler (W22 `wan/text2video.py`: constructed with
    /// `num_train_timesteps=1000, shift=1`, the real shift passed at `set_timesteps`; all other fields at
    /// the class defaults: order 2, bh2 / midpoint, lower_order_final, final sigma 0).
    pub fn official(kind: SchedulerKind, flow_shift: f64) -> Self {
        Self {
            convention: SigmaConvention::Official,
            ..Self::diffusers(kind, flow_shift)
        }
    }

    /// The same shift, train steps and convention with another solver at its defaults
    /// (e.g. `--sample-solver dpm++` on a folder whose config names UniPC).
    pub fn with_kind(&self, kind: SchedulerKind) -> Self {
        if kind == self.kind {
            return self.clone();
        }
        Self {
            num_train_timesteps: self.num_train_timesteps,
            convention: self.convention,
            ..Self::diffusers(kind, self.flow_shift)
        }
    }

    /// Reads a diffusers `scheduler_config.json`: the file itself, a `scheduler/` folder holding it, or a
    /// pipeline folder with `scheduler/scheduler_config.json`.
    pub fn from_diffusers_config(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = if path.is_dir() {
            let direct = path.join("scheduler_config.json");
            if direct.is_file() {
                direct
            } else {
                path.join("scheduler").join("scheduler_config.json")
            }
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading scheduler config {}", file.display()))
            .map_err(|e| invalid!("scheduler config: {e:#}"))?;
        Self::from_diffusers_json(&text).with_context(|| format!("in {}", file.display()))
    }

    /// Parses the text of a diffusers `scheduler_config.json`. `_class_name` decides the kind; a field set
    /// to something these schedulers do not implement is an error naming it.
    pub fn from_diffusers_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(&python_json_to_strict(text))
            .map_err(|e| invalid!("scheduler config: not valid JSON: {e}"))?;
        let obj = value
            .as_object()
            .ok_or_else(|| invalid!("scheduler config: expected a JSON object"))?;
        let cfg = ConfigReader { obj };
        let class = cfg.str("_class_name")?.unwrap_or_default();
        let kind = match class {
            "UniPCMultistepScheduler" => SchedulerKind::UniPc,
            "FlowMatchEulerDiscreteScheduler" => SchedulerKind::Euler,
            "DPMSolverMultistepScheduler" => SchedulerKind::DpmPlusPlus,
            other => {
                return Err(invalid!(
                    "scheduler config: _class_name {other:?} is not supported; valid values: \
                     UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler, DPMSolverMultistepScheduler"
                ))
            }
        };
        let mut spec = Self::diffusers(kind, 1.0);
        spec.num_train_timesteps = cfg.uint("num_train_timesteps")?.unwrap_or(1000);
        if spec.num_train_timesteps < 2 {
            return Err(invalid!(
                "scheduler config: num_train_timesteps {} must be at least 2",
                spec.num_train_timesteps
            ));
        }
        // Options that change sampling and have no implementation here.
        for field in [
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "use_dynamic_shifting",
        ] {
            cfg.require_false(field)?;
        }
        cfg.require_falsy("shift_terminal")?;
        match kind {
            SchedulerKind::Euler => {
                spec.flow_shift = cfg.float("shift")?.unwrap_or(1.0);
                cfg.require_false("invert_sigmas")?;
                cfg.require_false("stochastic_sampling")?;
            }
            SchedulerKind::UniPc | SchedulerKind::DpmPlusPlus => {
                spec.flow_shift = cfg.float("flow_shift")?.unwrap_or(1.0);
                if cfg.bool("use_flow_sigmas")? != Some(true) {
                    return Err(invalid!(
                        "scheduler config: use_flow_sigmas must be true (only flow-matching schedules are supported)"
                    ));
                }
                let prediction = cfg.str("prediction_type")?.unwrap_or("epsilon");
                if prediction != "flow_prediction" {
                    return Err(invalid!(
                        "scheduler config: prediction_type {prediction:?} is not supported; valid value: flow_prediction"
                    ));
                }
                cfg.require_false("thresholding")?;
                spec.solver_order = cfg.uint("solver_order")?.unwrap_or(2);
                if !(1..=3).contains(&spec.solver_order) {
                    return Err(invalid!(
                        "scheduler config: solver_order {} is not supported; valid values: 1, 2, 3",
                        spec.solver_order
                    ));
                }
                spec.lower_order_final = cfg.bool("lower_order_final")?.unwrap_or(true);
                spec.final_sigma = match cfg.str("final_sigmas_type")?.unwrap_or("zero") {
                    "zero" => FinalSigma::Zero,
                    "sigma_min" => FinalSigma::SigmaMin,
                    other => {
                        return Err(invalid!(
                            "scheduler config: final_sigmas_type {other:?} is not valid; valid values: zero, sigma_min"
                        ))
                    }
                };
            }
        }
        if kind == SchedulerKind::UniPc {
            if cfg.bool("predict_x0")? == Some(false) {
                return Err(invalid!(
                    "scheduler config: predict_x0 false is not supported with flow_prediction (diffusers rejects it too)"
                ));
            }
            if !matches!(cfg.obj.get("solver_p"), None | Some(Value::Null)) {
                return Err(invalid!(
                    "scheduler config: solver_p is not supported; it must be null"
                ));
            }
            // diffusers maps the DPM names onto bh2 (UniPCMultistepScheduler.__init__).
            spec.unipc_variant = match cfg.str("solver_type")?.unwrap_or("bh2") {
                "bh1" => UniPcVariant::Bh1,
                "bh2" | "midpoint" | "heun" | "logrho" => UniPcVariant::Bh2,
                other => {
                    return Err(invalid!(
                        "scheduler config: solver_type {other:?} is not valid for UniPC; valid values: bh1, bh2"
                    ))
                }
            };
            spec.disable_corrector = cfg.uint_list("disable_corrector")?.unwrap_or_default();
        }
        if kind == SchedulerKind::DpmPlusPlus {
            let algorithm = cfg.str("algorithm_type")?.unwrap_or("dpmsolver++");
            // diffusers maps "deis" onto dpmsolver++ (DPMSolverMultistepScheduler.__init__).
            if !matches!(algorithm, "dpmsolver++" | "deis") {
                return Err(invalid!(
                    "scheduler config: algorithm_type {algorithm:?} is not supported; valid value: dpmsolver++"
                ));
            }
            cfg.require_false("use_lu_lambdas")?;
            spec.euler_at_final = cfg.bool("euler_at_final")?.unwrap_or(false);
            // diffusers maps the UniPC names onto midpoint.
            spec.dpm_variant = match cfg.str("solver_type")?.unwrap_or("midpoint") {
                "midpoint" | "logrho" | "bh1" | "bh2" => DpmVariant::Midpoint,
                "heun" => DpmVariant::Heun,
                other => {
                    return Err(invalid!(
                        "scheduler config: solver_type {other:?} is not valid for DPM++; valid values: midpoint, heun"
                    ))
                }
            };
            if spec.final_sigma == FinalSigma::SigmaMin {
                // diffusers takes this sigma from the (otherwise unused) beta schedule, not the flow table.
                return Err(invalid!(
                    "scheduler config: final_sigmas_type \"sigma_min\" is not supported for DPMSolverMultistepScheduler \
                     with flow sigmas; valid value: zero"
                ));
            }
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Checks the combination before a scheduler is built.
    pub fn validate(&self) -> Result<()> {
        if !(self.flow_shift.is_finite() && self.flow_shift > 0.0) {
            return Err(invalid!(
                "flow_shift: {} must be a positive number",
                self.flow_shift
            ));
        }
        if self.num_train_timesteps < 2 {
            return Err(invalid!(
                "num_train_timesteps: {} must be at least 2",
                self.num_train_timesteps
            ));
        }
        if self.kind != SchedulerKind::Euler && !(1..=3).contains(&self.solver_order) {
            return Err(invalid!(
                "solver_order: {} is not supported; valid values: 1, 2, 3",
                self.solver_order
            ));
        }
        if self.final_sigma == FinalSigma::SigmaMin
            && (self.kind != SchedulerKind::UniPc || self.convention == SigmaConvention::Official)
        {
            return Err(invalid!(
                "final_sigmas_type: sigma_min is only supported for UniPC with the diffusers convention; valid value: zero"
            ));
        }
        // UniPC's last step to σ = 0 is only finite as a first-order bh2 step: with bh1, B(h) = h = −∞;
        // at order 2 the history term is divided by r = 0. diffusers returns NaN / ±inf there.
        if self.kind == SchedulerKind::UniPc && self.final_sigma == FinalSigma::Zero {
            if self.unipc_variant == UniPcVariant::Bh1 {
                return Err(invalid!(
                    "solver_type: bh1 needs final_sigmas_type sigma_min (with zero the last step is NaN, \
                     in diffusers too); valid solver_type with zero: bh2"
                ));
            }
            if self.solver_order > 1 && !self.lower_order_final {
                return Err(invalid!(
                    "lower_order_final: false needs final_sigmas_type sigma_min or solver_order 1 (with zero \
                     the last step is infinite, in diffusers too); valid value with zero: true"
                ));
            }
        }
        Ok(())
    }
}

/// diffusers writes configs with Python's `json`, which emits `Infinity`, `-Infinity` and `NaN` (e.g.
/// DPMSolverMultistepScheduler's `lambda_min_clipped: -Infinity`). Strict JSON has no such tokens; they
/// become `null` here (outside string literals), which the fields we read treat as "unset".
fn python_json_to_strict(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut in_string = false;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if c == '\\' {
                let escaped: String = rest.chars().take(2).collect();
                out.push_str(&escaped);
                rest = &rest[escaped.len()..];
                continue;
            }
            in_string = c != '"';
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .iter()
            .find(|t| rest.starts_with(**t))
        {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Typed access to the config's fields with errors that name the field.
struct ConfigReader<'a> {
    obj: &'a Map<String, Value>,
}

impl ConfigReader<'_> {
    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }

    fn str(&self, field: &str) -> Result<Option<&str>> {
        self.get(field)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| invalid!("scheduler config: {field} must be a string, got {v}"))
            })
            .transpose()
    }

    fn bool(&self, field: &str) -> Result<Option<bool>> {
        self.get(field)
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    invalid!("scheduler config: {field} must be true or false, got {v}")
                })
            })
            .transpose()
    }

    fn float(&self, field: &str) -> Result<Option<f64>> {
        self.get(field)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| invalid!("scheduler config: {field} must be a number, got {v}"))
            })
            .transpose()
    }

    fn uint(&self, field: &str) -> Result<Option<usize>> {
        self.get(field)
            .map(|v| {
                v.as_u64().map(|n| n as usize).ok_or_else(|| {
                    invalid!("scheduler config: {field} must be a non-negative integer, got {v}")
                })
            })
            .transpose()
    }

    fn uint_list(&self, field: &str) -> Result<Option<Vec<usize>>> {
        self.get(field)
            .map(|v| {
                v.as_array()
                    .and_then(|a| {
                        a.iter()
                            .map(|x| x.as_u64().map(|n| n as usize))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or_else(|| {
                        invalid!(
                            "scheduler config: {field} must be a list of step indices, got {v}"
                        )
                    })
            })
            .transpose()
    }

    fn require_false(&self, field: &str) -> Result<()> {
        match self.bool(field)? {
            Some(true) => Err(invalid!(
                "scheduler config: {field} true is not supported; valid value: false"
            )),
            _ => Ok(()),
        }
    }

    /// Python truthiness: null, false and 0 all mean "off".
    fn require_falsy(&self, field: &str) -> Result<()> {
        match self.get(field) {
            None | Some(Value::Bool(false)) => Ok(()),
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) => Ok(()),
            Some(v) => Err(invalid!(
                "scheduler config: {field} {v} is not supported; valid value: null"
            )),
        }
    }
}

/// One denoising solver. `step` must be called with step_index 0, 1, 2, … in order.
pub trait FlowScheduler: Send {
    /// The timestep the transformer receives at each step, exactly as the reference passes it
    /// (UniPC and DPM++: truncated int64 values as f32; Euler: float32).
    fn timesteps(&self) -> &[f32];
    /// σ per step plus the final one (len = steps + 1), float32 as the reference stores them.
    fn sigmas(&self) -> &[f32];
    /// Advances `sample` (at sigmas[step_index]) to sigmas[step_index + 1] given the model's velocity
    /// prediction. Computes in f32 and returns f32.
    fn step(&mut self, model_output: &Tensor, step_index: usize, sample: &Tensor)
        -> Result<Tensor>;
}

/// Builds the scheduler for `steps` denoising steps.
pub fn build(spec: &SchedulerSpec, steps: usize) -> Result<Box<dyn FlowScheduler>> {
    spec.validate()?;
    if steps == 0 {
        return Err(invalid!(
            "steps: 0 is not valid; the number of denoising steps must be at least 1"
        ));
    }
    let table = sigmas::table(spec, steps);
    Ok(match spec.kind {
        SchedulerKind::UniPc => Box::new(unipc::UniPc::new(spec, table)),
        SchedulerKind::Euler => Box::new(euler::Euler::new(table)),
        SchedulerKind::DpmPlusPlus => Box::new(dpmpp::DpmSolverPP::new(spec, table)),
    })
}

/// Checks the call order and shapes shared by every scheduler; returns both tensors as f32.
fn check_step(
    name: &str,
    expected_index: usize,
    steps: usize,
    step_index: usize,
    model_output: &Tensor,
    sample: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if step_index != expected_index || step_index >= steps {
        anyhow::bail!(
            "{name} scheduler: step_index {step_index} called out of order (expected {expected_index}, {steps} steps)"
        );
    }
    if model_output.dims() != sample.dims() {
        return Err(invalid!(
            "{name} scheduler: model_output shape {:?} differs from sample shape {:?}",
            model_output.dims(),
            sample.dims()
        ));
    }
    Ok((
        model_output.to_dtype(DType::F32)?,
        sample.to_dtype(DType::F32)?,
    ))
}

/// `t · s` for an f32 scalar, one rounding per element as torch's tensor × 0-d tensor.
fn scale(t: &Tensor, s: f32) -> Result<Tensor> {
    Ok(t.affine(s as f64, 0.0)?)
}

/// `t / s` as a true division (torch divides by the 0-d tensor; a reciprocal multiply rounds differently).
fn div_scalar(t: &Tensor, s: f32) -> Result<Tensor> {
    let s = Tensor::new(s, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&s)?)
}

/// λ = log α − log σ with α = 1 − σ, in f32 as the references (may be ±∞ at σ = 0 or 1).
fn lambda(sigma: f32) -> f32 {
    (1.0 - sigma).ln() - sigma.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::is_invalid_input;

    #[test]
    fn kind_names_round_trip_and_errors_list_valid_values() {
        for name in SchedulerKind::NAMES {
            assert_eq!(name.parse::<SchedulerKind>().unwrap().name(), name);
        }
        assert_eq!(
            "UniPC".parse::<SchedulerKind>().unwrap(),
            SchedulerKind::UniPc
        );
        let err = "ddim".parse::<SchedulerKind>().unwrap_err();
        assert!(is_invalid_input(&err));
        let msg = err.to_string();
        assert!(
            msg.contains("ddim") && msg.contains("unipc, euler, dpm++"),
            "{msg}"
        );
    }

    #[test]
    fn config_errors_name_the_field() {
        let cases = [
            (r#"{"_class_name":"DDIMScheduler"}"#, "_class_name"),
            (
                r#"{"_class_name":"UniPCMultistepScheduler","prediction_type":"epsilon","use_flow_sigmas":true}"#,
                "prediction_type",
            ),
            (
                r#"{"_class_name":"UniPCMultistepScheduler","prediction_type":"flow_prediction"}"#,
                "use_flow_sigmas",
            ),
            (
                r#"{"_class_name":"UniPCMultistepScheduler","prediction_type":"flow_prediction","use_flow_sigmas":true,"use_karras_sigmas":true}"#,
                "use_karras_sigmas",
            ),
            (
                r#"{"_class_name":"UniPCMultistepScheduler","prediction_type":"flow_prediction","use_flow_sigmas":true,"solver_order":5}"#,
                "solver_order",
            ),
            (
                r#"{"_class_name":"UniPCMultistepScheduler","prediction_type":"flow_prediction","use_flow_sigmas":true,"flow_shift":"5"}"#,
                "flow_shift",
            ),
            (
                r#"{"_class_name":"DPMSolverMultistepScheduler","prediction_type":"flow_prediction","use_flow_sigmas":true,"algorithm_type":"sde-dpmsolver++"}"#,
                "algorithm_type",
            ),
            (
                r#"{"_class_name":"DPMSolverMultistepScheduler","prediction_type":"flow_prediction","use_flow_sigmas":true,"final_sigmas_type":"sigma_min"}"#,
                "final_sigmas_type",
            ),
            (
                r#"{"_class_name":"FlowMatchEulerDiscreteScheduler","stochastic_sampling":true}"#,
                "stochastic_sampling",
            ),
            (
                r#"{"_class_name":"FlowMatchEulerDiscreteScheduler","use_dynamic_shifting":true}"#,
                "use_dynamic_shifting",
            ),
            (
                r#"{"_class_name":"FlowMatchEulerDiscreteScheduler","shift":-1.0}"#,
                "flow_shift",
            ),
            (r#"[1, 2]"#, "JSON object"),
            (
                r#"{"_class_name":"UniPCMultistepScheduler","prediction_type":"flow_prediction","use_flow_sigmas":true,"solver_type":"bh1"}"#,
                "solver_type",
            ),
            (
                r#"{"_class_name":"UniPCMultistepScheduler","prediction_type":"flow_prediction","use_flow_sigmas":true,"lower_order_final":false}"#,
                "lower_order_final",
            ),
        ];
        for (json, field) in cases {
            let err = SchedulerSpec::from_diffusers_json(json).unwrap_err();
            assert!(is_invalid_input(&err), "{json}");
            assert!(format!("{err:#}").contains(field), "{json}: {err:#}");
        }
    }

    #[test]
    fn python_json_tokens_become_null_outside_strings() {
        let text = r#"{"a": -Infinity, "b": [Infinity, NaN], "c": "NaN \" -Infinity", "d": 1.5}"#;
        let v: Value = serde_json::from_str(&python_json_to_strict(text)).unwrap();
        assert!(v["a"].is_null() && v["b"][0].is_null() && v["b"][1].is_null());
        assert_eq!(v["c"], "NaN \" -Infinity");
        assert_eq!(v["d"], 1.5);
    }

    #[test]
    fn config_defaults_and_aliases() {
        let spec = SchedulerSpec::from_diffusers_json(
            r#"{"_class_name":"UniPCMultistepScheduler","prediction_type":"flow_prediction","use_flow_sigmas":true,
                "flow_shift":5.0,"solver_type":"midpoint","shift_terminal":null,"some_future_field":1}"#,
        )
        .unwrap();
        assert_eq!(spec, SchedulerSpec::diffusers(SchedulerKind::UniPc, 5.0));
        let euler = SchedulerSpec::from_diffusers_json(
            r#"{"_class_name":"FlowMatchEulerDiscreteScheduler","shift":3.0}"#,
        )
        .unwrap();
        assert_eq!(euler.kind, SchedulerKind::Euler);
        assert_eq!(euler.flow_shift, 3.0);
        let dpm = euler.with_kind(SchedulerKind::DpmPlusPlus);
        assert_eq!(
            dpm,
            SchedulerSpec::diffusers(SchedulerKind::DpmPlusPlus, 3.0)
        );
        let official = SchedulerSpec::official(SchedulerKind::UniPc, 12.0)
            .with_kind(SchedulerKind::DpmPlusPlus);
        assert_eq!(official.convention, SigmaConvention::Official);
    }

    #[test]
    fn build_rejects_zero_steps_and_out_of_order_steps() {
        let spec = SchedulerSpec::diffusers(SchedulerKind::UniPc, 5.0);
        assert!(is_invalid_input(&build(&spec, 0).err().unwrap()));
        let mut s = build(&spec, 3).unwrap();
        let x = Tensor::zeros((1, 2), DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(s.step(&x, 1, &x).is_err());
        s.step(&x, 0, &x).unwrap();
        let wrong = Tensor::zeros((2, 2), DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(is_invalid_input(&s.step(&wrong, 1, &x).unwrap_err()));
    }
}
