//! Every placement (`--offload`) runs the same math: the two-expert denoise of the A14B-shaped
//! fixture gives bit-identical latents whether both experts stay resident, are loaded one at a
//! time at the switch, or are streamed block by block from host memory; and the measured stages
//! follow the placement (one "denoise" stage, or one per expert when they are swapped).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use vidgen_engine::dit::StreamOptions;
use vidgen_engine::memory::{Offload, TextPlacement};
use vidgen_engine::pipeline::layout::{self, ComponentPaths};
use vidgen_engine::pipeline::stages::{Components, Placement, Stages};
use vidgen_engine::pipeline::{ProgressEvent, ProgressSink, ResolvedRequest};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Quiet;
impl ProgressSink for Quiet {
    fn event(&mut self, _: ProgressEvent) -> anyhow::Result<()> {
        Ok(())
    }
}

fn request() -> ResolvedRequest {
    ResolvedRequest {
        prompt: String::new(),
        negative_prompt: String::new(),
        image: None,
        // The fixture's latents are [1, 16, 3, 6, 8]: 9 frames of 64x48 pixels.
        width: 64,
        height: 48,
        frames: 9,
        fps: 16,
        steps: 6,
        guidance: 4.0,
        guidance_2: Some(3.0),
        shift: 3.0,
        scheduler: "unipc".into(),
        seed: 42,
        notes: Vec::new(),
    }
}

/// Final latents and measured stage names under `placement`.
fn run(placement: Placement) -> (Tensor, Vec<String>) {
    let f = fixtures();
    let layout = layout::detect_with_overrides(
        Some(&f.join("dit/pipe_a14b_unipc")),
        &ComponentPaths {
            vae: Some(f.join("vae/wan21/official.pth")),
            text_encoder: Some(f.join("text/text_encoder/model.safetensors")),
            tokenizer: Some(f.join("text/tokenizer")),
            ..ComponentPaths::default()
        },
    )
    .unwrap();
    assert!(layout.dit_2.is_some(), "the fixture has two experts");
    let io: HashMap<String, Tensor> =
        candle_core::safetensors::load(f.join("dit/pipe_a14b_unipc/io.safetensors"), &Device::Cpu)
            .unwrap();
    let stages = Stages::with_placement(Components::Layout(&layout), Device::Cpu, placement);
    stages.preload().unwrap();
    let latents = stages
        .denoise(
            &request(),
            &io["prompt_embeds"],
            Some(&io["negative_prompt_embeds"]),
            None,
            &mut Quiet,
        )
        .unwrap();
    let names = stages
        .memory_report()
        .into_iter()
        .map(|m| m.stage)
        .collect();
    (latents, names)
}

fn placement(offload: Offload, resident_blocks: usize, prefetch: usize) -> Placement {
    Placement {
        offload,
        stream: StreamOptions {
            resident_blocks,
            prefetch,
        },
        text: TextPlacement::Resident,
        fp8_linears: false,
        fp8_matmul: false,
        vae_bf16: true,
        vae_decode: None,
    }
}

#[test]
fn every_offload_mode_gives_the_resident_latents() {
    let (reference, names) = run(placement(Offload::None, 0, 1));
    assert_eq!(names, ["denoise"]);
    let reference = reference.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(reference.iter().all(|v| v.is_finite()));
    for (offload, k, prefetch, expected) in [
        (Offload::Cond, 0, 1, vec!["denoise"]),
        (
            Offload::CondDiffusion,
            0,
            1,
            vec!["denoise (high-noise expert)", "denoise (low-noise expert)"],
        ),
        (
            Offload::Aggressive,
            0,
            1,
            vec!["denoise (high-noise expert)", "denoise (low-noise expert)"],
        ),
        (
            Offload::Stream,
            0,
            1,
            vec!["denoise (high-noise expert)", "denoise (low-noise expert)"],
        ),
        (
            Offload::Stream,
            1,
            2,
            vec!["denoise (high-noise expert)", "denoise (low-noise expert)"],
        ),
    ] {
        let (latents, names) = run(placement(offload, k, prefetch));
        assert_eq!(names, expected, "{offload:?}");
        let latents = latents.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            latents == reference,
            "{offload:?} (resident blocks {k}, prefetch {prefetch}) differs from the resident run"
        );
    }
}
