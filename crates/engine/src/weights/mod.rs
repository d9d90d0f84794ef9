//! Checkpoint loading with strict keys.
//!
//! A [`TensorSource`] is a file format (safetensors, sharded safetensors, PyTorch `.pth`, in-memory
//! tensors). A [`WeightMap`] puts a key normaliser on top (official ↔ diffusers ↔ ComfyUI names all
//! become one canonical name per model), hands tensors out by canonical name with a shape check,
//! and remembers which keys were used, so that [`WeightMap::finish`] can reject unexpected tensors.
//! Every failure names the key.
//!
//! Block-quantised GGUF tensors can also be handed out still quantised
//! ([`WeightMap::get_blocks`], a [`GgufWeight`]) under the same bookkeeping: the transformer keeps
//! its block linears that way unless the map is told to dequantise on load
//! ([`WeightMap::with_gguf_blocks`]).

pub mod fp8;
pub mod fp8_matmul;
pub mod gguf;
pub mod pth;
pub mod safetensors;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use crate::invalid;

pub use self::gguf::{GgufType, GgufWeight};
pub use self::safetensors::SafetensorsSource;

/// Opens a checkpoint by its format: `.gguf` (GGUF: block-quantised tensors offered quantised
/// through [`TensorSource::load_blocks`], dequantised by [`TensorSource::load`]), `.pth`/`.pt`/`.bin`
/// (PyTorch zip pickle), otherwise safetensors (a file, an `.index.json` or a folder). ComfyUI
/// "scaled fp8" checkpoints are detected and presented as dequantised weights (in `dtype`).
pub fn open_any(path: &std::path::Path, dtype: DType) -> Result<Box<dyn TensorSource>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .unwrap_or_default();
    let source: Box<dyn TensorSource> = match ext.as_str() {
        "gguf" if path.is_file() => Box::new(gguf::GgufSource::open(path)?),
        "pth" | "pt" | "bin" if path.is_file() => Box::new(pth::PthSource::open(path)?),
        _ => Box::new(SafetensorsSource::open(path)?),
    };
    if fp8::ScaledFp8Source::detect(source.as_ref()) {
        return Ok(Box::new(fp8::ScaledFp8Source::new(source, dtype)?));
    }
    Ok(source)
}

/// A set of named tensors in some file format, loaded lazily.
pub trait TensorSource: Send + Sync {
    /// All tensor names as stored.
    fn keys(&self) -> Vec<String>;
    /// The stored shape of `key`, if present.
    fn shape(&self, key: &str) -> Option<Vec<usize>>;
    /// Loads `key` onto `device` in its stored dtype.
    fn load(&self, key: &str, device: &Device) -> Result<Tensor>;
    /// A short description for error messages (file names).
    fn describe(&self) -> String;
    /// The GGML block type of `key` when it is stored block-quantised (GGUF), else `None`.
    fn quantized_type(&self, _key: &str) -> Option<GgufType> {
        None
    }
    /// `key` in its stored block encoding on `device` (where [`quantized_type`] is `Some`).
    ///
    /// [`quantized_type`]: TensorSource::quantized_type
    fn load_blocks(&self, key: &str, _device: &Device) -> Result<GgufWeight> {
        Err(invalid!(
            "{}: tensor `{key}` is not stored block-quantised",
            self.describe()
        ))
    }
}

/// Tensors already in memory (the demo model, tests, converted formats, streamed blocks), dense
/// or kept in a GGUF block encoding.
pub struct MemorySource {
    tensors: HashMap<String, Tensor>,
    quantized: HashMap<String, GgufWeight>,
    name: String,
}

impl MemorySource {
    pub fn new(name: impl Into<String>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            tensors,
            quantized: HashMap::new(),
            name: name.into(),
        }
    }

    /// Adds block-quantised tensors (a name that is also a dense tensor's is listed twice, which
    /// a [`WeightMap`] rejects as a collision).
    pub fn with_quantized(mut self, quantized: HashMap<String, GgufWeight>) -> Self {
        self.quantized.extend(quantized);
        self
    }
}

