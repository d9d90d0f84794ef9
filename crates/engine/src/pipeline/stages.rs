//! The generation stages, each loading its component, running, and releasing it before the next
//! stage needs the memory: text encoder → (VAE encode of a conditioning image) → diffusion
//! transformer(s) → VAE decode. The caller (CLI, worker) runs them in order and checks the output
//! between them (the quality guard sits between denoise and decode).
//!
//! Where components live follows a [`Placement`] (from the memory plan, `--offload`): kept
//! resident across stages, freed after use, one A14B expert at a time, blocks streamed from host
//! memory, the text encoder streamed a block at a time or on the CPU. Each stage's GPU peak is
//! measured (the CUDA pool's high-water mark) so it can be reported against the plan.

use std::cell::{Cell, OnceCell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use anyhow::Result;
use base64::Engine as _;
use candle_core::{DType, Device, Tensor};

use super::demo;
use super::events::{ProgressEvent, ProgressSink, Stage};
use super::image::{load_conditioning_image, ImageLimits};
use super::layout::ModelLayout;
use super::request::ResolvedRequest;
use crate::denoise::{
    denoise, i2v_condition, Conditioning, DenoiseOptions, Expert, ExpertModel, Prompts,
};
use crate::device::gpu_memory;
use crate::dit::random::RandomSource;
use crate::dit::{self, LoadOptions, StreamOptions, WanTransformer};
use crate::invalid;
use crate::memory::{Offload, TextPlacement, VaeDecode};
use crate::presets::{ModelPreset, TaskKind};
use crate::scheduler::{self, SchedulerKind, SchedulerSpec};
use crate::text::{self, TextEncoder, Tokenizer, Umt5Config};
use crate::vae::preview::LatentPreview;
use crate::vae::WanVae;
use crate::weights::WeightMap;

/// The prompts the text stage encodes, each on its own: the prompt, then the negative prompt when
/// any guidance scale above 1 uses it.
fn encoded_prompts(req: &ResolvedRequest) -> Vec<&str> {
    let guided = req.guidance > 1.0 || req.guidance_2.is_some_and(|g| g > 1.0);
    let mut prompts = vec![req.prompt.as_str()];
    if guided {
        prompts.push(req.negative_prompt.as_str());
    }
    prompts
}

/// Where the weights come from.
#[derive(Clone, Copy)]
pub enum Components<'a> {
    Demo,
    Layout(&'a ModelLayout),
    /// Full-size random weights of a known configuration, drawn on the device (benchmarks of the
    /// whole pipeline without a download; the video is noise).
    Random(&'static ModelPreset),
}

impl Components<'_> {
    /// The prompt tokenizer: the model folder's, or the built-in one for the demo and random
    /// weights.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            Components::Layout(l) => Tokenizer::from_file(&l.tokenizer),
            Components::Demo | Components::Random(_) => demo::tokenizer(),
        }
    }

    /// The released configuration these components are, when known (the memory plan, latent
    /// geometry and expert boundary come from it).
    pub fn preset(&self) -> Option<&'static ModelPreset> {
        match self {
            Components::Demo => None,
            Components::Layout(l) => l.variant.map(|v| v.preset()),
            Components::Random(p) => Some(p),
        }
    }
}

/// Where components live during a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub offload: Offload,
    /// `Offload::Stream`: blocks kept on the GPU and blocks uploaded ahead.
    pub stream: StreamOptions,
    /// Where the text encoder runs.
    pub text: TextPlacement,
    /// Transformer block linears in FP8 (per-channel scales): half the weight memory.
    pub fp8_linears: bool,
    /// FP8 block linears run as FP8 matmuls (activations quantised per token) instead of being
    /// dequantised for a bf16 matmul: faster on FP8 tensor cores, at a measured accuracy cost.
    pub fp8_matmul: bool,
    /// On a GPU the VAE runs in bf16 (cuDNN channels-last convolutions: ~20x faster than its
    /// exact f32 path, half the memory; error vs the f32 reference like diffusers' own bf16 VAE).
    /// The CPU always runs it in f32.
    pub vae_bf16: bool,
    /// The plan's choice of whole-frame or tiled decode (and tiles); `None` without a plan:
    /// tiled above 512x512 pixels and under `aggressive` or `stream` offload, in the VAE's
    /// default tiles (`memory::tiled_decode`).
    pub vae_decode: Option<VaeDecode>,
}

