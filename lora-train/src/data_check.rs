//! `lora-train data check`: the dataset as training would read it (the same scan, the same
//! layouts and options), with every problem found and a summary of what training will see.
//!
//! The problems, each with a stable `kind`:
//! - `unreadable`, `missing-caption`, `empty-caption`: the files training refuses (or leaves out
//!   under `--skip-bad`), and images of kohya folders whose caption file is empty (training would
//!   show them with the empty prompt);
//! - `duplicate`: the same decoded RGBA pixels as an earlier image;
//! - `near-duplicate`: a perceptual hash within [`NEAR_DUPLICATE_BITS`] bits of an earlier
//!   image's ([`perceptual_hash()`]), pixels not identical;
//! - `too-small`: the shorter side below half the training resolution, or below [`MIN_SIDE`]
//!   px: upscaled that much, the image teaches blur;
//! - `long-caption`: over [`MAX_CAPTION_TOKENS`] CLIP tokens, which the text encoder cuts;
//! - `extreme-aspect`: the long side over [`MAX_ASPECT`] times the short one.

pub mod perceptual_hash;
pub mod summary;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use lora_core::models::config::{ClipActivation, ClipTextConfig};
use lora_core::models::tokenizer::ClipTokenizer;
use serde::Serialize;

use crate::config::DatasetArgs;
use crate::dataset::{BadKind, Dataset, DatasetItem, ScanOptions};
pub use perceptual_hash::{hash_distance, perceptual_hash, PixelHasher, NEAR_DUPLICATE_BITS};
pub use summary::Summary;

/// `--resolution`'s default, training's.
pub const DEFAULT_RESOLUTION: usize = 512;
/// The shortest side any training image should have, whatever the resolution.
pub const MIN_SIDE: usize = 64;
/// The largest long-side-to-short-side ratio that is not `extreme-aspect`. kohya's default
/// buckets (256 to 1024 px at 512) end at 4:1, so a longer image is cropped to a fraction of
/// itself whether or not buckets are on.
pub const MAX_ASPECT: usize = 4;
/// The caption tokens the SD text encoders read: 77 positions less the start and end tokens.
pub const MAX_CAPTION_TOKENS: usize = 75;

/// What is wrong with a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    Unreadable,
    MissingCaption,
    EmptyCaption,
    Duplicate,
    NearDuplicate,
    TooSmall,
    LongCaption,
    ExtremeAspect,
}

impl ProblemKind {
    pub const ALL: [Self; 8] = [
        Self::Unreadable,
        Self::MissingCaption,
        Self::EmptyCaption,
        Self::Duplicate,
        Self::NearDuplicate,
        Self::TooSmall,
        Self::LongCaption,
        Self::ExtremeAspect,
    ];

    /// The name in reports and JSON (`near-duplicate`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Unreadable => "unreadable",
            Self::MissingCaption => "missing-caption",
            Self::EmptyCaption => "empty-caption",
            Self::Duplicate => "duplicate",
            Self::NearDuplicate => "near-duplicate",
            Self::TooSmall => "too-small",
            Self::LongCaption => "long-caption",
            Self::ExtremeAspect => "extreme-aspect",
        }
    }
}

impl From<BadKind> for ProblemKind {
    fn from(kind: BadKind) -> Self {
        match kind {
            BadKind::Unreadable => Self::Unreadable,
            BadKind::MissingCaption => Self::MissingCaption,
            BadKind::EmptyCaption => Self::EmptyCaption,
        }
    }
}

/// One problem of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file (a parquet row: `file.parquet row N`).
    pub file: String,
    pub kind: ProblemKind,
    /// What is wrong, in words; a pair's detail names both files.
    pub detail: String,
    /// The other file of a `duplicate` or `near-duplicate` pair (the earlier one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub other: Option<String>,
}

/// `lora-train data check`'s options: the source, the resolution, the output and the dataset
/// options training takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// The dataset, as --data takes it: a folder of images with captions (kohya's layout), a
    /// Hugging Face imagefolder, a .parquet file or a folder in the Hub's parquet layout
    pub source: PathBuf,
    /// The training resolution: `too-small` (a shorter side below half of it, or below 64 px)
    /// and the buckets depend on it
    #[arg(long, default_value_t = DEFAULT_RESOLUTION)]
    pub resolution: usize,
    /// Print one JSON object (problems, counts and summary) instead of the readable report
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub dataset: DatasetArgs,
}

impl CheckArgs {
    /// The check's options, or one error listing every bad value.
    pub fn resolve(self) -> Result<CheckOptions> {
        let mut problems = Vec::new();
        let scan = self.dataset.resolve(false, &mut problems);
        if let Err(e) = resolution_in_range(self.resolution) {
            problems.push(e.to_string());
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("\n"));
        }
        Ok(CheckOptions {
            resolution: self.resolution,
            scan,
        })
    }
}

/// Training's range of resolutions.
fn resolution_in_range(resolution: usize) -> Result<()> {
    ensure!(
        (8..=8192).contains(&resolution),
        "--resolution = {resolution}: expected 8 to 8192 pixels"
    );
    Ok(())
}

