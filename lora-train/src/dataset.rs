//! The training images: finding them, checking every one before training starts, and turning an
//! image into the square `[-1, 1]` tensor the encoders take.
//!
//! Layout (kohya's, which plain folders are a special case of):
//! ```text
//! data/
//!   cat.png  cat.txt          repeated once, caption from cat.txt (required)
//!   10_sks dog/               repeated 10 times; "sks dog" is the caption of images without one
//!     a.jpg  a.txt  b.webp
//! ```
//! Hidden files are ignored. A sub-folder whose name does not start with `<N>_` is ignored with a
//! warning, as kohya does ("ignore directory without repeats").
//!
//! A folder with a `metadata.jsonl` or `metadata.csv` at its top level is a Hugging Face
//! `imagefolder` instead ([`imagefolder`]). A `.parquet` file, or a folder of parquet files in the
//! Hub layout ([`hub_layout`] picks the split's files), is a Hugging Face dataset in parquet
//! ([`parquet`]).

mod hub_layout;
mod imagefolder;
mod parquet;

pub(crate) use imagefolder::{caption_value, json_object};

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageReader, Limits};
use lora_core::resample::{self, Arithmetic, Filter};
use lora_core::source::is_hub_id;
use lora_core::Rng;
use serde::Serialize;

use crate::config::Crop;

/// File extensions read as images (lower-case).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// The most repeats a kohya `N_token` folder may ask for. Real datasets use one or two digits; the
/// bound keeps a mistyped folder name from making an epoch of billions of samples (the training
/// loop lists every sample of an epoch).
pub const MAX_REPEATS: usize = 10_000;

/// Where a dataset item's pixels are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLocation {
    /// An image file.
    File(PathBuf),
    /// The encoded image in row `row` (counted from 0 over the whole file) of a parquet file's
    /// image `column`; `name` is the file name it was made from, or `row N`.
    ParquetRow {
        file: PathBuf,
        row: usize,
        column: String,
        name: String,
    },
}

impl ImageLocation {
    /// The file that holds the image.
    pub fn file(&self) -> &Path {
        match self {
            Self::File(path) | Self::ParquetRow { file: path, .. } => path,
        }
    }

    /// The image's own name (its file name), as the dataset's fingerprint and reports use it.
    pub fn name(&self) -> String {
        match self {
            Self::File(path) => path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            Self::ParquetRow { name, .. } => name.clone(),
        }
    }

    /// Decodes the image. Reading a whole dataset goes through [`Dataset::images`], which streams.
    pub fn load(&self) -> Result<DynamicImage> {
        match self {
            Self::File(path) => load_image(path),
            Self::ParquetRow {
                file, row, column, ..
            } => parquet::RowImages::open(file, column, *row)?.image(*row),
        }
    }
}

impl fmt::Display for ImageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::ParquetRow { file, row, .. } => write!(f, "{} row {row}", file.display()),
        }
    }
}

/// `--caption-column`'s default, diffusers' training scripts' (`text`).
pub const DEFAULT_CAPTION_COLUMN: &str = "text";
/// `--image-column`'s default, diffusers' training scripts' (`image`).
pub const DEFAULT_IMAGE_COLUMN: &str = "image";
/// `--split`'s default.
pub const DEFAULT_SPLIT: &str = "train";

