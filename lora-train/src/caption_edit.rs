//! Caption editing (`lora-train data caption`): a prefix such as a trigger word, captions from
//! kohya folder names or from a captioning model, text replacement and tag removal, over a kohya
//! folder's caption files or an `imagefolder`'s metadata.
//!
//! Captions are read as [`crate::dataset`] reads them for training (whitespace runs made one
//! space, ends trimmed), and a caption changes only when that text changes. The edits, in this
//! order:
//!
//! 1. `from_folder_names`: an image of a kohya `N_words` folder without a caption (no caption
//!    file, or an empty one) gets the folder's words, as training would give it; with `overwrite`,
//!    every image of such a folder does. Kohya folders only. Or `generated`: an image without a
//!    caption gets its caption from this map (a model's, `crate::auto_caption`); with
//!    `overwrite`, every image in the map does.
//! 2. `replace`: each `(old, new)` in turn replaces every occurrence of `old` by `new`.
//! 3. `remove_tags`: the caption is read as comma-separated tags; tags equal to one of these
//!    (both trimmed, case-sensitive) are removed and the rest joined by `", "`, which also drops
//!    the empty tags of doubled or trailing commas. A caption without such a tag is left as it is.
//! 4. `prefix`: put before every caption that does not already start with it, so running the
//!    same edit twice changes nothing the second time.
//!
//! [`plan`] computes every change without touching a file; [`Plan::diff`] shows them and
//! [`Plan::write`] writes them, each file atomically (a temporary file beside it, synced, renamed
//! over it), so an interrupted run leaves every caption either old or new. A kohya caption file is
//! written as the caption and a line break. An imagefolder's metadata file is rewritten with only
//! the caption column changed: in `metadata.jsonl` the caption's value is replaced in place, so
//! other keys keep their order and spelling byte for byte; `metadata.csv` keeps its header, row
//! order and every other field's value (the csv crate quotes a field only where it must). Images
//! and every other file are never touched. A caption the edits would leave empty is an error, and
//! any error means nothing is written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;

use crate::config::DatasetArgs;
use crate::dataset::{
    caption_path, caption_value, has_image_extension, json_object, layout, normalize_caption,
    parse_repeat_folder, read_caption, sorted_entries, Layout, ScanOptions, DEFAULT_CAPTION_COLUMN,
};

/// The edits to make, applied in the order of the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edits {
    /// Put before every caption that does not start with it (`"sks, "`).
    pub prefix: Option<String>,
    /// Give images of kohya `N_words` folders without a caption the folder's words.
    pub from_folder_names: bool,
    /// Captions made for images (by path, as [`Plan::images`] names them), given to the images
    /// without one. `Some` when a model captions, even if it captioned nothing.
    pub generated: Option<BTreeMap<PathBuf, String>>,
    /// With `from_folder_names` or `generated`: replace existing captions too.
    pub overwrite: bool,
    /// `(old, new)`: replace every `old` by `new`, in this order.
    pub replace: Vec<(String, String)>,
    /// Comma-separated tags to remove.
    pub remove_tags: Vec<String>,
}

impl Edits {
    /// The caption after the replacements, tag removals and prefix (steps 2 to 4), normalized as
    /// training reads captions.
    pub fn edit(&self, caption: &str) -> String {
        let mut caption = normalize_caption(caption);
        for (old, new) in &self.replace {
            caption = normalize_caption(&caption.replace(old.as_str(), new));
        }
        if !self.remove_tags.is_empty() {
            let remove: BTreeSet<&str> = self.remove_tags.iter().map(|t| t.trim()).collect();
            let tags: Vec<&str> = caption.split(',').map(str::trim).collect();
            if tags.iter().any(|t| remove.contains(t)) {
                caption = tags
                    .into_iter()
                    .filter(|t| !t.is_empty() && !remove.contains(t))
                    .collect::<Vec<_>>()
                    .join(", ");
            }
        }
        if let Some(prefix) = self.prefix.as_deref().map(normalized_prefix) {
            if !caption.starts_with(&prefix) {
                caption = normalize_caption(&format!("{prefix}{caption}"));
            }
        }
        caption
    }

