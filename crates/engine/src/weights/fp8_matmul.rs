//! FP8 matmuls for [`Fp8Weight`] linears (`--weights fp8-matmul`): the activations are quantised
//! to e4m3 per row (one scale per token, `amax / 448`, the arithmetic of
//! [`Fp8Weight::quantize`]), multiplied with the e4m3 weight on the tensor cores with f32
//! accumulation (cuBLASLt; Hopper and Ada run e4m3 at twice their bf16 rate), and the scales,
//! bias and activation are applied in one pass after:
//! `y = act(T((q_x · q_wᵀ) · s_x[row] · s_w[col] + b))`.
//!
//! This is not the reference's arithmetic (the reference multiplies in bf16): its cost is
//! measured, in `tests/dit_quantized.rs` on the fixtures and by `vidgen bench --what fp8` at full
//! size. On the CPU the same quantised values are multiplied in f32, the reference the GPU path
//! is checked against (`vidgen bench --what fp8`, `fp8_matmul_kernels`).

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::fp8::{Fp8Granularity, Fp8Weight};

/// What follows the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    None,
    /// PyTorch's `gelu(approximate="tanh")`, on the output rounded to the activation dtype.
    GeluTanh,
}

/// `x [rows, k]` quantised per row: e4m3 values and one f32 scale per row (a [`Fp8Weight`]
/// with per-channel scales, the rows being its channels). Bit-identical on the GPU and the CPU.
pub fn quantize_rows(x: &Tensor) -> Result<Fp8Weight> {
    let (_, k) = x.dims2()?;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && gpu::supported_dtype(x.dtype()) && k > 0 {
        return gpu::quantize_rows(x);
    }
    let _ = k;
    Fp8Weight::quantize(x, Fp8Granularity::PerChannel)
}

/// `act(x · Wᵀ + b)` through FP8 for `x [..., in]`, `w [out, in]`, `bias [out]`; the result in
/// x's dtype. On a GPU, bf16/f16 activations with `in` and `out` multiples of 16 (every Wan
/// linear) take cuBLASLt's e4m3 matmul; everything else computes the same quantised product in
/// f32.
pub fn fp8_linear(x: &Tensor, w: &Fp8Weight, bias: &Tensor, act: Activation) -> Result<Tensor> {
    let &[out, k] = w.dims() else {
        anyhow::bail!("FP8 matmul: weight must be [out, in], got {:?}", w.dims());
    };
    let dims = x.dims().to_vec();
    anyhow::ensure!(
        dims.last() == Some(&k) && bias.dims() == [out],
        "FP8 matmul: input {:?}, weight {:?} and bias {:?} do not fit",
        dims,
        w.dims(),
        bias.dims()
    );
    let rows = x.elem_count() / k.max(1);
    let x2 = x.contiguous()?.reshape((rows, k))?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("rank >= 1") = out;
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && gpu::supported_dtype(x.dtype())
        && k.is_multiple_of(16)
        && out.is_multiple_of(16)
        && rows > 0
    {
        let y = gpu::linear(&x2, w, bias, act)?;
        return Ok(y.reshape(out_dims)?);
    }
    let y = reference(&x2, w, bias, act)?;
    Ok(y.reshape(out_dims)?)
}