/// How to read a dataset: what each layout needs besides the source itself. As part of a
/// training recipe, the options added after the first release are left out at their defaults, so
/// that checkpoints written before them (whose recipe has no such keys) still resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScanOptions {
    /// The sidecar caption extension of kohya folders (`.txt`).
    pub caption_ext: String,
    /// The caption column of an `imagefolder`'s metadata or a parquet dataset (diffusers'
    /// `--caption_column`).
    #[serde(skip_serializing_if = "is_default_caption_column")]
    pub caption_column: String,
    /// The image column of a parquet dataset (diffusers' `--image_column`).
    #[serde(skip_serializing_if = "is_default_image_column")]
    pub image_column: String,
    /// The split of a parquet dataset folder.
    #[serde(skip_serializing_if = "is_default_split")]
    pub split: String,
    /// Makes the caption from the caption column's text or class name, put in place of
    /// [`LABEL_PLACEHOLDER`] (`a photo of {label}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption_template: Option<String>,
    /// Class names of a ClassLabel caption column to keep (all when empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub label_filter: Vec<String>,
    /// Leave out bad files (listed in [`Dataset::skipped`]) instead of refusing the dataset.
    pub skip_bad: bool,
}

fn is_default_caption_column(column: &str) -> bool {
    column == DEFAULT_CAPTION_COLUMN
}

fn is_default_image_column(column: &str) -> bool {
    column == DEFAULT_IMAGE_COLUMN
}

fn is_default_split(split: &str) -> bool {
    split == DEFAULT_SPLIT
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            caption_ext: ".txt".into(),
            caption_column: DEFAULT_CAPTION_COLUMN.into(),
            image_column: DEFAULT_IMAGE_COLUMN.into(),
            split: DEFAULT_SPLIT.into(),
            caption_template: None,
            label_filter: Vec::new(),
            skip_bad: false,
        }
    }
}

/// One training image and its caption.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetItem {
    pub image: ImageLocation,
    pub caption: String,
    /// How many times an epoch shows it (the `N` of a kohya `N_token` folder, else 1).
    pub repeats: usize,
    /// Pixel size of the image file, `(width, height)`.
    pub size: (usize, usize),
}

/// What is wrong with a [`BadFile`], for tools that sort bad files (`lora-train data check`)
/// rather than print them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadKind {
    /// Training cannot read it: an image that does not decode, a file that is no image, a
    /// caption file that is not UTF-8 text, a label outside its classes, a repeat folder whose
    /// count is refused.
    Unreadable,
    /// An image without a caption: no caption file, a null caption.
    MissingCaption,
    /// A caption given but empty (or only whitespace).
    EmptyCaption,
}

/// A file that cannot be trained on, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadFile {
    pub path: PathBuf,
    pub kind: BadKind,
    pub reason: String,
}

impl fmt::Display for BadFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// What a scan finds: the usable items, the bad files and the warnings.
type Found = (Vec<DatasetItem>, Vec<BadFile>, Vec<String>);

/// The checked dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub items: Vec<DatasetItem>,
    /// Files left out under `--skip-bad` (empty otherwise: bad files are an error).
    pub skipped: Vec<BadFile>,
    /// Non-fatal remarks (ignored folders), for the user.
    pub warnings: Vec<String>,
}

impl Dataset {
    /// Finds and checks every image of `source` (a folder, a .parquet file, or a Hub dataset id
    /// `owner/name` that is no existing path). Each image is decoded in full, so a truncated or
    /// mislabelled file is caught here rather than mid-training. All problems are reported in one
    /// error unless `skip_bad`, in which case the bad files are left out and listed in `skipped`.
    /// An empty result is always an error.
    pub fn scan(source: &Path, options: &ScanOptions) -> Result<Self> {
        let (items, bad, warnings) = Self::find(source, options)?;
        Self::checked(source, items, bad, warnings, options.skip_bad)
    }

    /// The same scan, for reports on the dataset (`lora-train data check`): every usable item
    /// and every bad file in `skipped`, whatever `skip_bad` says, and no error when nothing is
    /// usable. Errors are those of a dataset that cannot be read at all (no such folder, wrong
    /// metadata).
    pub fn scan_all(source: &Path, options: &ScanOptions) -> Result<Self> {
        let (items, skipped, warnings) = Self::find(source, options)?;
        Ok(Self {
            items,
            skipped,
            warnings,
        })
    }

