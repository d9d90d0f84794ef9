//! Calibration of the quality guard on synthetic cases: every case's statistics are printed
//! (`cargo test -p vidgen-media --test guard_calibration -- --nocapture`), then the classes and the
//! policy outcomes are asserted. The thresholds in `guard.rs` sit between the groups printed here.

mod common;

use common::*;
use vidgen_media::guard::{self, FrameClass, Report};
use vidgen_media::{encode_to_vec, EncodeOptions, Format, Frames, GuardPolicy};

const W: usize = 320;
const H: usize = 192;

fn print_report(name: &str, report: &Report) {
    println!("== {name}");
    println!(
        "   {:>5} {:>6} {:>6} {:>7} {:>6} {:>6} {:>7} {:>7} {:>7} {:>6} {:>6}  class",
        "frame",
        "mean",
        "std",
        "colours",
        "tdiff",
        "tcorr",
        "nbcorr",
        "coarse",
        "pow8",
        "pow16",
        "brd8/16"
    );
    for s in &report.frames {
        println!(
            "   {:>5} {:>6.1} {:>6.2} {:>7} {:>6} {:>6} {:>7.3} {:>7.3} {:>7.4} {:>6.4} {:>5.2}/{:<5.2} {}",
            s.index,
            s.mean,
            s.std,
            s.unique_colours,
            s.temporal_diff.map_or("-".into(), |d| format!("{d:.1}")),
            s.temporal_corr.map_or("-".into(), |c| format!("{c:.2}")),
            s.neighbour_corr,
            s.coarse_fraction,
            s.stride_power_8,
            s.stride_power_16,
            s.border_ratio_8,
            s.border_ratio_16,
            s.class
        );
    }
    println!("{report}");
}

fn classes(report: &Report) -> Vec<FrameClass> {
    report.frames.iter().map(|s| s.class).collect()
}

fn inspect(name: &str, frames: &Frames) -> Report {
    let report = guard::inspect(frames);
    print_report(name, &report);
    report
}

fn assert_all(name: &str, report: &Report, class: FrameClass) {
    let got = classes(report);
    assert!(
        got.iter().all(|&c| c == class),
        "{name}: expected all {class}, got {got:?}\n{report}"
    );
}

#[test]
fn natural_images_and_moving_shapes_pass() {
    let still = |rgb: Vec<u8>, w: usize, h: usize| Frames::from_rgb(rgb, w, h, 1).unwrap();
    for (name, frames) in [
        (
            "natural, 1/f^2 spectrum",
            still(natural_image(100, W, H, 0.0), W, H),
        ),
        (
            "natural, smoother (1/f^2.6)",
            still(natural_image(110, W, H, 0.3), W, H),
        ),
        (
            "natural, heavy detail (1/f^1.4)",
            still(natural_image(200, W, H, -0.3), W, H),
        ),
        (
            "natural, 832x480",
            still(natural_image(300, 832, 480, 0.0), 832, 480),
        ),
        ("smooth gradient", still(gradient_image(W, H), W, H)),
        (
            "dark scene",
            still(
                natural_image(400, W, H, 0.0)
                    .iter()
                    .map(|&v| v / 8)
                    .collect(),
                W,
                H,
            ),
        ),
        (
            "natural still, repeated",
            video(W, H, 3, |_| natural_image(500, W, H, 0.0)),
        ),
    ] {
        let report = inspect(name, &frames);
        assert_all(name, &report, FrameClass::Fine);
        assert!(report.verdict(GuardPolicy::Fail).unwrap().is_empty());
    }
    let shapes = moving_shapes(W, H, 24);
    let report = inspect("moving shapes (24 frames)", &shapes);
    assert_all("moving shapes", &report, FrameClass::Fine);
    assert!(report.verdict(GuardPolicy::Fail).unwrap().is_empty());
}

#[test]
fn noise_is_flagged_and_warns_by_default() {
    for (name, frames) in [
        (
            "gaussian noise sigma 50",
            video(W, H, 4, |t| gaussian_noise(t as u64, W, H, 50.0)),
        ),
        (
            "gaussian noise sigma 10 (faint)",
            video(W, H, 4, |t| gaussian_noise(10 + t as u64, W, H, 10.0)),
        ),
        (
            "blue noise",
            video(W, H, 4, |t| blue_noise(20 + t as u64, W, H)),
        ),
        (
            "latent noise, stride 8",
            video(W, H, 4, |t| latent_noise(30 + t as u64, W, H, 8.0)),
        ),
        (
            "latent noise, stride 16 at 832x480",
            video(832, 480, 4, |t| latent_noise(35 + t as u64, 832, 480, 16.0)),
        ),
    ] {
        let report = inspect(name, &frames);
        assert_all(name, &report, FrameClass::NoiseLike);
        let warnings = report.verdict(GuardPolicy::Warn).unwrap();
        assert_eq!(warnings.len(), 1, "{name}");
        assert!(
            warnings[0]
                .message
                .contains("4 of 4 frames are noise-like (frames 0-3"),
            "{}",
            warnings[0]
        );
        let err = report.verdict(GuardPolicy::Fail).unwrap_err().to_string();
        assert!(
            err.contains("noise-like") && err.contains("--quality-guard fail"),
            "{err}"
        );
        assert!(report.verdict(GuardPolicy::Off).unwrap().is_empty());
    }
}

