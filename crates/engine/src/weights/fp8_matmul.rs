//! FP8 matmuls for [`Fp8Weight`] linears (`--weights fp8-matmul`): the activations are quantised
//! to e4m3 per row (one scale per token, `amax / 448`, the arithmetic of
//! [`Fp8Weight::quantize`]), multiplied with the e4m3 weight on the tensor cores with f32
//! accumulation (cuBLASLt; Hopper and Ada run e4m3 at twice their bf16 rate), the product rounded
//! to T, then one pass for the scales, bias and activation:
//! `y = act(T(T(q_x · q_wᵀ) · s_x[row] · s_w[col] + b))` (the two-pass product). By default
//! cuBLASLt applies the scales, bias and activation to the accumulator as it writes the output
//! (outer-vector scaling, `y = act(T((q_x · q_wᵀ) · s_x[row] · s_w[col] + T(b)))`), checked
//! against the two-pass product on each shape's first call; on the H100 it took the 1.3B forward
//! from 0.570 s to 0.528 s at the same error (`VIDGEN_FP8_EPILOGUE=two-pass` to compare).
//! Linears that share an input (q, k, v) share its quantisation ([`quantize_input`],
//! [`fp8_linear_quantized`]).
//!
//! This is not the reference's arithmetic (the reference multiplies in bf16): its cost is
//! measured, in `tests/dit_quantized.rs` on the fixtures and by `vidgen bench --what fp8` at full
//! size. On the CPU the same quantised values are multiplied in f32, the reference the GPU path
//! is checked against (`vidgen bench --what fp8`, `fp8_matmul_kernels`).

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::fp8::{Fp8Granularity, Fp8Weight};

/// What follows the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

/// `x`'s rows quantised for [`fp8_linear_quantized`] where the GPU path takes it (see
/// [`fp8_linear`]); `None` elsewhere.
pub fn quantize_input(x: &Tensor) -> Result<Option<Fp8Weight>> {
    let k = x.dims().last().copied().unwrap_or(0);
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && gpu::supported_dtype(x.dtype())
        && k.is_multiple_of(16)
        && x.elem_count() > 0
    {
        let rows = x.elem_count() / k;
        return Ok(Some(quantize_rows(&x.contiguous()?.reshape((rows, k))?)?));
    }
    let _ = k;
    Ok(None)
}

/// [`fp8_linear`] with x's rows already quantised by [`quantize_input`] (`xq`), so linears
/// sharing an input quantise it once; `x` gives the shape and dtype.
pub fn fp8_linear_quantized(
    x: &Tensor,
    xq: &Fp8Weight,
    w: &Fp8Weight,
    bias: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    fp8_linear_with(x, Some(xq), w, bias, act)
}

/// `act(x · Wᵀ + b)` through FP8 for `x [..., in]`, `w [out, in]`, `bias [out]`; the result in
/// x's dtype. On a GPU, bf16/f16 activations with `in` and `out` multiples of 16 (every Wan
/// linear) take cuBLASLt's e4m3 matmul; everything else computes the same quantised product in
/// f32.
pub fn fp8_linear(x: &Tensor, w: &Fp8Weight, bias: &Tensor, act: Activation) -> Result<Tensor> {
    fp8_linear_with(x, None, w, bias, act)
}

