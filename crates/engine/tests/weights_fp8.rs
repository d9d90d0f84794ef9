//! FP8 e4m3fn storage against torch's float8_e4m3fn (tools/fixtures/gen_weights.py), and the
//! ComfyUI scaled-fp8 view over safetensors checkpoints written by torch.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use vidgen_engine::error::is_invalid_input;
use vidgen_engine::rng::gaussian_noise;
use vidgen_engine::tensor_util::{max_abs_diff, rel_err};
use vidgen_engine::weights::fp8::{Fp8Granularity, Fp8Linear, Fp8Weight, ScaledFp8Source};
use vidgen_engine::weights::{MemorySource, SafetensorsSource, TensorSource, WeightMap};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/weights"
    ))
    .join(name)
}

fn reference() -> SafetensorsSource {
    SafetensorsSource::open(&fixture("fp8_ref.safetensors")).unwrap()
}

fn load(src: &dyn TensorSource, key: &str) -> Tensor {
    src.load(key, &Device::Cpu).unwrap()
}

/// f32 bit patterns of FP8 values: equal bits <=> equal FP8 codes (no NaNs here).
fn fp8_bits(t: &Tensor) -> Vec<u32> {
    assert_eq!(t.dtype(), DType::F8E4M3);
    let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    v.to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|f| f.to_bits())
        .collect()
}

/// torch's FP8 bytes (stored as u8) as an F8E4M3 tensor.
fn torch_fp8(bytes: &Tensor) -> Tensor {
    let raw = bytes.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    Tensor::from_raw_buffer(&raw, DType::F8E4M3, bytes.dims(), &Device::Cpu).unwrap()
}

#[test]
fn conversion_rounds_like_torch_on_every_case() {
    let r = reference();
    let x = load(&r, "convert.input");
    let ours = x.to_dtype(DType::F8E4M3).unwrap();
    let theirs = torch_fp8(&load(&r, "convert.bytes"));
    let (a, b) = (fp8_bits(&ours), fp8_bits(&theirs));
    let inputs = x.to_vec1::<f32>().unwrap();
    let mismatches: Vec<_> = (0..a.len())
        .filter(|&i| a[i] != b[i])
        .map(|i| (inputs[i], f32::from_bits(a[i]), f32::from_bits(b[i])))
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} cases differ: {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(8)]
    );
    assert!(a.len() > 900, "{} cases", a.len());
}

#[test]
fn quantize_matches_torch_bytes_and_scales() {
    let r = reference();
    let w = load(&r, "quant.weight");
    for (gran, name) in [
        (Fp8Granularity::PerTensor, "tensor"),
        (Fp8Granularity::PerChannel, "channel"),
    ] {
        let q = Fp8Weight::quantize(&w, gran).unwrap();
        assert_eq!(q.granularity(), gran);
        let scale = load(&r, &format!("quant.{name}.scale"));
        assert_eq!(q.scale().dims(), scale.dims(), "{name}");
        assert_eq!(
            max_abs_diff(q.scale(), &scale).unwrap(),
            0.0,
            "{name} scale"
        );
        let theirs = torch_fp8(&load(&r, &format!("quant.{name}.bytes")));
        assert_eq!(fp8_bits(q.weight()), fp8_bits(&theirs), "{name} bytes");
        let deq = q.dequantize(DType::F32).unwrap();
        let d = max_abs_diff(&deq, &load(&r, &format!("quant.{name}.dequant"))).unwrap();
        assert_eq!(d, 0.0, "{name} dequant");
    }
}

