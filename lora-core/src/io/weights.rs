//! Loading model weights: memory-mapped safetensors behind a candle `VarBuilder`, optionally with
//! per-tensor f32 deltas added at load (how adapters are folded into a component, e.g. the text
//! encoder at inference or the UNet with `--fuse`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use rayon::prelude::*;

use crate::io::files::check_shapes;
use crate::rng::Rng;

/// Memory-maps safetensors files, validating their headers up front so a truncated or corrupt
/// file is reported with its path rather than failing on first access.
pub fn mmap_safetensors(paths: &[PathBuf]) -> Result<MmapedSafetensors> {
    for p in paths {
        let file = std::fs::File::open(p)
            .with_context(|| format!("cannot open weights file {}", p.display()))?;
        // SAFETY: read-only mapping; the toolkit never writes to model files it reads.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", p.display()))?;
        let file = safetensors::SafeTensors::deserialize(&mmap)
            .with_context(|| super::not_safetensors(p, &mmap))?;
        check_shapes(p, &file)?;
    }
    // SAFETY: as above; the files were validated just now.
    unsafe { MmapedSafetensors::multi(paths) }.with_context(|| format!("cannot map {paths:?}"))
}

/// The `__metadata__` of a safetensors file's header (empty when it has none).
pub fn header_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: read-only mapping of a file the toolkit never writes.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot map {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&mmap)
        .with_context(|| super::not_safetensors(path, &mmap))?;
    Ok(header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect())
}

/// Drops the pages of `data`, a tensor's bytes in a read-only file mapping, from the process's
/// resident set once the tensor has been copied out (candle's loads copy). Loading a model reads
/// every tensor once; without this every page read stays resident beside its converted copy and
/// peak memory is the file plus the model. Pages are re-read from the file if touched again, so
/// nothing is lost; a failure only means they stay.
///
/// # Safety
/// `data` must lie in a read-only file mapping (the pages around it included): on other memory
/// (the heap, a written private mapping) dropping pages zeroes them.
pub unsafe fn release_mapped(data: &[u8]) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let start = data.as_ptr() as usize / page * page;
        let end = data.as_ptr() as usize + data.len();
        if end > start {
            // SAFETY: [start, end) lies within pages of a read-only file mapping that outlives
            // this call; MADV_DONTNEED on such pages only makes later reads fault them in again.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(unix))]
    let _ = data;
}

/// One of `parts` equal slices along dim 0 of a tensor (a stacked q/k/v's q, k or v).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RowPart {
    pub index: usize,
    pub parts: usize,
}

/// Tensor `name` of `files` (or only its `rows` part) on `device`: widened to f32 when `dtype` is
/// f32 and it is stored in half precision on the CPU, otherwise as stored. candle reads a
/// half-precision tensor into a copy and widens that element by element on one thread, which made
/// most of a model's load time; here the mapped bytes are widened in parallel chunks with the
/// CPU's conversion instructions.
pub(crate) fn read_tensor(
    files: &MmapedSafetensors,
    name: &str,
    rows: Option<RowPart>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let view = files.get(name)?;
    let mut shape = view.shape().to_vec();
    let mut bytes = view.data();
    if let Some(RowPart { index, parts }) = rows {
        let total = shape.first().copied().unwrap_or(0);
        if parts == 0 || index >= parts || !total.is_multiple_of(parts) {
            return Err(candle_core::Error::Msg(format!(
                "`{name}` has {total} rows, which do not split into {parts} equal parts"
            )));
        }
        shape[0] = total / parts;
        let len = bytes.len() / parts;
        bytes = &bytes[index * len..(index + 1) * len];
    }
    if device.is_cpu() && dtype == DType::F32 && cfg!(target_endian = "little") {
        let widened = match view.dtype() {
            safetensors::Dtype::F16 => widen::<half::f16>(bytes, &shape),
            safetensors::Dtype::BF16 => widen::<half::bf16>(bytes, &shape),
            _ => None,
        };
        if let Some(tensor) = widened {
            return tensor;
        }
    }
    let whole = files.load(name, device)?;
    match rows {
        None => Ok(whole),
        // A narrowed tensor shares the whole one's storage: copied, so only the part stays.
        Some(RowPart { index, .. }) => whole
            .narrow(0, index * shape[0], shape[0])?
            .force_contiguous(),
    }
}