fn fp8_linear_with(
    x: &Tensor,
    xq: Option<&Fp8Weight>,
    w: &Fp8Weight,
    bias: &Tensor,
    act: Activation,
) -> Result<Tensor> {
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
        let quantized;
        let xq = match xq {
            Some(q) => q,
            None => {
                quantized = quantize_rows(&x2)?;
                &quantized
            }
        };
        let y = gpu::linear(xq, x2.dtype(), w, bias, act)?;
        return Ok(y.reshape(out_dims)?);
    }
    let _ = xq;
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
    use anyhow::{bail, Result};
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{DType, Tensor};

    use super::Activation;
    use crate::blaslt::{matmul, Epilogue, MatmulShape, Operands};
    use crate::cuda_util::{address, alloc, cuda_device, launched, suffix};
    use crate::weights::fp8::Fp8Weight;

    use crate::weights::fp8::gpu::{MODULE, PTX};
    const THREADS: u32 = 256;

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

    /// `VIDGEN_FP8_EPILOGUE=two-pass`: the plain product, then one pass for the scales, bias and
    /// GELU (the default fuses them into cuBLASLt's epilogue).
    fn fused_epilogue_off() -> bool {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OFF.get_or_init(|| std::env::var("VIDGEN_FP8_EPILOGUE").is_ok_and(|v| v == "two-pass"))
    }

    /// Largest relative difference accepted between the epilogue-fused product and the two-pass
    /// one on a shape's first call (they differ by the two-pass path's rounding of the unscaled
    /// product, and GELU's input rounding: a few 1e-3 in bf16).
    const FUSED_TOLERANCE: f64 = 1e-2;

    /// (out, rows, k, dtype, activation) of one FP8 linear call.
    type ShapeKey = (usize, usize, usize, DType, Activation);

    thread_local! {
        /// Per shape: whether the epilogue-fused product agreed with the two-pass one (checked
        /// on the shape's first call; `false`: two passes from then on).
        static FUSED_CHECKED: std::cell::RefCell<std::collections::HashMap<ShapeKey, bool>> =
            Default::default();
    }

    /// `xq`: the activations' rows quantised by [`quantize_rows`]; the output in `dtype`. The
    /// scales, bias and GELU ride on cuBLASLt's epilogue where it has an algorithm for that; the
    /// first call of each shape also computes the two-pass product and keeps the fused one only
    /// if they agree (a cuBLASLt that applied the scales differently cannot corrupt output
    /// silently).
    pub fn linear(
        xq: &Fp8Weight,
        dtype: DType,
        w: &Fp8Weight,
        bias: &Tensor,
        act: Activation,
    ) -> Result<Tensor> {
        let &[rows, k] = xq.dims() else {
            bail!(
                "FP8 matmul: quantised input must be [rows, in], got {:?}",
                xq.dims()
            );
        };
        let key = (w.dims()[0], rows, k, dtype, act);
        let checked = FUSED_CHECKED.with(|c| c.borrow().get(&key).copied());
        if fused_epilogue_off() || checked == Some(false) {
            return two_pass(xq, dtype, w, bias, act);
        }
        let Some(y) = fused(xq, dtype, w, bias, act)? else {
            FUSED_CHECKED.with(|c| c.borrow_mut().insert(key, false));
            return two_pass(xq, dtype, w, bias, act);
        };
        if checked == Some(true) {
            return Ok(y);
        }
        let reference = two_pass(xq, dtype, w, bias, act)?;
        let err = crate::tensor_util::rel_err(
            &y.to_dtype(DType::F32)?,
            &reference.to_dtype(DType::F32)?,
        )?;
        let agrees = err.is_finite() && err <= FUSED_TOLERANCE;
        FUSED_CHECKED.with(|c| c.borrow_mut().insert(key, agrees));
        if agrees {
            return Ok(y);
        }
        tracing::warn!(
            "FP8 matmul {key:?}: cuBLASLt's scaled epilogue differs from the two-pass product \
             (rel err {err:.2e} > {FUSED_TOLERANCE:.0e}); using two passes for this shape"
        );
        Ok(reference)
    }

    /// What both forms of the product share: the weight, a fresh `[rows, out]` output in the
    /// activations' dtype and the activations' per-row scales.
    struct Product {
        dev: candle_core::CudaDevice,
        wq: Tensor,
        y: Tensor,
        py: u64,
        s_row: Tensor,
        shape: MatmulShape,
    }

    impl Product {
        fn new(xq: &Fp8Weight, dtype: DType, w: &Fp8Weight) -> Result<Self> {
            let (rows, k) = (xq.dims()[0], xq.dims()[1]);
            let out = w.dims()[0];
            let dev = cuda_device(xq.weight())?;
            require_fp8_tensor_cores(&dev)?;
            let (y, py) = alloc(&dev, dtype, &[rows, out])?;
            Ok(Self {
                wq: w.weight().contiguous()?,
                s_row: xq.scale().contiguous()?,
                y,
                py,
                dev,
                shape: MatmulShape {
                    out,
                    rows,
                    k,
                    input: DType::F8E4M3,
                    output: dtype,
                    epilogue: Epilogue::None,
                    scaled: false,
                },
            })
        }

        /// Runs the matmul of `xq` into `y`, with `epilogue` and, given `(bias, weight scales)`
        /// addresses, the scales applied by cuBLASLt. `Ok(false)`: cuBLASLt has no algorithm.
        fn run(
            &self,
            xq: &Fp8Weight,
            epilogue: Epilogue,
            scaled: Option<(u64, u64)>,
        ) -> Result<bool> {
            let shape = MatmulShape {
                epilogue,
                scaled: scaled.is_some(),
                ..self.shape
            };
            let (bias, weight_scales) = scaled.unwrap_or((0, 0));
            let operands = Operands {
                weight: address(&self.wq)?,
                activations: address(xq.weight())?,
                y: self.py,
                bias,
                weight_scales,
                activation_scales: if scaled.is_some() {
                    address(&self.s_row)?
                } else {
                    0
                },
            };
            matmul(&self.dev.cuda_stream(), shape, operands)
        }
    }

    /// The product with the scales, bias and GELU in cuBLASLt's epilogue (per-channel weight
    /// scales as one value per output column, a per-tensor scale repeated); `None` where
    /// cuBLASLt has no algorithm for it.
    fn fused(
        xq: &Fp8Weight,
        dtype: DType,
        w: &Fp8Weight,
        bias: &Tensor,
        act: Activation,
    ) -> Result<Option<Tensor>> {
        let product = Product::new(xq, dtype, w)?;
        let s_col = w
            .scale()
            .to_dtype(DType::F32)?
            .broadcast_as(product.shape.out)?
            .contiguous()?;
        let bias = bias.to_dtype(dtype)?.contiguous()?;
        let scaled = Some((address(&bias)?, address(&s_col)?));
        // A cuBLASLt without outer-vector scaling refuses the descriptor's scale modes: the
        // caller falls back to two passes, as when there is no algorithm.
        match product.run(xq, Epilogue::of(act), scaled) {
            Ok(ran) => Ok(ran.then_some(product.y)),
            Err(e) => {
                tracing::warn!("FP8 matmul: no scaled cuBLASLt epilogue ({e:#}); using two passes");
                Ok(None)
            }
        }
    }

    /// The plain FP8 product rounded to `dtype`, then one pass for the scales, bias and GELU.
    fn two_pass(
        xq: &Fp8Weight,
        dtype: DType,
        w: &Fp8Weight,
        bias: &Tensor,
        act: Activation,
    ) -> Result<Tensor> {
        let product = Product::new(xq, dtype, w)?;
        let MatmulShape { rows, k, out, .. } = product.shape;
        if !product.run(xq, Epilogue::None, None)? {
            bail!("cuBLASLt has no FP8 matmul for {rows}x{k} · ({out}x{k})ᵀ -> {dtype:?}");
        }
        let Product {
            dev, y, py, s_row, ..
        } = product;
        let bias = bias.to_dtype(DType::F32)?.contiguous()?;
        let s_col = w.scale().contiguous()?;
        let per_col = i32::from(s_col.elem_count() > 1);
        let (pb, pr, pc) = (address(&bias)?, address(&s_row)?, address(&s_col)?);
        let (cols, gelu) = (out as i32, i32::from(act == Activation::GeluTanh));
        let name = format!("fp8_epilogue_{}", suffix(dtype)?);
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
        let (major, minor) = crate::cuda_util::compute_capability(dev)?;
        if (major, minor) < (8, 9) {
            bail!(
                "--weights fp8-matmul needs FP8 tensor cores (compute capability 8.9 or later: \
                 Ada, Hopper, Blackwell); this GPU is {major}.{minor}: use --weights fp8"
            );
        }
        Ok(())
    }
}
