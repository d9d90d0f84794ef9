//! `vidgen.toml`: models, data directory, limits, API keys, bind address, retention.
//!
//! Every key is optional; unknown keys are rejected so a typo cannot silently fall back to a
//! default (e.g. `api_key` instead of `api_keys` leaving the server open).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// The whole configuration, with defaults filled in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on. Non-loopback needs `api_keys` or `allow_unauthenticated`.
    pub bind: SocketAddr,
    /// Jobs, uploads, outputs and the SQLite database live here.
    pub data_dir: PathBuf,
    /// Bearer keys; empty means no authentication (loopback only unless allowed).
    pub api_keys: Vec<String>,
    /// Permit binding a non-loopback address with no API key.
    pub allow_unauthenticated: bool,
    /// Models served, the first being the default. Empty means the built-in `demo` model.
    pub models: Vec<ModelEntry>,
    pub limits: Limits,
    pub queue: QueueConfig,
    /// How long finished outputs are kept (hours) before they are deleted.
    pub retention_hours: f64,
}

/// A model the server offers: its public name and the folder (or `demo`) the worker loads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub name: String,
    /// A model folder, `demo` for the built-in demo model, or `random:<configuration>` (e.g.
    /// `random:wan2.1-t2v-1.3b`: full-size random weights, for load tests; the video is noise).
    pub path: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body in bytes (multipart included).
    pub max_body_bytes: usize,
    /// Largest uploaded image file in bytes.
    pub max_upload_bytes: usize,
    /// Largest decoded image (width × height) accepted, against decompression bombs.
    pub max_image_pixels: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Jobs waiting beyond this are refused with 429.
    pub max_queued: usize,
    /// GPUs to run on: one worker each (`CUDA_VISIBLE_DEVICES` is set per worker). Empty means one
    /// worker with the inherited environment.
    pub gpus: Vec<String>,
    /// Device the workers compute on: `cpu`, `cuda` or `cuda:N` (an index among the GPUs the
    /// worker sees). Unset: the GPU when vidgen was built with CUDA, else the CPU.
    pub device: Option<String>,
    /// Keep one long-lived worker per GPU (`vidgen worker --serve`) so models stay loaded. Meant
    /// for a dedicated GPU: its memory is not returned between jobs.
    pub warm_worker: bool,
    /// A job that was running when the server stopped is queued again once instead of failing
    /// with `interrupted`.
    pub requeue_interrupted: bool,
    /// After a cancel, how long the worker gets to stop at its next step before it is killed.
    pub cancel_grace_s: f64,
    /// A job running longer than this is killed and failed with `timeout` (0 = no limit).
    pub job_timeout_s: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("vidgen-data"),
            api_keys: Vec::new(),
            allow_unauthenticated: false,
            models: Vec::new(),
            limits: Limits::default(),
            queue: QueueConfig::default(),
            retention_hours: 24.0 * 7.0,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 32 << 20,
            max_upload_bytes: 20 << 20,
            max_image_pixels: 8192 * 8192,
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_queued: 64,
            gpus: Vec::new(),
            device: None,
            warm_worker: false,
            requeue_interrupted: false,
            cancel_grace_s: 10.0,
            job_timeout_s: 0.0,
        }
    }
}

impl QueueConfig {
    /// Whether the workers compute on the CPU: `device = "cpu"`, or no device in a build without
    /// CUDA (the worker's default is the GPU only when vidgen was built with CUDA). Requests that
    /// need a GPU (`vae_dtype: bf16`) are refused up front on such a server.
    pub fn workers_on_cpu(&self) -> bool {
        self.device
            .as_deref()
            .unwrap_or(vidgen_engine::device::default_device())
            == "cpu"
    }
}

impl Config {
    /// Reads a TOML file; relative `data_dir` and model paths are taken from the file's folder.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let mut config: Config = toml::from_str(&text)
            .map_err(|e| vidgen_engine::invalid!("config {}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.data_dir.is_relative() {
            config.data_dir = base.join(&config.data_dir);
        }
        for model in &mut config.models {
            // `demo` and `random:<configuration>` name built-in weights, not files.
            let builtin = model.path == "demo" || model.path.starts_with("random:");
            if !builtin && Path::new(&model.path).is_relative() {
                model.path = base.join(&model.path).to_string_lossy().into_owned();
            }
        }
        Ok(config)
    }

