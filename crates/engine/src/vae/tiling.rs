//! Spatial tiling with overlap and linear blending, for bounded-memory encode and decode.
//!
//! Tiles are processed one after another, each through the whole clip (chunk by chunk, with its
//! own feature cache), and every chunk is blended straight into a host-side output buffer. The
//! working set is therefore one tile's cache plus one chunk of one tile, whatever the number of
//! frames; only the result itself grows with the clip.
//!
//! Blending: along each axis a tile's weight ramps linearly up across the overlap with the previous
//! tile and down across the overlap with the next one; the output is Σ w·tile / Σ w, a convex
//! combination whatever the overlap, and exactly the tile where only one tile covers a pixel.

use anyhow::Result;
use candle_core::{CpuStorage, Device, Storage, Tensor};

use crate::invalid;

/// Tile size and overlap in sample (pixel) units: square tiles, or rectangular ones with
/// `tile_width`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileConfig {
    /// The largest tile height, and width unless `tile_width` is given.
    pub tile_size: usize,
    pub tile_overlap: usize,
    /// The largest tile width where it differs from `tile_size`: a 1280x704 video decodes in
    /// three 480x704 tiles with `tile_size` 704 and `tile_width` 480, in four 672x384 ones with
    /// square 672 px tiles.
    pub tile_width: Option<usize>,
}

impl Default for TileConfig {
    /// Tiles of at most 256 px with a 64 px overlap, diffusers' `enable_tiling` geometry (256 px
    /// tiles at a 192 px stride), laid evenly; in latents 32/8 for Wan2.1, 16/4 for Wan2.2.
    /// The pipeline's geometry per VAE is `memory::tiled_decode`'s (for Wan2.1 384 px tiles with
    /// 2-frame passes: faster in the same memory).
    fn default() -> Self {
        Self::square(256, 64)
    }
}

impl TileConfig {
    /// Tiles of at most `size` px along both axes, `overlap` px shared with each neighbour.
    pub fn square(size: usize, overlap: usize) -> Self {
        Self {
            tile_size: size,
            tile_overlap: overlap,
            tile_width: None,
        }
    }

    /// The largest tile width in pixels.
    pub fn width(&self) -> usize {
        self.tile_width.unwrap_or(self.tile_size)
    }

    /// "672" for square tiles, "480x704" (width x height) for rectangular ones.
    pub fn describe_size(&self) -> String {
        match self.tile_width {
            Some(w) if w != self.tile_size => format!("{w}x{}", self.tile_size),
            _ => self.tile_size.to_string(),
        }
    }

    /// (tile height, tile width) and overlap in latent pixels for a VAE of spatial stride
    /// `stride`.
    pub fn latent(&self, stride: usize) -> Result<((usize, usize), usize)> {
        for (field, size) in [("tile_size", self.tile_size), ("tile_width", self.width())] {
            if size == 0 || !size.is_multiple_of(stride) {
                return Err(invalid!(
                    "{field}: {size} must be a positive multiple of the VAE's spatial stride {stride}"
                ));
            }
            if self.tile_overlap >= size {
                return Err(invalid!(
                    "tile_overlap: {} must be smaller than {field} {size}",
                    self.tile_overlap
                ));
            }
        }
        if !self.tile_overlap.is_multiple_of(stride) {
            return Err(invalid!(
                "tile_overlap: {} must be a multiple of the spatial stride {stride}",
                self.tile_overlap
            ));
        }
        Ok((
            (self.tile_size / stride, self.width() / stride),
            self.tile_overlap / stride,
        ))
    }
}

/// One tile along one axis: latent range `[start, start + len)` and the blend weights of its output
/// (`len · scale` values, output units).
#[derive(Debug, Clone)]
pub struct Span {
    pub start: usize,
    pub len: usize,
    pub weights: Vec<f32>,
}

/// Number and size of the tiles [`plan_axis`] lays along an axis of `len` latent pixels.
fn axis_tiles(len: usize, tile: usize, overlap: usize) -> (usize, usize) {
    if len <= tile {
        return (1, len);
    }
    let count = (len - overlap).div_ceil(tile - overlap);
    // count·size ≥ len + (count − 1)·overlap keeps every overlap ≥ `overlap`; size ≤ tile follows
    // from the count.
    (count, (len + (count - 1) * overlap).div_ceil(count))
}