#[test]
fn flat_and_black_frames_are_flagged_and_all_flat_fails() {
    for (name, rgb, tone) in [
        ("black", [0u8, 0, 0], "black"),
        ("mid grey", [128, 128, 128], "uniform"),
        ("white", [255, 255, 255], "white"),
    ] {
        let frames = video(W, H, 5, |_| flat_image(W, H, rgb));
        let report = inspect(name, &frames);
        assert_all(name, &report, FrameClass::Flat);
        let err = report.verdict(GuardPolicy::Warn).unwrap_err().to_string();
        assert!(
            err.contains("all 5 frames are flat") && err.contains(tone),
            "{err}"
        );
        assert!(report.verdict(GuardPolicy::Off).is_ok());
    }
    // Nearly flat: a dark frame with ±1 level of dither is still flat.
    let dithered = video(W, H, 2, |t| {
        gaussian_noise(t as u64, W, H, 0.7)
            .iter()
            .map(|&v| v - 120)
            .collect()
    });
    assert_all(
        "dithered black",
        &inspect("dithered black", &dithered),
        FrameClass::Flat,
    );

    // The I2V failure in the field reports: picture in the first frames, then grey.
    let shapes = moving_shapes(W, H, 4);
    let grey = flat_image(W, H, [118, 118, 118]);
    let frames = video(W, H, 21, |t| {
        if t < 4 {
            shapes.frame(t).to_vec()
        } else {
            grey.clone()
        }
    });
    let report = inspect("picture then grey", &frames);
    let warnings = report.verdict(GuardPolicy::Warn).unwrap();
    assert_eq!(warnings.len(), 1);
    assert_eq!(warnings[0].class, FrameClass::Flat);
    assert!(
        warnings[0]
            .message
            .contains("17 of 21 frames are flat (frames 4-20"),
        "{}",
        warnings[0]
    );
    assert!(report.verdict(GuardPolicy::Fail).is_err());
}

#[test]
fn checkerboard_corruption_is_flagged() {
    let base = natural_image(500, W, H, 0.0);
    type Corruption = Box<dyn Fn(Vec<u8>) -> Vec<u8>>;
    let cases: Vec<(&str, Corruption)> = vec![
        (
            "8-px block checkerboard, +-4 levels",
            Box::new(|rgb| checkerboard(rgb, W, 8, 4.0)),
        ),
        (
            "16-px block checkerboard, +-4 levels",
            Box::new(|rgb| checkerboard(rgb, W, 16, 4.0)),
        ),
        (
            "8-px block checkerboard, +-12 levels",
            Box::new(|rgb| checkerboard(rgb, W, 8, 12.0)),
        ),
        (
            "8-px stride tile, +-3 levels",
            Box::new(|rgb| stride_tile(rgb, W, 8, 3.0, 1)),
        ),
        (
            "16-px stride tile, +-3 levels",
            Box::new(|rgb| stride_tile(rgb, W, 16, 3.0, 2)),
        ),
    ];
    for (name, corrupt) in cases {
        let frames = video(W, H, 2, |_| corrupt(base.clone()));
        let report = inspect(name, &frames);
        assert_all(name, &report, FrameClass::Checkerboard);
        let warnings = report.verdict(GuardPolicy::Warn).unwrap();
        assert_eq!(warnings[0].class, FrameClass::Checkerboard);
        assert!(report.verdict(GuardPolicy::Fail).is_err());
    }
    // A 2-px pixel checkerboard (the RoPE-bug pattern) makes neighbours anti-correlated: noise-like
    // or checkerboard, never fine.
    let frames = video(W, H, 1, |_| checkerboard(base.clone(), W, 1, 40.0));
    let report = inspect("1-px checkerboard, +-40 levels", &frames);
    assert_ne!(report.frames[0].class, FrameClass::Fine);
}

