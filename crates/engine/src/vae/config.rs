//! VAE configuration: mirrors diffusers' `vae/config.json` (`AutoencoderKLWan`), plus the two official
//! configurations and inference of a configuration from checkpoint tensor shapes.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::invalid;

/// Wan2.1 VAE latent mean, per channel (wan-facts §5.6; diffusers `AutoencoderKLWan` defaults).
pub const WAN21_LATENTS_MEAN: [f32; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];
/// Wan2.1 VAE latent std, per channel.
pub const WAN21_LATENTS_STD: [f32; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.9160,
];
/// Wan2.2 VAE latent mean, per channel (wan-facts §5.6; official `Wan2_2_VAE`).
pub const WAN22_LATENTS_MEAN: [f32; 48] = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
    0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
    -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
    -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
    0.3573, -0.0548, -0.1681, -0.0667,
];
/// Wan2.2 VAE latent std, per channel.
pub const WAN22_LATENTS_STD: [f32; 48] = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
];

fn default_dim_mult() -> Vec<usize> {
    vec![1, 2, 4, 4]
}
fn default_temperal_downsample() -> Vec<bool> {
    vec![false, true, true]
}
fn default_channels() -> usize {
    3
}
fn default_base_dim() -> usize {
    96
}
fn default_z_dim() -> usize {
    16
}
fn default_num_res_blocks() -> usize {
    2
}
fn default_mean() -> Vec<f32> {
    WAN21_LATENTS_MEAN.to_vec()
}
fn default_std() -> Vec<f32> {
    WAN21_LATENTS_STD.to_vec()
}

/// `AutoencoderKLWan` config (field names and defaults as in diffusers 0.42.1). Unknown JSON keys
/// (`_class_name`, `_diffusers_version`, `clip_output`, ...) are ignored, as diffusers does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_base_dim")]
    pub base_dim: usize,
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    #[serde(default = "default_z_dim")]
    pub z_dim: usize,
    #[serde(default = "default_dim_mult")]
    pub dim_mult: Vec<usize>,
    #[serde(default = "default_num_res_blocks")]
    pub num_res_blocks: usize,
    #[serde(default)]
    pub attn_scales: Vec<f64>,
    #[serde(default = "default_temperal_downsample")]
    pub temperal_downsample: Vec<bool>,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_mean")]
    pub latents_mean: Vec<f32>,
    #[serde(default = "default_std")]
    pub latents_std: Vec<f32>,
    #[serde(default)]
    pub is_residual: bool,
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    #[serde(default = "default_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub patch_size: Option<usize>,
    #[serde(default)]
    pub scale_factor_temporal: Option<usize>,
    #[serde(default)]
    pub scale_factor_spatial: Option<usize>,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self::wan21()
    }
}

impl VaeConfig {
    /// The official Wan2.1 VAE (`Wan2.1_VAE.pth`): z 16, stride 4x8x8.
    pub fn wan21() -> Self {
        Self {
            base_dim: 96,
            decoder_base_dim: None,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            attn_scales: vec![],
            temperal_downsample: vec![false, true, true],
            dropout: 0.0,
            latents_mean: WAN21_LATENTS_MEAN.to_vec(),
            latents_std: WAN21_LATENTS_STD.to_vec(),
            is_residual: false,
            in_channels: 3,
            out_channels: 3,
            patch_size: None,
            scale_factor_temporal: Some(4),
            scale_factor_spatial: Some(8),
        }
    }

    /// The official Wan2.2 VAE (`Wan2.2_VAE.pth`): z 48, patchify 2, stride 4x16x16.
    pub fn wan22() -> Self {
        Self {
            base_dim: 160,
            decoder_base_dim: Some(256),
            z_dim: 48,
            is_residual: true,
            in_channels: 12,
            out_channels: 12,
            patch_size: Some(2),
            latents_mean: WAN22_LATENTS_MEAN.to_vec(),
            latents_std: WAN22_LATENTS_STD.to_vec(),
            scale_factor_spatial: Some(16),
            ..Self::wan21()
        }
    }

