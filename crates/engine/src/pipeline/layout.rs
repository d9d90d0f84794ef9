//! Model folders as users download them, told apart automatically:
//!
//! - **Official** Wan releases (wan-facts §2.1): DiT `config.json` + `diffusion_pytorch_model*.safetensors`
//!   at the root (TI2V-5B, Wan2.1) or in `high_noise_model/` + `low_noise_model/` (A14B), plus
//!   `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth` and the `google/umt5-xxl/`
//!   tokenizer.
//! - **Diffusers** repos (`*-Diffusers`, wan-facts §2.2): `model_index.json`, `transformer/`
//!   (+ `transformer_2/` for A14B), `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`.
//! - **Explicit** component paths, for ComfyUI single-file repacks (wan-facts §9):
//!   `--dit FILE [--dit-2 FILE] --vae FILE --text-encoder FILE --tokenizer FILE`. Explicit paths
//!   also override single components of a detected folder.
//!
//! Only file names, `config.json` / `model_index.json` and (for single files) safetensors or GGUF
//! headers are read: detection is instant even for a 60 GB checkpoint. An incomplete folder is an
//! [`InvalidInput`](crate::InvalidInput) listing what is missing and what was found.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use crate::dit::config::DitConfig;
use crate::dit::keys::{canonical_name, detect_layout};
use crate::invalid;
use crate::pipeline::request::{ModelInfo, Task};
use crate::presets::{self, ModelPreset, TaskKind};
use crate::weights::gguf::GgufSource;
use crate::weights::safetensors::resolve_files;
use crate::weights::{SafetensorsSource, TensorSource, WeightMap};

/// Official file names (W22/W21 configs).
pub const OFFICIAL_T5: &str = "models_t5_umt5-xxl-enc-bf16.pth";
pub const OFFICIAL_TOKENIZER: &str = "google/umt5-xxl";
pub const OFFICIAL_VAE_21: &str = "Wan2.1_VAE.pth";
pub const OFFICIAL_VAE_22: &str = "Wan2.2_VAE.pth";
pub const OFFICIAL_HIGH_NOISE: &str = "high_noise_model";
pub const OFFICIAL_LOW_NOISE: &str = "low_noise_model";
/// Wan2.1 I2V/FLF2V's CLIP image encoder (not supported).
const OFFICIAL_CLIP: &str = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayoutKind {
    Official,
    Diffusers,
    Explicit,
}

/// The released Wan models vidgen runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum WanVariant {
    Wan21T2v1_3B,
    Wan21T2v14B,
    Wan22T2vA14B,
    Wan22I2vA14B,
    Wan22Ti2v5B,
}

impl WanVariant {
    pub const ALL: [WanVariant; 5] = [
        WanVariant::Wan21T2v1_3B,
        WanVariant::Wan21T2v14B,
        WanVariant::Wan22T2vA14B,
        WanVariant::Wan22I2vA14B,
        WanVariant::Wan22Ti2v5B,
    ];

