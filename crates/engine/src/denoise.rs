//! The sampling loop: classifier-free guidance and the Wan2.2 A14B expert switch, as diffusers'
//! `WanPipeline.__call__` runs it (`output_type="latent"`).
//!
//! Per request, each expert's text contexts (cond and uncond cross-attention K/V) are computed once
//! before the loop — each expert with its own text-embedding weights — and the RoPE table once.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use crate::component::{ComponentOptions, Inputs, Outputs};
use crate::dit::{self, RopeTable, TextContext, WanTransformer};
use crate::invalid;
use crate::scheduler::{self, FlowScheduler, SchedulerKind, SchedulerSpec};

/// One expert of the loop with its guidance scale.
pub struct Expert<'a> {
    pub model: ExpertModel<'a>,
    pub guidance: f64,
}

impl<'a> Expert<'a> {
    /// An expert loaded by the caller.
    pub fn resident(model: &'a WanTransformer, guidance: f64) -> Self {
        Self {
            model: ExpertModel::Resident(model),
            guidance,
        }
    }
}

/// How the loop gets an expert's weights.
pub enum ExpertModel<'a> {
    /// Loaded by the caller, resident for the whole loop.
    Resident(&'a WanTransformer),
    /// Loaded by the loop before the expert's first step and released (with its text contexts)
    /// before the other expert is loaded, so only one expert occupies memory at a time: no OOM at
    /// the A14B expert switch.
    OnDemand {
        /// Where the loaded expert will run.
        device: Device,
        load: Box<dyn FnMut() -> Result<WanTransformer> + 'a>,
    },
}

/// Prompt embeddings [B, L, text_dim]; `negative` is needed whenever a guidance scale is > 1.
pub struct Prompts<'a> {
    pub positive: &'a Tensor,
    pub negative: Option<&'a Tensor>,
}

/// Image conditioning of the loop.
pub enum Conditioning<'a> {
    None,
    /// Wan2.2 TI2V with an image (diffusers `expand_timesteps`): latent frame 0 is held at this
    /// normalised latent [B, z, 1, h, w] and its tokens get timestep 0.
    FirstFrame(&'a Tensor),
    /// Wan2.2 I2V-A14B: this tensor [B, 4 + z, F, h, w] (mask + image latents, see
    /// [`i2v_condition`]) is concatenated to the latents on channels at every step.
    Concat(&'a Tensor),
}

/// The I2V-A14B condition: a 4-channel mask (1 on latent frame 0, the frame the image fills,
/// 0 elsewhere) followed by the normalised latents of the video [image, zeros...]
/// (`WanImageToVideoPipeline.prepare_latents`, wan-facts §7.6).
pub fn i2v_condition(image_latents: &Tensor) -> Result<Tensor> {
    let (b, _, f, h, w) = image_latents.dims5()?;
    let device = image_latents.device();
    let first = Tensor::ones((b, 4, 1, h, w), DType::F32, device)?;
    let mask = if f > 1 {
        Tensor::cat(
            &[
                first,
                Tensor::zeros((b, 4, f - 1, h, w), DType::F32, device)?,
            ],
            2,
        )?
    } else {
        first
    };
    Ok(Tensor::cat(
        &[mask, image_latents.to_dtype(DType::F32)?],
        1,
    )?)
}

pub struct DenoiseOptions {
    /// The high-noise expert runs while t ≥ boundary_ratio · num_train_timesteps.
    pub boundary_ratio: Option<f64>,
    pub num_train_timesteps: usize,
    /// Per-token timesteps (diffusers `expand_timesteps`, Wan2.2 TI2V).
    pub expand_timesteps: bool,
}

/// Which expert step `t` uses: `true` for the high-noise one (diffusers: `t >= boundary_timestep`).
pub fn uses_high_noise_expert(t: f32, opts: &DenoiseOptions) -> bool {
    match opts.boundary_ratio {
        None => true,
        Some(r) => f64::from(t) >= r * opts.num_train_timesteps as f64,
    }
}

enum Held<'a> {
    Borrowed(&'a WanTransformer),
    Owned(Box<WanTransformer>),
}

impl Held<'_> {
    fn get(&self) -> &WanTransformer {
        match self {
            Held::Borrowed(m) => m,
            Held::Owned(m) => m,
        }
    }
}

/// The expert running now, with its text contexts (cond and, under guidance, uncond).
struct Active<'a> {
    high_noise: bool,
    model: Held<'a>,
    guidance: f64,
    cond: TextContext,
    uncond: Option<TextContext>,
}

