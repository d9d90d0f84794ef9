//! DiT configuration: mirrors diffusers' `transformer/config.json` (`WanTransformer3DModel`), and
//! reads the official `config.json` (`WanModel`) or infers everything from tensor shapes.

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::invalid;
use crate::weights::WeightMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DitConfig {
    pub patch_size: [usize; 3],
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub text_dim: usize,
    pub freq_dim: usize,
    pub ffn_dim: usize,
    pub num_layers: usize,
    pub cross_attn_norm: bool,
    pub eps: f64,
    pub rope_max_seq_len: usize,
}

impl DitConfig {
    pub fn dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Wan2.2 TI2V-5B (dim 3072, 24 heads, 30 layers, ffn 14336, in/out 48).
    pub fn wan22_ti2v_5b() -> Self {
        Self::wan(24, 30, 14336, 48, 48)
    }
    /// Wan2.1/2.2 14B expert (dim 5120, 40 heads, 40 layers, ffn 13824); in 16 (T2V) or 36 (I2V).
    pub fn wan_14b(in_channels: usize) -> Self {
        Self::wan(40, 40, 13824, in_channels, 16)
    }
    /// Wan2.1 T2V-1.3B (dim 1536, 12 heads, 30 layers, ffn 8960).
    pub fn wan21_1_3b() -> Self {
        Self::wan(12, 30, 8960, 16, 16)
    }

    fn wan(heads: usize, layers: usize, ffn: usize, cin: usize, cout: usize) -> Self {
        Self {
            patch_size: [1, 2, 2],
            num_attention_heads: heads,
            attention_head_dim: 128,
            in_channels: cin,
            out_channels: cout,
            text_dim: 4096,
            freq_dim: 256,
            ffn_dim: ffn,
            num_layers: layers,
            cross_attn_norm: true,
            eps: 1e-6,
            rope_max_seq_len: 1024,
        }
    }

