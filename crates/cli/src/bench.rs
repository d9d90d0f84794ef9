//! `vidgen bench`: full-size random-weight measurements, one JSON line each, at the shapes of
//! `shared/anchors/diffusers_wan_bench.py` so both can run in one device call and be compared as
//! ratios. Timings synchronise the device around each repetition and report the median; memory is
//! the device pool's high-water mark (exact, see `vidgen_engine::device::gpu_memory`).

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use vidgen_engine::device::{gpu_memory, parse_device, parse_dtype};
use vidgen_engine::dit::{self, flash, DitConfig, WanTransformer};
use vidgen_engine::invalid;
use vidgen_engine::memory;
use vidgen_engine::vae::{TileConfig, VaeConfig, WanVae};
use vidgen_engine::weights::{GgufType, GgufWeight, MemorySource, WeightMap};

#[derive(clap::Args)]
pub struct Args {
    /// What to measure, comma-separated: attention, dit, vae, check (bf16 vs f32 full-size forward),
    /// stream (block streaming under `--budgets` vs resident), fp8 (FP8 block linears vs bf16:
    /// device vs CPU bytes, memory, time, error).
    #[arg(long, default_value = "attention,dit,vae")]
    what: String,
    /// VAE decode modes, comma-separated: plain, tiled.
    #[arg(long, default_value = "plain,tiled")]
    vae_modes: String,
    /// Tile geometries of the tiled decode, comma-separated SIZE:OVERLAP or WIDTHxHEIGHT:OVERLAP
    /// in pixels (the default: diffusers' and the pipeline's; `memory::tiled_decode` names the
    /// pipeline's per VAE).
    #[arg(long, default_value = "256:64,384:64")]
    vae_tiles: String,
    /// Frames per pass through the VAE decoder's full-resolution levels, comma-separated (0: a
    /// whole chunk at once, as diffusers does; the pipeline's tiled Wan2.1 decode runs 2); every
    /// decode is timed with each.
    #[arg(long, default_value = "0,2")]
    vae_pass_frames: String,
    /// DiT models, comma-separated: wan2.1-1.3b, wan2.2-ti2v-5b, wan-a14b-expert.
    #[arg(long, default_value = "wan2.1-1.3b,wan2.2-ti2v-5b,wan-a14b-expert")]
    models: String,
    /// VAEs, comma-separated: wan2.1-vae, wan2.2-vae.
    #[arg(long, default_value = "wan2.1-vae,wan2.2-vae")]
    vaes: String,
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Compute dtype of the DiT, attention and VAE: bf16 (the anchors' dtype) or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Timed repetitions (the median is reported) after `--warmup` untimed ones.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Override every model's native size (WxH) and frame count: small smoke runs on the CPU.
    #[arg(long)]
    size: Option<String>,
    #[arg(long)]
    frames: Option<u32>,
    /// GPU memory budgets (GiB) for `--what stream`, comma-separated.
    #[arg(long, default_value = "24,12,8,4")]
    budgets: String,
    /// Blocks uploaded ahead of the computing one when streaming.
    #[arg(long, default_value_t = 1)]
    prefetch: usize,
    /// Transformer block linears for `dit` and `stream`: dense (in `--dtype`), or a GGUF block
    /// format (q8_0, q6_k, q5_k, q4_k, q4_0, ...) kept quantised on the device as a GGUF file's
    /// are. The random weights are quantised on the CPU (seconds for 1.3B, slow for 14B); `dit`
    /// then runs the dense forward too and reports the error against it, and first checks the
    /// device dequantisation of every block type against the CPU's, bit for bit (±0 equal).
    #[arg(long, default_value = "dense")]
    weights: String,
    /// Attention benchmark shape: sequence length and heads (head_dim is 128).
    #[arg(long, default_value_t = 32760)]
    attention_seq: usize,
    #[arg(long, default_value_t = 40)]
    attention_heads: usize,
}

/// A DiT benchmark model: its config and native output size.
struct DitCase {
    name: &'static str,
    /// The configuration the planner knows it by.
    preset: &'static str,
    config: DitConfig,
    size: (usize, usize),
    frames: usize,
    vae_stride: usize,
}

fn dit_cases() -> Vec<DitCase> {
    vec![
        DitCase {
            name: "wan2.1-1.3b",
            preset: "wan2.1-t2v-1.3b",
            config: DitConfig::wan21_1_3b(),
            size: (832, 480),
            frames: 81,
            vae_stride: 8,
        },
        DitCase {
            name: "wan2.2-ti2v-5b",
            preset: "wan2.2-ti2v-5b",
            config: DitConfig::wan22_ti2v_5b(),
            size: (1280, 704),
            frames: 121,
            vae_stride: 16,
        },
        DitCase {
            name: "wan-a14b-expert",
            preset: "wan2.2-t2v-a14b",
            config: DitConfig::wan_14b(16),
            size: (832, 480),
            frames: 81,
            vae_stride: 8,
        },
    ]
}

struct VaeCase {
    name: &'static str,
    config: VaeConfig,
    size: (usize, usize),
    frames: usize,
}

fn vae_cases() -> Vec<VaeCase> {
    vec![
        VaeCase {
            name: "wan2.1-vae",
            config: VaeConfig::wan21(),
            size: (832, 480),
            frames: 81,
        },
        VaeCase {
            name: "wan2.2-vae",
            config: VaeConfig::wan22(),
            size: (1280, 704),
            frames: 121,
        },
    ]
}

fn pick<'a, T>(
    list: &'a [T],
    wanted: &str,
    name: impl Fn(&T) -> &str,
    field: &str,
) -> Result<Vec<&'a T>> {
    wanted
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|w| {
            list.iter().find(|c| name(c) == w).ok_or_else(|| {
                let valid: Vec<&str> = list.iter().map(&name).collect();
                invalid!("--{field}: `{w}` is not one of {}", valid.join(", "))
            })
        })
        .collect()
}

