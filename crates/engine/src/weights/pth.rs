//! PyTorch `.pth` checkpoints (zip + pickle), as the official Wan release ships the VAE and T5.
//!
//! `torch.save` (torch >= 1.6) writes a zip archive `<name>/data.pkl` + `<name>/data/<key>`: the
//! pickle describes the object tree, and each tensor points at a storage file by key. We map the
//! file, read the zip directory, and interpret only the pickle opcodes and globals that state
//! dicts use. Nothing is ever executed: an unknown global (a class or function the pickle wants to
//! call) is an error that names it. Tensor bytes stay in the mapping until [`TensorSource::load`].
//!
//! Which tensors are exposed (the "root"):
//! - A plain state dict (`{name: tensor}`, possibly an `OrderedDict`): its names as stored.
//! - Nested dicts are flattened with `.`: `{"encoder": {"w": t}}` gives `encoder.w`; list or
//!   tuple items are named by index.
//! - A wrapper without tensors of its own is unwrapped: the first of `state_dict`,
//!   `model_state_dict`, `model`, `module` that holds tensors is taken; failing that, the only
//!   entry that holds tensors. This repeats (e.g. `{"model": {"module": {...}}}`).
//!   [`PthSource::open_at`] picks a sub-dict explicitly instead (e.g. `["ema"]`).
//!
//! Dtypes: tensors load in their stored dtype, except types candle lacks, which are widened
//! losslessly: bool -> u8, int8 -> i16, float8_e5m2 -> f16.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use super::TensorSource;
use crate::invalid;

/// Keys that conventionally wrap a state dict inside a training checkpoint, in preference order.
const WRAPPER_KEYS: [&str; 4] = ["state_dict", "model_state_dict", "model", "module"];

/// A PyTorch zip checkpoint opened through mmap.
pub struct PthSource {
    path: PathBuf,
    mmap: Mmap,
    tensors: BTreeMap<String, TensorRecord>,
    /// storage key -> byte range in the file
    storages: HashMap<String, StorageEntry>,
    /// Sub-dict the tensors come from (empty: the root object).
    root: Vec<String>,
}

impl PthSource {
    /// Opens a `torch.save` zip checkpoint and picks the state dict as described in the module docs.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_inner(path, None)
    }

    /// Opens a checkpoint and takes the tensors under the dict path `root` (e.g. `["ema"]`,
    /// `["model", "module"]`), without automatic unwrapping.
    pub fn open_at(path: &Path, root: &[&str]) -> Result<Self> {
        Self::open_inner(path, Some(root))
    }

    /// The dict path the tensors were taken from (empty for the top-level object).
    pub fn root(&self) -> &[String] {
        &self.root
    }

    fn open_inner(path: &Path, root: Option<&[&str]>) -> Result<Self> {
        let file =
            File::open(path).map_err(|e| invalid!("{}: cannot open: {e}", path.display()))?;
        // Safety: mapped read-only; as with every mmap loader, the file must not be truncated
        // while the source is alive.
        let mmap =
            unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        let bytes: &[u8] = &mmap;
        if !bytes.starts_with(b"PK\x03\x04") {
            if bytes.starts_with(&[0x80, 0x02]) || bytes.starts_with(&[0x80, 0x04]) {
                return Err(invalid!(
                    "{}: legacy (non-zip) PyTorch checkpoint from torch < 1.6 is not supported; \
                     re-save it with a current torch: torch.save(torch.load(p), p2)",
                    path.display()
                ));
            }
            return Err(invalid!(
                "{}: not a PyTorch zip checkpoint (no zip signature)",
                path.display()
            ));
        }
        let entries = read_zip_entries(bytes).map_err(|e| invalid!("{}: {e}", path.display()))?;
        let pkl_names: Vec<&String> = entries
            .keys()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .collect();
        let pkl_name = match pkl_names.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(invalid!(
                    "{}: zip archive has no `<name>/data.pkl`; not a torch.save checkpoint",
                    path.display()
                ))
            }
            many => {
                return Err(invalid!(
                    "{}: several data.pkl entries ({many:?})",
                    path.display()
                ))
            }
        };
        let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
        if let Some(order) = entries.get(&format!("{prefix}byteorder")) {
            let order = entry_bytes(bytes, order, &format!("{prefix}byteorder"))?;
            if order != b"little" {
                return Err(invalid!(
                    "{}: byteorder `{}` is not supported (only little-endian checkpoints)",
                    path.display(),
                    String::from_utf8_lossy(order)
                ));
            }
        }
        let pkl = entry_bytes(bytes, &entries[&pkl_name], &pkl_name)?;
        let object = Unpickler::new(pkl)
            .run()
            .map_err(|e| invalid!("{}: {pkl_name}: {e}", path.display()))?;

        let (object, root) = match root {
            Some(keys) => {
                let mut obj = object;
                for k in keys {
                    obj = dict_get(&obj, k).ok_or_else(|| {
                        invalid!(
                            "{}: no dict entry `{k}` on the path {keys:?}; top-level keys: {:?}",
                            path.display(),
                            dict_keys(&obj)
                        )
                    })?;
                }
                (obj, keys.iter().map(|s| s.to_string()).collect())
            }
            None => unwrap_state_dict(object),
        };

        let mut tensors = BTreeMap::new();
        flatten(&object, String::new(), &mut tensors)
            .map_err(|e| invalid!("{}: {e}", path.display()))?;
        let mut storages = HashMap::new();
        for (name, rec) in &tensors {
            let entry_name = format!("{prefix}data/{}", rec.storage);
            let entry = entries.get(&entry_name).ok_or_else(|| {
                invalid!(
                    "{}: tensor `{name}` refers to storage `{}` but `{entry_name}` is not in the archive",
                    path.display(),
                    rec.storage
                )
            })?;
            rec.check_bounds(entry)
                .map_err(|e| invalid!("{}: tensor `{name}`: {e}", path.display()))?;
            storages.insert(rec.storage.clone(), entry.clone());
        }
        if !root.is_empty() {
            tracing::debug!(path = %path.display(), ?root, "pth: using nested state dict");
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            tensors,
            storages,
            root,
        })
    }
}