/// Little-endian 2-byte floats `bytes` as an f32 CPU tensor of `shape`; `None` when the bytes
/// are not 2-aligned (candle's reader copes with those).
fn widen<H>(bytes: &[u8], shape: &[usize]) -> Option<candle_core::Result<Tensor>>
where
    [H]: half::slice::HalfFloatSliceExt,
    H: Sync,
{
    use half::slice::HalfFloatSliceExt;
    const CHUNK: usize = 1 << 16;
    // SAFETY: `H` is a 2-byte plain bit pattern (`repr(transparent)` over u16): every value is
    // valid, so reinterpreting the aligned middle of the bytes is sound.
    let (head, halves, tail) = unsafe { bytes.align_to::<H>() };
    if !head.is_empty() || !tail.is_empty() {
        return None;
    }
    let mut out = vec![0f32; halves.len()];
    out.par_chunks_mut(CHUNK)
        .zip(halves.par_chunks(CHUNK))
        .for_each(|(dst, src)| src.convert_to_f32_slice(dst));
    Some(Tensor::from_vec(out, shape, &Device::Cpu))
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
        let raw = read_tensor(&self.files, name, None, dtype, dev).map_err(|e| {
            candle_core::Error::Msg(format!(
                "{}: missing or unreadable tensor `{name}`: {e}",
                self.origin
            ))
        })?;
        if let Ok(view) = self.files.get(name) {
            // SAFETY: the view's bytes lie in the read-only mapping of a weights file.
            unsafe { release_mapped(view.data()) };
        }
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

/// A `VarBuilder` backend that makes up every requested tensor from a seed and its name (so the
/// values do not depend on the order layers are built in): PyTorch's default `U(±1/√fan_in)` for
/// weights and kernels, N(0, 0.02) for embedding tables, ones for normalisation scales, zeros for
/// biases. Trainable ones are `Var`s, kept for an optimizer ([`RandomInit::vars`]); frozen ones
/// are plain tensors (benchmarks on random weights).
#[derive(Clone)]
pub struct RandomInit {
    seed: u64,
    trainable: bool,
    /// Shared by clones, so the caller keeps access after handing one to a `VarBuilder`.
    vars: Arc<Mutex<BTreeMap<String, Var>>>,
}

impl RandomInit {
    pub fn trainable(seed: u64) -> Self {
        Self {
            seed,
            trainable: true,
            vars: Arc::default(),
        }
    }

    pub fn frozen(seed: u64) -> Self {
        Self {
            trainable: false,
            ..Self::trainable(seed)
        }
    }

    /// A builder (f32 on `device`) drawing from this backend.
    pub fn var_builder(&self, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), DType::F32, device.clone())
    }

    /// The trainable variables created so far, sorted by name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars
            .lock()
            .expect("no panics while holding the lock")
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }

    fn init(&self, shape: &Shape, name: &str, device: &Device) -> Result<Tensor> {
        let mut rng = Rng::new(self.seed ^ crate::rng::fnv1a(name.as_bytes()));
        let dims = shape.dims();
        if dims.len() == 1 {
            let mut parts = name.rsplit('.');
            let (leaf, parent) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let value = if leaf == "weight" && parent.contains("norm") {
                1.0
            } else {
                0.0
            };
            return Ok(Tensor::full(value as f32, shape, device)?);
        }
        if name.ends_with("embedding.weight") {
            return Ok((rng.normal_tensor(shape, device)? * 0.02)?);
        }
        let fan_in: usize = dims[1..].iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt();
        rng.uniform_tensor(shape, -bound, bound, device)
    }
}

