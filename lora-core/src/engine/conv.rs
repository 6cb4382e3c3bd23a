//! The frozen 2-D convolution and the ways it runs: our CPU kernel in f32; elsewhere 1×1 convs
//! as one batched product, stride-1 kh×kw convs as one product over shifted views, and input
//! gradients as the stride-1 adjoint convolution. A trained kernel (full fine-tune) also gets its
//! gradient, by im2col and one product. Paddings are `(rows, columns)`, each applied on both
//! sides of its axis (rectangular kernels such as 1×7 pad only one axis).

use std::sync::{Arc, OnceLock};

use anyhow::Result;
use candle_core::{CustomOp2, Module, Tensor};
use candle_nn::VarBuilder;

use super::autograd::{
    any_trained, forward_from_computed_output, grad_if_tracked, with_input_grad, ComputedOutput,
    InputGradient,
};
use super::kernels::cpu;
#[cfg(feature = "cuda")]
use super::kernels::cuda;
use super::tensor_ops::{add_bias, broadcast_add, contiguous, shared_matmul};

pub(crate) struct ConvInputGrad {
    weight: Tensor,
    padding: (usize, usize),
    stride: usize,
    /// Where a frozen layer keeps its adjoint kernel between steps (see [`AdjointKernel`]).
    adjoint: Option<AdjointKernel>,
}

/// The stride-1 adjoint of a frozen kernel `[O, I, k, k]`: flipped in space with its channel axes
/// swapped, `[I, O, k, k]`, for the half-precision CPU path and CUDA without our kernels. Built on
/// the first backward pass and kept by the layer: making it with candle (`flip` is an index-select
/// copy of the whole kernel) is too slow to redo every step. Costs one more copy of the conv
/// kernels, only once something is trained through them. On CUDA our gather kernel builds it each
/// time instead (`cuda::conv_adjoint`); on the CPU in f32 the input gradient is `Wᵀ·dy` with col2im
/// (`kernels::cpu::conv`), with no copy.
#[derive(Debug, Clone, Default)]
pub struct AdjointKernel(Arc<OnceLock<Tensor>>);

fn adjoint_kernel(weight: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, kh, kw) = weight.dims4()?;
    let swapped = match (kh, kw) {
        (1, 1) => weight.transpose(0, 1)?,
        _ => weight.flip(&[2, 3])?.transpose(0, 1)?,
    };
    swapped.contiguous()
}

impl ConvInputGrad {
    /// The stride-1 adjoint kernel: on CUDA one pass of our gather kernel each time (a kept
    /// copy would hold every conv kernel twice in device memory, 0.8 GB for SD1.5 in bf16);
    /// elsewhere built once and kept by the layer where it has a place for it.
    fn adjoint_kernel(&self) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if cuda::applies(&[&self.weight]) {
            return cuda::conv_adjoint(&self.weight);
        }
        match &self.adjoint {
            Some(AdjointKernel(cell)) => match cell.get() {
                Some(kernel) => Ok(kernel.clone()),
                None => {
                    let kernel = adjoint_kernel(&self.weight)?;
                    // A concurrent first pass may have set it: either is the same kernel.
                    let _ = cell.set(kernel.clone());
                    Ok(kernel)
                }
            },
            None => adjoint_kernel(&self.weight),
        }
    }
}

impl InputGradient for ConvInputGrad {
    const NAME: &'static str = "frozen-conv2d";
    fn input_grad(&self, input: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        if pointwise(&self.weight, self.padding, self.stride)? {
            return pointwise_conv(grad_out, &self.weight.flatten_from(1)?.t()?);
        }
        // The adjoint is itself a stride-1 convolution, with the kernel flipped in space and its
        // channel axes swapped and padding k-1-p, of the output gradient spread `stride` apart
        // (zeros between). candle's conv2d runs it on its im2col + product path, where its
        // conv_transpose2d is a slow direct loop on the CPU and a slow direct kernel on CUDA.
        let flipped = self.adjoint_kernel()?;
        let (_, _, kh, kw) = self.weight.dims4()?;
        let (ph, pw) = self.padding;
        if self.stride == 1 {
            return conv2d_stride1(grad_out, &flipped, (kh - 1 - ph, kw - 1 - pw));
        }
        let mut spread = grad_out.clone();
        for (axis, k, p) in [(2, kh, ph), (3, kw, pw)] {
            spread = dilated(&spread, axis, self.stride)?;
            // Input rows a strided convolution never reached get zero gradient: padding after.
            let covered = spread.dim(axis)? + k - 1 - 2 * p;
            let before = k - 1 - p;
            spread = spread.pad_with_zeros(axis, before, before + input.dim(axis)? - covered)?;
        }
        conv2d_stride1(&spread, &flipped, (0, 0))
    }
}

