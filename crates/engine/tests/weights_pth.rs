//! `.pth` reader against checkpoints written by `torch.save` (tools/fixtures/gen_weights.py).

use std::path::PathBuf;

use candle_core::{DType, Device};
use vidgen_engine::error::is_invalid_input;
use vidgen_engine::tensor_util::max_abs_diff;
use vidgen_engine::weights::pth::PthSource;
use vidgen_engine::weights::{SafetensorsSource, TensorSource};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/weights"
    ))
    .join(name)
}

/// Every tensor of `pth` equals the reference exactly, in dtype, shape and value.
fn assert_same_as(pth: &PthSource, reference: &str) {
    let reference = SafetensorsSource::open(&fixture(reference)).unwrap();
    let mut ours = pth.keys();
    let mut theirs = reference.keys();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
    for key in &theirs {
        let r = reference.load(key, &Device::Cpu).unwrap();
        let o = pth.load(key, &Device::Cpu).unwrap();
        assert_eq!(o.dtype(), r.dtype(), "{key}");
        assert_eq!(o.dims(), r.dims(), "{key}");
        assert_eq!(pth.shape(key).unwrap(), r.dims(), "{key}");
        if r.elem_count() == 0 {
            continue;
        }
        let (o, r) = if r.dtype() == DType::F8E4M3 {
            (
                o.to_dtype(DType::F32).unwrap(),
                r.to_dtype(DType::F32).unwrap(),
            )
        } else {
            (o, r)
        };
        // bit-exact: compare in f64, where every stored type (incl. i64 up to 2^53 here) is exact
        let d = max_abs_diff(&o, &r).unwrap();
        assert_eq!(d, 0.0, "{key}: max abs diff {d}");
    }
}

#[test]
fn all_dtypes_views_and_shared_storage() {
    let pth = PthSource::open(&fixture("basic.pth")).unwrap();
    assert!(pth.root().is_empty());
    assert_same_as(&pth, "basic_ref.safetensors");
    // stored dtypes are kept (bool, int8 and e5m2 are widened: candle lacks them)
    let dtype = |k: &str| pth.load(k, &Device::Cpu).unwrap().dtype();
    assert_eq!(dtype("bf16"), DType::BF16);
    assert_eq!(dtype("f16"), DType::F16);
    assert_eq!(dtype("i64"), DType::I64);
    assert_eq!(dtype("f8e4m3"), DType::F8E4M3);
    assert_eq!(dtype("i8"), DType::I16);
    assert_eq!(pth.shape("five_d").unwrap(), vec![4, 3, 1, 2, 2]);
    assert_eq!(pth.shape("scalar").unwrap(), Vec::<usize>::new());
    // i64 beyond 2^53 (not exactly representable in f64): compare as integers
    let i = pth
        .load("i64", &Device::Cpu)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap();
    assert_eq!(i, vec![0, -1, 1 << 40, -(1 << 62), 7]);
}

#[test]
fn protocol_4_and_long_memo() {
    let pth = PthSource::open(&fixture("proto4.pth")).unwrap();
    assert_eq!(pth.keys().len(), 300);
    for i in [0usize, 255, 256, 299] {
        let v = pth
            .load(&format!("layers.{i}.w"), &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(v, vec![i as f32; 2]);
    }
}

#[test]
fn module_state_dict() {
    let pth = PthSource::open(&fixture("module.pth")).unwrap();
    assert_same_as(&pth, "module_ref.safetensors");
    assert!(pth.keys().contains(&"2.num_batches_tracked".to_string()));
}

#[test]
fn wrapped_checkpoint_is_unwrapped_and_flattened() {
    let pth = PthSource::open(&fixture("wrapped.pth")).unwrap();
    assert_eq!(pth.root(), ["state_dict"]);
    assert!(
        pth.describe().ends_with("wrapped.pth [state_dict]"),
        "{}",
        pth.describe()
    );
    let mut keys = pth.keys();
    keys.sort();
    assert_eq!(keys, ["encoder.b", "encoder.w", "head.weight"]);
    let reference = SafetensorsSource::open(&fixture("wrapped_ref.safetensors")).unwrap();
    for k in &keys {
        let d = max_abs_diff(
            &pth.load(k, &Device::Cpu).unwrap(),
            &reference.load(k, &Device::Cpu).unwrap(),
        )
        .unwrap();
        assert_eq!(d, 0.0, "{k}");
    }
    // explicit root: the optimizer state, flattened through an int-keyed dict
    let opt = PthSource::open_at(&fixture("wrapped.pth"), &["optimizer"]).unwrap();
    assert_eq!(opt.keys(), ["state.0.momentum"]);
    // the root object itself, flattened with full paths
    let all = PthSource::open_at(&fixture("wrapped.pth"), &[]).unwrap();
    assert_eq!(all.keys().len(), 4);
    assert!(all.keys().contains(&"state_dict.encoder.w".to_string()));
    let err = PthSource::open_at(&fixture("wrapped.pth"), &["ema"])
        .err()
        .unwrap();
    assert!(err.to_string().contains("no dict entry `ema`"), "{err}");
}

#[test]
fn unknown_global_is_refused_by_name() {
    let err = PthSource::open(&fixture("bad_global.pth")).err().unwrap();
    assert!(is_invalid_input(&err));
    assert!(err.to_string().contains("argparse.Namespace"), "{err}");
}

#[test]
fn legacy_and_non_checkpoints_are_refused() {
    let err = PthSource::open(&fixture("legacy.pth")).err().unwrap();
    assert!(is_invalid_input(&err));
    assert!(err.to_string().contains("torch < 1.6"), "{err}");
    let err = PthSource::open(&fixture("basic_ref.safetensors"))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("not a PyTorch zip checkpoint"),
        "{err}"
    );
    let err = PthSource::open(&fixture("missing.pth")).err().unwrap();
    assert!(
        is_invalid_input(&err) && err.to_string().contains("missing.pth"),
        "{err}"
    );
}

#[test]
fn truncated_archive_is_an_error() {
    let bytes = std::fs::read(fixture("basic.pth")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.pth");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(PthSource::open(&path).is_err());
}

#[test]
fn missing_key_names_it() {
    let pth = PthSource::open(&fixture("basic.pth")).unwrap();
    let err = pth.load("nope", &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("`nope`"), "{err}");
}
