//! Wan VAE 2.1 (z16, stride 4x8x8) and 2.2 (z48, patchify 2, stride 4x16x16), equal to diffusers
//! 0.42.1 `AutoencoderKLWan`.
//!
//! - Causal, chunked like the reference: encode sees frame 0 alone and then chunks of 4 frames;
//!   decode one latent frame at a time; every causal conv carries its last input frames to the
//!   next chunk ([`layers::FeatCache`]).
//! - [`WanVae::decode`] / [`WanVae::encode_mean`] are the untiled reference computations;
//!   [`WanVae::decode_tiled`] / [`WanVae::encode_mean_tiled`] bound the working memory by the tile,
//!   independent of the number of frames ([`tiling`]).
//! - Checkpoints: a diffusers `vae/` folder (config.json + safetensors), an official
//!   `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth` (or the folder holding it), or a safetensors file in either
//!   naming (ComfyUI repackagings use the official names). Keys are strict both ways.
//!
//! Tensors at the API are `[B, C, T, H, W]`; pixels are in [-1, 1].

pub mod config;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod keys;
pub mod layers;
pub mod model;
pub mod preview;
pub mod tiling;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

pub use self::config::VaeConfig;
use self::keys::{detect_layout, infer_config, normalize_key};
use self::layers::{patchify, unpatchify, CausalConv3d, FeatCache, ShapeRecorder, Vb};
use self::model::{Decoder3d, Encoder3d};
pub use self::tiling::TileConfig;
use self::tiling::{plan_axis, Blend, Span};
use crate::component::{ComponentOptions, Inputs, Outputs, Settings};
use crate::invalid;
use crate::weights::pth::PthSource;
use crate::weights::{MemorySource, SafetensorsSource, TensorSource, WeightMap};

/// Official file names looked for in an official-layout model folder.
const OFFICIAL_FILES: [&str; 2] = ["Wan2.2_VAE.pth", "Wan2.1_VAE.pth"];

/// Latent frames of a tile held on the device between host copies in [`WanVae::decode_tiled`]
/// (8 chunks = 29 to 32 video frames).
pub const TILE_COPY_CHUNKS: usize = 8;

/// Frames per pass through the decoder's full-resolution levels ([`WanVae::set_decode_pass_frames`]):
/// 0, the whole chunk, whose GPU memory the planner is calibrated on.
pub const DEFAULT_DECODE_PASS_FRAMES: usize = 0;

/// A loaded Wan VAE.
pub struct WanVae {
    config: VaeConfig,
    encoder: Encoder3d,
    decoder: Decoder3d,
    quant_conv: CausalConv3d,
    post_quant_conv: CausalConv3d,
    device: Device,
    dtype: DType,
    decode_pass_frames: usize,
}

