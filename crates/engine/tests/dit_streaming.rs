//! Block streaming and multi-context forwards must compute exactly what the resident model does
//! (the same kernels on the same bytes). On the CPU the streamed "upload" is a copy; the GPU run of
//! the same comparison is `vidgen bench --what stream`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use vidgen_engine::dit::{self, StreamOptions};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/dit")
        .join(name)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn forward(model: &dit::WanTransformer, io: &std::collections::HashMap<String, Tensor>) -> Tensor {
    let x = &io["hidden_states"];
    let rope = model.rope(x.dims()).unwrap();
    let ctx = model.prepare_context(&io["encoder_hidden_states"]).unwrap();
    model.forward(x, &io["timestep"], &ctx, &rope).unwrap()
}

#[test]
fn streamed_forward_is_bit_identical_to_resident() {
    for variant in ["t2v", "ti2v"] {
        let dir = fixture(variant).join("transformer");
        let io =
            candle_core::safetensors::load(fixture(variant).join("io.safetensors"), &Device::Cpu)
                .unwrap();
        let resident = dit::load(&dir, &Device::Cpu, DType::F32).unwrap();
        let expected = forward(&resident, &io);
        let layers = resident.config().num_layers;
        assert_eq!(resident.streamed_bytes(), 0);
        // every split of resident/streamed blocks and several prefetch depths
        for (resident_blocks, prefetch) in [(0, 0), (0, 1), (1, 1), (0, 3), (layers, 1)] {
            let opts = StreamOptions {
                resident_blocks,
                prefetch,
            };
            let streamed = dit::load_streamed(&dir, &Device::Cpu, DType::F32, opts).unwrap();
            if resident_blocks < layers {
                assert!(streamed.streamed_bytes() > 0);
            }
            let got = forward(&streamed, &io);
            let d = max_abs_diff(&got, &expected);
            println!("{variant} streamed {opts:?}: max |diff| {d}");
            assert_eq!(d, 0.0, "{variant} {opts:?}");
        }
    }
}

#[test]
fn forward_many_equals_separate_forwards() {
    let dir = fixture("t2v").join("transformer");
    let io = candle_core::safetensors::load(fixture("t2v").join("io.safetensors"), &Device::Cpu)
        .unwrap();
    for streamed in [false, true] {
        let model = if streamed {
            dit::load_streamed(&dir, &Device::Cpu, DType::F32, StreamOptions::default()).unwrap()
        } else {
            dit::load(&dir, &Device::Cpu, DType::F32).unwrap()
        };
        let x = &io["hidden_states"];
        let rope = model.rope(x.dims()).unwrap();
        let text = &io["encoder_hidden_states"];
        let cond = model.prepare_context(text).unwrap();
        let uncond = model.prepare_context(&(text * -0.5).unwrap()).unwrap();
        let both = model
            .forward_many(x, &io["timestep"], &[&cond, &uncond], &rope)
            .unwrap();
        let a = model.forward(x, &io["timestep"], &cond, &rope).unwrap();
        let b = model.forward(x, &io["timestep"], &uncond, &rope).unwrap();
        assert_eq!(max_abs_diff(&both[0], &a), 0.0);
        assert_eq!(max_abs_diff(&both[1], &b), 0.0);
        assert!(max_abs_diff(&a, &b) > 0.0, "the two contexts must differ");
    }
}
