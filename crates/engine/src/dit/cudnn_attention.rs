//! Fused attention through cuDNN's graph (backend) API, the fastest attention measured on the H100
//! (588 TFLOP/s through PyTorch at 32760 tokens × 40 heads × 128, against 373 for FlashAttention-2;
//! 585 through this module).
//!
//! cuDNN recognises a fixed operation graph as "fused flash attention" and runs it as one kernel
//! with no seq² buffer: Q·Kᵀ (f32 scores), × scale, softmax written out as max / subtract / exp /
//! sum / divide (f32), the probabilities cast to bf16, then ·V into bf16. Inputs are described by
//! strides, so the projections' [B, L, H, 128] layout (any token stride) is read in place and Kᵀ is
//! only a different stride order. cuDNN up to 9.15 computes wrong rows when the key length is not a
//! multiple of 128 unless a padding mask is present (cudnn-frontend adds one for the same reason),
//! so there the graph carries a padding mask whose lengths are the full lengths — it masks nothing.
//!
//! From cuDNN 9.13.1 the same attention is also one backend operation (SDPA forward), which
//! cudnn-frontend prefers there; it is tried first and the composite graph is the fallback.
//!
//! A plan is built once per shape and kept; a shape cuDNN cannot plan is remembered and the caller
//! falls back to our own kernel. The first execution of every plan is compared with our own kernel
//! on the first and last query rows; an engine configuration that disagrees is replaced by the
//! next one that agrees, and a shape none agrees on is dropped (a warning, then our kernel), so a
//! cuDNN version that computes this graph wrongly cannot corrupt output silently.
//! Execution errors surface as errors. This is the default kernel (see `flash::preferred`); on
//! the H100 with cuDNN 9.19 the SDPA operation plans every shape the bench checks and runs at
//! 585 TFLOP/s.

use anyhow::Result;
use candle_core::Tensor;

/// Runs softmax(q·kᵀ/√128)·v with cuDNN: `Ok(None)` when cuDNN has no plan for these inputs (not
/// CUDA, an old cuDNN, a shape its engines refuse), so the caller can use another kernel.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
    on_gpu(q, k, v, false)
}

/// [`attention`] in e4m3 with per-tensor scales (`VIDGEN_ATTENTION=cudnn_fp8`): q, k and v are
/// quantised, cuDNN runs its FP8 flash-attention graph and the e4m3 output is dequantised to bf16.
/// `Ok(None)` where cuDNN has no FP8 plan (before 9.1, before Hopper), so the caller can use the
/// bf16 attention. Its first result per shape is checked against our bf16 kernel within 1e-1.
pub fn attention_fp8(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
    on_gpu(q, k, v, true)
}

/// [`attention`] or [`attention_fp8`] where the inputs are on a CUDA device; `None` elsewhere.
fn on_gpu(q: &Tensor, k: &Tensor, v: &Tensor, fp8: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        if q.device().is_cuda() {
            return match fp8 {
                true => gpu::attention_fp8(q, k, v),
                false => gpu::attention(q, k, v),
            };
        }
    }
    let _ = (q, k, v, fp8);
    Ok(None)
}

