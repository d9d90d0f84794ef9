//! CUDA paths of the VAE layers (used when the activations live on a CUDA device).
//!
//! - Convolutions call cuDNN directly, in one of two layouts ([`ConvLayout`]):
//!   - f32 (default: fold): in the frame-major layout `[B, T, C, H, W]` the `kt` input frames of
//!     output frame `t` are one run of memory, so the view `[T_out, kt·C, H, W]` (frame stride
//!     `stride_t·C·H·W`) convolved with the weight folded to `[C_out, kt·C_in, kh, kw]` is exactly
//!     the 3-D convolution, accumulated once, with no copy of the input. cuDNN rejects
//!     overlapping image strides, so the output frames go in `kt` launches of disjoint windows.
//!   - bf16/f16 (default: channels-last): the frames (with the causal padding and cache frames)
//!     are copied NDHWC into one buffer, convolved by one true 3-D convolution, and copied back
//!     with the bias (and residual) added; cuDNN's NCHW half-precision kernels are much slower.
//! - Plans (descriptors, algorithm, workspace size) are made once per shape and cached per thread;
//!   one workspace buffer grows as needed and is never cleared. f32 tensors use exact FMA math (no
//!   TF32), bf16/f16 the tensor cores with f32 accumulation.
//! - RMS norm (+ SiLU), bias (+ residual) and the nearest ×2 upsample are kernels of
//!   `kernels/vae_ops.cu` that round where diffusers' modules round.
//!
//! Tuning knobs (environment, read once): `VIDGEN_VAE_CONV=fold|nhwc` (see [`ConvLayout`]),
//! `VIDGEN_VAE_CONV_ALGO=heuristic|find` (cuDNN's heuristic order, or
//! timing every algorithm once per shape), `VIDGEN_VAE_WORKSPACE_MB` (largest workspace, default
//! 512), `VIDGEN_VAE_CONV_LOG=1` (one line per new plan on stderr).

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, OnceLock};

use anyhow::{bail, ensure, Context, Result};
use candle_core::cuda::cudarc::cudnn::{result as cudnn, sys};
use candle_core::cuda::cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};
use candle_core::{CudaDevice, DType, Tensor};

use crate::cuda_util::{address, alloc, cuda_device, launched, suffix, CudnnHandle};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/vae_ops.ptx"));
const MODULE: &str = "vidgen_vae_ops";
const THREADS: u32 = 256;

// ---------------------------------------------------------------------------------------------
// Tensors <-> raw device memory.

fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as usize).clamp(1, 1 << 20) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

// ---------------------------------------------------------------------------------------------
// Kernels of kernels/vae_ops.cu.

