//! Group normalisation (optionally followed by SiLU, as in every resnet block) and layer
//! normalisation on the CPU for f32: the forward pass and the input gradient, each one parallel
//! pass per group or row.
//!
//! Why: composed from candle ops, a group norm records a dozen graph nodes (reshapes, mean,
//! subtract, square, mean, sqrt, divide, scale, shift) and SiLU one more, and candle's backward
//! allocates a zeroed gradient and adds into it for each of them; candle's fused layer norm has
//! no backward at all. Here the statistics are recomputed in the backward pass instead of being
//! kept.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::buffers::zeroed;
use super::gemm::f32_slice;
use super::math::{sigmoid, simd_dispatch, sum_map, sum_zip};

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

simd_dispatch! {
    /// Mean and reciprocal standard deviation of one group (partial sums in f64 so that large
    /// groups, as in the VAE, keep their precision).
    fn statistics(x: &[f32], eps: f64) -> (f32, f32) {
        const BLOCK: usize = 4096;
        let n = x.len() as f64;
        let sum: f64 = x.chunks(BLOCK).map(|c| sum_map(c, |v| v) as f64).sum();
        let mean = (sum / n) as f32;
        let squares: f64 = x
            .chunks(BLOCK)
            .map(|c| sum_map(c, |v| (v - mean) * (v - mean)) as f64)
            .sum();
        (mean, (1.0 / (squares / n + eps).sqrt()) as f32)
    }
}

simd_dispatch! {
    /// `y = x·a + c`, then SiLU when `silu`.
    fn affine_row(y: &mut [f32], x: &[f32], affine: (f32, f32), silu: bool) {
        let (a, c) = affine;
        for (y, &x) in y.iter_mut().zip(x) {
            let z = x * a + c;
            *y = if silu { z * sigmoid(z) } else { z };
        }
    }
}

simd_dispatch! {
    /// `g = dL/dx̂` for one channel's row (through SiLU when `silu`, then the scale `w`);
    /// returns `(Σg, Σg·x̂)`.
    fn grad_row(
        g: &mut [f32],
        x: &[f32],
        dy: &[f32],
        stats: (f32, f32),
        affine: (f32, f32),
        silu: bool,
    ) -> (f32, f32) {
        let ((mean, rstd), (w, b)) = (stats, affine);
        for ((g, &x), &dy) in g.iter_mut().zip(x).zip(dy) {
            let x_hat = (x - mean) * rstd;
            let dz = if silu {
                let z = x_hat * w + b;
                let s = sigmoid(z);
                dy * s * (1.0 + z * (1.0 - s))
            } else {
                dy
            };
            *g = dz * w;
        }
        (sum_map(g, |v| v), sum_zip(g, x, |g, x| g * (x - mean) * rstd))
    }
}

simd_dispatch! {
    /// `dx = r · (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))`, in place of `g`.
    fn finish_grad(g: &mut [f32], x: &[f32], stats: (f32, f32), means: (f32, f32)) {
        let ((mean, rstd), (mean_g, mean_gx)) = (stats, means);
        for (g, &x) in g.iter_mut().zip(x) {
            let x_hat = (x - mean) * rstd;
            *g = rstd * (*g - mean_g - x_hat * mean_gx);
        }
    }
}

impl GroupNormParams {
    fn check(&self, dims: &[usize]) -> Result<(usize, usize)> {
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

    fn forward_groups(&self, x: &[f32], cpg: usize, plane: usize) -> Vec<f32> {
        let mut y = zeroed(x.len());
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
                    affine_row(y, x, (w * rstd, b - mean * w * rstd), self.silu);
                }
            });
        y
    }

    /// With `x̂ = (x − μ)·r` and `g = dL/dx̂` (through SiLU when fused, then the scale `w`):
    /// `dx = r · (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))` over the group.
    fn input_grad_groups(&self, x: &[f32], dy: &[f32], cpg: usize, plane: usize) -> Vec<f32> {
        let mut dx = zeroed(x.len());
        let n = (cpg * plane) as f64;
        dx.par_chunks_mut(cpg * plane)
            .zip(x.par_chunks(cpg * plane).zip(dy.par_chunks(cpg * plane)))
            .enumerate()
            .for_each(|(group, (dx, (x, dy)))| {
                let stats = statistics(x, self.eps);
                let (mut sum_g, mut sum_gx) = (0.0f64, 0.0f64);
                for (((dx, x), dy), affine) in dx
                    .chunks_exact_mut(plane)
                    .zip(x.chunks_exact(plane))
                    .zip(dy.chunks_exact(plane))
                    .zip(self.channels(group, cpg))
                {
                    let (g, gx) = grad_row(dx, x, dy, stats, affine, self.silu);
                    sum_g += g as f64;
                    sum_gx += gx as f64;
                }
                let means = ((sum_g / n) as f32, (sum_gx / n) as f32);
                finish_grad(dx, x, stats, means);
            });
        dx
    }
}

/// A normalisation with frozen parameters: its values and its input gradient on raw slices.
pub(crate) trait Normalization: Sync {
    const NAME: &'static str;
    /// `x` of shape `dims` (contiguous) → the normalised values.
    fn forward(&self, x: &[f32], dims: &[usize]) -> Result<Vec<f32>>;
    /// `x` and the output gradient `dy`, both of shape `dims` → the input gradient.
    fn input_grad(&self, x: &[f32], dy: &[f32], dims: &[usize]) -> Result<Vec<f32>>;
}