impl<'a> Active<'a> {
    fn load(expert: &mut Expert<'a>, high_noise: bool, prompts: &Prompts) -> Result<Self> {
        let model = match &mut expert.model {
            ExpertModel::Resident(m) => Held::Borrowed(m),
            ExpertModel::OnDemand { load, .. } => Held::Owned(Box::new(load()?)),
        };
        let m = model.get();
        let cond = m.prepare_context(prompts.positive)?;
        let uncond = match (expert.guidance > 1.0, prompts.negative) {
            (true, Some(neg)) => Some(m.prepare_context(neg)?),
            _ => None,
        };
        Ok(Self {
            high_noise,
            model,
            guidance: expert.guidance,
            cond,
            uncond,
        })
    }

    fn model(&self) -> &WanTransformer {
        self.model.get()
    }

    /// Guided velocity: uncond + g·(cond − uncond); guidance 1 skips the unconditional pass.
    fn predict(&self, x: &Tensor, t: &Tensor, rope: &RopeTable) -> Result<Tensor> {
        match &self.uncond {
            None => self.model().forward(x, t, &self.cond, rope),
            Some(u) => {
                // Both passes block by block: a streamed block is uploaded once per step.
                let mut out = self.model().forward_many(x, t, &[&self.cond, u], rope)?;
                let uncond = out.pop().expect("two passes");
                let cond = out.pop().expect("two passes");
                Ok((&uncond + ((cond - &uncond)? * self.guidance)?)?)
            }
        }
    }
}

/// A finished step, as the loop hands it to its caller (progress, previews).
pub struct StepDone<'s> {
    /// 1-based index of the step just taken.
    pub step: usize,
    pub total: usize,
    /// The sample the model saw (at `sigma`) and its guided velocity.
    sample: &'s Tensor,
    velocity: &'s Tensor,
    sigma: f32,
}

impl StepDone<'_> {
    /// The model's estimate of the clean latents at this step: x₀ = x_σ − σ·v (flow matching:
    /// x_σ = (1 − σ)·x₀ + σ·ε and v = ε − x₀). Only the first `velocity` channels (the latent
    /// channels; conditioning channels are not predicted).
    pub fn denoised(&self) -> Result<Tensor> {
        let c = self.velocity.dim(1)?;
        let x = self.sample.narrow(1, 0, c)?;
        Ok((x - (self.velocity * f64::from(self.sigma))?)?)
    }
}

