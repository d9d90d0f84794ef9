//! Memory planning: what each stage of a generation needs on the GPU and on the host, for a model
//! configuration, size, frame count and weight format, and the placement (offload mode) that fits a
//! budget. Weights are counted exactly from the real tensor shapes (a GGUF checkpoint: from its
//! tensor table, [`DitWeights::of_checkpoint`]); activations follow what OUR code
//! allocates (dit/model.rs: one stage's temporaries at a time, token-chunked FFN, fused attention),
//! with the coefficients named below. Measured on the H100 (`vidgen bench`, random weights, bf16):
//! see the closing notes of issue 8 for predicted vs measured.

use std::path::Path;

use anyhow::Result;

use crate::dit::flash::Kernel;
use crate::dit::DitConfig;
use crate::invalid;
use crate::presets::{self, ModelPreset, VaeKind};
use crate::text::{Umt5Config, TEXT_LEN};
use crate::vae::{VaeConfig, WanVae};
use crate::weights::GgufType;

pub const GIB: f64 = (1u64 << 30) as f64;

/// Weight storage of the transformer(s) on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Bf16,
    F32,
    /// Block linears in FP8 e4m3 with per-channel f32 scales, the rest bf16 (bf16 compute).
    Fp8,
    /// Block linears kept in a GGUF block encoding (as a GGUF checkpoint stores them, dequantised
    /// block by block), the rest bf16 (bf16 compute).
    Gguf(GgufType),
}

impl WeightFormat {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "bf16" => Ok(Self::Bf16),
            "f32" => Ok(Self::F32),
            "fp8" => Ok(Self::Fp8),
            other => GgufType::quantized_from_name(other)
                .map(Self::Gguf)
                .ok_or_else(|| {
                    let gguf: Vec<&str> = GgufType::QUANTIZED.iter().map(|t| t.name()).collect();
                    invalid!(
                        "--weights: `{other}` is not one of bf16, f32, fp8, {} (the GGUF block \
                         formats: the transformer's block linears stay quantised on the GPU, as \
                         a GGUF file of that type stores them)",
                        gguf.join(", ")
                    )
                }),
        }
    }

    /// The `--weights` spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::F32 => "f32",
            Self::Fp8 => "fp8",
            Self::Gguf(t) => t.name(),
        }
    }

    /// Bytes of an activation (and of a dense weight) element.
    fn bytes(self) -> u64 {
        match self {
            Self::Bf16 | Self::Fp8 | Self::Gguf(_) => 2,
            Self::F32 => 4,
        }
    }
}

/// `--vae-dtype auto|bf16|f32` -> whether the VAE runs in bf16. `auto` is bf16 on a GPU and f32 on
/// the CPU (where bf16 convolutions are slow and save nothing that matters).
pub fn vae_bf16(flag: &str, value: &str, on_gpu: bool) -> Result<bool> {
    match value {
        "auto" => Ok(on_gpu),
        "f32" => Ok(false),
        "bf16" if on_gpu => Ok(true),
        "bf16" => Err(invalid!(
            "{flag}: bf16 runs on a GPU only; on the CPU the VAE runs in f32 (use auto or f32)"
        )),
        other => Err(invalid!("{flag}: `{other}` is not one of auto, bf16, f32")),
    }
}

/// Where components live (`--offload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offload {
    /// Every component resident for the whole job.
    None,
    /// The text encoder leaves the GPU after encoding (the VAE is loaded only for decode).
    Cond,
    /// Also only one A14B expert on the GPU at a time (swapped at the boundary).
    CondDiffusion,
    /// Also the VAE decodes in tiles.
    Aggressive,
    /// Also transformer blocks streamed from host memory with `resident_blocks` kept on the GPU.
    Stream,
}

impl Offload {
    pub const NAMES: [&'static str; 6] = [
        "none",
        "cond",
        "cond-diffusion",
        "aggressive",
        "stream",
        "auto",
    ];

    /// `None` for `auto` (the planner chooses).
    pub fn parse(s: &str) -> Result<Option<Self>> {
        Ok(Some(match s {
            "none" => Self::None,
            "cond" => Self::Cond,
            "cond-diffusion" => Self::CondDiffusion,
            "aggressive" => Self::Aggressive,
            "stream" => Self::Stream,
            "auto" => return Ok(None),
            other => {
                return Err(invalid!(
                    "--offload: `{other}` is not one of {}",
                    Self::NAMES.join(", ")
                ))
            }
        }))
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Cond => "cond",
            Self::CondDiffusion => "cond-diffusion",
            Self::Aggressive => "aggressive",
            Self::Stream => "stream",
        }
    }

    /// From the weakest (fastest) to the strongest (least memory).
    pub const LADDER: [Offload; 5] = [
        Self::None,
        Self::Cond,
        Self::CondDiffusion,
        Self::Aggressive,
        Self::Stream,
    ];
}

/// Activation coefficients (bytes are model-dtype elements unless said otherwise).
pub mod coeff {
    /// Live [tokens, dim] buffers at the DiT's peak (self-attention: the residual stream, q, k, v
    /// and the attention output) besides one hidden state per CFG pass.
    pub const DIT_TOKEN_BUFFERS: f64 = 4.0;
    /// FP8 attention (`VIDGEN_ATTENTION=cudnn_fp8`): bytes per [tokens, dim] value alive beside
    /// the bf16 buffers while it runs: e4m3 copies of q, k and v and the e4m3 output, one byte
    /// each, until the output is dequantised.
    pub const DIT_FP8_ATTENTION_BYTES: f64 = 4.0;
    /// Fixed workspace (cuBLAS, RoPE tables, latents, scheduler state), bytes.
    pub const DIT_FIXED: f64 = 64.0 * 1024.0 * 1024.0;
    /// UMT5 self-attention buffers of [heads, tokens, tokens] f32 alive at once: the position
    /// bias (with the padding mask added), the scores and the probabilities.
    pub const TEXT_SCORE_BUFFERS: f64 = 3.0;
    /// VAE decode working set per chunk, in multiples of the finest level's chunk tensor
    /// (decoder base channels x 4 frames x H x W): channels-last convolution copies, causal
    /// caches and cuDNN workspace. Calibrated on the H100, bf16, whole-frame decode with
    /// whole-chunk passes (`vidgen bench --what vae`): 832x480x81 through Wan2.1, 5.78 GiB
    /// measured (24, from an older convolution path, predicted 7.27); 1280x704x121 through
    /// Wan2.2, 12.19 GiB measured (31 predicted 15.24).
    pub const VAE21_CHUNK_FACTOR: f64 = 18.8;
    pub const VAE22_CHUNK_FACTOR: f64 = 23.9;
    /// The same for one tile of a tiled decode (the area is the largest tile
    /// `TileConfig::decoded_tile` lays), with 2-frame passes (`_PASSES`) or whole chunks
    /// (`_WHOLE`). Fitted on the H100 (bf16, `vidgen bench --what vae --vae-tiles ...
    /// --vae-pass-frames 0,1,2`), where the peak is the weights, a fixed part and a per-pixel
    /// part, linear in the tile's area to within 0.2% (three tile sizes each): Wan2.1 at
    /// 832x480x81 with 2-frame passes 8.76 kB per output pixel (0.98 / 1.26 / 2.02 GiB for
    /// 272x320 / 272x448 / 480x448 px tiles; whole chunks 15.7 kB, 1-frame passes 7.4 kB);
    /// Wan2.2 at 1280x704x121 with whole chunks 12.8 kB (3.60 / 7.05 GiB for 384x480 / 704x672
    /// px tiles, 2.00 GiB for 224x240 in an earlier call) and with 2-frame passes 7.34 kB (2.65 /
    /// 4.62 GiB for 384x480 / 704x672). One-frame passes are counted as two-frame ones (a little
    /// over).
    pub const VAE21_TILE_FACTOR_PASSES: f64 = 11.41;
    pub const VAE21_TILE_FACTOR_WHOLE: f64 = 20.44;
    pub const VAE22_TILE_FACTOR_PASSES: f64 = 14.33;
    pub const VAE22_TILE_FACTOR_WHOLE: f64 = 25.07;
    /// The fixed part of a tiled decode's peak besides the weights (cuDNN workspaces, the tile's
    /// latents, blend buffers), in 2-byte values: the same fits' intercepts less the bf16
    /// weights (Wan2.1 0.270 - 0.236 GiB, Wan2.2 1.398 - 1.313 GiB).
    pub const VAE21_TILE_FIXED: f64 = 0.0338 * super::GIB / 2.0;
    pub const VAE22_TILE_FIXED: f64 = 0.0855 * super::GIB / 2.0;
}

