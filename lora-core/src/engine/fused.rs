//! Frozen layers fused with their neighbours into one graph node. candle keeps every node's
//! output until the backward pass ends; a frozen layer's input gradient reads nothing of its
//! neighbours' outputs, so a norm with the projection after it, each half of a resnet, a frozen
//! output layer with the residual sum after it, and a transformer's whole feed-forward with its
//! residual are each one node here, which keeps only what the backward pass reads.

use std::cell::OnceCell;

use candle_core::{Module, Tensor};

use super::activation::{geglu, geglu_input_grad};
use super::autograd::{
    any_trained, with_input_grad, with_residual, with_residual_through, Identity, InputGradient,
};
use super::conv::Conv2dLayer;
use super::linear::{frozen_linear, LinearInputGrad};
use super::norm::{GroupNormLayer, LayerNormLayer};
use super::tensor_ops::{broadcast_add, image_to_tokens, shared_matmul, tokens_to_image};

/// The input gradient of [`group_norm_to_tokens`]: the norm's, for the tokens'
/// gradient times `W` as an image.
struct GroupNormToTokensInputGrad {
    norm: GroupNormLayer,
    weight: Tensor,
}

impl InputGradient for GroupNormToTokensInputGrad {
    const NAME: &'static str = "group-norm-to-tokens";
    fn input_grad(&self, x: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let dy = tokens_to_image(&shared_matmul(grad_out, &self.weight)?, h, w)?;
        self.norm.input_grad(x, &dy, false)
    }
}

/// The input gradient of [`layer_norm_linear`]: the norm's, for `dy·W`.
struct LayerNormLinearInputGrad {
    norm: LayerNormLayer,
    weight: Tensor,
}

impl InputGradient for LayerNormLinearInputGrad {
    const NAME: &'static str = "layer-norm-linear";
    fn input_grad(&self, x: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        self.norm
            .input_grad(x, &shared_matmul(grad_out, &self.weight)?)
    }
}

/// `residual + x·Wᵀ (+ b)` for a frozen `W` `[out, in]` and `b`, as one node (the output
/// projection of an attention layer with no adapter on it, and its residual connection).
pub fn frozen_linear_residual(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> candle_core::Result<Tensor> {
    let forward = |x: &Tensor| frozen_linear(x, weight, bias);
    let trained = any_trained([Some(weight), bias]);
    with_residual(x, residual, trained, forward, || LinearInputGrad {
        weight: weight.clone(),
    })
}

/// The input gradient of `geglu(h)·Wᵀ + b`: GEGLU's for `dy·W`.
struct GegluLinearInputGrad {
    weight: Tensor,
}

impl InputGradient for GegluLinearInputGrad {
    const NAME: &'static str = "geglu-linear-residual";
    fn input_grad(&self, h: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        geglu_input_grad(h, &shared_matmul(grad_out, &self.weight)?)
    }
}

/// `residual + geglu(h)·Wᵀ (+ b)` for a frozen `W` `[out, in]` and `b`, as one node: the second
/// half of a GEGLU feed-forward without an adapter on its output layer, with its residual. The
/// graph keeps `h` (which GEGLU's gradient reads) and the sum; PyTorch keeps `h` and `gelu(gate)`.
pub fn geglu_linear_residual(
    h: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> candle_core::Result<Tensor> {
    let forward = |h: &Tensor| frozen_linear(&geglu(h)?, weight, bias);
    let trained = any_trained([Some(weight), bias]);
    with_residual(h, residual, trained, forward, || GegluLinearInputGrad {
        weight: weight.clone(),
    })
}

/// The input gradient of [`geglu_feed_forward_residual`]: `dy` (the residual's), plus the two
/// halves' input gradients in turn, the second half's at the hidden projection `h`.
struct GegluFeedForwardInputGrad {
    first: LayerNormLinearInputGrad,
    second: GegluLinearInputGrad,
    /// `h = norm(x)·W_inᵀ + b_in`, kept from the forward pass: GEGLU's gradient reads it.
    hidden: Option<Tensor>,
}

impl InputGradient for GegluFeedForwardInputGrad {
    const NAME: &'static str = "geglu-feed-forward-residual";
    fn input_grad(&self, x: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        let hidden = self.hidden.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("feed-forward: the forward pass kept no hidden state".into())
        })?;
        let dh = self.second.input_grad(hidden, grad_out)?;
        self.first.input_grad(x, &dh)? + grad_out
    }
}

/// `x + geglu(norm(x)·W_inᵀ + b_in)·W_outᵀ + b_out` for frozen `W_in` `[2·inner, C]`, `W_out`
/// `[C, inner]` and biases, as one node over `x`: a transformer block's GEGLU feed-forward with
/// no adapter on either layer, and its residual. The node keeps `h = norm(x)·W_inᵀ + b_in`, as
/// the two nodes of [`layer_norm_linear`] and [`geglu_linear_residual`] did, but `h` (8·C values
/// a token) is neither copied into the graph nor given a gradient there: candle's backward pass
/// would zero a buffer for that gradient and add to it.
pub fn geglu_feed_forward_residual(
    norm: &LayerNormLayer,
    x: &Tensor,
    (w_in, b_in): (&Tensor, Option<&Tensor>),
    (w_out, b_out): (&Tensor, Option<&Tensor>),
) -> candle_core::Result<Tensor> {
    let hidden = OnceCell::new();
    let forward = |x: &Tensor| {
        let h = frozen_linear(&norm.forward(x)?, w_in, b_in)?;
        let y = (frozen_linear(&geglu(&h)?, w_out, b_out)? + x)?;
        // Called once where the node is made; a plain call (inference, or trained parameters)
        // drops it on return.
        let _ = hidden.set(h);
        Ok(y)
    };
    let trained = norm.trained() || any_trained([Some(w_in), b_in, Some(w_out), b_out]);
    with_input_grad(x, trained, forward, || GegluFeedForwardInputGrad {
        first: LayerNormLinearInputGrad {
            norm: norm.clone(),
            weight: w_in.clone(),
        },
        second: GegluLinearInputGrad {
            weight: w_out.clone(),
        },
        hidden: hidden.get().cloned(),
    })
}

