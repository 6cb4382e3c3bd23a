//! `lora_core::resample` against the libraries it follows, on `tests/fixtures/resample` (made by
//! `tests/reference/make_resample_fixtures.py`): Pillow's `Image.resize` with LANCZOS and BICUBIC,
//! and torchvision's antialiased bicubic resize of uint8 tensors, pixel for pixel.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use image::DynamicImage;
use lora_core::resample::{resize_rgb, resize_rgba, Arithmetic, Filter};

fn folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/resample")
}

fn open(path: &Path) -> Result<DynamicImage> {
    image::open(path).with_context(|| format!("cannot read {}", path.display()))
}

#[test]
fn resizes_exactly_as_pillow_and_torchvision() -> Result<()> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder().join("cases.json"))?)?;
    let cases = meta["cases"]
        .as_array()
        .context("cases.json has no cases")?;
    let mut checked = 0;
    let mut failures = Vec::new();
    for case in cases {
        let text = |key: &str| {
            case[key]
                .as_str()
                .with_context(|| format!("{case}: no {key}"))
        };
        let source = open(&folder().join(text("source")?))?;
        let expected = open(&folder().join(text("file")?))?;
        let size = |i: usize| case["size"][i].as_u64().map(|v| v as u32);
        let (w, h) = (size(0).context("size")?, size(1).context("size")?);
        let filter = match text("filter")? {
            "lanczos3" => Filter::Lanczos3,
            "bicubic" => Filter::Bicubic,
            other => anyhow::bail!("unknown filter {other}"),
        };
        let arithmetic = match text("tool")? {
            "pillow" => Arithmetic::Pillow,
            "torchvision" => Arithmetic::Torchvision,
            other => anyhow::bail!("unknown tool {other}"),
        };
        let (ours, theirs) = match source {
            DynamicImage::ImageRgba8(rgba) => (
                resize_rgba(&rgba, w, h, filter, arithmetic).into_raw(),
                expected.to_rgba8().into_raw(),
            ),
            other => (
                resize_rgb(&other.to_rgb8(), w, h, filter, arithmetic).into_raw(),
                expected.to_rgb8().into_raw(),
            ),
        };
        ensure!(
            ours.len() == theirs.len() && !ours.is_empty(),
            "{case}: sizes differ"
        );
        let differing = ours.iter().zip(&theirs).filter(|(a, b)| a != b).count();
        if differing > 0 {
            let worst = ours
                .iter()
                .zip(&theirs)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            failures.push(format!(
                "{}: {differing} of {} values differ, by up to {worst}",
                text("file")?,
                ours.len()
            ));
        }
        checked += 1;
    }
    ensure!(checked >= 50, "only {checked} cases checked");
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