    /// Parses a diffusers or official `config.json`; unsupported variants are errors naming the field.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| invalid!("{origin}: not valid JSON: {e}"))?;
        let int = |key: &str| -> Result<Option<usize>> {
            match v.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| invalid!("{origin}: `{key}` must be a non-negative integer")),
            }
        };
        let eps = v.get("eps").and_then(|e| e.as_f64()).unwrap_or(1e-6);
        let patch = match v.get("patch_size") {
            Some(serde_json::Value::Array(a)) if a.len() == 3 => {
                let p: Vec<usize> = a
                    .iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as usize)
                    .collect();
                anyhow::ensure!(
                    p.len() == 3,
                    invalid!("{origin}: `patch_size` must be 3 integers")
                );
                [p[0], p[1], p[2]]
            }
            None => [1, 2, 2],
            Some(_) => return Err(invalid!("{origin}: `patch_size` must be 3 integers")),
        };
        for unsupported in ["image_dim", "added_kv_proj_dim", "pos_embed_seq_len"] {
            if !matches!(v.get(unsupported), None | Some(serde_json::Value::Null)) {
                return Err(invalid!(
                    "{origin}: `{unsupported}` is set: Wan2.1 I2V with a CLIP image branch is not supported (Wan2.2 I2V-A14B is)"
                ));
            }
        }
        if let Some(q) = v.get("qk_norm") {
            let ok = q.is_null() || q == "rms_norm_across_heads" || q == true;
            if !ok {
                return Err(invalid!(
                    "{origin}: `qk_norm` {q} is not supported (valid: \"rms_norm_across_heads\")"
                ));
            }
        }
        let cfg = if let Some(heads) = int("num_attention_heads")? {
            // diffusers WanTransformer3DModel
            let get = |k: &str, d: usize| -> Result<usize> { Ok(int(k)?.unwrap_or(d)) };
            let cin = get("in_channels", 16)?;
            Self {
                patch_size: patch,
                num_attention_heads: heads,
                attention_head_dim: get("attention_head_dim", 128)?,
                in_channels: cin,
                out_channels: int("out_channels")?.unwrap_or(cin),
                text_dim: get("text_dim", 4096)?,
                freq_dim: get("freq_dim", 256)?,
                ffn_dim: get("ffn_dim", 13824)?,
                num_layers: get("num_layers", 40)?,
                cross_attn_norm: v
                    .get("cross_attn_norm")
                    .and_then(|b| b.as_bool())
                    .unwrap_or(true),
                eps,
                rope_max_seq_len: get("rope_max_seq_len", 1024)?,
            }
        } else if let Some(dim) = int("dim")? {
            // official WanModel
            let heads =
                int("num_heads")?.ok_or_else(|| invalid!("{origin}: missing `num_heads`"))?;
            if dim % heads != 0 {
                return Err(invalid!(
                    "{origin}: `dim` {dim} is not divisible by `num_heads` {heads}"
                ));
            }
            let cin = int("in_dim")?.unwrap_or(16);
            Self {
                patch_size: patch,
                num_attention_heads: heads,
                attention_head_dim: dim / heads,
                in_channels: cin,
                out_channels: int("out_dim")?.unwrap_or(cin),
                text_dim: int("text_dim")?.unwrap_or(4096),
                freq_dim: int("freq_dim")?.unwrap_or(256),
                ffn_dim: int("ffn_dim")?.ok_or_else(|| invalid!("{origin}: missing `ffn_dim`"))?,
                num_layers: int("num_layers")?
                    .ok_or_else(|| invalid!("{origin}: missing `num_layers`"))?,
                cross_attn_norm: v
                    .get("cross_attn_norm")
                    .and_then(|b| b.as_bool())
                    .unwrap_or(true),
                eps,
                rope_max_seq_len: 1024,
            }
        } else {
            return Err(invalid!(
                "{origin}: neither a diffusers (`num_attention_heads`) nor an official (`dim`, `num_heads`) Wan transformer config"
            ));
        };
        cfg.validate(origin)?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Infers the config from canonical (diffusers-named) tensor shapes, for checkpoints shipped
    /// without a config (ComfyUI single files, GGUF). Head dim is 128 in every released Wan model.
    pub fn infer(wm: &WeightMap) -> Result<Self> {
        let shape = |k: &str| {
            wm.shape(k)
                .ok_or_else(|| invalid!("{}: cannot infer the DiT config: no `{k}`", wm.describe()))
        };
        let pe = shape("patch_embedding.weight")?;
        anyhow::ensure!(
            pe.len() == 5,
            invalid!(
                "{}: patch_embedding.weight must be 5-D, got {pe:?}",
                wm.describe()
            )
        );
        let dim = pe[0];
        let ffn = shape("blocks.0.ffn.net.0.proj.weight")?[0];
        let text_dim = shape("condition_embedder.text_embedder.linear_1.weight")?[1];
        let freq_dim = shape("condition_embedder.time_embedder.linear_1.weight")?[1];
        let out = shape("proj_out.weight")?[0];
        let patch = [pe[2], pe[3], pe[4]];
        let mut layers = 0;
        while wm.contains(&format!("blocks.{layers}.attn1.to_q.weight")) {
            layers += 1;
        }
        let head_dim = 128;
        anyhow::ensure!(
            dim % head_dim == 0,
            invalid!(
                "{}: dim {dim} is not a multiple of the Wan head dim 128",
                wm.describe()
            )
        );
        let cfg = Self {
            patch_size: patch,
            num_attention_heads: dim / head_dim,
            attention_head_dim: head_dim,
            in_channels: pe[1],
            out_channels: out / patch.iter().product::<usize>(),
            text_dim,
            freq_dim,
            ffn_dim: ffn,
            num_layers: layers,
            cross_attn_norm: wm.contains("blocks.0.norm2.weight"),
            eps: 1e-6,
            rope_max_seq_len: 1024,
        };
        cfg.validate(&wm.describe())?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<()> {
        if self.num_layers == 0 || self.num_attention_heads == 0 {
            return Err(invalid!(
                "{origin}: a transformer needs at least one layer and one head"
            ));
        }
        if !self.attention_head_dim.is_multiple_of(2) || self.attention_head_dim < 6 {
            return Err(invalid!(
                "{origin}: attention_head_dim {} must be even and ≥ 6 for the 3-axis RoPE",
                self.attention_head_dim
            ));
        }
        if !self.freq_dim.is_multiple_of(2) {
            return Err(invalid!(
                "{origin}: freq_dim {} must be even",
                self.freq_dim
            ));
        }
        Ok(())
    }
}
