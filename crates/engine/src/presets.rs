//! Per-model defaults from the official Wan configs (steps, shift, guidance, boundary, fps, frames, sizes).
//!
//! Sources (wan-facts §0 tags):
//! - W22 = github Wan-Video/Wan2.2 @ 42bf4cfaa384bc21833865abc2f9e6c0e67233dc: `wan/configs/shared_config.py`,
//!   `wan_t2v_A14B.py`, `wan_i2v_A14B.py`, `wan_ti2v_5B.py`, `wan/configs/__init__.py` (SUPPORTED_SIZES),
//!   `generate.py` (`_validate_args`, argparse defaults), `README.md` (example commands).
//! - W21 = github Wan-Video/Wan2.1 @ 9737cba9c1c3c4d04b33fcad41c111989865d315: `wan/configs/shared_config.py`,
//!   `wan_t2v_1_3B.py`, `wan_t2v_14B.py`, `wan_i2v_14B.py`, `wan/configs/__init__.py`, `generate.py`.
//! - DFS = diffusers `scripts/convert_wan_to_diffusers.py` (in/out channels, which the official configs lack).
//!
//! Guidance convention: the official A14B configs store `sample_guide_scale = (low_noise, high_noise)`
//! and use element [1] while t ≥ boundary·1000 (W22 `text2video.py`); here the two are named fields.

use anyhow::Result;

use crate::invalid;
use crate::scheduler::{SchedulerKind, SchedulerSpec};

/// What the model generates from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// Text to video.
    T2V,
    /// Image (+ text) to video; the image is required.
    I2V,
    /// Text to video, or text + image to video (Wan2.2 TI2V-5B).
    TI2V,
}

/// Which VAE the checkpoint pairs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeKind {
    /// `Wan2.1_VAE.pth`: 16 latent channels, stride (4, 8, 8).
    Wan21,
    /// `Wan2.2_VAE.pth`: 48 latent channels, stride (4, 16, 16).
    Wan22,
}

/// Transformer dimensions (official config names; diffusers: inner dim, ffn_dim, num_attention_heads, num_layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DitDims {
    pub dim: usize,
    pub ffn_dim: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub freq_dim: usize,
    /// (t, h, w).
    pub patch_size: [usize; 3],
}

/// Classifier-free guidance scale per expert. Single-expert models use the same value twice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    /// Used while t ≥ boundary·1000 (the high-noise expert; diffusers `guidance_scale`).
    pub high_noise: f64,
    /// Used below the boundary (the low-noise expert; diffusers `guidance_scale_2`).
    pub low_noise: f64,
}

/// A (width, height) pair in pixels. Official size strings are "W*H" (W22 `SIZE_CONFIGS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub width: u32,
    pub height: u32,
}

const fn size(width: u32, height: u32) -> Size {
    Size { width, height }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}*{}", self.width, self.height)
    }
}

/// One model's official defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelPreset {
    pub name: &'static str,
    /// The official `--task` name.
    pub official_task: &'static str,
    pub task: TaskKind,
    pub dit: DitDims,
    pub vae: VaeKind,
    /// (t, h, w) pixels per latent cell.
    pub vae_stride: [usize; 3],
    /// Latent channels (VAE z_dim).
    pub latent_channels: usize,
    pub steps: usize,
    pub shift: f64,
    /// Wan2.1 I2V uses another shift at 480p (W21 `generate.py`: 3.0 for 832*480 / 480*832).
    pub shift_480p: Option<f64>,
    pub guidance: Guidance,
    /// Two experts (high_noise_model / low_noise_model) switched at t = boundary·num_train_timesteps.
    pub boundary_ratio: Option<f64>,
    pub sample_solver: SchedulerKind,
    pub fps: u32,
    pub default_frames: usize,
    /// The official code sets no upper limit on frame count (it only says "should be 4n+1").
    pub max_frames: Option<usize>,
    pub supported_sizes: &'static [Size],
    pub default_size: Size,
    /// diffusers floors height and width to vae_stride·patch (DF `pipeline_wan.py`).
    pub size_multiple: u32,
    pub negative_prompt: &'static str,
    /// UMT5 text length (W22/W21 `shared_config.py text_len`).
    pub text_len: usize,
    pub num_train_timesteps: usize,
}

