//! `vidgen generate`: prompt (+ image) -> video file.
//!
//! Everything the user got wrong is found before a weight is loaded: the model folder is detected
//! (file names and config files only), the request is validated by the model's [`ModelInfo`] (the
//! same rules as the server), the output extension and the image header are checked. Then the
//! pipeline runs with progress bars (or JSON lines with `--json`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use vidgen_engine::dit::StreamOptions;
use vidgen_engine::invalid;
use vidgen_engine::memory::{Offload, Plan, PlanRequest, TextPlacement, WeightFormat, GIB};
use vidgen_engine::pipeline::image::{probe_image, read_image_file, ImageLimits};
use vidgen_engine::pipeline::layout::{self, ComponentPaths, ModelLayout};
use vidgen_engine::pipeline::stages::{Placement, StageMemory};
use vidgen_engine::pipeline::{
    GenerateRequest, ModelInfo, ProgressEvent, ProgressSink, ResolvedRequest, Stage,
};
use vidgen_engine::presets::ModelPreset;
use vidgen_media::{Format, GuardPolicy};
use vidgen_server::protocol::Weights;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model folder (an official Wan2.x release or a -Diffusers repo), or `demo` (random weights).
    #[arg(long, value_name = "DIR|demo")]
    pub model: Option<String>,
    /// DiT file or folder (ComfyUI single files; high-noise expert for A14B). Overrides the folder's.
    #[arg(long, value_name = "FILE")]
    pub dit: Option<PathBuf>,
    /// Low-noise expert DiT (A14B).
    #[arg(long = "dit-2", value_name = "FILE")]
    pub dit_2: Option<PathBuf>,
    /// VAE file (e.g. wan2.2_vae.safetensors, Wan2.1_VAE.pth).
    #[arg(long, value_name = "FILE")]
    pub vae: Option<PathBuf>,
    /// UMT5 text encoder file.
    #[arg(long, value_name = "FILE")]
    pub text_encoder: Option<PathBuf>,
    /// Tokenizer folder or tokenizer.json.
    #[arg(long, value_name = "PATH")]
    pub tokenizer: Option<PathBuf>,

    /// What to show.
    #[arg(long, short = 'p')]
    pub prompt: String,
    /// Conditioning image (JPEG, PNG, WebP): the first frame for TI2V/I2V models.
    #[arg(long, short = 'i', value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// What to avoid (default: the model's own negative prompt).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Video size, width x height (e.g. 1280x704).
    #[arg(long, value_name = "WxH")]
    pub size: Option<String>,
    /// Frame count (4k+1, e.g. 81, 121).
    #[arg(long)]
    pub frames: Option<u32>,
    /// Duration in seconds (converted to the nearest valid frame count).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Frames per second of the output.
    #[arg(long)]
    pub fps: Option<u32>,
    /// Round an invalid --frames to the nearest valid count instead of refusing it.
    #[arg(long)]
    pub align_frames: bool,
    /// Denoising steps.
    #[arg(long)]
    pub steps: Option<u32>,
    /// Guidance scale (the high-noise expert's for A14B).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Guidance scale of the low-noise expert (A14B only).
    #[arg(long = "guidance-2")]
    pub guidance_2: Option<f64>,
    /// Flow shift of the noise schedule.
    #[arg(long)]
    pub shift: Option<f64>,
    /// Sampler: unipc, euler or dpm++.
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Random seed (printed when not given, so a video can be made again).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output file: .mp4 (H.264) or .webm (VP9). Default: vidgen-<seed>.mp4.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// cpu or cuda[:N] (default: cuda when built with CUDA, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// Broken output (flat, noise-like, checkerboard frames): fail, warn or off.
    #[arg(long, value_name = "fail|warn|off")]
    pub quality_guard: Option<String>,
    /// One JSON object per line on stdout (progress events, then `done`) instead of progress bars.
    #[arg(long)]
    pub json: bool,
    /// Validate and print the resolved request without loading the model.
    #[arg(long)]
    pub dry_run: bool,
    /// Where components live: none (all resident), cond (text encoder freed after encoding),
    /// cond-diffusion (also one A14B expert on the GPU at a time), aggressive (also a tiled VAE
    /// decode), stream (also transformer blocks streamed from host memory), or auto: the weakest
    /// that fits the GPU budget (`vidgen plan` shows the plan).
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub offload: String,
    /// GPU memory to plan with, e.g. 12GiB (default: free VRAM minus 1 GiB, re-read before each
    /// stage).
    #[arg(long, value_name = "SIZE")]
    pub vram_budget: Option<String>,
    /// Transformer weights: bf16 (f32 on the CPU), fp8 (block linears in FP8 e4m3 with
    /// per-channel scales, quantised while loading: half the memory, computed in bf16), or
    /// fp8-matmul (the same weights computed as FP8 matmuls with per-token activation scales:
    /// faster on GPUs with FP8 tensor cores, a little less accurate; see `vidgen bench --what
    /// fp8`). A GGUF DiT (`--dit x.gguf`) keeps its block-quantised block linears as stored
    /// whatever this says.
    #[arg(long, value_name = "bf16|fp8|fp8-matmul", default_value = "bf16")]
    pub weights: String,
    /// Transformer blocks uploaded ahead of the one computing when streaming.
    #[arg(long, default_value_t = 1)]
    pub prefetch: usize,
    /// VAE precision: auto (bf16 on a GPU: ~20x faster than f32 there, half the memory; f32 on
    /// the CPU), bf16, or f32 (the reference's own precision).
    #[arg(long, value_name = "auto|bf16|f32", default_value = "auto")]
    pub vae_dtype: String,
    /// Print each stage's predicted and measured GPU memory peak at the end.
    #[arg(long)]
    pub report_memory: bool,
    /// Also write the denoised latents (`latents`, normalised, f32) to this .safetensors file:
    /// decode them again with `run-component vae-decode`, or compare runs bit for bit.
    #[arg(long, value_name = "FILE")]
    pub save_latents: Option<PathBuf>,
}

