//! `lora-train data prepare`: a clean copy of a dataset as training reads it — every kept image
//! resized and cropped to the size it trains at, as a PNG, its caption in a `metadata.jsonl`
//! (a Hugging Face imagefolder that `--data` reads back), and a `report.json` of what was kept
//! and what was dropped and why. The source is only read; the output folder is written under a
//! temporary name and renamed, so it appears whole or not at all.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use lora_core::io::write_folder_atomic;
use lora_core::Rng;
use serde::Serialize;

use crate::config::Crop;
use crate::data_check::perceptual_hash::PixelHasher;
use crate::dataset::{bucket_size, cover_and_crop, Dataset, ScanOptions};

/// Bucket sides are multiples of this (kohya's `bucket_reso_steps` default), so every bucket
/// suits SD's VAE (8) and UNet (×8) granularity.
pub const BUCKET_STEP: usize = 64;
/// The folder (inside the output) that holds the images.
const IMAGES: &str = "images";
const METADATA: &str = "metadata.jsonl";
const REPORT: &str = "report.json";

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Square side of the training images, or the area (`resolution²`) of the buckets.
    pub resolution: usize,
    /// Each image at its aspect-ratio bucket instead of a centre-cropped square.
    pub buckets: bool,
    /// Drop images whose pixels equal an earlier image's.
    pub dedupe: bool,
    /// Replace an existing output folder.
    pub overwrite: bool,
}

/// What `prepare` did, as `report.json` records it.
#[derive(Debug, Clone, Serialize)]
pub struct PrepareReport {
    pub source: String,
    pub output: PathBuf,
    pub resolution: usize,
    pub buckets: bool,
    pub kept: usize,
    pub dropped: Vec<Dropped>,
    /// Repeats of kohya `N_words` folders, which an imagefolder has no place for: the prepared
    /// copy shows every image once per epoch (listed so that nothing changes silently).
    pub repeats_not_kept: Vec<RepeatsNotKept>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dropped {
    pub file: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepeatsNotKept {
    pub file: String,
    pub repeats: usize,
}

/// One row of the written metadata.jsonl.
#[derive(Serialize)]
struct MetadataRow<'a> {
    file_name: String,
    text: &'a str,
    /// Where the image came from.
    source: String,
}

/// Writes the prepared copy of `source` (read with `scan`; with its `skip_bad`, bad files are
/// dropped and reported, without it they are an error) to `output`.
pub fn prepare(
    source: &Path,
    scan: &ScanOptions,
    output: &Path,
    options: &PrepareOptions,
) -> Result<PrepareReport> {
    ensure!(
        options.resolution >= BUCKET_STEP && options.resolution.is_multiple_of(8),
        "--resolution {}: expected a multiple of 8, at least {BUCKET_STEP}",
        options.resolution
    );
    check_output(source, output, options.overwrite)?;
    let dataset = Dataset::scan(source, scan)?;
    let mut report = PrepareReport {
        source: source.display().to_string(),
        output: output.to_path_buf(),
        resolution: options.resolution,
        buckets: options.buckets,
        kept: 0,
        dropped: dataset
            .skipped
            .iter()
            .map(|bad| Dropped {
                file: bad.path.display().to_string(),
                reason: bad.reason.clone(),
            })
            .collect(),
        repeats_not_kept: Vec::new(),
    };
    let replaced = match output.exists() {
        // check_output allowed it: --overwrite. Moved aside until the new folder is in place.
        true => Some(set_aside(output)?),
        false => None,
    };
    let written = write_folder_atomic(output, |dir| {
        write_copy(&dataset, dir, options, &mut report)?;
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(dir.join(REPORT), json + "\n")
            .with_context(|| format!("cannot write {}", dir.join(REPORT).display()))?;
        Ok(())
    });
    match (written, replaced) {
        (Ok(()), Some(old)) => {
            std::fs::remove_dir_all(&old)
                .with_context(|| format!("cannot remove the replaced {}", old.display()))?;
        }
        (Err(e), Some(old)) => {
            std::fs::rename(&old, output).with_context(|| {
                format!(
                    "{e:#}; and cannot put the previous {} back from {}",
                    output.display(),
                    old.display()
                )
            })?;
            return Err(e);
        }
        (result, None) => result?,
    }
    Ok(report)
}

/// The output may not be the source or inside it (the copy would be read as part of the
/// dataset next time), nor hold the source; an existing output needs `overwrite`.
fn check_output(source: &Path, output: &Path, overwrite: bool) -> Result<()> {
    let absolute = |p: &Path| {
        std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))
    };
    let (source_abs, output_abs) = (absolute(source)?, absolute(output)?);
    if output_abs.starts_with(&source_abs) || source_abs.starts_with(&output_abs) {
        bail!(
            "--output {} and the source {} overlap: the prepared copy goes into a folder of its own",
            output.display(),
            source.display()
        );
    }
    if output.exists() && !overwrite {
        bail!(
            "{} exists: pass --overwrite to replace it",
            output.display()
        );
    }
    if output.exists() && !output.join(METADATA).is_file() {
        bail!(
            "{} exists and is no prepared dataset (no {METADATA}): refusing to replace it even \
             with --overwrite",
            output.display()
        );
    }
    Ok(())
}

/// Renames `output` to a hidden sibling, returned.
fn set_aside(output: &Path) -> Result<PathBuf> {
    let name = output
        .file_name()
        .with_context(|| format!("{} does not name a folder", output.display()))?;
    let aside = output.with_file_name(format!(
        ".{}.replaced-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::rename(output, &aside)
        .with_context(|| format!("cannot move {} aside", output.display()))?;
    Ok(aside)
}

fn write_copy(
    dataset: &Dataset,
    dir: &Path,
    options: &PrepareOptions,
    report: &mut PrepareReport,
) -> Result<()> {
    let images = dir.join(IMAGES);
    std::fs::create_dir_all(&images)
        .with_context(|| format!("cannot create {}", images.display()))?;
    let mut metadata = Vec::new();
    let hasher = PixelHasher::default();
    let mut seen: HashMap<u128, String> = HashMap::new();
    // Centre crops draw nothing; the generator is only a required argument.
    let mut unused = Rng::new(0);
    for (item, image) in dataset.items.iter().zip(dataset.images()) {
        let image = image?;
        let location = item.image.to_string();
        if options.dedupe {
            let digest = hasher.key(&image);
            if let Some(first) = seen.get(&digest) {
                report.dropped.push(Dropped {
                    file: location,
                    reason: format!("duplicate: the same pixels as {first}"),
                });
                continue;
            }
            seen.insert(digest, location.clone());
        }
        let (w, h) = item.size;
        let size = match options.buckets {
            true => bucket_size(w, h, options.resolution, BUCKET_STEP),
            false => (options.resolution, options.resolution),
        };
        let (prepared, _) = cover_and_crop(&image, size, Crop::Center, &mut unused);
        let file_name = format!("{IMAGES}/{:05}.png", report.kept);
        let path = dir.join(&file_name);
        prepared
            .save(&path)
            .with_context(|| format!("cannot write {} (from {location})", path.display()))?;
        if item.repeats > 1 {
            report.repeats_not_kept.push(RepeatsNotKept {
                file: location.clone(),
                repeats: item.repeats,
            });
        }
        let row = MetadataRow {
            file_name,
            text: &item.caption,
            source: location,
        };
        serde_json::to_writer(&mut metadata, &row)?;
        metadata.push(b'\n');
        report.kept += 1;
    }
    ensure!(
        report.kept > 0,
        "nothing left to write: every image was dropped"
    );
    let path = dir.join(METADATA);
    let mut file = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(&metadata)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}
