//! Shared helpers for the workspace integration tests: fixture paths and tensor comparisons.
#![allow(dead_code)] // each test binary uses a different subset

pub mod inception_weights;

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

/// The reference fixtures (`tests/fixtures/`), produced by `tests/reference/make_fixtures.py`.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// The tiny model configurations the fixtures cover.
pub const CONFIGS: [&str; 2] = ["sd1-tiny", "sd2-tiny"];

/// `tests/fixtures/<cfg>/expected.safetensors`: inputs and reference outputs.
pub fn expected(cfg: &str) -> Result<HashMap<String, Tensor>> {
    let path = fixtures().join(cfg).join("expected.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("loading {}", path.display()))
}

pub fn get<'a>(map: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    map.get(key)
        .unwrap_or_else(|| panic!("fixture key `{key}` missing"))
}

/// The values of `t` as f64, failing the test (at the caller's line) if there are none or any is
/// NaN or infinite: a comparison must never pass because it compared nothing or a value that is
/// not a number. `what` names the tensor in the message.
#[track_caller]
pub fn finite_values(t: &Tensor, what: &str) -> Vec<f64> {
    let values = t
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all()?.to_vec1::<f64>())
        .unwrap_or_else(|e| panic!("{what}: cannot read the tensor: {e}"));
    assert!(
        !values.is_empty(),
        "{what} {:?} is empty: nothing to compare",
        t.dims()
    );
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        panic!(
            "{what} {:?} holds a non-finite value ({}) at flat index {i}",
            t.dims(),
            values[i]
        );
    }
    values
}

#[track_caller]
fn same_shape(a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
}

/// Largest absolute elementwise difference. Fails on an empty tensor or a NaN or infinity in either.
#[track_caller]
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    same_shape(a, b);
    let (a, b) = (finite_values(a, "ours"), finite_values(b, "reference"));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max) as f32
}

/// Largest absolute value. Fails on an empty tensor, a NaN or an infinity.
#[track_caller]
pub fn max_abs(a: &Tensor) -> f32 {
    finite_values(a, "tensor")
        .iter()
        .map(|v| v.abs())
        .fold(0.0, f64::max) as f32
}

/// ‖a − b‖ / ‖b‖ (Frobenius). Fails on an empty tensor or a NaN or infinity in either.
#[track_caller]
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    same_shape(a, b);
    let (a, b) = (finite_values(a, "ours"), finite_values(b, "reference"));
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num.sqrt() / den.sqrt().max(f64::from(f32::MIN_POSITIVE))) as f32
}

/// Asserts |ours − reference| ≤ rel·|reference| for scalars; a NaN or infinity on either side
/// fails (it would pass a `!(diff > tol)` comparison).
#[track_caller]
pub fn assert_scalar_close(ours: f64, reference: f64, rel: f64, what: &str) {
    assert!(
        ours.is_finite() && reference.is_finite(),
        "{what}: ours {ours}, reference {reference}: not finite"
    );
    let diff = (ours - reference).abs();
    assert!(
        diff <= rel * reference.abs(),
        "{what}: ours {ours}, reference {reference}: relative difference {} > {rel}",
        diff / reference.abs()
    );
}

/// [`max_abs_diff`] relative to the reference's largest magnitude: `max |a − b| / max |b|`.
/// Fails on a NaN or infinity in either tensor, and on empty tensors (nothing was compared).
#[track_caller]
pub fn max_rel_diff(ours: &Tensor, reference: &Tensor) -> f32 {
    assert!(
        reference.elem_count() > 0,
        "comparing empty tensors {:?}",
        reference.dims()
    );
    max_abs_diff(ours, reference) / max_abs(reference).max(f32::MIN_POSITIVE)
}
