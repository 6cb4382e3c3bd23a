//! Comparisons shared by the unit tests. Each fails the test (at the caller's line) when a value
//! it compares is NaN or infinite: a comparison must never pass because its input is not a
//! number (`x > tol` is false for NaN).

use candle_core::{DType, Tensor};

/// The values of `t` as f64, failing on a NaN or infinity; `what` names the tensor.
#[track_caller]
pub(crate) fn finite_values(t: &Tensor, what: &str) -> Vec<f64> {
    let values = t
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all()?.to_vec1::<f64>())
        .unwrap_or_else(|e| panic!("{what}: cannot read the tensor: {e}"));
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        panic!(
            "{what} {:?} holds a non-finite value ({}) at flat index {i}",
            t.dims(),
            values[i]
        );
    }
    values
}

/// The largest magnitude in a tensor.
#[track_caller]
pub(crate) fn max_abs(t: &Tensor) -> f32 {
    finite_values(t, "tensor")
        .iter()
        .map(|v| v.abs())
        .fold(0.0, f64::max) as f32
}

/// The largest absolute difference between two tensors of one shape.
#[track_caller]
pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let (a, b) = (finite_values(a, "ours"), finite_values(b, "reference"));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max) as f32
}

/// [`max_diff`] relative to the reference's largest magnitude.
#[track_caller]
pub(crate) fn max_rel_diff(ours: &Tensor, reference: &Tensor) -> f32 {
    max_diff(ours, reference) / max_abs(reference).max(1e-6)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn with(value: f32) -> Tensor {
        Tensor::new(&[1f32, value, 2.0], &Device::Cpu).unwrap()
    }

    #[test]
    fn finite_values_compare() {
        let (a, b) = (with(3.0), with(3.5));
        assert_eq!(max_diff(&a, &b), 0.5);
        assert_eq!(max_abs(&b), 3.5);
        assert!((max_rel_diff(&a, &b) - 0.5 / 3.5).abs() < 1e-7);
    }

    #[test]
    #[should_panic(expected = "non-finite value (NaN) at flat index 1")]
    fn max_diff_fails_on_nan_past_the_first_element() {
        max_diff(&with(3.0), &with(f32::NAN));
    }

    #[test]
    #[should_panic(expected = "non-finite value (NaN)")]
    fn max_abs_fails_on_nan() {
        max_abs(&with(f32::NAN));
    }

    #[test]
    #[should_panic(expected = "non-finite value (inf)")]
    fn max_rel_diff_fails_on_infinity_in_ours() {
        max_rel_diff(&with(f32::INFINITY), &with(3.0));
    }
}
