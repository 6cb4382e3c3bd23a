//! `--sample-every` with `--eval-inception` and `--eval-clip`: the metrics log gets a score row
//! at every sample step, a resume keeps the rows up to its checkpoint (and may change the
//! scores asked for), and the options are refused where they cannot work.

#[path = "../../tests/common/inception_weights.rs"]
mod inception_weights;

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::DType;
use common::lora_train;
use serde_json::Value;

/// The workspace's fixtures (also what `inception_weights` reads its key list from).
fn fixtures() -> PathBuf {
    common::fixtures()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn rows(metrics: &Path) -> Vec<Value> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

/// The steps of the rows that hold `key`.
fn steps_with(rows: &[Value], key: &str) -> Vec<u64> {
    rows.iter()
        .filter(|row| row.get(key).is_some())
        .map(|row| row["step"].as_u64().unwrap())
        .collect()
}

fn finite(row: &Value, key: &str) -> bool {
    row[key].as_f64().is_some_and(f64::is_finite)
}

#[test]
fn sample_steps_log_fid_and_clip_score_and_a_resume_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("inception.safetensors");
    inception_weights::write_state_dict(&weights, DType::F32).unwrap();
    let clip = fixtures().join("clip-tiny");
    let out = dir.path().join("adapter.safetensors");
    let metrics = dir.path().join("adapter.safetensors.metrics.jsonl");
    let sampling = [
        "--sample-every",
        "2",
        "--sample-steps",
        "2",
        "--sample-prompt",
        "a blue square",
        "--sample-prompt",
        "a green triangle",
        "--save-every",
        "2",
        "--eval-inception",
        weights.to_str().unwrap(),
    ];
    let run = lora_train(&out, 4, &sampling)
        .args(["--eval-clip", clip.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let logged = rows(&metrics);
    assert_eq!(steps_with(&logged, "loss"), [1, 2, 3, 4]);
    let scored: Vec<&Value> = logged.iter().filter(|r| r.get("fid").is_some()).collect();
    assert_eq!(steps_with(&logged, "fid"), [2, 4], "{logged:?}");
    assert_eq!(steps_with(&logged, "clip_score"), [2, 4], "{logged:?}");
    for row in scored {
        assert!(finite(row, "fid") && finite(row, "clip_score"), "{row}");
        assert_eq!(row.as_object().unwrap().len(), 3, "{row}");
    }

    // From step 2, now without --eval-clip (the sample options are free to change on resume).
    let checkpoint = dir.path().join("adapter-step000002.ckpt.safetensors");
    let resumed = lora_train(&out, 4, &sampling)
        .arg("--resume")
        .arg(&checkpoint)
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let logged = rows(&metrics);
    assert_eq!(steps_with(&logged, "loss"), [1, 2, 3, 4]);
    assert_eq!(steps_with(&logged, "fid"), [2, 4], "{logged:?}");
    assert_eq!(steps_with(&logged, "clip_score"), [2], "{logged:?}");
    assert!(finite(logged.last().unwrap(), "fid"), "{logged:?}");
}

#[test]
fn eval_options_are_refused_without_sample_every_or_with_one_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter.safetensors");
    let clip = fixtures().join("clip-tiny");
    let no_sampling = lora_train(&out, 2, &["--eval-inception", "inception.safetensors"])
        .args(["--eval-clip", clip.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!no_sampling.status.success());
    let message = stderr(&no_sampling);
    for needle in [
        "--eval-inception given without --sample-every",
        "--eval-clip given without --sample-every",
    ] {
        assert!(
            message.contains(needle),
            "`{needle}` missing from: {message}"
        );
    }

    let one_prompt = lora_train(
        &out,
        2,
        &[
            "--sample-every",
            "1",
            "--sample-prompt",
            "a blue square",
            "--eval-inception",
            "inception.safetensors",
        ],
    )
    .output()
    .unwrap();
    assert!(!one_prompt.status.success());
    let message = stderr(&one_prompt);
    assert!(
        message.contains("--eval-inception inception.safetensors")
            && message.contains("at least 2 --sample-prompt"),
        "{message}"
    );
    assert!(!out.exists());
}
