//! The UMT5 encoder (`UMT5EncoderModel` in transformers; `T5Encoder` with `shared_pos=False` in the
//! official Wan code).
//!
//! Differences from T5 that make candle's T5 unusable here: every layer owns its relative-position
//! bias table (T5 shares layer 0's), and a padding mask is applied to the keys.
//!
//! Numerics: the residual stream, the RMS norms, the attention scores, softmax and attention-weighted
//! sum, and the feed-forward output projection `wo` run in f32 whatever the weight dtype; only the
//! projections q/k/v/o and wi run in the weight dtype. In f32 this is exactly transformers' math. In
//! bf16 it mirrors transformers (which keeps `wo` in f32, `_keep_in_fp32_modules = ["wo"]`, so its
//! residual stream is f32 too) while keeping scores unrounded, as torch's fused SDPA kernels do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::Linear;

use super::config::{Activation, Umt5Config};
use crate::invalid;
use crate::weights::{MemorySource, SafetensorsSource, TensorSource, WeightMap, WeightPath};

/// File name of the official encoder checkpoint in a Wan release folder.
pub const OFFICIAL_T5_FILE: &str = "models_t5_umt5-xxl-enc-bf16.pth";

/// Checkpoint key naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    /// transformers `UMT5EncoderModel` (diffusers `text_encoder/`): `encoder.block.N.layer.0...`.
    Hf,
    /// The official Wan `T5Encoder` state dict: `blocks.N.attn.q.weight`, ...
    Official,
}

/// Official key -> HF key (the canonical names), per wan-facts §6.1. `None` for unknown keys, which
/// then stay under their own name and are reported by the strict check.
pub fn official_to_hf_key(key: &str) -> Option<String> {
    match key {
        "token_embedding.weight" => return Some("shared.weight".into()),
        "norm.weight" => return Some("encoder.final_layer_norm.weight".into()),
        _ => {}
    }
    let rest = key.strip_prefix("blocks.")?;
    let (n, tail) = rest.split_once('.')?;
    n.parse::<usize>().ok()?;
    let hf_tail = match tail {
        "norm1.weight" => "layer.0.layer_norm.weight",
        "attn.q.weight" => "layer.0.SelfAttention.q.weight",
        "attn.k.weight" => "layer.0.SelfAttention.k.weight",
        "attn.v.weight" => "layer.0.SelfAttention.v.weight",
        "attn.o.weight" => "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight" => "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm2.weight" => "layer.1.layer_norm.weight",
        "ffn.gate.0.weight" => "layer.1.DenseReluDense.wi_0.weight",
        "ffn.fc1.weight" => "layer.1.DenseReluDense.wi_1.weight",
        "ffn.fc2.weight" => "layer.1.DenseReluDense.wo.weight",
        _ => return None,
    };
    Some(format!("encoder.block.{n}.{hf_tail}"))
}

fn detect_layout(keys: &[String]) -> KeyLayout {
    if keys
        .iter()
        .any(|k| k == "token_embedding.weight" || k.starts_with("blocks."))
    {
        KeyLayout::Official
    } else {
        KeyLayout::Hf
    }
}

/// Builds the canonical-name [`WeightMap`] for an encoder checkpoint in either layout.
///
/// HF checkpoints may store the tied `encoder.embed_tokens.weight` next to (or instead of)
/// `shared.weight`; one of them is the embedding and a duplicate is ignored.
pub fn encoder_weight_map(
    source: Box<dyn TensorSource>,
    device: &Device,
    dtype: DType,
) -> Result<WeightMap> {
    let keys = source.keys();
    let layout = detect_layout(&keys);
    let has_shared = keys.iter().any(|k| k == "shared.weight");
    let normalize = move |k: &str| -> Option<String> {
        match layout {
            KeyLayout::Official => Some(official_to_hf_key(k).unwrap_or_else(|| k.to_string())),
            KeyLayout::Hf if k == "encoder.embed_tokens.weight" => {
                if has_shared {
                    None
                } else {
                    Some("shared.weight".into())
                }
            }
            KeyLayout::Hf => Some(k.to_string()),
        }
    };
    WeightMap::new(source, normalize, device, dtype)
}

