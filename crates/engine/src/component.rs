//! The `run-component` contract: run one component on exact tensors from a safetensors file.
//!
//! ```text
//! vidgen run-component <dit|vae-encode|vae-decode|text-encode|denoise> --model PATH
//!     --inputs IN.safetensors --output OUT.safetensors [--device cpu|cuda] [--dtype f32|bf16]
//!     [--set key=value ...]
//! ```
//! The CLI parses arguments and writes the outputs; everything else lives here so that tests call
//! exactly the same code. Caller errors (unknown component, missing input tensor, wrong rank or
//! dtype, unknown or malformed setting) are [`InvalidInput`](crate::InvalidInput) (exit code 2).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use crate::invalid;

/// Component names accepted by `run-component`.
pub const COMPONENTS: &[&str] = &["dit", "vae-encode", "vae-decode", "text-encode", "denoise"];

/// Where and in which precision a component runs, plus its `--set key=value` settings.
pub struct ComponentOptions {
    pub device: Device,
    pub dtype: DType,
    pub settings: Settings,
}

impl ComponentOptions {
    pub fn cpu_f32() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            settings: Settings::default(),
        }
    }
}

/// `--set key=value` settings. Every key must be read by the component; [`Settings::finish`]
/// rejects the rest, naming the keys the component accepts.
#[derive(Default)]
pub struct Settings {
    values: BTreeMap<String, String>,
    read: RefCell<BTreeSet<String>>,
    accepted: RefCell<BTreeSet<String>>,
}

impl Settings {
    /// Parses `key=value` strings; a string without `=` or a repeated key is an error.
    pub fn parse<S: AsRef<str>>(pairs: &[S]) -> Result<Self> {
        let mut values = BTreeMap::new();
        for p in pairs {
            let p = p.as_ref();
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| invalid!("--set: `{p}` is not of the form key=value"))?;
            let k = k.trim();
            if k.is_empty() {
                return Err(invalid!("--set: `{p}` has an empty key"));
            }
            if values.insert(k.to_string(), v.trim().to_string()).is_some() {
                return Err(invalid!("--set: key `{k}` given twice"));
            }
        }
        Ok(Self {
            values,
            ..Default::default()
        })
    }

    /// Builds settings from key/value pairs (tests, pipelines).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Self {
        Self {
            values: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    /// Raw string value of `key`, recording that the component accepts it.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.accepted.borrow_mut().insert(key.to_string());
        let v = self.values.get(key)?;
        self.read.borrow_mut().insert(key.to_string());
        Some(v.as_str())
    }

    /// Parses `key` as `T`; a malformed value names the key and the value.
    pub fn get<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>> {
        match self.get_str(key) {
            None => Ok(None),
            Some(v) => v.parse::<T>().map(Some).map_err(|_| {
                invalid!(
                    "--set {key}: `{v}` is not a valid {}",
                    std::any::type_name::<T>()
                )
            }),
        }
    }

    /// A string value that must be one of `choices`.
    pub fn get_choice(&self, key: &str, choices: &[&str]) -> Result<Option<String>> {
        match self.get_str(key) {
            None => Ok(None),
            Some(v) if choices.contains(&v) => Ok(Some(v.to_string())),
            Some(v) => Err(invalid!(
                "--set {key}: `{v}` is not one of {}",
                choices.join(", ")
            )),
        }
    }

    /// Errors on keys no component read, listing the keys it accepts.
    pub fn finish(&self) -> Result<()> {
        let read = self.read.borrow();
        let unknown: Vec<&String> = self.values.keys().filter(|k| !read.contains(*k)).collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let accepted: Vec<String> = self.accepted.borrow().iter().cloned().collect();
        Err(invalid!(
            "--set: unknown key(s) {}; this component accepts: {}",
            unknown
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", "),
            if accepted.is_empty() {
                "no settings".to_string()
            } else {
                accepted.join(", ")
            }
        ))
    }
}

/// Input tensors by name, with checks that produce contract errors.
pub struct Inputs {
    tensors: HashMap<String, Tensor>,
    origin: String,
}