    /// Checks values that would make the server unsafe or useless, naming the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        use vidgen_engine::invalid;
        if !self.bind.ip().is_loopback() && self.api_keys.is_empty() && !self.allow_unauthenticated
        {
            return Err(invalid!(
                "bind: {} is not a loopback address and no api_keys are configured; add api_keys to \
                 the config, or set allow_unauthenticated = true (--allow-unauthenticated) to serve \
                 without authentication",
                self.bind
            ));
        }
        if self.api_keys.iter().any(|k| k.trim().len() < 8) {
            return Err(invalid!(
                "api_keys: every key must have at least 8 characters"
            ));
        }
        let mut names = std::collections::HashSet::new();
        for m in &self.models {
            if m.name.is_empty()
                || !m
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(invalid!(
                    "models: name `{}` must be non-empty ASCII letters, digits, '-', '_' or '.'",
                    m.name
                ));
            }
            if !names.insert(&m.name) {
                return Err(invalid!("models: `{}` is listed twice", m.name));
            }
        }
        if let Some(d) = &self.queue.device {
            let ordinal = d.strip_prefix("cuda:").map(|i| i.parse::<usize>());
            if !(d == "cpu" || d == "cuda" || matches!(ordinal, Some(Ok(_)))) {
                return Err(invalid!(
                    "queue.device: `{d}` is not one of cpu, cuda, cuda:N"
                ));
            }
        }
        if self.queue.max_queued == 0 {
            return Err(invalid!("queue.max_queued: must be at least 1"));
        }
        if !(self.retention_hours.is_finite() && self.retention_hours > 0.0) {
            return Err(invalid!(
                "retention_hours: must be a positive number of hours"
            ));
        }
        if !(self.queue.cancel_grace_s.is_finite() && self.queue.cancel_grace_s >= 0.0) {
            return Err(invalid!("queue.cancel_grace_s: must be >= 0"));
        }
        if !(self.queue.job_timeout_s.is_finite() && self.queue.job_timeout_s >= 0.0) {
            return Err(invalid!("queue.job_timeout_s: must be >= 0 (0 = no limit)"));
        }
        if self.limits.max_upload_bytes == 0 || self.limits.max_body_bytes == 0 {
            return Err(invalid!(
                "limits: max_body_bytes and max_upload_bytes must be positive"
            ));
        }
        Ok(())
    }

    /// The configured models, or the demo model when none are named.
    pub fn model_entries(&self) -> Vec<ModelEntry> {
        if self.models.is_empty() {
            vec![ModelEntry {
                name: "demo".into(),
                path: "demo".into(),
            }]
        } else {
            self.models.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<Config>("api_key = 'x'").unwrap_err();
        assert!(err.to_string().contains("api_key"), "{err}");
    }

    #[test]
    fn public_bind_without_keys_is_refused() {
        let mut c = Config {
            bind: "0.0.0.0:8080".parse().unwrap(),
            ..Config::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("allow_unauthenticated"), "{err}");
        c.api_keys = vec!["sk-0123456789".into()];
        c.validate().unwrap();
        c.api_keys.clear();
        c.allow_unauthenticated = true;
        c.validate().unwrap();
    }

    #[test]
    fn relative_model_paths_follow_the_config_file_but_builtin_names_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vidgen.toml");
        std::fs::write(
            &file,
            "[[models]]\nname = 'a'\npath = 'models/wan'\n\
             [[models]]\nname = 'b'\npath = 'demo'\n\
             [[models]]\nname = 'c'\npath = 'random:wan2.1-t2v-1.3b'\n",
        )
        .unwrap();
        let c = Config::load(&file).unwrap();
        let paths: Vec<&str> = c.models.iter().map(|m| m.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                dir.path().join("models/wan").to_str().unwrap(),
                "demo",
                "random:wan2.1-t2v-1.3b"
            ]
        );
    }

    #[test]
    fn worker_device_is_checked_at_load() {
        for ok in ["cpu", "cuda", "cuda:1"] {
            let c: Config = toml::from_str(&format!("[queue]\ndevice = '{ok}'")).unwrap();
            c.validate().unwrap();
        }
        for bad in ["gpu", "cuda:x", "cuda:"] {
            let c: Config = toml::from_str(&format!("[queue]\ndevice = '{bad}'")).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(
                err.starts_with("queue.device") && err.contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn workers_on_cpu_follows_queue_device_then_the_build() {
        let on = |d: &str| {
            toml::from_str::<Config>(&format!("[queue]\ndevice = '{d}'"))
                .unwrap()
                .queue
                .workers_on_cpu()
        };
        assert!(on("cpu"));
        assert!(!on("cuda"));
        assert!(!on("cuda:1"));
        assert_eq!(
            QueueConfig::default().workers_on_cpu(),
            vidgen_engine::device::default_device() == "cpu"
        );
    }

    #[test]
    fn defaults_serve_the_demo_model_on_loopback() {
        let c: Config = toml::from_str("").unwrap();
        assert!(c.bind.ip().is_loopback());
        assert_eq!(c.model_entries()[0].name, "demo");
        c.validate().unwrap();
    }
}