/// What a finished generation made (reported by `generate --json`, the worker and the server).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerateSummary {
    pub output: PathBuf,
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub fps: u32,
    pub seed: u64,
    pub seconds: f64,
    /// Quality-guard warnings (noise-like frames etc.).
    pub warnings: Vec<String>,
    /// Per stage: GPU memory predicted by the plan and measured (empty on the CPU).
    #[serde(default)]
    pub memory: Vec<StageMemoryRow>,
}

/// One stage of the memory report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageMemoryRow {
    pub stage: String,
    pub predicted_gib: Option<f64>,
    /// In use when the stage began (left by earlier stages), part of `measured_gib`.
    #[serde(default)]
    pub at_start_gib: Option<f64>,
    pub measured_gib: Option<f64>,
    pub seconds: f64,
}

/// A model to run: the built-in demo, or a detected folder / explicit component files.
// One value per run: the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ModelSource {
    Demo,
    Layout(ModelLayout),
    /// `random:<known configuration>`: full-size random weights drawn on the device, to measure
    /// speed and memory without a download (the video is noise).
    Random(&'static ModelPreset),
}

impl ModelSource {
    /// `model` is "demo" or a folder; `components` are explicit paths (ComfyUI single files) that
    /// override the folder's, or stand alone without `model`. Reads no weights.
    pub fn resolve(model: Option<&str>, components: &ComponentPaths) -> anyhow::Result<Self> {
        match model {
            Some("demo") => {
                if !components.is_empty() {
                    return Err(invalid!(
                        "model: `demo` has built-in weights; --dit/--dit-2/--vae/--text-encoder/--tokenizer do not apply"
                    ));
                }
                Ok(ModelSource::Demo)
            }
            Some(name) if name.starts_with(RANDOM_PREFIX) => {
                if !components.is_empty() {
                    return Err(invalid!(
                        "model: `{name}` has generated weights; --dit/--dit-2/--vae/--text-encoder/--tokenizer do not apply"
                    ));
                }
                Ok(ModelSource::Random(vidgen_engine::memory::known_model(
                    &name[RANDOM_PREFIX.len()..],
                )?))
            }
            Some(dir) => Ok(ModelSource::Layout(layout::detect_with_overrides(
                Some(Path::new(dir)),
                components,
            )?)),
            None if components.is_empty() => Err(invalid!(
                "model: give --model DIR (a Wan model folder) or --model demo, or the component files --dit/--vae/--text-encoder/--tokenizer"
            )),
            None => Ok(ModelSource::Layout(layout::from_components(components)?)),
        }
    }

    pub fn info(&self) -> anyhow::Result<ModelInfo> {
        match self {
            ModelSource::Demo => Ok(demo_model_info()),
            ModelSource::Layout(layout) => layout.model_info(),
            ModelSource::Random(p) => Ok(layout::model_info_from_preset(p)),
        }
    }
}

const RANDOM_PREFIX: &str = "random:";

/// The built-in demo model: a tiny Wan-shaped DiT with random weights, for trying the pipeline.
pub fn demo_model_info() -> ModelInfo {
    vidgen_engine::pipeline::demo::info()
}