/// What a plan is made for.
#[derive(Debug, Clone)]
pub struct PlanRequest {
    pub preset: &'static ModelPreset,
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    pub weights: WeightFormat,
    /// Both CFG passes (guidance > 1).
    pub cfg: bool,
    pub vram_budget: Option<u64>,
    pub host_budget: Option<u64>,
    pub offload: Option<Offload>,
    /// Blocks uploaded ahead when streaming.
    pub prefetch: usize,
    /// The transformer's weights measured from its checkpoint (a GGUF file, whose block types
    /// may be mixed; see [`DitWeights::of_layout`]); `None`: computed from the preset's shapes
    /// stored as `weights`.
    pub dit_weights: Option<DitWeights>,
    /// The VAE runs in bf16 (GPU default) rather than f32.
    pub vae_bf16: bool,
    /// Tokens of the longest prompt the text encoder runs on (it runs on each prompt's own
    /// tokens, not the padded 512); [`TEXT_LEN`] when the prompts are not known.
    pub text_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StagePlan {
    pub stage: String,
    pub weights_gpu: u64,
    pub weights_host: u64,
    pub activations: u64,
    pub gpu_peak: u64,
    pub placement: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub offload: Offload,
    pub resident_blocks: Option<usize>,
    pub stages: Vec<StagePlan>,
    pub gpu_peak: u64,
    pub host_peak: u64,
    pub fits: bool,
    /// Where the text encoder runs.
    pub text: TextPlacement,
    /// Whole frames or spatial tiles, and which tiles.
    pub vae_decode: VaeDecode,
}

/// Where the text encoder runs during its stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPlacement {
    /// Whole on the run's device (bf16 on a GPU).
    Resident,
    /// Weights on the host in bf16, one block at a time copied to the GPU and run there: the same
    /// numbers as `Resident`, at one block's memory (UMT5-XXL: 0.4 GB + its f32 `wo`).
    Streamed,
    /// On the CPU in f32: when even one block does not fit the GPU budget.
    Cpu,
}

/// Exact weight bytes of one transformer (expert) from its shapes.
pub fn dit_config(preset: &ModelPreset) -> DitConfig {
    let d = &preset.dit;
    match d.dim {
        5120 => DitConfig::wan_14b(d.in_channels),
        3072 => DitConfig::wan22_ti2v_5b(),
        _ => DitConfig::wan21_1_3b(),
    }
}

fn params(shapes: &[(String, Vec<usize>)]) -> u64 {
    shapes
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum()
}

/// A transformer block's linear weight (`blocks.N.attn1.to_q.weight`, `...ffn.net.2.weight`): what
/// FP8 stores in one byte per value.
pub fn is_block_linear(name: &str, shape: &[usize]) -> bool {
    name.starts_with("blocks.")
        && name.ends_with(".weight")
        && shape.len() == 2
        && (name.contains(".attn") || name.contains(".ffn."))
}

/// Bytes of a dense tensor of `shape` stored the way `format` stores `name`.
fn stored_bytes(name: &str, shape: &[usize], format: WeightFormat) -> u64 {
    let n = shape.iter().product::<usize>() as u64;
    match format {
        // One f32 scale per output channel beside the FP8 values.
        WeightFormat::Fp8 if is_block_linear(name, shape) => n + 4 * shape[0] as u64,
        // Whole blocks per row (every Wan row length is a multiple of 256).
        WeightFormat::Gguf(ty) if is_block_linear(name, shape) => {
            let (block_elems, block_bytes) = ty.block();
            let cols = *shape.last().unwrap_or(&1);
            (n / cols as u64) * cols.div_ceil(block_elems) as u64 * block_bytes as u64
        }
        _ => n * format.bytes(),
    }
}

/// Bytes of one transformer's weights and of one of its blocks, stored as `format`.
pub fn dit_weight_bytes(cfg: &DitConfig, format: WeightFormat) -> (u64, u64) {
    let shapes = crate::dit::model::weight_shapes(cfg);
    let total = shapes.iter().map(|(n, s)| stored_bytes(n, s, format)).sum();
    let block = shapes
        .iter()
        .filter(|(n, _)| n.starts_with("blocks.0."))
        .map(|(n, s)| stored_bytes(n, s, format))
        .sum();
    (total, block)
}

/// How a block linear is dequantised for use (the device memory it takes meanwhile).
#[derive(Clone, Copy, PartialEq)]
enum Dequant {
    /// Our FP8 kernel writes the activation dtype directly.
    Fp8,
    /// candle's GGML kernels write f32, which is then cast to the activation dtype.
    Gguf,
}

/// Peak transient memory of per-use dequantisation (see `dit::model`): the block's two FFN
/// weights are held in the activation dtype (`elem` bytes) across its token chunks, the second
/// made while the first is held; a GGUF weight also has its f32 copy alive until the cast (none
/// when the activations are f32). `linears`: elements of every per-use-dequantised block linear.
fn dequantize_workspace(linears: &[(u64, Dequant)], elem: u64) -> u64 {
    let mut sorted = linears.to_vec();
    sorted.sort_by_key(|&(n, _)| std::cmp::Reverse(n));
    let pair: u64 = sorted.iter().take(2).map(|&(n, _)| n * elem).sum();
    let f32_copy = sorted
        .iter()
        .find(|&&(_, kind)| kind == Dequant::Gguf)
        .filter(|_| elem != 4)
        .map_or(0, |&(n, _)| 4 * n);
    pair + f32_copy
}

/// One transformer's weight bytes as this engine holds them on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DitWeights {
    /// Every tensor.
    pub total: u64,
    /// The largest transformer block (streaming moves whole blocks).
    pub largest_block: u64,
    /// Everything outside the blocks (stays on the device when streaming).
    pub non_block: u64,
    /// Transient memory of per-use dequantisation at the DiT's peak (FP8, GGUF; 0 for dense).
    pub dequantize_workspace: u64,
}

