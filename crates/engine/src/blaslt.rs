//! cuBLASLt matmuls of the transformer's linear layers: `y [rows, out] = x [rows, k] · w [out, k]ᵀ`
//! in row-major device memory, optionally with the layer's bias, or bias then tanh-GELU, applied
//! by cuBLASLt's epilogue as the product is written (no second pass over the output).
//!
//! - [`dense_linear`]: bf16/f16 weights. The epilogue adds the bias to the f32 accumulator and
//!   rounds once, as PyTorch's `nn.Linear` (cuBLASLt's bias epilogue) does; with GELU it rounds
//!   once after the GELU where the reference rounds the linear's output first (one rounding
//!   fewer, within bf16's tolerance: `tools/gpu/parity.py`).
//! - FP8 e4m3 weights and activations (`weights::fp8_matmul`): cuBLASLt applies their
//!   per-channel and per-token scales (outer-vector scaling) and the bias (and GELU) to the f32
//!   accumulator as it writes the output; with `VIDGEN_FP8_EPILOGUE=two-pass`, the plain product
//!   is scaled in a second pass.
//!
//! One handle and 32 MiB workspace per thread and stream; the heuristic's first algorithm is
//! asked once per shape and cached.

use anyhow::Result;
use candle_core::{DType, Tensor};

use crate::weights::fp8_matmul::Activation;

