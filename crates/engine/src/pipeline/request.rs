//! What a user asks for (`GenerateRequest`), what a model can make (`ModelInfo`), and the
//! validation between them. Shared by `vidgen generate`, the server's boundary and the worker, so a
//! request is judged the same way everywhere — before any weight is loaded.

use serde::{Deserialize, Serialize};

use crate::invalid;

/// A generation request. `None` means "the model's default". Unknown fields are rejected when
/// deserialising (a parameter that would be silently ignored must fail instead).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: Option<String>,
    /// Conditioning image (already decoded/oriented/stripped by the caller is fine; any JPEG/PNG/WebP).
    #[serde(default)]
    pub image: Option<std::path::PathBuf>,
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    /// Frame count (4k+1). Exclusive with `seconds`.
    #[serde(default)]
    pub frames: Option<u32>,
    /// Duration; becomes frames through the fps and the model's frame rule. Exclusive with `frames`.
    #[serde(default)]
    pub seconds: Option<f64>,
    #[serde(default)]
    pub fps: Option<u32>,
    /// Round an invalid frame count to the nearest valid one (and report it) instead of refusing.
    #[serde(default)]
    pub align_frames: bool,
    #[serde(default)]
    pub steps: Option<u32>,
    /// Guidance scale (high-noise expert for A14B).
    #[serde(default)]
    pub guidance: Option<f64>,
    /// Guidance scale of the low-noise expert (A14B only).
    #[serde(default)]
    pub guidance_2: Option<f64>,
    #[serde(default)]
    pub shift: Option<f64>,
    /// unipc | euler | dpm++
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
}

/// Task a model performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Text to video.
    T2v,
    /// Image to video (the image is required).
    I2v,
    /// Text or text+image to video (image optional: conditions the first frame).
    Ti2v,
}

/// What a model can make and its defaults — the constraints a request is validated against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub task: Task,
    /// Sizes (width, height) the model is trained for; the first is the default.
    pub sizes: Vec<(u32, u32)>,
    /// When true any size that is a multiple of `size_multiple` within `max_pixels` is accepted,
    /// otherwise only `sizes`.
    pub free_size: bool,
    /// Width and height must be multiples of this (VAE stride × patch: 16, or 32 for TI2V-5B).
    pub size_multiple: u32,
    pub max_pixels: u64,
    pub fps: u32,
    pub default_frames: u32,
    pub min_frames: u32,
    pub max_frames: u32,
    /// Frames are of the form `frame_step·k + 1` (4 for every Wan VAE).
    pub frame_step: u32,
    pub default_steps: u32,
    pub max_steps: u32,
    pub default_guidance: f64,
    /// Low-noise expert's guidance, for two-expert models.
    pub default_guidance_2: Option<f64>,
    pub default_shift: f64,
    pub default_scheduler: String,
    pub default_negative_prompt: String,
    /// Prompt length limit in characters (the tokenizer truncates at 512 tokens anyway).
    pub max_prompt_chars: usize,
}

/// A request with every value decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResolvedRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub image: Option<std::path::PathBuf>,
    pub width: u32,
    pub height: u32,
    pub frames: u32,
    pub fps: u32,
    pub steps: u32,
    pub guidance: f64,
    pub guidance_2: Option<f64>,
    pub shift: f64,
    pub scheduler: String,
    pub seed: u64,
    /// Things validation changed on request (e.g. `--align-frames`), to be shown to the user.
    pub notes: Vec<String>,
}

pub const SCHEDULERS: &[&str] = &["unipc", "euler", "dpm++"];

