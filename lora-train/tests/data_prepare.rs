//! `data prepare`: a clean copy that `--data` reads back with the same captions in the same
//! order, each image at the size it trains at; duplicates and bad files dropped and reported;
//! the source never written; the output whole or absent.

mod common;

use std::path::{Path, PathBuf};

use common::fixtures;
use image::{Rgb, RgbImage};
use lora_train::data_prepare::{prepare, PrepareOptions, BUCKET_STEP};
use lora_train::dataset::{bucket_size, Dataset, ScanOptions};
use serde_json::Value;

fn options(resolution: usize) -> PrepareOptions {
    PrepareOptions {
        resolution,
        buckets: false,
        dedupe: false,
        overwrite: false,
    }
}

/// A kohya folder: a wide and a tall image with captions, a copy of the wide one, and an image
/// without a caption (a bad file).
fn source(dir: &Path) -> PathBuf {
    let root = dir.join("source");
    std::fs::create_dir(&root).unwrap();
    let picture =
        |w: u32, h: u32| RgbImage::from_fn(w, h, |x, y| Rgb([(x * 2) as u8, (y * 2) as u8, 90]));
    for (name, image, caption) in [
        ("a_wide.png", picture(128, 64), Some("a wide picture")),
        ("b_tall.png", picture(48, 96), Some("a tall picture")),
        (
            "c_copy.png",
            picture(128, 64),
            Some("the same wide picture"),
        ),
        ("d_bare.png", picture(64, 64), None),
    ] {
        image.save(root.join(name)).unwrap();
        if let Some(caption) = caption {
            std::fs::write(root.join(name).with_extension("txt"), caption).unwrap();
        }
    }
    root
}

fn skip_bad() -> ScanOptions {
    ScanOptions {
        skip_bad: true,
        ..ScanOptions::default()
    }
}

#[test]
fn the_copy_reads_back_with_the_same_captions_at_the_training_size() {
    let dir = tempfile::tempdir().unwrap();
    let source = source(dir.path());
    let before = common::folder_bytes(&source);
    let output = dir.path().join("prepared");
    let report = prepare(
        &source,
        &skip_bad(),
        &output,
        &PrepareOptions {
            dedupe: true,
            ..options(64)
        },
    )
    .unwrap();
    assert_eq!(common::folder_bytes(&source), before, "the source changed");
    assert_eq!(report.kept, 2);
    let reasons: Vec<(String, String)> = report
        .dropped
        .iter()
        .map(|d| (d.file.clone(), d.reason.clone()))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|(f, r)| f.ends_with("d_bare.png") && r.contains("no caption")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(f, r)| f.ends_with("c_copy.png") && r.contains("a_wide.png")),
        "{reasons:?}"
    );

    let copy = Dataset::scan(&output, &ScanOptions::default()).unwrap();
    let captions: Vec<&str> = copy.items.iter().map(|i| i.caption.as_str()).collect();
    assert_eq!(captions, ["a wide picture", "a tall picture"]);
    assert!(copy.items.iter().all(|i| i.size == (64, 64)), "{copy:?}");
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(written["kept"], 2);
    assert_eq!(written["dropped"].as_array().unwrap().len(), 2);
    // Only the prepared files, no temporary left beside them.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn buckets_keep_each_aspect_ratio() {
    let dir = tempfile::tempdir().unwrap();
    let source = source(dir.path());
    let output = dir.path().join("prepared");
    prepare(
        &source,
        &skip_bad(),
        &output,
        &PrepareOptions {
            buckets: true,
            ..options(128)
        },
    )
    .unwrap();
    let copy = Dataset::scan(&output, &ScanOptions::default()).unwrap();
    let sizes: Vec<(usize, usize)> = copy.items.iter().map(|i| i.size).collect();
    let want: Vec<(usize, usize)> = [(128, 64), (48, 96), (128, 64)]
        .into_iter()
        .map(|(w, h)| bucket_size(w, h, 128, BUCKET_STEP))
        .collect();
    assert_eq!(sizes, want);
    assert!(
        sizes[0].0 > sizes[0].1 && sizes[1].1 > sizes[1].0,
        "{sizes:?}"
    );
}

