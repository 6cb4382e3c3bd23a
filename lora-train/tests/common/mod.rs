//! What the `lora-train` binary tests share: the command on the tiny fixtures.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
