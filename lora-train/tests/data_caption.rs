//! `lora-train data caption`, through the binary: a dry run changes no byte and shows a diff;
//! `--write` changes exactly the captions the edits say (kohya caption files, an imagefolder's
//! metadata.jsonl or metadata.csv with its other columns kept), a second run changes nothing, a
//! caption left empty or a parquet dataset is refused, and usage errors exit with 2.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lora_train_caption(source: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora-train"))
        .args(["data", "caption"])
        .arg(source)
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn succeeded(output: &Output) {
    assert!(
        output.status.success(),
        "{:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        stdout(output),
        stderr(output)
    );
}

fn image(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::new(2, 3).save(path).unwrap();
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// A kohya folder: `a` and `d` captioned, `b` (top level) and `c` (in `10_sks dog`) not.
fn kohya_folder(root: &Path) -> PathBuf {
    let dir = root.join("kohya");
    image(&dir.join("a.png"));
    std::fs::write(dir.join("a.txt"), "a dog,  blurry\n").unwrap();
    image(&dir.join("b.png"));
    let folder = dir.join("10_sks dog");
    image(&folder.join("c.png"));
    image(&folder.join("d.jpg"));
    std::fs::write(folder.join("d.txt"), "a photo").unwrap();
    std::fs::write(dir.join("notes.md"), "not a caption").unwrap();
    dir
}

const KOHYA_EDITS: [&str; 5] = [
    "--prefix",
    "sks, ",
    "--from-folder-names",
    "--remove-tag",
    "blurry",
];

#[test]
fn a_dry_run_changes_nothing_and_prints_the_diff() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = kohya_folder(tmp.path());
    let before = common::folder_bytes(&dir);
    let output = lora_train_caption(&dir, &KOHYA_EDITS);
    succeeded(&output);
    assert_eq!(
        common::folder_bytes(&dir),
        before,
        "a dry run changed files"
    );
    let (a, c, d) = (
        dir.join("a.txt"),
        dir.join("10_sks dog/c.txt"),
        dir.join("10_sks dog/d.txt"),
    );
    let want = format!(
        "--- {a}\n+++ {a}\n-a dog, blurry\n+sks, a dog\n\
         --- /dev/null\n+++ {c}\n+sks, sks dog\n\
         --- {d}\n+++ {d}\n-a photo\n+sks, a photo\n",
        a = a.display(),
        c = c.display(),
        d = d.display()
    );
    assert_eq!(stdout(&output), want);
    let err = stderr(&output);
    assert!(
        err.contains("3 caption(s) would change") && err.contains("1 without a caption"),
        "{err}"
    );
}

#[test]
fn write_changes_exactly_the_expected_captions_and_a_second_run_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = kohya_folder(tmp.path());
    let mut want = common::folder_bytes(&dir);
    succeeded(&lora_train_caption(
        &dir,
        &[&KOHYA_EDITS[..], &["--write"]].concat(),
    ));
    let folder = dir.join("10_sks dog");
    want.insert(dir.join("a.txt"), b"sks, a dog\n".to_vec());
    want.insert(folder.join("c.txt"), b"sks, sks dog\n".to_vec());
    want.insert(folder.join("d.txt"), b"sks, a photo\n".to_vec());
    // b.png (top level, no caption, no folder words) keeps having none; images, notes.md and
    // every other byte stay; no temporary file is left.
    assert_eq!(common::folder_bytes(&dir), want);

    let again = lora_train_caption(&dir, &[&KOHYA_EDITS[..], &["--write"]].concat());
    succeeded(&again);
    assert_eq!(stdout(&again), "");
    assert!(
        stderr(&again).contains("0 caption(s) changed"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        common::folder_bytes(&dir),
        want,
        "the prefix was added twice"
    );
}

#[test]
fn overwrite_gives_every_image_of_a_folder_its_words() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = kohya_folder(tmp.path());
    succeeded(&lora_train_caption(
        &dir,
        &["--from-folder-names", "--overwrite", "--write"],
    ));
    let folder = dir.join("10_sks dog");
    assert_eq!(read(&folder.join("c.txt")), "sks dog\n");
    assert_eq!(read(&folder.join("d.txt")), "sks dog\n");
    // Top-level images have no folder words: a.txt keeps its caption, byte for byte.
    assert_eq!(read(&dir.join("a.txt")), "a dog,  blurry\n");
    assert!(!dir.join("b.txt").exists());
}

