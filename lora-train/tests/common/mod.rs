//! What the `lora-train` binary tests share: the command on the tiny fixtures.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// `lora-train` on the tiny fixture model and dataset at resolution 32 (skipping the dataset's
/// deliberately bad files), writing `out`; stdout silenced, stderr captured. Callers add the
/// recipe.
pub fn lora_train_on_fixtures(out: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lora-train"));
    command
        .arg("--base")
        .arg(fixtures().join("sd1-tiny"))
        .arg("--data")
        .arg(fixtures().join("train-data"))
        .arg("--output")
        .arg(out)
        .args(["--resolution", "32", "--skip-bad"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// [`lora_train_on_fixtures`] for `steps` steps at lr 1e-2, with `extra` flags.
pub fn lora_train(out: &Path, steps: usize, extra: &[&str]) -> Command {
    let mut command = lora_train_on_fixtures(out);
    command
        .args(["--lr", "1e-2", "--steps", &steps.to_string()])
        .args(extra);
    command
}

/// Polls until `done` while `child` runs; fails if `child` ends first or after five minutes.
pub fn wait_while_running(child: &mut Child, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "waited five minutes for {what}"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "lora-train ended before {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
