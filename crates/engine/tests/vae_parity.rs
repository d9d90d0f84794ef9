//! Wan VAE parity with diffusers 0.42.1 `AutoencoderKLWan` on tiny random models of both kinds
//! (tools/fixtures/gen_vae.py), through every loader: diffusers folder, official `.pth`, official
//! names in safetensors (ComfyUI layout), and the `run-component` contract.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use vidgen_engine::component::{self, ComponentOptions, Inputs, Settings};
use vidgen_engine::error::is_invalid_input;
use vidgen_engine::tensor_util::rel_err;
use vidgen_engine::vae::{VaeConfig, WanVae};
use vidgen_engine::weights::pth::PthSource;
use vidgen_engine::weights::TensorSource;

const TOL: f64 = 1e-4;

fn dir(kind: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/vae"
    ))
    .join(kind)
}

fn load_io(kind: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir(kind).join("io.safetensors"), &Device::Cpu).unwrap()
}

fn check(what: &str, ours: &Tensor, reference: &Tensor) {
    let e = rel_err(ours, reference).unwrap();
    println!("{what}: rel err {e:.3e}");
    assert!(e <= TOL, "{what}: rel err {e:.3e} > {TOL:e}");
}

fn encode_decode(kind: &str, model: &Path, label: &str) {
    let io = load_io(kind);
    let vae = WanVae::load(model, &Device::Cpu, DType::F32).unwrap();
    check(
        &format!("{kind} {label} encode"),
        &vae.encode_mean(&io["sample"]).unwrap(),
        &io["latent_mean"],
    );
    check(
        &format!("{kind} {label} decode"),
        &vae.decode(&io["latents"]).unwrap(),
        &io["decoded"],
    );
}

#[test]
fn wan21_diffusers_folder() {
    encode_decode("wan21", &dir("wan21").join("diffusers"), "diffusers");
}

#[test]
fn wan22_diffusers_folder() {
    encode_decode("wan22", &dir("wan22").join("diffusers"), "diffusers");
}

/// Official keys, no config: the architecture (2.1 vs 2.2, dims, patchify, decoder width) is
/// inferred from shapes and must equal the diffusers config.
fn official(kind: &str) {
    let pth = dir(kind).join("official.pth");
    encode_decode(kind, &pth, "official .pth");
    let from_pth = WanVae::load(&pth, &Device::Cpu, DType::F32).unwrap();
    let diffusers = WanVae::load(&dir(kind).join("diffusers"), &Device::Cpu, DType::F32).unwrap();
    let (a, b) = (from_pth.config(), diffusers.config());
    assert_eq!(
        (
            a.base_dim,
            a.decoder_dim(),
            a.z_dim,
            &a.dim_mult,
            a.num_res_blocks,
            a.is_residual,
            a.patch()
        ),
        (
            b.base_dim,
            b.decoder_dim(),
            b.z_dim,
            &b.dim_mult,
            b.num_res_blocks,
            b.is_residual,
            b.patch()
        )
    );
    assert_eq!(a.temperal_downsample, b.temperal_downsample);
    assert_eq!(
        (a.spatial_stride(), a.temporal_stride()),
        (b.spatial_stride(), b.temporal_stride())
    );
}

#[test]
fn wan21_official_pth() {
    official("wan21");
    // Official files carry no config: latent stats are the official Wan2.1 constants.
    let vae = WanVae::load(&dir("wan21").join("official.pth"), &Device::Cpu, DType::F32).unwrap();
    assert_eq!(vae.latents_mean(), &VaeConfig::wan21().latents_mean[..]);
}

#[test]
fn wan22_official_pth() {
    official("wan22");
}