#[test]
fn jsonl_metadata_changes_only_the_caption_values() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imagefolder");
    for name in ["a.png", "b.png", "c.png"] {
        image(&dir.join(name));
    }
    let metadata = dir.join("metadata.jsonl");
    std::fs::write(
        &metadata,
        concat!(
            r#"{"file_name": "b.png", "text": "a cat, blurry", "score": 1.50, "extra": {"text": [1, 2]}}"#,
            "\n",
            r#"{"text":"blurry, a dog","file_name":"a.png"}"#,
            "\r\n\n",
            r#"{"file_name": "c.png", "text": null, "score": 2}"#,
            "\n",
        ),
    )
    .unwrap();
    let mut want = common::folder_bytes(&dir);
    let args = ["--remove-tag", "blurry", "--replace", "cat=sks cat"];
    let dry = lora_train_caption(&dir, &args);
    succeeded(&dry);
    assert_eq!(common::folder_bytes(&dir), want, "a dry run changed files");
    let m = metadata.display();
    assert_eq!(
        stdout(&dry),
        format!(
            "--- {m} line 1 (b.png)\n+++ {m} line 1 (b.png)\n-a cat, blurry\n+a sks cat\n\
             --- {m} line 2 (a.png)\n+++ {m} line 2 (a.png)\n-blurry, a dog\n+a dog\n"
        )
    );

    succeeded(&lora_train_caption(
        &dir,
        &[&args[..], &["--write"]].concat(),
    ));
    want.insert(
        metadata.clone(),
        concat!(
            r#"{"file_name": "b.png", "text": "a sks cat", "score": 1.50, "extra": {"text": [1, 2]}}"#,
            "\n",
            r#"{"text":"a dog","file_name":"a.png"}"#,
            "\r\n\n",
            r#"{"file_name": "c.png", "text": null, "score": 2}"#,
            "\n",
        )
        .as_bytes()
        .to_vec(),
    );
    assert_eq!(common::folder_bytes(&dir), want);
}

#[test]
fn csv_metadata_keeps_the_header_rows_and_other_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imagefolder");
    for name in ["a.png", "sub/b.png"] {
        image(&dir.join(name));
    }
    let metadata = dir.join("metadata.csv");
    std::fs::write(
        &metadata,
        "file_name,caption,source\n\
         sub/b.png,\"a \"\"quoted\"\" cat\",\"camera, phone\"\n\
         a.png,\"a dog, blurry\",web\n",
    )
    .unwrap();
    let mut want = common::folder_bytes(&dir);
    succeeded(&lora_train_caption(
        &dir,
        &[
            "--caption-column",
            "caption",
            "--prefix",
            "sks, ",
            "--remove-tag",
            "blurry",
            "--write",
        ],
    ));
    want.insert(
        metadata.clone(),
        b"file_name,caption,source\n\
          sub/b.png,\"sks, a \"\"quoted\"\" cat\",\"camera, phone\"\n\
          a.png,\"sks, a dog\",web\n"
            .to_vec(),
    );
    assert_eq!(common::folder_bytes(&dir), want);
}

#[test]
fn a_caption_left_empty_is_refused_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("kohya");
    image(&dir.join("a.png"));
    std::fs::write(dir.join("a.txt"), "blurry").unwrap();
    image(&dir.join("b.png"));
    std::fs::write(dir.join("b.txt"), "blurry, a dog").unwrap();
    let before = common::folder_bytes(&dir);
    let output = lora_train_caption(&dir, &["--remove-tag", "blurry", "--write"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains(&dir.join("a.txt").display().to_string())
            && err.contains("empty caption")
            && err.contains("nothing written"),
        "{err}"
    );
    assert_eq!(
        common::folder_bytes(&dir),
        before,
        "b.txt must not be written either"
    );
}

#[test]
fn a_parquet_dataset_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("train.parquet");
    std::fs::write(&file, b"PAR1 not really").unwrap();
    let output = lora_train_caption(&file, &["--prefix", "sks, ", "--write"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("train.parquet")
            && err.contains("inside the parquet file")
            && err.contains("lora-train data prepare"),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"PAR1 not really");
}

