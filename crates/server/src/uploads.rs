//! Conditioning-image uploads. The checks themselves are the engine's (one implementation for the
//! CLI and the server): JPEG, PNG or WebP by content, byte and pixel limits before decoding, EXIF
//! orientation applied, metadata dropped. Here: storing the result under a server-chosen name,
//! data URLs, and keeping every path inside the data directory.

use std::path::{Component, Path, PathBuf};

use base64::Engine as _;
use vidgen_engine::invalid;
use vidgen_engine::pipeline::image::{sanitize_to_png, ImageLimits};

/// Checks, decodes, orients and re-encodes `bytes` to `dest` as a metadata-free PNG. `field` names
/// the request field in errors. CPU-bound: call from a blocking thread.
pub fn sanitize_image(
    bytes: &[u8],
    field: &str,
    limits: &ImageLimits,
    dest: &Path,
) -> anyhow::Result<()> {
    let png = sanitize_to_png(bytes, limits).map_err(|e| {
        if vidgen_engine::error::is_invalid_input(&e) {
            // The engine names the field `image`; the API's field may be called otherwise.
            let msg = format!("{e:#}");
            invalid!("{field}: {}", msg.strip_prefix("image: ").unwrap_or(&msg))
        } else {
            e
        }
    })?;
    std::fs::write(dest, png).map_err(|e| anyhow::anyhow!("writing {}: {e}", dest.display()))
}

/// Decodes a `data:image/...;base64,...` URL. Remote URLs are refused: the server fetches nothing.
pub fn decode_data_url(url: &str, field: &str, max_bytes: usize) -> anyhow::Result<Vec<u8>> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(invalid!(
            "{field}: only base64 data URLs (data:image/png;base64,...) are accepted; this server \
             does not fetch remote URLs"
        ));
    };
    let Some((meta, payload)) = rest.split_once(',') else {
        return Err(invalid!("{field}: malformed data URL (no comma)"));
    };
    if !meta.ends_with(";base64") {
        return Err(invalid!(
            "{field}: data URL must be base64-encoded (data:<type>;base64,...)"
        ));
    }
    // Base64 is 4/3 of the bytes: refuse before decoding anything too large.
    if payload.len() / 4 * 3 > max_bytes + 3 {
        return Err(invalid!("{field}: image is larger than {max_bytes} bytes"));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| invalid!("{field}: invalid base64 in data URL: {e}"))?;
    if bytes.len() > max_bytes {
        return Err(invalid!("{field}: image is larger than {max_bytes} bytes"));
    }
    Ok(bytes)
}

/// `root/rel`, refused unless `rel` is a plain relative path (no `..`, no root, no prefix) and the
/// result, with symlinks resolved as far as it exists, stays inside `root`.
pub fn path_inside(root: &Path, rel: &Path) -> anyhow::Result<PathBuf> {
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        anyhow::bail!("path `{}` is not a plain relative path", rel.display());
    }
    let root = root.canonicalize()?;
    let joined = root.join(rel);
    // Resolve the deepest existing ancestor (symlinks included) and check it is still inside.
    let mut probe = joined.as_path();
    loop {
        if let Ok(real) = probe.canonicalize() {
            if !real.starts_with(&root) {
                anyhow::bail!("path `{}` leaves the data directory", rel.display());
            }
            break;
        }
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    Ok(joined)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Cursor;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 200, 30]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn limits(max_pixels: u64) -> ImageLimits {
        ImageLimits {
            max_bytes: 1 << 20,
            max_pixels,
        }
    }

    #[test]
    fn accepts_png_and_rewrites_it() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("input.png");
        sanitize_image(&png(8, 6), "input_reference", &limits(1000), &dest).unwrap();
        let back = image::open(&dest).unwrap();
        assert_eq!((back.width(), back.height()), (8, 6));
    }

    #[test]
    fn refuses_non_images_and_bombs_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("input.png");
        let err = sanitize_image(b"GIF89a....", "input_reference", &limits(1000), &dest)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("input_reference: ") && err.contains("JPEG, PNG, WebP"),
            "{err}"
        );
        let err = sanitize_image(&png(100, 100), "input_reference", &limits(1000), &dest)
            .unwrap_err()
            .to_string();
        assert!(err.contains("megapixels"), "{err}");
        assert!(!dest.exists());
    }

    #[test]
    fn data_urls() {
        let url = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(png(2, 2))
        );
        assert_eq!(decode_data_url(&url, "f", 1 << 20).unwrap(), png(2, 2));
        assert!(decode_data_url("https://example.com/a.png", "f", 10).is_err());
        assert!(decode_data_url(&url, "f", 10)
            .unwrap_err()
            .to_string()
            .contains("larger"));
    }

    #[test]
    fn paths_stay_inside() {
        let dir = tempfile::tempdir().unwrap();
        assert!(path_inside(dir.path(), Path::new("jobs/video_1/input.png")).is_ok());
        for bad in ["../x", "/etc/passwd", "jobs/../../x", ""] {
            assert!(path_inside(dir.path(), Path::new(bad)).is_err(), "{bad}");
        }
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        assert!(path_inside(dir.path(), Path::new("link/x")).is_err());
    }
}
