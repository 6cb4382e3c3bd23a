//! The summary of a dataset check: what training will see, in counts. Every count is of images
//! (each once, whatever its repeats) except `samples`, which counts what an epoch shows.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use serde::Serialize;

use crate::dataset::{bucket_size, parse_repeat_folder, DatasetItem, ImageLocation};

/// How many of the most frequent tags the summary lists.
pub const TOP_TAGS: usize = 20;
/// The bucket step `bucket_size` is given: 64 px, the granularity of SD 1.x/2.x buckets in
/// kohya's scripts (the VAE's 8 times the UNet's 8).
pub const BUCKET_STEP: usize = 64;

/// What training will see, in counts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Images and samples per folder (a kohya `N_words` folder, the dataset's top folder, an
    /// imagefolder's sub-folder) or parquet file, in the order the scan met them.
    pub folders: Vec<FolderCount>,
    /// Images by their shorter side in pixels.
    pub shorter_sides: Vec<Bin>,
    /// Images by aspect ratio, width:height; the last bins on each side are `extreme-aspect`.
    pub aspect_ratios: Vec<Bin>,
    /// Images per aspect-ratio bucket at the check's resolution (`--buckets` training), most
    /// used first.
    pub buckets: Vec<BucketCount>,
    /// Captions by length in CLIP tokens (without the start and end tokens); over 75 is cut by
    /// the text encoder.
    pub caption_tokens: Vec<Bin>,
    /// The most frequent tags (a caption's comma-separated parts, trimmed), counted once per
    /// caption, most frequent first (at most [`TOP_TAGS`]).
    pub tags: Vec<TagCount>,
    /// How many captions hold each trigger word (see [`TriggerCoverage`]).
    pub trigger_words: Vec<TriggerCoverage>,
}

/// One histogram bin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bin {
    pub bin: String,
    pub images: usize,
}

/// The images of one folder (or parquet file) and the samples an epoch makes of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FolderCount {
    pub folder: String,
    pub images: usize,
    pub repeats: usize,
    pub samples: usize,
}

/// One aspect-ratio bucket, `width`×`height` pixels, and how many images train at it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BucketCount {
    pub bucket: String,
    pub width: usize,
    pub height: usize,
    pub images: usize,
}

/// A tag and the number of captions that have it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TagCount {
    pub tag: String,
    pub captions: usize,
}

/// A trigger word and the share of captions that contain it (as whole words, any case). The
/// trigger words are those of the kohya `N_words` folders when the dataset has any (kohya
/// captions an image of such a folder without a caption file with them), otherwise the tag most
/// captions start with (the usual place of a trigger word in tagged captions) if it starts at
/// least half of them and more than one: sentence captions, each its own first "tag", have none.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TriggerCoverage {
    pub trigger: String,
    /// Where it comes from: `folder <name>` or `first tag`.
    pub from: String,
    pub captions: usize,
    /// `captions` over the number of images, in [0, 1].
    pub share: f64,
}

impl Summary {
    /// The summary of `items` (from the dataset at `source`) at `resolution`, with each caption's
    /// token count (`None`: over the text encoder's 75).
    pub fn of(
        source: &Path,
        items: &[DatasetItem],
        caption_tokens: &[Option<usize>],
        resolution: usize,
    ) -> Self {
        let mut buckets: BTreeMap<(usize, usize), usize> = BTreeMap::new();
        for item in items {
            let (w, h) = item.size;
            *buckets
                .entry(bucket_size(w, h, resolution, BUCKET_STEP))
                .or_default() += 1;
        }
        let mut buckets: Vec<BucketCount> = buckets
            .into_iter()
            .map(|((width, height), images)| BucketCount {
                bucket: format!("{width}x{height}"),
                width,
                height,
                images,
            })
            .collect();
        buckets.sort_by_key(|b| Reverse(b.images));
        Self {
            folders: folders(items),
            shorter_sides: histogram(
                &SHORTER_SIDE_BINS,
                items.iter().map(|i| shorter_side_bin(i.size)),
            ),
            aspect_ratios: histogram(&ASPECT_BINS, items.iter().map(|i| aspect_bin(i.size))),
            buckets,
            caption_tokens: histogram(
                &TOKEN_BINS,
                caption_tokens.iter().map(|&tokens| token_bin(tokens)),
            ),
            tags: tags(items),
            trigger_words: trigger_words(source, items),
        }
    }
}

