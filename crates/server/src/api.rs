//! HTTP routes: OpenAI's Videos API (`/v1/videos...`), vidgen's extensions to it (every
//! `vidgen generate` knob as extra create fields, `/cancel`, `/events`), `/v1/models`, `/metrics`,
//! `/openapi.json` and the portal.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tower::ServiceExt as _;
use vidgen_engine::memory::Offload;
use vidgen_engine::pipeline::image::ImageLimits;
use vidgen_engine::pipeline::request::SCHEDULERS;
use vidgen_engine::pipeline::{GenerateRequest, ResolvedRequest, Task};

use crate::error::ApiError;
use crate::forms::{read_form, Form, Kind};
use crate::protocol::{codes, JobSettings, MemorySettings, OutputFormat, VaeDtype, Weights};
use crate::state::{is_job_id, new_job_id, AppState, Metrics, ModelSlot, StopReason};
use crate::store::{JobRow, Status};
use crate::uploads::{decode_data_url, sanitize_image};

type AppResult<T> = Result<T, ApiError>;
type St = State<Arc<AppState>>;

pub fn router(state: Arc<AppState>) -> Router {
    let protected = Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/videos", post(create_video).get(list_videos))
        .route("/v1/videos/extensions", post(extend_video))
        .route("/v1/videos/{id}", get(retrieve_video).delete(delete_video))
        .route("/v1/videos/{id}/content", get(video_content))
        .route("/v1/videos/{id}/remix", post(remix_video))
        .route("/v1/videos/{id}/cancel", post(cancel_video))
        .route("/v1/videos/{id}/events", get(video_events))
        .route("/metrics", get(crate::metrics::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(|| async { portal_file("index.html") }))
        .route("/app.js", get(|| async { portal_file("app.js") }))
        .route("/style.css", get(|| async { portal_file("style.css") }))
        .route(
            "/openapi.json",
            get(|| async { portal_file("openapi.json") }),
        )
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .merge(protected)
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "Unknown endpoint.",
            )
        })
        // A known path with another method: still OpenAI's error shape, not an empty 405.
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "Method not allowed for this endpoint.",
            )
        })
        .layer(DefaultBodyLimit::max(state.config.limits.max_body_bytes))
        .with_state(state)
}