/// The input gradient of `tokens_to_image(t·Wᵀ + b)`: the image gradient as tokens, times `W`.
struct TokensToImageInputGrad {
    weight: Tensor,
}

impl InputGradient for TokensToImageInputGrad {
    const NAME: &'static str = "project-to-image-residual";
    fn input_grad(&self, _: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        shared_matmul(&image_to_tokens(grad_out)?, &self.weight)
    }
}

/// `residual + tokens_to_image(t·Wᵀ + b)` for `[B, h·w, C]` tokens `t`, a frozen `W` `[out, in]`
/// (a linear layer's, or a 1×1 convolution's flattened: the same map) and `b`, and a `[B, out,
/// h, w]` residual, as one node: a transformer's output projection and its residual.
pub fn project_to_image_residual(
    tokens: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: &Tensor,
) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = residual.dims4()?;
    let forward = |t: &Tensor| tokens_to_image(&frozen_linear(t, weight, bias)?, h, w);
    let trained = any_trained([Some(weight), bias]);
    with_residual(tokens, residual, trained, forward, || {
        TokensToImageInputGrad {
            weight: weight.clone(),
        }
    })
}

/// The input gradient of `conv(silu(norm(x)))`: the norm's with its SiLU, for the convolution's
/// input gradient (the convolution's input has `x`'s shape).
struct NormSiluConvInputGrad {
    norm: GroupNormLayer,
    conv: Conv2dLayer,
}

impl InputGradient for NormSiluConvInputGrad {
    const NAME: &'static str = "group-norm-silu-conv";
    fn input_grad(&self, x: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        let dz = self.conv.input_grad(x, grad_out)?;
        self.norm.input_grad(x, &dz, true)
    }
}

/// `image_to_tokens(norm(x))·Wᵀ + b` for a frozen `W` `[out, in]` and `b` (a transformer's
/// input projection, a linear layer's or a flattened 1×1 kernel) as one node over `x`: the
/// graph keeps neither the normalised image nor its projection before the reshuffle.
pub fn group_norm_to_tokens(
    norm: &GroupNormLayer,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let forward =
        |x: &Tensor| frozen_linear(&image_to_tokens(&norm.normalize(x, false)?)?, weight, bias);
    let trained = norm.trained() || any_trained([Some(weight), bias]);
    with_input_grad(x, trained, forward, || GroupNormToTokensInputGrad {
        norm: norm.clone(),
        weight: weight.clone(),
    })
}

/// `conv(silu(norm(x))) (+ shift)` for an optional `[B, C, 1, 1]` `shift` (a resnet's first
/// half, the time embedding's projection as the shift; the VAE's resnets have none) as one node
/// over `x`: the graph keeps neither the activation nor the convolution's output. Frozen
/// parameters and an untracked shift; otherwise composed.
pub fn norm_silu_conv(
    norm: &GroupNormLayer,
    conv: &Conv2dLayer,
    x: &Tensor,
    shift: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let forward = |x: &Tensor| {
        let y = conv.forward(&norm.forward_silu(x)?)?;
        match shift {
            Some(shift) => broadcast_add(&y, shift),
            None => Ok(y),
        }
    };
    let trained = norm.trained() || conv.trained() || shift.is_some_and(Tensor::track_op);
    with_input_grad(x, trained, forward, || NormSiluConvInputGrad {
        norm: norm.clone(),
        conv: conv.clone(),
    })
}

/// `shortcut(r) + conv(silu(norm(h)))`, `shortcut` a frozen 1×1 conv or the identity (a
/// resnet's second half and its residual sum) as one node over `(h, r)`: the graph keeps
/// neither the activation, the convolution's output nor the shortcut's. Frozen parameters;
/// otherwise composed.
pub fn norm_silu_conv_residual(
    norm: &GroupNormLayer,
    conv: &Conv2dLayer,
    h: &Tensor,
    r: &Tensor,
    shortcut: Option<&Conv2dLayer>,
) -> candle_core::Result<Tensor> {
    let forward = |h: &Tensor, r: &Tensor| {
        let residual = match shortcut {
            Some(s) => s.forward(r)?,
            None => r.clone(),
        };
        residual + conv.forward(&norm.forward_silu(h)?)?
    };
    let grad = || NormSiluConvInputGrad {
        norm: norm.clone(),
        conv: conv.clone(),
    };
    let trained = norm.trained() || conv.trained() || shortcut.is_some_and(Conv2dLayer::trained);
    match shortcut {
        Some(s) => with_residual_through((h, r), trained, forward, || (grad(), s.clone())),
        None => with_residual_through((h, r), trained, forward, || (grad(), Identity)),
    }
}

/// `norm(x)·Wᵀ + b` for a frozen `W` `[out, in]` and `b` as one node over `x`: the graph
/// does not keep the normalised `x`, which a frozen layer's input gradient does not read.
pub fn layer_norm_linear(
    norm: &LayerNormLayer,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let forward = |x: &Tensor| frozen_linear(&norm.forward(x)?, weight, bias);
    let trained = norm.trained() || any_trained([Some(weight), bias]);
    with_input_grad(x, trained, forward, || LayerNormLinearInputGrad {
        norm: norm.clone(),
        weight: weight.clone(),
    })
}