/// Counts each bin's index; every bin is listed, empty ones too, so the shape never changes.
fn histogram(labels: &[&str], bins: impl Iterator<Item = usize>) -> Vec<Bin> {
    let mut counts = vec![0usize; labels.len()];
    for bin in bins {
        counts[bin] += 1;
    }
    labels
        .iter()
        .zip(counts)
        .map(|(label, images)| Bin {
            bin: (*label).to_string(),
            images,
        })
        .collect()
}

/// Lower edges of the shorter-side bins after the first, in pixels.
const SHORTER_SIDE_EDGES: [usize; 7] = [64, 128, 256, 512, 768, 1024, 2048];
const SHORTER_SIDE_BINS: [&str; 8] = [
    "<64",
    "64-127",
    "128-255",
    "256-511",
    "512-767",
    "768-1023",
    "1024-2047",
    "2048+",
];

fn shorter_side_bin((w, h): (usize, usize)) -> usize {
    let side = w.min(h);
    SHORTER_SIDE_EDGES
        .iter()
        .filter(|&&edge| side >= edge)
        .count()
}

const ASPECT_BINS: [&str; 7] = [
    "taller than 1:4",
    "1:4 to 1:2",
    "1:2 to 3:4",
    "3:4 to 4:3",
    "4:3 to 2:1",
    "2:1 to 4:1",
    "wider than 4:1",
];

/// The bin of a `w`×`h` image: its long side over its short side in steps 4:3, 2:1, 4:1 (upper
/// ends included), on the wide or the tall side. Integer comparisons: exact at the edges.
fn aspect_bin((w, h): (usize, usize)) -> usize {
    let (long, short) = (w.max(h), w.min(h));
    let steps = [(4, 3), (2, 1), (4, 1)]
        .iter()
        .filter(|&&(num, den)| long * den > short * num)
        .count();
    if w >= h {
        3 + steps
    } else {
        3 - steps
    }
}

const TOKEN_BINS: [&str; 7] = ["0", "1-15", "16-30", "31-45", "46-60", "61-75", "over 75"];

fn token_bin(tokens: Option<usize>) -> usize {
    match tokens {
        Some(0) => 0,
        Some(n) => 1 + (n - 1) / 15,
        None => TOKEN_BINS.len() - 1,
    }
}

/// The folder an item counts under: an image file's folder, or the parquet file of a row.
fn folder_of(location: &ImageLocation) -> &Path {
    match location {
        ImageLocation::File(path) => path.parent().unwrap_or(Path::new("")),
        ImageLocation::ParquetRow { file, .. } => file,
    }
}

fn folders(items: &[DatasetItem]) -> Vec<FolderCount> {
    let mut index: HashMap<(&Path, usize), usize> = HashMap::new();
    let mut folders: Vec<FolderCount> = Vec::new();
    for item in items {
        let folder = folder_of(&item.image);
        let at = *index.entry((folder, item.repeats)).or_insert_with(|| {
            folders.push(FolderCount {
                folder: folder.display().to_string(),
                images: 0,
                repeats: item.repeats,
                samples: 0,
            });
            folders.len() - 1
        });
        folders[at].images += 1;
        folders[at].samples += item.repeats;
    }
    folders
}

/// A caption's tags: its comma-separated parts, trimmed, empty ones left out.
fn tags_of(caption: &str) -> impl Iterator<Item = &str> {
    caption.split(',').map(str::trim).filter(|t| !t.is_empty())
}

fn tags(items: &[DatasetItem]) -> Vec<TagCount> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for item in items {
        for tag in tags_of(&item.caption).collect::<BTreeSet<_>>() {
            *counts.entry(tag).or_default() += 1;
        }
    }
    let mut tags: Vec<TagCount> = counts
        .into_iter()
        .map(|(tag, captions)| TagCount {
            tag: tag.to_string(),
            captions,
        })
        .collect();
    // Stable: equal counts keep the alphabetical order of the map.
    tags.sort_by_key(|t| Reverse(t.captions));
    tags.truncate(TOP_TAGS);
    tags
}