    /// Every item and bad file of the dataset `source`, whichever layout it is.
    fn find(source: &Path, options: &ScanOptions) -> Result<Found> {
        // A Hub dataset id is read from its snapshot in the Hugging Face cache.
        let snapshot = match source.to_str() {
            Some(id) if !source.exists() && is_hub_id(id) => {
                Some(hub_layout::hub_dataset(id, &options.split)?)
            }
            _ => None,
        };
        let dir = snapshot.as_deref().unwrap_or(source);
        match layout(dir)? {
            Layout::Parquet => {
                let files = if dir.is_file() {
                    vec![dir.to_path_buf()]
                } else {
                    // `layout` found parquet files, so there is a list (maybe an empty split).
                    hub_layout::split_files(dir, &options.split)?.unwrap_or_default()
                };
                return parquet::scan(&files, options);
            }
            Layout::ImageFolder(metadata) => {
                refuse_parquet_options(dir, options, "an imagefolder")?;
                return imagefolder::scan(dir, &metadata, options);
            }
            Layout::Kohya => {}
        }
        refuse_parquet_options(dir, options, "a folder of images with caption files")?;
        ensure!(
            options.caption_column == DEFAULT_CAPTION_COLUMN && options.caption_template.is_none(),
            "dataset {} is a folder of images with caption files: --caption-column and \
             --caption-template apply to imagefolder (metadata.jsonl / metadata.csv) and parquet \
             datasets",
            dir.display()
        );
        let caption_ext = options.caption_ext.as_str();
        let mut warnings = Vec::new();
        let mut bad = Vec::new();
        let mut groups = vec![(dir.to_path_buf(), 1usize, None::<String>)];
        for entry in sorted_entries(dir)? {
            if !entry.is_dir() {
                continue;
            }
            let name = entry.file_name().unwrap_or_default().to_string_lossy();
            match parse_repeat_folder(&name) {
                Some((repeats, _)) if repeats > MAX_REPEATS => bad.push(BadFile {
                    path: entry.clone(),
                    kind: BadKind::Unreadable,
                    reason: format!(
                        "a folder of {repeats} repeats: expected at most {MAX_REPEATS}"
                    ),
                }),
                Some((repeats, words)) => groups.push((entry.clone(), repeats, Some(words))),
                None => warnings.push(format!(
                    "ignoring folder {}: not named <repeats>_<caption words> (e.g. `10_sks dog`)",
                    entry.display()
                )),
            }
        }

        let mut items = Vec::new();
        for (folder, repeats, fallback) in groups {
            let entries = sorted_entries(&folder)?;
            let names: BTreeSet<PathBuf> = entries.iter().cloned().collect();
            for path in entries.into_iter().filter(|p| !p.is_dir()) {
                let is_caption = path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().ends_with(caption_ext));
                if is_caption {
                    continue;
                }
                if !has_image_extension(&path) {
                    bad.push(BadFile {
                        path,
                        kind: BadKind::Unreadable,
                        reason: format!(
                            "not an image (expected .png, .jpg, .jpeg or .webp) nor a `{caption_ext}` caption"
                        ),
                    });
                    continue;
                }
                let size = match load_image(&path) {
                    Ok(img) => (img.width() as usize, img.height() as usize),
                    Err(e) => {
                        bad.push(BadFile {
                            path,
                            kind: BadKind::Unreadable,
                            reason: format!("{e:#}"),
                        });
                        continue;
                    }
                };
                let caption_path = caption_path(&path, caption_ext);
                let caption = if names.contains(&caption_path) {
                    match read_caption(&caption_path) {
                        Ok(c) => c,
                        Err(e) => {
                            bad.push(BadFile {
                                path: caption_path,
                                kind: BadKind::Unreadable,
                                reason: format!("{e:#}"),
                            });
                            continue;
                        }
                    }
                } else if let Some(words) = &fallback {
                    words.clone()
                } else {
                    bad.push(BadFile {
                        kind: BadKind::MissingCaption,
                        reason: format!(
                            "no caption: expected {} (or put the image in a kohya `N_caption words` folder)",
                            caption_path.display()
                        ),
                        path,
                    });
                    continue;
                };
                items.push(DatasetItem {
                    image: ImageLocation::File(path),
                    caption,
                    repeats,
                    size,
                });
            }
        }
        Ok((items, bad, warnings))
    }

    /// The scan's result, or the error listing every bad file (unless `skip_bad`), or the error
    /// of a dataset with nothing left to train on.
    fn checked(
        dir: &Path,
        items: Vec<DatasetItem>,
        bad: Vec<BadFile>,
        warnings: Vec<String>,
        skip_bad: bool,
    ) -> Result<Self> {
        if !bad.is_empty() && !skip_bad {
            bail!(
                "{} bad file(s) in dataset {} (fix them, or pass --skip-bad to leave them out):\n  {}",
                bad.len(),
                dir.display(),
                bad.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  ")
            );
        }
        ensure!(
            !items.is_empty(),
            "dataset {} has no usable images{}",
            dir.display(),
            if bad.is_empty() {
                " (expected .png, .jpg, .jpeg or .webp files with captions)".to_string()
            } else {
                format!(", all {} candidates were bad", bad.len())
            }
        );
        Ok(Self {
            items,
            skipped: bad,
            warnings,
        })
    }

    /// Samples per epoch: every image times its repeats.
    pub fn samples_per_epoch(&self) -> usize {
        self.items.iter().map(|i| i.repeats).sum()
    }

    /// Every item's image, decoded, in item order; a parquet file's rows are read in one pass,
    /// a few at a time.
    pub fn images(&self) -> impl Iterator<Item = Result<DynamicImage>> + '_ {
        self.images_of(|_| true).map(|(_, image)| image)
    }

    /// [`Self::images`] of the items `wanted` picks (by index), with their indices; the others
    /// are not decoded (their files are not opened; a parquet file's rows in between are read
    /// past).
    pub fn images_of<'a>(
        &'a self,
        wanted: impl Fn(usize) -> bool + 'a,
    ) -> impl Iterator<Item = (usize, Result<DynamicImage>)> + 'a {
        let mut rows: Option<parquet::RowImages> = None;
        let items = self.items.iter().enumerate();
        items
            .filter(move |(i, _)| wanted(*i))
            .map(move |(i, item)| {
                let image = match &item.image {
                    ImageLocation::File(path) => load_image(path),
                    ImageLocation::ParquetRow {
                        file, row, column, ..
                    } => (|| {
                        let reader = match rows.take() {
                            Some(reader) if reader.reaches(file, column, *row) => reader,
                            _ => parquet::RowImages::open(file, column, *row)?,
                        };
                        rows.insert(reader).image(*row)
                    })(),
                };
                (
                    i,
                    image.with_context(|| format!("cannot load {}", item.image)),
                )
            })
    }

    /// Item index of each sample of an epoch, in folder order (shuffled per epoch by the loop).
    pub fn epoch_samples(&self) -> Vec<usize> {
        self.items
            .iter()
            .enumerate()
            .flat_map(|(i, item)| std::iter::repeat_n(i, item.repeats))
            .collect()
    }
}

