//! The fuzz targets' regression inputs (`fuzz/regressions/<target>/`: the inputs that once crashed
//! a target, and a minimised set covering what the fuzzer reached), replayed through the same
//! entry code the fuzz targets run, so CI keeps every fixed crash fixed without running a fuzzer.

use std::path::{Path, PathBuf};

#[path = "../fuzz/entry_points/adapter_file.rs"]
mod adapter_file;
#[path = "../fuzz/entry_points/dataset.rs"]
mod dataset;
#[path = "../fuzz/entry_points/key_mapping.rs"]
mod key_mapping;
#[path = "../fuzz/entry_points/train_recipe.rs"]
mod train_recipe;

/// Runs `entry` on every input of `target`'s regression folder; a missing or empty folder fails,
/// so a moved corpus cannot turn the test into a no-op.
fn replay(target: &str, entry: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("cannot list the regression folder").path())
        .collect();
    inputs.sort();
    assert!(
        !inputs.is_empty(),
        "no regression inputs in {}",
        dir.display()
    );
    for input in &inputs {
        let data =
            std::fs::read(input).unwrap_or_else(|e| panic!("cannot read {}: {e}", input.display()));
        // A panic names the input that caused it.
        eprintln!("{target}: {}", input.display());
        entry(&data);
    }
}

#[test]
fn adapter_file_inputs_load_or_fail_cleanly() {
    replay("adapter_file", adapter_file::run);
}

#[test]
fn key_mapping_inputs_map_or_fail_cleanly() {
    replay("key_mapping", key_mapping::run);
}

#[test]
fn dataset_inputs_scan_or_fail_cleanly() {
    replay("dataset", dataset::run);
}

#[test]
fn train_recipe_inputs_resolve_or_fail_cleanly() {
    replay("train_recipe", train_recipe::run);
}
