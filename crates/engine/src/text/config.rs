//! UMT5 encoder configuration, mirroring the Hugging Face `config.json` of `UMT5EncoderModel`.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::invalid;

/// The fields of HF `UMT5Config` that the encoder uses (unknown fields in the JSON are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Umt5Config {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::d_model")]
    pub d_model: usize,
    #[serde(default = "defaults::d_kv")]
    pub d_kv: usize,
    #[serde(default = "defaults::d_ff")]
    pub d_ff: usize,
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    #[serde(default = "defaults::num_heads")]
    pub num_heads: usize,
    #[serde(default = "defaults::num_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "defaults::max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "defaults::eps")]
    pub layer_norm_epsilon: f64,
    /// `gated-gelu` (UMT5, Wan), `relu`, `gated-silu`, ... as in HF: `[gated-]ACT`.
    #[serde(default = "defaults::feed_forward_proj")]
    pub feed_forward_proj: String,
}

mod defaults {
    // HF `UMT5Config` defaults, used only for fields a config.json leaves out.
    pub fn vocab_size() -> usize {
        250112
    }
    pub fn d_model() -> usize {
        512
    }
    pub fn d_kv() -> usize {
        64
    }
    pub fn d_ff() -> usize {
        1024
    }
    pub fn num_layers() -> usize {
        8
    }
    pub fn num_heads() -> usize {
        6
    }
    pub fn num_buckets() -> usize {
        32
    }
    pub fn max_distance() -> usize {
        128
    }
    pub fn eps() -> f64 {
        1e-6
    }
    pub fn feed_forward_proj() -> String {
        "gated-gelu".into()
    }
}

/// The feed-forward activation, resolved from `feed_forward_proj` the way HF does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// tanh approximation (`gelu_new`), what `gated-gelu` means in HF.
    GeluNew,
    /// exact erf GELU (`gelu`).
    Gelu,
    Relu,
    Silu,
}

impl Umt5Config {
    /// umT5-XXL as Wan uses it (official `umt5_xxl` in `wan/modules/t5.py`; HF text_encoder config).
    pub fn umt5_xxl() -> Self {
        Self {
            vocab_size: 256384,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
        }
    }

    /// Reads an HF `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| invalid!("{}: not a valid UMT5 config.json: {e}", path.display()))?;
        config
            .validate()
            .map_err(|e| invalid!("{}: {e}", path.display()))?;
        Ok(config)
    }

    /// Attention width `num_heads * d_kv` (equals `d_model` for UMT5-XXL but not in general).
    pub fn inner_dim(&self) -> usize {
        self.num_heads * self.d_kv
    }

    /// `(gated, activation)` from `feed_forward_proj`: `[gated-]relu|gelu|gelu_new|silu`.
    pub fn feed_forward(&self) -> Result<(bool, Activation)> {
        let proj = self.feed_forward_proj.as_str();
        let (gated, act) = match proj.split_once('-') {
            Some(("gated", act)) => (true, act),
            None => (false, proj),
            Some(_) => return Err(self.bad_ffn()),
        };
        // HF maps "gated-gelu" to the tanh approximation, while plain "gelu" stays exact.
        let act = match (gated, act) {
            (true, "gelu") | (_, "gelu_new") => Activation::GeluNew,
            (false, "gelu") => Activation::Gelu,
            (_, "relu") => Activation::Relu,
            (_, "silu") | (_, "swish") => Activation::Silu,
            _ => return Err(self.bad_ffn()),
        };
        Ok((gated, act))
    }

    fn bad_ffn(&self) -> anyhow::Error {
        invalid!(
            "feed_forward_proj: `{}` is not supported; valid: gated-gelu, gated-gelu_new, gated-relu, gated-silu, gelu, gelu_new, relu, silu",
            self.feed_forward_proj
        )
    }

    /// Checks that the sizes are usable.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_heads", self.num_heads),
        ] {
            if v == 0 {
                return Err(invalid!("{name}: must be at least 1"));
            }
        }
        // Bidirectional buckets: half per direction, half of those exact, and log-spaced ones need
        // max_distance > max_exact.
        let n = self.relative_attention_num_buckets;
        if n < 4 || !n.is_multiple_of(2) {
            return Err(invalid!(
                "relative_attention_num_buckets: {n} must be an even number >= 4"
            ));
        }
        if self.relative_attention_max_distance <= n / 4 {
            return Err(invalid!(
                "relative_attention_max_distance: {} must exceed relative_attention_num_buckets / 4 = {}",
                self.relative_attention_max_distance,
                n / 4
            ));
        }
        if self.layer_norm_epsilon.is_nan() || self.layer_norm_epsilon < 0.0 {
            return Err(invalid!("layer_norm_epsilon: must be >= 0"));
        }
        self.feed_forward()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hf_config_and_rejects_bad_ffn() {
        let json = r#"{"d_model": 4096, "num_layers": 24, "num_heads": 64, "d_kv": 64, "d_ff": 10240,
            "vocab_size": 256384, "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu",
            "dense_act_fn": "gelu_new", "layer_norm_epsilon": 1e-06, "pad_token_id": 0,
            "eos_token_id": [1], "model_type": "umt5"}"#;
        let c: Umt5Config = serde_json::from_str(json).unwrap();
        assert_eq!(c, Umt5Config::umt5_xxl());
        assert_eq!(c.feed_forward().unwrap(), (true, Activation::GeluNew));
        let mut bad = c.clone();
        bad.feed_forward_proj = "gated-tanh".into();
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("feed_forward_proj"));
        let mut plain = c;
        plain.feed_forward_proj = "gelu".into();
        assert_eq!(plain.feed_forward().unwrap(), (false, Activation::Gelu));
    }
}