impl DitWeights {
    /// From the configuration's shapes, stored as `format`.
    pub fn of_config(cfg: &DitConfig, format: WeightFormat) -> Self {
        let (total, block) = dit_weight_bytes(cfg, format);
        let kind = match format {
            WeightFormat::Fp8 => Some(Dequant::Fp8),
            WeightFormat::Gguf(_) => Some(Dequant::Gguf),
            WeightFormat::Bf16 | WeightFormat::F32 => None,
        };
        let linears: Vec<(u64, Dequant)> = kind
            .map(|kind| {
                crate::dit::model::weight_shapes(cfg)
                    .iter()
                    .filter(|(n, s)| n.starts_with("blocks.0.") && is_block_linear(n, s))
                    .map(|(_, s)| (s.iter().product::<usize>() as u64, kind))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            total,
            largest_block: block,
            non_block: total - block * cfg.num_layers as u64,
            dequantize_workspace: dequantize_workspace(&linears, format.bytes()),
        }
    }

    /// Measured from a GGUF checkpoint's tensor table: block linears stored block-quantised at
    /// their stored size (the loader keeps them so), every other tensor as `format` stores it
    /// (dense in the compute dtype, or FP8 for a dense block linear with `fp8`). `None` for other
    /// formats, whose bytes follow from the shapes ([`of_config`](Self::of_config)).
    pub fn of_checkpoint(path: &Path, format: WeightFormat) -> Result<Option<Self>> {
        let is_gguf = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        if !is_gguf || !path.is_file() {
            return Ok(None);
        }
        use crate::weights::TensorSource;
        let source = crate::weights::gguf::GgufSource::open(path)?;
        let keys = source.keys();
        let layout = crate::dit::keys::detect_layout(&keys);
        // A dense tensor is held in the compute dtype whatever the file stores.
        let dense = match format {
            WeightFormat::Gguf(_) => WeightFormat::Bf16,
            other => other,
        };
        let mut total = 0u64;
        let mut blocks: std::collections::BTreeMap<usize, u64> = Default::default();
        let mut linears = Vec::new();
        for key in &keys {
            let name = crate::dit::keys::canonical_name(key, layout);
            let info = source
                .tensor_info(key)
                .expect("keys come from the tensor table");
            let shape = &info.shape;
            let quantized = info.ggml_type.is_quantized() && is_block_linear(&name, shape);
            let bytes = if quantized {
                info.data_len() as u64
            } else {
                stored_bytes(&name, shape, dense)
            };
            let n = shape.iter().product::<usize>() as u64;
            if quantized {
                linears.push((n, Dequant::Gguf));
            } else if dense == WeightFormat::Fp8 && is_block_linear(&name, shape) {
                linears.push((n, Dequant::Fp8));
            }
            total += bytes;
            let block = name
                .strip_prefix("blocks.")
                .and_then(|rest| rest.split('.').next())
                .and_then(|i| i.parse::<usize>().ok());
            if let Some(i) = block {
                *blocks.entry(i).or_default() += bytes;
            }
        }
        let in_blocks: u64 = blocks.values().sum();
        Ok(Some(Self {
            total,
            largest_block: blocks.values().copied().max().unwrap_or(0),
            non_block: total - in_blocks,
            dequantize_workspace: dequantize_workspace(&linears, dense.bytes()),
        }))
    }

    /// The weights of a model folder's transformer(s) when a checkpoint is a GGUF file (measured;
    /// the larger of two experts, each expert counted at that size), `None` when every
    /// checkpoint's bytes follow from `cfg`'s shapes.
    pub fn of_layout(
        dit: &Path,
        dit_2: Option<&Path>,
        cfg: &DitConfig,
        format: WeightFormat,
    ) -> Result<Option<Self>> {
        let first = Self::of_checkpoint(dit, format)?;
        let second = match dit_2 {
            Some(p) => Self::of_checkpoint(p, format)?,
            None => None,
        };
        if first.is_none() && second.is_none() {
            return Ok(None);
        }
        let computed = Self::of_config(cfg, format);
        let a = first.unwrap_or(computed);
        let b = if dit_2.is_some() {
            second.unwrap_or(computed)
        } else {
            a
        };
        Ok(Some(Self {
            total: a.total.max(b.total),
            largest_block: a.largest_block.max(b.largest_block),
            non_block: a.non_block.max(b.non_block),
            dequantize_workspace: a.dequantize_workspace.max(b.dequantize_workspace),
        }))
    }
}

pub fn dit_params(cfg: &DitConfig) -> u64 {
    params(&crate::dit::model::weight_shapes(cfg))
}

/// Parameters of one transformer block (all alike).
pub fn dit_block_params(cfg: &DitConfig) -> u64 {
    let shapes = crate::dit::model::weight_shapes(cfg);
    params(
        &shapes
            .into_iter()
            .filter(|(n, _)| n.starts_with("blocks.0."))
            .collect::<Vec<_>>(),
    )
}

/// UMT5-XXL encoder parameters (embedding, per layer attention + gated FFN + relative bias + norms).
pub fn text_params(c: &Umt5Config) -> u64 {
    let d = c.d_model as u64;
    c.vocab_size as u64 * d + c.num_layers as u64 * text_layer_params(c) + d
}

/// Parameters of one encoder block: attention, gated feed-forward, two norms, position bias.
fn text_layer_params(c: &Umt5Config) -> u64 {
    let inner = (c.num_heads * c.d_kv) as u64;
    let (d, ff) = (c.d_model as u64, c.d_ff as u64);
    4 * d * inner + 3 * d * ff + 2 * d + (c.relative_attention_num_buckets * c.num_heads) as u64
}

/// Peak working set of one bf16 UMT5 encode on the GPU over `tokens` positions, besides the
/// weights: the larger of a block's two halves, which never overlap.
/// - Self-attention: the f32 residual stream, the normed bf16 input and f32 q, k, v per token,
///   plus the [heads, tokens, tokens] f32 buffers (quadratic in the prompt length).
/// - Feed-forward at its output projection: the residual, the normed input, three f32
///   [tokens, d_ff] buffers (pre-activation, activation, gated product) and the f32 output per
///   token, plus the f32 copy of `wo` made per call (it runs in f32, as in transformers).
pub fn text_activations(c: &Umt5Config, tokens: usize) -> u64 {
    let t = tokens.min(TEXT_LEN) as u64;
    let (d, ff, inner) = (
        c.d_model as u64,
        c.d_ff as u64,
        (c.num_heads * c.d_kv) as u64,
    );
    let scores = coeff::TEXT_SCORE_BUFFERS as u64 * c.num_heads as u64 * t * t * 4;
    let attention = t * (4 * d + 2 * d + 3 * 4 * inner) + scores;
    let feed_forward = t * (4 * d + 2 * d + 3 * 4 * ff + 4 * d) + 4 * d * ff;
    attention.max(feed_forward)
}

/// GPU bytes of one streamed encoder block in bf16 (the f32 `wo` copy its feed-forward makes
/// is in [`text_activations`]).
pub fn text_block_bytes(c: &Umt5Config) -> u64 {
    2 * text_layer_params(c)
}

/// The VAE architecture of a preset.
pub fn vae_config(kind: VaeKind) -> VaeConfig {
    match kind {
        VaeKind::Wan21 => VaeConfig::wan21(),
        VaeKind::Wan22 => VaeConfig::wan22(),
    }
}

/// Tokens of the transformer for a size and frame count.
pub fn dit_tokens(p: &ModelPreset, width: usize, height: usize, frames: usize) -> usize {
    let [st, sh, sw] = p.vae_stride;
    let [pt, ph, pw] = p.dit.patch_size;
    let f = (frames - 1) / st + 1;
    (f / pt) * (height / sh / ph) * (width / sw / pw)
}

/// DiT activation peak for `passes` CFG passes (see [`coeff`]). TI2V's per-token timesteps add
/// nothing: the model keeps one modulation entry per latent frame, not per token.
pub fn dit_activations(p: &ModelPreset, tokens: usize, passes: usize, elem: u64) -> u64 {
    let d = p.dit.dim as f64;
    let l = tokens as f64;
    let b = elem as f64;
    let hidden = passes as f64 * l * d * b;
    let temporaries = coeff::DIT_TOKEN_BUFFERS * l * d * b;
    let fp8_attention = if crate::dit::flash::preferred().ok() == Some(Kernel::CudnnFp8) {
        coeff::DIT_FP8_ATTENTION_BYTES * l * d
    } else {
        0.0
    };
    // cross-attention K/V of every block, per pass (text length 512)
    let context = p.dit.num_layers as f64 * context_kv_per_block(p, passes, elem) as f64;
    (hidden + temporaries + fp8_attention + context + coeff::DIT_FIXED) as u64
}

/// Cross-attention keys and values of one block for `passes` CFG passes (512 text tokens).
pub fn context_kv_per_block(p: &ModelPreset, passes: usize, elem: u64) -> u64 {
    (passes * 2 * 512 * p.dit.dim) as u64 * elem
}

/// VAE decode working set (`elem`-byte values) for the whole frame or one tile, plus the decoded video when it
/// stays on the GPU (plain decode).
pub fn vae_decode_activations(
    cfg: &VaeConfig,
    width: usize,
    height: usize,
    frames: usize,
    decode: VaeDecode,
    elem: u64,
) -> u64 {
    let base = cfg.decoder_base_dim.unwrap_or(cfg.base_dim) as f64;
    let tiled = decode.is_tiled();
    let area = match decode {
        VaeDecode::Tiled(t) => {
            let (th, tw) = t
                .tiles
                .decoded_tile(width, height, cfg.spatial_stride())
                .expect("the planner's tile sizes are multiples of 32: they suit every Wan VAE stride (8, 16)");
            (th * tw) as f64
        }
        VaeDecode::WholeFrames => (width * height) as f64,
    };
    // A patchified VAE (Wan2.2, patch 2) decodes its finest level at 1/patch of the resolution.
    let area = area / (cfg.patch() * cfg.patch()) as f64;
    // Counted in values, then bytes: a dtype twice as wide needs exactly twice the memory.
    let chunk = base * 4.0 * area;
    let video = if tiled {
        0.0
    } else {
        3.0 * (frames * width * height) as f64
    };
    // Passes of one or two frames through the full-resolution levels (of a chunk's four).
    let passes = matches!(decode, VaeDecode::Tiled(t) if (1..=2).contains(&t.pass_frames));
    let (factor, fixed) = match (cfg.is_residual, tiled, passes) {
        (true, false, _) => (coeff::VAE22_CHUNK_FACTOR, 0.0),
        (false, false, _) => (coeff::VAE21_CHUNK_FACTOR, 0.0),
        (true, true, true) => (coeff::VAE22_TILE_FACTOR_PASSES, coeff::VAE22_TILE_FIXED),
        (true, true, false) => (coeff::VAE22_TILE_FACTOR_WHOLE, coeff::VAE22_TILE_FIXED),
        (false, true, true) => (coeff::VAE21_TILE_FACTOR_PASSES, coeff::VAE21_TILE_FIXED),
        (false, true, false) => (coeff::VAE21_TILE_FACTOR_WHOLE, coeff::VAE21_TILE_FIXED),
    };
    (factor * chunk + fixed + video) as u64 * elem
}

/// How the pipeline decodes in tiles: the geometry and the frames per pass through the
/// decoder's full-resolution levels (`WanVae::decode_tiled_passes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TiledDecode {
    pub tiles: crate::vae::TileConfig,
    pub pass_frames: usize,
}

