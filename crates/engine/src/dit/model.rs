//! The Wan transformer, following diffusers' `WanTransformer3DModel` (names are its checkpoint keys).
//!
//! Precision follows diffusers: matmuls in the model dtype; LayerNorms, the modulation tables and the
//! gated residual adds in f32, cast back to the model dtype after each add.

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;

use super::config::DitConfig;
use super::rope::RopeTable;
use crate::invalid;
use crate::weights::{WeightMap, WeightPath};

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

/// LayerNorm over the last dim in f32, with optional affine parameters.
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl Norm {
    fn plain(d: usize, eps: f64, device: &Device) -> Result<Self> {
        Ok(Self {
            weight: Tensor::ones(d, DType::F32, device)?,
            bias: Tensor::zeros(d, DType::F32, device)?,
            eps: eps as f32,
        })
    }
    /// Returns f32.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            &x.to_dtype(DType::F32)?,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// RMSNorm over the full inner dim (across heads), as `torch.nn.RMSNorm(dim)`.
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let y = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, &self.weight, self.eps)?;
        Ok(y.to_dtype(dtype)?)
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

struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
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
            to_q: linear(wp, "to_q", d, d)?,
            to_k: linear(wp, "to_k", d, d)?,
            to_v: linear(wp, "to_v", d, d)?,
            to_out: linear(wp, "to_out.0", d, d)?,
            norm_q: rms("norm_q")?,
            norm_k: rms("norm_k")?,
            heads: cfg.num_attention_heads,
        })
    }

    /// [B, L, D] -> [B, heads, L, head_dim]
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        Ok(x.reshape((b, l, self.heads, d / self.heads))?)
    }

    fn merge_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, l, dh) = x.dims4()?;
        Ok(x.transpose(1, 2)?.reshape((b, l, h * dh))?)
    }

    /// Keys and values of a context, computed once per request (cross-attention).
    fn key_value(&self, context: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = self.split_heads(&self.norm_k.forward(&self.to_k.forward(context)?)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        Ok((
            k.transpose(1, 2)?.contiguous()?,
            v.transpose(1, 2)?.contiguous()?,
        ))
    }

    fn self_attention(&self, x: &Tensor, rope: &RopeTable) -> Result<Tensor> {
        let q = self.split_heads(&self.norm_q.forward(&self.to_q.forward(x)?)?)?;
        let k = self.split_heads(&self.norm_k.forward(&self.to_k.forward(x)?)?)?;
        let v = self.split_heads(&self.to_v.forward(x)?)?;
        let q = rope.apply(&q)?.transpose(1, 2)?.contiguous()?;
        let k = rope.apply(&k)?.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let out = attention(&q, &k, &v)?;
        self.to_out
            .forward(&self.merge_heads(&out)?)
            .map_err(Into::into)
    }

    fn cross_attention(&self, x: &Tensor, kv: &(Tensor, Tensor)) -> Result<Tensor> {
        let q = self.split_heads(&self.norm_q.forward(&self.to_q.forward(x)?)?)?;
        let q = q.transpose(1, 2)?.contiguous()?;
        let out = attention(&q, &kv.0, &kv.1)?;
        self.to_out
            .forward(&self.merge_heads(&out)?)
            .map_err(Into::into)
    }
}

struct Block {
    attn1: Attention,
    attn2: Attention,
    norm1: Norm,
    norm2: Option<Norm>,
    norm3: Norm,
    ffn_in: Linear,
    ffn_out: Linear,
    /// [1, 1, 6, D] f32
    scale_shift_table: Tensor,
}

impl Block {
    fn load(wp: &WeightPath, cfg: &DitConfig, device: &Device) -> Result<Self> {
        let d = cfg.dim();
        let norm2 = if cfg.cross_attn_norm {
            let p = wp.pp("norm2");
            Some(Norm {
                weight: p.get_as("weight", &[d], DType::F32)?,
                bias: p.get_as("bias", &[d], DType::F32)?,
                eps: cfg.eps as f32,
            })
        } else {
            None
        };
        Ok(Self {
            attn1: Attention::load(&wp.pp("attn1"), cfg)?,
            attn2: Attention::load(&wp.pp("attn2"), cfg)?,
            norm1: Norm::plain(d, cfg.eps, device)?,
            norm2,
            norm3: Norm::plain(d, cfg.eps, device)?,
            ffn_in: linear(wp, "ffn.net.0.proj", d, cfg.ffn_dim)?,
            ffn_out: linear(wp, "ffn.net.2", cfg.ffn_dim, d)?,
            scale_shift_table: wp
                .get_as("scale_shift_table", &[1, 6, d], DType::F32)?
                .unsqueeze(0)?,
        })
    }

