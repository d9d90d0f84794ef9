//! FP8 (e4m3fn) weight storage: our own quantisation of large linear layers, and ComfyUI's
//! "scaled fp8" checkpoints.
//!
//! An [`Fp8Weight`] holds the weight as `F8E4M3` (1 byte per value) plus an f32 scale, either one
//! per tensor or one per output channel (dim 0), so that `w ≈ q · scale`. Quantisation uses
//! `scale = amax / 448` (448 is e4m3fn's largest finite value), divides in f32, clamps to ±448
//! and rounds to nearest-even: the same arithmetic as torch's
//! `(w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)`, and the same bytes (tested).
//!
//! candle 0.11.1 and F8E4M3 on CPU: `to_dtype` converts both ways between F8E4M3 and
//! U8/U32/I16/I32/I64/F16/BF16/F32/F64 (through the `float8` crate: round-to-nearest-even,
//! saturating to ±448, NaN kept), `from_raw_buffer` and safetensors load it, and elementwise
//! binary ops exist; matmul does not, so compute always dequantises to F32/BF16 first.
//! e5m2 has no candle dtype: such checkpoints cannot be loaded.
//!
//! [`ScaledFp8Source`] wraps another [`TensorSource`] holding a ComfyUI scaled-fp8 checkpoint:
//! `<layer>.weight` (float8_e4m3fn) with `<layer>.scale_weight` (older spelling, with a
//! `scaled_fp8` marker tensor) or `<layer>.weight_scale` (newer, optionally with a JSON
//! `<layer>.comfy_quant` tensor), plus activation scales `scale_input` / `input_scale`. It presents
//! dequantised weights under the plain names and hides the scale, marker and metadata keys.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::TensorSource;
use crate::invalid;

/// Largest finite float8_e4m3fn value.
pub const FP8_E4M3_MAX: f32 = 448.0;

/// How many scales an [`Fp8Weight`] has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8Granularity {
    /// One scale for the whole tensor (shape `[]`).
    PerTensor,
    /// One scale per output channel, i.e. per index of dim 0 (shape `[out]`).
    PerChannel,
}

/// An F8E4M3 tensor and its f32 scale(s): the value is `weight · scale`.
#[derive(Clone, Debug)]
pub struct Fp8Weight {
    weight: Tensor,
    scale: Tensor,
}

impl Fp8Weight {
    /// Quantises `weight` (any float dtype, rank >= 1 for per-channel).
    pub fn quantize(weight: &Tensor, granularity: Fp8Granularity) -> Result<Self> {
        let w = weight.to_dtype(DType::F32)?;
        let amax = match granularity {
            Fp8Granularity::PerTensor => w.abs()?.flatten_all()?.max(0)?,
            Fp8Granularity::PerChannel => {
                if w.rank() == 0 {
                    bail!("per-channel FP8 needs a weight of rank >= 1, got a scalar");
                }
                let out = w.dim(0)?;
                w.abs()?.reshape((out, ()))?.max(1)?
            }
        };
        // `max` skips NaN, so test finiteness on the values themselves (NaN <= MAX is false).
        let finite = w
            .abs()?
            .le(f32::MAX)?
            .flatten_all()?
            .min(0)?
            .to_scalar::<u8>()?;
        if finite == 0 {
            bail!("cannot quantise to FP8: the weight holds NaN or infinite values");
        }
        let amax_values = amax.flatten_all()?.to_vec1::<f32>()?;
        // An all-zero channel keeps scale 1 (its values quantise to 0 whatever the scale).
        let scale: Vec<f32> = amax_values
            .iter()
            .map(|&a| if a > 0.0 { a / FP8_E4M3_MAX } else { 1.0 })
            .collect();
        let scale = match granularity {
            Fp8Granularity::PerTensor => Tensor::new(scale[0], w.device())?,
            Fp8Granularity::PerChannel => Tensor::new(scale, w.device())?,
        };
        // Divide (not multiply by a reciprocal) so that rounding matches torch's reference.
        let scaled = w.broadcast_div(&channel_broadcast(&scale, w.rank())?)?;
        let q = to_e4m3(&scaled.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)?)?;
        Ok(Self { weight: q, scale })
    }

    /// Wraps stored parts: `weight` F8E4M3, `scale` f32 with 1 element (per tensor) or
    /// `weight.dim(0)` elements (per channel; shapes `[out]` or `[out, 1]` are accepted).
    pub fn from_parts(weight: Tensor, scale: Tensor) -> Result<Self> {
        if weight.dtype() != DType::F8E4M3 {
            bail!("FP8 weight must be F8E4M3, got {:?}", weight.dtype());
        }
        let scale = scale.to_dtype(DType::F32)?;
        let n = scale.elem_count();
        let scale = if n == 1 {
            scale.flatten_all()?.squeeze(0)?
        } else if weight.rank() >= 1 && n == weight.dim(0)? {
            scale.flatten_all()?
        } else {
            bail!(
                "FP8 scale of shape {:?} fits neither per-tensor (1 value) nor per-channel ({} \
                 values) for a weight of shape {:?}",
                scale.dims(),
                weight.dims().first().copied().unwrap_or(0),
                weight.dims()
            );
        };
        Ok(Self { weight, scale })
    }

    pub fn granularity(&self) -> Fp8Granularity {
        if self.scale.rank() == 0 {
            Fp8Granularity::PerTensor
        } else {
            Fp8Granularity::PerChannel
        }
    }

    /// The F8E4M3 values.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// f32 scale: shape `[]` (per tensor) or `[out]` (per channel).
    pub fn scale(&self) -> &Tensor {
        &self.scale
    }

    pub fn dims(&self) -> &[usize] {
        self.weight.dims()
    }

    /// `weight · scale`, computed in f32, returned in `dtype`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.weight.device().is_cuda() {
            return gpu::dequantize(&self.weight, &self.scale, dtype);
        }
        let w = self.weight.to_dtype(DType::F32)?;
        let scale = channel_broadcast(&self.scale, w.rank())?;
        Ok(w.broadcast_mul(&scale)?.to_dtype(dtype)?)
    }

    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: self.weight.to_device(device)?,
            scale: self.scale.to_device(device)?,
        })
    }
}