/// Infers the config from tensor shapes (for the official `.pth`, which ships no config, and for a
/// bare safetensors file). Values not visible in shapes take the umT5 values: max distance 128
/// (fixed in the official code), eps 1e-6, gated GELU (tanh).
pub fn infer_config(wm: &WeightMap) -> Result<Umt5Config> {
    let shape = |name: &str| {
        wm.shape(name).ok_or_else(|| {
            invalid!(
                "{}: missing weight `{name}`; this is not a UMT5 encoder checkpoint",
                wm.describe()
            )
        })
    };
    let emb = shape("shared.weight")?;
    let bias = shape("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")?;
    let q = shape("encoder.block.0.layer.0.SelfAttention.q.weight")?;
    let gated = wm.contains("encoder.block.0.layer.1.DenseReluDense.wi_0.weight");
    let wi = shape(if gated {
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight"
    } else {
        "encoder.block.0.layer.1.DenseReluDense.wi.weight"
    })?;
    let mut num_layers = 0;
    while wm.contains(&format!(
        "encoder.block.{num_layers}.layer.0.layer_norm.weight"
    )) {
        num_layers += 1;
    }
    let (num_buckets, num_heads) = (bias[0], bias[1]);
    if emb.len() != 2
        || bias.len() != 2
        || q.len() != 2
        || wi.len() != 2
        || !q[0].is_multiple_of(num_heads)
    {
        return Err(invalid!(
            "{}: tensor shapes are not those of a UMT5 encoder (embedding {emb:?}, position bias {bias:?}, q {q:?})",
            wm.describe()
        ));
    }
    let mut config = Umt5Config::umt5_xxl();
    config.vocab_size = emb[0];
    config.d_model = emb[1];
    config.num_heads = num_heads;
    config.d_kv = q[0] / num_heads;
    config.d_ff = wi[0];
    config.num_layers = num_layers;
    config.relative_attention_num_buckets = num_buckets;
    if !gated {
        config.feed_forward_proj = "gelu_new".into();
    }
    config.validate()?;
    Ok(config)
}

/// Relative-position bucket of every (query, key) pair for the bidirectional encoder, row-major
/// `[q_len * k_len]`.
pub fn relative_position_buckets(
    q_len: usize,
    k_len: usize,
    num_buckets: usize,
    max_distance: usize,
) -> Vec<u32> {
    let mut out = Vec::with_capacity(q_len * k_len);
    for i in 0..q_len as i64 {
        for j in 0..k_len as i64 {
            out.push(relative_position_bucket(j - i, num_buckets, max_distance));
        }
    }
    out
}

/// Bucket of `key - query` in a bidirectional encoder. Follows transformers'
/// `_relative_position_bucket` including its f32 rounding (the log ratio is computed in f32 and
/// truncated), so bucket borders land where torch puts them.
pub fn relative_position_bucket(rel: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = num_buckets / 2;
    let max_exact = half / 2;
    let base = if rel > 0 { half } else { 0 };
    let dist = rel.unsigned_abs() as usize;
    let bucket = if dist < max_exact {
        dist
    } else {
        let log_span = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
        let ratio = ((dist as f32) / (max_exact as f32)).ln() / log_span;
        let large = max_exact + (ratio * (half - max_exact) as f32) as usize;
        large.min(half - 1)
    };
    (base + bucket) as u32
}

/// T5 RMS norm without mean subtraction or bias, in f32.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(wp: &WeightPath, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: wp.get_as("weight", &[dim], DType::F32)?,
            eps,
        })
    }

    fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: self.weight.to_device(device)?,
            eps: self.eps,
        })
    }

    /// `x` is f32; the result is cast to `dtype`.
    fn forward(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        Ok(normed.broadcast_mul(&self.weight)?.to_dtype(dtype)?)
    }
}

struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// `[num_buckets, num_heads]`
    relative_attention_bias: Tensor,
    num_heads: usize,
    d_kv: usize,
}

impl SelfAttention {
    fn load(wp: &WeightPath, c: &Umt5Config) -> Result<Self> {
        let inner = c.inner_dim();
        let lin = |name: &str, shape: &[usize]| -> Result<Linear> {
            Ok(Linear::new(wp.pp(name).get("weight", shape)?, None))
        };
        Ok(Self {
            q: lin("q", &[inner, c.d_model])?,
            k: lin("k", &[inner, c.d_model])?,
            v: lin("v", &[inner, c.d_model])?,
            o: lin("o", &[c.d_model, inner])?,
            relative_attention_bias: wp
                .pp("relative_attention_bias")
                .get("weight", &[c.relative_attention_num_buckets, c.num_heads])?,
            num_heads: c.num_heads,
            d_kv: c.d_kv,
        })
    }

    fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            q: linear_to(&self.q, device)?,
            k: linear_to(&self.k, device)?,
            v: linear_to(&self.v, device)?,
            o: linear_to(&self.o, device)?,
            relative_attention_bias: self.relative_attention_bias.to_device(device)?,
            num_heads: self.num_heads,
            d_kv: self.d_kv,
        })
    }

    /// `[1, H, L, L]` f32 position bias from this layer's table.
    fn position_bias(&self, buckets: &Tensor, len: usize) -> Result<Tensor> {
        let b = self
            .relative_attention_bias
            .index_select(buckets, 0)?
            .to_dtype(DType::F32)?
            .reshape((len, len, self.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?;
        Ok(b)
    }

    /// `h`: normed input `[B, L, D]` in the weight dtype; `mask_bias`: `[B, 1, 1, L]` (0 or f32::MIN).
    fn forward(&self, h: &Tensor, buckets: &Tensor, mask_bias: &Tensor) -> Result<Tensor> {
        let (b, l, _) = h.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, l, self.num_heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()?
                .to_dtype(DType::F32)?)
        };
        let q = heads(self.q.forward(h)?)?;
        let k = heads(self.k.forward(h)?)?;
        let v = heads(self.v.forward(h)?)?;
        // UMT5 does not scale q·k by 1/sqrt(d_kv). Masked keys get f32::MIN, which absorbs the
        // score, exactly like transformers' `where(mask, bias, finfo.min)`.
        let bias = self.position_bias(buckets, l)?.broadcast_add(mask_bias)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(&bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, self.num_heads * self.d_kv))?
            .to_dtype(h.dtype())?;
        Ok(self.o.forward(&out)?.to_dtype(DType::F32)?)
    }
}

struct FeedForward {
    /// `wi_0` (gated) or `wi` (plain).
    wi: Linear,
    /// `wi_1`, the linear half of the gated unit.
    wi_linear: Option<Linear>,
    /// `[d_model, d_ff]`, applied in f32.
    wo: Tensor,
    act: Activation,
}

impl FeedForward {
    fn load(wp: &WeightPath, c: &Umt5Config) -> Result<Self> {
        let (gated, act) = c.feed_forward()?;
        let lin = |name: &str| -> Result<Linear> {
            Ok(Linear::new(
                wp.pp(name).get("weight", &[c.d_ff, c.d_model])?,
                None,
            ))
        };
        Ok(Self {
            wi: lin(if gated { "wi_0" } else { "wi" })?,
            wi_linear: if gated { Some(lin("wi_1")?) } else { None },
            wo: wp.pp("wo").get("weight", &[c.d_model, c.d_ff])?,
            act,
        })
    }

    fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            wi: linear_to(&self.wi, device)?,
            wi_linear: self
                .wi_linear
                .as_ref()
                .map(|l| linear_to(l, device))
                .transpose()?,
            wo: self.wo.to_device(device)?,
            act: self.act,
        })
    }

    fn forward(&self, h: &Tensor) -> Result<Tensor> {
        let a = self.wi.forward(h)?.to_dtype(DType::F32)?;
        let a = match self.act {
            Activation::GeluNew => a.gelu()?,
            Activation::Gelu => a.gelu_erf()?,
            Activation::Relu => a.relu()?,
            Activation::Silu => a.silu()?,
        };
        let hidden = match &self.wi_linear {
            Some(lin) => (a * lin.forward(h)?.to_dtype(DType::F32)?)?,
            None => a,
        };
        // transformers keeps `wo` in f32 (`_keep_in_fp32_modules`); the weight is upcast per call so
        // a bf16 model does not hold a second, f32 copy.
        let wo = self.wo.to_dtype(DType::F32)?;
        Ok(hidden.broadcast_matmul(&wo.t()?)?)
    }
}

/// A bias-free linear's copy on `device`.
fn linear_to(l: &Linear, device: &Device) -> Result<Linear> {
    Ok(Linear::new(l.weight().to_device(device)?, None))
}

struct Block {
    attn_norm: RmsNorm,
    attn: SelfAttention,
    ff_norm: RmsNorm,
    ff: FeedForward,
}

impl Block {
    fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            attn_norm: self.attn_norm.to_device(device)?,
            attn: self.attn.to_device(device)?,
            ff_norm: self.ff_norm.to_device(device)?,
            ff: self.ff.to_device(device)?,
        })
    }

    /// One pre-norm residual layer pair on the f32 residual stream `x`.
    fn forward(
        &self,
        x: Tensor,
        dtype: DType,
        buckets: &Tensor,
        mask_bias: &Tensor,
    ) -> Result<Tensor> {
        let h = self.attn_norm.forward(&x, dtype)?;
        let x = (x + self.attn.forward(&h, buckets, mask_bias)?)?;
        let h = self.ff_norm.forward(&x, dtype)?;
        Ok((&x + self.ff.forward(&h)?)?)
    }
}

/// A loaded UMT5 encoder. Dropping it frees its weights (stage discipline: load, encode, drop
/// before the diffusion transformer needs the memory).
pub struct TextEncoder {
    config: Umt5Config,
    /// `[vocab, d_model]` in the weight dtype.
    embed: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    /// Where the weights live.
    device: Device,
    /// Set by [`TextEncoder::streamed_to`]: the device the math runs on while the weights stay
    /// on `device` (the host). Each block is copied over when it runs and dropped after: the GPU
    /// holds one block instead of the whole encoder (UMT5-XXL: 0.4 GB instead of 11 GB), and the
    /// numbers equal a resident encoder's on that GPU, since the same kernels see the same
    /// weights. `None`: the math runs on `device`.
    stream_to: Option<Device>,
    dtype: DType,
}

