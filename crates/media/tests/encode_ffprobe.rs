//! Encode → read back with ffprobe (an independent demuxer and decoder): exact frame counts,
//! durations, sizes (odd ones included), codecs; plus our own `probe`/`decode` on the same files.
//!
//! Needs ffprobe/ffmpeg (Debian `ffmpeg`; `.ci/run` installs it). Without it these tests fail with
//! a message saying so: they must not pass silently.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use vidgen_media::{encode, probe, Format, Frames};

fn ffprobe(path: &Path) -> serde_json::Value {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries"])
        .arg("stream=codec_name,profile,width,height,pix_fmt,r_frame_rate,avg_frame_rate,nb_read_frames,duration:format=duration,format_name")
        .args(["-of", "json"])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("running ffprobe failed ({e}): install ffmpeg (`apt-get install ffmpeg`); .ci/run does"));
    assert!(
        out.status.success(),
        "ffprobe failed on {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Decodes with ffmpeg to RGB (what any player would show).
fn ffmpeg_rgb(path: &Path) -> Vec<u8> {
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(path)
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24", "-"])
        .output()
        .unwrap_or_else(|e| {
            panic!("running ffmpeg failed ({e}): install ffmpeg (`apt-get install ffmpeg`)")
        });
    assert!(
        out.status.success(),
        "ffmpeg failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn str_field<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("ffprobe output lacks {key}: {v}"))
}

fn check(format: Format, width: usize, height: usize, count: usize, fps: u32, player_check: bool) {
    let frames = moving_shapes(width, height, count);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("clip.{}", format.extension()));
    encode(&frames, fps as f64, &path, format).unwrap();
    let case = format!("{format} {width}x{height} {count} frames @ {fps}");

    let json = ffprobe(&path);
    let stream = &json["streams"][0];
    let expected_duration = count as f64 / fps as f64;
    assert_eq!(str_field(stream, "codec_name"), format.codec(), "{case}");
    assert_eq!(
        stream["width"].as_u64(),
        Some(width as u64),
        "{case}: width"
    );
    assert_eq!(
        stream["height"].as_u64(),
        Some(height as u64),
        "{case}: height"
    );
    assert_eq!(str_field(stream, "pix_fmt"), "yuv420p", "{case}");
    assert_eq!(
        str_field(stream, "r_frame_rate"),
        format!("{fps}/1"),
        "{case}"
    );
    let read: usize = str_field(stream, "nb_read_frames").parse().unwrap();
    assert_eq!(read, count, "{case}: ffprobe counted {read} frames");
    let format_duration: f64 = str_field(&json["format"], "duration").parse().unwrap();
    // ffprobe prints 6 decimals.
    assert!(
        (format_duration - expected_duration).abs() < 1.5e-6,
        "{case}: duration {format_duration} != {expected_duration}"
    );
    if format == Format::Mp4 {
        let stream_duration: f64 = str_field(stream, "duration").parse().unwrap();
        assert!(
            (stream_duration - expected_duration).abs() < 1.5e-6,
            "{case}: stream duration {stream_duration}"
        );
        assert_eq!(
            str_field(stream, "avg_frame_rate"),
            format!("{fps}/1"),
            "{case}"
        );
    }

    // Our own reader agrees, and our decoder returns every frame, in order, close to the source.
    let info = probe(&path).unwrap();
    assert_eq!(
        (info.frames, info.width as usize, info.height as usize),
        (count, width, height),
        "{case}"
    );
    assert_eq!((info.fps_num, info.fps_den), (fps as u64, 1), "{case}");
    assert!(
        (info.duration_s - expected_duration).abs() < 1e-9,
        "{case}: probe duration {}",
        info.duration_s
    );
    let (_, decoded) = vidgen_media::decode(&path).unwrap();
    assert_eq!(
        (decoded.len(), decoded.width(), decoded.height()),
        (count, width, height),
        "{case}"
    );
    let worst = (0..count)
        .map(|i| psnr(decoded.frame(i), frames.frame(i)))
        .fold(f64::INFINITY, f64::min);
    assert!(
        worst > 30.0,
        "{case}: worst frame PSNR {worst:.1} dB (ours)"
    );

    if player_check {
        let rgb = ffmpeg_rgb(&path);
        assert_eq!(
            rgb.len(),
            frames.data().len(),
            "{case}: ffmpeg decoded a different amount of video"
        );
        let theirs = Frames::from_rgb(rgb, width, height, count).unwrap();
        for i in 0..count {
            let p = psnr(theirs.frame(i), frames.frame(i));
            assert!(
                p > 30.0,
                "{case}: frame {i} decodes in ffmpeg at {p:.1} dB (wrong frame or colours?)"
            );
        }
    }
    println!("{case}: ok, {} bytes, ffprobe {read} frames / {format_duration} s, worst PSNR {worst:.1} dB", info.file_bytes);
}

#[test]
fn mp4_counts_sizes_and_durations_are_exact() {
    check(Format::Mp4, 320, 192, 1, 16, true);
    check(Format::Mp4, 320, 192, 5, 24, true);
    check(Format::Mp4, 250, 138, 81, 16, true); // not multiples of 16
    check(Format::Mp4, 202, 114, 121, 24, false);
    check(Format::Mp4, 832, 480, 81, 16, false); // Wan 480p
}

/// Encodes `frames` as MP4 and checks that ffprobe, our `probe` and our decoder all count every
/// frame; returns our decoding.
fn mp4_keeps_every_frame(frames: &Frames, fps: u32, case: &str) -> Frames {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    let started = std::time::Instant::now();
    encode(frames, fps as f64, &path, Format::Mp4)
        .unwrap_or_else(|e| panic!("{case}: encoding failed: {e:#}"));
    let encoded_in = started.elapsed();
    let count = frames.len();
    let json = ffprobe(&path);
    let stream = &json["streams"][0];
    let read: usize = str_field(stream, "nb_read_frames").parse().unwrap();
    assert_eq!(read, count, "{case}: ffprobe counted {read} frames");
    assert_eq!(
        (stream["width"].as_u64(), stream["height"].as_u64()),
        (Some(frames.width() as u64), Some(frames.height() as u64)),
        "{case}"
    );
    let info = probe(&path).unwrap();
    assert_eq!(info.frames, count, "{case}: probe");
    let (_, decoded) = vidgen_media::decode(&path).unwrap();
    assert_eq!(decoded.len(), count, "{case}: decoded frames");
    println!(
        "{case}: ok, {} bytes ({:.2} bytes/pixel), encoded in {encoded_in:.2?}",
        info.file_bytes,
        info.file_bytes as f64 / (frames.width() * frames.height() * count) as f64
    );
    decoded
}

/// Full-range noise has no redundancy to remove: at the default quantiser OpenH264 codes it to
/// more than its raw size, which overflows its per-frame output buffer and used to fail the whole
/// encode ("OpenH264 ... Native:3", seen with random weights at 1280x704). Every frame must still
/// be stored, at every size.
#[test]
fn mp4_noise_encodes_every_frame() {
    for (width, height, count) in [(1280, 704, 25), (1280, 720, 5), (832, 480, 17)] {
        let frames = video(width, height, count, |i| {
            uniform_noise(i as u64, width, height)
        });
        mp4_keeps_every_frame(
            &frames,
            24,
            &format!("noise {width}x{height} {count} frames"),
        );
    }
}

/// A burst of noise in the middle of an ordinary clip (overflowing a P-frame, not the first
/// frame): all frames are kept, and the ordinary ones still look right.
#[test]
fn mp4_noise_burst_mid_clip_keeps_every_frame() {
    let (width, height, count) = (832, 480, 40);
    let scene = moving_shapes(width, height, count);
    let burst = 24..28;
    let frames = video(width, height, count, |i| {
        if burst.contains(&i) {
            uniform_noise(100 + i as u64, width, height)
        } else {
            scene.frame(i).to_vec()
        }
    });
    let decoded = mp4_keeps_every_frame(&frames, 16, "noise burst in 832x480 40 frames");
    let worst = (0..count)
        .filter(|i| !burst.contains(i))
        .map(|i| psnr(decoded.frame(i), frames.frame(i)))
        .fold(f64::INFINITY, f64::min);
    assert!(worst > 30.0, "worst ordinary frame PSNR {worst:.1} dB");
}

#[test]
fn webm_counts_sizes_and_durations_are_exact() {
    check(Format::Webm, 320, 192, 1, 16, true);
    check(Format::Webm, 333, 201, 5, 24, true); // odd sizes
    check(Format::Webm, 250, 138, 81, 16, true);
    check(Format::Webm, 161, 97, 121, 24, false);
}

#[test]
fn odd_mp4_is_a_clear_error_and_leaves_no_file() {
    let frames = moving_shapes(333, 201, 2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.mp4");
    let err = encode(&frames, 16.0, &path, Format::Mp4).unwrap_err();
    assert!(vidgen_engine::error::is_invalid_input(&err));
    assert!(
        err.to_string().contains("333x201") && err.to_string().contains(".webm"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn mp4_is_streamable_with_moov_first() {
    let frames = moving_shapes(320, 192, 40);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stream.mp4");
    encode(&frames, 16.0, &path, Format::Mp4).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let moov = bytes.windows(4).position(|w| w == b"moov").unwrap();
    let mdat = bytes.windows(4).position(|w| w == b"mdat").unwrap();
    assert!(moov < mdat, "moov at {moov} must precede mdat at {mdat}");
    let info = probe(&path).unwrap();
    assert_eq!(info.fast_start, Some(true));
    assert_eq!(info.codec, "h264 (Constrained Baseline)");
    // A keyframe every 2 s at 16 fps: frames 0, 32.
    assert_eq!(info.keyframes, 2);
}

#[test]
fn ntsc_rate_is_exact() {
    let frames = moving_shapes(160, 96, 10);
    let dir = tempfile::tempdir().unwrap();
    for format in [Format::Mp4, Format::Webm] {
        let path = dir.path().join(format!("ntsc.{}", format.extension()));
        encode(&frames, 24000.0 / 1001.0, &path, format).unwrap();
        let json = ffprobe(&path);
        let read: usize = str_field(&json["streams"][0], "nb_read_frames")
            .parse()
            .unwrap();
        assert_eq!(read, 10);
        let duration: f64 = str_field(&json["format"], "duration").parse().unwrap();
        assert!(
            (duration - 10.0 * 1001.0 / 24000.0).abs() < 1.5e-3,
            "{format}: {duration}"
        );
        if format == Format::Mp4 {
            assert_eq!(str_field(&json["streams"][0], "r_frame_rate"), "24000/1001");
        }
        let info = probe(&path).unwrap();
        assert_eq!(
            (info.fps_num, info.fps_den, info.frames),
            (24000, 1001, 10),
            "{format}"
        );
    }
}

#[test]
fn thumbnails_and_spritesheet() {
    let frames = moving_shapes(250, 138, 30);
    let dir = tempfile::tempdir().unwrap();
    for name in ["thumb.png", "thumb.webp"] {
        let path = dir.path().join(name);
        vidgen_media::thumbnail(&frames, &path).unwrap();
        let json = ffprobe(&path);
        assert_eq!(json["streams"][0]["width"].as_u64(), Some(250), "{name}");
        assert_eq!(json["streams"][0]["height"].as_u64(), Some(138), "{name}");
    }
    // Lossless: the PNG holds frame 0 exactly.
    let png = std::fs::read(dir.path().join("thumb.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    let sheet = dir.path().join("sheet.jpg");
    let options = vidgen_media::SpritesheetOptions {
        tiles: 10,
        columns: 4,
        tile_width: 128,
        quality: 85,
    };
    vidgen_media::spritesheet(&frames, &sheet, &options).unwrap();
    let json = ffprobe(&sheet);
    // 10 tiles in rows of 4: 3 rows of 128 x round(128*138/250)=71.
    assert_eq!(json["streams"][0]["width"].as_u64(), Some(512));
    assert_eq!(json["streams"][0]["height"].as_u64(), Some(213));
    assert_eq!(str_field(&json["streams"][0], "codec_name"), "mjpeg");
    let err = vidgen_media::thumbnail(&frames, &dir.path().join("thumb.gif")).unwrap_err();
    assert!(err.to_string().contains(".png, .webp"), "{err}");
}