impl Default for Placement {
    /// Free each component after its stage; both experts resident during the loop.
    fn default() -> Self {
        Self {
            offload: Offload::Cond,
            stream: StreamOptions::default(),
            text: TextPlacement::Resident,
            fp8_linears: false,
            fp8_matmul: false,
            vae_bf16: true,
            vae_decode: None,
        }
    }
}

/// A stage's measured GPU memory: the pool's peak while it ran (`None` on the CPU).
#[derive(Clone, Debug, PartialEq)]
pub struct StageMemory {
    pub stage: String,
    pub gpu_peak: Option<u64>,
    /// In use when the stage began: what earlier stages left on the GPU (persistent cuDNN
    /// workspaces, tensors carried over), part of `gpu_peak`.
    pub gpu_at_start: Option<u64>,
    pub seconds: f64,
}

/// Components kept between stages (`Offload::None`).
#[derive(Default)]
struct Resident {
    text: Option<Rc<TextEncoder>>,
    vae: Option<Rc<WanVae>>,
    transformers: Option<Rc<(WanTransformer, Option<WanTransformer>)>>,
}

pub struct Stages<'a> {
    pub components: Components<'a>,
    pub device: Device,
    /// Transformer dtype: f32 on the CPU, bf16 on a GPU.
    pub dtype: DType,
    pub placement: Placement,
    started: Instant,
    resident: RefCell<Resident>,
    memory: RefCell<Vec<StageMemory>>,
    stage_started: RefCell<Instant>,
    /// GPU bytes in use when the current measure began.
    stage_start_used: Cell<Option<u64>>,
    /// The VAE's latent -> RGB map, probed once when a sink first wants previews.
    preview: OnceCell<LatentPreview>,
    /// Read once per run: the plan counts the prompt's tokens with it before the text stage.
    tokenizer: OnceCell<Tokenizer>,
}

impl<'a> Stages<'a> {
    pub fn new(components: Components<'a>, device: Device) -> Self {
        Self::with_placement(components, device, Placement::default())
    }

    pub fn with_placement(
        components: Components<'a>,
        device: Device,
        placement: Placement,
    ) -> Self {
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        Self {
            components,
            device,
            dtype,
            placement,
            started: Instant::now(),
            resident: RefCell::default(),
            memory: RefCell::default(),
            stage_started: RefCell::new(Instant::now()),
            stage_start_used: Cell::new(None),
            preview: OnceCell::new(),
            tokenizer: OnceCell::new(),
        }
    }

    /// Changes the placement for the stages still to run (components kept resident are released
    /// when the new placement does not keep them).
    pub fn set_placement(&mut self, placement: Placement) {
        if placement.offload != Offload::None {
            *self.resident.borrow_mut() = Resident::default();
        }
        self.placement = placement;
    }

    /// The measured GPU peak of every stage run so far, in order.
    pub fn memory_report(&self) -> Vec<StageMemory> {
        self.memory.borrow().clone()
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Starts measuring a stage: the pool's peak restarts from what is held now.
    fn begin_measure(&self) -> Result<()> {
        gpu_memory::reset_peak(&self.device)?;
        self.stage_start_used
            .set(gpu_memory::usage(&self.device)?.map(|u| u.used));
        *self.stage_started.borrow_mut() = Instant::now();
        Ok(())
    }

    /// Records the peak since [`Self::begin_measure`] under `name` and starts the next measure.
    fn end_measure(&self, name: &str) -> Result<()> {
        if let Device::Cuda(_) = &self.device {
            self.device.synchronize()?;
        }
        let gpu_peak = gpu_memory::usage(&self.device)?.map(|u| u.peak);
        let seconds = self.stage_started.borrow().elapsed().as_secs_f64();
        self.memory.borrow_mut().push(StageMemory {
            stage: name.to_string(),
            gpu_peak,
            gpu_at_start: self.stage_start_used.get(),
            seconds,
        });
        self.begin_measure()
    }

    fn stage(&self, sink: &mut dyn ProgressSink, stage: Stage) -> Result<()> {
        self.begin_measure()?;
        sink.event(ProgressEvent::Stage {
            stage,
            elapsed_s: self.elapsed(),
        })
    }

    fn keep_resident(&self) -> bool {
        self.placement.offload == Offload::None
    }

    fn preset(&self) -> Option<&'static ModelPreset> {
        self.components.preset()
    }

