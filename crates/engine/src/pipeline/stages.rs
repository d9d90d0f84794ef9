//! The generation stages, each loading its component, running, and releasing it before the next
//! stage needs the memory: text encoder → (VAE encode of a conditioning image) → diffusion
//! transformer(s) → VAE decode. The caller (CLI, worker) runs them in order and checks the output
//! between them (the quality guard sits between denoise and decode).

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use super::demo;
use super::events::{ProgressEvent, ProgressSink, Stage};
use super::image::{load_conditioning_image, ImageLimits};
use super::layout::{ModelLayout, WanVariant};
use super::request::ResolvedRequest;
use crate::denoise::{denoise, i2v_condition, Conditioning, DenoiseOptions, Expert, Prompts};
use crate::dit::{self, WanTransformer};
use crate::invalid;
use crate::scheduler::{self, SchedulerKind, SchedulerSpec};
use crate::text::{self, TextEncoder, Tokenizer};
use crate::vae::{TileConfig, WanVae};

/// Where the weights come from.
#[derive(Clone, Copy)]
pub enum Components<'a> {
    Demo,
    Layout(&'a ModelLayout),
}

pub struct Stages<'a> {
    pub components: Components<'a>,
    pub device: Device,
    /// Transformer dtype: f32 on the CPU, bf16 on a GPU.
    pub dtype: DType,
    started: Instant,
}

impl<'a> Stages<'a> {
    pub fn new(components: Components<'a>, device: Device) -> Self {
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        Self {
            components,
            device,
            dtype,
            started: Instant::now(),
        }
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn stage(&self, sink: &mut dyn ProgressSink, stage: Stage) -> Result<()> {
        sink.event(ProgressEvent::Stage {
            stage,
            elapsed_s: self.elapsed(),
        })
    }

    fn variant(&self) -> Option<WanVariant> {
        match self.components {
            Components::Demo => None,
            Components::Layout(l) => l.variant,
        }
    }

    fn load_vae(&self) -> Result<WanVae> {
        match self.components {
            // The VAE runs in f32: its outputs are pixels, and the reference does the same.
            Components::Demo => demo::vae(&self.device, DType::F32),
            Components::Layout(l) => WanVae::load(&l.vae, &self.device, DType::F32),
        }
    }

    fn load_text(&self) -> Result<(TextEncoder, Tokenizer)> {
        match self.components {
            Components::Demo => Ok((
                demo::text_encoder(&self.device, DType::F32)?,
                demo::tokenizer()?,
            )),
            Components::Layout(l) => {
                let dtype = if self.device.is_cpu() {
                    DType::F32
                } else {
                    DType::BF16
                };
                Ok((
                    TextEncoder::load(&l.text_encoder, &self.device, dtype)?,
                    Tokenizer::from_file(&l.tokenizer)?,
                ))
            }
        }
    }

    /// Prompt (and negative prompt, when any guidance > 1) embeddings [1, 512, text_dim], f32.
    /// The encoder is freed before returning.
    pub fn encode_text(
        &self,
        req: &ResolvedRequest,
        sink: &mut dyn ProgressSink,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.stage(sink, Stage::TextEncode)?;
        let (encoder, tokenizer) = self.load_text()?;
        let positive = text::encode_prompts(&encoder, &tokenizer, &[&req.prompt])?;
        let guided = req.guidance > 1.0 || req.guidance_2.is_some_and(|g| g > 1.0);
        let negative = if guided {
            Some(text::encode_prompts(
                &encoder,
                &tokenizer,
                &[&req.negative_prompt],
            )?)
        } else {
            None
        };
        drop(encoder);
        Ok((
            positive.to_dtype(DType::F32)?,
            negative.map(|n| n.to_dtype(DType::F32)).transpose()?,
        ))
    }

    /// Image conditioning, normalised latents: for TI2V (and the demo) the first latent frame
    /// [1, z, 1, h, w]; for I2V-A14B the mask + latents of [image, zeros...] [1, 4 + z, F, h, w].
    /// `None` without an image. The VAE is freed before returning.
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
        let vae = self.load_vae()?;
        let image = image.unsqueeze(0)?.unsqueeze(2)?; // [1, 3, 1, H, W]
        if self.variant() == Some(WanVariant::Wan22I2vA14B) {
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
            let latents = vae.normalize(&vae.encode_mean(&video)?)?;
            return Ok(Some(i2v_condition(&latents)?));
        }
        let mean = vae.encode_mean(&image)?;
        Ok(Some(vae.normalize(&mean)?.to_dtype(DType::F32)?))
    }

