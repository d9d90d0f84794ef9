//! Conditioning images: decode (JPEG, PNG, WebP), apply the EXIF orientation, drop everything but
//! the pixels, resize + centre-crop to the video size, and hand the VAE a `[3, H, W]` tensor in
//! [-1, 1].
//!
//! Untrusted input (the server passes uploads through here), so the file size and the header's
//! pixel count are checked before any pixel is decoded: a 100 000 × 100 000 PNG of a few hundred
//! bytes is refused without allocating anything.
//!
//! Resizing follows the official Wan2.2 TI2V pipeline (`wan/textimage2video.py`, wan-facts §7.5):
//! scale by `max(W / w, H / h)` so the image covers the target, resize to
//! `(round(w · scale), round(h · scale))` with Lanczos (Python's `round`: ties to even), then crop
//! the centre `W × H` box at `((rw − W) // 2, (rh − H) // 2)`. The reference resizes with PIL's
//! 8-bit Lanczos; ours is `image`'s Lanczos3 (same kernel and support, also widened when
//! downscaling), so pixels agree to about ±1 grey level (tested against PIL-made fixtures).

use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};

use crate::invalid;

/// Formats accepted for conditioning images (the only codecs compiled in).
pub const ACCEPTED_FORMATS: &str = "JPEG, PNG, WebP";

/// Limits on untrusted images, checked before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted file, in bytes.
    pub max_bytes: u64,
    /// Largest accepted width × height (from the header, before decoding).
    pub max_pixels: u64,
}

impl Default for ImageLimits {
    /// 50 MiB and 64 megapixels (8192 × 8192): every camera photo, while a decoded RGBA buffer
    /// stays under 256 MiB.
    fn default() -> Self {
        Self {
            max_bytes: 50 * 1024 * 1024,
            max_pixels: 8192 * 8192,
        }
    }
}

/// Header facts of an image, read without decoding its pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub format: ImageFormat,
    /// Stored width and height (before the EXIF orientation is applied).
    pub width: u32,
    pub height: u32,
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        _ => "unsupported",
    }
}

/// Reads an image file with the size limit applied before the whole file is read.
pub fn read_image_file(path: &Path, limits: &ImageLimits) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| invalid!("image: cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(invalid!("image: {} is not a file", path.display()));
    }
    check_byte_size(meta.len(), limits)?;
    std::fs::read(path).map_err(|e| invalid!("image: cannot read {}: {e}", path.display()))
}

fn check_byte_size(len: u64, limits: &ImageLimits) -> Result<()> {
    if len > limits.max_bytes {
        return Err(invalid!(
            "image: the file is {:.1} MiB, the limit is {:.1} MiB",
            len as f64 / (1024.0 * 1024.0),
            limits.max_bytes as f64 / (1024.0 * 1024.0)
        ));
    }
    if len == 0 {
        return Err(invalid!(
            "image: the file is empty (valid formats: {ACCEPTED_FORMATS})"
        ));
    }
    Ok(())
}

fn reader<'a>(bytes: &'a [u8], limits: &ImageLimits) -> Result<ImageReader<Cursor<&'a [u8]>>> {
    check_byte_size(bytes.len() as u64, limits)?;
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .context("reading image header")?;
    match reader.format() {
        Some(ImageFormat::Jpeg | ImageFormat::Png | ImageFormat::WebP) => {}
        Some(other) => {
            return Err(invalid!(
                "image: {other:?} is not accepted (valid formats: {ACCEPTED_FORMATS})"
            ))
        }
        None => {
            return Err(invalid!(
                "image: not a recognised image file (valid formats: {ACCEPTED_FORMATS})"
            ))
        }
    }
    // A second line of defence for allocations inside the decoders (e.g. large metadata chunks):
    // room for the decoded RGBA8 image plus slack.
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(4).saturating_add(64 << 20));
    reader.limits(decoder_limits);
    Ok(reader)
}

