//! `probe`: what is in a video file, read natively (no ffmpeg at run time).

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::mp4::Mp4Video;
use crate::webm::WebmVideo;
use crate::{Format, Frames};

/// Facts about a video file's first video track.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeInfo {
    pub format: Format,
    /// Codec as ffprobe names it (`h264`, `vp9`, ...), with the H.264 profile in parentheses.
    pub codec: String,
    pub width: u32,
    pub height: u32,
    /// Frame rate as a fraction (`num/den`), from the container's per-frame duration.
    pub fps_num: u64,
    pub fps_den: u64,
    pub fps: f64,
    /// Frames (samples/blocks) in the container.
    pub frames: usize,
    pub keyframes: usize,
    pub duration_s: f64,
    pub file_bytes: u64,
    pub bitrate_kbps: f64,
    /// MP4 only: `moov` precedes `mdat`, so playback can start while downloading.
    pub fast_start: Option<bool>,
}

enum Container {
    Mp4(Mp4Video, std::fs::File),
    Webm(WebmVideo),
}

fn sniff(path: &Path) -> Result<Format> {
    let mut head = [0u8; 12];
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = file.read(&mut head)?;
    if n >= 4 && head[..4] == [0x1A, 0x45, 0xDF, 0xA3] {
        return Ok(Format::Webm);
    }
    if n >= 8
        && matches!(
            &head[4..8],
            b"ftyp" | b"moov" | b"mdat" | b"free" | b"wide" | b"skip"
        )
    {
        return Ok(Format::Mp4);
    }
    bail!(
        "{}: not an MP4 or WebM file (unrecognised header)",
        path.display()
    )
}

fn open(path: &Path) -> Result<Container> {
    Ok(match sniff(path)? {
        Format::Mp4 => {
            let (video, file) = Mp4Video::open(path)?;
            Container::Mp4(video, file)
        }
        Format::Webm => {
            let data =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Container::Webm(
                WebmVideo::parse(&data).with_context(|| format!("parsing {}", path.display()))?,
            )
        }
    })
}

fn reduce(num: u64, den: u64) -> (u64, u64) {
    let (mut a, mut b) = (num, den);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    let g = a.max(1);
    (num / g, den / g)
}

