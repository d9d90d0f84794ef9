//! Encode speed and file size on a moving synthetic scene.
//!
//! `cargo run -p vidgen-media --example encode_bench -- WIDTH HEIGHT FRAMES FPS FORMAT [GRAIN [H264_QP VP9_CQ VP9_SPEED]]`
//!
//! GRAIN (default 0) adds ± that many levels of per-frame random grain, for content as hard to
//! compress as detailed generated footage.

use std::time::Instant;

use vidgen_media::{encode_to_vec, EncodeOptions, Format, Frames};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        anyhow::bail!(
            "usage: encode_bench WIDTH HEIGHT FRAMES FPS mp4|webm [H264_QP VP9_CQ VP9_SPEED]"
        );
    }
    let (w, h, n): (usize, usize, usize) = (args[0].parse()?, args[1].parse()?, args[2].parse()?);
    let fps: f64 = args[3].parse()?;
    let format: Format = args[4].parse()?;
    let grain: f32 = args.get(5).map_or(Ok(0.0), |g| g.parse())?;
    let mut options = EncodeOptions::default();
    if let Some(qp) = args.get(6) {
        options.h264_qp = qp.parse()?;
    }
    if let Some(cq) = args.get(7) {
        options.vp9_cq_level = cq.parse()?;
    }
    if let Some(speed) = args.get(8) {
        options.vp9_speed = speed.parse()?;
    }
    let frames = scene(w, h, n, grain);
    let start = Instant::now();
    let bytes = encode_to_vec(&frames, fps, format, &options)?;
    let secs = start.elapsed().as_secs_f64();
    let dir = std::env::temp_dir().join(format!("encode_bench.{}", format.extension()));
    std::fs::write(&dir, &bytes)?;
    let (_, decoded) = vidgen_media::decode(&dir)?;
    let psnr = psnr(decoded.data(), frames.data());
    println!(
        "{format} {w}x{h} {n} frames @ {fps}, grain {grain}: {secs:.2} s = {:.1} frames/s, {} bytes ({:.0} kb/s), PSNR {psnr:.2} dB, file {}",
        n as f64 / secs,
        bytes.len(),
        bytes.len() as f64 * 8.0 / (n as f64 / fps) / 1000.0,
        dir.display()
    );
    Ok(())
}

/// Smooth shaded background with drifting texture and moving discs, plus optional grain.
fn scene(w: usize, h: usize, n: usize, grain: f32) -> Frames {
    let mut data = Vec::with_capacity(w * h * 3 * n);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    for t in 0..n {
        let tf = t as f32;
        for y in 0..h {
            for x in 0..w {
                let (xf, yf) = (x as f32 + 1.5 * tf, y as f32);
                let texture = 12.0 * ((xf * 0.05).sin() * (yf * 0.07).cos())
                    + 6.0 * ((xf * 0.31 + yf * 0.17).sin());
                let mut rgb = [
                    60.0 + 120.0 * yf / h as f32 + texture,
                    90.0 + 60.0 * x as f32 / w as f32 + texture,
                    170.0 - 60.0 * yf / h as f32,
                ];
                for (cx, cy, r, colour) in [
                    (
                        0.2 * w as f32 + 4.0 * tf,
                        0.5 * h as f32,
                        0.1 * h as f32,
                        [230.0, 70.0, 40.0],
                    ),
                    (
                        0.8 * w as f32 - 3.0 * tf,
                        0.3 * h as f32 + 2.0 * tf,
                        0.08 * h as f32,
                        [40.0, 210.0, 90.0],
                    ),
                ] {
                    let d = ((x as f32 - cx).powi(2) + (yf - cy).powi(2)).sqrt();
                    let cover = ((r - d) / 1.5).clamp(0.0, 1.0);
                    for c in 0..3 {
                        rgb[c] = rgb[c] * (1.0 - cover) + colour[c] * cover;
                    }
                }
                let g = grain * noise();
                data.extend(rgb.iter().map(|v| (v + g).round().clamp(0.0, 255.0) as u8));
            }
        }
    }
    Frames::from_rgb(data, w, h, n).expect("sizes match")
}

fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse.max(1e-12)).log10()
}
