//! Fused attention on CUDA: bf16, head_dim 128. Inputs in the projections' layout [B, L, H, 128]
//! (any token stride, head dim contiguous); output [B, Lq, H, 128] contiguous. Two kernels: cuDNN's
//! fused flash attention ([`super::cudnn_attention`]; the fastest measured through PyTorch on the
//! H100, 585 TFLOP/s here against 316 for ours) and our own (kernels/attention.cu). cuDNN's is
//! the default wherever it has a plan whose first result agrees with ours; ours runs otherwise,
//! or always with `VIDGEN_ATTENTION=own` (or a tile name).
//! [`supported`] says when either applies; otherwise callers use the chunked attention.

use anyhow::Result;
use candle_core::{DType, Tensor};

pub const HEAD_DIM: usize = 128;

/// True when the fused kernel can run these inputs.
pub fn supported(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && q.device().is_cuda()
        && [q, k, v].iter().all(|t| {
            t.dtype() == DType::BF16
                && t.rank() == 4
                && t.dims()[3] == HEAD_DIM
                && t.stride()[3] == 1
        })
        && q.dim(2).ok() == k.dim(2).ok()
        && k.dims() == v.dims()
        && q.dim(0).ok() == k.dim(0).ok()
}

/// The fused attention kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Cudnn,
    /// cuDNN's flash attention on e4m3 copies of q, k and v (per-tensor scales): faster than
    /// bf16, with e4m3's error; opt-in.
    CudnnFp8,
    Own(Tile),
}

/// Tile shapes of our own kernel (kernels/attention.cu): queries per CTA and keys per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// 64 queries (16 per warp, Q in registers), 64 keys.
    M64,
    /// 128 queries (32 per warp: each K/V fragment feeds two MMAs), 64 keys.
    M128,
    /// 128 queries, 32 keys (fewer live registers than `M128`).
    M128N32,
}

impl Tile {
    pub const ALL: [Tile; 3] = [Tile::M64, Tile::M128, Tile::M128N32];
    /// Our kernel's shape when none is asked for: the fastest on the H100 (316 TFLOP/s at
    /// 32760 tokens x 40 heads, against 263 for `M64` and `M128`).
    pub const DEFAULT: Tile = Tile::M128N32;

    pub fn name(self) -> &'static str {
        match self {
            Tile::M64 => "flash",
            Tile::M128 => "flash_m128",
            Tile::M128N32 => "flash_m128_n32",
        }
    }
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Cudnn => "cudnn",
            Kernel::CudnnFp8 => "cudnn_fp8",
            Kernel::Own(tile) => tile.name(),
        }
    }
}

/// The kernel tried first: `VIDGEN_ATTENTION=own|cudnn|cudnn_fp8|flash|flash_m128|flash_m128_n32`,
/// read once (`own` is our kernel's default tile). Default: cuDNN, which falls back to our kernel's
/// default tile for shapes it cannot plan; `cudnn_fp8` falls back to bf16 cuDNN, then ours.
pub fn preferred() -> Result<Kernel> {
    if let Some(kernel) = OVERRIDE.with(|o| o.get()) {
        return Ok(kernel);
    }
    static CHOICE: std::sync::OnceLock<Option<Kernel>> = std::sync::OnceLock::new();
    let choice = CHOICE.get_or_init(|| match std::env::var("VIDGEN_ATTENTION").as_deref() {
        Err(_) | Ok("") | Ok("cudnn") => Some(Kernel::Cudnn),
        Ok("cudnn_fp8") => Some(Kernel::CudnnFp8),
        Ok("own") => Some(Kernel::Own(Tile::DEFAULT)),
        Ok(name) => Tile::ALL
            .into_iter()
            .find(|t| t.name() == name)
            .map(Kernel::Own),
    });
    choice.ok_or_else(|| {
        crate::invalid!(
            "VIDGEN_ATTENTION: `{}` is not one of cudnn, cudnn_fp8, own, flash, flash_m128, \
             flash_m128_n32",
            std::env::var("VIDGEN_ATTENTION").unwrap_or_default()
        )
    })
}

