//! File output that never leaves a half-written file behind, and whole-file safetensors reading
//! with the header metadata (candle's own helpers drop it).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

/// Writes `path` atomically: `write` fills a temporary file in the same directory, which is
/// synced to disk and then renamed over `path`. If `write` or any later step fails, the temporary
/// file is removed and an existing `path` is left untouched, so a crash mid-save never destroys
/// the previous adapter or checkpoint.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let temp = temp_path_beside(path)?;
    let result = write(&temp).and_then(|()| sync_and_rename(&temp, path));
    if result.is_err() {
        // Best effort: the write may have failed before creating the file at all.
        let _ = std::fs::remove_file(&temp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Asks the kernel to start writing `len` bytes of `file` from `offset` to disk now, without
/// waiting for the disk to have them (Linux; elsewhere nothing; the call itself may block while
/// the device's queue is full). Why: the bytes of a large output otherwise reach the disk in
/// [`write_atomic`]'s final sync, which then waits for all of them at once (a large part of a
/// merge, measured in benches/RESULTS.md); started while later tensors are produced, the disk's
/// work overlaps with them. Best effort: that final sync is what makes the file durable, so an
/// error here changes nothing and is ignored.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: the descriptor stays open for the borrow; the call reads no memory of ours.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
        };
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (file, offset, len);
}

/// Writes the folder `output` atomically: `fill` fills a temporary sibling folder, which is then
/// renamed to `output`, so the folder appears whole or not at all; on failure the temporary
/// folder is removed. `output` must not exist (a rename onto an existing folder fails or, for an
/// empty one, replaces it: callers decide about existing outputs first).
pub fn write_folder_atomic<T>(output: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let temp = temp_path_beside(output)?;
    let result = fill(&temp).and_then(|value| {
        std::fs::rename(&temp, output)
            .with_context(|| format!("cannot rename {} to {}", temp.display(), output.display()))?;
        sync_parent_dir(output);
        Ok(value)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&temp);
    }
    result
}

/// A fresh hidden name next to `path`: `.<name>.tmp-<pid>-<n>`. Same directory so the final rename
/// stays on one filesystem (and is therefore atomic); pid and counter keep concurrent writers,
/// in this process or another, from sharing a temporary file.
fn temp_path_beside(path: &Path) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .with_context(|| format!("{} does not name a file", path.display()))?
        .to_string_lossy();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    Ok(path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id())))
}

fn sync_and_rename(temp: &Path, path: &Path) -> Result<()> {
    set_final_permissions(temp, path)?;
    File::open(temp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", temp.display()))?;
    std::fs::rename(temp, path)
        .with_context(|| format!("cannot rename {} to {}", temp.display(), path.display()))?;
    sync_parent_dir(path);
    Ok(())
}

/// Gives the temporary file the permissions the output should end with: those of the file it
/// replaces, or the usual `rw-r--r--` for a new file (some writers create files owner-only, which
/// would make shared adapters unreadable to other users).
fn set_final_permissions(temp: &Path, path: &Path) -> Result<()> {
    let permissions = match std::fs::metadata(path) {
        Ok(existing) => existing.permissions(),
        Err(_) => {
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::Permissions::from_mode(0o644)
            }
            #[cfg(not(unix))]
            {
                return Ok(());
            }
        }
    };
    std::fs::set_permissions(temp, permissions)
        .with_context(|| format!("cannot set permissions of {}", temp.display()))
}

/// Makes the rename itself durable. Best effort: some filesystems refuse to sync a directory, and
/// the data is already safe under either name.
fn sync_parent_dir(path: &Path) {
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// The folder a file path is in: its parent, or `.` for a bare file name (whose parent is empty).
pub fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Creates and removes a file in `folder`: the one sure test that outputs can be written there
/// (permissions, a read-only filesystem, a full one that has no room for a new entry).
pub fn probe_writable(folder: &Path) -> Result<()> {
    let probe = temp_path_beside(&folder.join("write-probe"))?;
    File::create(&probe)
        .and_then(|_| std::fs::remove_file(&probe))
        .with_context(|| format!("cannot create a file in {}", folder.display()))
}

/// Bytes a non-root user may still write on the filesystem holding `folder`, where the platform
/// says (`None` elsewhere or when it cannot tell).
pub fn free_space(folder: &Path) -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(folder.as_os_str().as_bytes()).ok()?;
        let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `path` is NUL-terminated and `stats` is written by the call before it is read.
        let stats = unsafe {
            if libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) != 0 {
                return None;
            }
            stats.assume_init()
        };
        Some(stats.f_bavail.saturating_mul(stats.f_frsize))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = folder;
        None
    }
}

/// Writes `tensors` with string `metadata` in the safetensors header, atomically. The file is
/// serialised in memory (the files written here are adapters, checkpoints and small outputs), not
/// with `safetensors::serialize_to_file`: that one writes a temporary file of its own first
/// (`.tmpXXXXXX`, named by the `tempfile` crate), which a killed process leaves behind under a
/// name that tells neither what wrote it nor whether that process is gone.
pub fn write_safetensors_atomic(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    let metadata: HashMap<String, String> = metadata.into_iter().collect();
    let views = tensors.iter().map(|(name, t)| (name.as_str(), t));
    let bytes = safetensors::serialize(views, Some(metadata))
        .with_context(|| format!("cannot serialise safetensors for {}", path.display()))?;
    write_atomic(path, |temp| Ok(std::fs::write(temp, bytes)?))
}

