//! Output container formats.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::Result;
use serde::Serialize;
use vidgen_engine::invalid;

/// A video container and its codec.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// MP4 with H.264 (Constrained Baseline, yuv420p), `moov` first.
    Mp4,
    /// WebM with VP9 (yuv420p).
    Webm,
}

impl Format {
    pub const ALL: [Format; 2] = [Format::Mp4, Format::Webm];

    /// The format named by a file's extension (`.mp4`, `.webm`, any case).
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        ext.parse().map_err(|e| {
            if ext.eq_ignore_ascii_case("webm") {
                return e;
            }
            invalid!(
                "output: {:?} has extension {:?}; valid video extensions: .mp4 (H.264), .webm (VP9)",
                path.display().to_string(),
                ext
            )
        })
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Mp4 => "mp4",
            Format::Webm => "webm",
        }
    }

    pub fn mime_type(self) -> &'static str {
        match self {
            Format::Mp4 => "video/mp4",
            Format::Webm => "video/webm",
        }
    }

    /// The video codec inside, as ffprobe names it.
    pub fn codec(self) -> &'static str {
        match self {
            Format::Mp4 => "h264",
            Format::Webm => "vp9",
        }
    }
}

impl FromStr for Format {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "mp4" => Ok(Format::Mp4),
            "webm" if cfg!(feature = "webm") => Ok(Format::Webm),
            // Refused before any work: the encoder is missing from this build.
            "webm" => Err(invalid!(
                "format: webm is not available in this build (built without libvpx: the `webm` \
                 feature); valid: mp4"
            )),
            _ => Err(invalid!(
                "format: {s:?} is not a video format; valid: mp4, webm"
            )),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.extension())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webm_is_refused_up_front_without_its_encoder() {
        let parsed = "WebM".parse::<Format>();
        let from_path = Format::from_path(Path::new("out.webm"));
        if cfg!(feature = "webm") {
            assert_eq!(parsed.unwrap(), Format::Webm);
            assert_eq!(from_path.unwrap(), Format::Webm);
        } else {
            for err in [parsed.unwrap_err(), from_path.unwrap_err()] {
                let msg = err.to_string();
                assert!(msg.contains("format: webm is not available") && msg.contains("mp4"));
            }
        }
    }

    #[test]
    fn extensions() {
        assert_eq!(
            Format::from_path(Path::new("a/b.MP4")).unwrap(),
            Format::Mp4
        );
        // `.webm` without the encoder: `webm_is_refused_up_front_without_its_encoder`.
        for bad in ["clip.avi", "clip", "clip.mp4.tmp"] {
            let err = Format::from_path(Path::new(bad)).unwrap_err();
            assert!(vidgen_engine::error::is_invalid_input(&err));
            let msg = err.to_string();
            assert!(msg.contains(".mp4") && msg.contains(".webm"), "{msg}");
        }
        assert!("gif".parse::<Format>().is_err());
    }
}