/// `WanRMS_norm` over axis `dim` of `x` (`[.., C, ..]`), optionally followed by SiLU. `gamma`: f32 `[C]`.
pub fn rms_norm(x: &Tensor, gamma: &Tensor, dim: usize, silu: bool) -> Result<Tensor> {
    let x = x.contiguous()?;
    let dims = x.dims();
    let c = dims[dim];
    let n: usize = dims[..dim].iter().product();
    let s: usize = dims[dim + 1..].iter().product();
    ensure!(
        gamma.elem_count() == c,
        "rms norm: {} gains for {c} channels",
        gamma.elem_count()
    );
    ensure!(n < 65536, "rms norm: {n} rows exceed the launch grid");
    let dev = cuda_device(&x)?;
    let (out, py) = alloc(&dev, x.dtype(), dims)?;
    let (px, pg) = (address(&x)?, address(gamma)?);
    let name = format!(
        "vae_rms_norm{}_{}",
        if silu { "_silu" } else { "" },
        suffix(x.dtype())?
    );
    let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
    let (scale, ci, si) = ((c as f32).sqrt(), c as i32, s as i64);
    let mut b = func.builder();
    b.arg(&px).arg(&py).arg(&pg).arg(&scale).arg(&ci).arg(&si);
    // RMS_PIX pixels x RMS_SLICES channel slices per block (kernels/vae_ops.cu).
    let cfg = LaunchConfig {
        grid_dim: (s.div_ceil(32) as u32, n as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match the kernel's signature in kernels/vae_ops.cu.
    launched(unsafe { b.launch(cfg) }.map(|_| ()))?;
    Ok(out)
}

/// Checks a per-channel bias (as f32) and a residual (as `dtype`, contiguous) against `c` channels and
/// `elems` output elements.
fn bias_and_residual(
    bias: Option<&Tensor>,
    c: usize,
    residual: Option<&Tensor>,
    elems: usize,
    dtype: DType,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let bias = bias
        .map(|b| -> Result<Tensor> {
            ensure!(
                b.elem_count() == c,
                "bias: {} values for {c} channels",
                b.elem_count()
            );
            Ok(b.to_dtype(DType::F32)?.contiguous()?)
        })
        .transpose()?;
    let residual = residual
        .map(|r| -> Result<Tensor> {
            ensure!(
                r.elem_count() == elems,
                "residual {:?} does not have {elems} elements",
                r.dims()
            );
            Ok(r.to_dtype(dtype)?.contiguous()?)
        })
        .transpose()?;
    Ok((bias, residual))
}

/// In place on `y` `[N, C, ...]` (contiguous, owned by the caller): `y + bias[c]`, then `+ residual`.
fn bias_add(y: &Tensor, bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<()> {
    ensure!(y.is_contiguous(), "bias add: output is not contiguous");
    let c = y.dim(1)?;
    let s: usize = y.dims()[2..].iter().product();
    let (bias, residual) = bias_and_residual(bias, c, residual, y.elem_count(), y.dtype())?;
    let dev = cuda_device(y)?;
    let py = address(y)?;
    let pb = bias.as_ref().map(address).transpose()?.unwrap_or(0);
    let pr = residual.as_ref().map(address).transpose()?.unwrap_or(0);
    let func =
        dev.get_or_load_custom_func(&format!("vae_bias_add_{}", suffix(y.dtype())?), MODULE, PTX)?;
    let (ci, si, n) = (c as i32, s as i64, y.elem_count() as i64);
    let mut b = func.builder();
    b.arg(&py).arg(&pr).arg(&pb).arg(&ci).arg(&si).arg(&n);
    // SAFETY: as above; in place is safe: each element is read then written by one thread.
    launched(unsafe { b.launch(elementwise(y.elem_count())) }.map(|_| ()))
}

/// Nearest ×2 upsample of `[N, C, H, W]`.
pub fn upsample2x(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (n, c, h, w) = x.dims4()?;
    let dev = cuda_device(&x)?;
    let (out, py) = alloc(&dev, x.dtype(), &[n, c, 2 * h, 2 * w])?;
    let px = address(&x)?;
    let func = dev.get_or_load_custom_func(
        &format!("vae_upsample2x_{}", suffix(x.dtype())?),
        MODULE,
        PTX,
    )?;
    let (planes, hi, wi) = ((n * c) as i64, h as i32, w as i32);
    let mut b = func.builder();
    b.arg(&px).arg(&py).arg(&planes).arg(&hi).arg(&wi);
    // SAFETY: as above.
    launched(unsafe { b.launch(elementwise(x.elem_count())) }.map(|_| ()))?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// cuDNN convolution.

#[derive(Clone, Copy, PartialEq, Eq)]
enum AlgoChoice {
    Heuristic,
    Find,
}

/// How the convolutions are laid out for cuDNN.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConvLayout {
    /// Frame-major NCHW as stored; the causal 3-D convolution as a 2-D one on folded frames.
    Fold,
    /// Channels-last copies (NDHWC): one true 3-D convolution; the output copied back with the bias.
    ChannelsLast,
}

struct Knobs {
    /// Forced by `VIDGEN_VAE_CONV=fold|nhwc`; by default f32 folds (exact FMA kernels) and half
    /// types go channels-last (cuDNN's fast tensor-core kernels).
    layout: Option<ConvLayout>,
    algo: AlgoChoice,
    workspace_limit: usize,
    log: bool,
    /// [`upsample2x_conv2d`] writes the ×2 frames straight into the convolution's input copy
    /// (the default: `tools/gpu/parity.py` on the H100 gave the two-step path's errors against
    /// the reference, and the Wan2.2 tiled decode ran 3% faster); `VIDGEN_VAE_UPSAMPLE=separate`
    /// upsamples first, then convolves.
    fused_upsample: bool,
}

fn knobs() -> &'static Knobs {
    static KNOBS: OnceLock<Knobs> = OnceLock::new();
    KNOBS.get_or_init(|| {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Knobs {
            layout: match var("VIDGEN_VAE_CONV").as_str() {
                "fold" => Some(ConvLayout::Fold),
                "nhwc" => Some(ConvLayout::ChannelsLast),
                _ => None,
            },
            algo: if var("VIDGEN_VAE_CONV_ALGO") == "find" {
                AlgoChoice::Find
            } else {
                AlgoChoice::Heuristic
            },
            workspace_limit: var("VIDGEN_VAE_WORKSPACE_MB")
                .parse::<usize>()
                .unwrap_or(512)
                << 20,
            log: var("VIDGEN_VAE_CONV_LOG") == "1",
            fused_upsample: var("VIDGEN_VAE_UPSAMPLE") != "separate",
        }
    })
}

/// The layout of the convolutions on `dtype` tensors.
pub fn conv_layout(dtype: DType) -> ConvLayout {
    knobs().layout.unwrap_or(if dtype == DType::F32 {
        ConvLayout::Fold
    } else {
        ConvLayout::ChannelsLast
    })
}

fn cudnn_dtype(dtype: DType) -> Result<sys::cudnnDataType_t> {
    Ok(match dtype {
        DType::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        other => bail!("VAE convolution: dtype {other:?} is not f32, bf16 or f16"),
    })
}

fn i32s<const N: usize>(v: [usize; N]) -> Result<[i32; N]> {
    let mut out = [0i32; N];
    for (o, x) in out.iter_mut().zip(v) {
        *o = i32::try_from(x)
            .context("VAE convolution: tensor too large for cuDNN's 32-bit sizes")?;
    }
    Ok(out)
}

/// One convolution's shapes: x, filter and y in cuDNN's N, C, (D,) H, W order with element
/// strides; `rank` 4 (2-D) or 5 (3-D, the last entries unused for 2-D).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct ConvKey {
    dtype: DType,
    rank: usize,
    /// Filter memory is `[K, (D,) H, W, C]` (channels-last) rather than `[K, C, (D,) H, W]`.
    nhwc_filter: bool,
    x_dims: [i32; 5],
    x_strides: [i32; 5],
    w_dims: [i32; 5],
    pads: [i32; 3],
    strides: [i32; 3],
    y_dims: [i32; 5],
    y_strides: [i32; 5],
}

/// Descriptors and the chosen algorithm for one convolution shape.
struct ConvPlan {
    x: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    algo: Option<(sys::cudnnConvolutionFwdAlgo_t, usize)>,
}

impl Drop for ConvPlan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by `ConvPlan::new` and is destroyed once, here.
        unsafe {
            let _ = cudnn::destroy_tensor_descriptor(self.x);
            let _ = cudnn::destroy_filter_descriptor(self.w);
            let _ = cudnn::destroy_convolution_descriptor(self.conv);
            let _ = cudnn::destroy_tensor_descriptor(self.y);
        }
    }
}

