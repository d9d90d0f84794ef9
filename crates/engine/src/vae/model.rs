//! `WanEncoder3d` and `WanDecoder3d` (both VAE kinds), one chunk at a time with a feature cache.

use anyhow::Result;
use candle_core::Tensor;

use super::config::VaeConfig;
use super::layers::{
    AvgDown3D, CausalConv3d, DupUp3D, FeatCache, MidBlock, Resample, ResampleMode, ResidualBlock,
    RmsNorm, Vb,
};

/// One entry of the encoder's `down_blocks`.
enum DownLayer {
    /// Wan2.1: a flat list of residual blocks and resamplers.
    Res(ResidualBlock),
    Resample(Resample),
    /// Wan2.2: `WanResidualDownBlock`.
    ResidualDown {
        resnets: Vec<ResidualBlock>,
        downsampler: Option<Resample>,
        avg_shortcut: AvgDown3D,
    },
}

pub struct Encoder3d {
    conv_in: CausalConv3d,
    down_blocks: Vec<DownLayer>,
    mid_block: MidBlock,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

fn down_mode(temporal: bool) -> ResampleMode {
    if temporal {
        ResampleMode::Downsample3d
    } else {
        ResampleMode::Downsample2d
    }
}

impl Encoder3d {
    pub fn load(vb: &Vb, cfg: &VaeConfig) -> Result<Self> {
        let dims: Vec<usize> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|m| m * cfg.base_dim)
            .collect();
        let stages = cfg.dim_mult.len();
        let conv_in = CausalConv3d::load_k(&vb.pp("conv_in"), cfg.in_channels, dims[0], 3)?;
        let mut down_blocks = Vec::new();
        for i in 0..stages {
            let (mut in_dim, out_dim) = (dims[i], dims[i + 1]);
            let down = i + 1 != stages;
            if cfg.is_residual {
                let p = vb.pp(format!("down_blocks.{i}"));
                let temporal = down && cfg.temperal_downsample[i];
                let mut resnets = Vec::new();
                for j in 0..cfg.num_res_blocks {
                    resnets.push(ResidualBlock::load(
                        &p.pp(format!("resnets.{j}")),
                        in_dim,
                        out_dim,
                    )?);
                    in_dim = out_dim;
                }
                let downsampler = down
                    .then(|| {
                        Resample::load(&p.pp("downsampler"), out_dim, down_mode(temporal), out_dim)
                    })
                    .transpose()?;
                let avg_shortcut = AvgDown3D::new(
                    dims[i],
                    out_dim,
                    if temporal { 2 } else { 1 },
                    if down { 2 } else { 1 },
                )?;
                down_blocks.push(DownLayer::ResidualDown {
                    resnets,
                    downsampler,
                    avg_shortcut,
                });
            } else {
                for _ in 0..cfg.num_res_blocks {
                    let p = vb.pp(format!("down_blocks.{}", down_blocks.len()));
                    down_blocks.push(DownLayer::Res(ResidualBlock::load(&p, in_dim, out_dim)?));
                    in_dim = out_dim;
                }
                if down {
                    let p = vb.pp(format!("down_blocks.{}", down_blocks.len()));
                    let mode = down_mode(cfg.temperal_downsample[i]);
                    down_blocks.push(DownLayer::Resample(Resample::load(
                        &p, out_dim, mode, out_dim,
                    )?));
                }
            }
        }
        let out_dim = dims[stages];
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block: MidBlock::load(&vb.pp("mid_block"), out_dim)?,
            norm_out: RmsNorm::load(&vb.pp("norm_out"), out_dim, false)?,
            conv_out: CausalConv3d::load_k(&vb.pp("conv_out"), out_dim, 2 * cfg.z_dim, 3)?,
        })
    }

    /// One chunk `[B, T, C, H, W]` (patchified) -> `[B, t, 2z, h, w]`.
    pub fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let mut x = self.conv_in.forward_cached(x, cache)?;
        for layer in &self.down_blocks {
            x = match layer {
                DownLayer::Res(r) => r.forward(&x, cache)?,
                DownLayer::Resample(r) => r.forward(&x, cache)?,
                DownLayer::ResidualDown {
                    resnets,
                    downsampler,
                    avg_shortcut,
                } => {
                    let shortcut = avg_shortcut.forward(&x)?;
                    let mut y = x;
                    for r in resnets {
                        y = r.forward(&y, cache)?;
                    }
                    if let Some(d) = downsampler {
                        y = d.forward(&y, cache)?;
                    }
                    (y + shortcut)?
                }
            };
        }
        let x = self.mid_block.forward(&x, cache)?;
        let x = self.norm_out.forward_silu(&x, 2)?;
        self.conv_out.forward_cached(&x, cache)
    }
}

/// One entry of the decoder's `up_blocks` (`WanUpBlock` for 2.1, `WanResidualUpBlock` for 2.2).
struct UpBlock {
    resnets: Vec<ResidualBlock>,
    upsampler: Option<Resample>,
    /// Wan2.2 only.
    dup_shortcut: Option<DupUp3D>,
}

pub struct Decoder3d {
    conv_in: CausalConv3d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    /// The first up block after the last temporal upsampler. From there on every layer works on
    /// each frame alone apart from its causal cache, so a chunk's frames can go through in
    /// passes of fewer frames with the same result: the full-resolution levels, which hold most
    /// of the decoder's working memory, then hold fewer frames at once.
    tail_start: usize,
    norm_out: RmsNorm,
    conv_out: CausalConv3d,
}

