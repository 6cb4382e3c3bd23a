//! Hugging Face datasets stored as parquet: an image column holding the `datasets` Image feature
//! (a struct of the encoded file's `bytes` and its `path`) and a caption column, either text or
//! a `ClassLabel` (integers whose names the `huggingface` schema metadata that `datasets` writes
//! into the file lists), which `--caption-template` turns into a sentence.
//!
//! Files are read row by row through the parquet crate's record reader, a few rows at a time
//! (never a whole row group of image bytes), so a dataset larger than memory is scanned and
//! trained on in bounded memory. Rows are the dataset's order, file after file.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use image::DynamicImage;
use parquet::basic::{ConvertedType, LogicalType, Type as PhysicalType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::serialized_reader::ReadOptionsBuilder;
use parquet::record::reader::RowIter;
use parquet::record::{Field, Row};
use parquet::schema::types::Type;
use serde_json::Value;

use lora_core::io::contain_panics;

use super::{
    decode_image, load_image, normalize_caption, with_template, BadFile, BadKind, DatasetItem,
    ImageLocation, ScanOptions,
};

/// Rows the record reader decodes per column read: bounds the image bytes held at once.
const ROWS_PER_READ: usize = 8;
/// The schema metadata key under which `datasets` stores its features.
const FEATURES_KEY: &str = "huggingface";

/// What the caption column holds.
#[derive(Debug, Clone, PartialEq)]
enum Captions {
    Text,
    /// A `ClassLabel`: integer labels and their names.
    Classes(Vec<String>),
}

/// The items of the parquet `files` (one split), in row order, with the bad rows and warnings.
pub(super) fn scan(
    files: &[PathBuf],
    options: &ScanOptions,
) -> Result<(Vec<DatasetItem>, Vec<BadFile>, Vec<String>)> {
    let mut items = Vec::new();
    let mut bad = Vec::new();
    let mut filtered_out = 0usize;
    for file in files {
        // The parquet crate panics on some damaged files; that is an error naming the file.
        contain_panics(file.display(), || {
            scan_file(file, options, &mut items, &mut bad, &mut filtered_out)
        })?;
    }
    let mut warnings = Vec::new();
    if filtered_out > 0 {
        warnings.push(format!(
            "--label-filter left out {filtered_out} row(s) of other classes"
        ));
    }
    Ok((items, bad, warnings))
}

/// Adds the rows of one parquet file to `items` (or `bad`), counting those `--label-filter`
/// leaves out.
fn scan_file(
    file: &Path,
    options: &ScanOptions,
    items: &mut Vec<DatasetItem>,
    bad: &mut Vec<BadFile>,
    filtered_out: &mut usize,
) -> Result<()> {
    let reader = open(file)?;
    let (projection, captions) = columns(&reader, file, options)?;
    let keep: Option<Vec<usize>> = match (&captions, options.label_filter.is_empty()) {
        (_, true) => None,
        (Captions::Classes(names), false) => Some(label_indices(names, options, file)?),
        (Captions::Text, false) => bail!(
            "{}: --label-filter keeps classes of a ClassLabel column, and `{}` is text",
            file.display(),
            options.caption_column
        ),
    };
    let rows = RowIter::from_file_into(Box::new(reader))
        .project(Some(projection))
        .with_context(|| format!("cannot read {}", file.display()))?
        .with_batch_size(ROWS_PER_READ);
    for (index, row) in rows.enumerate() {
        let row = row.with_context(|| format!("cannot read {} row {index}", file.display()))?;
        let mut bad_row = |kind: BadKind, reason: String| {
            bad.push(BadFile {
                path: file.to_path_buf(),
                kind,
                reason: format!("row {index}: {reason}"),
            })
        };
        if let Some(keep) = &keep {
            if !label_of(&row, &options.caption_column).is_some_and(|l| keep.contains(&l)) {
                *filtered_out += 1;
                continue;
            }
        }
        let caption = match caption_of(&row, &captions, options) {
            Ok(caption) => caption,
            Err((kind, reason)) => {
                bad_row(kind, reason);
                continue;
            }
        };
        let (location, image) = match image_of(&row, file, index, &options.image_column) {
            Ok(found) => found,
            Err(e) => {
                bad_row(BadKind::Unreadable, format!("{e:#}"));
                continue;
            }
        };
        items.push(DatasetItem {
            image: location,
            caption,
            repeats: 1,
            size: (image.width() as usize, image.height() as usize),
        });
    }
    Ok(())
}

fn open(file: &Path) -> Result<SerializedFileReader<File>> {
    let handle = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    SerializedFileReader::new(handle)
        .with_context(|| format!("{} is not a readable parquet file", file.display()))
}

/// The projection onto the image and caption columns, and what the caption column holds; an
/// error naming the columns there are when either is missing.
fn columns(
    reader: &SerializedFileReader<File>,
    file: &Path,
    options: &ScanOptions,
) -> Result<(Type, Captions)> {
    let metadata = reader.metadata().file_metadata();
    let root = metadata.schema();
    let fields = root.get_fields();
    let names = || {
        fields
            .iter()
            .map(|f| f.name().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let features = features(reader, file)?;
    let find = |column: &str, flag: &str, what: &str| {
        fields
            .iter()
            .find(|f| f.name() == column)
            .cloned()
            .with_context(|| {
                format!(
                    "{}: no {what} column `{column}` ({flag}); its columns: {}",
                    file.display(),
                    names()
                )
            })
    };
    let image = find(&options.image_column, "--image-column", "image")?;
    ensure!(
        image.is_group()
            && image
                .get_fields()
                .iter()
                .any(|f| f.name() == "bytes" || f.name() == "path"),
        "{}: column `{}` is not a `datasets` Image (a struct of `bytes` and `path`); choose the \
         image column with --image-column (its columns: {})",
        file.display(),
        options.image_column,
        names()
    );
    let caption = find(&options.caption_column, "--caption-column", "caption")?;
    let feature = features
        .as_ref()
        .map(|f| &f[&options.caption_column])
        .filter(|f| !f.is_null());
    let captions = if feature.and_then(|f| f["_type"].as_str()) == Some("ClassLabel") {
        let names = feature
            .and_then(|f| f["names"].as_array())
            .and_then(|names| {
                names
                    .iter()
                    .map(|n| n.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            })
            .with_context(|| {
                format!(
                    "{}: the ClassLabel `{}` lists no class names in the file's `{FEATURES_KEY}` \
                     metadata",
                    file.display(),
                    options.caption_column
                )
            })?;
        Captions::Classes(names)
    } else if is_text(&caption) {
        Captions::Text
    } else {
        bail!(
            "{}: column `{}` (--caption-column) is neither text nor a ClassLabel with class names \
             in the file's `{FEATURES_KEY}` metadata",
            file.display(),
            options.caption_column
        );
    };
    let projection = Type::group_type_builder(root.name())
        .with_fields(
            fields
                .iter()
                .filter(|f| f.name() == image.name() || f.name() == caption.name())
                .cloned()
                .collect(),
        )
        .build()?;
    Ok((projection, captions))
}

/// The `datasets` features the file's schema metadata records, if any.
fn features(reader: &SerializedFileReader<File>, file: &Path) -> Result<Option<Value>> {
    let Some(entries) = reader.metadata().file_metadata().key_value_metadata() else {
        return Ok(None);
    };
    let Some(json) = entries
        .iter()
        .find(|kv| kv.key == FEATURES_KEY)
        .and_then(|kv| kv.value.as_deref())
    else {
        return Ok(None);
    };
    let value: Value = serde_json::from_str(json).with_context(|| {
        format!(
            "{}: the `{FEATURES_KEY}` schema metadata is not JSON",
            file.display()
        )
    })?;
    Ok(Some(value["info"]["features"].clone()))
}

fn is_text(column: &Type) -> bool {
    !column.is_group()
        && column.get_physical_type() == PhysicalType::BYTE_ARRAY
        && (matches!(
            column.get_basic_info().logical_type_ref(),
            Some(LogicalType::String)
        ) || column.get_basic_info().converted_type() == ConvertedType::UTF8)
}

/// The label indices `--label-filter` keeps; an error listing the class names for a name that is
/// not one.
fn label_indices(names: &[String], options: &ScanOptions, file: &Path) -> Result<Vec<usize>> {
    options
        .label_filter
        .iter()
        .map(|wanted| {
            names.iter().position(|n| n == wanted).with_context(|| {
                format!(
                    "--label-filter `{wanted}` is not a class of {} (`{}`); its classes: {}",
                    file.display(),
                    options.caption_column,
                    names.join(", ")
                )
            })
        })
        .collect()
}

fn field<'r>(row: &'r Row, name: &str) -> Option<&'r Field> {
    row.get_column_iter()
        .find(|(n, _)| n.as_str() == name)
        .map(|(_, f)| f)
}

/// The row's label index, for a ClassLabel column.
fn label_of(row: &Row, column: &str) -> Option<usize> {
    match field(row, column)? {
        Field::Byte(v) => usize::try_from(*v).ok(),
        Field::Short(v) => usize::try_from(*v).ok(),
        Field::Int(v) => usize::try_from(*v).ok(),
        Field::Long(v) => usize::try_from(*v).ok(),
        Field::UByte(v) => Some(usize::from(*v)),
        Field::UShort(v) => Some(usize::from(*v)),
        Field::UInt(v) => usize::try_from(*v).ok(),
        Field::ULong(v) => usize::try_from(*v).ok(),
        _ => None,
    }
}

/// The row's caption, or what is wrong with it and why.
fn caption_of(
    row: &Row,
    captions: &Captions,
    options: &ScanOptions,
) -> std::result::Result<String, (BadKind, String)> {
    let column = &options.caption_column;
    // An empty text is an empty caption; no text at all (null) a missing one.
    let (text, empty_kind) = match captions {
        Captions::Text => match field(row, column) {
            Some(Field::Str(text)) => (normalize_caption(text), BadKind::EmptyCaption),
            _ => (String::new(), BadKind::MissingCaption),
        },
        Captions::Classes(names) => match label_of(row, column) {
            Some(label) if label < names.len() => (names[label].clone(), BadKind::EmptyCaption),
            Some(label) => {
                return Err((
                    BadKind::Unreadable,
                    format!(
                        "label {label} of `{column}` is not one of its {} classes",
                        names.len()
                    ),
                ))
            }
            None => {
                return Err((
                    BadKind::MissingCaption,
                    format!("no label: `{column}` is null"),
                ))
            }
        },
    };
    if text.is_empty() {
        return Err((
            empty_kind,
            format!("no caption: `{column}` is empty or null"),
        ));
    }
    Ok(with_template(text, options))
}

/// Where the row's image is and the decoded image. Embedded bytes are the image; without bytes,
/// `path` names a file, relative to the parquet file's folder unless absolute.
fn image_of(
    row: &Row,
    file: &Path,
    index: usize,
    column: &str,
) -> Result<(ImageLocation, DynamicImage)> {
    let Some(Field::Group(image)) = field(row, column) else {
        bail!("no image: `{column}` is null");
    };
    let path = match field(image, "path") {
        Some(Field::Str(path)) if !path.is_empty() => Some(path.as_str()),
        _ => None,
    };
    match (field(image, "bytes"), path) {
        (Some(Field::Bytes(bytes)), _) => {
            let decoded = decode_image(bytes.data())?;
            let location = ImageLocation::ParquetRow {
                file: file.to_path_buf(),
                row: index,
                column: column.to_string(),
                name: path.map_or_else(
                    || format!("row {index}"),
                    |p| {
                        Path::new(p)
                            .file_name()
                            .map_or_else(|| p.to_string(), |n| n.to_string_lossy().into_owned())
                    },
                ),
            };
            Ok((location, decoded))
        }
        (_, Some(path)) => {
            let resolved = file.parent().unwrap_or(Path::new("")).join(path);
            let decoded = load_image(&resolved)
                .with_context(|| format!("image file {}", resolved.display()))?;
            Ok((ImageLocation::File(resolved), decoded))
        }
        _ => bail!("no image: `{column}` has neither bytes nor a path"),
    }
}

/// Reads the images of one parquet file's rows in increasing row order, a few rows at a time.
pub(super) struct RowImages {
    file: PathBuf,
    column: String,
    rows: RowIter<'static>,
    /// The index of the row `rows` yields next.
    next: usize,
}

impl RowImages {
    /// A reader of `file`'s `column` that starts at the row group holding `row`.
    pub(super) fn open(file: &Path, column: &str, row: usize) -> Result<Self> {
        contain_panics(file.display(), || Self::open_unguarded(file, column, row))
    }

    fn open_unguarded(file: &Path, column: &str, row: usize) -> Result<Self> {
        let footer = open(file)?;
        let mut first = 0usize;
        let mut group = 0usize;
        for (i, meta) in footer.metadata().row_groups().iter().enumerate() {
            let rows = usize::try_from(meta.num_rows()).unwrap_or(0);
            if first + rows > row {
                group = i;
                break;
            }
            first += rows;
            group = i + 1;
        }
        let handle = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        let options = ReadOptionsBuilder::new()
            .with_predicate(Box::new(move |_, index| index >= group))
            .build();
        let reader = SerializedFileReader::new_with_options(handle, options)
            .with_context(|| format!("{} is not a readable parquet file", file.display()))?;
        let root = reader.metadata().file_metadata().schema();
        let projection = Type::group_type_builder(root.name())
            .with_fields(
                root.get_fields()
                    .iter()
                    .filter(|f| f.name() == column)
                    .cloned()
                    .collect(),
            )
            .build()?;
        let rows = RowIter::from_file_into(Box::new(reader))
            .project(Some(projection))
            .with_context(|| format!("cannot read {}", file.display()))?
            .with_batch_size(ROWS_PER_READ);
        Ok(Self {
            file: file.to_path_buf(),
            column: column.to_string(),
            rows,
            next: first,
        })
    }

    /// Whether this reader can still reach `row` of `column` in `file`.
    pub(super) fn reaches(&self, file: &Path, column: &str, row: usize) -> bool {
        self.file == file && self.column == column && self.next <= row
    }

    /// The image of `row`, skipping the rows before it.
    pub(super) fn image(&mut self, row: usize) -> Result<DynamicImage> {
        let file = self.file.clone();
        contain_panics(file.display(), || self.image_unguarded(row))
    }

    fn image_unguarded(&mut self, row: usize) -> Result<DynamicImage> {
        ensure!(
            self.next <= row,
            "{} row {row} is behind the reader",
            self.file.display()
        );
        loop {
            let current = self.next;
            let record = self
                .rows
                .next()
                .with_context(|| format!("{} has no row {row}", self.file.display()))?
                .with_context(|| format!("cannot read {} row {current}", self.file.display()))?;
            self.next += 1;
            if current == row {
                let Some(Field::Group(image)) = field(&record, &self.column) else {
                    bail!(
                        "{} row {row}: `{}` is null",
                        self.file.display(),
                        self.column
                    );
                };
                let Some(Field::Bytes(bytes)) = field(image, "bytes") else {
                    bail!(
                        "{} row {row}: `{}` holds no image bytes",
                        self.file.display(),
                        self.column
                    );
                };
                return decode_image(bytes.data());
            }
        }
    }
}