/// f32 values already in e4m3 range -> F8E4M3 (round to nearest even). candle has no CUDA kernel
/// for this cast: ours gives the same bytes as the CPU's.
fn to_e4m3(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return gpu::to_e4m3(x);
    }
    Ok(x.to_dtype(DType::F8E4M3)?)
}

#[cfg(feature = "cuda")]
pub(crate) mod gpu {
    use anyhow::{ensure, Result};
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::{DType, Tensor};

    use crate::cuda_util::{address, alloc, cuda_device, launched, suffix};

    /// kernels/fp8.cu, shared by the FP8 matmul and FP8 attention.
    pub(crate) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fp8.ptx"));
    pub(crate) const MODULE: &str = "vidgen_fp8";

    /// Enough CTAs to fill an H100 several times over; the kernels loop over the rest (the
    /// grid-stride kernels of kernels/fp8.cu, the FP8 attention's output pass included).
    pub(crate) fn config(items: usize) -> LaunchConfig {
        let threads = 256u32;
        let blocks = items.div_ceil(threads as usize).clamp(1, 132 * 16) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub fn to_e4m3(x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let dev = cuda_device(&x)?;
        let (q, pq) = alloc(&dev, DType::F8E4M3, x.dims())?;
        let px = address(&x)?;
        let n = x.elem_count() as i64;
        let func = dev.get_or_load_custom_func("f32_to_e4m3", MODULE, PTX)?;
        let mut b = func.builder();
        b.arg(&px).arg(&pq).arg(&n);
        // SAFETY: the arguments match `f32_to_e4m3` in kernels/fp8.cu; both buffers hold n values.
        launched(unsafe { b.launch(config(x.elem_count())) }.map(|_| ()))?;
        Ok(q)
    }

    /// `q · scale` (per tensor: `scale` has one value; per channel: one per index of dim 0).
    pub fn dequantize(q: &Tensor, scale: &Tensor, dtype: DType) -> Result<Tensor> {
        let q = q.contiguous()?;
        let scale = scale.to_dtype(DType::F32)?.contiguous()?;
        let n = q.elem_count();
        let per_row = i32::from(scale.elem_count() > 1);
        let cols = if per_row == 1 {
            ensure!(
                q.rank() >= 1 && scale.elem_count() == q.dim(0)?,
                "FP8 scale: {} values for a weight of shape {:?}",
                scale.elem_count(),
                q.dims()
            );
            n / q.dim(0)?
        } else {
            n.max(1)
        };
        let dev = cuda_device(&q)?;
        let (y, py) = alloc(&dev, dtype, q.dims())?;
        if n == 0 {
            return Ok(y);
        }
        let (pq, ps) = (address(&q)?, address(&scale)?);
        // Four bytes per load when rows hold whole groups of four (every Wan linear).
        let vec4 = cols.is_multiple_of(4) && pq.is_multiple_of(4);
        let (kernel, items) = if vec4 {
            ("e4m3_dequant4", n / 4)
        } else {
            ("e4m3_dequant1", n)
        };
        let name = format!("{kernel}_{}", suffix(dtype)?);
        let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
        let (cols, items_i) = (cols as i64, items as i64);
        let mut b = func.builder();
        b.arg(&pq)
            .arg(&ps)
            .arg(&cols)
            .arg(&per_row)
            .arg(&py)
            .arg(&items_i);
        // SAFETY: the arguments match `e4m3_dequant{4,1}_T` in kernels/fp8.cu; `y` holds n values
        // of `dtype`, `q` n bytes, `scale` one value per row (or one).
        launched(unsafe { b.launch(config(items)) }.map(|_| ()))?;
        Ok(y)
    }
}

/// Reshapes a per-channel scale `[out]` to `[out, 1, ...]` for broadcasting over a weight of
/// `rank` dims; a scalar stays a scalar.
fn channel_broadcast(scale: &Tensor, rank: usize) -> Result<Tensor> {
    if scale.rank() == 0 || rank <= 1 {
        return Ok(scale.clone());
    }
    let mut shape = vec![1usize; rank];
    shape[0] = scale.dim(0)?;
    Ok(scale.reshape(shape)?)
}

/// A linear layer whose weight is kept in FP8 and dequantised for each call: half the memory of
/// bf16 weights, at the cost of one conversion per forward.
#[derive(Clone, Debug)]
pub struct Fp8Linear {
    weight: Fp8Weight,
    bias: Option<Tensor>,
}

impl Fp8Linear {
    /// `weight` is `[out, in]` (PyTorch `nn.Linear` layout); `bias` is `[out]`.
    pub fn new(weight: Fp8Weight, bias: Option<Tensor>) -> Result<Self> {
        let &[out, _] = weight.dims() else {
            bail!(
                "Fp8Linear weight must be [out, in], got {:?}",
                weight.dims()
            );
        };
        if let Some(b) = &bias {
            if b.dims() != [out] {
                bail!("Fp8Linear bias must be [{out}], got {:?}", b.dims());
            }
        }
        Ok(Self { weight, bias })
    }

