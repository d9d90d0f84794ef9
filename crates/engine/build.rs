//! With the `cuda` feature, compiles every `kernels/*.cu` of the repository to PTX (OUT_DIR/<stem>.ptx)
//! with nvcc, for the compute capability in CUDA_COMPUTE_CAP (default 90). Without the feature it
//! does nothing: the CPU build needs no CUDA toolkit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let kernels = manifest.join("../../kernels");
    println!("cargo:rerun-if-changed={}", kernels.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let cap = cap.replace('.', "");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        compile(src, &out, &cap, &kernels);
    }
}

fn nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return p.into();
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            let p = Path::new(&root).join("bin/nvcc");
            if p.is_file() {
                return p;
            }
        }
    }
    "nvcc".into()
}

fn compile(src: &Path, out: &Path, cap: &str, include: &Path) {
    let stem = src.file_stem().unwrap().to_string_lossy();
    let ptx = out.join(format!("{stem}.ptx"));
    // Hopper-only instructions (wgmma) need the arch-specific target.
    let arch = if cap == "90" {
        "compute_90a".to_string()
    } else {
        format!("compute_{cap}")
    };
    let status = Command::new(nvcc())
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch={arch}"))
        .arg("-I")
        .arg(include)
        .arg("-o")
        .arg(&ptx)
        .arg(src)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running nvcc for {}: {e} (set NVCC or CUDA_ROOT)",
                src.display()
            )
        });
    if !status.success() {
        panic!("nvcc failed on {}", src.display());
    }
}
