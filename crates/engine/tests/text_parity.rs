//! UMT5 encoder parity with transformers 5.23 `UMT5EncoderModel` on a tiny random model with padded
//! inputs (tools/fixtures/gen_text.py): diffusers folder, official bf16 `.pth`, official names in
//! safetensors, bf16 weights, the `run-component text-encode` contract, and the Wan usage
//! (`encode_prompts`) against diffusers' `WanPipeline._get_t5_prompt_embeds`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use vidgen_engine::component::{self, ComponentOptions, Inputs, Settings};
use vidgen_engine::error::is_invalid_input;
use vidgen_engine::tensor_util::rel_err;
use vidgen_engine::text::model::{encoder_weight_map, relative_position_bucket};
use vidgen_engine::text::{encode_prompts, TextEncoder, Tokenizer, Umt5Config, TEXT_LEN};
use vidgen_engine::weights::pth::PthSource;
use vidgen_engine::weights::{MemorySource, TensorSource};

const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/text"
    ))
    .to_path_buf()
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).unwrap()
}

fn check(what: &str, ours: &Tensor, reference: &Tensor, tol: f64) {
    let e = rel_err(ours, reference).unwrap();
    println!("{what}: rel err {e:.3e}");
    assert!(e <= tol, "{what}: rel err {e:.3e} > {tol:e}");
}

#[test]
fn buckets_equal_transformers() {
    let tables = load("buckets.safetensors");
    for (nb, md) in [(32, 128), (16, 40), (64, 256)] {
        let reference: Vec<i64> = tables[&format!("buckets_{nb}_{md}")].to_vec1().unwrap();
        let ours: Vec<i64> = (-1100..=1100)
            .map(|rel| relative_position_bucket(rel, nb, md) as i64)
            .collect();
        assert_eq!(ours, reference, "buckets {nb}/{md}");
    }
}

#[test]
fn diffusers_folder_f32_matches_transformers() {
    let io = load("encoder.safetensors");
    let enc =
        TextEncoder::load(&fixtures().join("text_encoder"), &Device::Cpu, DType::F32).unwrap();
    let out = enc
        .forward(&io["input_ids"], Some(&io["attention_mask"]))
        .unwrap();
    check("f32 padded [3,140]", &out, &io["last_hidden_state"], TOL);
    // Every row, padded ones included, is compared: row-wise errors too.
    for b in 0..3 {
        check(
            &format!("f32 row {b}"),
            &out.get(b).unwrap(),
            &io["last_hidden_state"].get(b).unwrap(),
            TOL,
        );
    }
    let out = enc.forward(&io["input_ids_nomask"], None).unwrap();
    check(
        "f32 no mask [1,9]",
        &out,
        &io["last_hidden_state_nomask"],
        TOL,
    );
}

/// The block-streamed encoder (weights where they were loaded, each block copied to the compute
/// device when it runs) gives the resident encoder's bits. On the CPU the copy is to the same
/// device; on a GPU `generate --vram-budget 4GiB` streams it for real and the run's latents are
/// compared with a resident run's.
#[test]
fn streamed_blocks_equal_resident() {
    let io = load("encoder.safetensors");
    for dtype in [DType::F32, DType::BF16] {
        let load = || TextEncoder::load(&fixtures().join("text_encoder"), &Device::Cpu, dtype);
        let resident = load().unwrap();
        let streamed = load().unwrap().streamed_to(&Device::Cpu);
        let run = |e: &TextEncoder| {
            e.forward(&io["input_ids"], Some(&io["attention_mask"]))
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (run(&resident), run(&streamed));
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{dtype:?}"
        );
    }
}

#[test]
fn bf16_matches_transformers_bf16() {
    let io = load("encoder.safetensors");
    let enc =
        TextEncoder::load(&fixtures().join("text_encoder"), &Device::Cpu, DType::BF16).unwrap();
    let out = enc
        .forward(&io["input_ids"], Some(&io["attention_mask"]))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    check(
        "bf16 vs transformers bf16",
        &out,
        &io["last_hidden_state_bf16"],
        2e-2,
    );
    check(
        "bf16 vs transformers f32",
        &out,
        &io["last_hidden_state"],
        2e-2,
    );
}

#[test]
fn official_pth_matches_transformers() {
    let refs = load("official.safetensors");
    let io = load("encoder.safetensors");
    // The folder form (Wan release layout) and the file itself.
    for path in [
        fixtures().join("official"),
        fixtures().join("official/models_t5_umt5-xxl-enc-bf16.pth"),
    ] {
        let enc = TextEncoder::load(&path, &Device::Cpu, DType::F32).unwrap();
        assert_eq!(enc.config().num_layers, 2);
        assert_eq!(enc.config().d_kv, 12);
        let out = enc
            .forward(&io["input_ids"], Some(&io["attention_mask"]))
            .unwrap();
        check(
            "official .pth (bf16 weights, f32 run)",
            &out,
            &refs["last_hidden_state"],
            TOL,
        );
    }
}

