//! The integration tests' comparison helpers fail on NaN and infinity wherever they sit, and on
//! empty tensors: a comparison that passes on values that are not numbers, or on no values,
//! proves nothing.

mod common;

use candle_core::{Device, Tensor};

fn with(value: f32) -> Tensor {
    Tensor::new(&[[1f32, 2.0], [value, 4.0]], &Device::Cpu).unwrap()
}

#[test]
fn finite_values_compare() {
    let (a, b) = (with(3.0), with(3.5));
    assert_eq!(common::max_abs_diff(&a, &b), 0.5);
    assert_eq!(common::max_abs(&b), 4.0);
    let expected = (0.25f64 / (1.0 + 4.0 + 12.25 + 16.0)).sqrt() as f32;
    assert!((common::rel_err(&a, &b) - expected).abs() < 1e-7);
}

#[test]
#[should_panic(expected = "reference [2, 2] holds a non-finite value (NaN) at flat index 2")]
fn max_abs_diff_fails_on_nan_past_the_first_element() {
    common::max_abs_diff(&with(3.0), &with(f32::NAN));
}

#[test]
#[should_panic(expected = "ours [2, 2] holds a non-finite value (NaN)")]
fn max_abs_diff_fails_on_nan_in_ours() {
    common::max_abs_diff(&with(f32::NAN), &with(3.0));
}

#[test]
#[should_panic(expected = "non-finite value (-inf)")]
fn max_abs_fails_on_infinity() {
    common::max_abs(&with(f32::NEG_INFINITY));
}

#[test]
#[should_panic(expected = "non-finite value (NaN)")]
fn rel_err_fails_on_nan() {
    common::rel_err(&with(f32::NAN), &with(3.0));
}

#[test]
#[should_panic(expected = "non-finite value (NaN)")]
fn finite_values_fail_on_nan_in_half_precision() {
    let t = with(f32::NAN).to_dtype(candle_core::DType::F16).unwrap();
    common::finite_values(&t, "f16 tensor");
}

fn empty() -> Tensor {
    Tensor::zeros((0, 3), candle_core::DType::F32, &Device::Cpu).unwrap()
}

#[test]
#[should_panic(expected = "ours [0, 3] is empty: nothing to compare")]
fn max_abs_diff_fails_on_empty_tensors() {
    common::max_abs_diff(&empty(), &empty());
}

#[test]
#[should_panic(expected = "is empty: nothing to compare")]
fn rel_err_fails_on_empty_tensors() {
    common::rel_err(&empty(), &empty());
}

#[test]
#[should_panic(expected = "tensor [0, 3] is empty")]
fn max_abs_fails_on_an_empty_tensor() {
    common::max_abs(&empty());
}