/// `x` with `stride - 1` zeros between consecutive elements along `axis`: `n` → `(n-1)·stride+1`.
fn dilated(x: &Tensor, axis: usize, stride: usize) -> candle_core::Result<Tensor> {
    let n = x.dim(axis)?;
    if stride == 1 || n == 0 {
        return Ok(x.clone());
    }
    let mut parts = vec![x.zeros_like()?; stride];
    parts[0] = x.clone();
    let mut dims = x.dims().to_vec();
    dims[axis] = n * stride;
    Tensor::stack(&parts, axis + 1)?
        .reshape(dims)?
        .narrow(axis, 0, (n - 1) * stride + 1)
}

/// A stride-1 convolution off the CPU kernel: 1×1 as a product ([`pointwise_conv`]), kh×kw as a
/// product over shifted views ([`shifted_conv`]); neither calls candle's conv2d.
fn conv2d_stride1(
    x: &Tensor,
    weight: &Tensor,
    padding: (usize, usize),
) -> candle_core::Result<Tensor> {
    match pointwise(weight, padding, 1)? {
        true => pointwise_conv(x, &weight.flatten_from(1)?),
        false => shifted_conv(x, weight, padding),
    }
}

/// A stride-1 kh×kw convolution as one batched product `W·cols`, where the columns are kh·kw
/// shifted views of the padded input with its rows laid end to end: in that flat layout, kernel
/// tap (i, j) reads the input at a fixed offset i·Wp + j, so each tap is one contiguous run per
/// channel, copied with candle's 2-D copy. The product covers each output row at the padded
/// width Wp (the kw−1 extra columns are dropped after). candle's conv2d gathers the same
/// columns with its im2col kernel, which computes six divisions per element and on a GPU costs
/// more than the products themselves.
pub(crate) fn shifted_conv(
    x: &Tensor,
    weight: &Tensor,
    (ph, pw): (usize, usize),
) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, _, kh, kw) = weight.dims4()?;
    let (hp, wp) = (h + 2 * ph, w + 2 * pw);
    let (ho, wo) = (hp + 1 - kh, wp + 1 - kw);
    // One extra row of zeros at the bottom: the last taps read up to kw−1 elements past Hp·Wp.
    let flat = x
        .pad_with_zeros(2, ph, ph + 1)?
        .pad_with_zeros(3, pw, pw)?
        .reshape((b * c, (hp + 1) * wp))?;
    let len = ho * wp;
    let taps = (0..kh)
        .flat_map(|i| (0..kw).map(move |j| i * wp + j))
        .map(|offset| flat.narrow(1, offset, len))
        .collect::<candle_core::Result<Vec<_>>>()?;
    // [B·C, k²·len] → [B, C·k², len]: the kernel's [O, C, kh, kw] order.
    let cols = Tensor::cat(&taps, 1)?.reshape((b, c * kh * kw, len))?;
    shared_matmul(&weight.reshape((o, c * kh * kw))?, &cols)?
        .reshape((b * o * ho, wp))?
        .narrow(1, 0, wo)
        .and_then(|y| contiguous(&y))?
        .reshape((b, o, ho, wo))
}

/// Whether a convolution is a per-pixel product: a 1×1 kernel, stride 1, no padding.
fn pointwise(weight: &Tensor, padding: (usize, usize), stride: usize) -> candle_core::Result<bool> {
    let (_, _, kh, kw) = weight.dims4()?;
    Ok((kh, kw, padding, stride) == (1, 1, (0, 0), 1))
}

/// candle's convolution, which pads both axes alike: a rectangular padding is applied first.
fn candle_conv2d(
    x: &Tensor,
    weight: &Tensor,
    (ph, pw): (usize, usize),
    stride: usize,
) -> candle_core::Result<Tensor> {
    if ph == pw {
        return x.conv2d(weight, ph, stride, 1, 1);
    }
    x.pad_with_zeros(2, ph, ph)?
        .pad_with_zeros(3, pw, pw)?
        .conv2d(weight, 0, stride, 1, 1)
}

/// A 1×1 convolution of `x` `[B, C, H, W]` by the matrix `m` `[O, C]`, as one batched product
/// `m·x[b]` on the `[C, H·W]` maps: candle's conv2d would copy `x` into columns (im2col) and its
/// result back into NCHW order, two full passes that cost more than the product on a GPU.
fn pointwise_conv(x: &Tensor, m: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    shared_matmul(m, &contiguous(x)?.reshape((b, c, h * w))?)?.reshape((b, m.dim(0)?, h, w))
}

