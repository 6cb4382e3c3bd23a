//! FID feature extraction on the CPU: image files → decoded, resized to 299² → Inception-v3 pool
//! features and logits, as `lora-eval metrics` runs it, in images per second.
//!
//! `cargo bench --bench fid_features -- extract --workdir DIR [--images N] [--batch B]
//! [--iters K]` writes N PNG images (256², a smooth pattern with noise, like generated samples)
//! and the deterministic stand-in Inception weights (`tests/common/inception_weights.rs`) into
//! DIR, runs one warm-up pass and K timed passes over the folder. `benches/fid_features_reference.py
//! DIR` runs pytorch-fid's `get_activations` over the same files with the same weights;
//! `benches/run_fid_features.sh` runs both, alternating.

mod common;
#[path = "../tests/common/mod.rs"]
mod test_common;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use common::{time_runs, BenchArgs};
use lora_toolkit::core::models::inception::FidInception;
use lora_toolkit::eval::extract::{inception_outputs, ExtractOptions};
use lora_toolkit::eval::images::list_images;

const USAGE: &str =
    "usage: fid_features extract --workdir DIR [--images N] [--batch B] [--iters K]";

fn main() -> Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_toolkit::core::process_setup::configure() };
    let args = BenchArgs::from_env(USAGE)?;
    if args.case != "extract" {
        bail!("unknown case {:?}; {USAGE}", args.case);
    }
    let workdir = PathBuf::from(args.flag("--workdir")?.context(USAGE)?);
    let images: usize = args.flag("--images")?.map_or(Ok(64), str::parse)?;
    let batch: usize = args.flag("--batch")?.map_or(Ok(32), str::parse)?;
    let weights = prepare(&workdir, images)?;
    let device = Device::Cpu;
    let model = FidInception::load(&weights, &device)?;
    let files = list_images(&workdir.join("images"))?;
    let options = ExtractOptions {
        batch_size: batch,
        skip_bad: false,
    };
    let run = || -> Result<()> {
        let out = inception_outputs(&model, &files, &device, options, &mut |_| {})?;
        anyhow::ensure!(
            out.pool.rows() == files.len(),
            "not every image was processed"
        );
        Ok(())
    };
    run()?;
    let (mean, min) = time_runs(args.iters()?, run)?;
    println!(
        "ours extract {} images batch {batch}: mean {mean:.2} s ({:.2} images/s), min {min:.2} s",
        files.len(),
        files.len() as f64 / mean
    );
    Ok(())
}

/// Writes the images and weights once; later runs reuse them.
fn prepare(workdir: &Path, count: usize) -> Result<PathBuf> {
    let folder = workdir.join("images");
    std::fs::create_dir_all(&folder)?;
    for i in 0..count {
        let path = folder.join(format!("img{i:05}.png"));
        if !path.exists() {
            let mut state = i as u64 + 1;
            let image = image::RgbImage::from_fn(256, 256, |x, y| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let noise = (state >> 59) as f32;
                let v = |f: f32, p: f32| {
                    (127.0
                        + 100.0 * ((x as f32) * f + p).sin() * ((y as f32) * f - p).cos()
                        + noise) as u8
                };
                image::Rgb([v(0.05, i as f32), v(0.09, 1.0), v(0.13, 2.0)])
            });
            image.save(&path)?;
        }
    }
    let weights = workdir.join("inception-stand-in.safetensors");
    if !weights.exists() {
        test_common::inception_weights::write_state_dict(&weights, DType::F32)?;
    }
    Ok(weights)
}