fn check_pixels(width: u32, height: u32, limits: &ImageLimits) -> Result<()> {
    let pixels = u64::from(width) * u64::from(height);
    if width == 0 || height == 0 {
        return Err(invalid!("image: {width}x{height} has no pixels"));
    }
    if pixels > limits.max_pixels {
        return Err(invalid!(
            "image: {width}x{height} is {:.1} megapixels, the limit is {:.1} megapixels; downscale it first",
            pixels as f64 / 1e6,
            limits.max_pixels as f64 / 1e6
        ));
    }
    Ok(())
}

fn decode_error(e: image::ImageError) -> anyhow::Error {
    invalid!("image: cannot decode: {e} (valid formats: {ACCEPTED_FORMATS})")
}

/// Format and stored dimensions from the header alone; enforces the limits. Cheap enough to run
/// while validating a request, before any model is loaded.
pub fn probe_image(bytes: &[u8], limits: &ImageLimits) -> Result<ImageHeader> {
    let reader = reader(bytes, limits)?;
    let format = reader.format().expect("checked by reader()");
    let decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    check_pixels(width, height, limits)?;
    Ok(ImageHeader {
        format,
        width,
        height,
    })
}

/// Decodes to 8-bit RGB with the EXIF orientation applied (all 8 values). Alpha is dropped, not
/// composited, as PIL's `convert("RGB")` in the reference does; every metadata chunk (EXIF, ICC,
/// XMP, text) is discarded.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage> {
    let reader = reader(bytes, limits)?;
    let format = reader.format().expect("checked by reader()");
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    check_pixels(width, height, limits)?;
    // A broken EXIF block must not make an otherwise valid photo unusable: keep the stored order.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| {
        invalid!(
            "image: cannot decode {} data: {e} (valid formats: {ACCEPTED_FORMATS})",
            format_name(format)
        )
    })?;
    image.apply_orientation(orientation);
    Ok(image.to_rgb8())
}

/// Python's `round()` for the non-negative sizes used here (ties go to the even neighbour).
fn py_round(x: f64) -> u32 {
    x.round_ties_even() as u32
}

/// Scales `image` to cover `width × height` and crops the centre (official TI2V rule, see the
/// module docs).
pub fn resize_center_crop(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (iw, ih) = image.dimensions();
    let scale = f64::max(
        f64::from(width) / f64::from(iw),
        f64::from(height) / f64::from(ih),
    );
    // round(iw · scale) is the target for the covering side; the max guards float error.
    let rw = py_round(f64::from(iw) * scale).max(width);
    let rh = py_round(f64::from(ih) * scale).max(height);
    let resized = if (rw, rh) == (iw, ih) {
        image.clone()
    } else {
        imageops::resize(image, rw, rh, FilterType::Lanczos3)
    };
    let x1 = (rw - width) / 2;
    let y1 = (rh - height) / 2;
    imageops::crop_imm(&resized, x1, y1, width, height).to_image()
}

/// `[3, H, W]` f32 in [-1, 1]: `(v / 255 − 0.5) / 0.5`, as torchvision's `to_tensor` followed by
/// `sub_(0.5).div_(0.5)` in the reference.
pub fn image_to_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    let plane = (w * h) as usize;
    let mut data = vec![0f32; 3 * plane];
    for (i, px) in image.pixels().enumerate() {
        for c in 0..3 {
            data[c * plane + i] = (f32::from(px.0[c]) / 255.0 - 0.5) / 0.5;
        }
    }
    Ok(Tensor::from_vec(data, (3, h as usize, w as usize), device)?)
}

/// The whole conditioning path for a file: limits, decode, orientation, resize + crop, tensor.
pub fn load_conditioning_image(
    path: &Path,
    width: u32,
    height: u32,
    limits: &ImageLimits,
    device: &Device,
) -> Result<Tensor> {
    let bytes = read_image_file(path, limits)?;
    let image =
        decode_image(&bytes, limits).with_context(|| format!("image {}", path.display()))?;
    image_to_tensor(&resize_center_crop(&image, width, height), device)
}