impl TextEncoder {
    /// Builds the encoder from canonical (HF) names and checks that every tensor was used.
    pub fn from_weights(config: Umt5Config, wm: &WeightMap) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let embed = wm.get("shared.weight", &[c.vocab_size, c.d_model])?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let bp = wm.pp(format!("encoder.block.{i}"));
            let l0 = bp.pp("layer.0");
            let l1 = bp.pp("layer.1");
            blocks.push(Block {
                attn_norm: RmsNorm::load(&l0.pp("layer_norm"), c.d_model, c.layer_norm_epsilon)?,
                attn: SelfAttention::load(&l0.pp("SelfAttention"), c)?,
                ff_norm: RmsNorm::load(&l1.pp("layer_norm"), c.d_model, c.layer_norm_epsilon)?,
                ff: FeedForward::load(&l1.pp("DenseReluDense"), c)?,
            });
        }
        let final_norm = RmsNorm::load(
            &wm.pp("encoder.final_layer_norm"),
            c.d_model,
            c.layer_norm_epsilon,
        )?;
        wm.finish()?;
        Ok(Self {
            config,
            embed,
            blocks,
            final_norm,
            device: wm.device().clone(),
            stream_to: None,
            dtype: wm.dtype(),
        })
    }

    /// Loads an encoder from:
    /// - a diffusers `text_encoder/` folder (config.json + safetensors, sharded or not),
    /// - a diffusers pipeline root (its `text_encoder/` is used),
    /// - an official Wan folder holding `models_t5_umt5-xxl-enc-bf16.pth`, or that file itself,
    /// - a single safetensors file in either key layout (config.json next to it is used if present,
    ///   otherwise the config is inferred from shapes).
    pub fn load(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let (source, config_file) = open_checkpoint(path)?;
        let wm = encoder_weight_map(source, device, dtype)?;
        let config = match config_file {
            Some(f) => Umt5Config::from_file(&f)?,
            None => infer_config(&wm)?,
        };
        Self::from_weights(config, &wm)
            .with_context(|| format!("loading UMT5 encoder from {}", path.display()))
    }

    /// Seeded random weights with transformers' init scales (demo model, tests).
    pub fn random(config: Umt5Config, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        config.validate()?;
        let wm = encoder_weight_map(
            Box::new(random_source(
                &config,
                seed,
                &Device::Cpu,
                &Device::Cpu,
                DType::F32,
            )?),
            device,
            dtype,
        )?;
        Self::from_weights(config, &wm)
    }

    /// Random weights drawn on `device` by its own generator in `dtype` (same scales as
    /// [`Self::random`], other values): a full-size UMT5-XXL for benchmarks in seconds, where the
    /// seeded host generator would take minutes.
    pub fn random_on_device(
        config: Umt5Config,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::random_drawn_on(config, seed, device, dtype, device)
    }

    /// [`random_on_device`](Self::random_on_device) with the numbers drawn on `draw` (a GPU draws
    /// UMT5-XXL's 5.7 billion values in a second; the host generator takes minutes) and moved to
    /// `device` in slices of at most 64 Mi values, so `draw` never holds more than one slice.
    pub fn random_drawn_on(
        config: Umt5Config,
        seed: u64,
        device: &Device,
        dtype: DType,
        draw: &Device,
    ) -> Result<Self> {
        config.validate()?;
        if !draw.is_cpu() {
            // The CPU path draws from the seeded host generator instead (see random_source).
            draw.set_seed(seed)?;
        }
        let source = random_source(&config, seed, draw, device, dtype)?;
        let wm = encoder_weight_map(Box::new(source), device, dtype)?;
        Self::from_weights(config, &wm)
    }

    /// Runs the encoder on `compute` while its weights stay where they are, one block copied over
    /// at a time (see the `stream_to` field).
    pub fn streamed_to(mut self, compute: &Device) -> Self {
        self.stream_to = Some(compute.clone());
        self
    }

    pub fn config(&self) -> &Umt5Config {
        &self.config
    }

    /// Where the weights live (a streamed encoder computes elsewhere: [`Self::streamed_to`]).
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// `input_ids` `[B, L]` (integer), `attention_mask` `[B, L]` (nonzero = real token) or `None`
    /// for all ones. Returns `last_hidden_state` `[B, L, d_model]` in the weight dtype, for every
    /// position including padding, as `UMT5EncoderModel` does.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, l) = input_ids.dims2()?;
        let ids = self.checked_ids(input_ids)?;
        let compute = self.stream_to.as_ref().unwrap_or(&self.device);
        let mask_bias = match attention_mask {
            Some(m) => {
                if m.dims() != [b, l] {
                    return Err(invalid!(
                        "attention_mask: shape {:?} does not match input_ids {:?}",
                        m.dims(),
                        [b, l]
                    ));
                }
                let keep = m.to_device(&Device::Cpu)?.to_dtype(DType::I64)?.ne(0i64)?;
                let zeros = Tensor::zeros((b, l), DType::F32, &Device::Cpu)?;
                let mins = Tensor::full(f32::MIN, (b, l), &Device::Cpu)?;
                keep.where_cond(&zeros, &mins)?
            }
            None => Tensor::zeros((b, l), DType::F32, &Device::Cpu)?,
        }
        .reshape((b, 1, 1, l))?
        .to_device(compute)?;
        let c = &self.config;
        let buckets = Tensor::from_vec(
            relative_position_buckets(
                l,
                l,
                c.relative_attention_num_buckets,
                c.relative_attention_max_distance,
            ),
            l * l,
            compute,
        )?;

        // The lookup runs where the table is (a gather: the same values anywhere).
        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, c.d_model))?
            .to_device(compute)?
            .to_dtype(DType::F32)?;
        for block in &self.blocks {
            x = match &self.stream_to {
                Some(gpu) => block
                    .to_device(gpu)?
                    .forward(x, self.dtype, &buckets, &mask_bias)?,
                None => block.forward(x, self.dtype, &buckets, &mask_bias)?,
            };
        }
        self.final_norm.to_device(compute)?.forward(&x, self.dtype)
    }

    /// Ids as u32 on the model device, rejecting ids outside the vocabulary.
    fn checked_ids(&self, input_ids: &Tensor) -> Result<Tensor> {
        let ids = input_ids.to_device(&Device::Cpu)?.to_dtype(DType::I64)?;
        let flat: Vec<i64> = ids.flatten_all()?.to_vec1()?;
        let vocab = self.config.vocab_size as i64;
        if let Some(bad) = flat.iter().find(|&&i| i < 0 || i >= vocab) {
            return Err(invalid!(
                "input_ids: token id {bad} is outside the vocabulary 0..{vocab}"
            ));
        }
        let ids: Vec<u32> = flat.iter().map(|&i| i as u32).collect();
        Ok(Tensor::from_vec(ids, input_ids.dims(), &self.device)?)
    }
}