/// The FP8 product in f32 on any device: the quantised activations times the quantised weight,
/// then the bias and activation as [`crate::dit::fused::bias_add`] / `bias_gelu` apply them.
fn reference(x2: &Tensor, w: &Fp8Weight, bias: &Tensor, act: Activation) -> Result<Tensor> {
    let xq = quantize_rows(x2)?;
    let y = xq
        .dequantize(DType::F32)?
        .matmul(&w.dequantize(DType::F32)?.t()?)?
        .broadcast_add(&bias.to_dtype(DType::F32)?)?
        .to_dtype(x2.dtype())?;
    Ok(match act {
        Activation::None => y,
        Activation::GeluTanh => y.gelu()?,
    })
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use anyhow::{bail, Result};
    use candle_core::cuda::cudarc::cublas::sys::cublasOperation_t;
    use candle_core::cuda::cudarc::cublaslt::{result as lt, sys};
    use candle_core::cuda::cudarc::driver::{CudaSlice, DevicePtrMut, LaunchConfig, PushKernelArg};
    use candle_core::{DType, Tensor};

    use super::Activation;
    use crate::cuda_util::{address, alloc, cuda_device, launched, suffix};
    use crate::weights::fp8::Fp8Weight;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fp8.ptx"));
    const MODULE: &str = "vidgen_fp8";
    const THREADS: u32 = 256;
    /// cuBLASLt's recommended workspace on Hopper.
    const WORKSPACE_BYTES: usize = 32 << 20;

    pub fn supported_dtype(dtype: DType) -> bool {
        matches!(dtype, DType::BF16 | DType::F16)
    }

    fn per_row(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub fn quantize_rows(x: &Tensor) -> Result<Fp8Weight> {
        let x = x.contiguous()?;
        let (rows, k) = x.dims2()?;
        let dev = cuda_device(&x)?;
        let (q, pq) = alloc(&dev, DType::F8E4M3, &[rows, k])?;
        let (scale, ps) = alloc(&dev, DType::F32, &[rows])?;
        if rows > 0 {
            let px = address(&x)?;
            let name = format!("e4m3_quantize_rows_{}", suffix(x.dtype())?);
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let k = k as i32;
            let mut b = func.builder();
            b.arg(&px).arg(&pq).arg(&ps).arg(&k);
            // SAFETY: matches `e4m3_quantize_rows_T` in kernels/fp8.cu; q holds rows·k bytes and
            // scale rows values, one CTA per row.
            launched(unsafe { b.launch(per_row(rows)) }.map(|_| ()))?;
        }
        Fp8Weight::from_parts(q, scale)
    }

    pub fn linear(x2: &Tensor, w: &Fp8Weight, bias: &Tensor, act: Activation) -> Result<Tensor> {
        let (rows, k) = x2.dims2()?;
        let out = w.dims()[0];
        let dev = cuda_device(x2)?;
        require_fp8_tensor_cores(&dev)?;
        let xq = quantize_rows(x2)?;
        let wq = w.weight().contiguous()?;
        let (y, py) = alloc(&dev, x2.dtype(), &[rows, out])?;
        let stream = dev.cuda_stream();
        LT.with(|cell| -> Result<()> {
            let mut handles = cell.borrow_mut();
            let h = match handles.entry(stream.cu_stream() as usize) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(Lt::new(&stream)?),
            };
            h.matmul(
                &stream,
                address(&wq)?,
                address(xq.weight())?,
                py,
                [out, rows, k],
                x2.dtype(),
            )
        })?;
        let bias = bias.to_dtype(DType::F32)?.contiguous()?;
        let s_col = w.scale().contiguous()?;
        let per_col = i32::from(s_col.elem_count() > 1);
        let s_row = xq.scale().contiguous()?;
        let (pb, pr, pc) = (address(&bias)?, address(&s_row)?, address(&s_col)?);
        let (cols, gelu) = (out as i32, i32::from(act == Activation::GeluTanh));
        let name = format!("fp8_epilogue_{}", suffix(x2.dtype())?);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&py)
            .arg(&py)
            .arg(&pr)
            .arg(&pc)
            .arg(&per_col)
            .arg(&pb)
            .arg(&cols)
            .arg(&gelu);
        // SAFETY: matches `fp8_epilogue_T` in kernels/fp8.cu; y holds rows·out values, s_row
        // rows, s_col out (or one), bias out; in place: each element is read then written by
        // one thread.
        launched(unsafe { b.launch(per_row(rows)) }.map(|_| ()))?;
        Ok(y)
    }

    /// e4m3 tensor cores arrived with compute capability 8.9 (Ada); Hopper is 9.0.
    fn require_fp8_tensor_cores(dev: &candle_core::CudaDevice) -> Result<()> {
        use candle_core::cuda::cudarc::driver::sys::CUdevice_attribute as A;
        let ctx = dev.cuda_stream().context().clone();
        let major = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        if (major, minor) < (8, 9) {
            bail!(
                "--weights fp8-matmul needs FP8 tensor cores (compute capability 8.9 or later: \
                 Ada, Hopper, Blackwell); this GPU is {major}.{minor}: use --weights fp8"
            );
        }
        Ok(())
    }

    thread_local! {
        /// One cuBLASLt handle per candle stream (device) and thread.
        static LT: RefCell<HashMap<usize, Lt>> = RefCell::new(HashMap::new());
    }

    struct Lt {
        handle: sys::cublasLtHandle_t,
        workspace: CudaSlice<u8>,
        /// The heuristic's first algorithm per (out, rows, k, dtype): asked once per shape.
        algos: HashMap<(usize, usize, usize, DType), sys::cublasLtMatmulAlgo_t>,
    }

    impl Drop for Lt {
        fn drop(&mut self) {
            // SAFETY: created in `Lt::new`, destroyed once here.
            let _ = unsafe { lt::destroy_handle(self.handle) };
        }
    }

    /// The descriptors of one matmul, destroyed on drop.
    struct Descriptors {
        matmul: sys::cublasLtMatmulDesc_t,
        a: sys::cublasLtMatrixLayout_t,
        b: sys::cublasLtMatrixLayout_t,
        d: sys::cublasLtMatrixLayout_t,
    }

    impl Drop for Descriptors {
        fn drop(&mut self) {
            // SAFETY: each was created once in `Lt::descriptors`.
            unsafe {
                let _ = lt::destroy_matrix_layout(self.a);
                let _ = lt::destroy_matrix_layout(self.b);
                let _ = lt::destroy_matrix_layout(self.d);
                let _ = lt::destroy_matmul_desc(self.matmul);
            }
        }
    }

    /// `VIDGEN_FP8_FAST_ACCUM=1`: Hopper's faster FP8 accumulation (fewer promotions to full f32
    /// precision); off by default, as in PyTorch's `_scaled_mm`.
    fn fast_accum() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| std::env::var("VIDGEN_FP8_FAST_ACCUM").is_ok_and(|v| v == "1"))
    }

    impl Lt {
        fn new(
            stream: &std::sync::Arc<candle_core::cuda::cudarc::driver::CudaStream>,
        ) -> Result<Self> {
            stream.context().bind_to_thread()?;
            let handle = lt::create_handle()?;
            // SAFETY: scratch memory; cuBLASLt needs no initial contents.
            let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }?;
            Ok(Self {
                handle,
                workspace,
                algos: HashMap::new(),
            })
        }

        /// Column-major view of the row-major product: D [out, rows] (= y [rows, out] row-major)
        /// = op(A) · B with A the weight (stored [out, k] row-major = k×out column-major,
        /// transposed: the "TN" layout Hopper's FP8 kernels require) and B the activations
        /// (k×rows column-major).
        fn descriptors(out: usize, rows: usize, k: usize, dtype: DType) -> Result<Descriptors> {
            let e4m3 = sys::cudaDataType::CUDA_R_8F_E4M3;
            let out_type = match dtype {
                DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
                DType::F16 => sys::cudaDataType::CUDA_R_16F,
                other => bail!("FP8 matmul: output dtype {other:?} is not bf16 or f16"),
            };
            let matmul = lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType::CUDA_R_32F,
            )?;
            let desc = |a, b, d| Descriptors { matmul, a, b, d };
            let a = lt::create_matrix_layout(e4m3, k as u64, out as u64, k as i64)?;
            let b = lt::create_matrix_layout(e4m3, k as u64, rows as u64, k as i64)?;
            let d = lt::create_matrix_layout(out_type, out as u64, rows as u64, out as i64)?;
            let descriptors = desc(a, b, d);
            let transa = cublasOperation_t::CUBLAS_OP_T as i32;
            let transb = cublasOperation_t::CUBLAS_OP_N as i32;
            let fast = i8::from(fast_accum());
            // SAFETY: live descriptors; each buffer has the attribute's documented type.
            unsafe {
                use sys::cublasLtMatmulDescAttributes_t as Attr;
                lt::set_matmul_desc_attribute(
                    matmul,
                    Attr::CUBLASLT_MATMUL_DESC_TRANSA,
                    (&transa) as *const i32 as *const _,
                    std::mem::size_of::<i32>(),
                )?;
                lt::set_matmul_desc_attribute(
                    matmul,
                    Attr::CUBLASLT_MATMUL_DESC_TRANSB,
                    (&transb) as *const i32 as *const _,
                    std::mem::size_of::<i32>(),
                )?;
                lt::set_matmul_desc_attribute(
                    matmul,
                    Attr::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                    (&fast) as *const i8 as *const _,
                    std::mem::size_of::<i8>(),
                )?;
            }
            Ok(descriptors)
        }

        fn algo(
            &mut self,
            d: &Descriptors,
            key: (usize, usize, usize, DType),
        ) -> Result<sys::cublasLtMatmulAlgo_t> {
            if let Some(a) = self.algos.get(&key) {
                return Ok(*a);
            }
            let pref = lt::create_matmul_pref()?;
            let bytes = WORKSPACE_BYTES as u64;
            // SAFETY: live descriptors and preference; the attribute is a u64.
            let found = unsafe {
                let found = lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&bytes) as *const u64 as *const _,
                    std::mem::size_of::<u64>(),
                )
                .and_then(|_| {
                    lt::get_matmul_algo_heuristic(self.handle, d.matmul, d.a, d.b, d.d, d.d, pref)
                });
                let _ = lt::destroy_matmul_pref(pref);
                found
            };
            let (out, rows, k, dtype) = key;
            let found = found.map_err(|e| {
                anyhow::anyhow!(
                    "cuBLASLt has no FP8 matmul for {rows}x{k} · ({out}x{k})ᵀ -> {dtype:?}: {e:?}"
                )
            })?;
            self.algos.insert(key, found.algo);
            Ok(found.algo)
        }

        fn matmul(
            &mut self,
            stream: &std::sync::Arc<candle_core::cuda::cudarc::driver::CudaStream>,
            weight: u64,
            activations: u64,
            y: u64,
            [out, rows, k]: [usize; 3],
            dtype: DType,
        ) -> Result<()> {
            let d = Self::descriptors(out, rows, k, dtype)?;
            let algo = self.algo(&d, (out, rows, k, dtype))?;
            let (alpha, beta) = (1f32, 0f32);
            let ws = self.workspace.device_ptr_mut(stream).0;
            // SAFETY: weight holds out·k bytes, activations rows·k, y rows·out values of dtype,
            // all on this stream's device; C = D with beta 0 (C is not read).
            unsafe {
                lt::matmul(
                    self.handle,
                    d.matmul,
                    (&alpha) as *const f32 as *const _,
                    (&beta) as *const f32 as *const _,
                    weight as *const _,
                    d.a,
                    activations as *const _,
                    d.b,
                    y as *const _,
                    d.d,
                    y as *mut _,
                    d.d,
                    &algo,
                    ws as *mut _,
                    WORKSPACE_BYTES,
                    stream.cu_stream() as sys::cudaStream_t,
                )?;
            }
            Ok(())
        }
    }
}
