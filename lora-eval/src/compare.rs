//! `lora-eval compare`: the base model and each adapter generate every prompt × seed from the
//! same initial noise, each column is scored against one reference set, and the results go to
//! `report.json`, a side-by-side grid and, for several checkpoints of one run, a plot of each
//! metric over the training steps.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use lora_core::models::inception::FidInception;
use lora_core::options::AdapterSpec;
use lora_core::source::ModelFolder;
use lora_infer::output::{to_images8, write_png, Image8};
use lora_infer::plot::{labelled_grid, metric_curve};
use lora_infer::{GenerateOptions, Pipeline};
use serde::Serialize;

use crate::extract::Skipped;
use crate::extract::{feature_set, ExtractOptions, Phase};
use crate::metrics::SamplingSettings;
use crate::report::MetricsReport;
use crate::stats::FeatureSet;

/// One column of the comparison: the base alone, or the base with one adapter.
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    pub name: String,
    pub lora: Option<String>,
    pub scale: Option<f64>,
    /// The training step in the adapter's file name (`…-step000500`, kohya's `…-000500`).
    pub step: Option<u64>,
}

/// The base column, then one per adapter, named by file stem (made unique).
pub fn columns(adapters: &[AdapterSpec]) -> Vec<Column> {
    let mut out = vec![Column {
        name: "base".into(),
        lora: None,
        scale: None,
        step: None,
    }];
    for (i, spec) in adapters.iter().enumerate() {
        let stem = spec
            .path
            .file_stem()
            .map_or_else(|| format!("lora{i}"), |s| s.to_string_lossy().into_owned());
        let name = if out.iter().any(|c| c.name == stem) {
            format!("{stem}-{i}")
        } else {
            stem.clone()
        };
        out.push(Column {
            name,
            lora: Some(spec.path.display().to_string()),
            scale: Some(spec.scale),
            step: step_of(&stem),
        });
    }
    out
}

/// The step number at the end of a checkpoint's stem: `x-step000500`, `x_step500`, or kohya's
/// `x-000500`.
pub fn step_of(stem: &str) -> Option<u64> {
    let digits: String = stem
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if digits.is_empty() {
        return None;
    }
    let before = stem[..stem.len() - digits.len()].to_ascii_lowercase();
    let marked = ["-step", "_step", "-", "_"]
        .iter()
        .any(|m| before.ends_with(m));
    marked.then(|| digits.parse().ok()).flatten()
}

/// What to generate and how to score.
pub struct CompareJob<'a> {
    pub model: &'a ModelFolder,
    pub adapters: &'a [AdapterSpec],
    pub prompts: &'a [String],
    pub generate: GenerateOptions,
    pub seeds: usize,
    pub dtype: DType,
    pub reference: &'a Path,
    pub inception: &'a Path,
    pub extract: ExtractOptions,
    pub sampling: SamplingSettings,
    pub clip: Option<&'a str>,
    pub output: &'a Path,
}

/// Where the comparison is, for progress displays.
#[derive(Debug, Clone)]
pub enum CompareEvent {
    /// Generating `prompt` (0-based) of `column`.
    Generating { column: String, prompt: usize },
    /// Running the FID network over a set.
    Scoring { set: String, phase: Phase },
}

#[derive(Debug, Clone, Serialize)]
pub struct ColumnReport {
    #[serde(flatten)]
    pub column: Column,
    pub images: String,
    #[serde(flatten)]
    pub metrics: MetricsReport,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub base: String,
    pub prompts: Vec<String>,
    pub seeds: Vec<u64>,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: String,
    pub columns: Vec<ColumnReport>,
    pub grid: String,
    pub plots: Vec<String>,
}