/// Runs the loop from `latents` (f32 [B, C, F, H, W]). `on_step` is called after every step;
/// returning an error (e.g. cancelled) stops the loop.
#[allow(clippy::too_many_arguments)]
pub fn denoise<'a>(
    latents: &Tensor,
    prompts: &Prompts,
    mut high: Expert<'a>,
    mut low: Option<Expert<'a>>,
    scheduler: &mut dyn FlowScheduler,
    opts: &DenoiseOptions,
    conditioning: &Conditioning,
    on_step: &mut dyn FnMut(&StepDone) -> Result<()>,
) -> Result<Tensor> {
    if opts.boundary_ratio.is_some() != low.is_some() {
        return Err(invalid!(
            "boundary_ratio: a boundary needs two experts (transformer and transformer_2) and two experts need a boundary"
        ));
    }
    let timesteps: Vec<f32> = scheduler.timesteps().to_vec();
    // Checked before anything loads: every expert that runs under guidance needs the negative.
    for (expert, high_noise) in std::iter::once((&high, true)).chain(low.iter().map(|l| (l, false)))
    {
        let runs = timesteps
            .iter()
            .any(|&t| uses_high_noise_expert(t, opts) == high_noise);
        if runs && expert.guidance > 1.0 && prompts.negative.is_none() {
            return Err(invalid!(
                "negative_prompt_embeds: required when guidance {} > 1",
                expert.guidance
            ));
        }
    }
    let device = match &high.model {
        ExpertModel::Resident(m) => m.device().clone(),
        ExpertModel::OnDemand { device, .. } => device.clone(),
    };
    let mut x = latents.to_device(&device)?.to_dtype(DType::F32)?;
    let dims = x.dims().to_vec();
    let b = dims[0];

    // First-frame conditioning: mask is 0 on latent frame 0, 1 elsewhere.
    let cond = match conditioning {
        Conditioning::FirstFrame(latent) => {
            let z = latent.to_device(&device)?.to_dtype(DType::F32)?;
            let (c, h, w) = (dims[1], dims[3], dims[4]);
            let z = z.reshape((b, c, 1, h, w)).with_context(|| {
                format!(
                    "first-frame latent {:?} does not fit latents {dims:?}",
                    latent.dims()
                )
            })?;
            let mask = Tensor::cat(
                &[
                    Tensor::zeros((b, c, 1, h, w), DType::F32, &device)?,
                    Tensor::ones((b, c, dims[2] - 1, h, w), DType::F32, &device)?,
                ],
                2,
            )?;
            Some((z, mask))
        }
        _ => None,
    };
    let concat = match conditioning {
        Conditioning::Concat(y) => {
            let y = y.to_device(&device)?.to_dtype(DType::F32)?;
            let yd = y.dims();
            if yd.len() != 5 || yd[0] != b || yd[2..] != dims[2..] {
                return Err(invalid!(
                    "condition: shape {yd:?} does not match latents {dims:?} (expected [B, C, F, H, W] with the same B, F, H, W)"
                ));
            }
            Some(y)
        }
        _ => None,
    };
    // x ← z·(1 − mask) + x·mask, with z broadcast over frames
    let apply_cond = |x: &Tensor| -> Result<Tensor> {
        Ok(match &cond {
            None => x.clone(),
            Some((z, mask)) => {
                let keep = (1.0 - mask)?;
                (z.broadcast_mul(&keep)? + x.mul(mask)?)?
            }
        })
    };
    if cond.is_some() {
        x = apply_cond(&x)?;
    }

    let total = timesteps.len();
    let mut active: Option<Active> = None;
    // RoPE table and token grid, from the first expert's config (both experts share it).
    let mut grid: Option<(RopeTable, [usize; 3])> = None;
    for (i, &t) in timesteps.iter().enumerate() {
        let high_noise = uses_high_noise_expert(t, opts);
        if active.as_ref().map(|a| a.high_noise) != Some(high_noise) {
            // Release the previous expert (and its contexts) before the next one loads.
            drop(active.take());
            let expert = if high_noise {
                &mut high
            } else {
                low.as_mut().expect("a boundary implies a low-noise expert")
            };
            active = Some(Active::load(expert, high_noise, prompts)?);
        }
        let expert = active.as_ref().expect("loaded above");
        if grid.is_none() {
            let mut input_dims = dims.clone();
            input_dims[1] = expert.model().config().in_channels;
            grid = Some((
                expert.model().rope(&input_dims)?,
                expert.model().grid(&input_dims)?,
            ));
        }
        let (rope, [gf, gh, gw]) = grid.as_ref().expect("computed above");
        let tokens_per_frame = gh * gw;
        let t_input = if opts.expand_timesteps || cond.is_some() {
            // per-token: first-frame tokens get 0 when conditioned, every other token t
            let mut per = vec![t; gf * tokens_per_frame];
            if cond.is_some() {
                per[..tokens_per_frame].iter_mut().for_each(|v| *v = 0.0);
            }
            Tensor::from_vec(per, (1, gf * tokens_per_frame), &device)?.repeat((b, 1))?
        } else {
            Tensor::full(t, b, &device)?
        };
        let v = match &concat {
            Some(y) => expert.predict(&Tensor::cat(&[&x, y], 1)?, &t_input, rope)?,
            None => expert.predict(&x, &t_input, rope)?,
        };
        let sample = x;
        x = scheduler.step(&v, i, &sample)?;
        if cond.is_some() {
            x = apply_cond(&x)?;
        }
        on_step(&StepDone {
            step: i + 1,
            total,
            sample: &sample,
            velocity: &v,
            sigma: scheduler.sigmas()[i],
        })?;
    }
    Ok(x)
}

/// A diffusers pipeline folder's denoising parts: `model_index.json`, `transformer/`,
/// optional `transformer_2/`, `scheduler/`.
pub struct PipelineFolder {
    pub boundary_ratio: Option<f64>,
    pub expand_timesteps: bool,
    pub scheduler: SchedulerSpec,
    pub has_transformer_2: bool,
}

impl PipelineFolder {
    pub fn read(path: &Path) -> Result<Self> {
        let index_path = path.join("model_index.json");
        let text = std::fs::read_to_string(&index_path).map_err(|e| {
            invalid!(
                "--model: {} is not a diffusers pipeline folder (model_index.json: {e})",
                path.display()
            )
        })?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| invalid!("{}: not valid JSON: {e}", index_path.display()))?;
        let boundary_ratio = index.get("boundary_ratio").and_then(|v| v.as_f64());
        let expand_timesteps = index
            .get("expand_timesteps")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        let has_transformer_2 = path.join("transformer_2").join("config.json").exists();
        let scheduler = SchedulerSpec::from_diffusers_config(path)?;
        Ok(Self {
            boundary_ratio,
            expand_timesteps,
            scheduler,
            has_transformer_2,
        })
    }
}