thread_local! {
    /// Set by [`with_preferred`] for the duration of one closure.
    static OVERRIDE: std::cell::Cell<Option<Kernel>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with `kernel` preferred on this thread, whatever `VIDGEN_ATTENTION` says (benchmarks
/// compare attention kernels inside one full forward).
pub fn with_preferred<R>(kernel: Kernel, f: impl FnOnce() -> R) -> R {
    let previous = OVERRIDE.with(|o| o.replace(Some(kernel)));
    let result = f();
    OVERRIDE.with(|o| o.set(previous));
    result
}

/// softmax(q·kᵀ/√128)·v with the preferred kernel (cuDNN falls back to ours for shapes it cannot
/// plan); see the module docs for layouts.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let preferred = preferred()?;
    let cudnn: &[Kernel] = match preferred {
        Kernel::CudnnFp8 => &[Kernel::CudnnFp8, Kernel::Cudnn],
        Kernel::Cudnn => &[Kernel::Cudnn],
        Kernel::Own(_) => &[],
    };
    for &kernel in cudnn {
        if let Some(out) = attention_with(kernel, q, k, v)? {
            return Ok(out);
        }
    }
    let tile = match preferred {
        Kernel::Own(tile) => tile,
        Kernel::Cudnn | Kernel::CudnnFp8 => Tile::DEFAULT,
    };
    own_attention(q, k, v, tile)
}

/// One kernel explicitly (benchmarks compare them): `None` when cuDNN has no plan for the inputs.
pub fn attention_with(
    kernel: Kernel,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<Option<Tensor>> {
    match kernel {
        Kernel::Cudnn if supported(q, k, v) => super::cudnn_attention::attention(q, k, v),
        Kernel::CudnnFp8 if supported(q, k, v) => super::cudnn_attention::attention_fp8(q, k, v),
        Kernel::Cudnn | Kernel::CudnnFp8 => Ok(None),
        Kernel::Own(tile) => own_attention(q, k, v, tile).map(Some),
    }
}

fn own_attention(q: &Tensor, k: &Tensor, v: &Tensor, tile: Tile) -> Result<Tensor> {
    anyhow::ensure!(
        supported(q, k, v),
        "fused attention: unsupported inputs q {:?} {:?}, k {:?}, v {:?} (needs CUDA, bf16, head_dim 128)",
        q.dims(),
        q.dtype(),
        k.dims(),
        v.dims()
    );
    #[cfg(feature = "cuda")]
    {
        gpu::attention(q, k, v, tile)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = tile;
        unreachable!("supported() is false without CUDA")
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    use anyhow::Result;
    use candle_core::cuda::cudarc::driver::sys::CUfunction_attribute_enum;
    use candle_core::cuda::cudarc::driver::{
        CudaFunction, DevicePtrMut, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda::cudarc::nvrtc::Ptx;
    use candle_core::cuda::CudaStorage;
    use candle_core::op::BackpropOp;
    use candle_core::{Storage, Tensor};

    use super::{Tile, HEAD_DIM};
    use crate::cuda_util::address;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
    const THREADS: u32 = 128;

    impl Tile {
        /// Queries per CTA and keys per step.
        fn block(self) -> (usize, usize) {
            match self {
                Tile::M64 => (64, 64),
                Tile::M128 => (128, 64),
                Tile::M128N32 => (128, 32),
            }
        }

        fn entry(self) -> &'static str {
            match self {
                Tile::M64 => "flash_attention_bf16",
                Tile::M128 => "flash_attention_bf16_m128",
                Tile::M128N32 => "flash_attention_bf16_m128_n32",
            }
        }

        /// The Q tile and two stages of K and V tiles, rows padded to 136 bf16 values.
        fn smem_bytes(self) -> u32 {
            let (m, n) = self.block();
            ((m + 4 * n) * (HEAD_DIM + 8) * 2) as u32
        }
    }

    /// The tile's kernel, loaded once per device (its shared-memory limit raised above 48 KB).
    fn function(dev: &candle_core::CudaDevice, tile: Tile) -> Result<CudaFunction> {
        static CACHE: OnceLock<Mutex<HashMap<(usize, &'static str), CudaFunction>>> =
            OnceLock::new();
        let ctx = dev.cuda_stream().context().clone();
        let key = (ctx.ordinal(), tile.entry());
        let mut cache = CACHE
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(&key) {
            return Ok(f.clone());
        }
        let module = ctx.load_module(Ptx::from_src(PTX))?;
        let f = module.load_function(tile.entry())?;
        f.set_attribute(
            CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            tile.smem_bytes() as i32,
        )?;
        cache.insert(key, f.clone());
        Ok(f)
    }

    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, tile: Tile) -> Result<Tensor> {
        let (b, lq, h, _) = q.dims4()?;
        let lk = k.dim(1)?;
        let dev = q.device().as_cuda_device()?.clone();
        let stream = dev.cuda_stream();
        // SAFETY: every element of the output is written by the kernel (rows < lq).
        let mut out = unsafe { dev.alloc::<half::bf16>(b * lq * h * HEAD_DIM)? };
        let po = out.device_ptr_mut(&stream).0;
        let out = Tensor::from_storage(
            Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone())),
            (b, lq, h, HEAD_DIM),
            BackpropOp::none(),
            false,
        );
        let (pq, pk, pv) = (address(q)?, address(k)?, address(v)?);
        let s = |t: &Tensor, i: usize| t.stride()[i] as i64;
        let (q_stride, k_stride, v_stride) = (s(q, 1), s(k, 1), s(v, 1));
        let o_stride = (h * HEAD_DIM) as i64;
        let (q_batch, k_batch, v_batch) = (s(q, 0), s(k, 0), s(v, 0));
        let o_batch = (lq * h * HEAD_DIM) as i64;
        let (lq_i, lk_i) = (lq as i32, lk as i32);
        let scale_log2 = (1.0 / (HEAD_DIM as f64).sqrt() * std::f64::consts::LOG2_E) as f32;
        for (name, t) in [("q", q), ("k", k), ("v", v)] {
            anyhow::ensure!(
                t.stride()[2] == HEAD_DIM,
                "fused attention: {name} heads must be adjacent (stride {:?})",
                t.stride()
            );
        }
        let f = function(&dev, tile)?;
        let cfg = LaunchConfig {
            grid_dim: (lq.div_ceil(tile.block().0) as u32, h as u32, b as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: tile.smem_bytes(),
        };
        let mut args = stream.launch_builder(&f);
        args.arg(&pq)
            .arg(&pk)
            .arg(&pv)
            .arg(&po)
            .arg(&lq_i)
            .arg(&lk_i)
            .arg(&q_stride)
            .arg(&k_stride)
            .arg(&v_stride)
            .arg(&o_stride)
            .arg(&q_batch)
            .arg(&k_batch)
            .arg(&v_batch)
            .arg(&o_batch)
            .arg(&scale_log2);
        // SAFETY: the arguments match the `flash_attention_bf16*` entries in kernels/attention.cu
        // (one signature for every tile); the tensors
        // outlive the launch on this stream.
        unsafe { args.launch(cfg) }.map_err(candle_core::Error::wrap)?;
        Ok(out)
    }
}