#[test]
fn round_trip_error_per_channel_vs_per_tensor() {
    let dev = Device::Cpu;
    // Gaussian 256x256, and the same with one channel 50x louder (typical of real layers)
    let w = gaussian_noise(7, (256, 256), &dev).unwrap();
    let loud = Tensor::cat(
        &[
            (w.narrow(0, 0, 1).unwrap() * 50.0).unwrap(),
            w.narrow(0, 1, 255).unwrap(),
        ],
        0,
    )
    .unwrap();
    let very_loud = Tensor::cat(
        &[
            (w.narrow(0, 0, 1).unwrap() * 1e4).unwrap(),
            w.narrow(0, 1, 255).unwrap(),
        ],
        0,
    )
    .unwrap();
    let mut quiet = (0.0, 0.0);
    for (label, w) in [
        ("gaussian", &w),
        ("one channel x50", &loud),
        ("one channel x1e4", &very_loud),
    ] {
        // norm-wise over the whole matrix, and over the 255 quiet channels alone
        let err = |g| {
            let d = Fp8Weight::quantize(w, g)
                .unwrap()
                .dequantize(DType::F32)
                .unwrap();
            let quiet = |t: &Tensor| t.narrow(0, 1, 255).unwrap();
            (
                rel_err(&d, w).unwrap(),
                rel_err(&quiet(&d), &quiet(w)).unwrap(),
            )
        };
        let ((pt, pt_quiet), (pc, pc_quiet)) = (
            err(Fp8Granularity::PerTensor),
            err(Fp8Granularity::PerChannel),
        );
        println!(
            "fp8 e4m3 rel err, {label} 256x256: per-tensor {pt:.5} (quiet rows {pt_quiet:.5}), \
             per-channel {pc:.5} (quiet rows {pc_quiet:.5})"
        );
        // 3 mantissa bits: a relative rounding error of at most 2^-4 per normal value, so the
        // norm-wise error stays well below it; per-channel never does worse.
        assert!(pc < 0.0625 && pt < 0.0625, "{label}: {pt} {pc}");
        assert!(
            pc <= pt * 1.02,
            "{label}: per-channel {pc} vs per-tensor {pt}"
        );
        assert!(pc_quiet < 0.0625, "{label}: quiet rows {pc_quiet}");
        quiet = (pt_quiet, pc_quiet);
    }
    // A 1e4 dynamic range pushes the quiet channels into e4m3's subnormals under one scale;
    // per-channel scales keep them at full precision.
    assert!(quiet.0 > 1.5 * quiet.1, "{quiet:?}");
    // bf16 output stays close to the f32 dequantisation
    let q = Fp8Weight::quantize(&w, Fp8Granularity::PerChannel).unwrap();
    let bf = q.dequantize(DType::BF16).unwrap();
    assert_eq!(bf.dtype(), DType::BF16);
    assert!(rel_err(&bf, &q.dequantize(DType::F32).unwrap()).unwrap() < 4e-3);
}

#[test]
fn zero_channels_saturation_and_bad_values() {
    let dev = Device::Cpu;
    let w = Tensor::new(&[[0f32, 0.0, 0.0], [1.0, -2.0, 0.5]], &dev).unwrap();
    let q = Fp8Weight::quantize(&w, Fp8Granularity::PerChannel).unwrap();
    assert_eq!(q.scale().to_vec1::<f32>().unwrap(), [1.0, 2.0 / 448.0]);
    let deq = q.dequantize(DType::F32).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(deq[0], [0.0, 0.0, 0.0]);
    // the channel's extreme maps to exactly ±448 and back
    assert_eq!(deq[1][1], -2.0);
    let nan = Tensor::new(&[1f32, f32::NAN], &dev).unwrap();
    let err = Fp8Weight::quantize(&nan, Fp8Granularity::PerTensor).unwrap_err();
    assert!(err.to_string().contains("NaN or infinite"), "{err}");
    let inf = Tensor::new(&[[1f32, f32::INFINITY]], &dev).unwrap();
    assert!(Fp8Weight::quantize(&inf, Fp8Granularity::PerChannel).is_err());
    // parts: scale shapes [], [1], [out], [out,1] accepted; others refused
    let fp8 = q.weight().clone();
    for s in [
        Tensor::new(0.5f32, &dev).unwrap(),
        Tensor::new(&[0.5f32], &dev).unwrap(),
        Tensor::new(&[0.5f32, 0.25], &dev).unwrap(),
        Tensor::new(&[[0.5f32], [0.25]], &dev).unwrap(),
    ] {
        Fp8Weight::from_parts(fp8.clone(), s).unwrap();
    }
    let err =
        Fp8Weight::from_parts(fp8, Tensor::new(&[1f32, 2.0, 3.0], &dev).unwrap()).unwrap_err();
    assert!(err.to_string().contains("[3]"), "{err}");
    assert!(Fp8Weight::from_parts(w.clone(), Tensor::new(1f32, &dev).unwrap()).is_err());
}

#[test]
fn fp8_linear_equals_dequantized_matmul() {
    let dev = Device::Cpu;
    let w = gaussian_noise(1, (8, 16), &dev).unwrap();
    let b = gaussian_noise(2, 8, &dev).unwrap();
    let x = gaussian_noise(3, (2, 5, 16), &dev).unwrap();
    let q = Fp8Weight::quantize(&w, Fp8Granularity::PerChannel).unwrap();
    let lin = Fp8Linear::new(q.clone(), Some(b.clone())).unwrap();
    let y = lin.forward(&x).unwrap();
    let wd = q.dequantize(DType::F32).unwrap();
    let expect = x
        .broadcast_matmul(&wd.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    assert_eq!(y.dims(), [2, 5, 8]);
    assert!(max_abs_diff(&y, &expect).unwrap() < 1e-5);
    // and close to the unquantised layer
    let exact = x
        .broadcast_matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    let e = rel_err(&y, &exact).unwrap();
    assert!(e < 0.05, "{e}");
    assert!(Fp8Linear::new(q, Some(Tensor::zeros(3, DType::F32, &dev).unwrap())).is_err());
}

fn open_scaled(name: &str, dtype: DType) -> ScaledFp8Source {
    let inner = SafetensorsSource::open(&fixture(name)).unwrap();
    assert!(ScaledFp8Source::detect(&inner));
    ScaledFp8Source::new(Box::new(inner), dtype).unwrap()
}

fn check_against(src: &ScaledFp8Source, reference: &str) {
    let r = SafetensorsSource::open(&fixture(reference)).unwrap();
    let mut ours = src.keys();
    let mut theirs = r.keys();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs, "scales and markers must be hidden");
    for k in &theirs {
        let (o, t) = (load(src, k), load(&r, k));
        assert_eq!(o.dtype(), t.dtype(), "{k}");
        assert_eq!(src.shape(k).unwrap(), t.dims(), "{k}");
        assert_eq!(max_abs_diff(&o, &t).unwrap(), 0.0, "{k}");
    }
}