/// `act(x · wᵀ + b)` for `x [..., k]`, `w [out, k]`, `bias [out]` through cuBLASLt with the
/// bias (and GELU) in its epilogue; `None` where it does not apply (the CPU, other dtypes, rows
/// not 16-byte multiples, no cuBLASLt algorithm for the shape, or `VIDGEN_DENSE_EPILOGUE=off`
/// for A/B measurements): the caller multiplies and adds the bias itself.
pub fn dense_linear(
    x: &Tensor,
    w: &Tensor,
    bias: &Tensor,
    act: Activation,
) -> Result<Option<Tensor>> {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let off = *OFF.get_or_init(|| std::env::var("VIDGEN_DENSE_EPILOGUE").is_ok_and(|v| v == "off"));
    let dtype = x.dtype();
    let (&[out, k], Some(&xk)) = (w.dims(), x.dims().last()) else {
        return Ok(None);
    };
    // Rows of 16-byte multiples (8 values) keep every row aligned for the tensor cores.
    let fits = matches!(dtype, DType::BF16 | DType::F16)
        && w.dtype() == dtype
        && xk == k
        && bias.dims() == [out]
        && k.is_multiple_of(8)
        && out.is_multiple_of(8)
        && x.elem_count() > 0;
    if off || !fits || !x.device().is_cuda() {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        let y = gpu::linear_with_epilogue(x, w, bias, act, [out, x.elem_count() / k, k])?;
        let mut dims = x.dims().to_vec();
        *dims.last_mut().expect("rank >= 1") = out;
        y.map(|y| y.reshape(dims)).transpose().map_err(Into::into)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = act;
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
pub(crate) use gpu::{matmul, Epilogue, MatmulShape, Operands};

#[cfg(feature = "cuda")]
mod gpu {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::sync::Arc;

    use anyhow::{bail, Result};
    use candle_core::cuda::cudarc::cublas::sys::cublasOperation_t;
    use candle_core::cuda::cudarc::cublaslt::{result as lt, sys};
    use candle_core::cuda::cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
    use candle_core::{DType, Tensor};

    use super::Activation;
    use crate::cuda_util::{address, alloc, cuda_device};

    /// cuBLASLt's recommended workspace on Hopper.
    const WORKSPACE_BYTES: usize = 32 << 20;

    /// What the matmul does after the product.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub enum Epilogue {
        None,
        Bias,
        GeluBias,
    }

    impl Epilogue {
        /// The bias epilogue followed by `act`.
        pub fn of(act: Activation) -> Self {
            match act {
                Activation::None => Epilogue::Bias,
                Activation::GeluTanh => Epilogue::GeluBias,
            }
        }
    }

    /// One matmul's shape and types: `y [rows, out]` (`output`) from `x [rows, k]` and
    /// `w [out, k]` (both `input`); a bias, when the epilogue has one, is `[out]` in `output`.
    /// `scaled`: the product is multiplied by f32 scales per weight row (`[out]`) and per
    /// activation row (`[rows]`) before the epilogue (FP8 inputs only).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct MatmulShape {
        pub out: usize,
        pub rows: usize,
        pub k: usize,
        pub input: DType,
        pub output: DType,
        pub epilogue: Epilogue,
        pub scaled: bool,
    }

    /// Device addresses of one matmul's operands; `bias` and the scales are 0 where the shape
    /// has none.
    #[derive(Clone, Copy, Debug)]
    pub struct Operands {
        pub weight: u64,
        pub activations: u64,
        pub y: u64,
        pub bias: u64,
        pub weight_scales: u64,
        pub activation_scales: u64,
    }

    fn data_type(dtype: DType) -> Result<sys::cudaDataType> {
        Ok(match dtype {
            DType::F8E4M3 => sys::cudaDataType::CUDA_R_8F_E4M3,
            DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType::CUDA_R_16F,
            other => bail!("cuBLASLt matmul: dtype {other:?} is not f8e4m3, bf16 or f16"),
        })
    }

    /// [`super::dense_linear`] once its shapes are checked: `[out, rows, k]`.
    pub fn linear_with_epilogue(
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        act: Activation,
        [out, rows, k]: [usize; 3],
    ) -> Result<Option<Tensor>> {
        let dtype = x.dtype();
        let x2 = x.contiguous()?;
        let w = w.contiguous()?;
        let bias = bias.to_dtype(dtype)?.contiguous()?;
        let dev = cuda_device(x)?;
        let (y, py) = alloc(&dev, dtype, &[rows, out])?;
        let shape = MatmulShape {
            out,
            rows,
            k,
            input: dtype,
            output: dtype,
            epilogue: Epilogue::of(act),
            scaled: false,
        };
        let operands = Operands {
            weight: address(&w)?,
            activations: address(&x2)?,
            y: py,
            bias: address(&bias)?,
            weight_scales: 0,
            activation_scales: 0,
        };
        Ok(matmul(&dev.cuda_stream(), shape, operands)?.then_some(y))
    }

    /// Runs `shape` on `stream` with `operands`. `Ok(false)`: cuBLASLt has no algorithm for it.
    pub fn matmul(
        stream: &Arc<CudaStream>,
        shape: MatmulShape,
        pointers: Operands,
    ) -> Result<bool> {
        LT.with(|cell| {
            let mut handles = cell.borrow_mut();
            let h = match handles.entry(stream.cu_stream() as usize) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(Lt::new(stream)?),
            };
            h.matmul(stream, shape, pointers)
        })
    }

    thread_local! {
        /// One cuBLASLt handle per candle stream (device) and thread.
        static LT: RefCell<HashMap<usize, Lt>> = RefCell::new(HashMap::new());
    }

    struct Lt {
        handle: sys::cublasLtHandle_t,
        workspace: CudaSlice<u8>,
        /// The heuristic's first algorithm per shape and pointer alignment (`None`: it has none).
        algos: HashMap<(MatmulShape, u64), Option<sys::cublasLtMatmulAlgo_t>>,
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

    /// Sets one descriptor attribute from a plain value.
    ///
    /// # Safety
    /// `desc` is live and `T` is the attribute's documented type.
    unsafe fn set<T>(
        desc: sys::cublasLtMatmulDesc_t,
        attr: sys::cublasLtMatmulDescAttributes_t,
        value: &T,
    ) -> Result<()> {
        lt::set_matmul_desc_attribute(
            desc,
            attr,
            value as *const T as *const _,
            std::mem::size_of::<T>(),
        )?;
        Ok(())
    }

    impl Lt {
        fn new(stream: &Arc<CudaStream>) -> Result<Self> {
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
        fn descriptors(s: &MatmulShape, ops: &Operands) -> Result<Descriptors> {
            let (input, output) = (data_type(s.input)?, data_type(s.output)?);
            let matmul = lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType::CUDA_R_32F,
            )?;
            let layout = |t, rows: usize, cols: usize| {
                lt::create_matrix_layout(t, rows as u64, cols as u64, rows as i64)
            };
            let descriptors = Descriptors {
                matmul,
                a: layout(input, s.k, s.out)?,
                b: layout(input, s.k, s.rows)?,
                d: layout(output, s.out, s.rows)?,
            };
            use sys::cublasLtMatmulDescAttributes_t as Attr;
            let epilogue = match s.epilogue {
                Epilogue::None => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
                Epilogue::Bias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
                Epilogue::GeluBias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
            };
            // SAFETY: a live descriptor; each value has the attribute's documented type (the
            // bias pointer is a device address, its type the output's by default).
            unsafe {
                set(
                    matmul,
                    Attr::CUBLASLT_MATMUL_DESC_TRANSA,
                    &(cublasOperation_t::CUBLAS_OP_T as i32),
                )?;
                set(
                    matmul,
                    Attr::CUBLASLT_MATMUL_DESC_TRANSB,
                    &(cublasOperation_t::CUBLAS_OP_N as i32),
                )?;
                if s.input == DType::F8E4M3 {
                    set(
                        matmul,
                        Attr::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                        &i8::from(fast_accum()),
                    )?;
                }
                set(matmul, Attr::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
                if s.epilogue != Epilogue::None {
                    set(matmul, Attr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ops.bias)?;
                    set(matmul, Attr::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &output)?;
                }
                if s.scaled {
                    let outer = sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
                    set(matmul, Attr::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer)?;
                    set(matmul, Attr::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer)?;
                    set(
                        matmul,
                        Attr::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                        &ops.weight_scales,
                    )?;
                    set(
                        matmul,
                        Attr::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                        &ops.activation_scales,
                    )?;
                }
            }
            Ok(descriptors)
        }

        /// The heuristic's first algorithm for `d`, which assumes pointers aligned to `align`
        /// bytes (the largest power of two, up to 256, dividing every address).
        fn algo(
            &mut self,
            d: &Descriptors,
            shape: MatmulShape,
            align: u64,
        ) -> Result<Option<sys::cublasLtMatmulAlgo_t>> {
            if let Some(a) = self.algos.get(&(shape, align)) {
                return Ok(*a);
            }
            use sys::cublasLtMatmulPreferenceAttributes_t as Pref;
            let pref = lt::create_matmul_pref()?;
            let bytes = WORKSPACE_BYTES as u64;
            let align32 = align as u32;
            // SAFETY: live descriptors and preference; the attributes are u64 and u32.
            let found = unsafe {
                let set_pref = |attr, value: *const std::ffi::c_void, size| {
                    lt::set_matmul_pref_attribute(pref, attr, value, size)
                };
                let u32_size = std::mem::size_of::<u32>();
                let align_ptr = (&align32) as *const u32 as *const _;
                let found = set_pref(
                    Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&bytes) as *const u64 as *const _,
                    std::mem::size_of::<u64>(),
                )
                .and_then(|_| {
                    set_pref(
                        Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                        align_ptr,
                        u32_size,
                    )
                })
                .and_then(|_| {
                    set_pref(
                        Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                        align_ptr,
                        u32_size,
                    )
                })
                .and_then(|_| {
                    set_pref(
                        Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                        align_ptr,
                        u32_size,
                    )
                })
                .and_then(|_| {
                    set_pref(
                        Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                        align_ptr,
                        u32_size,
                    )
                })
                .and_then(|_| {
                    lt::get_matmul_algo_heuristic(self.handle, d.matmul, d.a, d.b, d.d, d.d, pref)
                });
                let _ = lt::destroy_matmul_pref(pref);
                found
            };
            let algo = match found {
                Ok(f) => Some(f.algo),
                Err(e) => {
                    tracing::warn!(
                        "cuBLASLt has no matmul for {shape:?} at {align}-byte alignment ({e:?}); \
                         using the unfused path"
                    );
                    None
                }
            };
            self.algos.insert((shape, align), algo);
            Ok(algo)
        }

        fn matmul(
            &mut self,
            stream: &Arc<CudaStream>,
            shape: MatmulShape,
            ops: Operands,
        ) -> Result<bool> {
            let Operands {
                weight,
                activations,
                y,
                ..
            } = ops;
            let align = [weight, activations, y]
                .iter()
                .map(|p| 1u64 << p.trailing_zeros().min(8))
                .min()
                .unwrap_or(256);
            let d = Self::descriptors(&shape, &ops)?;
            let Some(algo) = self.algo(&d, shape, align)? else {
                return Ok(false);
            };
            let (alpha, beta) = (1f32, 0f32);
            let ws = self.workspace.device_ptr_mut(stream).0;
            // SAFETY: weight holds out·k values of `input`, activations rows·k, y rows·out of
            // `output` and the bias out, all on this stream's device; C = D with beta 0 (C is
            // not read).
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
            Ok(true)
        }
    }
}
