//! The memory plan sizes the text encoder's activations by the prompts the text stage will
//! encode: the prompt, and the negative prompt only when guidance uses it.

use vidgen_engine::memory::{plan, text_activations, Offload, PlanRequest, WeightFormat};
use vidgen_engine::pipeline::layout::model_info_from_preset;
use vidgen_engine::pipeline::stages::{Components, Stages};
use vidgen_engine::pipeline::GenerateRequest;
use vidgen_engine::text::{Umt5Config, TEXT_LEN};

fn request(prompt: &str, guidance: f64) -> GenerateRequest {
    serde_json::from_value(serde_json::json!({"prompt": prompt, "guidance": guidance})).unwrap()
}

#[test]
fn text_tokens_count_the_negative_prompt_only_when_guided() {
    let preset = vidgen_engine::presets::preset("wan2.1-t2v-1.3b").unwrap();
    let info = model_info_from_preset(preset);
    let components = Stages::new(Components::Random(preset), candle_core::Device::Cpu);
    let short = "a red fox";
    let unguided = info.resolve(&request(short, 1.0)).unwrap();
    let guided = info.resolve(&request(short, 5.0)).unwrap();
    let alone = components.text_tokens(&unguided).unwrap();
    let with_negative = components.text_tokens(&guided).unwrap();
    // Wan's default negative prompt is far longer than three words.
    assert!(alone < 10, "{alone}");
    assert!(with_negative > 3 * alone, "{with_negative} vs {alone}");
    let long = "a slow shot of a fox in the snow ".repeat(info.max_prompt_chars / 40);
    let capped = components
        .text_tokens(&info.resolve(&request(&long, 1.0)).unwrap())
        .unwrap();
    assert_eq!(capped, TEXT_LEN);
}

#[test]
fn text_stage_plan_follows_the_prompt_length() {
    let umt5 = Umt5Config::umt5_xxl();
    // Short prompts: the feed-forward's f32 copy of `wo` (4 x 4096 x 10240 bytes) dominates;
    // at 512 tokens the attention's [heads, L, L] buffers take over, growing with L squared.
    let wo_f32 = 4 * 4096 * 10240;
    assert!(text_activations(&umt5, 64) > wo_f32);
    assert!(text_activations(&umt5, 64) < wo_f32 + (16 << 20));
    let scores_512 = 3 * 64 * 512 * 512 * 4;
    assert!(text_activations(&umt5, 512) > scores_512 + 512 * 4096 * 6);
    assert!(text_activations(&umt5, 512) > text_activations(&umt5, 256) + (16 << 20));
    let stage = |tokens: usize| {
        let req = PlanRequest {
            preset: vidgen_engine::presets::preset("wan2.2-t2v-a14b").unwrap(),
            width: 832,
            height: 480,
            frames: 81,
            weights: WeightFormat::Fp8,
            cfg: true,
            vram_budget: Some(4 << 30),
            host_budget: None,
            offload: Some(Offload::Stream),
            prefetch: 1,
            dit_weights: None,
            vae_bf16: true,
            text_tokens: tokens,
        };
        plan(&req).stages[0].gpu_peak
    };
    assert!(stage(61) < stage(TEXT_LEN));
    assert_eq!(
        stage(TEXT_LEN) - stage(61),
        text_activations(&umt5, TEXT_LEN) - text_activations(&umt5, 61)
    );
}
