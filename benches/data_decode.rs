//! Training data on the CPU: images decoded and resized/cropped to the training size, from a
//! folder (an imagefolder of JPEGs) and from the parquet file `datasets` makes of it, in samples
//! per second, as lora-train's latent-caching pass reads them (`Dataset::images` +
//! `image_to_tensor`, one thread).
//!
//! `cargo bench --bench data_decode -- {folder|parquet} --workdir DIR [--images N]
//! [--resolution R] [--iters K]`: `folder` writes N JPEGs (768×512, quality 90, a smooth pattern
//! with noise, like photos) and their metadata.jsonl into DIR/images once; `parquet` reads
//! DIR/train.parquet, which `benches/data_decode_reference.py DIR --make-parquet` writes with
//! `datasets` (the image bytes embedded, as `push_to_hub` does). The dataset scan (every image
//! decoded once, to refuse bad files before training) is timed apart from the pass.
//! `benches/run_data_decode.sh` runs ours and `datasets` + PIL, alternating.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use common::{time_runs, BenchArgs};
use lora_toolkit::core::Rng;
use lora_toolkit::train::config::Crop;
use lora_toolkit::train::dataset::{image_to_tensor, Dataset, ScanOptions};

const USAGE: &str = "usage: data_decode {folder|parquet} --workdir DIR [--images N] \
                     [--resolution R] [--iters K]";

fn main() -> Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_toolkit::core::process_setup::configure() };
    let args = BenchArgs::from_env(USAGE)?;
    let workdir = PathBuf::from(args.flag("--workdir")?.context(USAGE)?);
    let count: usize = args.flag("--images")?.map_or(Ok(200), str::parse)?;
    let resolution: usize = args.flag("--resolution")?.map_or(Ok(512), str::parse)?;
    let source = match args.case.as_str() {
        "folder" => write_images(&workdir, count)?,
        "parquet" => {
            let file = workdir.join("train.parquet");
            if !file.is_file() {
                bail!(
                    "{} is missing: run benches/data_decode_reference.py {} --make-parquet",
                    file.display(),
                    workdir.display()
                );
            }
            file
        }
        other => bail!("unknown case {other:?}; {USAGE}"),
    };
    let started = Instant::now();
    let dataset = Dataset::scan(&source, &ScanOptions::default())?;
    let scan_seconds = started.elapsed().as_secs_f64();
    let samples = dataset.items.len();
    let mut rng = Rng::new(0);
    let mut run = || -> Result<()> {
        let mut done = 0;
        for image in dataset.images() {
            let (pixels, _) = image_to_tensor(
                &image?,
                (resolution, resolution),
                Crop::Center,
                false,
                3,
                &mut rng,
                &Device::Cpu,
            )?;
            anyhow::ensure!(pixels.dims() == [3, resolution, resolution]);
            done += 1;
        }
        anyhow::ensure!(done == samples, "{done} of {samples} samples");
        Ok(())
    };
    run()?;
    let (mean, min) = time_runs(args.iters()?, run)?;
    println!(
        "ours {} {samples} samples at {resolution}²: scan {scan_seconds:.2} s; pass mean {mean:.2} s \
         ({:.1} samples/s), min {min:.2} s",
        args.case,
        samples as f64 / mean
    );
    Ok(())
}

/// Writes the JPEGs and metadata.jsonl once; later runs reuse them. Returns the folder.
fn write_images(workdir: &Path, count: usize) -> Result<PathBuf> {
    let folder = workdir.join("images");
    std::fs::create_dir_all(&folder)?;
    let mut metadata = Vec::new();
    for i in 0..count {
        let name = format!("img{i:05}.jpg");
        let path = folder.join(&name);
        if !path.exists() {
            let mut state = i as u64 + 1;
            let image = image::RgbImage::from_fn(768, 512, |x, y| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let noise = (state >> 58) as f32;
                let v = |f: f32, p: f32| {
                    (120.0 + 90.0 * ((x as f32) * f + p).sin() * ((y as f32) * f - p).cos() + noise)
                        as u8
                };
                image::Rgb([v(0.011, i as f32), v(0.017, 1.0), v(0.023, 2.0)])
            });
            let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut file, 90)
                .encode_image(&image)?;
            file.flush()?;
        }
        writeln!(
            metadata,
            "{}",
            serde_json::json!({"file_name": name, "text": format!("picture {i}")})
        )?;
    }
    std::fs::write(folder.join("metadata.jsonl"), metadata)?;
    Ok(folder)
}
