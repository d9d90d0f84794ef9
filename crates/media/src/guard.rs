//! The output quality guard: catches broken generations before they are written as "successes".
//!
//! Checks, in pipeline order:
//! 1. [`check_latents`]: NaN/Inf in the final latents fail (nothing sensible can be decoded);
//!    [`Frames::from_f32_chw`](crate::Frames::from_f32_chw) does the same for decoded frames,
//!    naming the frames. Non-finite values always fail, whatever the policy: there is no picture.
//! 2. [`inspect`]: per-frame statistics on luma (BT.709 weights, 0..=255 scale) and a class:
//!    - [`FrameClass::Flat`]: (almost) one colour — black, white or grey frames;
//!    - [`FrameClass::NoiseLike`]: no spatial structure (neighbouring pixels unrelated: white,
//!      Gaussian or blue noise), no large-scale structure (the energy sits at a few pixels' scale,
//!      like random latents through a VAE), or no relation to the neighbouring frames;
//!    - [`FrameClass::Checkerboard`]: a periodic pattern at the VAE stride (8 or 16 px), measured
//!      as the power of the DFT bins at multiples of the stride frequency and as the jump of the
//!      gradient across block borders;
//!    - [`FrameClass::Fine`] otherwise.
//! 3. [`Report::verdict`] applies a [`GuardPolicy`]: with `warn` (the default) an all-flat video
//!    fails and everything else suspicious is a warning; `fail` fails on any flagged frame; `off`
//!    only reports.
//!
//! Thresholds were calibrated on synthetic cases (`tests/guard_calibration.rs` prints every
//! statistic): natural-like images with 1/f^1.4..1/f^2.6 spectra, smooth gradients, dark scenes,
//! pans, scene cuts and moving shapes pass, also after H.264/VP9 at coarse quality; Gaussian,
//! blue and upsampled-latent noise, flat, black and white frames, block checkerboards and
//! stride-periodic tiles are flagged. Each constant's docs give the measured ranges it separates.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use serde::Serialize;
use vidgen_engine::invalid;

use crate::ranges::format_ranges;
use crate::Frames;

// Thresholds. The measured ranges come from `tests/guard_calibration.rs` (synthetic cases at
// 320x192 and 832x480, raw and through our H.264/VP9 at default and at coarse quality); each
// threshold sits between the groups, roughly at their geometric mean.

/// Luma standard deviation (0..=255) below which a frame is flat. Flat frames measured ≤ 0.57
/// (dithered black); the darkest natural-like frame 4.2, others ≥ 21.
pub const FLAT_STD: f32 = 2.0;
/// Frames with at most this many distinct RGB colours are flat (degenerate) whatever their std.
pub const FLAT_MAX_COLOURS: usize = 2;
/// Lag-1 spatial autocorrelation of luma below which a frame is pixel noise. White and Gaussian
/// noise measured −0.005..0.01, blue noise −0.17, a 1-px checkerboard −0.34; every fine or
/// checkerboard case ≥ 0.95.
pub const NOISE_MAX_NEIGHBOUR_CORR: f32 = 0.5;
/// Share of luma variance in 32-px block means below which a frame has no large-scale structure.
/// Random latents upsampled from stride 8 measured 0.10..0.17; natural-like frames ≥ 0.62.
/// (Stride-16 latent noise measures 0.27..0.30; the temporal test below catches it.)
pub const NOISE_MIN_COARSE_FRACTION: f32 = 0.3;
/// Correlation with both neighbouring frames below which a frame is unrelated to them (a scene
/// cut has one related side). Coherent clips measured ≥ 0.94 between frames; independent noise
/// frames −0.10..0.05; unrelated natural stills sharing a layout (sky above, ground below)
/// 0.1..0.3, so this catches noise that changes every frame, not merely busy footage.
pub const NOISE_MAX_TEMPORAL_CORR: f32 = 0.15;
/// Share of the luma gradient's power at the 8- or 16-px stride bins (and harmonics) above which a
/// frame has a grid pattern. Natural-like frames measured ≤ 0.003 (≤ 0.010 with the blocking of
/// H.264 at QP 34, 0.008 for the 8-bit steps of a smooth ramp); a ±3-level 8-px stride tile 0.44
/// (0.31..0.57 after H.264/VP9), a ±4-level 8-px block checkerboard 0.28.
pub const CHECKER_MIN_STRIDE_POWER: f32 = 0.03;
/// Ratio (mean gradient across 8/16-px block borders + 1) / (mean gradient inside blocks + 1)
/// above which a frame shows block edges. Natural-like frames measured 0.83..1.10 (≤ 1.22 after
/// coarse H.264/VP9); ±4-level block checkerboards 1.98..2.01 (≥ 2.4 after H.264/VP9 at ±6).
pub const CHECKER_MIN_BORDER_RATIO: f32 = 1.5;