fn trigger_words(source: &Path, items: &[DatasetItem]) -> Vec<TriggerCoverage> {
    let mut triggers: Vec<(String, String)> = Vec::new();
    for item in items {
        let ImageLocation::File(path) = &item.image else {
            continue;
        };
        let Some(folder) = path.parent().filter(|f| f.parent() == Some(source)) else {
            continue;
        };
        let name = folder.file_name().unwrap_or_default().to_string_lossy();
        if let Some((_, words)) = parse_repeat_folder(&name) {
            if !words.is_empty() && !triggers.iter().any(|(w, _)| *w == words) {
                triggers.push((words, format!("folder {name}")));
            }
        }
    }
    if triggers.is_empty() {
        let mut first_tags: BTreeMap<&str, usize> = BTreeMap::new();
        for item in items {
            if let Some(tag) = tags_of(&item.caption).next() {
                *first_tags.entry(tag).or_default() += 1;
            }
        }
        // The most common; among equals, the alphabetically first (the map's order).
        let most = first_tags.values().copied().max();
        if let Some((tag, n)) = first_tags.into_iter().find(|&(_, n)| Some(n) == most) {
            if n >= 2 && 2 * n >= items.len() {
                triggers.push((tag.to_string(), "first tag".into()));
            }
        }
    }
    triggers
        .into_iter()
        .map(|(trigger, from)| {
            let captions = items
                .iter()
                .filter(|item| contains_words(&item.caption, &trigger))
                .count();
            TriggerCoverage {
                share: captions as f64 / items.len() as f64,
                trigger,
                from,
                captions,
            }
        })
        .collect()
}

/// Whether `text` holds `words` (any case) not inside a longer word: `sks` is in `a sks dog`
/// but not in `tasks`.
fn contains_words(text: &str, words: &str) -> bool {
    let (text, words) = (text.to_lowercase(), words.to_lowercase());
    let is_word_char = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(&words).any(|(start, found)| {
        let before = text[..start].chars().next_back();
        let after = text[start + found.len()..].chars().next();
        !before.is_some_and(is_word_char) && !after.is_some_and(is_word_char)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aspect_bins_are_symmetric_and_exact_at_the_edges() {
        assert_eq!(aspect_bin((100, 100)), 3);
        assert_eq!(aspect_bin((400, 300)), 3);
        assert_eq!(aspect_bin((401, 300)), 4);
        assert_eq!(aspect_bin((400, 100)), 5);
        assert_eq!(aspect_bin((401, 100)), 6);
        assert_eq!(aspect_bin((100, 401)), 0);
        assert_eq!(aspect_bin((150, 300)), 2);
    }

    #[test]
    fn token_and_side_bins_cover_their_ranges() {
        assert_eq!(
            [Some(0), Some(1), Some(15), Some(16), Some(75), None].map(token_bin),
            [0, 1, 1, 2, 5, 6]
        );
        assert_eq!(
            [(10, 63), (64, 64), (600, 511), (5000, 4000)].map(shorter_side_bin),
            [0, 1, 3, 7]
        );
    }

    fn items(captions: &[&str]) -> Vec<DatasetItem> {
        captions
            .iter()
            .enumerate()
            .map(|(i, caption)| DatasetItem {
                image: ImageLocation::File(format!("data/{i}.png").into()),
                caption: (*caption).to_string(),
                repeats: 1,
                size: (512, 512),
            })
            .collect()
    }

    #[test]
    fn without_repeat_folders_the_leading_tag_of_most_captions_is_the_trigger() {
        let tagged = items(&["ohwx, a hat", "ohwx, grass", "a dog, OHWX", "grass"]);
        let found = trigger_words(Path::new("data"), &tagged);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (
                found[0].trigger.as_str(),
                found[0].from.as_str(),
                found[0].captions
            ),
            ("ohwx", "first tag", 3)
        );
        assert!((found[0].share - 0.75).abs() < 1e-12, "{}", found[0].share);
        let sentences = items(&["a red circle", "a blue square", "a green triangle"]);
        assert!(trigger_words(Path::new("data"), &sentences).is_empty());
    }

    #[test]
    fn trigger_words_match_whole_words_only() {
        assert!(contains_words("a photo of SKS dog", "sks dog"));
        assert!(contains_words("sks, dog", "sks"));
        assert!(!contains_words("many tasks", "sks"));
        assert!(!contains_words("sks_dog", "sks"));
    }
}
