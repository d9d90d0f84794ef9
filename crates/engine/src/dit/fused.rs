//! The DiT block's row-wise operations, fused into one kernel each on CUDA (kernels/dit_fused.cu)
//! and composed from candle ops elsewhere. Both paths compute the reference's expression in the
//! same order, in f32, casting to the model dtype once at the end:
//! - `layer_norm_modulate`: `T((LN(x.f32)·w + b)·(1 + scale) + shift)`
//! - `rms_norm`: `T(RMSNorm(x.f32)·w)`
//! - `gated_add`: `T(x.f32 + y.f32·gate)`
//! - `bias_add` / `bias_gelu`: a linear layer's bias (then the FFN's tanh-GELU) after its matmul
//!
//! Modulation comes from one f32 table `[B, Lt, K, D]` and chunk indices into its third axis, which
//! the kernels read in place (no copies of the narrowed views). Lt divides the token count L: entry
//! j serves the run of L/Lt consecutive tokens from j·L/Lt (Lt = 1: one timestep per sample; Lt =
//! latent frames: one per frame, as Wan2.2 TI2V's per-token timesteps are; Lt = L: one per token).

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

/// Chunk `index` of the modulation table `[B, Lt, K, D]` as `[B, Lt, D]`.
pub fn chunk(table: &Tensor, index: usize) -> Result<Tensor> {
    Ok(table.narrow(2, index, 1)?.squeeze(2)?)
}

fn check_table(x: &Tensor, table: &Tensor) -> Result<()> {
    let (b, l, d) = x.dims3()?;
    let (tb, tl, _, td) = table.dims4()?;
    ensure!(
        tb == b && tl > 0 && l % tl == 0 && td == d && table.dtype() == DType::F32,
        "modulation table {:?} {:?} does not fit tokens {:?}",
        table.dims(),
        table.dtype(),
        x.dims()
    );
    Ok(())
}

/// LayerNorm over the last dim (`affine`: weight and bias, f32 `[D]`), then, with `modulation`
/// = (table, shift index, scale index), `·(1 + scale) + shift`; result in x's dtype.
pub fn layer_norm_modulate(
    x: &Tensor,
    affine: Option<(&Tensor, &Tensor)>,
    modulation: Option<(&Tensor, usize, usize)>,
    eps: f32,
) -> Result<Tensor> {
    if let Some((table, _, _)) = modulation {
        check_table(x, table)?;
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return gpu::layer_norm_modulate(x, affine, modulation, eps);
    }
    let d = x.dim(2)?;
    let (w, b) = match affine {
        Some((w, b)) => (w.clone(), b.clone()),
        None => (
            Tensor::ones(d, DType::F32, x.device())?,
            Tensor::zeros(d, DType::F32, x.device())?,
        ),
    };
    let n = candle_nn::ops::layer_norm(&x.to_dtype(DType::F32)?, &w, &b, eps)?;
    let n = match modulation {
        Some((table, shift, scale)) => {
            let (grouped, scale) = grouped_chunk(&n, table, scale)?;
            let (_, shift) = grouped_chunk(&n, table, shift)?;
            grouped
                .broadcast_mul(&(scale + 1.0)?)?
                .broadcast_add(&shift)?
                .reshape(n.dims())?
        }
        None => n,
    };
    Ok(n.to_dtype(x.dtype())?)
}

/// `x` [B, L, D] viewed as [B, Lt, L/Lt, D], and chunk `index` of the table as [B, Lt, 1, D]: the
/// two broadcast so that each entry meets its run of tokens.
fn grouped_chunk(x: &Tensor, table: &Tensor, index: usize) -> Result<(Tensor, Tensor)> {
    let (b, l, d) = x.dims3()?;
    let lt = table.dim(1)?;
    Ok((
        x.reshape((b, lt, l / lt, d))?,
        chunk(table, index)?.unsqueeze(2)?,
    ))
}

/// RMSNorm over the last dim with an f32 weight `[D]`; result in x's dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return gpu::rms_norm(x, weight, eps);
    }
    let y = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, weight, eps)?;
    Ok(y.to_dtype(x.dtype())?)
}

/// RMSNorm over the last dim (f32 weight `[D]`), rounded to x's dtype, then RoPE per head with
/// `cos`/`sin` `[L, head_dim/2]` f32: `[B, L, D]` -> `[B, L, heads, head_dim]`.
pub fn rms_norm_rope(
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
    rope: &super::rope::RopeTable,
    heads: usize,
) -> Result<Tensor> {
    let (b, l, d) = x.dims3()?;
    ensure!(
        d % heads == 0 && rope.cos.dims() == [l, d / heads / 2],
        "rms_norm_rope: {:?} with {heads} heads vs RoPE table {:?}",
        x.dims(),
        rope.cos.dims()
    );
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return gpu::rms_rope(x, weight, eps, &rope.cos, &rope.sin, heads);
    }
    let y = rms_norm(x, weight, eps)?.reshape((b, l, heads, d / heads))?;
    rope.apply(&y)
}

