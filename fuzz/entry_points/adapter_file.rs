//! Fuzz entry for the safetensors readers: the bytes become a `.safetensors` file, which every
//! reader of such files must either load or refuse with an error naming it, never panic.
//! Shared by `fuzz_targets/adapter_file.rs` and the regression test at the workspace root.

use std::path::Path;

use candle_core::Device;
use lora_core::formats::single_file::SingleFile;
use lora_core::io::read_safetensors;
use lora_core::io::weights::mmap_safetensors;
use lora_core::AdapterFile;

pub fn run(data: &[u8]) {
    // The readers take paths (adapters and checkpoints are files), so each input is one.
    let dir = tempfile::tempdir().expect("cannot create a scratch folder");
    let path = dir.path().join("input.safetensors");
    std::fs::write(&path, data).expect("cannot write the input file");

    let device = Device::Cpu;
    expect_named(&path, read_safetensors(&path, &device).map(drop));
    expect_named(
        &path,
        mmap_safetensors(std::slice::from_ref(&path)).map(drop),
    );
    expect_named(&path, SingleFile::open(&path, true).map(drop));
    match AdapterFile::read(&path, &device) {
        Ok(adapter) => {
            // What callers read off a loaded adapter must hold up too.
            for module in adapter.raw_modules() {
                let _ = (module.rank(), module.lora());
            }
        }
        Err(e) => expect_named(&path, Err(e)),
    }
}

/// An error must say which file it is about: users load several adapters at once.
fn expect_named(path: &Path, result: anyhow::Result<()>) {
    if let Err(e) = result {
        let message = format!("{e:#}");
        assert!(
            message.contains(&path.display().to_string()),
            "error does not name the file: {message}"
        );
    }
}