/// The portal's files, built into the binary.
fn portal_file(name: &str) -> Response {
    let (body, mime): (&'static str, &str) = match name {
        "index.html" => (
            include_str!("../../../web/index.html"),
            "text/html; charset=utf-8",
        ),
        "app.js" => (
            include_str!("../../../web/app.js"),
            "text/javascript; charset=utf-8",
        ),
        "style.css" => (
            include_str!("../../../web/style.css"),
            "text/css; charset=utf-8",
        ),
        _ => (
            include_str!("../../../web/openapi.json"),
            "application/json",
        ),
    };
    (
        [
            (header::CONTENT_TYPE, mime),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Bearer keys from the config; none configured means open (loopback unless allowed).
async fn auth(State(state): St, req: Request, next: Next) -> Response {
    let keys = &state.config.api_keys;
    if keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let ok = given.is_some_and(|g| {
        // Compare every key in full so timing does not reveal a matching prefix.
        keys.iter().fold(false, |acc, k| {
            acc | constant_time_eq(k.as_bytes(), g.as_bytes())
        })
    });
    if ok {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            if given.is_some() {
                "Incorrect API key provided."
            } else {
                "Missing API key: send `Authorization: Bearer <key>`."
            },
        )
        .code("invalid_api_key")
        .into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------------------------
// Models

/// `cpu_workers`: the server's workers run on the CPU, where `vae_dtype: bf16` is refused (so it is
/// not offered).
fn model_json(m: &ModelSlot, cpu_workers: bool) -> Value {
    let i = &m.info;
    let vae_dtypes: Vec<&str> = VaeDtype::NAMES
        .into_iter()
        .filter(|d| !(cpu_workers && *d == "bf16"))
        .collect();
    let sizes: Vec<String> = i.sizes.iter().map(|(w, h)| format!("{w}x{h}")).collect();
    json!({
        "id": m.name,
        "object": "model",
        "created": 0,
        "owned_by": "vidgen",
        "task": i.task,
        "image_conditioning": i.task != Task::T2v,
        "image_required": i.task == Task::I2v,
        "extensions": i.task != Task::T2v,
        "sizes": sizes,
        "default_size": sizes.first(),
        "free_size": i.free_size,
        "size_multiple": i.size_multiple,
        "max_pixels": i.max_pixels,
        "fps": i.fps,
        "frames": {
            "default": i.default_frames,
            "min": i.min_frames,
            "max": i.max_frames,
            "step": i.frame_step,
            "rule": format!("{}k+1", i.frame_step),
        },
        "max_seconds": f64::from(i.max_frames) / f64::from(i.fps),
        "default_seconds": seconds_text(f64::from(i.default_frames) / f64::from(i.fps)),
        "steps": {"default": i.default_steps, "min": 1, "max": i.max_steps},
        "guidance": {"default": i.default_guidance, "min": 1.0, "max": 30.0},
        "guidance_2": i.default_guidance_2.map(|d| json!({"default": d, "min": 1.0, "max": 30.0})),
        "shift": {"default": i.default_shift, "min": 0.1, "max": 100.0},
        "scheduler": {"default": i.default_scheduler, "values": SCHEDULERS},
        "default_negative_prompt": i.default_negative_prompt,
        "max_prompt_chars": i.max_prompt_chars,
        "output_formats": ["mp4", "webm"],
        "offload": {"default": "auto", "values": Offload::NAMES},
        "weights": {"default": Weights::default().name(), "values": Weights::NAMES},
        "vae_dtype": {"default": VaeDtype::default().name(), "values": vae_dtypes},
    })
}

async fn list_models(State(state): St) -> Json<Value> {
    let cpu = state.config.queue.workers_on_cpu();
    let data: Vec<Value> = state
        .env
        .models
        .iter()
        .map(|m| model_json(m, cpu))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

// ---------------------------------------------------------------------------------------------
// The video object

/// Seconds as OpenAI spells them (a string), to the millisecond, without trailing zeros.
pub fn seconds_text(s: f64) -> String {
    let t = format!("{s:.3}");
    t.trim_end_matches('0').trim_end_matches('.').to_string()
}

pub fn video_object(state: &AppState, row: &JobRow) -> Value {
    let r = &row.settings.request;
    let (width, height, frames, fps, seed) = match &row.output {
        Some(o) => (o.width, o.height, o.frames, o.fps, o.seed),
        None => (
            r.width.unwrap_or(0),
            r.height.unwrap_or(0),
            r.frames.unwrap_or(0),
            r.fps.unwrap_or(1),
            r.seed.unwrap_or(0),
        ),
    };
    let seconds = row
        .output
        .as_ref()
        .map_or(f64::from(frames) / f64::from(fps.max(1)), |o| o.seconds);
    let error = row
        .error
        .as_ref()
        .map(|(code, message)| json!({"code": code, "message": message}));
    let live = if row.status == Status::InProgress {
        state.live_progress(&row.id)
    } else {
        None
    };
    let position = if row.status == Status::Queued {
        state.store.queue_position(&row.id).ok().flatten()
    } else {
        None
    };
    json!({
        "id": row.id,
        "object": "video",
        "model": row.settings.model,
        "status": row.status.as_str(),
        "progress": row.progress,
        "created_at": row.created_at,
        "completed_at": row.completed_at,
        "expires_at": row.expires_at,
        "size": format!("{width}x{height}"),
        "seconds": seconds_text(seconds),
        "error": error,
        "prompt": r.prompt,
        "remixed_from_video_id": row.remixed_from,
        // vidgen's additions: what exactly is (or was) made, and where the job stands.
        "extended_from_video_id": row.settings.extend_from,
        "frames": frames,
        "fps": fps,
        "seed": seed,
        "negative_prompt": r.negative_prompt,
        "steps": r.steps,
        "guidance": r.guidance,
        "guidance_2": r.guidance_2,
        "shift": r.shift,
        "scheduler": r.scheduler,
        "output_format": row.settings.output_format,
        "offload": row.settings.memory.offload.as_deref().unwrap_or("auto"),
        "weights": row.settings.memory.weights.name(),
        "vae_dtype": row.settings.memory.vae_dtype.name(),
        "has_image": r.image.is_some(),
        "notes": row.settings.notes,
        "warnings": row.output.as_ref().map(|o| o.warnings.clone()).unwrap_or_default(),
        "stage": live.as_ref().and_then(|l| l.stage.clone()).or_else(|| row.stage.clone()),
        "step": live.as_ref().and_then(|l| l.step.map(|(s, _)| s)),
        "total_steps": live.as_ref().and_then(|l| l.step.map(|(_, t)| t)),
        "eta_s": live.as_ref().and_then(|l| l.eta_s),
        "queue_position": position,
        "started_at": row.started_at,
        "expired": row.expired,
    })
}

fn get_job(state: &AppState, id: &str) -> AppResult<JobRow> {
    if !is_job_id(id) {
        return Err(ApiError::not_found(id));
    }
    state.store.get(id)?.ok_or_else(|| ApiError::not_found(id))
}

// ---------------------------------------------------------------------------------------------
// Create

const CREATE_FIELDS: &[(&str, Kind)] = &[
    ("model", Kind::Str),
    ("prompt", Kind::Str),
    ("seconds", Kind::Float),
    ("size", Kind::Str),
    ("input_reference", Kind::Image(&["image_url", "file_id"])),
    ("negative_prompt", Kind::Str),
    ("width", Kind::U32),
    ("height", Kind::U32),
    ("frames", Kind::U32),
    ("fps", Kind::U32),
    ("align_frames", Kind::Bool),
    ("steps", Kind::U32),
    ("guidance", Kind::Float),
    ("guidance_2", Kind::Float),
    ("shift", Kind::Float),
    ("scheduler", Kind::Str),
    ("seed", Kind::U53),
    ("output_format", Kind::Str),
    ("offload", Kind::Str),
    ("weights", Kind::Str),
    ("vae_dtype", Kind::Str),
];

/// Typed view of a normalised create form.
#[derive(Debug, Deserialize)]
struct CreateBody {
    model: Option<String>,
    prompt: Option<String>,
    seconds: Option<f64>,
    size: Option<String>,
    input_reference: Option<ImageRef>,
    negative_prompt: Option<String>,
    width: Option<u32>,
    height: Option<u32>,
    frames: Option<u32>,
    fps: Option<u32>,
    align_frames: Option<bool>,
    steps: Option<u32>,
    guidance: Option<f64>,
    guidance_2: Option<f64>,
    shift: Option<f64>,
    scheduler: Option<String>,
    seed: Option<u64>,
    output_format: Option<String>,
    offload: Option<String>,
    weights: Option<String>,
    vae_dtype: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ImageRef {
    image_url: Option<String>,
    file_id: Option<String>,
}

fn typed<T: serde::de::DeserializeOwned>(form: &Form) -> AppResult<T> {
    serde_json::from_value(Value::Object(form.fields.clone()))
        .map_err(|e| ApiError::invalid(format!("invalid request: {e}")))
}

fn parse_size(size: &str, model: &ModelSlot) -> AppResult<(u32, u32)> {
    let valid = || {
        model
            .info
            .sizes
            .iter()
            .map(|(w, h)| format!("{w}x{h}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let parsed = size
        .split_once(['x', 'X', '*', '×'])
        .and_then(|(w, h)| Some((w.trim().parse::<u32>().ok()?, h.trim().parse::<u32>().ok()?)));
    parsed.ok_or_else(|| {
        ApiError::invalid(format!(
            "size: `{size}` is not WIDTHxHEIGHT; model `{}` makes {}",
            model.name,
            valid()
        ))
    })
}

fn output_format(v: Option<&str>) -> AppResult<OutputFormat> {
    match v {
        None => Ok(OutputFormat::Mp4),
        Some(s) => OutputFormat::parse(s).ok_or_else(|| {
            ApiError::invalid(format!(
                "output_format: `{s}` is not one of {}",
                OutputFormat::NAMES
            ))
        }),
    }
}

/// `offload`: a placement mode, or `auto` / absent for the planner's choice.
fn offload_mode(v: Option<&str>) -> AppResult<Option<String>> {
    match v {
        None | Some("auto") => Ok(None),
        Some(s) if Offload::NAMES.contains(&s) => Ok(Some(s.to_string())),
        Some(s) => Err(ApiError::invalid(format!(
            "offload: `{s}` is not one of {}",
            Offload::NAMES.join(", ")
        ))),
    }
}

/// `field`'s value among `names` (`parse` reads one), or `T::default()` when absent.
fn choice<T: Default>(
    field: &str,
    v: Option<&str>,
    parse: fn(&str) -> Option<T>,
    names: &[&str],
) -> AppResult<T> {
    match v {
        None => Ok(T::default()),
        Some(s) => parse(s).ok_or_else(|| {
            ApiError::invalid(format!("{field}: `{s}` is not one of {}", names.join(", ")))
        }),
    }
}

/// `weights`: the transformer weight format (`bf16` when absent).
fn weights_format(v: Option<&str>) -> AppResult<Weights> {
    choice("weights", v, Weights::parse, &Weights::NAMES)
}

/// `vae_dtype`: the VAE precision (`auto` when absent). Whether it suits the workers' device is
/// checked in [`submit`], for remixes and extensions too.
fn vae_dtype(v: Option<&str>) -> AppResult<VaeDtype> {
    choice("vae_dtype", v, VaeDtype::parse, &VaeDtype::NAMES)
}

/// `vae_dtype: bf16` needs a GPU: on a server whose workers run on the CPU it is refused here
/// rather than failing in the worker.
fn check_vae_dtype(state: &AppState, dtype: VaeDtype) -> AppResult<()> {
    if dtype == VaeDtype::Bf16 && state.config.queue.workers_on_cpu() {
        let why = match &state.config.queue.device {
            Some(d) => format!("queue.device = {d}"),
            None => "vidgen was built without CUDA".to_string(),
        };
        return Err(ApiError::invalid(format!(
            "vae_dtype: bf16 runs on a GPU only, and this server's workers run on the CPU \
             ({why}), where the VAE runs in f32; use auto or f32"
        )));
    }
    Ok(())
}

fn pick_model<'a>(state: &'a AppState, name: Option<&str>) -> AppResult<&'a ModelSlot> {
    match name {
        None => Ok(&state.env.models[0]),
        Some(n) => state.model(n).ok_or_else(|| {
            ApiError::invalid(format!(
                "model: `{n}` is not served here; available: {}",
                state.model_names()
            ))
            .code("model_not_found")
        }),
    }
}

/// Where a new job's conditioning image comes from.
enum ImageSource {
    None,
    Bytes(Vec<u8>, String),
    /// Copied from another job's sanitised input (remix).
    CopyFrom(std::path::PathBuf),
    /// Written by the worker (extensions: the source's last frame).
    Worker,
}

struct Submission<'a> {
    model: &'a ModelSlot,
    request: GenerateRequest,
    image: ImageSource,
    output_format: OutputFormat,
    memory: MemorySettings,
    remixed_from: Option<String>,
    extend_from: Option<String>,
}

async fn create_video(State(state): St, req: Request) -> AppResult<Response> {
    let form = read_form(&state, req, CREATE_FIELDS).await?;
    let body: CreateBody = typed(&form)?;
    let model = pick_model(&state, body.model.as_deref())?;
    let Some(prompt) = body.prompt else {
        return Err(ApiError::invalid("prompt: required"));
    };
    let (width, height) = match (&body.size, body.width, body.height) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err(ApiError::invalid(
                "size: give either size or width/height, not both",
            ))
        }
        (Some(size), None, None) => {
            let (w, h) = parse_size(size, model)?;
            (Some(w), Some(h))
        }
        (None, w, h) => (w, h),
    };
    let image = match (form.file, body.input_reference) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "input_reference: give one file or one image_url",
            ))
        }
        (Some((_, bytes)), None) => ImageSource::Bytes(bytes, "input_reference".into()),
        (None, Some(r)) => match (r.image_url, r.file_id) {
            (Some(url), None) => ImageSource::Bytes(
                decode_data_url(
                    &url,
                    "input_reference.image_url",
                    state.config.limits.max_upload_bytes,
                )?,
                "input_reference".into(),
            ),
            (None, Some(_)) => return Err(ApiError::invalid(
                "input_reference.file_id: files by id are not supported here; upload the image \
                     as a multipart file `input_reference` or send input_reference.image_url as a \
                     data URL",
            )),
            _ => {
                return Err(ApiError::invalid(
                    "input_reference: give exactly one of image_url or file_id",
                ))
            }
        },
        (None, None) => ImageSource::None,
    };
    let request = GenerateRequest {
        prompt,
        negative_prompt: body.negative_prompt,
        image: None,
        width,
        height,
        frames: body.frames,
        seconds: body.seconds,
        fps: body.fps,
        align_frames: body.align_frames.unwrap_or(false),
        steps: body.steps,
        guidance: body.guidance,
        guidance_2: body.guidance_2,
        shift: body.shift,
        scheduler: body.scheduler,
        seed: body.seed,
    };
    let sub = Submission {
        model,
        request,
        image,
        output_format: output_format(body.output_format.as_deref())?,
        memory: MemorySettings {
            offload: offload_mode(body.offload.as_deref())?,
            weights: weights_format(body.weights.as_deref())?,
            vae_dtype: vae_dtype(body.vae_dtype.as_deref())?,
        },
        remixed_from: None,
        extend_from: None,
    };
    let row = submit(&state, sub).await?;
    Ok(Json(video_object(&state, &row)).into_response())
}

