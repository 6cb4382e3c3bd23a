//! GEGLU (`hidden ⊙ gelu(gate)`, exact-erf GELU) as one node with its input gradient.

use candle_core::{Tensor, D};

use super::autograd::{with_input_grad, InputGradient};
use super::kernels::cpu;
#[cfg(feature = "cuda")]
use super::kernels::cuda;
use super::tensor_ops::compute_dtype;

/// `(hidden, gate)`: the two halves of a GEGLU input `[…, 2·n]`.
pub(crate) fn geglu_halves(h: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let inner = h.dim(D::Minus1)? / 2;
    Ok((
        h.narrow(D::Minus1, 0, inner)?,
        h.narrow(D::Minus1, inner, inner)?,
    ))
}

/// GEGLU's input gradient: `[dy ⊙ gelu(gate) | dy ⊙ hidden ⊙ gelu'(gate)]` with
/// `gelu'(x) = Φ(x) + x·φ(x)`, in at least f32.
struct GegluInputGrad;

impl InputGradient for GegluInputGrad {
    const NAME: &'static str = "geglu";
    fn input_grad(&self, h: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        geglu_input_grad(h, grad_out)
    }
}

/// GEGLU's input gradient for the projection `h` and the output gradient `dy`, by whichever
/// kernel `geglu` ran on.
pub(crate) fn geglu_input_grad(h: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
    if cpu::gemm::cpu_f32(&[h, grad_out]) {
        return cpu::activation::geglu_input_grad(h, grad_out);
    }
    #[cfg(feature = "cuda")]
    if cuda::applies(&[h, grad_out]) {
        return cuda::geglu_backward(h, grad_out);
    }
    let (dtype, cd) = (h.dtype(), compute_dtype(h.dtype()));
    let (hidden, gate) = geglu_halves(&h.to_dtype(cd)?)?;
    let dy = grad_out.to_dtype(cd)?;
    let cdf = ((&gate * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
    let pdf = ((gate.sqr()? * -0.5)?.exp()?
        * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
    let slope = (cdf? + (&gate * pdf)?)?;
    let d_hidden = (&dy * gate.gelu_erf()?)?;
    let d_gate = ((dy * hidden)? * slope)?;
    Tensor::cat(&[d_hidden, d_gate], D::Minus1)?.to_dtype(dtype)
}

/// GEGLU, `hidden ⊙ gelu(gate)` for `h = [hidden | gate]` split on the last dimension, with the
/// exact (erf) GELU: one node with its input gradient (on the CPU in f32
/// `kernels::cpu::activation`'s op).
pub fn geglu(h: &Tensor) -> candle_core::Result<Tensor> {
    if cpu::gemm::cpu_f32(&[h]) {
        return cpu::activation::geglu_op(h);
    }
    let forward = |h: &Tensor| {
        #[cfg(feature = "cuda")]
        if cuda::applies(&[h]) {
            return cuda::geglu_forward(h);
        }
        let (hidden, gate) = geglu_halves(h)?;
        hidden * gate.gelu_erf()?
    };
    with_input_grad(h, false, forward, || GegluInputGrad)
}
