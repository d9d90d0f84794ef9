//! The accuracy cost of smaller weights on the DiT fixture: FP8 e4m3 (per-channel and per-tensor
//! scales) and bf16, each against the f32 diffusers reference. Printed, and bounded so a broken
//! quantiser fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use vidgen_engine::dit::{self, WanTransformer};
use vidgen_engine::tensor_util::rel_err;
use vidgen_engine::weights::fp8::{Fp8Granularity, Fp8Weight};
use vidgen_engine::weights::{MemorySource, WeightMap};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/dit")
        .join(name)
}

/// The t2v model with the weights `select` picks passed through FP8 storage (quantised, then
/// dequantised to f32 outside the model).
fn quantized_outside(
    granularity: Fp8Granularity,
    select: impl Fn(&str, &Tensor) -> bool,
) -> WanTransformer {
    let (wm, cfg) =
        dit::open_weights(&fixture("t2v/transformer"), &Device::Cpu, DType::F32).unwrap();
    let mut tensors = HashMap::new();
    for name in wm.names().cloned().collect::<Vec<_>>() {
        let t = wm.get_unchecked(&name).unwrap();
        let t = if select(&name, &t) {
            Fp8Weight::quantize(&t, granularity)
                .unwrap()
                .dequantize(DType::F32)
                .unwrap()
        } else {
            t
        };
        tensors.insert(name, t);
    }
    let wm = WeightMap::plain(
        Box::new(MemorySource::new("fp8", tensors)),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    WanTransformer::from_weights(cfg, &wm).unwrap()
}

/// The t2v model with every 2-D linear weight passed through FP8 storage.
fn fp8_forward(granularity: Fp8Granularity) -> f64 {
    forward_err(&quantized_outside(granularity, |name, t| {
        t.rank() == 2 && name.ends_with(".weight")
    }))
}

fn forward_err(model: &WanTransformer) -> f64 {
    let io: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture("t2v/io.safetensors"), &Device::Cpu).unwrap();
    let x = &io["hidden_states"];
    let rope = model.rope(x.dims()).unwrap();
    let ctx = model.prepare_context(&io["encoder_hidden_states"]).unwrap();
    let out = model.forward(x, &io["timestep"], &ctx, &rope).unwrap();
    rel_err(&out, &io["output"]).unwrap()
}

#[test]
fn fp8_and_bf16_accuracy_on_fixture() {
    let per_channel = fp8_forward(Fp8Granularity::PerChannel);
    let per_tensor = fp8_forward(Fp8Granularity::PerTensor);
    let bf16 =
        forward_err(&dit::load(&fixture("t2v/transformer"), &Device::Cpu, DType::BF16).unwrap());
    println!("DiT forward rel err vs f32 reference: bf16 {bf16:.3e}, fp8 per-channel {per_channel:.3e}, fp8 per-tensor {per_tensor:.3e}");
    // e4m3 keeps 3 mantissa bits (~2.6% per weight on Gaussians); the forward averages that down.
    assert!(per_channel < 5e-2 && per_tensor < 5e-2);
    assert!(per_channel > bf16, "fp8 cannot be more accurate than bf16");
}