/// A fully decided request: what the worker runs and the API reports.
fn fixed_request(r: &ResolvedRequest, has_image: bool) -> GenerateRequest {
    GenerateRequest {
        prompt: r.prompt.clone(),
        negative_prompt: Some(r.negative_prompt.clone()),
        image: has_image.then(|| "input.png".into()),
        width: Some(r.width),
        height: Some(r.height),
        frames: Some(r.frames),
        seconds: None,
        fps: Some(r.fps),
        align_frames: false,
        steps: Some(r.steps),
        guidance: Some(r.guidance),
        guidance_2: r.guidance_2,
        shift: Some(r.shift),
        scheduler: Some(r.scheduler.clone()),
        seed: Some(r.seed),
    }
}

fn queue_full(state: &AppState) -> ApiError {
    Metrics::inc(&state.metrics.rejected_queue_full);
    let queued = state.store.count_queued().unwrap_or(0) as f64;
    let workers = state.config.queue.gpus.len().max(1) as f64;
    let mean = state.metrics.mean_job_seconds().unwrap_or(60.0);
    // A place frees when the next job starts: about one mean job duration per worker.
    let retry = (mean / workers).clamp(1.0, 3600.0).ceil();
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        format!(
            "The queue is full ({} jobs waiting, queue.max_queued = {}); retry later.",
            queued, state.config.queue.max_queued
        ),
    )
    .code("queue_full");
    e.retry_after_s = Some(retry as u64);
    e
}