/// `count` elements of `dim` (2 or 3 of a 4-D tensor) from `start`, `stride` apart.
fn strided(
    x: &Tensor,
    dim: usize,
    start: usize,
    count: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let x = x.narrow(dim, start, (count - 1) * stride + 1)?;
    if stride == 1 {
        return Ok(x);
    }
    // Pad to count·stride, split the axis into (count, stride) and keep the first of each pair.
    let x = x.pad_with_zeros(dim, 0, stride - 1)?;
    let mut dims = x.dims().to_vec();
    dims[dim] = count;
    dims.insert(dim + 1, stride);
    x.reshape(dims)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
}

/// The kernel gradient `[O, C, kh, kw]` of a convolution: for each kernel tap, the output gradient
/// against the input window it saw, as one explicit im2col and one batched matmul. candle's own
/// backward computes it as a convolution whose kernel is the whole output map, which on CPU is
/// orders of magnitude slower (minutes per step even for a tiny UNet).
pub(crate) fn conv_kernel_grad(
    x: &Tensor,
    grad_out: &Tensor,
    kernel: (usize, usize),
    (ph, pw): (usize, usize),
    stride: usize,
) -> candle_core::Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    let (_, o, ho, wo) = grad_out.dims4()?;
    let (kh, kw) = kernel;
    let x = x.pad_with_zeros(2, ph, ph)?.pad_with_zeros(3, pw, pw)?;
    let mut taps = Vec::with_capacity(kh * kw);
    for i in 0..kh {
        let rows = strided(&x, 2, i, ho, stride)?;
        for j in 0..kw {
            taps.push(strided(&rows, 3, j, wo, stride)?);
        }
    }
    // [B, C, k·k, ho, wo] → [B, C·k·k, ho·wo], matching the kernel's [O, C, kh, kw] order.
    let cols = Tensor::stack(&taps, 2)?.reshape((b, c * kh * kw, ho * wo))?;
    let g = grad_out.contiguous()?.reshape((b, o, ho * wo))?;
    g.matmul(&cols.t()?)?.sum(0)?.reshape((o, c, kh, kw))
}

/// `(x, kernel) → output`: a convolution computed outside the graph, re-attached with the
/// gradients of both its input and its (trained) kernel.
struct TrainedConv {
    padding: (usize, usize),
    stride: usize,
    output: ComputedOutput,
}

impl CustomOp2 for TrainedConv {
    fn name(&self) -> &'static str {
        "trained-conv2d"
    }

    forward_from_computed_output!(a, b);

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let input_grad = ConvInputGrad {
            weight: weight.detach(),
            padding: self.padding,
            stride: self.stride,
            adjoint: None, // the kernel changes every step
        };
        // Not for the UNet's input at `conv_in`.
        let input_grad = grad_if_tracked(x, || input_grad.input_grad(x, grad_out))?;
        let (_, _, kh, kw) = weight.dims4()?;
        let kernel_grad =
            conv_kernel_grad(&x.detach(), grad_out, (kh, kw), self.padding, self.stride)?;
        Ok((input_grad, Some(kernel_grad)))
    }
}

/// 2-D convolution with a frozen kernel and an optional `[1, out, 1, 1]` bias: no kernel
/// gradient is ever computed. `padding`: `(rows, columns)`. `adjoint`: where the layer keeps its
/// adjoint kernel between steps (`None` rebuilds it every backward pass).
pub fn frozen_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: (usize, usize),
    stride: usize,
    adjoint: Option<&AdjointKernel>,
) -> candle_core::Result<Tensor> {
    conv2d_node(x, weight, bias, padding, stride, adjoint, false)
}

/// [`frozen_conv2d`], followed by a ReLU when `relu`. On the CPU in f32 both are one op: the
/// kernel clamps each sample's output as it finishes it, and its backward masks the output
/// gradient; a separate ReLU would be one more pass over the output and one more tensor.
fn conv2d_node(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: (usize, usize),
    stride: usize,
    adjoint: Option<&AdjointKernel>,
    relu: bool,
) -> candle_core::Result<Tensor> {
    let activated = |y: Tensor| if relu { y.relu() } else { Ok(y) };
    if cpu::conv::applies(x, weight) {
        // One op computing in place of candle's graph, with the input gradient (and the kernel
        // gradient for a trained kernel) as its backward.
        return match bias {
            Some(b) if b.track_op() => activated(broadcast_add(
                &cpu::conv::conv2d_op(x, weight, None, padding, stride, false)?,
                b,
            )?),
            _ => cpu::conv::conv2d_op(x, weight, bias, padding, stride, relu),
        };
    }
    activated(conv2d_off_cpu(x, weight, bias, padding, stride, adjoint)?)
}

