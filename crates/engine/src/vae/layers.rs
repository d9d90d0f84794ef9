//! VAE building blocks, in diffusers' `autoencoder_kl_wan.py` order and naming.
//!
//! Activations use a frame-major layout `[B, T, C, H, W]` (the checkpoint and the API use
//! `[B, C, T, H, W]`): a run of frames then reshapes for free into the batch of a 2-D convolution,
//! which is how the causal 3-D convolution and every per-frame operation are computed.

use std::cell::RefCell;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};

use crate::weights::WeightMap;

/// Frames each causal convolution keeps from the previous chunk (`CACHE_T` in the reference).
pub const CACHE_T: usize = 2;

// ---------------------------------------------------------------------------------------------
// Weights: loaded from a checkpoint, or recorded (the list of expected names and shapes).

/// Hands out placeholder tensors (zero-stride zeros, nothing allocated) instead of loading, and
/// records each name and shape: the list of weights a configuration expects.
#[derive(Default)]
pub struct ShapeRecorder {
    pub(crate) record: RefCell<Vec<(String, Vec<usize>)>>,
}

impl ShapeRecorder {
    fn make(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.record
            .borrow_mut()
            .push((name.to_string(), shape.to_vec()));
        Ok(Tensor::zeros(1, DType::F32, &Device::Cpu)?
            .reshape(vec![1; shape.len()])?
            .broadcast_as(shape)?)
    }
}

#[derive(Clone, Copy)]
enum Source<'a> {
    Map(&'a WeightMap),
    Record(&'a ShapeRecorder),
}

/// A prefixed view on the weights, `vb.pp("decoder").pp("conv_in").get("weight", shape)`.
#[derive(Clone)]
pub struct Vb<'a> {
    source: Source<'a>,
    prefix: String,
}

impl<'a> Vb<'a> {
    pub fn from_map(map: &'a WeightMap) -> Self {
        Self {
            source: Source::Map(map),
            prefix: String::new(),
        }
    }

