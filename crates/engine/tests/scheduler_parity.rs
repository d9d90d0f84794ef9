//! Scheduler parity against diffusers 0.42.1 and the official Wan2.2 solvers
//! (fixtures from tools/fixtures/gen_scheduler.py).
//!
//! - Tables: timesteps and sigmas bit-exact for every (steps, shift) in the fixture, per kind and convention.
//! - Runs: recorded model outputs fed through each scheduler. "Forced" feeds the reference sample at every
//!   step (isolates the single-step error, history included); "free" feeds our own output back, as the
//!   denoise loop does. Both must stay within 1e-5 relative error at every step.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use vidgen_engine::scheduler::{build, SchedulerKind, SchedulerSpec, SigmaConvention};
use vidgen_engine::tensor_util::rel_err;

const TOLERANCE: f64 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/scheduler"
    ))
    .join(name)
}

fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn as_f32_vec(t: &Tensor) -> Vec<f32> {
    match t.dtype() {
        // Integer timesteps reach the transformer as the same integers in f32.
        DType::I64 => t
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|v| v as f32)
            .collect(),
        _ => t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
    }
}

fn spec_for(kind: SchedulerKind, convention: SigmaConvention, shift: f64) -> SchedulerSpec {
    match convention {
        SigmaConvention::Diffusers => SchedulerSpec::diffusers(kind, shift),
        SigmaConvention::Official => SchedulerSpec::official(kind, shift),
    }
}

fn check_tables(kind: SchedulerKind, convention: SigmaConvention, file: &str) {
    let tensors = load(file);
    let mut keys: Vec<&String> = tensors.keys().filter(|k| k.ends_with("/sigmas")).collect();
    keys.sort();
    assert!(keys.len() >= 50, "{file}: only {} cases", keys.len());
    for key in keys {
        let case = key.trim_end_matches("/sigmas");
        let (steps, shift) = case.split_once('_').unwrap();
        let (steps, shift): (usize, f64) = (steps.parse().unwrap(), shift.parse().unwrap());
        let want_sigmas = as_f32_vec(&tensors[key]);
        let want_timesteps = as_f32_vec(&tensors[&format!("{case}/timesteps")]);
        let s = build(&spec_for(kind, convention, shift), steps).unwrap();
        // Bit-exact: compare the bit patterns so -0.0 vs 0.0 or a 1-ulp slip fails too.
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(s.sigmas()),
            bits(&want_sigmas),
            "{file} {case}: sigmas\n ours {:?}\n ref  {:?}",
            s.sigmas(),
            want_sigmas
        );
        assert_eq!(
            bits(s.timesteps()),
            bits(&want_timesteps),
            "{file} {case}: timesteps\n ours {:?}\n ref  {:?}",
            s.timesteps(),
            want_timesteps
        );
    }
}

#[test]
fn tables_unipc_diffusers() {
    check_tables(
        SchedulerKind::UniPc,
        SigmaConvention::Diffusers,
        "tables_unipc_diffusers.safetensors",
    );
}

#[test]
fn tables_unipc_official() {
    check_tables(
        SchedulerKind::UniPc,
        SigmaConvention::Official,
        "tables_unipc_official.safetensors",
    );
}

#[test]
fn tables_euler_diffusers() {
    check_tables(
        SchedulerKind::Euler,
        SigmaConvention::Diffusers,
        "tables_euler_diffusers.safetensors",
    );
    // No official Euler exists: the official convention uses the same table.
    check_tables(
        SchedulerKind::Euler,
        SigmaConvention::Official,
        "tables_euler_diffusers.safetensors",
    );
}

#[test]
fn tables_dpm_diffusers() {
    check_tables(
        SchedulerKind::DpmPlusPlus,
        SigmaConvention::Diffusers,
        "tables_dpm++_diffusers.safetensors",
    );
}

#[test]
fn tables_dpm_official() {
    check_tables(
        SchedulerKind::DpmPlusPlus,
        SigmaConvention::Official,
        "tables_dpm++_official.safetensors",
    );
}