/// How to check a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOptions {
    /// The training resolution: `too-small` and the buckets depend on it.
    pub resolution: usize,
    /// How to read the dataset, as training would (`skip_bad` is not used: every bad file is
    /// a problem).
    pub scan: ScanOptions,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            resolution: DEFAULT_RESOLUTION,
            scan: ScanOptions::default(),
        }
    }
}

/// The result of a check; its JSON is `lora-train data check --json`'s output, and its
/// `Display` the readable report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckReport {
    pub source: String,
    pub resolution: usize,
    /// Images training would use (bad files left out).
    pub images: usize,
    /// Samples per epoch: every image times its repeats.
    pub samples: usize,
    pub problems: Vec<Problem>,
    /// Every kind, found or not.
    pub problems_by_kind: BTreeMap<ProblemKind, usize>,
    /// The scan's remarks (ignored folders, images without a metadata row): not problems.
    pub warnings: Vec<String>,
    pub summary: Summary,
}

impl CheckReport {
    /// Whether nothing is wrong (warnings aside).
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks the dataset at `source`: every image is decoded (twice: by the scan, then for its
/// fingerprints), every caption tokenized. Errors are a dataset that cannot be read at all (no
/// such folder, wrong metadata) or an image that no longer decodes after the scan.
pub fn check(source: &Path, options: &CheckOptions) -> Result<CheckReport> {
    let resolution = options.resolution;
    resolution_in_range(resolution)?;
    let dataset = Dataset::scan_all(source, &options.scan)?;
    let tokenizer = caption_tokenizer()?;

    let mut problems: Vec<Problem> = dataset
        .skipped
        .iter()
        .map(|bad| Problem {
            file: bad.path.display().to_string(),
            kind: bad.kind.into(),
            detail: bad.reason.clone(),
            other: None,
        })
        .collect();
    let mut pairs = pair_problems(&dataset)?;
    let caption_tokens: Vec<Option<usize>> = dataset
        .items
        .iter()
        .map(|item| caption_length(&tokenizer, &item.caption))
        .collect();
    for ((item, tokens), pair) in dataset.items.iter().zip(&caption_tokens).zip(&mut pairs) {
        problems.extend(item_problems(item, *tokens, resolution));
        problems.append(pair);
    }

    let mut problems_by_kind: BTreeMap<ProblemKind, usize> =
        ProblemKind::ALL.iter().map(|&kind| (kind, 0)).collect();
    for problem in &problems {
        *problems_by_kind.entry(problem.kind).or_default() += 1;
    }
    Ok(CheckReport {
        source: source.display().to_string(),
        resolution,
        images: dataset.items.len(),
        samples: dataset.samples_per_epoch(),
        problems,
        problems_by_kind,
        summary: Summary::of(source, &dataset.items, &caption_tokens, resolution),
        warnings: dataset.warnings,
    })
}

/// The tokenizer training uses for an SD 1.x text encoder (the embedded OpenAI CLIP vocabulary,
/// 77 positions). Its pad id is 0 rather than SD 1.x's end-of-text so that the end-of-text
/// token closing a caption is the last one of the sequence, which [`caption_length`] relies on.
fn caption_tokenizer() -> Result<ClipTokenizer> {
    // openai/clip-vit-large-patch14's text model; the tokenizer reads only the vocabulary size,
    // the positions and the pad id.
    let config = ClipTextConfig {
        vocab_size: 49408,
        hidden_size: 768,
        intermediate_size: 3072,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        max_position_embeddings: MAX_CAPTION_TOKENS + 2,
        hidden_act: ClipActivation::QuickGelu,
        layer_norm_eps: 1e-5,
        projection_dim: None,
        pad_token_id: Some(0),
        bos_token_id: Some(49406),
        eos_token_id: Some(49407),
    };
    ClipTokenizer::load(None, &config).context("cannot load the CLIP tokenizer")
}

/// The caption's tokens without the start and end tokens, or `None` when over
/// [`MAX_CAPTION_TOKENS`] (the encoder cuts it there; how far over is not counted).
fn caption_length(tokenizer: &ClipTokenizer, caption: &str) -> Option<usize> {
    let prompt = tokenizer.encode(caption);
    if prompt.truncated {
        return None;
    }
    // BOS, the tokens, EOS, then padding (0): the last EOS closes the caption.
    let eos = tokenizer.eos_id();
    prompt
        .ids
        .iter()
        .rposition(|&id| id == eos)
        .map(|end| end - 1)
}

/// The problems of one item on its own.
fn item_problems(item: &DatasetItem, tokens: Option<usize>, resolution: usize) -> Vec<Problem> {
    let file = item.image.to_string();
    let problem = |kind, detail| Problem {
        file: file.clone(),
        kind,
        detail,
        other: None,
    };
    let mut problems = Vec::new();
    if item.caption.is_empty() {
        problems.push(problem(
            ProblemKind::EmptyCaption,
            "its caption file is empty: it would train with the empty prompt".into(),
        ));
    }
    if tokens.is_none() {
        problems.push(problem(
            ProblemKind::LongCaption,
            format!(
                "the caption is over {MAX_CAPTION_TOKENS} CLIP tokens: the text encoder reads the \
                 first {MAX_CAPTION_TOKENS} and training cuts the rest"
            ),
        ));
    }
    let (w, h) = item.size;
    let (short, long) = (w.min(h), w.max(h));
    let min_side = MIN_SIDE.max(resolution / 2);
    if short < min_side {
        let why = if min_side == MIN_SIDE {
            "the minimum at any resolution".to_string()
        } else {
            format!("half of resolution {resolution}")
        };
        problems.push(problem(
            ProblemKind::TooSmall,
            format!(
                "{w}x{h}: the shorter side {short} px is below {min_side} px ({why}): training \
                 would upscale it"
            ),
        ));
    }
    if long > short * MAX_ASPECT {
        problems.push(problem(
            ProblemKind::ExtremeAspect,
            format!(
                "{w}x{h}: the long side is {:.1} times the short one (over {MAX_ASPECT}:1): a \
                 square crop or the nearest bucket keeps little of it",
                long as f64 / short as f64
            ),
        ));
    }
    problems
}

/// The `duplicate` and `near-duplicate` problems, per item (each on the later image of its
/// pair). An image whose pixels repeat an earlier one is only its `duplicate`; near-duplicates
/// are looked for among the images of distinct pixels, every pair compared by hash.
fn pair_problems(dataset: &Dataset) -> Result<Vec<Vec<Problem>>> {
    let pixels = PixelHasher::default();
    let mut first_with: HashMap<u128, usize> = HashMap::new();
    let mut distinct: Vec<(usize, u64)> = Vec::new();
    let mut problems = vec![Vec::new(); dataset.items.len()];
    for (index, image) in dataset.images().enumerate() {
        let image = image?;
        let name = dataset.items[index].image.to_string();
        let key = pixels.key(&image);
        if let Some(&first) = first_with.get(&key) {
            let other = dataset.items[first].image.to_string();
            problems[index].push(Problem {
                detail: format!("the same pixels as {other}"),
                file: name,
                kind: ProblemKind::Duplicate,
                other: Some(other),
            });
            continue;
        }
        first_with.insert(key, index);
        let hash = perceptual_hash(&image);
        for &(earlier, earlier_hash) in &distinct {
            let bits = hash_distance(hash, earlier_hash);
            if bits <= NEAR_DUPLICATE_BITS {
                let other = dataset.items[earlier].image.to_string();
                problems[index].push(Problem {
                    detail: format!(
                        "looks like {other}: perceptual hashes {bits} of 64 bits apart (at most \
                         {NEAR_DUPLICATE_BITS} is a near-duplicate)"
                    ),
                    file: name.clone(),
                    kind: ProblemKind::NearDuplicate,
                    other: Some(other),
                });
            }
        }
        distinct.push((index, hash));
    }
    Ok(problems)
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "dataset {} at resolution {}: {} images, {} samples per epoch",
            self.source, self.resolution, self.images, self.samples
        )?;
        if self.problems.is_empty() {
            writeln!(f, "no problems found")?;
        } else {
            writeln!(f, "\n{} problem(s):", self.problems.len())?;
            for problem in &self.problems {
                writeln!(
                    f,
                    "  {:<15} {}: {}",
                    problem.kind.name(),
                    problem.file,
                    problem.detail
                )?;
            }
            let counts: Vec<String> = self
                .problems_by_kind
                .iter()
                .filter(|(_, &n)| n > 0)
                .map(|(kind, n)| format!("{n} {}", kind.name()))
                .collect();
            writeln!(f, "  ({})", counts.join(", "))?;
        }
        for warning in &self.warnings {
            writeln!(f, "warning: {warning}")?;
        }
        let s = &self.summary;
        writeln!(f, "\nfolders:")?;
        for folder in &s.folders {
            writeln!(
                f,
                "  {}: {} images x {} repeats = {} samples",
                folder.folder, folder.images, folder.repeats, folder.samples
            )?;
        }
        let bins = |bins: &[summary::Bin]| {
            bins.iter()
                .filter(|b| b.images > 0)
                .map(|b| format!("{}: {}", b.bin, b.images))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(f, "shorter side (px): {}", bins(&s.shorter_sides))?;
        writeln!(f, "aspect ratio (w:h): {}", bins(&s.aspect_ratios))?;
        writeln!(
            f,
            "caption length (CLIP tokens): {}",
            bins(&s.caption_tokens)
        )?;
        let buckets: Vec<String> = s
            .buckets
            .iter()
            .map(|b| format!("{}: {}", b.bucket, b.images))
            .collect();
        writeln!(f, "buckets at {}: {}", self.resolution, buckets.join(", "))?;
        let tags: Vec<String> = s
            .tags
            .iter()
            .map(|t| format!("{} ({})", t.tag, t.captions))
            .collect();
        writeln!(f, "top tags: {}", tags.join(", "))?;
        for trigger in &s.trigger_words {
            writeln!(
                f,
                "trigger `{}` ({}): in {} of {} captions ({:.0}%)",
                trigger.trigger,
                trigger.from,
                trigger.captions,
                self.images,
                trigger.share * 100.0
            )?;
        }
        Ok(())
    }
}
