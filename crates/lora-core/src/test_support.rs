//! Comparisons shared by the unit tests.

use candle_core::{DType, Tensor};

/// The largest absolute difference between two tensors of one shape (and dtype), in f32.
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// [`max_diff`] relative to the reference's largest magnitude.
pub(crate) fn max_rel_diff(ours: &Tensor, reference: &Tensor) -> f32 {
    let scale: f32 = reference
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap();
    max_diff(ours, reference) / scale.max(1e-6)
}