    /// `tproj`: [B, Lt, 6, D] with Lt = 1 (one timestep per sample) or L (per token).
    fn forward(
        &self,
        x: &Tensor,
        tproj: &Tensor,
        rope: &RopeTable,
        kv: &(Tensor, Tensor),
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let m = self
            .scale_shift_table
            .broadcast_add(&tproj.to_dtype(DType::F32)?)?;
        let part = |i: usize| -> Result<Tensor> { Ok(m.narrow(2, i, 1)?.squeeze(2)?) };
        let (shift, scale, gate) = (part(0)?, part(1)?, part(2)?);
        let (c_shift, c_scale, c_gate) = (part(3)?, part(4)?, part(5)?);

        let n = modulate(&self.norm1.forward(x)?, &shift, &scale)?.to_dtype(dtype)?;
        let a = self.attn1.self_attention(&n, rope)?;
        let x = gated_add(x, &a, &gate)?;

        let n = match &self.norm2 {
            Some(norm) => norm.forward(&x)?.to_dtype(dtype)?,
            None => x.clone(),
        };
        let x = (&x + self.attn2.cross_attention(&n, kv)?)?;

        let n = modulate(&self.norm3.forward(&x)?, &c_shift, &c_scale)?.to_dtype(dtype)?;
        let f = self.ffn_out.forward(&self.ffn_in.forward(&n)?.gelu()?)?;
        gated_add(&x, &f, &c_gate)
    }
}

/// x·(1 + scale) + shift, all f32, broadcasting [B, Lt, D] over [B, L, D].
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)?)
}

/// (x + y·gate) in f32, cast back to x's dtype.
fn gated_add(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let out = x
        .to_dtype(DType::F32)?
        .add(&y.to_dtype(DType::F32)?.broadcast_mul(gate)?)?;
    Ok(out.to_dtype(dtype)?)
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

/// The text context of one expert, computed once per request: the embedded text and every block's
/// cross-attention keys/values. (The two A14B experts have different text-embedding weights, so
/// each expert needs its own.)
pub struct TextContext {
    kv: Vec<(Tensor, Tensor)>,
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
    blocks: Vec<Block>,
    norm_out: Norm,
    /// [1, 1, 2, D] f32
    scale_shift_table: Tensor,
    proj_out: Linear,
    dtype: DType,
    device: Device,
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
            .map(|i| Block::load(&root.pp(format!("blocks.{i}")), &cfg, wm.device()))
            .collect::<Result<Vec<_>>>()?;
        let model = Self {
            patch_weight,
            patch_bias: root.get("patch_embedding.bias", &[d])?,
            time_linear_1: linear(&ce, "time_embedder.linear_1", cfg.freq_dim, d)?,
            time_linear_2: linear(&ce, "time_embedder.linear_2", d, d)?,
            time_proj: linear(&ce, "time_proj", d, 6 * d)?,
            text_linear_1: linear(&ce, "text_embedder.linear_1", cfg.text_dim, d)?,
            text_linear_2: linear(&ce, "text_embedder.linear_2", d, d)?,
            blocks,
            norm_out: Norm::plain(d, cfg.eps, wm.device())?,
            scale_shift_table: root
                .get_as("scale_shift_table", &[1, 2, d], DType::F32)?
                .unsqueeze(0)?,
            proj_out: linear(&root, "proj_out", d, cfg.out_channels * pt * ph * pw)?,
            dtype: wm.dtype(),
            device: wm.device().clone(),
            cfg,
        };
        wm.finish()?;
        Ok(model)
    }

    pub fn config(&self) -> &DitConfig {
        &self.cfg
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
        let kv = self
            .blocks
            .iter()
            .map(|b| b.attn2.key_value(&ctx))
            .collect::<Result<Vec<_>>>()?;
        Ok(TextContext { kv })
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
        let block = self
            .blocks
            .get(index)
            .ok_or_else(|| invalid!("block {index}: the model has {} blocks", self.blocks.len()))?;
        block.forward(&x.to_dtype(self.dtype)?, tproj, rope, &context.kv[index])
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
        let dims = x.dims().to_vec();
        let [gf, gh, gw] = self.grid(&dims)?;
        let b = dims[0];
        let l = gf * gh * gw;
        let [pt, ph, pw] = self.cfg.patch_size;
        let c = self.cfg.in_channels;
        if context.kv.len() != self.blocks.len() {
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
        let mut h = patches
            .broadcast_matmul(&self.patch_weight.t()?)?
            .broadcast_add(&self.patch_bias)?;

        let (temb, tproj) = self.time_embedding(timestep)?;
        debug_assert_eq!(temb.dim(1)?, lt);

        for (block, kv) in self.blocks.iter().zip(&context.kv) {
            h = block.forward(&h, &tproj, rope, kv)?;
        }

        // head: modulated norm, projection, unpatchify
        let m = self
            .scale_shift_table
            .broadcast_add(&temb.to_dtype(DType::F32)?.unsqueeze(2)?)?;
        let shift = m.narrow(2, 0, 1)?.squeeze(2)?;
        let scale = m.narrow(2, 1, 1)?.squeeze(2)?;
        let h = modulate(&self.norm_out.forward(&h)?, &shift, &scale)?.to_dtype(self.dtype)?;
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
