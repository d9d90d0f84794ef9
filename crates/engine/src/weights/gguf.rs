//! GGUF checkpoints (llama.cpp's format), as city96 / QuantStack publish quantised Wan DiTs.
//!
//! The header (v2 and v3, little-endian), the metadata and the tensor table are parsed here, not
//! by candle's reader, because Wan files carry a 5-D `patch_embedding.weight` (F32) and candle's
//! reader, like ggml, stops at 4 dims. GGUF lists dims fastest-first (`ne[0]` is the row length);
//! [`TensorSource::shape`] reports them reversed, in PyTorch order. Names are returned as stored
//! (a `model.diffusion_model.` prefix, if any, is the model's key normaliser's business).
//!
//! [`TensorSource::load`] returns F32/F16/BF16/F64/I16/I32/I64 tensors in their stored dtype
//! (I8 widened to I16: candle has no i8) and dequantises block-quantised tensors to F32, block by
//! block, with candle's per-block kernels (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K .. Q6_K).
//! [`TensorSource::load_blocks`] keeps them in their GGUF encoding instead, as a [`GgufWeight`]
//! (the file's bytes in a U8 tensor, on any device, dequantised per use: the transformer's block
//! linears stay this way, see `dit::model`). [`GgufSource::load_quantized`] gives candle's
//! `QTensor` (for `QMatMul`). IQ*, TQ* and MXFP4 blocks are refused with the tensor's name.
//!
//! [`GgufWeight::dequantize`] gives the same numbers on the CPU and on CUDA: the CPU runs candle's
//! `to_float` per block; CUDA runs candle's `dequantize_block_*_f32` kernels (the ones
//! `QTensor::dequantize` uses) on our U8 buffer. Every block type's value is a product of an f16
//! scale and small integers that is exact in f32, followed by at most one rounded add, so both
//! give identical f32 values (`vidgen bench --what dit --weights q8_0` checks it on the device).
//! One difference is in the sign of zero only: CUDA's Q4_0 computes `d·q − 8d` (+0) where the
//! CPU's `(q − 8)·d` is −0 for a negative scale. The cast to bf16/f16 afterwards rounds to
//! nearest-even on both.
//!
//! [`write`] writes GGUF v3 files (tests and tools make quantised checkpoints with it).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0,
};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, GgmlType, QTensor};
use candle_core::{DType, Device, Storage, Tensor};
use memmap2::Mmap;

use super::TensorSource;
use crate::invalid;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// More dims than any real tensor has: a guard against reading garbage as a shape.
const MAX_DIMS: usize = 8;

/// A GGUF metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer kind that fits in u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

