//! The built-in `demo` model: a tiny Wan architecture (DiT with head dim 128 and the 3-axis RoPE,
//! Wan2.1-style VAE, UMT5 encoder, umT5-style tokenizer) with seeded random weights created in
//! memory. It runs the whole pipeline in seconds on a CPU with no download. Its output is
//! noise-like by nature: the weights are random.

use anyhow::Result;
use candle_core::{DType, Device};

use super::request::{ModelInfo, Task};
use crate::dit::{DitConfig, WanTransformer};
use crate::text::{TextEncoder, Tokenizer, Umt5Config};
use crate::vae::{VaeConfig, WanVae};
use crate::weights::{MemorySource, WeightMap};

/// Seeds of the demo weights (fixed: the demo is the same everywhere).
const DIT_SEED: u64 = 0xD17;
const VAE_SEED: u64 = 0x7AE;
const TEXT_SEED: u64 = 0x7E7;

pub const DEMO_NOTICE: &str = "model `demo` has random weights (a tiny Wan architecture built in \
memory, no download): its video is noise-like by design. For real videos pass --model DIR, a Wan \
model folder (e.g. Wan-AI/Wan2.2-TI2V-5B or a *-Diffusers repo).";

pub fn text_config() -> Umt5Config {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 256, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
        "num_heads": 4, "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu", "pad_token_id": 0, "eos_token_id": 1
    }))
    .expect("demo text config is valid")
}

pub fn dit_config() -> DitConfig {
    DitConfig {
        patch_size: [1, 2, 2],
        num_attention_heads: 1,
        attention_head_dim: 128,
        in_channels: 16,
        out_channels: 16,
        text_dim: text_config().d_model,
        freq_dim: 256,
        ffn_dim: 256,
        num_layers: 2,
        cross_attn_norm: true,
        eps: 1e-6,
        rope_max_seq_len: 1024,
    }
}

pub fn vae_config() -> VaeConfig {
    VaeConfig {
        base_dim: 8,
        ..VaeConfig::wan21()
    }
}

pub fn text_encoder(device: &Device, dtype: DType) -> Result<TextEncoder> {
    TextEncoder::random(text_config(), TEXT_SEED, device, dtype)
}

pub fn tokenizer() -> Result<Tokenizer> {
    Tokenizer::demo()
}

pub fn transformer(device: &Device, dtype: DType) -> Result<WanTransformer> {
    let cfg = dit_config();
    let tensors = crate::dit::random::random_weights(&cfg, DIT_SEED, device)?;
    let source = MemorySource::new("demo transformer (random weights)", tensors);
    WanTransformer::from_weights(cfg, &WeightMap::plain(Box::new(source), device, dtype)?)
}

pub fn vae(device: &Device, dtype: DType) -> Result<WanVae> {
    WanVae::random(vae_config(), VAE_SEED, device, dtype)
}

/// What the demo model can make: text or text+image (first frame) to video, any size that is a
/// multiple of 16 up to 512x512, 4k+1 frames up to 81, 16 fps.
pub fn info() -> ModelInfo {
    ModelInfo {
        name: "demo".into(),
        task: Task::Ti2v,
        sizes: vec![(256, 256), (320, 192), (192, 320)],
        free_size: true,
        size_multiple: 16,
        max_pixels: 512 * 512,
        fps: 16,
        default_frames: 17,
        min_frames: 1,
        max_frames: 81,
        frame_step: 4,
        default_steps: 8,
        max_steps: 100,
        default_guidance: 5.0,
        default_guidance_2: None,
        default_shift: 5.0,
        default_scheduler: "unipc".into(),
        default_negative_prompt: String::new(),
        max_prompt_chars: 2000,
    }
}