impl Normalization for GroupNormParams {
    const NAME: &'static str = "group norm";

    fn forward(&self, x: &[f32], dims: &[usize]) -> Result<Vec<f32>> {
        let (cpg, plane) = self.check(dims)?;
        Ok(self.forward_groups(x, cpg, plane))
    }

    fn input_grad(&self, x: &[f32], dy: &[f32], dims: &[usize]) -> Result<Vec<f32>> {
        let (cpg, plane) = self.check(dims)?;
        Ok(self.input_grad_groups(x, dy, cpg, plane))
    }
}

/// The frozen parameters of a layer norm over the last dimension.
#[derive(Debug, Clone)]
pub(crate) struct LayerNormParams {
    pub eps: f64,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

simd_dispatch! {
    fn layer_norm_row(y: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f64) {
        let (mean, rstd) = statistics(x, eps);
        for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(weight).zip(bias) {
            *y = (x - mean) * rstd * w + b;
        }
    }
}

simd_dispatch! {
    fn layer_norm_grad_row(dx: &mut [f32], x: &[f32], dy: &[f32], weight: &[f32], eps: f64) {
        let stats = statistics(x, eps);
        let (mean, rstd) = stats;
        for ((g, &dy), &w) in dx.iter_mut().zip(dy).zip(weight) {
            *g = dy * w;
        }
        let n = x.len() as f32;
        let mean_g = sum_map(dx, |v| v) / n;
        let mean_gx = sum_zip(dx, x, |g, x| g * (x - mean) * rstd) / n;
        finish_grad(dx, x, stats, (mean_g, mean_gx));
    }
}

/// Rows handed to one thread at a time: a row is only a few hundred values.
const MIN_ROWS_PER_TASK: usize = 16;

impl LayerNormParams {
    fn check(&self, dims: &[usize]) -> Result<usize> {
        match dims.last() {
            Some(&d) if d == self.weight.len() && d == self.bias.len() && d > 0 => Ok(d),
            _ => Err(candle_core::Error::Msg(format!(
                "layer norm: input {dims:?} does not end in {} features",
                self.weight.len()
            ))),
        }
    }
}

impl Normalization for LayerNormParams {
    const NAME: &'static str = "layer norm";

    fn forward(&self, x: &[f32], dims: &[usize]) -> Result<Vec<f32>> {
        let d = self.check(dims)?;
        let mut y = zeroed(x.len());
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(y, x)| layer_norm_row(y, x, &self.weight, &self.bias, self.eps));
        Ok(y)
    }

    fn input_grad(&self, x: &[f32], dy: &[f32], dims: &[usize]) -> Result<Vec<f32>> {
        let d = self.check(dims)?;
        let mut dx = zeroed(x.len());
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
            .with_min_len(MIN_ROWS_PER_TASK)
            .for_each(|(dx, (x, dy))| layer_norm_grad_row(dx, x, dy, &self.weight, self.eps));
        Ok(dx)
    }
}

/// A normalisation as one op whose backward is its input gradient.
struct Forward<N>(N);

impl<N: Normalization + Clone + Send + 'static> CustomOp1 for Forward<N> {
    fn name(&self) -> &'static str {
        "cpu-normalization"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let what = format!("{}: input", N::NAME);
        let y = self
            .0
            .forward(f32_slice(x, layout, &what)?, layout.dims())?;
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad_out: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(input_grad(x, grad_out, &self.0)?))
    }
}

struct InputGrad<'a, N>(&'a N);

impl<N: Normalization> CustomOp2 for InputGrad<'_, N> {
    fn name(&self) -> &'static str {
        "cpu-normalization-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        dy: &CpuStorage,
        dy_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if x_l.shape() != dy_l.shape() {
            return Err(candle_core::Error::Msg(format!(
                "{}: gradient {:?} does not match input {:?}",
                N::NAME,
                dy_l.dims(),
                x_l.dims()
            )));
        }
        let what = format!("{}: input", N::NAME);
        let (x, dy) = (f32_slice(x, x_l, &what)?, f32_slice(dy, dy_l, &what)?);
        let dx = self.0.input_grad(x, dy, x_l.dims())?;
        Ok((CpuStorage::F32(dx), x_l.shape().clone()))
    }
}

/// The normalisation's input gradient for the input `x` and the output gradient `dy`.
pub(crate) fn input_grad<N: Normalization>(x: &Tensor, dy: &Tensor, params: &N) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&dy.contiguous()?, &InputGrad(params))
}

/// The normalised `x` as one op with its input gradient as backward (the parameters are frozen).
pub(crate) fn forward<N: Normalization + Clone + Send + 'static>(
    x: &Tensor,
    params: &N,
) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Forward(params.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::test_support::{max_diff, max_rel_diff};
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
            assert!(max_diff(&ours, &reference) < 1e-5, "forward {shape:?}");

            let upstream = rng.normal_tensor(shape, &dev).unwrap();
            let loss = |y: &Tensor| (y * &upstream).unwrap().sum_all().unwrap();
            let expected = loss(&reference).backward().unwrap();
            let expected = expected.get(&x).unwrap();
            let got = loss(&ours).backward().unwrap();
            let got = got.get(&x).unwrap();
            let rel = max_rel_diff(got, expected);
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