/// Tensor element / block types of the GGUF tensor table (ggml's `ggml_type` ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum GgufType {
    F32,
    F16,
    BF16,
    F64,
    I8,
    I16,
    I32,
    I64,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgufType {
    fn from_id(id: u32) -> std::result::Result<Self, String> {
        Ok(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            24 => Self::I8,
            25 => Self::I16,
            26 => Self::I32,
            27 => Self::I64,
            28 => Self::F64,
            30 => Self::BF16,
            other => {
                let name = match other {
                    4 | 5 => "Q4_2/Q4_3 (removed from ggml)",
                    9 => "Q8_1",
                    15 => "Q8_K",
                    16 => "IQ2_XXS",
                    17 => "IQ2_XS",
                    18 => "IQ3_XXS",
                    19 => "IQ1_S",
                    20 => "IQ4_NL",
                    21 => "IQ3_S",
                    22 => "IQ2_S",
                    23 => "IQ4_XS",
                    29 => "IQ1_M",
                    34 => "TQ1_0",
                    35 => "TQ2_0",
                    39 => "MXFP4",
                    _ => "unknown",
                };
                return Err(format!(
                    "ggml type {other} ({name}) is not supported; supported: F32, F16, BF16, F64, \
                     I8, I16, I32, I64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K"
                ));
            }
        })
    }

    /// Elements per block and bytes per block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 | Self::I32 => (1, 4),
            Self::F16 | Self::BF16 | Self::I16 => (1, 2),
            Self::F64 | Self::I64 => (1, 8),
            Self::I8 => (1, 1),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2_K => (256, 84),
            Self::Q3_K => (256, 110),
            Self::Q4_K => (256, 144),
            Self::Q5_K => (256, 176),
            Self::Q6_K => (256, 210),
        }
    }

    pub fn is_quantized(self) -> bool {
        self.block().0 > 1
    }

    /// Every block-quantised type, the common Wan quantisations first.
    pub const QUANTIZED: [GgufType; 10] = [
        Self::Q8_0,
        Self::Q6_K,
        Self::Q5_K,
        Self::Q4_K,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q3_K,
        Self::Q2_K,
    ];

    /// Lower-case name as users write it (`q8_0`, `q4_k`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::F64 => "f64",
            Self::I8 => "i8",
            Self::I16 => "i16",
            Self::I32 => "i32",
            Self::I64 => "i64",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q8_0 => "q8_0",
            Self::Q2_K => "q2_k",
            Self::Q3_K => "q3_k",
            Self::Q4_K => "q4_k",
            Self::Q5_K => "q5_k",
            Self::Q6_K => "q6_k",
        }
    }

    /// A block-quantised type by [`name`](Self::name) (case-insensitive).
    pub fn quantized_from_name(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        Self::QUANTIZED.into_iter().find(|t| t.name() == lower)
    }

    /// ggml's type id (the tensor table's field).
    fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::I8 => 24,
            Self::I16 => 25,
            Self::I32 => 26,
            Self::I64 => 27,
            Self::F64 => 28,
            Self::BF16 => 30,
        }
    }

    /// Bytes of `shape` (PyTorch order) stored as this type; `None` when the last dim is not a
    /// whole number of blocks.
    pub fn storage_bytes(self, shape: &[usize]) -> Option<usize> {
        let (block_elems, block_bytes) = self.block();
        let cols = *shape.last()?;
        if !cols.is_multiple_of(block_elems) {
            return None;
        }
        let elems: usize = shape.iter().product();
        Some(elems / block_elems * block_bytes)
    }

    /// candle's type, for keeping the tensor quantised.
    fn candle(self) -> Option<GgmlDType> {
        Some(match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::BF16 => GgmlDType::BF16,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q2_K => GgmlDType::Q2K,
            Self::Q3_K => GgmlDType::Q3K,
            Self::Q4_K => GgmlDType::Q4K,
            Self::Q5_K => GgmlDType::Q5K,
            Self::Q6_K => GgmlDType::Q6K,
            Self::F64 | Self::I8 | Self::I16 | Self::I32 | Self::I64 => return None,
        })
    }
}

/// One entry of the tensor table.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    pub ggml_type: GgufType,
    /// PyTorch order (slowest dim first), i.e. GGUF's `ne` reversed.
    pub shape: Vec<usize>,
    offset: usize,
    nbytes: usize,
}

impl GgufTensorInfo {
    /// Absolute byte offset of the tensor's data in the file.
    pub fn data_offset(&self) -> usize {
        self.offset
    }

    /// Size of the stored (possibly quantised) data in bytes.
    pub fn data_len(&self) -> usize {
        self.nbytes
    }
}

/// A GGUF file through mmap.
pub struct GgufSource {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: BTreeMap<String, GgufTensorInfo>,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            File::open(path).map_err(|e| invalid!("{}: cannot open: {e}", path.display()))?;
        // Safety: mapped read-only; the file must not be truncated while the source is alive.
        let mmap =
            unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let (version, metadata, tensors) =
            parse(&mmap).map_err(|e| invalid!("{}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
        })
    }

    /// The GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// `general.architecture` (`"wan"` for Wan DiTs).
    pub fn architecture(&self) -> Option<&str> {
        self.metadata
            .get("general.architecture")
            .and_then(GgufValue::as_str)
    }

    pub fn tensor_info(&self, key: &str) -> Option<&GgufTensorInfo> {
        self.tensors.get(key)
    }

    fn info(&self, key: &str) -> Result<&GgufTensorInfo> {
        self.tensors
            .get(key)
            .ok_or_else(|| invalid!("{}: no tensor named `{key}`", self.describe()))
    }

    fn bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        &self.mmap[info.offset..info.offset + info.nbytes]
    }

    /// `key` kept in its GGUF encoding as a candle `QTensor` (for `QMatMul`), shape in PyTorch order.
    pub fn load_quantized(&self, key: &str, device: &Device) -> Result<QTensor> {
        let info = self.info(key)?;
        let dtype = info.ggml_type.candle().ok_or_else(|| {
            invalid!(
                "{}: tensor `{key}` is {:?}, which has no quantised candle form",
                self.describe(),
                info.ggml_type
            )
        })?;
        qtensor_from_ggml(dtype, self.bytes(info), info.shape.clone(), device)
            .with_context(|| format!("loading `{key}` from {}", self.describe()))
    }
}