    pub fn from_recorder(rec: &'a ShapeRecorder) -> Self {
        Self {
            source: Source::Record(rec),
            prefix: String::new(),
        }
    }

    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self {
            source: self.source,
            prefix: self.join(&name.to_string()),
        }
    }

    fn join(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// True when only recording names (tensors are placeholders: do not materialise them).
    pub fn is_recording(&self) -> bool {
        matches!(self.source, Source::Record(_))
    }

    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = self.join(name);
        match self.source {
            Source::Map(m) => m.get(&full, shape),
            Source::Record(r) => r.make(&full, shape),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Causal 3-D convolution.

/// Per-layer feature cache carried between chunks, indexed in call order exactly as the
/// reference's `feat_cache` / `feat_idx`.
#[derive(Default)]
pub struct FeatCache {
    slots: Vec<Slot>,
    idx: usize,
}

pub enum Slot {
    Empty,
    /// `"Rep"`: the temporal upsampler has seen its first chunk (and skipped its time conv).
    Rep,
    Frames(Tensor),
}

impl FeatCache {
    /// Call before each chunk: layers take their slots again from the first.
    pub fn begin_chunk(&mut self) {
        self.idx = 0;
    }

    /// The next slot a layer will take (see [`rewind`](Self::rewind)).
    pub fn position(&self) -> usize {
        self.idx
    }

    /// Makes the layers from slot `position` on take their slots again: the same layers run once
    /// more on the chunk's next frames.
    pub fn rewind(&mut self, position: usize) {
        debug_assert!(position <= self.idx);
        self.idx = position;
    }

    pub fn next_slot(&mut self) -> &mut Slot {
        if self.idx == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        self.idx += 1;
        &mut self.slots[self.idx - 1]
    }

    /// Bytes of cached frames (for memory accounting).
    pub fn bytes(&self) -> usize {
        self.slots
            .iter()
            .map(|s| match s {
                Slot::Frames(t) => t.elem_count() * t.dtype().size_in_bytes(),
                _ => 0,
            })
            .sum()
    }
}

/// Causal 3-D convolution of `x` `[B, T, C, H, W]` with `taps[k]` = `weight[:, :, k]`
/// (`[C_out, C_in, kh, kw]`), computed as a sum over the temporal taps of 2-D convolutions of the
/// frames stacked in the batch — no im2col of the whole clip. `front_pad` zero frames precede the
/// input (2·p_t, causal), reduced by the frames of `cache` (the previous chunk's last inputs) when
/// one is given and padding is used. Zero frames are skipped rather than convolved. `pad_hw` is the
/// symmetric spatial padding; `stride_t` the temporal stride (spatial stride is 1).
pub fn causal_conv3d(
    x: &Tensor,
    taps: &[Tensor],
    bias: Option<&Tensor>,
    front_pad: usize,
    pad_hw: usize,
    stride_t: usize,
    cache: Option<&Tensor>,
) -> Result<Tensor> {
    let (src, zeros) = match cache {
        Some(c) if front_pad > 0 => (
            Tensor::cat(&[c, x], 1)?,
            front_pad.saturating_sub(c.dim(1)?),
        ),
        _ => (x.clone(), front_pad),
    };
    let (b, n, c, h, w) = src.dims5()?;
    let kt = taps.len();
    ensure!(
        zeros + n >= kt,
        "causal conv: {} frames (with padding) are fewer than the kernel's {kt}",
        zeros + n
    );
    let t_out = (zeros + n - kt) / stride_t + 1;
    let mut acc: Option<Tensor> = None;
    // Taps from last to first: the last tap reads the most real frames, so the accumulator starts
    // at full length and shorter taps are zero-padded in front.
    for (k, tap) in taps.iter().enumerate().rev() {
        // Output frame o reads padded frame o·stride + k, i.e. real frame o·stride + k − zeros.
        let first = zeros.saturating_sub(k).div_ceil(stride_t);
        if first >= t_out {
            continue;
        }
        let count = t_out - first;
        let start = first * stride_t + k - zeros;
        let frames = if stride_t == 1 {
            src.narrow(1, start, count)?
        } else {
            let ids: Vec<u32> = (0..count).map(|i| (start + i * stride_t) as u32).collect();
            src.index_select(&Tensor::new(ids, src.device())?, 1)?
        };
        let y = frames
            .reshape((b * count, c, h, w))?
            .conv2d(tap, pad_hw, 1, 1, 1)?;
        let (_, co, ho, wo) = y.dims4()?;
        let y = y.reshape((b, count, co, ho, wo))?;
        let y = if first > 0 {
            y.pad_with_zeros(1, first, 0)?
        } else {
            y
        };
        acc = Some(match acc {
            None => y,
            Some(a) => (a + y)?,
        });
    }
    let out = acc.expect("the last tap always reads real frames");
    match bias {
        Some(bias) => Ok(out.broadcast_add(&bias.reshape((1, 1, (), 1, 1))?)?),
        None => Ok(out),
    }
}

/// `WanCausalConv3d`: weight `[C_out, C_in, kt, kh, kw]` split into its temporal taps at load time
/// (on CUDA: in the GPU path's layout instead, with the weight's shape; see [`super::gpu`]).
pub struct CausalConv3d {
    taps: Vec<Tensor>,
    #[cfg(feature = "cuda")]
    gpu_weight: Option<(Tensor, [usize; 5])>,
    bias: Tensor,
    front_pad: usize,
    pad_hw: usize,
    stride_t: usize,
}

impl CausalConv3d {
    /// `kernel` (kt, ks) with a square spatial kernel; `padding` (p_t, p_hw); temporal stride.
    pub fn load(
        vb: &Vb,
        c_in: usize,
        c_out: usize,
        kernel: (usize, usize),
        padding: (usize, usize),
        stride_t: usize,
    ) -> Result<Self> {
        let (kt, ks) = kernel;
        let weight = vb.get("weight", &[c_out, c_in, kt, ks, ks])?;
        #[cfg(feature = "cuda")]
        if weight.device().is_cuda() {
            return Ok(Self {
                taps: Vec::new(),
                gpu_weight: Some((
                    super::gpu::prepare_weight(&weight)?,
                    [c_out, c_in, kt, ks, ks],
                )),
                bias: vb.get("bias", &[c_out])?,
                front_pad: 2 * padding.0,
                pad_hw: padding.1,
                stride_t,
            });
        }
        let taps = (0..kt)
            .map(|k| {
                let tap = weight.narrow(2, k, 1)?.squeeze(2)?;
                Ok(if vb.is_recording() {
                    tap
                } else {
                    tap.contiguous()?
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            taps,
            #[cfg(feature = "cuda")]
            gpu_weight: None,
            bias: vb.get("bias", &[c_out])?,
            front_pad: 2 * padding.0,
            pad_hw: padding.1,
            stride_t,
        })
    }

    /// The common `kernel k, padding k/2` convolution.
    pub fn load_k(vb: &Vb, c_in: usize, c_out: usize, k: usize) -> Result<Self> {
        Self::load(vb, c_in, c_out, (k, k), (k / 2, k / 2), 1)
    }

    pub fn forward(&self, x: &Tensor, cache: Option<&Tensor>) -> Result<Tensor> {
        self.forward_add(x, cache, None)
    }

    /// The convolution plus `residual` (fused on the GPU).
    fn forward_add(
        &self,
        x: &Tensor,
        cache: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        crate::profile::scope("vae.conv3d", x.device(), || {
            #[cfg(feature = "cuda")]
            if let Some((w, dims)) = &self.gpu_weight {
                return super::gpu::causal_conv3d(
                    x,
                    w,
                    *dims,
                    &self.bias,
                    self.front_pad,
                    self.pad_hw,
                    self.stride_t,
                    cache,
                    residual,
                );
            }
            let y = causal_conv3d(
                x,
                &self.taps,
                Some(&self.bias),
                self.front_pad,
                self.pad_hw,
                self.stride_t,
                cache,
            )?;
            match residual {
                Some(r) => Ok((y + r)?),
                None => Ok(y),
            }
        })
    }

    /// Runs with the layer's cache slot: the previous chunk's last input frames pad the front,
    /// and this chunk's last `CACHE_T` input frames (topped up with the previous chunk's last
    /// frame when the chunk is shorter) replace them.
    pub fn forward_cached(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        self.forward_cached_add(x, cache, None)
    }

    /// [`forward_cached`](Self::forward_cached) plus `residual`.
    pub fn forward_cached_add(
        &self,
        x: &Tensor,
        cache: &mut FeatCache,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let slot = cache.next_slot();
        let prev = match slot {
            Slot::Frames(t) => Some(t.clone()),
            _ => None,
        };
        let keep = last_frames(x, prev.as_ref(), false)?;
        let y = self.forward_add(x, prev.as_ref(), residual)?;
        *slot = Slot::Frames(keep);
        Ok(y)
    }
}

/// The last `CACHE_T` frames of `x`, copied (a view would keep the whole chunk alive); a
/// one-frame chunk is topped up with `prev`'s last frame, or with zeros when `zeros_if_short`.
fn last_frames(x: &Tensor, prev: Option<&Tensor>, zeros_if_short: bool) -> Result<Tensor> {
    let t = x.dim(1)?;
    let n = t.min(CACHE_T);
    let tail = x.narrow(1, t - n, n)?;
    let tail = if n < CACHE_T {
        match prev {
            Some(p) => Tensor::cat(&[&p.narrow(1, p.dim(1)? - 1, 1)?, &tail], 1)?,
            None if zeros_if_short => Tensor::cat(&[&tail.zeros_like()?, &tail], 1)?,
            None => tail,
        }
    } else {
        tail
    };
    Ok(tail.copy()?)
}

// ---------------------------------------------------------------------------------------------
// Per-frame layers.

/// Applies a 4-D (`[N, C, H, W]`) function to every frame of `[B, T, C, H, W]`.
fn per_frame(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let (b, t, c, h, w) = x.dims5()?;
    let y = f(&x.reshape((b * t, c, h, w))?)?;
    let (_, c2, h2, w2) = y.dims4()?;
    Ok(y.reshape((b, t, c2, h2, w2))?)
}

/// `nn.Conv2d` with a square kernel.
pub struct Conv2d {
    weight: Tensor,
    /// On CUDA: the weight in the GPU path's layout, and its `[C_out, C_in, k, k]`.
    #[cfg(feature = "cuda")]
    gpu_weight: Option<(Tensor, [usize; 4])>,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn load(
        vb: &Vb,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get("weight", &[c_out, c_in, k, k])?;
        Ok(Self {
            #[cfg(feature = "cuda")]
            gpu_weight: weight
                .device()
                .is_cuda()
                .then(|| -> Result<_> {
                    Ok((super::gpu::prepare_weight(&weight)?, [c_out, c_in, k, k]))
                })
                .transpose()?,
            weight,
            bias: vb.get("bias", &[c_out])?,
            stride,
            padding,
        })
    }

    /// [`forward`](Self::forward) of the nearest ×2 upsample of `x` (a CUDA tensor), without
    /// materialising the upsampled frames where the GPU path can avoid it.
    #[cfg(feature = "cuda")]
    pub fn forward_upsampled2x(&self, x: &Tensor) -> Result<Tensor> {
        let Some((w, dims)) = &self.gpu_weight else {
            return self.forward(&super::gpu::upsample2x(x)?);
        };
        crate::profile::scope("vae.conv2d", x.device(), || {
            super::gpu::upsample2x_conv2d(x, w, *dims, &self.bias, self.padding, self.stride)
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::profile::scope("vae.conv2d", x.device(), || {
            #[cfg(feature = "cuda")]
            if let Some((w, dims)) = &self.gpu_weight {
                return super::gpu::conv2d(x, w, *dims, &self.bias, self.padding, self.stride);
            }
            let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
            Ok(y.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?)
        })
    }
}

/// `WanRMS_norm`: L2-normalise over channels (`F.normalize`, eps 1e-12), times √C · gamma.
/// Half-precision inputs normalise in f32, as the reference does.
pub struct RmsNorm {
    /// gamma · √C, flattened to `[C]`.
    scale: Tensor,
    /// On CUDA: gamma in f32, `[C]` (the fused kernel applies √C and gamma in the reference's order).
    #[cfg(feature = "cuda")]
    gamma: Option<Tensor>,
}

impl RmsNorm {
    /// `images`: gamma is `[C, 1, 1]` (attention) rather than `[C, 1, 1, 1]`.
    pub fn load(vb: &Vb, dim: usize, images: bool) -> Result<Self> {
        let shape: &[usize] = if images {
            &[dim, 1, 1]
        } else {
            &[dim, 1, 1, 1]
        };
        let gamma = vb.get("gamma", shape)?.flatten_all()?;
        Ok(Self {
            #[cfg(feature = "cuda")]
            gamma: gamma
                .device()
                .is_cuda()
                .then(|| gamma.to_dtype(DType::F32))
                .transpose()?,
            scale: (gamma * (dim as f64).sqrt())?,
        })
    }

    /// Normalises over `dim` (the channel axis).
    pub fn forward(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        crate::profile::scope("vae.rms_norm", x.device(), || {
            #[cfg(feature = "cuda")]
            if let Some(gamma) = &self.gamma {
                return super::gpu::rms_norm(x, gamma, dim, false);
            }
            self.forward_inner(x, dim)
        })
    }

    /// `silu(norm(x))` (one fused pass on the GPU).
    pub fn forward_silu(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(gamma) = &self.gamma {
            return crate::profile::scope("vae.rms_norm", x.device(), || {
                super::gpu::rms_norm(x, gamma, dim, true)
            });
        }
        silu(&self.forward(x, dim)?)
    }

    fn forward_inner(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = if dtype == DType::F32 {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        let norm = xf.sqr()?.sum_keepdim(dim)?.sqrt()?.maximum(1e-12)?;
        let normalized = xf.broadcast_div(&norm)?.to_dtype(dtype)?;
        let mut shape = vec![1; x.rank()];
        shape[dim] = self.scale.elem_count();
        Ok(normalized.broadcast_mul(&self.scale.reshape(shape)?)?)
    }
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    crate::profile::scope("vae.silu", x.device(), || Ok(candle_nn::ops::silu(x)?))
}

/// `WanResidualBlock`: norm, SiLU, conv, norm, SiLU, (dropout), conv, plus a 1x1x1 shortcut when
/// the channel count changes.
pub struct ResidualBlock {
    norm1: RmsNorm,
    conv1: CausalConv3d,
    norm2: RmsNorm,
    conv2: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    pub fn load(vb: &Vb, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            norm1: RmsNorm::load(&vb.pp("norm1"), in_dim, false)?,
            conv1: CausalConv3d::load_k(&vb.pp("conv1"), in_dim, out_dim, 3)?,
            norm2: RmsNorm::load(&vb.pp("norm2"), out_dim, false)?,
            conv2: CausalConv3d::load_k(&vb.pp("conv2"), out_dim, out_dim, 3)?,
            shortcut: if in_dim != out_dim {
                Some(CausalConv3d::load_k(
                    &vb.pp("conv_shortcut"),
                    in_dim,
                    out_dim,
                    1,
                )?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let h = match &self.shortcut {
            Some(s) => s.forward(x, None)?,
            None => x.clone(),
        };
        let y = self.norm1.forward_silu(x, 2)?;
        let y = self.conv1.forward_cached(&y, cache)?;
        let y = self.norm2.forward_silu(&y, 2)?;
        self.conv2.forward_cached_add(&y, cache, Some(&h))
    }
}

/// `WanAttentionBlock`: single-head self-attention over the pixels of each frame.
pub struct AttentionBlock {
    norm: RmsNorm,
    qkv_w: Tensor,
    qkv_b: Tensor,
    proj_w: Tensor,
    proj_b: Tensor,
}

/// Largest attention-score block materialised at once (rows × keys); bounds memory for large
/// frames without changing the result (softmax is per row).
const ATTN_BLOCK_ELEMS: usize = 1 << 24;

impl AttentionBlock {
    pub fn load(vb: &Vb, dim: usize) -> Result<Self> {
        let qkv = vb.pp("to_qkv");
        let proj = vb.pp("proj");
        Ok(Self {
            norm: RmsNorm::load(&vb.pp("norm"), dim, true)?,
            qkv_w: qkv
                .get("weight", &[3 * dim, dim, 1, 1])?
                .reshape((3 * dim, dim))?,
            qkv_b: qkv.get("bias", &[3 * dim])?.reshape((3 * dim, 1))?,
            proj_w: proj.get("weight", &[dim, dim, 1, 1])?.reshape((dim, dim))?,
            proj_b: proj.get("bias", &[dim])?.reshape((dim, 1))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::profile::scope("vae.attention", x.device(), || self.forward_inner(x))
    }

    fn forward_inner(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c, h, w) = x.dims5()?;
        let hw = h * w;
        let xs = self.norm.forward(&x.reshape((b * t, c, hw))?, 1)?;
        let qkv = self
            .qkv_w
            .broadcast_matmul(&xs)?
            .broadcast_add(&self.qkv_b)?; // [bt, 3c, hw]
        let qkv = qkv.to_dtype(DType::F32)?;
        let scale = 1.0 / (c as f64).sqrt();
        let rows = (ATTN_BLOCK_ELEMS / hw).clamp(1, hw);
        let mut frames = Vec::with_capacity(b * t);
        for f in 0..b * t {
            let qkv = qkv.get(f)?;
            let q = (qkv.narrow(0, 0, c)?.t()? * scale)?.contiguous()?; // [hw, c]
            let k = qkv.narrow(0, c, c)?.contiguous()?; // [c, hw]
            let v = qkv.narrow(0, 2 * c, c)?.t()?.contiguous()?; // [hw, c]
            let mut parts = Vec::new();
            for r0 in (0..hw).step_by(rows) {
                let qb = q.narrow(0, r0, rows.min(hw - r0))?;
                let p = candle_nn::ops::softmax_last_dim(&qb.matmul(&k)?)?;
                parts.push(p.matmul(&v)?);
            }
            frames.push(Tensor::cat(&parts, 0)?.t()?); // [c, hw]
        }
        let o = Tensor::stack(&frames, 0)?.to_dtype(x.dtype())?;
        let o = self
            .proj_w
            .broadcast_matmul(&o)?
            .broadcast_add(&self.proj_b)?;
        Ok((o.reshape((b, t, c, h, w))? + x)?)
    }
}

/// `WanMidBlock` with one attention layer: res, attention, res.
pub struct MidBlock {
    res0: ResidualBlock,
    attn: AttentionBlock,
    res1: ResidualBlock,
}

impl MidBlock {
    pub fn load(vb: &Vb, dim: usize) -> Result<Self> {
        Ok(Self {
            res0: ResidualBlock::load(&vb.pp("resnets.0"), dim, dim)?,
            attn: AttentionBlock::load(&vb.pp("attentions.0"), dim)?,
            res1: ResidualBlock::load(&vb.pp("resnets.1"), dim, dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let x = self.res0.forward(x, cache)?;
        let x = self.attn.forward(&x)?;
        self.res1.forward(&x, cache)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleMode {
    Upsample2d,
    Upsample3d,
    Downsample2d,
    Downsample3d,
}

/// `WanResample`: spatial ×2 up (nearest, 3x3 conv) or down (pad right/bottom, 3x3 stride-2 conv),
/// with a causal temporal conv for the 3-D modes (before the spatial step when upsampling, after
/// it when downsampling).
pub struct Resample {
    mode: ResampleMode,
    conv: Conv2d,
    time_conv: Option<CausalConv3d>,
}

impl Resample {
    /// `upsample_out_dim`: the spatial conv's output channels when upsampling (Wan2.1: dim/2).
    pub fn load(vb: &Vb, dim: usize, mode: ResampleMode, upsample_out_dim: usize) -> Result<Self> {
        let conv_vb = vb.pp("resample.1");
        let tvb = vb.pp("time_conv");
        let (conv, time_conv) = match mode {
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => (
                Conv2d::load(&conv_vb, dim, upsample_out_dim, 3, 1, 1)?,
                (mode == ResampleMode::Upsample3d)
                    .then(|| CausalConv3d::load(&tvb, dim, 2 * dim, (3, 1), (1, 0), 1))
                    .transpose()?,
            ),
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => (
                Conv2d::load(&conv_vb, dim, dim, 3, 2, 0)?,
                (mode == ResampleMode::Downsample3d)
                    .then(|| CausalConv3d::load(&tvb, dim, dim, (3, 1), (0, 0), 2))
                    .transpose()?,
            ),
        };
        Ok(Self {
            mode,
            conv,
            time_conv,
        })
    }

    pub fn forward(&self, x: &Tensor, cache: &mut FeatCache) -> Result<Tensor> {
        let mut x = x.clone();
        if let (ResampleMode::Upsample3d, Some(tc)) = (self.mode, &self.time_conv) {
            let slot = cache.next_slot();
            match slot {
                // First chunk: no temporal doubling (one latent frame gives one frame).
                Slot::Empty => *slot = Slot::Rep,
                Slot::Rep => {
                    let keep = last_frames(&x, None, true)?;
                    x = double_frames(&tc.forward(&x, None)?)?;
                    *slot = Slot::Frames(keep);
                }
                Slot::Frames(prev) => {
                    let prev = prev.clone();
                    let keep = last_frames(&x, Some(&prev), false)?;
                    x = double_frames(&tc.forward(&x, Some(&prev))?)?;
                    *slot = Slot::Frames(keep);
                }
            }
        }
        let x = crate::profile::scope("vae.resample_spatial", x.device(), || {
            per_frame(&x, |f| match self.mode {
                ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                    let (_, _, h, w) = f.dims4()?;
                    // nearest-exact at an integer factor 2 is plain pixel duplication
                    #[cfg(feature = "cuda")]
                    if f.device().is_cuda() {
                        return self.conv.forward_upsampled2x(f);
                    }
                    self.conv.forward(&f.upsample_nearest2d(2 * h, 2 * w)?)
                }
                _ => self
                    .conv
                    .forward(&f.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?),
            })
        })?;
        if let (ResampleMode::Downsample3d, Some(tc)) = (self.mode, &self.time_conv) {
            let slot = cache.next_slot();
            return Ok(match slot {
                // First chunk: keep it for the next chunk; no temporal step.
                Slot::Empty | Slot::Rep => {
                    *slot = Slot::Frames(x.copy()?);
                    x
                }
                Slot::Frames(prev) => {
                    let t = x.dim(1)?;
                    let keep = x.narrow(1, t - 1, 1)?.copy()?;
                    let y = tc.forward(
                        &Tensor::cat(&[&prev.narrow(1, prev.dim(1)? - 1, 1)?, &x], 1)?,
                        None,
                    )?;
                    *slot = Slot::Frames(keep);
                    y
                }
            });
        }
        Ok(x)
    }
}

/// The temporal upsampler's `[B, T, 2C, H, W]` output as `[B, 2T, C, H, W]`: channel group i of
/// frame t becomes frame 2t + i (a free reshape in frame-major layout).
fn double_frames(x: &Tensor) -> Result<Tensor> {
    let (b, t, c2, h, w) = x.dims5()?;
    Ok(x.reshape((b, 2 * t, c2 / 2, h, w))?)
}

/// `AvgDown3D` (Wan2.2 encoder shortcut): pad time in front to a multiple of `factor_t`, fold
/// time/space blocks into channels, and average channel groups down to `out_channels`.
pub struct AvgDown3D {
    out_channels: usize,
    factor_t: usize,
    factor_s: usize,
    group: usize,
}

impl AvgDown3D {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        factor_t: usize,
        factor_s: usize,
    ) -> Result<Self> {
        let factor = factor_t * factor_s * factor_s;
        ensure!(
            (in_channels * factor).is_multiple_of(out_channels),
            "AvgDown3D: {in_channels} channels x {factor} is not divisible by {out_channels}"
        );
        Ok(Self {
            out_channels,
            factor_t,
            factor_s,
            group: in_channels * factor / out_channels,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ft, fs) = (self.factor_t, self.factor_s);
        let t = x.dim(1)?;
        let x = x.pad_with_zeros(1, (ft - t % ft) % ft, 0)?;
        let (b, t, c, h, w) = x.dims5()?;
        let (t2, h2, w2) = (t / ft, h / fs, w / fs);
        let x = x
            .reshape(vec![b, t2, ft, c, h2, fs, w2, fs])?
            .permute(vec![0, 1, 3, 2, 5, 7, 4, 6])? // b, t', c, ft, fs_h, fs_w, h', w'
            .reshape(vec![b, t2, self.out_channels, self.group, h2, w2])?;
        Ok(x.mean(3)?)
    }
}

/// `DupUp3D` (Wan2.2 decoder shortcut): repeat channels and unfold them into time/space blocks;
/// on the first chunk the first `factor_t − 1` frames are dropped.
pub struct DupUp3D {
    out_channels: usize,
    factor_t: usize,
    factor_s: usize,
    repeats: usize,
}

impl DupUp3D {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        factor_t: usize,
        factor_s: usize,
    ) -> Result<Self> {
        let factor = factor_t * factor_s * factor_s;
        ensure!(
            (out_channels * factor).is_multiple_of(in_channels),
            "DupUp3D: {out_channels} channels x {factor} is not divisible by {in_channels}"
        );
        Ok(Self {
            out_channels,
            factor_t,
            factor_s,
            repeats: out_channels * factor / in_channels,
        })
    }

    pub fn forward(&self, x: &Tensor, first_chunk: bool) -> Result<Tensor> {
        let (ft, fs) = (self.factor_t, self.factor_s);
        let (b, t, c, h, w) = x.dims5()?;
        let x = x
            .reshape((b, t, c, 1, h, w))?
            .broadcast_as((b, t, c, self.repeats, h, w))?
            .reshape(vec![b, t, self.out_channels, ft, fs, fs, h, w])?
            .permute(vec![0, 1, 3, 2, 6, 4, 7, 5])? // b, t, ft, out, h, fs_h, w, fs_w
            .reshape((b, t * ft, self.out_channels, h * fs, w * fs))?;
        if first_chunk && ft > 1 {
            Ok(x.narrow(1, ft - 1, t * ft - (ft - 1))?)
        } else {
            Ok(x)
        }
    }
}

/// `[B, T, C, H, W]` -> `[B, T, C·p², H/p, W/p]`, channel order (c, w-offset, h-offset) as diffusers.
pub fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (b, t, c, h, w) = x.dims5()?;
    Ok(x.reshape(vec![b, t, c, h / p, p, w / p, p])?
        .permute(vec![0, 1, 2, 6, 4, 3, 5])? // b, t, c, r(w), q(h), h', w'
        .reshape((b, t, c * p * p, h / p, w / p))?)
}

/// Inverse of [`patchify`].
pub fn unpatchify(x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (b, t, cp, h, w) = x.dims5()?;
    let c = cp / (p * p);
    Ok(
        x.reshape(vec![b, t, c, p, p, h, w])? // b, t, c, r(w), q(h), h, w
            .permute(vec![0, 1, 2, 5, 4, 6, 3])?
            .reshape((b, t, c, h * p, w * p))?,
    )
}
