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
}

#[test]
fn a_budget_too_small_exits_3_with_a_suggestion() {
    let (code, _, err) = plan(&[
        "--model",
        "wan2.2-t2v-a14b",
        "--size",
        "832x480",
        "--frames",
        "81",
        "--vram-budget",
        "4GiB",
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("does not fit") && err.contains("--frames"),
        "{err}"
    );
    let (code, out, err) = plan(&[
        "--model",
        "wan2.2-t2v-a14b",
        "--size",
        "832x480",
        "--vram-budget",
        "12GiB",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("stream") && out.contains("blocks resident"),
        "{out}"
    );
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
    ] {
        let (code, _, err) = plan(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(field), "{args:?}: {err}");
    }
}
