//! Hugging Face `imagefolder` datasets (`metadata.jsonl` / `metadata.csv`): the same items as the
//! kohya folder of the same images and captions, the same trained adapter bit for bit, and
//! metadata errors that name the file and line.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_same_adapter, fixtures, train_two_steps};
use lora_train::dataset::{Dataset, DatasetItem, ImageLocation, ScanOptions};

/// The fixture images with one repeat each: (fixture file, caption), in kohya's scan order of the
/// flat folder [`kohya_folder`] makes.
const IMAGES: [(&str, &str); 4] = [
    ("blue_square.png", "a blue square on a white background"),
    ("red_circle.png", "a red circle on a white background"),
    (
        "3_green triangle/small.png",
        "a green triangle on a white background",
    ),
    ("yellow_circle.png", "a yellow circle on a black background"),
];

fn copy_fixture(from: &str, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(fixtures().join("train-data").join(from), to).unwrap();
}

/// A kohya folder of [`IMAGES`], flat, with sidecar captions.
fn kohya_folder(dir: &Path) -> PathBuf {
    let root = dir.join("kohya");
    for (from, caption) in IMAGES {
        let name = Path::new(from).file_name().unwrap();
        let image = root.join(name);
        copy_fixture(from, &image);
        std::fs::write(image.with_extension("txt"), caption).unwrap();
    }
    root
}

fn scan(dir: &Path) -> anyhow::Result<Dataset> {
    Dataset::scan(dir, &ScanOptions::default())
}

/// `options` with a different caption column or `--skip-bad`.
fn options(caption_column: &str, skip_bad: bool) -> ScanOptions {
    ScanOptions {
        caption_column: caption_column.into(),
        skip_bad,
        ..ScanOptions::default()
    }
}

/// `item`'s image file relative to `root`.
fn strip(item: &DatasetItem, root: &Path) -> DatasetItem {
    DatasetItem {
        image: ImageLocation::File(item.image.file().strip_prefix(root).unwrap().to_path_buf()),
        ..item.clone()
    }
}

fn error(dir: &Path) -> String {
    format!("{:#}", scan(dir).unwrap_err())
}

/// The items with paths relative to their folder, to compare two folders.
fn relative(items: &[DatasetItem], root: &Path) -> Vec<DatasetItem> {
    items.iter().map(|item| strip(item, root)).collect()
}

#[test]
fn metadata_jsonl_gives_the_items_of_the_kohya_folder() {
    let dir = tempfile::tempdir().unwrap();
    let root = kohya_folder(dir.path());
    let kohya = scan(&root).unwrap();
    // The same folder with a metadata file is an imagefolder; its rows name the same images
    // with the same captions (the .txt files are then neither images nor rows: ignored).
    let rows: String = IMAGES
        .iter()
        .map(|(from, caption)| {
            let name = Path::new(from).file_name().unwrap().to_str().unwrap();
            format!(
                "{}\n",
                serde_json::json!({"file_name": name, "text": caption})
            )
        })
        .collect();
    std::fs::write(root.join("metadata.jsonl"), rows).unwrap();
    let imagefolder = scan(&root).unwrap();
    assert_eq!(imagefolder.items, kohya.items);
    assert!(imagefolder.items.iter().all(|item| item.repeats == 1));
    assert!(
        imagefolder.warnings.is_empty(),
        "{:?}",
        imagefolder.warnings
    );
}

#[test]
fn metadata_csv_with_quoted_captions_and_sub_folders_gives_the_same_items() {
    let dir = tempfile::tempdir().unwrap();
    let kohya_root = kohya_folder(dir.path());
    std::fs::write(
        kohya_root.join("blue_square.txt"),
        "a blue square, on a \"white\" background",
    )
    .unwrap();
    let kohya = scan(&kohya_root).unwrap();

    let root = dir.path().join("imagefolder");
    let mut csv = String::from("file_name,text,extra\n");
    for (from, caption) in IMAGES {
        let name = Path::new(from).file_name().unwrap().to_str().unwrap();
        let relative = format!("images/{name}");
        copy_fixture(from, &root.join(&relative));
        let caption = if name == "blue_square.png" {
            // A comma, doubled quotes and a line break inside one quoted field.
            "\"a blue square,\non a \"\"white\"\" background\"".to_string()
        } else {
            caption.to_string()
        };
        csv.push_str(&format!("./{relative},{caption},x\n"));
    }
    // An image without a row: ignored, with one warning.
    copy_fixture(
        "3_green triangle/uncaptioned.png",
        &root.join("unlisted.png"),
    );
    std::fs::write(root.join("metadata.csv"), csv).unwrap();
    let imagefolder = scan(&root).unwrap();
    let strip_images = |items: &[DatasetItem]| {
        relative(items, &root)
            .into_iter()
            .map(|item| strip(&item, Path::new("images")))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip_images(&imagefolder.items),
        relative(&kohya.items, &kohya_root)
    );
    assert_eq!(
        imagefolder.items[0].caption,
        "a blue square, on a \"white\" background"
    );
    assert_eq!(imagefolder.warnings.len(), 1, "{:?}", imagefolder.warnings);
    assert!(
        imagefolder.warnings[0].contains("ignoring 1 image(s)")
            && imagefolder.warnings[0].contains("metadata.csv"),
        "{:?}",
        imagefolder.warnings
    );
}

