//! RGB ↔ Y'CbCr 4:2:0 (I420), BT.709 coefficients, limited ("studio") range, as tagged in the files.

use crate::Frames;

const KR: f32 = 0.2126;
const KB: f32 = 0.0722;
const KG: f32 = 1.0 - KR - KB;

/// One I420 picture: full-size luma, chroma planes of `ceil(w/2) × ceil(h/2)`, tightly packed.
pub struct Yuv420 {
    pub width: usize,
    pub height: usize,
    pub y: Vec<u8>,
    pub u: Vec<u8>,
    pub v: Vec<u8>,
}

impl Yuv420 {
    pub fn chroma_width(&self) -> usize {
        self.width.div_ceil(2)
    }

    /// Converts one RGB frame; each chroma sample is the average over its (up to) 2×2 pixels.
    pub fn from_rgb(rgb: &[u8], width: usize, height: usize) -> Self {
        let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
        let mut y = vec![0u8; width * height];
        for (dst, px) in y.iter_mut().zip(rgb.chunks_exact(3)) {
            let luma = KR * px[0] as f32 + KG * px[1] as f32 + KB * px[2] as f32;
            *dst = quantize(16.0 + luma * (219.0 / 255.0));
        }
        let mut u = vec![0u8; cw * ch];
        let mut v = vec![0u8; cw * ch];
        for cy in 0..ch {
            for cx in 0..cw {
                let (mut r, mut g, mut b, mut n) = (0f32, 0f32, 0f32, 0f32);
                for yy in 2 * cy..(2 * cy + 2).min(height) {
                    for xx in 2 * cx..(2 * cx + 2).min(width) {
                        let p = &rgb[(yy * width + xx) * 3..][..3];
                        r += p[0] as f32;
                        g += p[1] as f32;
                        b += p[2] as f32;
                        n += 1.0;
                    }
                }
                let (r, g, b) = (r / n, g / n, b / n);
                let luma = KR * r + KG * g + KB * b;
                let scale = 224.0 / 255.0;
                u[cy * cw + cx] = quantize(128.0 + scale * (b - luma) / (2.0 * (1.0 - KB)));
                v[cy * cw + cx] = quantize(128.0 + scale * (r - luma) / (2.0 * (1.0 - KR)));
            }
        }
        Self {
            width,
            height,
            y,
            u,
            v,
        }
    }

    pub fn from_frame(frames: &Frames, index: usize) -> Self {
        Self::from_rgb(frames.frame(index), frames.width(), frames.height())
    }
}

fn quantize(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// Borrowed I420 planes with strides, as decoders hand them out.
pub struct YuvPlanes<'a> {
    pub width: usize,
    pub height: usize,
    pub y: &'a [u8],
    pub u: &'a [u8],
    pub v: &'a [u8],
    pub y_stride: usize,
    pub uv_stride: usize,
}

impl YuvPlanes<'_> {
    /// Appends the picture as RGB to `out` (nearest chroma sample, which is enough for the guard's
    /// statistics and thumbnails of decoded files). Fixed point, 8 fractional bits.
    pub fn append_rgb(&self, out: &mut Vec<u8>) {
        // Y' scale 255/219 and the BT.709 chroma weights scaled by 255/224, times 256.
        const Y: i32 = 298;
        const R_V: i32 = 459;
        const G_U: i32 = 55;
        const G_V: i32 = 136;
        const B_U: i32 = 541;
        out.reserve(self.width * self.height * 3);
        for row in 0..self.height {
            let y_row = &self.y[row * self.y_stride..][..self.width];
            let u_row = &self.u[(row / 2) * self.uv_stride..][..self.width.div_ceil(2)];
            let v_row = &self.v[(row / 2) * self.uv_stride..][..self.width.div_ceil(2)];
            for (col, &luma) in y_row.iter().enumerate() {
                let c = Y * (luma as i32 - 16) + 128;
                let d = u_row[col / 2] as i32 - 128;
                let e = v_row[col / 2] as i32 - 128;
                let clamp = |v: i32| (v >> 8).clamp(0, 255) as u8;
                out.extend_from_slice(&[
                    clamp(c + R_V * e),
                    clamp(c - G_U * d - G_V * e),
                    clamp(c + B_U * d),
                ]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_close() {
        // A 3x3 image (odd size) of assorted colours survives RGB → I420 → RGB within chroma
        // subsampling error where the 2x2 block is uniform.
        let colours = [
            [255u8, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [255, 255, 255],
            [0, 0, 0],
            [90, 140, 200],
        ];
        for c in colours {
            let rgb: Vec<u8> = (0..9).flat_map(|_| c).collect();
            let yuv = Yuv420::from_rgb(&rgb, 3, 3);
            assert_eq!((yuv.u.len(), yuv.v.len()), (4, 4));
            let planes = YuvPlanes {
                width: 3,
                height: 3,
                y: &yuv.y,
                u: &yuv.u,
                v: &yuv.v,
                y_stride: 3,
                uv_stride: 2,
            };
            let mut back = Vec::new();
            planes.append_rgb(&mut back);
            for (a, b) in back.iter().zip(&rgb) {
                assert!((*a as i32 - *b as i32).abs() <= 2, "{c:?}: {back:?}");
            }
        }
        // BT.709 limited range: white → Y 235, black → Y 16, grey → neutral chroma.
        let yuv = Yuv420::from_rgb(&[255, 255, 255, 0, 0, 0], 2, 1);
        assert_eq!(
            (yuv.y[0], yuv.y[1], yuv.u[0], yuv.v[0]),
            (235, 16, 128, 128)
        );
    }
}