impl ConvPlan {
    fn new(key: &ConvKey) -> Result<Self> {
        let dt = cudnn_dtype(key.dtype)?;
        let plan = Self {
            x: cudnn::create_tensor_descriptor()?,
            w: cudnn::create_filter_descriptor()?,
            conv: cudnn::create_convolution_descriptor()?,
            y: cudnn::create_tensor_descriptor()?,
            algo: None,
        };
        let r = key.rank;
        let sp = r - 2;
        // Exact FP32 for f32 (no TF32); tensor cores with f32 accumulation for half types.
        let math = if key.dtype == DType::F32 {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        };
        let format = if key.nhwc_filter {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
        } else {
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
        };
        let dilation = [1i32; 3];
        // SAFETY: the descriptors were just created; the arrays outlive the calls.
        unsafe {
            cudnn::set_tensornd_descriptor(
                plan.x,
                dt,
                r as i32,
                key.x_dims.as_ptr(),
                key.x_strides.as_ptr(),
            )?;
            cudnn::set_filternd_descriptor(plan.w, dt, format, r as i32, key.w_dims.as_ptr())?;
            cudnn::set_convolutionnd_descriptor(
                plan.conv,
                sp as i32,
                key.pads.as_ptr(),
                key.strides.as_ptr(),
                dilation.as_ptr(),
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )?;
            cudnn::set_convolution_math_type(plan.conv, math)?;
            cudnn::set_tensornd_descriptor(
                plan.y,
                dt,
                r as i32,
                key.y_dims.as_ptr(),
                key.y_strides.as_ptr(),
            )?;
        }
        Ok(plan)
    }
}

