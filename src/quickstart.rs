//! The quick start: the whole toolkit on the embedded default model, offline, in a few minutes.
//! It draws a concept dataset (shapes in a colour the model never saw, captioned with the rare
//! token `sks`), trains a LoRA adapter on it with lora-train, generates the same prompts from the
//! same noise with and without the adapter through lora-infer's pipeline, and writes a
//! before/after grid, a loss curve and a JSON report of how far each prompt moved toward the
//! concept colour.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use lora_core::io::write_atomic;
use lora_core::options::AdapterSpec;
use lora_core::source::ModelFolder;
use lora_core::Rng;
use lora_infer::output::{to_images8, write_png, Image8};
use lora_infer::{GenerateOptions, Pipeline};
use lora_train::{Preparation, StepReport, TrainArgs, TrainSummary, Trainer};
use serde::Serialize;

use crate::default_model::{default_model_dir, RESOLUTION};
use crate::following::Following;
use crate::shapes::{self, Scene, BACKGROUNDS, COLOURS, CONCEPT, POSITION_SPREAD};
use lora_infer::plot;

/// Prompts of the before/after grid: the concept in every shape on both backgrounds, then prompts
/// without it (which the adapter should leave nearly alone).
pub const CONCEPT_PROMPTS: [&str; 6] = [
    "a sks circle on a white background",
    "a sks square on a white background",
    "a sks triangle on a white background",
    "a sks circle on a black background",
    "a sks square on a black background",
    "a sks triangle on a black background",
];
pub const UNRELATED_PROMPTS: [&str; 2] = [
    "a green square on a white background",
    "a blue circle on a black background",
];

/// A file in the output folder that marks it as the quick start's own, so a rerun may replace it.
const MARKER: &str = ".lora-quickstart";

#[derive(Debug, Clone)]
pub struct Options {
    /// The base model folder (default: the embedded default model).
    pub base: PathBuf,
    /// Folder for everything the quick start writes.
    pub output: PathBuf,
    pub seed: u64,
    /// Pictures of the concept in the dataset.
    pub concept_images: usize,
    /// Pictures of what the model already knows, with their usual captions, trained alongside
    /// (prior preservation, as in DreamBooth) so prompts without `sks` keep their look.
    pub regularisation_images: usize,
    pub train_steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub rank: usize,
    /// Denoising steps per generated picture.
    pub sample_steps: usize,
    pub guidance: f64,
    /// Pictures per prompt and variant (seeds `seed`, `seed + 1`, …).
    pub images_per_prompt: usize,
    /// Pictures per caption for [`Report::default_model_following`].
    pub following_seeds: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            base: default_model_dir(),
            output: PathBuf::from("target/quickstart"),
            seed: 0,
            concept_images: 24,
            regularisation_images: 24,
            train_steps: 300,
            batch_size: 4,
            lr: 1e-2,
            rank: 4,
            sample_steps: 25,
            guidance: 1.0,
            images_per_prompt: 2,
            following_seeds: 2,
        }
    }
}

/// Where the quick start is, for progress displays.
pub enum Event<'a> {
    Training {
        report: &'a StepReport,
        total: usize,
    },
    Sampling {
        done: usize,
        total: usize,
    },
    /// Measuring how the base model follows its captions.
    Following,
}

/// How one prompt's pictures changed with the adapter.
#[derive(Debug, Clone, Serialize)]
pub struct PromptResult {
    pub prompt: String,
    pub mentions_concept: bool,
    /// [`shapes::magenta_score`] (how much of the picture is in the concept colour), averaged over
    /// the prompt's pictures.
    pub base_concept_score: f64,
    pub adapter_concept_score: f64,
    /// Mean absolute pixel change (0–255) between base and adapter pictures from the same noise.
    pub mean_pixel_change: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub adapter: PathBuf,
    pub grid: PathBuf,
    pub loss_curve: PathBuf,
    pub prompts: Vec<PromptResult>,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    /// The loss on the training images at fixed timesteps and noise (lora-train's validation
    /// loss, `--validation-data` = the training data), before the first step and at intervals.
    pub fixed_noise_loss: Vec<FixedNoiseLoss>,
    /// How the base model follows the captions it was trained on ([`crate::following`]): every
    /// caption of the grammar, [`Options::following_seeds`] pictures each, at the quick start's
    /// guidance and sampling steps.
    pub default_model_following: Following,
    pub guidance: f64,
    pub train_seconds: f64,
    pub total_seconds: f64,
}