impl ModelInfo {
    /// Nearest valid frame counts below and above `n` (either may be missing at the range ends;
    /// beyond an end, the valid count at that end).
    pub fn nearest_frames(&self, n: u32) -> (Option<u32>, Option<u32>) {
        let s = self.frame_step;
        let valid = |v: u32| v >= self.min_frames && v <= self.max_frames;
        // Valid counts at the ends of the range (frame_step·k + 1 within min..=max).
        let lowest =
            Some(self.min_frames.saturating_sub(1).div_ceil(s) * s + 1).filter(|&v| valid(v));
        let highest = Some(self.max_frames.saturating_sub(1) / s * s + 1).filter(|&v| valid(v));
        let below = if n >= 1 {
            Some((n - 1) / s * s + 1)
        } else {
            None
        }
        .filter(|&b| valid(b));
        let above = Some((n.saturating_sub(1)).div_ceil(s) * s + 1).filter(|&a| valid(a));
        match (lowest, highest) {
            (_, Some(h)) if n > h => (Some(h), None),
            (Some(l), _) if n < l => (None, Some(l)),
            _ => (below, above),
        }
    }

    /// The valid frame count nearest to `n` (ties go up), if the range holds any.
    pub fn nearest_valid_frames(&self, n: u32) -> Option<u32> {
        match self.nearest_frames(n) {
            (Some(b), Some(a)) => Some(if n - b < a - n { b } else { a }),
            (b, a) => b.or(a),
        }
    }

    fn frames_valid(&self, n: u32) -> bool {
        n >= self.min_frames && n <= self.max_frames && (n - 1).is_multiple_of(self.frame_step)
    }