/// Validates (the model's own rules), stores the image, and queues the job.
async fn submit(state: &Arc<AppState>, mut sub: Submission<'_>) -> AppResult<JobRow> {
    check_vae_dtype(state, sub.memory.vae_dtype)?;
    let has_image = !matches!(sub.image, ImageSource::None);
    // `resolve` only needs to know an image is present; its real path is decided below.
    sub.request.image = has_image.then(|| "input.png".into());
    let resolved = sub.model.info.resolve(&sub.request)?;
    if state.store.count_queued()? >= state.config.queue.max_queued {
        return Err(queue_full(state));
    }
    let id = new_job_id();
    let dir = state.job_dir(&id)?;
    std::fs::create_dir_all(&dir).map_err(|e| ApiError::internal(&e.into()))?;
    let cleanup = |e: ApiError| {
        let _ = std::fs::remove_dir_all(&dir);
        e
    };
    let dest = dir.join("input.png");
    match std::mem::replace(&mut sub.image, ImageSource::None) {
        ImageSource::None | ImageSource::Worker => {}
        ImageSource::Bytes(bytes, field) => {
            let limits = ImageLimits {
                max_bytes: state.config.limits.max_upload_bytes as u64,
                max_pixels: state.config.limits.max_image_pixels,
            };
            let dest = dest.clone();
            tokio::task::spawn_blocking(move || sanitize_image(&bytes, &field, &limits, &dest))
                .await
                .map_err(|e| ApiError::internal(&anyhow::anyhow!("image task: {e}")))
                .and_then(|r| r.map_err(ApiError::from))
                .map_err(cleanup)?;
        }
        ImageSource::CopyFrom(src) => {
            std::fs::copy(&src, &dest).map_err(|e| cleanup(ApiError::internal(&e.into())))?;
        }
    }
    let settings = JobSettings {
        model: sub.model.name.clone(),
        request: fixed_request(&resolved, has_image),
        output_format: sub.output_format,
        extend_from: sub.extend_from,
        notes: resolved.notes.clone(),
        memory: sub.memory,
    };
    let inserted = state
        .store
        .insert_queued(
            &id,
            &settings,
            sub.remixed_from.as_deref(),
            state.config.queue.max_queued,
        )
        .map_err(|e| cleanup(ApiError::from(e)))?;
    if !inserted {
        return Err(cleanup(queue_full(state)));
    }
    Metrics::inc(&state.metrics.submitted);
    tracing::info!(job_id = %id, model = %settings.model, frames = resolved.frames,
        width = resolved.width, height = resolved.height, "job queued");
    state.wake.notify_one();
    get_job(state, &id)
}