struct Bench {
    device: Device,
    dtype: DType,
    /// `--weights`: block linears kept in this GGUF block format.
    quant: Option<GgufType>,
    reps: usize,
    warmup: usize,
    size: Option<(usize, usize)>,
    frames: Option<usize>,
}

/// Values of `a` and `b` (any device; compared as f32, which every model dtype converts to
/// exactly) that differ, and those that differ only in the sign of zero
/// ([`vidgen_engine::tensor_util::dequantized_mismatches`]).
fn value_mismatches(a: &Tensor, b: &Tensor) -> Result<(usize, usize)> {
    let values = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?)
    };
    Ok(vidgen_engine::tensor_util::dequantized_mismatches(
        &values(a)?,
        &values(b)?,
    ))
}

fn emit(line: Value) {
    println!("{line}");
}

/// With `VIDGEN_PROFILE=1`: the per-scope table of the measurement just made (warm-up included).
fn emit_profile(what: &str, model: &str) {
    let table = vidgen_engine::profile::take();
    if table.is_empty() {
        return;
    }
    let scopes: serde_json::Map<String, Value> = table
        .into_iter()
        .map(|(name, s)| {
            let scope = json!({"seconds": s.seconds, "calls": s.calls, "working_gib": gib(s.working_bytes)});
            (name.to_string(), scope)
        })
        .collect();
    emit(json!({"what": "profile", "of": what, "model": model, "scopes": scopes}));
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

impl Bench {
    /// Median seconds of `reps` synchronised runs after `warmup` ones, and the device pool's peak
    /// over all of them (None on the CPU).
    fn time(&self, mut f: impl FnMut() -> Result<()>) -> Result<(f64, Option<f64>)> {
        for _ in 0..self.warmup {
            f()?;
        }
        self.device.synchronize()?;
        gpu_memory::reset_peak(&self.device)?;
        let mut times = Vec::with_capacity(self.reps);
        for _ in 0..self.reps.max(1) {
            let t0 = Instant::now();
            f()?;
            self.device.synchronize()?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let peak = gpu_memory::usage(&self.device)?.map(|u| gib(u.peak));
        Ok((times[times.len() / 2], peak))
    }

    fn shape(&self, native: (usize, usize), frames: usize) -> ((usize, usize), usize) {
        (self.size.unwrap_or(native), self.frames.unwrap_or(frames))
    }

    /// The fused kernels available here: cuDNN's and ours on a GPU (bf16), else the dispatcher's
    /// choice (the chunked attention).
    fn attention_kernels(&self) -> Vec<Option<flash::Kernel>> {
        if self.device.is_cuda() && self.dtype == DType::BF16 {
            [flash::Kernel::Cudnn, flash::Kernel::CudnnFp8]
                .into_iter()
                .chain(flash::Tile::ALL.map(flash::Kernel::Own))
                .map(Some)
                .collect()
        } else {
            vec![None]
        }
    }

    /// One attention with `kernel` (`None`: the dispatcher); `Ok(None)` if cuDNN has no plan.
    fn attention_once(
        kernel: Option<flash::Kernel>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Option<Tensor>> {
        match kernel {
            Some(kernel) => flash::attention_with(kernel, q, k, v),
            None => dit::model::attention_blhd(q, k, v).map(Some),
        }
    }

    fn kernel_name(kernel: Option<flash::Kernel>, q: &Tensor, k: &Tensor) -> &'static str {
        kernel.map_or_else(|| dit::model::attention_backend(q, k), |k| k.name())
    }

    /// Each kernel against the chunked attention in f32 on the same (rounded) inputs, at odd
    /// lengths and the cross-attention shape; fresh random inputs each case. The last case has
    /// a Wan self-attention's length and keys and values that share one component, as a Wan
    /// block's do (about 0.2 of their RMS, measured on the A14B's): the FP8 P·V product
    /// accumulated such a component over 32760 keys to 1.47e-1 error inside the A14B (2.8e-2
    /// at its 512 text keys), which is why v's mean is now taken out first (GPU only).
    fn attention_check(&self) -> Result<()> {
        for kernel in self.attention_kernels() {
            for (lq, lk, heads, shared) in [
                (1, 1, 2, 0.0),
                (17, 17, 3, 0.0),
                (513, 513, 4, 0.0),
                (4096, 512, 8, 0.0),
                (3000, 4099, 5, 0.0),
                (32760, 512, 2, 0.0),
                (32760, 32760, 2, 0.2),
            ] {
                if lk > 4099 && !self.device.is_cuda() {
                    // Minutes per kernel on a CPU; the case is about the GPU's FP8 kernel.
                    continue;
                }
                let q = rand(&[1, lq, heads, 128], self.dtype, &self.device)?;
                let with_shared = |t: Tensor| -> Result<Tensor> {
                    if shared == 0.0 {
                        return Ok(t);
                    }
                    let component =
                        (rand(&[1, 1, heads, 128], DType::F32, &self.device)? * shared)?;
                    Ok(t.to_dtype(DType::F32)?
                        .broadcast_add(&component)?
                        .to_dtype(self.dtype)?)
                };
                let k = with_shared(rand(&[1, lk, heads, 128], self.dtype, &self.device)?)?;
                let v = with_shared(rand(&[1, lk, heads, 128], self.dtype, &self.device)?)?;
                let backend = Self::kernel_name(kernel, &q, &k);
                let Some(ours) = Self::attention_once(kernel, &q, &k, &v)? else {
                    emit(json!({
                        "what": "attention_check", "backend": backend, "lq": lq, "lk": lk,
                        "heads": heads, "shared_component": shared, "available": false,
                    }));
                    continue;
                };
                let ours = ours.to_dtype(DType::F32)?;
                let f = |t: &Tensor| t.to_dtype(DType::F32);
                let reference = dit::model::attention_blhd(&f(&q)?, &f(&k)?, &f(&v)?)?;
                let err = vidgen_engine::tensor_util::rel_err(&ours, &reference)?;
                emit(json!({
                    "what": "attention_check", "backend": backend, "lq": lq, "lk": lk, "heads": heads,
                    "shared_component": shared, "rel_err_vs_f32": err,
                    "finite": ours.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite()),
                }));
            }
        }
        Ok(())
    }

    fn attention(&self, seq: usize, heads: usize) -> Result<()> {
        self.attention_check()?;
        let d = 128;
        // [B, L, H, d], the layout the transformer produces.
        let q = rand(&[1, seq, heads, d], self.dtype, &self.device)?;
        let k = rand(&[1, seq, heads, d], self.dtype, &self.device)?;
        let v = rand(&[1, seq, heads, d], self.dtype, &self.device)?;
        let flops = 4.0 * (heads * seq * seq * d) as f64;
        for kernel in self.attention_kernels() {
            let backend = Self::kernel_name(kernel, &q, &k);
            if Self::attention_once(kernel, &q, &k, &v)?.is_none() {
                emit(
                    json!({"what": "attention", "backend": backend, "seq": seq, "available": false}),
                );
                continue;
            }
            let (seconds, peak) = self.time(|| {
                Self::attention_once(kernel, &q, &k, &v)?;
                Ok(())
            })?;
            emit(json!({
                "what": "attention", "backend": backend, "seq": seq, "heads": heads, "head_dim": d,
                "dtype": format!("{:?}", self.dtype).to_lowercase(), "seconds": seconds,
                "tflops": flops / seconds / 1e12, "peak_gib": peak,
                "cudnn_version": vidgen_engine::dit::cudnn_attention::cudnn_version(),
            }));
        }
        Ok(())
    }

    fn dit_forward(&self, case: &DitCase) -> Result<()> {
        if let Some(ty) = self.quant {
            return self.gguf_forward(case, ty);
        }
        let cfg = &case.config;
        let ((w, h), frames) = self.shape(case.size, case.frames);
        let model = random_transformer(cfg, &self.device, self.dtype, None)?;
        let (x, text, t) = self.forward_inputs(case)?;
        let context = model.prepare_context(&text)?;
        let rope = model.rope(x.dims())?;
        let [gf, gh, gw] = model.grid(x.dims())?;
        let tokens = gf * gh * gw;
        let (seconds, peak) = self.time(|| {
            model.forward(&x, &t, &context, &rope)?;
            Ok(())
        })?;
        let flops = dit_flops(cfg, tokens, 512);
        let elem = self.dtype.size_in_bytes() as u64;
        let predicted = param_count(cfg) as u64 * elem
            + memory::dit_activations(memory::known_model(case.preset)?, tokens, 1, elem);
        emit(json!({
            "what": "dit_forward", "model": case.name, "size": format!("{w}x{h}"), "frames": frames,
            "latent": x.dims(), "tokens": tokens, "params": param_count(cfg),
            "dtype": format!("{:?}", self.dtype).to_lowercase(), "seconds": seconds,
            "peak_gib": peak, "predicted_peak_gib": predicted as f64 / memory::GIB,
            "tflops": flops / seconds / 1e12,
        }));
        Ok(())
    }

    /// Full-size forward in the bench dtype vs f32 on the same device and the same weights
    /// (issue: within 2e-2 relative).
    fn check(&self, case: &DitCase) -> Result<()> {
        let cfg = &case.config;
        let ((w, h), frames) = self.shape(case.size, case.frames);
        let (x, text, t) = self.forward_inputs(case)?;
        let weights = dit::random::random_weights_on_device(cfg, 7, &self.device, DType::F32)?;
        let run =
            |weights: std::collections::HashMap<String, Tensor>, dtype: DType| -> Result<Tensor> {
                let source = MemorySource::new("random transformer", weights);
                let model = WanTransformer::from_weights(
                    cfg.clone(),
                    &WeightMap::plain(Box::new(source), &self.device, dtype)?,
                )?;
                let context = model.prepare_context(&text)?;
                let rope = model.rope(x.dims())?;
                model.forward(&x, &t, &context, &rope)
            };
        // The low-precision copy is made first, so the f32 weights can be given away to the f32 run.
        let low: std::collections::HashMap<String, Tensor> = weights
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_dtype(self.dtype)?)))
            .collect::<Result<_>>()?;
        let reference = run(weights, DType::F32)?;
        let ours = run(low, self.dtype)?;
        let err = vidgen_engine::tensor_util::rel_err(&ours, &reference)?;
        emit(json!({
            "what": "dit_dtype_check", "model": case.name, "size": format!("{w}x{h}"), "frames": frames,
            "dtype": format!("{:?}", self.dtype).to_lowercase(), "rel_err_vs_f32": err,
            "limit": 2e-2, "pass": err <= 2e-2,
        }));
        Ok(())
    }

    /// FP8 quantisation and dequantisation on the device against the CPU path, on one FFN-sized
    /// weight: the bytes and the dequantised values must be identical.
    fn fp8_kernels(&self) -> Result<()> {
        use vidgen_engine::weights::fp8::{Fp8Granularity, Fp8Weight};
        let w = rand(&[5120, 13824], DType::F32, &self.device)?;
        let w_cpu = w.to_device(&Device::Cpu)?;
        for granularity in [Fp8Granularity::PerChannel, Fp8Granularity::PerTensor] {
            let (gpu, q_seconds) = self.synced(|| Fp8Weight::quantize(&w, granularity))?;
            let cpu = Fp8Weight::quantize(&w_cpu, granularity)?;
            // FP8 bytes and dequantised values must match exactly, the sign of a zero included.
            let every = |(differ, zero_sign): (usize, usize)| differ + zero_sign;
            let byte_mismatches = every(value_mismatches(gpu.weight(), cpu.weight())?);
            let (dequant, dequant_seconds) = self
                .dequantize_vs_cpu(|dtype| gpu.dequantize(dtype), |dtype| cpu.dequantize(dtype))?;
            let dequant_mismatches = every(dequant);
            let err = vidgen_engine::tensor_util::rel_err(&gpu.dequantize(DType::F32)?, &w)?;
            emit(json!({
                "what": "fp8_kernels", "granularity": format!("{granularity:?}"),
                "shape": [5120, 13824], "byte_mismatches_vs_cpu": byte_mismatches,
                "dequant_mismatches_vs_cpu": dequant_mismatches, "rel_err_vs_f32": err,
                "quantize_seconds": q_seconds, "dequantize_bf16_seconds": dequant_seconds,
                "pass": byte_mismatches == 0 && dequant_mismatches == 0,
            }));
        }
        self.fp8_matmul_kernels()
    }

    /// The FP8 matmul on the device against the CPU's: per-token quantisation (bytes and scales
    /// identical), the product (the same quantised values multiplied in f32 on the CPU: only the
    /// accumulation order and the bf16 rounding of the product differ) and the timing against the
    /// bf16 matmul + bias at the A14B expert's shapes (all 32760 tokens; the FFN's 8192-token
    /// chunk).
    fn fp8_matmul_kernels(&self) -> Result<()> {
        use vidgen_engine::weights::fp8::{Fp8Granularity, Fp8Weight};
        use vidgen_engine::weights::fp8_matmul::{fp8_linear, quantize_rows, Activation};
        let cpu = Device::Cpu;
        // Rows of very different ranges, so the per-row scales matter.
        let row_scale = Tensor::arange(0f32, 515.0, &cpu)?
            .affine(0.02, -5.0)?
            .exp()?
            .reshape((515, 1))?;
        let x_cpu = rand(&[515, 5120], DType::F32, &cpu)?
            .broadcast_mul(&row_scale)?
            .to_dtype(self.dtype)?;
        let x = x_cpu.to_device(&self.device)?;
        let (gpu_q, cpu_q) = (quantize_rows(&x)?, quantize_rows(&x_cpu)?);
        let every = |(differ, zero_sign): (usize, usize)| differ + zero_sign;
        let byte_mismatches = every(value_mismatches(gpu_q.weight(), cpu_q.weight())?);
        let scale_mismatches = every(value_mismatches(gpu_q.scale(), cpu_q.scale())?);
        let w_cpu = rand(&[1536, 5120], DType::F32, &cpu)?;
        let b_cpu = rand(&[1536], DType::F32, &cpu)?;
        let wq_cpu = Fp8Weight::quantize(&w_cpu, Fp8Granularity::PerChannel)?;
        let wq = wq_cpu.to_device(&self.device)?;
        let b = b_cpu.to_device(&self.device)?;
        let mut errors = serde_json::Map::new();
        for (name, act) in [("linear", Activation::None), ("gelu", Activation::GeluTanh)] {
            let gpu = fp8_linear(&x, &wq, &b, act)?;
            let reference = fp8_linear(&x_cpu, &wq_cpu, &b_cpu, act)?;
            let err = vidgen_engine::tensor_util::rel_err(
                &gpu.to_device(&cpu)?.to_dtype(DType::F32)?,
                &reference.to_dtype(DType::F32)?,
            )?;
            errors.insert(name.into(), json!(err));
        }
        let pass = byte_mismatches == 0
            && scale_mismatches == 0
            && errors
                .values()
                .all(|e| e.as_f64().is_some_and(|e| e <= 1e-2));
        emit(json!({
            "what": "fp8_matmul_kernels", "rows": 515, "k": 5120, "out": 1536,
            "quantized_byte_mismatches_vs_cpu": byte_mismatches,
            "scale_mismatches_vs_cpu": scale_mismatches,
            "rel_err_vs_cpu": errors, "limit": 1e-2, "pass": pass,
            "fast_accum": std::env::var("VIDGEN_FP8_FAST_ACCUM").is_ok_and(|v| v == "1"),
        }));
        if !self.device.is_cuda() {
            return Ok(());
        }
        for (rows, k, out) in [
            (32760, 5120, 5120),
            (8192, 5120, 13824),
            (8192, 13824, 5120),
        ] {
            let x = rand(&[rows, k], self.dtype, &self.device)?;
            let w = rand(&[out, k], self.dtype, &self.device)?;
            let b = rand(&[out], DType::F32, &self.device)?;
            let wq = Fp8Weight::quantize(&w, Fp8Granularity::PerChannel)?;
            let flops = 2.0 * (rows * k * out) as f64;
            let (bf16_seconds, _) = self.time(|| {
                let y = x.matmul(&w.t()?)?;
                dit::fused::bias_add(y, &b)?;
                Ok(())
            })?;
            let (fp8_seconds, _) = self.time(|| {
                fp8_linear(&x, &wq, &b, Activation::None)?;
                Ok(())
            })?;
            let err = vidgen_engine::tensor_util::rel_err(
                &fp8_linear(&x, &wq, &b, Activation::None)?.to_dtype(DType::F32)?,
                &dit::fused::bias_add(x.matmul(&w.t()?)?, &b)?.to_dtype(DType::F32)?,
            )?;
            emit(json!({
                "what": "fp8_matmul_speed", "rows": rows, "k": k, "out": out,
                "bf16_seconds": bf16_seconds, "bf16_tflops": flops / bf16_seconds / 1e12,
                "fp8_seconds": fp8_seconds, "fp8_tflops": flops / fp8_seconds / 1e12,
                "speedup": bf16_seconds / fp8_seconds, "rel_err_vs_bf16": err,
            }));
        }
        Ok(())
    }

    /// A weight format's dequantisation on the device against the CPU's, in bf16 and in f32:
    /// values that differ and those that differ only in the sign of zero (both dtypes together,
    /// see [`value_mismatches`]), and the bf16 call's time.
    fn dequantize_vs_cpu(
        &self,
        on_device: impl Fn(DType) -> Result<Tensor>,
        on_cpu: impl Fn(DType) -> Result<Tensor>,
    ) -> Result<((usize, usize), f64)> {
        let mut mismatches = (0, 0);
        let mut bf16_seconds = 0.0;
        for dtype in [DType::BF16, DType::F32] {
            let (device_values, seconds) = self.synced(|| on_device(dtype))?;
            if dtype == DType::BF16 {
                bf16_seconds = seconds;
            }
            let (differ, zero_sign) = value_mismatches(&device_values, &on_cpu(dtype)?)?;
            mismatches = (mismatches.0 + differ, mismatches.1 + zero_sign);
        }
        Ok((mismatches, bf16_seconds))
    }

    /// `f`'s result and its wall time with the device idle before and after.
    fn synced<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
        self.device.synchronize()?;
        let t0 = Instant::now();
        let out = f()?;
        self.device.synchronize()?;
        Ok((out, t0.elapsed().as_secs_f64()))
    }

    /// Random f32 inputs of one forward at the case's size: latents, 512 text tokens, t = 500.
    fn forward_inputs(&self, case: &DitCase) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = &case.config;
        let ((w, h), frames) = self.shape(case.size, case.frames);
        let latent = [
            1,
            cfg.in_channels,
            (frames - 1) / 4 + 1,
            h / case.vae_stride,
            w / case.vae_stride,
        ];
        Ok((
            rand(&latent, DType::F32, &self.device)?,
            rand(&[1, 512, cfg.text_dim], DType::F32, &self.device)?,
            Tensor::new(&[500f32], &self.device)?,
        ))
    }

    /// GPU memory in use now (GiB; 0 on the CPU), after the queued work has finished.
    fn used_gib(&self) -> Result<f64> {
        self.device.synchronize()?;
        Ok(gpu_memory::usage(&self.device)?.map_or(0.0, |u| gib(u.used)))
    }

    /// The same random weights as bf16, with FP8 block linears (per-channel scales) dequantised
    /// for bf16 matmuls, and as FP8 matmuls: weight memory, forward time and the error against
    /// bf16.
    fn fp8_forward(&self, case: &DitCase) -> Result<()> {
        let cfg = &case.config;
        let ((w, h), frames) = self.shape(case.size, case.frames);
        let (x, text, t) = self.forward_inputs(case)?;
        let used = || self.used_gib();
        let mut outputs = Vec::new();
        let mut rows = vec![
            ("bf16", false, false, None),
            ("fp8", true, false, None),
            ("fp8-matmul", true, true, None),
        ];
        if self.device.is_cuda() {
            // FP8 attention (cuDNN), alone and with FP8 linears.
            let fp8_attention = Some(flash::Kernel::CudnnFp8);
            rows.extend([
                ("bf16", false, false, fp8_attention),
                ("fp8-matmul", true, true, fp8_attention),
            ]);
        }
        for (linears, fp8, fp8_matmul, attention) in rows {
            let before = used()?;
            let weights = dit::random::random_weights_on_device(cfg, 7, &self.device, self.dtype)?;
            let source = MemorySource::new("random transformer", weights);
            let map = WeightMap::plain(Box::new(source), &self.device, self.dtype)?
                .with_fp8_linears(fp8)
                .with_fp8_matmul(fp8_matmul);
            let model = WanTransformer::from_weights(cfg.clone(), &map)?;
            drop(map);
            let model_gib = used()? - before;
            let context = model.prepare_context(&text)?;
            let rope = model.rope(x.dims())?;
            let mut out = None;
            let preferred = attention.map_or_else(flash::preferred, Ok)?;
            let (seconds, peak) = flash::with_preferred(preferred, || {
                self.time(|| {
                    out = Some(model.forward(&x, &t, &context, &rope)?);
                    Ok(())
                })
            })?;
            let out = out.expect("ran at least once").to_dtype(DType::F32)?;
            let err = match outputs.first() {
                Some(reference) => Some(vidgen_engine::tensor_util::rel_err(&out, reference)?),
                None => None,
            };
            emit(json!({
                "what": "fp8_forward", "model": case.name, "size": format!("{w}x{h}"),
                "frames": frames, "linears": linears, "attention": preferred.name(),
                "model_gib": model_gib, "seconds": seconds, "peak_gib": peak,
                "rel_err_vs_bf16": err,
            }));
            drop(model);
            outputs.push(out);
        }
        Ok(())
    }

    /// GGUF dequantisation on the device against the CPU path, for every block type, on one
    /// FFN-sized weight of the 1.3B model: the f32 and bf16 values must be identical (±0 equal;
    /// sign-of-zero differences are counted apart). A type whose check fails gets a line with
    /// its error, and the other types are still checked.
    fn gguf_kernels(&self) -> Result<()> {
        let shape = [8960, 1536];
        let w = rand(&shape, DType::F32, &Device::Cpu)?;
        for ty in GgufType::QUANTIZED {
            let check = || -> Result<Value> {
                let t0 = Instant::now();
                let cpu = GgufWeight::quantize(&w, ty)?;
                let quantize_seconds = t0.elapsed().as_secs_f64();
                let dev = cpu.to_device(&self.device)?;
                let ((differ, zero_sign), dequant_seconds) = self.dequantize_vs_cpu(
                    |dtype| dev.dequantize(dtype),
                    |dtype| cpu.dequantize(dtype),
                )?;
                let err = vidgen_engine::tensor_util::rel_err(&cpu.dequantize(DType::F32)?, &w)?;
                Ok(json!({
                    "bytes": dev.storage_bytes(), "dequant_mismatches_vs_cpu": differ,
                    "zero_sign_differences": zero_sign, "rel_err_vs_f32": err,
                    "quantize_cpu_seconds": quantize_seconds,
                    "dequantize_bf16_seconds": dequant_seconds, "pass": differ == 0,
                }))
            };
            let mut line =
                check().unwrap_or_else(|e| json!({"error": format!("{e:#}"), "pass": false}));
            line["what"] = json!("gguf_kernels");
            line["type"] = json!(ty.name());
            line["shape"] = json!(shape);
            emit(line);
        }
        Ok(())
    }

    /// The same random weights dense and with the block linears kept in GGUF block format `ty`:
    /// weight memory (measured and planned), forward time and peak, and the quantised output's
    /// error against the dense one.
    fn gguf_forward(&self, case: &DitCase, ty: GgufType) -> Result<()> {
        let cfg = &case.config;
        let ((w, h), frames) = self.shape(case.size, case.frames);
        let (x, text, t) = self.forward_inputs(case)?;
        let used = || self.used_gib();
        let dtype = format!("{:?}", self.dtype).to_lowercase();
        let preset = memory::known_model(case.preset)?;
        let mut reference: Option<Tensor> = None;
        for quant in [None, Some(ty)] {
            let before = used()?;
            let weights = dit::random::random_weights_on_device(cfg, 7, &self.device, self.dtype)?;
            let t0 = Instant::now();
            let source = match quant {
                Some(ty) => quantized_source(weights, ty)?,
                None => MemorySource::new("random transformer", weights),
            };
            let quantize_seconds = quant.map(|_| t0.elapsed().as_secs_f64());
            let map = WeightMap::plain(Box::new(source), &self.device, self.dtype)?;
            let model = WanTransformer::from_weights(cfg.clone(), &map)?;
            drop(map);
            let model_gib = used()? - before;
            let context = model.prepare_context(&text)?;
            let rope = model.rope(x.dims())?;
            let [gf, gh, gw] = model.grid(x.dims())?;
            let tokens = gf * gh * gw;
            let mut out = None;
            let (seconds, peak) = self.time(|| {
                out = Some(model.forward(&x, &t, &context, &rope)?);
                Ok(())
            })?;
            let out = out.expect("ran at least once").to_dtype(DType::F32)?;
            let format = match quant {
                Some(ty) => memory::WeightFormat::Gguf(ty),
                None if self.dtype == DType::F32 => memory::WeightFormat::F32,
                None => memory::WeightFormat::Bf16,
            };
            let planned = memory::DitWeights::of_config(cfg, format);
            let elem = self.dtype.size_in_bytes() as u64;
            let predicted_peak = planned.total
                + planned.dequantize_workspace
                + memory::dit_activations(preset, tokens, 1, elem);
            let mut line = json!({
                "what": "gguf_forward", "model": case.name, "size": format!("{w}x{h}"),
                "frames": frames, "dtype": dtype,
                "linears": quant.map_or(dtype.clone(), |q| q.name().to_string()),
                "model_gib": model_gib, "planned_model_gib": planned.total as f64 / memory::GIB,
                "seconds": seconds, "peak_gib": peak,
                "predicted_peak_gib": predicted_peak as f64 / memory::GIB,
                "quantize_cpu_seconds": quantize_seconds,
            });
            if let Some(reference) = &reference {
                line[format!("rel_err_vs_{dtype}")] =
                    json!(vidgen_engine::tensor_util::rel_err(&out, reference)?);
            }
            emit(line);
            drop((model, context));
            reference.get_or_insert(out);
        }
        Ok(())
    }

    /// Resident forward, then the same weights streamed from pinned host memory under each budget:
    /// blocks kept resident = what fits beside the non-block weights, the activations measured in
    /// the resident run and `prefetch + 1` blocks in flight. Output must be bit-identical.
    fn stream(&self, case: &DitCase, budgets: &[f64], prefetch: usize) -> Result<()> {
        let cfg = &case.config;
        let model = random_transformer(cfg, &self.device, self.dtype, self.quant)?;
        let (x, text, t) = self.forward_inputs(case)?;
        let rope = model.rope(x.dims())?;
        let context = model.prepare_context(&text)?;
        let (resident_s, resident_peak) = self.time(|| {
            model.forward(&x, &t, &context, &rope)?;
            Ok(())
        })?;
        let reference = model.forward(&x, &t, &context, &rope)?;
        let weights = model.weight_bytes();
        let block = model.block_bytes();
        let non_block = weights - block * cfg.num_layers;
        let peak = resident_peak.unwrap_or(0.0) * (1u64 << 30) as f64;
        let activations = (peak - weights as f64).max(0.0);
        emit(json!({
            "what": "stream_resident", "model": case.name, "seconds": resident_s,
            "weights": self.quant.map_or("dense", GgufType::name),
            "peak_gib": resident_peak, "weights_gib": gib(weights as u64),
            "block_gib": gib(block as u64), "activations_gib": activations / (1u64 << 30) as f64,
        }));
        drop(context);
        let t0 = Instant::now();
        let mut model = model.into_streamed(
            &self.device,
            dit::StreamOptions {
                resident_blocks: 0,
                prefetch,
            },
        )?;
        emit(
            json!({"what": "stream_staged", "model": case.name, "seconds": t0.elapsed().as_secs_f64(),
                    "host_gib": gib(model.streamed_bytes() as u64)}),
        );
        for &budget in budgets {
            let free = budget * (1u64 << 30) as f64
                - non_block as f64
                - activations
                - ((prefetch + 1) * block) as f64;
            let k = if free > 0.0 {
                ((free / block as f64) as usize).min(cfg.num_layers)
            } else {
                0
            };
            model.set_streaming(dit::StreamOptions {
                resident_blocks: k,
                prefetch,
            })?;
            let context = model.prepare_context(&text)?;
            let mut out = None;
            let (seconds, peak) = self.time(|| {
                out = Some(model.forward(&x, &t, &context, &rope)?);
                Ok(())
            })?;
            let out = out.expect("timed at least once");
            let identical = (&out - &reference)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?
                == 0.0;
            emit(json!({
                "what": "stream", "model": case.name, "budget_gib": budget, "resident_blocks": k,
                "prefetch": prefetch, "seconds": seconds, "vs_resident": seconds / resident_s,
                "peak_gib": peak, "within_budget": peak.map(|p| p <= budget),
                "bit_identical": identical,
            }));
        }
        Ok(())
    }

    /// The planner's figure for this decode: weights in the VAE's dtype plus its activation model.
    fn vae_predicted(&self, case: &VaeCase, vae: &WanVae, decode: memory::VaeDecode) -> f64 {
        let ((w, h), frames) = self.shape(case.size, case.frames);
        let elem = vae.dtype().size_in_bytes() as u64;
        let weights: u64 = WanVae::expected_weights(&case.config)
            .map(|s| {
                s.iter()
                    .map(|(_, s)| s.iter().product::<usize>() as u64)
                    .sum()
            })
            .unwrap_or(0);
        let act = memory::vae_decode_activations(&case.config, w, h, frames, decode, elem);
        (weights * elem + act) as f64 / memory::GIB
    }

    fn vae_decode(
        &self,
        case: &VaeCase,
        plain: bool,
        tiles: &[TileConfig],
        pass_frames: &[usize],
    ) -> Result<()> {
        let ((w, h), frames) = self.shape(case.size, case.frames);
        let s = case.config.spatial_stride();
        let latent = [1, case.config.z_dim, (frames - 1) / 4 + 1, h / s, w / s];
        let mut vae = WanVae::random(case.config.clone(), 11, &self.device, self.dtype)?;
        let z = rand(&latent, self.dtype, &self.device)?;
        for &passes in pass_frames {
            vae.set_decode_pass_frames(passes);
            self.vae_decode_modes(case, &vae, &z, plain, tiles)?;
        }
        Ok(())
    }

    /// One pass-frames setting of [`vae_decode`](Self::vae_decode): plain, then each tiling.
    fn vae_decode_modes(
        &self,
        case: &VaeCase,
        vae: &WanVae,
        z: &Tensor,
        plain: bool,
        tiles: &[TileConfig],
    ) -> Result<()> {
        let ((w, h), _) = self.shape(case.size, case.frames);
        let s = case.config.spatial_stride();
        let latent = z.dims();
        let dtype = format!("{:?}", vae.dtype()).to_lowercase();
        let pass_frames = vae.decode_pass_frames();
        if plain {
            let (seconds, peak) = self.time(|| {
                vae.decode(z)?;
                Ok(())
            })?;
            emit(json!({
                "what": "vae_decode", "model": case.name, "latent": latent, "dtype": dtype,
                "pass_frames": pass_frames, "seconds": seconds, "peak_gib": peak,
                // The planner models whole chunks for whole frames.
                "predicted_peak_gib": (pass_frames == 0)
                    .then(|| self.vae_predicted(case, vae, memory::VaeDecode::WholeFrames)),
            }));
        }
        for tile in tiles {
            let (seconds, peak) = self.time(|| {
                vae.decode_tiled(z, tile)?;
                Ok(())
            })?;
            // The planner models any tile size with whole chunks and with 1- or 2-frame passes.
            let decode = memory::VaeDecode::Tiled(memory::TiledDecode {
                tiles: *tile,
                pass_frames,
            });
            let predicted = self.vae_predicted(case, vae, decode);
            emit(json!({
                "what": "vae_decode_tiled", "model": case.name, "latent": latent, "dtype": dtype,
                "pass_frames": pass_frames,
                "tile_px": tile.tile_size, "tile_width_px": tile.width(),
                "overlap_px": tile.tile_overlap,
                "largest_tile_hw": tile.decoded_tile(w, h, s)?,
                "seconds": seconds, "peak_gib": peak, "predicted_peak_gib": predicted,
            }));
        }
        Ok(())
    }
}