pub fn compare(
    job: &CompareJob,
    device: &Device,
    progress: &mut dyn FnMut(CompareEvent),
) -> Result<CompareReport> {
    let columns = columns(job.adapters);
    let images_root = job.output.join("images");
    let mut first_images: Vec<Vec<Image8>> = vec![Vec::new(); job.prompts.len()];
    let seeds: Vec<u64> = (0..job.seeds as u64)
        .map(|i| job.generate.seed + i)
        .collect();
    for (column, adapter) in columns
        .iter()
        .zip(std::iter::once(None).chain(job.adapters.iter().map(Some)))
    {
        let adapters: Vec<AdapterSpec> = adapter.cloned().into_iter().collect();
        let pipeline = Pipeline::load(job.model, &adapters, device, job.dtype, false)
            .with_context(|| format!("loading the pipeline for column {}", column.name))?;
        let folder = images_root.join(&column.name);
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
        for (p, prompt) in job.prompts.iter().enumerate() {
            progress(CompareEvent::Generating {
                column: column.name.clone(),
                prompt: p,
            });
            let options = GenerateOptions {
                prompt: prompt.clone(),
                num_images: job.seeds,
                batch_size: 1,
                ..job.generate.clone()
            };
            let generated = pipeline.generate(&options)?;
            let images = to_images8(&generated.images)?;
            for (image, seed) in images.iter().zip(&generated.seeds) {
                let mut text = BTreeMap::new();
                text.insert("prompt".to_owned(), prompt.clone());
                text.insert("seed".to_owned(), seed.to_string());
                if let Some(lora) = &column.lora {
                    text.insert("lora".to_owned(), lora.clone());
                }
                write_png(&folder.join(image_name(p, *seed)), image, &text)?;
            }
            first_images[p].push(images.into_iter().next().context("no image generated")?);
        }
    }

    let model = FidInception::load(job.inception, device)?;
    let mut skipped = Vec::new();
    let reference = scored_set(
        job.reference,
        "reference",
        &model,
        device,
        job,
        &mut skipped,
        progress,
    )?;
    let mut reports = Vec::with_capacity(columns.len());
    for column in &columns {
        let folder = images_root.join(&column.name);
        let mut column_skipped = skipped.clone();
        let set = scored_set(
            &folder,
            &column.name,
            &model,
            device,
            job,
            &mut column_skipped,
            progress,
        )?;
        let mut metrics = MetricsReport::new(
            &reference,
            &set,
            &job.sampling,
            job.inception,
            model.weights_sha256(),
            column_skipped,
        )?;
        if let Some(clip) = job.clip {
            let files = crate::images::list_images(&folder)?;
            let prompts: Vec<String> = job
                .prompts
                .iter()
                .flat_map(|p| std::iter::repeat_n(p.clone(), job.seeds))
                .collect();
            let score = crate::clip_score::clip_score_of_files(clip, &files, &prompts, device)?;
            metrics.set_clip_score(clip, score);
        }
        reports.push(ColumnReport {
            column: column.clone(),
            images: folder.display().to_string(),
            metrics,
        });
    }

    let grid = job.output.join("grid.png");
    let column_names: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
    // Small samples are enlarged so each cell (and its column label) is at least 128 pixels wide.
    let width = first_images[0].first().map_or(1, |i| i.width.max(1));
    let zoom = GRID_CELL.div_ceil(width).max(1);
    write_png(
        &grid,
        &labelled_grid(&first_images, job.prompts, &column_names, zoom),
        &BTreeMap::new(),
    )?;
    let plots = metric_plots(&reports, job.output)?;
    Ok(CompareReport {
        base: job.model.root().display().to_string(),
        prompts: job.prompts.to_vec(),
        seeds,
        steps: job.generate.steps,
        guidance: job.generate.guidance,
        scheduler: format!("{:?}", job.generate.scheduler),
        columns: reports,
        grid: grid.display().to_string(),
        plots,
    })
}

/// The smallest width of a grid cell, in pixels.
const GRID_CELL: usize = 128;

/// Generated image `prompt`×`seed`'s file name; sorted names keep prompt-major order, which the
/// CLIP score's prompt list follows.
fn image_name(prompt: usize, seed: u64) -> String {
    format!("p{prompt:03}-s{seed:010}.png")
}

fn scored_set(
    path: &Path,
    name: &str,
    model: &FidInception,
    device: &Device,
    job: &CompareJob,
    skipped: &mut Vec<Skipped>,
    progress: &mut dyn FnMut(CompareEvent),
) -> Result<FeatureSet> {
    let (set, bad) = feature_set(path, model, device, job.extract, &mut |phase| {
        progress(CompareEvent::Scoring {
            set: name.to_owned(),
            phase,
        })
    })?;
    skipped.extend(bad);
    Ok(set)
}

/// Reads one metric out of a report.
type MetricOf = fn(&MetricsReport) -> Option<f64>;

/// For adapters with step numbers (two or more): one plot per metric over the steps.
fn metric_plots(reports: &[ColumnReport], output: &Path) -> Result<Vec<String>> {
    let stepped: Vec<&ColumnReport> = reports.iter().filter(|r| r.column.step.is_some()).collect();
    if stepped.len() < 2 {
        return Ok(Vec::new());
    }
    let series: [(&str, &str, MetricOf); 4] = [
        ("fid", "FID", |m| Some(m.scores.fid)),
        ("is", "INCEPTION SCORE", |m| m.scores.is_mean),
        ("kid", "KID", |m| m.scores.kid_mean),
        ("clip_score", "CLIP SCORE", |m| m.clip_score),
    ];
    let mut written = Vec::new();
    for (file, title, value) in series {
        let mut points: Vec<(f64, f64)> = stepped
            .iter()
            .filter_map(|r| Some((r.column.step? as f64, value(&r.metrics)?)))
            .collect();
        if points.len() < 2 {
            continue;
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        let path = output.join(format!("{file}_over_steps.png"));
        write_png(&path, &metric_curve(title, &points), &BTreeMap::new())?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_numbers_from_checkpoint_names() {
        assert_eq!(step_of("sks-step000500"), Some(500));
        assert_eq!(step_of("sks_step12"), Some(12));
        assert_eq!(step_of("sks-000007"), Some(7));
        assert_eq!(step_of("sks"), None);
        assert_eq!(step_of("lora2"), None);
    }
}
