//! vidgen-media: video files from decoded frames, and the quality guard.
//!
//! # API (used by the pipeline, the server and `vidgen probe`)
//!
//! ```no_run
//! use vidgen_media::{encode, guard, Format, Frames, GuardPolicy};
//! # fn demo(latents: &[f32], decoded: &[f32]) -> anyhow::Result<()> {
//! guard::check_latents(latents)?; // NaN/Inf in the final latents: fail before decoding
//! // VAE output for one video: [C=3, T, H, W] in [-1, 1].
//! let frames = Frames::from_f32_chw(decoded, 3, 81, 480, 832)?; // NaN/Inf: fails, naming frames
//! let report = guard::inspect(&frames); // per-frame statistics and classes
//! let warnings = report.verdict(GuardPolicy::Warn)?; // Err: all flat, or noise under `Fail`
//! for w in &warnings { eprintln!("warning: {w}"); }
//! let path = std::path::Path::new("out.mp4");
//! encode(&frames, 16.0, path, Format::from_path(path)?)?; // atomic: temp file + rename
//! vidgen_media::thumbnail(&frames, "out.webp".as_ref())?;
//! vidgen_media::spritesheet(&frames, "out.jpg".as_ref(), &Default::default())?;
//! let info = vidgen_media::probe(path)?; // container facts, no decoding
//! assert_eq!(info.frames, 81);
//! # Ok(()) }
//! ```
//!
//! - [`Frames`]: 8-bit RGB video, `from_f32_chw` / `from_f32` (VAE layout `[C, T, H, W]`, values in
//!   [-1, 1], rounded like diffusers' PIL output), `from_rgb` for 8-bit input.
//! - [`encode`] / [`encode_with`] ([`EncodeOptions`]): writes MP4 (H.264) or WebM (VP9) atomically;
//!   the file holds exactly `frames.len()` frames with duration `frames / fps`.
//! - [`Format::from_path`]: `.mp4` / `.webm`; anything else is an invalid-input error.
//! - [`thumbnail`] (PNG or lossless WebP, by extension) and [`spritesheet`] (JPEG grid).
//! - [`guard`]: [`guard::check_latents`], [`guard::inspect`] → [`guard::Report`],
//!   [`GuardPolicy`] (`fail|warn|off`, `FromStr`), [`guard::Report::verdict`].
//! - [`probe`] → [`ProbeInfo`] (codec, size, fps, frame count, duration) by parsing the container
//!   natively; [`decode`] also decodes every frame (H.264 with OpenH264, VP9 with libvpx) so that the
//!   guard can judge a file. No ffmpeg is needed at run time.
//!
//! # Why these dependencies
//!
//! - **H.264: OpenH264** (`openh264` crate, BSD-2-Clause), compiled from its bundled C++ source by
//!   `cc`: no system library, no network, one C++ build that CI caches like any crate. It encodes
//!   Constrained Baseline
//!   (no B-frames, so decode order = display order and the MP4 needs no `ctts`/edit list), which
//!   every browser and player decodes. At the same bitrate it is less efficient than x264, so we
//!   spend more bits (a fixed quantiser, see [`EncodeOptions`]). x264 (through the system ffmpeg
//!   libraries) was rejected: GPL, and a bindgen build. The same crate also decodes, which `probe`
//!   uses. Patent note: Cisco's royalty coverage applies to Cisco's binaries only, not to this
//!   source build; users who need that coverage should use WebM.
//! - **MP4 muxer: our own** (`mp4.rs`, a few hundred lines, no dependencies): `ftyp`, then `moov`
//!   (fast start for streaming), then one `mdat`; timescale `fps_num * 1000` (or `fps_num` when
//!   already large) with sample delta `fps_den * 1000`, so the duration is exactly `frames / fps`.
//!   Owning it gives exact control of the box order and the timing, which is all this needs.
//! - **WebM: VP9 through the system libvpx** (BSD-3-Clause; Debian `libvpx-dev`), via a 200-line C
//!   file compiled against its headers (no bindgen, no hand-copied struct layouts). VP9 plays in
//!   all current major browsers and is royalty-free; the library builds nothing on our side
//!   beyond that C file, and it also decodes, so `probe` can judge WebM files too. The pure-Rust
//!   AV1 encoder rav1e was the alternative without a system library; it was not taken because it
//!   is a large optimised build on CI's 2 cores, slow at these sizes without its assembly (which
//!   needs nasm), and has no decoder for `probe`. libvpx is behind the default `webm` feature;
//!   `--no-default-features` builds without it (then `.webm` is a clear error).
//! - **WebM muxer: our own** EBML writer (`webm.rs`): Matroska `DefaultDuration` per frame,
//!   `Duration` in `Info`, and `Cues`, so ffprobe and browsers count frames and seek exactly.
//! - **Images**: the `image` crate with its PNG, WebP (lossless) and JPEG codecs, which the engine
//!   already builds for conditioning images, so it costs no extra build time.
//!
//! Colour: RGB is converted to Y'CbCr 4:2:0 with BT.709 coefficients, limited range, and tagged so
//! (H.264 VUI, MP4 `colr`, VP9 colour space, WebM `Colour`), so players do not guess.
//!
//! Sizes: H.264 4:2:0 can only describe even widths and heights (its cropping unit is 2 pixels), so
//! MP4 accepts any even size from 16 (multiples of 16 are not needed: the SPS crops the padded
//! macroblocks) and rejects odd ones with an error that points to WebM; VP9 encodes any size, odd
//! included. Both are verified with ffprobe in `tests/encode_ffprobe.rs`.
//!
//! Speed (2-core CI-class machine, dev profile: codecs at opt-level 3; moving synthetic scene with
//! ±4 levels of grain): H.264 832x480 ≈ 60 frames/s, 1280x704 ≈ 22 frames/s; VP9 (speed 6, all
//! cores) 832x480 ≈ 24 frames/s, 1280x704 ≈ 11 frames/s — seconds per clip, next to minutes of
//! generation. `cargo run -p vidgen-media --example encode_bench -- 832 480 81 16 mp4 4`.

mod atomic;
mod encode;
mod format;
mod frames;
mod h264;
mod images;
mod probe;
mod ranges;
#[cfg(feature = "webm")]
mod vpx;
mod yuv;

mod mp4;
mod webm;

pub mod guard;

pub use encode::{encode, encode_to_vec, encode_with, EncodeOptions, Rational};
pub use format::Format;
pub use frames::Frames;
pub use guard::GuardPolicy;
pub use images::{spritesheet, thumbnail, thumbnail_frame, SpritesheetOptions};
pub use probe::{decode, probe, ProbeInfo};
pub use ranges::format_ranges;
