//! `vidgen plan` through the binary: table, JSON, exit codes (0 fits, 3 does not fit, 2 bad input).

use std::process::Command;

fn plan(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vidgen"))
        .arg("plan")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn known_models_plan_with_exact_weights() {
    let (code, out, err) = plan(&[
        "--model",
        "wan2.1-t2v-1.3b",
        "--vram-budget",
        "80GiB",
        "--offload",
        "cond",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let denoise = &v["stages"][1];
    assert_eq!(denoise["stage"], "denoise");
    // 1,418,996,800 bf16 parameters (diffusers' count for this config)
    let gib = denoise["weights_gpu_gib"].as_f64().unwrap();
    assert!(
        (gib - 1_418_996_800.0 * 2.0 / (1u64 << 30) as f64).abs() < 1e-9,
        "{gib}"
    );
    assert_eq!(v["fits"], true);
    // 80 GiB holds the whole-frame decode of 832x480x81 (the reference computation).
    assert_eq!(v["size"], "832x480");
    assert_eq!(v["vae_decode"], "whole frames");
    assert_eq!(v["stages"][2]["placement"], "whole frames");
}

/// `vidgen plan` for A14B T2V at 832x480x81 with `extra` arguments.
fn plan_a14b(extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "--model",
        "wan2.2-t2v-a14b",
        "--size",
        "832x480",
        "--frames",
        "81",
    ];
    args.extend_from_slice(extra);
    plan(&args)
}

#[test]
fn a_budget_too_small_exits_3_with_a_suggestion() {
    // bf16 at 4 GiB: FP8 weights are the first change that fits.
    let (code, _, err) = plan_a14b(&["--vram-budget", "4GiB"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("does not fit") && err.contains("--weights fp8"),
        "{err}"
    );
    // Already FP8 and still too small: fewer frames.
    let (code, _, err) = plan_a14b(&["--weights", "fp8", "--vram-budget", "3GiB"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("does not fit") && err.contains("--frames"),
        "{err}"
    );
    let (code, out, err) = plan_a14b(&["--vram-budget", "12GiB"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("stream") && out.contains("blocks resident"),
        "{out}"
    );
    // Streaming promises bounded memory: the decode is tiled whatever the budget, here in the
    // largest tiles of the ladder with whole chunks (the budget holds them).
    let decode = out.lines().find(|l| l.starts_with("VAE decode")).unwrap();
    assert!(decode.ends_with("tiled 704 px (64 px overlap)"), "{out}");
}

#[test]
fn bad_input_exits_2_naming_the_field() {
    for (args, field) in [
        (vec!["--model", "wan9-giant"], "model"),
        (
            vec!["--model", "wan2.2-ti2v-5b", "--vram-budget", "lots"],
            "--vram-budget",
        ),
        (
            vec!["--model", "wan2.2-ti2v-5b", "--frames", "80"],
            "--frames",
        ),
        (
            vec!["--model", "wan2.2-ti2v-5b", "--size", "1000x700"],
            "--size",
        ),
        (
            vec!["--model", "wan2.2-ti2v-5b", "--offload", "maybe"],
            "--offload",
        ),
        (
            vec!["--model", "wan2.2-ti2v-5b", "--weights", "q3_xs"],
            "--weights",
        ),
    ] {
        let (code, _, err) = plan(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(field), "{args:?}: {err}");
    }
}

/// GGUF block formats: block linears at their GGML block bytes (Q8_0: 34 per 32 values), the rest
/// bf16; a smaller format keeps more blocks resident under the same budget.
#[test]
fn gguf_weight_formats_plan_their_block_bytes() {
    let denoise = |weights: &str, budget: &str| -> serde_json::Value {
        let (code, out, err) = plan(&[
            "--model",
            "wan2.1-t2v-1.3b",
            "--weights",
            weights,
            "--vram-budget",
            budget,
            "--offload",
            "stream",
            "--json",
        ]);
        assert_eq!(code, 0, "{weights}: {err}");
        serde_json::from_str(&out).unwrap()
    };
    // 1.3B: 30 blocks of 8 x 1536^2 + 2 x 1536 x 8960 block-linear values
    let linear: f64 = 30.0 * (8.0 * 1536.0 * 1536.0 + 2.0 * 1536.0 * 8960.0);
    let total: f64 = 1_418_996_800.0;
    let expected = (total - linear) * 2.0 + linear * 34.0 / 32.0;
    let v = denoise("q8_0", "80GiB");
    let host = v["stages"][1]["weights_host_gib"].as_f64().unwrap() * (1u64 << 30) as f64;
    assert!((host - expected).abs() < 1.0, "{host} vs {expected}");
    let q8 = denoise("q8_0", "2GiB")["resident_blocks"].as_u64().unwrap();
    let q4 = denoise("q4_k", "2GiB")["resident_blocks"].as_u64().unwrap();
    let bf16 = denoise("bf16", "2GiB")["resident_blocks"].as_u64().unwrap();
    assert!(bf16 < q8 && q8 < q4, "bf16 {bf16}, q8_0 {q8}, q4_k {q4}");
    let (code, _, err) = plan(&["--model", "wan2.1-t2v-1.3b", "--weights", "gguf"]);
    assert_eq!(code, 2);
    assert!(err.contains("q8_0") && err.contains("q4_k"), "{err}");
}