/// Official names in a safetensors file (ComfyUI's `wan_2.1_vae.safetensors` layout), written
/// here from the `.pth` so that the fixtures hold one copy of each model per layout.
#[test]
fn official_names_in_safetensors() {
    for kind in ["wan21", "wan22"] {
        let src = PthSource::open(&dir(kind).join("official.pth")).unwrap();
        let tensors: HashMap<String, Tensor> = src
            .keys()
            .into_iter()
            .map(|k| (k.clone(), src.load(&k, &Device::Cpu).unwrap()))
            .collect();
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("wan_vae.safetensors");
        candle_core::safetensors::save(&tensors, &file).unwrap();
        let io = load_io(kind);
        let vae = WanVae::load(&file, &Device::Cpu, DType::F32).unwrap();
        check(
            &format!("{kind} official safetensors decode"),
            &vae.decode(&io["latents"]).unwrap(),
            &io["decoded"],
        );
    }
}

fn run(
    component_name: &str,
    model: &Path,
    inputs: Vec<(&str, Tensor)>,
    settings: &[(&str, &str)],
) -> anyhow::Result<Tensor> {
    let map = inputs
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let opts = ComponentOptions {
        settings: Settings::from_pairs(settings),
        ..ComponentOptions::cpu_f32()
    };
    let mut out = component::run(
        component_name,
        model,
        &Inputs::new("in.safetensors", map),
        &opts,
    )?;
    assert_eq!(out.len(), 1);
    Ok(out.remove(0).1)
}

