//! Deterministic stand-in weights for pytorch-fid's Inception-v3, bit for bit the values of
//! `tests/reference/inception_weights.py` (see its docstring for the generator; change both
//! together). Every tensor is regenerated from its name, so no 95 MB checkpoint is committed.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use lora_core::rng::{fnv1a, Rng};

/// `CONV_GAIN` of the Python generator.
const CONV_GAIN: f64 = 1.0;

/// The first `count` values of the stream for `key`, uniform in [−1, 1) on a 2⁻²³ grid.
fn uniform(key: &str, count: usize) -> impl Iterator<Item = f64> {
    let mut rng = Rng::new(fnv1a(key.as_bytes()));
    (0..count).map(move |_| (rng.next_u64() >> 40) as f64 / (1u64 << 24) as f64 * 2.0 - 1.0)
}

/// `(a, b)` such that the tensor `key` of `shape` is `a + b·u`.
fn affine(key: &str, shape: &[usize]) -> Result<(f64, f64)> {
    let ends = |suffix: &str| key.ends_with(suffix);
    Ok(if ends("bn.weight") {
        (1.0, 0.1)
    } else if ends("bn.bias") || ends("bn.running_mean") || ends("fc.bias") {
        (0.0, 0.1)
    } else if ends("bn.running_var") {
        (1.0, 0.5)
    } else if key == "fc.weight" {
        (0.0, (3.0 / shape[1] as f64).sqrt())
    } else if ends("conv.weight") {
        let fan_in: usize = shape[1..].iter().product();
        (0.0, (6.0 / fan_in as f64).sqrt() * CONV_GAIN)
    } else if key == "input" {
        (0.0, 1.0)
    } else {
        bail!("no deterministic rule for tensor `{key}`")
    })
}

/// The f32 tensor `key` of `shape`, on the CPU.
pub fn tensor(key: &str, shape: &[usize]) -> Result<Tensor> {
    let (a, b) = affine(key, shape)?;
    let count = shape.iter().product();
    let values: Vec<f32> = uniform(key, count).map(|u| (a + b * u) as f32).collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?)
}

/// Every key of pytorch-fid's state dict (without `num_batches_tracked`) with its shape, as the
/// Python model reported them in `tests/fixtures/inception/expected.json`.
pub fn state_dict_shapes() -> Result<Vec<(String, Vec<usize>)>> {
    let path = super::fixtures().join("inception").join("expected.json");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    serde_json::from_value::<HashMap<String, Vec<usize>>>(meta["state_dict"].clone())
        .map(|shapes| shapes.into_iter().collect())
        .with_context(|| format!("{}: state_dict", path.display()))
}

/// The whole deterministic state dict in `dtype` (f32 values rounded once to f16 for `F16`).
pub fn state_dict(dtype: DType) -> Result<HashMap<String, Tensor>> {
    state_dict_shapes()?
        .into_iter()
        .map(|(key, shape)| {
            let t = tensor(&key, &shape)?.to_dtype(dtype)?;
            Ok((key, t))
        })
        .collect()
}

/// Writes the deterministic state dict in `dtype` to `path` (safetensors).
pub fn write_state_dict(path: &Path, dtype: DType) -> Result<()> {
    candle_core::safetensors::save(&state_dict(dtype)?, path)
        .with_context(|| format!("writing {}", path.display()))
}