    /// I2V-A14B: the image latents are concatenated on channels (other image models hold the
    /// first latent frame).
    fn concat_condition(&self) -> bool {
        self.preset()
            .is_some_and(|p| p.task == TaskKind::I2V && p.has_experts())
    }

    /// The VAE's dtype: f32 (the reference's) unless the placement asks for bf16 on a GPU.
    pub fn vae_dtype(&self) -> DType {
        if self.placement.vae_bf16 && !self.device.is_cpu() {
            DType::BF16
        } else {
            DType::F32
        }
    }

    fn vae(&self) -> Result<Rc<WanVae>> {
        if let Some(v) = &self.resident.borrow().vae {
            return Ok(v.clone());
        }
        let dtype = self.vae_dtype();
        let vae = Rc::new(match self.components {
            Components::Demo => demo::vae(&self.device, dtype)?,
            Components::Layout(l) => WanVae::load(&l.vae, &self.device, dtype)?,
            Components::Random(p) => {
                WanVae::random(crate::memory::vae_config(p.vae), 11, &self.device, dtype)?
            }
        });
        if self.keep_resident() {
            self.resident.borrow_mut().vae = Some(vae.clone());
        }
        Ok(vae)
    }

    /// The prompt tokenizer, read from the components on first use.
    fn tokenizer(&self) -> Result<&Tokenizer> {
        if self.tokenizer.get().is_none() {
            let _ = self.tokenizer.set(self.components.tokenizer()?);
        }
        Ok(self.tokenizer.get().expect("set above"))
    }

    /// The positions the text encoder will run on for this request: its longest prompt's tokens
    /// (the negative prompt counts when guidance uses it).
    pub fn text_tokens(&self, req: &ResolvedRequest) -> Result<usize> {
        text::longest_prompt_tokens(self.tokenizer()?, &encoded_prompts(req))
    }

    fn text(&self) -> Result<Rc<TextEncoder>> {
        if let Some(t) = &self.resident.borrow().text {
            return Ok(t.clone());
        }
        // `device` holds the weights; a streamed encoder keeps them on the host in bf16 and runs
        // on the GPU.
        let (device, dtype) = match self.placement.text {
            _ if self.device.is_cpu() => (Device::Cpu, DType::F32),
            TextPlacement::Cpu => (Device::Cpu, DType::F32),
            TextPlacement::Streamed => (Device::Cpu, DType::BF16),
            TextPlacement::Resident => (self.device.clone(), DType::BF16),
        };
        let streamed = self.placement.text == TextPlacement::Streamed && !self.device.is_cpu();
        let encoder = match self.components {
            Components::Demo => demo::text_encoder(&self.device, DType::F32)?,
            Components::Layout(l) => TextEncoder::load(&l.text_encoder, &device, dtype)?,
            Components::Random(_) => {
                // Drawn on the run's device even when the encoder runs on the CPU; that
                // transient (64 Mi values at a time) is not what a checkpoint costs.
                let t = TextEncoder::random_drawn_on(
                    Umt5Config::umt5_xxl(),
                    13,
                    &device,
                    dtype,
                    &self.device,
                )?;
                if !device.same_device(&self.device) {
                    gpu_memory::reset_peak(&self.device)?;
                }
                t
            }
        };
        let encoder = if streamed {
            encoder.streamed_to(&self.device)
        } else {
            encoder
        };
        let text = Rc::new(encoder);
        if self.keep_resident() {
            self.resident.borrow_mut().text = Some(text.clone());
        }
        Ok(text)
    }

    /// Loads every component up front when the placement keeps them resident (`Offload::None`),
    /// so each stage holds what the plan counts; otherwise nothing.
    pub fn preload(&self) -> Result<()> {
        if self.keep_resident() {
            self.text()?;
            self.vae()?;
            self.resident_transformers()?;
        }
        Ok(())
    }

    /// Prompt (and negative prompt, when any guidance > 1) embeddings [1, 512, text_dim], f32.
    /// The encoder is freed before returning (unless kept resident).
    pub fn encode_text(
        &self,
        req: &ResolvedRequest,
        sink: &mut dyn ProgressSink,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.stage(sink, Stage::TextEncode)?;
        let encoder = self.text()?;
        let tokenizer = self.tokenizer()?;
        let mut embeds = encoded_prompts(req)
            .into_iter()
            .map(|p| text::encode_prompts(&encoder, tokenizer, &[p]))
            .collect::<Result<Vec<_>>>()?
            .into_iter();
        let positive = embeds.next().expect("the prompt is always encoded");
        let negative = embeds.next();
        drop(encoder);
        let out = (
            positive.to_dtype(DType::F32)?,
            negative.map(|n| n.to_dtype(DType::F32)).transpose()?,
        );
        self.end_measure("text encode")?;
        Ok(out)
    }

