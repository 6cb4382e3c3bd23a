//! The frozen linear layer: `x·Wᵀ + b`, whose backward returns the input gradient only.

use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::autograd::{any_trained, with_input_grad, InputGradient};
use super::kernels::cpu;
use super::tensor_ops::{add_bias, shared_matmul};

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