fn info(container: &Container, file_bytes: u64) -> Result<ProbeInfo> {
    let mut info = match container {
        Container::Mp4(v, _) => {
            let frames = v.sample_sizes.len();
            let total_ticks: u64 = v.sample_durations.iter().map(|&d| d as u64).sum();
            let ticks = if v.duration > 0 {
                v.duration
            } else {
                total_ticks
            };
            let duration_s = ticks as f64 / v.timescale as f64;
            let uniform = v
                .sample_durations
                .first()
                .filter(|&&d| d > 0 && v.sample_durations.iter().all(|&x| x == d));
            let (fps_num, fps_den) = match uniform {
                Some(&d) => reduce(v.timescale as u64, d as u64),
                None => reduce((frames as u64) * v.timescale as u64, total_ticks.max(1)),
            };
            let codec = match v.codec_tag.as_str() {
                "avc1" | "avc3" => {
                    format!(
                        "h264 ({})",
                        crate::h264::profile_name(v.sps.first().map_or(&[][..], |s| &s[..]))
                    )
                }
                "hvc1" | "hev1" => "hevc".to_string(),
                "av01" => "av1".to_string(),
                "vp09" => "vp9".to_string(),
                other => other.to_string(),
            };
            ProbeInfo {
                format: Format::Mp4,
                codec,
                width: v.width,
                height: v.height,
                fps_num,
                fps_den,
                fps: 0.0,
                frames,
                keyframes: v.sync_samples.as_ref().map_or(frames, |s| s.len()),
                duration_s,
                file_bytes,
                bitrate_kbps: 0.0,
                fast_start: Some(v.fast_start),
            }
        }
        Container::Webm(v) => {
            let frames = v.packets.len();
            let (fps_num, fps_den) = match v.default_duration_ns {
                Some(ns) if ns > 0 => reduce(1_000_000_000, ns),
                _ if frames >= 2 => {
                    let span = v.timestamps_s[frames - 1] - v.timestamps_s[0];
                    reduce(
                        ((frames - 1) as f64 * 1e6) as u64,
                        (span * 1e6).round().max(1.0) as u64,
                    )
                }
                _ => (0, 1),
            };
            let duration_s = v.duration_s.unwrap_or_else(|| match v.timestamps_s.last() {
                Some(last) if fps_num > 0 => last + fps_den as f64 / fps_num as f64,
                _ => 0.0,
            });
            let codec = match v.codec_id.as_str() {
                "V_VP9" => "vp9",
                "V_VP8" => "vp8",
                "V_AV1" => "av1",
                "V_MPEG4/ISO/AVC" => "h264",
                other => other,
            };
            ProbeInfo {
                format: Format::Webm,
                codec: codec.to_string(),
                width: v.width,
                height: v.height,
                fps_num,
                fps_den,
                fps: 0.0,
                frames,
                keyframes: v.keyframes.iter().filter(|&&k| k).count(),
                duration_s,
                file_bytes,
                bitrate_kbps: 0.0,
                fast_start: None,
            }
        }
    };
    if info.fps_num > 0 {
        // WebM stores the frame duration in whole nanoseconds (1e9/24 → 41666667 ns): recover the
        // exact rate the way ffprobe does, as an integer or an NTSC n*1000/1001 rate.
        let fps = info.fps_num as f64 / info.fps_den as f64;
        let ntsc = fps * 1.001;
        if info.format == Format::Webm && info.fps_den != 1 {
            if (fps - fps.round()).abs() < 1e-4 * fps && fps.round() > 0.0 {
                (info.fps_num, info.fps_den) = (fps.round() as u64, 1);
            } else if (ntsc - ntsc.round()).abs() < 1e-4 * ntsc && ntsc.round() > 0.0 {
                (info.fps_num, info.fps_den) = (ntsc.round() as u64 * 1000, 1001);
            }
        }
        info.fps = info.fps_num as f64 / info.fps_den as f64;
    }
    if info.duration_s > 0.0 {
        info.bitrate_kbps = file_bytes as f64 * 8.0 / info.duration_s / 1000.0;
    }
    Ok(info)
}

/// Reads a video file's container facts (no decoding). The format is detected from the content,
/// not the extension.
pub fn probe(path: &Path) -> Result<ProbeInfo> {
    let file_bytes = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    info(&open(path)?, file_bytes)
}

/// [`probe`], then decodes every frame to RGB (H.264 in MP4 through OpenH264, VP9 in WebM through
/// libvpx), e.g. for [`crate::guard::inspect`]. Other codecs are an error that says so.
pub fn decode(path: &Path) -> Result<(ProbeInfo, Frames)> {
    let file_bytes = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    let container = open(path)?;
    let info = info(&container, file_bytes)?;
    let frames = match container {
        Container::Mp4(video, mut file) => {
            if video.codec_tag != "avc1" && video.codec_tag != "avc3" {
                bail!(
                    "decoding {} in MP4 is not supported (only H.264)",
                    info.codec
                );
            }
            let samples = video.read_samples(&mut file)?;
            let parameter_sets: Vec<Vec<u8>> =
                video.sps.iter().chain(&video.pps).cloned().collect();
            crate::h264::decode(&parameter_sets, &samples, video.nal_length_size)?
        }
        Container::Webm(video) => decode_webm(&video, &info)?,
    };
    Ok((info, frames))
}

#[cfg(feature = "webm")]
fn decode_webm(video: &WebmVideo, info: &ProbeInfo) -> Result<Frames> {
    if video.codec_id != "V_VP9" {
        bail!(
            "decoding {} in WebM is not supported (only VP9)",
            info.codec
        );
    }
    crate::vpx::decode(&video.packets)
}

#[cfg(not(feature = "webm"))]
fn decode_webm(_video: &WebmVideo, _info: &ProbeInfo) -> Result<Frames> {
    bail!("decoding WebM needs vidgen-media's `webm` feature (libvpx), which this build lacks")
}