    pub fn weight(&self) -> &Fp8Weight {
        &self.weight
    }

    /// `x · Wᵀ + b` in `x`'s dtype, for `x` of shape `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.dequantize(x.dtype())?;
        let y = match x.rank() {
            2 => x.matmul(&w.t()?)?,
            _ => x.broadcast_matmul(&w.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// ComfyUI scaled fp8 checkpoints

/// Suffixes of per-layer weight scales, old and new spelling.
const WEIGHT_SCALE_SUFFIXES: [&str; 2] = [".scale_weight", ".weight_scale"];
/// Suffixes of activation scales (used only by fp8 matmul kernels; we compute in bf16/f32).
const INPUT_SCALE_SUFFIXES: [&str; 2] = [".scale_input", ".input_scale"];
/// Scales of formats other than plain scaled fp8 (nvfp4 double scaling, AWQ-style smoothing).
const UNSUPPORTED_SUFFIXES: [&str; 2] = [".weight_scale_2", ".pre_quant_scale"];
const COMFY_QUANT_SUFFIX: &str = ".comfy_quant";

fn is_marker(key: &str) -> bool {
    key == "scaled_fp8" || key.ends_with(".scaled_fp8")
}

/// A [`TensorSource`] view of a ComfyUI scaled-fp8 checkpoint (see the module docs).
pub struct ScaledFp8Source {
    inner: Box<dyn TensorSource>,
    /// weight key -> its scale key
    scaled: BTreeMap<String, String>,
    /// weight key -> its activation scale key
    input_scales: BTreeMap<String, String>,
    hidden: BTreeSet<String>,
    output_dtype: DType,
}

impl ScaledFp8Source {
    /// Wraps `inner`; dequantised weights are returned in `output_dtype` (computed in f32).
    /// Errors if a scale has no weight, or a layer uses a format other than float8_e4m3fn.
    pub fn new(inner: Box<dyn TensorSource>, output_dtype: DType) -> Result<Self> {
        let keys: BTreeSet<String> = inner.keys().into_iter().collect();
        let mut scaled = BTreeMap::new();
        let mut input_scales = BTreeMap::new();
        let mut hidden = BTreeSet::new();
        let weight_of = |key: &str, suffix: &str| -> Result<String> {
            let layer = key.strip_suffix(suffix).unwrap_or(key);
            let weight = format!("{layer}.weight");
            if !keys.contains(&weight) {
                return Err(invalid!(
                    "{}: `{key}` has no weight `{weight}` to scale",
                    inner.describe()
                ));
            }
            Ok(weight)
        };
        for key in &keys {
            if is_marker(key) {
                hidden.insert(key.clone());
            } else if let Some(suffix) = WEIGHT_SCALE_SUFFIXES.iter().find(|s| key.ends_with(*s)) {
                let weight = weight_of(key, suffix)?;
                if let Some(prev) = scaled.insert(weight.clone(), key.clone()) {
                    return Err(invalid!(
                        "{}: `{weight}` has two scales, `{prev}` and `{key}`",
                        inner.describe()
                    ));
                }
                hidden.insert(key.clone());
            } else if let Some(suffix) = INPUT_SCALE_SUFFIXES.iter().find(|s| key.ends_with(*s)) {
                input_scales.insert(weight_of(key, suffix)?, key.clone());
                hidden.insert(key.clone());
            } else if let Some(suffix) = UNSUPPORTED_SUFFIXES.iter().find(|s| key.ends_with(*s)) {
                return Err(invalid!(
                    "{}: `{key}`: `{suffix}` scales belong to a quantisation format other than \
                     scaled float8_e4m3fn (e.g. nvfp4), which is not supported",
                    inner.describe()
                ));
            } else if key.ends_with(COMFY_QUANT_SUFFIX) {
                check_comfy_quant(inner.as_ref(), key)?;
                hidden.insert(key.clone());
            }
        }
        Ok(Self {
            inner,
            scaled,
            input_scales,
            hidden,
            output_dtype,
        })
    }

    /// True if `inner` looks like a scaled-fp8 checkpoint (a marker or any weight scale).
    pub fn detect(inner: &dyn TensorSource) -> bool {
        inner
            .keys()
            .iter()
            .any(|k| is_marker(k) || WEIGHT_SCALE_SUFFIXES.iter().any(|s| k.ends_with(s)))
    }

    /// Number of weights stored scaled.
    pub fn scaled_count(&self) -> usize {
        self.scaled.len()
    }

    /// `key` as stored: its FP8 values and scale, without dequantising. `None` if `key` is not a
    /// scaled weight.
    pub fn load_fp8(&self, key: &str, device: &Device) -> Result<Option<Fp8Weight>> {
        let Some(scale_key) = self.scaled.get(key) else {
            return Ok(None);
        };
        let weight = self.inner.load(key, device)?;
        let scale = self.inner.load(scale_key, device)?;
        Fp8Weight::from_parts(weight, scale)
            .map(Some)
            .map_err(|e| invalid!("{}: `{key}`: {e}", self.inner.describe()))
    }

    /// The activation scale stored for the weight `key` (`scale_input` / `input_scale`), if any.
    pub fn input_scale(&self, key: &str) -> Result<Option<f32>> {
        let Some(k) = self.input_scales.get(key) else {
            return Ok(None);
        };
        let t = self.inner.load(k, &Device::Cpu)?.to_dtype(DType::F32)?;
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        match v.as_slice() {
            [one] => Ok(Some(*one)),
            _ => Err(invalid!(
                "{}: `{k}` has shape {:?}, expected a single value",
                self.inner.describe(),
                t.dims()
            )),
        }
    }
}

/// Newer ComfyUI files describe each quantised layer with a JSON document stored as a u8 tensor.
fn check_comfy_quant(inner: &dyn TensorSource, key: &str) -> Result<()> {
    let bytes = inner
        .load(key, &Device::Cpu)?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let json: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| invalid!("{}: `{key}` is not JSON: {e}", inner.describe()))?;
    match json.get("format").and_then(|f| f.as_str()) {
        Some("float8_e4m3fn") => Ok(()),
        other => Err(invalid!(
            "{}: `{key}`: quantisation format {other:?} is not supported (valid: \"float8_e4m3fn\")",
            inner.describe()
        )),
    }
}

impl TensorSource for ScaledFp8Source {
    fn keys(&self) -> Vec<String> {
        self.inner
            .keys()
            .into_iter()
            .filter(|k| !self.hidden.contains(k))
            .collect()
    }

    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        if self.hidden.contains(key) {
            return None;
        }
        self.inner.shape(key)
    }

    fn load(&self, key: &str, device: &Device) -> Result<Tensor> {
        if self.hidden.contains(key) {
            return Err(invalid!(
                "{}: `{key}` is scaled-fp8 bookkeeping, not a model tensor",
                self.describe()
            ));
        }
        match self.load_fp8(key, device)? {
            Some(w) => w
                .dequantize(self.output_dtype)
                .with_context(|| format!("dequantising `{key}` from {}", self.describe())),
            None => self.inner.load(key, device),
        }
    }

    fn describe(&self) -> String {
        format!("{} (scaled fp8)", self.inner.describe())
    }
}