fn rand(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)?)
}

/// Random weights drawn on the device; with `quant`, the block linears quantised to that GGUF
/// block format and kept so.
fn random_transformer(
    cfg: &DitConfig,
    device: &Device,
    dtype: DType,
    quant: Option<GgufType>,
) -> Result<WanTransformer> {
    let weights = dit::random::random_weights_on_device(cfg, 7, device, dtype)?;
    let source = match quant {
        Some(ty) => quantized_source(weights, ty)?,
        None => MemorySource::new("random transformer", weights),
    };
    WanTransformer::from_weights(
        cfg.clone(),
        &WeightMap::plain(Box::new(source), device, dtype)?,
    )
}

/// `weights` with the transformer's block linears quantised to `ty` (through the CPU, one
/// tensor at a time, each dense copy freed as its quantised one lands on the device).
fn quantized_source(
    weights: std::collections::HashMap<String, Tensor>,
    ty: GgufType,
) -> Result<MemorySource> {
    let mut dense = std::collections::HashMap::new();
    let mut quantized = std::collections::HashMap::new();
    for (name, w) in weights {
        if memory::is_block_linear(&name, w.dims()) {
            let q = GgufWeight::quantize(&w, ty).with_context(|| format!("quantising `{name}`"))?;
            quantized.insert(name, q);
        } else {
            dense.insert(name, w);
        }
    }
    Ok(MemorySource::new("random transformer", dense).with_quantized(quantized))
}

