//! Memory planning: what each stage of a generation needs on the GPU and on the host, for a model
//! configuration, size, frame count and weight format, and the placement (offload mode) that fits a
//! budget. Weights are counted exactly from the real tensor shapes; activations follow what OUR code
//! allocates (dit/model.rs: one stage's temporaries at a time, token-chunked FFN, fused attention),
//! with the coefficients named below. Measured on the H100 (`vidgen bench`, random weights, bf16):
//! see the closing notes of issue 8 for predicted vs measured.

use anyhow::Result;

use crate::dit::DitConfig;
use crate::invalid;
use crate::presets::{self, ModelPreset, VaeKind};
use crate::text::Umt5Config;
use crate::vae::{VaeConfig, WanVae};

pub const GIB: f64 = (1u64 << 30) as f64;

/// Weight storage of the transformer(s) on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Bf16,
    F32,
    /// Block linears in FP8 e4m3 with per-channel f32 scales, the rest bf16 (bf16 compute).
    Fp8,
}

impl WeightFormat {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "bf16" => Ok(Self::Bf16),
            "f32" => Ok(Self::F32),
            "fp8" => Ok(Self::Fp8),
            other => Err(invalid!(
                "--weights: `{other}` is not one of bf16, f32, fp8 (GGUF files are dequantised to \
                 bf16 on load today, so plan them as bf16)"
            )),
        }
    }

    /// Bytes of an activation (and of a dense weight) element.
    fn bytes(self) -> u64 {
        match self {
            Self::Bf16 | Self::Fp8 => 2,
            Self::F32 => 4,
        }
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
    /// Fixed workspace (cuBLAS, RoPE tables, latents, scheduler state), bytes.
    pub const DIT_FIXED: f64 = 64.0 * 1024.0 * 1024.0;
    /// UMT5 activations per token (f32 bytes): hidden, attention, gated FFN buffers.
    pub const TEXT_PER_TOKEN: f64 = 4.0 * (8.0 * 4096.0 + 3.0 * 10240.0);
    /// VAE decode working set per chunk, in multiples of the finest level's chunk tensor
    /// (decoder base channels x 4 frames x H x W): per-tap convolution outputs, sums, the causal
    /// caches and cuDNN workspace. Calibrated on the H100, bf16, plain decode of 832x480x81
    /// (Wan2.1: 7.17 GiB measured) and 1280x704x121 (Wan2.2: 15.12 GiB measured).
    pub const VAE21_CHUNK_FACTOR: f64 = 24.0;
    pub const VAE22_CHUNK_FACTOR: f64 = 31.0;
    /// The same for one tile of the tiled decode (f32, 256 px tiles): calibrated on the H100 with
    /// Wan2.1 at 832x480x81 (2.29 GiB measured with the 0.47 GiB of weights; 24 over-predicted it
    /// by 19%). Wan2.2's is scaled by the same ratio (not yet measured).
    pub const VAE21_TILE_FACTOR: f64 = 19.4;
    pub const VAE22_TILE_FACTOR: f64 = 31.0 * 19.4 / 24.0;
    /// Tile side (pixels, overlap included) of the default tiled decode.
    pub const VAE_TILE_PX: f64 = 256.0;
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
    /// The text encoder runs on the CPU (it does not fit the budget).
    pub text_on_cpu: bool,
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
fn is_block_linear(name: &str, shape: &[usize]) -> bool {
    name.starts_with("blocks.")
        && name.ends_with(".weight")
        && shape.len() == 2
        && (name.contains(".attn") || name.contains(".ffn."))
}

/// Bytes of one transformer's weights and of one of its blocks, stored as `format`.
pub fn dit_weight_bytes(cfg: &DitConfig, format: WeightFormat) -> (u64, u64) {
    let bytes = |name: &str, shape: &[usize]| -> u64 {
        let n = shape.iter().product::<usize>() as u64;
        match format {
            // One f32 scale per output channel beside the FP8 values.
            WeightFormat::Fp8 if is_block_linear(name, shape) => n + 4 * shape[0] as u64,
            _ => n * format.bytes(),
        }
    };
    let shapes = crate::dit::model::weight_shapes(cfg);
    let total = shapes.iter().map(|(n, s)| bytes(n, s)).sum();
    let block = shapes
        .iter()
        .filter(|(n, _)| n.starts_with("blocks.0."))
        .map(|(n, s)| bytes(n, s))
        .sum();
    (total, block)
}

/// FP8: the two FFN weights of a block dequantised to bf16 for its matmuls (held across the FFN's
/// token chunks; the GPU kernel writes bf16 directly, no f32 copy).
fn fp8_dequantize_workspace(cfg: &DitConfig) -> u64 {
    let mut sizes: Vec<u64> = crate::dit::model::weight_shapes(cfg)
        .iter()
        .filter(|(n, s)| is_block_linear(n, s))
        .map(|(_, s)| s.iter().product::<usize>() as u64 * 2)
        .collect();
    sizes.sort_unstable();
    sizes.iter().rev().take(2).sum()
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
    let inner = (c.num_heads * c.d_kv) as u64;
    let (d, ff) = (c.d_model as u64, c.d_ff as u64);
    let per_layer = 4 * d * inner
        + 3 * d * ff
        + 2 * d
        + (c.relative_attention_num_buckets * c.num_heads) as u64;
    c.vocab_size as u64 * d + c.num_layers as u64 * per_layer + d
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

/// DiT activation peak for `passes` CFG passes (see [`coeff`]); `per_token`: one timestep per
/// token (TI2V's expand_timesteps), which makes the modulation tables token-sized.
pub fn dit_activations(
    p: &ModelPreset,
    tokens: usize,
    passes: usize,
    elem: u64,
    per_token: bool,
) -> u64 {
    let d = p.dit.dim as f64;
    let l = tokens as f64;
    let b = elem as f64;
    let hidden = passes as f64 * l * d * b;
    let temporaries = coeff::DIT_TOKEN_BUFFERS * l * d * b;
    // cross-attention K/V of every block, per pass (text length 512)
    let context = p.dit.num_layers as f64 * context_kv_per_block(p, passes, elem) as f64;
    // per-token timesteps (TI2V): the f32 modulation table and its model-dtype projection
    let per_token = if per_token {
        l * 6.0 * d * (4.0 + b)
    } else {
        0.0
    };
    (hidden + temporaries + context + per_token + coeff::DIT_FIXED) as u64
}

/// Cross-attention keys and values of one block for `passes` CFG passes (512 text tokens).
pub fn context_kv_per_block(p: &ModelPreset, passes: usize, elem: u64) -> u64 {
    (passes * 2 * 512 * p.dit.dim) as u64 * elem
}

/// VAE decode working set (f32) for the whole frame or one tile, plus the decoded video when it
/// stays on the GPU (plain decode).
pub fn vae_decode_activations(
    cfg: &VaeConfig,
    width: usize,
    height: usize,
    frames: usize,
    tiled: bool,
    elem: u64,
) -> u64 {
    let base = cfg.decoder_base_dim.unwrap_or(cfg.base_dim) as f64;
    let area = if tiled {
        coeff::VAE_TILE_PX.min(width as f64) * coeff::VAE_TILE_PX.min(height as f64)
    } else {
        (width * height) as f64
    };
    // A patchified VAE (Wan2.2, patch 2) decodes its finest level at 1/patch of the resolution.
    let area = area / (cfg.patch() * cfg.patch()) as f64;
    let chunk = base * 4.0 * area * elem as f64;
    let video = if tiled {
        0.0
    } else {
        3.0 * (frames * width * height) as f64 * elem as f64
    };
    let factor = match (cfg.is_residual, tiled) {
        (true, false) => coeff::VAE22_CHUNK_FACTOR,
        (false, false) => coeff::VAE21_CHUNK_FACTOR,
        (true, true) => coeff::VAE22_TILE_FACTOR,
        (false, true) => coeff::VAE21_TILE_FACTOR,
    };
    (factor * chunk + video) as u64
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
    let (dit_w, block_w) = dit_weight_bytes(&cfg, req.weights);
    let text_w = text_params(&Umt5Config::umt5_xxl()) * 2;
    let vae_cfg = vae_config(p.vae);
    let vae_w = WanVae::expected_weights(&vae_cfg)
        .map(|s| params(&s) * 4)
        .unwrap_or(0);
    let tokens = dit_tokens(p, req.width, req.height, req.frames);
    let passes = if req.cfg { 2 } else { 1 };
    let mut dit_act = dit_activations(p, tokens, passes, elem, p.name == "wan2.2-ti2v-5b");
    if req.weights == WeightFormat::Fp8 {
        dit_act += fp8_dequantize_workspace(&cfg);
    }
    let text_act = (coeff::TEXT_PER_TOKEN * 512.0) as u64;
    let tiled =
        matches!(mode, Offload::Aggressive | Offload::Stream) || req.width * req.height > 512 * 512;
    let vae_act = vae_decode_activations(&vae_cfg, req.width, req.height, req.frames, tiled, 4);
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
                let non_block = dit_w - block_w * cfg.num_layers as u64;
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
    // In the strongest modes an encoder that does not fit the budget runs on the CPU (512 tokens:
    // seconds, not minutes) and costs the GPU nothing.
    let text_on_cpu = matches!(mode, Offload::Aggressive | Offload::Stream)
        && req.vram_budget.is_some_and(|b| text_w + text_act > b);
    let resident_extra = if mode == Offload::None {
        all_dits + vae_w
    } else {
        0
    };
    let mut stages = vec![if text_on_cpu {
        // f32 on the CPU: twice the bf16 checkpoint.
        stage(
            "text encode",
            0,
            2 * text_w,
            0,
            "text encoder on the CPU (f32)".into(),
        )
    } else {
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
        if tiled {
            "tiled 256 px (64 px overlap)".into()
        } else {
            "whole frames".into()
        },
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
        text_on_cpu,
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
        }
    }

    /// Parameter counts equal what diffusers' WanTransformer3DModel reports for the same configs
    /// (printed by shared/anchors/diffusers_wan_bench.py on the GPU machine).
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
        let r = req("wan2.2-t2v-a14b", 832, 480, 81, Some(4.0));
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
