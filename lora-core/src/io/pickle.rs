//! PyTorch pickle files (`.ckpt`, `.pt`, `.pth`, `.bin`): recognised, refused by default, and
//! read only on request (`--allow-pickle`).
//!
//! Why reading them this way is safe: Python's `pickle.load` executes what a file's opcodes name
//! (`GLOBAL` imports any callable, `REDUCE` calls it), which is how a `__reduce__` payload runs
//! code. candle's pickle reader, used here, is a data-only interpreter of those opcodes: `GLOBAL`
//! pushes the module and name as an inert pair of strings, `REDUCE`, `BUILD` and `NEWOBJ` record
//! the call as a value without making it, and nothing is imported, looked up or run. Tensors are
//! recognised afterwards by the rebuild function names torch writes, and their bytes are read from
//! the archive's `data/` entries; any other value is ignored, and a file that yields no tensor is
//! an error. Sizes are checked against the file before any tensor is allocated.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::pickle::PthTensors;
use candle_core::Tensor;

/// Zip archives: what `torch.save` writes since PyTorch 1.6.
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
/// Where a state dict sits inside a training checkpoint (`.ckpt` of A1111 and Lightning).
const STATE_DICT_KEY: &str = "state_dict";

/// Whether `bytes`, the start of a file, are a PyTorch pickle: a zip archive (PyTorch ≥ 1.6) or a
/// bare pickle stream (`PROTO` 2–5, older PyTorch).
pub fn looks_like_pickle(bytes: &[u8]) -> bool {
    bytes.starts_with(ZIP_MAGIC) || matches!(bytes, [0x80, 2..=5, ..])
}

/// Whether the file at `path` starts like a PyTorch pickle (false when it cannot be read).
pub fn is_pickle_file(path: &Path) -> bool {
    file_start(path).is_ok_and(|start| looks_like_pickle(&start))
}

/// The first four bytes of `path` (fewer for a shorter file).
fn file_start(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut start = Vec::with_capacity(4);
    std::fs::File::open(path)
        .and_then(|f| f.take(4).read_to_end(&mut start))
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(start)
}

/// The error for a pickle given without `--allow-pickle`.
pub fn refusal(path: &Path) -> String {
    format!(
        "{} is a PyTorch pickle file, not safetensors: loading a pickle in Python can run code \
         hidden in it, so pickles are refused by default. Convert it to .safetensors, or pass \
         --allow-pickle to read its tensors with a reader that never executes anything from the \
         file",
        path.display()
    )
}

/// Every tensor of a PyTorch zip-archive pickle, keyed by its state-dict name, on the CPU in its
/// stored dtype. A training checkpoint's `state_dict` entry is taken when the top level holds no
/// tensor.
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    ensure!(
        file_start(path)?.starts_with(ZIP_MAGIC),
        "{}: not a zip-archive PyTorch file; the bare pickle format of PyTorch before 1.6 is not \
         read: re-save it with a newer PyTorch, or convert it to .safetensors",
        path.display()
    );
    let unreadable = || format!("{}: not a readable PyTorch archive", path.display());
    let mut archive = PthTensors::new(path, None).with_context(unreadable)?;
    if archive.tensor_infos().is_empty() {
        if let Ok(nested) = PthTensors::new(path, Some(STATE_DICT_KEY)) {
            archive = nested;
        }
    }
    ensure!(
        !archive.tensor_infos().is_empty(),
        "{}: the archive holds no tensor (only other Python objects, which are never run)",
        path.display()
    );
    let file_len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let mut tensors = BTreeMap::new();
    for (name, info) in archive.tensor_infos() {
        // torch stores tensor data uncompressed, so a tensor larger than the whole file is a lie
        // of its header: refuse it before allocating for it.
        let bytes = (info.layout.start_offset() as u64)
            .saturating_add(info.layout.shape().elem_count() as u64)
            .saturating_mul(info.dtype.size_in_bytes() as u64);
        ensure!(
            bytes <= file_len,
            "{}: tensor `{name}` claims {bytes} bytes, more than the file's {file_len}",
            path.display()
        );
        let Some(tensor) = archive
            .get(name)
            .with_context(|| format!("{}: cannot read tensor `{name}`", path.display()))?
        else {
            bail!("{}: tensor `{name}` vanished while reading", path.display());
        };
        tensors.insert(name.clone(), tensor.contiguous()?);
    }
    Ok(tensors)
}

/// The safetensors file to read for `path`: `path` itself unless it is a pickle; a pickle's
/// [`safetensors_copy`] with `allow_pickle` (`--allow-pickle`), else the [`refusal`].
pub fn safetensors_path(path: &Path, allow_pickle: bool) -> Result<PathBuf> {
    if !is_pickle_file(path) {
        return Ok(path.to_path_buf());
    }
    ensure!(allow_pickle, "{}", refusal(path));
    safetensors_copy(path)
}

/// A safetensors copy of the pickle at `path`, made once (atomically) in the user's cache and
/// reused while the pickle's path, size and modification time stay the same: model weights are
/// memory-mapped, which a pickle does not allow.
pub fn safetensors_copy(path: &Path) -> Result<PathBuf> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let identity = format!(
        "{}|{}|{:?}",
        path.canonicalize()
            .unwrap_or_else(|_| path.to_path_buf())
            .display(),
        meta.len(),
        meta.modified().ok()
    );
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let copy = cache_folder()?.join(format!(
        "{stem}-{:016x}.safetensors",
        crate::rng::fnv1a(identity.as_bytes())
    ));
    if copy.is_file() {
        return Ok(copy);
    }
    let tensors: Vec<(String, Tensor)> = read_tensors(path)?.into_iter().collect();
    let metadata = BTreeMap::from([(
        "converted_from".to_string(),
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    )]);
    std::fs::create_dir_all(copy.parent().expect("the copy is inside the cache folder"))
        .with_context(|| format!("cannot create {}", copy.display()))?;
    // Streamed to disk by safetensors (a checkpoint is gigabytes), through our atomic write so
    // a half-made copy never carries the final name.
    let metadata: std::collections::HashMap<String, String> = metadata.into_iter().collect();
    super::write_atomic(&copy, |temp| {
        let views = tensors.iter().map(|(name, t)| (name.as_str(), t));
        safetensors::serialize_to_file(views, Some(metadata), temp)
            .with_context(|| format!("cannot write {}", temp.display()))
    })?;
    Ok(copy)
}

/// `$XDG_CACHE_HOME/lora-toolkit/from-pickle`, or `~/.cache/…` as the XDG default.
fn cache_folder() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(
            std::env::var_os("HOME")
                .context("neither XDG_CACHE_HOME nor HOME is set: no cache folder for the copy")?,
        )
        .join(".cache"),
    };
    Ok(base.join("lora-toolkit").join("from-pickle"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickles_are_told_from_safetensors_by_their_first_bytes() {
        assert!(looks_like_pickle(b"PK\x03\x04rest"));
        assert!(looks_like_pickle(&[0x80, 2, b'}', b'q']));
        assert!(!looks_like_pickle(&[0x80, 9]));
        assert!(!looks_like_pickle(b"\x10\x00\x00\x00\x00\x00\x00\x00{}"));
        assert!(!looks_like_pickle(b""));
    }
}
