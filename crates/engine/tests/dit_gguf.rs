//! GGUF transformers keep their block linears in the file's block encoding and dequantise them per
//! use (block by block). On the DiT fixture, written to GGUF here with candle's quantisers:
//! the quantised-resident forward equals dequantising the same file on load, bit for bit; streamed
//! quantised blocks equal resident ones; the accuracy against the f32 reference is bounded; the
//! weight map stays strict; the planner counts the bytes the model holds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use vidgen_engine::dit::{self, StreamOptions, WanTransformer};
use vidgen_engine::error::is_invalid_input;
use vidgen_engine::memory::{self, DitWeights, WeightFormat};
use vidgen_engine::tensor_util::rel_err;
use vidgen_engine::weights::gguf::{write, GgufTensorOut, GgufValue};
use vidgen_engine::weights::{GgufType, MemorySource, WeightMap};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/dit")
        .join(name)
}

fn is_block_linear(name: &str, t: &Tensor) -> bool {
    memory::is_block_linear(name, t.dims())
}

/// The t2v fixture as a GGUF file: block linears quantised to `ty`, everything else F32 (the 5-D
/// patch embedding included), plus `extra` tensors. Returns the file's path (in `dir`).
fn write_fixture(dir: &Path, ty: GgufType, extra: &[(&str, Tensor, GgufType)]) -> PathBuf {
    let (wm, _) = dit::open_weights(&fixture("t2v/transformer"), &Device::Cpu, DType::F32).unwrap();
    let mut names: Vec<String> = wm.names().cloned().collect();
    names.sort();
    let mut tensors = Vec::new();
    for name in &names {
        let t = wm.get_unchecked(name).unwrap();
        let stored = if is_block_linear(name, &t) {
            ty
        } else {
            GgufType::F32
        };
        tensors.push(GgufTensorOut::from_tensor(name, &t, stored).unwrap());
    }
    for (name, t, stored) in extra {
        tensors.push(GgufTensorOut::from_tensor(name, t, *stored).unwrap());
    }
    let path = dir.join(format!("t2v-{}.gguf", ty.name()));
    let meta = [("general.architecture", GgufValue::String("wan".into()))];
    write(&path, &meta, &tensors).unwrap();
    path
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("t2v/io.safetensors"), &Device::Cpu).unwrap()
}

fn forward(model: &WanTransformer) -> Tensor {
    let io = io();
    let x = &io["hidden_states"];
    let rope = model.rope(x.dims()).unwrap();
    let ctx = model.prepare_context(&io["encoder_hidden_states"]).unwrap();
    model.forward(x, &io["timestep"], &ctx, &rope).unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// Block 0's bytes with its block linears stored as `ty`, from the dense model's (`elem` bytes per
/// value): the block linears' dense bytes replaced by their stored ones, the rest unchanged.
fn quantized_block_bytes(
    cfg: &dit::DitConfig,
    dense_block: usize,
    elem: usize,
    ty: GgufType,
) -> usize {
    let mut bytes = dense_block;
    for (name, shape) in dit::model::weight_shapes(cfg) {
        if name.starts_with("blocks.0.") && memory::is_block_linear(&name, &shape) {
            bytes -= shape.iter().product::<usize>() * elem;
            bytes += ty.storage_bytes(&shape).unwrap();
        }
    }
    bytes
}

/// The same file with every tensor dequantised while loading (the map's switch).
fn dequantized_on_load(path: &Path, dtype: DType) -> WanTransformer {
    let (wm, cfg) = dit::open_weights(path, &Device::Cpu, dtype).unwrap();
    WanTransformer::from_weights(cfg, &wm.with_gguf_blocks(false)).unwrap()
}

/// (a) Kept quantised and dequantised per use == dequantised on load, bit for bit (the same CPU
/// dequantisation, the same cast), for Q8_0, the K-quants and Q4_0, in f32 and bf16.
#[test]
fn quantized_blocks_equal_dequantizing_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let original = bits(&forward(
        &dit::load(&fixture("t2v/transformer"), &Device::Cpu, DType::F32).unwrap(),
    ));
    for ty in [
        GgufType::Q8_0,
        GgufType::Q4_K,
        GgufType::Q5_K,
        GgufType::Q6_K,
        GgufType::Q4_0,
    ] {
        let path = write_fixture(dir.path(), ty, &[]);
        for dtype in [DType::F32, DType::BF16] {
            let kept = dit::load(&path, &Device::Cpu, dtype).unwrap();
            let loaded = dequantized_on_load(&path, dtype);
            // the block linears really are held quantised (the file's bytes, not dense values)
            let expected = quantized_block_bytes(
                kept.config(),
                loaded.block_bytes(),
                dtype.size_in_bytes(),
                ty,
            );
            assert_eq!(kept.block_bytes(), expected, "{ty:?} {dtype:?}");
            assert!(kept.block_bytes() < loaded.block_bytes());
            let a = bits(&forward(&kept));
            assert_eq!(a, bits(&forward(&loaded)), "{ty:?} {dtype:?}");
            if dtype == DType::F32 {
                assert_ne!(a, original, "{ty:?}: quantisation changed nothing");
            }
        }
    }
}

