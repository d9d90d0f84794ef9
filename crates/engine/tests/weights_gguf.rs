//! GGUF reader against files written by gguf-py (tools/fixtures/gen_weights.py); quantised
//! tensors are compared with gguf-py's own dequantisation.

use std::path::PathBuf;

use candle_core::{DType, Device};
use vidgen_engine::error::is_invalid_input;
use vidgen_engine::tensor_util::max_abs_diff;
use vidgen_engine::weights::gguf::{dequantize, GgufSource, GgufType, GgufValue};
use vidgen_engine::weights::{SafetensorsSource, TensorSource};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/weights"
    ))
    .join(name)
}

fn tiny() -> GgufSource {
    GgufSource::open(&fixture("tiny.gguf")).unwrap()
}

#[test]
fn header_metadata_and_shapes() {
    let g = tiny();
    assert_eq!(g.version(), 3);
    assert_eq!(g.architecture(), Some("wan"));
    let md = g.metadata();
    assert_eq!(md["test.u32"], GgufValue::U32(7));
    assert_eq!(md["test.f32"], GgufValue::F32(0.25));
    assert_eq!(md["test.bool"], GgufValue::Bool(true));
    assert_eq!(
        md["test.strings"],
        GgufValue::Array(vec![
            GgufValue::String("a".into()),
            GgufValue::String("bc".into())
        ])
    );
    // PyTorch order, including the 5-D patch embedding
    assert_eq!(g.shape("patch_embedding.weight").unwrap(), [8, 4, 1, 2, 2]);
    assert_eq!(g.shape("blocks.0.modulation").unwrap(), [1, 6, 8]);
    assert_eq!(g.shape("blocks.0.ffn.Q4_0.weight").unwrap(), [6, 64]);
    assert_eq!(g.shape("blocks.0.attn.Q6_K.weight").unwrap(), [2, 512]);
    let info = g.tensor_info("blocks.0.attn.Q4_K.weight").unwrap();
    assert_eq!(info.ggml_type, GgufType::Q4_K);
    assert_eq!(g.keys().len(), 16);
}

#[test]
fn every_tensor_matches_gguf_py() {
    let g = tiny();
    let reference = SafetensorsSource::open(&fixture("tiny_gguf_ref.safetensors")).unwrap();
    let mut ours = g.keys();
    let mut theirs = reference.keys();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
    let mut worst = 0f64;
    for key in &theirs {
        let r = reference.load(key, &Device::Cpu).unwrap();
        let o = g.load(key, &Device::Cpu).unwrap();
        assert_eq!(o.dims(), r.dims(), "{key}");
        assert_eq!(o.dtype(), r.dtype(), "{key}");
        let d = max_abs_diff(&o, &r).unwrap();
        let scale = max_abs_diff(&r, &r.zeros_like().unwrap()).unwrap();
        worst = worst.max(d / scale.max(1e-30));
        // candle's per-block kernels and gguf-py both compute in f32: bit-identical is expected,
        // 1e-6 relative to the tensor's range is the bound
        assert!(d <= 1e-6 * scale, "{key}: max abs diff {d} (range {scale})");
    }
    println!("worst max-abs-diff / range over all tensors: {worst:e}");
    // quantised tensors come out as f32, plain ones in their stored dtype
    let dtype = |k: &str| g.load(k, &Device::Cpu).unwrap().dtype();
    assert_eq!(dtype("blocks.0.attn.Q5_K.weight"), DType::F32);
    assert_eq!(dtype("head.f16"), DType::F16);
    assert_eq!(dtype("head.bf16"), DType::BF16);
    assert_eq!(dtype("head.i32"), DType::I32);
}

#[test]
fn quantized_load_keeps_blocks() {
    let g = tiny();
    for key in ["blocks.0.attn.Q4_K.weight", "blocks.0.ffn.Q8_0.weight"] {
        let q = g.load_quantized(key, &Device::Cpu).unwrap();
        assert_eq!(q.shape().dims(), g.shape(key).unwrap().as_slice());
        let d = max_abs_diff(
            &q.dequantize(&Device::Cpu).unwrap(),
            &g.load(key, &Device::Cpu).unwrap(),
        )
        .unwrap();
        assert_eq!(d, 0.0, "{key}");
    }
    assert!(g.load_quantized("head.i32", &Device::Cpu).is_err());
}