    fn check(&self) -> Result<()> {
        if let Some(prefix) = &self.prefix {
            ensure!(
                !prefix.trim().is_empty(),
                "--prefix `{prefix}` is blank: expected text such as \"sks, \""
            );
        }
        for (old, _) in &self.replace {
            ensure!(
                !old.is_empty(),
                "--replace with nothing to replace: expected OLD=NEW"
            );
        }
        for tag in &self.remove_tags {
            ensure!(
                !tag.trim().is_empty() && !tag.contains(','),
                "--remove-tag `{tag}`: expected one tag (text without commas)"
            );
        }
        ensure!(
            !self.overwrite || self.from_folder_names || self.generated.is_some(),
            "--overwrite applies to --from-folder-names and --model only"
        );
        ensure!(
            !(self.from_folder_names && self.generated.is_some()),
            "--from-folder-names and --model both give captions: choose one"
        );
        Ok(())
    }
}

/// The prefix as a normalized caption starts with it: whitespace runs made one space, leading
/// whitespace dropped, a trailing space kept (`"sks, "` must stay apart from the caption). Without
/// this, a prefix with a double space would never be found at the start of a caption it was
/// written to, and a second run would add it again.
fn normalized_prefix(prefix: &str) -> String {
    let mut normal = normalize_caption(prefix);
    if prefix.ends_with(char::is_whitespace) {
        normal.push(' ');
    }
    normal
}

/// One caption that the edits change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The file holding the caption: a kohya caption file, or the imagefolder's metadata file.
    pub file: PathBuf,
    /// In a metadata file, the row: `line N (file_name)`.
    pub row: Option<String>,
    /// The caption before, as training reads it; `None` where there was no caption file.
    pub old: Option<String>,
    /// The caption after.
    pub new: String,
}

/// Every change the edits make to a dataset's captions, and the files to write for them.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The changed captions, in the dataset's order.
    pub changes: Vec<Change>,
    /// Captions the edits leave as they are.
    pub unchanged: usize,
    /// Images (or metadata rows) without a caption that no edit gives one; left alone.
    pub uncaptioned: usize,
    /// Every image whose caption the dataset keeps, in the dataset's order, and whether it had a
    /// caption before the edits.
    pub images: Vec<(PathBuf, bool)>,
    /// The whole new contents of each file to write.
    writes: Vec<(PathBuf, Vec<u8>)>,
}

impl Plan {
    /// The changes as a unified diff: per caption, `--- file` and `+++ file` (`/dev/null` for a
    /// caption file still to be made; a metadata file's row after its name), then `-old` and
    /// `+new`.
    pub fn diff(&self) -> String {
        let mut out = String::new();
        for change in &self.changes {
            let name = match &change.row {
                Some(row) => format!("{} {row}", change.file.display()),
                None => change.file.display().to_string(),
            };
            let old_name = if change.old.is_some() {
                name.as_str()
            } else {
                "/dev/null"
            };
            // Writing to a String cannot fail.
            let _ = writeln!(out, "--- {old_name}\n+++ {name}");
            if let Some(old) = &change.old {
                let _ = writeln!(out, "-{old}");
            }
            let _ = writeln!(out, "+{}", change.new);
        }
        out
    }

    /// The files [`Plan::write`] writes: caption files, or the metadata file.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.writes.iter().map(|(path, _)| path.as_path())
    }

    /// Writes every changed file atomically. A failure names the file; files written before it
    /// keep their new captions, the others their old ones, never half of one.
    pub fn write(&self) -> Result<()> {
        for (path, contents) in &self.writes {
            lora_core::io::write_atomic(path, |temp| {
                std::fs::write(temp, contents)
                    .with_context(|| format!("cannot write {}", temp.display()))
            })?;
        }
        Ok(())
    }
}

