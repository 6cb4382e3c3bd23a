//! Image folders to Inception features: decoding and resizing in parallel, the network in
//! batches, unreadable files either an error naming them or skipped and listed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use lora_core::models::inception::{FidInception, CLASSES, FEATURES, INPUT_SIZE};
use rayon::prelude::*;
use serde::Serialize;

use crate::features::FeatureRows;
use crate::images::{list_images, read_rgb};
use crate::resize::bilinear_to_unit_range;
use crate::stats::FeatureSet;

/// What the network made of a set of images, in file order.
#[derive(Debug, Clone)]
pub struct InceptionOutputs {
    /// The images the rows belong to (the readable ones).
    pub files: Vec<PathBuf>,
    /// 2048-d pool features (FID, KID).
    pub pool: FeatureRows,
    /// 1008 logits without the fc bias (IS).
    pub logits: FeatureRows,
    /// Files that could not be read, with why (only with `skip_bad`).
    pub skipped: Vec<(PathBuf, String)>,
}

#[derive(Debug, Clone, Copy)]
pub struct ExtractOptions {
    pub batch_size: usize,
    /// Skip unreadable images (listed in the result) instead of failing on the first.
    pub skip_bad: bool,
}

/// Runs `model` over `files`, calling `progress(done)` after each batch.
pub fn inception_outputs(
    model: &FidInception,
    files: &[PathBuf],
    device: &Device,
    options: ExtractOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<InceptionOutputs> {
    let batch_size = options.batch_size.max(1);
    let mut outputs = InceptionOutputs {
        files: Vec::with_capacity(files.len()),
        pool: FeatureRows::empty(FEATURES),
        logits: FeatureRows::empty(CLASSES),
        skipped: Vec::new(),
    };
    let mut done = 0;
    for chunk in files.chunks(batch_size) {
        let decoded: Vec<(&PathBuf, Result<Vec<f32>>)> = chunk
            .par_iter()
            .map(|path| (path, network_input(path)))
            .collect();
        let mut batch = Vec::with_capacity(chunk.len() * 3 * INPUT_SIZE * INPUT_SIZE);
        let mut in_batch = 0;
        for (path, input) in decoded {
            match input {
                Ok(pixels) => {
                    batch.extend_from_slice(&pixels);
                    outputs.files.push(path.clone());
                    in_batch += 1;
                }
                Err(e) if options.skip_bad => {
                    outputs.skipped.push((path.clone(), format!("{e:#}")))
                }
                Err(e) => {
                    return Err(e.context("pass --skip-bad to leave unreadable images out"));
                }
            }
        }
        if in_batch > 0 {
            let (pool, logits) = batch_rows(model, batch, in_batch, device)?;
            outputs.pool.extend(&pool)?;
            outputs.logits.extend(&logits)?;
        }
        done += chunk.len();
        progress(done);
    }
    Ok(outputs)
}

/// pytorch-fid's network input for one file: `[3, 299, 299]` in [−1, 1].
fn network_input(path: &Path) -> Result<Vec<f32>> {
    Ok(rgb_network_input(&read_rgb(path)?))
}

/// pytorch-fid's network input for a decoded image: `[3, 299, 299]` in [−1, 1].
pub fn rgb_network_input(image: &RgbImage) -> Vec<f32> {
    bilinear_to_unit_range(image, INPUT_SIZE)
}

/// Pool features and unbiased logits of `count` network inputs laid end to end in `inputs`.
pub fn batch_rows(
    model: &FidInception,
    inputs: Vec<f32>,
    count: usize,
    device: &Device,
) -> Result<(FeatureRows, FeatureRows)> {
    let x = Tensor::from_vec(inputs, (count, 3, INPUT_SIZE, INPUT_SIZE), device)?;
    let features = model.forward(&x)?;
    Ok((
        rows_of(&features.pool)?,
        rows_of(&features.logits_unbiased)?,
    ))
}

fn rows_of(t: &Tensor) -> Result<FeatureRows> {
    let (_, dim) = t
        .dims2()
        .context("network output: expected [batch, features]")?;
    FeatureRows::new(
        dim,
        t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?,
    )
}

/// An image set given on the command line: a folder of images (run through `model`) or a
/// statistics file saved earlier.
pub fn feature_set(
    path: &Path,
    model: &FidInception,
    device: &Device,
    options: ExtractOptions,
    progress: &mut dyn FnMut(Phase),
) -> Result<(FeatureSet, Vec<Skipped>)> {
    if path.is_file() {
        return Ok((FeatureSet::load(path)?, Vec::new()));
    }
    let files = list_images(path)?;
    progress(Phase::Start(files.len()));
    let outputs = inception_outputs(model, &files, device, options, &mut |done| {
        progress(Phase::Done(done))
    })?;
    let mut metadata = BTreeMap::new();
    metadata.insert("resize".to_owned(), RESIZE_NAME.to_owned());
    if let Some(sha) = model.weights_sha256() {
        metadata.insert("inception_sha256".to_owned(), sha.to_owned());
    }
    let set = FeatureSet::from_rows(
        path.display().to_string(),
        outputs.pool,
        outputs.logits,
        metadata,
    )?;
    let skipped = outputs
        .skipped
        .into_iter()
        .map(|(file, error)| Skipped {
            file: file.display().to_string(),
            error,
        })
        .collect();
    Ok((set, skipped))
}

/// An image left out with `--skip-bad`, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub file: String,
    pub error: String,
}

/// How images are resized, as reports and statistics files name it.
pub const RESIZE_NAME: &str = "pytorch-fid (bilinear, align_corners=False, no antialias)";

/// Where [`feature_set`] is, for progress displays.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    /// About to read this many images.
    Start(usize),
    /// This many done.
    Done(usize),
}
