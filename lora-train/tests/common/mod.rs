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

/// `lora-train` for 2 steps (batch 2, lr 1e-2) on the tiny fixture model from `data`, writing
/// `out`.
pub fn train_two_steps(data: &Path, out: &Path) {
    let output = two_steps(data, out).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The command [`train_two_steps`] runs, for callers that set its environment.
pub fn two_steps(data: &Path, out: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lora-train"));
    command
        .arg("--base")
        .arg(fixtures().join("sd1-tiny"))
        .arg("--data")
        .arg(data)
        .arg("--output")
        .arg(out)
        .args(["--resolution", "32", "--lr", "1e-2", "--steps", "2"])
        .args(["--batch-size", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command
}

/// The two adapter files hold the same tensors, bit for bit, and the same header entries. The
/// header's JSON may list its keys in another order and `modelspec.date` is the time of writing.
pub fn assert_same_adapter(a: &Path, b: &Path) {
    let [a, b] = [a, b].map(|p| std::fs::read(p).unwrap());
    let [meta_a, meta_b] = [&a, &b].map(|bytes| {
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).unwrap();
        let mut entries = header.metadata().clone().unwrap();
        entries.remove("modelspec.date").unwrap();
        entries
    });
    assert_eq!(meta_a, meta_b);
    let [a, b] = [&a, &b].map(|bytes| safetensors::SafeTensors::deserialize(bytes).unwrap());
    let mut names = a.names();
    names.sort();
    assert!(!names.is_empty());
    for name in names {
        let (x, y) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
        assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()), "{name}");
        assert!(x.data() == y.data(), "{name} differs");
    }
}

/// Every file under `dir` (hidden ones too: a left-over temporary file must show) and its bytes,
/// to show what changed and what did not.
pub fn folder_bytes(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                files.insert(path, bytes);
            }
        }
    }
    files
}