/// What to do with suspicious output (`--quality-guard fail|warn|off`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GuardPolicy {
    /// Fail on any flagged frame (flat, noise-like, checkerboard).
    Fail,
    /// Fail on an all-flat video; warn about everything else flagged.
    #[default]
    Warn,
    /// Report only, never fail (non-finite values still fail: there is nothing to encode).
    Off,
}

impl FromStr for GuardPolicy {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "fail" => Ok(Self::Fail),
            "warn" => Ok(Self::Warn),
            "off" => Ok(Self::Off),
            _ => Err(invalid!(
                "quality-guard: {s:?} is not a policy; valid: fail, warn, off"
            )),
        }
    }
}

impl fmt::Display for GuardPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Fail => "fail",
            Self::Warn => "warn",
            Self::Off => "off",
        })
    }
}

/// Fails when the final latents hold NaN or ±Inf (the denoiser diverged; decoding is pointless).
pub fn check_latents(latents: &[f32]) -> Result<()> {
    let mut nan = 0usize;
    let mut inf = 0usize;
    let mut first = None;
    for (i, v) in latents.iter().enumerate() {
        if v.is_nan() {
            nan += 1;
        } else if v.is_infinite() {
            inf += 1;
        } else {
            continue;
        }
        first.get_or_insert(i);
    }
    if let Some(first) = first {
        bail!(
            "quality guard: the final latents contain {nan} NaN and {inf} Inf of {} values (first at \
             flat index {first}); the denoiser diverged (check the dtype, the model files and the \
             guidance scale), so nothing is decoded",
            latents.len()
        );
    }
    Ok(())
}

/// A frame's verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameClass {
    Fine,
    Flat,
    NoiseLike,
    Checkerboard,
}

impl FrameClass {
    pub fn name(self) -> &'static str {
        match self {
            Self::Fine => "fine",
            Self::Flat => "flat",
            Self::NoiseLike => "noise-like",
            Self::Checkerboard => "checkerboard",
        }
    }
}

impl fmt::Display for FrameClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Statistics of one frame (luma on a 0..=255 scale).
#[derive(Clone, Debug, Serialize)]
pub struct FrameStats {
    pub index: usize,
    pub mean: f32,
    pub std: f32,
    pub unique_colours: usize,
    /// Mean absolute luma difference to the previous frame (`None` for the first).
    pub temporal_diff: Option<f32>,
    /// Correlation of luma with the previous frame (`None` for the first, or a flat pair).
    pub temporal_corr: Option<f32>,
    /// Lag-1 spatial autocorrelation (horizontal and vertical neighbours pooled).
    pub neighbour_corr: f32,
    /// Share of the variance carried by 32-px block means (large-scale structure).
    pub coarse_fraction: f32,
    /// Share of the luma gradient's power in the pattern repeating every 8 px (the DFT power at the
    /// 8-px stride bins).
    pub stride_power_8: f32,
    /// Same, every 16 px (includes the 8-px harmonics).
    pub stride_power_16: f32,
    /// Mean gradient across 8-px block borders / mean gradient inside blocks.
    pub border_ratio_8: f32,
    /// Same for 16-px blocks.
    pub border_ratio_16: f32,
    pub class: FrameClass,
    /// Why the frame got its class (empty for fine frames).
    pub reason: String,
}

/// The guard's findings for a video.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub width: usize,
    pub height: usize,
    pub frames: Vec<FrameStats>,
}

/// A suspicious finding that did not fail the policy.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Warning {
    pub class: FrameClass,
    pub frames: Vec<usize>,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A run of consecutive frames with the same class.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassRun {
    pub class: FrameClass,
    pub first: usize,
    pub last: usize,
    /// The first frame's reason, as an example.
    pub reason: String,
}