impl TileConfig {
    /// The tiled decode's largest tile in output pixels (height, width) for a `width`x`height`
    /// video through a VAE of spatial stride `stride`: what one tile's working memory scales with.
    pub fn decoded_tile(
        &self,
        width: usize,
        height: usize,
        stride: usize,
    ) -> Result<(usize, usize)> {
        let ((tile_h, tile_w), overlap) = self.latent(stride)?;
        let side = |len: usize, tile: usize| axis_tiles(len / stride, tile, overlap).1 * stride;
        Ok((side(height, tile_h), side(width, tile_w)))
    }
}

/// Tiles covering `len` latent pixels: as few as fit tiles of at most `tile` sharing at least
/// `overlap` with each neighbour, all the same size and spread evenly (the first flush with the
/// start, the last with the end). Compared with fixed-size tiles at a fixed stride, the last tile
/// does not overhang into a mostly repeated one: at 480x832 with 256 px tiles the decode computes
/// 1.6x the frame's pixels instead of 2.0x. Output is `scale` units per latent pixel.
pub fn plan_axis(len: usize, tile: usize, overlap: usize, scale: usize) -> Vec<Span> {
    let (count, size) = axis_tiles(len, tile, overlap);
    // Integer starts i·(len − size)/(count − 1): neighbours are at most ⌈(len − size)/(count − 1)⌉
    // apart, which `axis_tiles` keeps ≤ size − overlap.
    let starts: Vec<usize> = (0..count)
        .map(|i| match count {
            1 => 0,
            _ => i * (len - size) / (count - 1),
        })
        .collect();
    (0..starts.len())
        .map(|i| {
            let (a, b) = (starts[i] * scale, (starts[i] + size) * scale);
            let prev_end = (i > 0).then(|| (starts[i - 1] + size) * scale);
            let next_start = (i + 1 < starts.len()).then(|| starts[i + 1] * scale);
            let weights = (a..b)
                .map(|p| {
                    let centre = p as f32 + 0.5;
                    let mut w = 1.0f32;
                    if let Some(pe) = prev_end {
                        w = w.min((centre - a as f32) / (pe - a) as f32);
                    }
                    if let Some(ns) = next_start {
                        w = w.min((b as f32 - centre) / (b - ns) as f32);
                    }
                    w
                })
                .collect();
            Span {
                start: starts[i],
                len: size,
                weights,
            }
        })
        .collect()
}

/// Values each thread touches at a time when [`Blend::new`] faults its memory in (1 MiB).
const PREFAULT_VALUES: usize = 1 << 18;

/// Host-side weighted accumulation of tiles into a `[B, C, T, H, W]` result.
pub struct Blend {
    dims: [usize; 5],
    data: Vec<f32>,
    weight_sum: Vec<f32>,
}

impl Blend {
    /// An all-zero output of `dims`, its memory touched by every core now: the allocator hands
    /// out untouched pages that fault on first write, which for a decoded clip (1.3 GB for
    /// Wan2.2 at 1280x704x121) costs seconds on one thread and would otherwise stall the first
    /// tile's blend.
    pub fn new(dims: [usize; 5]) -> Self {
        use rayon::prelude::*;
        let [b, c, t, h, w] = dims;
        let mut data = vec![0.0f32; b * c * t * h * w];
        data.par_chunks_mut(PREFAULT_VALUES)
            .for_each(|part| part.fill(0.0));
        Self {
            dims,
            data,
            weight_sum: vec![0.0; h * w],
        }
    }