#[test]
fn frames_unrelated_to_their_neighbours_are_noise_like_but_a_scene_cut_is_not() {
    // Smooth noise too coarse for the spatial measures, new every frame: only time tells.
    let frames = video(832, 480, 5, |t| {
        latent_noise(900 + t as u64, 832, 480, 48.0)
    });
    let report = inspect("blobs of 48 px, new every frame", &frames);
    assert_all("independent blobs", &report, FrameClass::NoiseLike);
    assert!(
        report.frames[2]
            .reason
            .contains("unrelated to the neighbouring frames"),
        "{}",
        report.frames[2].reason
    );

    // One hard cut in a coherent clip: every frame keeps a coherent neighbour.
    let a = moving_shapes(W, H, 6);
    let b = video(W, H, 6, |t| {
        natural_image(700, W + 12, H, 0.0)
            .chunks_exact((W + 12) * 3)
            .flat_map(|row| row[t * 6..][..W * 3].to_vec())
            .collect()
    });
    let frames = video(W, H, 12, |t| {
        if t < 6 {
            a.frame(t).to_vec()
        } else {
            b.frame(t - 6).to_vec()
        }
    });
    let report = inspect("clip with one scene cut", &frames);
    assert_all("scene cut", &report, FrameClass::Fine);
}

/// A natural still panning 2 px per frame.
fn panning(width: usize, height: usize, count: usize) -> Frames {
    let wide = natural_image(800, width + 2 * count, height, 0.0);
    video(width, height, count, |t| {
        wide.chunks_exact((width + 2 * count) * 3)
            .flat_map(|row| row[t * 2 * 3..][..width * 3].to_vec())
            .collect()
    })
}

#[test]
fn verdicts_survive_encoding() {
    // What `vidgen probe` sees: the guard on decoded H.264 and VP9 keeps its classes.
    let cases: Vec<(&str, Frames, FrameClass)> = vec![
        ("moving shapes", moving_shapes(W, H, 8), FrameClass::Fine),
        (
            "gaussian noise",
            video(W, H, 8, |t| gaussian_noise(40 + t as u64, W, H, 50.0)),
            FrameClass::NoiseLike,
        ),
        (
            "latent noise",
            video(W, H, 8, |t| latent_noise(50 + t as u64, W, H, 8.0)),
            FrameClass::NoiseLike,
        ),
        (
            "black",
            video(W, H, 8, |_| flat_image(W, H, [0, 0, 0])),
            FrameClass::Flat,
        ),
        ("natural pan", panning(W, H, 8), FrameClass::Fine),
        (
            "8-px checkerboard",
            video(W, H, 8, |t| {
                checkerboard(panning(W, H, 8).frame(t).to_vec(), W, 8, 6.0)
            }),
            FrameClass::Checkerboard,
        ),
        (
            "8-px stride tile",
            video(W, H, 8, |t| {
                stride_tile(panning(W, H, 8).frame(t).to_vec(), W, 8, 4.0, 3)
            }),
            FrameClass::Checkerboard,
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    // Also far below our encoder's quality (QP 34, CQ 44: visible blocking) natural footage stays fine.
    let coarse = EncodeOptions {
        h264_qp: 34,
        vp9_cq_level: 44,
        ..EncodeOptions::default()
    };
    for (name, frames, expected) in cases {
        for (format, options) in [
            (Format::Mp4, EncodeOptions::default()),
            (Format::Webm, EncodeOptions::default()),
            (Format::Mp4, coarse.clone()),
            (Format::Webm, coarse.clone()),
        ] {
            if expected != FrameClass::Fine && options.h264_qp != EncodeOptions::default().h264_qp {
                continue;
            }
            let path = dir.path().join(format!("case.{}", format.extension()));
            std::fs::write(
                &path,
                encode_to_vec(&frames, 16.0, format, &options).unwrap(),
            )
            .unwrap();
            let (_, decoded) = vidgen_media::decode(&path).unwrap();
            let label = format!(
                "{name} through {format}, qp {} / cq {}",
                options.h264_qp, options.vp9_cq_level
            );
            let report = inspect(&label, &decoded);
            assert_all(&label, &report, expected);
        }
    }
}

#[test]
fn non_finite_values_always_fail() {
    let mut data = vec![0.1f32; 3 * 4 * 8 * 8];
    data[3 * 64 + 5] = f32::NAN; // channel 0, frame 3
    let err = Frames::from_f32_chw(&data, 3, 4, 8, 8)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("frames 3 of 4") && err.contains("NaN/Inf"),
        "{err}"
    );
    assert!(guard::check_latents(&data)
        .unwrap_err()
        .to_string()
        .contains("1 NaN"));
}
