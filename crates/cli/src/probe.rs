//! `vidgen probe FILE`: what is in a video file, and the quality guard's verdict.
//!
//! Reads MP4 and WebM natively (no ffmpeg needed), decodes H.264 (OpenH264) and VP9 (libvpx) to
//! judge every frame, and exits 1 when the guard's policy fails the video or the stream does not
//! decode to the frame count its container claims.

use std::path::PathBuf;

use anyhow::{bail, Result};
use vidgen_media::guard::{self, Report};
use vidgen_media::{GuardPolicy, ProbeInfo};

#[derive(clap::Args)]
pub struct Args {
    /// Video file to inspect (MP4 or WebM; detected from the content).
    pub file: PathBuf,
    /// Which findings fail the exit status: fail (any flagged frame), warn (all-flat only), off.
    #[arg(long, default_value = "warn", value_name = "fail|warn|off")]
    pub quality_guard: GuardPolicy,
    /// Only read the container (fast); skip decoding and the quality guard.
    #[arg(long)]
    pub no_decode: bool,
    /// Print every frame's statistics.
    #[arg(long)]
    pub frames: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    if args.no_decode {
        let info = vidgen_media::probe(&args.file)?;
        if args.json {
            println!("{}", serde_json::json!({ "file": args.file, "info": info }));
        } else {
            print_info(&args, &info, None);
        }
        return Ok(());
    }
    let (info, frames) = match vidgen_media::decode(&args.file) {
        Ok(decoded) => decoded,
        Err(err) => {
            // Container facts are still worth showing when the codec is one we cannot decode.
            let info = vidgen_media::probe(&args.file)?;
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({ "file": args.file, "info": info, "decode_error": format!("{err:#}") })
                );
            } else {
                print_info(&args, &info, None);
                println!("quality guard: not run, the video did not decode: {err:#}");
            }
            if args.quality_guard == GuardPolicy::Fail {
                bail!("{}: cannot judge the video: {err:#}", args.file.display());
            }
            return Ok(());
        }
    };
    let report = guard::inspect(&frames);
    let verdict = report.verdict(args.quality_guard);
    if args.json {
        let (verdict_text, warnings) = match &verdict {
            Ok(w) => (
                if w.is_empty() {
                    "ok".to_string()
                } else {
                    "warn".to_string()
                },
                w.clone(),
            ),
            Err(e) => (format!("fail: {e}"), Vec::new()),
        };
        println!(
            "{}",
            serde_json::json!({
                "file": args.file,
                "info": info,
                "decoded_frames": frames.len(),
                "policy": args.quality_guard,
                "verdict": verdict_text,
                "warnings": warnings,
                "ranges": report.runs(),
                "frames": if args.frames { serde_json::to_value(&report.frames)? } else { serde_json::Value::Null },
            })
        );
    } else {
        print_info(&args, &info, Some(frames.len()));
        print_report(&args, &report);
        match &verdict {
            Ok(warnings) if warnings.is_empty() => println!("verdict: ok"),
            Ok(warnings) => {
                for w in warnings {
                    println!("verdict: warning: {w}");
                }
            }
            Err(e) => println!("verdict: FAIL: {e}"),
        }
    }
    if frames.len() != info.frames {
        bail!(
            "{}: the container lists {} frames but the stream decodes to {}",
            args.file.display(),
            info.frames,
            frames.len()
        );
    }
    verdict.map(|_| ())
}

fn print_info(args: &Args, info: &ProbeInfo, decoded: Option<usize>) {
    println!(
        "file:      {} ({:.2} MB)",
        args.file.display(),
        info.file_bytes as f64 / 1e6
    );
    let fast_start = match info.fast_start {
        Some(true) => ", moov first (streamable)",
        Some(false) => ", moov at the end (not streamable before fully downloaded)",
        None => "",
    };
    println!("container: {}{fast_start}", info.format);
    println!("video:     {}, {}x{}", info.codec, info.width, info.height);
    println!(
        "fps:       {}/{} ({:.3})",
        info.fps_num, info.fps_den, info.fps
    );
    let decoded = decoded.map_or(String::new(), |n| format!(", {n} decoded"));
    println!(
        "frames:    {}{decoded}, {} keyframes",
        info.frames, info.keyframes
    );
    println!("duration:  {:.6} s", info.duration_s);
    println!("bitrate:   {:.0} kb/s", info.bitrate_kbps);
}

fn print_report(args: &Args, report: &Report) {
    println!("quality guard (policy {}):", args.quality_guard);
    println!("{report}");
    if args.frames {
        println!(
            "  {:>5} {:>6} {:>6} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}  class",
            "frame",
            "mean",
            "std",
            "colours",
            "tdiff",
            "nbcorr",
            "coarse",
            "pow8",
            "pow16",
            "border"
        );
        for s in &report.frames {
            println!(
                "  {:>5} {:>6.1} {:>6.2} {:>7} {:>6} {:>6.3} {:>6.3} {:>6.4} {:>6.4} {:>6.2}  {}",
                s.index,
                s.mean,
                s.std,
                s.unique_colours,
                s.temporal_diff.map_or("-".into(), |d| format!("{d:.1}")),
                s.neighbour_corr,
                s.coarse_fraction,
                s.stride_power_8,
                s.stride_power_16,
                s.border_ratio_8.max(s.border_ratio_16),
                s.class
            );
        }
    }
}