impl TiledDecode {
    /// For a plan's table: "tiled 384 px (64 px overlap), 2-frame passes".
    pub fn describe(&self) -> String {
        let passes = match self.pass_frames {
            0 => String::new(),
            n => format!(", {n}-frame passes"),
        };
        format!(
            "tiled {} px ({} px overlap){passes}",
            self.tiles.describe_size(),
            self.tiles.tile_overlap
        )
    }
}

/// How the VAE decodes a video.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeDecode {
    /// The reference computation, and the fastest.
    WholeFrames,
    Tiled(TiledDecode),
}

impl VaeDecode {
    pub fn is_tiled(&self) -> bool {
        matches!(self, Self::Tiled(_))
    }

    /// For a plan's table: "whole frames" or [`TiledDecode::describe`].
    pub fn describe(&self) -> String {
        match self {
            Self::WholeFrames => "whole frames".into(),
            Self::Tiled(t) => t.describe(),
        }
    }
}

/// Tile sizes (px, 64 px overlap) the planner tries for a tiled decode, largest first: larger
/// tiles overlap less and decode faster, and need more memory, linearly in the tile's area.
/// Multiples of 32 px (every Wan VAE's stride divides them). 672 px is the 2x2 layout of
/// 1280x704 (384x672 tiles), between 704's 1x2 and 640's 2x3.
pub const TILE_LADDER: [usize; 9] = [704, 672, 640, 576, 512, 448, 384, 320, 256];

/// Frames per pass through the full-resolution levels the planner tries for each tile size:
/// whole chunks (0), then 2-frame passes. Measured on the H100 (bf16, Wan2.2 at 1280x704x121):
/// 2-frame passes cut a 704x672 tile's peak from 7.04 to 4.62 GiB for 2% more time (5.58 ->
/// 5.69 s), while 640 px tiles (384x480) with whole chunks take 13% more (6.32 s at 3.59 GiB).
pub const LADDER_PASS_FRAMES: [usize; 2] = [0, 2];

/// A video this tall (673 to 704 px, e.g. 1280x704) needs two rows of 672 px tiles but fits one
/// row of 704 px strips: 480x704 strips with 2-frame passes sit between 672 px tiles with whole
/// chunks and with 2-frame passes in memory, and beat the latter in time. Measured on the H100
/// (bf16, Wan2.2 at 1280x704x121, one call): 6.17 s at 3.69 GiB, against 6.40 s at 3.15 GiB for
/// 672 px tiles with 2-frame passes and 6.31 s at 11.89 GiB for diffusers' whole-frame decode
/// (672 px tiles with whole chunks: 6.09 s at 4.47 GiB in an earlier call).
const STRIP: crate::vae::TileConfig = crate::vae::TileConfig {
    tile_size: 704,
    tile_overlap: 64,
    tile_width: Some(480),
};