impl Decoder3d {
    pub fn load(vb: &Vb, cfg: &VaeConfig) -> Result<Self> {
        let dec = cfg.decoder_dim();
        let stages = cfg.dim_mult.len();
        let dims: Vec<usize> = std::iter::once(cfg.dim_mult[stages - 1])
            .chain(cfg.dim_mult.iter().rev().copied())
            .map(|m| m * dec)
            .collect();
        // The decoder mirrors the encoder: temporal upsampling in reverse stage order.
        let temporal_up: Vec<bool> = cfg.temperal_downsample.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let tail_start = (0..stages)
            .rev()
            .find(|&i| i + 1 != stages && temporal_up[i])
            .map_or(0, |i| i + 1);
        for i in 0..stages {
            let (mut in_dim, out_dim) = (dims[i], dims[i + 1]);
            if i > 0 && !cfg.is_residual {
                // Wan2.1 upsamplers halve the channels.
                in_dim /= 2;
            }
            let up = i + 1 != stages;
            let temporal = up && temporal_up[i];
            let mode = if temporal {
                ResampleMode::Upsample3d
            } else {
                ResampleMode::Upsample2d
            };
            let p = vb.pp(format!("up_blocks.{i}"));
            let mut resnets = Vec::new();
            let mut d = in_dim;
            for j in 0..=cfg.num_res_blocks {
                resnets.push(ResidualBlock::load(
                    &p.pp(format!("resnets.{j}")),
                    d,
                    out_dim,
                )?);
                d = out_dim;
            }
            let (upsampler, dup_shortcut) = match (up, cfg.is_residual) {
                (false, _) => (None, None),
                (true, true) => (
                    Some(Resample::load(&p.pp("upsampler"), out_dim, mode, out_dim)?),
                    Some(DupUp3D::new(
                        in_dim,
                        out_dim,
                        if temporal { 2 } else { 1 },
                        2,
                    )?),
                ),
                (true, false) => (
                    Some(Resample::load(
                        &p.pp("upsamplers.0"),
                        out_dim,
                        mode,
                        out_dim / 2,
                    )?),
                    None,
                ),
            };
            up_blocks.push(UpBlock {
                resnets,
                upsampler,
                dup_shortcut,
            });
        }
        let out_dim = dims[stages];
        Ok(Self {
            conv_in: CausalConv3d::load_k(&vb.pp("conv_in"), cfg.z_dim, dims[0], 3)?,
            mid_block: MidBlock::load(&vb.pp("mid_block"), dims[0])?,
            up_blocks,
            tail_start,
            norm_out: RmsNorm::load(&vb.pp("norm_out"), out_dim, false)?,
            conv_out: CausalConv3d::load_k(&vb.pp("conv_out"), out_dim, cfg.out_channels, 3)?,
        })
    }

    /// One latent frame `[B, 1, z, h, w]` -> `[B, f, C_out, H, W]` (f = 1 on the first chunk).
    /// The levels after the last temporal upsampler take at most `pass_frames` of the chunk's
    /// frames at a time (0: all at once, as the reference does); the result does not depend on it.
    pub fn forward(
        &self,
        x: &Tensor,
        cache: &mut FeatCache,
        first_chunk: bool,
        pass_frames: usize,
    ) -> Result<Tensor> {
        let x = self.conv_in.forward_cached(x, cache)?;
        let mut x = self.mid_block.forward(&x, cache)?;
        for block in &self.up_blocks[..self.tail_start] {
            x = block.forward(&x, cache, first_chunk)?;
        }
        let frames = x.dim(1)?;
        if pass_frames == 0 || frames <= pass_frames {
            return self.tail(&x, cache, first_chunk);
        }
        let start = cache.position();
        let mut passes = Vec::with_capacity(frames.div_ceil(pass_frames));
        for t0 in (0..frames).step_by(pass_frames) {
            cache.rewind(start);
            let n = pass_frames.min(frames - t0);
            passes.push(self.tail(&x.narrow(1, t0, n)?, cache, first_chunk)?);
        }
        Ok(Tensor::cat(&passes, 1)?)
    }

    /// The up blocks from `tail_start`, the output norm and the output convolution.
    fn tail(&self, x: &Tensor, cache: &mut FeatCache, first_chunk: bool) -> Result<Tensor> {
        let mut x = x.clone();
        for block in &self.up_blocks[self.tail_start..] {
            x = block.forward(&x, cache, first_chunk)?;
        }
        let x = self.norm_out.forward_silu(&x, 2)?;
        self.conv_out.forward_cached(&x, cache)
    }
}

impl UpBlock {
    fn forward(&self, x: &Tensor, cache: &mut FeatCache, first_chunk: bool) -> Result<Tensor> {
        let shortcut = match &self.dup_shortcut {
            Some(d) => Some(d.forward(x, first_chunk)?),
            None => None,
        };
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x, cache)?;
        }
        if let Some(u) = &self.upsampler {
            x = u.forward(&x, cache)?;
        }
        Ok(match shortcut {
            Some(s) => (x + s)?,
            None => x,
        })
    }
}
