//! The `lora-train` binary under SIGTERM: it finishes the step in progress, writes a checkpoint
//! and the adapter so far, says how to resume and exits with 130; `--resume latest` then
//! continues from that checkpoint to the end.

mod common;

use common::{lora_train, wait_while_running};
use std::process::Command;

#[cfg(unix)]
#[test]
fn sigterm_saves_a_checkpoint_and_resume_latest_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter.safetensors");
    let metrics = dir.path().join("adapter.safetensors.metrics.jsonl");
    let mut child = lora_train(&out, 100_000, &[]).spawn().unwrap();
    // Wait for the first step to be logged, then ask the run to stop.
    wait_while_running(&mut child, "a logged step", || {
        std::fs::read_to_string(&metrics).is_ok_and(|m| m.lines().count() >= 1)
    });
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("stopped at step") && stderr.contains("--resume latest"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let steps_done = std::fs::read_to_string(&metrics).unwrap().lines().count();
    let checkpoint = dir
        .path()
        .join(format!("adapter-step{steps_done:06}.ckpt.safetensors"));
    assert!(
        checkpoint.exists(),
        "no checkpoint at step {steps_done}: {stderr}"
    );

    // The same command with --resume latest runs the remaining steps of a short run.
    let total = steps_done + 2;
    let resumed = lora_train(&out, total, &["--resume", "latest"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("resuming at step {steps_done}")),
        "{stderr}"
    );
    assert!(out.exists());
    let lines = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert_eq!(lines, total);
}