impl TensorSource for PthSource {
    fn keys(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|r| r.shape.clone())
    }

    fn load(&self, key: &str, device: &Device) -> Result<Tensor> {
        let rec = self
            .tensors
            .get(key)
            .ok_or_else(|| invalid!("{}: no tensor named `{key}`", self.describe()))?;
        let entry = &self.storages[&rec.storage];
        let data = entry_bytes(&self.mmap, entry, &rec.storage)
            .with_context(|| format!("loading `{key}` from {}", self.describe()))?;
        let es = rec.dtype.size();
        let bytes = if rec.is_contiguous() {
            let start = rec.offset * es;
            std::borrow::Cow::Borrowed(&data[start..start + rec.numel() * es])
        } else {
            std::borrow::Cow::Owned(gather_strided(data, rec, es))
        };
        let (dtype, bytes) = rec.dtype.widen(bytes);
        Tensor::from_raw_buffer(&bytes, dtype, &rec.shape, device)
            .with_context(|| format!("loading `{key}` from {}", self.describe()))
    }

    fn describe(&self) -> String {
        if self.root.is_empty() {
            self.path.display().to_string()
        } else {
            format!("{} [{}]", self.path.display(), self.root.join("/"))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// zip

#[derive(Clone, Debug)]
struct StorageEntry {
    data_start: usize,
    compressed_size: usize,
    size: usize,
    stored: bool,
}

fn read_zip_entries(bytes: &[u8]) -> Result<HashMap<String, StorageEntry>> {
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).context("reading zip directory")?;
    let mut out = HashMap::new();
    for i in 0..archive.len() {
        let f = archive.by_index_raw(i).context("reading zip entry")?;
        let name = f.name().context("zip entry name")?.to_string();
        let data_start = f
            .data_start()
            .with_context(|| format!("zip entry `{name}`: no data offset"))?;
        let entry = StorageEntry {
            data_start: data_start as usize,
            compressed_size: f.compressed_size() as usize,
            size: f.size() as usize,
            stored: f.compression() == zip::CompressionMethod::Stored,
        };
        if entry.data_start + entry.compressed_size > bytes.len() {
            bail!("zip entry `{name}` extends past the end of the file (truncated download?)");
        }
        out.insert(name, entry);
    }
    Ok(out)
}

/// The bytes of a stored (uncompressed) zip entry, borrowed from the mapping.
fn entry_bytes<'a>(bytes: &'a [u8], e: &StorageEntry, name: &str) -> Result<&'a [u8]> {
    if !e.stored {
        // torch.save never compresses; a re-zipped checkpoint would need a deflate decoder,
        // which the engine does not carry.
        return Err(invalid!(
            "zip entry `{name}` is compressed; PyTorch checkpoints store entries uncompressed \
             (re-save it with torch.save)"
        ));
    }
    Ok(&bytes[e.data_start..e.data_start + e.size])
}

