//! [`Frames`]: a video as 8-bit RGB frames.

use anyhow::Result;
use vidgen_engine::invalid;

use crate::ranges::format_ranges;

/// A video as 8-bit RGB: `len()` frames of `width × height` pixels, each row-major with interleaved
/// `R, G, B` bytes; frames follow each other in `data`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frames {
    width: usize,
    height: usize,
    count: usize,
    data: Vec<u8>,
}

impl Frames {
    /// Wraps interleaved RGB bytes (`count * height * width * 3` of them).
    pub fn from_rgb(data: Vec<u8>, width: usize, height: usize, count: usize) -> Result<Self> {
        check_dims(width, height, count)?;
        let expected = count * height * width * 3;
        if data.len() != expected {
            return Err(invalid!(
                "frames: {} bytes given, {count} frames of {width}x{height} RGB need {expected}",
                data.len()
            ));
        }
        Ok(Self {
            width,
            height,
            count,
            data,
        })
    }

    /// Converts VAE output for one video, laid out `[C=3, T, H, W]` with values in [-1, 1], to RGB:
    /// `round((clamp(x, -1, 1) + 1) * 127.5)`, as diffusers' PIL conversion rounds.
    ///
    /// NaN or ±Inf anywhere is an error naming the frames: such a frame has no picture to encode,
    /// whatever the guard policy.
    pub fn from_f32_chw(
        data: &[f32],
        channels: usize,
        frames: usize,
        height: usize,
        width: usize,
    ) -> Result<Self> {
        if channels != 3 {
            return Err(invalid!(
                "frames: {channels} channels given; RGB video needs 3 ([C=3, T, H, W])"
            ));
        }
        check_dims(width, height, frames)?;
        let plane = height * width;
        let expected = channels * frames * plane;
        if data.len() != expected {
            return Err(invalid!(
                "frames: {} values given, shape [3, {frames}, {height}, {width}] needs {expected}",
                data.len()
            ));
        }
        let bad_frames: Vec<usize> = (0..frames)
            .filter(|&t| {
                (0..3).any(|c| {
                    data[(c * frames + t) * plane..][..plane]
                        .iter()
                        .any(|v| !v.is_finite())
                })
            })
            .collect();
        if !bad_frames.is_empty() {
            let bad_values = data.iter().filter(|v| !v.is_finite()).count();
            anyhow::bail!(
                "quality guard: decoded frames {} of {frames} contain NaN/Inf ({bad_values} values); \
                 the model or VAE diverged, nothing to encode",
                format_ranges(&bad_frames)
            );
        }
        let mut rgb = vec![0u8; frames * plane * 3];
        for t in 0..frames {
            let out = &mut rgb[t * plane * 3..][..plane * 3];
            for c in 0..3 {
                let src = &data[(c * frames + t) * plane..][..plane];
                for (px, &v) in src.iter().enumerate() {
                    out[px * 3 + c] = to_u8(v);
                }
            }
        }
        Ok(Self {
            width,
            height,
            count: frames,
            data: rgb,
        })
    }

    /// Like [`Frames::from_f32_chw`], taking the shape as given by a tensor: `[3, T, H, W]`, or
    /// `[1, 3, T, H, W]` (a batch of one).
    pub fn from_f32(data: &[f32], shape: &[usize]) -> Result<Self> {
        match *shape {
            [c, t, h, w] | [1, c, t, h, w] => Self::from_f32_chw(data, c, t, h, w),
            _ => Err(invalid!(
                "frames: shape {shape:?} is not [3, T, H, W] or [1, 3, T, H, W]"
            )),
        }
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Never true for a constructed value (zero frames is rejected); here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// RGB bytes of frame `index` (`height * width * 3`). Panics when out of range.
    pub fn frame(&self, index: usize) -> &[u8] {
        let size = self.frame_bytes();
        &self.data[index * size..][..size]
    }

    pub fn frame_bytes(&self) -> usize {
        self.width * self.height * 3
    }

    /// All frames' RGB bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    pub fn into_data(self) -> Vec<u8> {
        self.data
    }
}

fn to_u8(v: f32) -> u8 {
    ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
}

fn check_dims(width: usize, height: usize, count: usize) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(invalid!(
            "frames: size {width}x{height} is empty; width and height must be at least 1"
        ));
    }
    if count == 0 {
        return Err(invalid!("frames: 0 frames given; a video needs at least 1"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_chw_maps_range_and_layout() {
        // 3 channels, 2 frames, 1x2 pixels: channel c, frame t, pixel x = value.
        let (t, h, w) = (2, 1, 2);
        let mut data = vec![0f32; 3 * t * h * w];
        data[0] = -1.0; // R of frame 0, pixel 0
        data[1] = 1.0; // R of frame 0, pixel 1
        data[(2 * t + 1) * 2 + 1] = 0.5; // B of frame 1, pixel 1
        data[(t + 1) * 2] = 7.0; // G of frame 1, pixel 0: clamped
        let f = Frames::from_f32_chw(&data, 3, t, h, w).unwrap();
        assert_eq!(f.frame(0), &[0, 128, 128, 255, 128, 128]);
        assert_eq!(f.frame(1), &[128, 255, 128, 128, 128, 191]);
    }

    #[test]
    fn nan_names_frames() {
        let mut data = vec![0f32; 3 * 5 * 4];
        data[(5 + 3) * 4 + 2] = f32::NAN; // channel 1, frame 3
        data[(2 * 5 + 4) * 4] = f32::INFINITY; // channel 2, frame 4
        let err = Frames::from_f32_chw(&data, 3, 5, 2, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("frames 3-4 of 5"), "{err}");
    }

    #[test]
    fn bad_shapes_are_invalid_input() {
        let err = Frames::from_f32(&[0.0; 12], &[4, 1, 1, 3]).unwrap_err();
        assert!(vidgen_engine::error::is_invalid_input(&err), "{err}");
        assert!(Frames::from_rgb(vec![0; 5], 1, 1, 2).is_err());
        assert!(Frames::from_rgb(vec![], 0, 1, 1).is_err());
    }
}