impl TensorSource for GgufSource {
    fn keys(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|i| i.shape.clone())
    }

    fn load(&self, key: &str, device: &Device) -> Result<Tensor> {
        let info = self.info(key)?;
        let raw = self.bytes(info);
        let shape = info.shape.as_slice();
        let plain = |dtype| Tensor::from_raw_buffer(raw, dtype, shape, device);
        let t = match info.ggml_type {
            GgufType::F32 => plain(DType::F32),
            GgufType::F16 => plain(DType::F16),
            GgufType::BF16 => plain(DType::BF16),
            GgufType::F64 => plain(DType::F64),
            GgufType::I16 => plain(DType::I16),
            GgufType::I32 => plain(DType::I32),
            GgufType::I64 => plain(DType::I64),
            GgufType::I8 => {
                let wide: Vec<i16> = raw.iter().map(|&b| b as i8 as i16).collect();
                Tensor::from_vec(wide, shape, device)
            }
            q => {
                let values = dequantize(q, raw)?;
                Tensor::from_vec(values, shape, device)
            }
        };
        t.with_context(|| format!("loading `{key}` from {}", self.describe()))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn quantized_type(&self, key: &str) -> Option<GgufType> {
        self.tensors
            .get(key)
            .map(|i| i.ggml_type)
            .filter(|t| t.is_quantized())
    }

    fn load_blocks(&self, key: &str, device: &Device) -> Result<GgufWeight> {
        let info = self.info(key)?;
        if !info.ggml_type.is_quantized() {
            return Err(invalid!(
                "{}: tensor `{key}` is {:?}, not block-quantised",
                self.describe(),
                info.ggml_type
            ));
        }
        GgufWeight::from_bytes(info.ggml_type, self.bytes(info), &info.shape, device)
            .with_context(|| format!("loading `{key}` from {}", self.describe()))
    }
}

// ---------------------------------------------------------------------------------------------
// weights kept quantised

/// A weight kept in its GGUF block encoding: the stored bytes as a U8 tensor of shape
/// `[d0, .., d(n-2), row_bytes]` (each row of the weight is a row of blocks, so the shape names
/// the weight's own shape once the block type is known), on any device. Costs the file's bytes
/// (Q8_0: 34 bytes per 32 values) instead of 2 per value in bf16; [`dequantize`](Self::dequantize)
/// rebuilds the values for each use.
#[derive(Clone, Debug)]
pub struct GgufWeight {
    data: Tensor,
    ggml_type: GgufType,
}

impl GgufWeight {
    /// Stored blocks `raw` of a weight of `shape` (PyTorch order), copied onto `device`.
    pub fn from_bytes(
        ggml_type: GgufType,
        raw: &[u8],
        shape: &[usize],
        device: &Device,
    ) -> Result<Self> {
        ensure!(
            ggml_type.is_quantized(),
            "{ggml_type:?} is not a block-quantised type"
        );
        let bytes = ggml_type.storage_bytes(shape).ok_or_else(|| {
            anyhow::anyhow!(
                "shape {shape:?}: the last dim is not a multiple of the {ggml_type:?} block size {}",
                ggml_type.block().0
            )
        })?;
        ensure!(
            raw.len() == bytes,
            "{} bytes for a {ggml_type:?} weight of shape {shape:?}, which takes {bytes}",
            raw.len()
        );
        let mut data_shape = shape.to_vec();
        let (block_elems, block_bytes) = ggml_type.block();
        if let Some(last) = data_shape.last_mut() {
            *last = *last / block_elems * block_bytes;
        }
        let data = Tensor::from_raw_buffer(raw, DType::U8, &data_shape, device)?;
        Ok(Self { data, ggml_type })
    }

    /// Wraps stored blocks already in a U8 tensor (the shape [`data`](Self::data) has).
    pub fn from_data(ggml_type: GgufType, data: Tensor) -> Result<Self> {
        ensure!(
            ggml_type.is_quantized(),
            "{ggml_type:?} is not a block-quantised type"
        );
        ensure!(
            data.dtype() == DType::U8 && data.rank() >= 1,
            "GGUF blocks must be a U8 tensor of rank >= 1, got {:?} {:?}",
            data.dtype(),
            data.dims()
        );
        let block_bytes = ggml_type.block().1;
        let row_bytes = data.dim(data.rank() - 1)?;
        ensure!(
            row_bytes.is_multiple_of(block_bytes),
            "{row_bytes} bytes per row is not a whole number of {ggml_type:?} blocks ({block_bytes} bytes)"
        );
        Ok(Self {
            data: data.contiguous()?,
            ggml_type,
        })
    }