/// The multi-threaded path (many blocks) gives the same values as one small call, block for block.
#[test]
fn large_tensors_dequantize_block_by_block() {
    let g = tiny();
    for (key, ty) in [
        ("blocks.0.ffn.Q5_1.weight", GgufType::Q5_1),
        ("blocks.0.attn.Q3_K.weight", GgufType::Q3_K),
    ] {
        let small = g
            .load(key, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (_, block_bytes) = ty.block();
        let n_blocks = small.len() / ty.block().0;
        let raw = raw_bytes(&g, key);
        assert_eq!(raw.len(), n_blocks * block_bytes);
        let copies = 3001;
        let big = dequantize(ty, &raw.repeat(copies)).unwrap();
        assert_eq!(big.len(), small.len() * copies);
        for (i, chunk) in big.chunks(small.len()).enumerate() {
            assert_eq!(chunk, small.as_slice(), "{key}: copy {i}");
        }
    }
}

/// The stored bytes of `key`, read straight from the file at the offset the reader computed.
fn raw_bytes(g: &GgufSource, key: &str) -> Vec<u8> {
    let file = std::fs::read(fixture("tiny.gguf")).unwrap();
    let info = g.tensor_info(key).unwrap();
    file[info.data_offset()..info.data_offset() + info.data_len()].to_vec()
}

#[test]
fn version_2_reads_and_bad_files_are_refused() {
    let bytes = std::fs::read(fixture("tiny.gguf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, b: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, b).unwrap();
        p
    };
    // v2 differs from v3 only in the version field for little-endian files
    let mut v2 = bytes.clone();
    v2[4..8].copy_from_slice(&2u32.to_le_bytes());
    let g = GgufSource::open(&write("v2.gguf", &v2)).unwrap();
    assert_eq!(g.version(), 2);
    assert_eq!(g.shape("patch_embedding.weight").unwrap(), [8, 4, 1, 2, 2]);

    let mut v1 = bytes.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    let err = GgufSource::open(&write("v1.gguf", &v1)).err().unwrap();
    assert!(
        is_invalid_input(&err) && err.to_string().contains("version 1"),
        "{err}"
    );

    let mut be = bytes.clone();
    be[4..8].copy_from_slice(&3u32.to_be_bytes());
    let err = GgufSource::open(&write("be.gguf", &be)).err().unwrap();
    assert!(err.to_string().contains("big-endian"), "{err}");

    let err = GgufSource::open(&write("cut.gguf", &bytes[..bytes.len() - 100]))
        .err()
        .unwrap();
    assert!(err.to_string().contains("extends past the end"), "{err}");
    let err = GgufSource::open(&write("cut2.gguf", &bytes[..200]))
        .err()
        .unwrap();
    assert!(err.to_string().contains("truncated"), "{err}");

    let err = GgufSource::open(&fixture("basic.pth")).err().unwrap();
    assert!(err.to_string().contains("not a GGUF file"), "{err}");
}

#[test]
fn unsupported_block_type_names_the_tensor() {
    let mut bytes = std::fs::read(fixture("tiny.gguf")).unwrap();
    // The Q4_1 tensor's table entry: its name, then n_dims (u32), 2 dims (u64), type id (u32).
    let name = b"blocks.0.ffn.Q4_1.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let type_at = at + 4 + 2 * 8;
    assert_eq!(
        u32::from_le_bytes(bytes[type_at..type_at + 4].try_into().unwrap()),
        3
    );
    bytes[type_at..type_at + 4].copy_from_slice(&23u32.to_le_bytes()); // IQ4_XS
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("iq.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let err = GgufSource::open(&p).err().unwrap().to_string();
    assert!(
        err.contains("blocks.0.ffn.Q4_1.weight") && err.contains("IQ4_XS"),
        "{err}"
    );
}

/// Our writer reproduces the gguf-py fixture: the same metadata, shapes, types and stored bytes
/// (quantised blocks included) read back.
#[test]
fn writer_round_trips_the_fixture() {
    use vidgen_engine::weights::gguf::{write, GgufTensorOut};
    let g = tiny();
    let metadata: Vec<(&str, GgufValue)> = g
        .metadata()
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let tensors: Vec<GgufTensorOut> = g
        .keys()
        .iter()
        .map(|key| {
            let info = g.tensor_info(key).unwrap();
            GgufTensorOut {
                name: key.clone(),
                ggml_type: info.ggml_type,
                shape: info.shape.clone(),
                data: raw_bytes(&g, key),
            }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rewritten.gguf");
    write(&path, &metadata, &tensors).unwrap();
    let back = GgufSource::open(&path).unwrap();
    assert_eq!(back.version(), 3);
    for (k, v) in &metadata {
        assert_eq!(&back.metadata()[*k], v, "{k}");
    }
    assert_eq!(back.keys(), g.keys());
    let file = std::fs::read(&path).unwrap();
    for t in &tensors {
        let info = back.tensor_info(&t.name).unwrap();
        assert_eq!((info.ggml_type, &info.shape), (t.ggml_type, &t.shape));
        let stored = &file[info.data_offset()..info.data_offset() + info.data_len()];
        assert_eq!(stored, t.data.as_slice(), "{}", t.name);
    }
    // A wrong byte count is refused by name.
    let mut bad = tensors[0].clone();
    bad.data.pop();
    let err = write(&dir.path().join("bad.gguf"), &[], &[bad.clone()])
        .unwrap_err()
        .to_string();
    assert!(err.contains(&bad.name), "{err}");
}