/// The dataset options of `lora-train data caption`: the caption extension (kohya folders) and
/// caption column (imagefolders). The options that only say how to read images or parquet files
/// for training are refused rather than silently ignored.
pub fn caption_options(args: DatasetArgs) -> Result<ScanOptions> {
    let given: Vec<&str> = [
        (args.image_column.is_some(), "--image-column"),
        (args.split.is_some(), "--split"),
        (args.caption_template.is_some(), "--caption-template"),
        (args.label_filter.is_some(), "--label-filter"),
    ]
    .into_iter()
    .filter_map(|(given, flag)| given.then_some(flag))
    .collect();
    ensure!(
        given.is_empty(),
        "{}: not options of caption editing (of the dataset options, only --caption-ext and \
         --caption-column apply)",
        given.join(", ")
    );
    let mut problems = Vec::new();
    let options = args.resolve(false, &mut problems);
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(options)
}

/// What `edits` change in the captions of the dataset `source` (a kohya folder or an
/// imagefolder, read with `options`' caption extension or column). Nothing is written. A
/// parquet dataset is refused: its captions are inside the parquet file.
pub fn plan(source: &Path, options: &ScanOptions, edits: &Edits) -> Result<Plan> {
    edits.check()?;
    let mut plan = Plan {
        changes: Vec::new(),
        unchanged: 0,
        uncaptioned: 0,
        images: Vec::new(),
        writes: Vec::new(),
    };
    let mut problems = Vec::new();
    match layout(source)? {
        Layout::Parquet => bail!(
            "dataset {} is in parquet: its captions are inside the parquet file, which \
             `lora-train data caption` does not rewrite; make a folder of it with \
             `lora-train data prepare` and edit that",
            source.display()
        ),
        Layout::ImageFolder(metadata) => {
            ensure!(
                !edits.from_folder_names,
                "dataset {} is an imagefolder ({}): --from-folder-names applies to kohya \
                 folders (`N_words` sub-folders)",
                source.display(),
                metadata.display()
            );
            let column = options.caption_column.as_str();
            if metadata.extension().is_some_and(|e| e == "csv") {
                csv_metadata(&metadata, column, edits, &mut plan, &mut problems)?;
            } else {
                jsonl_metadata(&metadata, column, edits, &mut plan, &mut problems)?;
            }
        }
        Layout::Kohya => {
            ensure!(
                options.caption_column == DEFAULT_CAPTION_COLUMN,
                "dataset {} is a folder of images with caption files: --caption-column applies \
                 to imagefolders (metadata.jsonl / metadata.csv); its caption files end in \
                 --caption-ext ({})",
                source.display(),
                options.caption_ext
            );
            kohya(
                source,
                &options.caption_ext,
                edits,
                &mut plan,
                &mut problems,
            )?;
        }
    }
    ensure!(
        problems.is_empty(),
        "nothing written: {} caption(s) in dataset {} cannot be edited:\n  {}",
        problems.len(),
        source.display(),
        problems.join("\n  ")
    );
    Ok(plan)
}

/// The edited caption of `image` (one image or metadata row; `None` for a row without a
/// `file_name`), or a problem; `None` where nothing
/// changes (then the caption counts as unchanged or uncaptioned).
fn edited(
    image: Option<&Path>,
    old: Option<&str>,
    folder_words: Option<&str>,
    edits: &Edits,
    plan: &mut Plan,
) -> std::result::Result<Option<String>, String> {
    let old = old.filter(|c| !c.is_empty());
    if let Some(image) = image {
        plan.images.push((image.to_path_buf(), old.is_some()));
    }
    let given = match &edits.generated {
        Some(generated) => image.and_then(|i| generated.get(i)).map(String::as_str),
        None => folder_words
            .filter(|w| !w.is_empty())
            .filter(|_| edits.from_folder_names),
    };
    let start = match (given, old) {
        (Some(given), None) => given,
        (Some(given), Some(_)) if edits.overwrite => given,
        (_, Some(old)) => old,
        (None, None) => {
            plan.uncaptioned += 1;
            return Ok(None);
        }
    };
    let new = edits.edit(start);
    if new.is_empty() {
        return Err(format!(
            "the edits leave an empty caption (was `{}`)",
            old.unwrap_or(start)
        ));
    }
    if Some(new.as_str()) == old {
        plan.unchanged += 1;
        return Ok(None);
    }
    Ok(Some(new))
}