/// What `model` ("demo" or a model folder) can make; used by `vidgen serve` for its model list.
pub fn model_info(model: &str) -> anyhow::Result<ModelInfo> {
    ModelSource::resolve(Some(model), &ComponentPaths::default())?.info()
}

/// How to run, beside the request itself.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub device: candle_core::Device,
    pub quality_guard: GuardPolicy,
    pub memory: MemoryOptions,
    pub save_latents: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            device: candle_core::Device::Cpu,
            quality_guard: GuardPolicy::default(),
            memory: MemoryOptions::default(),
            save_latents: None,
        }
    }
}

/// Runs one request on `model` ("demo", a model folder, or a configured model name resolved by the
/// caller to a folder) and writes the video to `output` (.mp4 or .webm). Shared by `generate`, the
/// worker and tests. Errors: `InvalidInput` for the request, anything else is a runtime failure.
pub fn run_request(
    model: &str,
    request: &GenerateRequest,
    options: &RunOptions,
    output: &Path,
    sink: &mut dyn ProgressSink,
) -> anyhow::Result<GenerateSummary> {
    let source = ModelSource::resolve(Some(model), &ComponentPaths::default())?;
    run_source(&source, request, options, output, sink)
}

/// [`run_request`] for an already detected model, with device and quality-guard options.
pub fn run_source(
    source: &ModelSource,
    request: &GenerateRequest,
    options: &RunOptions,
    output: &Path,
    sink: &mut dyn ProgressSink,
) -> anyhow::Result<GenerateSummary> {
    use vidgen_engine::pipeline::stages::{Components, Stages};
    use vidgen_engine::pipeline::{ProgressEvent, Stage};
    use vidgen_media::{guard, Frames};

    // Everything a request can get wrong is checked before any weight is loaded.
    let req = source.info()?.resolve(request)?;
    let format = Format::from_path(output)?;
    let components = match source {
        ModelSource::Demo => {
            sink.event(ProgressEvent::Warning {
                message: vidgen_engine::pipeline::demo::DEMO_NOTICE.to_string(),
            })?;
            Components::Demo
        }
        ModelSource::Layout(layout) => Components::Layout(layout),
        ModelSource::Random(p) => Components::Random(p),
    };
    for note in &req.notes {
        sink.event(ProgressEvent::Warning {
            message: note.clone(),
        })?;
    }
    let started = Instant::now();
    // The stages read the tokenizer once: the plan counts the prompt's tokens with it.
    let mut stages = Stages::new(components, options.device.clone());
    let text_tokens = stages.text_tokens(&req)?;
    let mut planned = plan_placement(
        &components,
        &req,
        text_tokens,
        &options.memory,
        &options.device,
    )?;
    stages.set_placement(planned.placement.clone());
    stages.preload()?;
    let (positive, negative) = stages.encode_text(&req, sink)?;
    let condition = stages.encode_condition(&req, sink)?;
    replan_if_squeezed(&mut stages, &mut planned, &options.memory, sink)?;
    let latents = stages.denoise(&req, &positive, negative.as_ref(), condition.as_ref(), sink)?;
    replan_if_squeezed(&mut stages, &mut planned, &options.memory, sink)?;
    if let Some(path) = &options.save_latents {
        let latents = latents.to_device(&candle_core::Device::Cpu)?;
        // Written beside, then renamed: never a half-written file under the asked name.
        let partial = path.with_extension("safetensors.partial");
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("latents".to_string(), latents)]),
            &partial,
        )
        .and_then(|()| Ok(std::fs::rename(&partial, path)?))
        .with_context(|| format!("save-latents: writing {}", path.display()))?;
    }
    guard::check_latents(&latents.flatten_all()?.to_vec1::<f32>()?)?;
    let video = stages.decode(&latents, sink)?;
    let memory = memory_rows(planned.plan.as_ref(), &stages.memory_report());
    let (c, t, h, w) = video.dims4()?;
    anyhow::ensure!(
        t == req.frames as usize,
        "the VAE produced {t} frames for a request of {} (frame accounting bug)",
        req.frames
    );
    let frames = Frames::from_f32_chw(&video.flatten_all()?.to_vec1::<f32>()?, c, t, h, w)?;
    sink.event(ProgressEvent::Stage {
        stage: Stage::Encode,
        elapsed_s: started.elapsed().as_secs_f64(),
    })?;
    let report = guard::inspect(&frames);
    let warnings: Vec<String> = report
        .verdict(options.quality_guard)?
        .iter()
        .map(|w| w.to_string())
        .collect();
    for w in &warnings {
        sink.event(ProgressEvent::Warning { message: w.clone() })?;
    }
    vidgen_media::encode(&frames, f64::from(req.fps), output, format)?;
    Ok(GenerateSummary {
        output: output.to_path_buf(),
        width: w as u32,
        height: h as u32,
        frames: t as u32,
        fps: req.fps,
        seed: req.seed,
        seconds: t as f64 / f64::from(req.fps),
        warnings,
        memory,
    })
}