    /// `weight` (any float dtype, any device) quantised with candle's ggml quantisers on the CPU,
    /// rows split over the cores (blocks never cross rows, so the bytes equal one whole-tensor
    /// call), then placed on `weight`'s device. For tests and benchmarks: real checkpoints come
    /// quantised.
    pub fn quantize(weight: &Tensor, ggml_type: GgufType) -> Result<Self> {
        let raw = quantize_bytes(weight, ggml_type)?;
        Self::from_bytes(ggml_type, &raw, weight.dims(), weight.device())
    }

    pub fn ggml_type(&self) -> GgufType {
        self.ggml_type
    }

    /// The stored blocks, U8 `[.., row_bytes]`.
    pub fn data(&self) -> &Tensor {
        &self.data
    }

    /// The weight's shape (PyTorch order).
    pub fn dims(&self) -> Vec<usize> {
        let (block_elems, block_bytes) = self.ggml_type.block();
        let mut dims = self.data.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = *last / block_bytes * block_elems;
        }
        dims
    }

    /// Bytes held (the file's bytes of this tensor).
    pub fn storage_bytes(&self) -> usize {
        self.data.elem_count()
    }

    pub fn device(&self) -> &Device {
        self.data.device()
    }

    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            data: self.data.to_device(device)?,
            ggml_type: self.ggml_type,
        })
    }

    /// The values in `dtype`: dequantised to f32 on the weight's device (see the module docs: the
    /// same bits on the CPU and CUDA), then cast.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        let dims = self.dims();
        let values = if self.data.device().is_cpu() {
            let (storage, layout) = self.data.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                bail!("GGUF weight: host tensor without host storage");
            };
            let start = layout.start_offset();
            let raw = &cpu.as_slice::<u8>()?[start..start + self.data.elem_count()];
            Tensor::from_vec(dequantize(self.ggml_type, raw)?, dims, &Device::Cpu)?
        } else {
            self.dequantize_on_device(&dims)?
        };
        Ok(if dtype == DType::F32 {
            values
        } else {
            values.to_dtype(dtype)?
        })
    }

    #[cfg(feature = "cuda")]
    fn dequantize_on_device(&self, dims: &[usize]) -> Result<Tensor> {
        if !self.data.device().is_cuda() {
            bail!(
                "GGUF weights: dequantising on {:?} is not supported (cpu, cuda)",
                self.data.device()
            );
        }
        let values = gpu::dequantize_f32(&self.data, self.ggml_type, dims)?;
        self.check_first_use(&values)?;
        Ok(values)
    }

    /// The first GPU dequantisation of each block type in a process is compared, bit for bit
    /// (±0 equal, see [`crate::tensor_util::dequantized_mismatches`]), with the CPU's on the
    /// weight's first rows: a kernel that decodes a type differently on
    /// this GPU stops the run with an error instead of corrupting it silently.
    #[cfg(feature = "cuda")]
    fn check_first_use(&self, values: &Tensor) -> Result<()> {
        static CHECKED: std::sync::Mutex<Vec<GgufType>> = std::sync::Mutex::new(Vec::new());
        if CHECKED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&self.ggml_type)
        {
            return Ok(());
        }
        let rows = self.data.dim(0)?.min(4);
        let host = self.data.narrow(0, 0, rows)?.to_device(&Device::Cpu)?;
        let cpu = dequantize(self.ggml_type, &host.flatten_all()?.to_vec1::<u8>()?)?;
        let gpu = values
            .narrow(0, 0, rows)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        let (differ, _) = crate::tensor_util::dequantized_mismatches(&cpu, &gpu);
        ensure!(
            differ == 0,
            "GGUF {:?}: the GPU dequantisation differs from the CPU's in {differ} of {} values of \
             the first rows; refusing to run with it (use a safetensors checkpoint or the CPU)",
            self.ggml_type,
            cpu.len()
        );
        CHECKED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.ggml_type);
        Ok(())
    }

    #[cfg(not(feature = "cuda"))]
    fn dequantize_on_device(&self, _dims: &[usize]) -> Result<Tensor> {
        bail!(
            "GGUF weights: dequantising on {:?} is not supported in this build (cpu; cuda with \
             the `cuda` feature)",
            self.data.device()
        )
    }
}