/// Re-encodes an uploaded image as a PNG holding only its pixels (8-bit RGB, orientation applied,
/// no EXIF/GPS/ICC/text chunks), for the server to store and show.
pub fn sanitize_to_png(bytes: &[u8], limits: &ImageLimits) -> Result<Vec<u8>> {
    let image = decode_image(bytes, limits)?;
    let mut out = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .context("encoding sanitised PNG")?;
    Ok(out)
}

/// The official TI2V output size for an image of `w × h` within `expected_area` pixels, both
/// sides multiples of (`dw`, `dh`) (`best_output_size` in `wan/utils/utils.py`): the candidates
/// "width first" and "height first" are floored to the multiples, and the one whose aspect ratio
/// is closer to the image's wins (ties go to "height first").
pub fn best_output_size(w: u32, h: u32, dw: u32, dh: u32, expected_area: u64) -> (u32, u32) {
    let (w, h, dw, dh, area) = (
        f64::from(w),
        f64::from(h),
        f64::from(dw),
        f64::from(dh),
        expected_area as f64,
    );
    let ratio = w / h;
    let ow = (area * ratio).sqrt();
    let oh = area / ow;
    let ow1 = (ow / dw).floor() * dw;
    let oh1 = (area / ow1 / dh).floor() * dh;
    let oh2 = (oh / dh).floor() * dh;
    let ow2 = (area / oh2 / dw).floor() * dw;
    let off = |r: f64| f64::max(ratio / r, r / ratio);
    if off(ow1 / oh1) < off(ow2 / oh2) {
        (ow1 as u32, oh1 as u32)
    } else {
        (ow2 as u32, oh2 as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::is_invalid_input;
    use image::codecs::jpeg::JpegEncoder;
    use image::codecs::png::PngEncoder;
    use image::codecs::webp::WebPEncoder;
    use image::{ExtendedColorType, ImageEncoder, Rgb, RgbaImage};

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/image_resize"
    );

    #[test]
    fn python_round_ties_to_even() {
        assert_eq!(py_round(2.5), 2);
        assert_eq!(py_round(3.5), 4);
        assert_eq!(py_round(2.4999), 2);
    }

    #[test]
    fn best_output_size_matches_reference_values() {
        // Values computed with the reference function (wan/utils/utils.py) in Python.
        assert_eq!(best_output_size(1280, 704, 32, 32, 704 * 1280), (1280, 704));
        let area = 704 * 1280;
        assert_eq!(best_output_size(1000, 1000, 32, 32, area), (960, 928));
        assert_eq!(best_output_size(640, 480, 32, 32, area), (1088, 800));
        assert_eq!(best_output_size(480, 640, 32, 32, area), (800, 1088));
        assert_eq!(best_output_size(1920, 1080, 32, 32, area), (1248, 704));
        assert_eq!(best_output_size(700, 300, 32, 32, area), (1440, 608));
    }

    fn fixture(name: &str) -> RgbImage {
        let bytes = std::fs::read(format!("{FIXTURES}/{name}")).unwrap();
        decode_image(&bytes, &ImageLimits::default()).unwrap()
    }

    /// PIL (the reference's `Image.LANCZOS`) and `image`'s Lanczos3 round differently (PIL keeps
    /// 8-bit fixed-point intermediates), so pixels may differ by a few levels, more at the
    /// ringing of sharp edges when upscaling (measured: max 12 levels at 160x96, mean 0.23); the
    /// crop window must be identical, which a one-pixel shift would break: it moves the mean
    /// difference far above 0.5.
    #[test]
    fn resize_and_crop_match_pil() {
        let input = fixture("input.png");
        for (w, h) in [(32, 32), (48, 16), (16, 48), (64, 40), (160, 96), (97, 61)] {
            let expected = fixture(&format!("expected_{w}x{h}.png"));
            let ours = resize_center_crop(&input, w, h);
            assert_eq!(ours.dimensions(), (w, h));
            let diffs: Vec<i32> = ours
                .as_raw()
                .iter()
                .zip(expected.as_raw())
                .map(|(a, b)| (i32::from(*a) - i32::from(*b)).abs())
                .collect();
            let max = *diffs.iter().max().unwrap();
            let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
            eprintln!("{w}x{h}: max abs diff {max}, mean {mean:.3}");
            assert!(max <= 16 && mean < 0.5, "{w}x{h}: max {max}, mean {mean}");
        }
    }

    #[test]
    fn tensor_is_channel_major_in_minus_one_to_one() {
        let mut img = RgbImage::new(2, 1);
        img.put_pixel(0, 0, Rgb([0, 255, 51]));
        img.put_pixel(1, 0, Rgb([255, 0, 204]));
        let t = image_to_tensor(&img, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 1, 2]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let expect = [
            -1.0,
            1.0,
            1.0,
            -1.0,
            51.0 / 127.5 - 1.0,
            204.0 / 127.5 - 1.0,
        ];
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{v:?}");
        }
    }

    /// A 48×32 picture of six 16×16 blocks in distinct colours: no symmetry, so each of the 8
    /// orientations gives a different result.
    const BLOCK_COLOURS: [[u8; 3]; 6] = [
        [230, 30, 30],
        [30, 200, 40],
        [40, 60, 230],
        [240, 230, 40],
        [30, 220, 230],
        [220, 40, 220],
    ];

    fn blocks() -> RgbImage {
        RgbImage::from_fn(48, 32, |x, y| {
            Rgb(BLOCK_COLOURS[(y / 16 * 3 + x / 16) as usize])
        })
    }

    /// The stored pixel that orientation `o` shows at display position (x, y), per the EXIF spec
    /// (written out independently of the `image` crate).
    fn stored_position(o: u16, x: u32, y: u32, w: u32, h: u32) -> (u32, u32) {
        match o {
            1 => (x, y),
            2 => (w - 1 - x, y),
            3 => (w - 1 - x, h - 1 - y),
            4 => (x, h - 1 - y),
            5 => (y, x),
            6 => (y, h - 1 - x),
            7 => (w - 1 - y, h - 1 - x),
            8 => (w - 1 - y, x),
            _ => unreachable!(),
        }
    }

    /// A TIFF-format EXIF block with one IFD entry: Orientation (0x0112, SHORT).
    fn exif_orientation(value: u16, big_endian: bool) -> Vec<u8> {
        let u16b = |v: u16| {
            if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let u32b = |v: u32| {
            if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let mut t = Vec::new();
        t.extend_from_slice(if big_endian { b"MM" } else { b"II" });
        t.extend_from_slice(&u16b(42));
        t.extend_from_slice(&u32b(8));
        t.extend_from_slice(&u16b(1));
        t.extend_from_slice(&u16b(0x0112));
        t.extend_from_slice(&u16b(3));
        t.extend_from_slice(&u32b(1));
        t.extend_from_slice(&u16b(value));
        t.extend_from_slice(&[0, 0]);
        t.extend_from_slice(&u32b(0));
        t
    }

    /// A JPEG of `img` with an APP1 EXIF segment spliced in by hand right after SOI.
    fn jpeg_with_orientation(img: &RgbImage, orientation: u16, big_endian: bool) -> Vec<u8> {
        let mut plain = Vec::new();
        JpegEncoder::new_with_quality(&mut plain, 95)
            .write_image(
                img.as_raw(),
                img.width(),
                img.height(),
                ExtendedColorType::Rgb8,
            )
            .unwrap();
        let mut payload = b"Exif\0\0".to_vec();
        payload.extend(exif_orientation(orientation, big_endian));
        let mut out = plain[..2].to_vec(); // SOI
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
        out.extend(payload);
        out.extend_from_slice(&plain[2..]);
        out
    }

    fn assert_oriented(decoded: &RgbImage, orientation: u16, tolerance: i32) {
        let src = blocks();
        let (w, h) = src.dimensions();
        let rotated = orientation >= 5;
        let (dw, dh) = if rotated { (h, w) } else { (w, h) };
        assert_eq!(decoded.dimensions(), (dw, dh), "orientation {orientation}");
        // Block centres only: JPEG blurs the block edges.
        for by in 0..dh / 16 {
            for bx in 0..dw / 16 {
                let (x, y) = (bx * 16 + 8, by * 16 + 8);
                let (sx, sy) = stored_position(orientation, x, y, w, h);
                let want = src.get_pixel(sx, sy).0;
                let got = decoded.get_pixel(x, y).0;
                for c in 0..3 {
                    assert!(
                        (i32::from(want[c]) - i32::from(got[c])).abs() <= tolerance,
                        "orientation {orientation}: block ({bx},{by}) is {got:?}, expected {want:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn jpeg_exif_orientation_all_eight_values() {
        let src = blocks();
        for orientation in 1..=8u16 {
            for big_endian in [true, false] {
                let bytes = jpeg_with_orientation(&src, orientation, big_endian);
                let decoded = decode_image(&bytes, &ImageLimits::default()).unwrap();
                assert_oriented(&decoded, orientation, 12);
            }
        }
    }

    #[test]
    fn png_and_webp_exif_orientation() {
        let src = blocks();
        for orientation in [3u16, 6, 7] {
            let mut png = Vec::new();
            let mut enc = PngEncoder::new(&mut png);
            enc.set_exif_metadata(exif_orientation(orientation, false))
                .unwrap();
            enc.write_image(src.as_raw(), 48, 32, ExtendedColorType::Rgb8)
                .unwrap();
            assert_oriented(
                &decode_image(&png, &ImageLimits::default()).unwrap(),
                orientation,
                0,
            );

            let mut webp = Vec::new();
            let mut enc = WebPEncoder::new_lossless(&mut webp);
            enc.set_exif_metadata(exif_orientation(orientation, true))
                .unwrap();
            enc.write_image(src.as_raw(), 48, 32, ExtendedColorType::Rgb8)
                .unwrap();
            assert_oriented(
                &decode_image(&webp, &ImageLimits::default()).unwrap(),
                orientation,
                0,
            );
        }
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        c.extend_from_slice(&body);
        c.extend_from_slice(&crc32(&body).to_be_bytes());
        c
    }

    /// A valid-looking PNG header claiming `w × h` RGB pixels, with a token IDAT.
    fn png_header_only(w: u32, h: u32) -> Vec<u8> {
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = w.to_be_bytes().to_vec();
        ihdr.extend_from_slice(&h.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        png.extend(png_chunk(b"IHDR", &ihdr));
        png.extend(png_chunk(
            b"IDAT",
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ));
        png.extend(png_chunk(b"IEND", &[]));
        png
    }

    #[test]
    fn decompression_bomb_is_refused_from_the_header() {
        let bomb = png_header_only(100_000, 100_000);
        assert!(bomb.len() < 100);
        let started = std::time::Instant::now();
        for result in [
            probe_image(&bomb, &ImageLimits::default()).map(|_| ()),
            decode_image(&bomb, &ImageLimits::default()).map(|_| ()),
            sanitize_to_png(&bomb, &ImageLimits::default()).map(|_| ()),
        ] {
            let err = result.unwrap_err();
            assert!(is_invalid_input(&err), "{err:#}");
            let msg = format!("{err:#}");
            assert!(
                msg.contains("100000x100000") && msg.contains("megapixels"),
                "{msg}"
            );
        }
        assert!(
            started.elapsed().as_secs_f64() < 1.0,
            "took {:?}",
            started.elapsed()
        );
        // Just within the limit: the header passes, the (fake) data then fails to decode.
        let limits = ImageLimits {
            max_bytes: 1 << 20,
            max_pixels: 64 * 64,
        };
        assert_eq!(
            probe_image(&png_header_only(64, 64), &limits)
                .unwrap()
                .width,
            64
        );
        assert!(probe_image(&png_header_only(65, 64), &limits).is_err());
    }

    #[test]
    fn file_size_limit_and_formats() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.png");
        let mut png = Vec::new();
        blocks()
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        std::fs::write(&path, &png).unwrap();
        let tight = ImageLimits {
            max_bytes: 100,
            max_pixels: 1 << 20,
        };
        let err = read_image_file(&path, &tight).unwrap_err();
        assert!(
            is_invalid_input(&err) && err.to_string().contains("limit"),
            "{err}"
        );
        assert!(decode_image(&png, &tight).is_err());
        assert!(read_image_file(&path, &ImageLimits::default()).is_ok());

        let missing =
            read_image_file(&dir.path().join("nope.jpg"), &ImageLimits::default()).unwrap_err();
        assert!(
            is_invalid_input(&missing) && missing.to_string().starts_with("image:"),
            "{missing}"
        );

        for junk in [
            &b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"[..],
            b"hello, this is not an image",
        ] {
            let err = decode_image(junk, &ImageLimits::default()).unwrap_err();
            assert!(is_invalid_input(&err), "{err:#}");
            assert!(format!("{err:#}").contains("JPEG, PNG, WebP"), "{err:#}");
        }
        let mut truncated = jpeg_with_orientation(&blocks(), 1, true);
        truncated.truncate(truncated.len() / 3);
        let err = decode_image(&truncated, &ImageLimits::default());
        // zune-jpeg may fill a truncated scan with grey rather than fail; either is acceptable,
        // but it must never panic and must give the full size when it succeeds.
        if let Ok(img) = err {
            assert_eq!(img.dimensions(), (48, 32));
        }
    }

    #[test]
    fn alpha_is_dropped_not_composited() {
        let rgba = RgbaImage::from_fn(4, 4, |x, _| image::Rgba([200, 100, 50, (x * 60) as u8]));
        let mut png = Vec::new();
        rgba.write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let rgb = decode_image(&png, &ImageLimits::default()).unwrap();
        assert!(rgb.pixels().all(|p| p.0 == [200, 100, 50]));
    }

    /// PNG chunk types in order.
    fn png_chunk_types(png: &[u8]) -> Vec<String> {
        let mut types = Vec::new();
        let mut at = 8;
        while at + 8 <= png.len() {
            let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
            types.push(String::from_utf8_lossy(&png[at + 4..at + 8]).into_owned());
            at += 12 + len;
        }
        types
    }

    #[test]
    fn sanitised_png_holds_only_oriented_pixels() {
        // A PNG carrying EXIF (orientation 6) and an ICC profile, and a JPEG with EXIF.
        let src = blocks();
        let mut png = Vec::new();
        let mut enc = PngEncoder::new(&mut png);
        enc.set_exif_metadata(exif_orientation(6, true)).unwrap();
        let _ = enc.set_icc_profile(vec![0u8; 200]);
        enc.write_image(src.as_raw(), 48, 32, ExtendedColorType::Rgb8)
            .unwrap();
        assert!(png_chunk_types(&png).iter().any(|t| t == "eXIf"));
        let jpeg = jpeg_with_orientation(&src, 8, false);
        for (input, orientation, tolerance) in [(png, 6, 0), (jpeg, 8, 12)] {
            let clean = sanitize_to_png(&input, &ImageLimits::default()).unwrap();
            let types = png_chunk_types(&clean);
            assert!(
                types
                    .iter()
                    .all(|t| matches!(t.as_str(), "IHDR" | "IDAT" | "IEND")),
                "{types:?}"
            );
            let back = decode_image(&clean, &ImageLimits::default()).unwrap();
            assert_oriented(&back, orientation, tolerance);
        }
    }

    #[test]
    fn conditioning_image_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("photo.jpg");
        std::fs::write(&path, jpeg_with_orientation(&blocks(), 6, true)).unwrap();
        // Oriented 32×48 portrait covering 64×32: scale 2 → 64×96, crop rows 32..64.
        let t =
            load_conditioning_image(&path, 64, 32, &ImageLimits::default(), &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 32, 64]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
    }
}
