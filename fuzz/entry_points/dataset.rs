//! Fuzz entry for the dataset scan: a training folder built from the bytes (a kohya repeat folder
//! with a stranger's name, a caption file of arbitrary bytes, an image file of arbitrary bytes),
//! scanned as `lora-train` does before training. Every file must load or be reported, without a
//! panic or an allocation the input's size does not justify. Shared by `fuzz_targets/dataset.rs`
//! and the regression test at the workspace root.
//!
//! Input: `[flags][name length][folder name][caption length][caption][image bytes…]`. Flags:
//! bits 0–1 the image extension, bit 2 whether the image has a caption file, bit 3 whether the
//! image lies in the repeat folder (else at the top level).

use std::path::Path;

use lora_train::dataset::{Dataset, ScanOptions, IMAGE_EXTENSIONS};

const CAPTION_EXT: &str = ".txt";
/// The image's and its caption's file stem; the folder may not take their names.
const IMAGE_STEM: &str = "image";

pub fn run(data: &[u8]) {
    let (&flags, rest) = data.split_first().unwrap_or((&0, &[]));
    let (folder_name, rest) = length_prefixed(rest);
    let (caption, image) = length_prefixed(rest);

    let root = tempfile::tempdir().expect("cannot create a scratch folder");
    let folder = file_name(folder_name)
        .filter(|name| !name.starts_with(&format!("{IMAGE_STEM}.")))
        .map(|name| root.path().join(name))
        .filter(|folder| std::fs::create_dir(folder).is_ok())
        .unwrap_or_else(|| {
            let folder = root.path().join("1_fallback words");
            std::fs::create_dir(&folder).expect("cannot create the repeat folder");
            folder
        });
    let image_folder = if flags & 0b1000 != 0 {
        folder.as_path()
    } else {
        root.path()
    };
    let extension = IMAGE_EXTENSIONS[usize::from(flags & 0b11)];
    std::fs::write(
        image_folder.join(format!("{IMAGE_STEM}.{extension}")),
        image,
    )
    .expect("cannot write the image");
    if flags & 0b100 != 0 {
        std::fs::write(
            image_folder.join(format!("{IMAGE_STEM}{CAPTION_EXT}")),
            caption,
        )
        .expect("cannot write the caption");
    }

    for skip_bad in [false, true] {
        let options = ScanOptions {
            caption_ext: CAPTION_EXT.into(),
            skip_bad,
            ..ScanOptions::default()
        };
        match Dataset::scan(root.path(), &options) {
            // The training loop's view of the epoch.
            Ok(dataset) => drop((dataset.samples_per_epoch(), dataset.epoch_samples())),
            Err(e) => expect_named(root.path(), &e),
        }
    }
}

/// The first byte as a length, that many bytes (or what is left), and the rest.
fn length_prefixed(data: &[u8]) -> (&[u8], &[u8]) {
    let Some((&len, rest)) = data.split_first() else {
        return (&[], &[]);
    };
    rest.split_at(usize::from(len).min(rest.len()))
}

/// The bytes as one file name: path separators and NUL (which no file name can hold) replaced;
/// `None` for names that are no entry of their own (empty, `.`, `..`). Names the filesystem
/// refuses anyway (too long) are replaced by a fallback folder when creating it fails.
fn file_name(bytes: &[u8]) -> Option<String> {
    let name: String = String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    (!matches!(name.as_str(), "" | "." | "..")).then_some(name)
}

/// A scan error must say which dataset it is about.
fn expect_named(dir: &Path, e: &anyhow::Error) {
    let message = format!("{e:#}");
    assert!(
        message.contains(&dir.display().to_string()),
        "error does not name the dataset folder: {message}"
    );
}