impl Report {
    /// Indices of frames with `class`.
    pub fn frames_of(&self, class: FrameClass) -> Vec<usize> {
        self.frames
            .iter()
            .filter(|f| f.class == class)
            .map(|f| f.index)
            .collect()
    }

    /// Consecutive runs of one class, in order (the per-range verdict `vidgen probe` prints).
    pub fn runs(&self) -> Vec<ClassRun> {
        let mut runs: Vec<ClassRun> = Vec::new();
        for f in &self.frames {
            match runs.last_mut() {
                Some(run) if run.class == f.class && run.last + 1 == f.index => run.last = f.index,
                _ => runs.push(ClassRun {
                    class: f.class,
                    first: f.index,
                    last: f.index,
                    reason: f.reason.clone(),
                }),
            }
        }
        runs
    }

    /// One line: how many frames of each class.
    pub fn summary(&self) -> String {
        let total = self.frames.len();
        let parts: Vec<String> = [
            FrameClass::Fine,
            FrameClass::Flat,
            FrameClass::NoiseLike,
            FrameClass::Checkerboard,
        ]
        .into_iter()
        .filter_map(|c| {
            let n = self.frames_of(c).len();
            (n > 0).then(|| format!("{n} {c}"))
        })
        .collect();
        format!("{total} frames: {}", parts.join(", "))
    }

    /// Applies `policy`: `Err` with a message naming the frames and why, or the warnings.
    pub fn verdict(&self, policy: GuardPolicy) -> Result<Vec<Warning>> {
        if policy == GuardPolicy::Off {
            return Ok(Vec::new());
        }
        let total = self.frames.len();
        let mut warnings = Vec::new();
        let flat = self.frames_of(FrameClass::Flat);
        if !flat.is_empty() && flat.len() == total {
            bail!(
                "quality guard: all {total} frames are flat ({}); the output has no picture",
                self.frames[0].reason
            );
        }
        for (class, what) in [
            (FrameClass::Flat, "flat"),
            (FrameClass::NoiseLike, "noise-like"),
            (
                FrameClass::Checkerboard,
                "corrupted by a checkerboard at the VAE stride",
            ),
        ] {
            let indices = self.frames_of(class);
            if indices.is_empty() {
                continue;
            }
            let example = &self.frames[indices[0]].reason;
            let message = format!(
                "quality guard: {} of {total} frames are {what} (frames {}; frame {}: {example})",
                indices.len(),
                format_ranges(&indices),
                indices[0]
            );
            if policy == GuardPolicy::Fail {
                bail!("{message}; failing because of --quality-guard fail");
            }
            warnings.push(Warning {
                class,
                frames: indices,
                message,
            });
        }
        Ok(warnings)
    }
}

impl fmt::Display for Report {
    /// The per-range verdict, one line per run of frames.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for run in self.runs() {
            let range = if run.first == run.last {
                format!("frame {}", run.first)
            } else {
                format!("frames {}-{}", run.first, run.last)
            };
            if run.reason.is_empty() {
                writeln!(f, "  {range}: {}", run.class)?;
            } else {
                writeln!(f, "  {range}: {} ({})", run.class, run.reason)?;
            }
        }
        write!(f, "  {}", self.summary())
    }
}

/// Computes every frame's statistics and class.
pub fn inspect(frames: &Frames) -> Report {
    let (width, height) = (frames.width(), frames.height());
    let mut colours = ColourSet::new();
    let mut previous: Option<(Vec<f32>, f32, f32)> = None;
    let mut stats = Vec::with_capacity(frames.len());
    for index in 0..frames.len() {
        let rgb = frames.frame(index);
        let luma: Vec<f32> = rgb
            .chunks_exact(3)
            .map(|p| 0.2126 * p[0] as f32 + 0.7152 * p[1] as f32 + 0.0722 * p[2] as f32)
            .collect();
        let (mean, var) = mean_var(&luma);
        let (temporal_diff, temporal_corr) = match &previous {
            Some((prev, prev_mean, prev_var)) => {
                let (diff, corr) = temporal(&luma, mean, var, prev, *prev_mean, *prev_var);
                (Some(diff), corr)
            }
            None => (None, None),
        };
        let gradients = Gradients::measure(&luma, width, height);
        stats.push(FrameStats {
            index,
            mean,
            std: var.sqrt(),
            unique_colours: colours.count(rgb),
            temporal_diff,
            temporal_corr,
            neighbour_corr: gradients.neighbour_correlation(var),
            coarse_fraction: coarse_fraction(&luma, width, height, mean, var),
            stride_power_8: gradients.stride_power(8),
            stride_power_16: gradients.stride_power(16),
            border_ratio_8: gradients.border_ratio(8),
            border_ratio_16: gradients.border_ratio(16),
            class: FrameClass::Fine,
            reason: String::new(),
        });
        previous = Some((luma, mean, var));
    }
    classify(&mut stats);
    Report {
        width,
        height,
        frames: stats,
    }
}