#[test]
fn comfy_scaled_fp8_old_spelling() {
    let src = open_scaled("scaled_fp8_old.safetensors", DType::F32);
    assert_eq!(src.scaled_count(), 2);
    check_against(&src, "scaled_fp8_old_ref.safetensors");
    let p = "model.diffusion_model.";
    let q = src
        .load_fp8(&format!("{p}blocks.0.self_attn.q.weight"), &Device::Cpu)
        .unwrap()
        .unwrap();
    assert_eq!(q.granularity(), Fp8Granularity::PerTensor);
    assert_eq!(
        src.input_scale(&format!("{p}blocks.0.self_attn.q.weight"))
            .unwrap(),
        Some(0.5)
    );
    assert!(src
        .load_fp8(&format!("{p}blocks.0.norm3.weight"), &Device::Cpu)
        .unwrap()
        .is_none());
    let err = src
        .load(&format!("{p}scaled_fp8"), &Device::Cpu)
        .unwrap_err();
    assert!(err.to_string().contains("bookkeeping"), "{err}");
    // strict loading sees only model tensors
    let wm = WeightMap::plain(
        Box::new(open_scaled("scaled_fp8_old.safetensors", DType::BF16)),
        &Device::Cpu,
        DType::BF16,
    )
    .unwrap();
    let w = wm
        .get(&format!("{p}blocks.0.ffn.0.weight"), &[24, 16])
        .unwrap();
    assert_eq!(w.dtype(), DType::BF16);
    wm.get(&format!("{p}blocks.0.self_attn.q.weight"), &[16, 32])
        .unwrap();
    wm.get(&format!("{p}blocks.0.self_attn.q.bias"), &[16])
        .unwrap();
    wm.get(&format!("{p}blocks.0.norm3.weight"), &[16]).unwrap();
    wm.finish().unwrap();
}

#[test]
fn comfy_scaled_fp8_new_spelling_per_channel() {
    let src = open_scaled("scaled_fp8_new.safetensors", DType::F32);
    check_against(&src, "scaled_fp8_new_ref.safetensors");
    let q = src
        .load_fp8("text.proj.weight", &Device::Cpu)
        .unwrap()
        .unwrap();
    assert_eq!(q.granularity(), Fp8Granularity::PerChannel);
    assert_eq!(src.input_scale("text.proj.weight").unwrap(), Some(2.0));
}

fn memory(entries: Vec<(&str, Tensor)>) -> Box<dyn TensorSource> {
    let map: HashMap<String, Tensor> = entries
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    Box::new(MemorySource::new("mem.safetensors", map))
}

#[test]
fn unsupported_layouts_are_refused_by_name() {
    let dev = Device::Cpu;
    let w = Tensor::zeros((2, 2), DType::F8E4M3, &dev).unwrap();
    let json = |s: &str| Tensor::new(s.as_bytes(), &dev).unwrap();
    let err = ScaledFp8Source::new(
        memory(vec![
            ("a.weight", w.clone()),
            ("a.comfy_quant", json(r#"{"format": "nvfp4"}"#)),
        ]),
        DType::F32,
    )
    .err()
    .unwrap();
    assert!(is_invalid_input(&err));
    assert!(
        err.to_string().contains("a.comfy_quant") && err.to_string().contains("nvfp4"),
        "{err}"
    );
    let err = ScaledFp8Source::new(
        memory(vec![("b.scale_weight", Tensor::new(1f32, &dev).unwrap())]),
        DType::F32,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("no weight `b.weight`"), "{err}");
    let err = ScaledFp8Source::new(
        memory(vec![
            ("c.weight", w.clone()),
            ("c.weight_scale_2", Tensor::new(1f32, &dev).unwrap()),
        ]),
        DType::F32,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("c.weight_scale_2"), "{err}");
    // a blockwise scale fits neither granularity: named at load
    let src = ScaledFp8Source::new(
        memory(vec![
            ("d.weight", w),
            (
                "d.weight_scale",
                Tensor::zeros((1, 2, 2), DType::F32, &dev).unwrap(),
            ),
        ]),
        DType::F32,
    )
    .unwrap();
    let err = src.load("d.weight", &dev).unwrap_err();
    assert!(
        err.to_string().contains("d.weight") && err.to_string().contains("[1, 2, 2]"),
        "{err}"
    );
}
