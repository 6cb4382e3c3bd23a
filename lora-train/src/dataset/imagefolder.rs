//! Hugging Face `imagefolder` datasets: images anywhere under the folder, and a `metadata.jsonl`
//! (one JSON object per line) or `metadata.csv` (with a header row) at its top level whose
//! `file_name` column names each image relative to the folder and whose caption column
//! (`--caption-column`, default `text`) holds its caption.
//!
//! As `datasets` does, only the rows are the dataset: images without a row are ignored (one
//! warning gives their count), and the rows' order is the dataset's order. Every image is shown
//! once per epoch. A metadata problem (a row without `file_name`, no caption column, a path
//! outside the folder or to no file, a repeated path) stops the scan whatever `--skip-bad` says,
//! with every problem named by file and line; an image that does not decode or has an empty or
//! null caption is a bad file, as a kohya image without a caption is.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use super::{
    has_image_extension, load_image, normalize_caption, with_template, BadFile, BadKind,
    DatasetItem, ImageLocation, ScanOptions,
};

const JSONL: &str = "metadata.jsonl";
const CSV: &str = "metadata.csv";

/// How many metadata problems one error lists; a wrong column name would otherwise list every
/// row.
const MAX_LISTED: usize = 20;

/// One metadata row: where it starts in the file, its `file_name` and its caption (`None`: null).
struct Row {
    line: u64,
    file_name: String,
    caption: Option<String>,
}

/// The metadata file at the top of `dir`, if `dir` is an imagefolder.
pub(super) fn metadata_file(dir: &Path) -> Result<Option<PathBuf>> {
    let (jsonl, csv) = (dir.join(JSONL), dir.join(CSV));
    match (jsonl.is_file(), csv.is_file()) {
        (true, true) => bail!(
            "dataset {} has both {} and {}: an imagefolder has one metadata file, keep one",
            dir.display(),
            jsonl.display(),
            csv.display()
        ),
        (true, false) => Ok(Some(jsonl)),
        (false, true) => Ok(Some(csv)),
        (false, false) => Ok(None),
    }
}

/// The items of the imagefolder `dir` described by `metadata`, in row order, with its bad files
/// and warnings.
pub(super) fn scan(
    dir: &Path,
    metadata: &Path,
    options: &ScanOptions,
) -> Result<(Vec<DatasetItem>, Vec<BadFile>, Vec<String>)> {
    let column = options.caption_column.as_str();
    let mut problems = Vec::new();
    let rows = if metadata.ends_with(CSV) {
        csv_rows(metadata, column, &mut problems)?
    } else {
        jsonl_rows(metadata, column, &mut problems)?
    };
    let mut listed: HashMap<PathBuf, u64> = HashMap::new();
    let mut found = Vec::new();
    for row in rows {
        let at = format!("{} line {}", metadata.display(), row.line);
        let Some(relative) = inside(&row.file_name) else {
            problems.push(format!(
                "{at}: file_name `{}` does not name a file inside the dataset folder (absolute \
                 paths and `..` are refused)",
                row.file_name
            ));
            continue;
        };
        if let Some(first) = listed.get(&relative) {
            problems.push(format!(
                "{at}: file_name `{}` repeats the row at line {first}",
                row.file_name
            ));
            continue;
        }
        listed.insert(relative.clone(), row.line);
        let image = dir.join(&relative);
        if !image.is_file() {
            problems.push(format!(
                "{at}: file_name `{}`: no such file {}",
                row.file_name,
                image.display()
            ));
            continue;
        }
        found.push((at, image, row.caption));
    }
    if !problems.is_empty() {
        let more = problems.len().saturating_sub(MAX_LISTED);
        problems.truncate(MAX_LISTED);
        if more > 0 {
            problems.push(format!("… and {more} more"));
        }
        bail!(
            "the metadata of dataset {} does not describe it:\n  {}",
            dir.display(),
            problems.join("\n  ")
        );
    }

    let mut items = Vec::new();
    let mut bad = Vec::new();
    for (at, image, caption) in found {
        if !has_image_extension(&image) {
            bad.push(BadFile {
                path: image,
                kind: BadKind::Unreadable,
                reason: format!("not an image (expected .png, .jpg, .jpeg or .webp), row at {at}"),
            });
            continue;
        }
        // The same text a caption file with these words would give.
        let caption = caption.map(|c| normalize_caption(&c));
        let Some(caption) = caption
            .clone()
            .filter(|c| !c.is_empty())
            .map(|c| with_template(c, options))
        else {
            bad.push(BadFile {
                path: image,
                kind: match caption {
                    None => BadKind::MissingCaption,
                    Some(_) => BadKind::EmptyCaption,
                },
                reason: format!("no caption: `{column}` is empty or null at {at}"),
            });
            continue;
        };
        let size = match load_image(&image) {
            Ok(img) => (img.width() as usize, img.height() as usize),
            Err(e) => {
                bad.push(BadFile {
                    path: image,
                    kind: BadKind::Unreadable,
                    reason: format!("{e:#}"),
                });
                continue;
            }
        };
        items.push(DatasetItem {
            image: ImageLocation::File(image),
            caption,
            repeats: 1,
            size,
        });
    }

    let mut warnings = Vec::new();
    let unlisted = image_files(dir, Path::new(""))?
        .iter()
        .filter(|path| !listed.contains_key(*path))
        .count();
    if unlisted > 0 {
        warnings.push(format!(
            "ignoring {unlisted} image(s) in {} without a row in {}",
            dir.display(),
            metadata.display()
        ));
    }
    Ok((items, bad, warnings))
}

