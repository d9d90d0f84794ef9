//! Compiles the small C layer over libvpx (VP9 for WebM) when the `webm` feature is on.

fn main() {
    println!("cargo:rerun-if-changed=csrc/vpx_shim.c");
    println!("cargo:rerun-if-env-changed=VPX_INCLUDE_DIR");
    println!("cargo:rerun-if-env-changed=VPX_LIB_DIR");
    if std::env::var_os("CARGO_FEATURE_WEBM").is_none() {
        return;
    }
    let mut build = cc::Build::new();
    build.file("csrc/vpx_shim.c").warnings(true);
    if let Some(dir) = std::env::var_os("VPX_INCLUDE_DIR") {
        build.include(dir);
    }
    if let Some(dir) = std::env::var_os("VPX_LIB_DIR") {
        println!("cargo:rustc-link-search=native={}", dir.to_string_lossy());
    }
    if let Err(err) = build.try_compile("vidgen_vpx_shim") {
        panic!(
            "vidgen-media: compiling the libvpx layer failed ({err}). WebM (VP9) needs libvpx's \
             headers and library: `apt-get install libvpx-dev` on Debian/Ubuntu (or set \
             VPX_INCLUDE_DIR / VPX_LIB_DIR), or build without WebM: \
             `cargo build -p vidgen --no-default-features` (add `--features cuda` for GPUs)."
        );
    }
    println!("cargo:rustc-link-lib=vpx");
}