impl WanVae {
    /// Loads from a diffusers `vae/` folder (or a pipeline folder containing `vae/`), an official
    /// `.pth`, a folder holding `Wan2.2_VAE.pth` / `Wan2.1_VAE.pth`, or a `.safetensors` file.
    /// Without a config.json the architecture is inferred from the tensor shapes.
    ///
    /// `dtype` is the compute dtype on GPU; on CPU the VAE always runs in f32 (candle's CPU
    /// backend has no bf16/f16 matmul, and the official VAE runs in f32 anyway).
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let dtype = compute_dtype(device, dtype);
        let (source, config) = open_checkpoint(path)?;
        let origin = source.describe();
        let layout = detect_layout(&source.keys(), &origin)?;
        let weights = WeightMap::new(source, |k| Some(normalize_key(k, layout)), device, dtype)?;
        let config = match config {
            Some(c) => c,
            None => infer_config(&|name| weights.shape(name), &origin)?,
        };
        Self::from_weights(config, weights)
            .with_context(|| format!("loading the Wan VAE from {origin}"))
    }

    /// Builds the model from canonical (diffusers-named) weights; every weight must be used.
    pub fn from_weights(config: VaeConfig, weights: WeightMap) -> Result<Self> {
        config.validate()?;
        if compute_dtype(weights.device(), weights.dtype()) != weights.dtype() {
            return Err(invalid!(
                "dtype: {:?} is not supported by the VAE on CPU; use f32",
                weights.dtype()
            ));
        }
        let vb = Vb::from_map(&weights);
        let vae = Self::build(&config, &vb, weights.device().clone(), weights.dtype())?;
        weights.finish()?;
        Ok(vae)
    }

    fn build(config: &VaeConfig, vb: &Vb, device: Device, dtype: DType) -> Result<Self> {
        let z = config.z_dim;
        Ok(Self {
            encoder: Encoder3d::load(&vb.pp("encoder"), config)?,
            decoder: Decoder3d::load(&vb.pp("decoder"), config)?,
            quant_conv: CausalConv3d::load_k(&vb.pp("quant_conv"), 2 * z, 2 * z, 1)?,
            post_quant_conv: CausalConv3d::load_k(&vb.pp("post_quant_conv"), z, z, 1)?,
            config: config.clone(),
            device,
            dtype,
            decode_pass_frames: DEFAULT_DECODE_PASS_FRAMES,
        })
    }

    /// Every weight name (diffusers naming) and shape that `config` expects, in build order.
    pub fn expected_weights(config: &VaeConfig) -> Result<Vec<(String, Vec<usize>)>> {
        config.validate()?;
        let recorder = ShapeRecorder::default();
        Self::build(
            config,
            &Vb::from_recorder(&recorder),
            Device::Cpu,
            DType::F32,
        )?;
        Ok(recorder.record.into_inner())
    }

    /// Seeded random weights for `config` (the built-in demo model): conv weights ~ N(0, 1/fan_in),
    /// RMS gains 1, biases 0. Deterministic for a seed, on any device.
    pub fn random_weights(
        config: &VaeConfig,
        seed: u64,
        device: &Device,
    ) -> Result<HashMap<String, Tensor>> {
        Self::expected_weights(config)?
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let t = if name.ends_with("gamma") {
                    Tensor::ones(shape.as_slice(), DType::F32, device)?
                } else if name.ends_with("bias") {
                    Tensor::zeros(shape.as_slice(), DType::F32, device)?
                } else {
                    let fan_in: usize = shape[1..].iter().product();
                    let s = seed
                        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                        .wrapping_add(i as u64);
                    (crate::rng::gaussian_noise(s, shape.as_slice(), device)?
                        / (fan_in.max(1) as f64).sqrt())?
                };
                Ok((name, t))
            })
            .collect()
    }

    /// A VAE with [`random_weights`](Self::random_weights), drawn in f32 on the CPU and moved to
    /// `device` a tensor at a time as [`load`](Self::load) moves a checkpoint's (drawn on the
    /// device, the whole f32 set would sit there next to its converted copy: measured 4.07 GiB
    /// for the Wan2.2 VAE's tiled decode stage, which needs 2.03).
    pub fn random(config: VaeConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        let dtype = compute_dtype(device, dtype);
        let tensors = Self::random_weights(&config, seed, &Device::Cpu)?;
        let source = MemorySource::new(format!("random Wan VAE (seed {seed})"), tensors);
        Self::from_weights(config, WeightMap::plain(Box::new(source), device, dtype)?)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How many of a chunk's frames go through the decoder's levels after the last temporal
    /// upsampler at once: 0 (the default) takes the whole chunk, as the reference does. Smaller
    /// passes hold less: on the H100 (bf16, Wan2.1, 832x480x81) a whole-frame decode peaks at 6.20
    /// GiB with whole chunks, 3.64 with 2-frame and 3.14 with 1-frame passes (1.22 s, 1.25 s, 1.60
    /// s); per pixel of a tile 15.7, 8.8 and 7.4 kB. Decoded frames do not depend on it beyond the
    /// convolutions' rounding (bit-identical on the CPU).
    pub fn set_decode_pass_frames(&mut self, frames: usize) {
        self.decode_pass_frames = frames;
    }

    pub fn decode_pass_frames(&self) -> usize {
        self.decode_pass_frames
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Per-channel latent mean (for the pipeline's normalisation).
    pub fn latents_mean(&self) -> &[f32] {
        &self.config.latents_mean
    }

    /// Per-channel latent std.
    pub fn latents_std(&self) -> &[f32] {
        &self.config.latents_std
    }

    fn channel_stats(&self, latents: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = self.config.z_dim;
        let shape = (1, z, 1, 1, 1);
        let dev = latents.device();
        Ok((
            Tensor::new(self.latents_mean(), dev)?
                .reshape(shape)?
                .to_dtype(latents.dtype())?,
            Tensor::new(self.latents_std(), dev)?
                .reshape(shape)?
                .to_dtype(latents.dtype())?,
        ))
    }

    /// Raw posterior mean -> diffusion latents: (z − mean) / std, per channel.
    pub fn normalize(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_latents(latents)?;
        let (mean, std) = self.channel_stats(latents)?;
        Ok(latents.broadcast_sub(&mean)?.broadcast_div(&std)?)
    }

    /// Diffusion latents -> what [`decode`](Self::decode) takes: z · std + mean, per channel.
    pub fn denormalize(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_latents(latents)?;
        let (mean, std) = self.channel_stats(latents)?;
        Ok(latents.broadcast_mul(&std)?.broadcast_add(&mean)?)
    }

    fn check_latents(&self, latents: &Tensor) -> Result<()> {
        let z = self.config.z_dim;
        match latents.dims() {
            [_, c, t, h, w] if *c == z && *t > 0 && *h > 0 && *w > 0 => Ok(()),
            d => Err(invalid!(
                "latents: shape {d:?} is not [B, {z}, T, H, W] (z_dim {z}, all sizes positive)"
            )),
        }
    }

    fn check_video(&self, video: &Tensor, tiled: bool) -> Result<()> {
        let c = self.config.image_channels();
        let s = self.config.spatial_stride();
        let dims = video.dims();
        let [_, ch, t, h, w] = dims else {
            return Err(invalid!("sample: shape {dims:?} is not [B, {c}, T, H, W]"));
        };
        if *ch != c || *t == 0 {
            return Err(invalid!(
                "sample: shape {dims:?} is not [B, {c}, T, H, W] with T ≥ 1"
            ));
        }
        // Residual down blocks (and patchify) fold exact blocks; plain strided convs only need room.
        let exact = self.config.is_residual || self.config.patch() > 1 || tiled;
        if (exact && (!h.is_multiple_of(s) || !w.is_multiple_of(s))) || *h < s || *w < s {
            return Err(invalid!(
                "sample: height {h} and width {w} must be {} the VAE's spatial stride {s}",
                if exact { "multiples of" } else { "at least" }
            ));
        }
        Ok(())
    }

    /// `[B, C, T, H, W]` -> frame-major `[B, T, C·p², H/p, W/p]`, on the model's device and dtype.
    fn prepare_video(&self, video: &Tensor) -> Result<Tensor> {
        let x = video.to_device(&self.device)?.to_dtype(self.dtype)?;
        patchify(
            &x.permute((0, 2, 1, 3, 4))?.contiguous()?,
            self.config.patch(),
        )
    }

    /// Encodes video `[B, C, T, H, W]` (any device/dtype; moved a chunk at a time) chunk by chunk:
    /// frame 0, then 4 frames at a time, as diffusers `_encode`. Each chunk's posterior mean
    /// `[B, t, z, h, w]` goes to `sink`.
    fn encode_stream(
        &self,
        video: &Tensor,
        sink: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let frames = video.dim(2)?;
        let chunks = 1 + (frames - 1) / 4;
        let mut cache = FeatCache::default();
        for i in 0..chunks {
            let (start, len) = if i == 0 { (0, 1) } else { (1 + 4 * (i - 1), 4) };
            let chunk = self.prepare_video(&video.narrow(2, start, len)?)?;
            cache.begin_chunk();
            let h = self.encoder.forward(&chunk, &mut cache)?;
            let moments = self.quant_conv.forward(&h, None)?;
            sink(moments.narrow(2, 0, self.config.z_dim)?)?;
        }
        Ok(())
    }

    /// Decodes latents `[B, z, T, h, w]` (any device/dtype; moved a frame at a time) one latent
    /// frame at a time, as diffusers `_decode`. Each chunk of un-patchified, unclamped frames
    /// `[B, f, C, H, W]` goes to `sink`.
    /// `pass_frames`: see [`Self::set_decode_pass_frames`].
    fn decode_stream(
        &self,
        latents: &Tensor,
        pass_frames: usize,
        sink: &mut dyn FnMut(Tensor) -> Result<()>,
    ) -> Result<()> {
        let mut cache = FeatCache::default();
        for i in 0..latents.dim(2)? {
            cache.begin_chunk();
            let z = latents
                .narrow(2, i, 1)?
                .to_device(&self.device)?
                .to_dtype(self.dtype)?;
            let z = z.permute((0, 2, 1, 3, 4))?.contiguous()?;
            let x = self.post_quant_conv.forward(&z, None)?;
            let out = self.decoder.forward(&x, &mut cache, i == 0, pass_frames)?;
            sink(unpatchify(&out, self.config.patch())?)?;
        }
        Ok(())
    }

    /// `AutoencoderKLWan.encode(x).latent_dist.mean`: video `[B, C, T, H, W]` in [-1, 1] -> raw
    /// (un-normalised) posterior mean `[B, z, 1 + (T−1)/4, H/s, W/s]`, in the model's dtype.
    pub fn encode_mean(&self, video: &Tensor) -> Result<Tensor> {
        self.check_video(video, false)?;
        let mut chunks = Vec::new();
        self.encode_stream(video, &mut |c| {
            chunks.push(c);
            Ok(())
        })?;
        Ok(Tensor::cat(&chunks, 1)?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()?)
    }

    /// `AutoencoderKLWan.decode(z).sample`: de-normalised latents `[B, z, T, h, w]` -> video
    /// `[B, C, 1 + 4(T−1), h·s, w·s]` clamped to [-1, 1], in the model's dtype and device.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.check_latents(latents)?;
        let mut chunks = Vec::new();
        self.decode_stream(latents, self.decode_pass_frames, &mut |c| {
            chunks.push(c);
            Ok(())
        })?;
        let out = Tensor::cat(&chunks, 1)?.clamp(-1f32, 1f32)?;
        Ok(out.permute((0, 2, 1, 3, 4))?.contiguous()?)
    }

    /// Tiled [`decode`](Self::decode): spatial tiles with overlap and linear blending, each decoded
    /// through all frames. A tile's decoded frames stay on the device for [`TILE_COPY_CHUNKS`]
    /// latent frames, then travel to the host in one copy and are blended there on a second
    /// thread while the device goes on: one host round trip per 8 chunks instead of per chunk.
    /// Working memory is one tile's, whatever the frame count. Returns an f32 CPU tensor (the
    /// frames' next stop is the video encoder).
    pub fn decode_tiled(&self, latents: &Tensor, tiles: &TileConfig) -> Result<Tensor> {
        self.decode_tiled_passes(latents, tiles, self.decode_pass_frames)
    }

    /// [`decode_tiled`](Self::decode_tiled) with `pass_frames` frames per pass through the
    /// full-resolution levels instead of the model's setting (the pipeline's tiled decode runs 2:
    /// see `memory::tiled_decode`).
    pub fn decode_tiled_passes(
        &self,
        latents: &Tensor,
        tiles: &TileConfig,
        pass_frames: usize,
    ) -> Result<Tensor> {
        self.check_latents(latents)?;
        let s = self.config.spatial_stride();
        let ((tile_h, tile_w), overlap) = tiles.latent(s)?;
        let (b, _, t, h, w) = latents.dims5()?;
        let out_c = self.config.out_channels / (self.config.patch() * self.config.patch());
        let out_dims = [b, out_c, self.config.decoded_frames(t), h * s, w * s];
        let rows = plan_axis(h, tile_h, overlap, s);
        let cols = plan_axis(w, tile_w, overlap, s);
        std::thread::scope(|scope| {
            // One batch of decoded frames in flight: the device decodes on while the host blends
            // (and, before the first batch, lays out the output).
            let (send, receive) = std::sync::mpsc::sync_channel::<(Tensor, usize, &Span, &Span)>(1);
            let blender = scope.spawn(move || -> Result<Blend> {
                let mut blend = Blend::new(out_dims);
                for (frames, t0, ys, xs) in receive {
                    if t0 == 0 {
                        blend.add_weights(ys, xs, s);
                    }
                    blend.add_chunk(&frames, t0, ys, xs, s)?;
                }
                Ok(blend)
            });
            let decoded = (|| -> Result<()> {
                for ys in &rows {
                    for xs in &cols {
                        // A view: frames are copied to the device one at a time.
                        let region = latents
                            .narrow(3, ys.start, ys.len)?
                            .narrow(4, xs.start, xs.len)?;
                        let mut chunks = Vec::new();
                        let mut t0 = 0;
                        // Copies the held chunks to the host and hands them to the blender;
                        // false once the blender has stopped (on an error, reported below).
                        let mut flush = |chunks: &mut Vec<Tensor>| -> Result<bool> {
                            if chunks.is_empty() {
                                return Ok(true);
                            }
                            let frames = Tensor::cat(chunks, 1)?.to_device(&Device::Cpu)?;
                            chunks.clear();
                            let n = frames.dim(1)?;
                            let sent = send.send((frames, t0, ys, xs)).is_ok();
                            t0 += n;
                            Ok(sent)
                        };
                        let mut blending = true;
                        self.decode_stream(&region, pass_frames, &mut |chunk| {
                            chunks.push(chunk);
                            if chunks.len() == TILE_COPY_CHUNKS && blending {
                                blending = flush(&mut chunks)?;
                            }
                            Ok(())
                        })?;
                        if !blending || !flush(&mut chunks)? {
                            return Ok(());
                        }
                    }
                }
                Ok(())
            })();
            drop(send);
            let blended = blender
                .join()
                .map_err(|_| anyhow::anyhow!("VAE tile blending thread panicked"))?;
            decoded?;
            blended?.finish(true)
        })
    }

    /// Tiled [`encode_mean`](Self::encode_mean) (blended in latent space). Height and width must be
    /// multiples of the spatial stride. Returns an f32 CPU tensor.
    pub fn encode_mean_tiled(&self, video: &Tensor, tiles: &TileConfig) -> Result<Tensor> {
        self.check_video(video, true)?;
        let s = self.config.spatial_stride();
        let ((tile_h, tile_w), overlap) = tiles.latent(s)?;
        let (b, _, t, h, w) = video.dims5()?;
        let (lh, lw) = (h / s, w / s);
        let mut blend = Blend::new([b, self.config.z_dim, self.config.latent_frames(t), lh, lw]);
        for ys in plan_axis(lh, tile_h, overlap, 1) {
            for xs in plan_axis(lw, tile_w, overlap, 1) {
                let region = video.narrow(3, ys.start * s, ys.len * s)?.narrow(
                    4,
                    xs.start * s,
                    xs.len * s,
                )?;
                blend.add_weights(&ys, &xs, 1);
                let mut t0 = 0;
                self.encode_stream(&region, &mut |chunk| {
                    blend.add_chunk(&chunk, t0, &ys, &xs, 1)?;
                    t0 += chunk.dim(1)?;
                    Ok(())
                })?;
            }
        }
        blend.finish(false)
    }
}

/// The dtype the VAE computes in: as asked on GPU, f32 on CPU (no half-precision matmul there).
pub fn compute_dtype(device: &Device, dtype: DType) -> DType {
    if device.is_cpu() && dtype != DType::F64 {
        DType::F32
    } else {
        dtype
    }
}

/// Resolves `path` to a tensor source and, for diffusers folders, their config.
fn open_checkpoint(path: &Path) -> Result<(Box<dyn TensorSource>, Option<VaeConfig>)> {
    if path.is_dir() {
        let config_path = path.join("config.json");
        if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("reading {}", config_path.display()))?;
            let config = VaeConfig::from_json(&text, &config_path.display().to_string())?;
            return Ok((Box::new(SafetensorsSource::open(path)?), Some(config)));
        }
        if path.join("vae").join("config.json").is_file() {
            return open_checkpoint(&path.join("vae"));
        }
        let found: Vec<PathBuf> = OFFICIAL_FILES
            .iter()
            .map(|f| path.join(f))
            .filter(|p| p.is_file())
            .collect();
        return match found.as_slice() {
            [one] => open_checkpoint(one),
            [] => Err(invalid!(
                "--model: {} holds no Wan VAE: expected a diffusers vae/ folder (config.json + \
                 safetensors), a pipeline folder with vae/, or an official {}",
                path.display(),
                OFFICIAL_FILES.join(" / ")
            )),
            _ => Err(invalid!(
                "--model: {} holds both {}; pass the file you mean",
                path.display(),
                OFFICIAL_FILES.join(" and ")
            )),
        };
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "pth" | "pt" | "ckpt" | "bin" => Ok((Box::new(PthSource::open(path)?), None)),
        "safetensors" => Ok((Box::new(SafetensorsSource::open(path)?), None)),
        _ => Err(invalid!(
            "--model: {} is not a VAE checkpoint (.pth, .safetensors or a diffusers vae/ folder)",
            path.display()
        )),
    }
}