/// The kinds of dataset [`Dataset::scan`] reads, told apart as it tells them apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Layout {
    /// A folder of images with sidecar caption files and kohya `N_words` sub-folders.
    Kohya,
    /// A Hugging Face `imagefolder`, described by this metadata file (`metadata.jsonl` or
    /// `metadata.csv`).
    ImageFolder(PathBuf),
    /// A `.parquet` file, or a folder of parquet files (the Hub layout).
    Parquet,
}

/// What kind of dataset `source` is; an error if it is neither a folder nor a `.parquet` file.
pub(crate) fn layout(source: &Path) -> Result<Layout> {
    if source.is_file() && hub_layout::is_parquet_file(source) {
        return Ok(Layout::Parquet);
    }
    ensure!(
        source.is_dir(),
        "dataset {} does not exist or is neither a folder, a .parquet file nor a Hugging Face \
         Hub dataset id (owner/name)",
        source.display()
    );
    if let Some(metadata) = imagefolder::metadata_file(source)? {
        return Ok(Layout::ImageFolder(metadata));
    }
    if hub_layout::holds_parquet(source)? {
        return Ok(Layout::Parquet);
    }
    Ok(Layout::Kohya)
}

/// The parquet-only options must keep their defaults for other layouts: a flag that would be
/// silently ignored is refused instead.
fn refuse_parquet_options(dir: &Path, options: &ScanOptions, layout: &str) -> Result<()> {
    let given: Vec<&str> = [
        (
            options.image_column != DEFAULT_IMAGE_COLUMN,
            "--image-column",
        ),
        (options.split != DEFAULT_SPLIT, "--split"),
        (!options.label_filter.is_empty(), "--label-filter"),
    ]
    .into_iter()
    .filter_map(|(given, flag)| given.then_some(flag))
    .collect();
    ensure!(
        given.is_empty(),
        "dataset {} is {layout}: {} apply to parquet datasets only",
        dir.display(),
        given.join(", ")
    );
    Ok(())
}

