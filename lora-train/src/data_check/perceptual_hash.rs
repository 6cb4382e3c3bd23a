//! Fingerprints of decoded images: one for identical pixels (exact duplicates) and a perceptual
//! hash for pictures that look the same (near-duplicates: re-encoded, resized, slightly edited).
//!
//! The perceptual hash is the DCT hash ("pHash"): the image in grey, shrunk to 32×32, its 2-D
//! DCT-II, and one bit per coefficient of the 8×8 lowest frequencies, set where the coefficient
//! is above their median. Low frequencies carry the picture's layout and survive resizing,
//! compression and small edits, so copies differ in a few bits while unrelated pictures differ
//! in about half of the 64.

use std::f64::consts::PI;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};

use image::imageops::FilterType;
use image::DynamicImage;

/// Side of the grey image the DCT is taken of.
const SHRUNK: usize = 32;
/// Side of the block of lowest frequencies that makes the 64 bits.
const KEPT: usize = 8;

/// The most bits two perceptual hashes may differ in for their images to be near-duplicates.
/// Copies that were resized, re-encoded as JPEG or lightly retouched stay within a few bits;
/// 6 of 64 is a usual cut-off for the DCT hash, and unrelated images differ in about 32.
pub const NEAR_DUPLICATE_BITS: u32 = 6;

/// Hashes identical pixels to the same key, in one process: two keyed hashes (random keys, per
/// run) make a 128-bit key, so different images sharing one is not a practical concern.
#[derive(Default)]
pub struct PixelHasher {
    keys: [RandomState; 2],
}

impl PixelHasher {
    /// The key of the image's size and RGBA pixels (8 bits a channel, as training reads them).
    pub fn key(&self, image: &DynamicImage) -> u128 {
        let rgba = image.to_rgba8();
        let [low, high] = self.keys.each_ref().map(|state| {
            let mut hasher = state.build_hasher();
            (rgba.width(), rgba.height()).hash(&mut hasher);
            hasher.write(rgba.as_raw());
            hasher.finish()
        });
        (u128::from(high) << 64) | u128::from(low)
    }
}

/// The 64-bit DCT hash of `image` (see the module documentation).
pub fn perceptual_hash(image: &DynamicImage) -> u64 {
    let grey = image
        .resize_exact(SHRUNK as u32, SHRUNK as u32, FilterType::Triangle)
        .to_luma8();
    let pixels: Vec<f64> = grey.as_raw().iter().map(|&p| f64::from(p)).collect();
    // Only the KEPT lowest frequencies are needed: rows first, then columns of those.
    let basis: Vec<f64> = (0..KEPT)
        .flat_map(|u| {
            (0..SHRUNK)
                .map(move |x| ((2 * x + 1) as f64 * u as f64 * PI / (2 * SHRUNK) as f64).cos())
        })
        .collect();
    let mut rows = vec![0f64; SHRUNK * KEPT];
    for y in 0..SHRUNK {
        for u in 0..KEPT {
            rows[y * KEPT + u] = (0..SHRUNK)
                .map(|x| pixels[y * SHRUNK + x] * basis[u * SHRUNK + x])
                .sum();
        }
    }
    let mut coefficients = [0f64; KEPT * KEPT];
    for v in 0..KEPT {
        for u in 0..KEPT {
            coefficients[v * KEPT + u] = (0..SHRUNK)
                .map(|y| rows[y * KEPT + u] * basis[v * SHRUNK + y])
                .sum();
        }
    }
    // The median of the frequencies other than the mean (DC), whose size would dominate it.
    let mut ac: Vec<f64> = coefficients[1..].to_vec();
    ac.sort_by(f64::total_cmp);
    let median = (ac[ac.len() / 2 - 1] + ac[ac.len() / 2]) / 2.0;
    coefficients
        .iter()
        .enumerate()
        .fold(0u64, |bits, (i, &c)| bits | (u64::from(c > median) << i))
}

/// How many bits two hashes differ in.
pub fn hash_distance(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

#[cfg(test)]
mod tests {
    use image::{Rgb, RgbImage};

    use super::*;

    /// A picture of a few soft shapes whose layout depends on `seed`.
    fn picture(seed: u32, size: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(size, size, |x, y| {
            let (fx, fy) = (x as f64 / size as f64, y as f64 / size as f64);
            let s = f64::from(seed);
            let v = 127.0
                + 60.0 * ((fx * (2.0 + s) + s).sin() * (fy * (3.0 + s * 0.7)).cos())
                + 60.0 * (fx * fy * (5.0 + s)).sin();
            let v = v.clamp(0.0, 255.0) as u8;
            Rgb([v, v / 2, 255 - v])
        }))
    }

    #[test]
    fn resized_and_brightened_copies_stay_near_and_other_pictures_do_not() {
        let original = picture(1, 256);
        let resized = original
            .resize_exact(180, 180, FilterType::Lanczos3)
            .brighten(12);
        let near = hash_distance(perceptual_hash(&original), perceptual_hash(&resized));
        assert!(near <= NEAR_DUPLICATE_BITS, "{near} bits apart");
        for seed in 2..6 {
            let far = hash_distance(
                perceptual_hash(&original),
                perceptual_hash(&picture(seed, 256)),
            );
            assert!(
                far > NEAR_DUPLICATE_BITS * 2,
                "seed {seed}: {far} bits apart"
            );
        }
    }

    #[test]
    fn pixel_keys_tell_identical_pixels_from_one_changed_pixel() {
        let hasher = PixelHasher::default();
        let original = picture(3, 64);
        let mut changed = original.to_rgb8();
        changed.put_pixel(5, 5, Rgb([0, 0, 0]));
        assert_eq!(hasher.key(&original), hasher.key(&original.clone()));
        assert_ne!(
            hasher.key(&original),
            hasher.key(&DynamicImage::ImageRgb8(changed))
        );
    }
}