    /// Adds one chunk `[B, f, C, th, tw]` (on the CPU) of the tile at (`ys`, `xs`), frames from
    /// `t0`. `scale` converts the spans' latent starts to output units. The output planes it
    /// touches are blended in parallel (a Wan2.2 1280x704x121 decode blends 0.3 G values here,
    /// which one thread could not do while the GPU decodes the next chunks).
    pub fn add_chunk(
        &mut self,
        chunk: &Tensor,
        t0: usize,
        ys: &Span,
        xs: &Span,
        scale: usize,
    ) -> Result<()> {
        let [b_all, c_all, t_all, _, _] = self.dims;
        let (b, f, c, th, tw) = chunk.dims5()?;
        anyhow::ensure!(
            b == b_all
                && c == c_all
                && th == ys.weights.len()
                && tw == xs.weights.len()
                && t0 + f <= t_all,
            "tile chunk {:?} does not fit the output {:?} at frame {t0}",
            chunk.dims(),
            self.dims
        );
        // The values are read where they lie (no copy: a chunk is ~100 MB of fresh pages).
        let chunk = chunk.to_device(&Device::Cpu)?.contiguous()?;
        let (storage, layout) = chunk.storage_and_layout();
        let (start, end) = layout.contiguous_offsets().expect("made contiguous above");
        let dims = [f, c, th, tw];
        match &*storage {
            Storage::Cpu(CpuStorage::BF16(v)) => {
                self.blend(&v[start..end], dims, t0, ys, xs, scale)
            }
            Storage::Cpu(CpuStorage::F16(v)) => self.blend(&v[start..end], dims, t0, ys, xs, scale),
            Storage::Cpu(CpuStorage::F32(v)) => self.blend(&v[start..end], dims, t0, ys, xs, scale),
            _ => anyhow::bail!(
                "tile chunk: {:?} values cannot be blended (bf16, f16 or f32)",
                chunk.dtype()
            ),
        }
        Ok(())
    }

    /// [`add_chunk`](Self::add_chunk) on the chunk's values: each output plane (sample, channel,
    /// frame) is disjoint from the others, so planes go to different threads; within a plane the
    /// arithmetic is `out += wy·wx·v`, as one thread would do it.
    fn blend<T: Widen>(
        &mut self,
        values: &[T],
        [f, c, th, tw]: [usize; 4],
        t0: usize,
        ys: &Span,
        xs: &Span,
        scale: usize,
    ) {
        use rayon::prelude::*;
        let [_, c_all, t_all, h_all, w_all] = self.dims;
        let (y0, x0) = (ys.start * scale, xs.start * scale);
        self.data
            .par_chunks_mut(h_all * w_all)
            .enumerate()
            .filter(|(plane, _)| (t0..t0 + f).contains(&(plane % t_all)))
            .for_each(|(plane, out)| {
                let (bc, t) = (plane / t_all, plane % t_all);
                let (bi, ci) = (bc / c_all, bc % c_all);
                let src = ((bi * f + t - t0) * c + ci) * th * tw;
                for (y, wy) in ys.weights.iter().enumerate() {
                    let row = &values[src + y * tw..src + (y + 1) * tw];
                    let out = &mut out[(y0 + y) * w_all + x0..][..tw];
                    for ((o, v), wx) in out.iter_mut().zip(row).zip(&xs.weights) {
                        *o += wy * wx * v.widen();
                    }
                }
            });
    }

    /// Records the tile's weights (once per tile: they are the same for every frame).
    pub fn add_weights(&mut self, ys: &Span, xs: &Span, scale: usize) {
        let w_all = self.dims[4];
        let (y0, x0) = (ys.start * scale, xs.start * scale);
        for (y, wy) in ys.weights.iter().enumerate() {
            let row = &mut self.weight_sum[(y0 + y) * w_all + x0..][..xs.weights.len()];
            for (o, wx) in row.iter_mut().zip(&xs.weights) {
                *o += wy * wx;
            }
        }
    }

    /// Normalises by the weight sums (optionally clamping to [-1, 1]) into a CPU f32 tensor.
    pub fn finish(mut self, clamp: bool) -> Result<Tensor> {
        use rayon::prelude::*;
        let weights = &self.weight_sum;
        self.data.par_chunks_mut(weights.len()).for_each(|plane| {
            for (v, w) in plane.iter_mut().zip(weights) {
                let x = *v / w;
                *v = if clamp { x.clamp(-1.0, 1.0) } else { x };
            }
        });
        Ok(Tensor::from_vec(
            self.data,
            self.dims.to_vec(),
            &Device::Cpu,
        )?)
    }
}

