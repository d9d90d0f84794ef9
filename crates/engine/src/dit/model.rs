//! The Wan transformer, following diffusers' `WanTransformer3DModel` (names are its checkpoint keys).
//!
//! Precision follows diffusers: matmuls in the model dtype; LayerNorms, the modulation tables and the
//! gated residual adds in f32, cast back to the model dtype after each add.
//!
//! Block linears may be held quantised (FP8, or a GGUF file's block encoding): each is dequantised
//! to the activation dtype right before its matmul and freed after it, the FFN pair once per block
//! for all token chunks; a forward therefore holds at most one block's dequantised weights.

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;

use std::collections::HashMap;

use super::config::DitConfig;
use super::flash;
use super::fused;
use super::rope::RopeTable;
use super::streaming::{self, HostBlock, StreamOptions, Uploader};
use crate::invalid;
use crate::profile::scope;
use crate::weights::fp8::{Fp8Granularity, Fp8Weight};
use crate::weights::fp8_matmul::{fp8_linear, fp8_linear_quantized, quantize_input, Activation};
use crate::weights::{GgufType, GgufWeight, MemorySource, WeightMap, WeightPath};

/// A transformer block's linear layer (the bulk of the weights): dense in the model dtype; FP8
/// e4m3 with one f32 scale per output channel (half the memory of bf16); or a GGUF checkpoint's
/// block encoding as stored (Q8_0: 1.06 bytes per value, Q4_K: 0.56). The quantised forms are
/// dequantised to the activation dtype for each call (the FFN's once per block).
struct BlockLinear {
    weight: BlockWeight,
    bias: Tensor,
    /// An FP8 weight runs as an FP8 matmul ([`fp8_linear`]) rather than dequantised.
    fp8_matmul: bool,
}

enum BlockWeight {
    Dense(Tensor),
    Fp8(Fp8Weight),
    Gguf(GgufWeight),
}

impl BlockLinear {
    /// `weight` and `bias` of `wp.{name}`. Stored FP8 (a `weight_scale` beside the weight, as
    /// [`Self::named_tensors`] writes them for streaming) stays FP8; a block-quantised GGUF
    /// weight stays in its encoding (unless the map dequantises on load); a dense weight is
    /// quantised when the weight map asks for FP8 linears, on the weight's device, one layer at
    /// a time.
    fn load(wp: &WeightPath, name: &str, d_in: usize, d_out: usize) -> Result<Self> {
        let p = wp.pp(name);
        let bias = p.get("bias", &[d_out])?;
        let weight = if p.contains(FP8_SCALE) {
            BlockWeight::Fp8(Fp8Weight::from_parts(
                p.get_as("weight", &[d_out, d_in], DType::F8E4M3)?,
                p.get_as(FP8_SCALE, &[d_out], DType::F32)?,
            )?)
        } else if p.quantized_type("weight").is_some() {
            BlockWeight::Gguf(p.get_blocks("weight", &[d_out, d_in])?)
        } else if wp.map().fp8_linears() {
            let dense = p.get_as("weight", &[d_out, d_in], DType::F32)?;
            BlockWeight::Fp8(Fp8Weight::quantize(&dense, Fp8Granularity::PerChannel)?)
        } else {
            BlockWeight::Dense(p.get("weight", &[d_out, d_in])?)
        };
        let fp8_matmul = wp.map().fp8_matmul() && matches!(weight, BlockWeight::Fp8(_));
        Ok(Self {
            weight,
            bias,
            fp8_matmul,
        })
    }

    /// The weight in `dtype` for a matmul (FP8, GGUF: dequantised now; dense: as stored).
    fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        match &self.weight {
            BlockWeight::Dense(w) => Ok(w.clone()),
            BlockWeight::Fp8(q) => q.dequantize(dtype),
            BlockWeight::Gguf(q) => q.dequantize(dtype),
        }
    }

    fn named_tensors(&self, name: &str, out: &mut Vec<(String, Tensor)>) {
        match &self.weight {
            BlockWeight::Dense(w) => out.push((format!("{name}.weight"), w.clone())),
            BlockWeight::Fp8(q) => {
                out.push((format!("{name}.weight"), q.weight().clone()));
                out.push((format!("{name}.{FP8_SCALE}"), q.scale().clone()));
            }
            BlockWeight::Gguf(q) => out.push((
                format!("{name}.weight{GGUF_TAG}{}", q.ggml_type().name()),
                q.data().clone(),
            )),
        }
        out.push((format!("{name}.bias"), self.bias.clone()));
    }
}

/// Name of an FP8 block weight's per-channel scales beside `weight` (streamed blocks).
const FP8_SCALE: &str = "weight_scale";

/// A streamed block carries a GGUF weight's blocks (U8) as `{name}.weight{GGUF_TAG}{type}`, e.g.
/// `attn1.to_q.weight#gguf:q8_0`: the upload moves plain bytes, and [`Block::from_tensors`]
/// rebuilds the weight from the name.
const GGUF_TAG: &str = "#gguf:";

fn linear(wp: &WeightPath, name: &str, d_in: usize, d_out: usize) -> Result<Linear> {
    let p = wp.pp(name);
    Ok(Linear::new(
        p.get("weight", &[d_out, d_in])?,
        Some(p.get("bias", &[d_out])?),
    ))
}

