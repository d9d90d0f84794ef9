//! Tiled decode's working memory does not grow with the number of frames, and one-frame passes
//! through the decoder's full-resolution levels lower the plain decode's.
//!
//! Measured with the allocator's high-water mark (a counting global allocator in this test
//! binary, which holds this one test so nothing else allocates concurrently). Working memory =
//! peak − live bytes before the call − the result buffer (which necessarily grows with the clip).
//! As a control, a larger tile must need more working memory: the measurement sees the tile, so
//! equal numbers across frame counts are not an artefact.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use vidgen_engine::vae::{TileConfig, VaeConfig, WanVae};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size > layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::SeqCst) + new_size
                    - layout.size();
                PEAK.fetch_max(now, Ordering::SeqCst);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::SeqCst);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Working bytes of `f` (peak above the starting live bytes, minus `result_bytes`).
fn working_bytes(result_bytes: usize, f: impl FnOnce() -> Tensor) -> usize {
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let out = f();
    let peak = PEAK.load(Ordering::SeqCst);
    assert_eq!(out.elem_count() * 4, result_bytes);
    drop(out);
    (peak - before).saturating_sub(result_bytes)
}

#[test]
fn decode_working_memory() {
    // One compute thread: with several, the high-water mark depends on how the threads' scratch
    // buffers happen to overlap in time. (Set before the first parallel op creates the pool.)
    std::env::set_var("RAYON_NUM_THREADS", "1");
    // A tiny Wan2.1-layout VAE with random weights; 6x6 latents in 2x2 tiles of 4 (overlap 2).
    let cfg = VaeConfig {
        base_dim: 4,
        dim_mult: vec![1, 2, 2, 2],
        ..VaeConfig::wan21()
    };
    let vae = WanVae::random(cfg, 3, &Device::Cpu, DType::F32).unwrap();
    let tiles = |size: usize| TileConfig::square(size, 16);
    let latents = |t: usize| Tensor::randn(0f32, 1.0, (1, 16, t, 6, 6), &Device::Cpu).unwrap();
    let out_bytes = |t: usize| 3 * (1 + 4 * (t - 1)) * 48 * 48 * 4;
    // Warm-up: thread pools and other one-time allocations.
    let _ = vae.decode_tiled(&latents(2), &tiles(32)).unwrap();

    let mut working = Vec::new();
    // A tile holds at most TILE_COPY_CHUNKS latent frames' output between host copies; from two
    // copies per tile on, one batch is in flight to the blender while the next is decoded.
    let n = vidgen_engine::vae::TILE_COPY_CHUNKS;
    for t in [2 * n, 3 * n, 4 * n] {
        let z = latents(t);
        let w = working_bytes(out_bytes(t), || vae.decode_tiled(&z, &tiles(32)).unwrap());
        println!(
            "tiled decode, latent frames {t:2} ({:2} frames): working {w:8} B, result {:8} B",
            1 + 4 * (t - 1),
            out_bytes(t)
        );
        working.push(w);
    }
    // 2x and 4x the frames need the same working memory (0.5% slack for allocator noise).
    for &w in &working[1..] {
        assert!(
            (w as f64) <= working[0] as f64 * 1.005,
            "tiled decode working memory grows with the frame count: {working:?}"
        );
    }
    // Control: one 6x6 tile (2.25x the area of a 4x4 tile) needs clearly more for the same frames.
    let z = latents(2 * n);
    let whole = working_bytes(out_bytes(2 * n), || {
        vae.decode_tiled(&z, &tiles(48)).unwrap()
    });
    println!(
        "single 6x6-latent tile, {} latent frames: working {whole} B",
        2 * n
    );
    assert!(
        whole as f64 > 1.5 * working[0] as f64,
        "the measurement does not see the tile size: {whole} vs {working:?}"
    );

    // Plain decode: the full-resolution levels taking a chunk's 4 frames one at a time need less
    // working memory than the whole chunk at once (the reference's way), for the same result.
    let mut vae = vae;
    let z = latents(4);
    let mut plain = Vec::new();
    for pass_frames in [0, 1] {
        vae.set_decode_pass_frames(pass_frames);
        let w = working_bytes(out_bytes(4), || vae.decode(&z).unwrap());
        println!("plain decode, passes of {pass_frames} frames (0: whole chunk): working {w} B");
        plain.push(w);
    }
    assert!(
        (plain[1] as f64) < 0.75 * plain[0] as f64,
        "one-frame passes do not lower the plain decode's working memory: {plain:?}"
    );
}
