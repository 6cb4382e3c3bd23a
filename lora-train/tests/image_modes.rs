//! Images in every mode a training folder meets (grayscale, alpha, palette, 16-bit, CMYK JPEG,
//! EXIF-rotated) decode to the upright RGB that Pillow's `ImageOps.exif_transpose(…)
//! .convert("RGB")` gives: PNGs exactly, JPEGs within `jpeg_tolerance` levels (decoders round
//! the IDCT and upsample chroma differently). 16-bit files follow our documented rule
//! (round(v / 257)) instead of Pillow's clipping; tests/reference/make_image_mode_fixtures.py
//! records both and explains why.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use common::fixtures;
use image::DynamicImage;
use lora_train::config::Crop;
use lora_train::dataset::{decode_image, load_image, Dataset, ScanOptions};
use lora_train::lora_core::Rng;
use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Deserialize)]
struct Expected {
    jpeg_tolerance: u8,
    files: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    size: (usize, usize),
    rgb_sha256: Option<String>,
    rgb_hex: Option<String>,
    /// transformers' `convert_to_rgb` (transparency onto white), for images with alpha.
    on_white_rgb_sha256: Option<String>,
}

fn folder() -> PathBuf {
    fixtures().join("image-modes")
}

fn expected() -> Expected {
    let path = folder().join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The RGB bytes training sees: the image through `image_to_tensor` at its own size (no resize,
/// no crop, no flip), back from [-1, 1] to 0..=255.
fn training_rgb(image: &DynamicImage) -> Vec<u8> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let (tensor, _) = lora_train::dataset::image_to_tensor(
        image,
        (w, h),
        Crop::Center,
        false,
        3,
        &mut Rng::new(0),
        &Device::Cpu,
    )
    .unwrap();
    let planes = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let plane = w * h;
    (0..plane)
        .flat_map(|i| (0..3).map(move |c| i + c * plane))
        .map(|i| ((planes[i] + 1.0) * 127.5).round() as u8)
        .collect()
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_mode_decodes_upright_as_pillow_converts_it() {
    let expected = expected();
    assert!(expected.files.len() >= 14, "{} files", expected.files.len());
    let mut worst_jpeg = (0, String::new());
    for (name, entry) in &expected.files {
        let path = folder().join(name);
        let image = decode_image(&std::fs::read(&path).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let from_file = load_image(&path).unwrap();
        assert_eq!(
            image, from_file,
            "{name}: load_image and decode_image differ"
        );
        let size = (image.width() as usize, image.height() as usize);
        assert_eq!(size, entry.size, "{name}: size (width, height)");
        let rgb = training_rgb(&image);
        match (&entry.rgb_sha256, &entry.rgb_hex) {
            (Some(sha), None) => assert_eq!(
                &hex_string(&Sha256::digest(&rgb)),
                sha,
                "{name}: RGB pixels differ from the recorded ones"
            ),
            (None, Some(hex)) => {
                let want = hex_bytes(hex);
                assert_eq!(rgb.len(), want.len(), "{name}");
                let diff = rgb
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| a.abs_diff(*b))
                    .max()
                    .unwrap();
                assert!(
                    diff <= expected.jpeg_tolerance,
                    "{name}: max |Δ| {diff} > {} levels",
                    expected.jpeg_tolerance
                );
                worst_jpeg = worst_jpeg.max((diff, name.clone()));
            }
            _ => panic!("{name}: expected.json needs rgb_sha256 or rgb_hex"),
        }
    }
    eprintln!(
        "largest JPEG difference from Pillow: {} levels ({})",
        worst_jpeg.0, worst_jpeg.1
    );
}

/// Images with transparency, as captioning sees them: composited onto white exactly as
/// transformers' `convert_to_rgb` (Pillow's `alpha_composite`) does.
#[test]
fn transparency_is_composited_onto_white_as_transformers_does() {
    let expected = expected();
    let mut checked = 0;
    for (name, entry) in &expected.files {
        let Some(sha) = &entry.on_white_rgb_sha256 else {
            continue;
        };
        let image = decode_image(&std::fs::read(folder().join(name)).unwrap()).unwrap();
        let rgb = lora_core::models::image_processor::convert_to_rgb(&image);
        assert_eq!(
            &hex_string(&Sha256::digest(rgb.as_raw())),
            sha,
            "{name}: composited pixels differ from Pillow's"
        );
        checked += 1;
    }
    assert!(checked >= 2, "{checked} images with transparency checked");
}

#[test]
fn exif_orientation_turns_size_and_pixels() {
    let plain = load_image(&folder().join("rgb.jpg")).unwrap();
    let png = load_image(&folder().join("orientation-6.png")).unwrap();
    // Orientation 6: the stored 16×12 pixels, upright, are turned a quarter clockwise: 12×16.
    assert_eq!((png.width(), png.height()), (12, 16));
    for (orientation, turned) in [
        (3, plain.rotate180()),
        (5, plain.rotate90().fliph()),
        (6, plain.rotate90()),
        (8, plain.rotate270()),
    ] {
        let image = load_image(&folder().join(format!("orientation-{orientation}.jpg"))).unwrap();
        assert_eq!(
            (image.width(), image.height()),
            (turned.width(), turned.height()),
            "orientation {orientation}"
        );
        // The same JPEG data but for the EXIF tag: the same pixels, turned.
        assert_eq!(
            image.to_rgb8(),
            turned.to_rgb8(),
            "orientation {orientation}"
        );
    }
}

#[test]
fn sixteen_bit_samples_are_scaled_not_clipped() {
    // Pillow would give pure white for nearly all of this image; ours keeps the ramp.
    let image = load_image(&folder().join("gray16.png")).unwrap();
    let rgb = training_rgb(&image);
    let distinct: std::collections::BTreeSet<u8> = rgb.iter().copied().collect();
    assert!(distinct.len() > 100, "{} grey levels", distinct.len());
    assert_eq!((rgb[0], rgb[3]), (0, 255), "0 → 0 and 65535 → 255");
}

#[test]
fn a_kohya_folder_of_every_mode_scans_at_the_upright_sizes() {
    let expected = expected();
    let dir = tempfile::tempdir().unwrap();
    for name in expected.files.keys() {
        std::fs::copy(folder().join(name), dir.path().join(name)).unwrap();
        let caption = Path::new(name).with_extension("txt");
        std::fs::write(dir.path().join(caption), format!("an image, {name}")).unwrap();
    }
    let dataset = Dataset::scan(dir.path(), &ScanOptions::default()).unwrap();
    assert!(dataset.skipped.is_empty() && dataset.warnings.is_empty());
    let sizes: BTreeMap<String, (usize, usize)> = dataset
        .items
        .iter()
        .map(|item| (item.image.name(), item.size))
        .collect();
    let want: BTreeMap<String, (usize, usize)> = expected
        .files
        .iter()
        .map(|(name, entry)| (name.clone(), entry.size))
        .collect();
    assert_eq!(sizes, want);
}