/// The `run-component` contract: names, shapes, official-layout folder, and caller errors.
#[test]
fn run_component_contract() {
    let io = load_io("wan22");
    let model = dir("wan22").join("diffusers");
    let mean = run(
        "vae-encode",
        &model,
        vec![("sample", io["sample"].clone())],
        &[],
    )
    .unwrap();
    check(
        "wan22 run-component vae-encode latent_mean",
        &mean,
        &io["latent_mean"],
    );
    // An official-layout folder: the folder holding the official file (here via a copy).
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir("wan21").join("official.pth"),
        tmp.path().join("Wan2.1_VAE.pth"),
    )
    .unwrap();
    let io21 = load_io("wan21");
    let sample = run(
        "vae-decode",
        tmp.path(),
        vec![("latents", io21["latents"].clone())],
        &[],
    )
    .unwrap();
    check(
        "wan21 run-component vae-decode sample (official folder)",
        &sample,
        &io21["decoded"],
    );

    // Caller errors are InvalidInput and name the field.
    let bad = Tensor::zeros((1, 16, 2, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let err = run("vae-decode", &model, vec![("latents", bad)], &[]).unwrap_err();
    assert!(
        is_invalid_input(&err) && err.to_string().contains("latents"),
        "{err}"
    );
    let err = run(
        "vae-decode",
        &model,
        vec![("sample", io["sample"].clone())],
        &[],
    )
    .unwrap_err();
    assert!(
        is_invalid_input(&err) && err.to_string().contains("`latents`"),
        "{err}"
    );
    let odd = Tensor::zeros((1, 3, 5, 24, 40), DType::F32, &Device::Cpu).unwrap();
    let err = run("vae-encode", &model, vec![("sample", odd)], &[]).unwrap_err();
    assert!(
        is_invalid_input(&err) && err.to_string().contains("multiples of"),
        "{err}"
    );
    let err = run(
        "vae-decode",
        &model,
        vec![("latents", io["latents"].clone())],
        &[("tile_size", "100")],
    )
    .unwrap_err();
    assert!(
        is_invalid_input(&err) && err.to_string().contains("tile_size"),
        "{err}"
    );
    let err = run(
        "vae-decode",
        &model,
        vec![("latents", io["latents"].clone())],
        &[("tiles", "1")],
    )
    .unwrap_err();
    assert!(
        is_invalid_input(&err) && err.to_string().contains("tile_overlap"),
        "{err}"
    );
}

/// Strict keys: a checkpoint with a missing or an extra tensor is rejected, naming it.
#[test]
fn strict_keys() {
    let src = PthSource::open(&dir("wan21").join("official.pth")).unwrap();
    let mut tensors: HashMap<String, Tensor> = src
        .keys()
        .into_iter()
        .map(|k| (k.clone(), src.load(&k, &Device::Cpu).unwrap()))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("vae.safetensors");

    tensors.insert(
        "decoder.extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = WanVae::load(&file, &Device::Cpu, DType::F32).err().unwrap();
    assert!(
        is_invalid_input(&err) && format!("{err:#}").contains("decoder.extra.weight"),
        "{err:#}"
    );

    tensors.remove("decoder.extra.weight");
    tensors.remove("decoder.upsamples.4.shortcut.bias");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = WanVae::load(&file, &Device::Cpu, DType::F32).err().unwrap();
    assert!(
        is_invalid_input(&err)
            && format!("{err:#}").contains("up_blocks.1.resnets.0.conv_shortcut.bias"),
        "{err:#}"
    );
}

/// The weight list matches the diffusers checkpoint exactly, and the random demo weights load.
#[test]
fn expected_weights_and_random_model() {
    let text = std::fs::read_to_string(dir("wan22").join("diffusers/config.json")).unwrap();
    let cfg = VaeConfig::from_json(&text, "config.json").unwrap();
    let expected = WanVae::expected_weights(&cfg).unwrap();
    let stored = candle_core::safetensors::load(
        dir("wan22").join("diffusers/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(expected.len(), stored.len());
    for (name, shape) in &expected {
        assert_eq!(stored[name].dims(), shape.as_slice(), "{name}");
    }
    let vae = WanVae::random(cfg, 7, &Device::Cpu, DType::F32).unwrap();
    let z = Tensor::randn(0f32, 1.0, (1, 48, 2, 2, 2), &Device::Cpu).unwrap();
    let video = vae.decode(&z).unwrap();
    assert_eq!(video.dims(), &[1, 3, 5, 32, 32]);
    // normalise/denormalise are inverse per channel
    let back = vae.normalize(&vae.denormalize(&z).unwrap()).unwrap();
    assert!(rel_err(&back, &z).unwrap() < 1e-6);
}

/// `--dtype bf16` on CPU runs in f32 (candle has no CPU bf16 matmul; the official VAE is f32), so
/// it matches the reference as f32 does; on GPU bf16 is used as asked.
#[test]
fn bf16_on_cpu_computes_in_f32() {
    let io = load_io("wan21");
    let vae = WanVae::load(&dir("wan21").join("diffusers"), &Device::Cpu, DType::BF16).unwrap();
    assert_eq!(vae.dtype(), DType::F32);
    check(
        "wan21 --dtype bf16 on CPU decode",
        &vae.decode(&io["latents"]).unwrap(),
        &io["decoded"],
    );
}

/// The decoder's full-resolution levels may take a chunk's frames in passes of any size (0, the
/// default, is the reference's whole chunk): every pass size gives the reference's result, and on
/// the CPU the very same bits, for both VAE kinds.
#[test]
fn decode_pass_frames_do_not_change_the_result() {
    for kind in ["wan21", "wan22"] {
        let io = load_io(kind);
        let mut vae = WanVae::load(&dir(kind).join("diffusers"), &Device::Cpu, DType::F32).unwrap();
        assert_eq!(vae.decode_pass_frames(), 0);
        let whole = vae.decode(&io["latents"]).unwrap();
        check(
            &format!("{kind} decode, whole chunks"),
            &whole,
            &io["decoded"],
        );
        for frames in [1, 2, 3] {
            vae.set_decode_pass_frames(frames);
            let split = vae.decode(&io["latents"]).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                values.into_iter().map(f32::to_bits).collect()
            };
            let (a, b) = (bits(&whole), bits(&split));
            assert_eq!(a.len(), b.len());
            let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            assert_eq!(
                differing, 0,
                "{kind}: passes of {frames} frames change {differing} values"
            );
        }
    }
}
