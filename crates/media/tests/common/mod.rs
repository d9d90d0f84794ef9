//! Deterministic synthetic videos for the media tests.
#![allow(dead_code)]

use vidgen_media::Frames;

/// SplitMix64: a tiny deterministic generator (tests must not depend on a crate's RNG stream).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
}

fn to_u8(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// A grid of random values sampled bilinearly: smooth noise with features about `cell` px wide.
struct ValueNoise {
    cell: f32,
    cols: usize,
    values: Vec<f32>,
    /// Random grid offset, so that no octave lines up with the 8/16-px grid the guard looks at.
    offset: (f32, f32),
}

impl ValueNoise {
    fn new(rng: &mut Rng, width: usize, height: usize, cell: f32) -> Self {
        let cols = (width as f32 / cell) as usize + 4;
        let rows = (height as f32 / cell) as usize + 4;
        let values = (0..cols * rows).map(|_| rng.normal()).collect();
        Self {
            cell,
            cols,
            values,
            offset: (rng.uniform() * cell, rng.uniform() * cell),
        }
    }

    fn at(&self, x: f32, y: f32) -> f32 {
        let (gx, gy) = (
            (x + self.offset.0) / self.cell,
            (y + self.offset.1) / self.cell,
        );
        let (x0, y0) = (gx.floor() as usize, gy.floor() as usize);
        let (fx, fy) = (gx - x0 as f32, gy - y0 as f32);
        // Smoothstep weights: no visible grid.
        let (sx, sy) = (fx * fx * (3.0 - 2.0 * fx), fy * fy * (3.0 - 2.0 * fy));
        let v = |cx: usize, cy: usize| self.values[cy * self.cols + cx];
        let top = v(x0, y0) * (1.0 - sx) + v(x0 + 1, y0) * sx;
        let bottom = v(x0, y0 + 1) * (1.0 - sx) + v(x0 + 1, y0 + 1) * sx;
        top * (1.0 - sy) + bottom * sy
    }
}

/// A natural-looking still: fractal texture over a sky-to-ground gradient, with a few soft-edged
/// objects, in colour. The texture's octaves (256 px down to 2 px) have amplitude ∝ cell^`slope`:
/// 0 gives equal energy per octave, the 1/f² power spectrum typical of photographs; negative
/// values give more fine detail (foliage, gravel), positive ones smoother pictures.
pub fn natural_image(seed: u64, width: usize, height: usize, slope: f32) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let octaves: Vec<(ValueNoise, f32)> = [256.0, 128.0, 64.0, 32.0, 16.0, 8.0, 4.0, 2.0]
        .iter()
        .map(|&cell: &f32| {
            (
                ValueNoise::new(&mut rng, width, height, cell),
                6.0 * (cell / 16.0).powf(slope),
            )
        })
        .collect();
    let tint = ValueNoise::new(&mut rng, width, height, 128.0);
    let objects: Vec<(f32, f32, f32, [f32; 3])> = (0..5)
        .map(|_| {
            let colour = [
                rng.uniform() * 200.0 + 30.0,
                rng.uniform() * 200.0 + 30.0,
                rng.uniform() * 200.0 + 30.0,
            ];
            (
                rng.uniform() * width as f32,
                rng.uniform() * height as f32,
                (0.05 + 0.15 * rng.uniform()) * width as f32,
                colour,
            )
        })
        .collect();
    let mut out = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let (xf, yf) = (x as f32, y as f32);
            let texture: f32 = octaves.iter().map(|(n, a)| n.at(xf, yf) * a).sum::<f32>();
            let sky = yf / height as f32;
            let mut rgb = [90.0 + 110.0 * sky, 120.0 + 70.0 * sky, 200.0 - 90.0 * sky];
            for (cx, cy, r, colour) in &objects {
                let d = ((xf - cx).powi(2) + (yf - cy).powi(2)).sqrt();
                let cover = ((r - d) / 2.0).clamp(0.0, 1.0); // 2-px soft edge
                for c in 0..3 {
                    rgb[c] = rgb[c] * (1.0 - cover) + colour[c] * cover;
                }
            }
            let t = tint.at(xf, yf) * 10.0;
            out.extend_from_slice(&[
                to_u8(rgb[0] + texture + t),
                to_u8(rgb[1] + texture),
                to_u8(rgb[2] + texture - t),
            ]);
        }
    }
    out
}

/// A smooth two-axis colour gradient (sky-like, no texture).
pub fn gradient_image(width: usize, height: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let (u, v) = (x as f32 / width as f32, y as f32 / height as f32);
            out.extend_from_slice(&[
                to_u8(40.0 + 180.0 * u),
                to_u8(60.0 + 150.0 * v),
                to_u8(220.0 - 120.0 * u * v),
            ]);
        }
    }
    out
}

