//! `vidgen plan`: the memory each stage needs and the placement that fits, before anything runs or
//! downloads. Exit 0 when the plan fits, 3 when it does not (with the smallest change that would),
//! 2 for bad input.

use std::path::Path;

use anyhow::Result;
use serde_json::json;
use vidgen_engine::invalid;
use vidgen_engine::memory::{self, Offload, PlanRequest, WeightFormat, GIB};

#[derive(clap::Args)]
pub struct Args {
    /// A known configuration (wan2.2-t2v-a14b, wan2.2-i2v-a14b, wan2.2-ti2v-5b, wan2.1-t2v-14b,
    /// wan2.1-t2v-1.3b, wan2.1-i2v-14b) or a model folder.
    #[arg(long)]
    model: String,
    /// WIDTHxHEIGHT (default: the model's default size).
    #[arg(long)]
    size: Option<String>,
    /// Frame count, 4k+1 (default: the model's default).
    #[arg(long)]
    frames: Option<usize>,
    /// Transformer weights on the GPU: bf16, f32, fp8 (block linears in FP8), or a GGUF block
    /// format as in the GGUF file you will use (q8_0, q6_k, q5_k, q4_k, q4_0, ...: block linears
    /// kept quantised, dequantised block by block).
    #[arg(long, default_value = "bf16")]
    weights: String,
    /// GPU memory available, e.g. 12GiB (default: free memory of GPU 0 minus 1 GiB in a CUDA
    /// build with a GPU; otherwise required to choose a placement).
    #[arg(long)]
    vram_budget: Option<String>,
    /// Host memory available, e.g. 32GiB.
    #[arg(long)]
    host_ram_budget: Option<String>,
    /// none, cond, cond-diffusion, aggressive, stream or auto (the weakest that fits).
    #[arg(long, default_value = "auto")]
    offload: String,
    /// Blocks uploaded ahead when streaming.
    #[arg(long, default_value_t = 1)]
    prefetch: usize,
    /// VAE precision: auto (bf16 on a GPU), bf16 or f32 (the reference's, slower, twice the
    /// memory).
    #[arg(long, value_name = "auto|bf16|f32", default_value = "auto")]
    vae_dtype: String,
    /// Guidance 1 skips the unconditional pass (less activation memory).
    #[arg(long)]
    no_cfg: bool,
    /// One JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Exit code for "does not fit" (2 is bad input, 1 a failure).
pub const EXIT_DOES_NOT_FIT: i32 = 3;

fn preset_for(model: &str) -> Result<&'static vidgen_engine::presets::ModelPreset> {
    let path = Path::new(model);
    if path.is_dir() {
        let layout = vidgen_engine::pipeline::layout::detect(path)?;
        return layout.variant.map(|v| v.preset()).ok_or_else(|| {
            invalid!("--model: could not tell which Wan model {model} is (no known variant)")
        });
    }
    memory::known_model(model)
}

fn gpu_budget(args: &Args) -> Result<(Option<u64>, &'static str)> {
    if let Some(b) = &args.vram_budget {
        return Ok((Some(memory::parse_bytes("--vram-budget", b)?), "given"));
    }
    #[cfg(feature = "cuda")]
    if let Ok(dev) = candle_core::Device::new_cuda(0) {
        if let Some(b) = memory::available_vram(&dev)? {
            return Ok((Some(b), "free VRAM of GPU 0 minus 1 GiB"));
        }
    }
    Ok((
        None,
        "none given and no GPU found: GPU peaks shown, no placement check",
    ))
}

