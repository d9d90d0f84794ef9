//! 3-axis rotary position embedding of Wan.
//!
//! The head dim d is split into t/h/w parts of widths d − 4·(d/6), 2·(d/6), 2·(d/6) (44/42/42 for
//! d = 128). **Each axis has its own frequency table normalised by its own width**:
//! freq_j = θ^(−2j / width), j < width/2 — the official code calls `rope_params` once per axis and
//! diffusers' `WanRotaryPosEmbed` builds one table per axis. (A single 128-wide table, as one
//! published port "fixed" it, contradicts both.) Channel pairs (2i, 2i+1) are rotated by the angle of
//! the token's frame, row or column index. Tables are computed in f64 and stored as f32.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

/// Widths of the t/h/w parts of a head.
pub fn axis_widths(head_dim: usize) -> [usize; 3] {
    let hw = 2 * (head_dim / 6);
    [head_dim - 2 * hw, hw, hw]
}

/// Per-token cos/sin tables, each [L, head_dim/2] (one angle per channel pair), for a token grid
/// of `frames × height × width` patches.
pub struct RopeTable {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeTable {
    pub fn new(
        head_dim: usize,
        grid: [usize; 3],
        max_seq_len: usize,
        device: &Device,
    ) -> Result<Self> {
        let widths = axis_widths(head_dim);
        for (axis, &n) in grid.iter().enumerate() {
            anyhow::ensure!(
                n <= max_seq_len,
                crate::invalid!(
                    "latent grid axis {axis} has {n} positions, more than the RoPE table's {max_seq_len}"
                )
            );
        }
        let [f, h, w] = grid;
        let pairs = head_dim / 2;
        let tokens = f * h * w;
        let mut cos = Vec::with_capacity(tokens * pairs);
        let mut sin = Vec::with_capacity(tokens * pairs);
        // frequencies per axis, normalised by that axis' width
        let freqs: Vec<Vec<f64>> = widths
            .iter()
            .map(|&width| {
                (0..width / 2)
                    .map(|j| 1.0 / 10000f64.powf((2 * j) as f64 / width as f64))
                    .collect()
            })
            .collect();
        for fi in 0..f {
            for hi in 0..h {
                for wi in 0..w {
                    for (axis, pos) in [fi, hi, wi].into_iter().enumerate() {
                        for &fr in &freqs[axis] {
                            let angle = pos as f64 * fr;
                            cos.push(angle.cos() as f32);
                            sin.push(angle.sin() as f32);
                        }
                    }
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (tokens, pairs), device)?,
            sin: Tensor::from_vec(sin, (tokens, pairs), device)?,
        })
    }

    /// Rotates `x` [B, L, heads, head_dim] (any float dtype; computed in f32).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, heads, d) = x.dims4()?;
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.reshape((b, l, heads, d / 2, 2))?;
        let x1 = x.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?;
        let x2 = x.narrow(D::Minus1, 1, 1)?.squeeze(D::Minus1)?;
        let cos = self.cos.reshape((1, l, 1, d / 2))?;
        let sin = self.sin.reshape((1, l, 1, d / 2))?;
        let even = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
        let odd = (x1.broadcast_mul(&sin)? + x2.broadcast_mul(&cos)?)?;
        let out = Tensor::stack(&[even, odd], D::Minus1)?.reshape((b, l, heads, d))?;
        Ok(out.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_for_wan_head() {
        assert_eq!(axis_widths(128), [44, 42, 42]);
    }

    #[test]
    fn each_axis_has_its_own_table() {
        // Token (f=0, h=1, w=0): only the h part rotates, by angles 1·θ^(−2j/42).
        let t = RopeTable::new(128, [1, 2, 1], 1024, &Device::Cpu).unwrap();
        let cos: Vec<Vec<f32>> = t.cos.to_vec2().unwrap();
        let row = &cos[1];
        assert!(row[..22].iter().all(|&c| c == 1.0));
        for j in 0..21 {
            let expect = (1.0f64 / 10000f64.powf(2.0 * j as f64 / 42.0)).cos() as f32;
            assert_eq!(row[22 + j], expect, "pair {j}");
        }
        assert!(row[43..].iter().all(|&c| c == 1.0));
    }
}