/// `10_sks dog` → (10, "sks dog").
pub(crate) fn parse_repeat_folder(name: &str) -> Option<(usize, String)> {
    let (n, words) = name.split_once('_')?;
    let n: usize = n.parse().ok()?;
    (n > 0).then(|| (n, words.trim().to_string()))
}

/// Visible entries of `dir`, sorted by name so scanning is deterministic.
pub(crate) fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            paths.push(entry.path());
        }
    }
    paths.sort();
    Ok(paths)
}

pub(crate) fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// `dir/a.png` → `dir/a<ext>`.
pub(crate) fn caption_path(image: &Path, caption_ext: &str) -> PathBuf {
    let stem = image.file_stem().unwrap_or_default().to_string_lossy();
    image.with_file_name(format!("{stem}{caption_ext}"))
}

/// The caption file's text, lines joined by spaces and trimmed.
pub(crate) fn read_caption(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).context("cannot read caption")?;
    let text = String::from_utf8(bytes).context("caption is not UTF-8 text")?;
    Ok(normalize_caption(&text))
}

/// Runs of whitespace (line breaks included) become one space, ends trimmed: the same caption
/// text whichever layout it came from.
pub(crate) fn normalize_caption(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reads and decodes an image file, trusting its content over its extension.
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).context("cannot open")?;
    decode_image(&bytes)
}

/// The placeholder of `--caption-template`.
pub const LABEL_PLACEHOLDER: &str = "{label}";

/// `text` (a caption column's text or class name) through `--caption-template`, if given.
fn with_template(text: String, options: &ScanOptions) -> String {
    match &options.caption_template {
        Some(template) => normalize_caption(&template.replace(LABEL_PLACEHOLDER, &text)),
        None => text,
    }
}