/// `run-component denoise`: inputs `latents`, `prompt_embeds`, `negative_prompt_embeds`;
/// settings `steps guidance_scale guidance_scale_2 boundary_ratio flow_shift scheduler`;
/// output `latents` (what `WanPipeline(..., output_type="latent")` returns).
pub fn run_component(model: &Path, inputs: &Inputs, opts: &ComponentOptions) -> Result<Outputs> {
    let s = &opts.settings;
    let folder = PipelineFolder::read(model)?;
    let steps: usize = s.get("steps")?.unwrap_or(50);
    if !(1..=1000).contains(&steps) {
        return Err(invalid!("--set steps: {steps} is out of range 1..=1000"));
    }
    let guidance: f64 = s.get("guidance_scale")?.unwrap_or(5.0);
    let guidance_2: Option<f64> = s.get("guidance_scale_2")?;
    let boundary_ratio: Option<f64> = s.get::<f64>("boundary_ratio")?.or(folder.boundary_ratio);
    for (name, g) in [
        ("guidance_scale", Some(guidance)),
        ("guidance_scale_2", guidance_2),
    ] {
        if let Some(g) = g {
            if !g.is_finite() || g < 0.0 {
                return Err(invalid!("--set {name}: {g} must be a finite number ≥ 0"));
            }
        }
    }
    if let Some(r) = boundary_ratio {
        if !(0.0..=1.0).contains(&r) {
            return Err(invalid!("--set boundary_ratio: {r} is out of range 0..=1"));
        }
    }
    let mut spec = folder.scheduler.clone();
    if let Some(kind) = s.get_choice("scheduler", &SchedulerKind::NAMES)? {
        spec = spec.with_kind(kind.parse()?);
    }
    if let Some(shift) = s.get::<f64>("flow_shift")? {
        if !shift.is_finite() || shift <= 0.0 {
            return Err(invalid!("--set flow_shift: {shift} must be > 0"));
        }
        spec.flow_shift = shift;
    }
    let latents = inputs.float("latents", &[5])?;
    let pos = inputs.float("prompt_embeds", &[3])?;
    let neg = inputs.float_opt("negative_prompt_embeds", &[3])?;
    // Optional image conditioning, exactly as WanImageToVideoPipeline.prepare_latents returns it:
    // `condition` [B, 4+z, F, h, w] (I2V-A14B, concatenated on channels) or, for expand_timesteps
    // pipelines (TI2V), the normalised first-frame latent [B, z, 1, h, w].
    let condition = inputs.float_opt("condition", &[5])?;
    s.finish()?;

    let high_model = dit::load(&model.join("transformer"), &opts.device, opts.dtype)?;
    let low_model = match (boundary_ratio, folder.has_transformer_2) {
        (Some(_), true) => Some(dit::load(
            &model.join("transformer_2"),
            &opts.device,
            opts.dtype,
        )?),
        (Some(_), false) => {
            return Err(invalid!(
                "boundary_ratio is set but {} has no transformer_2/",
                model.display()
            ))
        }
        (None, _) => None,
    };
    let high = Expert::resident(&high_model, guidance);
    // diffusers: guidance_scale_2 defaults to guidance_scale
    let low = low_model
        .as_ref()
        .map(|m| Expert::resident(m, guidance_2.unwrap_or(guidance)));
    let mut sched = scheduler::build(&spec, steps)?;
    let dopts = DenoiseOptions {
        boundary_ratio: if low.is_some() { boundary_ratio } else { None },
        num_train_timesteps: spec.num_train_timesteps,
        expand_timesteps: folder.expand_timesteps,
    };
    let prompts = Prompts {
        positive: &pos,
        negative: neg.as_ref(),
    };
    let conditioning = match &condition {
        None => Conditioning::None,
        Some(c) if folder.expand_timesteps => Conditioning::FirstFrame(c),
        Some(c) => Conditioning::Concat(c),
    };
    let out = denoise(
        &latents,
        &prompts,
        high,
        low,
        sched.as_mut(),
        &dopts,
        &conditioning,
        &mut |_| Ok(()),
    )?;
    Ok(vec![("latents".to_string(), out)])
}