/// The cuDNN version loaded at run time (e.g. 91500), or `None` without CUDA.
pub fn cudnn_version() -> Option<usize> {
    #[cfg(feature = "cuda")]
    {
        Some(candle_core::cuda::cudarc::cudnn::result::get_version())
    }
    #[cfg(not(feature = "cuda"))]
    None
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::ffi::{c_void, CStr};

    use anyhow::{bail, Result};
    use candle_core::cuda::cudarc::cudnn::{result as cudnn, sys};

    use candle_core::{DType, Tensor};
    use sys::cudnnBackendAttributeName_t as A;
    use sys::cudnnBackendAttributeType_t as T;
    use sys::cudnnBackendDescriptorType_t as D;

    use candle_core::cuda::cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};

    use crate::cuda_util::{address, alloc, compute_capability, launched, CudnnHandle};
    use crate::dit::flash::HEAD_DIM;
    use crate::weights::fp8::gpu::{MODULE, PTX};

    // Values of the C enums passed as attribute payloads (cudnn_graph.h, stable across cuDNN 9).
    const DT_FLOAT: i32 = 0;
    const DT_INT32: i32 = 4;
    const DT_BF16: i32 = 9;
    const DT_BOOL: i32 = 11;
    const DT_FP8_E4M3: i32 = 12;
    const PW_ADD: i32 = 0;
    const PW_MUL: i32 = 1;
    const PW_DIV: i32 = 6;
    const PW_SUB: i32 = 9;
    const PW_EXP: i32 = 13;
    const PW_LOG: i32 = 15;
    const PW_CMP_LT: i32 = 304;
    const PW_AND: i32 = 400;
    const PW_GEN_INDEX: i32 = 501;
    const PW_BINARY_SELECT: i32 = 601;
    const REDUCE_ADD: i32 = 0;
    const REDUCE_MAX: i32 = 3;
    const REDUCE_AMAX: i32 = 4;
    const HEUR_MODE_FALLBACK: i32 = 2;
    const HEUR_MODE_A: i32 = 3;
    /// Engine configurations asked from the heuristics (the first that builds a plan wins).
    const MAX_CONFIGS: usize = 8;
    /// The first execution of each plan is checked against our own kernel on this many query rows,
    /// half from the start and half from the end (a few percent of one attention); beyond
    /// `VERIFY_TOLERANCE` the plan is dropped for good.
    const VERIFY_ROWS: usize = 1024;
    const VERIFY_TOLERANCE: f64 = 2e-2;
    /// The same check for FP8 attention, against bf16: e4m3 keeps 3 mantissa bits (a relative
    /// step of 6-12%), so its error is several times bf16's.
    const FP8_VERIFY_TOLERANCE: f64 = 1e-1;
    /// Shapes with at most this many keys (the cross-attention's 512 text tokens) are not dumped
    /// by [`dump_inputs`].
    const DUMP_MIN_KEYS: usize = 1024;
    /// FP8 attention graphs: cuDNN from 9.1, except 9.10.0 (cudnn-frontend refuses both).
    const FP8_MIN_VERSION: usize = 90100;
    const FP8_BROKEN_VERSION: usize = 91000;
    /// Timed runs per engine configuration when a plan is tuned.
    const TUNE_REPS: usize = 2;
    /// Versions before this one need the padding-mask workaround for key lengths % 128 != 0.
    const FIXED_UNPADDED_VERSION: usize = 91600;
    /// The first version with the single SDPA forward operation.
    const UNIFIED_SDPA_VERSION: usize = 91301;

    // Unique ids of the graph's non-virtual tensors (the variant pack names them).
    const UID_Q: i64 = 1;
    const UID_K: i64 = 2;
    const UID_V: i64 = 3;
    const UID_O: i64 = 4;
    const UID_SCALE: i64 = 5;
    const UID_SEQ_Q: i64 = 6;
    const UID_SEQ_KV: i64 = 7;
    const UID_NEG_INF: i64 = 8;
    // FP8 graphs only: per-tensor scales (device scalars in the scales buffer, see `Slot`) and the
    // amax outputs cuDNN's FP8 graph pattern requires.
    const UID_DESCALE_Q: i64 = 9;
    const UID_DESCALE_K: i64 = 10;
    const UID_DESCALE_V: i64 = 11;
    const UID_SCALE_S: i64 = 12;
    const UID_DESCALE_S: i64 = 13;
    const UID_SCALE_O: i64 = 14;
    const UID_AMAX_S: i64 = 15;
    const UID_AMAX_O: i64 = 16;

    fn check(status: sys::cudnnStatus_t, what: &str) -> Result<()> {
        if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
            return Ok(());
        }
        let mut buf = [0 as std::ffi::c_char; 1024];
        // SAFETY: cuDNN writes at most `buf.len()` bytes, NUL-terminated; the status string is a
        // static C string.
        let (name, detail) = unsafe {
            sys::cudnnGetLastErrorString(buf.as_mut_ptr(), buf.len());
            (
                CStr::from_ptr(sys::cudnnGetErrorString(status)).to_string_lossy(),
                CStr::from_ptr(buf.as_ptr()).to_string_lossy(),
            )
        };
        bail!("cuDNN attention: {what}: {name} {detail}")
    }

    /// An owned backend descriptor.
    struct Desc(sys::cudnnBackendDescriptor_t);

    impl Drop for Desc {
        fn drop(&mut self) {
            // SAFETY: created by cudnnBackendCreateDescriptor and destroyed once, here.
            unsafe { sys::cudnnBackendDestroyDescriptor(self.0) };
        }
    }

    impl Desc {
        fn new(kind: D) -> Result<Self> {
            let mut d: sys::cudnnBackendDescriptor_t = std::ptr::null_mut();
            // SAFETY: cuDNN writes a fresh descriptor into `d`.
            check(
                unsafe { sys::cudnnBackendCreateDescriptor(kind, &mut d) },
                "create descriptor",
            )?;
            Ok(Self(d))
        }

        /// Sets attribute `name` to `values` (C type given by `ty`; `V` must match it).
        fn set<V: Copy>(self, name: A, ty: T, values: &[V]) -> Result<Self> {
            // SAFETY: `values` is a live slice of `values.len()` elements of the type `ty` names.
            check(
                unsafe {
                    sys::cudnnBackendSetAttribute(
                        self.0,
                        name,
                        ty,
                        values.len() as i64,
                        values.as_ptr() as *const c_void,
                    )
                },
                &format!("set {name:?}"),
            )?;
            Ok(self)
        }

        fn set_descs(self, name: A, descs: &[&Desc]) -> Result<Self> {
            let raw: Vec<sys::cudnnBackendDescriptor_t> = descs.iter().map(|d| d.0).collect();
            self.set(name, T::CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw)
        }

        fn finalize(self) -> Result<Self> {
            // SAFETY: a descriptor of ours with its attributes set.
            check(unsafe { sys::cudnnBackendFinalize(self.0) }, "finalize")?;
            Ok(self)
        }
    }

    /// Builds the operation graph, keeping every descriptor alive with the plan.
    #[derive(Default)]
    struct Graph {
        ops: Vec<Desc>,
        keep: Vec<Desc>,
        next_uid: i64,
    }

    impl Graph {
        fn tensor(
            &mut self,
            dims: [i64; 4],
            strides: [i64; 4],
            dtype: i32,
            uid: Option<i64>,
            virtual_: bool,
            by_value: bool,
        ) -> Result<usize> {
            let uid = uid.unwrap_or_else(|| {
                self.next_uid += 1;
                100 + self.next_uid
            });
            let mut t = Desc::new(D::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?
                .set(
                    A::CUDNN_ATTR_TENSOR_DATA_TYPE,
                    T::CUDNN_TYPE_DATA_TYPE,
                    &[dtype],
                )?
                .set(A::CUDNN_ATTR_TENSOR_DIMENSIONS, T::CUDNN_TYPE_INT64, &dims)?
                .set(A::CUDNN_ATTR_TENSOR_STRIDES, T::CUDNN_TYPE_INT64, &strides)?
                .set(A::CUDNN_ATTR_TENSOR_UNIQUE_ID, T::CUDNN_TYPE_INT64, &[uid])?
                .set(
                    A::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT,
                    T::CUDNN_TYPE_INT64,
                    &[16i64],
                )?
                .set(
                    A::CUDNN_ATTR_TENSOR_IS_VIRTUAL,
                    T::CUDNN_TYPE_BOOLEAN,
                    &[virtual_],
                )?;
            if by_value {
                t = t.set(
                    A::CUDNN_ATTR_TENSOR_IS_BY_VALUE,
                    T::CUDNN_TYPE_BOOLEAN,
                    &[true],
                )?;
            }
            self.keep.push(t.finalize()?);
            Ok(self.keep.len() - 1)
        }

        fn virtual_tensor(
            &mut self,
            dims: [i64; 4],
            strides: [i64; 4],
            dtype: i32,
        ) -> Result<usize> {
            self.tensor(dims, strides, dtype, None, true, false)
        }

        /// y = mode(x, b) (b optional; `t` is BINARY_SELECT's mask), computed in `prec`.
        fn pointwise(
            &mut self,
            mode: i32,
            prec: i32,
            axis: Option<i64>,
            (x, b, t): (usize, Option<usize>, Option<usize>),
            y: usize,
        ) -> Result<()> {
            let mut pw = Desc::new(D::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?
                .set(
                    A::CUDNN_ATTR_POINTWISE_MODE,
                    T::CUDNN_TYPE_POINTWISE_MODE,
                    &[mode],
                )?
                .set(
                    A::CUDNN_ATTR_POINTWISE_MATH_PREC,
                    T::CUDNN_TYPE_DATA_TYPE,
                    &[prec],
                )?;
            if let Some(axis) = axis {
                pw = pw.set(A::CUDNN_ATTR_POINTWISE_AXIS, T::CUDNN_TYPE_INT64, &[axis])?;
            }
            let pw = pw.finalize()?;
            let mut op = Desc::new(D::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)?
                .set_descs(A::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &[&pw])?
                .set_descs(A::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, &[&self.keep[x]])?;
            if let Some(b) = b {
                op = op.set_descs(A::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, &[&self.keep[b]])?;
            }
            if let Some(t) = t {
                op = op.set_descs(A::CUDNN_ATTR_OPERATION_POINTWISE_TDESC, &[&self.keep[t]])?;
            }
            let op = op
                .set_descs(A::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, &[&self.keep[y]])?
                .finalize()?;
            self.keep.push(pw);
            self.ops.push(op);
            Ok(())
        }

        fn reduction(&mut self, operator: i32, x: usize, y: usize) -> Result<()> {
            let r = Desc::new(D::CUDNN_BACKEND_REDUCTION_DESCRIPTOR)?
                .set(
                    A::CUDNN_ATTR_REDUCTION_OPERATOR,
                    T::CUDNN_TYPE_REDUCTION_OPERATOR_TYPE,
                    &[operator],
                )?
                .set(
                    A::CUDNN_ATTR_REDUCTION_COMP_TYPE,
                    T::CUDNN_TYPE_DATA_TYPE,
                    &[DT_FLOAT],
                )?
                .finalize()?;
            let op = Desc::new(D::CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR)?
                .set_descs(A::CUDNN_ATTR_OPERATION_REDUCTION_XDESC, &[&self.keep[x]])?
                .set_descs(A::CUDNN_ATTR_OPERATION_REDUCTION_YDESC, &[&self.keep[y]])?
                .set_descs(A::CUDNN_ATTR_OPERATION_REDUCTION_DESC, &[&r])?
                .finalize()?;
            self.keep.push(r);
            self.ops.push(op);
            Ok(())
        }

        fn matmul(&mut self, a: usize, b: usize, c: usize) -> Result<()> {
            let m = Desc::new(D::CUDNN_BACKEND_MATMUL_DESCRIPTOR)?
                .set(
                    A::CUDNN_ATTR_MATMUL_COMP_TYPE,
                    T::CUDNN_TYPE_DATA_TYPE,
                    &[DT_FLOAT],
                )?
                .finalize()?;
            let op = Desc::new(D::CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR)?
                .set_descs(A::CUDNN_ATTR_OPERATION_MATMUL_ADESC, &[&self.keep[a]])?
                .set_descs(A::CUDNN_ATTR_OPERATION_MATMUL_BDESC, &[&self.keep[b]])?
                .set_descs(A::CUDNN_ATTR_OPERATION_MATMUL_CDESC, &[&self.keep[c]])?
                .set_descs(A::CUDNN_ATTR_OPERATION_MATMUL_DESC, &[&m])?
                .finalize()?;
            self.keep.push(m);
            self.ops.push(op);
            Ok(())
        }
    }

    /// Shape and strides of one call (elements); strides of the [B, L, H, 128] inputs.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    struct Key {
        b: usize,
        h: usize,
        lq: usize,
        lk: usize,
        /// (batch, token) strides of q, k, v.
        strides: [(usize, usize); 3],
        /// e4m3 inputs and output with per-tensor scales (see [`attention_fp8`]).
        fp8: bool,
    }

    /// A finished plan and what its executions need.
    struct Plan {
        /// Set once an execution agreed with our own kernel (see [`VERIFY_ROWS`]).
        verified: std::cell::Cell<bool>,
        /// Every engine configuration of the heuristics' list that finalised, in its order; the
        /// first execution times each and keeps the fastest (see [`Plan::tune`]).
        candidates: Vec<Desc>,
        /// Index into `candidates` of the plan that runs.
        chosen: std::cell::Cell<usize>,
        tuned: std::cell::Cell<bool>,
        /// The largest workspace of the candidates, in bytes.
        workspace: usize,
        /// Full lengths for the padding-mask workaround: [B] int32 each (q, kv).
        lengths: Option<(Tensor, Tensor)>,
        _graph: Graph,
    }

    /// Builds a plan: from cuDNN 9.13.1 first as the single SDPA operation (what cudnn-frontend
    /// picks there for plain attention), then as the composite graph with the softmax statistics
    /// (as cudnn-frontend's inference graph has them), then without; the error names every refusal.
    fn build(handle: sys::cudnnHandle_t, key: &Key, dev: &candle_core::CudaDevice) -> Result<Plan> {
        let mut refusals = Vec::new();
        // The single SDPA operation takes fp16/bf16 only; FP8 is always the composite graph.
        if cudnn::get_version() >= UNIFIED_SDPA_VERSION && !key.fp8 {
            match build_unified(handle, key) {
                Ok(plan) => return Ok(plan),
                Err(e) => refusals.push(format!("SDPA operation: {e:#}")),
            }
        }
        for stats in [true, false] {
            match build_graph(handle, key, dev, stats) {
                Ok(plan) => return Ok(plan),
                Err(e) => refusals.push(format!(
                    "composite graph {} softmax stats: {e:#}",
                    if stats { "with" } else { "without" }
                )),
            }
        }
        bail!("{}", refusals.join("; "))
    }

    /// The [B, H, L, 128] descriptors of q, k, v (heads are adjacent 128-value rows inside a
    /// token) and of the contiguous [B, L, H, 128] output, plus the by-value scale; `k_transposed`
    /// describes k as [B, H, 128, L] (the composite graph's Kᵀ).
    fn io_tensors(g: &mut Graph, key: &Key, k_transposed: bool) -> Result<[usize; 5]> {
        let (b, h, lq, lk) = (key.b as i64, key.h as i64, key.lq as i64, key.lk as i64);
        let d = HEAD_DIM as i64;
        let [(qb, qt), (kb, kt), (vb, vt)] = key.strides.map(|(b, t)| (b as i64, t as i64));
        let dtype = if key.fp8 { DT_FP8_E4M3 } else { DT_BF16 };
        let io = |g: &mut Graph, dims, strides, uid| {
            g.tensor(dims, strides, dtype, Some(uid), false, false)
        };
        let q = io(g, [b, h, lq, d], [qb, d, qt, 1], UID_Q)?;
        let k = if k_transposed {
            io(g, [b, h, d, lk], [kb, d, 1, kt], UID_K)?
        } else {
            io(g, [b, h, lk, d], [kb, d, kt, 1], UID_K)?
        };
        let v = io(g, [b, h, lk, d], [vb, d, vt, 1], UID_V)?;
        let o = io(g, [b, h, lq, d], [lq * h * d, d, h * d, 1], UID_O)?;
        let one = [1i64; 4];
        let scale = g.tensor(one, one, DT_FLOAT, Some(UID_SCALE), false, true)?;
        Ok([q, k, v, o, scale])
    }

    /// The whole attention as cuDNN's one SDPA forward operation (cuDNN >= 9.13.1).
    fn build_unified(handle: sys::cudnnHandle_t, key: &Key) -> Result<Plan> {
        let mut g = Graph::default();
        let [q, k, v, o, scale] = io_tensors(&mut g, key, false)?;
        let op = Desc::new(D::CUDNN_BACKEND_OPERATION_SDPA_FWD_DESCRIPTOR)?
            .set_descs(A::CUDNN_ATTR_OPERATION_SDPA_FWD_QDESC, &[&g.keep[q]])?
            .set_descs(A::CUDNN_ATTR_OPERATION_SDPA_FWD_KDESC, &[&g.keep[k]])?
            .set_descs(A::CUDNN_ATTR_OPERATION_SDPA_FWD_VDESC, &[&g.keep[v]])?
            .set_descs(A::CUDNN_ATTR_OPERATION_SDPA_FWD_ODESC, &[&g.keep[o]])?
            .set_descs(
                A::CUDNN_ATTR_OPERATION_SDPA_FWD_SCALEDESC,
                &[&g.keep[scale]],
            )?
            .finalize()?;
        g.ops.push(op);
        plan_graph(handle, g, key, None)
    }

    /// `stats`: also compute max + log(sum) into a virtual tensor nobody reads. cudnn-frontend's
    /// composite softmax adds these nodes even for inference, so the fused-attention engines may
    /// match only graphs that have them.
    fn build_graph(
        handle: sys::cudnnHandle_t,
        key: &Key,
        dev: &candle_core::CudaDevice,
        stats: bool,
    ) -> Result<Plan> {
        let (b, h, lq, lk) = (key.b as i64, key.h as i64, key.lq as i64, key.lk as i64);
        let mut g = Graph::default();
        let [q, k_t, v, o, scale] = io_tensors(&mut g, key, true)?;
        let one = [1i64; 4];
        let full = ([b, h, lq, lk], [h * lq * lk, lq * lk, lk, 1]);
        let row = ([b, h, lq, 1], [h * lq, lq, 1, 1]);

        let scalar = |g: &mut Graph, uid| g.tensor(one, one, DT_FLOAT, Some(uid), false, false);

        let scores = g.virtual_tensor(full.0, full.1, DT_FLOAT)?;
        g.matmul(q, k_t, scores)?;
        let mut scaled = g.virtual_tensor(full.0, full.1, DT_FLOAT)?;
        g.pointwise(PW_MUL, DT_FLOAT, None, (scores, Some(scale), None), scaled)?;
        if key.fp8 {
            // The e4m3 product times q's and k's per-tensor descales, in cudnn-frontend's order.
            for uid in [UID_DESCALE_Q, UID_DESCALE_K] {
                let descale = scalar(&mut g, uid)?;
                let y = g.virtual_tensor(full.0, full.1, DT_FLOAT)?;
                g.pointwise(PW_MUL, DT_FLOAT, None, (scaled, Some(descale), None), y)?;
                scaled = y;
            }
        }
        let padding = lk % 128 != 0 && cudnn::get_version() < FIXED_UNPADDED_VERSION;
        if padding {
            let len = [b, 1, 1, 1];
            let seq_q = g.tensor(len, one, DT_INT32, Some(UID_SEQ_Q), false, false)?;
            let seq_kv = g.tensor(len, one, DT_INT32, Some(UID_SEQ_KV), false, false)?;
            let neg_inf = g.tensor(one, one, DT_FLOAT, Some(UID_NEG_INF), false, true)?;
            let row_idx = g.virtual_tensor(full.0, full.1, DT_INT32)?;
            g.pointwise(
                PW_GEN_INDEX,
                DT_INT32,
                Some(2),
                (scaled, None, None),
                row_idx,
            )?;
            let col_idx = g.virtual_tensor(full.0, full.1, DT_INT32)?;
            g.pointwise(
                PW_GEN_INDEX,
                DT_INT32,
                Some(3),
                (scaled, None, None),
                col_idx,
            )?;
            let row_ok = g.virtual_tensor(full.0, full.1, DT_BOOL)?;
            g.pointwise(
                PW_CMP_LT,
                DT_BOOL,
                None,
                (row_idx, Some(seq_q), None),
                row_ok,
            )?;
            let col_ok = g.virtual_tensor(full.0, full.1, DT_BOOL)?;
            g.pointwise(
                PW_CMP_LT,
                DT_BOOL,
                None,
                (col_idx, Some(seq_kv), None),
                col_ok,
            )?;
            let keep = g.virtual_tensor(full.0, full.1, DT_BOOL)?;
            g.pointwise(PW_AND, DT_BOOL, None, (row_ok, Some(col_ok), None), keep)?;
            let masked = g.virtual_tensor(full.0, full.1, DT_FLOAT)?;
            g.pointwise(
                PW_BINARY_SELECT,
                DT_FLOAT,
                None,
                (scaled, Some(neg_inf), Some(keep)),
                masked,
            )?;
            scaled = masked;
        }
        let max = g.virtual_tensor(row.0, row.1, DT_FLOAT)?;
        g.reduction(REDUCE_MAX, scaled, max)?;
        let shifted = g.virtual_tensor(full.0, full.1, DT_FLOAT)?;
        g.pointwise(PW_SUB, DT_FLOAT, None, (scaled, Some(max), None), shifted)?;
        let exp = g.virtual_tensor(full.0, full.1, DT_FLOAT)?;
        g.pointwise(PW_EXP, DT_FLOAT, None, (shifted, None, None), exp)?;
        let sum = g.virtual_tensor(row.0, row.1, DT_FLOAT)?;
        g.reduction(REDUCE_ADD, exp, sum)?;
        if stats {
            let log_sum = g.virtual_tensor(row.0, row.1, DT_FLOAT)?;
            g.pointwise(PW_LOG, DT_FLOAT, None, (sum, None, None), log_sum)?;
            let lse = g.virtual_tensor(row.0, row.1, DT_FLOAT)?;
            g.pointwise(PW_ADD, DT_FLOAT, None, (max, Some(log_sum), None), lse)?;
        }
        if !key.fp8 {
            // The probabilities enter the second matmul in the inputs' dtype.
            let probs = g.virtual_tensor(full.0, full.1, DT_BF16)?;
            g.pointwise(PW_DIV, DT_FLOAT, None, (exp, Some(sum), None), probs)?;
            g.matmul(probs, v, o)?;
        } else {
            // cudnn-frontend's FP8 pattern: the probabilities' amax (an output nobody needs,
            // but the engines match only graphs that have it), the probabilities scaled into
            // e4m3, their product with v descaled twice, scaled into the e4m3 output, whose
            // unscaled amax is the second required output.
            let probs = g.virtual_tensor(full.0, full.1, DT_FLOAT)?;
            g.pointwise(PW_DIV, DT_FLOAT, None, (exp, Some(sum), None), probs)?;
            let amax_s = scalar(&mut g, UID_AMAX_S)?;
            g.reduction(REDUCE_AMAX, probs, amax_s)?;
            let scale_s = scalar(&mut g, UID_SCALE_S)?;
            let probs8 = g.virtual_tensor(full.0, full.1, DT_FP8_E4M3)?;
            g.pointwise(PW_MUL, DT_FLOAT, None, (probs, Some(scale_s), None), probs8)?;
            let d = HEAD_DIM as i64;
            let packed = ([b, h, lq, d], [h * lq * d, lq * d, d, 1]);
            let mut acc = g.virtual_tensor(packed.0, packed.1, DT_FLOAT)?;
            g.matmul(probs8, v, acc)?;
            for uid in [UID_DESCALE_S, UID_DESCALE_V] {
                let descale = scalar(&mut g, uid)?;
                let y = g.virtual_tensor(packed.0, packed.1, DT_FLOAT)?;
                g.pointwise(PW_MUL, DT_FLOAT, None, (acc, Some(descale), None), y)?;
                acc = y;
            }
            let scale_o = scalar(&mut g, UID_SCALE_O)?;
            g.pointwise(PW_MUL, DT_FLOAT, None, (acc, Some(scale_o), None), o)?;
            let amax_o = scalar(&mut g, UID_AMAX_O)?;
            g.reduction(REDUCE_AMAX, acc, amax_o)?;
        }
        let lengths = if padding {
            let lengths = |n: usize| -> Result<Tensor> {
                Ok(Tensor::from_vec(
                    vec![n as i32; key.b],
                    key.b,
                    &candle_core::Device::Cuda(dev.clone()),
                )?)
            };
            Some((lengths(key.lq)?, lengths(key.lk)?))
        } else {
            None
        };
        plan_graph(handle, g, key, lengths)
    }

    /// Finalises `g`'s operations into an operation graph and the first execution plan cuDNN's
    /// heuristics offer for it; `lengths` are the padding-mask inputs, when the graph has them.
    fn plan_graph(
        handle: sys::cudnnHandle_t,
        mut g: Graph,
        key: &Key,
        lengths: Option<(Tensor, Tensor)>,
    ) -> Result<Plan> {
        let ops: Vec<&Desc> = g.ops.iter().collect();
        let graph = Desc::new(D::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?
            .set(
                A::CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
                T::CUDNN_TYPE_HANDLE,
                &[handle],
            )?
            .set_descs(A::CUDNN_ATTR_OPERATIONGRAPH_OPS, &ops)?
            .finalize()?;
        // Heuristics mode A first (cuDNN's ranked list), then the fallback list.
        let mut refusals = Vec::new();
        for mode in [HEUR_MODE_A, HEUR_MODE_FALLBACK] {
            let (candidates, workspace, keep) = match plan_from_heuristics(handle, &graph, mode) {
                Ok(found) => found,
                Err(e) => {
                    refusals.push(format!("heuristics mode {mode}: {e:#}"));
                    continue;
                }
            };
            g.keep.push(graph);
            g.keep.extend(keep);
            return Ok(Plan {
                verified: std::cell::Cell::new(false),
                candidates,
                chosen: std::cell::Cell::new(0),
                tuned: std::cell::Cell::new(false),
                workspace,
                lengths,
                _graph: g,
            });
        }
        bail!(
            "cuDNN attention: no engine for {key:?}: {}",
            refusals.join("; ")
        )
    }

    /// Every engine configuration of heuristics `mode` that finalises into a plan, in the
    /// heuristics' order: the plans, the largest workspace in bytes, and the descriptors they
    /// refer to.
    fn plan_from_heuristics(
        handle: sys::cudnnHandle_t,
        graph: &Desc,
        mode: i32,
    ) -> Result<(Vec<Desc>, usize, Vec<Desc>)> {
        let heur = Desc::new(D::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?
            .set_descs(A::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[graph])?
            .set(
                A::CUDNN_ATTR_ENGINEHEUR_MODE,
                T::CUDNN_TYPE_HEUR_MODE,
                &[mode],
            )?
            .finalize()?;
        let configs: Vec<Desc> = (0..MAX_CONFIGS)
            .map(|_| Desc::new(D::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR))
            .collect::<Result<_>>()?;
        let mut raw: Vec<sys::cudnnBackendDescriptor_t> = configs.iter().map(|c| c.0).collect();
        let mut found = 0i64;
        // SAFETY: `raw` holds MAX_CONFIGS created descriptors for cuDNN to fill.
        check(
            unsafe {
                sys::cudnnBackendGetAttribute(
                    heur.0,
                    A::CUDNN_ATTR_ENGINEHEUR_RESULTS,
                    T::CUDNN_TYPE_BACKEND_DESCRIPTOR,
                    MAX_CONFIGS as i64,
                    &mut found,
                    raw.as_mut_ptr() as *mut c_void,
                )
            },
            "engine heuristics",
        )?;
        let mut refusals = Vec::new();
        let mut plans = Vec::new();
        let mut max_workspace = 0usize;
        for config in configs.iter().take(found.max(0) as usize) {
            let plan = Desc::new(D::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?
                .set(
                    A::CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
                    T::CUDNN_TYPE_HANDLE,
                    &[handle],
                )?
                .set_descs(A::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[config])?
                .finalize();
            let plan = match plan {
                Ok(p) => p,
                Err(e) => {
                    refusals.push(e.to_string());
                    continue;
                }
            };
            let mut workspace = 0i64;
            let mut n = 0i64;
            // SAFETY: one int64 out-value.
            check(
                unsafe {
                    sys::cudnnBackendGetAttribute(
                        plan.0,
                        A::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                        T::CUDNN_TYPE_INT64,
                        1,
                        &mut n,
                        &mut workspace as *mut i64 as *mut c_void,
                    )
                },
                "workspace size",
            )?;
            max_workspace = max_workspace.max(workspace.max(0) as usize);
            plans.push(plan);
        }
        if !plans.is_empty() {
            let mut keep = vec![heur];
            keep.extend(configs);
            return Ok((plans, max_workspace, keep));
        }
        bail!(
            "{found} configurations offered, none finalised: {}",
            refusals.join(" | ")
        )
    }

    impl Plan {
        /// Times every candidate on this call's inputs (one warm-up, then [`TUNE_REPS`] timed
        /// runs each) and keeps the fastest: the heuristics' first choice is not always the
        /// fastest engine configuration for a shape. `VIDGEN_CUDNN_TUNE=off` keeps the first.
        fn tune(
            &self,
            key: &Key,
            stream: &std::sync::Arc<candle_core::cuda::cudarc::driver::CudaStream>,
            execute: &dyn Fn(&Desc) -> Result<()>,
        ) -> Result<()> {
            self.tuned.set(true);
            if self.candidates.len() < 2
                || std::env::var("VIDGEN_CUDNN_TUNE").as_deref() == Ok("off")
            {
                return Ok(());
            }
            let event = || -> Result<_> {
                Ok(stream
                    .record_event(Some(
                        candle_core::cuda::cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT,
                    ))
                    .map_err(candle_core::Error::wrap)?)
            };
            let mut times = Vec::with_capacity(self.candidates.len());
            for candidate in &self.candidates {
                execute(candidate)?;
                let start = event()?;
                for _ in 0..TUNE_REPS {
                    execute(candidate)?;
                }
                let end = event()?;
                let ms = start.elapsed_ms(&end).map_err(candle_core::Error::wrap)?;
                times.push(ms / TUNE_REPS as f32);
            }
            let (best, _) = times
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .expect("two or more candidates");
            self.chosen.set(best);
            tracing::info!(
                "cuDNN attention {key:?}: engine configurations timed {times:?} ms, using #{best}"
            );
            Ok(())
        }
    }

    /// Per-thread cuDNN state for one device: plans by shape (`None`: cuDNN cannot run that
    /// shape; dropped before the handle), the handle and its workspace.
    struct State {
        plans: HashMap<Key, Option<Plan>>,
        cudnn: CudnnHandle,
    }

    thread_local! {
        static STATE: RefCell<HashMap<usize, State>> = RefCell::new(HashMap::new());
    }

    /// Element strides of a [B, L, H, 128] bf16 input whose heads are adjacent 128-value rows.
    fn strides(t: &Tensor) -> Option<(usize, usize)> {
        let s = t.stride();
        (t.rank() == 4 && t.dtype() == DType::BF16 && t.dim(3).ok() == Some(HEAD_DIM))
            .then_some(())
            .filter(|_| s[3] == 1 && s[2] == HEAD_DIM)
            // 16-byte aligned rows: cuDNN's vectorised loads.
            .filter(|_| s[1].is_multiple_of(8) && s[0].is_multiple_of(8))
            .map(|_| (s[0], s[1]))
    }

    /// The shape of one call on bf16 inputs, `None` where cuDNN cannot read them in place.
    fn key_of(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<Key>> {
        let (Some(sq), Some(sk), Some(sv)) = (strides(q), strides(k), strides(v)) else {
            return Ok(None);
        };
        let (b, lq, h, _) = q.dims4()?;
        if k.dims() != v.dims() || k.dim(0)? != b || k.dim(2)? != h {
            return Ok(None);
        }
        Ok(Some(Key {
            b,
            h,
            lq,
            lk: k.dim(1)?,
            strides: [sq, sk, sv],
            fp8: false,
        }))
    }

    pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
        let Some(key) = key_of(q, k, v)? else {
            return Ok(None);
        };
        run(&key, [q, k, v], None, [q, k, v])
    }

    /// The FP8 scales buffer: one f32 per 16 bytes (cuDNN's tensor alignment), slots in the
    /// order of kernels/fp8.cu's enum; the amax slots are written as float bits by atomics.
    #[derive(Clone, Copy)]
    enum Slot {
        AmaxQ,
        DescaleQ = 3,
        DescaleK,
        DescaleV,
        ScaleS,
        DescaleS,
        ScaleO,
        /// The amax outputs the graph requires (nobody reads them); after the output's descale,
        /// which only `attention_output_bf16` reads.
        AmaxS = 10,
        AmaxO,
    }
    const SLOTS: usize = 12;
    const SLOT_FLOATS: usize = 4;

    fn slot(scales: &Tensor, slot: Slot) -> Result<u64> {
        Ok(address(scales)? + (slot as usize * SLOT_FLOATS * 4) as u64)
    }

    /// The probabilities' e4m3 scale, `VIDGEN_FP8_ATTENTION_SCALE_S` in (0, 448] (default 256,
    /// the largest power of two under e4m3's 448, for probabilities ≤ 1).
    fn probability_scale() -> f32 {
        static SCALE: std::sync::OnceLock<f32> = std::sync::OnceLock::new();
        *SCALE.get_or_init(|| {
            let Ok(text) = std::env::var("VIDGEN_FP8_ATTENTION_SCALE_S") else {
                return 256.0;
            };
            match text.parse::<f32>() {
                Ok(s) if s.is_finite() && s > 0.0 && s <= 448.0 => s,
                _ => {
                    tracing::warn!(
                        "VIDGEN_FP8_ATTENTION_SCALE_S: `{text}` is not a number in (0, 448]; \
                         using 256"
                    );
                    256.0
                }
            }
        })
    }

    /// Whether k's and v's means over the keys are subtracted before they are quantised (see
    /// kernels/fp8.cu: exact for softmax attention, and v's mean is added back to the output);
    /// `VIDGEN_FP8_ATTENTION_SMOOTH_K=0` / `VIDGEN_FP8_ATTENTION_SMOOTH_V=0` turn them off (to
    /// measure what each brings).
    fn smoothed() -> [bool; 2] {
        static ON: std::sync::OnceLock<[bool; 2]> = std::sync::OnceLock::new();
        *ON.get_or_init(|| {
            ["K", "V"].map(|x| {
                std::env::var(format!("VIDGEN_FP8_ATTENTION_SMOOTH_{x}")).as_deref() != Ok("0")
            })
        })
    }

    /// What the FP8 graph's e4m3 output needs to become the attention's bf16 output: the scales
    /// buffer (its output descale) and v's mean over the keys where it was subtracted.
    struct Fp8Output {
        scales: Tensor,
        v_mean: Option<Tensor>,
    }

    impl Fp8Output {
        /// `o8` [B, Lq, H, 128] e4m3 (contiguous) → bf16 `o8 · descale_o + v_mean`.
        fn dequantize(&self, o8: &Tensor) -> Result<Tensor> {
            let (_, lq, h, d) = o8.dims4()?;
            let dev = o8.device().as_cuda_device()?.clone();
            let (out, po) = alloc(&dev, DType::BF16, o8.dims())?;
            let n4 = (o8.elem_count() / 4) as i64;
            let (p8, ps) = (address(o8)?, address(&self.scales)?);
            let pm = address_or_null(self.v_mean.as_ref())?;
            let (per_batch, width) = (lq as i64, (h * d) as i32);
            let func = dev.get_or_load_custom_func("attention_output_bf16", MODULE, PTX)?;
            let mut b = func.builder();
            b.arg(&p8)
                .arg(&ps)
                .arg(&pm)
                .arg(&per_batch)
                .arg(&width)
                .arg(&po)
                .arg(&n4);
            let config = crate::weights::fp8::gpu::config(n4 as usize);
            // SAFETY: matches `attention_output_bf16` in kernels/fp8.cu: o8 and out hold
            // B·Lq·H·128 values (a multiple of 4, 4-byte aligned), the mean null or [B, H·128]
            // f32, the scales buffer holds every slot.
            launched(unsafe { b.launch(config) }.map(|_| ()))?;
            Ok(out)
        }
    }

    /// A tensor's device address, or null (0) for none: the kernels' optional pointers.
    fn address_or_null(t: Option<&Tensor>) -> Result<u64> {
        Ok(t.map(address).transpose()?.unwrap_or(0))
    }

    /// Rows summed per CTA by `attention_column_partials_bf16`.
    const MEAN_ROWS_PER_CHUNK: usize = 128;

    /// A [B, L, H, 128] bf16 input as kernels/fp8.cu's `attention_*` row kernels read it: its
    /// address, rows per batch, batch and row strides (elements) and row width.
    struct Rows {
        x: u64,
        per_batch: i64,
        batch_stride: i64,
        row_stride: i64,
        width: i32,
    }

    impl Rows {
        fn of(t: &Tensor) -> Result<Self> {
            let (_, l, h, d) = t.dims4()?;
            let s = t.stride();
            Ok(Self {
                x: address(t)?,
                per_batch: l as i64,
                batch_stride: s[0] as i64,
                row_stride: s[1] as i64,
                width: (h * d) as i32,
            })
        }

        /// The five arguments every row kernel starts with: (x, per_batch, batch_stride,
        /// row_stride, width).
        fn push<'a>(&'a self, builder: &mut LaunchArgs<'a>) {
            builder
                .arg(&self.x)
                .arg(&self.per_batch)
                .arg(&self.batch_stride)
                .arg(&self.row_stride)
                .arg(&self.width);
        }
    }

    /// The mean over the tokens of `t` [B, L, H, 128] per batch and channel: f32 [B, H·128], in
    /// a fixed order of additions (deterministic).
    fn token_mean(dev: &candle_core::CudaDevice, t: &Tensor) -> Result<Tensor> {
        let (b, l, h, d) = t.dims4()?;
        let width = h * d;
        let chunks = l.div_ceil(MEAN_ROWS_PER_CHUNK).max(1);
        let (_partials, pp) = alloc(dev, DType::F32, &[b, chunks, width])?;
        let (mean, pm) = alloc(dev, DType::F32, &[b, width])?;
        let rows = Rows::of(t)?;
        let rows_arg = MEAN_ROWS_PER_CHUNK as i32;
        let partials =
            dev.get_or_load_custom_func("attention_column_partials_bf16", MODULE, PTX)?;
        let mut builder = partials.builder();
        rows.push(&mut builder);
        builder.arg(&rows_arg).arg(&pp);
        let config = LaunchConfig {
            grid_dim: (chunks as u32, b as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `attention_column_partials_bf16` in kernels/fp8.cu: rows of `width`
        // values at t's strides (the caller checked they are 16-byte aligned bf16 rows);
        // partials holds b·chunks·width values, every one written.
        launched(unsafe { builder.launch(config) }.map(|_| ()))?;
        let reduce = dev.get_or_load_custom_func("attention_column_mean", MODULE, PTX)?;
        let (chunks_arg, batches) = (chunks as i32, b as i32);
        let mut builder = reduce.builder();
        builder
            .arg(&pp)
            .arg(&chunks_arg)
            .arg(&rows.width)
            .arg(&batches)
            .arg(&rows.per_batch)
            .arg(&pm);
        // SAFETY: matches `attention_column_mean`: one thread per (batch, channel) of mean.
        launched(
            unsafe { builder.launch(LaunchConfig::for_num_elems((b * width) as u32)) }.map(|_| ()),
        )?;
        Ok(mean)
    }

    /// q, k and v quantised to e4m3 per tensor (contiguous copies; k and v less their means over
    /// the keys unless [`smoothed`] says otherwise), and what the output needs.
    fn quantize(
        dev: &candle_core::CudaDevice,
        inputs: [&Tensor; 3],
    ) -> Result<([Tensor; 3], Fp8Output)> {
        let device = candle_core::Device::Cuda(dev.clone());
        let scales = Tensor::zeros(SLOTS * SLOT_FLOATS, DType::F32, &device)?;
        let ps = address(&scales)?;
        let [smooth_k, smooth_v] = smoothed();
        let k_mean = smooth_k.then(|| token_mean(dev, inputs[1])).transpose()?;
        let v_mean = smooth_v.then(|| token_mean(dev, inputs[2])).transpose()?;
        let means = [
            0u64,
            address_or_null(k_mean.as_ref())?,
            address_or_null(v_mean.as_ref())?,
        ];
        // One CTA per token row of `t`: (x, per_batch, batch_stride, row_stride, width, mean,
        // slots, slot), then the e4m3 output for the quantising kernel.
        let per_row = |name: &str, t: &Tensor, slot: Slot, i: usize, q8: Option<u64>| {
            let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
            let (b, l, _, _) = t.dims4()?;
            let rows = Rows::of(t)?;
            let slot = slot as i32 + i as i32;
            let mut builder = func.builder();
            rows.push(&mut builder);
            builder.arg(&means[i]).arg(&ps).arg(&slot);
            if let Some(pq) = q8.as_ref() {
                builder.arg(pq);
            }
            let config = LaunchConfig {
                grid_dim: ((b * l) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: matches `attention_amax_bf16` / `attention_quantize_bf16` in
            // kernels/fp8.cu: rows of `width` values at the strides of `t` (16-byte aligned, as
            // the caller checked), the mean null or [B, width] f32; the e4m3 output holds
            // rows·width bytes.
            launched(unsafe { builder.launch(config) }.map(|_| ()))
        };
        for (i, t) in inputs.iter().enumerate() {
            per_row("attention_amax_bf16", t, Slot::AmaxQ, i, None)?;
        }
        let derive = dev.get_or_load_custom_func("attention_scales", MODULE, PTX)?;
        let scale_s = probability_scale();
        let mut b = derive.builder();
        b.arg(&ps).arg(&scale_s);
        // SAFETY: matches `attention_scales`; one thread writes the buffer's derived slots.
        launched(unsafe { b.launch(LaunchConfig::for_num_elems(1)) }.map(|_| ()))?;
        let mut out = Vec::with_capacity(3);
        for (i, t) in inputs.iter().enumerate() {
            let (q8, pq) = alloc(dev, DType::F8E4M3, t.dims())?;
            per_row("attention_quantize_bf16", t, Slot::DescaleQ, i, Some(pq))?;
            out.push(q8);
        }
        let [q, k, v]: [Tensor; 3] = out.try_into().expect("three inputs");
        Ok(([q, k, v], Fp8Output { scales, v_mean }))
    }

    /// e4m3 attention with per-tensor scales: q, k and v quantised, cuDNN's FP8 graph, the e4m3
    /// output dequantised to bf16. `None` where cuDNN (≥ 9.1, not 9.10.0; Hopper or later) has
    /// no plan, or the inputs are not bf16 rows cuDNN reads in place.
    pub fn attention_fp8(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<Tensor>> {
        let version = cudnn::get_version();
        if !(FP8_MIN_VERSION..).contains(&version) || version == FP8_BROKEN_VERSION {
            return Ok(None);
        }
        let Some(bf16_key) = key_of(q, k, v)? else {
            return Ok(None);
        };
        if [q, k, v]
            .iter()
            .map(|t| address(t))
            .collect::<Result<Vec<_>>>()?
            .iter()
            .any(|p| !p.is_multiple_of(16))
        {
            return Ok(None);
        }
        let dev = q.device().as_cuda_device()?.clone();
        if compute_capability(&dev)? < (9, 0) {
            return Ok(None);
        }
        // The e4m3 copies are contiguous [B, L, H, 128].
        let row = bf16_key.h * HEAD_DIM;
        let key = Key {
            strides: [bf16_key.lq, bf16_key.lk, bf16_key.lk].map(|l| (l * row, row)),
            fp8: true,
            ..bf16_key
        };
        // A shape cuDNN refused (or computed wrongly) once is not quantised again.
        let ordinal = dev.cuda_stream().context().ordinal();
        let refused = STATE.with(|cell| {
            cell.borrow()
                .get(&ordinal)
                .is_some_and(|state| matches!(state.plans.get(&key), Some(None)))
        });
        if refused {
            return Ok(None);
        }
        let (quantized, output) = quantize(&dev, [q, k, v])?;
        let [q8, k8, v8] = &quantized;
        debug_assert!(key.strides[0] == (q8.stride()[0], q8.stride()[1]));
        run(&key, [q8, k8, v8], Some(&output), [q, k, v])
    }

    /// Runs `key`'s plan on `inputs` (bf16, or e4m3 with `fp8`'s scales), building it on first
    /// use; `original` are the bf16 q, k, v the first result is checked against (our own kernel).
    fn run(
        key: &Key,
        inputs: [&Tensor; 3],
        fp8: Option<&Fp8Output>,
        original: [&Tensor; 3],
    ) -> Result<Option<Tensor>> {
        let key = *key;
        let Key { b, h, lq, .. } = key;
        let dev = inputs[0].device().as_cuda_device()?.clone();
        let stream = dev.cuda_stream();
        let ordinal = stream.context().ordinal();
        STATE.with(|cell| -> Result<Option<Tensor>> {
            let mut states = cell.borrow_mut();
            let state = match states.entry(ordinal) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(State {
                    plans: HashMap::new(),
                    cudnn: CudnnHandle::new(&stream)?,
                }),
            };
            let plan = state.plans.entry(key).or_insert_with(|| {
                build(state.cudnn.handle, &key, &dev)
                    .inspect_err(|e| {
                        tracing::warn!(
                            "{e:#}; using {} for this shape",
                            if key.fp8 {
                                "bf16 attention"
                            } else {
                                "vidgen's own attention kernel"
                            }
                        )
                    })
                    .ok()
            });
            let Some(plan) = plan.as_ref() else {
                return Ok(None);
            };
            let ws = state.cudnn.workspace(&stream, plan.workspace)?;
            let out_dtype = if key.fp8 { DType::F8E4M3 } else { DType::BF16 };
            let (out, po) = alloc(&dev, out_dtype, &[b, lq, h, HEAD_DIM])?;
            let scale = (HEAD_DIM as f32).sqrt().recip();
            let neg_inf = f32::NEG_INFINITY;
            let mut uids = vec![UID_Q, UID_K, UID_V, UID_O, UID_SCALE];
            let mut ptrs: Vec<*mut c_void> = vec![
                address(inputs[0])? as *mut c_void,
                address(inputs[1])? as *mut c_void,
                address(inputs[2])? as *mut c_void,
                po as *mut c_void,
                &scale as *const f32 as *mut c_void,
            ];
            if let Some((seq_q, seq_kv)) = &plan.lengths {
                uids.extend([UID_SEQ_Q, UID_SEQ_KV, UID_NEG_INF]);
                ptrs.extend([
                    int_address(seq_q)? as *mut c_void,
                    int_address(seq_kv)? as *mut c_void,
                    &neg_inf as *const f32 as *mut c_void,
                ]);
            }
            if let Some(Fp8Output { scales, .. }) = fp8 {
                for (uid, s) in [
                    (UID_DESCALE_Q, Slot::DescaleQ),
                    (UID_DESCALE_K, Slot::DescaleK),
                    (UID_DESCALE_V, Slot::DescaleV),
                    (UID_SCALE_S, Slot::ScaleS),
                    (UID_DESCALE_S, Slot::DescaleS),
                    (UID_SCALE_O, Slot::ScaleO),
                    (UID_AMAX_S, Slot::AmaxS),
                    (UID_AMAX_O, Slot::AmaxO),
                ] {
                    uids.push(uid);
                    ptrs.push(slot(scales, s)? as *mut c_void);
                }
            }
            let pack = Desc::new(D::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?
                .set(
                    A::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS,
                    T::CUDNN_TYPE_INT64,
                    &uids,
                )?
                .set(
                    A::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
                    T::CUDNN_TYPE_VOID_PTR,
                    &ptrs,
                )?
                .set(
                    A::CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
                    T::CUDNN_TYPE_VOID_PTR,
                    &[ws as *mut c_void],
                )?
                .finalize()?;
            let handle = state.cudnn.handle;
            // SAFETY: the pointers name live tensors of the shapes the plan was built for; the
            // by-value scalars live on this stack frame through the call (cuDNN copies them).
            let execute = |candidate: &Desc| {
                check(
                    unsafe { sys::cudnnBackendExecute(handle, candidate.0, pack.0) },
                    "execute",
                )
            };
            if !plan.tuned.get() {
                plan.tune(&key, &stream, &execute)?;
            }
            // The e4m3 output dequantised to bf16; the bf16 output as it is.
            let result = |raw: &Tensor| -> Result<Tensor> {
                match fp8 {
                    Some(output) => output.dequantize(raw),
                    None => Ok(raw.clone()),
                }
            };
            let chosen = plan.chosen.get();
            execute(&plan.candidates[chosen])?;
            if plan.verified.get() {
                return Ok(Some(result(&out)?));
            }
            // A graph cuDNN accepts but computes differently (a version's bug, a stride it
            // misreads, an engine configuration less accurate than the others) must not corrupt
            // videos silently: compare once with our own kernel, the fastest configuration first,
            // then the others in the heuristics' order; the first within tolerance is kept.
            let tolerance = if key.fp8 {
                FP8_VERIFY_TOLERANCE
            } else {
                VERIFY_TOLERANCE
            };
            let order =
                std::iter::once(chosen).chain((0..plan.candidates.len()).filter(|&i| i != chosen));
            let mut errors = Vec::new();
            for index in order {
                if index != chosen {
                    execute(&plan.candidates[index])?;
                }
                let candidate = result(&out)?;
                let err = error_against_own(&candidate, original)?;
                if key.fp8 && errors.is_empty() {
                    dump_inputs(&key, original, err)?;
                }
                errors.push(format!("#{index} {err:.2e}"));
                if err.is_finite() && err <= tolerance {
                    if index != chosen || key.fp8 {
                        tracing::info!(
                            "cuDNN {}attention for {key:?}: engine configuration #{index}, rel \
                             err against bf16 on the checked rows: {}",
                            if key.fp8 { "FP8 " } else { "" },
                            errors.join(", ")
                        );
                    }
                    plan.chosen.set(index);
                    plan.verified.set(true);
                    return Ok(Some(candidate));
                }
            }
            tracing::warn!(
                "cuDNN {}attention for {key:?} differs from vidgen's own kernel in every engine \
                 configuration (rel err {} > {tolerance:.0e}); not using it for this shape",
                if key.fp8 { "FP8 " } else { "" },
                errors.join(", ")
            );
            state.plans.insert(key, None);
            Ok(None)
        })
    }

    /// `VIDGEN_FP8_ATTENTION_DUMP=DIR`: the bf16 inputs of each FP8 attention shape with more
    /// than [`DUMP_MIN_KEYS`] keys, as its first call checks them, for studying the FP8 error
    /// offline: heads 0 and H/2, the first [`VERIFY_ROWS`] queries and every key, one
    /// safetensors file per tensor and head (`fp8attn_{Lq}x{Lk}_h{head}_{q,k,v}.safetensors`,
    /// [L, 128] each), and the error in the log; `tools/gpu/fp8_attention_error.py --dump DIR`
    /// reads them.
    fn dump_inputs(key: &Key, [q, k, v]: [&Tensor; 3], err: f64) -> Result<()> {
        let Some(dir) = std::env::var_os("VIDGEN_FP8_ATTENTION_DUMP") else {
            return Ok(());
        };
        if key.lk <= DUMP_MIN_KEYS {
            return Ok(());
        }
        let dir = std::path::PathBuf::from(dir);
        std::fs::create_dir_all(&dir)?;
        for head in [0, key.h / 2] {
            for (name, t, rows) in [
                ("q", q, VERIFY_ROWS.min(key.lq)),
                ("k", k, key.lk),
                ("v", v, key.lk),
            ] {
                let slice = t
                    .narrow(0, 0, 1)?
                    .narrow(1, 0, rows)?
                    .narrow(2, head, 1)?
                    .squeeze(0)?
                    .squeeze(1)?
                    .contiguous()?
                    .to_device(&candle_core::Device::Cpu)?;
                let path = dir.join(format!(
                    "fp8attn_{}x{}_h{head}_{name}.safetensors",
                    key.lq, key.lk
                ));
                candle_core::safetensors::save(&HashMap::from([(name.to_string(), slice)]), &path)?;
            }
        }
        tracing::info!(
            "FP8 attention inputs for {key:?} (rel err {err:.3e}) written to {}",
            dir.display()
        );
        Ok(())
    }

    /// The largest relative error of `out` against our own bf16 kernel over the first and the
    /// last query rows (a version's bug in the last, partial tile of queries or keys shows
    /// there); NaN if any compared value is not finite.
    fn error_against_own(out: &Tensor, [q, k, v]: [&Tensor; 3]) -> Result<f64> {
        let lq = q.dim(1)?;
        let half = VERIFY_ROWS / 2;
        let last = lq.saturating_sub(half);
        let mut err = 0f64;
        // A short query (≤ half) is checked whole, once.
        for start in std::iter::once(0).chain((last > 0).then_some(last)) {
            let rows = (lq - start).min(half);
            let own = crate::dit::flash::attention_with(
                crate::dit::flash::Kernel::Own(crate::dit::flash::Tile::DEFAULT),
                &q.narrow(1, start, rows)?,
                k,
                v,
            )?
            .ok_or_else(|| anyhow::anyhow!("own attention kernel unavailable"))?;
            let e = crate::tensor_util::rel_err(
                &out.narrow(1, start, rows)?.to_dtype(DType::F32)?,
                &own.to_dtype(DType::F32)?,
            )?;
            if !e.is_finite() {
                // f64::max would drop a NaN: a non-finite error must drop the plan.
                return Ok(f64::NAN);
            }
            err = err.max(e);
        }
        Ok(err)
    }

    /// Device address of an i32 tensor's first element.
    fn int_address(t: &Tensor) -> Result<u64> {
        use candle_core::cuda::cudarc::driver::DevicePtr;
        use candle_core::cuda::CudaStorageSlice;
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*storage else {
            bail!("cuDNN attention: lengths are not on the GPU");
        };
        let CudaStorageSlice::I32(slice) = &s.slice else {
            bail!("cuDNN attention: lengths are not i32");
        };
        let stream = s.device.cuda_stream();
        let base = slice.device_ptr(&stream).0;
        Ok(base + layout.start_offset() as u64 * 4)
    }
}