/// `weight` in `ggml_type`'s block encoding (row-major, the file layout), quantised on the CPU.
fn quantize_bytes(weight: &Tensor, ggml_type: GgufType) -> Result<Vec<u8>> {
    let candle_type = ggml_type
        .candle()
        .filter(|_| ggml_type.is_quantized())
        .ok_or_else(|| anyhow::anyhow!("{ggml_type:?} is not a block-quantised type"))?;
    let dims = weight.dims().to_vec();
    let total = ggml_type.storage_bytes(&dims).ok_or_else(|| {
        anyhow::anyhow!(
            "cannot quantise a tensor of shape {dims:?} to {ggml_type:?}: the last dim must be a \
             multiple of {}",
            ggml_type.block().0
        )
    })?;
    let cols = *dims.last().expect("storage_bytes checked the rank");
    let rows = weight.elem_count() / cols.max(1);
    let w = weight
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .reshape((rows, cols))?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let per_thread = rows.div_ceil(threads).max(1);
    let parts = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..rows)
            .step_by(per_thread)
            .map(|start| {
                let w = &w;
                scope.spawn(move || -> Result<Vec<u8>> {
                    let n = per_thread.min(rows - start);
                    // A fresh tensor per chunk: candle's quantiser reads the whole storage,
                    // whatever the view's offset.
                    let values = w.narrow(0, start, n)?.flatten_all()?.to_vec1::<f32>()?;
                    let chunk = Tensor::from_vec(values, (n, cols), &Device::Cpu)?;
                    let q = QTensor::quantize(&chunk, candle_type)?;
                    Ok(q.data()?.into_owned())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("quantiser thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    let raw = parts.concat();
    ensure!(
        raw.len() == total,
        "internal: candle's {ggml_type:?} quantiser wrote {} bytes, expected {total}",
        raw.len()
    );
    Ok(raw)
}

#[cfg(feature = "cuda")]
mod gpu {
    use anyhow::{bail, Result};
    use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda::{kernels, CudaStorage, CudaStorageSlice};
    use candle_core::op::BackpropOp;
    use candle_core::{Storage, Tensor};

    use super::GgufType;
    use crate::cuda_util::{cuda_device, launched};

    /// Threads per CTA of candle's `dequantize_block_q5_{0,1}` (its `CUDA_DEQUANTIZE_BLOCK_SIZE`).
    const Q5_THREADS: usize = 256;

    /// candle's dequantisation kernel for `ty`, launched as candle's `dequantize_f32` launches it
    /// (kernel name, threads per CTA, CTAs, and the element-count argument where there is one).
    fn launch_shape(ty: GgufType, n: usize) -> Result<(&'static str, usize, usize, Option<i32>)> {
        // One CTA per 256 values (a K-quant super-block, or 8 blocks of 32).
        let nb = n.div_ceil(256);
        let count = i32::try_from(n)
            .map_err(|_| anyhow::anyhow!("GGUF weight of {n} values is too large to dequantise"))?;
        Ok(match ty {
            GgufType::Q4_0 => ("dequantize_block_q4_0_f32", 32, nb, Some(count / 32)),
            GgufType::Q4_1 => ("dequantize_block_q4_1_f32", 32, nb, Some(count / 32)),
            GgufType::Q8_0 => ("dequantize_block_q8_0_f32", 32, nb, Some(count / 32)),
            GgufType::Q5_0 => (
                "dequantize_block_q5_0_f32",
                Q5_THREADS,
                n.div_ceil(2 * Q5_THREADS),
                Some(count),
            ),
            GgufType::Q5_1 => (
                "dequantize_block_q5_1_f32",
                Q5_THREADS,
                n.div_ceil(2 * Q5_THREADS),
                Some(count),
            ),
            GgufType::Q2_K => ("dequantize_block_q2_K_f32", 64, nb, None),
            GgufType::Q3_K => ("dequantize_block_q3_K_f32", 64, nb, None),
            GgufType::Q4_K => ("dequantize_block_q4_K_f32", 32, nb, None),
            GgufType::Q5_K => ("dequantize_block_q5_K_f32", 64, nb, None),
            GgufType::Q6_K => ("dequantize_block_q6_K_f32", 64, nb, None),
            other => bail!("{other:?} is not a block-quantised type"),
        })
    }

    /// The blocks in `data` (U8, contiguous, on a CUDA device) as f32 values of shape `dims`.
    pub fn dequantize_f32(data: &Tensor, ty: GgufType, dims: &[usize]) -> Result<Tensor> {
        let n: usize = dims.iter().product();
        let dev = cuda_device(data)?;
        let (kernel, threads, ctas, count) = launch_shape(ty, n)?;
        // SAFETY: every value is written by the kernel below before anything reads `out`.
        let mut out = unsafe { dev.alloc::<f32>(n.max(1))? };
        if n > 0 {
            let (storage, layout) = data.storage_and_layout();
            let Storage::Cuda(s) = &*storage else {
                bail!("GGUF weight: not on a CUDA device");
            };
            let CudaStorageSlice::U8(bytes) = &s.slice else {
                bail!("GGUF weight: blocks are not a U8 tensor");
            };
            let start = layout.start_offset();
            let blocks = bytes.slice(start..start + data.elem_count());
            let func = dev.get_or_load_func(kernel, &kernels::QUANTIZED)?;
            let cfg = LaunchConfig {
                grid_dim: (ctas as u32, 1, 1),
                block_dim: (threads as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            // The slices go to the launch itself (not raw addresses): cudarc then orders this
            // kernel after the blocks' upload (a streamed block arrives on the copy stream) and
            // records the read, so the blocks are not freed or reused before the kernel ran.
            let mut b = func.builder();
            b.arg(&blocks).arg(&mut out);
            if let Some(count) = &count {
                b.arg(count);
            }
            // SAFETY: the arguments match candle's `dequantize_block_*_f32` (blocks, output, and
            // the count for the non-K types); `blocks` holds n values' blocks, `out` n floats.
            launched(unsafe { b.launch(cfg) }.map(|_| ()))?;
        }
        let storage = CudaStorage::wrap_cuda_slice(out, dev.clone());
        let t = Tensor::from_storage(Storage::Cuda(storage), dims, BackpropOp::none(), false);
        Ok(t)
    }
}

// ---------------------------------------------------------------------------------------------
// writing

/// One tensor for [`write`]: name, stored type, shape (PyTorch order) and stored bytes.
#[derive(Clone, Debug)]
pub struct GgufTensorOut {
    pub name: String,
    pub ggml_type: GgufType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl GgufTensorOut {
    /// `tensor` stored as `ggml_type`: F32/F16/BF16 converted (round to nearest even), block types
    /// quantised with candle's quantisers (see [`GgufWeight::quantize`]).
    pub fn from_tensor(name: &str, tensor: &Tensor, ggml_type: GgufType) -> Result<Self> {
        let t = tensor.to_device(&Device::Cpu)?.flatten_all()?;
        let data = match ggml_type {
            GgufType::F32 => le_bytes(&t.to_dtype(DType::F32)?.to_vec1::<f32>()?, f32::to_le_bytes),
            GgufType::F16 => le_bytes(
                &t.to_dtype(DType::F16)?.to_vec1::<half::f16>()?,
                half::f16::to_le_bytes,
            ),
            GgufType::BF16 => le_bytes(
                &t.to_dtype(DType::BF16)?.to_vec1::<half::bf16>()?,
                half::bf16::to_le_bytes,
            ),
            q if q.is_quantized() => quantize_bytes(tensor, q)?,
            other => {
                bail!("writing {other:?} tensors is not supported (f32, f16, bf16, block types)")
            }
        };
        Ok(Self {
            name: name.to_string(),
            ggml_type,
            shape: tensor.dims().to_vec(),
            data,
        })
    }
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| f(v)).collect()
}

/// Writes a GGUF v3 file (little-endian, 32-byte alignment) with `metadata` and `tensors` in
/// order. Shapes are given in PyTorch order and stored fastest-first, as ggml does.
pub fn write(path: &Path, metadata: &[(&str, GgufValue)], tensors: &[GgufTensorOut]) -> Result<()> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn type_id(v: &GgufValue) -> u32 {
        match v {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }
    fn value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => out.push(*x),
            GgufValue::I8(x) => out.extend(x.to_le_bytes()),
            GgufValue::U16(x) => out.extend(x.to_le_bytes()),
            GgufValue::I16(x) => out.extend(x.to_le_bytes()),
            GgufValue::U32(x) => out.extend(x.to_le_bytes()),
            GgufValue::I32(x) => out.extend(x.to_le_bytes()),
            GgufValue::U64(x) => out.extend(x.to_le_bytes()),
            GgufValue::I64(x) => out.extend(x.to_le_bytes()),
            GgufValue::F32(x) => out.extend(x.to_le_bytes()),
            GgufValue::F64(x) => out.extend(x.to_le_bytes()),
            GgufValue::Bool(x) => out.push(u8::from(*x)),
            GgufValue::String(s) => string(out, s),
            GgufValue::Array(items) => {
                out.extend(items.first().map_or(0, type_id).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    value(out, item);
                }
            }
        }
    }

    let align = DEFAULT_ALIGNMENT as usize;
    let mut out = Vec::new();
    out.extend(MAGIC);
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, v) in metadata {
        string(&mut out, key);
        out.extend(type_id(v).to_le_bytes());
        value(&mut out, v);
    }
    let mut offset = 0usize;
    for t in tensors {
        let expected = t.ggml_type.storage_bytes(&t.shape);
        ensure!(
            expected == Some(t.data.len()),
            "tensor `{}`: {} bytes for {:?} {:?} (expected {expected:?})",
            t.name,
            t.data.len(),
            t.ggml_type,
            t.shape
        );
        string(&mut out, &t.name);
        out.extend((t.shape.len() as u32).to_le_bytes());
        for &d in t.shape.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        out.extend(t.ggml_type.id().to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset = (offset + t.data.len()).next_multiple_of(align);
    }
    out.resize(out.len().next_multiple_of(align), 0);
    for t in tensors {
        out.extend(&t.data);
        out.resize(out.len().next_multiple_of(align), 0);
    }
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

// ---------------------------------------------------------------------------------------------
// dequantisation

/// Block-quantised bytes to f32, split over the available cores.
pub fn dequantize(ggml_type: GgufType, raw: &[u8]) -> Result<Vec<f32>> {
    match ggml_type {
        GgufType::Q4_0 => dequantize_blocks::<BlockQ4_0>(ggml_type, raw),
        GgufType::Q4_1 => dequantize_blocks::<BlockQ4_1>(ggml_type, raw),
        GgufType::Q5_0 => dequantize_blocks::<BlockQ5_0>(ggml_type, raw),
        GgufType::Q5_1 => dequantize_blocks::<BlockQ5_1>(ggml_type, raw),
        GgufType::Q8_0 => dequantize_blocks::<BlockQ8_0>(ggml_type, raw),
        GgufType::Q2_K => dequantize_blocks::<BlockQ2K>(ggml_type, raw),
        GgufType::Q3_K => dequantize_blocks::<BlockQ3K>(ggml_type, raw),
        GgufType::Q4_K => dequantize_blocks::<BlockQ4K>(ggml_type, raw),
        GgufType::Q5_K => dequantize_blocks::<BlockQ5K>(ggml_type, raw),
        GgufType::Q6_K => dequantize_blocks::<BlockQ6K>(ggml_type, raw),
        other => bail!("{other:?} is not a block-quantised type"),
    }
}

fn dequantize_blocks<B: GgmlType>(ggml_type: GgufType, raw: &[u8]) -> Result<Vec<f32>> {
    let (block_elems, block_bytes) = ggml_type.block();
    // candle's block structs are `repr(C)` images of ggml's blocks; make sure of it before
    // reinterpreting bytes as them.
    if std::mem::size_of::<B>() != block_bytes || B::BLCK_SIZE != block_elems {
        bail!("internal: candle's {ggml_type:?} block layout differs from ggml's");
    }
    if !raw.len().is_multiple_of(block_bytes) {
        bail!(
            "{} bytes is not a whole number of {ggml_type:?} blocks",
            raw.len()
        );
    }
    let n_blocks = raw.len() / block_bytes;
    let mut out = vec![0f32; n_blocks * block_elems];
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // at least 1024 blocks per thread: small tensors are not worth a thread
    let per_thread = n_blocks.div_ceil(threads).max(1024);
    std::thread::scope(|scope| {
        for (raw, out) in raw
            .chunks(per_thread * block_bytes)
            .zip(out.chunks_mut(per_thread * block_elems))
        {
            scope.spawn(move || dequantize_chunk::<B>(raw, out));
        }
    });
    Ok(out)
}

fn dequantize_chunk<B: GgmlType>(raw: &[u8], out: &mut [f32]) {
    // Blocks are copied into an aligned buffer a slice at a time (the mapping gives no alignment
    // guarantee for block structs holding f16 fields).
    const SLICE: usize = 256;
    let block_bytes = std::mem::size_of::<B>();
    let mut blocks: Vec<B> = (0..SLICE).map(|_| B::zeros()).collect();
    for (raw, out) in raw
        .chunks(SLICE * block_bytes)
        .zip(out.chunks_mut(SLICE * B::BLCK_SIZE))
    {
        let n = raw.len() / block_bytes;
        // Safety: `blocks` has room for SLICE >= n blocks, and the block types are plain data
        // (f16 / u8 / i8 fields), valid for any bit pattern.
        unsafe {
            std::ptr::copy_nonoverlapping(raw.as_ptr(), blocks.as_mut_ptr() as *mut u8, raw.len());
        }
        B::to_float(&blocks[..n], out);
    }
}

// ---------------------------------------------------------------------------------------------
// header

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.data.len() - self.pos {
            bail!(
                "file ends inside the header ({what} at byte {}): truncated or not GGUF",
                self.pos
            );
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into()?))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into()?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into()?))
    }
    /// A count that must fit in the rest of the file at `min_size` bytes per item.
    fn count(&mut self, min_size: usize, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.data.len() - self.pos) as u64;
        if n > left / min_size.max(1) as u64 {
            bail!("{what} {n} does not fit in the file: truncated or corrupt header");
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(1, what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).with_context(|| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::U8(self.u8(key)?),
            1 => GgufValue::I8(self.u8(key)? as i8),
            2 => GgufValue::U16(self.u16(key)?),
            3 => GgufValue::I16(self.u16(key)? as i16),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(self.u32(key)? as i32),
            6 => GgufValue::F32(f32::from_bits(self.u32(key)?)),
            7 => match self.u8(key)? {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => bail!("metadata `{key}`: bool byte {b} is neither 0 nor 1"),
            },
            8 => GgufValue::String(self.string(key)?),
            9 => {
                let item_ty = self.u32(key)?;
                let n = self.count(1, key)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_ty, key)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(self.u64(key)? as i64),
            12 => GgufValue::F64(f64::from_bits(self.u64(key)?)),
            other => bail!("metadata `{key}`: unknown value type {other} (valid: 0..=12)"),
        })
    }
}