#[test]
fn usage_errors_exit_with_2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = kohya_folder(tmp.path());
    let before = common::folder_bytes(&dir);
    for args in [
        &[][..],
        &["--write"],
        &["--replace", "no-equals-sign"],
        &["--replace", "=x"],
        &["--overwrite", "--prefix", "x"],
        &["--model", "m", "--from-folder-names"],
        &["--batch-size", "2", "--prefix", "x"],
    ] {
        let output = lora_train_caption(&dir, args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            stderr(&output)
        );
    }
    // Training flags do not mix with the subcommand.
    let output = Command::new(env!("CARGO_BIN_EXE_lora-train"))
        .args(["--steps", "3", "data", "caption"])
        .arg(&dir)
        .args(["--prefix", "x"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert_eq!(common::folder_bytes(&dir), before);
}

#[test]
fn dataset_options_that_only_apply_to_training_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = kohya_folder(tmp.path());
    let before = common::folder_bytes(&dir);
    let output = lora_train_caption(&dir, &["--prefix", "x", "--split", "test", "--write"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("--split") && err.contains("--caption-ext"),
        "{err}"
    );
    // --caption-column names an imagefolder's column; a kohya folder has caption files.
    let output = lora_train_caption(&dir, &["--prefix", "x", "--caption-column", "tags"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("--caption-column applies to imagefolders"));
    assert_eq!(common::folder_bytes(&dir), before);
}

/// The tiny random BLIP of `tests/fixtures/blip-tiny` and its two images, with what transformers
/// captioned them (`expected.json`, `tests/reference/make_blip_fixtures.py`).
fn blip() -> (PathBuf, serde_json::Value) {
    let folder = common::fixtures().join("blip-tiny");
    let meta = serde_json::from_str(&read(&folder.join("expected.json"))).unwrap();
    (folder, meta)
}

/// transformers' caption of the fixture image `name`, and the generation length it used.
fn transformers_caption(meta: &serde_json::Value, name: &str) -> (String, String) {
    let index = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .position(|n| n == name)
        .unwrap();
    (
        meta["generated_text"][index].as_str().unwrap().to_owned(),
        meta["max_new_tokens"].to_string(),
    )
}

#[test]
fn blip_captions_the_images_without_one_as_transformers_does() {
    let (model, meta) = blip();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("photos");
    std::fs::create_dir_all(&dir).unwrap();
    for (copy, name) in [
        ("noise.png", "noise.png"),
        ("shapes.png", "shapes.png"),
        ("captioned.png", "noise.png"),
    ] {
        std::fs::copy(model.join("images").join(name), dir.join(copy)).unwrap();
    }
    std::fs::write(dir.join("captioned.txt"), "my own words\n").unwrap();
    let (noise_caption, max_new_tokens) = transformers_caption(&meta, "noise.png");
    // The fixture model ends the shapes image's caption at once.
    assert_eq!(transformers_caption(&meta, "shapes.png").0, "");
    assert!(!noise_caption.is_empty());
    let model_args = [
        "--model",
        model.to_str().unwrap(),
        "--max-new-tokens",
        &max_new_tokens,
        "--batch-size",
        "2",
        "--prefix",
        "sks, ",
    ];

    let before = common::folder_bytes(&dir);
    let output = lora_train_caption(&dir, &model_args);
    succeeded(&output);
    assert_eq!(
        common::folder_bytes(&dir),
        before,
        "a dry run changed files"
    );
    assert!(
        stdout(&output).contains(&format!("+sks, {noise_caption}")),
        "{}",
        stdout(&output)
    );

    let output = lora_train_caption(&dir, &[&model_args[..], &["--write"]].concat());
    succeeded(&output);
    assert_eq!(
        read(&dir.join("noise.txt")),
        format!("sks, {noise_caption}\n")
    );
    // An existing caption keeps its words (and gets the prefix); no words, no caption file.
    assert_eq!(read(&dir.join("captioned.txt")), "sks, my own words\n");
    assert!(!dir.join("shapes.txt").exists());
    assert!(
        stderr(&output).contains("shapes.png no words"),
        "{}",
        stderr(&output)
    );

    // --overwrite captions every image, the captioned one too.
    let output = lora_train_caption(
        &dir,
        &[&model_args[..], &["--overwrite", "--write"]].concat(),
    );
    succeeded(&output);
    assert_eq!(
        read(&dir.join("captioned.txt")),
        format!("sks, {noise_caption}\n")
    );
}

#[test]
fn blip_captions_go_into_an_imagefolders_metadata() {
    let (model, meta) = blip();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("imagefolder");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::copy(model.join("images/noise.png"), dir.join("sub/noise.png")).unwrap();
    image(&dir.join("kept.png"));
    std::fs::write(
        dir.join("metadata.jsonl"),
        "{\"file_name\": \"kept.png\", \"text\": \"a grey square\"}\n\
         {\"file_name\": \"sub/noise.png\", \"source\": \"camera\"}\n",
    )
    .unwrap();
    let (noise_caption, max_new_tokens) = transformers_caption(&meta, "noise.png");
    let output = lora_train_caption(
        &dir,
        &[
            "--model",
            model.to_str().unwrap(),
            "--max-new-tokens",
            &max_new_tokens,
            "--write",
        ],
    );
    succeeded(&output);
    let expected_line = format!(
        "{{\"file_name\": \"sub/noise.png\", \"source\": \"camera\", \"text\": {}}}\n",
        serde_json::to_string(&noise_caption).unwrap()
    );
    assert_eq!(
        read(&dir.join("metadata.jsonl")),
        format!("{{\"file_name\": \"kept.png\", \"text\": \"a grey square\"}}\n{expected_line}")
    );
}

#[test]
fn a_missing_model_or_an_unreadable_image_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = kohya_folder(tmp.path());
    let before = common::folder_bytes(&dir);
    let missing = tmp.path().join("no-such-model");
    let output = lora_train_caption(&dir, &["--model", missing.to_str().unwrap(), "--write"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("no-such-model"),
        "{}",
        stderr(&output)
    );

    let (model, _) = blip();
    std::fs::write(dir.join("broken.png"), b"not a png").unwrap();
    let output = lora_train_caption(&dir, &["--model", model.to_str().unwrap(), "--write"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr(&output).contains("broken.png") && stderr(&output).contains("nothing written"),
        "{}",
        stderr(&output)
    );
    std::fs::remove_file(dir.join("broken.png")).unwrap();
    assert_eq!(common::folder_bytes(&dir), before);
}