/// Every weight name and shape of a config, in diffusers naming (the demo model and tests build
/// random weights from it; loading checks the checkpoint against it).
pub fn weight_shapes(cfg: &DitConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.dim();
    let p: usize = cfg.patch_size.iter().product();
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let mut lin = |name: &str, i: usize, o: usize| {
        v.push((format!("{name}.weight"), vec![o, i]));
        v.push((format!("{name}.bias"), vec![o]));
    };
    lin("condition_embedder.time_embedder.linear_1", cfg.freq_dim, d);
    lin("condition_embedder.time_embedder.linear_2", d, d);
    lin("condition_embedder.time_proj", d, 6 * d);
    lin("condition_embedder.text_embedder.linear_1", cfg.text_dim, d);
    lin("condition_embedder.text_embedder.linear_2", d, d);
    lin("proj_out", d, cfg.out_channels * p);
    for i in 0..cfg.num_layers {
        for attn in ["attn1", "attn2"] {
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                lin(&format!("blocks.{i}.{attn}.{proj}"), d, d);
            }
        }
        lin(&format!("blocks.{i}.ffn.net.0.proj"), d, cfg.ffn_dim);
        lin(&format!("blocks.{i}.ffn.net.2"), cfg.ffn_dim, d);
    }
    let [pt, ph, pw] = cfg.patch_size;
    v.push((
        "patch_embedding.weight".into(),
        vec![d, cfg.in_channels, pt, ph, pw],
    ));
    v.push(("patch_embedding.bias".into(), vec![d]));
    v.push(("scale_shift_table".into(), vec![1, 2, d]));
    for i in 0..cfg.num_layers {
        for attn in ["attn1", "attn2"] {
            for n in ["norm_q", "norm_k"] {
                v.push((format!("blocks.{i}.{attn}.{n}.weight"), vec![d]));
            }
        }
        if cfg.cross_attn_norm {
            v.push((format!("blocks.{i}.norm2.weight"), vec![d]));
            v.push((format!("blocks.{i}.norm2.bias"), vec![d]));
        }
        v.push((format!("blocks.{i}.scale_shift_table"), vec![1, 6, d]));
    }
    v
}

/// LayerNorm over the last dim in f32, with optional affine parameters (only `norm2` has them),
/// optionally followed by the block's modulation; see [`fused::layer_norm_modulate`].
struct Norm {
    affine: Option<(Tensor, Tensor)>,
    eps: f32,
}

impl Norm {
    fn plain(eps: f64) -> Self {
        Self {
            affine: None,
            eps: eps as f32,
        }
    }

    /// `modulation`: (table [B, Lt, K, D], shift index, scale index). Returns x's dtype.
    fn forward(&self, x: &Tensor, modulation: Option<(&Tensor, usize, usize)>) -> Result<Tensor> {
        let affine = self.affine.as_ref().map(|(w, b)| (w, b));
        fused::layer_norm_modulate(x, affine, modulation, self.eps)
    }
}

/// RMSNorm over the full inner dim (across heads), as `torch.nn.RMSNorm(dim)`.
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        fused::rms_norm(x, &self.weight, self.eps)
    }
}

/// Scaled dot-product attention, q [B,H,Lq,d], k/v [B,H,Lk,d] -> [B,H,Lq,d]; softmax in f32.
/// Queries are processed in chunks so no buffer exceeds ~`budget` score elements (the full score
/// matrix of a 32k-token video would be tens of GB).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    let scale = 1.0 / (d as f64).sqrt();
    let budget: usize = 1 << 26;
    let chunk = (budget / (b * h * lk).max(1)).clamp(1, lq);
    let kt = k.transpose(2, 3)?.contiguous()?;
    let mut outs = Vec::with_capacity(lq.div_ceil(chunk));
    let mut start = 0;
    while start < lq {
        let n = chunk.min(lq - start);
        let qc = q.narrow(2, start, n)?;
        let scores = (qc.matmul(&kt)? * scale)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        outs.push(probs.matmul(v)?);
        start += n;
    }
    Ok(Tensor::cat(&outs, 2)?)
}

/// `x·Wᵀ` then the bias through [`fused::bias_add`] (one pass on the GPU; the same ops as
/// candle's `Linear` on the CPU).
fn linear_forward(layer: &BlockLinear, x: &Tensor) -> Result<Tensor> {
    linear_forward_with(layer, &matmul_weight(layer, x.dtype())?, x)
}

/// A block linear's weight ready for its matmuls: dense in the activation dtype, or its FP8
/// weight as held, for an FP8 matmul.
enum MatmulWeight<'a> {
    Dense(Tensor),
    Fp8(&'a Fp8Weight),
}

/// [`linear_forward`] with the layer's weight prepared by [`matmul_weight`].
fn linear_forward_with(layer: &BlockLinear, w: &MatmulWeight, x: &Tensor) -> Result<Tensor> {
    linear_act_with(layer, w, x, Activation::None)
}

/// The FFN's first layer with its tanh-GELU fused into the bias pass.
fn linear_gelu_with(layer: &BlockLinear, w: &MatmulWeight, x: &Tensor) -> Result<Tensor> {
    linear_act_with(layer, w, x, Activation::GeluTanh)
}

fn linear_act_with(
    layer: &BlockLinear,
    w: &MatmulWeight,
    x: &Tensor,
    act: Activation,
) -> Result<Tensor> {
    let w = match w {
        MatmulWeight::Fp8(q) => {
            return scope("dit.fp8_matmul", x.device(), || {
                fp8_linear(x, q, &layer.bias, act)
            })
        }
        MatmulWeight::Dense(w) => w,
    };
    // On the GPU the bias (and GELU) ride on cuBLASLt's epilogue; elsewhere a second pass.
    let (y, fused) = scope(
        "dit.matmul",
        x.device(),
        || match crate::blaslt::dense_linear(x, w, &layer.bias, act)? {
            Some(y) => Ok((y, true)),
            None => Ok((matmul_t(x, w)?, false)),
        },
    )?;
    if fused {
        return Ok(y);
    }
    match act {
        Activation::None => scope("dit.bias", x.device(), || fused::bias_add(y, &layer.bias)),
        Activation::GeluTanh => scope("dit.bias_gelu", x.device(), || {
            fused::bias_gelu(y, &layer.bias)
        }),
    }
}