/// An imagefolder at `dir/name` with `a.png` and `b.png` and this metadata.jsonl.
fn jsonl_folder(dir: &Path, name: &str, rows: &str) -> PathBuf {
    let root = dir.join(name);
    copy_fixture("blue_square.png", &root.join("a.png"));
    copy_fixture("red_circle.png", &root.join("b.png"));
    std::fs::write(root.join("metadata.jsonl"), rows).unwrap();
    root
}

#[test]
fn metadata_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let ok = r#"{"file_name": "a.png", "text": "a"}"#;
    for (name, line2, expected) in [
        ("no-file-name", r#"{"text": "b"}"#, "no `file_name`"),
        (
            "no-column",
            r#"{"file_name": "b.png", "caption": "b"}"#,
            "no caption column `text` (--caption-column); its columns: caption, file_name",
        ),
        (
            "missing",
            r#"{"file_name": "c.png", "text": "c"}"#,
            "file_name `c.png`: no such file",
        ),
        (
            "parent",
            r#"{"file_name": "../no-file-name/a.png", "text": "c"}"#,
            "file_name `../no-file-name/a.png` does not name a file inside the dataset folder",
        ),
        (
            "absolute",
            r#"{"file_name": "/etc/passwd", "text": "c"}"#,
            "file_name `/etc/passwd` does not name a file inside the dataset folder",
        ),
        (
            "duplicate",
            r#"{"file_name": "./a.png", "text": "b"}"#,
            "file_name `./a.png` repeats the row at line 1",
        ),
    ] {
        let root = jsonl_folder(dir.path(), name, &format!("{ok}\n{line2}\n"));
        let message = error(&root);
        let at = format!("{} line 2: ", root.join("metadata.jsonl").display());
        assert!(
            message.contains(&format!("{at}{expected}")),
            "{name}: {message}"
        );
    }

    let root = dir.path().join("csv");
    copy_fixture("blue_square.png", &root.join("a.png"));
    std::fs::write(root.join("metadata.csv"), "file_name,caption\na.png,a\n").unwrap();
    let message = error(&root);
    let expected = format!(
        "{} line 1: no caption column `text` (--caption-column); its columns: file_name, caption",
        root.join("metadata.csv").display()
    );
    assert!(message.contains(&expected), "{message}");
    assert!(Dataset::scan(&root, &options("caption", false)).is_ok());
    std::fs::write(root.join("metadata.csv"), "file_name,text\na.png,a\n,b\n").unwrap();
    let message = error(&root);
    let expected = format!(
        "{} line 3: no `file_name`",
        root.join("metadata.csv").display()
    );
    assert!(message.contains(&expected), "{message}");

    std::fs::write(root.join("metadata.jsonl"), format!("{ok}\n")).unwrap();
    let message = error(&root);
    assert!(
        message.contains("metadata.jsonl") && message.contains("metadata.csv"),
        "{message}"
    );
}

#[test]
fn empty_or_null_captions_are_bad_files_as_in_kohya_folders() {
    let dir = tempfile::tempdir().unwrap();
    let rows = "{\"file_name\": \"a.png\", \"text\": \"a\"}\n\
                {\"file_name\": \"b.png\", \"text\": null}\n";
    let root = jsonl_folder(dir.path(), "null", rows);
    let message = error(&root);
    assert!(
        message.contains("--skip-bad")
            && message.contains("b.png: no caption: `text` is empty or null at")
            && message.contains("metadata.jsonl line 2"),
        "{message}"
    );
    let skipped = Dataset::scan(&root, &options("text", true)).unwrap();
    assert_eq!(skipped.items.len(), 1);
    assert_eq!(skipped.skipped.len(), 1);
    assert_eq!(skipped.skipped[0].path, root.join("b.png"));

    let root = dir.path().join("empty-csv");
    copy_fixture("blue_square.png", &root.join("a.png"));
    copy_fixture("red_circle.png", &root.join("b.png"));
    std::fs::write(
        root.join("metadata.csv"),
        "file_name,text\na.png,a\nb.png,\"\"\n",
    )
    .unwrap();
    let message = error(&root);
    assert!(
        message.contains("no caption") && message.contains("metadata.csv line 3"),
        "{message}"
    );
}

#[test]
fn training_from_an_imagefolder_equals_training_from_the_kohya_folder() {
    let dir = tempfile::tempdir().unwrap();
    let kohya = kohya_folder(dir.path());
    let root = dir.path().join("imagefolder");
    let mut rows = String::new();
    for (from, caption) in IMAGES {
        // Sub-folders too: the rows, not the folder structure, make the dataset.
        let relative = from.replace("3_green triangle", "triangles");
        copy_fixture(from, &root.join(&relative));
        rows.push_str(&format!(
            "{}\n",
            serde_json::json!({"file_name": relative, "text": caption})
        ));
    }
    std::fs::write(root.join("metadata.jsonl"), rows).unwrap();

    let (from_kohya, from_imagefolder) = (dir.path().join("k"), dir.path().join("i"));
    let adapters = [&from_kohya, &from_imagefolder].map(|d| {
        std::fs::create_dir(d).unwrap();
        d.join("adapter.safetensors")
    });
    train_two_steps(&kohya, &adapters[0]);
    train_two_steps(&root, &adapters[1]);
    assert_same_adapter(&adapters[0], &adapters[1]);
}