    /// Image conditioning, normalised latents: for TI2V (and the demo) the first latent frame
    /// [1, z, 1, h, w]; for I2V-A14B the mask + latents of [image, zeros...] [1, 4 + z, F, h, w].
    /// `None` without an image. The VAE is freed before returning (unless kept resident).
    pub fn encode_condition(
        &self,
        req: &ResolvedRequest,
        sink: &mut dyn ProgressSink,
    ) -> Result<Option<Tensor>> {
        let Some(path) = &req.image else {
            return Ok(None);
        };
        self.stage(sink, Stage::ImageEncode)?;
        let image = load_conditioning_image(
            path,
            req.width,
            req.height,
            &ImageLimits::default(),
            &self.device,
        )?;
        let vae = self.vae()?;
        let image = image.unsqueeze(0)?.unsqueeze(2)?; // [1, 3, 1, H, W]
        let out = if self.concat_condition() {
            let rest = Tensor::zeros(
                (
                    1,
                    3,
                    req.frames as usize - 1,
                    req.height as usize,
                    req.width as usize,
                ),
                image.dtype(),
                image.device(),
            )?;
            let video = Tensor::cat(&[&image, &rest], 2)?;
            let latents = vae.normalize(&vae.encode_mean(&video)?.to_dtype(DType::F32)?)?;
            i2v_condition(&latents)?
        } else {
            let mean = vae.encode_mean(&image)?.to_dtype(DType::F32)?;
            vae.normalize(&mean)?
        };
        drop(vae);
        self.end_measure("image encode")?;
        Ok(Some(out))
    }

    /// Loads one transformer (`second`: the low-noise expert) as the placement says: resident on
    /// the device, or streamed from page-locked host memory.
    fn load_transformer(&self, second: bool) -> Result<WanTransformer> {
        let stream = (self.placement.offload == Offload::Stream).then_some(self.placement.stream);
        let options = LoadOptions {
            fp8_linears: self.placement.fp8_linears,
            fp8_matmul: self.placement.fp8_matmul,
            stream,
        };
        match self.components {
            Components::Demo => {
                let model = demo::transformer(&self.device, self.dtype)?;
                match stream {
                    Some(opts) => model.into_streamed(&self.device, opts),
                    None => Ok(model),
                }
            }
            Components::Layout(l) => {
                let path = if second {
                    l.dit_2
                        .as_ref()
                        .ok_or_else(|| invalid!("dit_2: this model has no second expert"))?
                } else {
                    &l.dit
                };
                dit::load_with(path, &self.device, self.dtype, &options)
            }
            Components::Random(p) => {
                let cfg = crate::memory::dit_config(p);
                let seed = if second { 8 } else { 7 };
                let source = RandomSource::new(&cfg, seed, &self.device, self.dtype)?;
                let wm = WeightMap::plain(Box::new(source), &self.device, self.dtype)?
                    .with_fp8_linears(options.fp8_linears)
                    .with_fp8_matmul(options.fp8_matmul);
                let model = WanTransformer::from_weights(cfg, &wm)?;
                match stream {
                    Some(opts) => {
                        let model = model.into_streamed(&self.device, opts)?;
                        // Random weights are drawn on the GPU, then staged to the host: that
                        // transient is not part of what a checkpoint (read on the CPU) costs.
                        gpu_memory::reset_peak(&self.device)?;
                        Ok(model)
                    }
                    None => Ok(model),
                }
            }
        }
    }

    fn has_second_expert(&self) -> bool {
        match self.components {
            Components::Demo => false,
            Components::Layout(l) => l.dit_2.is_some(),
            Components::Random(p) => p.has_experts(),
        }
    }

    /// Both experts loaded together (kept between runs when resident).
    fn resident_transformers(&self) -> Result<Rc<(WanTransformer, Option<WanTransformer>)>> {
        if let Some(t) = &self.resident.borrow().transformers {
            return Ok(t.clone());
        }
        let high = self.load_transformer(false)?;
        let low = if self.has_second_expert() {
            Some(self.load_transformer(true)?)
        } else {
            None
        };
        let both = Rc::new((high, low));
        if self.keep_resident() {
            self.resident.borrow_mut().transformers = Some(both.clone());
        }
        Ok(both)
    }

