//! Image conditioning vs diffusers' WanImageToVideoPipeline (tools/fixtures/gen_cond.py): the
//! conditioning tensors themselves, and whole conditioned denoise loops through run-component.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use vidgen_engine::component::{self, ComponentOptions, Inputs, Settings};
use vidgen_engine::denoise::i2v_condition;
use vidgen_engine::tensor_util::rel_err;
use vidgen_engine::vae::WanVae;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/cond")
        .join(name)
}

fn io(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("io.safetensors"), &Device::Cpu).unwrap()
}

fn check(what: &str, ours: &Tensor, reference: &Tensor, tol: f64) {
    let e = rel_err(ours, reference).unwrap();
    println!("{what}: rel err {e:.3e}");
    assert!(e <= tol, "{what}: rel err {e:.3e} > {tol:.0e}");
}

fn vae() -> WanVae {
    WanVae::load(&fixture("i2v_a14b/vae"), &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn i2v_condition_equals_diffusers() {
    let io = io("i2v_a14b");
    let image = io["image"].unsqueeze(0).unwrap().unsqueeze(2).unwrap(); // [1, 3, 1, H, W]
    let (_, _, _, h, w) = image.dims5().unwrap();
    let frames = 9;
    let zeros = Tensor::zeros((1, 3, frames - 1, h, w), DType::F32, &Device::Cpu).unwrap();
    let video = Tensor::cat(&[&image, &zeros], 2).unwrap();
    let vae = vae();
    let latents = vae.normalize(&vae.encode_mean(&video).unwrap()).unwrap();
    let cond = i2v_condition(&latents).unwrap();
    check(
        "I2V condition (mask + image latents)",
        &cond,
        &io["condition"],
        1e-4,
    );
}

#[test]
fn ti2v_first_frame_latent_equals_diffusers() {
    let io = io("ti2v");
    let image = io["image"].unsqueeze(0).unwrap().unsqueeze(2).unwrap();
    let vae = vae();
    let z = vae.normalize(&vae.encode_mean(&image).unwrap()).unwrap();
    check("TI2V first-frame latent", &z, &io["condition"], 1e-4);
}

fn denoise(name: &str, settings: &[(&str, &str)]) {
    let io = io(name);
    let reference = io["output"].clone();
    let inputs = Inputs::new("io.safetensors", io);
    let opts = ComponentOptions {
        settings: Settings::from_pairs(settings),
        ..ComponentOptions::cpu_f32()
    };
    let out = component::run("denoise", &fixture(name), &inputs, &opts).unwrap();
    check(
        &format!("{name} conditioned denoise"),
        &out[0].1,
        &reference,
        1e-3,
    );
}

#[test]
fn i2v_a14b_conditioned_denoise() {
    denoise(
        "i2v_a14b",
        &[
            ("steps", "5"),
            ("guidance_scale", "4.0"),
            ("guidance_scale_2", "3.0"),
        ],
    );
}

#[test]
fn ti2v_first_frame_conditioned_denoise() {
    denoise("ti2v", &[("steps", "5"), ("guidance_scale", "4.0")]);
}
