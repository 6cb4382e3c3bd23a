//! The GEGLU of the transformer feed-forward (`hidden ⊙ gelu(gate)`, both halves of one
//! projection) on the CPU for f32: values and input gradient, one pass each.
//!
//! Why: composed from candle ops it is two narrows, an erf-GELU (a scalar libm `erf` per value)
//! and a product, and the backward of each narrow pads its gradient back to full width with
//! zeros; candle then allocates and adds a zeroed gradient per recorded node.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::buffers::zeroed;
use super::gemm::f32_slice;
use super::math::{exp_nonpositive, simd_dispatch};

/// `erf(x)` by Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7, < 5e-7 in f32 arithmetic),
/// branch-free.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let y = 1.0 - poly * exp_nonpositive(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// The standard normal CDF `Φ(x)` and density `φ(x)`.
#[inline(always)]
fn normal_cdf_pdf(x: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    (cdf, FRAC_1_SQRT_2PI * exp_nonpositive(-0.5 * x * x))
}

simd_dispatch! {
    /// One row: `out = hidden ⊙ x·Φ(x)` with `x` the gate, `h = [hidden | gate]`.
    fn geglu_row(out: &mut [f32], h: &[f32]) {
        let (hidden, gate) = h.split_at(out.len());
        for ((o, &a), &x) in out.iter_mut().zip(hidden).zip(gate) {
            *o = a * x * normal_cdf_pdf(x).0;
        }
    }
}

simd_dispatch! {
    /// One row of the input gradient `[d hidden | d gate]`, with `gelu'(x) = Φ(x) + x·φ(x)`.
    fn geglu_grad_row(dh: &mut [f32], h: &[f32], dy: &[f32]) {
        let (hidden, gate) = h.split_at(dy.len());
        let (d_hidden, d_gate) = dh.split_at_mut(dy.len());
        for ((((dh, dg), &a), &x), &dy) in d_hidden
            .iter_mut()
            .zip(d_gate.iter_mut())
            .zip(hidden)
            .zip(gate)
            .zip(dy)
        {
            let (cdf, pdf) = normal_cdf_pdf(x);
            *dh = dy * x * cdf;
            *dg = dy * a * (cdf + x * pdf);
        }
    }
}

/// Rows handed to one thread at a time.
const MIN_ROWS_PER_TASK: usize = 8;

/// The width of the projection's last dimension, which must be even.
fn width(dims: &[usize]) -> Result<usize> {
    match dims.last() {
        Some(&w) if w > 0 && w % 2 == 0 => Ok(w),
        _ => Err(candle_core::Error::Msg(format!(
            "geglu: projection {dims:?} must end in an even, non-zero width"
        ))),
    }
}

struct Forward;

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        "cpu-geglu"
    }

    fn bwd(&self, h: &Tensor, _: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(geglu_input_grad(h, grad_out)?))
    }

    fn cpu_fwd(&self, h: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = width(layout.dims())?;
        let h = f32_slice(h, layout, "geglu: input")?;
        let mut out = zeroed(h.len() / 2);
        out.par_chunks_mut(w / 2)
            .zip(h.par_chunks(w))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(out, h)| geglu_row(out, h));
        let mut dims = layout.dims().to_vec();
        *dims.last_mut().expect("width checked") = w / 2;
        Ok((CpuStorage::F32(out), dims.into()))
    }
}

struct InputGrad;

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "cpu-geglu-grad"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        h_l: &Layout,
        dy: &CpuStorage,
        dy_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let w = width(h_l.dims())?;
        if dy_l.shape().elem_count() * 2 != h_l.shape().elem_count() {
            return Err(candle_core::Error::Msg(format!(
                "geglu: gradient {:?} does not match projection {:?}",
                dy_l.dims(),
                h_l.dims()
            )));
        }
        let (h, dy) = (
            f32_slice(h, h_l, "geglu: input")?,
            f32_slice(dy, dy_l, "geglu: gradient")?,
        );
        let mut dh = zeroed(h.len());
        dh.par_chunks_mut(w)
            .zip(h.par_chunks(w).zip(dy.par_chunks(w / 2)))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(dh, (h, dy))| geglu_grad_row(dh, h, dy));
        Ok((CpuStorage::F32(dh), h_l.shape().clone()))
    }
}

/// GEGLU's input gradient for the projection `h` and the output gradient `dy`.
pub(crate) fn geglu_input_grad(h: &Tensor, dy: &Tensor) -> Result<Tensor> {
    h.contiguous()?
        .apply_op2_no_bwd(&dy.contiguous()?, &InputGrad)
}

/// `hidden ⊙ gelu(gate)` for `h = [hidden | gate]` on the last dimension, as one op with its
/// input gradient as backward.
pub(crate) fn geglu_op(h: &Tensor) -> Result<Tensor> {
    h.contiguous()?.apply_op1(Forward)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::test_support::max_diff;
    use candle_core::{Device, Var, D};

    #[test]
    fn erf_matches_libm() {
        let worst = (-6000..=6000)
            .map(|i| i as f64 / 1000.0)
            .map(|x| (erf(x as f32) as f64 - libm_erf(x)).abs())
            .fold(0.0f64, f64::max);
        assert!(worst < 1e-6, "worst absolute error {worst}");
    }

    fn libm_erf(x: f64) -> f64 {
        // candle's erf (a different, double-precision approximation) as the reference.
        Tensor::new(&[x], &Device::Cpu)
            .unwrap()
            .erf()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0]
    }

    /// Values and input gradient against GEGLU composed from candle ops and its autograd.
    #[test]
    fn matches_composed_geglu_and_its_gradient() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(9);
        let h = Var::from_tensor(&(rng.normal_tensor((2, 5, 22), &dev).unwrap() * 2.0).unwrap())
            .unwrap();
        let reference = (h.narrow(D::Minus1, 0, 11).unwrap()
            * h.narrow(D::Minus1, 11, 11).unwrap().gelu_erf().unwrap())
        .unwrap();
        let ours = geglu_op(&h).unwrap();
        assert!(max_diff(&ours, &reference) < 1e-5);
        let upstream = rng.normal_tensor((2, 5, 11), &dev).unwrap();
        let loss = |y: &Tensor| (y * &upstream).unwrap().sum_all().unwrap();
        let expected = loss(&reference).backward().unwrap();
        let got = loss(&ours).backward().unwrap();
        assert!(max_diff(got.get(&h).unwrap(), expected.get(&h).unwrap()) < 1e-5);
    }

    #[test]
    fn odd_width_is_an_error() {
        let h = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = geglu_op(&h).unwrap_err();
        assert!(err.to_string().contains("even"), "{err}");
    }
}