    fn scheduler_spec(&self, req: &ResolvedRequest) -> Result<SchedulerSpec> {
        let kind: SchedulerKind = req.scheduler.parse()?;
        let spec = match self.components {
            Components::Layout(ModelLayout {
                scheduler_config: Some(cfg),
                ..
            }) => SchedulerSpec::from_diffusers_config(cfg)?.with_kind(kind),
            // An official release (or the demo) follows the official sampler construction.
            _ => SchedulerSpec::official(kind, req.shift),
        };
        Ok(SchedulerSpec {
            flow_shift: req.shift,
            ..spec
        })
    }

    /// Latent channels and spatial stride of the model's VAE.
    fn latent_geometry(&self) -> Result<(usize, usize)> {
        if let Some(p) = self.preset() {
            return Ok((p.latent_channels, p.vae_stride[1]));
        }
        Ok(match self.components {
            Components::Layout(l) => {
                // Unknown variant: the transformer's config says (48 channels: the Wan2.2 VAE).
                let (_, cfg) = dit::open_weights(&l.dit, &Device::Cpu, self.dtype)?;
                let z = cfg.out_channels;
                (z, if z == 48 { 16 } else { 8 })
            }
            _ => (16, 8),
        })
    }

    fn boundary_ratio(&self) -> Result<Option<f64>> {
        if !self.has_second_expert() {
            return Ok(None);
        }
        // A diffusers folder's model_index.json wins over the released configuration.
        let from_folder = match self.components {
            Components::Layout(l) => l.boundary_ratio,
            _ => None,
        };
        from_folder
            .or(self.preset().and_then(|p| p.boundary_ratio))
            .map(Some)
            .ok_or_else(|| {
                invalid!("two experts but no boundary_ratio in model_index.json or preset")
            })
    }

    fn expand_timesteps(&self) -> bool {
        let ti2v = self.preset().is_some_and(|p| p.task == TaskKind::TI2V);
        match self.components {
            Components::Demo => true,
            Components::Layout(l) => l.expand_timesteps.unwrap_or(ti2v),
            Components::Random(_) => ti2v,
        }
    }

