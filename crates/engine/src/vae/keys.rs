//! Checkpoint key names. The canonical names are diffusers' `AutoencoderKLWan` state-dict keys;
//! official Wan (`Wan2.1_VAE.pth`, `Wan2.2_VAE.pth`, ComfyUI repackagings) keys are mapped onto them
//! (wan-facts §5.4, the inverse of diffusers' `convert_vae` / `convert_vae_22`). A checkpoint
//! without a config has its architecture inferred from tensor shapes.

use std::collections::BTreeSet;

use anyhow::Result;

use super::config::VaeConfig;
use crate::invalid;

/// Key prefixes some repackagings put in front of the VAE keys; stripped when present.
const WRAPPER_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];

/// How a checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// diffusers `AutoencoderKLWan` (canonical).
    Diffusers,
    /// Official Wan `WanVAE_`; `num_res_blocks` is needed to unflatten the Wan2.1 decoder list.
    Official { num_res_blocks: usize },
}

fn strip_wrapper(key: &str) -> &str {
    WRAPPER_PREFIXES
        .iter()
        .find_map(|p| key.strip_prefix(p))
        .unwrap_or(key)
}

/// Detects the naming from the stored keys.
pub fn detect_layout(keys: &[String], origin: &str) -> Result<KeyLayout> {
    let set: BTreeSet<&str> = keys.iter().map(|k| strip_wrapper(k)).collect();
    if set.contains("encoder.conv_in.weight") {
        return Ok(KeyLayout::Diffusers);
    }
    if set.contains("encoder.conv1.weight") {
        // Wan2.1 flattens the encoder stages: the first Resample's index is the res-block count.
        // (Wan2.2 names the down-sampler inside each stage, so the count is not needed there.)
        let num_res_blocks = (0..64)
            .find(|i| set.contains(format!("encoder.downsamples.{i}.resample.1.weight").as_str()))
            .unwrap_or(0);
        return Ok(KeyLayout::Official { num_res_blocks });
    }
    Err(invalid!(
        "{origin}: not a Wan VAE checkpoint (neither `encoder.conv_in.weight` (diffusers) nor \
         `encoder.conv1.weight` (official Wan) is present)"
    ))
}

/// Maps a stored key to its canonical (diffusers) name for `layout`. Keys that do not follow the
/// layout are passed through unchanged, so strict loading reports them as unexpected.
pub fn normalize_key(key: &str, layout: KeyLayout) -> String {
    let key = strip_wrapper(key);
    match layout {
        KeyLayout::Diffusers => key.to_string(),
        KeyLayout::Official { num_res_blocks } => {
            official_to_diffusers(key, num_res_blocks).unwrap_or_else(|| key.to_string())
        }
    }
}

/// Official ResidualBlock member -> diffusers name.
fn resblock(rest: &str) -> Option<String> {
    const MAP: [(&str, &str); 5] = [
        ("residual.0.gamma", "norm1.gamma"),
        ("residual.2.", "conv1."),
        ("residual.3.gamma", "norm2.gamma"),
        ("residual.6.", "conv2."),
        ("shortcut.", "conv_shortcut."),
    ];
    MAP.iter()
        .find_map(|(o, d)| rest.strip_prefix(o).map(|tail| format!("{d}{tail}")))
}

fn is_resample(rest: &str) -> bool {
    rest.starts_with("resample.") || rest.starts_with("time_conv.")
}

