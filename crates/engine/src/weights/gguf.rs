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
//! [`GgufSource::load_quantized`] keeps them quantised instead (a candle `QTensor`, for `QMatMul`).
//! IQ*, TQ* and MXFP4 blocks are refused with the tensor's name.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0,
};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, GgmlType, QTensor};
use candle_core::{DType, Device, Tensor};
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