/// The tiled decodes the planner tries for a video `height` px tall, in its order of preference:
/// [`TILE_LADDER`] × [`LADDER_PASS_FRAMES`] (`overlap` px between tiles), with [`STRIP`] and
/// 2-frame passes before 672 px tiles with 2-frame passes where the video is 673 to 704 px tall.
pub fn tile_ladder(height: usize, overlap: usize) -> Vec<TiledDecode> {
    let mut ladder = Vec::new();
    for tile_size in TILE_LADDER {
        for pass_frames in LADDER_PASS_FRAMES {
            if (tile_size, pass_frames) == (672, 2) && (673..=STRIP.tile_size).contains(&height) {
                ladder.push(TiledDecode {
                    tiles: crate::vae::TileConfig {
                        tile_overlap: overlap,
                        ..STRIP
                    },
                    pass_frames,
                });
            }
            ladder.push(TiledDecode {
                tiles: crate::vae::TileConfig::square(tile_size, overlap),
                pass_frames,
            });
        }
    }
    ladder
}

/// The pipeline's tiled decode for a `width`x`height` video when `room` bytes are free for its
/// working set (the VAE's weights and what else stays on the GPU already subtracted): the first
/// of [`tile_ladder`] predicted to fit (the largest tiles, with whole chunks when they fit, else
/// 2-frame passes); the smallest tile with 2-frame passes when none does. Without a budget,
/// [`tiled_decode`]'s default.
pub fn tiled_decode_within(
    cfg: &VaeConfig,
    width: usize,
    height: usize,
    frames: usize,
    elem: u64,
    room: Option<u64>,
) -> TiledDecode {
    let default = tiled_decode(cfg);
    let Some(room) = room else {
        return default;
    };
    let ladder = tile_ladder(height, default.tiles.tile_overlap);
    let smallest = *ladder.last().expect("a non-empty ladder");
    ladder
        .into_iter()
        .find(|t| {
            vae_decode_activations(cfg, width, height, frames, VaeDecode::Tiled(*t), elem) <= room
        })
        .unwrap_or(smallest)
}

/// The pipeline's tiled decode for a VAE when no budget says more: the geometry for the least
/// memory at a fair speed. Measured on the H100 (bf16, this stop's call): Wan2.1 at 832x480x81
/// with 384 px tiles and 2-frame passes 1.88 s at 0.97 GiB (an earlier call: 3.27 s at 1.05 GiB
/// with diffusers' geometry, 256 px with whole chunks), against diffusers' own tiled decode 4.82 s
/// at 1.21 GiB and its whole-frame decode 2.07 s at 4.65 GiB. Wan2.2 keeps 256 px tiles with whole
/// chunks (10.60 s at 2.03 GiB; 1-frame passes cost it 15-20% more time in an earlier call).
pub fn tiled_decode(cfg: &VaeConfig) -> TiledDecode {
    let (tile_size, pass_frames) = if cfg.is_residual { (256, 0) } else { (384, 2) };
    TiledDecode {
        tiles: crate::vae::TileConfig::square(tile_size, 64),
        pass_frames,
    }
}

/// Whether the VAE decodes a `width`x`height` video in tiles: always in the modes that promise
/// bounded memory, and above 512x512 pixels unless the whole-frame decode (the reference
/// computation, and 1.6x to 3x faster) is known to fit the budget (`whole_fits`).
pub fn vae_decode_tiled(mode: Offload, width: usize, height: usize, whole_fits: bool) -> bool {
    matches!(mode, Offload::Aggressive | Offload::Stream)
        || (width * height > 512 * 512 && !whole_fits)
}

fn stage(name: &str, gpu: u64, host: u64, act: u64, placement: String) -> StagePlan {
    StagePlan {
        stage: name.to_string(),
        weights_gpu: gpu,
        weights_host: host,
        activations: act,
        gpu_peak: gpu + act,
        placement,
    }
}

