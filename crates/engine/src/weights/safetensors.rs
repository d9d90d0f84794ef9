//! safetensors files through mmap: one file, an explicit list of shards, or a `*.index.json`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};

use super::TensorSource;
use crate::invalid;

pub struct SafetensorsSource {
    inner: MmapedSafetensors,
    files: Vec<PathBuf>,
}

impl SafetensorsSource {
    /// Opens `path`: a `.safetensors` file, a `.safetensors.index.json`, or a directory holding
    /// exactly one of: an index json, or `.safetensors` files (all of them are taken as shards).
    pub fn open(path: &Path) -> Result<Self> {
        let files = resolve_files(path)?;
        // Safety: the files are mapped read-only; as with every mmap-based loader, the caller
        // must not truncate them while the model is loaded.
        let inner = unsafe { MmapedSafetensors::multi(&files) }
            .with_context(|| format!("reading safetensors {}", list(&files)))?;
        Ok(Self { inner, files })
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

fn list(files: &[PathBuf]) -> String {
    files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The shard files of a safetensors checkpoint at `path` (see [`SafetensorsSource::open`]).
pub fn resolve_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_dir() {
        let mut index = Vec::new();
        let mut shards = Vec::new();
        for entry in
            std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))?
        {
            let p = entry?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".safetensors.index.json") {
                index.push(p);
            } else if name.ends_with(".safetensors") {
                shards.push(p);
            }
        }
        index.sort();
        shards.sort();
        return match (index.len(), shards.len()) {
            (1, _) => resolve_files(&index[0]),
            (0, 0) => Err(invalid!(
                "{}: no .safetensors file or .safetensors.index.json found",
                path.display()
            )),
            (0, _) => Ok(shards),
            _ => Err(invalid!(
                "{}: several index files ({}); pass one of them",
                path.display(),
                list(&index)
            )),
        };
    }
    let name = path.to_string_lossy();
    if name.ends_with(".index.json") {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| invalid!("{}: not valid JSON: {e}", path.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| invalid!("{}: no `weight_map` object", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut files = BTreeSet::new();
        for v in map.values() {
            let f = v.as_str().ok_or_else(|| {
                invalid!("{}: weight_map values must be file names", path.display())
            })?;
            files.insert(dir.join(f));
        }
        let missing: Vec<String> = files
            .iter()
            .filter(|f| !f.exists())
            .map(|f| f.display().to_string())
            .collect();
        if !missing.is_empty() {
            return Err(invalid!(
                "{}: shard file(s) missing: {}",
                path.display(),
                missing.join(", ")
            ));
        }
        return Ok(files.into_iter().collect());
    }
    if !path.exists() {
        return Err(invalid!("{}: no such file", path.display()));
    }
    Ok(vec![path.to_path_buf()])
}

impl TensorSource for SafetensorsSource {
    fn keys(&self) -> Vec<String> {
        self.inner.tensors().into_iter().map(|(k, _)| k).collect()
    }
    fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.inner.get(key).ok().map(|v| v.shape().to_vec())
    }
    fn load(&self, key: &str, device: &Device) -> Result<Tensor> {
        self.inner
            .load(key, device)
            .with_context(|| format!("loading `{key}` from {}", self.describe()))
    }
    fn describe(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!(
                "{} ({} shards)",
                many[0].parent().unwrap_or(Path::new(".")).display(),
                many.len()
            ),
        }
    }
}