    /// Seeded noise -> denoised (normalised) latents [1, z, F_lat, h, w], f32. Transformers are
    /// freed before returning (unless kept resident); with an offload mode that swaps experts,
    /// only one expert is in memory at a time.
    pub fn denoise(
        &self,
        req: &ResolvedRequest,
        positive: &Tensor,
        negative: Option<&Tensor>,
        condition: Option<&Tensor>,
        sink: &mut dyn ProgressSink,
    ) -> Result<Tensor> {
        let preview = if sink.wants_previews() {
            Some(self.latent_preview()?)
        } else {
            None
        };
        self.stage(sink, Stage::Denoise)?;
        let (z, s) = self.latent_geometry()?;
        let vae_stride_t = 4;
        let f_lat = (req.frames as usize - 1) / vae_stride_t + 1;
        let shape = (1, z, f_lat, req.height as usize / s, req.width as usize / s);
        let noise = crate::rng::gaussian_noise(req.seed, shape, &Device::Cpu)?;
        let boundary_ratio = self.boundary_ratio()?;
        let guidance_2 = req.guidance_2.unwrap_or(req.guidance);
        let swap = boundary_ratio.is_some()
            && matches!(
                self.placement.offload,
                Offload::CondDiffusion | Offload::Aggressive | Offload::Stream
            );
        // Set when the low-noise expert loads: the stage is then measured per expert.
        let swapped = Cell::new(false);
        let resident = if swap {
            None
        } else {
            Some(self.resident_transformers()?)
        };
        let (high, low) = match &resident {
            Some(both) => (
                Expert::resident(&both.0, req.guidance),
                both.1.as_ref().map(|m| Expert::resident(m, guidance_2)),
            ),
            None => (
                Expert {
                    model: ExpertModel::OnDemand {
                        device: self.device.clone(),
                        load: Box::new(|| self.load_transformer(false)),
                    },
                    guidance: req.guidance,
                },
                Some(Expert {
                    model: ExpertModel::OnDemand {
                        device: self.device.clone(),
                        load: Box::new(|| {
                            // The high-noise expert is gone: its peak is this stage's first half.
                            self.end_measure("denoise (high-noise expert)")?;
                            swapped.set(true);
                            self.load_transformer(true)
                        }),
                    },
                    guidance: guidance_2,
                }),
            ),
        };
        let spec = self.scheduler_spec(req)?;
        let mut sched = scheduler::build(&spec, req.steps as usize)?;
        let opts = DenoiseOptions {
            boundary_ratio,
            num_train_timesteps: spec.num_train_timesteps,
            expand_timesteps: self.expand_timesteps(),
        };
        let prompts = Prompts { positive, negative };
        let conditioning = match condition {
            None => Conditioning::None,
            Some(c) if self.concat_condition() => Conditioning::Concat(c),
            Some(c) => Conditioning::FirstFrame(c),
        };
        let t0 = Instant::now();
        let started = self.elapsed();
        let out = denoise(
            &noise,
            &prompts,
            high,
            low,
            sched.as_mut(),
            &opts,
            &conditioning,
            &mut |done| {
                let (step, total) = (done.step, done.total);
                let per_step = t0.elapsed().as_secs_f64() / step as f64;
                sink.event(ProgressEvent::Step {
                    stage: Stage::Denoise,
                    step: step as u32,
                    total: total as u32,
                    elapsed_s: started + t0.elapsed().as_secs_f64(),
                    eta_s: Some(per_step * (total - step) as f64),
                })?;
                match preview {
                    Some(p) if step.is_multiple_of(preview_interval(total)) => {
                        // The middle latent frame: the first one is the input image under I2V.
                        let x0 = done.denoised()?;
                        let image = p.render(&x0, x0.dim(2)? / 2, PREVIEW_MAX_SIDE)?;
                        sink.event(ProgressEvent::Preview {
                            step: step as u32,
                            width: image.width,
                            height: image.height,
                            png_base64: base64::engine::general_purpose::STANDARD
                                .encode(&image.png),
                        })
                    }
                    _ => Ok(()),
                }
            },
        )?;
        drop(resident);
        self.end_measure(if swapped.get() {
            "denoise (low-noise expert)"
        } else {
            "denoise"
        })?;
        Ok(out)
    }

    /// The preview map, probed on first use. The probe runs between stages and is measured as
    /// its own row: it holds the VAE (freed after unless resident) and decodes 2z + 1 pixels, so
    /// it never needs more memory than the decode stage that follows.
    fn latent_preview(&self) -> Result<&LatentPreview> {
        if let Some(p) = self.preview.get() {
            return Ok(p);
        }
        let probed = LatentPreview::probe(&*self.vae()?)?;
        self.end_measure("preview probe")?;
        Ok(self.preview.get_or_init(|| probed))
    }

    /// Normalised latents -> video [3, T, H, W] f32 on the CPU, in [-1, 1]. Decoded in spatial
    /// tiles (bounded memory) where the placement says so, or without a plan's word for large
    /// videos and every video under `aggressive` or `stream` offload; the VAE is freed before
    /// returning (unless kept resident).
    pub fn decode(&self, latents: &Tensor, sink: &mut dyn ProgressSink) -> Result<Tensor> {
        self.stage(sink, Stage::VaeDecode)?;
        let vae = self.vae()?;
        let z = vae.denormalize(latents)?;
        let (_, _, _, h, w) = z.dims5()?;
        let s = vae.config().spatial_stride();
        let decode = self.placement.vae_decode.unwrap_or_else(|| {
            if crate::memory::vae_decode_tiled(self.placement.offload, w * s, h * s, false) {
                VaeDecode::Tiled(crate::memory::tiled_decode(vae.config()))
            } else {
                VaeDecode::WholeFrames
            }
        });
        let video = match decode {
            VaeDecode::Tiled(how) => vae.decode_tiled_passes(&z, &how.tiles, how.pass_frames)?,
            VaeDecode::WholeFrames => vae.decode(&z)?,
        };
        drop(vae);
        // Widened on the host: an f32 copy on the GPU would add 4 bytes per value to the peak.
        let video = video
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .squeeze(0)?;
        self.end_measure("VAE decode")?;
        Ok(video)
    }
}

/// Longer side of a preview frame in pixels (latent resolution is below this for every preset).
const PREVIEW_MAX_SIDE: u32 = 256;

/// A preview every quarter of the loop (every step for runs under 8 steps).
fn preview_interval(total: usize) -> usize {
    (total / 4).max(1)
}
