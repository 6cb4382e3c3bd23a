//! The frozen linear layer: `x·Wᵀ + b`, whose backward returns the input gradient only.

use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::autograd::{any_trained, with_input_grad, InputGradient};
use super::kernels::cpu;
use super::tensor_ops::{add_bias, shared_matmul, sum_of};

/// The frozen linear layer's input gradient, `dy·W`.
pub(crate) struct LinearInputGrad {
    pub(crate) weight: Tensor,
}

impl InputGradient for LinearInputGrad {
    const NAME: &'static str = "frozen-linear";
    fn input_grad(&self, _: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        shared_matmul(grad_out, &self.weight)
    }
}

/// `x·Wᵀ (+ b)` for a frozen `W` `[out, in]`: no weight gradient is ever computed.
pub fn frozen_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let trained = any_trained([Some(weight), bias]);
    if !trained && cpu::gemm::linear_applies(x, weight) {
        return cpu::gemm::linear_op(x, weight, bias);
    }
    let forward = |x: &Tensor| add_bias(shared_matmul(x, &weight.t()?)?, bias);
    with_input_grad(x, trained, forward, || LinearInputGrad {
        weight: weight.clone(),
    })
}

/// `x·Wᵀ + b + Σ tᵢ·Uᵢᵀ` for a frozen `W` `[out, in]`, each `tᵢ` `[rows, r]` (rows: the product
/// of `x`'s leading axes) and `Uᵢ` `[out, r]`: a layer's output with its LoRAs' up-projections of
/// their scaled rank-r projections. On the CPU in f32, where no gradient can flow to any operand,
/// one kernel sums the terms into the layer's output buffer; otherwise candle's ops compose the
/// same sum (recorded where an operand is tracked), the terms summed in their own dtype and
/// added to the layer's output once.
pub(crate) fn frozen_linear_plus_low_rank(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    terms: &[(&Tensor, &Tensor)],
) -> candle_core::Result<Tensor> {
    if kernel_applies(x, weight, bias, terms) {
        let side = cpu::gemm::Side::Inputs;
        return cpu::gemm::linear_with_low_rank(side, x, weight, bias, terms);
    }
    let base = frozen_linear(x, weight, bias)?;
    let products = terms.iter().map(|&(t, up)| t.matmul(&up.t()?));
    add_sum_of(base, products)
}

/// `dy·W + Σ gᵢ·Dᵢ` for a frozen `W` `[out, in]`, each `gᵢ` `[rows, r]` and `Dᵢ` `[r, in]`: the
/// input gradient of [`frozen_linear_plus_low_rank`]'s layer, `gᵢ` the output gradient through
/// each scaled up-projection; computed the same two ways.
pub(crate) fn frozen_linear_input_grad_plus_low_rank(
    dy: &Tensor,
    weight: &Tensor,
    terms: &[(&Tensor, &Tensor)],
) -> candle_core::Result<Tensor> {
    if kernel_applies(dy, weight, None, terms) {
        let side = cpu::gemm::Side::Outputs;
        return cpu::gemm::linear_with_low_rank(side, dy, weight, None, terms);
    }
    let base = shared_matmul(&dy.to_dtype(weight.dtype())?, weight)?;
    let products = terms.iter().map(|&(g, down)| g.matmul(down));
    add_sum_of(base, products)
}

/// Whether the CPU kernel applies: CPU f32 operands, none of which a gradient can flow to. The
/// kernel records nothing, so where a gradient can flow (several adapters trained at once, or
/// one beside a LyCORIS module) the sum is composed from candle's ops.
fn kernel_applies(
    a: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    terms: &[(&Tensor, &Tensor)],
) -> bool {
    let term_tensors = terms.iter().flat_map(|&(t, m)| [t, m]);
    let tensors = [Some(a), Some(weight), bias].into_iter().flatten();
    !tensors.chain(term_tensors).any(Tensor::track_op)
        && cpu::gemm::linear_with_low_rank_applies(a, weight, bias, terms)
}

/// `base + Σ products` (each `[rows, n]`, summed in their own dtype, then cast to `base`'s and
/// shaped like it).
fn add_sum_of(
    base: Tensor,
    products: impl Iterator<Item = candle_core::Result<Tensor>>,
) -> candle_core::Result<Tensor> {
    match sum_of(products)? {
        Some(s) => {
            let s = s.to_dtype(base.dtype())?.reshape(base.shape())?;
            base + s
        }
        None => Ok(base),
    }
}

/// A frozen dense layer `y = x·Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct LinearLayer {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl LinearLayer {
    pub fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }
}

impl Module for LinearLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        frozen_linear(x, &self.weight, self.bias.as_ref())
    }
}
