//! The image folders the metrics read: which files count as images, in which order, and how each
//! is decoded (as PIL's `Image.open(path).convert("RGB")`, which pytorch-fid and torch-fidelity
//! use: alpha dropped, not composited; grey replicated to three channels).

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
    let decoded = image::ImageReader::open(path)
        .with_context(|| format!("cannot open image {}", path.display()))?
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