/// `wan_shared_cfg.sample_neg_prompt` (W22 and W21 `wan/configs/shared_config.py`), verbatim.
pub const DEFAULT_NEGATIVE_PROMPT: &str = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走";

/// W21 `wan_i2v_14B.py`: `"镜头晃动，" + sample_neg_prompt`.
pub const WAN21_I2V_NEGATIVE_PROMPT: &str = "镜头晃动，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走";

/// W22 SUPPORTED_SIZES t2v-A14B / i2v-A14B; W21 t2v-14B / i2v-14B ("W*H" keys of SIZE_CONFIGS).
const SIZES_720P_480P: &[Size] = &[
    size(720, 1280),
    size(1280, 720),
    size(480, 832),
    size(832, 480),
];
/// W21 SUPPORTED_SIZES t2v-1.3B.
const SIZES_480P: &[Size] = &[size(480, 832), size(832, 480)];
/// W22 SUPPORTED_SIZES ti2v-5B.
const SIZES_5B: &[Size] = &[size(704, 1280), size(1280, 704)];

const PATCH: [usize; 3] = [1, 2, 2]; // every config: patch_size = (1, 2, 2)
const VAE21_STRIDE: [usize; 3] = [4, 8, 8]; // vae_stride (4, 8, 8)
const VAE22_STRIDE: [usize; 3] = [4, 16, 16]; // ti2v_5B.vae_stride (4, 16, 16)

const fn dims(
    dim: usize,
    ffn_dim: usize,
    num_heads: usize,
    num_layers: usize,
    in_ch: usize,
    out_ch: usize,
) -> DitDims {
    DitDims {
        dim,
        ffn_dim,
        num_heads,
        num_layers,
        in_channels: in_ch,
        out_channels: out_ch,
        freq_dim: 256, // freq_dim = 256 in every config
        patch_size: PATCH,
    }
}

const fn same_guidance(g: f64) -> Guidance {
    Guidance {
        high_noise: g,
        low_noise: g,
    }
}