    /// The Hugging Face repo name (`Wan-AI/<name>`).
    pub fn name(self) -> &'static str {
        match self {
            WanVariant::Wan21T2v1_3B => "Wan2.1-T2V-1.3B",
            WanVariant::Wan21T2v14B => "Wan2.1-T2V-14B",
            WanVariant::Wan22T2vA14B => "Wan2.2-T2V-A14B",
            WanVariant::Wan22I2vA14B => "Wan2.2-I2V-A14B",
            WanVariant::Wan22Ti2v5B => "Wan2.2-TI2V-5B",
        }
    }

    /// Two experts (high-noise `transformer`, low-noise `transformer_2`).
    pub fn is_two_expert(self) -> bool {
        matches!(self, WanVariant::Wan22T2vA14B | WanVariant::Wan22I2vA14B)
    }

    /// Latent channels of the VAE this model was trained with (16: Wan2.1 VAE, 48: Wan2.2 VAE).
    pub fn latent_channels(self) -> usize {
        match self {
            WanVariant::Wan22Ti2v5B => 48,
            _ => 16,
        }
    }

    /// (dim, in_channels, num_layers, two experts) from wan-facts §1.
    fn signature(self) -> (usize, usize, usize, bool) {
        match self {
            WanVariant::Wan21T2v1_3B => (1536, 16, 30, false),
            WanVariant::Wan21T2v14B => (5120, 16, 40, false),
            WanVariant::Wan22T2vA14B => (5120, 16, 40, true),
            WanVariant::Wan22I2vA14B => (5120, 36, 40, true),
            WanVariant::Wan22Ti2v5B => (3072, 48, 30, false),
        }
    }

    /// The official defaults of this model.
    pub fn preset(self) -> &'static ModelPreset {
        presets::preset(self.name()).expect("every WanVariant has a preset")
    }

    fn supported_list() -> String {
        Self::ALL
            .iter()
            .map(|v| v.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for WanVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The DiT facts that identify a variant (from `config.json`, or from tensor shapes for single files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DitSignature {
    pub dim: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    /// Official `config.json` only: "t2v" / "i2v" / "ti2v".
    pub model_type: Option<String>,
}

/// Paths given on the command line (`--dit`, `--dit-2`, `--vae`, `--text-encoder`, `--tokenizer`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ComponentPaths {
    pub dit: Option<PathBuf>,
    pub dit_2: Option<PathBuf>,
    pub vae: Option<PathBuf>,
    pub text_encoder: Option<PathBuf>,
    pub tokenizer: Option<PathBuf>,
}

impl ComponentPaths {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Where every component of a model is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelLayout {
    pub kind: LayoutKind,
    /// The folder given as the model (absent for explicit paths only).
    pub root: Option<PathBuf>,
    /// DiT (high-noise expert for A14B): a folder with `config.json` + safetensors, or one file.
    pub dit: PathBuf,
    /// Low-noise expert (A14B only).
    pub dit_2: Option<PathBuf>,
    /// Official: a `.pth` file; Diffusers: the `vae/` folder; explicit: a file.
    pub vae: PathBuf,
    /// Official: the T5 `.pth`; Diffusers: `text_encoder/`; explicit: a file.
    pub text_encoder: PathBuf,
    /// Tokenizer folder (`google/umt5-xxl/`, `tokenizer/`) or a `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// Diffusers `scheduler/scheduler_config.json`, when present.
    pub scheduler_config: Option<PathBuf>,
    pub dit_signature: DitSignature,
    /// `None` for a DiT of unknown shape (a custom or pruned model).
    pub variant: Option<WanVariant>,
    /// Diffusers `model_index.json`: per-token timesteps (TI2V-5B).
    pub expand_timesteps: Option<bool>,
    /// Diffusers `model_index.json`: expert switch point (A14B).
    pub boundary_ratio: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Component {
    Dit,
    Dit2,
    Vae,
    TextEncoder,
    Tokenizer,
}

/// What a folder scan found, before explicit overrides are applied.
#[derive(Default)]
struct Scan {
    dit: Option<PathBuf>,
    dit_2: Option<PathBuf>,
    vae: Option<PathBuf>,
    text_encoder: Option<PathBuf>,
    tokenizer: Option<PathBuf>,
    scheduler_config: Option<PathBuf>,
    dit_signature: Option<DitSignature>,
    dit_2_signature: Option<DitSignature>,
    /// Latent channels of a Diffusers `vae/config.json` (`z_dim`).
    vae_z_dim: Option<usize>,
    expand_timesteps: Option<bool>,
    boundary_ratio: Option<f64>,
    missing: Vec<(Component, String)>,
}

impl Scan {
    fn miss(&mut self, component: Component, what: impl Into<String>) {
        self.missing.push((component, what.into()));
    }
}

/// Detects the layout of `dir` ("demo" is not a folder: the caller handles it).
pub fn detect(dir: &Path) -> Result<ModelLayout> {
    detect_with_overrides(Some(dir), &ComponentPaths::default())
}

/// Builds a layout from explicit component paths only (ComfyUI single files).
pub fn from_components(paths: &ComponentPaths) -> Result<ModelLayout> {
    detect_with_overrides(None, paths)
}

/// Detects `dir` (if given) and replaces its components by the explicit `overrides`. Without a
/// folder, `dit`, `vae`, `text_encoder` and `tokenizer` must all be given.
pub fn detect_with_overrides(
    dir: Option<&Path>,
    overrides: &ComponentPaths,
) -> Result<ModelLayout> {
    for (flag, path) in [
        ("--dit", &overrides.dit),
        ("--dit-2", &overrides.dit_2),
        ("--vae", &overrides.vae),
        ("--text-encoder", &overrides.text_encoder),
        ("--tokenizer", &overrides.tokenizer),
    ] {
        if let Some(p) = path {
            if !p.exists() {
                return Err(invalid!("{flag}: {} does not exist", p.display()));
            }
        }
    }
    let (kind, mut scan) = match dir {
        Some(dir) => scan_folder(dir, overrides)?,
        None => (LayoutKind::Explicit, Scan::default()),
    };
    if kind == LayoutKind::Explicit {
        for (component, flag) in [
            (Component::Dit, "--dit FILE"),
            (Component::Vae, "--vae FILE"),
            (Component::TextEncoder, "--text-encoder FILE"),
            (Component::Tokenizer, "--tokenizer PATH"),
        ] {
            scan.miss(component, flag);
        }
    }
    // Explicit paths win over (and excuse the absence of) folder components.
    let overridden = |c: Component| match c {
        Component::Dit => overrides.dit.is_some(),
        Component::Dit2 => overrides.dit_2.is_some(),
        Component::Vae => overrides.vae.is_some(),
        Component::TextEncoder => overrides.text_encoder.is_some(),
        Component::Tokenizer => overrides.tokenizer.is_some(),
    };
    scan.missing.retain(|(c, _)| !overridden(*c));
    if let Some(p) = &overrides.dit {
        scan.dit = Some(p.clone());
        scan.dit_signature = Some(signature_from_weights(p)?);
    }
    if let Some(p) = &overrides.dit_2 {
        scan.dit_2 = Some(p.clone());
        scan.dit_2_signature = Some(signature_from_weights(p)?);
    }
    if let Some(p) = &overrides.vae {
        scan.vae = Some(p.clone());
        scan.vae_z_dim = None;
    }
    if let Some(p) = &overrides.text_encoder {
        scan.text_encoder = Some(p.clone());
    }
    if let Some(p) = &overrides.tokenizer {
        scan.tokenizer = Some(p.clone());
    }

    if !scan.missing.is_empty() {
        let missing: Vec<String> = scan.missing.iter().map(|(_, m)| m.clone()).collect();
        return Err(match dir.filter(|_| kind != LayoutKind::Explicit) {
            Some(dir) => invalid!(
                "model: {} is an incomplete {} Wan folder; missing: {}; found: {}",
                dir.display(),
                match kind {
                    LayoutKind::Official => "official",
                    LayoutKind::Diffusers => "Diffusers",
                    LayoutKind::Explicit => "explicit",
                },
                missing.join(", "),
                found_entries(dir)
            ),
            None => invalid!(
                "model: without a model folder every component must be given; missing: {}",
                missing.join(", ")
            ),
        });
    }

    let dit_signature = scan
        .dit_signature
        .clone()
        .expect("dit scanned when not missing");
    if let Some(sig2) = &scan.dit_2_signature {
        if (sig2.dim, sig2.in_channels, sig2.num_layers)
            != (
                dit_signature.dim,
                dit_signature.in_channels,
                dit_signature.num_layers,
            )
        {
            return Err(invalid!(
                "model: the two experts differ (high-noise: dim {}, in_channels {}, {} layers; low-noise: dim {}, in_channels {}, {} layers)",
                dit_signature.dim,
                dit_signature.in_channels,
                dit_signature.num_layers,
                sig2.dim,
                sig2.in_channels,
                sig2.num_layers
            ));
        }
    }
    let variant = variant_of(&dit_signature, scan.dit_2.is_some())?;
    if let Some(z) = scan.vae_z_dim {
        if z != dit_signature.out_channels {
            return Err(invalid!(
                "vae: z_dim {z} does not match the transformer's {} latent channels (the {} VAE belongs to other models)",
                dit_signature.out_channels,
                if z == 48 { "Wan2.2" } else { "Wan2.1" }
            ));
        }
    }
    Ok(ModelLayout {
        kind,
        root: dir.map(Path::to_path_buf),
        dit: scan.dit.expect("checked"),
        dit_2: scan.dit_2,
        vae: scan.vae.expect("checked"),
        text_encoder: scan.text_encoder.expect("checked"),
        tokenizer: scan.tokenizer.expect("checked"),
        scheduler_config: scan.scheduler_config,
        dit_signature,
        variant,
        expand_timesteps: scan.expand_timesteps,
        boundary_ratio: scan.boundary_ratio,
    })
}

impl ModelLayout {
    /// What this model can make, from its official preset (the defaults of the official repos;
    /// a Diffusers `scheduler_config.json` with another `flow_shift` does not change them).
    pub fn model_info(&self) -> Result<ModelInfo> {
        let Some(variant) = self.variant else {
            let s = &self.dit_signature;
            return Err(invalid!(
                "model: a DiT with dim {}, {} input channels and {} layers{} is not a released Wan model; supported: {}",
                s.dim,
                s.in_channels,
                s.num_layers,
                if self.dit_2.is_some() { " (two experts)" } else { "" },
                WanVariant::supported_list()
            ));
        };
        Ok(model_info_from_preset(variant.preset()))
    }
}

/// Request limits and defaults of a released model.
///
/// The official code caps neither frames nor steps; the caps here keep a request from asking for
/// hours of compute by mistake: frames up to twice the trained length (the models were trained on
/// `default_frames`, 5 s), steps up to twice the default (at least 100). Sizes are the official
/// `SUPPORTED_SIZES` only, default first.
pub fn model_info_from_preset(p: &ModelPreset) -> ModelInfo {
    let default = (p.default_size.width, p.default_size.height);
    let mut sizes = vec![default];
    sizes.extend(
        p.supported_sizes
            .iter()
            .map(|s| (s.width, s.height))
            .filter(|s| *s != default),
    );
    let max_pixels = sizes
        .iter()
        .map(|&(w, h)| u64::from(w) * u64::from(h))
        .max()
        .unwrap_or(0);
    let default_frames = p.default_frames as u32;
    let steps = p.steps as u32;
    ModelInfo {
        name: p.name.to_string(),
        task: match p.task {
            TaskKind::T2V => Task::T2v,
            TaskKind::I2V => Task::I2v,
            TaskKind::TI2V => Task::Ti2v,
        },
        sizes,
        free_size: false,
        size_multiple: p.size_multiple,
        max_pixels,
        fps: p.fps,
        default_frames,
        min_frames: 1,
        max_frames: p
            .max_frames
            .map(|m| m as u32)
            .unwrap_or(2 * (default_frames - 1) + 1),
        frame_step: p.vae_stride[0] as u32,
        default_steps: steps,
        max_steps: (2 * steps).max(100),
        default_guidance: p.guidance.high_noise,
        default_guidance_2: p.has_experts().then_some(p.guidance.low_noise),
        default_shift: p.shift,
        default_scheduler: p.sample_solver.name().to_string(),
        default_negative_prompt: p.negative_prompt.to_string(),
        max_prompt_chars: 2000,
    }
}

/// Which released model a DiT is. Wan2.1 I2V (CLIP image branch) is refused with its name.
fn variant_of(sig: &DitSignature, two_experts: bool) -> Result<Option<WanVariant>> {
    if (sig.dim, sig.in_channels, two_experts) == (5120, 36, false) {
        return Err(invalid!(
            "model: a single 36-channel 14B DiT is Wan2.1 I2V-14B (CLIP image branch), which is not supported; supported: {}",
            WanVariant::supported_list()
        ));
    }
    Ok(WanVariant::ALL
        .into_iter()
        .find(|v| v.signature() == (sig.dim, sig.in_channels, sig.num_layers, two_experts)))
}

fn scan_folder(dir: &Path, overrides: &ComponentPaths) -> Result<(LayoutKind, Scan)> {
    if !dir.exists() {
        return Err(invalid!(
            "model: {} does not exist (give a Wan model folder, `demo`, or --dit/--vae/--text-encoder/--tokenizer)",
            dir.display()
        ));
    }
    if !dir.is_dir() {
        return Err(invalid!(
            "model: {} is a file; give the model folder, or pass single files with --dit/--vae/--text-encoder/--tokenizer",
            dir.display()
        ));
    }
    if dir.join("model_index.json").is_file() {
        return Ok((LayoutKind::Diffusers, scan_diffusers(dir, overrides)?));
    }
    let official_markers = [
        "config.json",
        OFFICIAL_HIGH_NOISE,
        OFFICIAL_LOW_NOISE,
        OFFICIAL_VAE_21,
        OFFICIAL_VAE_22,
        OFFICIAL_T5,
    ];
    if official_markers.iter().any(|m| dir.join(m).exists()) {
        return Ok((LayoutKind::Official, scan_official(dir, overrides)?));
    }
    if !overrides.is_empty() {
        // A folder that only names the model (explicit paths carry everything).
        return Ok((LayoutKind::Explicit, Scan::default()));
    }
    Err(invalid!(
        "model: {} is not a Wan model folder: expected an official release (config.json, diffusion_pytorch_model*.safetensors, {OFFICIAL_VAE_22} or {OFFICIAL_VAE_21}, {OFFICIAL_T5}, {OFFICIAL_TOKENIZER}/) or a -Diffusers folder (model_index.json, transformer/, vae/, text_encoder/, tokenizer/); for ComfyUI single files use --dit/--vae/--text-encoder/--tokenizer; found: {}",
        dir.display(),
        found_entries(dir)
    ))
}

fn rel(dir: &Path, path: &Path) -> String {
    path.strip_prefix(dir).unwrap_or(path).display().to_string()
}

/// A DiT folder (`config.json` + safetensors): records its signature or what is missing.
fn scan_dit_folder(
    root: &Path,
    folder: &Path,
    component: Component,
    scan: &mut Scan,
) -> Result<()> {
    let name = rel(root, folder);
    let shown = if name.is_empty() {
        String::new()
    } else {
        format!("{name}/")
    };
    if !folder.is_dir() {
        scan.miss(component, format!("{shown} (DiT folder)"));
        return Ok(());
    }
    let config = folder.join("config.json");
    let mut ok = true;
    if config.is_file() {
        let sig = signature_from_config(&config)?;
        match component {
            Component::Dit2 => scan.dit_2_signature = Some(sig),
            _ => scan.dit_signature = Some(sig),
        }
    } else {
        scan.miss(component, format!("{shown}config.json"));
        ok = false;
    }
    if let Err(detail) = dit_weight_files(folder) {
        scan.miss(
            component,
            format!("{shown}diffusion_pytorch_model*.safetensors{detail}"),
        );
        ok = false;
    }
    if ok {
        match component {
            Component::Dit2 => scan.dit_2 = Some(folder.to_path_buf()),
            _ => scan.dit = Some(folder.to_path_buf()),
        }
    }
    Ok(())
}

/// The DiT weights of a folder: `diffusion_pytorch_model.safetensors`, or its index with every
/// listed shard present. Other `.safetensors` files (LoRAs, copies) are not mistaken for it.
/// The error is a detail for the "missing" list (empty, or " (why)").
fn dit_weight_files(folder: &Path) -> std::result::Result<Vec<PathBuf>, String> {
    let index = folder.join("diffusion_pytorch_model.safetensors.index.json");
    if index.is_file() {
        return resolve_files(&index).map_err(|e| {
            let text = e.to_string();
            let text = text
                .strip_prefix(&format!("{}: ", index.display()))
                .unwrap_or(&text)
                .replace(&format!("{}/", folder.display()), "");
            format!(" ({text})")
        });
    }
    let single = folder.join("diffusion_pytorch_model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(String::new())
}

fn scan_official(dir: &Path, overrides: &ComponentPaths) -> Result<Scan> {
    let mut scan = Scan::default();
    let high = dir.join(OFFICIAL_HIGH_NOISE);
    let low = dir.join(OFFICIAL_LOW_NOISE);
    if high.exists() || low.exists() {
        scan_dit_folder(dir, &high, Component::Dit, &mut scan)?;
        scan_dit_folder(dir, &low, Component::Dit2, &mut scan)?;
    } else {
        scan_dit_folder(dir, dir, Component::Dit, &mut scan)?;
        if dir.join(OFFICIAL_CLIP).exists() && overrides.dit.is_none() {
            return Err(invalid!(
                "model: {} holds {OFFICIAL_CLIP}: Wan2.1 I2V/FLF2V (CLIP image branch) is not supported; supported: {}",
                dir.display(),
                WanVariant::supported_list()
            ));
        }
    }
    // The VAE follows the DiT's latent channels: 48 → Wan2.2 VAE, 16 → Wan2.1 VAE.
    let vae21 = dir.join(OFFICIAL_VAE_21);
    let vae22 = dir.join(OFFICIAL_VAE_22);
    let wanted = scan
        .dit_signature
        .as_ref()
        .filter(|_| overrides.dit.is_none())
        .map(|s| {
            if s.out_channels == 48 {
                OFFICIAL_VAE_22
            } else {
                OFFICIAL_VAE_21
            }
        });
    match wanted {
        Some(name) => {
            let path = dir.join(name);
            if path.is_file() {
                scan.vae = Some(path);
            } else {
                let other = if name == OFFICIAL_VAE_22 {
                    &vae21
                } else {
                    &vae22
                };
                let note = if other.is_file() {
                    format!(
                        " ({} is there, but it belongs to models with {} latent channels)",
                        rel(dir, other),
                        if name == OFFICIAL_VAE_22 { 16 } else { 48 }
                    )
                } else {
                    String::new()
                };
                scan.miss(Component::Vae, format!("{name}{note}"));
            }
        }
        None => match (vae22.is_file(), vae21.is_file()) {
            (true, _) => scan.vae = Some(vae22),
            (false, true) => scan.vae = Some(vae21),
            (false, false) => scan.miss(
                Component::Vae,
                format!("{OFFICIAL_VAE_22} or {OFFICIAL_VAE_21}"),
            ),
        },
    }
    let t5 = dir.join(OFFICIAL_T5);
    if t5.is_file() {
        scan.text_encoder = Some(t5);
    } else {
        scan.miss(Component::TextEncoder, OFFICIAL_T5);
    }
    scan_tokenizer(dir, &dir.join(OFFICIAL_TOKENIZER), &mut scan);
    Ok(scan)
}

fn scan_tokenizer(root: &Path, folder: &Path, scan: &mut Scan) {
    let files = ["tokenizer.json", "spiece.model"];
    if files.iter().any(|f| folder.join(f).is_file()) {
        scan.tokenizer = Some(folder.to_path_buf());
    } else {
        scan.miss(
            Component::Tokenizer,
            format!("{}/ (tokenizer.json or spiece.model)", rel(root, folder)),
        );
    }
}

/// A Diffusers component folder with `config.json` and safetensors weights.
fn scan_diffusers_component(
    root: &Path,
    name: &str,
    component: Component,
    scan: &mut Scan,
) -> Option<PathBuf> {
    let folder = root.join(name);
    if !folder.is_dir() {
        scan.miss(component, format!("{name}/"));
        return None;
    }
    let mut ok = true;
    if !folder.join("config.json").is_file() {
        scan.miss(component, format!("{name}/config.json"));
        ok = false;
    }
    if let Err(e) = resolve_files(&folder) {
        scan.miss(
            component,
            format!(
                "{name}/*.safetensors ({})",
                strip_path(&e.to_string(), &folder)
            ),
        );
        ok = false;
    }
    ok.then_some(folder)
}

/// Shortens an error that starts with the folder's path.
fn strip_path(message: &str, folder: &Path) -> String {
    let prefix = format!("{}: ", folder.display());
    message.strip_prefix(&prefix).unwrap_or(message).to_string()
}

fn scan_diffusers(dir: &Path, overrides: &ComponentPaths) -> Result<Scan> {
    let index_path = dir.join("model_index.json");
    let text = std::fs::read_to_string(&index_path)
        .map_err(|e| invalid!("model: cannot read {}: {e}", index_path.display()))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| invalid!("model: {} is not valid JSON: {e}", index_path.display()))?;
    let listed = |key: &str| {
        index
            .get(key)
            .and_then(|v| v.as_array())
            .is_some_and(|a| a.iter().any(|x| !x.is_null()))
    };
    if listed("image_encoder") {
        return Err(invalid!(
            "model: {} is a Wan2.1 image-to-video pipeline with a CLIP image encoder, which is not supported; supported: {}",
            dir.display(),
            WanVariant::supported_list()
        ));
    }
    let mut scan = Scan {
        expand_timesteps: index.get("expand_timesteps").and_then(|v| v.as_bool()),
        boundary_ratio: index.get("boundary_ratio").and_then(|v| v.as_f64()),
        ..Scan::default()
    };
    if let Some(folder) = scan_diffusers_component(dir, "transformer", Component::Dit, &mut scan) {
        scan.dit_signature = Some(signature_from_config(&folder.join("config.json"))?);
        scan.dit = Some(folder);
    }
    if listed("transformer_2") || dir.join("transformer_2").exists() {
        if let Some(folder) =
            scan_diffusers_component(dir, "transformer_2", Component::Dit2, &mut scan)
        {
            scan.dit_2_signature = Some(signature_from_config(&folder.join("config.json"))?);
            scan.dit_2 = Some(folder);
        }
    }
    if let Some(folder) = scan_diffusers_component(dir, "vae", Component::Vae, &mut scan) {
        if overrides.vae.is_none() {
            scan.vae_z_dim = Some(vae_z_dim(&folder.join("config.json"))?);
        }
        scan.vae = Some(folder);
    }
    scan.text_encoder =
        scan_diffusers_component(dir, "text_encoder", Component::TextEncoder, &mut scan);
    scan_tokenizer(dir, &dir.join("tokenizer"), &mut scan);
    let scheduler = dir.join("scheduler").join("scheduler_config.json");
    scan.scheduler_config = scheduler.is_file().then_some(scheduler);
    Ok(scan)
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid!("model: cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| invalid!("model: {} is not valid JSON: {e}", path.display()))
}

/// `z_dim` of a Diffusers `vae/config.json` (16 when absent, the `AutoencoderKLWan` default).
fn vae_z_dim(path: &Path) -> Result<usize> {
    match read_json(path)?.get("z_dim") {
        None | Some(serde_json::Value::Null) => Ok(16),
        Some(v) => v
            .as_u64()
            .map(|z| z as usize)
            .ok_or_else(|| invalid!("model: {}: `z_dim` must be an integer", path.display())),
    }
}

/// Signature from an official (`WanModel`) or Diffusers (`WanTransformer3DModel`) `config.json`,
/// parsed by [`DitConfig`] so both layouts are read one way.
fn signature_from_config(path: &Path) -> Result<DitSignature> {
    let config = DitConfig::from_file(path)?;
    let model_type = read_json(path)?
        .get("model_type")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    Ok(DitSignature {
        dim: config.dim(),
        in_channels: config.in_channels,
        out_channels: config.out_channels,
        num_layers: config.num_layers,
        model_type,
    })
}

/// Signature of a single-file (or sharded) DiT from its safetensors or GGUF header:
/// `patch_embedding` gives dim and input channels, `proj_out` the output channels, the block
/// indices the depth. Any key naming (official, Diffusers, ComfyUI prefixes) is accepted through
/// the DiT key map.
fn signature_from_weights(path: &Path) -> Result<DitSignature> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    // GGUF DiTs (city96 / QuantStack quantisations) keep their block linears quantised on load.
    let source: Box<dyn TensorSource> = if ext.eq_ignore_ascii_case("gguf") && path.is_file() {
        Box::new(GgufSource::open(path)?)
    } else {
        Box::new(SafetensorsSource::open(path)?)
    };
    if source
        .keys()
        .iter()
        .any(|k| k.contains("img_emb.") || k.contains("image_embedder."))
    {
        return Err(invalid!(
            "--dit: {} has a CLIP image branch (Wan2.1 I2V/FLF2V), which is not supported; supported: {}",
            path.display(),
            WanVariant::supported_list()
        ));
    }
    let layout = detect_layout(&source.keys());
    let wm = WeightMap::new(
        source,
        |k| Some(canonical_name(k, layout)),
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )?;
    let pe = wm.shape("patch_embedding.weight").ok_or_else(|| {
        invalid!(
            "--dit: {} is not a Wan DiT: no `patch_embedding.weight`",
            wm.describe()
        )
    })?;
    if pe.len() != 5 {
        return Err(invalid!(
            "--dit: {}: patch_embedding.weight must be 5-D, got {pe:?}",
            wm.describe()
        ));
    }
    let patch: usize = pe[2..].iter().product();
    let out_channels = wm
        .shape("proj_out.weight")
        .map(|s| s[0] / patch.max(1))
        .unwrap_or(pe[1]);
    let mut num_layers = 0;
    while wm.contains(&format!("blocks.{num_layers}.attn1.to_q.weight")) {
        num_layers += 1;
    }
    Ok(DitSignature {
        dim: pe[0],
        in_channels: pe[1],
        out_channels,
        num_layers,
        model_type: None,
    })
}

/// The folder's top-level entries, for error messages (folders end with `/`).
fn found_entries(dir: &Path) -> String {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path().is_dir() {
                    format!("{name}/")
                } else {
                    name
                }
            })
            .filter(|n| !n.starts_with('.'))
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    const SHOWN: usize = 20;
    if names.is_empty() {
        return "nothing".to_string();
    }
    let more = names.len().saturating_sub(SHOWN);
    names.truncate(SHOWN);
    let mut text = names.join(", ");
    if more > 0 {
        text.push_str(&format!(" and {more} more"));
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::error::is_invalid_input;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// Official `config.json` (WanModel) of a variant.
    #[allow(clippy::too_many_arguments)]
    fn official_config(
        dim: usize,
        heads: usize,
        ffn: usize,
        layers: usize,
        in_dim: usize,
        out_dim: usize,
        model_type: &str,
    ) -> String {
        format!(
            r#"{{"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": {dim}, "eps": 1e-06, "ffn_dim": {ffn}, "freq_dim": 256, "in_dim": {in_dim}, "model_type": "{model_type}", "num_heads": {heads}, "num_layers": {layers}, "out_dim": {out_dim}, "text_len": 512}}"#
        )
    }

    /// A sharded DiT: index + `n` empty shards.
    fn sharded_dit(folder: &Path, config: &str, shards: usize) {
        write(&folder.join("config.json"), config);
        let names: Vec<String> = (1..=shards)
            .map(|i| format!("diffusion_pytorch_model-{i:05}-of-{shards:05}.safetensors"))
            .collect();
        let map: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!(r#""blocks.{i}.w": "{n}""#))
            .collect();
        write(
            &folder.join("diffusion_pytorch_model.safetensors.index.json"),
            &format!(
                r#"{{"metadata": {{}}, "weight_map": {{{}}}}}"#,
                map.join(", ")
            ),
        );
        for n in names {
            touch(&folder.join(n));
        }
    }

    fn official_common(dir: &Path, vae: &str) {
        touch(&dir.join(vae));
        touch(&dir.join(OFFICIAL_T5));
        touch(&dir.join("google/umt5-xxl/tokenizer.json"));
        touch(&dir.join("google/umt5-xxl/spiece.model"));
        touch(&dir.join("README.md"));
    }

    fn official_ti2v(dir: &Path) {
        sharded_dit(
            dir,
            &official_config(3072, 24, 14336, 30, 48, 48, "ti2v"),
            3,
        );
        official_common(dir, OFFICIAL_VAE_22);
    }

    fn official_a14b(dir: &Path, in_dim: usize, model_type: &str) {
        let cfg = official_config(5120, 40, 13824, 40, in_dim, 16, model_type);
        sharded_dit(&dir.join(OFFICIAL_HIGH_NOISE), &cfg, 6);
        sharded_dit(&dir.join(OFFICIAL_LOW_NOISE), &cfg, 6);
        official_common(dir, OFFICIAL_VAE_21);
    }

    fn err_text(result: Result<ModelLayout>) -> String {
        let err = result.unwrap_err();
        assert!(is_invalid_input(&err), "not InvalidInput: {err:#}");
        format!("{err:#}")
    }

    #[test]
    fn official_ti2v_5b() {
        let tmp = tempfile::tempdir().unwrap();
        official_ti2v(tmp.path());
        let l = detect(tmp.path()).unwrap();
        assert_eq!(l.kind, LayoutKind::Official);
        assert_eq!(l.variant, Some(WanVariant::Wan22Ti2v5B));
        assert_eq!(l.dit, tmp.path());
        assert_eq!(l.dit_2, None);
        assert_eq!(l.vae, tmp.path().join(OFFICIAL_VAE_22));
        assert_eq!(l.text_encoder, tmp.path().join(OFFICIAL_T5));
        assert_eq!(l.tokenizer, tmp.path().join("google/umt5-xxl"));
        assert_eq!(l.dit_signature.model_type.as_deref(), Some("ti2v"));
        let info = l.model_info().unwrap();
        assert_eq!(info.task, Task::Ti2v);
        assert_eq!(info.sizes, vec![(1280, 704), (704, 1280)]);
        assert_eq!(
            (info.fps, info.default_frames, info.default_steps),
            (24, 121, 50)
        );
        assert_eq!((info.size_multiple, info.free_size), (32, false));
        assert_eq!(info.default_guidance_2, None);
        assert!(info.default_negative_prompt.starts_with("色调艳丽"));
    }

    #[test]
    fn official_a14b_two_experts() {
        for (in_dim, kind, variant) in [
            (16, "t2v", WanVariant::Wan22T2vA14B),
            (36, "i2v", WanVariant::Wan22I2vA14B),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            official_a14b(tmp.path(), in_dim, kind);
            let l = detect(tmp.path()).unwrap();
            assert_eq!(l.variant, Some(variant));
            assert_eq!(l.dit, tmp.path().join(OFFICIAL_HIGH_NOISE));
            assert_eq!(l.dit_2, Some(tmp.path().join(OFFICIAL_LOW_NOISE)));
            assert_eq!(l.vae, tmp.path().join(OFFICIAL_VAE_21));
            let info = l.model_info().unwrap();
            assert!(info.default_guidance_2.is_some());
            assert_eq!(info.task, if in_dim == 36 { Task::I2v } else { Task::T2v });
        }
        let tmp = tempfile::tempdir().unwrap();
        official_a14b(tmp.path(), 16, "t2v");
        let info = detect(tmp.path()).unwrap().model_info().unwrap();
        assert_eq!(
            (info.default_guidance, info.default_guidance_2),
            (4.0, Some(3.0))
        );
        assert_eq!((info.default_steps, info.default_shift), (40, 12.0));
    }

    #[test]
    fn official_wan21_single_file_dit() {
        let tmp = tempfile::tempdir().unwrap();
        write(
            &tmp.path().join("config.json"),
            &official_config(1536, 12, 8960, 30, 16, 16, "t2v"),
        );
        touch(&tmp.path().join("diffusion_pytorch_model.safetensors"));
        official_common(tmp.path(), OFFICIAL_VAE_21);
        let l = detect(tmp.path()).unwrap();
        assert_eq!(l.variant, Some(WanVariant::Wan21T2v1_3B));
        assert_eq!(l.model_info().unwrap().sizes, vec![(832, 480), (480, 832)]);

        // Wan2.1 I2V-14B (CLIP) is named and refused.
        let tmp = tempfile::tempdir().unwrap();
        write(
            &tmp.path().join("config.json"),
            &official_config(5120, 40, 13824, 40, 36, 16, "i2v"),
        );
        touch(&tmp.path().join("diffusion_pytorch_model.safetensors"));
        touch(&tmp.path().join(OFFICIAL_CLIP));
        official_common(tmp.path(), OFFICIAL_VAE_21);
        let msg = err_text(detect(tmp.path()));
        assert!(
            msg.contains("Wan2.1 I2V") && msg.contains("Wan2.2-TI2V-5B"),
            "{msg}"
        );
    }

    #[test]
    fn official_incomplete_lists_missing_and_found() {
        let tmp = tempfile::tempdir().unwrap();
        official_ti2v(tmp.path());
        std::fs::remove_file(tmp.path().join(OFFICIAL_T5)).unwrap();
        std::fs::remove_file(
            tmp.path()
                .join("diffusion_pytorch_model-00002-of-00003.safetensors"),
        )
        .unwrap();
        let msg = err_text(detect(tmp.path()));
        assert!(msg.contains("incomplete official"), "{msg}");
        assert!(msg.contains("missing: "), "{msg}");
        assert!(msg.contains(OFFICIAL_T5), "{msg}");
        assert!(
            msg.contains("diffusion_pytorch_model-00002-of-00003.safetensors"),
            "{msg}"
        );
        assert!(
            msg.contains("found: ") && msg.contains("Wan2.2_VAE.pth") && msg.contains("google/"),
            "{msg}"
        );

        // The wrong VAE for the DiT is pointed out.
        let tmp = tempfile::tempdir().unwrap();
        official_ti2v(tmp.path());
        std::fs::rename(
            tmp.path().join(OFFICIAL_VAE_22),
            tmp.path().join(OFFICIAL_VAE_21),
        )
        .unwrap();
        let msg = err_text(detect(tmp.path()));
        assert!(
            msg.contains("missing: Wan2.2_VAE.pth (Wan2.1_VAE.pth is there"),
            "{msg}"
        );

        // One expert only; no tokenizer.
        let tmp = tempfile::tempdir().unwrap();
        official_a14b(tmp.path(), 16, "t2v");
        std::fs::remove_dir_all(tmp.path().join(OFFICIAL_LOW_NOISE)).unwrap();
        std::fs::remove_dir_all(tmp.path().join("google")).unwrap();
        let msg = err_text(detect(tmp.path()));
        assert!(msg.contains("low_noise_model/"), "{msg}");
        assert!(
            msg.contains("google/umt5-xxl/ (tokenizer.json or spiece.model)"),
            "{msg}"
        );
        assert!(
            msg.contains("found: README.md, Wan2.1_VAE.pth, high_noise_model/"),
            "{msg}"
        );
    }

    #[test]
    fn not_a_model_folder() {
        let tmp = tempfile::tempdir().unwrap();
        touch(&tmp.path().join("notes.txt"));
        let msg = err_text(detect(tmp.path()));
        assert!(
            msg.contains("not a Wan model folder") && msg.contains("found: notes.txt"),
            "{msg}"
        );
        assert!(msg.contains("--dit"), "{msg}");
        let msg = err_text(detect(&tmp.path().join("missing")));
        assert!(msg.contains("does not exist"), "{msg}");
        let msg = err_text(detect(&tmp.path().join("notes.txt")));
        assert!(msg.contains("is a file"), "{msg}");
    }

    #[allow(clippy::too_many_arguments)]
    fn diffusers_folder(
        dir: &Path,
        heads: usize,
        ffn: usize,
        layers: usize,
        cin: usize,
        z: usize,
        two: bool,
        extra: &str,
    ) {
        let t2 = if two {
            r#"["diffusers", "WanTransformer3DModel"]"#
        } else {
            "[null, null]"
        };
        write(
            &dir.join("model_index.json"),
            &format!(
                r#"{{"_class_name": "WanPipeline", "_diffusers_version": "0.35.0", {extra} "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": {t2}, "vae": ["diffusers", "AutoencoderKLWan"]}}"#
            ),
        );
        let tcfg = format!(
            r#"{{"_class_name": "WanTransformer3DModel", "attention_head_dim": 128, "cross_attn_norm": true, "eps": 1e-06, "ffn_dim": {ffn}, "freq_dim": 256, "image_dim": null, "in_channels": {cin}, "num_attention_heads": {heads}, "num_layers": {layers}, "out_channels": {z}, "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096}}"#
        );
        let mut transformers = vec!["transformer"];
        if two {
            transformers.push("transformer_2");
        }
        for t in transformers {
            sharded_dit(&dir.join(t), &tcfg, 2);
        }
        write(
            &dir.join("vae/config.json"),
            &format!(r#"{{"_class_name": "AutoencoderKLWan", "z_dim": {z}}}"#),
        );
        touch(&dir.join("vae/diffusion_pytorch_model.safetensors"));
        write(
            &dir.join("text_encoder/config.json"),
            r#"{"d_model": 4096}"#,
        );
        touch(&dir.join("text_encoder/model-00001-of-00001.safetensors"));
        touch(&dir.join("tokenizer/tokenizer.json"));
        write(
            &dir.join("scheduler/scheduler_config.json"),
            r#"{"flow_shift": 5.0}"#,
        );
    }

    #[test]
    fn diffusers_repos() {
        let tmp = tempfile::tempdir().unwrap();
        diffusers_folder(
            tmp.path(),
            24,
            14336,
            30,
            48,
            48,
            false,
            r#""boundary_ratio": null, "expand_timesteps": true,"#,
        );
        let l = detect(tmp.path()).unwrap();
        assert_eq!(l.kind, LayoutKind::Diffusers);
        assert_eq!(l.variant, Some(WanVariant::Wan22Ti2v5B));
        assert_eq!((l.expand_timesteps, l.boundary_ratio), (Some(true), None));
        assert_eq!(l.dit, tmp.path().join("transformer"));
        assert_eq!(l.vae, tmp.path().join("vae"));
        assert_eq!(l.text_encoder, tmp.path().join("text_encoder"));
        assert_eq!(l.tokenizer, tmp.path().join("tokenizer"));
        assert_eq!(
            l.scheduler_config,
            Some(tmp.path().join("scheduler/scheduler_config.json"))
        );

        let tmp = tempfile::tempdir().unwrap();
        diffusers_folder(
            tmp.path(),
            40,
            13824,
            40,
            16,
            16,
            true,
            r#""boundary_ratio": 0.875,"#,
        );
        let l = detect(tmp.path()).unwrap();
        assert_eq!(l.variant, Some(WanVariant::Wan22T2vA14B));
        assert_eq!(l.dit_2, Some(tmp.path().join("transformer_2")));
        assert_eq!(l.boundary_ratio, Some(0.875));

        let tmp = tempfile::tempdir().unwrap();
        diffusers_folder(tmp.path(), 12, 8960, 30, 16, 16, false, "");
        assert_eq!(
            detect(tmp.path()).unwrap().variant,
            Some(WanVariant::Wan21T2v1_3B)
        );
    }

    #[test]
    fn diffusers_incomplete_or_mismatched() {
        let tmp = tempfile::tempdir().unwrap();
        diffusers_folder(tmp.path(), 40, 13824, 40, 16, 16, true, "");
        std::fs::remove_dir_all(tmp.path().join("transformer_2")).unwrap();
        std::fs::remove_file(
            tmp.path()
                .join("text_encoder/model-00001-of-00001.safetensors"),
        )
        .unwrap();
        std::fs::remove_file(tmp.path().join("tokenizer/tokenizer.json")).unwrap();
        let msg = err_text(detect(tmp.path()));
        assert!(msg.contains("incomplete Diffusers"), "{msg}");
        assert!(msg.contains("transformer_2/"), "{msg}");
        assert!(msg.contains("text_encoder/*.safetensors"), "{msg}");
        assert!(
            msg.contains("tokenizer/ (tokenizer.json or spiece.model)"),
            "{msg}"
        );
        assert!(msg.contains("found: model_index.json, scheduler/, text_encoder/, tokenizer/, transformer/, vae/"), "{msg}");

        let tmp = tempfile::tempdir().unwrap();
        diffusers_folder(tmp.path(), 24, 14336, 30, 48, 48, false, "");
        write(&tmp.path().join("vae/config.json"), r#"{"z_dim": 16}"#);
        let msg = err_text(detect(tmp.path()));
        assert!(msg.contains("vae: z_dim 16") && msg.contains("48"), "{msg}");

        // A DiT of no released shape: detected, but it has no preset.
        let tmp = tempfile::tempdir().unwrap();
        diffusers_folder(tmp.path(), 2, 256, 2, 16, 16, false, "");
        let l = detect(tmp.path()).unwrap();
        assert_eq!(l.variant, None);
        let err = l.model_info().unwrap_err();
        assert!(
            is_invalid_input(&err) && err.to_string().contains("dim 256"),
            "{err}"
        );
    }

    /// A DiT safetensors file with only the tensors detection reads (official ComfyUI names).
    fn comfy_dit(path: &Path, dim: usize, cin: usize, cout: usize, layers: usize) {
        let cpu = Device::Cpu;
        let mut t = HashMap::new();
        let p = "model.diffusion_model.";
        t.insert(
            format!("{p}patch_embedding.weight"),
            Tensor::zeros((dim, cin, 1, 2, 2), DType::F16, &cpu).unwrap(),
        );
        t.insert(
            format!("{p}head.head.weight"),
            Tensor::zeros((4 * cout, 1), DType::F16, &cpu).unwrap(),
        );
        for i in 0..layers {
            t.insert(
                format!("{p}blocks.{i}.self_attn.q.weight"),
                Tensor::zeros((1, 1), DType::F16, &cpu).unwrap(),
            );
        }
        candle_core::safetensors::save(&t, path).unwrap();
    }

    #[test]
    fn explicit_single_files() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        comfy_dit(
            &d.join("wan2.1_t2v_1.3B_fp16.safetensors"),
            1536,
            16,
            16,
            30,
        );
        comfy_dit(&d.join("high.safetensors"), 5120, 36, 16, 40);
        comfy_dit(&d.join("low.safetensors"), 5120, 36, 16, 40);
        for f in [
            "wan_2.1_vae.safetensors",
            "umt5_xxl_fp16.safetensors",
            "tokenizer.json",
        ] {
            touch(&d.join(f));
        }
        let mut paths = ComponentPaths {
            dit: Some(d.join("wan2.1_t2v_1.3B_fp16.safetensors")),
            dit_2: None,
            vae: Some(d.join("wan_2.1_vae.safetensors")),
            text_encoder: Some(d.join("umt5_xxl_fp16.safetensors")),
            tokenizer: Some(d.join("tokenizer.json")),
        };
        let l = from_components(&paths).unwrap();
        assert_eq!(
            (l.kind, l.variant, l.root.clone()),
            (LayoutKind::Explicit, Some(WanVariant::Wan21T2v1_3B), None)
        );
        assert_eq!(l.dit_signature.num_layers, 30);

        paths.dit = Some(d.join("high.safetensors"));
        paths.dit_2 = Some(d.join("low.safetensors"));
        assert_eq!(
            from_components(&paths).unwrap().variant,
            Some(WanVariant::Wan22I2vA14B)
        );
        // A single 36-channel 14B DiT would be Wan2.1 I2V: refused by name.
        paths.dit_2 = None;
        assert!(err_text(from_components(&paths)).contains("Wan2.1 I2V"));

        paths.tokenizer = None;
        let msg = err_text(from_components(&paths));
        assert!(msg.contains("missing: --tokenizer PATH"), "{msg}");
        paths.tokenizer = Some(d.join("nope.json"));
        let msg = err_text(from_components(&paths));
        assert!(
            msg.contains("--tokenizer") && msg.contains("does not exist"),
            "{msg}"
        );
        paths.tokenizer = Some(d.join("tokenizer.json"));

        // A GGUF DiT as city96 publishes them: official key names, an F32 5-D patch embedding,
        // block-quantised block linears.
        use crate::weights::gguf::{write, GgufTensorOut, GgufType, GgufValue};
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let mut tensors = vec![
            GgufTensorOut::from_tensor(
                "patch_embedding.weight",
                &zeros(&[1536, 16, 1, 2, 2]),
                GgufType::F32,
            )
            .unwrap(),
            GgufTensorOut::from_tensor("head.head.weight", &zeros(&[64, 1]), GgufType::F16)
                .unwrap(),
        ];
        for i in 0..30 {
            tensors.push(
                GgufTensorOut::from_tensor(
                    &format!("blocks.{i}.self_attn.q.weight"),
                    &zeros(&[2, 32]),
                    GgufType::Q8_0,
                )
                .unwrap(),
            );
        }
        let gguf = d.join("wan2.1-t2v-1.3b-Q8_0.gguf");
        let arch = [("general.architecture", GgufValue::String("wan".into()))];
        write(&gguf, &arch, &tensors).unwrap();
        paths.dit = Some(gguf);
        let l = from_components(&paths).unwrap();
        assert_eq!(
            (l.variant, l.dit_signature.num_layers),
            (Some(WanVariant::Wan21T2v1_3B), 30)
        );
        // Anything else named .gguf is refused as such.
        touch(&d.join("model.gguf"));
        paths.dit = Some(d.join("model.gguf"));
        let msg = err_text(from_components(&paths));
        assert!(msg.contains("not a GGUF file"), "{msg}");
    }

    #[test]
    fn explicit_paths_override_folder_components() {
        let tmp = tempfile::tempdir().unwrap();
        official_ti2v(tmp.path());
        std::fs::remove_file(tmp.path().join(OFFICIAL_VAE_22)).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let vae = elsewhere.path().join("wan2.2_vae.safetensors");
        touch(&vae);
        assert!(detect(tmp.path()).is_err());
        let overrides = ComponentPaths {
            vae: Some(vae.clone()),
            ..Default::default()
        };
        let l = detect_with_overrides(Some(tmp.path()), &overrides).unwrap();
        assert_eq!(
            (l.kind, l.vae.clone(), l.variant),
            (LayoutKind::Official, vae, Some(WanVariant::Wan22Ti2v5B))
        );
    }
}
