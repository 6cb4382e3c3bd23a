//! Group and layer normalisation with a backward pass: candle-nn's fused `layer_norm` records no
//! gradient (silently), so its values are used only with an input gradient of our own attached.

use anyhow::Result;
use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use super::autograd::{any_trained, with_input_grad, InputGradient};
use super::kernels::cpu;
#[cfg(feature = "cuda")]
use super::kernels::cuda;
use super::tensor_ops::{broadcast_add, broadcast_mul, broadcast_sub, compute_dtype, contiguous};

/// `(x̂, r)`: `x` standardised over its last dimension, `x̂ = (x − μ)·r` with `r = 1/√(var + eps)`,
/// from ordinary ops (recorded where `x` is tracked).
pub(crate) fn standardized(x: &Tensor, eps: f64) -> candle_core::Result<(Tensor, Tensor)> {
    let centered = broadcast_sub(x, &x.mean_keepdim(D::Minus1)?)?;
    let rstd = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    Ok((broadcast_mul(&centered, &rstd)?, rstd))
}

/// The input gradient of standardisation over the last dimension, given `g = ∂L/∂x̂`:
/// `dx = r · (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))`.
pub(crate) fn standardized_input_grad(
    x_hat: &Tensor,
    rstd: &Tensor,
    g: &Tensor,
) -> candle_core::Result<Tensor> {
    let g_mean = g.mean_keepdim(D::Minus1)?;
    let gx_mean = (g * x_hat)?.mean_keepdim(D::Minus1)?;
    let centered = broadcast_sub(g, &g_mean)?.sub(&broadcast_mul(x_hat, &gx_mean)?)?;
    broadcast_mul(&centered, rstd)
}

/// Layer norm with a frozen affine `w`: with `g = dy ⊙ w`, the standardisation's input gradient.
/// μ and r are recomputed here rather than kept from the forward pass.
struct LayerNormInputGrad {
    weight: Tensor,
    eps: f64,
}

impl InputGradient for LayerNormInputGrad {
    const NAME: &'static str = "layer-norm";
    fn input_grad(&self, x: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if cuda::applies(&[x, grad_out]) {
            return cuda::layer_norm_backward(x, grad_out, &self.weight, self.eps);
        }
        let (dtype, cd) = (x.dtype(), compute_dtype(x.dtype()));
        let (x_hat, rstd) = standardized(&x.to_dtype(cd)?, self.eps)?;
        let g = broadcast_mul(&grad_out.to_dtype(cd)?, &self.weight.to_dtype(cd)?)?;
        standardized_input_grad(&x_hat, &rstd, &g)?.to_dtype(dtype)
    }
}

/// Group norm with a frozen per-channel affine, optionally followed by SiLU: with
/// `z = x̂ ⊙ w + b`, `dz = dy ⊙ σ(z)(1 + z(1 − σ(z)))` after a SiLU (else `dy`), and `g = dz ⊙ w`,
/// the standardisation's input gradient per group. Statistics are recomputed, not kept.
struct GroupNormInputGrad {
    norm: GroupNormLayer,
    silu: bool,
}

impl InputGradient for GroupNormInputGrad {
    const NAME: &'static str = "group-norm";
    fn input_grad(&self, x: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if cuda::applies(&[x, grad_out]) {
            let norm = &self.norm;
            let (groups, eps) = (norm.groups, norm.eps);
            return cuda::group_norm_backward(x, grad_out, &norm.packed, groups, eps, self.silu);
        }
        let (dtype, cd) = (x.dtype(), compute_dtype(x.dtype()));
        let shape = x.dims4()?;
        let (x_hat, rstd) = standardized(&self.norm.grouped(&x.to_dtype(cd)?)?, self.norm.eps)?;
        let weight = self.norm.weight.to_dtype(cd)?;
        let mut dz = grad_out.to_dtype(cd)?;
        if self.silu {
            let z = broadcast_add(
                &broadcast_mul(&x_hat.reshape(shape)?, &weight)?,
                &self.norm.bias.to_dtype(cd)?,
            )?;
            let sigmoid = (z.neg()?.exp()? + 1.0)?.recip()?;
            let slope = (&sigmoid * ((&z * (1.0 - &sigmoid)?)? + 1.0)?)?;
            dz = (dz * slope)?;
        }
        let g = self.norm.grouped(&broadcast_mul(&dz, &weight)?)?;
        standardized_input_grad(&x_hat, &rstd, &g)?
            .reshape(shape)?
            .to_dtype(dtype)
    }
}