/// Every known preset.
pub static PRESETS: &[ModelPreset] = &[
    // W21 wan_t2v_1_3B.py (dims), generate.py (steps 50, shift 5.0, guide 5.0 CLI default, frames 81),
    // shared_config.py (fps 16), SUPPORTED_SIZES['t2v-1.3B'], README example `--size 832*480`.
    // in/out 16/16: the checkpoint config.json (model_type t2v, in_dim 16), wan-facts §1.
    ModelPreset {
        name: "wan2.1-t2v-1.3b",
        official_task: "t2v-1.3B",
        task: TaskKind::T2V,
        dit: dims(1536, 8960, 12, 30, 16, 16),
        vae: VaeKind::Wan21,
        vae_stride: VAE21_STRIDE,
        latent_channels: 16,
        steps: 50,
        shift: 5.0,
        shift_480p: None,
        guidance: same_guidance(5.0),
        boundary_ratio: None,
        sample_solver: SchedulerKind::UniPc, // generate.py --sample_solver default 'unipc'
        fps: 16,
        default_frames: 81,
        max_frames: None,
        supported_sizes: SIZES_480P,
        default_size: size(832, 480),
        size_multiple: 16,
        negative_prompt: DEFAULT_NEGATIVE_PROMPT,
        text_len: 512,
        num_train_timesteps: 1000,
    },
    // W21 wan_t2v_14B.py (dims), generate.py (steps 50, shift 5.0, guide 5.0, frames 81, --size default
    // 1280*720), SUPPORTED_SIZES['t2v-14B'].
    ModelPreset {
        name: "wan2.1-t2v-14b",
        official_task: "t2v-14B",
        task: TaskKind::T2V,
        dit: dims(5120, 13824, 40, 40, 16, 16),
        vae: VaeKind::Wan21,
        vae_stride: VAE21_STRIDE,
        latent_channels: 16,
        steps: 50,
        shift: 5.0,
        shift_480p: None,
        guidance: same_guidance(5.0),
        boundary_ratio: None,
        sample_solver: SchedulerKind::UniPc,
        fps: 16,
        default_frames: 81,
        max_frames: None,
        supported_sizes: SIZES_720P_480P,
        default_size: size(1280, 720),
        size_multiple: 16,
        negative_prompt: DEFAULT_NEGATIVE_PROMPT,
        text_len: 512,
        num_train_timesteps: 1000,
    },
    // W21 wan_i2v_14B.py (dims, negative prompt with "镜头晃动，" prefix, CLIP image encoder),
    // generate.py ("i2v" → steps 40; shift 5.0, or 3.0 at 832*480 / 480*832), SUPPORTED_SIZES['i2v-14B'].
    // in 36 (16 noise + 4 mask + 16 image latents) / out 16: checkpoint config.json (model_type i2v).
    ModelPreset {
        name: "wan2.1-i2v-14b",
        official_task: "i2v-14B",
        task: TaskKind::I2V,
        dit: dims(5120, 13824, 40, 40, 36, 16),
        vae: VaeKind::Wan21,
        vae_stride: VAE21_STRIDE,
        latent_channels: 16,
        steps: 40,
        shift: 5.0,
        shift_480p: Some(3.0),
        guidance: same_guidance(5.0),
        boundary_ratio: None,
        sample_solver: SchedulerKind::UniPc,
        fps: 16,
        default_frames: 81,
        max_frames: None,
        supported_sizes: SIZES_720P_480P,
        default_size: size(1280, 720),
        size_multiple: 16,
        negative_prompt: WAN21_I2V_NEGATIVE_PROMPT,
        text_len: 512,
        num_train_timesteps: 1000,
    },
    // W22 wan_t2v_A14B.py: sample_shift 12.0, sample_steps 40, boundary 0.875,
    // sample_guide_scale (3.0, 4.0) = (low, high); frame_num 81 and fps 16 from shared_config.py;
    // generate.py --size default 1280*720; SUPPORTED_SIZES['t2v-A14B']; in/out 16/16 from DFS.
    ModelPreset {
        name: "wan2.2-t2v-a14b",
        official_task: "t2v-A14B",
        task: TaskKind::T2V,
        dit: dims(5120, 13824, 40, 40, 16, 16),
        vae: VaeKind::Wan21,
        vae_stride: VAE21_STRIDE,
        latent_channels: 16,
        steps: 40,
        shift: 12.0,
        shift_480p: None,
        guidance: Guidance {
            high_noise: 4.0,
            low_noise: 3.0,
        },
        boundary_ratio: Some(0.875),
        sample_solver: SchedulerKind::UniPc,
        fps: 16,
        default_frames: 81,
        max_frames: None,
        supported_sizes: SIZES_720P_480P,
        default_size: size(1280, 720),
        size_multiple: 16,
        negative_prompt: DEFAULT_NEGATIVE_PROMPT,
        text_len: 512,
        num_train_timesteps: 1000,
    },
    // W22 wan_i2v_A14B.py: sample_shift 5.0, sample_steps 40, boundary 0.900,
    // sample_guide_scale (3.5, 3.5); SUPPORTED_SIZES['i2v-A14B']; in 36 / out 16 from DFS.
    // The output keeps the input image's aspect ratio within the size's area (W22 image2video.py).
    ModelPreset {
        name: "wan2.2-i2v-a14b",
        official_task: "i2v-A14B",
        task: TaskKind::I2V,
        dit: dims(5120, 13824, 40, 40, 36, 16),
        vae: VaeKind::Wan21,
        vae_stride: VAE21_STRIDE,
        latent_channels: 16,
        steps: 40,
        shift: 5.0,
        shift_480p: None,
        guidance: same_guidance(3.5),
        boundary_ratio: Some(0.900),
        sample_solver: SchedulerKind::UniPc,
        fps: 16,
        default_frames: 81,
        max_frames: None,
        supported_sizes: SIZES_720P_480P,
        default_size: size(1280, 720),
        size_multiple: 16,
        negative_prompt: DEFAULT_NEGATIVE_PROMPT,
        text_len: 512,
        num_train_timesteps: 1000,
    },
    // W22 wan_ti2v_5B.py: dim 3072, ffn 14336, 24 heads, 30 layers, Wan2.2 VAE stride (4, 16, 16),
    // sample_fps 24, sample_shift 5.0, sample_steps 50, sample_guide_scale 5.0, frame_num 121;
    // SUPPORTED_SIZES['ti2v-5B'] = 704*1280, 1280*704 (README example `--size 1280*704`); in/out 48/48 from DFS.
    ModelPreset {
        name: "wan2.2-ti2v-5b",
        official_task: "ti2v-5B",
        task: TaskKind::TI2V,
        dit: dims(3072, 14336, 24, 30, 48, 48),
        vae: VaeKind::Wan22,
        vae_stride: VAE22_STRIDE,
        latent_channels: 48,
        steps: 50,
        shift: 5.0,
        shift_480p: None,
        guidance: same_guidance(5.0),
        boundary_ratio: None,
        sample_solver: SchedulerKind::UniPc,
        fps: 24,
        default_frames: 121,
        max_frames: None,
        supported_sizes: SIZES_5B,
        default_size: size(1280, 704),
        size_multiple: 32,
        negative_prompt: DEFAULT_NEGATIVE_PROMPT,
        text_len: 512,
        num_train_timesteps: 1000,
    },
];

