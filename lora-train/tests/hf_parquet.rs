//! Hugging Face datasets in parquet, as `datasets` 5.2.0 wrote them
//! (tests/reference/make_parquet_fixtures.py): the same samples, in the same order, as
//! `datasets` reads back; the same as the imagefolder they were made from; splits from the
//! README's `configs:`; ClassLabel captions through `--caption-template`; errors that name the
//! columns there are and the row that does not decode.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_same_adapter, fixtures, train_two_steps, two_steps};
use lora_train::dataset::{Dataset, ImageLocation, ScanOptions};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn hf() -> PathBuf {
    fixtures().join("hf-datasets")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(hf().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn scan(source: &Path, options: &ScanOptions) -> Dataset {
    Dataset::scan(source, options).unwrap_or_else(|e| panic!("{}: {e:#}", source.display()))
}

fn error(source: &Path, options: &ScanOptions) -> String {
    format!("{:#}", Dataset::scan(source, options).unwrap_err())
}

/// Each item's caption and the SHA-256 of its decoded RGB pixels, in order.
fn samples(dataset: &Dataset) -> Vec<(String, String)> {
    dataset
        .items
        .iter()
        .zip(dataset.images())
        .map(|(item, image)| {
            let rgb = image.unwrap().to_rgb8();
            let hash = Sha256::digest(rgb.as_raw());
            let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
            (item.caption.clone(), hex)
        })
        .collect()
}

/// The (caption, rgb_sha256) rows `datasets` read back, as recorded in expected.json.
fn recorded(rows: &Value) -> Vec<(String, String)> {
    let rows = rows.as_array().expect("a list of rows");
    assert!(!rows.is_empty());
    rows.iter()
        .map(|r| {
            (
                r["caption"].as_str().unwrap().to_string(),
                r["rgb_sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_parquet_file_gives_what_datasets_reads_and_what_its_imagefolder_gives() {
    let parquet = scan(&hf().join("embedded.parquet"), &ScanOptions::default());
    let want = recorded(&expected()["embedded.parquet"]);
    assert_eq!(samples(&parquet), want);
    assert!(parquet.items.iter().all(|item| item.repeats == 1));
    // Rows come from three row groups of two; each item names its row.
    for (row, item) in parquet.items.iter().enumerate() {
        match &item.image {
            ImageLocation::ParquetRow { row: r, name, .. } => {
                assert_eq!(*r, row);
                assert!(name.ends_with(".png"), "{name}");
            }
            other => panic!("row {row} read as {other:?}"),
        }
    }
    // A single random access reads the same image as the stream.
    let third = parquet.items[2].image.load().unwrap().to_rgb8();
    let streamed = parquet.images().nth(2).unwrap().unwrap().to_rgb8();
    assert_eq!(third, streamed);

    let folder = scan(&hf().join("imagefolder"), &ScanOptions::default());
    assert_eq!(samples(&folder), want);
    let sizes = |d: &Dataset| d.items.iter().map(|i| i.size).collect::<Vec<_>>();
    assert_eq!(sizes(&parquet), sizes(&folder));
    assert_eq!(
        parquet
            .items
            .iter()
            .map(|i| i.image.name())
            .collect::<Vec<_>>(),
        folder
            .items
            .iter()
            .map(|i| i.image.name())
            .collect::<Vec<_>>()
    );
}

#[test]
fn image_paths_without_bytes_are_files_beside_the_parquet_file() {
    let dataset = scan(&hf().join("paths.parquet"), &ScanOptions::default());
    assert_eq!(samples(&dataset), recorded(&expected()["paths.parquet"]));
    assert!(dataset.items.iter().all(
        |i| matches!(&i.image, ImageLocation::File(p) if p.starts_with(hf().join("imagefolder")))
    ));
}

#[test]
fn hub_folders_give_the_split_their_readme_configs_name() {
    let hub = hf().join("hub");
    let expected = expected();
    let train = scan(&hub, &ScanOptions::default());
    assert_eq!(samples(&train), recorded(&expected["hub"]["train"]));
    let test = scan(
        &hub,
        &ScanOptions {
            split: "test".into(),
            ..ScanOptions::default()
        },
    );
    assert_eq!(samples(&test), recorded(&expected["hub"]["test"]));
    let message = error(
        &hub,
        &ScanOptions {
            split: "validation".into(),
            ..ScanOptions::default()
        },
    );
    assert!(
        message.contains("no split `validation`") && message.contains("test, train"),
        "{message}"
    );

    // Without the README, the file names say the splits, as datasets infers them.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for entry in std::fs::read_dir(hub.join("data")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), data.join(entry.file_name())).unwrap();
    }
    let inferred = scan(dir.path(), &ScanOptions::default());
    assert_eq!(samples(&inferred), recorded(&expected["hub"]["train"]));
}

#[test]
fn class_labels_become_captions_through_the_template() {
    let classes = hf().join("classes");
    let expected = &expected()["classes"];
    let names: Vec<&str> = expected["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(names, ["circle", "square", "triangle"]);
    let by_label = ScanOptions {
        caption_column: "label".into(),
        ..ScanOptions::default()
    };
    let plain = scan(&classes, &by_label);
    assert_eq!(samples(&plain), recorded(&expected["train"]));

    let templated = ScanOptions {
        caption_template: Some("a photo of {label}".into()),
        ..by_label.clone()
    };
    let captions: Vec<String> = scan(&classes, &templated)
        .items
        .into_iter()
        .map(|i| i.caption)
        .collect();
    let want: Vec<String> = recorded(&expected["train"])
        .into_iter()
        .map(|(name, _)| format!("a photo of {name}"))
        .collect();
    assert_eq!(captions, want);

    let squares = scan(
        &classes,
        &ScanOptions {
            label_filter: vec!["square".into()],
            ..templated.clone()
        },
    );
    assert_eq!(squares.items.len(), 1);
    assert_eq!(squares.items[0].caption, "a photo of square");
    assert_eq!(squares.warnings.len(), 1, "{:?}", squares.warnings);

    let message = error(
        &classes,
        &ScanOptions {
            label_filter: vec!["hexagon".into()],
            ..templated
        },
    );
    assert!(
        message.contains("`hexagon`") && message.contains("circle, square, triangle"),
        "{message}"
    );
    // The default caption column is not there: the error lists the columns.
    let message = error(&classes, &ScanOptions::default());
    assert!(
        message.contains("no caption column `text`") && message.contains("image, label"),
        "{message}"
    );
}

#[test]
fn a_missing_column_or_an_undecodable_row_is_named() {
    let file = hf().join("embedded.parquet");
    let message = error(
        &file,
        &ScanOptions {
            image_column: "picture".into(),
            ..ScanOptions::default()
        },
    );
    assert!(
        message.contains("no image column `picture` (--image-column)")
            && message.contains("its columns: image, text"),
        "{message}"
    );
    let message = error(
        &file,
        &ScanOptions {
            image_column: "text".into(),
            ..ScanOptions::default()
        },
    );
    assert!(message.contains("is not a `datasets` Image"), "{message}");

    let broken = hf().join("broken.parquet");
    let message = error(&broken, &ScanOptions::default());
    assert!(
        message.contains("1 bad file(s)")
            && message.contains(&format!("{}: row 1: cannot", broken.display())),
        "{message}"
    );
    let skipped = scan(
        &broken,
        &ScanOptions {
            skip_bad: true,
            ..ScanOptions::default()
        },
    );
    let mut want = recorded(&expected()["embedded.parquet"]);
    want.remove(1);
    assert_eq!(samples(&skipped), want);
    assert_eq!(skipped.skipped.len(), 1);
}

#[test]
fn parquet_options_are_refused_where_they_would_be_ignored() {
    let message = error(
        &fixtures().join("train-data"),
        &ScanOptions {
            split: "test".into(),
            skip_bad: true,
            ..ScanOptions::default()
        },
    );
    assert!(
        message.contains("--split apply to parquet datasets only"),
        "{message}"
    );
    let message = error(
        &fixtures().join("train-data"),
        &ScanOptions {
            caption_column: "caption".into(),
            skip_bad: true,
            ..ScanOptions::default()
        },
    );
    assert!(message.contains("--caption-column"), "{message}");
}

#[test]
fn training_from_parquet_equals_training_from_its_imagefolder() {
    let dir = tempfile::tempdir().unwrap();
    // The same file name in two folders: the name is written into the adapter's header.
    let adapters = ["parquet", "folder"].map(|name| {
        std::fs::create_dir(dir.path().join(name)).unwrap();
        dir.path().join(name).join("adapter.safetensors")
    });
    train_two_steps(&hf().join("embedded.parquet"), &adapters[0]);
    train_two_steps(&hf().join("imagefolder"), &adapters[1]);
    assert_same_adapter(&adapters[0], &adapters[1]);
}

/// A Hugging Face cache (`HF_HOME`) holding the `main` snapshot of dataset `owner/name` with the
/// files of `folder`, laid out as hf-hub and huggingface_hub write it.
fn hub_cache(home: &Path, id: &str, folder: &Path) {
    let repo = home
        .join("hub")
        .join(format!("datasets--{}", id.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snapshot = repo.join("snapshots").join(commit);
    for relative in [
        "README.md",
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ] {
        std::fs::create_dir_all(snapshot.join(relative).parent().unwrap()).unwrap();
        std::fs::copy(folder.join(relative), snapshot.join(relative)).unwrap();
    }
}

#[test]
fn a_hub_dataset_id_reads_the_cached_snapshot_offline_or_says_how_to_do_without() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("hf-home");
    hub_cache(&home, "someone/shapes", &hf().join("hub"));
    let adapters = ["hub", "folder"].map(|name| {
        std::fs::create_dir(dir.path().join(name)).unwrap();
        dir.path().join(name).join("adapter.safetensors")
    });
    let output = two_steps(Path::new("someone/shapes"), &adapters[0])
        .env("HF_HOME", &home)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    train_two_steps(&hf().join("hub"), &adapters[1]);
    assert_same_adapter(&adapters[0], &adapters[1]);

    // Not cached, offline: the error names the dataset and how to use a local copy.
    let output = two_steps(
        Path::new("someone/other"),
        &dir.path().join("x.safetensors"),
    )
    .env("HF_HOME", &home)
    .env("HF_HUB_OFFLINE", "1")
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("dataset `someone/other`")
            && stderr.contains("offline")
            && stderr.contains("--data DIR"),
        "{stderr}"
    );
}

/// Damaged copies of a parquet file (bytes overwritten at random places, some cut short): each
/// scan, and each read of its images, ends in a result — an error naming the file where it ends
/// in an error — never in a panic. The parquet crate panics on some of them (8 in this set with
/// parquet 60.1); the reader turns those into errors.
#[test]
fn damaged_parquet_files_are_errors_that_name_them_never_crashes() {
    let original = std::fs::read(hf().join("embedded.parquet")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("damaged.parquet");
    let mut state = 12345u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for trial in 0..3000 {
        let mut bytes = original.clone();
        for _ in 0..=trial % 4 {
            let at = next() as usize % bytes.len();
            bytes[at] = (next() >> 32) as u8;
        }
        if trial % 7 == 0 {
            let keep = next() as usize % bytes.len();
            bytes.truncate(keep);
        }
        std::fs::write(&path, &bytes).unwrap();
        let outcome = std::panic::catch_unwind(|| {
            let options = ScanOptions {
                skip_bad: true,
                ..ScanOptions::default()
            };
            Dataset::scan(&path, &options)
                .and_then(|dataset| dataset.images().try_for_each(|image| image.map(drop)))
        });
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let message = format!("{e:#}");
                assert!(
                    message.contains("damaged.parquet"),
                    "trial {trial}: {message}"
                );
                errors += 1;
            }
            Err(_) => panic!("trial {trial}: the scan panicked"),
        }
    }
    assert!(errors > 0, "no damaged copy was refused");
}