fn classify(stats: &mut [FrameStats]) {
    let n = stats.len();
    // Correlation with each neighbour (None where there is none, or it is undefined).
    let next_corr: Vec<Option<f32>> = (0..n)
        .map(|i| stats.get(i + 1).and_then(|s| s.temporal_corr))
        .collect();
    for (i, s) in stats.iter_mut().enumerate() {
        let (class, reason) = if s.std < FLAT_STD || s.unique_colours <= FLAT_MAX_COLOURS {
            let tone = if s.mean < 24.0 {
                "black"
            } else if s.mean > 231.0 {
                "white"
            } else {
                "uniform"
            };
            (
                FrameClass::Flat,
                format!(
                    "{tone}: luma mean {:.1}, std {:.2} (flat below {FLAT_STD}), {} colours",
                    s.mean, s.std, s.unique_colours
                ),
            )
        } else if s.neighbour_corr < NOISE_MAX_NEIGHBOUR_CORR {
            (
                FrameClass::NoiseLike,
                format!(
                    "neighbouring pixels unrelated: correlation {:.2} (natural images > {NOISE_MAX_NEIGHBOUR_CORR})",
                    s.neighbour_corr
                ),
            )
        } else if s.coarse_fraction < NOISE_MIN_COARSE_FRACTION {
            (
                FrameClass::NoiseLike,
                format!(
                    "no large-scale structure: {:.0}% of the variance in 32-px blocks (natural images > {:.0}%)",
                    100.0 * s.coarse_fraction,
                    100.0 * NOISE_MIN_COARSE_FRACTION
                ),
            )
        } else if s.stride_power_8.max(s.stride_power_16) > CHECKER_MIN_STRIDE_POWER
            || s.border_ratio_8.max(s.border_ratio_16) > CHECKER_MIN_BORDER_RATIO
        {
            (
                FrameClass::Checkerboard,
                format!(
                    "{:.1}% of the gradient power repeats every 8/16 px (limit {:.1}%), border/inner gradient {:.2}/{:.2} (limit {CHECKER_MIN_BORDER_RATIO})",
                    100.0 * s.stride_power_8.max(s.stride_power_16),
                    100.0 * CHECKER_MIN_STRIDE_POWER,
                    s.border_ratio_8,
                    s.border_ratio_16
                ),
            )
        } else if n >= 3 && unrelated_to_neighbours(s.temporal_corr, next_corr[i]) {
            (
                FrameClass::NoiseLike,
                format!(
                    "unrelated to the neighbouring frames: correlation {} / {} (limit {NOISE_MAX_TEMPORAL_CORR})",
                    fmt_corr(s.temporal_corr),
                    fmt_corr(next_corr[i])
                ),
            )
        } else {
            (FrameClass::Fine, String::new())
        };
        s.class = class;
        s.reason = reason;
    }
}

fn fmt_corr(c: Option<f32>) -> String {
    c.map_or_else(|| "-".into(), |c| format!("{c:.2}"))
}

/// True when every existing neighbour correlation is low (a scene cut has only one low side).
fn unrelated_to_neighbours(prev: Option<f32>, next: Option<f32>) -> bool {
    let sides: Vec<f32> = [prev, next].into_iter().flatten().collect();
    !sides.is_empty() && sides.iter().all(|&c| c < NOISE_MAX_TEMPORAL_CORR)
}

fn mean_var(values: &[f32]) -> (f32, f32) {
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    (mean as f32, var as f32)
}