impl TensorSource for MemorySource {
    fn keys(&self) -> Vec<String> {
        self.tensors
            .keys()
            .chain(self.quantized.keys())
            .cloned()
            .collect()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        match self.tensors.get(key) {
            Some(t) => Some(t.dims().to_vec()),
            None => self.quantized.get(key).map(GgufWeight::dims),
        }
    }
    fn load(&self, key: &str, device: &Device) -> Result<Tensor> {
        if let Some(t) = self.tensors.get(key) {
            return Ok(t.to_device(device)?);
        }
        // Like a GGUF file: a quantised tensor asked for densely comes dequantised to f32.
        let q = self
            .quantized
            .get(key)
            .ok_or_else(|| invalid!("{}: no tensor named `{key}`", self.name))?;
        Ok(q.dequantize(DType::F32)?.to_device(device)?)
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
    fn quantized_type(&self, key: &str) -> Option<GgufType> {
        self.quantized.get(key).map(GgufWeight::ggml_type)
    }
    fn load_blocks(&self, key: &str, device: &Device) -> Result<GgufWeight> {
        let q = self.quantized.get(key).ok_or_else(|| {
            invalid!(
                "{}: tensor `{key}` is not stored block-quantised",
                self.name
            )
        })?;
        q.to_device(device)
    }
}

/// Canonical-name view of a [`TensorSource`] with strict bookkeeping.
pub struct WeightMap {
    source: Box<dyn TensorSource>,
    /// canonical name -> stored name
    names: BTreeMap<String, String>,
    used: Mutex<BTreeSet<String>>,
    device: Device,
    dtype: DType,
    fp8_linears: bool,
    fp8_matmul: bool,
    gguf_blocks: bool,
}

impl WeightMap {
    /// `normalize` maps a stored key to its canonical name, or `None` to ignore the key entirely
    /// (use sparingly: only for keys the reference itself ignores, such as buffers).
    /// Two stored keys that map to one canonical name are an error.
    pub fn new(
        source: Box<dyn TensorSource>,
        normalize: impl Fn(&str) -> Option<String>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut names = BTreeMap::new();
        for key in source.keys() {
            if let Some(canon) = normalize(&key) {
                if let Some(prev) = names.insert(canon.clone(), key.clone()) {
                    return Err(invalid!(
                        "{}: tensors `{prev}` and `{key}` both map to `{canon}`",
                        source.describe()
                    ));
                }
            }
        }
        Ok(Self {
            source,
            names,
            used: Mutex::new(BTreeSet::new()),
            device: device.clone(),
            dtype,
            fp8_linears: false,
            fp8_matmul: false,
            gguf_blocks: true,
        })
    }

    /// Asks the model built from this map to keep its large linear weights in FP8 (per-channel
    /// scales), quantised as they load (the transformer's block linears).
    pub fn with_fp8_linears(mut self, on: bool) -> Self {
        self.fp8_linears = on;
        self
    }

    pub fn fp8_linears(&self) -> bool {
        self.fp8_linears
    }

    /// Asks the model built from this map to run its FP8 linears (quantised on load or stored so)
    /// as FP8 matmuls ([`fp8_matmul`]) instead of dequantising them for a matmul in the model
    /// dtype.
    pub fn with_fp8_matmul(mut self, on: bool) -> Self {
        self.fp8_matmul = on;
        self
    }

    pub fn fp8_matmul(&self) -> bool {
        self.fp8_matmul
    }

    /// `true` (the default): block-quantised GGUF tensors are offered quantised
    /// ([`quantized_type`](Self::quantized_type) / [`get_blocks`](Self::get_blocks)) to the model
    /// parts that can keep them so (the transformer's block linears); `false`: everything is
    /// dequantised on load, as [`get`](Self::get) does (the memory of the model dtype, no
    /// per-use dequantisation).
    pub fn with_gguf_blocks(mut self, on: bool) -> Self {
        self.gguf_blocks = on;
        self
    }

    /// The GGML block type of `name` when the checkpoint stores it block-quantised and the map
    /// hands such tensors out quantised.
    pub fn quantized_type(&self, name: &str) -> Option<GgufType> {
        if !self.gguf_blocks {
            return None;
        }
        self.names
            .get(name)
            .and_then(|stored| self.source.quantized_type(stored))
    }

    /// Identity key mapping.
    pub fn plain(source: Box<dyn TensorSource>, device: &Device, dtype: DType) -> Result<Self> {
        Self::new(source, |k| Some(k.to_string()), device, dtype)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn describe(&self) -> String {
        self.source.describe()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// Canonical names present.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.names.keys()
    }

    /// Stored shape of a canonical name.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.names.get(name).and_then(|k| self.source.shape(k))
    }

    /// Loads `name`, checks its shape, converts to the map's dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_as(name, shape, self.dtype)
    }

    /// The stored name of `name` after checking its shape; marks it used.
    fn take(&self, name: &str, shape: &[usize]) -> Result<&String> {
        let stored = self.names.get(name).ok_or_else(|| {
            invalid!(
                "{}: missing weight `{name}` (expected shape {shape:?})",
                self.source.describe()
            )
        })?;
        let found = self.source.shape(stored).unwrap_or_default();
        if found != shape {
            return Err(invalid!(
                "{}: weight `{stored}` has shape {found:?}, expected {shape:?}",
                self.source.describe()
            ));
        }
        self.used.lock().unwrap().insert(name.to_string());
        Ok(stored)
    }