/// `--offload`, `--vram-budget`, `--prefetch`.
#[derive(Debug, Clone)]
pub struct MemoryOptions {
    /// `None`: auto, the weakest mode that fits.
    pub offload: Option<Offload>,
    /// `None`: what the GPU has free now (re-read before each stage).
    pub vram_budget: Option<u64>,
    pub prefetch: usize,
    /// Transformer block linears in FP8.
    pub fp8: bool,
    /// ...computed as FP8 matmuls.
    pub fp8_matmul: bool,
    /// The VAE in bf16 (applies on a GPU only).
    pub vae_bf16: bool,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self {
            offload: None,
            vram_budget: None,
            prefetch: 1,
            fp8: false,
            fp8_matmul: false,
            vae_bf16: true,
        }
    }
}

/// The placement a run starts with, and the plan behind it (known configurations only); updated
/// when the budget is re-read between stages.
pub struct PlannedRun {
    pub placement: Placement,
    pub plan: Option<Plan>,
    /// The request the plan was made for (budget left to re-read when not given).
    pub request: Option<PlanRequest>,
}

fn plan_request(
    preset: &'static ModelPreset,
    req: &ResolvedRequest,
    memory: &MemoryOptions,
    device: &candle_core::Device,
    budget: Option<u64>,
) -> PlanRequest {
    PlanRequest {
        preset,
        width: req.width as usize,
        height: req.height as usize,
        frames: req.frames as usize,
        weights: if memory.fp8 {
            WeightFormat::Fp8
        } else if device.is_cpu() {
            WeightFormat::F32
        } else {
            WeightFormat::Bf16
        },
        cfg: req.guidance > 1.0 || req.guidance_2.is_some_and(|g| g > 1.0),
        vram_budget: budget,
        host_budget: None,
        offload: memory.offload,
        prefetch: memory.prefetch,
        vae_bf16: memory.vae_bf16 && !device.is_cpu(),
        dit_weights: None,
        // Set from the prompts by `plan_placement`.
        text_tokens: vidgen_engine::text::TEXT_LEN,
    }
}

fn placement_of(plan: &Plan, memory: &MemoryOptions) -> Placement {
    Placement {
        offload: plan.offload,
        stream: StreamOptions {
            resident_blocks: plan.resident_blocks.unwrap_or(0),
            prefetch: memory.prefetch,
        },
        text: plan.text,
        fp8_linears: memory.fp8,
        fp8_matmul: memory.fp8_matmul,
        vae_bf16: memory.vae_bf16,
        vae_decode: Some(plan.vae_decode),
    }
}

/// Plans the run before any weight loads. On a GPU a plan that does not fit the budget is an error
/// naming the smallest change that would fit; the CPU has no VRAM budget to check. A model
/// folder's transformer checkpoint(s) give the weights' real sizes (a GGUF file's tensor table
/// replaces the preset's); `text_tokens`, the longest encoded prompt's tokens, sizes the text
/// encoder's activations.
pub fn plan_placement(
    components: &vidgen_engine::pipeline::stages::Components<'_>,
    req: &ResolvedRequest,
    text_tokens: usize,
    memory: &MemoryOptions,
    device: &candle_core::Device,
) -> anyhow::Result<PlannedRun> {
    use vidgen_engine::pipeline::stages::Components;
    let Some(preset) = components.preset() else {
        // No known configuration (the demo, an unrecognised folder): no plan, the asked mode.
        return Ok(PlannedRun {
            placement: Placement {
                offload: memory.offload.unwrap_or(Offload::Cond),
                stream: StreamOptions {
                    resident_blocks: 0,
                    prefetch: memory.prefetch,
                },
                text: TextPlacement::Resident,
                fp8_linears: memory.fp8,
                fp8_matmul: memory.fp8_matmul,
                vae_bf16: memory.vae_bf16,
                vae_decode: None,
            },
            plan: None,
            request: None,
        });
    };
    let budget = match memory.vram_budget {
        Some(b) => Some(b),
        None => vidgen_engine::memory::available_vram(device)?,
    };
    let mut request = plan_request(preset, req, memory, device, budget);
    request.text_tokens = text_tokens;
    if let Components::Layout(l) = components {
        request.dit_weights = vidgen_engine::memory::DitWeights::of_layout(
            &l.dit,
            l.dit_2.as_deref(),
            &vidgen_engine::memory::dit_config(preset),
            request.weights,
        )?;
    }
    let plan = vidgen_engine::memory::plan(&request);
    if !plan.fits && !device.is_cpu() {
        let hint = vidgen_engine::memory::suggestion(&request)
            .unwrap_or_else(|| "no single change (frames, size, offload) makes it fit".into());
        anyhow::bail!(
            "does not fit in GPU memory: the plan needs {:.2} GiB with --offload {} but the budget is {:.2} GiB; {hint} (see `vidgen plan`)",
            plan.gpu_peak as f64 / GIB,
            plan.offload.name(),
            budget.unwrap_or(0) as f64 / GIB
        );
    }
    Ok(PlannedRun {
        placement: placement_of(&plan, memory),
        plan: Some(plan),
        request: Some(request),
    })
}