// ---------------------------------------------------------------------------------------------
// tensors

/// Element types of torch storages (`torch.FloatStorage`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StorageDType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    F8E4M3,
    F8E5M2,
}

impl StorageDType {
    /// `torch.float32`, ... (the dtype argument of `_rebuild_tensor_v3`).
    fn from_dtype_name(name: &str) -> Option<Self> {
        Some(match name {
            "float64" | "double" => Self::F64,
            "float32" | "float" => Self::F32,
            "float16" | "half" => Self::F16,
            "bfloat16" => Self::BF16,
            "int64" | "long" => Self::I64,
            "int32" | "int" => Self::I32,
            "int16" | "short" => Self::I16,
            "int8" => Self::I8,
            "uint8" => Self::U8,
            "bool" => Self::Bool,
            "float8_e4m3fn" => Self::F8E4M3,
            "float8_e5m2" => Self::F8E5M2,
            _ => return None,
        })
    }

    fn from_storage_name(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            "Float8_e4m3fnStorage" => Self::F8E4M3,
            "Float8_e5m2Storage" => Self::F8E5M2,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool | Self::F8E4M3 | Self::F8E5M2 => 1,
        }
    }

    /// The candle dtype and bytes for a contiguous buffer, widening types candle lacks.
    fn widen(self, bytes: std::borrow::Cow<'_, [u8]>) -> (DType, std::borrow::Cow<'_, [u8]>) {
        use std::borrow::Cow::Owned;
        match self {
            Self::F64 => (DType::F64, bytes),
            Self::F32 => (DType::F32, bytes),
            Self::F16 => (DType::F16, bytes),
            Self::BF16 => (DType::BF16, bytes),
            Self::I64 => (DType::I64, bytes),
            Self::I32 => (DType::I32, bytes),
            Self::I16 => (DType::I16, bytes),
            Self::U8 => (DType::U8, bytes),
            Self::F8E4M3 => (DType::F8E4M3, bytes),
            // torch stores bools as bytes 0/1
            Self::Bool => (DType::U8, bytes),
            Self::I8 => (
                DType::I16,
                Owned(
                    bytes
                        .iter()
                        .flat_map(|&b| (b as i8 as i16).to_le_bytes())
                        .collect(),
                ),
            ),
            // e5m2 is the upper byte of an IEEE f16, so the widening is exact.
            Self::F8E5M2 => (
                DType::F16,
                Owned(bytes.iter().flat_map(|&b| [0u8, b]).collect()),
            ),
        }
    }
}

#[derive(Clone, Debug)]
struct StorageRef {
    /// `None` for `torch.storage.UntypedStorage` (the tensor's dtype argument decides).
    dtype: Option<StorageDType>,
    key: String,
    nbytes: usize,
}

#[derive(Clone, Debug)]
struct TensorRecord {
    dtype: StorageDType,
    storage: String,
    storage_nbytes: usize,
    /// In elements.
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

impl TensorRecord {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected *= d;
        }
        true
    }

    /// The view must lie within its storage, and the storage within its zip entry.
    fn check_bounds(&self, entry: &StorageEntry) -> Result<()> {
        if entry.size < self.storage_nbytes {
            bail!(
                "storage `{}` holds {} bytes, expected {}",
                self.storage,
                entry.size,
                self.storage_nbytes
            );
        }
        if self.numel() == 0 {
            return Ok(());
        }
        let last = self.offset
            + self
                .shape
                .iter()
                .zip(&self.stride)
                .map(|(&d, &s)| (d - 1) * s)
                .sum::<usize>();
        if (last + 1) * self.dtype.size() > self.storage_nbytes {
            bail!(
                "view (offset {}, shape {:?}, stride {:?}) of {:?} exceeds its storage of {} bytes",
                self.offset,
                self.shape,
                self.stride,
                self.dtype,
                self.storage_nbytes
            );
        }
        Ok(())
    }
}