/// Finds the tensors (and config.json, if any) of an encoder checkpoint at `path`.
fn open_checkpoint(path: &Path) -> Result<(Box<dyn TensorSource>, Option<PathBuf>)> {
    if !path.exists() {
        return Err(invalid!("--model: {} does not exist", path.display()));
    }
    if path.is_dir() {
        let official = path.join(OFFICIAL_T5_FILE);
        if official.is_file() {
            return Ok((open_pth(&official)?, None));
        }
        let sub = path.join("text_encoder");
        if !path.join("config.json").is_file() && sub.is_dir() {
            return open_checkpoint(&sub);
        }
        let config = path.join("config.json");
        let source = SafetensorsSource::open(path).with_context(|| {
            format!(
                "{}: expected a diffusers text_encoder/ folder (config.json + safetensors) or an official folder with {OFFICIAL_T5_FILE}",
                path.display()
            )
        })?;
        return Ok((Box::new(source), config.is_file().then_some(config)));
    }
    let name = path.to_string_lossy().to_lowercase();
    if name.ends_with(".pth") || name.ends_with(".pt") || name.ends_with(".bin") {
        return Ok((open_pth(path)?, None));
    }
    let source = SafetensorsSource::open(path)?;
    let config = path
        .parent()
        .map(|p| p.join("config.json"))
        .filter(|c| c.is_file());
    Ok((Box::new(source), config))
}

fn open_pth(path: &Path) -> Result<Box<dyn TensorSource>> {
    Ok(Box::new(crate::weights::pth::PthSource::open(path)?))
}