/// `--set tiled=true|false`, `tile_size=<px>`, `tile_width=<px>`, `tile_overlap=<px>`; giving a
/// size or overlap implies tiling. Untiled (the diffusers default) otherwise.
fn tile_settings(settings: &Settings) -> Result<Option<TileConfig>> {
    let tiled = settings.get::<bool>("tiled")?;
    let size = settings.get::<usize>("tile_size")?;
    let width = settings.get::<usize>("tile_width")?;
    let overlap = settings.get::<usize>("tile_overlap")?;
    let geometry = size.is_some() || width.is_some() || overlap.is_some();
    if tiled == Some(false) && geometry {
        return Err(invalid!(
            "--set tile_size/tile_width/tile_overlap: given with tiled=false"
        ));
    }
    if tiled != Some(true) && !geometry {
        return Ok(None);
    }
    let default = TileConfig::default();
    Ok(Some(TileConfig {
        tile_size: size.unwrap_or(default.tile_size),
        tile_overlap: overlap.unwrap_or(default.tile_overlap),
        tile_width: width,
    }))
}

/// `run-component vae-encode`: input `sample` `[B, 3, T, H, W]` in [-1, 1]; output `latent_mean`
/// (the un-normalised posterior mean, as `AutoencoderKLWan.encode(x).latent_dist.mean`).
pub fn run_component_encode(
    model: &Path,
    inputs: &Inputs,
    opts: &ComponentOptions,
) -> Result<Outputs> {
    let sample = inputs.float("sample", &[5])?;
    let tiles = tile_settings(&opts.settings)?;
    let vae = WanVae::load(model, &opts.device, opts.dtype)?;
    let mean = match tiles {
        Some(t) => vae.encode_mean_tiled(&sample, &t)?,
        None => vae.encode_mean(&sample)?,
    };
    Ok(vec![("latent_mean".to_string(), mean)])
}

/// `run-component vae-decode`: input `latents` `[B, z, T, H, W]`, already de-normalised (as
/// `AutoencoderKLWan.decode` receives them); output `sample` clamped to [-1, 1].
pub fn run_component_decode(
    model: &Path,
    inputs: &Inputs,
    opts: &ComponentOptions,
) -> Result<Outputs> {
    let latents = inputs.float("latents", &[5])?;
    let tiles = tile_settings(&opts.settings)?;
    let vae = WanVae::load(model, &opts.device, opts.dtype)?;
    let sample = match tiles {
        Some(t) => vae.decode_tiled(&latents, &t)?,
        None => vae.decode(&latents)?,
    };
    Ok(vec![("sample".to_string(), sample)])
}