/// The caption files of a kohya folder: its own images and those of its `N_words` folders (other
/// folders are ignored, as training ignores them).
fn kohya(
    dir: &Path,
    caption_ext: &str,
    edits: &Edits,
    plan: &mut Plan,
    problems: &mut Vec<String>,
) -> Result<()> {
    let mut groups = vec![(dir.to_path_buf(), None)];
    for entry in sorted_entries(dir)? {
        let name = entry.file_name().unwrap_or_default().to_string_lossy();
        if let Some((_, words)) = entry.is_dir().then(|| parse_repeat_folder(&name)).flatten() {
            groups.push((entry.clone(), Some(words)));
        }
    }
    // Two images with one stem (a.png, a.jpg) share a caption file: edit it once.
    let mut seen = BTreeSet::new();
    for (folder, words) in groups {
        for image in sorted_entries(&folder)? {
            if image.is_dir() || !has_image_extension(&image) {
                continue;
            }
            let file = caption_path(&image, caption_ext);
            if !seen.insert(file.clone()) {
                continue;
            }
            let old = if file.is_file() {
                match read_caption(&file) {
                    Ok(caption) => Some(caption),
                    Err(e) => {
                        problems.push(format!("{}: {e:#}", file.display()));
                        continue;
                    }
                }
            } else {
                None
            };
            match edited(Some(&image), old.as_deref(), words.as_deref(), edits, plan) {
                Ok(Some(new)) => {
                    plan.writes
                        .push((file.clone(), format!("{new}\n").into_bytes()));
                    plan.changes.push(Change {
                        file,
                        row: None,
                        old,
                        new,
                    });
                }
                Ok(None) => {}
                Err(problem) => problems.push(format!("{}: {problem}", file.display())),
            }
        }
    }
    Ok(())
}

/// A `metadata.jsonl`: each changed row's caption value replaced in place in its line.
fn jsonl_metadata(
    path: &Path,
    column: &str,
    edits: &Edits,
    plan: &mut Plan,
    problems: &mut Vec<String>,
) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // `file_name` is relative to the metadata file's folder.
    let folder = path.parent().unwrap_or(Path::new(""));
    let mut out = String::with_capacity(text.len() + 64);
    let mut changed = false;
    for (line, raw) in (1u64..).zip(text.split_inclusive('\n')) {
        let body = raw.trim_end_matches(['\n', '\r']);
        let ending = &raw[body.len()..];
        // Editors on Windows may start the file with a byte-order mark; it stays.
        let bom = if line == 1 && body.starts_with('\u{feff}') {
            '\u{feff}'.len_utf8()
        } else {
            0
        };
        let (head, json) = body.split_at(bom);
        let at = format!("{} line {line}", path.display());
        let kept = |out: &mut String| out.push_str(raw);
        if json.trim().is_empty() {
            kept(&mut out);
            continue;
        }
        let object = json_object(json).map_err(|problem| anyhow!("{at}: {problem}"))?;
        let name = object.get("file_name").and_then(Value::as_str);
        let image = name.map(|name| folder.join(name));
        let file_name = name.unwrap_or("?").to_string();
        // A model may caption rows that have no caption key yet; otherwise a missing key is
        // likely a wrong --caption-column, as training reports it.
        let old = if edits.generated.is_some() && !object.contains_key(column) {
            None
        } else {
            caption_value(&object, column)
                .map_err(|problem| anyhow!("{at}: {problem}"))?
                .map(|caption| normalize_caption(&caption))
        };
        match edited(image.as_deref(), old.as_deref(), None, edits, plan) {
            Ok(Some(new)) => {
                let value = serde_json::to_string(&new)?;
                out.push_str(head);
                match value_span(json, column) {
                    Some(span) => {
                        out.push_str(&json[..span.start]);
                        out.push_str(&value);
                        out.push_str(&json[span.end..]);
                    }
                    // A row without the caption key gets it last.
                    None => {
                        let close = json
                            .rfind('}')
                            .with_context(|| format!("{at}: not a JSON object"))?;
                        let key = serde_json::to_string(column)?;
                        let comma = if object.is_empty() { "" } else { ", " };
                        out.push_str(json[..close].trim_end());
                        out.push_str(&format!("{comma}{key}: {value}"));
                        out.push_str(&json[close..]);
                    }
                }
                out.push_str(ending);
                changed = true;
                plan.changes.push(Change {
                    file: path.to_path_buf(),
                    row: Some(format!("line {line} ({file_name})")),
                    old,
                    new,
                });
            }
            Ok(None) => kept(&mut out),
            Err(problem) => {
                problems.push(format!("{at} ({file_name}): {problem}"));
                kept(&mut out);
            }
        }
    }
    if changed {
        plan.writes.push((path.to_path_buf(), out.into_bytes()));
    }
    Ok(())
}