/// A block linear's weight for a matmul in `dtype` (FP8, GGUF: dequantised now, once per use;
/// FP8 under FP8 matmuls: as held).
fn matmul_weight(layer: &BlockLinear, dtype: DType) -> Result<MatmulWeight<'_>> {
    if let (true, BlockWeight::Fp8(q)) = (layer.fp8_matmul, &layer.weight) {
        return Ok(MatmulWeight::Fp8(q));
    }
    scope("dit.dequantize", layer.bias.device(), || {
        layer.dense_weight(dtype)
    })
    .map(MatmulWeight::Dense)
}

/// `x [.., K] · wᵀ` with w `[N, K]`, as one 2-D matmul over all rows.
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims
        .last()
        .ok_or_else(|| anyhow::anyhow!("matmul of a scalar"))?;
    let rows = x.elem_count() / k;
    let y = x.contiguous()?.reshape((rows, k))?.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    Ok(y.reshape(out)?)
}

/// Tokens per FFN chunk: the hidden activation is chunk × ffn_dim (8192 × 13824 bf16 = 226 MB for a
/// 14B expert instead of 906 MB at 32760 tokens); the matmuls stay large enough to run at full rate.
const FFN_CHUNK_TOKENS: usize = 8192;

/// Which kernel [`attention_blhd`] uses for these inputs (benchmarks report it).
pub fn attention_backend(q: &Tensor, k: &Tensor) -> &'static str {
    if flash::supported(q, k, k) {
        "flash"
    } else {
        "chunked"
    }
}

/// Attention on the layout the projections produce: q [B, Lq, H, d], k/v [B, Lk, H, d] ->
/// [B, Lq, H, d]. The single dispatch point: a fused GPU kernel where one applies, otherwise the
/// chunked [`attention`] (transposes to [B, H, L, d] and back).
pub fn attention_blhd(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    scope("dit.attention_kernel", q.device(), || {
        if flash::supported(q, k, v) {
            flash::attention(q, k, v)
        } else {
            attention_chunked_blhd(q, k, v)
        }
    })
}

fn attention_chunked_blhd(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let bhld = |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(1, 2)?.contiguous()?) };
    let out = attention(&bhld(q)?, &bhld(k)?, &bhld(v)?)?;
    Ok(out.transpose(1, 2)?.contiguous()?)
}

struct Attention {
    to_q: BlockLinear,
    to_k: BlockLinear,
    to_v: BlockLinear,
    to_out: BlockLinear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    heads: usize,
}

impl Attention {
    fn load(wp: &WeightPath, cfg: &DitConfig) -> Result<Self> {
        let d = cfg.dim();
        let rms = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: wp.pp(name).get_as("weight", &[d], DType::F32)?,
                eps: cfg.eps as f32,
            })
        };
        Ok(Self {
            to_q: BlockLinear::load(wp, "to_q", d, d)?,
            to_k: BlockLinear::load(wp, "to_k", d, d)?,
            to_v: BlockLinear::load(wp, "to_v", d, d)?,
            to_out: BlockLinear::load(wp, "to_out.0", d, d)?,
            norm_q: rms("norm_q")?,
            norm_k: rms("norm_k")?,
            heads: cfg.num_attention_heads,
        })
    }

    /// The layer's tensors under their checkpoint names, prefixed (block streaming).
    fn named_tensors(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        for (name, l) in [
            ("to_q", &self.to_q),
            ("to_k", &self.to_k),
            ("to_v", &self.to_v),
            ("to_out.0", &self.to_out),
        ] {
            l.named_tensors(&format!("{prefix}.{name}"), out);
        }
        out.push((
            format!("{prefix}.norm_q.weight"),
            self.norm_q.weight.clone(),
        ));
        out.push((
            format!("{prefix}.norm_k.weight"),
            self.norm_k.weight.clone(),
        ));
    }

    /// [B, L, D] -> [B, heads, L, head_dim]
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        Ok(x.reshape((b, l, self.heads, d / self.heads))?)
    }

    /// Keys and values of a context, computed once per request (cross-attention).
    fn key_value(&self, context: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = self.split_heads(&self.norm_k.forward(&linear_forward(&self.to_k, context)?)?)?;
        let v = self.split_heads(&linear_forward(&self.to_v, context)?)?;
        Ok((k.contiguous()?, v.contiguous()?))
    }

    /// Takes the normalised input by value: it is freed once q, k and v exist, and those once the
    /// attention output exists (the peak is one of these sets, not all of them).
    fn self_attention(&self, x: Tensor, rope: &RopeTable) -> Result<Tensor> {
        // q, k and v read the same input: FP8 matmuls quantise it once for all three.
        let xq = if [&self.to_q, &self.to_k, &self.to_v]
            .iter()
            .all(|l| l.fp8_matmul)
        {
            scope("dit.fp8_quantize", x.device(), || quantize_input(&x))?
        } else {
            None
        };
        let project = |proj: &BlockLinear| -> Result<Tensor> {
            // `xq` is Some only when all three are FP8 matmuls.
            match (&xq, &proj.weight) {
                (Some(xq), BlockWeight::Fp8(w)) => scope("dit.fp8_matmul", x.device(), || {
                    fp8_linear_quantized(&x, xq, w, &proj.bias, Activation::None)
                }),
                _ => linear_forward(proj, &x),
            }
        };
        let norm_rope = |norm: &RmsNorm, proj: &BlockLinear| -> Result<Tensor> {
            let y = project(proj)?;
            scope("dit.rms_rope", x.device(), || {
                fused::rms_norm_rope(&y, &norm.weight, norm.eps, rope, self.heads)
            })
        };
        let q = norm_rope(&self.norm_q, &self.to_q)?;
        let k = norm_rope(&self.norm_k, &self.to_k)?;
        let v = self.split_heads(&project(&self.to_v)?)?;
        drop(xq);
        drop(x);
        let out = attention_blhd(&q, &k, &v)?;
        drop((q, k, v));
        linear_forward(&self.to_out, &out.flatten_from(2)?)
    }

    fn cross_attention(&self, x: &Tensor, kv: &(Tensor, Tensor)) -> Result<Tensor> {
        let q = self.split_heads(&self.norm_q.forward(&linear_forward(&self.to_q, x)?)?)?;
        let out = attention_blhd(&q, &kv.0, &kv.1)?;
        linear_forward(&self.to_out, &out.flatten_from(2)?)
    }
}