/// (b) Streamed quantised blocks (U8 blocks staged on the host, rebuilt after the upload) compute
/// exactly what the resident quantised model does.
#[test]
fn streamed_quantized_blocks_equal_resident() {
    let dir = tempfile::tempdir().unwrap();
    for ty in [GgufType::Q8_0, GgufType::Q4_K] {
        let path = write_fixture(dir.path(), ty, &[]);
        let resident = dit::load(&path, &Device::Cpu, DType::F32).unwrap();
        let expected = bits(&forward(&resident));
        for (resident_blocks, prefetch) in [(0, 0), (0, 1), (1, 1)] {
            let opts = StreamOptions {
                resident_blocks,
                prefetch,
            };
            let streamed = dit::load_streamed(&path, &Device::Cpu, DType::F32, opts).unwrap();
            // the host copy holds the quantised bytes, block for block
            assert_eq!(streamed.block_bytes(), resident.block_bytes());
            assert_eq!(streamed.weight_bytes(), resident.weight_bytes());
            if resident_blocks == 0 {
                assert_eq!(streamed.streamed_bytes(), resident.block_bytes());
            }
            assert_eq!(bits(&forward(&streamed)), expected, "{ty:?} {opts:?}");
        }
    }
}

/// (c) The accuracy cost against the f32 diffusers reference, beside bf16's.
#[test]
fn gguf_accuracy_on_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let reference = &io()["output"];
    let bf16 = rel_err(
        &forward(&dit::load(&fixture("t2v/transformer"), &Device::Cpu, DType::BF16).unwrap()),
        reference,
    )
    .unwrap();
    let mut errs = Vec::new();
    for ty in [GgufType::Q8_0, GgufType::Q6_K, GgufType::Q4_K] {
        let path = write_fixture(dir.path(), ty, &[]);
        let model = dit::load(&path, &Device::Cpu, DType::F32).unwrap();
        errs.push((ty, rel_err(&forward(&model), reference).unwrap()));
    }
    let shown: Vec<String> = errs
        .iter()
        .map(|(ty, e)| format!("{} {e:.3e}", ty.name()))
        .collect();
    println!(
        "DiT forward rel err vs f32 reference: bf16 {bf16:.3e}, {}",
        shown.join(", ")
    );
    let err = |ty| errs.iter().find(|(t, _)| *t == ty).unwrap().1;
    // Measured: Q8_0 2.8e-3, Q6_K 9.5e-3, Q4_K 4.3e-2 (bf16 compute: 5.4e-3); about twice that
    // is allowed.
    assert!(err(GgufType::Q8_0) < 6e-3, "{errs:?}");
    assert!(err(GgufType::Q6_K) < 2e-2, "{errs:?}");
    assert!(err(GgufType::Q4_K) < 9e-2, "{errs:?}");
    // fewer bits cannot be more accurate
    assert!(err(GgufType::Q8_0) < err(GgufType::Q6_K));
    assert!(err(GgufType::Q6_K) < err(GgufType::Q4_K));
    assert!(err(GgufType::Q8_0) > bf16 / 4.0);
}