/// Moving shapes over a textured, slowly panning background: a typical generated clip.
pub fn moving_shapes(width: usize, height: usize, count: usize) -> Frames {
    let background = natural_image(7, width + count * 2, height, 0.0);
    let bw = width + count * 2;
    let mut data = Vec::with_capacity(width * height * 3 * count);
    for t in 0..count {
        let tf = t as f32;
        let shapes = [
            // (cx, cy, radius, colour)
            (
                0.2 * width as f32 + 3.0 * tf,
                0.5 * height as f32 + 20.0 * (tf * 0.2).sin(),
                0.08 * width as f32,
                [230.0, 60.0, 50.0],
            ),
            (
                0.7 * width as f32 - 2.0 * tf,
                0.3 * height as f32 + 1.5 * tf,
                0.06 * width as f32,
                [40.0, 200.0, 90.0],
            ),
        ];
        let (rx, ry) = (
            0.5 * width as f32 + 40.0 * (tf * 0.1).cos(),
            0.75 * height as f32,
        );
        for y in 0..height {
            for x in 0..width {
                let src = &background[(y * bw + x + 2 * t) * 3..][..3];
                let mut rgb = [src[0] as f32, src[1] as f32, src[2] as f32];
                let (xf, yf) = (x as f32, y as f32);
                // A rectangle with 1-px soft edges.
                let inside_x = (0.1 * width as f32 - (xf - rx).abs()).clamp(0.0, 1.0);
                let inside_y = (0.06 * height as f32 - (yf - ry).abs()).clamp(0.0, 1.0);
                let cover = inside_x * inside_y;
                for c in 0..3 {
                    rgb[c] = rgb[c] * (1.0 - cover) + [240.0, 220.0, 60.0][c] * cover;
                }
                for (cx, cy, r, colour) in &shapes {
                    let d = ((xf - cx).powi(2) + (yf - cy).powi(2)).sqrt();
                    let cover = ((r - d) / 1.5).clamp(0.0, 1.0);
                    for c in 0..3 {
                        rgb[c] = rgb[c] * (1.0 - cover) + colour[c] * cover;
                    }
                }
                data.extend_from_slice(&[to_u8(rgb[0]), to_u8(rgb[1]), to_u8(rgb[2])]);
            }
        }
    }
    Frames::from_rgb(data, width, height, count).unwrap()
}

/// Independent Gaussian noise per pixel and channel: mean 128, std `sigma`.
pub fn gaussian_noise(seed: u64, width: usize, height: usize, sigma: f32) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..width * height * 3)
        .map(|_| to_u8(128.0 + sigma * rng.normal()))
        .collect()
}

/// Independent uniform noise over the full 0..=255 range per pixel and channel: no spatial or
/// temporal redundancy at all, what a VAE with random weights tends to decode to.
pub fn uniform_noise(seed: u64, width: usize, height: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..width * height * 3)
        .map(|_| (rng.next_u64() >> 56) as u8)
        .collect()
}

/// Blue noise: white noise minus its 3×3 box blur (high frequencies only), per channel.
pub fn blue_noise(seed: u64, width: usize, height: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let white: Vec<f32> = (0..width * height * 3).map(|_| rng.normal()).collect();
    let mut out = vec![0u8; width * height * 3];
    for y in 0..height {
        for x in 0..width {
            for c in 0..3 {
                let mut sum = 0.0;
                let mut n = 0.0;
                for dy in -1i32..=1 {
                    for dx in -1i32..=1 {
                        let (xx, yy) = (x as i32 + dx, y as i32 + dy);
                        if xx >= 0 && yy >= 0 && (xx as usize) < width && (yy as usize) < height {
                            sum += white[(yy as usize * width + xx as usize) * 3 + c];
                            n += 1.0;
                        }
                    }
                }
                let v = white[(y * width + x) * 3 + c] - sum / n;
                out[(y * width + x) * 3 + c] = to_u8(128.0 + 60.0 * v);
            }
        }
    }
    out
}

/// Random "latents" at 1/`stride` resolution, upsampled with smooth interpolation: roughly what random
/// latents look like through a VAE — smooth, but with no structure beyond a few latent pixels.
pub fn latent_noise(seed: u64, width: usize, height: usize, stride: f32) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let channels: Vec<ValueNoise> = (0..3)
        .map(|_| ValueNoise::new(&mut rng, width, height, stride))
        .collect();
    let mut out = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            for n in &channels {
                out.push(to_u8(128.0 + 55.0 * n.at(x as f32, y as f32)));
            }
        }
    }
    out
}

/// A uniform frame.
pub fn flat_image(width: usize, height: usize, rgb: [u8; 3]) -> Vec<u8> {
    (0..width * height).flat_map(|_| rgb).collect()
}

/// Adds `± amplitude` in a checkerboard of `period`-px blocks (the VAE-stride artifact).
pub fn checkerboard(mut rgb: Vec<u8>, width: usize, period: usize, amplitude: f32) -> Vec<u8> {
    for (i, px) in rgb.chunks_exact_mut(3).enumerate() {
        let (x, y) = (i % width, i / width);
        let sign = if (x / period + y / period) & 1 == 0 {
            1.0
        } else {
            -1.0
        };
        for c in px {
            *c = to_u8(*c as f32 + sign * amplitude);
        }
    }
    rgb
}

/// Adds a fixed `period`×`period` tile of `± amplitude` (random signs) repeated over the frame:
/// every latent pixel decoding to the same texture, the VAE-stride grid.
pub fn stride_tile(
    mut rgb: Vec<u8>,
    width: usize,
    period: usize,
    amplitude: f32,
    seed: u64,
) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let tile: Vec<f32> = (0..period * period)
        .map(|_| {
            if rng.uniform() < 0.5 {
                -amplitude
            } else {
                amplitude
            }
        })
        .collect();
    for (i, px) in rgb.chunks_exact_mut(3).enumerate() {
        let (x, y) = (i % width, i / width);
        let d = tile[(y % period) * period + x % period];
        for c in px {
            *c = to_u8(*c as f32 + d);
        }
    }
    rgb
}

/// Repeats one still `count` times, or builds frames from a per-frame generator.
pub fn video(
    width: usize,
    height: usize,
    count: usize,
    frame: impl Fn(usize) -> Vec<u8>,
) -> Frames {
    let data: Vec<u8> = (0..count).flat_map(frame).collect();
    Frames::from_rgb(data, width, height, count).unwrap()
}

/// Peak signal-to-noise ratio between two RGB buffers, in dB.
pub fn psnr(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (255.0f64 * 255.0 / mse).log10()
}