#[test]
fn a_failure_leaves_no_output_and_outputs_are_replaced_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let source = source(dir.path());
    let output = dir.path().join("prepared");
    // Without dropping bad files, the uncaptioned image stops it before anything is written.
    let message = format!(
        "{:#}",
        prepare(&source, &ScanOptions::default(), &output, &options(64)).unwrap_err()
    );
    assert!(message.contains("d_bare.png"), "{message}");
    assert!(!output.exists());

    prepare(&source, &skip_bad(), &output, &options(64)).unwrap();
    let first = common::folder_bytes(&output);
    let message = format!(
        "{:#}",
        prepare(&source, &skip_bad(), &output, &options(64)).unwrap_err()
    );
    assert!(message.contains("--overwrite"), "{message}");
    assert_eq!(common::folder_bytes(&output), first);
    let replace = PrepareOptions {
        overwrite: true,
        dedupe: true,
        ..options(64)
    };
    prepare(&source, &skip_bad(), &output, &replace).unwrap();
    assert_eq!(
        Dataset::scan(&output, &ScanOptions::default())
            .unwrap()
            .items
            .len(),
        2
    );

    // Into the source, or over a folder that is no prepared dataset: refused.
    let inside = source.join("clean");
    let message = format!(
        "{:#}",
        prepare(&source, &skip_bad(), &inside, &options(64)).unwrap_err()
    );
    assert!(message.contains("overlap"), "{message}");
    let message = format!(
        "{:#}",
        prepare(&source, &skip_bad(), &fixtures(), &replace).unwrap_err()
    );
    assert!(message.contains("no prepared dataset"), "{message}");
}

#[test]
fn a_parquet_dataset_prepares_like_its_imagefolder() {
    let dir = tempfile::tempdir().unwrap();
    let hf = fixtures().join("hf-datasets");
    let outputs = ["from-parquet", "from-folder"].map(|name| dir.path().join(name));
    prepare(
        &hf.join("embedded.parquet"),
        &ScanOptions::default(),
        &outputs[0],
        &options(64),
    )
    .unwrap();
    prepare(
        &hf.join("imagefolder"),
        &ScanOptions::default(),
        &outputs[1],
        &options(64),
    )
    .unwrap();
    let images = |root: &Path| {
        let files: Vec<(PathBuf, Vec<u8>)> = common::folder_bytes(&root.join("images"))
            .into_iter()
            .map(|(path, bytes)| (path.strip_prefix(root).unwrap().to_path_buf(), bytes))
            .collect();
        assert_eq!(files.len(), 5);
        files
    };
    assert_eq!(images(&outputs[0]), images(&outputs[1]));
}

#[test]
fn the_command_writes_the_copy_and_says_what_it_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let source = source(dir.path());
    let output = dir.path().join("prepared");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lora-train"))
            .args(["data", "prepare"])
            .arg(&source)
            .args(args)
            .output()
            .unwrap()
    };
    let out = output.to_str().unwrap();
    let done = run(&[
        "--output",
        out,
        "--resolution",
        "64",
        "--drop-bad",
        "--dedupe",
    ]);
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{stderr}");
    assert!(
        stderr.contains("2 image(s) written") && stderr.contains("c_copy.png"),
        "{stderr}"
    );
    assert_eq!(
        Dataset::scan(&output, &ScanOptions::default())
            .unwrap()
            .items
            .len(),
        2
    );
    // A usage error (no --output) exits with 2, a refused output with 1.
    assert_eq!(run(&["--resolution", "64"]).status.code(), Some(2));
    assert_eq!(run(&["--output", out]).status.code(), Some(1));
}