/// Group normalisation over `[B, C, H, W]` with per-channel affine parameters.
#[derive(Debug, Clone)]
pub struct GroupNormLayer {
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
    /// `[weight; bias]` `[2, C]`, the form our CUDA kernels read the frozen affine in.
    #[cfg(feature = "cuda")]
    pub(super) packed: Tensor,
    pub(super) groups: usize,
    pub(super) eps: f64,
}

impl GroupNormLayer {
    pub fn load(vb: &VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        anyhow::ensure!(
            channels.is_multiple_of(groups),
            "{}: {channels} channels cannot be split into {groups} groups",
            vb.prefix()
        );
        Ok(Self::new(
            &vb.get(channels, "weight")?,
            &vb.get(channels, "bias")?,
            groups,
            eps,
        )?)
    }

    /// From the per-channel `weight` and `bias` `[C]`.
    pub(super) fn new(
        weight: &Tensor,
        bias: &Tensor,
        groups: usize,
        eps: f64,
    ) -> candle_core::Result<Self> {
        let channels = weight.dim(0)?;
        Ok(Self {
            #[cfg(feature = "cuda")]
            packed: Tensor::stack(&[weight, bias], 0)?,
            weight: weight.reshape((1, channels, 1, 1))?,
            bias: bias.reshape((1, channels, 1, 1))?,
            groups,
            eps,
        })
    }
}

impl GroupNormLayer {
    /// `silu(norm(x))`, the pre-activation of every resnet convolution: one op on the CPU.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.normalize(x, true)
    }

    /// The parameters `kernels::cpu::norm`'s kernels read.
    fn cpu_params(&self, silu: bool) -> candle_core::Result<cpu::norm::GroupNormParams> {
        let values = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
        Ok(cpu::norm::GroupNormParams {
            groups: self.groups,
            eps: self.eps,
            weight: values(&self.weight)?,
            bias: values(&self.bias)?,
            silu,
        })
    }

    /// The input gradient for the input `x` and the output gradient `dy` (frozen affine), by
    /// whichever kernel `normalize` ran on.
    pub(super) fn input_grad(
        &self,
        x: &Tensor,
        dy: &Tensor,
        silu: bool,
    ) -> candle_core::Result<Tensor> {
        if cpu::gemm::cpu_f32(&[x, dy]) {
            return cpu::norm::input_grad(x, dy, &self.cpu_params(silu)?);
        }
        GroupNormInputGrad {
            norm: self.clone(),
            silu,
        }
        .input_grad(x, dy)
    }

    pub(super) fn trained(&self) -> bool {
        any_trained([Some(&self.weight), Some(&self.bias)])
    }

    pub(super) fn normalize(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let trained = self.trained();
        if cpu::gemm::cpu_f32(&[x]) && !trained {
            return cpu::norm::forward(x, &self.cpu_params(silu)?);
        }
        // Trained parameters (a full fine-tune) need their gradients: recorded ops. Otherwise one
        // node with the input gradient, which keeps none of the intermediates, and its values
        // from candle's layer-norm kernel (statistics in f32: not for f64).
        let fused = !trained && x.dtype() != DType::F64;
        with_input_grad(
            x,
            trained,
            |x| match fused {
                true => self.fused(x, silu),
                false => self.composed(x, silu),
            },
            || GroupNormInputGrad {
                norm: self.clone(),
                silu,
            },
        )
    }

    /// `[B, C, H, W] → [B, G, C/G·H·W]`.
    pub(super) fn grouped(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        x.reshape((b, self.groups, (c / self.groups) * h * w))
    }

    /// The normalisation as one pass of candle's layer-norm kernel over each group (mean and
    /// variance accumulated in f32 whatever the dtype, no f32 copy of `x`), then the affine. On a
    /// GPU this replaces about ten passes of candle's slower elementwise kernels over an f32 copy.
    pub(super) fn fused(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let grouped = self.grouped(&x.contiguous()?)?;
        let len = grouped.dim(2)?;
        let (ones, zeros) = (
            Tensor::ones(len, x.dtype(), x.device())?,
            Tensor::zeros(len, x.dtype(), x.device())?,
        );
        let x_hat = candle_nn::ops::layer_norm(&grouped, &ones, &zeros, self.eps as f32)?
            .reshape(x.dims4()?)?;
        #[cfg(feature = "cuda")]
        if cuda::applies(&[&x_hat]) {
            let axis = cuda::ChannelAxis::Rows {
                channels: x.dim(1)?,
            };
            return cuda::channel_affine(&x_hat, &self.packed, axis, Some(0), Some(1), silu);
        }
        self.affine(&x_hat, silu)
    }

    /// The normalisation from candle's ops (recorded where `x` or a parameter is tracked).
    pub(super) fn composed(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let (x_hat, _) =
            standardized(&self.grouped(&x.to_dtype(compute_dtype(dtype))?)?, self.eps)?;
        self.affine(&x_hat.reshape(x.dims4()?)?.to_dtype(dtype)?, silu)
    }

    /// `x̂ ⊙ w + b` for the standardised `x̂` `[B, C, H, W]`, then the SiLU if asked for.
    fn affine(&self, x_hat: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let y = broadcast_add(&broadcast_mul(x_hat, &self.weight)?, &self.bias)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }
}