    fn load_transformers(&self) -> Result<(WanTransformer, Option<WanTransformer>)> {
        match self.components {
            Components::Demo => Ok((demo::transformer(&self.device, self.dtype)?, None)),
            Components::Layout(l) => {
                let high = dit::load(&l.dit, &self.device, self.dtype)?;
                let low = match &l.dit_2 {
                    Some(p) => Some(dit::load(p, &self.device, self.dtype)?),
                    None => None,
                };
                Ok((high, low))
            }
        }
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

    /// Seeded noise -> denoised (normalised) latents [1, z, F_lat, h, w], f32. Transformers are
    /// freed before returning.
    pub fn denoise(
        &self,
        req: &ResolvedRequest,
        positive: &Tensor,
        negative: Option<&Tensor>,
        condition: Option<&Tensor>,
        sink: &mut dyn ProgressSink,
    ) -> Result<Tensor> {
        self.stage(sink, Stage::Denoise)?;
        let (high_model, low_model) = self.load_transformers()?;
        let vae_stride_t = 4;
        let (z, s) = match self.components {
            Components::Demo => (16, 8),
            Components::Layout(l) => {
                let preset = l.variant.map(|v| v.preset());
                (
                    high_model.config().out_channels,
                    preset.map(|p| p.vae_stride[1]).unwrap_or(
                        if high_model.config().out_channels == 48 {
                            16
                        } else {
                            8
                        },
                    ),
                )
            }
        };
        let f_lat = (req.frames as usize - 1) / vae_stride_t + 1;
        let shape = (1, z, f_lat, req.height as usize / s, req.width as usize / s);
        let noise = crate::rng::gaussian_noise(req.seed, shape, &Device::Cpu)?;

        let boundary_ratio = match (self.components, &low_model) {
            (Components::Layout(l), Some(_)) => Some(
                l.boundary_ratio
                    .or(l.variant.and_then(|v| v.preset().boundary_ratio))
                    .ok_or_else(|| {
                        invalid!("two experts but no boundary_ratio in model_index.json or preset")
                    })?,
            ),
            _ => None,
        };
        let expand_timesteps = match self.components {
            Components::Demo => true,
            Components::Layout(l) => l
                .expand_timesteps
                .unwrap_or(l.variant == Some(WanVariant::Wan22Ti2v5B)),
        };
        let high = Expert {
            model: &high_model,
            guidance: req.guidance,
        };
        let low = low_model.as_ref().map(|m| Expert {
            model: m,
            guidance: req.guidance_2.unwrap_or(req.guidance),
        });
        let spec = self.scheduler_spec(req)?;
        let mut sched = scheduler::build(&spec, req.steps as usize)?;
        let opts = DenoiseOptions {
            boundary_ratio,
            num_train_timesteps: spec.num_train_timesteps,
            expand_timesteps,
        };
        let prompts = Prompts { positive, negative };
        let conditioning = match condition {
            None => Conditioning::None,
            Some(c) if self.variant() == Some(WanVariant::Wan22I2vA14B) => Conditioning::Concat(c),
            Some(c) => Conditioning::FirstFrame(c),
        };
        let t0 = Instant::now();
        let started = self.elapsed();
        let out = denoise(
            &noise,
            &prompts,
            &high,
            low.as_ref(),
            sched.as_mut(),
            &opts,
            &conditioning,
            &mut |step, total| {
                let per_step = t0.elapsed().as_secs_f64() / step as f64;
                sink.event(ProgressEvent::Step {
                    stage: Stage::Denoise,
                    step: step as u32,
                    total: total as u32,
                    elapsed_s: started + t0.elapsed().as_secs_f64(),
                    eta_s: Some(per_step * (total - step) as f64),
                })
            },
        )?;
        drop(low_model);
        drop(high_model);
        Ok(out)
    }

    /// Normalised latents -> video [3, T, H, W] f32 on the CPU, in [-1, 1]. Large videos are decoded
    /// in spatial tiles (bounded memory); the VAE is freed before returning.
    pub fn decode(&self, latents: &Tensor, sink: &mut dyn ProgressSink) -> Result<Tensor> {
        self.stage(sink, Stage::VaeDecode)?;
        let vae = self.load_vae()?;
        let z = vae.denormalize(latents)?;
        let (_, _, _, h, w) = z.dims5()?;
        let s = vae.config().spatial_stride();
        // Plain decode for small frames; tiles above ~512x512 pixels keep memory bounded.
        let video = if h * w * s * s > 512 * 512 {
            vae.decode_tiled(&z, &TileConfig::default())?
        } else {
            vae.decode(&z)?
        };
        drop(vae);
        Ok(video
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .squeeze(0)?)
    }
}