impl Inputs {
    pub fn new(origin: impl Into<String>, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            tensors,
            origin: origin.into(),
        }
    }

    /// Reads every tensor of a safetensors file onto the CPU.
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(invalid!("--inputs: {} does not exist", path.display()));
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            invalid!(
                "--inputs: {} is not a readable safetensors file: {e}",
                path.display()
            )
        })?;
        Ok(Self::new(path.display().to_string(), tensors))
    }

    pub fn names(&self) -> Vec<&String> {
        let mut v: Vec<&String> = self.tensors.keys().collect();
        v.sort();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn raw(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| {
            invalid!(
                "{}: missing input tensor `{name}` (found: {})",
                self.origin,
                self.names()
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    fn check_rank(&self, name: &str, t: &Tensor, ranks: &[usize]) -> Result<()> {
        if !ranks.contains(&t.rank()) {
            return Err(invalid!(
                "{}: input `{name}` has shape {:?} (rank {}), expected rank {}",
                self.origin,
                t.dims(),
                t.rank(),
                ranks
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ));
        }
        Ok(())
    }

    /// A floating-point input of one of the given ranks, converted to f32.
    pub fn float(&self, name: &str, ranks: &[usize]) -> Result<Tensor> {
        let t = self.raw(name)?;
        if !t.dtype().is_float() {
            return Err(invalid!(
                "{}: input `{name}` has dtype {:?}, expected a float dtype (f32)",
                self.origin,
                t.dtype()
            ));
        }
        self.check_rank(name, t, ranks)?;
        Ok(t.to_dtype(DType::F32)?)
    }

    /// An optional floating-point input.
    pub fn float_opt(&self, name: &str, ranks: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.float(name, ranks).map(Some)
        } else {
            Ok(None)
        }
    }

    /// An integer input of one of the given ranks, converted to i64.
    pub fn int(&self, name: &str, ranks: &[usize]) -> Result<Tensor> {
        let t = self.raw(name)?;
        if t.dtype().is_float() {
            return Err(invalid!(
                "{}: input `{name}` has dtype {:?}, expected an integer dtype (i64)",
                self.origin,
                t.dtype()
            ));
        }
        self.check_rank(name, t, ranks)?;
        Ok(t.to_dtype(DType::I64)?)
    }
}

/// Named outputs, written in order.
pub type Outputs = Vec<(String, Tensor)>;

/// Runs `component` from the model at `model` on `inputs`.
pub fn run(
    component: &str,
    model: &Path,
    inputs: &Inputs,
    opts: &ComponentOptions,
) -> Result<Outputs> {
    if !model.exists() {
        return Err(invalid!("--model: {} does not exist", model.display()));
    }
    let out = match component {
        "dit" => crate::dit::run_component(model, inputs, opts)?,
        "denoise" => crate::denoise::run_component(model, inputs, opts)?,
        "vae-encode" => crate::vae::run_component_encode(model, inputs, opts)?,
        "vae-decode" => crate::vae::run_component_decode(model, inputs, opts)?,
        "text-encode" => crate::text::run_component(model, inputs, opts)?,
        other => {
            return Err(invalid!(
                "unknown component `{other}`; valid components: {}",
                COMPONENTS.join(", ")
            ))
        }
    };
    opts.settings.finish()?;
    Ok(out)
}

/// Writes outputs as f32 safetensors, atomically (a temporary file renamed into place), so a failed
/// run never leaves a half-written output.
pub fn write_outputs(path: &Path, outputs: &Outputs) -> Result<()> {
    let mut map = HashMap::new();
    for (name, t) in outputs {
        map.insert(
            name.clone(),
            t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
        );
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("writing {}: {e}", path.display())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::is_invalid_input;

    #[test]
    fn settings_reject_unknown_and_malformed() {
        let s = Settings::parse(&["steps=4", "guidance_scale=x", "bogus=1"]).unwrap();
        assert_eq!(s.get::<usize>("steps").unwrap(), Some(4));
        let err = s.get::<f64>("guidance_scale").unwrap_err();
        assert!(is_invalid_input(&err) && err.to_string().contains("guidance_scale"));
        let err = s.finish().unwrap_err().to_string();
        assert!(err.contains("`bogus`") && err.contains("steps"), "{err}");
        assert!(Settings::parse(&["novalue"]).is_err());
        assert!(Settings::parse(&["a=1", "a=2"]).is_err());
    }

    #[test]
    fn inputs_name_missing_and_wrong_dtype() {
        let mut m = HashMap::new();
        m.insert(
            "ids".to_string(),
            Tensor::zeros((1, 3), DType::I64, &Device::Cpu).unwrap(),
        );
        m.insert(
            "x".to_string(),
            Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        let inp = Inputs::new("in.safetensors", m);
        assert!(inp
            .float("missing", &[2])
            .unwrap_err()
            .to_string()
            .contains("`missing`"));
        assert!(inp
            .float("ids", &[2])
            .unwrap_err()
            .to_string()
            .contains("dtype"));
        assert!(inp
            .int("x", &[2])
            .unwrap_err()
            .to_string()
            .contains("dtype"));
        assert!(inp
            .float("x", &[5])
            .unwrap_err()
            .to_string()
            .contains("rank 5"));
        assert_eq!(inp.int("ids", &[2]).unwrap().dims(), &[1, 3]);
    }

    #[test]
    fn unknown_component_is_invalid() {
        let inp = Inputs::new("x", HashMap::new());
        let err = run("unet", Path::new("."), &inp, &ComponentOptions::cpu_f32()).unwrap_err();
        assert!(is_invalid_input(&err));
        assert!(err.to_string().contains("dit, vae-encode"));
    }
}
