//! Group normalisation (optionally followed by SiLU, as in every resnet block) on the CPU for
//! f32: the forward pass and the input gradient, each one parallel pass per group.
//!
//! Why: composed from candle ops, a group norm records a dozen graph nodes (reshapes, mean,
//! subtract, square, mean, sqrt, divide, scale, shift) and SiLU one more, and candle's backward
//! allocates a zeroed gradient and adds into it for each of them. Here the statistics are
//! recomputed in the backward pass instead of being kept.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu_attention::exp_nonpositive;

/// The frozen parameters of one group norm.
#[derive(Debug, Clone)]
pub(crate) struct GroupNormParams {
    pub groups: usize,
    pub eps: f64,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    /// SiLU applied to the normalised output.
    pub silu: bool,
}

/// `1 / (1 + e⁻ᶻ)` without overflow for any `z`.
#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    let e = exp_nonpositive(-z.abs());
    let s = 1.0 / (1.0 + e);
    if z >= 0.0 {
        s
    } else {
        e * s
    }
}

/// Mean and reciprocal standard deviation of one group.
fn statistics(x: &[f32], eps: f64) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean as f32, (1.0 / (var + eps).sqrt()) as f32)
}

impl GroupNormParams {
    fn check(&self, layout: &Layout) -> Result<(usize, usize)> {
        let dims = layout.dims();
        let fits = dims.len() >= 2
            && dims[1] == self.weight.len()
            && dims[1] == self.bias.len()
            && self.groups > 0
            && dims[1].is_multiple_of(self.groups);
        if !fits {
            return Err(candle_core::Error::Msg(format!(
                "group norm: input {dims:?} does not fit {} channels in {} groups",
                self.weight.len(),
                self.groups
            )));
        }
        let channels_per_group = dims[1] / self.groups;
        let plane = dims[2..].iter().product::<usize>();
        Ok((channels_per_group, plane))
    }

    /// The channel of each element of a group, with that channel's parameters.
    fn channels(&self, group: usize, cpg: usize) -> impl Iterator<Item = (f32, f32)> + '_ {
        let first = (group % self.groups) * cpg;
        (first..first + cpg).map(|c| (self.weight[c], self.bias[c]))
    }

    fn forward(&self, x: &[f32], cpg: usize, plane: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(cpg * plane)
            .zip(x.par_chunks(cpg * plane))
            .enumerate()
            .for_each(|(group, (y, x))| {
                let (mean, rstd) = statistics(x, self.eps);
                let channels = self.channels(group, cpg);
                for ((y, x), (w, b)) in y
                    .chunks_exact_mut(plane)
                    .zip(x.chunks_exact(plane))
                    .zip(channels)
                {
                    let (a, c) = (w * rstd, b - mean * w * rstd);
                    for (y, &x) in y.iter_mut().zip(x) {
                        let z = x * a + c;
                        *y = if self.silu { z * sigmoid(z) } else { z };
                    }
                }
            });
        y
    }

    /// With `x̂ = (x − μ)·r` and `g = dL/dx̂` (through SiLU when fused, then the scale `w`):
    /// `dx = r · (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))` over the group.
    fn input_grad(&self, x: &[f32], dy: &[f32], cpg: usize, plane: usize) -> Vec<f32> {
        let mut dx = vec![0.0f32; x.len()];
        let n = (cpg * plane) as f32;
        dx.par_chunks_mut(cpg * plane)
            .zip(x.par_chunks(cpg * plane).zip(dy.par_chunks(cpg * plane)))
            .enumerate()
            .for_each(|(group, (dx, (x, dy)))| {
                let (mean, rstd) = statistics(x, self.eps);
                let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
                for (((dx, x), dy), (w, b)) in dx
                    .chunks_exact_mut(plane)
                    .zip(x.chunks_exact(plane))
                    .zip(dy.chunks_exact(plane))
                    .zip(self.channels(group, cpg))
                {
                    let (mut row_g, mut row_gx) = (0.0f32, 0.0f32);
                    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                        let x_hat = (x - mean) * rstd;
                        let dz = if self.silu {
                            let z = x_hat * w + b;
                            let s = sigmoid(z);
                            dy * s * (1.0 + z * (1.0 - s))
                        } else {
                            dy
                        };
                        let g = dz * w;
                        *dx = g;
                        row_g += g;
                        row_gx += g * x_hat;
                    }
                    sum_g += row_g as f64;
                    sum_gx += row_gx as f64;
                }
                let (mean_g, mean_gx) = ((sum_g / n as f64) as f32, (sum_gx / n as f64) as f32);
                for (dx, &x) in dx.iter_mut().zip(x) {
                    let x_hat = (x - mean) * rstd;
                    *dx = rstd * (*dx - mean_g - x_hat * mean_gx);
                }
            });
        dx
    }
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        return Err(candle_core::Error::Msg("group norm: input must be f32".into()));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("group norm: input must be contiguous".into()))?;
    Ok(&values[start..end])
}