/// The names [`preset`] accepts.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.name).collect()
}

/// Looks a preset up by name (case-insensitive), e.g. "wan2.2-t2v-a14b".
pub fn preset(name: &str) -> Result<&'static ModelPreset> {
    let wanted = name.trim().to_ascii_lowercase();
    PRESETS.iter().find(|p| p.name == wanted).ok_or_else(|| {
        invalid!(
            "model: unknown preset {name:?}; valid values: {}",
            preset_names().join(", ")
        )
    })
}

impl ModelPreset {
    /// Two denoising experts (A14B MoE).
    pub fn has_experts(&self) -> bool {
        self.boundary_ratio.is_some()
    }

    /// The default shift at a given output size (Wan2.1 I2V lowers it at 480p).
    pub fn shift_for_size(&self, size: Size) -> f64 {
        let is_480p = matches!((size.width, size.height), (832, 480) | (480, 832));
        match self.shift_480p {
            Some(shift) if is_480p => shift,
            _ => self.shift,
        }
    }

    /// The official sampler for this model: `sample_solver` with the official sigma table.
    pub fn scheduler_spec(&self, shift: f64) -> SchedulerSpec {
        let mut spec = SchedulerSpec::official(self.sample_solver, shift);
        spec.num_train_timesteps = self.num_train_timesteps;
        spec
    }

    /// True while the high-noise expert (and its guidance) applies: t ≥ boundary·num_train_timesteps
    /// (W22 `text2video.py`; DF `pipeline_wan.py` compares the same way). Always true for one expert.
    pub fn is_high_noise(&self, timestep: f32) -> bool {
        match self.boundary_ratio {
            Some(ratio) => timestep as f64 >= ratio * self.num_train_timesteps as f64,
            None => true,
        }
    }

    /// The guidance scale at a timestep.
    pub fn guidance_at(&self, timestep: f32) -> f64 {
        if self.is_high_noise(timestep) {
            self.guidance.high_noise
        } else {
            self.guidance.low_noise
        }
    }