/// The rows of a metadata.jsonl. Blank lines are skipped; a line that is not a JSON object, or
/// lacks `file_name` or the caption column, is a problem.
fn jsonl_rows(path: &Path, column: &str, problems: &mut Vec<String>) -> Result<Vec<Row>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut rows = Vec::new();
    for (line, (index, json)) in (1u64..).zip(text.lines().enumerate()) {
        // Editors on Windows may start the file with a byte-order mark.
        let json = if index == 0 {
            json.trim_start_matches('\u{feff}')
        } else {
            json
        };
        if json.trim().is_empty() {
            continue;
        }
        let at = format!("{} line {line}", path.display());
        let object = match json_object(json) {
            Ok(object) => object,
            Err(problem) => {
                problems.push(format!("{at}: {problem}"));
                continue;
            }
        };
        let file_name = match object.get("file_name") {
            Some(Value::String(name)) if !name.is_empty() => name.clone(),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                problems.push(format!("{at}: no `file_name`"));
                continue;
            }
            Some(other) => {
                problems.push(format!("{at}: file_name {other} is not a path"));
                continue;
            }
        };
        let caption = match caption_value(&object, column) {
            Ok(caption) => caption,
            Err(problem) => {
                problems.push(format!("{at}: {problem}"));
                continue;
            }
        };
        rows.push(Row {
            line,
            file_name,
            caption,
        });
    }
    Ok(rows)
}

/// One metadata.jsonl line as its JSON object, or what is wrong with it.
pub(crate) fn json_object(line: &str) -> std::result::Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err("expected a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// The caption column's value of a metadata row (`None`: null, a bad file), or what is wrong
/// with it (not text, or no such column: the row's columns are listed).
pub(crate) fn caption_value(
    object: &Map<String, Value>,
    column: &str,
) -> std::result::Result<Option<String>, String> {
    match object.get(column) {
        Some(Value::String(caption)) => Ok(Some(caption.clone())),
        Some(Value::Null) => Ok(None),
        Some(other) => Err(format!("`{column}` {other} is not text")),
        None => Err(format!(
            "no caption column `{column}` (--caption-column); its columns: {}",
            object.keys().cloned().collect::<Vec<_>>().join(", ")
        )),
    }
}

/// The rows of a metadata.csv (RFC 4180, header row first). A missing `file_name` or caption
/// column is an error; an empty caption field is a null caption.
fn csv_rows(path: &Path, column: &str, problems: &mut Vec<String>) -> Result<Vec<Row>> {
    let cannot_read = || format!("cannot read {}", path.display());
    let mut reader = csv::Reader::from_path(path).with_context(cannot_read)?;
    let headers = reader.headers().with_context(cannot_read)?.clone();
    let columns = headers.iter().collect::<Vec<_>>().join(", ");
    let position = |name: &str| headers.iter().position(|h| h == name);
    let Some(file_index) = position("file_name") else {
        bail!(
            "{} line 1: no `file_name` column; its columns: {columns}",
            path.display()
        );
    };
    let Some(caption_index) = position(column) else {
        bail!(
            "{} line 1: no caption column `{column}` (--caption-column); its columns: {columns}",
            path.display()
        );
    };
    let mut rows = Vec::new();
    for record in reader.records() {
        // The csv crate's errors give the record and line; rows of unequal length are errors.
        let record = record.with_context(cannot_read)?;
        let line = record.position().map_or(0, |p| p.line());
        let file_name = record.get(file_index).unwrap_or_default();
        if file_name.is_empty() {
            problems.push(format!("{} line {line}: no `file_name`", path.display()));
            continue;
        }
        rows.push(Row {
            line,
            file_name: file_name.to_string(),
            caption: record
                .get(caption_index)
                .filter(|c| !c.is_empty())
                .map(str::to_string),
        });
    }
    Ok(rows)
}

/// `file_name` as a path relative to the dataset folder (`./` dropped), or `None` where it is
/// absolute, climbs out with `..`, or names the folder itself.
fn inside(file_name: &str) -> Option<PathBuf> {
    let mut relative = PathBuf::new();
    for component in Path::new(file_name).components() {
        match component {
            Component::Normal(part) => relative.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    (!relative.as_os_str().is_empty()).then_some(relative)
}

/// The visible image files under `root/relative`, as paths relative to `root`.
fn image_files(root: &Path, relative: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join(relative);
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
    {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = relative.join(&name);
        let kind = entry
            .file_type()
            .with_context(|| format!("cannot list {}", dir.display()))?;
        if kind.is_dir() {
            files.extend(image_files(root, &path)?);
        } else if has_image_extension(&path) {
            files.push(path);
        }
    }
    Ok(files)
}
