//! Loading model weights: memory-mapped safetensors behind a candle `VarBuilder`, optionally with
//! per-tensor f32 deltas added at load (how adapters are folded into a component, e.g. the text
//! encoder at inference or the UNet with `--fuse`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// Memory-maps safetensors files, validating their headers up front so a truncated or corrupt
/// file is reported with its path rather than failing on first access.
pub fn mmap_safetensors(paths: &[PathBuf]) -> Result<MmapedSafetensors> {
    for p in paths {
        let file = std::fs::File::open(p)
            .with_context(|| format!("cannot open weights file {}", p.display()))?;
        // SAFETY: read-only mapping; the toolkit never writes to model files it reads.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", p.display()))?;
        safetensors::SafeTensors::deserialize(&mmap).with_context(|| {
            format!(
                "{} is not a valid safetensors file (truncated or corrupt?)",
                p.display()
            )
        })?;
    }
    // SAFETY: as above; the files were validated just now.
    unsafe { MmapedSafetensors::multi(paths) }.with_context(|| format!("cannot map {paths:?}"))
}

/// A `VarBuilder` backend over memory-mapped safetensors that adds an f32 delta to the named
/// tensors as they are loaded.
struct PatchedSafetensors {
    files: MmapedSafetensors,
    deltas: BTreeMap<String, Tensor>,
    origin: String,
}

impl PatchedSafetensors {
    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let raw = self.files.load(name, dev).map_err(|e| {
            candle_core::Error::Msg(format!(
                "{}: missing or unreadable tensor `{name}`: {e}",
                self.origin
            ))
        })?;
        with_delta(raw, self.deltas.get(name), name, dtype, &self.origin)
    }
}

/// A loaded weight in `dtype`, with an f32 adapter delta added when given. The delta may have
/// any shape with the weight's element count (a 1×1 conv's ΔW arrives as a matrix). Shared by
/// every weight source, so folded adapters mean the same thing wherever a model comes from.
pub(crate) fn with_delta(
    raw: Tensor,
    delta: Option<&Tensor>,
    name: &str,
    dtype: DType,
    origin: &str,
) -> candle_core::Result<Tensor> {
    let Some(delta) = delta else {
        return raw.to_dtype(dtype);
    };
    if delta.elem_count() != raw.elem_count() {
        return Err(candle_core::Error::Msg(format!(
            "{origin}: adapter delta for `{name}` has shape {:?}, the weight is {:?}",
            delta.dims(),
            raw.dims()
        )));
    }
    let delta = delta.to_device(raw.device())?.reshape(raw.shape())?;
    (raw.to_dtype(DType::F32)? + delta)?.to_dtype(dtype)
}

impl SimpleBackend for PatchedSafetensors {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{name}` has shape {:?}, the model config expects {:?}",
                self.origin,
                t.dims(),
                s.dims()
            )));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.files.get(name).is_ok()
    }
}

/// A `VarBuilder` reading `paths` (memory-mapped) in `dtype` on `device`, adding `deltas`
/// (keyed by full tensor name) to the matching tensors. Every delta key must exist in the files.
pub fn var_builder(
    paths: &[PathBuf],
    dtype: DType,
    device: &Device,
    deltas: BTreeMap<String, Tensor>,
) -> Result<VarBuilder<'static>> {
    let files = mmap_safetensors(paths)?;
    let origin = paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let missing: Vec<&String> = deltas.keys().filter(|k| files.get(k).is_err()).collect();
    anyhow::ensure!(
        missing.is_empty(),
        "{origin}: adapter modules have no weight in the model: {missing:?}"
    );
    let backend = PatchedSafetensors {
        files,
        deltas,
        origin,
    };
    Ok(VarBuilder::from_backend(
        Box::new(backend),
        dtype,
        device.clone(),
    ))
}

/// The file of a diffusers component (`unet/`, `vae/`…), preferring full precision and falling
/// back to the `.fp16` variant.
pub fn component_weights(dir: &Path, stem: &str) -> Result<PathBuf> {
    let candidates = [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ];
    candidates
        .iter()
        .map(|c| dir.join(c))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no weights in {}: expected {} or {}",
                dir.display(),
                candidates[0],
                candidates[1]
            )
        })
}
