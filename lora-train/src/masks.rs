//! Masked loss (`--masks DIR`): a grayscale mask per training image weights the denoising loss
//! per pixel, as kohya's `--masked_loss` does: white counts, black is ignored, grey in between.
//!
//! The mask of an image is the file in DIR with the image's name (any image extension: `a.jpg`
//! takes `DIR/a.png` as well as `DIR/a.jpg`), of the image's own size. It is cut exactly as the
//! image is (the same resize and centre crop to the training size, mirrored with it) and brought
//! to the UNet's input size by averaging over the VAE's pixel blocks (kohya: `interpolate(...,
//! mode="area")`); the squared error at each latent position is multiplied by it before the
//! mean. Random crops are refused with masks (the crop window would have to be shared).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use image::DynamicImage;
use lora_core::Rng;

use crate::config::Crop;
use crate::dataset::{cover_and_crop, decode_image, Dataset, IMAGE_EXTENSIONS};

/// The mask file of each dataset item, in order; every image must have one, of its size.
pub fn find_masks(dir: &Path, dataset: &Dataset) -> Result<Vec<PathBuf>> {
    ensure!(
        dir.is_dir(),
        "--masks {}: not a folder of masks",
        dir.display()
    );
    let mut found = Vec::with_capacity(dataset.items.len());
    let mut problems = Vec::new();
    for item in &dataset.items {
        let name = item.image.name();
        let stem = Path::new(&name)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or(name.clone());
        let candidates: Vec<PathBuf> = IMAGE_EXTENSIONS
            .iter()
            .map(|e| dir.join(format!("{stem}.{e}")))
            .filter(|p| p.is_file())
            .collect();
        match candidates.as_slice() {
            [one] => found.push(one.clone()),
            [] => problems.push(format!(
                "{}: no mask {}/{stem}.png (or .jpg, .jpeg, .webp)",
                item.image,
                dir.display()
            )),
            several => problems.push(format!(
                "{}: several masks ({}): keep one",
                item.image,
                several
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
    ensure!(
        problems.is_empty(),
        "--masks: {} image(s) without a usable mask:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
    Ok(found)
}

/// Reads `path` as a grayscale mask for an image of `image_size` pixels.
pub fn read_mask(path: &Path, image_size: (usize, usize)) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mask = decode_image(&bytes).with_context(|| format!("mask {}", path.display()))?;
    let size = (mask.width() as usize, mask.height() as usize);
    ensure!(
        size == image_size,
        "mask {} is {}×{} pixels; its image is {}×{}",
        path.display(),
        size.0,
        size.1,
        image_size.0,
        image_size.1
    );
    Ok(DynamicImage::ImageLuma8(mask.to_luma8()))
}

/// The mask cut to the training `size` (as the image is, mirrored if `flip`) and averaged over
/// `factor`×`factor` blocks: `[1, h / factor, w / factor]` weights in [0, 1].
pub fn mask_weights(
    mask: &DynamicImage,
    size: (usize, usize),
    flip: bool,
    factor: usize,
    device: &Device,
) -> Result<Tensor> {
    let (w, h) = size;
    ensure!(
        factor >= 1 && w.is_multiple_of(factor) && h.is_multiple_of(factor),
        "a {w}×{h} training size is not a multiple of the model's {factor}-pixel latent"
    );
    // Centre crops draw nothing from the generator.
    let (mut cut, _) = cover_and_crop(mask, size, Crop::Center, &mut Rng::new(0));
    if flip {
        cut = cut.fliph();
    }
    let luma = cut.to_luma8();
    let (lw, lh) = (w / factor, h / factor);
    let mut values = vec![0f32; lw * lh];
    for (x, y, pixel) in luma.enumerate_pixels() {
        values[(y as usize / factor) * lw + x as usize / factor] += f32::from(pixel.0[0]);
    }
    let scale = 1.0 / (255.0 * (factor * factor) as f32);
    for v in &mut values {
        *v *= scale;
    }
    Ok(Tensor::from_vec(values, (1, lh, lw), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma};

    #[test]
    fn weights_average_blocks_and_follow_the_flip() {
        // Left half white, right half black, 16×8 → blocks of 4: [1, 1, 0, 0] per row.
        let mask = DynamicImage::ImageLuma8(GrayImage::from_fn(16, 8, |x, _| {
            Luma([if x < 8 { 255 } else { 0 }])
        }));
        let weights = mask_weights(&mask, (16, 8), false, 4, &Device::Cpu).unwrap();
        assert_eq!(weights.dims(), [1, 2, 4]);
        assert_eq!(
            weights.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
        );
        let flipped = mask_weights(&mask, (16, 8), true, 4, &Device::Cpu).unwrap();
        assert_eq!(
            flipped.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
        );
        // A block half grey: the mean.
        let grey = DynamicImage::ImageLuma8(GrayImage::from_fn(4, 4, |x, _| {
            Luma([if x < 2 { 255 } else { 0 }])
        }));
        let one = mask_weights(&grey, (4, 4), false, 4, &Device::Cpu).unwrap();
        assert_eq!(one.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0.5]);
    }
}
