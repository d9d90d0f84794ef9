//! End to end on the built-in demo model: the MP4 read back with ffprobe holds exactly the frames,
//! size and fps requested — text-only and with a conditioning image.

use std::path::Path;
use std::process::Command;

fn ffprobe(path: &Path) -> (u32, u32, u32, String) {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args([
            "-show_entries",
            "stream=nb_read_frames,width,height,r_frame_rate",
        ])
        .args(["-of", "default=nw=1"])
        .arg(path)
        .output()
        .expect("ffprobe must be installed (.ci/run installs ffmpeg)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |k: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {text}"))
            .to_string()
    };
    (
        field("nb_read_frames").parse().unwrap(),
        field("width").parse().unwrap(),
        field("height").parse().unwrap(),
        field("r_frame_rate"),
    )
}

fn generate(extra: &[&str], output: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_vidgen"))
        .args([
            "generate",
            "--model",
            "demo",
            "--prompt",
            "a red fox running through snow",
        ])
        .args([
            "--size", "64x48", "--frames", "9", "--fps", "24", "--steps", "2", "--seed", "7",
        ])
        .args(extra)
        .arg("--output")
        .arg(output)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "generate failed: {stderr}");
    assert!(
        stderr.contains("random weights"),
        "the demo must say so: {stderr}"
    );
}

#[test]
fn demo_text_to_video_mp4_has_the_requested_frames_size_and_fps() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fox.mp4");
    generate(&[], &out);
    assert_eq!(ffprobe(&out), (9, 64, 48, "24/1".to_string()));
}

#[test]
fn demo_image_conditioned_video() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("start.png");
    let img = image::RgbImage::from_fn(80, 60, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 4) as u8, 128])
    });
    img.save(&image).unwrap();
    let out = dir.path().join("fox.mp4");
    generate(&["--image", image.to_str().unwrap()], &out);
    assert_eq!(ffprobe(&out), (9, 64, 48, "24/1".to_string()));
}