    fn sizes_text(&self) -> String {
        self.sizes
            .iter()
            .map(|(w, h)| format!("{w}x{h}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Validates `req` against this model and fills in defaults. Every error names the field and
    /// the valid values.
    pub fn resolve(&self, req: &GenerateRequest) -> anyhow::Result<ResolvedRequest> {
        let mut notes = Vec::new();
        let prompt = req.prompt.trim();
        if prompt.is_empty() {
            return Err(invalid!("prompt: must not be empty"));
        }
        let chars = prompt.chars().count();
        if chars > self.max_prompt_chars {
            return Err(invalid!(
                "prompt: {chars} characters, the limit is {}",
                self.max_prompt_chars
            ));
        }
        match (self.task, &req.image) {
            (Task::I2v, None) => {
                return Err(invalid!(
                    "image: model `{}` is image-to-video and needs an image",
                    self.name
                ))
            }
            (Task::T2v, Some(_)) => {
                return Err(invalid!(
                    "image: model `{}` is text-to-video and takes no image",
                    self.name
                ))
            }
            _ => {}
        }

        let (width, height) = match (req.width, req.height) {
            (None, None) => self.sizes[0],
            (Some(w), Some(h)) => (w, h),
            _ => {
                return Err(invalid!(
                    "size: give both width and height (e.g. {})",
                    self.sizes_text()
                ))
            }
        };
        let m = self.size_multiple;
        if self.free_size {
            if width == 0 || height == 0 || width % m != 0 || height % m != 0 {
                return Err(invalid!(
                    "size: {width}x{height} is not a multiple of {m} in both dimensions (model `{}`; e.g. {})",
                    self.name,
                    self.sizes_text()
                ));
            }
            if u64::from(width) * u64::from(height) > self.max_pixels {
                return Err(invalid!(
                    "size: {width}x{height} exceeds {} pixels for model `{}`",
                    self.max_pixels,
                    self.name
                ));
            }
        } else if !self.sizes.contains(&(width, height)) {
            return Err(invalid!(
                "size: {width}x{height} is not supported by model `{}`; valid sizes: {}",
                self.name,
                self.sizes_text()
            ));
        }

        let fps = req.fps.unwrap_or(self.fps);
        if !(1..=120).contains(&fps) {
            return Err(invalid!("fps: {fps} is out of range 1..=120"));
        }
        let requested = match (req.frames, req.seconds) {
            (Some(_), Some(_)) => {
                return Err(invalid!("frames/seconds: give one of them, not both"))
            }
            (Some(f), None) => f,
            (None, Some(s)) => {
                if !s.is_finite() || s <= 0.0 {
                    return Err(invalid!("seconds: {s} must be a positive number"));
                }
                // seconds -> frames: the frame rule's count nearest to s·fps (ties go up).
                let target = (s * f64::from(fps)).round().max(1.0) as u32;
                let pick = self.nearest_valid_frames(target).unwrap_or(self.max_frames);
                let max_s = f64::from(self.max_frames) / f64::from(fps);
                if s > max_s + 1e-9 {
                    return Err(invalid!(
                        "seconds: {s} is longer than model `{}` can make at {fps} fps (at most {:.2} s = {} frames)",
                        self.name,
                        max_s,
                        self.max_frames
                    ));
                }
                notes.push(format!(
                    "seconds {s} at {fps} fps -> {pick} frames ({:.3} s)",
                    f64::from(pick) / f64::from(fps)
                ));
                pick
            }
            (None, None) => self.default_frames,
        };
        let frames = if self.frames_valid(requested) {
            requested
        } else {
            let (below, above) = self.nearest_frames(requested);
            let options: Vec<String> = [below, above]
                .iter()
                .flatten()
                .map(|v| v.to_string())
                .collect();
            let rule = format!(
                "frames must be {}k+1 within {}..={}",
                self.frame_step, self.min_frames, self.max_frames
            );
            if req.align_frames {
                let Some(pick) = self.nearest_valid_frames(requested) else {
                    return Err(invalid!("frames: {requested} is invalid ({rule})"));
                };
                notes.push(format!("frames {requested} aligned to {pick} ({rule})"));
                pick
            } else {
                return Err(invalid!(
                    "frames: {requested} is invalid ({rule}); nearest valid: {} (or pass --align-frames)",
                    if options.is_empty() { "none".to_string() } else { options.join(" or ") }
                ));
            }
        };

        let steps = req.steps.unwrap_or(self.default_steps);
        if steps == 0 || steps > self.max_steps {
            return Err(invalid!(
                "steps: {steps} is out of range 1..={}",
                self.max_steps
            ));
        }
        let check_guidance = |name: &str, g: f64| -> anyhow::Result<f64> {
            if !g.is_finite() || !(1.0..=30.0).contains(&g) {
                return Err(invalid!(
                    "{name}: {g} is out of range 1.0..=30.0 (1.0 disables guidance)"
                ));
            }
            Ok(g)
        };
        let guidance = check_guidance("guidance", req.guidance.unwrap_or(self.default_guidance))?;
        let guidance_2 = match (self.default_guidance_2, req.guidance_2) {
            (None, Some(_)) => {
                return Err(invalid!(
                    "guidance_2: model `{}` has a single expert; guidance_2 applies to two-expert (A14B) models only",
                    self.name
                ))
            }
            (None, None) => None,
            (Some(d), g) => Some(check_guidance("guidance_2", g.unwrap_or(d))?),
        };
        let shift = req.shift.unwrap_or(self.default_shift);
        if !shift.is_finite() || !(0.1..=100.0).contains(&shift) {
            return Err(invalid!("shift: {shift} is out of range 0.1..=100"));
        }
        let scheduler = req
            .scheduler
            .clone()
            .unwrap_or_else(|| self.default_scheduler.clone());
        if !SCHEDULERS.contains(&scheduler.as_str()) {
            return Err(invalid!(
                "scheduler: `{scheduler}` is not one of {}",
                SCHEDULERS.join(", ")
            ));
        }
        let negative_prompt = req
            .negative_prompt
            .clone()
            .unwrap_or_else(|| self.default_negative_prompt.clone());
        if negative_prompt.chars().count() > self.max_prompt_chars {
            return Err(invalid!(
                "negative_prompt: longer than {} characters",
                self.max_prompt_chars
            ));
        }
        let seed = req.seed.unwrap_or_else(random_seed);
        Ok(ResolvedRequest {
            prompt: prompt.to_string(),
            negative_prompt,
            image: req.image.clone(),
            width,
            height,
            frames,
            fps,
            steps,
            guidance,
            guidance_2,
            shift,
            scheduler,
            seed,
            notes,
        })
    }
}

/// A seed for requests that name none (reported back so the video can be reproduced).
fn random_seed() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (nanos as u64 ^ (u64::from(std::process::id()) << 32)) & ((1 << 53) - 1)
}