type Parsed = (
    u32,
    BTreeMap<String, GgufValue>,
    BTreeMap<String, GgufTensorInfo>,
);

fn parse(data: &[u8]) -> Result<Parsed> {
    let mut r = Reader { data, pos: 0 };
    if r.take(4, "magic").ok() != Some(MAGIC.as_slice()) {
        bail!("not a GGUF file (magic is not `GGUF`)");
    }
    let version = r.u32("version")?;
    match version {
        2 | 3 => {}
        1 => bail!("GGUF version 1 (2023, 32-bit counts) is not supported; re-convert the file"),
        v if v.swap_bytes() <= 3 => bail!("big-endian GGUF files are not supported"),
        v => bail!("GGUF version {v} is not supported (2 or 3)"),
    }
    let n_tensors = r.count(8 + 4 + 8 + 4 + 8, "tensor count")?;
    let n_kv = r.count(8 + 4 + 1, "metadata count")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = r.string("metadata key")?;
        let ty = r.u32(&key)?;
        let value = r.value(ty, &key)?;
        metadata.insert(key, value);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => bail!("general.alignment {v:?} is not a positive power of two"),
        },
    };

    let mut infos = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = r.string("tensor name")?;
        let n_dims = r.u32(&name)? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            bail!("tensor `{name}`: {n_dims} dims (valid: 1..={MAX_DIMS})");
        }
        let mut ne = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            ne.push(r.u64(&name)?);
        }
        let ty_id = r.u32(&name)?;
        let ty = GgufType::from_id(ty_id).map_err(|e| anyhow::anyhow!("tensor `{name}`: {e}"))?;
        let offset = r.u64(&name)?;
        infos.push((name, ne, ty, offset));
    }
    let data_start = (r.pos as u64).next_multiple_of(alignment);

    let mut tensors = BTreeMap::new();
    for (name, ne, ty, offset) in infos {
        let (block_elems, block_bytes) = ty.block();
        let elems = ne
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .with_context(|| format!("tensor `{name}`: dims {ne:?} overflow"))?;
        if ne[0] % block_elems as u64 != 0 {
            bail!(
                "tensor `{name}`: row length {} is not a multiple of the {ty:?} block size {block_elems}",
                ne[0]
            );
        }
        let nbytes = elems / block_elems as u64 * block_bytes as u64;
        if offset % alignment != 0 {
            bail!("tensor `{name}`: data offset {offset} is not aligned to {alignment}");
        }
        let start = data_start + offset;
        if start + nbytes > data.len() as u64 {
            bail!(
                "tensor `{name}` ({ty:?}, {nbytes} bytes at {start}) extends past the end of the \
                 file ({} bytes): truncated download?",
                data.len()
            );
        }
        let info = GgufTensorInfo {
            ggml_type: ty,
            shape: ne.iter().rev().map(|&d| d as usize).collect(),
            offset: start as usize,
            nbytes: nbytes as usize,
        };
        if tensors.insert(name.clone(), info).is_some() {
            bail!("tensor `{name}` is listed twice");
        }
    }
    Ok((version, metadata, tensors))
}