    /// Like [`get`](Self::get) with an explicit dtype (e.g. f32 for norms or modulation tables).
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let stored = self.take(name, shape)?;
        let t = self.source.load(stored, &self.device)?;
        Ok(if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        })
    }

    /// Loads block-quantised `name` still quantised (see [`quantized_type`](Self::quantized_type)),
    /// on the map's device, with the same shape check and bookkeeping as [`get`](Self::get).
    pub fn get_blocks(&self, name: &str, shape: &[usize]) -> Result<GgufWeight> {
        if self.names.contains_key(name) && self.quantized_type(name).is_none() {
            return Err(invalid!(
                "{}: weight `{name}` is not kept block-quantised",
                self.source.describe()
            ));
        }
        let stored = self.take(name, shape)?;
        self.source.load_blocks(stored, &self.device)
    }

    /// Loads `name` with whatever shape it has (for shape inference); still marks it used.
    pub fn get_unchecked(&self, name: &str) -> Result<Tensor> {
        let shape = self
            .shape(name)
            .ok_or_else(|| invalid!("{}: missing weight `{name}`", self.source.describe()))?;
        self.get(name, &shape)
    }

    /// Errors if any tensor in the checkpoint was not used by the model, naming them.
    pub fn finish(&self) -> Result<()> {
        let used = self.used.lock().unwrap();
        let unused: Vec<&String> = self.names.keys().filter(|k| !used.contains(*k)).collect();
        if unused.is_empty() {
            return Ok(());
        }
        let shown: Vec<String> = unused
            .iter()
            .take(8)
            .map(|k| format!("`{}`", self.names[*k]))
            .collect();
        Err(invalid!(
            "{}: {} unexpected weight(s) not used by the model: {}{}",
            self.source.describe(),
            unused.len(),
            shown.join(", "),
            if unused.len() > 8 { ", ..." } else { "" }
        ))
    }

    /// A prefixed view, `wm.pp("blocks.0")` -> names like `blocks.0.attn1.to_q.weight`.
    pub fn pp(&self, prefix: impl AsRef<str>) -> WeightPath<'_> {
        WeightPath {
            map: self,
            prefix: prefix.as_ref().to_string(),
        }
    }
}

/// A prefix into a [`WeightMap`], in the style of candle's `VarBuilder::pp`.
#[derive(Clone)]
pub struct WeightPath<'a> {
    map: &'a WeightMap,
    prefix: String,
}

impl<'a> WeightPath<'a> {
    pub fn pp(&self, name: impl AsRef<str>) -> WeightPath<'a> {
        WeightPath {
            map: self.map,
            prefix: self.join(name.as_ref()),
        }
    }
    fn join(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.map.get(&self.join(name), shape)
    }
    pub fn get_as(&self, name: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.map.get_as(&self.join(name), shape, dtype)
    }
    pub fn quantized_type(&self, name: &str) -> Option<GgufType> {
        self.map.quantized_type(&self.join(name))
    }
    pub fn get_blocks(&self, name: &str, shape: &[usize]) -> Result<GgufWeight> {
        self.map.get_blocks(&self.join(name), shape)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains(&self.join(name))
    }
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.map.shape(&self.join(name))
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn map(&self) -> &'a WeightMap {
        self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::is_invalid_input;

    fn source() -> Box<dyn TensorSource> {
        let mut t = HashMap::new();
        t.insert(
            "model.diffusion_model.a.weight".to_string(),
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        t.insert(
            "model.diffusion_model.b".to_string(),
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        );
        Box::new(MemorySource::new("test.safetensors", t))
    }

    fn strip(k: &str) -> Option<String> {
        Some(k.trim_start_matches("model.diffusion_model.").to_string())
    }

    #[test]
    fn strict_keys_and_shapes() {
        let wm = WeightMap::new(source(), strip, &Device::Cpu, DType::F32).unwrap();
        let a = wm.pp("a").get("weight", &[2, 3]).unwrap();
        assert_eq!(a.dims(), &[2, 3]);
        // unused `b` is reported by its stored name
        let err = wm.finish().unwrap_err();
        assert!(is_invalid_input(&err));
        assert!(err.to_string().contains("model.diffusion_model.b"), "{err}");
        // wrong shape names the key and both shapes
        let err = wm.get("b", &[5]).unwrap_err().to_string();
        assert!(
            err.contains("`model.diffusion_model.b`") && err.contains("[4]"),
            "{err}"
        );
        // missing key
        let err = wm.get("c", &[1]).unwrap_err().to_string();
        assert!(err.contains("missing weight `c`"), "{err}");
        wm.get("b", &[4]).unwrap();
        wm.finish().unwrap();
    }

    #[test]
    fn colliding_names_are_rejected() {
        let err = WeightMap::new(source(), |_| Some("x".into()), &Device::Cpu, DType::F32)
            .err()
            .unwrap();
        assert!(err.to_string().contains("both map to `x`"));
    }
}