/// Per-thread cuDNN state for one stream: plans by shape (dropped before the handle), the handle
/// and its workspace.
struct CudnnState {
    plans: HashMap<ConvKey, ConvPlan>,
    cudnn: CudnnHandle,
}

impl CudnnState {
    fn new(stream: &Arc<CudaStream>) -> Result<Self> {
        Ok(Self {
            plans: HashMap::new(),
            cudnn: CudnnHandle::new(stream)?,
        })
    }
}

thread_local! {
    static CUDNN: RefCell<HashMap<usize, CudnnState>> = RefCell::new(HashMap::new());
}

/// The algorithm for `plan`: cuDNN's heuristic ranking (or measured times), first one that works
/// within the workspace limit with the math type asked for (FMA only, for f32).
fn choose_algo(
    state: &mut CudnnState,
    stream: &Arc<CudaStream>,
    plan: &ConvPlan,
    key: &ConvKey,
    ptrs: (u64, u64, u64),
) -> Result<(sys::cudnnConvolutionFwdAlgo_t, usize)> {
    const MAX: usize = 16;
    let knobs = knobs();
    let mut found = 0i32;
    // SAFETY: zeroed perf structs are plain data that cuDNN overwrites.
    let mut perf: [sys::cudnnConvolutionFwdAlgoPerf_t; MAX] = unsafe { std::mem::zeroed() };
    match knobs.algo {
        AlgoChoice::Heuristic => unsafe {
            // SAFETY: live handle and descriptors; `perf` holds MAX entries.
            sys::cudnnGetConvolutionForwardAlgorithm_v7(
                state.cudnn.handle,
                plan.x,
                plan.w,
                plan.conv,
                plan.y,
                MAX as i32,
                &mut found,
                perf.as_mut_ptr(),
            )
            .result()?;
        },
        AlgoChoice::Find => {
            let ws = state.cudnn.workspace(stream, knobs.workspace_limit)?;
            let (px, pw, py) = ptrs;
            // SAFETY: as above; the pointers are the live x, w and (scratch) y of this call.
            unsafe {
                sys::cudnnFindConvolutionForwardAlgorithmEx(
                    state.cudnn.handle,
                    plan.x,
                    px as *const c_void,
                    plan.w,
                    pw as *const c_void,
                    plan.conv,
                    plan.y,
                    py as *mut c_void,
                    MAX as i32,
                    &mut found,
                    perf.as_mut_ptr(),
                    ws as *mut c_void,
                    knobs.workspace_limit,
                )
                .result()?;
            }
        }
    }
    let exact = key.dtype == DType::F32;
    let pick = perf[..found as usize].iter().find(|p| {
        p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
            && p.memory <= knobs.workspace_limit
            && (!exact || p.mathType == sys::cudnnMathType_t::CUDNN_FMA_MATH)
    });
    let Some(p) = pick else {
        bail!("VAE convolution: cuDNN offers no algorithm for {key:?} within the workspace limit");
    };
    // The math type the algorithm was ranked with (tensor-op variants for half types).
    // SAFETY: live descriptor.
    unsafe { cudnn::set_convolution_math_type(plan.conv, p.mathType) }?;
    // The ranking's memory is an estimate for some algorithms: ask for the exact size.
    // SAFETY: live handle and descriptors.
    let bytes = unsafe {
        cudnn::get_convolution_forward_workspace_size(
            state.cudnn.handle,
            plan.x,
            plan.w,
            plan.conv,
            plan.y,
            p.algo,
        )
    }?;
    if knobs.log {
        eprintln!(
            "vae conv plan {key:?}: {:?} {:?} workspace {} MiB{}",
            p.algo,
            p.mathType,
            bytes >> 20,
            if knobs.algo == AlgoChoice::Find {
                format!(" {:.3} ms", p.time)
            } else {
                String::new()
            }
        );
    }
    Ok((p.algo, bytes))
}

