//! Still images of a video: a thumbnail (PNG or lossless WebP) and a JPEG spritesheet, the variants
//! the OpenAI Videos API serves next to the video.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use vidgen_engine::invalid;

use crate::atomic::write_atomically;
use crate::Frames;

/// Writes the first frame, full size, as a thumbnail: `.png` or `.webp` (lossless), by extension.
pub fn thumbnail(frames: &Frames, path: &Path) -> Result<()> {
    thumbnail_frame(frames, 0, path)
}

/// Writes frame `index` as a PNG or lossless WebP image, by extension.
pub fn thumbnail_frame(frames: &Frames, index: usize, path: &Path) -> Result<()> {
    if index >= frames.len() {
        return Err(invalid!(
            "thumbnail frame: {index} is out of range; the video has {} frames",
            frames.len()
        ));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let format = match ext.as_str() {
        "png" => image::ImageFormat::Png,
        "webp" => image::ImageFormat::WebP,
        _ => {
            return Err(invalid!(
                "thumbnail: {:?} has extension {ext:?}; valid: .png, .webp (lossless)",
                path.display().to_string()
            ))
        }
    };
    let mut bytes = Vec::new();
    rgb_image(frames, index)
        .write_to(&mut std::io::Cursor::new(&mut bytes), format)
        .with_context(|| format!("encoding the {ext} thumbnail"))?;
    write_atomically(path, |f| Ok(f.write_all(&bytes)?))
        .with_context(|| format!("writing {}", path.display()))
}

/// Layout of a [`spritesheet`].
#[derive(Clone, Debug)]
pub struct SpritesheetOptions {
    /// Number of frames shown, sampled evenly from first to last (fewer when the video is shorter).
    pub tiles: usize,
    /// Tiles per row.
    pub columns: usize,
    /// Width of one tile in pixels; the height keeps the video's aspect ratio.
    pub tile_width: usize,
    /// JPEG quality, 1..=100.
    pub quality: u8,
}

impl Default for SpritesheetOptions {
    fn default() -> Self {
        Self {
            tiles: 16,
            columns: 4,
            tile_width: 256,
            quality: 85,
        }
    }
}

/// Writes a JPEG grid of evenly sampled, downscaled frames (row-major, first frame top left).
pub fn spritesheet(frames: &Frames, path: &Path, options: &SpritesheetOptions) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ext != "jpg" && ext != "jpeg" {
        return Err(invalid!(
            "spritesheet: {:?} must end in .jpg or .jpeg",
            path.display().to_string()
        ));
    }
    if options.tiles == 0 || options.columns == 0 || options.tile_width == 0 {
        return Err(invalid!(
            "spritesheet: tiles, columns and tile_width must be at least 1; got {options:?}"
        ));
    }
    if !(1..=100).contains(&options.quality) {
        return Err(invalid!(
            "spritesheet quality: {} is out of range 1..=100",
            options.quality
        ));
    }
    let bytes = spritesheet_jpeg(frames, options)?;
    write_atomically(path, |f| Ok(f.write_all(&bytes)?))
        .with_context(|| format!("writing {}", path.display()))
}

fn spritesheet_jpeg(frames: &Frames, options: &SpritesheetOptions) -> Result<Vec<u8>> {
    let n = frames.len();
    let tiles = options.tiles.min(n);
    let columns = options.columns.min(tiles);
    let rows = tiles.div_ceil(columns);
    let tw = options.tile_width;
    let th = ((tw * frames.height()) as f64 / frames.width() as f64)
        .round()
        .max(1.0) as usize;
    let (sheet_w, sheet_h) = (tw * columns, th * rows);
    if sheet_w > 65_535 || sheet_h > 65_535 {
        return Err(invalid!(
            "spritesheet: {sheet_w}x{sheet_h} exceeds JPEG's 65535-pixel limit; use smaller tiles"
        ));
    }
    let mut sheet = image::RgbImage::new(sheet_w as u32, sheet_h as u32);
    for tile in 0..tiles {
        // Evenly spaced from the first frame to the last.
        let index = if tiles == 1 {
            0
        } else {
            (tile * (n - 1) + (tiles - 1) / 2) / (tiles - 1)
        };
        let small = image::imageops::resize(
            &rgb_image(frames, index),
            tw as u32,
            th as u32,
            image::imageops::FilterType::Triangle,
        );
        let (x, y) = ((tile % columns) * tw, (tile / columns) * th);
        image::imageops::replace(&mut sheet, &small, x as i64, y as i64);
    }
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, options.quality)
        .encode_image(&sheet)
        .context("JPEG encoding")?;
    Ok(out)
}

fn rgb_image(frames: &Frames, index: usize) -> image::RgbImage {
    image::RgbImage::from_raw(
        frames.width() as u32,
        frames.height() as u32,
        frames.frame(index).to_vec(),
    )
    .expect("Frames holds width*height*3 bytes per frame")
}