impl SimpleBackend for RandomInit {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let make = || {
            self.init(&shape, name, device)
                .and_then(|t| Ok(t.to_dtype(dtype)?))
                .map_err(|e| candle_core::Error::Msg(format!("initialising `{name}`: {e:#}")))
        };
        if !self.trainable {
            return make();
        }
        let mut vars = self.vars.lock().expect("no panics while holding the lock");
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("`{name}` requested as {shape:?} and as {:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let var = Var::from_tensor(&make()?)?;
        vars.insert(name.to_owned(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod random_init_tests {
    use super::*;

    #[test]
    fn random_init_depends_on_name_and_seed_only() {
        let dev = Device::Cpu;
        let draw = |init: &RandomInit, names: &[&str]| -> Vec<Vec<f32>> {
            let vb = init.var_builder(&dev);
            names
                .iter()
                .map(|n| {
                    let t = vb.get((3, 4), n).unwrap();
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                })
                .collect()
        };
        let a = draw(&RandomInit::trainable(5), &["x.weight", "y.weight"]);
        let b = draw(&RandomInit::frozen(5), &["y.weight", "x.weight"]);
        assert_eq!(a[0], b[1]);
        assert_eq!(a[1], b[0]);
        assert_ne!(a[0], a[1]);
        assert!(a[0].iter().all(|v| v.abs() <= 0.5)); // U(±1/√4)

        let trainable = RandomInit::trainable(5);
        let vb = trainable.var_builder(&dev);
        let scale = vb.get(4, "block.norm1.weight").unwrap();
        let bias = vb.get(4, "block.norm1.bias").unwrap();
        assert_eq!(scale.to_vec1::<f32>().unwrap(), vec![1.0; 4]);
        assert_eq!(bias.to_vec1::<f32>().unwrap(), vec![0.0; 4]);
        assert!(scale.is_variable());
        assert_eq!(trainable.vars().len(), 2);
        assert!(!RandomInit::frozen(5)
            .var_builder(&dev)
            .get(4, "n.weight")
            .unwrap()
            .is_variable());
    }
}

#[cfg(test)]
mod read_tensor_tests {
    use super::*;

    /// The parallel widening gives candle's own conversion bit for bit, for f16 and bf16, over
    /// several chunks and a ragged end, with infinities, NaN and subnormals among the values.
    #[test]
    fn widened_half_precision_equals_candles_conversion() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let n = (1 << 17) + 3;
        let mut values: Vec<f32> = (0..n)
            .map(|i| ((i as f32) * 0.37).sin() * 70000.0)
            .collect();
        values[..4].copy_from_slice(&[f32::INFINITY, f32::NAN, 1e-7, -3e-41]);
        let source = Tensor::from_vec(values, (n / 5, 5), &Device::Cpu)?;
        let stored = [
            ("h", source.to_dtype(DType::F16)?),
            ("b", source.to_dtype(DType::BF16)?),
        ];
        let path = dir.path().join("w.safetensors");
        candle_core::safetensors::save(&stored.iter().cloned().collect(), &path)?;
        let files = mmap_safetensors(&[path])?;
        for (name, half) in &stored {
            // The widening path, not candle's fallback: safetensors aligns tensor data.
            assert_eq!(files.get(name)?.data().as_ptr() as usize % 2, 0);
            let ours = read_tensor(&files, name, None, DType::F32, &Device::Cpu)?;
            assert_eq!(ours.dtype(), DType::F32);
            assert_eq!(ours.dims(), half.dims());
            let bits = |t: &Tensor| -> Result<Vec<u32>> {
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                Ok(v.iter().map(|x| x.to_bits()).collect())
            };
            let want = bits(&half.to_dtype(DType::F32)?)?;
            assert!(!want.is_empty());
            assert_eq!(bits(&ours)?, want, "`{name}`");
            // Any other dtype is left as stored.
            let kept = read_tensor(&files, name, None, DType::F16, &Device::Cpu)?;
            assert_eq!(kept.dtype(), half.dtype());
        }
        Ok(())
    }

    /// A third of a stacked tensor's rows, widened or as stored, equals that slice of the whole;
    /// rows that do not split evenly are an error naming the tensor.
    #[test]
    fn a_row_part_is_that_slice_of_the_tensor() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let whole = Tensor::arange(0f32, 36.0, &Device::Cpu)?.reshape((9, 4))?;
        let stored = [("qkv", whole.to_dtype(DType::F16)?)];
        let path = dir.path().join("w.safetensors");
        candle_core::safetensors::save(&stored.iter().cloned().collect(), &path)?;
        let files = mmap_safetensors(&[path])?;
        for dtype in [DType::F32, DType::F16] {
            for index in 0..3 {
                let part = RowPart { index, parts: 3 };
                let got = read_tensor(&files, "qkv", Some(part), dtype, &Device::Cpu)?;
                assert_eq!(got.dtype(), dtype);
                let got = got.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                let want = whole.narrow(0, 3 * index, 3)?.to_vec2::<f32>()?;
                assert_eq!(got.len(), 3);
                assert_eq!(got, want, "{dtype:?} part {index}");
            }
        }
        let uneven = RowPart { index: 0, parts: 2 };
        let err = read_tensor(&files, "qkv", Some(uneven), DType::F32, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("`qkv` has 9 rows"), "{err}");
        Ok(())
    }
}