/// Runs the convolution `key` on x at `px`, the filter `w` (its memory as the key says) and y at
/// `py` (allocated by the caller to hold the key's y view).
fn conv_raw(dev: &CudaDevice, key: &ConvKey, px: u64, w: &Tensor, py: u64) -> Result<()> {
    ensure!(
        w.is_contiguous(),
        "VAE convolution: filter is not contiguous"
    );
    ensure!(
        w.elem_count() == key.w_dims[..key.rank].iter().product::<i32>() as usize,
        "VAE convolution: filter {:?} does not match {:?}",
        w.dims(),
        key.w_dims
    );
    let stream = dev.cuda_stream();
    let pw = address(w)?;
    CUDNN.with(|states| -> Result<()> {
        let mut states = states.borrow_mut();
        let id = stream.cu_stream() as usize;
        let state = match states.entry(id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(CudnnState::new(&stream)?),
        };
        if !state.plans.contains_key(key) {
            let mut plan = ConvPlan::new(key)?;
            plan.algo = Some(choose_algo(state, &stream, &plan, key, (px, pw, py))?);
            state.plans.insert(*key, plan);
        }
        let (algo, bytes) = state.plans[key].algo.expect("chosen with the plan");
        let ws = state.cudnn.workspace(&stream, bytes)?;
        let plan = &state.plans[key];
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: descriptors match the memory: the caller's views lie inside x's and y's storage,
        // the filter's size was checked, and the workspace holds at least `bytes`. All on
        // candle's stream.
        unsafe {
            cudnn::convolution_forward(
                state.cudnn.handle,
                &alpha as *const f32 as *const c_void,
                plan.x,
                px as *const c_void,
                plan.w,
                pw as *const c_void,
                plan.conv,
                algo,
                ws as *mut c_void,
                bytes,
                &beta as *const f32 as *const c_void,
                plan.y,
                py as *mut c_void,
            )
        }
        .with_context(|| format!("cuDNN convolution {key:?}"))?;
        Ok(())
    })
}

/// Copies `x` `[B, C, S]` (contiguous) channels-last into `y_ptr` (`[B, S, C]`).
fn to_nhwc(x: &Tensor, y_ptr: u64) -> Result<()> {
    let (b, c, s) = x.dims3()?;
    launch_to_nhwc(x, "vae_to_nhwc", y_ptr, (b, c, s), &i32s([c, s])?)
}

/// Copies the nearest ×2 upsample of `x` `[N, C, H, W]` (contiguous) channels-last into `y_ptr`
/// (`[N, 2H·2W, C]`) without materialising the upsample.
fn to_nhwc_up2(x: &Tensor, y_ptr: u64) -> Result<()> {
    let (n, c, h, w) = x.dims4()?;
    launch_to_nhwc(
        x,
        "vae_to_nhwc_up2",
        y_ptr,
        (n, c, h * w),
        &i32s([c, h, w])?,
    )
}

/// Launches the channels-last copy kernel `{kernel}_{dtype}` over x's `b` images of `c`
/// channels by `s` pixels, with arguments `(x, y_ptr, sizes...)`.
fn launch_to_nhwc(
    x: &Tensor,
    kernel: &str,
    y_ptr: u64,
    (b, c, s): (usize, usize, usize),
    sizes: &[i32],
) -> Result<()> {
    if b == 0 {
        return Ok(());
    }
    let dev = cuda_device(x)?;
    let px = address(x)?;
    let func =
        dev.get_or_load_custom_func(&format!("{kernel}_{}", suffix(x.dtype())?), MODULE, PTX)?;
    let mut bld = func.builder();
    bld.arg(&px).arg(&y_ptr);
    for size in sizes {
        bld.arg(size);
    }
    // SAFETY: the callers pass `kernel`'s size arguments in its order; y_ptr holds the copy of
    // x's b·c·s values (four times as many for the ×2 upsample), the caller's buffer.
    launched(unsafe { bld.launch(transpose_config(b, c, s)?) }.map(|_| ()))
}

fn transpose_config(b: usize, c: usize, s: usize) -> Result<LaunchConfig> {
    ensure!(
        b < 65536,
        "VAE layout copy: {b} images exceed the launch grid"
    );
    Ok(LaunchConfig {
        grid_dim: (s.div_ceil(32) as u32, c.div_ceil(32) as u32, b as u32),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    })
}