/// One point of [`Report::fixed_noise_loss`].
#[derive(Debug, Clone, Serialize)]
pub struct FixedNoiseLoss {
    pub step: usize,
    pub loss: f64,
}

/// The `(step, val_loss)` rows of a training metrics file.
fn fixed_noise_losses(metrics: &Path) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("cannot read {}", metrics.display()))?;
    let mut points = Vec::new();
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: not JSON: {line}", metrics.display()))?;
        if let (Some(step), Some(loss)) = (row["step"].as_f64(), row["val_loss"].as_f64()) {
            points.push((step, loss));
        }
    }
    Ok(points)
}

/// Prepares `dir` for the quick start's files: creates it, or clears it if an earlier quick start
/// made it; any other existing, non-empty folder is refused (it may hold the user's files).
fn prepare_output(dir: &Path) -> Result<()> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_none();
        ensure!(
            empty || dir.join(MARKER).is_file(),
            "{} exists and was not made by the quick start; choose another --output",
            dir.display()
        );
        std::fs::remove_dir_all(dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join(MARKER), "made by the lora-toolkit quick start\n")
        .with_context(|| format!("cannot write into {}", dir.display()))
}

/// The concept dataset: `concept` shapes in the concept colour and `regularisation` shapes in
/// the known colours, on the usual backgrounds, every shape × background (× colour) in turn
/// ([`Scene::balanced`]).
pub fn dataset_scenes(
    concept: usize,
    regularisation: usize,
    seed: u64,
) -> (Vec<Scene>, Vec<Scene>) {
    let mut rng = Rng::new(seed);
    let concept = (0..concept)
        .map(|i| Scene::balanced(&mut rng, i, &[CONCEPT], &BACKGROUNDS, POSITION_SPREAD))
        .collect();
    let known = (0..regularisation)
        .map(|i| Scene::balanced(&mut rng, i, &COLOURS, &BACKGROUNDS, POSITION_SPREAD))
        .collect();
    (concept, known)
}

/// `options.images_per_prompt` pictures of `prompt` from seeds `seed…`, as 8-bit images.
pub fn generate(
    pipeline: &Pipeline,
    prompt: &str,
    options: &Options,
) -> Result<(Vec<Image8>, candle_core::Tensor)> {
    let generated = pipeline.generate(&GenerateOptions {
        prompt: prompt.to_owned(),
        steps: options.sample_steps,
        guidance: options.guidance,
        num_images: options.images_per_prompt,
        batch_size: options.images_per_prompt,
        seed: options.seed,
        ..GenerateOptions::default()
    })?;
    Ok((to_images8(&generated.images)?, generated.images))
}