impl Module for GroupNormLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.normalize(x, false)
    }
}

/// Layer normalisation over the last dimension, composed so it has a backward pass.
#[derive(Debug, Clone)]
pub struct LayerNormLayer {
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
    pub(super) eps: f64,
}

impl LayerNormLayer {
    pub fn load(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    pub(super) fn trained(&self) -> bool {
        any_trained([Some(&self.weight), Some(&self.bias)])
    }

    /// The parameters `kernels::cpu::norm`'s kernels read (f32).
    fn cpu_params(&self) -> candle_core::Result<cpu::norm::LayerNormParams> {
        Ok(cpu::norm::LayerNormParams {
            eps: self.eps,
            weight: self.weight.to_dtype(DType::F32)?.to_vec1()?,
            bias: self.bias.to_dtype(DType::F32)?.to_vec1()?,
        })
    }

    /// The input gradient for the input `x` and the output gradient `dy` (frozen affine), by
    /// whichever kernel `forward` ran on.
    pub(super) fn input_grad(&self, x: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
        if cpu::gemm::cpu_f32(&[x, dy]) {
            return cpu::norm::input_grad(x, dy, &self.cpu_params()?);
        }
        LayerNormInputGrad {
            weight: self.weight.clone(),
            eps: self.eps,
        }
        .input_grad(x, dy)
    }
}

impl Module for LayerNormLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // One pass for the values instead of nine recorded ops: `kernels::cpu::norm` on the CPU in f32
        // (values and input gradient), elsewhere candle's fused kernel on the input's own dtype
        // (it accumulates in f32, so no f32 copy of the activations is made), which has no
        // backward of its own, so the input gradient is attached by `LayerNormInputGrad`.
        let dtype = x.dtype();
        if self.trained() {
            // Trained affine parameters need their gradients: composed from recorded ops.
            let cd = compute_dtype(dtype);
            let (w, b) = (self.weight.to_dtype(cd)?, self.bias.to_dtype(cd)?);
            let x_hat = standardized(&x.to_dtype(cd)?, self.eps)?.0;
            return broadcast_add(&broadcast_mul(&x_hat, &w)?, &b)?.to_dtype(dtype);
        }
        if cpu::gemm::cpu_f32(&[x]) {
            return cpu::norm::forward(x, &self.cpu_params()?);
        }
        let (w, b) = (self.weight.to_dtype(dtype)?, self.bias.to_dtype(dtype)?);
        // candle's kernel has no f64 form: f64 (tests) is standardised by ordinary ops.
        let forward = |x: &Tensor| match dtype {
            DType::F64 => broadcast_add(&broadcast_mul(&standardized(x, self.eps)?.0, &w)?, &b),
            _ => candle_nn::ops::layer_norm(&contiguous(x)?, &w, &b, self.eps as f32),
        };
        with_input_grad(x, false, forward, || LayerNormInputGrad {
            weight: self.weight.clone(),
            eps: self.eps,
        })
    }
}