/// (d) A quantised tensor the model does not use, or of the wrong shape, is an invalid-input
/// error naming it.
#[test]
fn quantized_tensors_are_strict() {
    let dir = tempfile::tempdir().unwrap();
    let w =
        |rows: usize, cols: usize| Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();

    let extra = [(
        "blocks.0.attn1.to_extra.weight",
        w(256, 256),
        GgufType::Q8_0,
    )];
    let path = write_fixture(dir.path(), GgufType::Q8_0, &extra);
    let err = dit::load(&path, &Device::Cpu, DType::F32).err().unwrap();
    assert!(is_invalid_input(&err), "{err:#}");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("blocks.0.attn1.to_extra.weight") && msg.contains("unexpected"),
        "{msg}"
    );

    // The fixture with its second FFN weight replaced by one of twice the input width.
    let (wm, _) = dit::open_weights(&fixture("t2v/transformer"), &Device::Cpu, DType::F32).unwrap();
    let mut tensors = Vec::new();
    for name in wm.names() {
        let t = wm.get_unchecked(name).unwrap();
        let (t, stored) = if name == "blocks.0.ffn.net.2.weight" {
            (w(256, 512), GgufType::Q4_K)
        } else if is_block_linear(name, &t) {
            (t, GgufType::Q4_K)
        } else {
            (t, GgufType::F32)
        };
        tensors.push(GgufTensorOut::from_tensor(name, &t, stored).unwrap());
    }
    let path = dir.path().join("wrong-shape.gguf");
    write(&path, &[], &tensors).unwrap();
    let err = dit::load(&path, &Device::Cpu, DType::F32).err().unwrap();
    assert!(is_invalid_input(&err), "{err:#}");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("`blocks.0.ffn.net.2.weight`")
            && msg.contains("[256, 512]")
            && msg.contains("[256, 256]"),
        "{msg}"
    );

    // The map hands a quantised tensor out quantised or dequantised, never a dense one quantised.
    let source = vidgen_engine::weights::gguf::GgufSource::open(&path).unwrap();
    let wm = WeightMap::plain(Box::new(source), &Device::Cpu, DType::F32).unwrap();
    let name = "blocks.0.attn1.to_q.weight";
    assert_eq!(wm.quantized_type(name), Some(GgufType::Q4_K));
    let err = wm.get_blocks(name, &[256, 128]).unwrap_err().to_string();
    assert!(err.contains(name) && err.contains("[256, 128]"), "{err}");
    let q = wm.get_blocks(name, &[256, 256]).unwrap();
    assert_eq!(
        bits(&q.dequantize(DType::F32).unwrap()),
        bits(&wm.get(name, &[256, 256]).unwrap())
    );
    let err = wm
        .get_blocks("blocks.0.attn1.to_q.bias", &[256])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blocks.0.attn1.to_q.bias") && err.contains("not kept block-quantised"),
        "{err}"
    );
    let err = wm
        .get_blocks("blocks.9.nothing", &[1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing weight `blocks.9.nothing`"), "{err}");
}

/// (e) The planner's bytes for Q8_0 (shapes only, and measured from the file) against what the
/// loaded model holds.
#[test]
fn planner_counts_the_quantized_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_fixture(dir.path(), GgufType::Q8_0, &[]);
    // bf16 as on the GPU: the planner counts dense tensors in bf16
    let model = dit::load(&path, &Device::Cpu, DType::BF16).unwrap();
    let cfg = model.config().clone();
    let held = model.weight_bytes() as f64;
    let planned = DitWeights::of_config(&cfg, WeightFormat::Gguf(GgufType::Q8_0));
    let measured = DitWeights::of_checkpoint(&path, WeightFormat::Bf16)
        .unwrap()
        .expect("a GGUF file is measured");
    let dense = dit::load(&fixture("t2v/transformer"), &Device::Cpu, DType::BF16)
        .unwrap()
        .weight_bytes() as f64;
    println!(
        "held {held} B (dense bf16 {dense}); planned {} B (block {} vs held {}); measured from \
         the file {} B",
        planned.total,
        planned.largest_block,
        model.block_bytes(),
        measured.total
    );
    for (what, bytes) in [
        ("planned", planned.total as f64),
        ("measured", measured.total as f64),
    ] {
        // The model keeps norms and modulation tables in f32 (the planner: bf16): ~1% here.
        let off = (bytes - held).abs() / held;
        assert!(off < 0.03, "{what} {bytes} vs held {held}: {off:.3}");
    }
    let block_off = (planned.largest_block as f64 - model.block_bytes() as f64).abs()
        / model.block_bytes() as f64;
    assert!(block_off < 0.03, "block: {block_off:.3}");
    assert_eq!(planned, measured, "one block type: shapes and file agree");
    let dense_model = dit::load(&fixture("t2v/transformer"), &Device::Cpu, DType::BF16).unwrap();
    assert_eq!(
        model.block_bytes(),
        quantized_block_bytes(&cfg, dense_model.block_bytes(), 2, GgufType::Q8_0)
    );
    assert_eq!(
        held - model.block_bytes() as f64,
        dense - dense_model.block_bytes() as f64,
        "the rest stays dense"
    );
    // Workspace: the FFN pair in bf16 plus the f32 copy of one of them (256 x 256 each).
    assert_eq!(planned.dequantize_workspace, 2 * 2 * 65536 + 4 * 65536);
    let dense_plan = DitWeights::of_config(&cfg, WeightFormat::Bf16);
    assert_eq!(dense_plan.dequantize_workspace, 0);

    // A model folder's plan: measured when a checkpoint is GGUF (two experts: the larger).
    let folder = fixture("t2v/transformer");
    let of_layout = |dit: &Path, dit_2: Option<&Path>| {
        DitWeights::of_layout(dit, dit_2, &cfg, WeightFormat::Bf16).unwrap()
    };
    assert_eq!(of_layout(&path, None), Some(measured));
    assert_eq!(of_layout(&path, Some(&path)), Some(measured));
    let mixed = of_layout(&path, Some(&folder)).unwrap();
    assert_eq!(mixed.total, dense_plan.total);
    assert_eq!(mixed.dequantize_workspace, measured.dequantize_workspace);
    assert_eq!(of_layout(&folder, None), None);
}

