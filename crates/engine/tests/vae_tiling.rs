//! Tiled VAE encode/decode against the untiled (diffusers-equal) computation.
//!
//! Tolerances:
//! - One tile covering the frame must reproduce the untiled result (same computation; only the
//!   host-side blend is added): rel err ≤ 1e-6.
//! - Several tiles cannot equal the untiled result: each tile sees zero padding at its borders and
//!   the middle attention block attends within the tile only. On these tiny random models (tiles of
//!   4 latent pixels, a receptive field wider than the tile, untrained global attention) the error
//!   is large for any tiler: diffusers' own `tiled_decode` at the same tile size and overlap is off
//!   by the rel err stored in the fixture's meta.json (0.72–0.76). Our tiler is held to no worse
//!   than diffusers' (≤ 1.0x its error): the measured yardstick, not an arbitrary number.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use vidgen_engine::tensor_util::rel_err;
use vidgen_engine::vae::{TileConfig, WanVae};

fn dir(kind: &str) -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/vae"
    ))
    .join(kind)
}

fn load_io(kind: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir(kind).join("io.safetensors"), &Device::Cpu).unwrap()
}

fn meta(kind: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir(kind).join("meta.json")).unwrap()).unwrap()
}

fn load(kind: &str) -> WanVae {
    WanVae::load(&dir(kind).join("diffusers"), &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn single_tile_equals_untiled() {
    for kind in ["wan21", "wan22"] {
        let vae = load(kind);
        let io = load_io(kind);
        let big = TileConfig::square(1024, 256);
        let e = rel_err(
            &vae.decode_tiled(&io["latents"], &big).unwrap(),
            &vae.decode(&io["latents"]).unwrap(),
        )
        .unwrap();
        println!("{kind} single-tile decode vs untiled: rel err {e:.3e}");
        assert!(e <= 1e-6, "{kind}: {e}");
        let e = rel_err(
            &vae.encode_mean_tiled(&io["sample"], &big).unwrap(),
            &vae.encode_mean(&io["sample"]).unwrap(),
        )
        .unwrap();
        println!("{kind} single-tile encode vs untiled: rel err {e:.3e}");
        assert!(e <= 1e-6, "{kind}: {e}");
    }
}

/// A fixture's multi-tile decode case: the VAE, its `tile_latents` and their untiled decode,
/// diffusers' tile geometry (square tiles) and the error of diffusers' own tiled decode.
struct TileCase {
    vae: WanVae,
    z: Tensor,
    untiled: Tensor,
    tiles: TileConfig,
    yardstick: f64,
}

fn tile_case(kind: &str) -> TileCase {
    let vae = load(kind);
    let z = load_io(kind).remove("tile_latents").unwrap();
    let m = meta(kind);
    let size = m["diffusers_tile_sample_size"].as_u64().unwrap() as usize;
    let stride = m["diffusers_tile_sample_stride"].as_u64().unwrap() as usize;
    let untiled = vae.decode(&z).unwrap();
    TileCase {
        vae,
        z,
        untiled,
        tiles: TileConfig::square(size, size - stride),
        yardstick: m["diffusers_tiled_vs_untiled_rel_err"].as_f64().unwrap(),
    }
}

#[test]
fn multi_tile_decode_no_worse_than_diffusers_tiling() {
    for kind in ["wan21", "wan22"] {
        let TileCase {
            vae,
            z,
            untiled,
            tiles,
            yardstick,
        } = tile_case(kind);
        let tiled = vae.decode_tiled(&z, &tiles).unwrap();
        assert_eq!(tiled.dims(), untiled.dims());
        let e = rel_err(&tiled, &untiled).unwrap();
        let (size, overlap) = (tiles.tile_size, tiles.tile_overlap);
        println!("{kind} tiled ({size}px, overlap {overlap}px) vs untiled decode: rel err {e:.3e} (diffusers' tiling: {yardstick:.3e})");
        assert!(
            e <= yardstick,
            "{kind}: tiled rel err {e} worse than diffusers' {yardstick}"
        );
        // Frames are blended, never lost: every output pixel is finite and within [-1, 1].
        let v: Vec<f32> = tiled.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite() && x.abs() <= 1.0));
    }
}

#[test]
fn multi_tile_encode_shape_and_error() {
    let vae = load("wan21");
    let video = Tensor::rand(-1f32, 1.0, (1, 3, 5, 48, 64), &Device::Cpu).unwrap();
    let tiles = TileConfig::square(32, 16);
    let untiled = vae.encode_mean(&video).unwrap();
    let tiled = vae.encode_mean_tiled(&video, &tiles).unwrap();
    assert_eq!(tiled.dims(), &[1, 16, 2, 6, 8]);
    let e = rel_err(&tiled, &untiled).unwrap();
    println!("wan21 tiled (32px, overlap 16px) vs untiled encode: rel err {e:.3e}");
    assert!(e < 1.0, "{e}");
}

/// Tiles as tall as the frame, split only across its width, have fewer seams than square tiles of
/// that width: their decode is no further from the untiled one (the geometry a wide video can use
/// to trade rows of tiles for memory, see `TileConfig::tile_width`).
#[test]
fn full_height_tiles_no_worse_than_square_tiles_of_their_width() {
    for kind in ["wan21", "wan22"] {
        let TileCase {
            vae,
            z,
            untiled,
            tiles: square,
            ..
        } = tile_case(kind);
        let size = square.tile_size;
        let columns = TileConfig {
            tile_size: untiled.dim(3).unwrap().next_multiple_of(size),
            tile_width: Some(size),
            ..square
        };
        let e_square = rel_err(&vae.decode_tiled(&z, &square).unwrap(), &untiled).unwrap();
        let tiled = vae.decode_tiled(&z, &columns).unwrap();
        assert_eq!(tiled.dims(), untiled.dims());
        let e_columns = rel_err(&tiled, &untiled).unwrap();
        println!("{kind}: full-height {size}px-wide tiles {e_columns:.3e}, square {size}px tiles {e_square:.3e}");
        assert!(e_columns <= e_square, "{kind}: {e_columns} > {e_square}");
    }
}