/// Plans one offload mode (and, for `stream`, the number of resident blocks).
pub fn plan_mode(req: &PlanRequest, mode: Offload) -> Plan {
    let p = req.preset;
    let elem = req.weights.bytes();
    let cfg = dit_config(p);
    let experts = if p.has_experts() { 2 } else { 1 };
    let weights = req
        .dit_weights
        .unwrap_or_else(|| DitWeights::of_config(&cfg, req.weights));
    let (dit_w, block_w) = (weights.total, weights.largest_block);
    let text_w = text_params(&Umt5Config::umt5_xxl()) * 2;
    let vae_cfg = vae_config(p.vae);
    let vae_elem = if req.vae_bf16 { 2 } else { 4 };
    let vae_w = WanVae::expected_weights(&vae_cfg)
        .map(|s| params(&s) * vae_elem)
        .unwrap_or(0);
    let tokens = dit_tokens(p, req.width, req.height, req.frames);
    let passes = if req.cfg { 2 } else { 1 };
    let mut dit_act = dit_activations(p, tokens, passes, elem) + weights.dequantize_workspace;
    let text_act = text_activations(&Umt5Config::umt5_xxl(), req.text_tokens);
    let all_dits = dit_w * experts;
    let mut resident_blocks = None;
    let (text_gpu, dits_gpu_during_denoise, others_during_decode, dit_host): (u64, u64, u64, u64) =
        match mode {
            Offload::None => (text_w, all_dits, text_w + all_dits, 0),
            // The transformers are freed after the loop: the decode holds only the VAE.
            Offload::Cond => (text_w, all_dits, 0, 0),
            // The second expert is read from its (mmap'd) file at the switch, after the first
            // is freed: no host copy.
            Offload::CondDiffusion | Offload::Aggressive => (text_w, dit_w, 0, 0),
            Offload::Stream => {
                let non_block = weights.non_block;
                // `prefetch` uploads queued and the block computing, plus the block just finished:
                // its memory returns to the pool on the compute stream, which the copy stream
                // cannot reuse until the streams meet (measured: 4.38 GiB peak at a 4 GiB budget
                // when it was not counted).
                let in_flight = (req.prefetch as u64 + 2) * block_w;
                // Streamed blocks project the text K/V when they arrive (one block's at a time, plus
                // the projected text); only resident blocks keep theirs.
                let kv_block = context_kv_per_block(p, passes, elem);
                let streamed_act = dit_act - kv_block * cfg.num_layers as u64
                    + (passes * 512 * p.dit.dim) as u64 * elem
                    + kv_block;
                let budget = req.vram_budget.unwrap_or(u64::MAX);
                let room = budget
                    .saturating_sub(non_block + in_flight + streamed_act)
                    .checked_div(block_w + kv_block)
                    .unwrap_or(0)
                    .min(cfg.num_layers as u64);
                resident_blocks = Some(room as usize);
                dit_act = streamed_act + room * kv_block;
                let on_gpu = non_block + in_flight + room * block_w;
                // One expert's blocks page-locked on the host at a time.
                (text_w, on_gpu, 0, dit_w)
            }
        };
    let decode_act = |decode| {
        vae_decode_activations(
            &vae_cfg, req.width, req.height, req.frames, decode, vae_elem,
        )
    };
    let whole_fits = req
        .vram_budget
        .is_some_and(|b| vae_w + others_during_decode + decode_act(VaeDecode::WholeFrames) <= b);
    let vae_decode = if vae_decode_tiled(mode, req.width, req.height, whole_fits) {
        let room = req
            .vram_budget
            .map(|b| b.saturating_sub(vae_w + others_during_decode));
        VaeDecode::Tiled(tiled_decode_within(
            &vae_cfg, req.width, req.height, req.frames, vae_elem, room,
        ))
    } else {
        VaeDecode::WholeFrames
    };
    let vae_act = decode_act(vae_decode);
    // In the strongest modes an encoder that does not fit the budget is streamed to the GPU a
    // block at a time; only when one block does not fit either does it run on the CPU.
    let text_block = text_block_bytes(&Umt5Config::umt5_xxl());
    let text = match req.vram_budget {
        Some(b)
            if matches!(mode, Offload::Aggressive | Offload::Stream) && text_w + text_act > b =>
        {
            if text_block + text_act <= b {
                TextPlacement::Streamed
            } else {
                TextPlacement::Cpu
            }
        }
        _ => TextPlacement::Resident,
    };
    let resident_extra = if mode == Offload::None {
        all_dits + vae_w
    } else {
        0
    };
    let mut stages = vec![match text {
        // f32 on the CPU: twice the bf16 checkpoint.
        TextPlacement::Cpu => stage(
            "text encode",
            0,
            2 * text_w,
            0,
            "text encoder on the CPU (f32)".into(),
        ),
        TextPlacement::Streamed => stage(
            "text encode",
            text_block,
            text_w,
            text_act,
            "text encoder on the host, streamed to the GPU a block at a time".into(),
        ),
        TextPlacement::Resident => {
            let placement = if mode == Offload::None {
                "all components resident"
            } else {
                "text encoder on GPU, freed after"
            };
            stage(
                "text encode",
                text_gpu + resident_extra,
                0,
                text_act,
                placement.into(),
            )
        }
    }];
    for e in 0..experts {
        let name = if experts == 2 {
            if e == 0 {
                "denoise (high-noise expert)"
            } else {
                "denoise (low-noise expert)"
            }
        } else {
            "denoise"
        };
        let placement = match (mode, resident_blocks) {
            (Offload::Stream, Some(k)) => format!(
                "{k}/{} blocks resident, rest streamed (prefetch {})",
                cfg.num_layers, req.prefetch
            ),
            (Offload::CondDiffusion | Offload::Aggressive, _) if experts == 2 => {
                "one expert on the GPU at a time, the other loaded at the switch".into()
            }
            _ => format!("{experts} expert(s) resident"),
        };
        let extra = if mode == Offload::None {
            text_w + vae_w
        } else {
            0
        };
        stages.push(stage(
            name,
            dits_gpu_during_denoise + extra,
            dit_host,
            dit_act,
            placement,
        ));
    }
    stages.push(stage(
        "VAE decode",
        vae_w + others_during_decode,
        0,
        vae_act,
        vae_decode.describe(),
    ));
    let gpu_peak = stages.iter().map(|s| s.gpu_peak).max().unwrap_or(0);
    // Host: weights mmap'd while loading; held in RAM only when offloaded.
    let host_peak = stages.iter().map(|s| s.weights_host).max().unwrap_or(0)
        + 3 * (req.frames * req.width * req.height) as u64 * 4;
    let fits = req.vram_budget.is_none_or(|b| gpu_peak <= b)
        && req.host_budget.is_none_or(|b| host_peak <= b);
    Plan {
        offload: mode,
        resident_blocks,
        stages,
        gpu_peak,
        host_peak,
        fits,
        text,
        vae_decode,
    }
}

/// The chosen plan: the asked mode, or with `auto` the weakest mode that fits.
pub fn plan(req: &PlanRequest) -> Plan {
    match req.offload {
        Some(mode) => plan_mode(req, mode),
        None => Offload::LADDER
            .iter()
            .map(|&m| plan_mode(req, m))
            .find(|p| p.fits)
            .unwrap_or_else(|| plan_mode(req, Offload::Stream)),
    }
}

/// When nothing fits: the smallest single change that would, found by re-planning.
pub fn suggestion(req: &PlanRequest) -> Option<String> {
    let fits = |r: &PlanRequest| plan(r).fits;
    if req.offload.is_some() {
        let mut r = req.clone();
        r.offload = None;
        if fits(&r) {
            return Some(format!("use --offload {}", plan(&r).offload.name()));
        }
    }
    // Precision before content: FP8 block linears (≈4e-2 relative error on random weights) and a
    // bf16 VAE keep every frame and pixel; a GGUF checkpoint's format is the file's, not a flag.
    if matches!(req.weights, WeightFormat::Bf16 | WeightFormat::F32) && req.dit_weights.is_none() {
        let mut r = req.clone();
        r.offload = None;
        r.weights = WeightFormat::Fp8;
        if fits(&r) {
            return Some("FP8 transformer weights: --weights fp8".into());
        }
    }
    if !req.vae_bf16 {
        let mut r = req.clone();
        r.offload = None;
        r.vae_bf16 = true;
        if fits(&r) {
            return Some("a bf16 VAE: --vae-dtype bf16".into());
        }
    }
    let mut r = req.clone();
    r.offload = None;
    let mut frames = req.frames;
    while frames > 5 {
        frames -= 4;
        r.frames = frames;
        if fits(&r) {
            return Some(format!("fewer frames: --frames {frames} (4k+1)"));
        }
    }
    for s in p_sizes(req) {
        let mut r = req.clone();
        r.offload = None;
        (r.width, r.height) = s;
        if fits(&r) {
            return Some(format!("a smaller size: --size {}x{}", s.0, s.1));
        }
    }
    None
}

fn p_sizes(req: &PlanRequest) -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize)> = req
        .preset
        .supported_sizes
        .iter()
        .map(|s| (s.width as usize, s.height as usize))
        .filter(|(w, h)| w * h < req.width * req.height)
        .collect();
    v.sort_by_key(|(w, h)| std::cmp::Reverse(w * h));
    v
}

/// Kept free on the GPU beside a plan (CUDA context, cuBLAS/cuDNN workspaces, other processes).
pub const VRAM_RESERVE: u64 = 1 << 30;

/// The GPU memory this process can plan with now: what the driver reports free plus what our
/// memory pool already holds, minus [`VRAM_RESERVE`]. `None` on the CPU. Re-read before each
/// stage, since other processes share the GPU.
pub fn available_vram(device: &candle_core::Device) -> Result<Option<u64>> {
    let Some((free, _)) = crate::device::gpu_memory::free_and_total(device)? else {
        return Ok(None);
    };
    let held = crate::device::gpu_memory::usage(device)?.map_or(0, |u| u.reserved);
    Ok(Some((free + held).saturating_sub(VRAM_RESERVE)))
}

/// "12GiB", "24 GB", "512MiB", "8" (GiB) -> bytes.
pub fn parse_bytes(field: &str, s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite() && *v > 0.0)
        .ok_or_else(|| {
            invalid!("{field}: `{s}` is not a positive size such as 12GiB, 24GB or 512MiB")
        })?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "gib" | "g" => GIB,
        "gb" => 1e9,
        "mib" | "m" => (1u64 << 20) as f64,
        "mb" => 1e6,
        other => {
            return Err(invalid!(
                "{field}: unit `{other}` is not one of GiB, GB, MiB, MB"
            ))
        }
    };
    Ok((value * scale) as u64)
}