    /// Parses a diffusers `config.json` and validates it.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text)
            .map_err(|e| invalid!("{origin}: not a valid AutoencoderKLWan config: {e}"))?;
        cfg.validate().map_err(|e| invalid!("{origin}: {e}"))?;
        Ok(cfg)
    }

    pub fn decoder_dim(&self) -> usize {
        self.decoder_base_dim.unwrap_or(self.base_dim)
    }

    /// Pixel patch size (1 when the config has none).
    pub fn patch(&self) -> usize {
        self.patch_size.unwrap_or(1)
    }

    /// Number of RGB (or other) image channels seen by the caller, before patchify.
    pub fn image_channels(&self) -> usize {
        self.in_channels / (self.patch() * self.patch())
    }

    /// Number of down stages that halve time.
    pub fn temporal_stages(&self) -> usize {
        let stages = self.dim_mult.len().saturating_sub(1);
        self.temperal_downsample
            .iter()
            .take(stages)
            .filter(|&&t| t)
            .count()
    }

    /// Pixels per latent pixel (8 for Wan2.1, 16 for Wan2.2).
    pub fn spatial_stride(&self) -> usize {
        (1 << self.dim_mult.len().saturating_sub(1)) * self.patch()
    }

    /// Frames per latent frame after the first (4 for both Wan VAEs).
    pub fn temporal_stride(&self) -> usize {
        1 << self.temporal_stages()
    }

    /// Latent frames produced by encoding `frames` frames: the encoder sees frame 0 alone, then
    /// chunks of 4 (trailing frames that do not fill a chunk are dropped, as in diffusers).
    pub fn latent_frames(&self, frames: usize) -> usize {
        let chunks = 1 + frames.saturating_sub(1) / 4;
        1 + (chunks - 1) * (4 / self.temporal_stride())
    }

    /// Frames produced by decoding `latent_frames` latent frames.
    pub fn decoded_frames(&self, latent_frames: usize) -> usize {
        1 + latent_frames.saturating_sub(1) * self.temporal_stride()
    }

    /// Checks the structural constraints the reference itself relies on.
    pub fn validate(&self) -> Result<()> {
        let stages = self.dim_mult.len();
        if stages == 0 || self.dim_mult.contains(&0) {
            return Err(invalid!(
                "dim_mult: {:?} must be non-empty and positive",
                self.dim_mult
            ));
        }
        if self.temperal_downsample.len() < stages - 1 {
            return Err(invalid!(
                "temperal_downsample: {:?} needs {} entries (one per down stage)",
                self.temperal_downsample,
                stages - 1
            ));
        }
        if self.temporal_stages() > 2 {
            return Err(invalid!(
                "temperal_downsample: {:?} halves time {} times; the chunked causal encode (chunks of 4 \
                 frames) supports at most 2",
                self.temperal_downsample,
                self.temporal_stages()
            ));
        }
        if !self.attn_scales.is_empty() {
            // diffusers would build attention blocks there but its chunked encoder cannot call them.
            return Err(invalid!(
                "attn_scales: {:?} is not supported (the Wan VAEs use []: attention only in the middle block)",
                self.attn_scales
            ));
        }
        if self.base_dim == 0 || self.z_dim == 0 || self.num_res_blocks == 0 {
            return Err(invalid!(
                "base_dim, z_dim and num_res_blocks must be positive"
            ));
        }
        let p = self.patch();
        if !self.in_channels.is_multiple_of(p * p) || !self.out_channels.is_multiple_of(p * p) {
            return Err(invalid!(
                "in_channels {} / out_channels {} must be multiples of patch_size² = {}",
                self.in_channels,
                self.out_channels,
                p * p
            ));
        }
        if self.latents_mean.len() != self.z_dim || self.latents_std.len() != self.z_dim {
            return Err(invalid!(
                "latents_mean / latents_std have {} / {} values, expected z_dim = {}",
                self.latents_mean.len(),
                self.latents_std.len(),
                self.z_dim
            ));
        }
        if self.latents_std.iter().any(|&s| s <= 0.0 || !s.is_finite()) {
            return Err(invalid!(
                "latents_std: every value must be positive and finite"
            ));
        }
        if let Some(s) = self.scale_factor_spatial {
            if s != self.spatial_stride() {
                return Err(invalid!(
                    "scale_factor_spatial: {s} contradicts the architecture (stride {})",
                    self.spatial_stride()
                ));
            }
        }
        if let Some(t) = self.scale_factor_temporal {
            if t != self.temporal_stride() {
                return Err(invalid!(
                    "scale_factor_temporal: {t} contradicts the architecture (stride {})",
                    self.temporal_stride()
                ));
            }
        }
        if self.is_residual {
            // AvgDown3D / DupUp3D regroup channels; the reference asserts divisibility.
            let dims: Vec<usize> = std::iter::once(1)
                .chain(self.dim_mult.iter().copied())
                .map(|m| m * self.base_dim)
                .collect();
            for i in 0..stages {
                let down = i + 1 != stages;
                let factor = if down {
                    4 * if self.temperal_downsample[i] { 2 } else { 1 }
                } else {
                    1
                };
                if !(dims[i] * factor).is_multiple_of(dims[i + 1]) {
                    return Err(invalid!(
                        "base_dim/dim_mult: encoder stage {i} ({} -> {} channels) cannot average-down by {factor}",
                        dims[i],
                        dims[i + 1]
                    ));
                }
            }
        }
        Ok(())
    }

    /// Latent normalisation constants for a known latent width (16: Wan2.1, 48: Wan2.2), used when
    /// a checkpoint has no config (official `.pth`, ComfyUI files).
    pub fn official_latent_stats(z_dim: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        match z_dim {
            16 => Ok((WAN21_LATENTS_MEAN.to_vec(), WAN21_LATENTS_STD.to_vec())),
            48 => Ok((WAN22_LATENTS_MEAN.to_vec(), WAN22_LATENTS_STD.to_vec())),
            z => Err(invalid!(
                "z_dim: {z} latent channels match neither official Wan VAE (16: Wan2.1, 48: Wan2.2), so \
                 latents_mean/latents_std are unknown; use a diffusers vae/ folder with its config.json"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_configs_have_the_documented_strides() {
        let a = VaeConfig::wan21();
        a.validate().unwrap();
        assert_eq!(
            (a.spatial_stride(), a.temporal_stride(), a.z_dim),
            (8, 4, 16)
        );
        let b = VaeConfig::wan22();
        b.validate().unwrap();
        assert_eq!(
            (b.spatial_stride(), b.temporal_stride(), b.z_dim),
            (16, 4, 48)
        );
        assert_eq!(b.image_channels(), 3);
        assert_eq!(a.latent_frames(81), 21);
        assert_eq!(a.decoded_frames(21), 81);
        // diffusers drops trailing frames that do not fill a chunk of 4
        assert_eq!(a.latent_frames(83), 21);
    }

    #[test]
    fn config_json_defaults_and_errors() {
        let cfg = VaeConfig::from_json(
            r#"{"_class_name": "AutoencoderKLWan", "base_dim": 96}"#,
            "c",
        )
        .unwrap();
        // Absent scale factors stay None: they are derived from the architecture.
        let expected = VaeConfig {
            scale_factor_temporal: None,
            scale_factor_spatial: None,
            ..VaeConfig::wan21()
        };
        assert_eq!(cfg, expected);
        let err = VaeConfig::from_json(r#"{"z_dim": 48}"#, "c")
            .unwrap_err()
            .to_string();
        assert!(err.contains("latents_mean"), "{err}");
        let err = VaeConfig::from_json(r#"{"attn_scales": [0.5]}"#, "c")
            .unwrap_err()
            .to_string();
        assert!(err.contains("attn_scales"), "{err}");
    }
}