/// `[B, S, C]` channels-last at `x_ptr` -> a new `[B, C, S]` tensor, plus bias and residual.
fn from_nhwc(
    dev: &CudaDevice,
    dtype: DType,
    x_ptr: u64,
    (b, c, s): (usize, usize, usize),
    bias: &Tensor,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (bias, residual) = bias_and_residual(Some(bias), c, residual, b * c * s, dtype)?;
    let bias = bias.expect("given");
    let (y, py) = alloc(dev, dtype, &[b, c, s])?;
    let pb = address(&bias)?;
    let pr = residual.as_ref().map(address).transpose()?.unwrap_or(0);
    let func =
        dev.get_or_load_custom_func(&format!("vae_from_nhwc_{}", suffix(dtype)?), MODULE, PTX)?;
    let (ci, si) = (c as i32, s as i32);
    let mut bld = func.builder();
    bld.arg(&x_ptr).arg(&py).arg(&pb).arg(&pr).arg(&ci).arg(&si);
    // SAFETY: the arguments match the kernel; x_ptr holds b·s·c elements.
    launched(unsafe { bld.launch(transpose_config(b, c, s)?) }.map(|_| ()))?;
    Ok(y)
}

/// The GPU form of a convolution filter `[C_out, C_in, (kt,) kh, kw]`: folded for
/// [`ConvLayout::Fold`] (3-D only: `[C_out, kt·C_in, kh, kw]`), channels-last for
/// [`ConvLayout::ChannelsLast`] (`[C_out, (kt,) kh, kw, C_in]`).
pub fn prepare_weight(weight: &Tensor) -> Result<Tensor> {
    match (conv_layout(weight.dtype()), weight.rank()) {
        (ConvLayout::Fold, 5) => {
            let (co, ci, kt, kh, kw) = weight.dims5()?;
            Ok(weight
                .permute((0, 2, 1, 3, 4))?
                .contiguous()?
                .reshape((co, kt * ci, kh, kw))?)
        }
        (ConvLayout::Fold, _) => Ok(weight.contiguous()?),
        (ConvLayout::ChannelsLast, 5) => Ok(weight.permute((0, 2, 3, 4, 1))?.contiguous()?),
        (ConvLayout::ChannelsLast, _) => Ok(weight.permute((0, 2, 3, 1))?.contiguous()?),
    }
}

fn nchw_strides(d: [usize; 4]) -> [usize; 4] {
    [d[1] * d[2] * d[3], d[2] * d[3], d[3], 1]
}

/// [`conv2d`] of [`upsample2x`]`(x)`: channels-last (unless `VIDGEN_VAE_UPSAMPLE=separate`), the
/// ×2 frames are written straight into the convolution's input copy (`to_nhwc_up2`), so the
/// upsampled NCHW frames never exist (the same values: bit-identical to the two steps).
pub fn upsample2x_conv2d(
    x: &Tensor,
    w: &Tensor,
    dims: [usize; 4],
    bias: &Tensor,
    pad: usize,
    stride: usize,
) -> Result<Tensor> {
    if !knobs().fused_upsample || conv_layout(x.dtype()) != ConvLayout::ChannelsLast {
        return conv2d(&upsample2x(x)?, w, dims, bias, pad, stride);
    }
    let x = x.contiguous()?;
    let (n, c, h, wd) = x.dims4()?;
    let dev = cuda_device(&x)?;
    let (xt, pxt) = alloc(&dev, x.dtype(), &[n, 4 * h * wd, c])?;
    to_nhwc_up2(&x, pxt)?;
    conv2d_channels_last(
        &dev,
        x.dtype(),
        (xt, pxt),
        [n, c, 2 * h, 2 * wd],
        w,
        dims,
        bias,
        pad,
        stride,
    )
}

/// `nn.Conv2d` on `[N, C, H, W]` with the filter from [`prepare_weight`] (`dims`: its
/// `[C_out, C_in, k, k]`), plus bias.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    dims: [usize; 4],
    bias: &Tensor,
    pad: usize,
    stride: usize,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (n, c, h, wd) = x.dims4()?;
    let co = dims[0];
    let (ho, wo) = conv2d_out(h, wd, dims, pad, stride);
    let dev = cuda_device(&x)?;
    let dtype = x.dtype();
    let pad5 = [pad as i32, pad as i32, 0];
    let stride5 = [stride as i32, stride as i32, 0];
    match conv_layout(dtype) {
        ConvLayout::Fold => {
            let (y, py) = alloc(&dev, dtype, &[n, co, ho, wo])?;
            let xd = [n, c, h, wd];
            let yd = [n, co, ho, wo];
            let key = ConvKey {
                dtype,
                rank: 4,
                nhwc_filter: false,
                x_dims: pad5_dims(i32s(xd)?),
                x_strides: pad5_dims(i32s(nchw_strides(xd))?),
                w_dims: pad5_dims(i32s(dims)?),
                pads: pad5,
                strides: stride5,
                y_dims: pad5_dims(i32s(yd)?),
                y_strides: pad5_dims(i32s(nchw_strides(yd))?),
            };
            conv_raw(&dev, &key, address(&x)?, w, py)?;
            bias_add(&y, Some(bias), None)?;
            Ok(y)
        }
        ConvLayout::ChannelsLast => {
            let (xt, pxt) = alloc(&dev, dtype, &[n, h * wd, c])?;
            to_nhwc(&x.reshape((n, c, h * wd))?, pxt)?;
            conv2d_channels_last(
                &dev,
                dtype,
                (xt, pxt),
                [n, c, h, wd],
                w,
                dims,
                bias,
                pad,
                stride,
            )
        }
    }
}