/// The whole content of a safetensors file.
#[derive(Debug)]
pub struct SafetensorsContents {
    /// Tensors in their stored dtype, on the requested device.
    pub tensors: BTreeMap<String, Tensor>,
    /// The `__metadata__` string map (empty when the header has none).
    pub metadata: BTreeMap<String, String>,
}

/// Reads a whole safetensors file into memory. Meant for small files such as adapters; model
/// weights are memory-mapped instead (see `weights`). A truncated or corrupt file, or one that is
/// not safetensors at all, is an error naming the file.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<SafetensorsContents> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let invalid = || not_safetensors(path, &bytes);
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).with_context(invalid)?;
    let metadata = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let file = safetensors::SafeTensors::deserialize(&bytes).with_context(invalid)?;
    check_shapes(path, &file)?;
    let tensors = file
        .iter()
        .map(|(name, view)| {
            let tensor = candle_core::safetensors::Load::load(&view, device)
                .with_context(|| format!("{}: cannot load tensor `{name}`", path.display()))?;
            Ok((name.to_string(), tensor))
        })
        .collect::<Result<_>>()?;
    Ok(SafetensorsContents { tensors, metadata })
}

/// Why `bytes`, the start of `path`, did not parse as safetensors: a PyTorch pickle is named as
/// one, with what to do about it; anything else is truncated or corrupt.
pub fn not_safetensors(path: &Path, bytes: &[u8]) -> String {
    if super::pickle::looks_like_pickle(bytes) {
        super::pickle::refusal(path)
    } else {
        format!(
            "{} is not a valid safetensors file (truncated or corrupt?)",
            path.display()
        )
    }
}

/// Refuses shapes that fit the file only because they are empty: `[0, 2^40, 2^40]` holds no
/// bytes, so the safetensors check passes, but its strides (products of the trailing dimensions)
/// overflow, and candle would panic building the tensor. Products of the non-zero dimensions that
/// fit in `usize` keep every stride in range.
pub fn check_shapes(path: &Path, file: &safetensors::SafeTensors) -> Result<()> {
    for (name, view) in file.iter() {
        let shape = view.shape();
        let fits = shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .is_some();
        anyhow::ensure!(
            fits,
            "{}: tensor `{name}` has the impossible shape {shape:?} (its size overflows)",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;
    use candle_core::DType;

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temporary() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("out.bin");
        std::fs::write(&path, b"old")?;
        write_atomic(&path, |temp| Ok(std::fs::write(temp, b"new")?))?;
        assert_eq!(std::fs::read(&path)?, b"new");
        assert_eq!(
            std::fs::read_dir(dir.path())?.count(),
            1,
            "temporary file left behind"
        );
        Ok(())
    }

    #[test]
    fn failed_write_keeps_the_old_file_and_removes_the_temporary() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("out.bin");
        std::fs::write(&path, b"old")?;
        let err = write_atomic(&path, |temp| {
            std::fs::write(temp, b"partial")?;
            bail!("disk full")
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("disk full"), "{err:#}");
        assert!(format!("{err:#}").contains("out.bin"), "{err:#}");
        assert_eq!(std::fs::read(&path)?, b"old");
        assert_eq!(
            std::fs::read_dir(dir.path())?.count(),
            1,
            "temporary file left behind"
        );
        Ok(())
    }

    #[test]
    fn safetensors_round_trip_keeps_metadata_and_dtype() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("t.safetensors");
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)?
            .reshape((2, 3))?
            .to_dtype(DType::F16)?;
        let metadata = BTreeMap::from([("k".to_string(), "v".to_string())]);
        write_safetensors_atomic(&path, &[("a".to_string(), t.clone())], metadata.clone())?;
        let back = read_safetensors(&path, &Device::Cpu)?;
        assert_eq!(back.metadata, metadata);
        let a = &back.tensors["a"];
        assert_eq!(a.dtype(), DType::F16);
        assert_eq!(
            a.to_dtype(DType::F32)?.to_vec2::<f32>()?,
            t.to_dtype(DType::F32)?.to_vec2::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn truncated_and_foreign_files_are_rejected_with_their_name() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let good = dir.path().join("good.safetensors");
        let t = Tensor::zeros((4, 4), DType::F32, &Device::Cpu)?;
        write_safetensors_atomic(&good, &[("a".to_string(), t)], BTreeMap::new())?;
        let bytes = std::fs::read(&good)?;
        let truncated = dir.path().join("truncated.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() - 5])?;
        let foreign = dir.path().join("foreign.safetensors");
        std::fs::write(
            &foreign,
            b"PK\x03\x04 this is a zip (pickle) archive, not safetensors",
        )?;
        for (path, expected) in [
            (truncated, "not a valid safetensors"),
            (foreign, "is a PyTorch pickle file"),
        ] {
            let err = read_safetensors(&path, &Device::Cpu).unwrap_err();
            let msg = format!("{err:#}");
            assert!(
                msg.contains(&path.display().to_string()) && msg.contains(expected),
                "{msg}"
            );
        }
        Ok(())
    }
}