/// The model's own FP8 path (block linears quantised while loading, dequantised per call) equals
/// quantising the checkpoint outside and running the dense model; streamed FP8 blocks equal
/// resident ones; the blocks take the bytes the memory planner counts.
#[test]
fn fp8_block_linears_in_the_model() {
    let path = fixture("t2v/transformer");
    let fp8 = dit::load_with(
        &path,
        &Device::Cpu,
        DType::F32,
        &dit::LoadOptions {
            fp8_linears: true,
            fp8_matmul: false,
            stream: None,
        },
    )
    .unwrap();
    let (_, cfg) = dit::open_weights(&path, &Device::Cpu, DType::F32).unwrap();
    let outside = quantized_outside(Fp8Granularity::PerChannel, |name, t| {
        name.starts_with("blocks.")
            && name.ends_with(".weight")
            && t.rank() == 2
            && (name.contains(".attn") || name.contains(".ffn."))
    });
    let io: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture("t2v/io.safetensors"), &Device::Cpu).unwrap();
    let run = |m: &WanTransformer| -> Vec<f32> {
        let x = &io["hidden_states"];
        let rope = m.rope(x.dims()).unwrap();
        let ctx = m.prepare_context(&io["encoder_hidden_states"]).unwrap();
        m.forward(x, &io["timestep"], &ctx, &rope)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let ours = run(&fp8);
    assert_eq!(
        ours,
        run(&outside),
        "in-model FP8 differs from FP8 applied outside"
    );
    let dense = dit::load(&path, &Device::Cpu, DType::F32).unwrap();
    assert_ne!(ours, run(&dense), "FP8 did not change the weights");

    // An FP8 block holds 1 byte per block-linear weight value plus an f32 scale per output
    // channel, everything else in the model dtype (f32 here); the planner counts the same with
    // the rest in bf16.
    let (mut expected_f32, mut expected_bf16) = (0u64, 0u64);
    for (name, shape) in dit::model::weight_shapes(&cfg) {
        if !name.starts_with("blocks.0.") {
            continue;
        }
        let n = shape.iter().product::<usize>() as u64;
        let linear = name.ends_with(".weight")
            && shape.len() == 2
            && (name.contains(".attn") || name.contains(".ffn."));
        if linear {
            expected_f32 += n + 4 * shape[0] as u64;
            expected_bf16 += n + 4 * shape[0] as u64;
        } else {
            expected_f32 += 4 * n;
            expected_bf16 += 2 * n;
        }
    }
    assert_eq!(fp8.block_bytes() as u64, expected_f32);
    let (_, planned_block) =
        vidgen_engine::memory::dit_weight_bytes(&cfg, vidgen_engine::memory::WeightFormat::Fp8);
    assert_eq!(planned_block, expected_bf16);
    assert!(fp8.block_bytes() < dense.block_bytes() / 3);

    let streamed = dit::load_with(
        &path,
        &Device::Cpu,
        DType::F32,
        &dit::LoadOptions {
            fp8_linears: true,
            fp8_matmul: false,
            stream: Some(dit::StreamOptions {
                resident_blocks: 0,
                prefetch: 1,
            }),
        },
    )
    .unwrap();
    assert_eq!(
        run(&streamed),
        ours,
        "streamed FP8 blocks differ from resident ones"
    );
}

/// FP8 matmuls (`--weights fp8-matmul`) on the fixture: the error against the f32 reference is
/// bounded and printed beside FP8 storage's; streamed blocks give the resident result bit for bit.
#[test]
fn fp8_matmul_accuracy_and_streaming_on_fixture() {
    let path = fixture("t2v/transformer");
    let load = |fp8_matmul: bool, stream: Option<dit::StreamOptions>| {
        dit::load_with(
            &path,
            &Device::Cpu,
            DType::F32,
            &dit::LoadOptions {
                fp8_linears: true,
                fp8_matmul,
                stream,
            },
        )
        .unwrap()
    };
    let storage = forward_err(&load(false, None));
    let matmul_model = load(true, None);
    let matmul = forward_err(&matmul_model);
    println!(
        "DiT forward rel err vs f32 reference: fp8 storage {storage:.3e}, fp8 matmul {matmul:.3e}"
    );
    // Quantising the activations too adds a second e4m3 rounding per product.
    assert!(matmul < 8e-2, "fp8 matmul error {matmul}");
    assert!(matmul != storage, "the FP8 matmul path did not run");

    let io: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixture("t2v/io.safetensors"), &Device::Cpu).unwrap();
    let run = |m: &WanTransformer| -> Vec<f32> {
        let x = &io["hidden_states"];
        let rope = m.rope(x.dims()).unwrap();
        let ctx = m.prepare_context(&io["encoder_hidden_states"]).unwrap();
        m.forward(x, &io["timestep"], &ctx, &rope)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let streamed = load(
        true,
        Some(dit::StreamOptions {
            resident_blocks: 0,
            prefetch: 1,
        }),
    );
    let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
    assert_eq!(
        bits(run(&streamed)),
        bits(run(&matmul_model)),
        "streamed FP8-matmul blocks differ from resident ones"
    );
}