/// Mean absolute difference and correlation between a frame and the previous one (correlation
/// `None` when either is flat).
fn temporal(
    a: &[f32],
    mean_a: f32,
    var_a: f32,
    b: &[f32],
    mean_b: f32,
    var_b: f32,
) -> (f32, Option<f32>) {
    let (mut diff, mut cov) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        diff += (x - y).abs() as f64;
        cov += ((x - mean_a) * (y - mean_b)) as f64;
    }
    let n = a.len() as f64;
    let corr = (var_a > 1e-6 && var_b > 1e-6)
        .then(|| (cov / n / (var_a as f64 * var_b as f64).sqrt()) as f32);
    ((diff / n) as f32, corr)
}

/// Variance of the means of 32×32 blocks (smaller for small frames) over the pixel variance.
fn coarse_fraction(luma: &[f32], width: usize, height: usize, mean: f32, var: f32) -> f32 {
    if var < 1e-6 {
        return 1.0;
    }
    let block = (width.min(height) / 8).clamp(1, 32);
    let (bw, bh) = (width / block, height / block);
    if bw * bh < 4 {
        return 1.0; // too small to judge
    }
    let mut sum = 0f64;
    let mut block_sums = vec![0f64; bw];
    for by in 0..bh {
        block_sums.iter_mut().for_each(|b| *b = 0.0);
        for y in by * block..(by + 1) * block {
            let row = &luma[y * width..][..bw * block];
            for (b, chunk) in block_sums.iter_mut().zip(row.chunks_exact(block)) {
                *b += chunk.iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        for b in &block_sums {
            let m = b / (block * block) as f64 - mean as f64;
            sum += m * m;
        }
    }
    (sum / (bw * bh) as f64 / var as f64) as f32
}

/// Fold size for the stride measures: 16 px, whose folds also give the 8-px ones.
const FOLD: usize = 16;

/// Horizontal and vertical luma differences of one frame, folded by position phase (one pass).
struct Gradients {
    /// Per direction: sums and counts of the signed differences by `(y mod 16, x mod 16)`.
    folds: [PhaseFold; 2],
    /// Per direction: sum of |difference| by the phase across which it is taken (x mod 16 for
    /// horizontal differences, y mod 16 for vertical ones), and how many.
    abs_by_phase: [[f64; FOLD]; 2],
    abs_counts: [[usize; FOLD]; 2],
    /// Sum of squared differences over both directions, and how many.
    squares: f64,
    count: usize,
    /// The smaller frame side: stride measures need at least two periods.
    min_side: usize,
}

impl Gradients {
    fn measure(luma: &[f32], width: usize, height: usize) -> Self {
        let mut g = Gradients {
            folds: [PhaseFold::new(), PhaseFold::new()],
            abs_by_phase: [[0.0; FOLD]; 2],
            abs_counts: [[0; FOLD]; 2],
            squares: 0.0,
            count: 0,
            min_side: width.min(height),
        };
        for y in 0..height {
            let row = &luma[y * width..][..width];
            let py = y % FOLD;
            for x in 1..width {
                let d = row[x] - row[x - 1];
                let px = x % FOLD;
                g.folds[0].add(py, px, d);
                g.abs_by_phase[0][px] += d.abs() as f64;
                g.abs_counts[0][px] += 1;
                g.squares += (d * d) as f64;
            }
            g.count += width - 1;
            if y > 0 {
                let above = &luma[(y - 1) * width..][..width];
                for (x, (&v, &u)) in row.iter().zip(above).enumerate() {
                    let d = v - u;
                    g.folds[1].add(py, x % FOLD, d);
                    g.abs_by_phase[1][py] += d.abs() as f64;
                    g.squares += (d * d) as f64;
                }
                g.abs_counts[1][py] += width;
                g.count += width;
            }
        }
        g
    }

    /// Lag-1 spatial autocorrelation: `1 - E[(Y(p) - Y(p+1))²] / (2 var)`, both directions pooled.
    fn neighbour_correlation(&self, var: f32) -> f32 {
        if var < 1e-6 || self.count == 0 {
            return 1.0;
        }
        (1.0 - self.squares / self.count as f64 / (2.0 * var as f64)) as f32
    }

    /// Share of the gradient's power that repeats every `period` px: the DFT power of the
    /// horizontal and vertical differences at the bins that are multiples of the stride frequency
    /// `(W/p, H/p)` (the VAE-stride peak and its harmonics), over their total power; the larger
    /// of the two directions. Differences rather than pixel values, so that smooth ramps (whose
    /// sawtooth folds into the same bins) do not count.
    fn stride_power(&self, period: usize) -> f32 {
        if self.min_side < 2 * period {
            return 0.0;
        }
        self.folds[0]
            .fraction(period)
            .max(self.folds[1].fraction(period))
    }

    /// (Mean |gradient| across `period`-px block borders + 1) over (mean |gradient| elsewhere + 1);
    /// the one level added to both keeps sub-level steps (8-bit quantisation of a smooth ramp) in
    /// an almost featureless frame from reading as block edges.
    fn border_ratio(&self, period: usize) -> f32 {
        if self.min_side < 2 * period {
            return 1.0;
        }
        let (mut border, mut border_n, mut inner, mut inner_n) = (0f64, 0usize, 0f64, 0usize);
        for dir in 0..2 {
            for phase in 0..FOLD {
                if phase % period == 0 {
                    border += self.abs_by_phase[dir][phase];
                    border_n += self.abs_counts[dir][phase];
                } else {
                    inner += self.abs_by_phase[dir][phase];
                    inner_n += self.abs_counts[dir][phase];
                }
            }
        }
        if border_n == 0 || inner_n == 0 {
            return 1.0;
        }
        ((border / border_n as f64 + 1.0) / (inner / inner_n as f64 + 1.0)) as f32
    }
}

/// Sums of a signal by position phase `(y mod 16, x mod 16)`.
///
/// Averaging every sample with the same phase modulo `p` gives a p×p tile whose energy (the
/// overall mean removed) equals the signal's DFT power at the bins that are multiples of `(W/p,
/// H/p)`, divided by the sample count squared, without an FFT (exact when p divides the size; the
/// unit test checks it against a DFT).
struct PhaseFold {
    sums: [f64; FOLD * FOLD],
    counts: [usize; FOLD * FOLD],
    sum_sq: f64,
}

impl PhaseFold {
    fn new() -> Self {
        Self {
            sums: [0.0; FOLD * FOLD],
            counts: [0; FOLD * FOLD],
            sum_sq: 0.0,
        }
    }

    fn add(&mut self, phase_y: usize, phase_x: usize, value: f32) {
        let i = phase_y * FOLD + phase_x;
        self.sums[i] += value as f64;
        self.counts[i] += 1;
        self.sum_sq += (value * value) as f64;
    }

    /// Energy of the `period`-phase tile (`period` divides 16) over the signal's variance, minus
    /// the energy uncorrelated samples would leave (variance / samples per phase), so noise scores
    /// ~0 at any size; measured against at least [`GRADIENT_VAR_FLOOR`], so that a sub-level
    /// pattern in an almost featureless frame does not count.
    fn fraction(&self, period: usize) -> f32 {
        let mut sums = vec![0f64; period * period];
        let mut counts = vec![0usize; period * period];
        for py in 0..FOLD {
            for px in 0..FOLD {
                let (i, j) = (py * FOLD + px, (py % period) * period + px % period);
                sums[j] += self.sums[i];
                counts[j] += self.counts[i];
            }
        }
        let n: usize = counts.iter().sum();
        if n == 0 {
            return 0.0;
        }
        let mean = sums.iter().sum::<f64>() / n as f64;
        let var = self.sum_sq / n as f64 - mean * mean;
        if var < 1e-9 {
            return 0.0;
        }
        let energy = sums
            .iter()
            .zip(&counts)
            .map(|(s, &c)| {
                if c == 0 {
                    0.0
                } else {
                    (s / c as f64 - mean).powi(2)
                }
            })
            .sum::<f64>()
            / (period * period) as f64;
        let per_phase = n as f64 / (period * period) as f64;
        ((energy - var / per_phase).max(0.0) / var.max(GRADIENT_VAR_FLOOR)) as f32
    }
}

/// Gradient variance (levels²) below which [`PhaseFold::fraction`] measures against this floor.
const GRADIENT_VAR_FLOOR: f64 = 4.0;

/// Counts distinct RGB colours with a 2^24-bit set, cleared between frames.
struct ColourSet {
    bits: Vec<u64>,
}

impl ColourSet {
    fn new() -> Self {
        Self {
            bits: vec![0; (1 << 24) / 64],
        }
    }

    fn count(&mut self, rgb: &[u8]) -> usize {
        self.bits.iter_mut().for_each(|b| *b = 0);
        let mut n = 0;
        for p in rgb.chunks_exact(3) {
            let c = (p[0] as usize) << 16 | (p[1] as usize) << 8 | p[2] as usize;
            let (word, bit) = (c / 64, 1u64 << (c % 64));
            if self.bits[word] & bit == 0 {
                self.bits[word] |= bit;
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folded_energy_equals_dft_power_at_stride_bins() {
        // A 32x16 signal with content at assorted frequencies: the folded-tile energy must equal
        // the DFT power at the bins (k*W/p, l*H/p), (k,l) != (0,0), over N², as the docs claim,
        // for p = 16 and for p = 8 derived from the 16-fold.
        let (w, h) = (32usize, 16usize);
        let signal: Vec<f32> = (0..w * h)
            .map(|i| {
                let (x, y) = ((i % w) as f32, (i / w) as f32);
                50.0 * (x * 0.7).sin()
                    + 30.0 * (y * 1.3 + x * 0.2).cos()
                    + 20.0 * ((x + 2.0 * y) % 8.0)
                    + 10.0 * (i as f32 * 0.37).sin()
            })
            .collect();
        let mut fold = PhaseFold::new();
        for (i, &v) in signal.iter().enumerate() {
            fold.add((i / w) % FOLD, (i % w) % FOLD, v);
        }
        let (_, var) = mean_var(&signal);
        for p in [8usize, 16] {
            let ours = fold.fraction(p) as f64;
            let mut power = 0f64;
            for ky in (0..h).step_by(h / p) {
                for kx in (0..w).step_by(w / p) {
                    if kx == 0 && ky == 0 {
                        continue;
                    }
                    let (mut re, mut im) = (0f64, 0f64);
                    for (i, &v) in signal.iter().enumerate() {
                        let (x, y) = ((i % w) as f64, (i / w) as f64);
                        let phase = -2.0
                            * std::f64::consts::PI
                            * (kx as f64 * x / w as f64 + ky as f64 * y / h as f64);
                        re += v as f64 * phase.cos();
                        im += v as f64 * phase.sin();
                    }
                    power += re * re + im * im;
                }
            }
            let n = (w * h) as f64;
            // Minus the noise correction, as `fraction` does.
            let dft = power / (n * n) / var as f64 - (p * p) as f64 / n;
            assert!(
                (ours - dft.max(0.0)).abs() < 1e-4,
                "p={p}: fold {ours} vs DFT {dft}"
            );
            assert!(ours > 0.1, "the (x + 2y) mod 8 ramp is 8-periodic: {ours}");
        }
    }

    #[test]
    fn ramps_do_not_count_as_stride_patterns() {
        let (w, h) = (64usize, 48usize);
        let ramp: Vec<f32> = (0..w * h)
            .map(|i| (i % w) as f32 * 3.0 + (i / w) as f32)
            .collect();
        let g = Gradients::measure(&ramp, w, h);
        assert!(g.stride_power(16) < 1e-6 && g.stride_power(8) < 1e-6);
        // Border and inner sets mix the two directions in slightly different shares.
        assert!((g.border_ratio(8) - 1.0).abs() < 0.02);
        let tiled: Vec<f32> = (0..w * h)
            .map(|i| ramp[i] + if (i % w) % 8 == 0 { 10.0 } else { 0.0 })
            .collect();
        let g = Gradients::measure(&tiled, w, h);
        assert!(g.stride_power(8) > 0.5 && g.border_ratio(8) > 2.0);
    }

    #[test]
    fn latents_with_nan_fail() {
        check_latents(&[0.0, 1.0, -3.0]).unwrap();
        let err = check_latents(&[0.0, f32::NAN, f32::NEG_INFINITY, f32::NAN])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 NaN and 1 Inf of 4") && err.contains("index 1"),
            "{err}"
        );
    }

    #[test]
    fn policy_parses() {
        assert_eq!("FAIL".parse::<GuardPolicy>().unwrap(), GuardPolicy::Fail);
        assert_eq!("off".parse::<GuardPolicy>().unwrap(), GuardPolicy::Off);
        let err = "loud".parse::<GuardPolicy>().unwrap_err();
        assert!(vidgen_engine::error::is_invalid_input(&err));
        assert!(err.to_string().contains("fail, warn, off"));
    }
}