/// Before a stage, with an automatic budget: re-reads the GPU's free memory (other processes
/// share it) and, if the plan no longer fits, switches the rest of the run to the weakest mode
/// that does (never a weaker one than planned).
fn replan_if_squeezed(
    stages: &mut vidgen_engine::pipeline::stages::Stages<'_>,
    planned: &mut PlannedRun,
    memory: &MemoryOptions,
    sink: &mut dyn ProgressSink,
) -> anyhow::Result<()> {
    let (Some(current), Some(request)) = (planned.plan.as_ref(), planned.request.as_ref()) else {
        return Ok(());
    };
    if memory.vram_budget.is_some() || memory.offload.is_some() {
        return Ok(());
    }
    let Some(budget) = vidgen_engine::memory::available_vram(&stages.device)? else {
        return Ok(());
    };
    if current.gpu_peak <= budget {
        return Ok(());
    }
    let mut again = request.clone();
    again.vram_budget = Some(budget);
    let stronger = Offload::LADDER
        .iter()
        .skip_while(|&&m| m != current.offload)
        .map(|&m| vidgen_engine::memory::plan_mode(&again, m))
        .find(|p| p.fits);
    let Some(next) = stronger else {
        sink.event(ProgressEvent::Warning {
            message: format!(
                "GPU memory: only {:.2} GiB are available now (another process?), the plan needs {:.2} GiB; continuing",
                budget as f64 / GIB,
                current.gpu_peak as f64 / GIB
            ),
        })?;
        return Ok(());
    };
    if next.offload != current.offload
        || next.resident_blocks != current.resident_blocks
        || next.vae_decode != current.vae_decode
    {
        let tiles = if next.vae_decode != current.vae_decode {
            format!(", decoding in {}", next.vae_decode.describe())
        } else {
            String::new()
        };
        sink.event(ProgressEvent::Warning {
            message: format!(
                "GPU memory: {:.2} GiB available now, switching to --offload {}{tiles} for the rest of the run",
                budget as f64 / GIB,
                next.offload.name()
            ),
        })?;
        planned.placement = placement_of(&next, memory);
        stages.set_placement(planned.placement.clone());
    }
    planned.plan = Some(next);
    Ok(())
}

/// Measured stages beside the plan's prediction of the same stage (the plan's two expert stages
/// are one measured stage when both experts stay resident).
fn memory_rows(plan: Option<&Plan>, measured: &[StageMemory]) -> Vec<StageMemoryRow> {
    let gib = |b: u64| b as f64 / GIB;
    measured
        .iter()
        .map(|m| {
            let predicted = plan.and_then(|p| {
                p.stages
                    .iter()
                    .filter(|s| {
                        s.stage == m.stage
                            || (m.stage == "denoise" && s.stage.starts_with("denoise"))
                    })
                    .map(|s| s.gpu_peak)
                    .max()
            });
            StageMemoryRow {
                stage: m.stage.clone(),
                predicted_gib: predicted.map(gib),
                at_start_gib: m.gpu_at_start.map(gib),
                measured_gib: m.gpu_peak.map(gib),
                seconds: m.seconds,
            }
        })
        .collect()
}

/// `WxH` (also `W*H`, the official spelling) -> (width, height).
pub fn parse_size(text: &str) -> anyhow::Result<(u32, u32)> {
    let bad = || invalid!("size: `{text}` is not WIDTHxHEIGHT (e.g. 1280x704)");
    let (w, h) = text
        .trim()
        .split_once(['x', 'X', '*', '×'])
        .ok_or_else(bad)?;
    let w: u32 = w.trim().parse().map_err(|_| bad())?;
    let h: u32 = h.trim().parse().map_err(|_| bad())?;
    Ok((w, h))
}