struct Block {
    attn1: Attention,
    attn2: Attention,
    norm1: Norm,
    norm2: Option<Norm>,
    norm3: Norm,
    ffn_in: BlockLinear,
    ffn_out: BlockLinear,
    /// [1, 1, 6, D] f32
    scale_shift_table: Tensor,
}

impl Block {
    fn load(wp: &WeightPath, cfg: &DitConfig) -> Result<Self> {
        let d = cfg.dim();
        let norm2 = if cfg.cross_attn_norm {
            let p = wp.pp("norm2");
            Some(Norm {
                affine: Some((
                    p.get_as("weight", &[d], DType::F32)?,
                    p.get_as("bias", &[d], DType::F32)?,
                )),
                eps: cfg.eps as f32,
            })
        } else {
            None
        };
        Ok(Self {
            attn1: Attention::load(&wp.pp("attn1"), cfg)?,
            attn2: Attention::load(&wp.pp("attn2"), cfg)?,
            norm1: Norm::plain(cfg.eps),
            norm2,
            norm3: Norm::plain(cfg.eps),
            ffn_in: BlockLinear::load(wp, "ffn.net.0.proj", d, cfg.ffn_dim)?,
            ffn_out: BlockLinear::load(wp, "ffn.net.2", cfg.ffn_dim, d)?,
            scale_shift_table: wp
                .get_as("scale_shift_table", &[1, 6, d], DType::F32)?
                .unsqueeze(0)?,
        })
    }

    /// Every tensor under the name [`Block::load`] reads it by (relative to `blocks.{i}`).
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        self.attn1.named_tensors("attn1", &mut out);
        self.attn2.named_tensors("attn2", &mut out);
        if let Some((w, b)) = self.norm2.as_ref().and_then(|n| n.affine.as_ref()) {
            out.push(("norm2.weight".into(), w.clone()));
            out.push(("norm2.bias".into(), b.clone()));
        }
        self.ffn_in.named_tensors("ffn.net.0.proj", &mut out);
        self.ffn_out.named_tensors("ffn.net.2", &mut out);
        out.push((
            "scale_shift_table".into(),
            self.scale_shift_table.squeeze(0)?,
        ));
        Ok(out)
    }

    /// Bytes of the block's weights, as held.
    fn bytes(&self) -> Result<usize> {
        Ok(self
            .named_tensors()?
            .iter()
            .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
            .sum())
    }

    /// Rebuilds a block from [`named_tensors`](Self::named_tensors) output (already on its device).
    fn from_tensors(
        tensors: HashMap<String, Tensor>,
        cfg: &DitConfig,
        device: &Device,
        dtype: DType,
        fp8_matmul: bool,
    ) -> Result<Self> {
        let mut dense = HashMap::with_capacity(tensors.len());
        let mut quantized = HashMap::new();
        for (name, t) in tensors {
            match name.split_once(GGUF_TAG) {
                Some((weight, ty)) => {
                    let ty = GgufType::quantized_from_name(ty).ok_or_else(|| {
                        anyhow::anyhow!("streamed block: `{name}` names no GGUF block type")
                    })?;
                    quantized.insert(weight.to_string(), GgufWeight::from_data(ty, t)?);
                }
                None => {
                    dense.insert(name, t);
                }
            }
        }
        let source = MemorySource::new("streamed block", dense).with_quantized(quantized);
        let wm = WeightMap::plain(Box::new(source), device, dtype)?.with_fp8_matmul(fp8_matmul);
        let block = Self::load(&wm.pp(""), cfg)?;
        wm.finish()?;
        Ok(block)
    }

    /// `tproj`: [B, Lt, 6, D] with Lt = 1 (one timestep per sample) or L (per token).
    fn forward(
        &self,
        x: &Tensor,
        tproj: &Tensor,
        rope: &RopeTable,
        kv: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let m = self
            .scale_shift_table
            .broadcast_add(&tproj.to_dtype(DType::F32)?)?; // [B, Lt, 6, D]
        let dev = x.device();
        // Each stage's temporaries live in its own scope, so they are freed before the next
        // stage allocates (the activation peak is one stage's, not the sum of all).
        let x1 = {
            let n = scope("dit.norm_modulate", dev, || {
                self.norm1.forward(x, Some((&m, 0, 1)))
            })?;
            let a = scope("dit.self_attention", dev, || {
                self.attn1.self_attention(n, rope)
            })?;
            scope("dit.gated_add", dev, || fused::gated_add(x, &a, &m, 2))?
        };
        let x2 = {
            let n = match &self.norm2 {
                Some(norm) => scope("dit.norm_modulate", dev, || norm.forward(&x1, None))?,
                None => x1.clone(),
            };
            let c = scope("dit.cross_attention", dev, || {
                self.attn2.cross_attention(&n, kv)
            })?;
            drop(n);
            (&x1 + c)?
        };
        drop(x1);
        let f = scope("dit.ffn", dev, || self.feed_forward(&x2, &m))?;
        scope("dit.gated_add", dev, || fused::gated_add(&x2, &f, &m, 5))
    }

    /// norm3 + modulation, then the FFN, over chunks of tokens: the hidden activation
    /// (tokens × ffn_dim, the largest of the block) is bounded by the chunk.
    fn feed_forward(&self, x: &Tensor, m: &Tensor) -> Result<Tensor> {
        self.feed_forward_chunked(x, m, FFN_CHUNK_TOKENS)
    }

    fn feed_forward_chunked(&self, x: &Tensor, m: &Tensor, chunk: usize) -> Result<Tensor> {
        let (_, l, _) = x.dims3()?;
        // With a table of more than one entry, chunks hold whole entries' runs of tokens (whole
        // latent frames under per-frame timesteps), so each chunk's slice of `m` fits it.
        let entries = m.dim(1)?;
        let run = l / entries;
        let chunk = if entries == 1 {
            chunk
        } else {
            (chunk / run).max(1) * run
        };
        // FP8 weights are dequantised once for all chunks, not once per chunk.
        let w_in = matmul_weight(&self.ffn_in, x.dtype())?;
        let w_out = matmul_weight(&self.ffn_out, x.dtype())?;
        let mut parts = Vec::with_capacity(l.div_ceil(chunk));
        for start in (0..l).step_by(chunk) {
            let len = chunk.min(l - start);
            let xc = x.narrow(1, start, len)?.contiguous()?;
            let mc = if entries == 1 {
                m.clone()
            } else {
                m.narrow(1, start / run, len / run)?
            };
            let n = self.norm3.forward(&xc, Some((&mc, 3, 4)))?;
            let hidden = linear_gelu_with(&self.ffn_in, &w_in, &n)?;
            drop(n);
            parts.push(linear_forward_with(&self.ffn_out, &w_out, &hidden)?);
        }
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        Ok(Tensor::cat(&parts, 1)?)
    }
}

