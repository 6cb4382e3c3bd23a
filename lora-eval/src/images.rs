//! The image folders the metrics read: which files count as images, in which order, and how each
//! is decoded (as PIL's `Image.open(path).convert("RGB")`, which pytorch-fid and torch-fidelity
//! use: alpha dropped, not composited; grey replicated to three channels).
//!
//! JPEGs go through libjpeg-turbo's decoder (the `mozjpeg` crate: islow IDCT, fancy upsampling),
//! which gives PIL's pixels exactly; the `image` crate's decoder differs by a level or two in
//! places, which moved a small set's FID by 1.3%. A JPEG that decoder refuses (CMYK, say) is
//! read by the `image` crate instead.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use image::RgbImage;

/// pytorch-fid's extensions; matched without regard to case.
pub const IMAGE_EXTENSIONS: [&str; 9] = [
    "bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp",
];

/// The image files directly inside `dir`, sorted by name (pytorch-fid's order). An error if the
/// folder is missing or holds none.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    ensure!(dir.is_dir(), "{} is not a folder of images", dir.display());
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        if is_image && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    if files.is_empty() {
        bail!(
            "{} holds no images (looked for {})",
            dir.display(),
            IMAGE_EXTENSIONS.join(", ")
        );
    }
    Ok(files)
}

/// Decodes one image as 8-bit RGB, naming the file when it cannot.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read image {}", path.display()))?;
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        if let Some(rgb) = libjpeg_rgb(&bytes) {
            return Ok(rgb);
        }
    }
    let decoded = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .with_context(|| format!("cannot read image {}", path.display()))?
        .decode()
        .with_context(|| format!("cannot decode image {}", path.display()))?;
    let rgb = decoded.to_rgb8();
    ensure!(
        rgb.width() > 0 && rgb.height() > 0,
        "image {} is empty ({}×{})",
        path.display(),
        rgb.width(),
        rgb.height()
    );
    Ok(rgb)
}

/// A JPEG decoded to RGB by libjpeg-turbo, or `None` where it cannot (the caller then tries the
/// `image` crate, which names the file in its error). libjpeg reports fatal errors by unwinding
/// through the `mozjpeg` crate, hence the `catch_unwind`.
fn libjpeg_rgb(bytes: &[u8]) -> Option<RgbImage> {
    let decode = || -> std::io::Result<RgbImage> {
        let mut started = mozjpeg::Decompress::new_mem(bytes)?.rgb()?;
        let (width, height) = (started.width() as u32, started.height() as u32);
        let pixels: Vec<[u8; 3]> = started.read_scanlines()?;
        started.finish()?;
        let raw = pixels.into_iter().flatten().collect();
        RgbImage::from_raw(width, height, raw)
            .ok_or_else(|| std::io::Error::other("short pixel buffer"))
    };
    std::panic::catch_unwind(decode).ok()?.ok()
}