/// `vidgen-<seed>.mp4` in `dir`, numbered so an earlier video is never overwritten.
fn default_output(dir: &Path, seed: u64) -> PathBuf {
    let first = dir.join(format!("vidgen-{seed}.mp4"));
    if !first.exists() {
        return first;
    }
    (2..)
        .map(|n| dir.join(format!("vidgen-{seed}-{n}.mp4")))
        .find(|p| !p.exists())
        .expect("an unused name exists")
}

fn check_output(path: &Path) -> anyhow::Result<()> {
    Format::from_path(path)?;
    if path.is_dir() {
        return Err(invalid!(
            "output: {} is a directory; give a file name such as out.mp4",
            path.display()
        ));
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = parent {
        if !dir.is_dir() {
            return Err(invalid!(
                "output: directory {} does not exist",
                dir.display()
            ));
        }
    }
    Ok(())
}

/// The image checks that need no model: the file exists, is an accepted format within the
/// limits (header only).
fn check_image(path: &Path) -> anyhow::Result<()> {
    if !path.exists() {
        return Err(invalid!("image: {} does not exist", path.display()));
    }
    let limits = ImageLimits::default();
    let bytes = read_image_file(path, &limits)?;
    probe_image(&bytes, &limits).with_context(|| format!("image {}", path.display()))?;
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let (width, height) = match &args.size {
        Some(s) => {
            let (w, h) = parse_size(s)?;
            (Some(w), Some(h))
        }
        None => (None, None),
    };
    let mut request = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        image: args.image.clone(),
        width,
        height,
        frames: args.frames,
        seconds: args.seconds,
        fps: args.fps,
        align_frames: args.align_frames,
        steps: args.steps,
        guidance: args.guidance,
        guidance_2: args.guidance_2,
        shift: args.shift,
        scheduler: args.scheduler.clone(),
        seed: args.seed,
    };
    if let Some(out) = &args.output {
        check_output(out)?;
    }
    if let Some(path) = &args.save_latents {
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            return Err(invalid!(
                "save-latents: {} must end in .safetensors",
                path.display()
            ));
        }
    }
    let quality_guard: GuardPolicy = match &args.quality_guard {
        Some(text) => text.parse()?,
        None => GuardPolicy::default(),
    };
    let components = ComponentPaths {
        dit: args.dit.clone(),
        dit_2: args.dit_2.clone(),
        vae: args.vae.clone(),
        text_encoder: args.text_encoder.clone(),
        tokenizer: args.tokenizer.clone(),
    };
    let source = ModelSource::resolve(args.model.as_deref(), &components)?;
    let info = source.info()?;
    let resolved = info.resolve(&request)?;
    if let Some(image) = &resolved.image {
        check_image(image)?;
    }
    let device = vidgen_engine::device::parse_device(
        args.device
            .as_deref()
            .unwrap_or(vidgen_engine::device::default_device()),
    )?;
    // The pipeline resolves the request again: pin the seed so both agree (and it is reported).
    request.seed = Some(resolved.seed);
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(Path::new(""), resolved.seed));

    // A real run reports the demo notice and the request's notes as progress warnings; a dry run
    // loads nothing, so it prints them here.
    let mut messages: Vec<String> = Vec::new();
    if args.dry_run {
        if matches!(source, ModelSource::Demo) {
            messages.push(vidgen_engine::pipeline::demo::DEMO_NOTICE.to_string());
        }
        messages.extend(resolved.notes.iter().cloned());
    }
    let (fp8, fp8_matmul) = Weights::parse(&args.weights)
        .ok_or_else(|| {
            invalid!(
                "--weights: `{}` is not one of {}",
                args.weights,
                Weights::NAMES.join(", ")
            )
        })?
        .fp8_flags();
    let memory = MemoryOptions {
        offload: Offload::parse(&args.offload)?,
        vram_budget: args
            .vram_budget
            .as_deref()
            .map(|b| vidgen_engine::memory::parse_bytes("--vram-budget", b))
            .transpose()?,
        prefetch: args.prefetch,
        fp8: fp8 || fp8_matmul,
        fp8_matmul,
        vae_bf16: vidgen_engine::memory::vae_bf16(
            "--vae-dtype",
            &args.vae_dtype,
            !device.is_cpu(),
        )?,
    };
    if args.prefetch == 0 {
        return Err(invalid!(
            "--prefetch: must be at least 1 (blocks uploaded while the previous one computes)"
        ));
    }

    if args.json {
        run_json(
            &args,
            &source,
            &request,
            &resolved,
            &messages,
            RunOptions {
                device,
                quality_guard,
                memory: memory.clone(),
                save_latents: args.save_latents.clone(),
            },
            &output,
            started,
        )
    } else {
        run_human(
            &args,
            &source,
            &info,
            &request,
            &resolved,
            &messages,
            RunOptions {
                device,
                quality_guard,
                memory: memory.clone(),
                save_latents: args.save_latents.clone(),
            },
            &output,
            started,
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn run_json(
    args: &Args,
    source: &ModelSource,
    request: &GenerateRequest,
    resolved: &ResolvedRequest,
    messages: &[String],
    options: RunOptions,
    output: &Path,
    started: Instant,
) -> anyhow::Result<()> {
    let mut sink = JsonProgress;
    for message in messages {
        sink.event(ProgressEvent::Warning {
            message: message.clone(),
        })?;
    }
    if args.dry_run {
        let mut line = serde_json::to_value(resolved)?;
        line["event"] = "resolved".into();
        line["output"] = serde_json::to_value(output)?;
        return sink.line(&line);
    }
    let summary = run_source(source, request, &options, output, &mut sink)?;
    let mut line = serde_json::to_value(&summary)?;
    line["event"] = "done".into();
    line["elapsed_s"] = started.elapsed().as_secs_f64().into();
    sink.line(&line)
}

#[allow(clippy::too_many_arguments)]
fn run_human(
    args: &Args,
    source: &ModelSource,
    info: &ModelInfo,
    request: &GenerateRequest,
    resolved: &ResolvedRequest,
    messages: &[String],
    options: RunOptions,
    output: &Path,
    started: Instant,
) -> anyhow::Result<()> {
    for message in messages {
        eprintln!("note: {message}");
    }
    let plan = describe(info, resolved, output);
    if args.dry_run {
        println!("{plan}");
        println!("dry run: nothing was loaded or written");
        return Ok(());
    }
    eprintln!("{plan}");
    let mut sink = BarProgress::new();
    let summary = run_source(source, request, &options, output, &mut sink);
    sink.finish();
    let summary = summary?;
    if args.report_memory {
        print_memory_report(&summary.memory);
    }
    println!(
        "wrote {}: {}x{}, {} frames at {} fps ({:.2} s), seed {}, in {}",
        summary.output.display(),
        summary.width,
        summary.height,
        summary.frames,
        summary.fps,
        summary.seconds,
        summary.seed,
        human_duration(started.elapsed())
    );
    Ok(())
}

fn print_memory_report(rows: &[StageMemoryRow]) {
    if rows.iter().all(|r| r.measured_gib.is_none()) {
        eprintln!("memory report: no GPU memory to report on the CPU");
        return;
    }
    eprintln!(
        "{:<30} {:>12} {:>12} {:>8} {:>9} {:>12}",
        "stage", "predicted", "measured", "ratio", "seconds", "at start"
    );
    let gib = |v: Option<f64>| v.map_or("-".to_string(), |g| format!("{g:.2} GiB"));
    for r in rows {
        let ratio = match (r.measured_gib, r.predicted_gib) {
            (Some(m), Some(p)) if m > 0.0 => format!("{:.3}", p / m),
            _ => "-".into(),
        };
        eprintln!(
            "{:<30} {:>12} {:>12} {:>8} {:>9.2} {:>12}",
            r.stage,
            gib(r.predicted_gib),
            gib(r.measured_gib),
            ratio,
            r.seconds,
            gib(r.at_start_gib)
        );
    }
}

fn describe(info: &ModelInfo, r: &ResolvedRequest, output: &Path) -> String {
    let guidance = match r.guidance_2 {
        Some(g2) => format!("{} (high noise) / {g2} (low noise)", r.guidance),
        None => r.guidance.to_string(),
    };
    format!(
        "{}: {}x{}, {} frames at {} fps ({:.2} s), {} steps ({}, shift {}), guidance {}, seed {}{} -> {}",
        info.name,
        r.width,
        r.height,
        r.frames,
        r.fps,
        f64::from(r.frames) / f64::from(r.fps),
        r.steps,
        r.scheduler,
        r.shift,
        guidance,
        r.seed,
        r.image
            .as_ref()
            .map(|p| format!(", image {}", p.display()))
            .unwrap_or_default(),
        output.display()
    )
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1}s")
    } else if s < 3600.0 {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    } else {
        format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        )
    }
}