struct Forward<'a>(&'a GroupNormParams);

impl CustomOp1 for Forward<'_> {
    fn name(&self) -> &'static str {
        "cpu-group-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (cpg, plane) = self.0.check(layout)?;
        let y = self.0.forward(f32_slice(x, layout)?, cpg, plane);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }
}

struct InputGrad<'a>(&'a GroupNormParams);

impl CustomOp2 for InputGrad<'_> {
    fn name(&self) -> &'static str {
        "cpu-group-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        dy: &CpuStorage,
        dy_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (cpg, plane) = self.0.check(x_l)?;
        if x_l.shape() != dy_l.shape() {
            return Err(candle_core::Error::Msg(format!(
                "group norm: gradient {:?} does not match input {:?}",
                dy_l.dims(),
                x_l.dims()
            )));
        }
        let (x, dy) = (f32_slice(x, x_l)?, f32_slice(dy, dy_l)?);
        let dx = self.0.input_grad(x, dy, cpg, plane);
        Ok((CpuStorage::F32(dx), x_l.shape().clone()))
    }
}

/// Whether the CPU group norm applies to `x`.
pub(crate) fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// The normalised (and, with `params.silu`, activated) `x`, recording no gradient.
pub(crate) fn forward(x: &Tensor, params: &GroupNormParams) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Forward(params))
}

/// The input gradient of [`forward`] given the output gradient, recording no gradient.
pub(crate) fn input_grad(x: &Tensor, grad_out: &Tensor, params: &GroupNormParams) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&grad_out.contiguous()?, &InputGrad(params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use candle_core::{Device, Var, D};

    /// Forward and input gradient against group norm (+ SiLU) composed from candle ops and
    /// differentiated by candle's autograd.
    #[test]
    fn matches_composed_group_norm_and_its_gradient() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(6);
        for (shape, groups, silu) in [((2, 6, 5, 3), 3, true), ((1, 8, 4, 4), 2, false)] {
            let (b, c, h, w) = shape;
            let x = Var::from_tensor(&(rng.normal_tensor(shape, &dev).unwrap() * 3.0).unwrap())
                .unwrap();
            let weight = rng.normal_tensor(c, &dev).unwrap();
            let bias = rng.normal_tensor(c, &dev).unwrap();
            let params = GroupNormParams {
                groups,
                eps: 1e-5,
                weight: weight.to_vec1().unwrap(),
                bias: bias.to_vec1().unwrap(),
                silu,
            };
            let xs = x.reshape((b, groups, c / groups * h * w)).unwrap();
            let centered = xs
                .broadcast_sub(&xs.mean_keepdim(D::Minus1).unwrap())
                .unwrap();
            let var = centered.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let normed = centered
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap()
                .reshape(shape)
                .unwrap()
                .broadcast_mul(&weight.reshape((1, c, 1, 1)).unwrap())
                .unwrap()
                .broadcast_add(&bias.reshape((1, c, 1, 1)).unwrap())
                .unwrap();
            let reference = if silu { normed.silu().unwrap() } else { normed };
            let ours = forward(&x, &params).unwrap();
            let diff = (&ours - &reference).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "forward {shape:?}");

            let upstream = rng.normal_tensor(shape, &dev).unwrap();
            let expected = (reference * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let expected = expected.get(&x).unwrap();
            let got = input_grad(&x, &upstream, &params).unwrap();
            let diff = (&got - expected).unwrap().abs().unwrap().max_all().unwrap();
            let scale = expected.abs().unwrap().max_all().unwrap();
            let rel = diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
            assert!(rel < 1e-5, "input gradient {shape:?}: {rel}");
        }
    }

    #[test]
    fn channel_mismatch_is_an_error() {
        let x = Tensor::zeros((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let params = GroupNormParams {
            groups: 2,
            eps: 1e-5,
            weight: vec![1.0; 6],
            bias: vec![0.0; 6],
            silu: false,
        };
        let err = forward(&x, &params).unwrap_err();
        assert!(err.to_string().contains("does not fit 6 channels"), "{err}");
    }
}