/// `x + y·gate` with gate = chunk `index` of the modulation table; result in x's dtype.
pub fn gated_add(x: &Tensor, y: &Tensor, table: &Tensor, index: usize) -> Result<Tensor> {
    check_table(x, table)?;
    ensure!(
        x.dims() == y.dims(),
        "gated_add: {:?} vs {:?}",
        x.dims(),
        y.dims()
    );
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return gpu::gated_add(x, y, table, index);
    }
    let (y, gate) = grouped_chunk(&y.to_dtype(DType::F32)?, table, index)?;
    let out = x
        .to_dtype(DType::F32)?
        .add(&y.broadcast_mul(&gate)?.reshape(x.dims())?)?;
    Ok(out.to_dtype(x.dtype())?)
}

/// `x + b` (b `[D]`, broadcast over rows); result in x's dtype. Takes `x` by value: on the GPU a
/// contiguous `x` (a fresh matmul output) is overwritten in place, saving one activation buffer.
pub fn bias_add(x: Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return gpu::bias_act(x, b, "bias_add");
    }
    Ok(x.broadcast_add(&b.to_dtype(x.dtype())?)?)
}

/// `gelu_tanh(x + b)`; result in x's dtype (in place on the GPU, as [`bias_add`]).
pub fn bias_gelu(x: Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return gpu::bias_act(x, b, "bias_gelu");
    }
    Ok(x.broadcast_add(&b.to_dtype(x.dtype())?)?.gelu()?)
}

#[cfg(feature = "cuda")]
mod gpu {
    use anyhow::Result;
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{DType, Tensor};

    use crate::cuda_util::{address, alloc, cuda_device, launched, suffix};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dit_fused.ptx"));
    const MODULE: &str = "vidgen_dit_fused";
    const THREADS: u32 = 256;

    /// A fresh output tensor like `x` (contiguous) and its address.
    fn output_like(x: &Tensor) -> Result<(Tensor, u64)> {
        alloc(&cuda_device(x)?, x.dtype(), x.dims())
    }

    fn config(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Chunk `index` of a contiguous table [B, Lt, K, D] as the kernels address it: (address,
    /// entry stride). Its B·Lt entries are consecutive rows of K·D, each serving a run of L/Lt
    /// tokens, so the kernels take the run as their `tokens` (entry = row / run).
    fn table_chunk(table: &Tensor, index: usize) -> Result<(u64, i64)> {
        let (_, _, k, d) = table.dims4()?;
        let base = address(table)? + (index * d * 4) as u64;
        Ok((base, (k * d) as i64))
    }

    /// Tokens served by one entry of the table for `x` [B, L, D].
    fn tokens_per_entry(x: &Tensor, table: &Tensor) -> Result<i64> {
        Ok((x.dim(1)? / table.dim(1)?) as i64)
    }

    /// The name of `{kernel}` for x's dtype and a launch of one CTA per row of `x`.
    fn kernel(x: &Tensor, kernel: &str) -> Result<(String, LaunchConfig)> {
        let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
        Ok((format!("{kernel}_{}", suffix(x.dtype())?), config(rows)))
    }

    pub fn layer_norm_modulate(
        x: &Tensor,
        affine: Option<(&Tensor, &Tensor)>,
        modulation: Option<(&Tensor, usize, usize)>,
        eps: f32,
    ) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (_, l, d) = x.dims3()?;
        let (out, py) = output_like(&x)?;
        let px = address(&x)?;
        let affine = affine
            .map(|(w, b)| -> Result<_> { Ok((w.contiguous()?, b.contiguous()?)) })
            .transpose()?;
        let (pw, pb) = match &affine {
            Some((w, b)) => (address(w)?, address(b)?),
            None => (0, 0),
        };
        let table = modulation.map(|(t, _, _)| t.contiguous()).transpose()?;
        let ((psh, sh_stride), (psc, sc_stride)) = match (&table, modulation) {
            (Some(t), Some((_, shift, scale))) => (table_chunk(t, shift)?, table_chunk(t, scale)?),
            _ => ((0, 0), (0, 0)),
        };
        let tokens = match &table {
            Some(t) => tokens_per_entry(&x, t)?,
            None => l as i64,
        };
        let d = d as i32;
        let (name, cfg) = kernel(&x, "ln_modulate")?;
        let func = cuda_device(&x)?.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&px)
            .arg(&py)
            .arg(&pw)
            .arg(&pb)
            .arg(&psh)
            .arg(&sh_stride)
            .arg(&psc)
            .arg(&sc_stride)
            .arg(&d)
            .arg(&tokens)
            .arg(&eps);
        // SAFETY: the arguments match the kernel's signature in kernels/dit_fused.cu.
        launched(unsafe { b.launch(cfg) }.map(|_| ()))?;
        Ok(out)
    }

    pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
        let x = x.contiguous()?;
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        let d = x.dim(candle_core::D::Minus1)? as i32;
        let (out, py) = output_like(&x)?;
        let (px, pw) = (address(&x)?, address(&weight)?);
        let (name, cfg) = kernel(&x, "rms_norm")?;
        let func = cuda_device(&x)?.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&px).arg(&py).arg(&pw).arg(&d).arg(&eps);
        // SAFETY: as above.
        launched(unsafe { b.launch(cfg) }.map(|_| ()))?;
        Ok(out)
    }

    pub fn gated_add(x: &Tensor, y: &Tensor, table: &Tensor, index: usize) -> Result<Tensor> {
        let x = x.contiguous()?;
        let y = y.to_dtype(x.dtype())?.contiguous()?;
        let d = x.dim(2)? as i32;
        let table = table.contiguous()?;
        let (pg, g_stride) = table_chunk(&table, index)?;
        let tokens = tokens_per_entry(&x, &table)?;
        let (out, po) = output_like(&x)?;
        let (px, pu) = (address(&x)?, address(&y)?);
        let (name, cfg) = kernel(&x, "gated_add")?;
        let func = cuda_device(&x)?.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&px)
            .arg(&pu)
            .arg(&po)
            .arg(&pg)
            .arg(&g_stride)
            .arg(&d)
            .arg(&tokens);
        // SAFETY: as above.
        launched(unsafe { b.launch(cfg) }.map(|_| ()))?;
        Ok(out)
    }

    pub fn bias_act(x: Tensor, bias: &Tensor, kernel_name: &str) -> Result<Tensor> {
        // In place when `x` is contiguous from its first element (the caller gave up its copy);
        // otherwise into a fresh buffer.
        let (x, out, py) = if x.is_contiguous() {
            let p = address(&x)?;
            (x.clone(), x, p)
        } else {
            let x = x.contiguous()?;
            let (out, p) = output_like(&x)?;
            (x, out, p)
        };
        let bias = bias.to_dtype(DType::F32)?.contiguous()?;
        let d = x.dim(candle_core::D::Minus1)?;
        anyhow::ensure!(
            bias.elem_count() == d,
            "bias: {} values for rows of {d}",
            bias.elem_count()
        );
        let d = d as i32;
        let (px, pb) = (address(&x)?, address(&bias)?);
        let (name, cfg) = kernel(&x, kernel_name)?;
        let func = cuda_device(&x)?.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&px).arg(&py).arg(&pb).arg(&d);
        // SAFETY: as above; in place is safe: each element is read then written by one thread.
        launched(unsafe { b.launch(cfg) }.map(|_| ()))?;
        Ok(out)
    }

    pub fn rms_rope(
        x: &Tensor,
        weight: &Tensor,
        eps: f32,
        cos: &Tensor,
        sin: &Tensor,
        heads: usize,
    ) -> Result<Tensor> {
        let x = x.contiguous()?;
        let (b, l, d) = x.dims3()?;
        let weight = weight.to_dtype(DType::F32)?.contiguous()?;
        let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
        let (out, py) = output_like(&x)?;
        let (px, pw, pc, ps) = (
            address(&x)?,
            address(&weight)?,
            address(&cos)?,
            address(&sin)?,
        );
        let (di, head_dim, tokens) = (d as i32, (d / heads) as i32, l as i64);
        let (name, cfg) = kernel(&x, "rms_rope")?;
        let func = cuda_device(&x)?.get_or_load_custom_func(&name, MODULE, PTX)?;
        let mut bld = func.builder();
        bld.arg(&px)
            .arg(&py)
            .arg(&pw)
            .arg(&pc)
            .arg(&ps)
            .arg(&di)
            .arg(&head_dim)
            .arg(&tokens)
            .arg(&eps);
        // SAFETY: as above.
        launched(unsafe { bld.launch(cfg) }.map(|_| ()))?;
        Ok(out.reshape((b, l, heads, d / heads))?)
    }
}