/// The official timesteps listed in wan-facts §7.1 ([LOCAL], running W22 `FlowUniPCMultistepScheduler`).
#[test]
fn official_unipc_timesteps_match_the_published_lists() {
    let cases: [(usize, f64, &[i64]); 3] = [
        (
            50,
            5.0,
            &[
                999, 995, 991, 987, 982, 978, 973, 968, 963, 957, 952, 946, 940, 934, 927, 920,
                913, 906, 898, 890, 882, 873, 863, 854, 843, 833, 821, 809, 796, 783, 768, 753,
                737, 720, 701, 681, 660, 636, 611, 584, 555, 522, 487, 448, 405, 356, 302, 241,
                172, 92,
            ],
        ),
        (
            40,
            12.0,
            &[
                999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952,
                947, 941, 936, 929, 922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776,
                749, 717, 678, 631, 571, 492, 386, 235,
            ],
        ),
        (
            40,
            5.0,
            &[
                999, 994, 989, 983, 978, 972, 965, 959, 952, 944, 937, 929, 920, 911, 902, 892,
                882, 870, 859, 846, 833, 818, 803, 786, 768, 749, 728, 706, 681, 654, 624, 591,
                555, 514, 468, 416, 356, 288, 208, 113,
            ],
        ),
    ];
    for (steps, shift, want) in cases {
        let s = build(&SchedulerSpec::official(SchedulerKind::UniPc, shift), steps).unwrap();
        let want: Vec<f32> = want.iter().map(|&t| t as f32).collect();
        assert_eq!(
            s.timesteps(),
            &want[..],
            "official UniPC {steps} steps shift {shift}"
        );
    }
    // wan-facts §7.1 sigma endpoints, N=50 shift 5.
    let s = build(&SchedulerSpec::official(SchedulerKind::UniPc, 5.0), 50).unwrap();
    // wan-facts prints 8 significant digits: agree to half a unit in the last one.
    assert!(
        (s.sigmas()[0] as f64 - 0.999_799_85).abs() <= 5e-9,
        "{}",
        s.sigmas()[0]
    );
    assert!(
        (s.sigmas()[49] as f64 - 0.092_506_86).abs() <= 5e-9,
        "{}",
        s.sigmas()[49]
    );
    assert_eq!(s.sigmas()[50], 0.0);
    // wan-facts §7.2: diffusers' tail differs.
    let d = build(&SchedulerSpec::diffusers(SchedulerKind::UniPc, 5.0), 50).unwrap();
    assert_eq!(&d.timesteps()[46..], &[305.0, 244.0, 175.0, 96.0]);
    assert_eq!(d.sigmas()[0], 0.999_999_f32);
}

struct RunStats {
    forced_max: f64,
    free_max: f64,
}

fn run_case(
    spec: &SchedulerSpec,
    outputs: &Tensor,
    samples: &Tensor,
    steps: usize,
    label: &str,
) -> RunStats {
    let mut forced = build(spec, steps).unwrap();
    let mut free = build(spec, steps).unwrap();
    let mut x = samples.get(0).unwrap();
    let (mut forced_max, mut free_max) = (0.0f64, 0.0f64);
    for i in 0..steps {
        let v = outputs.get(i).unwrap();
        let want = samples.get(i + 1).unwrap();
        let got = forced.step(&v, i, &samples.get(i).unwrap()).unwrap();
        let e = rel_err(&got, &want).unwrap();
        assert!(e <= TOLERANCE, "{label}: forced step {i}: rel err {e:.3e}");
        forced_max = forced_max.max(e);
        x = free.step(&v, i, &x).unwrap();
        let e = rel_err(&x, &want).unwrap();
        assert!(
            e <= TOLERANCE,
            "{label}: free-running step {i}: rel err {e:.3e}"
        );
        free_max = free_max.max(e);
    }
    RunStats {
        forced_max,
        free_max,
    }
}

fn check_runs(convention: SigmaConvention, stem: &str) -> usize {
    let tensors = load(&format!("{stem}.safetensors"));
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{stem}.json"))).unwrap())
            .unwrap();
    let mut count = 0;
    for case in index.as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let shift = case["shift"].as_f64().unwrap();
        let kind: SchedulerKind = case["kind"].as_str().unwrap().parse().unwrap();
        let spec = match convention {
            // The exact scheduler_config.json text diffusers writes (with -Infinity for DPM): exercises the parser.
            SigmaConvention::Diffusers => {
                SchedulerSpec::from_diffusers_json(case["scheduler_config_json"].as_str().unwrap())
                    .unwrap_or_else(|e| panic!("{name}: {e:#}"))
            }
            SigmaConvention::Official => SchedulerSpec::official(kind, shift),
        };
        assert_eq!(spec.kind, kind, "{name}");
        assert_eq!(spec.flow_shift, shift, "{name}");
        let outputs = &tensors[&format!("{name}/model_outputs")];
        let samples = &tensors[&format!("{name}/samples")];
        let stats = run_case(&spec, outputs, samples, steps, &format!("{stem}/{name}"));
        println!(
            "{stem}/{name}: max rel err forced {:.3e}, free-running {:.3e}",
            stats.forced_max, stats.free_max
        );
        count += 1;
    }
    count
}

#[test]
fn runs_diffusers() {
    assert_eq!(check_runs(SigmaConvention::Diffusers, "runs_diffusers"), 16);
}

#[test]
fn runs_official() {
    assert_eq!(check_runs(SigmaConvention::Official, "runs_official"), 6);
}