// ---------------------------------------------------------------------------------------------
// Remix and extensions

async fn remix_video(
    State(state): St,
    Path(id): Path<String>,
    req: Request,
) -> AppResult<Response> {
    let form = read_form(&state, req, &[("prompt", Kind::Str)]).await?;
    let Some(prompt) = form.str("prompt").map(str::to_string) else {
        return Err(ApiError::invalid("prompt: required"));
    };
    let source = get_job(&state, &id)?;
    if source.expired {
        return Err(ApiError::invalid(format!(
            "video {id} has expired; it cannot be remixed"
        )));
    }
    let model = pick_model(&state, Some(&source.settings.model))?;
    let mut request = source.settings.request.clone();
    request.prompt = prompt;
    let image = if request.image.is_some() {
        ImageSource::CopyFrom(state.job_dir(&id)?.join("input.png"))
    } else {
        ImageSource::None
    };
    if source.settings.extend_from.is_some() {
        return Err(ApiError::invalid(format!(
            "video {id} is an extension; remix the video it extends instead"
        )));
    }
    let sub = Submission {
        model,
        request,
        image,
        output_format: source.settings.output_format,
        memory: source.settings.memory.clone(),
        remixed_from: Some(id),
        extend_from: None,
    };
    let row = submit(&state, sub).await?;
    Ok(Json(video_object(&state, &row)).into_response())
}

