//! `vidgen generate` refuses bad requests before loading anything: exit code 2, one line on stderr
//! naming the field and the valid values. Runs the real binary; models are the built-in demo or
//! fake model folders (names and config.json only: nothing is loaded).

use std::path::Path;
use std::process::Command;

struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

fn vidgen(args: &[&str]) -> Outcome {
    let out = Command::new(env!("CARGO_BIN_EXE_vidgen"))
        .arg("generate")
        .args(args)
        .output()
        .expect("running vidgen");
    Outcome {
        code: out.status.code().expect("exited normally"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Demo-model arguments followed by `extra`.
fn demo(extra: &[&str]) -> Outcome {
    let mut args = vec!["--model", "demo", "--prompt", "a red fox in the snow"];
    args.extend_from_slice(extra);
    vidgen(&args)
}

/// Asserts exit 2 and a single `error:` line containing every `needle`.
fn assert_refused(o: &Outcome, needles: &[&str]) {
    assert_eq!(o.code, 2, "exit code; stderr: {}", o.stderr);
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line on stderr, got: {}", o.stderr);
    assert!(lines[0].starts_with("error: "), "{}", o.stderr);
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    for needle in needles {
        assert!(lines[0].contains(needle), "`{needle}` not in: {}", lines[0]);
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// An official-layout folder (empty weight files: detection reads names and config.json only).
fn official_folder(dir: &Path, config: &str, experts: bool, vae: &str) {
    let dits: Vec<std::path::PathBuf> = if experts {
        vec![dir.join("high_noise_model"), dir.join("low_noise_model")]
    } else {
        vec![dir.to_path_buf()]
    };
    for d in dits {
        write(&d.join("config.json"), config.as_bytes());
        write(&d.join("diffusion_pytorch_model.safetensors"), b"");
    }
    write(&dir.join(vae), b"");
    write(&dir.join("models_t5_umt5-xxl-enc-bf16.pth"), b"");
    write(&dir.join("google/umt5-xxl/tokenizer.json"), b"{}");
}

fn wan_config(
    dim: usize,
    heads: usize,
    ffn: usize,
    layers: usize,
    cin: usize,
    cout: usize,
) -> String {
    format!(
        r#"{{"_class_name": "WanModel", "dim": {dim}, "eps": 1e-06, "ffn_dim": {ffn}, "freq_dim": 256, "in_dim": {cin}, "num_heads": {heads}, "num_layers": {layers}, "out_dim": {cout}, "text_len": 512}}"#
    )
}

fn ti2v_5b(dir: &Path) {
    official_folder(
        dir,
        &wan_config(3072, 24, 14336, 30, 48, 48),
        false,
        "Wan2.2_VAE.pth",
    );
}

fn t2v_1_3b(dir: &Path) {
    official_folder(
        dir,
        &wan_config(1536, 12, 8960, 30, 16, 16),
        false,
        "Wan2.1_VAE.pth",
    );
}

fn t2v_a14b(dir: &Path) {
    official_folder(
        dir,
        &wan_config(5120, 40, 13824, 40, 16, 16),
        true,
        "Wan2.1_VAE.pth",
    );
}

/// A valid 2×2 RGB PNG.
const TINY_PNG: &[u8] = &[
    137, 80, 78, 71, 13, 10, 26, 10, 0, 0, 0, 13, 73, 72, 68, 82, 0, 0, 0, 2, 0, 0, 0, 2, 8, 2, 0,
    0, 0, 253, 212, 154, 115, 0, 0, 0, 18, 73, 68, 65, 84, 120, 156, 99, 248, 207, 192, 192, 0,
    194, 12, 255, 129, 0, 0, 31, 238, 5, 251, 11, 217, 104, 139, 0, 0, 0, 0, 73, 69, 78, 68, 174,
    66, 96, 130,
];

#[test]
fn size_must_be_a_multiple() {
    assert_refused(
        &demo(&["--size", "250x256"]),
        &["size:", "250x256", "multiple of 16"],
    );
}

#[test]
fn size_must_be_w_x_h() {
    for bad in ["256", "256x", "wide", "256x256x3"] {
        assert_refused(&demo(&["--size", bad]), &["size:", bad, "WIDTHxHEIGHT"]);
    }
}

#[test]
fn size_too_large_for_free_size_model() {
    assert_refused(
        &demo(&["--size", "1024x1024"]),
        &["size:", "1024x1024", "exceeds"],
    );
}

#[test]
fn fixed_size_model_lists_its_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    ti2v_5b(tmp.path());
    let model = tmp.path().to_str().unwrap();
    let o = vidgen(&["--model", model, "--prompt", "a cat", "--size", "1280x720"]);
    assert_refused(
        &o,
        &["size:", "1280x720", "wan2.2-ti2v-5b", "1280x704, 704x1280"],
    );
    // The official W*H spelling of a valid size passes.
    let o = vidgen(&[
        "--model",
        model,
        "--prompt",
        "a cat",
        "--size",
        "704*1280",
        "--dry-run",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains("704x1280, 121 frames at 24 fps"),
        "{}",
        o.stdout
    );
}

#[test]
fn frames_must_be_4k_plus_1_and_the_nearest_are_named() {
    assert_refused(
        &demo(&["--frames", "20"]),
        &["frames: 20", "4k+1", "17 or 21", "--align-frames"],
    );
    assert_refused(&demo(&["--frames", "0"]), &["frames: 0"]);
    assert_refused(&demo(&["--frames", "85"]), &["frames: 85", "1..=81", "81"]);
}

#[test]
fn align_frames_rounds_and_says_so() {
    let o = demo(&["--frames", "20", "--align-frames", "--dry-run"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stderr.contains("frames 20 aligned to 21"), "{}", o.stderr);
    assert!(o.stdout.contains("21 frames"), "{}", o.stdout);
}

#[test]
fn seconds_become_frames() {
    let o = demo(&["--seconds", "2", "--dry-run"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("seconds 2 at 16 fps -> 33 frames"),
        "{}",
        o.stderr
    );
    assert_refused(&demo(&["--seconds", "60"]), &["seconds: 60", "at most"]);
    assert_refused(&demo(&["--seconds=-1"]), &["seconds"]);
}

#[test]
fn frames_and_seconds_are_exclusive() {
    assert_refused(
        &demo(&["--frames", "17", "--seconds", "1"]),
        &["frames/seconds", "not both"],
    );
}

#[test]
fn steps_range() {
    assert_refused(&demo(&["--steps", "0"]), &["steps: 0", "1..=100"]);
    assert_refused(&demo(&["--steps", "101"]), &["steps: 101", "1..=100"]);
}

#[test]
fn guidance_range() {
    assert_refused(
        &demo(&["--guidance", "0.5"]),
        &["guidance: 0.5", "1.0..=30.0"],
    );
    assert_refused(
        &demo(&["--guidance", "31"]),
        &["guidance: 31", "1.0..=30.0"],
    );
    assert_refused(&demo(&["--guidance", "NaN"]), &["guidance: NaN"]);
}

#[test]
fn guidance_2_needs_two_experts() {
    assert_refused(
        &demo(&["--guidance-2", "3"]),
        &["guidance_2", "single expert", "A14B"],
    );
    let tmp = tempfile::tempdir().unwrap();
    t2v_a14b(tmp.path());
    let model = tmp.path().to_str().unwrap();
    let o = vidgen(&[
        "--model",
        model,
        "--prompt",
        "a cat",
        "--guidance-2",
        "2.5",
        "--dry-run",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout
            .contains("guidance 4 (high noise) / 2.5 (low noise)"),
        "{}",
        o.stdout
    );
    let o = vidgen(&["--model", model, "--prompt", "a cat", "--guidance-2", "40"]);
    assert_refused(&o, &["guidance_2: 40", "1.0..=30.0"]);
}

#[test]
fn scheduler_names() {
    assert_refused(
        &demo(&["--scheduler", "ddim"]),
        &["scheduler:", "ddim", "unipc, euler, dpm++"],
    );
    let o = demo(&["--scheduler", "dpm++", "--dry-run"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
}

#[test]
fn output_extension() {
    assert_refused(
        &demo(&["--output", "clip.avi"]),
        &["output:", "avi", ".mp4", ".webm"],
    );
    assert_refused(&demo(&["--output", "clip"]), &["output:", ".mp4", ".webm"]);
    assert_refused(
        &demo(&["--output", "/nonexistent-dir/clip.mp4"]),
        &["output:", "does not exist"],
    );
    let o = demo(&["--output", "clip.WEBM", "--dry-run"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
}

#[test]
fn image_must_exist_and_be_an_image() {
    assert_refused(
        &demo(&["--image", "/nonexistent/photo.jpg"]),
        &["image:", "/nonexistent/photo.jpg", "does not exist"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("notes.png");
    write(&junk, b"this is text, not a picture");
    assert_refused(
        &demo(&["--image", junk.to_str().unwrap()]),
        &["image", "JPEG, PNG, WebP"],
    );
    let good = tmp.path().join("tiny.png");
    write(&good, TINY_PNG);
    let o = demo(&["--image", good.to_str().unwrap(), "--dry-run"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("image "), "{}", o.stdout);
}

#[test]
fn image_on_a_text_to_video_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("Wan2.1-T2V-1.3B");
    t2v_1_3b(&model_dir);
    let image = tmp.path().join("tiny.png");
    write(&image, TINY_PNG);
    let model = model_dir.to_str().unwrap();
    let o = vidgen(&[
        "--model",
        model,
        "--prompt",
        "a cat",
        "--image",
        image.to_str().unwrap(),
    ]);
    assert_refused(&o, &["image:", "wan2.1-t2v-1.3b", "text-to-video"]);
}

#[test]
fn prompt_must_be_non_empty_and_bounded() {
    let o = vidgen(&["--model", "demo", "--prompt", "   "]);
    assert_refused(&o, &["prompt:", "empty"]);
    let long = "a".repeat(2001);
    let o = vidgen(&["--model", "demo", "--prompt", &long]);
    assert_refused(&o, &["prompt:", "2001 characters", "2000"]);
    let o = demo(&["--negative-prompt", &long]);
    assert_refused(&o, &["negative_prompt", "2000"]);
}

#[test]
fn model_is_required_and_checked() {
    assert_refused(
        &vidgen(&["--prompt", "a cat"]),
        &["model:", "--model DIR", "demo"],
    );
    let tmp = tempfile::tempdir().unwrap();
    let o = vidgen(&[
        "--model",
        tmp.path().join("nope").to_str().unwrap(),
        "--prompt",
        "a cat",
    ]);
    assert_refused(&o, &["model:", "does not exist"]);
    // An incomplete download: the error lists what is missing and what is there.
    ti2v_5b(tmp.path());
    std::fs::remove_file(tmp.path().join("models_t5_umt5-xxl-enc-bf16.pth")).unwrap();
    let o = vidgen(&["--model", tmp.path().to_str().unwrap(), "--prompt", "a cat"]);
    assert_refused(
        &o,
        &[
            "missing: models_t5_umt5-xxl-enc-bf16.pth",
            "found: ",
            "Wan2.2_VAE.pth",
        ],
    );
    // demo takes no component files.
    let o = demo(&["--vae", tmp.path().join("Wan2.2_VAE.pth").to_str().unwrap()]);
    assert_refused(&o, &["model:", "demo"]);
}

#[test]
fn other_flags() {
    assert_refused(
        &demo(&["--quality-guard", "strict"]),
        &["quality-guard", "fail, warn, off"],
    );
    assert_refused(&demo(&["--device", "tpu"]), &["--device", "cpu"]);
    assert_refused(&demo(&["--fps", "0"]), &["fps: 0"]);
    assert_refused(&demo(&["--shift", "0"]), &["shift: 0"]);
    assert_refused(
        &demo(&["--offload", "gpu"]),
        &[
            "--offload",
            "none, cond, cond-diffusion, aggressive, stream, auto",
        ],
    );
    assert_refused(&demo(&["--vram-budget", "lots"]), &["--vram-budget", "GiB"]);
    assert_refused(&demo(&["--prefetch", "0"]), &["--prefetch"]);
    assert_refused(
        &vidgen(&["--model", "random:wan9", "--prompt", "x"]),
        &["model", "wan2.2-t2v-a14b"],
    );
}

#[test]
fn usage_errors_exit_2() {
    let o = demo(&["--no-such-flag"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    let o = demo(&["--steps", "many"]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    let o = vidgen(&["--model", "demo"]);
    assert_eq!(o.code, 2, "missing --prompt: {}", o.stderr);
}

#[test]
fn dry_run_shows_defaults_from_the_model() {
    let o = demo(&["--dry-run", "--seed", "42"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stderr.contains("random weights") && o.stderr.contains("--model"),
        "{}",
        o.stderr
    );
    assert!(
        o.stdout.contains("demo: 256x256, 17 frames at 16 fps (1.06 s), 8 steps (unipc, shift 5), guidance 5, seed 42 -> vidgen-42.mp4"),
        "{}",
        o.stdout
    );
    let tmp = tempfile::tempdir().unwrap();
    t2v_a14b(tmp.path());
    let o = vidgen(&[
        "--model",
        tmp.path().to_str().unwrap(),
        "--prompt",
        "a cat",
        "--dry-run",
        "--seed",
        "1",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(
        o.stdout.contains("wan2.2-t2v-a14b: 1280x720, 81 frames at 16 fps (5.06 s), 40 steps (unipc, shift 12), guidance 4 (high noise) / 3 (low noise), seed 1"),
        "{}",
        o.stdout
    );
}

#[test]
fn json_dry_run_emits_json_lines() {
    let o = demo(&[
        "--json",
        "--dry-run",
        "--frames",
        "18",
        "--align-frames",
        "--seed",
        "5",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let lines: Vec<serde_json::Value> = o
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(lines.len() >= 3, "{}", o.stdout);
    assert!(lines
        .iter()
        .any(|l| l["event"] == "warning"
            && l["message"].as_str().unwrap().contains("random weights")));
    assert!(lines.iter().any(
        |l| l["event"] == "warning" && l["message"].as_str().unwrap().contains("aligned to 17")
    ));
    let last = lines.last().unwrap();
    assert_eq!(last["event"], "resolved");
    assert_eq!(
        (last["frames"].as_u64(), last["seed"].as_u64()),
        (Some(17), Some(5))
    );
    assert_eq!(last["output"], "vidgen-5.mp4");
}