/// Random weights under HF names, with transformers' `_init_weights` standard deviations.
/// Random encoder weights. On the CPU in f32 they come from the seeded host generator
/// (reproducible everywhere); elsewhere from the device's generator, in `dtype`.
fn random_source(
    c: &Umt5Config,
    seed: u64,
    draw: &Device,
    device: &Device,
    dtype: DType,
) -> Result<MemorySource> {
    let (gated, _) = c.feed_forward()?;
    let inner = c.inner_dim();
    let (dm, dff) = (c.d_model as f64, c.d_ff as f64);
    let mut specs: Vec<(String, Vec<usize>, f64)> = vec![
        ("shared.weight".into(), vec![c.vocab_size, c.d_model], 1.0),
        (
            "encoder.final_layer_norm.weight".into(),
            vec![c.d_model],
            0.0,
        ),
    ];
    for i in 0..c.num_layers {
        let p = format!("encoder.block.{i}.layer");
        let a = format!("{p}.0.SelfAttention");
        let f = format!("{p}.1.DenseReluDense");
        specs.push((format!("{p}.0.layer_norm.weight"), vec![c.d_model], 0.0));
        specs.push((format!("{p}.1.layer_norm.weight"), vec![c.d_model], 0.0));
        specs.push((
            format!("{a}.q.weight"),
            vec![inner, c.d_model],
            (dm * c.d_kv as f64).powf(-0.5),
        ));
        specs.push((
            format!("{a}.k.weight"),
            vec![inner, c.d_model],
            dm.powf(-0.5),
        ));
        specs.push((
            format!("{a}.v.weight"),
            vec![inner, c.d_model],
            dm.powf(-0.5),
        ));
        specs.push((
            format!("{a}.o.weight"),
            vec![c.d_model, inner],
            (inner as f64).powf(-0.5),
        ));
        specs.push((
            format!("{a}.relative_attention_bias.weight"),
            vec![c.relative_attention_num_buckets, c.num_heads],
            dm.powf(-0.5),
        ));
        let wi: &[&str] = if gated { &["wi_0", "wi_1"] } else { &["wi"] };
        for name in wi {
            specs.push((
                format!("{f}.{name}.weight"),
                vec![c.d_ff, c.d_model],
                dm.powf(-0.5),
            ));
        }
        specs.push((
            format!("{f}.wo.weight"),
            vec![c.d_model, c.d_ff],
            dff.powf(-0.5),
        ));
    }
    let mut tensors = HashMap::new();
    for (i, (name, shape, std)) in specs.into_iter().enumerate() {
        // std 0 marks norm weights, which start at one as in transformers.
        let t = if std == 0.0 {
            Tensor::ones(shape, dtype, device)?
        } else if draw.is_cpu() && dtype == DType::F32 {
            (crate::rng::gaussian_noise(seed.wrapping_add(i as u64), shape, device)? * std)?
        } else if draw.same_device(device) {
            Tensor::randn(0f32, std as f32, shape, device)?.to_dtype(dtype)?
        } else {
            const SLICE: usize = 64 << 20;
            let rows = shape[0];
            let per_row = shape[1..].iter().product::<usize>().max(1);
            let step = (SLICE / per_row).clamp(1, rows);
            let mut parts = Vec::new();
            for start in (0..rows).step_by(step) {
                let mut dims = shape.clone();
                dims[0] = step.min(rows - start);
                parts.push(
                    Tensor::randn(0f32, std as f32, dims, draw)?
                        .to_dtype(dtype)?
                        .to_device(device)?,
                );
            }
            Tensor::cat(&parts, 0)?
        };
        tensors.insert(name, t);
    }
    Ok(MemorySource::new(
        format!("random UMT5 weights (seed {seed})"),
        tensors,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_keys_map_to_hf() {
        assert_eq!(
            official_to_hf_key("token_embedding.weight").unwrap(),
            "shared.weight"
        );
        assert_eq!(
            official_to_hf_key("blocks.23.ffn.gate.0.weight").unwrap(),
            "encoder.block.23.layer.1.DenseReluDense.wi_0.weight"
        );
        assert_eq!(
            official_to_hf_key("blocks.3.pos_embedding.embedding.weight").unwrap(),
            "encoder.block.3.layer.0.SelfAttention.relative_attention_bias.weight"
        );
        assert!(official_to_hf_key("blocks.x.norm1.weight").is_none());
        assert!(official_to_hf_key("head.weight").is_none());
    }

    #[test]
    fn buckets_exact_near_and_log_far() {
        let b = relative_position_buckets(1, 300, 32, 128);
        // key after query: offset 16; exact below 8
        assert_eq!(&b[..9], &[0, 17, 18, 19, 20, 21, 22, 23, 24]);
        assert_eq!(b[299], 31);
        let b = relative_position_buckets(300, 1, 32, 128);
        assert_eq!(b[7], 7);
        assert_eq!(b[299], 15);
    }
}