/// A decoded value as the f32 the blend accumulates.
trait Widen: Copy + Sync {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for half::bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Widen for half::f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rectangular tiles split each axis by its own size: Wan2.2 (stride 16) at 1280x704 in
    /// 480x704 tiles is one row of three, in square 672 px tiles two rows of two; sizes the
    /// VAE's stride does not divide are refused, naming the field.
    #[test]
    fn rectangular_tiles_split_each_axis_by_its_own_size() {
        let rect = TileConfig {
            tile_size: 704,
            tile_overlap: 64,
            tile_width: Some(480),
        };
        assert_eq!(rect.latent(16).unwrap(), ((44, 30), 4));
        assert_eq!(rect.decoded_tile(1280, 704, 16).unwrap(), (704, 480));
        assert_eq!(plan_axis(44, 44, 4, 16).len(), 1);
        assert_eq!(plan_axis(80, 30, 4, 16).len(), 3);
        assert_eq!(rect.describe_size(), "480x704");
        let square = TileConfig::square(672, 64);
        assert_eq!(square.decoded_tile(1280, 704, 16).unwrap(), (384, 672));
        assert_eq!(square.describe_size(), "672");
        let bad = TileConfig {
            tile_width: Some(488),
            ..rect
        };
        let err = bad.latent(16).unwrap_err().to_string();
        assert!(err.contains("tile_width") && err.contains("488"), "{err}");
        let narrow = TileConfig {
            tile_width: Some(64),
            ..rect
        };
        let err = narrow.latent(16).unwrap_err().to_string();
        assert!(
            err.contains("tile_overlap") && err.contains("tile_width"),
            "{err}"
        );
    }

    #[test]
    fn plan_covers_with_even_tiles_and_partition_of_unity() {
        for (len, tile, overlap) in [
            (10, 4, 2),
            (7, 4, 1),
            (3, 4, 2),
            (33, 8, 3),
            (16, 16, 4),
            (60, 32, 8),
            (104, 32, 8),
            (44, 16, 4),
        ] {
            let spans = plan_axis(len, tile, overlap, 2);
            assert_eq!(spans[0].start, 0);
            let last = spans.last().unwrap();
            assert_eq!(last.start + last.len, len);
            let size = spans[0].len;
            assert!(size <= tile.min(len), "{len} {tile} {overlap}: tile {size}");
            for pair in spans.windows(2) {
                let shared = pair[0].start + size - pair[1].start;
                assert!(
                    shared >= overlap,
                    "{len} {tile} {overlap}: overlap {shared}"
                );
            }
            // No fewer tiles would do: one less could not cover `len` with this overlap.
            let n = spans.len();
            assert!(n == 1 || (n - 1) * (tile - overlap) + overlap < len);
            let mut sum = vec![0f32; len * 2];
            for s in &spans {
                assert_eq!(s.len, size);
                for (i, w) in s.weights.iter().enumerate() {
                    assert!(*w > 0.0 && *w <= 1.0);
                    sum[s.start * 2 + i] += w;
                }
            }
            assert!(
                sum.iter().all(|&w| w > 0.0),
                "{len} {tile} {overlap}: uncovered"
            );
        }
        // a single tile blends with weight 1 everywhere
        assert!(plan_axis(5, 8, 2, 3)[0].weights.iter().all(|&w| w == 1.0));
        // 480x832 through Wan2.1 (stride 8) with the default 256/64 px tiles: 3 x 4 tiles of
        // 26 x 32 latent pixels (fixed 32 x 32 tiles at stride 24 would compute 1.97x the frame).
        assert_eq!(plan_axis(60, 32, 8, 8).len(), 3);
        assert_eq!(plan_axis(60, 32, 8, 8)[0].len, 26);
        assert_eq!(plan_axis(104, 32, 8, 8).len(), 4);
        assert_eq!(
            TileConfig::default().decoded_tile(832, 480, 8).unwrap(),
            (208, 256)
        );
        // 320/64 px: 2 x 3 tiles of 272 x 320 px (1.31x the frame's pixels).
        assert_eq!(plan_axis(60, 40, 8, 8).len(), 2);
        assert_eq!(plan_axis(104, 40, 8, 8).len(), 3);
        let larger = TileConfig::square(320, 64);
        assert_eq!(larger.decoded_tile(832, 480, 8).unwrap(), (272, 320));
    }

    #[test]
    fn tile_config_is_validated() {
        let t = TileConfig::square(250, 64);
        assert!(t.latent(8).unwrap_err().to_string().contains("tile_size"));
        let t = TileConfig::square(256, 256);
        assert!(t
            .latent(16)
            .unwrap_err()
            .to_string()
            .contains("tile_overlap"));
        assert_eq!(TileConfig::default().latent(16).unwrap(), ((16, 16), 4));
    }
}