/// A known configuration by name (`wan2.2-t2v-a14b`, ...).
pub fn known_model(name: &str) -> Result<&'static ModelPreset> {
    presets::preset(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_attention_adds_its_e4m3_copies_to_the_dit_peak() {
        let p = known_model("wan2.2-t2v-a14b").unwrap();
        let tokens = dit_tokens(p, 832, 480, 81);
        let before = crate::dit::flash::preferred().ok();
        let bf16 =
            crate::dit::flash::with_preferred(Kernel::Cudnn, || dit_activations(p, tokens, 2, 2));
        let fp8 = crate::dit::flash::with_preferred(Kernel::CudnnFp8, || {
            dit_activations(p, tokens, 2, 2)
        });
        // q, k, v and the output in e4m3: 4 bytes per [tokens, dim] value, 0.62 GiB here.
        assert_eq!(fp8 - bf16, (4 * tokens * p.dit.dim) as u64);
        // The override ends with its closure.
        assert_eq!(crate::dit::flash::preferred().ok(), before);
    }

    fn req(name: &str, w: usize, h: usize, frames: usize, budget_gib: Option<f64>) -> PlanRequest {
        PlanRequest {
            preset: known_model(name).unwrap(),
            width: w,
            height: h,
            frames,
            weights: WeightFormat::Bf16,
            cfg: true,
            vram_budget: budget_gib.map(|g| (g * GIB) as u64),
            host_budget: None,
            offload: None,
            prefetch: 1,
            dit_weights: None,
            vae_bf16: true,
            text_tokens: TEXT_LEN,
        }
    }

    /// Parameter counts equal what diffusers' WanTransformer3DModel reports for the same configs
    /// (printed by shared/anchors/diffusers_wan_bench.py on the GPU machine).
    #[test]
    fn vae_dtype_flag_and_its_memory() {
        assert!(vae_bf16("--vae-dtype", "auto", true).unwrap());
        assert!(!vae_bf16("--vae-dtype", "auto", false).unwrap());
        assert!(!vae_bf16("--vae-dtype", "f32", true).unwrap());
        let cpu = vae_bf16("--vae-dtype", "bf16", false)
            .unwrap_err()
            .to_string();
        assert!(cpu.contains("--vae-dtype") && cpu.contains("GPU"), "{cpu}");
        let bad = vae_bf16("--vae-dtype", "fp16", true)
            .unwrap_err()
            .to_string();
        assert!(bad.contains("auto, bf16, f32"), "{bad}");
        // The decode stage in bf16 needs half of what it needs in f32 (weights and activations).
        let decode = |bf16: bool| {
            let mut r = req("wan2.1-t2v-1.3b", 832, 480, 81, None);
            r.vae_bf16 = bf16;
            let p = plan_mode(&r, Offload::Cond);
            p.stages
                .iter()
                .find(|s| s.stage == "VAE decode")
                .unwrap()
                .gpu_peak
        };
        assert_eq!(decode(false), 2 * decode(true));
    }

    /// Whole-frame decode (the reference computation, and faster) wherever the budget is known
    /// to hold it; tiles when it is not, when no budget is known above 512x512, and always in the
    /// modes that promise bounded memory.
    /// A tiled decode takes the largest ladder tile predicted to fit the room it has, with whole
    /// chunks where they fit and 2-frame passes where only those do, and falls back to the
    /// default without a budget; the 5B streamed at a 6 GiB budget decodes in tiles larger than
    /// the default 256 px, within the budget.
    #[test]
    fn tiled_decode_takes_the_largest_tiles_the_budget_holds() {
        use crate::vae::TileConfig;
        let cfg = VaeConfig::wan22();
        let (w, h, f) = (1280, 704, 121);
        let peak = |t: TiledDecode| vae_decode_activations(&cfg, w, h, f, VaeDecode::Tiled(t), 2);
        let default = tiled_decode(&cfg);
        assert_eq!(tiled_decode_within(&cfg, w, h, f, 2, None), default);
        // The planner's order of preference: every square tile, whole chunks then 2-frame
        // passes, and for a 704 px tall video the 480x704 strip just before 672 px tiles with
        // 2-frame passes (between them in memory).
        let ladder = tile_ladder(h, default.tiles.tile_overlap);
        assert_eq!(
            ladder.len(),
            TILE_LADDER.len() * LADDER_PASS_FRAMES.len() + 1
        );
        let strip = ladder
            .iter()
            .position(|t| t.tiles.tile_width == Some(480))
            .expect("a strip for a 704 px tall video");
        assert_eq!(
            ladder[strip + 1],
            TiledDecode {
                tiles: TileConfig::square(672, 64),
                pass_frames: 2
            }
        );
        assert!(peak(ladder[strip - 1]) > peak(ladder[strip]));
        assert!(peak(ladder[strip]) > peak(ladder[strip + 1]));
        assert!(tile_ladder(480, 64)
            .iter()
            .all(|t| t.tiles.tile_width.is_none()));
        let mut chosen = Vec::new();
        for room_gib in [0.5, 1.5, 2.5, 3.8, 4.0, 8.0, 100.0] {
            let room = (room_gib * GIB) as u64;
            let t = tiled_decode_within(&cfg, w, h, f, 2, Some(room));
            let rank = ladder.iter().position(|c| *c == t).expect("a ladder entry");
            assert!(
                peak(t) <= room || rank == ladder.len() - 1,
                "{room_gib} GiB: {t:?}"
            );
            for better in &ladder[..rank] {
                assert!(peak(*better) > room, "{better:?} fits {room_gib} GiB");
            }
            chosen.push(rank);
        }
        assert!(chosen.windows(2).all(|p| p[0] >= p[1]), "{chosen:?}");
        assert!(chosen.contains(&strip), "{chosen:?}");
        assert_eq!(chosen[0], ladder.len() - 1);
        assert_eq!(ladder[chosen[chosen.len() - 1]], ladder[0]);
        // Some room holds a tile size only with 2-frame passes: the planner takes it so.
        assert!(
            chosen
                .iter()
                .any(|&r| ladder[r].pass_frames == 2 && r < ladder.len() - 1),
            "{chosen:?}"
        );

        let mut five_b = req("wan2.2-ti2v-5b", 1280, 704, 121, Some(6.0));
        five_b.offload = Some(Offload::Stream);
        let p = plan_mode(&five_b, Offload::Stream);
        let VaeDecode::Tiled(t) = p.vae_decode else {
            panic!("stream decodes in tiles")
        };
        assert!(t.tiles.tile_size > default.tiles.tile_size, "{t:?}");
        let decode = p.stages.iter().find(|s| s.stage == "VAE decode").unwrap();
        assert!(p.fits && decode.gpu_peak <= (6.0 * GIB) as u64);
        assert_eq!(decode.placement, p.vae_decode.describe());
    }

    #[test]
    fn decode_is_whole_frames_where_the_budget_holds_them() {
        let decode = |p: &Plan| p.stages.iter().find(|s| s.stage == "VAE decode").cloned();
        let roomy = plan_mode(
            &req("wan2.1-t2v-1.3b", 832, 480, 81, Some(200.0)),
            Offload::Cond,
        );
        assert!(!roomy.vae_decode.is_tiled());
        let whole = decode(&roomy).unwrap();
        assert_eq!(whole.placement, "whole frames");
        let mut tight = req("wan2.1-t2v-1.3b", 832, 480, 81, None);
        tight.vram_budget = Some(whole.gpu_peak - 1);
        let tight = plan_mode(&tight, Offload::Cond);
        assert!(tight.vae_decode.is_tiled());
        let tiles = decode(&tight).unwrap();
        assert!(tiles.placement.starts_with("tiled"), "{}", tiles.placement);
        assert!(tiles.gpu_peak < whole.gpu_peak);
        let unknown = plan_mode(&req("wan2.1-t2v-1.3b", 832, 480, 81, None), Offload::Cond);
        assert!(unknown.vae_decode.is_tiled());
        let small = plan_mode(&req("wan2.1-t2v-1.3b", 480, 480, 81, None), Offload::Cond);
        assert!(!small.vae_decode.is_tiled());
        for mode in [Offload::Aggressive, Offload::Stream] {
            let p = plan_mode(&req("wan2.1-t2v-1.3b", 480, 480, 81, Some(200.0)), mode);
            assert!(p.vae_decode.is_tiled(), "{mode:?}");
        }
    }

    #[test]
    fn transformer_parameters_match_diffusers() {
        let count = |name: &str| dit_params(&dit_config(known_model(name).unwrap()));
        assert_eq!(count("wan2.1-t2v-1.3b"), 1_418_996_800);
        assert_eq!(count("wan2.2-ti2v-5b"), 4_999_787_712);
        assert_eq!(count("wan2.2-t2v-a14b"), 14_288_491_584);
        // 40 identical blocks plus the embedders and head
        let cfg = dit_config(known_model("wan2.2-t2v-a14b").unwrap());
        assert!(dit_block_params(&cfg) * 40 < dit_params(&cfg));
    }

    #[test]
    fn auto_picks_the_weakest_mode_that_fits() {
        let big = plan(&req("wan2.2-t2v-a14b", 832, 480, 81, Some(200.0)));
        assert_eq!(big.offload, Offload::None);
        assert!(big.fits);
        let mid = plan(&req("wan2.2-t2v-a14b", 832, 480, 81, Some(40.0)));
        assert_eq!(mid.offload, Offload::CondDiffusion);
        let small = plan(&req("wan2.2-t2v-a14b", 832, 480, 81, Some(12.0)));
        assert_eq!(small.offload, Offload::Stream);
        assert!(small.fits, "{small:?}");
        let k = small.resident_blocks.unwrap();
        assert!(k > 0 && k < 40, "{k}");
        assert!(small.gpu_peak <= (12.0 * GIB) as u64);
    }

    #[test]
    fn does_not_fit_suggests_a_change_that_fits() {
        // bf16 A14B at 4 GiB: FP8 weights are the first change that fits.
        let bf16 = req("wan2.2-t2v-a14b", 832, 480, 81, Some(4.0));
        assert!(!plan(&bf16).fits);
        assert_eq!(
            suggestion(&bf16).as_deref(),
            Some("FP8 transformer weights: --weights fp8")
        );
        let mut fp8 = bf16.clone();
        fp8.weights = WeightFormat::Fp8;
        assert!(plan(&fp8).fits);
        // Already FP8 at 3 GiB: fewer frames.
        let mut r = fp8.clone();
        r.vram_budget = Some((3.0 * GIB) as u64);
        assert!(!plan(&r).fits);
        let s = suggestion(&r).expect("fewer frames fit");
        let frames: usize = s
            .rsplit("--frames ")
            .next()
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let mut fixed = r.clone();
        fixed.frames = frames;
        assert!(plan(&fixed).fits, "{s}");
        assert!((frames - 1).is_multiple_of(4) && frames < 81);
    }

    /// GGUF formats count the GGML block bytes for every block linear and bf16 for the rest; a
    /// smaller format lets a budget keep more blocks resident.
    #[test]
    fn gguf_formats_count_block_bytes() {
        let cfg = dit_config(known_model("wan2.2-t2v-a14b").unwrap());
        let shapes = crate::dit::model::weight_shapes(&cfg);
        let linear_values: u64 = shapes
            .iter()
            .filter(|(n, s)| is_block_linear(n, s))
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .sum();
        let (bf16, bf16_block) = dit_weight_bytes(&cfg, WeightFormat::Bf16);
        let mut resident = Vec::new();
        // bytes per block of 32 (K-quants: per 256 / 8)
        for (name, per_32) in [
            ("q8_0", 34.0),
            ("q6_k", 210.0 / 8.0),
            ("q5_k", 176.0 / 8.0),
            ("q4_k", 144.0 / 8.0),
            ("q4_0", 18.0),
        ] {
            let format = WeightFormat::parse(name).unwrap();
            assert_eq!(format.name(), name);
            let (total, block) = dit_weight_bytes(&cfg, format);
            let expected = bf16 - 2 * linear_values + (linear_values as f64 * per_32 / 32.0) as u64;
            assert_eq!(total, expected, "{name}");
            assert!(block < bf16_block, "{name}");
            let w = DitWeights::of_config(&cfg, format);
            assert_eq!(w.non_block, total - block * cfg.num_layers as u64);
            // the FFN pair in bf16 plus the f32 copy of one (13824 x 5120 each)
            assert_eq!(w.dequantize_workspace, (2 + 2 + 4) * 13824 * 5120, "{name}");
            println!(
                "A14B expert {name}: {:.2} GiB (bf16 {:.2} GiB)",
                total as f64 / GIB,
                bf16 as f64 / GIB
            );
            let mut r = req("wan2.2-t2v-a14b", 832, 480, 81, Some(12.0));
            r.weights = format;
            r.offload = Some(Offload::Stream);
            let plan = plan(&r);
            assert!(plan.fits, "{name}: {plan:?}");
            resident.push(plan.resident_blocks.unwrap());
        }
        // q8_0 .. q4_0 shrink, so the resident blocks grow
        assert!(resident.windows(2).all(|w| w[0] <= w[1]), "{resident:?}");
        assert!(resident[0] < resident[4], "{resident:?}");
        let err = WeightFormat::parse("q9_9").unwrap_err().to_string();
        assert!(
            err.contains("--weights") && err.contains("q8_0") && err.contains("q4_k"),
            "{err}"
        );
        assert!(!err.contains("dequantised to"), "{err}");
    }

    #[test]
    fn budget_parsing() {
        assert_eq!(parse_bytes("b", "12GiB").unwrap(), 12 << 30);
        assert_eq!(parse_bytes("b", "512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("b", "24GB").unwrap(), 24_000_000_000);
        assert_eq!(parse_bytes("b", "8").unwrap(), 8 << 30);
        for bad in ["", "-3GiB", "12 parsecs", "GiB", "nan"] {
            let e = parse_bytes("--vram-budget", bad).unwrap_err().to_string();
            assert!(e.contains("--vram-budget"), "{bad}: {e}");
        }
        assert!(Offload::parse("sideways")
            .unwrap_err()
            .to_string()
            .contains("cond-diffusion"));
    }
}