const EXTEND_FIELDS: &[(&str, Kind)] = &[
    ("prompt", Kind::Str),
    ("seconds", Kind::Float),
    ("video", Kind::Object(&["id"])),
];

async fn extend_video(State(state): St, req: Request) -> AppResult<Response> {
    let form = read_form(&state, req, EXTEND_FIELDS).await?;
    let Some(prompt) = form.str("prompt").map(str::to_string) else {
        return Err(ApiError::invalid("prompt: required"));
    };
    let Some(source_id) = form
        .fields
        .get("video")
        .and_then(|v| v.get("id"))
        .and_then(Value::as_str)
    else {
        return Err(ApiError::invalid(
            "video: required, as {\"id\": \"video_...\"}",
        ));
    };
    let source = get_job(&state, source_id)?;
    // The model first: it can never extend, whereas an unfinished source only has to wait.
    let model = pick_model(&state, Some(&source.settings.model))?;
    if model.info.task == Task::T2v {
        return Err(ApiError::invalid(format!(
            "video: model `{}` is text-to-video only; extending a video conditions on its last \
             frame and needs an image-to-video model (task ti2v or i2v)",
            model.name
        ))
        .code("unsupported_model"));
    }
    if source.status != Status::Completed || source.expired {
        return Err(ApiError::invalid(format!(
            "video: {source_id} is {}; only completed, unexpired videos can be extended",
            if source.expired {
                "expired"
            } else {
                source.status.as_str()
            }
        )));
    }
    let output = source
        .output
        .as_ref()
        .expect("completed jobs have an output");
    let mut request = source.settings.request.clone();
    request.prompt = prompt;
    request.width = Some(output.width);
    request.height = Some(output.height);
    request.frames = None;
    request.seconds = form.fields.get("seconds").and_then(Value::as_f64);
    request.seed = None;
    let sub = Submission {
        model,
        request,
        image: ImageSource::Worker,
        output_format: source.settings.output_format,
        memory: source.settings.memory.clone(),
        remixed_from: None,
        extend_from: Some(source_id.to_string()),
    };
    let row = submit(&state, sub).await?;
    Ok(Json(video_object(&state, &row)).into_response())
}

