//! `lora-train` on a filesystem that is full or read only, for real: a small tmpfs mounted for
//! the test (which needs root; elsewhere each test says it did not run and passes). A folder that
//! cannot hold the run is refused before any work; a disk that fills up during the run stops it
//! with an error naming the file, every checkpoint already written stays whole, and the run
//! resumes from them once there is room again.

#![cfg(target_os = "linux")]

mod common;

use common::{lora_train, wait_while_running};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A tmpfs of `size` mounted on a fresh folder, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (after saying why) where this process may not mount filesystems.
    fn mount(size: &str, test: &str) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("{test}: NOT RUN: cannot mount a tmpfs here (needs root)");
            return None;
        }
        Some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn make_read_only(&self) {
        let status = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(self.path())
            .status()
            .unwrap();
        assert!(status.success(), "cannot remount read only");
    }

    /// Writes a file until the filesystem has no room left.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 4096];
        while file.write_all(&chunk).is_ok() {}
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Every `.safetensors` in `dir` parses whole; returns how many there are. Hidden temporaries
/// are counted apart and must be none once no run is alive.
fn whole_files(dir: &Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "a temporary file was left: {name}");
        if name.ends_with(".safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                safetensors::SafeTensors::deserialize(&bytes).is_ok(),
                "{name} is not whole"
            );
            count += 1;
        }
    }
    count
}

#[test]
fn a_read_only_output_folder_is_refused_before_any_work() {
    let Some(disk) = SmallDisk::mount("1m", "read_only") else {
        return;
    };
    disk.make_read_only();
    let out = disk.path().join("adapter.safetensors");
    let output = lora_train(&out, 2, &[]).output().unwrap();
    let err = stderr(&output);
    assert!(!output.status.success(), "{err}");
    assert!(
        err.contains("cannot be written") && err.contains(&out.display().to_string()),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        !err.contains("dataset:"),
        "work started before the refusal: {err}"
    );
}

#[test]
fn too_little_space_is_refused_before_training() {
    let Some(disk) = SmallDisk::mount("256k", "too_little_space") else {
        return;
    };
    let out = disk.path().join("adapter.safetensors");
    let output = lora_train(&out, 2, &["--save-every", "1"])
        .output()
        .unwrap();
    let err = stderr(&output);
    assert!(!output.status.success(), "{err}");
    assert!(
        err.contains("free") && err.contains("needs about") && err.contains("checkpoints"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_disk_that_fills_up_keeps_every_checkpoint_whole_and_the_run_resumes() {
    let Some(disk) = SmallDisk::mount("16m", "fills_up") else {
        return;
    };
    let out = disk.path().join("adapter.safetensors");
    let mut child = lora_train(&out, 100_000, &["--save-every", "1"])
        .spawn()
        .unwrap();
    let first = disk.path().join("adapter-step000001.ckpt.safetensors");
    wait_while_running(&mut child, "a checkpoint", || first.exists());
    let filler = disk.fill();
    let output = child.wait_with_output().unwrap();
    let err = stderr(&output);
    assert!(!output.status.success(), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_file(filler).unwrap();
    assert!(whole_files(disk.path()) >= 1);

    let latest = lora_train::latest_checkpoint(&out)
        .unwrap()
        .expect("a checkpoint is left");
    // Resume for two more steps past the newest whole checkpoint.
    let step: usize = latest
        .file_name()
        .unwrap()
        .to_string_lossy()
        .trim_start_matches("adapter-step")
        .trim_end_matches(".ckpt.safetensors")
        .parse()
        .unwrap();
    let resumed = lora_train(&out, step + 2, &["--resume", "latest"])
        .output()
        .unwrap();
    let err = stderr(&resumed);
    assert!(resumed.status.success(), "{err}");
    assert!(err.contains(&format!("resuming at step {step}")), "{err}");
    assert!(whole_files(disk.path()) >= 2);
}