/// Copies a strided view into a contiguous row-major buffer.
fn gather_strided(data: &[u8], rec: &TensorRecord, es: usize) -> Vec<u8> {
    let n = rec.numel();
    let mut out = Vec::with_capacity(n * es);
    if n == 0 {
        return out;
    }
    let rank = rec.shape.len();
    let mut index = vec![0usize; rank];
    for _ in 0..n {
        let elem = rec.offset
            + index
                .iter()
                .zip(&rec.stride)
                .map(|(i, s)| i * s)
                .sum::<usize>();
        out.extend_from_slice(&data[elem * es..(elem + 1) * es]);
        for d in (0..rank).rev() {
            index[d] += 1;
            if index[d] < rec.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// pickle

/// The globals a state dict may reference. Anything else is refused.
#[derive(Clone, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensorV3,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// `torch.Tensor` / `torch.nn.parameter.Parameter`, only as the type argument of
    /// `_rebuild_from_type_v2`.
    TensorType,
    Storage(StorageDType),
    UntypedStorage,
    DType(StorageDType),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Result<Self> {
        Ok(match (module, name) {
            ("collections", "OrderedDict") => Self::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Self::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor_v3") => Self::RebuildTensorV3,
            ("torch._utils", "_rebuild_tensor") => Self::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Self::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Self::RebuildParameterWithState,
            ("torch._tensor", "_rebuild_from_type_v2") => Self::RebuildFromTypeV2,
            ("torch", "Tensor") | ("torch.nn.parameter", "Parameter") => Self::TensorType,
            ("torch.storage", "UntypedStorage") => Self::UntypedStorage,
            ("torch", s) => match (
                StorageDType::from_storage_name(s),
                StorageDType::from_dtype_name(s),
            ) {
                (Some(d), _) => Self::Storage(d),
                (None, Some(d)) => Self::DType(d),
                (None, None) => bail!(
                    "unsupported pickle global `torch.{s}`: not a known storage type or dtype"
                ),
            },
            _ => bail!(
                "unsupported pickle global `{module}.{name}`: only state dicts of tensors are read \
                 (collections.OrderedDict, torch._utils._rebuild_tensor_v2/_rebuild_parameter, \
                 torch.*Storage); nothing in a checkpoint is executed"
            ),
        })
    }
}

#[derive(Clone, Debug)]
enum Value {
    Mark,
    None,
    Bool(bool),
    Int(i64),
    /// Floats and bytes occur only in metadata we skip, so their values are not kept.
    Float,
    Str(String),
    Bytes,
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRecord>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Mark => "mark",
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    fn as_usize(&self, what: &str) -> Result<usize> {
        match self {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            other => bail!("{what}: expected a non-negative int, found {other:?}"),
        }
    }

    fn as_usizes(&self, what: &str) -> Result<Vec<usize>> {
        match self {
            Value::Tuple(items) => items.iter().map(|v| v.as_usize(what)).collect(),
            Value::List(items) => items.borrow().iter().map(|v| v.as_usize(what)).collect(),
            other => bail!("{what}: expected a tuple of ints, found {}", other.kind()),
        }
    }

    fn holds_tensors(&self) -> bool {
        match self {
            Value::Tensor(_) => true,
            Value::Dict(d) => d.borrow().iter().any(|(_, v)| v.holds_tensors()),
            Value::List(l) => l.borrow().iter().any(Value::holds_tensors),
            Value::Tuple(t) => t.iter().any(Value::holds_tensors),
            _ => false,
        }
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.pos + n > self.data.len() {
            bail!("pickle truncated at byte {}", self.pos);
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("pickle: unterminated GLOBAL line")?;
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end]).context("pickle: GLOBAL name is not UTF-8")
    }

    fn string(&mut self, n: usize) -> Result<Value> {
        let b = self.take(n)?;
        Ok(Value::Str(
            std::str::from_utf8(b)
                .context("pickle: string is not UTF-8")?
                .to_string(),
        ))
    }

    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().context("pickle: stack underflow")
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().context("pickle: stack underflow")
    }

    /// Pops everything above the topmost MARK (and the mark).
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let at = self
            .stack
            .iter()
            .rposition(|v| matches!(v, Value::Mark))
            .context("pickle: MARK not found")?;
        let items = self.stack.split_off(at + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_get(&self, i: u32) -> Result<Value> {
        self.memo
            .get(&i)
            .cloned()
            .with_context(|| format!("pickle: memo entry {i} not found"))
    }

    fn memo_put(&mut self, i: u32) -> Result<()> {
        let v = self
            .stack
            .last()
            .context("pickle: PUT on empty stack")?
            .clone();
        self.memo.insert(i, v);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            bail!("pickle: SETITEMS with an odd number of items");
        }
        match self.top()? {
            Value::Dict(d) => {
                let mut d = d.borrow_mut();
                let mut it = items.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    d.push((k, v));
                }
                Ok(())
            }
            other => bail!("pickle: SETITEM(S) on a {}", other.kind()),
        }
    }

    fn append(&mut self, items: Vec<Value>) -> Result<()> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => bail!("pickle: APPEND(S) on a {}", other.kind()),
        }
    }

    fn run(mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        bail!("pickle protocol {proto} is not supported (2..=5)");
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Value::Mark),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take(2)?.try_into().unwrap());
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as usize
                    } else {
                        self.u32()? as usize
                    };
                    let b = self.take(n)?;
                    if n > 8 {
                        bail!("pickle: integer of {n} bytes does not fit in 64 bits");
                    }
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    // two's complement sign extension
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v |= -1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Float);
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                b'C' | b'B' | 0x8e => {
                    let n = match op {
                        b'C' => self.u8()? as usize,
                        b'B' => self.u32()? as usize,
                        _ => self.u64()? as usize,
                    };
                    self.take(n)?;
                    self.stack.push(Value::Bytes);
                }
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    if self.stack.len() < n {
                        bail!("pickle: stack underflow in TUPLE{n}");
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b']' => self
                    .stack
                    .push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'}' => self
                    .stack
                    .push(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack
                        .push(Value::Dict(Rc::new(RefCell::new(Vec::new()))));
                    self.set_items(items)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                b'q' => {
                    let i = self.u8()? as u32;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()?;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u32;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                b'j' => {
                    let i = self.u32()?;
                    let v = self.memo_get(i)?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack
                        .push(Value::Global(Global::resolve(module, name)?));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => {
                            self.stack.push(Value::Global(Global::resolve(&m, &n)?))
                        }
                        _ => bail!("pickle: STACK_GLOBAL needs two strings"),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let storage = persistent_storage(&pid)?;
                    self.stack.push(Value::Storage(Rc::new(storage)));
                }
                b'R' => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let v = reduce(func, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD sets instance state (an OrderedDict's `_metadata`, a parameter's
                    // python attributes): irrelevant to the tensor values.
                    self.pop()?;
                    self.top()?;
                }
                _ => bail!(
                    "unsupported pickle opcode 0x{op:02x} ({:?}) at byte {at}",
                    op as char
                ),
            }
        }
    }
}