// ---------------------------------------------------------------------------------------------
// Retrieve, list, delete, cancel

async fn retrieve_video(State(state): St, Path(id): Path<String>) -> AppResult<Response> {
    let row = get_job(&state, &id)?;
    let mut resp = Json(video_object(&state, &row)).into_response();
    // The SDK's create_and_poll waits this long between polls.
    let after = match row.status {
        Status::Queued => 2000,
        Status::InProgress => 1000,
        _ => 0,
    };
    if after > 0 {
        resp.headers_mut()
            .insert("openai-poll-after-ms", HeaderValue::from(after));
    }
    Ok(resp)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    after: Option<String>,
    limit: Option<String>,
    order: Option<String>,
}

async fn list_videos(
    State(state): St,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> AppResult<Json<Value>> {
    let Query(params) = params.map_err(|e| {
        ApiError::invalid(format!(
            "query: {} (valid parameters: after, limit, order)",
            e.body_text()
        ))
    })?;
    let limit = match params.limit.as_deref() {
        None => 20,
        Some(l) => match l.parse::<usize>() {
            Ok(n @ 1..=100) => n,
            _ => {
                return Err(ApiError::invalid(format!(
                    "limit: `{l}` is not an integer in 1..=100"
                )))
            }
        },
    };
    let ascending = match params.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(o) => {
            return Err(ApiError::invalid(format!(
                "order: `{o}` is not one of asc, desc"
            )))
        }
    };
    let Some((rows, has_more)) = state
        .store
        .list(params.after.as_deref(), limit, ascending)?
    else {
        return Err(ApiError::invalid(format!(
            "after: no video with id `{}`",
            params.after.unwrap_or_default()
        )));
    };
    let data: Vec<Value> = rows.iter().map(|r| video_object(&state, r)).collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "first_id": rows.first().map(|r| r.id.clone()),
        "last_id": rows.last().map(|r| r.id.clone()),
        "has_more": has_more,
    })))
}

/// Marks a queued job cancelled; false when it was claimed meanwhile.
fn cancel_queued(state: &AppState, id: &str) -> anyhow::Result<bool> {
    if state.store.cancel_if_queued(id, state.expires_at())? {
        state.metrics.failure(codes::CANCELLED);
        tracing::info!(job_id = %id, "queued job cancelled");
        if let Some(row) = state.store.get(id)? {
            state.publish(id, "video", video_object(state, &row).to_string());
        }
        state.publish(id, "done", "{}".into());
        state.close_channel(id);
        return Ok(true);
    }
    Ok(false)
}

async fn cancel_video(State(state): St, Path(id): Path<String>) -> AppResult<Json<Value>> {
    let row = get_job(&state, &id)?;
    if row.status.is_finished() {
        return Err(ApiError::conflict(format!(
            "video {id} is already {}; nothing to cancel",
            row.status.as_str()
        ))
        .code("not_cancellable"));
    }
    if !(row.status == Status::Queued && cancel_queued(&state, &id)?) {
        // Running (or claimed a moment ago): the worker stops at its next step.
        let mut stopped = state.stop_running(&id, StopReason::Cancelled);
        for _ in 0..50 {
            if stopped {
                break;
            }
            // Claimed but not registered yet: wait briefly for the runner.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            stopped = state.stop_running(&id, StopReason::Cancelled);
        }
        if stopped {
            tracing::info!(job_id = %id, "cancel requested");
        }
    }
    let row = get_job(&state, &id)?;
    Ok(Json(video_object(&state, &row)))
}

async fn delete_video(State(state): St, Path(id): Path<String>) -> AppResult<Json<Value>> {
    let row = get_job(&state, &id)?;
    if row.status == Status::Queued {
        cancel_queued(&state, &id)?;
    }
    let row = get_job(&state, &id)?;
    if row.status == Status::InProgress {
        // The runner kills the worker and removes the folder once it is gone.
        state.stop_running(&id, StopReason::Deleted);
    } else if let Ok(dir) = state.job_dir(&id) {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| ApiError::internal(&e.into()))?;
        }
    }
    state.store.delete(&id)?;
    tracing::info!(job_id = %id, "video deleted");
    Ok(Json(
        json!({"id": id, "object": "video.deleted", "deleted": true}),
    ))
}