/// Decodes an encoded image (PNG, JPEG, WebP, … as its bytes say, whatever it is called), upright:
/// an EXIF orientation (a phone photo taken sideways is stored sideways with orientation 6) is
/// applied, so the size and pixels are those every viewer shows and Pillow's
/// `ImageOps.exif_transpose` gives, not the stored ones. Training on the stored pixels would teach
/// the model sideways subjects and put the image in the wrong aspect-ratio bucket.
///
/// Every mode decodes (grayscale, alpha, palette, 16-bit, CMYK JPEG); [`image_to_tensor`] turns
/// each into RGB(A) as Pillow's `convert("RGB")` does, with one deliberate difference: 16-bit
/// samples are scaled to 8 bits (round(v / 257)), where Pillow clips a 16-bit grayscale image's
/// values to 255 (white) and keeps a 16-bit RGB image's high byte.
pub fn decode_image(bytes: &[u8]) -> Result<DynamicImage> {
    let mut decoder = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .context("cannot read")?
        .into_decoder()
        .context("cannot decode as an image")?;
    // The pixel buffer counts against the default allocation limit (512 MiB), as
    // `ImageReader::decode` counts it: a hostile header claiming a huge image is refused before
    // anything is allocated.
    let mut limits = Limits::default();
    limits
        .reserve(decoder.total_bytes())
        .and_then(|()| decoder.set_limits(limits))
        .context("cannot decode as an image")?;
    let orientation = decoder
        .orientation()
        .context("cannot read the image's EXIF orientation")?;
    let mut image = DynamicImage::from_decoder(decoder).context("cannot decode as an image")?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// The aspect-ratio bucket of a `width`×`height` image: the `(w, h)`, both multiples of `step`,
/// with `w·h ≤ resolution²` and neither side over twice the resolution, whose aspect ratio is
/// closest to the image's (ties: the larger area). As kohya's buckets, at constant area.
pub fn bucket_size(width: usize, height: usize, resolution: usize, step: usize) -> (usize, usize) {
    let target = (width as f64 / height as f64).ln();
    let area = resolution * resolution;
    let mut best = (resolution, resolution);
    let mut best_key = (f64::INFINITY, 0);
    let mut w = step;
    while w <= 2 * resolution {
        let h = (area / w / step * step).min(2 * resolution);
        if h >= step {
            let key = (((w as f64 / h as f64).ln() - target).abs(), w * h);
            if key.0 < best_key.0 - 1e-12
                || ((key.0 - best_key.0).abs() <= 1e-12 && key.1 > best_key.1)
            {
                best = (w, h);
                best_key = key;
            }
        }
        w += step;
    }
    best
}

/// Where a sample's pixels come from: the image resized to `resized` = `(width, height)`, cut at
/// `(left, top)` (SDXL's crop micro-conditioning is this corner).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropWindow {
    pub resized: (usize, usize),
    pub left: usize,
    pub top: usize,
}

/// Resizes so the image covers `size` = `(width, height)` and cuts that window, in the centre or
/// where `rng` draws it: the pixels a sample of that size trains on, and where they were cut.
/// The resize is Pillow's `LANCZOS`, pixel for pixel (`lora_core::resample`), on 8-bit RGB (RGBA
/// where the image has alpha).
pub fn cover_and_crop(
    image: &DynamicImage,
    size: (usize, usize),
    crop: Crop,
    rng: &mut Rng,
) -> (DynamicImage, CropWindow) {
    let (tw, th) = size;
    let (w, h) = (image.width() as usize, image.height() as usize);
    let scale = (tw as f64 / w as f64).max(th as f64 / h as f64);
    let (nw, nh) = (
        ((w as f64 * scale).round() as usize).max(tw),
        ((h as f64 * scale).round() as usize).max(th),
    );
    let (x0, y0) = match crop {
        Crop::Center => ((nw - tw) / 2, (nh - th) / 2),
        Crop::Random => (
            rng.below((nw - tw + 1) as u64) as usize,
            rng.below((nh - th + 1) as u64) as usize,
        ),
    };
    let window = CropWindow {
        resized: (nw, nh),
        left: x0,
        top: y0,
    };
    // Only the window of the resized image is computed: the same pixels as resizing the whole
    // image and cutting the window out.
    let cut = resample::Window {
        left: x0,
        top: y0,
        width: tw,
        height: th,
    };
    let new_size = (nw as u32, nh as u32);
    let pixels = if (nw, nh) == (w, h) {
        image.crop_imm(x0 as u32, y0 as u32, tw as u32, th as u32)
    } else if image.color().has_alpha() {
        // An 8-bit image is resized where it is; only other modes are converted first.
        let rgba = image
            .as_rgba8()
            .map_or_else(|| Cow::Owned(image.to_rgba8()), Cow::Borrowed);
        DynamicImage::ImageRgba8(resample::resize_rgba_window(
            &rgba,
            new_size,
            cut,
            Filter::Lanczos3,
            Arithmetic::Pillow,
        ))
    } else {
        let rgb = image
            .as_rgb8()
            .map_or_else(|| Cow::Owned(image.to_rgb8()), Cow::Borrowed);
        DynamicImage::ImageRgb8(resample::resize_rgb_window(
            &rgb,
            new_size,
            cut,
            Filter::Lanczos3,
            Arithmetic::Pillow,
        ))
    };
    (pixels, window)
}

