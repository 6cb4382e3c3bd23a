//! The `lora-eval` binary end to end: `metrics` on the fixture image folders with the
//! deterministic stand-in Inception weights, against the values pytorch-fid and torch-fidelity
//! computed on the same files (`tests/reference/make_eval_fixtures.py`), CLIP score against
//! torchmetrics (`make_clip_fixtures.py`), saved statistics, and bad input.

#[path = "../../tests/common/inception_weights.rs"]
mod inception_weights;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use candle_core::DType;
use serde_json::Value;

/// The workspace's fixtures (also what `inception_weights` reads its key list from).
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The stand-in weights, written once per test run.
fn weights() -> &'static Path {
    static WEIGHTS: OnceLock<PathBuf> = OnceLock::new();
    WEIGHTS.get_or_init(|| {
        let path =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("fid-inception-stand-in.safetensors");
        let temp = path.with_extension("partial");
        inception_weights::write_state_dict(&temp, DType::F32).unwrap();
        std::fs::rename(&temp, &path).unwrap();
        path
    })
}

fn lora_eval(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora-eval"))
        .args(args)
        .output()
        .expect("cannot run lora-eval")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `lora-eval metrics --json` with the stand-in weights and returns the report.
fn metrics(args: &[&str]) -> Value {
    let mut all = vec![
        "metrics",
        "--inception",
        weights().to_str().unwrap(),
        "--json",
    ];
    all.extend_from_slice(args);
    let out = lora_eval(&all);
    assert!(out.status.success(), "lora-eval failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("--json prints one JSON object")
}

fn eval_fixture(path: &str) -> String {
    fixtures().join("eval").join(path).display().to_string()
}

/// `case`: "png_only" or "all" (see the fixture script).
fn expected_end_to_end(case: &str) -> Value {
    let path = fixtures().join("eval/expected.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    all["end_to_end"][case].clone()
}

/// Copies the PNGs of the fixture's `set` folder into `dir/set`: the images every decoder reads
/// alike.
fn png_only(dir: &Path, set: &str) -> String {
    let to = dir.join(set);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(fixtures().join("eval").join(set)).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "png") {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
    to.display().to_string()
}

/// |ours − reference| ≤ rel·|reference|; fails on NaN, infinity or a missing value.
#[track_caller]
fn assert_close(ours: &Value, reference: &Value, rel: f64, what: &str) {
    let (a, b) = (ours.as_f64(), reference.as_f64());
    let (Some(a), Some(b)) = (a, b) else {
        panic!("{what}: ours {ours}, reference {reference}: not both numbers");
    };
    assert!(
        a.is_finite() && b.is_finite(),
        "{what}: {a} vs {b}: not finite"
    );
    assert!(
        (a - b).abs() <= rel * b.abs(),
        "{what}: ours {a}, reference {b}: relative difference {}",
        (a - b).abs() / b.abs()
    );
}

/// `rel`: the tolerance of FID and KID (IS, near 1 here, is held to a tenth of it).
fn check_scores(report: &Value, expected: &Value, rel: f64) {
    assert_close(&report["fid"], &expected["fid"], rel, "FID");
    assert_close(&report["is_mean"], &expected["is_mean"], rel / 10.0, "IS");
    assert_close(&report["is_std"], &expected["is_std"], rel * 10.0, "IS std");
    assert_close(&report["kid_mean"], &expected["kid_mean"], rel, "KID");
    assert_close(&report["kid_std"], &expected["kid_std"], rel, "KID std");
    assert_eq!(report["real_images"], expected["real_images"]);
    assert_eq!(report["fake_images"], expected["fake_images"]);
    assert_eq!(report["kid_subset_size"], expected["kid_subset_size"]);
}

/// PNG, RGB, grey and RGBA, sizes from 12×18 to 70×35: measured within 7e-6 of pytorch-fid
/// (FID), the rest rounding.
#[test]
fn metrics_equal_pytorch_fid_and_torch_fidelity() {
    let dir = tempfile::tempdir().unwrap();
    let report = metrics(&[
        "--real",
        &png_only(dir.path(), "real"),
        "--fake",
        &png_only(dir.path(), "fake"),
        "--is-splits",
        "2",
        "--batch-size",
        "4",
    ]);
    check_scores(&report, &expected_end_to_end("png_only"), 1e-4);
}

/// With the three JPEGs in: decoded by libjpeg-turbo as PIL decodes them. (With the `image`
/// crate's decoder, a level or two off in a few pixels, this FID moved by 1.3%.)
#[test]
fn metrics_with_jpegs_equal_pytorch_fid_and_torch_fidelity() {
    let report = metrics(&[
        "--real",
        &eval_fixture("real"),
        "--fake",
        &eval_fixture("fake"),
        "--is-splits",
        "2",
        "--batch-size",
        "4",
    ]);
    check_scores(&report, &expected_end_to_end("all"), 1e-4);
    assert_eq!(report["settings"]["is_splits"], 2);
    let warnings = report["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("singular")),
        "12 images for 2048 dimensions must warn: {warnings:?}"
    );
    assert!(report["clip_score"].is_null());
}

#[test]
fn saved_statistics_give_the_same_scores() {
    let dir = tempfile::tempdir().unwrap();
    let stats = dir.path().join("real-stats.safetensors");
    let stats = stats.to_str().unwrap();
    let args = |real: &str| {
        [
            "--real".to_owned(),
            real.to_owned(),
            "--fake".to_owned(),
            eval_fixture("fake"),
            "--is-splits".to_owned(),
            "2".to_owned(),
        ]
    };
    let mut first_args: Vec<String> = args(&eval_fixture("real")).to_vec();
    first_args.extend(["--save-stats".to_owned(), stats.to_owned()]);
    let first = metrics(&first_args.iter().map(String::as_str).collect::<Vec<_>>());
    let second = metrics(&args(stats).iter().map(String::as_str).collect::<Vec<_>>());
    for key in ["fid", "is_mean", "kid_mean", "kid_std"] {
        assert_close(&second[key], &first[key], 1e-12, key);
    }
    check_scores(&second, &expected_end_to_end("all"), 1e-4);
    // The file exists now: a second --save-stats needs --overwrite.
    let out = lora_eval(&[
        "metrics",
        "--inception",
        weights().to_str().unwrap(),
        "--real",
        &eval_fixture("real"),
        "--fake",
        &eval_fixture("fake"),
        "--save-stats",
        stats,
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--overwrite"), "{}", stderr(&out));
}

#[test]
fn clip_score_equals_torchmetrics() {
    let clip = fixtures().join("clip-tiny");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(clip.join("expected.json")).unwrap())
            .unwrap();
    // The fixture's images with their prompts, as metadata.jsonl keyed by file name.
    let dir = tempfile::tempdir().unwrap();
    let metadata = dir.path().join("metadata.jsonl");
    let rows: Vec<String> = expected["images"]
        .as_array()
        .unwrap()
        .iter()
        .zip(expected["prompts"].as_array().unwrap())
        .map(|(image, prompt)| serde_json::json!({"file_name": image, "text": prompt}).to_string())
        .collect();
    assert_eq!(rows.len(), 5);
    std::fs::write(&metadata, rows.join("\n")).unwrap();
    let report = metrics(&[
        "--real",
        &eval_fixture("real"),
        "--fake",
        clip.join("images").to_str().unwrap(),
        "--clip",
        clip.to_str().unwrap(),
        "--prompts",
        metadata.to_str().unwrap(),
        "--is-splits",
        "5",
    ]);
    assert_close(
        &report["clip_score"],
        &expected["clip_score"],
        1e-3,
        "CLIP score",
    );
    assert_eq!(report["settings"]["clip_model"], clip.to_str().unwrap());
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let one = dir.path().join("one");
    std::fs::create_dir(&one).unwrap();
    std::fs::copy(fixtures().join("eval/fake/f00.png"), one.join("a.png")).unwrap();
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for name in ["f00.png", "f01.png", "f02.jpg"] {
        std::fs::copy(fixtures().join("eval/fake").join(name), broken.join(name)).unwrap();
    }
    std::fs::write(broken.join("zz-not-an-image.png"), b"not a png").unwrap();
    let weights = weights().to_str().unwrap().to_owned();
    let run = |real: &Path, fake: &Path, extra: &[&str]| {
        let mut args = vec![
            "metrics",
            "--inception",
            &weights,
            "--real",
            real.to_str().unwrap(),
            "--fake",
            fake.to_str().unwrap(),
            "--is-splits",
            "2",
        ];
        args.extend_from_slice(extra);
        lora_eval(&args)
    };
    let real = fixtures().join("eval/real");

    let out = run(&real, &empty, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("holds no images"), "{}", stderr(&out));

    let out = run(&real, &one, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("at least 2 images"),
        "{}",
        stderr(&out)
    );

    let out = run(&real, &broken, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("zz-not-an-image.png") && err.contains("--skip-bad"),
        "{err}"
    );

    let out = run(&real, &broken, &["--skip-bad", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["fake_images"], 3);
    let skipped = report["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0]["file"]
        .as_str()
        .unwrap()
        .ends_with("zz-not-an-image.png"));

    // Weights that are not the network's: the error names the file and a missing key.
    let wrong = dir.path().join("wrong.safetensors");
    std::fs::copy(fixtures().join("clip-tiny/model.safetensors"), &wrong).unwrap();
    let out = lora_eval(&[
        "metrics",
        "--inception",
        wrong.to_str().unwrap(),
        "--real",
        real.to_str().unwrap(),
        "--fake",
        real.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("wrong.safetensors") && err.contains("Conv2d_1a_3x3"),
        "{err}"
    );

    // --clip without --prompts.
    let out = run(&real, &real, &["--clip", "x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--prompts"), "{}", stderr(&out));
}

#[test]
fn compare_generates_scores_and_draws() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = fixtures().join("sd1-tiny");
    // Two "checkpoints" of one run (the fixture's adapter under step-numbered names).
    let mut loras = Vec::new();
    for step in ["000010", "000020"] {
        let path = dir.path().join(format!("sks-step{step}.safetensors"));
        std::fs::copy(sd1.join("adapter_kohya.safetensors"), &path).unwrap();
        loras.push(path.display().to_string());
    }
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "a photo of sks dog\na red circle\n").unwrap();
    let output = dir.path().join("eval");
    let clip = fixtures().join("clip-tiny");
    let weights = weights().to_str().unwrap().to_owned();
    let args = vec![
        "compare".to_owned(),
        "--base".to_owned(),
        sd1.display().to_string(),
        "--lora".to_owned(),
        format!("{}:0.8", loras[0]),
        "--lora".to_owned(),
        loras[1].clone(),
        "--prompts".to_owned(),
        prompts.display().to_string(),
        "--seeds".to_owned(),
        "2".to_owned(),
        "--steps".to_owned(),
        "2".to_owned(),
        "--reference".to_owned(),
        eval_fixture("real"),
        "--inception".to_owned(),
        weights,
        "--clip".to_owned(),
        clip.display().to_string(),
        "--is-splits".to_owned(),
        "2".to_owned(),
        "--output".to_owned(),
        output.display().to_string(),
    ];
    let out = lora_eval(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "compare failed: {}", stderr(&out));
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(output.join("report.json")).unwrap())
            .unwrap();
    let columns = report["columns"].as_array().unwrap();
    let names: Vec<&str> = columns
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "sks-step000010", "sks-step000020"]);
    assert_eq!(columns[1]["step"], 10);
    assert_eq!(columns[1]["scale"], 0.8);
    for column in columns {
        assert_eq!(column["fake_images"], 4, "2 prompts × 2 seeds");
        assert_eq!(column["real_images"], 12);
        for key in ["fid", "is_mean", "kid_mean", "clip_score"] {
            let v = column[key].as_f64();
            assert!(v.is_some_and(f64::is_finite), "{key}: {}", column[key]);
        }
        let images = Path::new(column["images"].as_str().unwrap());
        assert_eq!(std::fs::read_dir(images).unwrap().count(), 4);
    }
    // The same noise for every column: the base column differs from the adapters' (the adapter
    // changes the picture), the two identical adapters at different scales differ too.
    let read = |column: &str| {
        std::fs::read(
            output
                .join("images")
                .join(column)
                .join("p000-s0000000000.png"),
        )
        .unwrap()
    };
    assert_ne!(read("base"), read("sks-step000010"));
    assert!(output.join("grid.png").is_file());
    for plot in ["fid", "kid", "is", "clip_score"] {
        assert!(
            output.join(format!("{plot}_over_steps.png")).is_file(),
            "{plot} plot"
        );
    }
    // A second run into the same folder needs --overwrite.
    let again = lora_eval(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!again.status.success());
    assert!(stderr(&again).contains("--overwrite"), "{}", stderr(&again));
}