    /// Whether `size` is one of the official sizes for this model.
    pub fn supports_size(&self, size: Size) -> bool {
        self.supported_sizes.contains(&size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::is_invalid_input;
    use crate::scheduler::build;

    #[test]
    fn lookup_by_name_and_error_lists_names() {
        for name in preset_names() {
            assert_eq!(preset(name).unwrap().name, name);
        }
        assert_eq!(preset("Wan2.2-T2V-A14B").unwrap().official_task, "t2v-A14B");
        let err = preset("wan2.3-t2v").unwrap_err();
        assert!(is_invalid_input(&err));
        let msg = err.to_string();
        for name in preset_names() {
            assert!(msg.contains(name), "{msg}");
        }
    }

    #[test]
    fn official_values() {
        let t2v = preset("wan2.2-t2v-a14b").unwrap();
        assert_eq!(
            (t2v.steps, t2v.shift, t2v.boundary_ratio),
            (40, 12.0, Some(0.875))
        );
        assert_eq!(
            (t2v.guidance.high_noise, t2v.guidance.low_noise),
            (4.0, 3.0)
        );
        let i2v = preset("wan2.2-i2v-a14b").unwrap();
        assert_eq!(
            (i2v.steps, i2v.shift, i2v.boundary_ratio),
            (40, 5.0, Some(0.9))
        );
        assert_eq!(i2v.dit.in_channels, 36);
        let ti2v = preset("wan2.2-ti2v-5b").unwrap();
        assert_eq!(
            (ti2v.fps, ti2v.default_frames, ti2v.size_multiple),
            (24, 121, 32)
        );
        assert_eq!(
            (ti2v.vae, ti2v.latent_channels, ti2v.vae_stride),
            (VaeKind::Wan22, 48, [4, 16, 16])
        );
        assert!(ti2v.supports_size(size(1280, 704)) && !ti2v.supports_size(size(1280, 720)));
        let small = preset("wan2.1-t2v-1.3b").unwrap();
        assert_eq!(small.supported_sizes, &[size(480, 832), size(832, 480)]);
        let w21_i2v = preset("wan2.1-i2v-14b").unwrap();
        assert_eq!(w21_i2v.shift_for_size(size(832, 480)), 3.0);
        assert_eq!(w21_i2v.shift_for_size(size(1280, 720)), 5.0);
        assert!(w21_i2v.negative_prompt.starts_with("镜头晃动，"));
        assert!(w21_i2v.negative_prompt.ends_with(DEFAULT_NEGATIVE_PROMPT));
        for p in PRESETS {
            assert_eq!(p.dit.dim / p.dit.num_heads, 128, "{}: head dim", p.name);
            assert_eq!(
                p.size_multiple as usize,
                p.vae_stride[1] * p.dit.patch_size[1],
                "{}",
                p.name
            );
            for s in p.supported_sizes {
                assert_eq!(s.width % p.size_multiple, 0, "{} {s}", p.name);
                assert_eq!(s.height % p.size_multiple, 0, "{} {s}", p.name);
            }
            assert!(p.supports_size(p.default_size), "{}: default size", p.name);
            assert_eq!(
                (p.default_frames - 1) % 4,
                0,
                "{}: frames must be 4n+1",
                p.name
            );
        }
    }

    #[test]
    fn expert_switch_counts_match_the_official_schedules() {
        // wan-facts §7.4 [LOCAL]: t2v-A14B runs 26 high-noise steps then 14; i2v-A14B 15 then 25.
        for (name, high) in [("wan2.2-t2v-a14b", 26), ("wan2.2-i2v-a14b", 15)] {
            let p = preset(name).unwrap();
            let s = build(&p.scheduler_spec(p.shift), p.steps).unwrap();
            let n_high = s
                .timesteps()
                .iter()
                .filter(|&&t| p.is_high_noise(t))
                .count();
            assert_eq!(n_high, high, "{name}");
            // High-noise steps come first, then only low-noise ones.
            assert!(s.timesteps()[..high].iter().all(|&t| p.is_high_noise(t)));
            assert_eq!(p.guidance_at(s.timesteps()[0]), p.guidance.high_noise);
            assert_eq!(
                p.guidance_at(s.timesteps()[p.steps - 1]),
                p.guidance.low_noise
            );
        }
        assert!(preset("wan2.2-ti2v-5b").unwrap().is_high_noise(0.0));
    }
}