/// `('storage', torch.FloatStorage, '<key>', '<location>', numel)` from BINPERSID.
fn persistent_storage(pid: &Value) -> Result<StorageRef> {
    let Value::Tuple(items) = pid else {
        bail!("persistent id: expected a tuple, found {}", pid.kind());
    };
    match items.as_slice() {
        [Value::Str(tag), Value::Global(kind), Value::Str(key), _location, numel]
            if tag == "storage" =>
        {
            let numel = numel.as_usize("storage numel")?;
            // typed storages count elements, untyped ones bytes
            let (dtype, nbytes) = match kind {
                Global::Storage(d) => (Some(*d), numel * d.size()),
                Global::UntypedStorage => (None, numel),
                other => bail!("persistent id: {other:?} is not a storage type"),
            };
            Ok(StorageRef {
                dtype,
                key: key.clone(),
                nbytes,
            })
        }
        _ => bail!("persistent id: unsupported form {items:?}"),
    }
}

fn reduce(func: Value, args: Value) -> Result<Value> {
    let Value::Global(func) = func else {
        bail!("pickle: REDUCE on a {}, expected a global", func.kind());
    };
    let Value::Tuple(args) = args else {
        bail!(
            "pickle: REDUCE arguments must be a tuple, found {}",
            args.kind()
        );
    };
    match func {
        Global::OrderedDict => {
            if !args.is_empty() {
                bail!("collections.OrderedDict with arguments is not supported");
            }
            Ok(Value::Dict(Rc::new(RefCell::new(Vec::new()))))
        }
        Global::RebuildTensorV2 | Global::RebuildTensorV3 | Global::RebuildTensor => {
            // (storage, storage_offset, size, stride[, requires_grad, backward_hooks[, dtype (v3)]
            // [, metadata]])
            let [storage, offset, size, stride, rest @ ..] = args.as_slice() else {
                bail!(
                    "_rebuild_tensor: expected at least 4 arguments, found {}",
                    args.len()
                );
            };
            let Value::Storage(storage) = storage else {
                bail!(
                    "_rebuild_tensor: first argument is a {}, expected a storage",
                    storage.kind()
                );
            };
            let shape = size.as_usizes("tensor size")?;
            let stride = stride.as_usizes("tensor stride")?;
            if shape.len() != stride.len() {
                bail!("_rebuild_tensor: size {shape:?} and stride {stride:?} differ in rank");
            }
            let dtype = if func == Global::RebuildTensorV3 {
                match rest.get(2) {
                    Some(Value::Global(Global::DType(d))) => *d,
                    other => {
                        bail!("_rebuild_tensor_v3: expected a dtype argument, found {other:?}")
                    }
                }
            } else {
                storage.dtype.with_context(|| {
                    format!("{func:?}: an untyped storage needs _rebuild_tensor_v3's dtype")
                })?
            };
            Ok(Value::Tensor(Rc::new(TensorRecord {
                dtype,
                storage: storage.key.clone(),
                storage_nbytes: storage.nbytes,
                offset: offset.as_usize("storage offset")?,
                shape,
                stride,
            })))
        }
        Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
            Some(t @ Value::Tensor(_)) => Ok(t.clone()),
            other => bail!("_rebuild_parameter: expected a tensor, found {other:?}"),
        },
        Global::RebuildFromTypeV2 => {
            // (func, type, args, state): a tensor with python attributes; rebuild via `func`.
            let [inner, Value::Global(Global::TensorType), inner_args, _state] = args.as_slice()
            else {
                bail!("_rebuild_from_type_v2: unsupported arguments {args:?}");
            };
            reduce(inner.clone(), inner_args.clone())
        }
        Global::TensorType | Global::Storage(_) | Global::UntypedStorage | Global::DType(_) => {
            bail!("pickle: calling {func:?} is not supported")
        }
    }
}