pub fn run(args: Args) -> Result<()> {
    let preset = preset_for(&args.model)?;
    let (width, height) = match &args.size {
        Some(s) => {
            let (w, h) = s
                .split_once(['x', '*'])
                .ok_or_else(|| invalid!("--size: `{s}` is not WIDTHxHEIGHT"))?;
            let parse = |v: &str| {
                v.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|v| *v > 0)
                    .ok_or_else(|| invalid!("--size: `{s}` is not WIDTHxHEIGHT"))
            };
            (parse(w)?, parse(h)?)
        }
        None => (
            preset.default_size.width as usize,
            preset.default_size.height as usize,
        ),
    };
    let multiple = preset.size_multiple as usize;
    if width % multiple != 0 || height % multiple != 0 {
        return Err(invalid!(
            "--size: {width}x{height} must be multiples of {multiple} for {}",
            preset.name
        ));
    }
    let frames = args.frames.unwrap_or(preset.default_frames);
    if frames == 0 || !(frames - 1).is_multiple_of(4) {
        return Err(invalid!(
            "--frames: {frames} is not 4k+1 (1, 5, ..., 81, 121)"
        ));
    }
    let (vram_budget, budget_source) = gpu_budget(&args)?;
    let host_budget = args
        .host_ram_budget
        .as_deref()
        .map(|b| memory::parse_bytes("--host-ram-budget", b))
        .transpose()?;
    let req = PlanRequest {
        preset,
        width,
        height,
        frames,
        weights: WeightFormat::parse(&args.weights)?,
        cfg: !args.no_cfg,
        vram_budget,
        host_budget,
        offload: Offload::parse(&args.offload)?,
        prefetch: args.prefetch,
        vae_bf16: memory::vae_bf16("--vae-dtype", &args.vae_dtype, true)?,
        dit_weights: None,
        // No prompt to plan: the longest one the encoder accepts.
        text_tokens: vidgen_engine::text::TEXT_LEN,
    };
    let plan = memory::plan(&req);
    let suggestion = if plan.fits {
        None
    } else {
        memory::suggestion(&req)
    };
    let g = |b: u64| b as f64 / GIB;
    if args.json {
        let stages: Vec<_> = plan
            .stages
            .iter()
            .map(|s| {
                json!({"stage": s.stage, "weights_gpu_gib": g(s.weights_gpu), "weights_host_gib": g(s.weights_host),
                       "activations_gib": g(s.activations), "gpu_peak_gib": g(s.gpu_peak), "placement": s.placement})
            })
            .collect();
        println!(
            "{}",
            json!({"model": preset.name, "size": format!("{width}x{height}"), "frames": frames,
                   "offload": plan.offload.name(), "resident_blocks": plan.resident_blocks,
                   "vae_decode": plan.vae_decode.describe(),
                   "vram_budget_gib": vram_budget.map(g), "host_budget_gib": host_budget.map(g),
                   "gpu_peak_gib": g(plan.gpu_peak), "host_peak_gib": g(plan.host_peak),
                   "fits": plan.fits, "suggestion": suggestion, "stages": stages})
        );
    } else {
        println!(
            "{} {width}x{height}, {frames} frames, {} weights, offload {}{}",
            preset.name,
            args.weights,
            plan.offload.name(),
            if args.offload == "auto" {
                " (auto)"
            } else {
                ""
            }
        );
        println!(
            "GPU budget: {} ({budget_source})",
            vram_budget.map_or("-".into(), |b| format!("{:.2} GiB", g(b)))
        );
        println!(
            "{:<30} {:>10} {:>10} {:>10} {:>10}  placement",
            "stage", "GPU wts", "host wts", "activ.", "GPU peak"
        );
        for s in &plan.stages {
            println!(
                "{:<30} {:>8.2}Gi {:>8.2}Gi {:>8.2}Gi {:>8.2}Gi  {}",
                s.stage,
                g(s.weights_gpu),
                g(s.weights_host),
                g(s.activations),
                g(s.gpu_peak),
                s.placement
            );
        }
        println!(
            "peak: GPU {:.2} GiB, host {:.2} GiB (offloaded weights + the decoded video)",
            g(plan.gpu_peak),
            g(plan.host_peak)
        );
    }
    if !plan.fits {
        eprintln!(
            "does not fit: GPU peak {:.2} GiB{}; {}",
            g(plan.gpu_peak),
            vram_budget.map_or(String::new(), |b| format!(" > budget {:.2} GiB", g(b))),
            suggestion
                .unwrap_or_else(|| "no single change (frames, size, offload) makes it fit".into())
        );
        std::process::exit(EXIT_DOES_NOT_FIT);
    }
    Ok(())
}