// ---------------------------------------------------------------------------------------------
// Content and events

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContentParams {
    variant: Option<String>,
}

async fn video_content(
    State(state): St,
    Path(id): Path<String>,
    params: Result<Query<ContentParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> AppResult<Response> {
    let Query(params) = params.map_err(|e| {
        ApiError::invalid(format!(
            "query: {} (valid parameters: variant)",
            e.body_text()
        ))
    })?;
    let row = get_job(&state, &id)?;
    let variant = params.variant.as_deref().unwrap_or("video");
    if !["video", "thumbnail", "spritesheet"].contains(&variant) {
        return Err(ApiError::invalid(format!(
            "variant: `{variant}` is not one of video, thumbnail, spritesheet"
        )));
    }
    if row.expired {
        return Err(ApiError::new(
            StatusCode::GONE,
            "invalid_request_error",
            format!("the assets of video {id} expired and were deleted"),
        )
        .code("expired"));
    }
    let Some(output) = row
        .output
        .as_ref()
        .filter(|_| row.status == Status::Completed)
    else {
        return Err(ApiError::conflict(format!(
            "video {id} is {}; content is available once it is completed",
            row.status.as_str()
        ))
        .code("not_ready"));
    };
    let fmt = row.settings.output_format;
    let (file, mime, available) = match variant {
        "video" => (format!("video.{}", fmt.extension()), fmt.mime(), true),
        "thumbnail" => ("thumbnail.webp".to_string(), "image/webp", output.thumbnail),
        _ => (
            "spritesheet.jpg".to_string(),
            "image/jpeg",
            output.spritesheet,
        ),
    };
    let path = state.job_dir(&id)?.join(&file);
    if !available || !path.exists() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("variant: no {variant} was produced for video {id}"),
        )
        .code("not_found"));
    }
    // ServeFile answers Range requests, so the portal's player can seek.
    let mut file_req = axum::http::Request::builder().uri("/");
    for name in [
        header::RANGE,
        header::IF_RANGE,
        header::IF_MODIFIED_SINCE,
        header::IF_NONE_MATCH,
    ] {
        if let Some(v) = headers.get(&name) {
            file_req = file_req.header(name, v);
        }
    }
    let file_req = file_req
        .body(axum::body::Body::empty())
        .expect("static request");
    let resp = tower_http::services::ServeFile::new_with_mime(&path, &mime.parse().expect("mime"))
        .oneshot(file_req)
        .await
        .map_err(|e| ApiError::internal(&anyhow::anyhow!("serving {file}: {e}")))?;
    let mut resp = resp.map(axum::body::Body::new);
    if let Ok(v) = HeaderValue::from_str(&format!(
        "inline; filename=\"{id}.{}\"",
        &file[file.rfind('.').map_or(0, |i| i + 1)..]
    )) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// Server-Sent Events: `video` (the object, now and at each status change), `stage`, `step`
/// (with total and ETA), `preview` (a small PNG every few steps), `warning`, and `done`.
async fn video_events(State(state): St, Path(id): Path<String>) -> AppResult<Response> {
    // Subscribe before reading the row, so nothing between the two is missed.
    let rx = state.subscribe(&id);
    let row = match get_job(&state, &id) {
        Ok(row) => row,
        Err(e) => {
            state.close_channel(&id);
            return Err(e);
        }
    };
    let mut first = vec![Event::default()
        .event("video")
        .data(video_object(&state, &row).to_string())];
    let finished = row.status.is_finished();
    if finished {
        first.push(Event::default().event("done").data("{}"));
        // Nothing will be published for a finished job any more.
        state.close_channel(&id);
    }
    let initial =
        futures_util::stream::iter(first.into_iter().map(Ok::<_, std::convert::Infallible>));
    let live = futures_util::stream::unfold((rx, finished), |(mut rx, done)| async move {
        if done {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(msg) => {
                    let end = msg.event == "done";
                    let ev = Event::default().event(msg.event).data(msg.data);
                    return Some((Ok(ev), (rx, end)));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    use futures_util::StreamExt as _;
    Ok(Sse::new(initial.chain(live))
        .keep_alive(KeepAlive::default())
        .into_response())
}
