//! Whole denoise loops vs diffusers' WanPipeline(output_type="latent") (tools/fixtures/gen_dit.py),
//! through the run-component contract.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use vidgen_engine::component::{self, ComponentOptions, Inputs, Settings};
use vidgen_engine::error::is_invalid_input;
use vidgen_engine::tensor_util::rel_err;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/dit")
        .join(name)
}

fn run(pipe: &str, settings: &[(&str, &str)]) -> anyhow::Result<(Tensor, Tensor)> {
    let dir = fixture(pipe);
    let io: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    let reference = io["output"].clone();
    let inputs = Inputs::new("io.safetensors", io);
    let opts = ComponentOptions {
        settings: Settings::from_pairs(settings),
        ..ComponentOptions::cpu_f32()
    };
    let out = component::run("denoise", &dir, &inputs, &opts)?;
    Ok((out[0].1.clone(), reference))
}

#[test]
fn a14b_two_experts_unipc_cfg_switch() {
    // 6 UniPC steps (timesteps 999 937 857 | 750 600 376): 3 high-noise steps at guidance 4,
    // then 3 low-noise steps at guidance 3 (boundary 0.875).
    let (ours, reference) = run(
        "pipe_a14b_unipc",
        &[
            ("steps", "6"),
            ("guidance_scale", "4.0"),
            ("guidance_scale_2", "3.0"),
        ],
    )
    .unwrap();
    let e = rel_err(&ours, &reference).unwrap();
    println!("denoise A14B (6 steps, UniPC, CFG, expert switch): rel err {e:.3e}");
    assert!(e <= 1e-3, "rel err {e:.3e}");
}

#[test]
fn ti2v_expand_timesteps_euler() {
    let (ours, reference) = run(
        "pipe_ti2v_euler",
        &[("steps", "4"), ("guidance_scale", "5.0")],
    )
    .unwrap();
    let e = rel_err(&ours, &reference).unwrap();
    println!("denoise TI2V (4 steps, Euler, per-token timesteps, CFG): rel err {e:.3e}");
    assert!(e <= 1e-3, "rel err {e:.3e}");
}

#[test]
fn the_switch_matters() {
    // Without the boundary (one expert for every step) the result must differ: the test above
    // cannot pass by accident with a wrong expert schedule.
    let (ours, reference) = run(
        "pipe_a14b_unipc",
        &[
            ("steps", "6"),
            ("guidance_scale", "4.0"),
            ("guidance_scale_2", "3.0"),
            ("boundary_ratio", "0.0"),
        ],
    )
    .unwrap();
    let e = rel_err(&ours, &reference).unwrap();
    assert!(
        e > 1e-2,
        "rel err {e:.3e} should be large with the switch disabled"
    );
}

#[test]
fn bad_settings_are_invalid_input() {
    for bad in [
        vec![("steps", "0")],
        vec![("steps", "x")],
        vec![("scheduler", "ddim")],
        vec![("unknown_knob", "1")],
        vec![("boundary_ratio", "1.5")],
    ] {
        let err = run("pipe_a14b_unipc", &bad).unwrap_err();
        assert!(is_invalid_input(&err), "{bad:?}: {err}");
        assert!(err.to_string().contains(bad[0].0), "{bad:?}: {err}");
    }
}