/// Official key names in a safetensors file (ComfyUI-style repackaging) load the same model.
#[test]
fn official_names_in_safetensors() {
    let pth =
        PthSource::open(&fixtures().join("official/models_t5_umt5-xxl-enc-bf16.pth")).unwrap();
    let mut tensors = HashMap::new();
    for k in pth.keys() {
        tensors.insert(k.clone(), pth.load(&k, &Device::Cpu).unwrap());
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("umt5_official_names.safetensors");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let enc = TextEncoder::load(&file, &Device::Cpu, DType::F32).unwrap();
    let io = load("encoder.safetensors");
    let out = enc
        .forward(&io["input_ids"], Some(&io["attention_mask"]))
        .unwrap();
    check(
        "official names in safetensors",
        &out,
        &load("official.safetensors")["last_hidden_state"],
        TOL,
    );
}

#[test]
fn strict_keys() {
    let st =
        vidgen_engine::weights::SafetensorsSource::open(&fixtures().join("text_encoder")).unwrap();
    let mut tensors = HashMap::new();
    for k in st.keys() {
        tensors.insert(k.clone(), st.load(&k, &Device::Cpu).unwrap());
    }
    let config = Umt5Config::from_file(&fixtures().join("text_encoder/config.json")).unwrap();

    // An unexpected tensor is named.
    let mut extra = tensors.clone();
    extra.insert(
        "encoder.block.9.bogus.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let wm = encoder_weight_map(
        Box::new(MemorySource::new("extra", extra)),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let err = TextEncoder::from_weights(config.clone(), &wm)
        .err()
        .unwrap();
    assert!(
        is_invalid_input(&err) && err.to_string().contains("encoder.block.9.bogus.weight"),
        "{err}"
    );

    // A missing one too.
    let mut missing = tensors.clone();
    missing.remove("encoder.block.1.layer.1.DenseReluDense.wo.weight");
    let wm = encoder_weight_map(
        Box::new(MemorySource::new("missing", missing)),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let err = TextEncoder::from_weights(config.clone(), &wm)
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("encoder.block.1.layer.1.DenseReluDense.wo.weight"),
        "{err}"
    );

    // The tied duplicate `encoder.embed_tokens.weight` is accepted next to `shared.weight`.
    let mut tied = tensors.clone();
    tied.insert(
        "encoder.embed_tokens.weight".into(),
        tensors["shared.weight"].clone(),
    );
    let wm = encoder_weight_map(
        Box::new(MemorySource::new("tied", tied)),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    TextEncoder::from_weights(config.clone(), &wm).unwrap();

    // ... and alone in place of it.
    let mut only = tensors;
    let shared = only.remove("shared.weight").unwrap();
    only.insert("encoder.embed_tokens.weight".into(), shared);
    let wm = encoder_weight_map(
        Box::new(MemorySource::new("only", only)),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    TextEncoder::from_weights(config, &wm).unwrap();
}

#[test]
fn run_component_contract() {
    let io = load("encoder.safetensors");
    let mut inputs = HashMap::new();
    inputs.insert("input_ids".to_string(), io["input_ids"].clone());
    inputs.insert("attention_mask".to_string(), io["attention_mask"].clone());
    let inputs = Inputs::new("in.safetensors", inputs);
    let model = fixtures().join("text_encoder");
    let out = component::run("text-encode", &model, &inputs, &ComponentOptions::cpu_f32()).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, "last_hidden_state");
    check(
        "run-component text-encode",
        &out[0].1,
        &io["last_hidden_state"],
        TOL,
    );

    // Through a file, as the CLI does: ids stored as i64, written outputs read back.
    let dir = tempfile::tempdir().unwrap();
    let input_file = dir.path().join("in.safetensors");
    let mut m = HashMap::new();
    m.insert("input_ids".to_string(), io["input_ids"].clone());
    m.insert("attention_mask".to_string(), io["attention_mask"].clone());
    candle_core::safetensors::save(&m, &input_file).unwrap();
    let inputs = Inputs::load(&input_file).unwrap();
    let out = component::run(
        "text-encode",
        &fixtures().join("official"),
        &inputs,
        &ComponentOptions::cpu_f32(),
    )
    .unwrap();
    let out_file = dir.path().join("out.safetensors");
    component::write_outputs(&out_file, &out).unwrap();
    let back = candle_core::safetensors::load(&out_file, &Device::Cpu).unwrap();
    check(
        "run-component on the official folder",
        &back["last_hidden_state"],
        &load("official.safetensors")["last_hidden_state"],
        TOL,
    );

    // Contract errors: missing input, float ids, mismatched mask, id out of range, unknown setting.
    let run = |m: HashMap<String, Tensor>, settings: &[(&str, &str)]| {
        let opts = ComponentOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            settings: Settings::from_pairs(settings),
        };
        component::run("text-encode", &model, &Inputs::new("in", m), &opts)
    };
    let ids = io["input_ids"].clone();
    let err = run(HashMap::new(), &[]).unwrap_err();
    assert!(
        is_invalid_input(&err) && err.to_string().contains("input_ids"),
        "{err}"
    );
    let err = run(
        HashMap::from([("input_ids".into(), ids.to_dtype(DType::F32).unwrap())]),
        &[],
    )
    .unwrap_err();
    assert!(
        is_invalid_input(&err) && err.to_string().contains("dtype"),
        "{err}"
    );
    let err = run(
        HashMap::from([
            ("input_ids".into(), ids.clone()),
            (
                "attention_mask".into(),
                io["attention_mask"].narrow(1, 0, 5).unwrap(),
            ),
        ]),
        &[],
    )
    .unwrap_err();
    assert!(
        is_invalid_input(&err) && err.to_string().contains("attention_mask"),
        "{err}"
    );
    let big = Tensor::new(&[[5i64, 100_000]], &Device::Cpu).unwrap();
    let err = run(HashMap::from([("input_ids".into(), big)]), &[]).unwrap_err();
    assert!(
        is_invalid_input(&err) && err.to_string().contains("100000"),
        "{err}"
    );
    let err = run(
        HashMap::from([("input_ids".into(), ids)]),
        &[("steps", "3")],
    )
    .unwrap_err();
    assert!(
        is_invalid_input(&err) && err.to_string().contains("steps"),
        "{err}"
    );
}

#[test]
fn wan_prompt_embeds_match_diffusers() {
    let prompts: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("wan_prompts.json")).unwrap(),
    )
    .unwrap();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let tokenizer = Tokenizer::from_file(&fixtures().join("tokenizer")).unwrap();
    let enc =
        TextEncoder::load(&fixtures().join("text_encoder"), &Device::Cpu, DType::F32).unwrap();
    let ours = encode_prompts(&enc, &tokenizer, &prompts).unwrap();
    let reference = &load("wan.safetensors")["prompt_embeds"];
    assert_eq!(ours.dims(), &[3, TEXT_LEN, 32]);
    check("Wan prompt_embeds [3,512,32]", &ours, reference, TOL);
    // Rows past each prompt's length are exactly zero, as in diffusers.
    let batch = tokenizer
        .encode_batch(
            &prompts
                .iter()
                .map(|p| vidgen_engine::text::clean_prompt(p))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            TEXT_LEN,
        )
        .unwrap();
    for (b, &n) in batch.lengths.iter().enumerate() {
        let tail = ours.get(b).unwrap().narrow(0, n, TEXT_LEN - n).unwrap();
        let max = tail
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(max, 0.0, "row {b}: padding rows are not zero");
        let reference_tail = reference
            .get(b)
            .unwrap()
            .narrow(0, n, TEXT_LEN - n)
            .unwrap();
        assert_eq!(
            reference_tail
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
}

/// The demo path: seeded random weights and the built-in tokenizer, with no files at all.
#[test]
fn random_encoder_and_demo_tokenizer() {
    let tokenizer = Tokenizer::demo().unwrap();
    let mut config = Umt5Config::umt5_xxl();
    config.vocab_size = tokenizer.vocab_size();
    config.d_model = 16;
    config.d_kv = 4;
    config.num_heads = 4;
    config.d_ff = 32;
    config.num_layers = 2;
    let enc = TextEncoder::random(config.clone(), 3, &Device::Cpu, DType::F32).unwrap();
    let a = encode_prompts(&enc, &tokenizer, &["a cat walking in the city", "dog"]).unwrap();
    assert_eq!(a.dims(), &[2, TEXT_LEN, 16]);
    let again = TextEncoder::random(config, 3, &Device::Cpu, DType::F32).unwrap();
    let b = encode_prompts(&again, &tokenizer, &["a cat walking in the city", "dog"]).unwrap();
    assert_eq!(
        rel_err(&a, &b).unwrap(),
        0.0,
        "seeded weights are deterministic"
    );
    // A prompt's embedding does not depend on what it is batched with.
    let single = encode_prompts(&enc, &tokenizer, &["dog"]).unwrap();
    check(
        "batch independence",
        &a.get(1).unwrap(),
        &single.get(0).unwrap(),
        1e-6,
    );
}