/// The byte range of the value of the top-level key `key` in the JSON object `text` (valid JSON,
/// already parsed once), or `None`. Of repeated keys, the last, which serde_json reads.
fn value_span(text: &str, key: &str) -> Option<Range<usize>> {
    let bytes = text.as_bytes();
    let skip_space = |mut i: usize| {
        while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    let mut i = skip_space(0);
    if bytes.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut found = None;
    loop {
        i = skip_space(i);
        match bytes.get(i)? {
            b'}' => return found,
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let key_end = string_end(bytes, i)?;
        let name: String = serde_json::from_str(&text[i..key_end]).ok()?;
        i = skip_space(key_end);
        if bytes.get(i) != Some(&b':') {
            return None;
        }
        let start = skip_space(i + 1);
        let end = value_end(bytes, start)?;
        if name == key {
            found = Some(start..end);
        }
        i = end;
    }
}

/// The index after the closing quote of the JSON string that opens at `start`.
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match bytes.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// The index after the JSON value that starts at `start`.
fn value_end(bytes: &[u8], start: usize) -> Option<usize> {
    match bytes.get(start)? {
        b'"' => string_end(bytes, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            loop {
                match bytes.get(i)? {
                    b'"' => {
                        i = string_end(bytes, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        // A number, true, false or null: up to the next delimiter.
        _ => Some(
            (start..bytes.len())
                .find(|&i| matches!(bytes[i], b',' | b'}' | b']') || bytes[i].is_ascii_whitespace())
                .unwrap_or(bytes.len()),
        ),
    }
}

/// A `metadata.csv`: rewritten through the csv crate with only changed captions replaced.
fn csv_metadata(
    path: &Path,
    column: &str,
    edits: &Edits,
    plan: &mut Plan,
    problems: &mut Vec<String>,
) -> Result<()> {
    let cannot_read = || format!("cannot read {}", path.display());
    let bytes = std::fs::read(path).with_context(cannot_read)?;
    let folder = path.parent().unwrap_or(Path::new(""));
    let mut reader = csv::Reader::from_reader(bytes.as_slice());
    let headers = reader.headers().with_context(cannot_read)?.clone();
    let position = |name: &str| headers.iter().position(|h| h == name);
    let Some(caption_index) = position(column) else {
        bail!(
            "{} line 1: no caption column `{column}` (--caption-column); its columns: {}",
            path.display(),
            headers.iter().collect::<Vec<_>>().join(", ")
        );
    };
    let file_index = position("file_name");
    // Keep the file's line endings.
    let terminator = if bytes.windows(2).any(|w| w == b"\r\n") {
        csv::Terminator::CRLF
    } else {
        csv::Terminator::Any(b'\n')
    };
    let mut writer = csv::WriterBuilder::new()
        .terminator(terminator)
        .from_writer(Vec::new());
    let cannot_write = || format!("cannot rewrite {}", path.display());
    writer.write_record(&headers).with_context(cannot_write)?;
    let mut changed = false;
    for record in reader.records() {
        // The csv crate's errors give the record and line; rows of unequal length are errors.
        let record = record.with_context(cannot_read)?;
        let line = record.position().map_or(0, |p| p.line());
        let file_name = file_index.and_then(|i| record.get(i)).unwrap_or("?");
        let at = format!("{} line {line} ({file_name})", path.display());
        let old = record.get(caption_index).map(normalize_caption);
        let image = file_index
            .and_then(|i| record.get(i))
            .map(|name| folder.join(name));
        match edited(image.as_deref(), old.as_deref(), None, edits, plan) {
            Ok(Some(new)) => {
                let fields = record.iter().enumerate().map(|(i, field)| {
                    if i == caption_index {
                        new.as_str()
                    } else {
                        field
                    }
                });
                writer.write_record(fields).with_context(cannot_write)?;
                changed = true;
                plan.changes.push(Change {
                    file: path.to_path_buf(),
                    row: Some(format!("line {line} ({file_name})")),
                    old: old.filter(|c| !c.is_empty()),
                    new,
                });
            }
            Ok(None) => writer.write_record(&record).with_context(cannot_write)?,
            Err(problem) => {
                problems.push(format!("{at}: {problem}"));
                writer.write_record(&record).with_context(cannot_write)?;
            }
        }
    }
    if changed {
        let contents = writer.into_inner().map_err(|e| e.into_error())?;
        plan.writes.push((path.to_path_buf(), contents));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edits() -> Edits {
        Edits::default()
    }

    #[test]
    fn the_prefix_is_added_once() {
        let e = Edits {
            prefix: Some("sks, ".into()),
            ..edits()
        };
        assert_eq!(e.edit("a dog"), "sks, a dog");
        assert_eq!(e.edit(&e.edit("a dog")), "sks, a dog");
        // A double space in the prefix is found again after normalization.
        let e = Edits {
            prefix: Some("sks,  ".into()),
            ..edits()
        };
        assert_eq!(e.edit(&e.edit("a dog")), "sks, a dog");
    }

    #[test]
    fn removing_a_tag_tidies_the_commas() {
        let e = Edits {
            remove_tags: vec![" blurry ".into()],
            ..edits()
        };
        assert_eq!(e.edit("a dog, blurry,, grass ,blurry"), "a dog, grass");
        assert_eq!(e.edit("blurry"), "");
        // No such tag: the caption keeps its own comma spacing.
        assert_eq!(e.edit("a dog,grass, not blurry"), "a dog,grass, not blurry");
    }

    #[test]
    fn edits_run_in_the_documented_order() {
        let e = Edits {
            prefix: Some("sks, ".into()),
            replace: vec![("dog".into(), "cat".into()), ("cat, x".into(), "y".into())],
            remove_tags: vec!["cat".into()],
            ..edits()
        };
        // dog→cat, then "cat, x"→"y", then the tag "cat" goes, then the prefix.
        assert_eq!(e.edit("dog, x, dog"), "sks, y");
    }

    #[test]
    fn a_value_is_found_in_its_raw_json() {
        let line =
            r#"{"file_name": "a.png", "n": [1, {"text": "no"}], "text" :"a \"dog\"" , "z": 1.50}"#;
        let span = value_span(line, "text").unwrap();
        assert_eq!(&line[span], r#""a \"dog\"""#);
        assert_eq!(&line[value_span(line, "z").unwrap()], "1.50");
        assert_eq!(value_span(line, "missing"), None);
        let repeated = r#"{"text": "first", "text": null}"#;
        assert_eq!(&repeated[value_span(repeated, "text").unwrap()], "null");
    }
}