/// Splits `"<index>.<rest>"`.
fn index(s: &str) -> Option<(usize, &str)> {
    let (i, rest) = s.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

fn official_to_diffusers(key: &str, nres: usize) -> Option<String> {
    if let Some(t) = key.strip_prefix("conv1.") {
        return Some(format!("quant_conv.{t}"));
    }
    if let Some(t) = key.strip_prefix("conv2.") {
        return Some(format!("post_quant_conv.{t}"));
    }
    let (part, rest) = key.split_once('.')?;
    if part != "encoder" && part != "decoder" {
        return None;
    }
    let inner = if let Some(t) = rest.strip_prefix("conv1.") {
        format!("conv_in.{t}")
    } else if rest == "head.0.gamma" {
        "norm_out.gamma".to_string()
    } else if let Some(t) = rest.strip_prefix("head.2.") {
        format!("conv_out.{t}")
    } else if let Some(t) = rest.strip_prefix("middle.") {
        match index(t)? {
            (0, r) => format!("mid_block.resnets.0.{}", resblock(r)?),
            (1, r) => format!("mid_block.attentions.0.{r}"),
            (2, r) => format!("mid_block.resnets.1.{}", resblock(r)?),
            _ => return None,
        }
    } else if let Some(t) = rest.strip_prefix("downsamples.") {
        let (i, r) = index(t)?;
        if let Some(t) = r.strip_prefix("downsamples.") {
            // Wan2.2: stage i, member j (res blocks, then the down-sampler).
            let (j, r) = index(t)?;
            if is_resample(r) {
                format!("down_blocks.{i}.downsampler.{r}")
            } else {
                format!("down_blocks.{i}.resnets.{j}.{}", resblock(r)?)
            }
        } else if is_resample(r) {
            format!("down_blocks.{i}.{r}")
        } else {
            format!("down_blocks.{i}.{}", resblock(r)?)
        }
    } else if let Some(t) = rest.strip_prefix("upsamples.") {
        let (i, r) = index(t)?;
        if let Some(t) = r.strip_prefix("upsamples.") {
            let (j, r) = index(t)?;
            if is_resample(r) {
                format!("up_blocks.{i}.upsampler.{r}")
            } else {
                format!("up_blocks.{i}.resnets.{j}.{}", resblock(r)?)
            }
        } else {
            // Wan2.1: a flat list, nres + 1 res blocks then one Resample per stage.
            let per_stage = nres + 2;
            let (stage, j) = (i / per_stage, i % per_stage);
            if is_resample(r) {
                format!("up_blocks.{stage}.upsamplers.0.{r}")
            } else {
                format!("up_blocks.{stage}.resnets.{j}.{}", resblock(r)?)
            }
        }
    } else {
        return None;
    };
    Some(format!("{part}.{inner}"))
}

/// Infers the architecture from canonical names and shapes (for checkpoints without a config).
/// `shape` returns the stored shape of a canonical name.
pub fn infer_config(shape: &dyn Fn(&str) -> Option<Vec<usize>>, origin: &str) -> Result<VaeConfig> {
    let need = |name: &str, dim: usize| -> Result<usize> {
        shape(name)
            .and_then(|s| s.get(dim).copied())
            .ok_or_else(|| {
                invalid!("{origin}: missing weight `{name}` needed to infer the VAE architecture")
            })
    };
    let base_dim = need("encoder.conv_in.weight", 0)?;
    let in_channels = need("encoder.conv_in.weight", 1)?;
    let z_dim = need("post_quant_conv.weight", 0)?;
    let decoder_out_dim = need("decoder.conv_out.weight", 1)?;
    let out_channels = need("decoder.conv_out.weight", 0)?;
    let is_residual = shape("encoder.down_blocks.0.resnets.0.conv1.weight").is_some();
    let mut dim_mult = Vec::new();
    let mut temporal = Vec::new();
    let mut num_res_blocks = 0;
    if is_residual {
        for stage in 0.. {
            let p = format!("encoder.down_blocks.{stage}");
            if shape(&format!("{p}.resnets.0.conv1.weight")).is_none() {
                break;
            }
            dim_mult.push(need(&format!("{p}.resnets.0.conv1.weight"), 0)? / base_dim);
            if stage == 0 {
                num_res_blocks = (0..)
                    .take_while(|j| shape(&format!("{p}.resnets.{j}.conv1.weight")).is_some())
                    .count();
            }
            if shape(&format!("{p}.downsampler.resample.1.weight")).is_some() {
                temporal.push(shape(&format!("{p}.downsampler.time_conv.weight")).is_some());
            }
        }
    } else {
        // Flat list: res blocks, with a Resample closing every stage but the last.
        let mut in_stage = 0;
        for i in 0.. {
            let p = format!("encoder.down_blocks.{i}");
            if let Some(s) = shape(&format!("{p}.conv1.weight")) {
                if in_stage == 0 {
                    dim_mult.push(s[0] / base_dim);
                }
                in_stage += 1;
            } else if shape(&format!("{p}.resample.1.weight")).is_some() {
                temporal.push(shape(&format!("{p}.time_conv.weight")).is_some());
                if num_res_blocks == 0 {
                    num_res_blocks = in_stage;
                }
                in_stage = 0;
            } else {
                break;
            }
        }
        if num_res_blocks == 0 {
            num_res_blocks = in_stage;
        }
    }
    if dim_mult.is_empty() {
        return Err(invalid!(
            "{origin}: no encoder down blocks found; not a Wan VAE checkpoint"
        ));
    }
    // RGB patchified p x p into the channels (Wan2.2: 12 = 3·2·2).
    let patch_size = (2..=8).find(|p| in_channels == 3 * p * p);
    let (latents_mean, latents_std) =
        VaeConfig::official_latent_stats(z_dim).map_err(|e| invalid!("{origin}: {e}"))?;
    let cfg = VaeConfig {
        base_dim,
        // The decoder's last stage has decoder_base_dim · dim_mult[0] channels.
        decoder_base_dim: Some(decoder_out_dim / dim_mult[0]),
        z_dim,
        dim_mult,
        num_res_blocks,
        attn_scales: vec![],
        temperal_downsample: temporal,
        dropout: 0.0,
        latents_mean,
        latents_std,
        is_residual,
        in_channels,
        out_channels,
        patch_size,
        scale_factor_temporal: None,
        scale_factor_spatial: None,
    };
    cfg.validate()
        .map_err(|e| invalid!("{origin}: inferred VAE config is inconsistent: {e}"))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_keys_map_to_diffusers() {
        let l21 = KeyLayout::Official { num_res_blocks: 2 };
        let cases = [
            ("conv1.weight", "quant_conv.weight"),
            ("conv2.bias", "post_quant_conv.bias"),
            ("encoder.conv1.weight", "encoder.conv_in.weight"),
            ("decoder.head.0.gamma", "decoder.norm_out.gamma"),
            ("decoder.head.2.bias", "decoder.conv_out.bias"),
            (
                "encoder.middle.1.to_qkv.weight",
                "encoder.mid_block.attentions.0.to_qkv.weight",
            ),
            (
                "decoder.middle.2.residual.3.gamma",
                "decoder.mid_block.resnets.1.norm2.gamma",
            ),
            (
                "encoder.downsamples.5.time_conv.weight",
                "encoder.down_blocks.5.time_conv.weight",
            ),
            (
                "encoder.downsamples.3.shortcut.weight",
                "encoder.down_blocks.3.conv_shortcut.weight",
            ),
            (
                "decoder.upsamples.4.shortcut.bias",
                "decoder.up_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                "decoder.upsamples.11.resample.1.weight",
                "decoder.up_blocks.2.upsamplers.0.resample.1.weight",
            ),
            (
                "decoder.upsamples.14.residual.6.weight",
                "decoder.up_blocks.3.resnets.2.conv2.weight",
            ),
            // Wan2.2 nested names
            (
                "encoder.downsamples.1.downsamples.2.time_conv.bias",
                "encoder.down_blocks.1.downsampler.time_conv.bias",
            ),
            (
                "encoder.downsamples.0.downsamples.1.residual.2.weight",
                "encoder.down_blocks.0.resnets.1.conv1.weight",
            ),
            (
                "decoder.upsamples.2.upsamples.3.resample.1.bias",
                "decoder.up_blocks.2.upsampler.resample.1.bias",
            ),
            (
                "first_stage_model.decoder.conv1.bias",
                "decoder.conv_in.bias",
            ),
        ];
        for (official, diffusers) in cases {
            assert_eq!(normalize_key(official, l21), diffusers, "{official}");
        }
        // unknown keys pass through so that strict loading names them
        assert_eq!(
            normalize_key("decoder.bogus.weight", l21),
            "decoder.bogus.weight"
        );
    }
}