fn param_count(cfg: &DitConfig) -> usize {
    dit::model::weight_shapes(cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// Matrix FLOPs of one forward (2 per multiply-add): per block the self-attention projections
/// (4·D² per token), cross-attention query/output (2·D²) and text keys/values (2·D² per text
/// token), the FFN (2·D·ffn), and the two attention products (4·L·Lk·D).
fn dit_flops(cfg: &DitConfig, tokens: usize, text_tokens: usize) -> f64 {
    let (l, d, f, lt) = (
        tokens as f64,
        cfg.dim() as f64,
        cfg.ffn_dim as f64,
        text_tokens as f64,
    );
    let per_block = 2.0 * l * (6.0 * d * d + 2.0 * d * f)
        + 2.0 * lt * 2.0 * d * d
        + 4.0 * l * l * d
        + 4.0 * l * lt * d;
    per_block * cfg.num_layers as f64
}

fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| invalid!("--size: `{s}` is not WIDTHxHEIGHT"))?;
    let parse = |v: &str| {
        v.parse::<usize>()
            .map_err(|_| invalid!("--size: `{s}` is not WIDTHxHEIGHT"))
    };
    Ok((parse(w)?, parse(h)?))
}

pub fn run(args: Args) -> Result<()> {
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let what: Vec<&str> = args.what.split(',').filter(|s| !s.is_empty()).collect();
    const WHAT: [&str; 6] = ["attention", "dit", "vae", "check", "stream", "fp8"];
    for w in &what {
        if !WHAT.contains(w) {
            return Err(invalid!("--what: `{w}` is not one of {}", WHAT.join(", ")));
        }
    }
    if args.frames.is_some_and(|f| f == 0 || (f - 1) % 4 != 0) {
        return Err(invalid!("--frames: must be 4k+1 (1, 5, ..., 81, 121)"));
    }
    let quant = match args.weights.as_str() {
        "dense" => None,
        other => Some(GgufType::quantized_from_name(other).ok_or_else(|| {
            let names: Vec<&str> = GgufType::QUANTIZED.iter().map(|t| t.name()).collect();
            invalid!(
                "--weights: `{other}` is not one of dense, {}",
                names.join(", ")
            )
        })?),
    };
    let bench = Bench {
        device,
        dtype,
        quant,
        reps: args.reps,
        warmup: args.warmup,
        size: args.size.as_deref().map(parse_size).transpose()?,
        frames: args.frames.map(|f| f as usize),
    };
    let dits = dit_cases();
    let dits = pick(&dits, &args.models, |c| c.name, "models")?;
    let vaes = vae_cases();
    let vaes = pick(&vaes, &args.vaes, |c| c.name, "vaes")?;
    emit(json!({
        "what": "device", "device": args.device, "dtype": args.dtype,
        "memory": gpu_memory::free_and_total(&bench.device)?.map(|(f, t)| json!({"free_gib": gib(f), "total_gib": gib(t)})),
    }));
    // Each measurement stands alone: a failure (say, out of memory) is reported and the rest run.
    let report = |what: &str, name: &str, r: Result<()>| {
        if let Err(e) = r {
            emit(json!({"what": what, "model": name, "error": format!("{e:#}")}));
        }
        emit_profile(what, name);
    };
    if what.contains(&"attention") {
        report(
            "attention",
            "",
            bench
                .attention(args.attention_seq, args.attention_heads)
                .context("attention"),
        );
    }
    if what.contains(&"dit") {
        if bench.quant.is_some() {
            report("gguf_kernels", "", bench.gguf_kernels());
        }
        for case in &dits {
            report("dit_forward", case.name, bench.dit_forward(case));
        }
    }
    if what.contains(&"stream") {
        let budgets = args
            .budgets
            .split(',')
            .map(|b| {
                b.trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|v| *v > 0.0)
                    .ok_or_else(|| invalid!("--budgets: `{b}` is not a positive number of GiB"))
            })
            .collect::<Result<Vec<_>>>()?;
        for case in &dits {
            report(
                "stream",
                case.name,
                bench.stream(case, &budgets, args.prefetch),
            );
        }
    }
    if what.contains(&"fp8") {
        report("fp8_kernels", "", bench.fp8_kernels());
        for case in &dits {
            report("fp8_forward", case.name, bench.fp8_forward(case));
        }
    }
    if what.contains(&"check") {
        for case in &dits {
            report("dit_dtype_check", case.name, bench.check(case));
        }
    }
    let modes: Vec<&str> = args.vae_modes.split(',').collect();
    if let Some(m) = modes.iter().find(|m| !["plain", "tiled"].contains(m)) {
        return Err(invalid!("--vae-modes: `{m}` is not one of plain, tiled"));
    }
    let tiles = if modes.contains(&"tiled") {
        parse_tiles(&args.vae_tiles)?
    } else {
        Vec::new()
    };
    let pass_frames = args
        .vae_pass_frames
        .split(',')
        .map(|n| {
            n.trim().parse::<usize>().map_err(|_| {
                invalid!("--vae-pass-frames: `{n}` is not a frame count (0 for whole chunks)")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if what.contains(&"vae") {
        for case in &vaes {
            report(
                "vae_decode",
                case.name,
                bench.vae_decode(case, modes.contains(&"plain"), &tiles, &pass_frames),
            );
        }
    }
    Ok(())
}

/// `--vae-tiles`: comma-separated SIZE:OVERLAP pixel pairs, SIZE one number (square tiles) or
/// WIDTHxHEIGHT.
fn parse_tiles(list: &str) -> Result<Vec<TileConfig>> {
    list.split(',')
        .map(|item| {
            let parsed = item.split_once(':').and_then(|(size, overlap)| {
                let overlap = overlap.trim().parse().ok()?;
                Some(match size.trim().split_once('x') {
                    Some((w, h)) => TileConfig {
                        tile_size: h.trim().parse().ok()?,
                        tile_overlap: overlap,
                        tile_width: Some(w.trim().parse().ok()?),
                    },
                    None => TileConfig::square(size.trim().parse().ok()?, overlap),
                })
            });
            parsed.ok_or_else(|| {
                invalid!(
                    "--vae-tiles: `{item}` is not SIZE:OVERLAP or WIDTHxHEIGHT:OVERLAP in pixels \
                     (e.g. 256:64, 480x704:64)"
                )
            })
        })
        .collect()
}
