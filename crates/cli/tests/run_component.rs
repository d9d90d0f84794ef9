//! `vidgen run-component`: the contract through the real binary (exit codes, outputs).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn vidgen(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vidgen"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    vidgen_engine::tensor_util::rel_err(a, b).unwrap()
}

#[test]
fn dit_and_denoise_outputs_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let dit = fixtures().join("dit/t2v");
    let (code, err) = vidgen(&[
        "run-component",
        "dit",
        "--model",
        dit.join("transformer").to_str().unwrap(),
        "--inputs",
        dit.join("io.safetensors").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let ours = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let io = candle_core::safetensors::load(dit.join("io.safetensors"), &Device::Cpu).unwrap();
    let e = rel_err(&ours["output"], &io["output"]);
    println!("run-component dit: rel err {e:.3e}");
    assert!(e <= 1e-4);

    let pipe = fixtures().join("dit/pipe_a14b_unipc");
    let (code, err) = vidgen(&[
        "run-component",
        "denoise",
        "--model",
        pipe.to_str().unwrap(),
        "--inputs",
        pipe.join("io.safetensors").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--set",
        "steps=6",
        "guidance_scale=4",
        "guidance_scale_2=3",
    ]);
    assert_eq!(code, 0, "{err}");
    let ours: HashMap<String, Tensor> = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let io = candle_core::safetensors::load(pipe.join("io.safetensors"), &Device::Cpu).unwrap();
    let e = rel_err(&ours["latents"], &io["output"]);
    println!("run-component denoise: rel err {e:.3e}");
    assert!(e <= 1e-3);
}

#[test]
fn contract_errors_exit_2_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let dit = fixtures().join("dit/t2v");
    let model = dit.join("transformer");
    let good_inputs = dit.join("io.safetensors");

    // inputs missing a tensor, and with a wrong rank
    let io = candle_core::safetensors::load(&good_inputs, &Device::Cpu).unwrap();
    let mut missing = io.clone();
    missing.remove("timestep");
    let missing_path = dir.path().join("missing.safetensors");
    candle_core::safetensors::save(&missing, &missing_path).unwrap();
    let mut wrong = io.clone();
    wrong.insert(
        "hidden_states".into(),
        io["hidden_states"].flatten_from(3).unwrap(),
    );
    let wrong_path = dir.path().join("wrong.safetensors");
    candle_core::safetensors::save(&wrong, &wrong_path).unwrap();
    let mut channels = io.clone();
    channels.insert(
        "hidden_states".into(),
        io["hidden_states"].narrow(1, 0, 4).unwrap(),
    );
    let channels_path = dir.path().join("channels.safetensors");
    candle_core::safetensors::save(&channels, &channels_path).unwrap();

    let m = model.to_str().unwrap();
    let o = out.to_str().unwrap();
    let g = good_inputs.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "run-component",
                "unet",
                "--model",
                m,
                "--inputs",
                g,
                "--output",
                o,
            ],
            "unet",
        ),
        (
            vec![
                "run-component",
                "dit",
                "--model",
                m,
                "--inputs",
                missing_path.to_str().unwrap(),
                "--output",
                o,
            ],
            "`timestep`",
        ),
        (
            vec![
                "run-component",
                "dit",
                "--model",
                m,
                "--inputs",
                wrong_path.to_str().unwrap(),
                "--output",
                o,
            ],
            "hidden_states",
        ),
        (
            vec![
                "run-component",
                "dit",
                "--model",
                m,
                "--inputs",
                channels_path.to_str().unwrap(),
                "--output",
                o,
            ],
            "in_channels",
        ),
        (
            vec![
                "run-component",
                "dit",
                "--model",
                m,
                "--inputs",
                g,
                "--output",
                o,
                "--set",
                "steps=3",
            ],
            "`steps`",
        ),
        (
            vec![
                "run-component",
                "dit",
                "--model",
                "/nonexistent",
                "--inputs",
                g,
                "--output",
                o,
            ],
            "--model",
        ),
        (
            vec![
                "run-component",
                "dit",
                "--model",
                m,
                "--inputs",
                g,
                "--output",
                o,
                "--dtype",
                "f8",
            ],
            "--dtype",
        ),
    ];
    for (args, needle) in cases {
        let (code, err) = vidgen(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: `{needle}` not in {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "{args:?} left an output behind");
    }
}
