//! Comparisons shared by the unit tests.

use candle_core::{DType, Tensor};

/// The largest magnitude in a tensor, in f32.
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The largest absolute difference between two tensors of one shape (and dtype), in f32.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// [`max_diff`] relative to the reference's largest magnitude.
pub(crate) fn max_rel_diff(ours: &Tensor, reference: &Tensor) -> f32 {
    max_diff(ours, reference) / max_abs(reference).max(1e-6)
}
