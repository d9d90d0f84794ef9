//! `encode`: frames → MP4 (H.264) or WebM (VP9), written atomically.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use vidgen_engine::invalid;

use crate::atomic::write_atomically;
#[cfg(feature = "webm")]
use crate::webm;
use crate::{h264, mp4, Format, Frames};

/// A frame rate as an exact fraction `num / den` frames per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rational {
    pub num: u32,
    pub den: u32,
}

impl Rational {
    /// Highest frame rate accepted.
    pub const MAX_FPS: f64 = 240.0;

    /// The exact fraction for `fps`: integers stay integers (16 → 16/1), NTSC rates become
    /// `n*1000/1001` (23.976… → 24000/1001), anything else is taken to 1/1000.
    pub fn from_fps(fps: f64) -> Result<Self> {
        if !fps.is_finite() || fps <= 0.0 || fps > Self::MAX_FPS {
            return Err(invalid!(
                "fps: {fps} is out of range; valid: 0 < fps <= {}",
                Self::MAX_FPS
            ));
        }
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6 * b.max(1.0);
        if close(fps, fps.round()) {
            return Ok(Self {
                num: fps.round() as u32,
                den: 1,
            });
        }
        // 29.97 and 23.976 are the usual spellings of 30000/1001 and 24000/1001.
        let ntsc = fps * 1.001;
        if (ntsc - ntsc.round()).abs() < 1e-5 * ntsc {
            return Ok(Self {
                num: ntsc.round() as u32 * 1000,
                den: 1001,
            });
        }
        let num = (fps * 1000.0).round() as u32;
        if num == 0 {
            return Err(invalid!("fps: {fps} is too small; the smallest is 0.001"));
        }
        let g = gcd(num, 1000);
        Ok(Self {
            num: num / g,
            den: 1000 / g,
        })
    }

    pub fn as_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }

    /// Duration of `frames` frames in seconds.
    pub fn duration(self, frames: usize) -> f64 {
        frames as f64 * self.den as f64 / self.num as f64
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Encoder settings; the defaults are tuned for generated video (see the crate docs and the
/// closing note of the media issue for measured sizes and speeds).
#[derive(Clone, Debug)]
pub struct EncodeOptions {
    /// H.264 quantiser, 0..=51 (lower: better and larger). Fixed, so quality does not depend on a
    /// bitrate guess for the size and motion. A clip that cannot fit OpenH264's per-frame buffer at
    /// this quantiser (noise-like content) is encoded whole at the finest coarser one that fits.
    pub h264_qp: u8,
    /// VP9 constant-quality level, 0..=63 (lower: better and larger).
    pub vp9_cq_level: u8,
    /// libvpx speed (`cpu-used`), 0..=9 (higher: faster, slightly larger).
    pub vp9_speed: u8,
    /// Frames between keyframes; `None`: one every 2 seconds.
    pub keyframe_interval: Option<u32>,
    /// Encoder threads (VP9); 0: all available cores.
    pub threads: usize,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            h264_qp: 20,
            vp9_cq_level: 24,
            vp9_speed: 6,
            keyframe_interval: None,
            threads: 0,
        }
    }
}

impl EncodeOptions {
    pub(crate) fn keyframe_interval_frames(&self, fps: Rational) -> u32 {
        self.keyframe_interval
            .unwrap_or_else(|| (2.0 * fps.as_f64()).round().max(1.0) as u32)
    }

    #[cfg(feature = "webm")]
    pub(crate) fn thread_count(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }
    }

    fn validate(&self) -> Result<()> {
        if self.h264_qp > 51 {
            return Err(invalid!("h264_qp: {} is out of range 0..=51", self.h264_qp));
        }
        if self.vp9_cq_level > 63 {
            return Err(invalid!(
                "vp9_cq_level: {} is out of range 0..=63",
                self.vp9_cq_level
            ));
        }
        if self.vp9_speed > 9 {
            return Err(invalid!(
                "vp9_speed: {} is out of range 0..=9",
                self.vp9_speed
            ));
        }
        if self.keyframe_interval == Some(0) {
            return Err(invalid!(
                "keyframe_interval: 0 is invalid; give at least 1 frame"
            ));
        }
        Ok(())
    }
}

/// Encodes `frames` at `fps` into `path` as `format`, with [`EncodeOptions::default`].
///
/// The file is written to a temporary name beside `path` and renamed into place when complete; on
/// any error nothing is left behind and an existing `path` is untouched.
pub fn encode(frames: &Frames, fps: f64, path: &Path, format: Format) -> Result<()> {
    encode_with(frames, fps, path, format, &EncodeOptions::default())
}

/// [`encode`] with explicit options.
pub fn encode_with(
    frames: &Frames,
    fps: f64,
    path: &Path,
    format: Format,
    options: &EncodeOptions,
) -> Result<()> {
    let bytes = encode_to_vec(frames, fps, format, options)?;
    write_atomically(path, |w| Ok(w.write_all(&bytes)?))
        .with_context(|| format!("writing {}", path.display()))
}

/// Encodes to an in-memory file (what [`encode_with`] writes).
pub fn encode_to_vec(
    frames: &Frames,
    fps: f64,
    format: Format,
    options: &EncodeOptions,
) -> Result<Vec<u8>> {
    let fps = Rational::from_fps(fps)?;
    options.validate()?;
    let (width, height) = (frames.width(), frames.height());
    if width > 16384 || height > 16384 {
        return Err(invalid!(
            "frames: size {width}x{height} is too large; at most 16384 per side"
        ));
    }
    match format {
        Format::Mp4 => {
            if width % 2 != 0 || height % 2 != 0 || width < 16 || height < 16 {
                return Err(invalid!(
                    "frames: size {width}x{height} cannot be stored as MP4: H.264 4:2:0 needs even \
                     width and height of at least 16 (any even size works, multiples of 16 are not \
                     needed); use .webm (VP9) for odd sizes"
                ));
            }
            if width.max(height) > 3840 || width.min(height) > 2160 {
                return Err(invalid!(
                    "frames: size {width}x{height} is beyond OpenH264's limit of 3840x2160; use .webm"
                ));
            }
            let stream = h264::encode(frames, fps, options)?;
            mp4::mux(&stream, width as u32, height as u32, fps)
        }
        Format::Webm => {
            #[cfg(feature = "webm")]
            {
                let stream = crate::vpx::encode(frames, fps, options)?;
                webm::mux(&stream, width as u32, height as u32, fps)
            }
            #[cfg(not(feature = "webm"))]
            {
                Err(invalid!(
                    "format: webm is not available in this build (vidgen-media was built without its \
                     `webm` feature, which needs libvpx); use mp4"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fps_fractions_are_exact() {
        let r = |fps: f64| Rational::from_fps(fps).unwrap();
        assert_eq!(r(16.0), Rational { num: 16, den: 1 });
        assert_eq!(r(24.0), Rational { num: 24, den: 1 });
        assert_eq!(
            r(24000.0 / 1001.0),
            Rational {
                num: 24000,
                den: 1001
            }
        );
        assert_eq!(
            r(29.97),
            Rational {
                num: 30000,
                den: 1001
            }
        );
        assert_eq!(r(12.5), Rational { num: 25, den: 2 });
        for bad in [0.0, -1.0, f64::NAN, 1000.0] {
            let err = Rational::from_fps(bad).unwrap_err();
            assert!(vidgen_engine::error::is_invalid_input(&err));
        }
        assert!((r(24.0).duration(121) - 121.0 / 24.0).abs() < 1e-12);
    }
}