/// [`cover_and_crop`], optionally mirrored, as `[channels, height, width]` f32 in [-1, 1]: RGB
/// for 3 channels, RGBA (opaque where the image has no alpha) for 4; and where it was cut (before
/// mirroring).
pub fn image_to_tensor(
    image: &DynamicImage,
    size: (usize, usize),
    crop: Crop,
    flip: bool,
    channels: usize,
    rng: &mut Rng,
    device: &Device,
) -> Result<(Tensor, CropWindow)> {
    ensure!(
        channels == 3 || channels == 4,
        "images become 3 (RGB) or 4 (RGBA) channels; the model wants {channels}"
    );
    let (tw, th) = size;
    let (pixels, window) = cover_and_crop(image, size, crop, rng);
    // 8-bit RGB and RGBA are read where they are; other modes are converted first.
    let converted;
    let (interleaved, stride): (&[u8], usize) = match &pixels {
        DynamicImage::ImageRgb8(rgb) => (rgb.as_raw(), 3),
        DynamicImage::ImageRgba8(rgba) => (rgba.as_raw(), 4),
        other => {
            converted = other.to_rgba8();
            (converted.as_raw(), 4)
        }
    };
    let plane = tw * th;
    let mut values = vec![0f32; channels * plane];
    for (c, out) in values.chunks_exact_mut(plane).enumerate() {
        if c >= stride {
            out.fill(1.0); // opaque alpha for an image without one
            continue;
        }
        for (src, dst) in interleaved
            .chunks_exact(tw * stride)
            .zip(out.chunks_exact_mut(tw))
        {
            let row = src.chunks_exact(stride).map(|pixel| pixel[c]);
            let scale = |v: u8| f32::from(v) / 127.5 - 1.0;
            if flip {
                dst.iter_mut()
                    .rev()
                    .zip(row)
                    .for_each(|(d, v)| *d = scale(v));
            } else {
                dst.iter_mut().zip(row).for_each(|(d, v)| *d = scale(v));
            }
        }
    }
    Ok((
        Tensor::from_vec(values, (channels, th, tw), device)?,
        window,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeat_folders_parse_like_kohya() {
        assert_eq!(
            parse_repeat_folder("10_sks dog"),
            Some((10, "sks dog".into()))
        );
        assert_eq!(parse_repeat_folder("3_a_b"), Some((3, "a_b".into())));
        assert_eq!(parse_repeat_folder("dogs"), None);
        assert_eq!(parse_repeat_folder("0_x"), None);
    }

    #[test]
    fn a_folder_of_absurd_repeats_is_a_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("99999999999_sks dog");
        std::fs::create_dir(&folder).unwrap();
        image::RgbImage::new(2, 2)
            .save(folder.join("a.png"))
            .unwrap();
        let err = Dataset::scan(dir.path(), &ScanOptions::default()).unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("99999999999_sks dog") && message.contains("at most 10000"),
            "{message}"
        );
    }

    #[test]
    fn buckets_keep_the_area_and_follow_the_aspect_ratio() {
        assert_eq!(bucket_size(100, 100, 512, 64), (512, 512));
        let (w, h) = bucket_size(1600, 900, 512, 64);
        assert!(
            w > h && w * h <= 512 * 512 && w % 64 == 0 && h % 64 == 0,
            "{w}x{h}"
        );
        let (w2, h2) = bucket_size(900, 1600, 512, 64);
        assert!(h2 > w2 && w2 * h2 <= 512 * 512, "{w2}x{h2}");
        assert_eq!(bucket_size(64, 32, 32, 8), (40, 24));
    }

    #[test]
    fn image_tensor_is_cropped_scaled_and_flipped() {
        // 4×2 image: left half black, right half white.
        let mut img = image::RgbImage::new(4, 2);
        for x in 2..4 {
            for y in 0..2 {
                img.put_pixel(x, y, image::Rgb([255, 255, 255]));
            }
        }
        let img = DynamicImage::ImageRgb8(img);
        let mut rng = Rng::new(0);
        let t = image_to_tensor(&img, (2, 2), Crop::Center, false, 3, &mut rng, &Device::Cpu)
            .unwrap()
            .0;
        assert_eq!(t.dims(), &[3, 2, 2]);
        let row = t.get(0).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row, vec![-1.0, 1.0]);
        let t = image_to_tensor(&img, (2, 2), Crop::Center, true, 4, &mut rng, &Device::Cpu)
            .unwrap()
            .0;
        let row = t.get(0).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row, vec![1.0, -1.0]);
        let alpha = t
            .get(3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(alpha.iter().all(|&a| a == 1.0));
    }

    /// RGBA and grayscale sources: the alpha channel read (or dropped for 3 channels), a gray
    /// level repeated in R, G and B, mirrored the same way.
    #[test]
    fn image_tensor_reads_alpha_and_gray_sources() {
        let mut rgba = image::RgbaImage::new(2, 1);
        rgba.put_pixel(0, 0, image::Rgba([255, 0, 0, 0]));
        rgba.put_pixel(1, 0, image::Rgba([0, 0, 255, 255]));
        let rgba = DynamicImage::ImageRgba8(rgba);
        let mut rng = Rng::new(0);
        let mut planes = |image: &DynamicImage, flip: bool, channels: usize| {
            image_to_tensor(
                image,
                (2, 1),
                Crop::Center,
                flip,
                channels,
                &mut rng,
                &Device::Cpu,
            )
            .unwrap()
            .0
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
        };
        assert_eq!(
            planes(&rgba, false, 4),
            [1.0, -1.0, -1.0, -1.0, -1.0, 1.0, -1.0, 1.0]
        );
        assert_eq!(planes(&rgba, true, 3), [-1.0, 1.0, -1.0, -1.0, 1.0, -1.0]);
        let gray =
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(2, 1, vec![0, 255]).unwrap());
        assert_eq!(
            planes(&gray, true, 4),
            [1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 1.0]
        );
    }

    #[test]
    fn images_of_reads_only_the_wanted_items() {
        let dir = tempfile::tempdir().unwrap();
        for (name, shade) in [("a.png", 10u8), ("b.png", 20), ("c.png", 30)] {
            image::RgbImage::from_pixel(2, 2, image::Rgb([shade; 3]))
                .save(dir.path().join(name))
                .unwrap();
            std::fs::write(dir.path().join(name).with_extension("txt"), "a square").unwrap();
        }
        let dataset = Dataset::scan(dir.path(), &ScanOptions::default()).unwrap();
        // Damaged after the scan: reading it now fails.
        std::fs::write(dir.path().join("b.png"), b"not a png").unwrap();
        let picked: Vec<(usize, u8)> = dataset
            .images_of(|i| i != 1)
            .map(|(i, image)| (i, image.unwrap().to_rgb8().get_pixel(0, 0).0[0]))
            .collect();
        assert_eq!(picked, vec![(0, 10), (2, 30)]);
        let all: Vec<bool> = dataset.images().map(|image| image.is_ok()).collect();
        assert_eq!(all, vec![true, false, true]);
    }
}