/// `--json`: every progress event as one line on stdout, as the engine serialises it.
#[derive(Default)]
pub struct JsonProgress;

impl JsonProgress {
    fn line(&mut self, value: &impl Serialize) -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, value)?;
        out.write_all(b"\n")?;
        // A closed pipe stops the run at the next step instead of computing for nobody.
        out.flush().context("writing progress to stdout")
    }
}

impl ProgressSink for JsonProgress {
    fn event(&mut self, event: ProgressEvent) -> anyhow::Result<()> {
        self.line(&event)
    }
}

fn stage_label(stage: Stage) -> &'static str {
    match stage {
        Stage::Validate => "validating",
        Stage::TextEncode => "encoding the prompt",
        Stage::ImageEncode => "encoding the image",
        Stage::Denoise => "denoising",
        Stage::VaeDecode => "decoding frames",
        Stage::Encode => "writing the video",
    }
}

/// Progress bars on stderr: a spinner per stage, a bar with ETA for stages that report steps.
/// Without a terminal (logs, CI) it prints one line per stage and per step instead.
pub struct BarProgress {
    bar: Option<ProgressBar>,
    stage: Option<Stage>,
    stage_started: Instant,
    terminal: bool,
}

impl Default for BarProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl BarProgress {
    pub fn new() -> Self {
        Self {
            bar: None,
            stage: None,
            stage_started: Instant::now(),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Ends the current stage's bar, leaving a line with its duration.
    pub fn finish(&mut self) {
        if let (Some(bar), Some(stage)) = (self.bar.take(), self.stage) {
            bar.finish_with_message(format!(
                "{} done in {}",
                stage_label(stage),
                human_duration(self.stage_started.elapsed())
            ));
        }
    }

    fn print(&self, line: &str) {
        match &self.bar {
            Some(bar) if self.terminal => bar.suspend(|| eprintln!("{line}")),
            _ => eprintln!("{line}"),
        }
    }
}

impl ProgressSink for BarProgress {
    fn event(&mut self, event: ProgressEvent) -> anyhow::Result<()> {
        match event {
            ProgressEvent::Stage { stage, .. } => {
                self.finish();
                self.stage = Some(stage);
                self.stage_started = Instant::now();
                if self.terminal {
                    let bar = ProgressBar::new_spinner().with_message(stage_label(stage));
                    bar.set_style(
                        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
                            .expect("valid template"),
                    );
                    bar.enable_steady_tick(Duration::from_millis(120));
                    self.bar = Some(bar);
                } else {
                    eprintln!("{}...", stage_label(stage));
                }
            }
            ProgressEvent::Step {
                stage,
                step,
                total,
                eta_s,
                ..
            } => {
                let eta = eta_s
                    .map(|s| {
                        format!(
                            "ETA {}",
                            human_duration(Duration::from_secs_f64(s.max(0.0)))
                        )
                    })
                    .unwrap_or_default();
                if !self.terminal {
                    eprintln!("{} {step}/{total} {eta}", stage_label(stage));
                    return Ok(());
                }
                let needs_bar = self
                    .bar
                    .as_ref()
                    .is_none_or(|b| b.length() != Some(u64::from(total)));
                if needs_bar {
                    if let Some(old) = self.bar.take() {
                        old.finish_and_clear();
                    }
                    let bar = ProgressBar::new(u64::from(total));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{prefix} [{bar:30.cyan/blue}] {pos}/{len} {elapsed} {msg}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                    bar.set_prefix(stage_label(stage));
                    self.stage = Some(stage);
                    self.bar = Some(bar);
                }
                if let Some(bar) = &self.bar {
                    bar.set_position(u64::from(step));
                    bar.set_message(eta);
                }
            }
            ProgressEvent::Warning { message } => self.print(&format!("warning: {message}")),
            ProgressEvent::Preview { .. } => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_both_spellings() {
        assert_eq!(parse_size("1280x704").unwrap(), (1280, 704));
        assert_eq!(parse_size("704*1280").unwrap(), (704, 1280));
        assert_eq!(parse_size(" 256 X 128 ").unwrap(), (256, 128));
        for bad in ["1280", "x704", "1280x", "axb", "-1x5", "1280x704x3"] {
            let err = parse_size(bad).unwrap_err();
            assert!(vidgen_engine::error::is_invalid_input(&err), "{bad}");
            assert!(err.to_string().starts_with("size:"), "{err}");
        }
    }

    #[test]
    fn default_output_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let first = default_output(dir.path(), 7);
        assert_eq!(first, dir.path().join("vidgen-7.mp4"));
        std::fs::write(&first, b"x").unwrap();
        assert_eq!(
            default_output(dir.path(), 7),
            dir.path().join("vidgen-7-2.mp4")
        );
    }
}