/// Timesteps `[B, lt]` with lt = L, one per token (lt = 1: `[B]`, returned as is), reduced to
/// the fewest rows that carry the same values: `[B]` when all tokens of each sample share one,
/// `[B, frames]` when each latent frame's tokens do (Wan2.2 TI2V: the conditioned first frame at 0, the others at t); otherwise
/// unchanged. The time embedding and the blocks' f32 modulation tables then hold one entry per
/// sample or frame where the reference makes one per token (TI2V-5B at 1280x704x121: 27280 tokens,
/// 3 GiB of tables), with the same values, since each token's entry is computed from its own
/// timestep either way.
fn compact_timesteps(timestep: &Tensor, lt: usize, frames: usize) -> Result<Tensor> {
    if lt == 1 {
        return Ok(timestep.clone());
    }
    let rows: Vec<Vec<f32>> = timestep.to_dtype(DType::F32)?.to_vec2()?;
    let run = lt / frames;
    let uniform = |r: &[f32]| r.iter().all(|v| *v == r[0]);
    let (values, shape): (Vec<f32>, Vec<usize>) = if rows.iter().all(|r| uniform(r)) {
        (rows.iter().map(|r| r[0]).collect(), vec![rows.len()])
    } else if rows.iter().all(|r| r.chunks(run).all(uniform)) {
        let values = rows.iter().flat_map(|r| r.iter().step_by(run).copied());
        (values.collect(), vec![rows.len(), frames])
    } else {
        return Ok(timestep.clone());
    };
    Ok(Tensor::from_vec(values, shape, timestep.device())?.to_dtype(timestep.dtype())?)
}

/// Sinusoidal timestep embedding (diffusers `get_timestep_embedding`, flip_sin_to_cos=True,
/// downscale_freq_shift=0): [cos(t·f_j), sin(t·f_j)], f_j = exp(−ln(10000)·j/half). f32, [N, dim].
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|j| ((-(10000f64.ln()) as f32 * j as f32) / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .flatten_all()?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Ok(Tensor::cat(&[args.cos()?, args.sin()?], 1)?)
}

/// The text context of one expert, computed once per request: the embedded text and the
/// cross-attention keys/values of the blocks on the device. (The two A14B experts have different
/// text-embedding weights, so each expert needs its own.)
pub struct TextContext {
    /// The projected text (after the text embedder), for blocks without precomputed K/V.
    ctx: Tensor,
    /// Cross-attention K/V per block: precomputed for blocks on the device; `None` for streamed
    /// blocks, which project `ctx` when they arrive (512 tokens: cheap), so a streamed model
    /// holds no K/V for blocks that are not on the GPU.
    kv: Vec<Option<(Tensor, Tensor)>>,
}

impl TextContext {
    /// Block `index`'s cross-attention K/V: precomputed, or projected now by `block`.
    fn key_value(&self, index: usize, block: &Block) -> Result<(Tensor, Tensor)> {
        match &self.kv[index] {
            Some(kv) => Ok(kv.clone()),
            None => block.attn2.key_value(&self.ctx),
        }
    }
}

/// Where the transformer blocks live: all on the device, or streamed from host memory.
enum Blocks {
    Resident(Vec<Block>),
    Streamed {
        /// Device copies of the first blocks, kept for the whole run.
        resident: Vec<Block>,
        /// Every block in host memory; those past `resident` are uploaded one by one ahead of use.
        host: Vec<HostBlock>,
        uploader: Uploader,
        prefetch: usize,
    },
}