/// Random weights quantised in memory (as `vidgen bench --weights q8_0` does) build the same
/// model as the same bytes read from a GGUF file.
#[test]
fn memory_source_quantized_equals_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_fixture(dir.path(), GgufType::Q8_0, &[]);
    let (wm, cfg) =
        dit::open_weights(&fixture("t2v/transformer"), &Device::Cpu, DType::F32).unwrap();
    let mut dense = HashMap::new();
    let mut quantized = HashMap::new();
    for name in wm.names().cloned().collect::<Vec<_>>() {
        let t = wm.get_unchecked(&name).unwrap();
        if is_block_linear(&name, &t) {
            let q = vidgen_engine::weights::GgufWeight::quantize(&t, GgufType::Q8_0).unwrap();
            quantized.insert(name, q);
        } else {
            dense.insert(name, t);
        }
    }
    let source = MemorySource::new("quantised in memory", dense).with_quantized(quantized);
    let wm = WeightMap::plain(Box::new(source), &Device::Cpu, DType::F32).unwrap();
    let in_memory = WanTransformer::from_weights(cfg, &wm).unwrap();
    let from_file = dit::load(&path, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(in_memory.weight_bytes(), from_file.weight_bytes());
    assert_eq!(bits(&forward(&in_memory)), bits(&forward(&from_file)));
}