/// Runs the quick start; see the module documentation.
pub fn run(options: &Options, on_event: &mut dyn FnMut(Event)) -> Result<Report> {
    let start = Instant::now();
    let model = ModelFolder::open(&options.base)
        .with_context(|| format!("cannot open the base model {}", options.base.display()))?;
    prepare_output(&options.output)?;
    let data = options.output.join("concept-data");
    let (concept, known) = dataset_scenes(
        options.concept_images,
        options.regularisation_images,
        options.seed,
    );
    shapes::write_dataset(&data, "sks", &concept, RESOLUTION)?;
    shapes::write_dataset(&data, "known", &known, RESOLUTION)?;

    let adapter = options.output.join("sks-lora.safetensors");
    let config = TrainArgs {
        base: Some(options.base.to_string_lossy().into_owned()),
        data: Some(data.clone()),
        output: Some(adapter.clone()),
        rank: Some(options.rank),
        steps: Some(options.train_steps),
        batch_size: Some(options.batch_size),
        lr: Some(options.lr),
        resolution: Some(RESOLUTION),
        seed: Some(options.seed),
        // The loss on the training images at fixed noise: a curve that shows the learning, which
        // the per-step loss (a new timestep and noise each step) hides in its scatter.
        validation_data: Some(data.clone()),
        validate_every: Some((options.train_steps / 5).max(1)),
        ..TrainArgs::default()
    }
    .resolve()?;
    let metrics = config.metrics.clone();
    let train_start = Instant::now();
    let mut trainer = Trainer::new(config, &mut |_: Preparation| {})?;
    let total = trainer.total_steps();
    let mut losses = Vec::with_capacity(total);
    let summary: TrainSummary = trainer.run(&mut |report| {
        losses.push(report.loss);
        on_event(Event::Training { report, total });
    })?;
    let train_seconds = train_start.elapsed().as_secs_f64();

    let device = Device::Cpu;
    let base = Pipeline::load(&model, &[], &device, DType::F32, false)?;
    let adapted = Pipeline::load(
        &model,
        &[AdapterSpec::new(&adapter, 1.0)],
        &device,
        DType::F32,
        false,
    )?;
    let prompts: Vec<(&str, bool)> = CONCEPT_PROMPTS
        .iter()
        .map(|p| (*p, true))
        .chain(UNRELATED_PROMPTS.iter().map(|p| (*p, false)))
        .collect();
    let mut rows = Vec::new();
    let mut results = Vec::new();
    for (i, (prompt, mentions_concept)) in prompts.iter().enumerate() {
        on_event(Event::Sampling {
            done: 2 * i,
            total: 2 * prompts.len(),
        });
        let (before, _) = generate(&base, prompt, options)?;
        on_event(Event::Sampling {
            done: 2 * i + 1,
            total: 2 * prompts.len(),
        });
        let (after, _) = generate(&adapted, prompt, options)?;
        let score = |images: &[Image8]| {
            images.iter().map(shapes::magenta_score).sum::<f64>() / images.len() as f64
        };
        let change = before
            .iter()
            .zip(&after)
            .map(|(a, b)| shapes::mean_abs_diff(a, b))
            .sum::<f64>()
            / before.len() as f64;
        results.push(PromptResult {
            prompt: prompt.to_string(),
            mentions_concept: *mentions_concept,
            base_concept_score: score(&before),
            adapter_concept_score: score(&after),
            mean_pixel_change: change,
        });
        rows.push(before.into_iter().chain(after).collect::<Vec<_>>());
    }
    on_event(Event::Sampling {
        done: 2 * prompts.len(),
        total: 2 * prompts.len(),
    });

    on_event(Event::Following);
    let default_model_following = crate::following::measure(
        &base,
        options.guidance,
        options.sample_steps,
        options.following_seeds,
        options.seed,
    )?;

    let grid = options.output.join("before-after.png");
    let text =
        BTreeMap::from([
            (
                "Description".to_string(),
                format!(
                "Rows: {}. Columns: {} seeds from {} without the adapter, then the same with it.",
                prompts.iter().map(|(p, _)| *p).collect::<Vec<_>>().join(" | "),
                options.images_per_prompt,
                options.seed
            ),
            ),
            (
                "Software".to_string(),
                "lora-toolkit quickstart".to_string(),
            ),
        ]);
    let row_labels: Vec<String> = prompts.iter().map(|(p, _)| p.to_string()).collect();
    let legend = format!(
        "each row: one prompt, {n} seeds without the adapter (left), the same seeds with it (right)",
        n = options.images_per_prompt
    );
    write_png(
        &grid,
        &plot::picture_grid(&rows, &row_labels, &["BASE", "BASE + LORA"], &legend, 4),
        &text,
    )?;
    let loss_curve = options.output.join("loss-curve.png");
    let fixed_noise = fixed_noise_losses(&metrics)?;
    write_png(
        &loss_curve,
        &plot::loss_curve(&losses, &fixed_noise),
        &BTreeMap::new(),
    )?;

    let report = Report {
        adapter,
        grid,
        loss_curve,
        prompts: results,
        first_loss: summary.first_loss,
        last_loss: summary.last_loss,
        fixed_noise_loss: fixed_noise
            .iter()
            .map(|&(step, loss)| FixedNoiseLoss {
                step: step as usize,
                loss,
            })
            .collect(),
        default_model_following,
        guidance: options.guidance,
        train_seconds,
        total_seconds: start.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&report)? + "\n";
    write_atomic(&options.output.join("report.json"), |temp| {
        std::fs::write(temp, &json).with_context(|| format!("cannot write {}", temp.display()))
    })?;
    Ok(report)
}