/// The channels-last half of [`conv2d`]: `xt` (and its address) holds the input `[N, H·W, C]`
/// for `x_dims` `[N, C, H, W]`; freed once the convolution has read it.
#[allow(clippy::too_many_arguments)]
fn conv2d_channels_last(
    dev: &CudaDevice,
    dtype: DType,
    (xt, pxt): (Tensor, u64),
    [n, c, h, wd]: [usize; 4],
    w: &Tensor,
    dims: [usize; 4],
    bias: &Tensor,
    pad: usize,
    stride: usize,
) -> Result<Tensor> {
    let co = dims[0];
    let (ho, wo) = conv2d_out(h, wd, dims, pad, stride);
    let [p, st] = i32s([pad, stride])?;
    let (yt, pyt) = alloc(dev, dtype, &[n, ho * wo, co])?;
    let key = ConvKey {
        dtype,
        rank: 4,
        nhwc_filter: true,
        x_dims: pad5_dims(i32s([n, c, h, wd])?),
        x_strides: pad5_dims(i32s([h * wd * c, 1, wd * c, c])?),
        w_dims: pad5_dims(i32s(dims)?),
        pads: [p, p, 0],
        strides: [st, st, 0],
        y_dims: pad5_dims(i32s([n, co, ho, wo])?),
        y_strides: pad5_dims(i32s([ho * wo * co, 1, wo * co, co])?),
    };
    conv_raw(dev, &key, pxt, w, pyt)?;
    drop(xt);
    let y = from_nhwc(dev, dtype, pyt, (n, co, ho * wo), bias, None)?;
    drop(yt);
    Ok(y.reshape((n, co, ho, wo))?)
}

/// The output height and width of a 2-D convolution with filter `dims` `[C_out, C_in, kh, kw]`.
fn conv2d_out(h: usize, w: usize, dims: [usize; 4], pad: usize, stride: usize) -> (usize, usize) {
    let [_, _, kh, kw] = dims;
    (
        (h + 2 * pad - kh) / stride + 1,
        (w + 2 * pad - kw) / stride + 1,
    )
}

fn pad5_dims(v: [i32; 4]) -> [i32; 5] {
    [v[0], v[1], v[2], v[3], 0]
}