/// The convolution where the CPU kernel does not apply (CUDA, half precision, f64).
fn conv2d_off_cpu(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: (usize, usize),
    stride: usize,
    adjoint: Option<&AdjointKernel>,
) -> candle_core::Result<Tensor> {
    let forward = |x: &Tensor| {
        let y = match stride {
            1 => conv2d_stride1(x, weight, padding)?,
            _ => candle_conv2d(x, weight, padding, stride)?,
        };
        add_bias(y, bias)
    };
    if weight.track_op() {
        // A trained kernel (full fine-tune): both gradients, by `TrainedConv`.
        let output = candle_conv2d(&x.detach(), &weight.detach(), padding, stride)?;
        let y = x.apply_op2(
            weight,
            TrainedConv {
                padding,
                stride,
                output: ComputedOutput::new(output.contiguous()?),
            },
        )?;
        return add_bias(y, bias);
    }
    let trained = any_trained([bias]);
    with_input_grad(x, trained, forward, || ConvInputGrad {
        weight: weight.clone(),
        padding,
        stride,
        adjoint: adjoint.cloned(),
    })
}

/// A frozen 2-D convolution with bias.
#[derive(Debug, Clone)]
pub struct Conv2dLayer {
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
    pub(super) stride: usize,
    pub(super) padding: (usize, usize),
    pub(super) adjoint: AdjointKernel,
}

impl Conv2dLayer {
    /// A square `kernel`×`kernel` convolution read from `weight` and `bias`, padded alike on
    /// both axes.
    pub fn load(
        vb: &VarBuilder,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_ch, in_ch, kernel, kernel), "weight")?;
        let bias = vb.get(out_ch, "bias")?;
        Self::new(weight, bias, stride, (padding, padding))
    }

    /// A convolution from its kernel `[O, C, kh, kw]` and bias `[O]`, for weights a model
    /// computes itself (e.g. a batch norm folded into the conv before it).
    pub fn new(
        weight: Tensor,
        bias: Tensor,
        stride: usize,
        padding: (usize, usize),
    ) -> Result<Self> {
        let (out_ch, ..) = weight.dims4()?;
        anyhow::ensure!(
            bias.dims() == [out_ch],
            "conv bias has shape {:?}, the kernel {:?} needs [{out_ch}]",
            bias.dims(),
            weight.dims()
        );
        Ok(Self {
            weight,
            bias: bias.reshape((1, out_ch, 1, 1))?,
            stride,
            padding,
            adjoint: AdjointKernel::default(),
        })
    }

    pub(super) fn trained(&self) -> bool {
        any_trained([Some(&self.weight), Some(&self.bias)])
    }

    /// The kernel `[O, C, kh, kw]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, shaped `[1, O, 1, 1]`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    /// `(rows, columns)` of zero padding.
    pub fn padding(&self) -> (usize, usize) {
        self.padding
    }
}

/// The layer's input gradient for an input shaped as `x` (frozen kernel), by whichever kernel
/// `frozen_conv2d` runs on; also the residual path of a resnet with a shortcut conv.
impl InputGradient for Conv2dLayer {
    const NAME: &'static str = "conv2d";
    fn input_grad(&self, x: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        if cpu::conv::applies(x, &self.weight) {
            return cpu::conv::input_grad(x, &self.weight, grad_out, self.padding, self.stride);
        }
        ConvInputGrad {
            weight: self.weight.clone(),
            padding: self.padding,
            stride: self.stride,
            adjoint: Some(self.adjoint.clone()),
        }
        .input_grad(x, grad_out)
    }
}

impl Conv2dLayer {
    /// `relu(conv(x) + bias)` as one node where the CPU kernel runs (see [`conv2d_node`]).
    pub fn forward_relu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.node(x, true)
    }

    fn node(&self, x: &Tensor, relu: bool) -> candle_core::Result<Tensor> {
        conv2d_node(
            x,
            &self.weight,
            Some(&self.bias),
            self.padding,
            self.stride,
            Some(&self.adjoint),
            relu,
        )
    }
}

impl Module for Conv2dLayer {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.node(x, false)
    }
}