pub struct WanTransformer {
    cfg: DitConfig,
    patch_weight: Tensor,
    patch_bias: Tensor,
    time_linear_1: Linear,
    time_linear_2: Linear,
    time_proj: Linear,
    text_linear_1: Linear,
    text_linear_2: Linear,
    blocks: Blocks,
    norm_out: Norm,
    /// [1, 1, 2, D] f32
    scale_shift_table: Tensor,
    proj_out: Linear,
    dtype: DType,
    device: Device,
    /// FP8 block linears run as FP8 matmuls (streamed blocks are rebuilt with it).
    fp8_matmul: bool,
}

impl WanTransformer {
    /// Builds the model from a weight map with canonical (diffusers) names; strict: every tensor of
    /// the checkpoint must be used.
    pub fn from_weights(cfg: DitConfig, wm: &WeightMap) -> Result<Self> {
        let d = cfg.dim();
        let root = wm.pp("");
        let ce = root.pp("condition_embedder");
        let [pt, ph, pw] = cfg.patch_size;
        let patch_weight = root
            .get("patch_embedding.weight", &[d, cfg.in_channels, pt, ph, pw])?
            .reshape((d, cfg.in_channels * pt * ph * pw))?;
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::load(&root.pp(format!("blocks.{i}")), &cfg))
            .collect::<Result<Vec<_>>>()?;
        let model = Self {
            patch_weight,
            patch_bias: root.get("patch_embedding.bias", &[d])?,
            time_linear_1: linear(&ce, "time_embedder.linear_1", cfg.freq_dim, d)?,
            time_linear_2: linear(&ce, "time_embedder.linear_2", d, d)?,
            time_proj: linear(&ce, "time_proj", d, 6 * d)?,
            text_linear_1: linear(&ce, "text_embedder.linear_1", cfg.text_dim, d)?,
            text_linear_2: linear(&ce, "text_embedder.linear_2", d, d)?,
            blocks: Blocks::Resident(blocks),
            norm_out: Norm::plain(cfg.eps),
            scale_shift_table: root
                .get_as("scale_shift_table", &[1, 2, d], DType::F32)?
                .unsqueeze(0)?,
            proj_out: linear(&root, "proj_out", d, cfg.out_channels * pt * ph * pw)?,
            dtype: wm.dtype(),
            device: wm.device().clone(),
            fp8_matmul: wm.fp8_matmul(),
            cfg,
        };
        wm.finish()?;
        Ok(model)
    }

    pub fn config(&self) -> &DitConfig {
        &self.cfg
    }

    /// Moves the model to `device` with its blocks streamed (see [`streaming`]): everything but
    /// the blocks, and the first `opts.resident_blocks` blocks, go to the device; the others are
    /// staged in host memory and uploaded `opts.prefetch` blocks ahead during each forward.
    /// Typically built on the CPU first ([`super::load_streamed`]).
    pub fn into_streamed(self, device: &Device, opts: StreamOptions) -> Result<Self> {
        let blocks = match self.blocks {
            Blocks::Resident(b) => b,
            Blocks::Streamed { .. } => anyhow::bail!("the transformer is already streamed"),
        };
        let uploader = Uploader::new(device)?;
        let mut host = Vec::with_capacity(blocks.len());
        for block in blocks {
            let tensors = block.named_tensors()?;
            drop(block); // a device-resident source frees its memory block by block
            host.push(uploader.stage(tensors)?);
        }
        let to = |l: Linear| -> Result<Linear> {
            Ok(Linear::new(
                l.weight().to_device(device)?,
                l.bias().map(|b| b.to_device(device)).transpose()?,
            ))
        };
        let mut model = Self {
            patch_weight: self.patch_weight.to_device(device)?,
            patch_bias: self.patch_bias.to_device(device)?,
            time_linear_1: to(self.time_linear_1)?,
            time_linear_2: to(self.time_linear_2)?,
            time_proj: to(self.time_proj)?,
            text_linear_1: to(self.text_linear_1)?,
            text_linear_2: to(self.text_linear_2)?,
            blocks: Blocks::Streamed {
                resident: Vec::new(),
                host,
                uploader,
                prefetch: opts.prefetch,
            },
            norm_out: self.norm_out,
            scale_shift_table: self.scale_shift_table.to_device(device)?,
            proj_out: to(self.proj_out)?,
            dtype: self.dtype,
            device: device.clone(),
            fp8_matmul: self.fp8_matmul,
            cfg: self.cfg,
        };
        model.set_streaming(opts)?;
        Ok(model)
    }

    /// Changes how many of a streamed model's blocks stay on the device, and the prefetch depth
    /// (the placement planner re-decides this per stage as free memory changes).
    pub fn set_streaming(&mut self, opts: StreamOptions) -> Result<()> {
        let (cfg, device, dtype, fp8_matmul) =
            (&self.cfg, &self.device, self.dtype, self.fp8_matmul);
        let Blocks::Streamed {
            resident,
            host,
            uploader,
            prefetch,
        } = &mut self.blocks
        else {
            anyhow::bail!("set_streaming: the transformer is not streamed");
        };
        let k = opts.resident_blocks.min(host.len());
        resident.truncate(k);
        while resident.len() < k {
            let block = uploader.upload(&host[resident.len()])?;
            uploader.wait_for(&block)?;
            resident.push(Block::from_tensors(
                block.tensors,
                cfg,
                device,
                dtype,
                fp8_matmul,
            )?);
        }
        *prefetch = opts.prefetch;
        Ok(())
    }

    /// Bytes of one transformer block's weights (the first; a GGUF file may quantise some
    /// blocks differently).
    pub fn block_bytes(&self) -> usize {
        match &self.blocks {
            Blocks::Streamed { host, .. } => host.first().map_or(0, HostBlock::bytes),
            Blocks::Resident(b) => b.first().map_or(0, |b| b.bytes().unwrap_or(0)),
        }
    }

    /// Bytes of every weight the transformer holds (streamed blocks in host memory included).
    pub fn weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let lin = |l: &Linear| t(l.weight()) + l.bias().map_or(0, t);
        let non_block = t(&self.patch_weight)
            + t(&self.patch_bias)
            + [
                &self.time_linear_1,
                &self.time_linear_2,
                &self.time_proj,
                &self.text_linear_1,
                &self.text_linear_2,
                &self.proj_out,
            ]
            .into_iter()
            .map(lin)
            .sum::<usize>()
            + t(&self.scale_shift_table);
        let blocks: usize = match &self.blocks {
            Blocks::Resident(b) => b.iter().map(|b| b.bytes().unwrap_or(0)).sum(),
            Blocks::Streamed { host, .. } => host.iter().map(HostBlock::bytes).sum(),
        };
        non_block + blocks
    }

    /// Bytes of block weights kept in host memory (0 when resident).
    pub fn streamed_bytes(&self) -> usize {
        match &self.blocks {
            Blocks::Resident(_) => 0,
            Blocks::Streamed { host, resident, .. } => {
                host[resident.len()..].iter().map(HostBlock::bytes).sum()
            }
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Embeds the text (`encoder_hidden_states` [B, Lt, text_dim]) and precomputes every block's
    /// cross-attention K/V.
    pub fn prepare_context(&self, encoder_hidden_states: &Tensor) -> Result<TextContext> {
        let (_, _, td) = encoder_hidden_states.dims3()?;
        if td != self.cfg.text_dim {
            return Err(invalid!(
                "encoder_hidden_states: last dim is {td}, the transformer's text_dim is {}",
                self.cfg.text_dim
            ));
        }
        let ctx = encoder_hidden_states
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let ctx = self.text_linear_1.forward(&ctx)?.gelu()?;
        let ctx = self.text_linear_2.forward(&ctx)?;
        let on_device = match &self.blocks {
            Blocks::Resident(blocks) => blocks,
            Blocks::Streamed { resident, .. } => resident,
        };
        let mut kv = on_device
            .iter()
            .map(|b| Ok(Some(b.attn2.key_value(&ctx)?)))
            .collect::<Result<Vec<_>>>()?;
        kv.resize(self.cfg.num_layers, None);
        Ok(TextContext { ctx, kv })
    }

    /// Token grid (frames, rows, cols) after patching a latent of shape [B, C, F, H, W].
    pub fn grid(&self, latent_dims: &[usize]) -> Result<[usize; 3]> {
        let [pt, ph, pw] = self.cfg.patch_size;
        let &[_, c, f, h, w] = latent_dims else {
            return Err(invalid!(
                "hidden_states: expected shape [B, C, F, H, W], got {latent_dims:?}"
            ));
        };
        if c != self.cfg.in_channels {
            return Err(invalid!(
                "hidden_states: {c} channels, the transformer takes in_channels = {}",
                self.cfg.in_channels
            ));
        }
        if f % pt != 0 || h % ph != 0 || w % pw != 0 || f == 0 || h == 0 || w == 0 {
            return Err(invalid!(
                "hidden_states: frames/height/width {f}x{h}x{w} must be positive multiples of the patch size {pt}x{ph}x{pw}"
            ));
        }
        Ok([f / pt, h / ph, w / pw])
    }

    /// RoPE tables for a latent shape; compute once per request.
    pub fn rope(&self, latent_dims: &[usize]) -> Result<RopeTable> {
        RopeTable::new(
            self.cfg.attention_head_dim,
            self.grid(latent_dims)?,
            self.cfg.rope_max_seq_len,
            &self.device,
        )
    }

    /// Time embedding of `timestep` [B] or [B, L]: temb [B, Lt, D] and the 6-way modulation
    /// projection [B, Lt, 6, D] (Lt = 1 or L), in the model dtype.
    pub fn time_embedding(&self, timestep: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, lt) = match timestep.dims() {
            [b] => (*b, 1),
            [b, l] => (*b, *l),
            other => {
                return Err(invalid!(
                    "timestep: shape {other:?}, expected [B] or [B, L]"
                ))
            }
        };
        let d = self.cfg.dim();
        let t = timestep.to_device(&self.device)?.flatten_all()?;
        let sinus = timestep_embedding(&t, self.cfg.freq_dim)?.to_dtype(self.dtype)?;
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&sinus)?.silu()?)?;
        let tproj = self.time_proj.forward(&temb.silu()?)?;
        Ok((temb.reshape((b, lt, d))?, tproj.reshape((b, lt, 6, d))?))
    }

    /// Runs block `index` alone (parity tests and debugging).
    pub fn block_forward(
        &self,
        index: usize,
        x: &Tensor,
        tproj: &Tensor,
        rope: &RopeTable,
        context: &TextContext,
    ) -> Result<Tensor> {
        let n = self.cfg.num_layers;
        if index >= n {
            return Err(invalid!("block {index}: the model has {n} blocks"));
        }
        let x = x.to_dtype(self.dtype)?;
        let mut out = None;
        self.for_each_block(|i, b| {
            if i == index {
                out = Some(b.forward(&x, tproj, rope, &context.key_value(index, b)?)?);
            }
            Ok(())
        })?;
        out.ok_or_else(|| anyhow::anyhow!("block {index} was not visited"))
    }

    /// One forward: `x` [B, C, F, H, W], `timestep` [B] or per-token [B, L]. Returns the
    /// prediction [B, C_out, F, H, W] in f32.
    pub fn forward(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        context: &TextContext,
        rope: &RopeTable,
    ) -> Result<Tensor> {
        let mut out = self.forward_many(x, timestep, &[context], rope)?;
        Ok(out.remove(0))
    }

    /// Forwards of the same `x` and `timestep` under several text contexts (CFG's conditional and
    /// unconditional passes), block by block: a streamed block is uploaded once for all of them.
    /// Each result equals [`forward`](Self::forward) with that context alone.
    pub fn forward_many(
        &self,
        x: &Tensor,
        timestep: &Tensor,
        contexts: &[&TextContext],
        rope: &RopeTable,
    ) -> Result<Vec<Tensor>> {
        let dims = x.dims().to_vec();
        let [gf, gh, gw] = self.grid(&dims)?;
        let b = dims[0];
        let l = gf * gh * gw;
        let [pt, ph, pw] = self.cfg.patch_size;
        let c = self.cfg.in_channels;
        if contexts.iter().any(|c| c.kv.len() != self.cfg.num_layers) {
            return Err(invalid!(
                "text context was prepared by a different transformer"
            ));
        }
        if rope.cos.dim(0)? != l {
            return Err(invalid!(
                "RoPE table was built for a different latent shape"
            ));
        }
        // per-sample or per-token timesteps
        let lt = match timestep.dims() {
            [tb] if *tb == b => 1,
            [tb, tl] if *tb == b && *tl == l => l,
            other => {
                return Err(invalid!(
                    "timestep: shape {other:?}, expected [{b}] or per-token [{b}, {l}]"
                ))
            }
        };

        // patch embedding (a Conv3d with kernel = stride = patch) as a matmul over patches
        let x = x.to_device(&self.device)?.to_dtype(self.dtype)?;
        let patches = x
            .reshape(vec![b, c, gf, pt, gh, ph, gw, pw])?
            .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
            .reshape((b, l, c * pt * ph * pw))?;
        let h0 = patches
            .broadcast_matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?;

        let timestep = compact_timesteps(timestep, lt, gf)?;
        let (temb, tproj) = self.time_embedding(&timestep)?;

        let mut hs = vec![h0; contexts.len()];
        self.for_each_block(|i, block| {
            for (h, context) in hs.iter_mut().zip(contexts) {
                *h = block.forward(h, &tproj, rope, &context.key_value(i, block)?)?;
            }
            Ok(())
        })?;
        hs.into_iter()
            .map(|h| self.head(&h, &temb, [b, gf, gh, gw]))
            .collect()
    }

    /// Runs `f` on every block in order: resident blocks directly, streamed ones as they arrive.
    fn for_each_block(&self, mut f: impl FnMut(usize, &Block) -> Result<()>) -> Result<()> {
        match &self.blocks {
            Blocks::Resident(blocks) => {
                for (i, b) in blocks.iter().enumerate() {
                    f(i, b)?;
                }
                Ok(())
            }
            Blocks::Streamed {
                resident,
                host,
                uploader,
                prefetch,
            } => {
                for (i, b) in resident.iter().enumerate() {
                    f(i, b)?;
                }
                let k = resident.len();
                streaming::for_each_streamed(uploader, &host[k..], k, *prefetch, |i, t| {
                    let block = Block::from_tensors(
                        t,
                        &self.cfg,
                        &self.device,
                        self.dtype,
                        self.fp8_matmul,
                    )?;
                    f(i, &block)
                })
            }
        }
    }

    /// Output head: modulated norm, projection, unpatchify; f32 [B, C_out, F, H, W].
    fn head(&self, h: &Tensor, temb: &Tensor, [b, gf, gh, gw]: [usize; 4]) -> Result<Tensor> {
        let [pt, ph, pw] = self.cfg.patch_size;

        let m = self
            .scale_shift_table
            .broadcast_add(&temb.to_dtype(DType::F32)?.unsqueeze(2)?)?; // [B, Lt, 2, D]
        let h = self.norm_out.forward(h, Some((&m, 0, 1)))?;
        let out = self.proj_out.forward(&h)?;
        let co = self.cfg.out_channels;
        debug_assert_eq!(h.dim(2)?, self.cfg.dim());
        let out = out
            .reshape(vec![b, gf, gh, gw, pt, ph, pw, co])?
            .permute(vec![0, 7, 1, 4, 2, 5, 3, 6])?
            .reshape((b, co, gf * pt, gh * ph, gw * pw))?;
        Ok(out.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The token-chunked FFN equals the whole-sequence FFN (per-sample, per-frame-like runs of 6
    /// and 3 tokens, which a chunk of 5 tokens must not split, and per-token modulation).
    #[test]
    fn chunked_feed_forward_matches_whole() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/dit/t2v/transformer");
        let model = crate::dit::load(&dir, &Device::Cpu, DType::F32).unwrap();
        let Blocks::Resident(blocks) = &model.blocks else {
            panic!("resident")
        };
        let d = model.cfg.dim();
        let x = Tensor::randn(0f32, 1.0, (2, 18, d), &Device::Cpu).unwrap();
        for lt in [1, 3, 6, 18] {
            let m = Tensor::randn(0f32, 0.1, (2, lt, 6, d), &Device::Cpu).unwrap();
            let whole = blocks[0].feed_forward_chunked(&x, &m, 1000).unwrap();
            let chunked = blocks[0].feed_forward_chunked(&x, &m, 5).unwrap();
            let e = crate::tensor_util::rel_err(&chunked, &whole).unwrap();
            assert!(e < 1e-6, "lt {lt}: rel err {e}");
        }
    }
}