fn dict_get(obj: &Value, key: &str) -> Option<Value> {
    match obj {
        Value::Dict(d) => d.borrow().iter().find_map(|(k, v)| match k {
            Value::Str(s) if s == key => Some(v.clone()),
            _ => None,
        }),
        _ => None,
    }
}

fn dict_keys(obj: &Value) -> Vec<String> {
    match obj {
        Value::Dict(d) => d.borrow().iter().filter_map(|(k, _)| key_name(k)).collect(),
        _ => Vec::new(),
    }
}

/// Descends through wrapper dicts (see module docs); returns the chosen object and its path.
fn unwrap_state_dict(mut obj: Value) -> (Value, Vec<String>) {
    let mut path = Vec::new();
    while let Value::Dict(d) = &obj {
        let entries = d.borrow().clone();
        if entries.iter().any(|(_, v)| matches!(v, Value::Tensor(_))) {
            break;
        }
        let preferred = WRAPPER_KEYS.iter().find_map(|w| {
            entries.iter().find_map(|(k, v)| match k {
                Value::Str(s) if s == w && v.holds_tensors() => Some((s.clone(), v.clone())),
                _ => None,
            })
        });
        let next = preferred.or_else(|| {
            let holders: Vec<_> = entries.iter().filter(|(_, v)| v.holds_tensors()).collect();
            match holders.as_slice() {
                [(k, v)] if matches!(v, Value::Dict(_)) => key_name(k).map(|k| (k, v.clone())),
                _ => None,
            }
        });
        match next {
            Some((k, v)) => {
                path.push(k);
                obj = v;
            }
            None => break,
        }
    }
    (obj, path)
}

fn key_name(k: &Value) -> Option<String> {
    match k {
        Value::Str(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        // as Python's str(): dicts keyed by True/False
        Value::Bool(b) => Some(if *b { "True" } else { "False" }.to_string()),
        _ => None,
    }
}

fn flatten(obj: &Value, prefix: String, out: &mut BTreeMap<String, TensorRecord>) -> Result<()> {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match obj {
        Value::Tensor(_) if prefix.is_empty() => {
            bail!("the checkpoint is a single tensor, not a dict of tensors")
        }
        Value::Tensor(t) if out.insert(prefix.clone(), (**t).clone()).is_some() => {
            bail!("tensor name `{prefix}` occurs twice after flattening nested dicts")
        }
        Value::Tensor(_) => {}
        Value::Dict(d) => {
            for (k, v) in d.borrow().iter() {
                if !v.holds_tensors() {
                    continue;
                }
                let name = key_name(k).with_context(|| {
                    format!(
                        "dict under `{prefix}` has a {} key holding tensors",
                        k.kind()
                    )
                })?;
                flatten(v, join(&name), out)?;
            }
        }
        Value::List(l) => {
            for (i, v) in l.borrow().iter().enumerate() {
                flatten(v, join(&i.to_string()), out)?;
            }
        }
        Value::Tuple(t) => {
            for (i, v) in t.iter().enumerate() {
                flatten(v, join(&i.to_string()), out)?;
            }
        }
        _ => {}
    }
    Ok(())
}