/// `WanCausalConv3d` on `[B, T, C, H, W]` with the filter from [`prepare_weight`] (`dims`: its
/// `[C_out, C_in, kt, kh, kw]`): `front_pad` causal zero frames, reduced by the frames of `cache`
/// when given; `pad_hw` spatial padding; temporal stride `stride_t`. Bias, then `residual`, are
/// added in one pass.
#[allow(clippy::too_many_arguments)]
pub fn causal_conv3d(
    x: &Tensor,
    w: &Tensor,
    dims: [usize; 5],
    bias: &Tensor,
    front_pad: usize,
    pad_hw: usize,
    stride_t: usize,
    cache: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, t, c, h, wd) = x.dims5()?;
    let [co, _, kt, kh, kw] = dims;
    let cached = match cache {
        Some(cc) if front_pad > 0 => Some(cc),
        _ => None,
    };
    let cached_frames = cached.map_or(Ok(0), |cc| cc.dim(1))?;
    let zeros = front_pad.saturating_sub(cached_frames);
    let n = zeros + cached_frames + t;
    ensure!(
        n >= kt,
        "causal conv: {n} frames (with padding) are fewer than the kernel's {kt}"
    );
    let t_out = (n - kt) / stride_t + 1;
    let (ho, wo) = (h + 2 * pad_hw + 1 - kh, wd + 2 * pad_hw + 1 - kw);
    let (frame, out_frame) = (c * h * wd, co * ho * wo);
    let dev = cuda_device(x)?;
    let dtype = x.dtype();
    let elem = dtype.size_in_bytes() as u64;
    let y = match conv_layout(dtype) {
        ConvLayout::Fold => {
            // One copy at most: [zero frames, cache, x] gathered into one buffer.
            let src = if n == t {
                x.contiguous()?
            } else {
                let mut parts = Vec::with_capacity(3);
                if zeros > 0 {
                    parts.push(Tensor::zeros((b, zeros, c, h, wd), dtype, x.device())?);
                }
                if let Some(cc) = cached {
                    parts.push(cc.clone());
                }
                parts.push(x.clone());
                Tensor::cat(&parts, 1)?
            };
            let (y, py) = alloc(&dev, dtype, &[b, t_out, co, ho, wo])?;
            let px = address(&src)?;
            // cuDNN rejects overlapping image strides, so output frames go in `groups` launches of
            // frames `groups` apart whose input windows do not overlap.
            let groups = kt.div_ceil(stride_t).min(t_out);
            for bi in 0..b {
                for g in 0..groups {
                    let count = (t_out - g).div_ceil(groups);
                    let key = ConvKey {
                        dtype,
                        rank: 4,
                        nhwc_filter: false,
                        x_dims: pad5_dims(i32s([count, kt * c, h, wd])?),
                        x_strides: pad5_dims(i32s([groups * stride_t * frame, h * wd, wd, 1])?),
                        w_dims: pad5_dims(i32s([co, kt * c, kh, kw])?),
                        pads: [pad_hw as i32, pad_hw as i32, 0],
                        strides: [1, 1, 0],
                        y_dims: pad5_dims(i32s([count, co, ho, wo])?),
                        y_strides: pad5_dims(i32s([groups * out_frame, ho * wo, wo, 1])?),
                    };
                    let x_off = ((bi * n + g * stride_t) * frame) as u64 * elem;
                    let y_off = ((bi * t_out + g) * out_frame) as u64 * elem;
                    conv_raw(&dev, &key, px + x_off, w, py + y_off)?;
                }
            }
            let flat = y.reshape((b * t_out, co, ho * wo))?;
            let residual = residual
                .map(|r| r.reshape((b * t_out, co, ho * wo)))
                .transpose()?;
            bias_add(&flat, Some(bias), residual.as_ref())?;
            y
        }
        ConvLayout::ChannelsLast => {
            // [zero frames, cache, x] copied channels-last straight into one buffer (NDHWC).
            let (xt, pxt) = alloc(&dev, dtype, &[b, n, h * wd, c])?;
            for bi in 0..b {
                let mut at = (bi * n) as u64 * frame as u64 * elem;
                if zeros > 0 {
                    let z = Tensor::zeros((zeros, c, h * wd), dtype, x.device())?;
                    to_nhwc(&z, pxt + at)?;
                    at += (zeros * frame) as u64 * elem;
                }
                if let Some(cc) = cached {
                    to_nhwc(
                        &cc.get(bi)?
                            .contiguous()?
                            .reshape((cached_frames, c, h * wd))?,
                        pxt + at,
                    )?;
                    at += (cached_frames * frame) as u64 * elem;
                }
                to_nhwc(&x.get(bi)?.contiguous()?.reshape((t, c, h * wd))?, pxt + at)?;
            }
            let (yt, pyt) = alloc(&dev, dtype, &[b, t_out, ho * wo, co])?;
            let key = ConvKey {
                dtype,
                rank: 5,
                nhwc_filter: true,
                x_dims: i32s([b, c, n, h, wd])?,
                x_strides: i32s([n * frame, 1, h * wd * c, wd * c, c])?,
                w_dims: i32s(dims)?,
                pads: [0, pad_hw as i32, pad_hw as i32],
                strides: [stride_t as i32, 1, 1],
                y_dims: i32s([b, co, t_out, ho, wo])?,
                y_strides: i32s([t_out * out_frame, 1, ho * wo * co, wo * co, co])?,
            };
            conv_raw(&dev, &key, pxt, w, pyt)?;
            drop(xt);
            let y = from_nhwc(&dev, dtype, pyt, (b * t_out, co, ho * wo), bias, residual)?;
            drop(yt);
            y
        }
    };
    Ok(y.reshape((b, t_out, co, ho, wo))?)
}
