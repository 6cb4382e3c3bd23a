//! Frozen building blocks of the UNet, written with operations that carry a backward pass in
//! candle. candle-nn's fused `layer_norm`/`softmax_last_dim` record no gradient (silently), so
//! they are used only where a backward of our own is attached (`LayerNormInputGrad`,
//! `blocked_attention`). All frozen layers go through this module, so their backward behaviour is
//! decided in one place.
//!
//! Frozen weights: candle's backward computes the gradient of *both* operands of every matmul and
//! convolution, so a LoRA step would also compute (and keep until the step ends) a gradient for
//! every frozen weight — about a third of the backward work and a weight-sized buffer per layer.
//! On the CPU in f32, linear layers, convolutions, norms, attention and GEGLU are `cpu_*` kernel
//! ops carrying their own backward (the input gradient; a kernel gradient only for a trained
//! kernel). Elsewhere the output is computed without recording it and re-attached to the input's
//! graph by a custom op whose backward returns only the input gradient (attention: the gradients
//! of q, k and v, recomputed block by block).

use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Module, Shape, Storage, Tensor, D,
};
use candle_nn::VarBuilder;

#[cfg(feature = "cuda")]
use crate::cuda_kernels;
use crate::{blocked_attention, cpu_activation, cpu_attention, cpu_conv, cpu_gemm, cpu_norm};

/// The output of an op computed from candle's tensor ops outside the graph, handed to the op
/// that re-attaches it. An op must return storage it owns, so its forward takes the tensor (the
/// op's single forward call reads it), copies it and drops it: the graph keeps one copy.
pub(crate) struct ComputedOutput(Mutex<Option<Tensor>>);

impl ComputedOutput {
    pub(crate) fn new(output: Tensor) -> Self {
        Self(Mutex::new(Some(output)))
    }

    fn take(&self) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("computed output: poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("computed output: already taken".into()))
    }

    pub(crate) fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let output = self.take()?;
        let (storage, layout) = output.storage_and_layout();
        let Storage::Cpu(storage) = &*storage else {
            return Err(another_device());
        };
        let (start, end) = layout.contiguous_offsets().ok_or_else(not_contiguous)?;
        let copied = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[start..end].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[start..end].to_vec()),
            other => {
                return Err(candle_core::Error::Msg(format!(
                    "computed output: unsupported dtype {:?}",
                    other.dtype()
                )));
            }
        };
        Ok((copied, layout.shape().clone()))
    }

    pub(crate) fn cuda(&self) -> candle_core::Result<(CudaStorage, Shape)> {
        let output = self.take()?;
        let (storage, layout) = output.storage_and_layout();
        let Storage::Cuda(storage) = &*storage else {
            return Err(another_device());
        };
        // A fresh, contiguous result owns its whole buffer, which `try_clone` copies.
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            return Err(not_contiguous());
        }
        Ok((storage.try_clone(layout)?, layout.shape().clone()))
    }
}

/// `cpu_fwd` and `cuda_fwd` of a custom op over 1, 2 or 3 inputs whose output was computed
/// outside the graph into `self.output` (a [`ComputedOutput`]): they hand it over and read no
/// input.
macro_rules! forward_from_computed_output {
    ($($input:ident),+) => {
        fn cpu_fwd(
            &self,
            $($input: &candle_core::CpuStorage, _: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            let _ = ($($input),+);
            self.output.cpu()
        }

        fn cuda_fwd(
            &self,
            $($input: &candle_core::CudaStorage, _: &candle_core::Layout),+
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            let _ = ($($input),+);
            self.output.cuda()
        }
    };
}
pub(crate) use forward_from_computed_output;

fn another_device() -> candle_core::Error {
    candle_core::Error::Msg("computed output: on another device than the op's inputs".into())
}

fn not_contiguous() -> candle_core::Error {
    candle_core::Error::Msg("computed output: must be contiguous from offset 0".into())
}

/// The input gradient of an op computed outside the graph, given its input and the output
/// gradient (none needs its output).
trait InputGradient: Send + Sync + 'static {
    const NAME: &'static str;
    fn input_grad(&self, input: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor>;
}

/// `input → output` for an `output` computed from `input` outside the graph, with a backward that
/// sends the output gradient to the input only.
struct Reattach<G> {
    output: ComputedOutput,
    grad: G,
}

impl<G: InputGradient> CustomOp1 for Reattach<G> {
    fn name(&self) -> &'static str {
        G::NAME
    }

    forward_from_computed_output!(x);

    fn bwd(
        &self,
        input: &Tensor,
        _: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.grad.input_grad(input, grad_out)?))
    }
}

struct LinearInputGrad {
    weight: Tensor,
}

impl InputGradient for LinearInputGrad {
    const NAME: &'static str = "frozen-linear";
    fn input_grad(&self, _: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        shared_matmul(grad_out, &self.weight)
    }
}

struct ConvInputGrad {
    weight: Tensor,
    padding: usize,
    stride: usize,
    /// Where a frozen layer keeps its adjoint kernel between steps (see [`AdjointKernel`]).
    adjoint: Option<AdjointKernel>,
}

/// The stride-1 adjoint of a frozen kernel `[O, I, k, k]`: flipped in space with its channel
/// axes swapped, `[I, O, k, k]`, for the half-precision CPU path and CUDA without our kernels.
/// Built on the first backward pass and kept by the layer: making it with candle (`flip` is an
/// index-select copy of the whole kernel) took about a quarter of an SD1.5 LoRA step when redone
/// every step. Costs one more copy of the conv kernels, only once something is trained through
/// them. On CUDA our gather kernel builds it each time instead (`cuda_kernels::conv_adjoint`);
/// on the CPU in f32 the input gradient is `Wᵀ·dy` with col2im (`cpu_conv`), with no copy.
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
        if cuda_kernels::applies(&[&self.weight]) {
            return cuda_kernels::conv_adjoint(&self.weight);
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
        // (zeros between). candle's conv2d runs it faster than its conv_transpose2d: 2.5-5x on
        // CPU at SD1.5 shapes; on an H200 conv_transpose2d's direct kernel took 7 ms per
        // downsampler at batch 4, more than all of a layer's products (issue #7).
        let flipped = self.adjoint_kernel()?;
        let (_, _, kh, kw) = self.weight.dims4()?;
        if self.stride == 1 && kh == kw {
            return conv2d_stride1(grad_out, &flipped, kh - 1 - self.padding);
        }
        let mut spread = grad_out.clone();
        for (axis, k) in [(2, kh), (3, kw)] {
            spread = dilated(&spread, axis, self.stride)?;
            // Input rows a strided convolution never reached get zero gradient: padding after.
            let covered = spread.dim(axis)? + k - 1 - 2 * self.padding;
            let before = k - 1 - self.padding;
            spread = spread.pad_with_zeros(axis, before, before + input.dim(axis)? - covered)?;
        }
        conv2d_stride1(&spread, &flipped, 0)
    }
}

/// `y + b` for an optional bias `b` broadcast against `y`: on CUDA, outside the graph, one pass of
/// our per-channel kernel.
fn add_bias(y: Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let Some(b) = bias else { return Ok(y) };
    #[cfg(feature = "cuda")]
    if !y.track_op() && !b.track_op() && cuda_kernels::applies(&[&y, b]) {
        if let Some(axis) = cuda_kernels::bias_axis(y.dims(), b.dims()) {
            let params = b.reshape((1, ()))?;
            return cuda_kernels::channel_affine(&y, &params, axis, None, Some(0), false);
        }
    }
    broadcast_add(&y, b)
}

/// `a·b` where one operand is a matrix shared by every element of the other's batch. candle's
/// `broadcast_matmul` copies a shared left matrix once per batch element, and a shared right one
/// too unless the left operand is contiguous: on an H200 those copies of the conv kernels took a
/// seventh of an SD1.5 training step (issue #7). Here a shared left matrix is a stride-0 view,
/// which the strided-batched product reads in place, and a left batch is made contiguous so that
/// candle folds it into the rows of one product with the shared right matrix.
pub(crate) fn shared_matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    match (a.rank(), b.rank()) {
        (2, 3) => a.broadcast_as((b.dim(0)?, a.dim(0)?, a.dim(1)?))?.matmul(b),
        (r, 2) if r > 2 => contiguous(a)?.broadcast_matmul(b),
        _ => a.broadcast_matmul(b),
    }
}

/// `x.contiguous()`, copied by our kernels on CUDA (candle's strided copy divides per element per
/// axis: on an H200 its copies took more time than all of a step's matrix products, issue #7).
pub(crate) fn contiguous(x: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    return cuda_kernels::contiguous(x);
    #[cfg(not(feature = "cuda"))]
    x.contiguous()
}

/// `y + b` for `b` broadcast against `y`. See [`broadcast_op`].
pub fn broadcast_add(y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    broadcast_op(y, b, Tensor::broadcast_add)
}

/// `y − b` for `b` broadcast against `y`. See [`broadcast_op`].
pub fn broadcast_sub(y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    broadcast_op(y, b, Tensor::broadcast_sub)
}

/// `y ⊙ b` for `b` broadcast against `y`. See [`broadcast_op`].
pub fn broadcast_mul(y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    broadcast_op(y, b, Tensor::broadcast_mul)
}

/// `op(y, b)` for `b` broadcast against `y`, computed on views of both in which neighbouring
/// axes are merged wherever `b` is broadcast along both or along neither: a per-channel
/// `[B, C, H, W] + [1, C, 1, 1]` runs as `[B, C, H·W] + [1, C, 1]`, a bias `[B, N, O] + [O]` as
/// `[B·N, O] + [1, O]`. candle's CUDA kernels compute each element's broadcast index with a
/// division per axis, which on an H200 made bias additions cost more than the products they
/// follow (issue #7); fewer axes, fewer divisions. Same values and gradients as `op(y, b)`.
fn broadcast_op(
    y: &Tensor,
    b: &Tensor,
    op: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let (y_dims, b_dims) = (y.dims(), b.dims());
    if b_dims.len() > y_dims.len() {
        return op(y, b);
    }
    let b_full = std::iter::repeat_n(1, y_dims.len() - b_dims.len()).chain(b_dims.iter().copied());
    // (merged extent in y, whether b is broadcast along it)
    let mut merged: Vec<(usize, bool)> = Vec::new();
    for (&n, m) in y_dims.iter().zip(b_full) {
        if n == 1 {
            continue;
        }
        let broadcast = match m {
            1 => true,
            m if m == n => false,
            _ => return op(y, b),
        };
        match merged.last_mut() {
            Some((extent, kind)) if *kind == broadcast => *extent *= n,
            _ => merged.push((n, broadcast)),
        }
    }
    if merged.len() == y_dims.len() {
        return op(y, b);
    }
    let y_view: Vec<usize> = merged.iter().map(|&(n, _)| n).collect();
    let b_view: Vec<usize> = merged
        .iter()
        .map(|&(n, broadcast)| if broadcast { 1 } else { n })
        .collect();
    op(&y.reshape(y_view)?, &b.reshape(b_view)?)?.reshape(y_dims)
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

/// A stride-1 convolution off the CPU kernel: 1×1 as a product ([`pointwise_conv`]), k×k as a
/// product over shifted views ([`shifted_conv`]); neither calls candle's conv2d.
fn conv2d_stride1(x: &Tensor, weight: &Tensor, padding: usize) -> candle_core::Result<Tensor> {
    match pointwise(weight, padding, 1)? {
        true => pointwise_conv(x, &weight.flatten_from(1)?),
        false => shifted_conv(x, weight, padding),
    }
}

/// A stride-1 k×k convolution as one batched product `W·cols`, where the columns are k² shifted
/// views of the padded input with its rows laid end to end: in that flat layout, kernel tap
/// (i, j) reads the input at a fixed offset i·Wp + j, so each tap is one contiguous run per
/// channel, copied with candle's 2-D copy. The product covers each output row at the padded
/// width Wp (the k−1 extra columns are dropped after). candle's conv2d gathers the same
/// columns with its im2col kernel, which computes six divisions per element: on an H200 that
/// kernel took longer than all of the UNet's matrix products (issue #7).
fn shifted_conv(x: &Tensor, weight: &Tensor, padding: usize) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, _, kh, kw) = weight.dims4()?;
    let (hp, wp) = (h + 2 * padding, w + 2 * padding);
    let (ho, wo) = (hp + 1 - kh, wp + 1 - kw);
    // One extra row of zeros at the bottom: the last taps read up to kw−1 elements past Hp·Wp.
    let flat = x
        .pad_with_zeros(2, padding, padding + 1)?
        .pad_with_zeros(3, padding, padding)?
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
fn pointwise(weight: &Tensor, padding: usize, stride: usize) -> candle_core::Result<bool> {
    let (_, _, kh, kw) = weight.dims4()?;
    Ok((kh, kw, padding, stride) == (1, 1, 0, 1))
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

/// The kernel gradient `[O, C, k, k]` of a convolution: for each kernel tap, the output gradient
/// against the input window it saw, as one explicit im2col and one batched matmul. candle's own
/// backward computes it as a convolution whose kernel is the whole output map, which on CPU is
/// orders of magnitude slower (minutes per step even for a tiny UNet).
fn conv_kernel_grad(
    x: &Tensor,
    grad_out: &Tensor,
    kernel: (usize, usize),
    padding: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let (b, c, _, _) = x.dims4()?;
    let (_, o, ho, wo) = grad_out.dims4()?;
    let (kh, kw) = kernel;
    let x = x
        .pad_with_zeros(2, padding, padding)?
        .pad_with_zeros(3, padding, padding)?;
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
    padding: usize,
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

/// `(x̂, r)`: `x` standardised over its last dimension, `x̂ = (x − μ)·r` with `r = 1/√(var + eps)`,
/// from ordinary ops (recorded where `x` is tracked).
fn standardized(x: &Tensor, eps: f64) -> candle_core::Result<(Tensor, Tensor)> {
    let centered = broadcast_sub(x, &x.mean_keepdim(D::Minus1)?)?;
    let rstd = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    Ok((broadcast_mul(&centered, &rstd)?, rstd))
}

/// The input gradient of standardisation over the last dimension, given `g = ∂L/∂x̂`:
/// `dx = r · (g − mean(g) − x̂ ⊙ mean(g ⊙ x̂))`.
fn standardized_input_grad(
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
        if cuda_kernels::applies(&[x, grad_out]) {
            return cuda_kernels::layer_norm_backward(x, grad_out, &self.weight, self.eps);
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
    norm: GroupNorm,
    silu: bool,
}

impl InputGradient for GroupNormInputGrad {
    const NAME: &'static str = "group-norm";
    fn input_grad(&self, x: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if cuda_kernels::applies(&[x, grad_out]) {
            let norm = &self.norm;
            let (groups, eps) = (norm.groups, norm.eps);
            return cuda_kernels::group_norm_backward(
                x,
                grad_out,
                &norm.packed,
                groups,
                eps,
                self.silu,
            );
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

/// The input gradient of [`GroupNorm::forward_to_tokens`]: the norm's, for the tokens'
/// gradient times `W` as an image.
struct GroupNormToTokensInputGrad {
    norm: GroupNorm,
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

/// The input gradient of [`LayerNorm::forward_linear`]: the norm's, for `dy·W`.
struct LayerNormLinearInputGrad {
    norm: LayerNorm,
    weight: Tensor,
}

impl InputGradient for LayerNormLinearInputGrad {
    const NAME: &'static str = "layer-norm-linear";
    fn input_grad(&self, x: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        self.norm
            .input_grad(x, &shared_matmul(grad_out, &self.weight)?)
    }
}

/// `grad()` for an op's input where a gradient flows to it, `None` where none does: candle would
/// keep a gradient returned for an untracked input (the UNet's latents, the text embeddings,
/// layers before the first adapter) until its backward pass ends, and compute it for nothing.
pub(crate) fn grad_if_tracked(
    input: &Tensor,
    grad: impl FnOnce() -> candle_core::Result<Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    input.track_op().then(grad).transpose()
}

/// Whether any of a layer's parameters is itself being trained (a `Var`, as in a full
/// fine-tune): such a layer needs candle's ordinary ops, which compute the parameter gradients.
fn any_trained<'a>(params: impl IntoIterator<Item = Option<&'a Tensor>>) -> bool {
    params.into_iter().flatten().any(Tensor::track_op)
}

/// Runs `forward` untracked and re-attaches its output to `x`'s graph with the backward `grad`
/// computes (input gradient only); when no gradient can flow to `x` (inference) it is a plain
/// call, and so it is when `forward` reads trained parameters (their gradients are needed).
fn with_input_grad<G: InputGradient>(
    x: &Tensor,
    trained_params: bool,
    forward: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    grad: impl FnOnce() -> G,
) -> candle_core::Result<Tensor> {
    if !x.track_op() || trained_params {
        return forward(x);
    }
    let output = forward(&x.detach())?.contiguous()?;
    x.apply_op1(Reattach {
        output: ComputedOutput::new(output),
        grad: grad(),
    })
}

/// `(x, residual) → s(residual) + f(x)` for an `f` (and a shortcut `s`, often the identity)
/// computed outside the graph, with a backward that sends `grad` of the output gradient to `x`
/// and `residual_grad` of it to `residual`.
///
/// Why: candle's graph keeps every node's output until the backward pass ends, and a residual
/// sum `s(r) + f(x)` composed from ops keeps `f(x)`, `s(r)` and whatever `f` made on the way as
/// well as the sum. As one node it keeps the sum only. In the transformer blocks and resnets at
/// 64² latents this was most of what our activations held beyond PyTorch's saved tensors (#7).
struct ResidualNode<G, R> {
    output: ComputedOutput,
    grad: G,
    /// The residual's path: the identity, or a frozen shortcut layer (a resnet's 1×1 conv).
    residual_grad: R,
}

impl<G: InputGradient, R: InputGradient> CustomOp2 for ResidualNode<G, R> {
    fn name(&self) -> &'static str {
        G::NAME
    }

    forward_from_computed_output!(a, b);

    fn bwd(
        &self,
        x: &Tensor,
        residual: &Tensor,
        _: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = grad_if_tracked(x, || self.grad.input_grad(x, grad_out))?;
        let dr = grad_if_tracked(residual, || {
            self.residual_grad.input_grad(residual, grad_out)
        })?;
        Ok((dx, dr))
    }
}

/// The identity's input gradient: the residual path of a plain residual sum.
struct Identity;

impl InputGradient for Identity {
    const NAME: &'static str = "identity";
    fn input_grad(&self, _: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        Ok(grad_out.clone())
    }
}

/// `residual + forward(x)` as one [`ResidualNode`] (see [`with_residual_through`]).
fn with_residual<G: InputGradient>(
    x: &Tensor,
    residual: &Tensor,
    trained_params: bool,
    forward: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    grad: impl FnOnce() -> G,
) -> candle_core::Result<Tensor> {
    let forward = |x: &Tensor, r: &Tensor| forward(x)? + r;
    with_residual_through((x, residual), trained_params, forward, || {
        (grad(), Identity)
    })
}

/// `forward(x, residual)`, a sum of a function of `x` and one of `residual`, as one
/// [`ResidualNode`] with the gradients `grads` gives for each, where a gradient can flow to
/// either input; plainly where none can (inference), and where `forward` reads trained
/// parameters (their gradients are needed), as [`with_input_grad`] does.
fn with_residual_through<G: InputGradient, R: InputGradient>(
    (x, residual): (&Tensor, &Tensor),
    trained_params: bool,
    forward: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    grads: impl FnOnce() -> (G, R),
) -> candle_core::Result<Tensor> {
    if (!x.track_op() && !residual.track_op()) || trained_params {
        return forward(x, residual);
    }
    let output = forward(&x.detach(), &residual.detach())?.contiguous()?;
    let (grad, residual_grad) = grads();
    x.apply_op2(
        residual,
        ResidualNode {
            output: ComputedOutput::new(output),
            grad,
            residual_grad,
        },
    )
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

/// `[B, N, C]` tokens of an `h × w` image as `[B, C, h, w]`.
pub fn tokens_to_image(t: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (b, _, c) = t.dims3()?;
    contiguous(&t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?)
}

/// `[B, C, h, w]` as `[B, h·w, C]` tokens.
pub fn image_to_tokens(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    contiguous(&x.permute((0, 2, 3, 1))?)?.reshape((b, h * w, c))
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

/// `x·Wᵀ (+ b)` for a frozen `W` `[out, in]`: no weight gradient is ever computed.
pub fn frozen_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let trained = any_trained([Some(weight), bias]);
    if !trained && cpu_gemm::linear_applies(x, weight) {
        return cpu_gemm::linear_op(x, weight, bias);
    }
    let forward = |x: &Tensor| add_bias(shared_matmul(x, &weight.t()?)?, bias);
    with_input_grad(x, trained, forward, || LinearInputGrad {
        weight: weight.clone(),
    })
}

/// 2-D convolution with a frozen kernel and an optional `[1, out, 1, 1]` bias: no kernel
/// gradient is ever computed. `adjoint`: where the layer keeps its adjoint kernel between
/// steps (`None` rebuilds it every backward pass).
pub fn frozen_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    padding: usize,
    stride: usize,
    adjoint: Option<&AdjointKernel>,
) -> candle_core::Result<Tensor> {
    if cpu_conv::applies(x, weight) {
        // One op computing in place of candle's graph, with the input gradient (and the kernel
        // gradient for a trained kernel) as its backward.
        return match bias {
            Some(b) if b.track_op() => {
                cpu_conv::conv2d_op(x, weight, None, padding, stride)?.broadcast_add(b)
            }
            _ => cpu_conv::conv2d_op(x, weight, bias, padding, stride),
        };
    }
    let forward = |x: &Tensor| {
        let y = match stride {
            1 => conv2d_stride1(x, weight, padding)?,
            _ => x.conv2d(weight, padding, stride, 1, 1)?,
        };
        add_bias(y, bias)
    };
    if weight.track_op() {
        // A trained kernel (full fine-tune): both gradients, by `TrainedConv`.
        let output = x.detach().conv2d(&weight.detach(), padding, stride, 1, 1)?;
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

/// The dtype normalisations, upcast attention and attention's sums are computed in:
/// half-precision inputs are upcast so the statistics do not lose precision; f32/f64 stay as
/// they are.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

/// A frozen dense layer `y = x·Wᵀ + b`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
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

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        frozen_linear(x, &self.weight, self.bias.as_ref())
    }
}

/// A frozen 2-D convolution with bias.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
    adjoint: AdjointKernel,
}

impl Conv2d {
    pub fn load(
        vb: &VarBuilder,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_ch, in_ch, kernel, kernel), "weight")?;
        let bias = vb.get(out_ch, "bias")?.reshape((1, out_ch, 1, 1))?;
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            adjoint: AdjointKernel::default(),
        })
    }

    fn trained(&self) -> bool {
        any_trained([Some(&self.weight), Some(&self.bias)])
    }
}

/// The layer's input gradient for an input shaped as `x` (frozen kernel), by whichever kernel
/// `frozen_conv2d` runs on; also the residual path of a resnet with a shortcut conv.
impl InputGradient for Conv2d {
    const NAME: &'static str = "conv2d";
    fn input_grad(&self, x: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        if cpu_conv::applies(x, &self.weight) {
            return cpu_conv::input_grad(x, &self.weight, grad_out, self.padding, self.stride);
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

/// The input gradient of `conv(silu(norm(x)))`: the norm's with its SiLU, for the convolution's
/// input gradient (the convolution's input has `x`'s shape).
struct NormSiluConvInputGrad {
    norm: GroupNorm,
    conv: Conv2d,
}

impl InputGradient for NormSiluConvInputGrad {
    const NAME: &'static str = "group-norm-silu-conv";
    fn input_grad(&self, x: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        let dz = self.conv.input_grad(x, grad_out)?;
        self.norm.input_grad(x, &dz, true)
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        frozen_conv2d(
            x,
            &self.weight,
            Some(&self.bias),
            self.padding,
            self.stride,
            Some(&self.adjoint),
        )
    }
}

/// Group normalisation over `[B, C, H, W]` with per-channel affine parameters.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    /// `[weight; bias]` `[2, C]`, the form our CUDA kernels read the frozen affine in.
    #[cfg(feature = "cuda")]
    packed: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
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
    fn new(weight: &Tensor, bias: &Tensor, groups: usize, eps: f64) -> candle_core::Result<Self> {
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

impl GroupNorm {
    /// `silu(norm(x))`, the pre-activation of every resnet convolution: one op on the CPU.
    pub fn forward_silu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.normalize(x, true)
    }

    /// The parameters `cpu_norm`'s kernels read.
    fn cpu_params(&self, silu: bool) -> candle_core::Result<cpu_norm::GroupNormParams> {
        let values = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
        Ok(cpu_norm::GroupNormParams {
            groups: self.groups,
            eps: self.eps,
            weight: values(&self.weight)?,
            bias: values(&self.bias)?,
            silu,
        })
    }

    /// The input gradient for the input `x` and the output gradient `dy` (frozen affine), by
    /// whichever kernel `normalize` ran on.
    fn input_grad(&self, x: &Tensor, dy: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        if cpu_gemm::cpu_f32(&[x, dy]) {
            return cpu_norm::input_grad(x, dy, &self.cpu_params(silu)?);
        }
        GroupNormInputGrad {
            norm: self.clone(),
            silu,
        }
        .input_grad(x, dy)
    }

    /// `image_to_tokens(norm(x))·Wᵀ + b` for a frozen `W` `[out, in]` and `b` (a transformer's
    /// input projection, a linear layer's or a flattened 1×1 kernel) as one node over `x`: the
    /// graph keeps neither the normalised image nor its projection before the reshuffle.
    pub fn forward_to_tokens(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let forward =
            |x: &Tensor| frozen_linear(&image_to_tokens(&self.normalize(x, false)?)?, weight, bias);
        let trained = self.trained() || any_trained([Some(weight), bias]);
        with_input_grad(x, trained, forward, || GroupNormToTokensInputGrad {
            norm: self.clone(),
            weight: weight.clone(),
        })
    }

    fn trained(&self) -> bool {
        any_trained([Some(&self.weight), Some(&self.bias)])
    }

    /// `conv(silu(norm(x))) + shift` for a `[B, C, 1, 1]` `shift` (a resnet's first half, the
    /// time embedding's projection as the shift) as one node over `x`: the graph keeps neither
    /// the activation nor the convolution's output. Frozen parameters and an untracked shift;
    /// otherwise composed.
    pub fn silu_conv(
        &self,
        x: &Tensor,
        conv: &Conv2d,
        shift: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let forward = |x: &Tensor| broadcast_add(&conv.forward(&self.forward_silu(x)?)?, shift);
        let trained = self.trained() || conv.trained() || shift.track_op();
        with_input_grad(x, trained, forward, || NormSiluConvInputGrad {
            norm: self.clone(),
            conv: conv.clone(),
        })
    }

    /// `shortcut(r) + conv(silu(norm(h)))`, `shortcut` a frozen 1×1 conv or the identity (a
    /// resnet's second half and its residual sum) as one node over `(h, r)`: the graph keeps
    /// neither the activation, the convolution's output nor the shortcut's. Frozen parameters;
    /// otherwise composed.
    pub fn silu_conv_residual(
        &self,
        h: &Tensor,
        conv: &Conv2d,
        r: &Tensor,
        shortcut: Option<&Conv2d>,
    ) -> candle_core::Result<Tensor> {
        let forward = |h: &Tensor, r: &Tensor| {
            let residual = match shortcut {
                Some(s) => s.forward(r)?,
                None => r.clone(),
            };
            residual + conv.forward(&self.forward_silu(h)?)?
        };
        let grad = || NormSiluConvInputGrad {
            norm: self.clone(),
            conv: conv.clone(),
        };
        let trained = self.trained() || conv.trained() || shortcut.is_some_and(Conv2d::trained);
        match shortcut {
            Some(s) => with_residual_through((h, r), trained, forward, || (grad(), s.clone())),
            None => with_residual_through((h, r), trained, forward, || (grad(), Identity)),
        }
    }

    fn normalize(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let trained = self.trained();
        if cpu_gemm::cpu_f32(&[x]) && !trained {
            return cpu_norm::forward(x, &self.cpu_params(silu)?);
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
    fn grouped(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        x.reshape((b, self.groups, (c / self.groups) * h * w))
    }

    /// The normalisation as one pass of candle's layer-norm kernel over each group (mean and
    /// variance accumulated in f32 whatever the dtype, no f32 copy of `x`), then the affine. On a
    /// GPU this replaces about ten passes of candle's slower elementwise kernels over an f32 copy.
    fn fused(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let grouped = self.grouped(&x.contiguous()?)?;
        let len = grouped.dim(2)?;
        let (ones, zeros) = (
            Tensor::ones(len, x.dtype(), x.device())?,
            Tensor::zeros(len, x.dtype(), x.device())?,
        );
        let x_hat = candle_nn::ops::layer_norm(&grouped, &ones, &zeros, self.eps as f32)?
            .reshape(x.dims4()?)?;
        #[cfg(feature = "cuda")]
        if cuda_kernels::applies(&[&x_hat]) {
            let axis = cuda_kernels::ChannelAxis::Rows {
                channels: x.dim(1)?,
            };
            return cuda_kernels::channel_affine(
                &x_hat,
                &self.packed,
                axis,
                Some(0),
                Some(1),
                silu,
            );
        }
        self.affine(&x_hat, silu)
    }

    /// The normalisation from candle's ops (recorded where `x` or a parameter is tracked).
    fn composed(&self, x: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
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

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.normalize(x, false)
    }
}

/// Layer normalisation over the last dimension, composed so it has a backward pass.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn load(vb: &VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    fn trained(&self) -> bool {
        any_trained([Some(&self.weight), Some(&self.bias)])
    }

    /// The parameters `cpu_norm`'s kernels read (f32).
    fn cpu_params(&self) -> candle_core::Result<cpu_norm::LayerNormParams> {
        Ok(cpu_norm::LayerNormParams {
            eps: self.eps,
            weight: self.weight.to_dtype(DType::F32)?.to_vec1()?,
            bias: self.bias.to_dtype(DType::F32)?.to_vec1()?,
        })
    }

    /// The input gradient for the input `x` and the output gradient `dy` (frozen affine), by
    /// whichever kernel `forward` ran on.
    fn input_grad(&self, x: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
        if cpu_gemm::cpu_f32(&[x, dy]) {
            return cpu_norm::input_grad(x, dy, &self.cpu_params()?);
        }
        LayerNormInputGrad {
            weight: self.weight.clone(),
            eps: self.eps,
        }
        .input_grad(x, dy)
    }

    /// `norm(x)·Wᵀ + b` for a frozen `W` `[out, in]` and `b` as one node over `x`: the graph
    /// does not keep the normalised `x`, which a frozen layer's input gradient does not read.
    pub fn forward_linear(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let forward = |x: &Tensor| frozen_linear(&self.forward(x)?, weight, bias);
        let trained = self.trained() || any_trained([Some(weight), bias]);
        with_input_grad(x, trained, forward, || LayerNormLinearInputGrad {
            norm: self.clone(),
            weight: weight.clone(),
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // One pass for the values instead of nine recorded ops: `cpu_norm` on the CPU in f32
        // (values and input gradient), elsewhere candle's fused kernel on the input's own dtype
        // (it accumulates in f32, so no f32 copy of the activations is made), which has no
        // backward of its own, so the input gradient is attached by `LayerNormInputGrad`.
        let dtype = x.dtype();
        if self.trained() {
            // Trained affine parameters need their gradients: composed from recorded ops.
            let cd = compute_dtype(dtype);
            let (w, b) = (self.weight.to_dtype(cd)?, self.bias.to_dtype(cd)?);
            return standardized(&x.to_dtype(cd)?, self.eps)?
                .0
                .broadcast_mul(&w)?
                .broadcast_add(&b)?
                .to_dtype(dtype);
        }
        if cpu_gemm::cpu_f32(&[x]) {
            return cpu_norm::forward(x, &self.cpu_params()?);
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

/// `softmax(q·kᵀ/√d)·v` over `heads` heads of `[B, N, H·d]` queries and `[B, M, H·d]` keys and
/// values, returning `[B, N, H·d]`; scores in f32 when `upcast` (SD2's attention upcast).
/// One graph node either way: on the CPU in f32 our fused kernel (`cpu_attention`), elsewhere
/// candle's ops in blocks of query rows with a recomputing backward (`blocked_attention`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, upcast: bool) -> Result<Tensor> {
    if cpu_gemm::cpu_f32(&[q, k, v]) {
        return cpu_attention::attention(q, k, v, heads).context("attention");
    }
    blocked_attention::attention(q, k, v, heads, upcast).context("attention")
}

/// `(hidden, gate)`: the two halves of a GEGLU input `[…, 2·n]`.
fn geglu_halves(h: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
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
fn geglu_input_grad(h: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
    if cpu_gemm::cpu_f32(&[h, grad_out]) {
        return cpu_activation::geglu_input_grad(h, grad_out);
    }
    #[cfg(feature = "cuda")]
    if cuda_kernels::applies(&[h, grad_out]) {
        return cuda_kernels::geglu_backward(h, grad_out);
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
/// exact (erf) GELU: one node with its input gradient (on the CPU in f32 `cpu_activation`'s op).
pub fn geglu(h: &Tensor) -> candle_core::Result<Tensor> {
    if cpu_gemm::cpu_f32(&[h]) {
        return cpu_activation::geglu_op(h);
    }
    let forward = |h: &Tensor| {
        #[cfg(feature = "cuda")]
        if cuda_kernels::applies(&[h]) {
            return cuda_kernels::geglu_forward(h);
        }
        let (hidden, gate) = geglu_halves(h)?;
        hidden * gate.gelu_erf()?
    };
    with_input_grad(h, false, forward, || GegluInputGrad)
}

/// Nearest-neighbour resize of `[B, C, H, W]` to `[B, C, h, w]`. The usual exact ×2 is a
/// broadcast of each pixel over a 2×2 block, whose backward is a sum over the block: candle's
/// own `upsample_nearest2d` backward is a grouped convolution (one group per channel) that took
/// 2 % of an SD1.5 LoRA step on CPU.
pub fn upsample_nearest(x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (b, c, xh, xw) = x.dims4()?;
    if (h, w) != (2 * xh, 2 * xw) {
        return x.upsample_nearest2d(h, w);
    }
    x.reshape((b, c, xh, 1, xw, 1))?
        .broadcast_as((b, c, xh, 2, xw, 2))?
        .reshape((b, c, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::test_support::{max_abs, max_diff, max_rel_diff};
    use candle_core::{Device, Var};

    /// The frozen op's input gradient equals candle's plain autograd, and the frozen weight gets
    /// no gradient at all (plain autograd computes one).
    fn check(
        frozen: impl Fn(&Tensor) -> Tensor,
        plain: impl Fn(&Tensor) -> Tensor,
        x: Tensor,
        weight: &Tensor,
    ) {
        let x = Var::from_tensor(&x).unwrap();
        let g_frozen = frozen(x.as_tensor())
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_plain = plain(x.as_tensor())
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            g_frozen.get(x.as_tensor()).unwrap(),
            g_plain.get(x.as_tensor()).unwrap(),
        );
        // Relative: summation order differs (the stride-1 conv adjoint is a forward conv).
        let scale = max_abs(b);
        assert!(
            max_diff(a, b) <= 1e-6 * scale.max(1.0),
            "input gradients differ by {} (scale {scale})",
            max_diff(a, b)
        );
        // Any gradient shaped like the weight (or its transpose) is a weight gradient.
        let weight_grads = |g: &candle_core::backprop::GradStore| {
            let mut t = weight.dims().to_vec();
            t.reverse();
            g.get_ids()
                .filter(|id| {
                    let d = g.get_id(**id).unwrap().dims();
                    d == weight.dims() || (weight.rank() == 2 && d == t.as_slice())
                })
                .count()
        };
        assert!(
            weight_grads(&g_plain) > 0,
            "plain autograd differentiates the weight"
        );
        assert_eq!(
            weight_grads(&g_frozen),
            0,
            "frozen op computed a weight gradient"
        );
    }

    #[test]
    fn upsampling_matches_candle_and_its_gradient() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(8);
        for (h, w) in [(8, 6), (7, 5)] {
            let x = Var::from_tensor(&rng.normal_tensor((2, 3, 4, 3), &dev).unwrap()).unwrap();
            let upstream = rng.normal_tensor((2, 3, h, w), &dev).unwrap();
            let ours = upsample_nearest(&x, h, w).unwrap();
            let reference = x.upsample_nearest2d(h, w).unwrap();
            assert_eq!(max_diff(&ours, &reference), 0.0);
            if (h, w) != (8, 6) {
                continue; // candle has no backward for non-integer factors
            }
            let grad = |y: &Tensor| {
                let grads = (y * &upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                grads.get(&x).unwrap().clone()
            };
            assert!(max_diff(&grad(&ours), &grad(&reference)) < 1e-5);
        }
    }

    /// f32 takes the CPU kernels; f64 the path every other device and dtype takes (the output
    /// computed by candle, re-attached with its input gradient).
    const PATHS: [DType; 2] = [DType::F32, DType::F64];

    #[test]
    fn frozen_linear_gives_input_gradient_only() {
        for dtype in PATHS {
            let mut rng = Rng::new(0);
            let w = normal(&[5, 3], dtype, &mut rng);
            let b = normal(&[5], dtype, &mut rng);
            let x = normal(&[2, 4, 3], dtype, &mut rng);
            check(
                |x| frozen_linear(x, &w, Some(&b)).unwrap(),
                |x| {
                    x.broadcast_matmul(&w.t().unwrap())
                        .unwrap()
                        .broadcast_add(&b)
                        .unwrap()
                },
                x,
                &w,
            );
        }
    }

    #[test]
    fn frozen_conv_gives_input_gradient_only() {
        for dtype in PATHS {
            let mut rng = Rng::new(1);
            let w3 = normal(&[4, 3, 3, 3], dtype, &mut rng);
            let w1 = normal(&[4, 3, 1, 1], dtype, &mut rng);
            // Odd and even sizes, stride 1 and 2 (the UNet's downsamplers), padding 0 and 1;
            // 1×1 kernels (shortcuts and projections), which are products off the CPU kernel.
            for (w, size, stride, padding) in [
                (&w3, 7, 2, 1),
                (&w3, 8, 2, 1),
                (&w3, 6, 1, 1),
                (&w3, 5, 1, 0),
                (&w1, 6, 1, 0),
            ] {
                // Without a kept adjoint kernel, then twice with one (built, then reused).
                let kept = AdjointKernel::default();
                for adjoint in [None, Some(&kept), Some(&kept)] {
                    let x = normal(&[2, 3, size, size], dtype, &mut rng);
                    check(
                        |x| frozen_conv2d(x, w, None, padding, stride, adjoint).unwrap(),
                        |x| x.conv2d(w, padding, stride, 1, 1).unwrap(),
                        x,
                        w,
                    );
                }
            }
        }
    }

    #[test]
    fn frozen_ops_record_nothing_without_gradients() {
        let mut rng = Rng::new(2);
        let w = rng.normal_tensor((5, 3), &Device::Cpu).unwrap();
        let x = rng.normal_tensor((4, 3), &Device::Cpu).unwrap();
        let y = frozen_linear(&x, &w, None).unwrap();
        assert!(!y.track_op());
        assert!(max_diff(&y, &x.matmul(&w.t().unwrap()).unwrap()) < 1e-6);
    }

    /// A trained parameter (a `Var`: a full fine-tune) gets the same gradient through the layers
    /// here as through candle's plain ops, which the frozen path would have cut.
    #[test]
    fn trained_parameters_get_their_gradients() {
        let mut rng = Rng::new(3);
        let dev = Device::Cpu;
        let var = |shape: &[usize], rng: &mut Rng| {
            Var::from_tensor(&rng.normal_tensor(shape, &dev).unwrap()).unwrap()
        };
        let x = rng.normal_tensor((2, 3, 6, 6), &dev).unwrap();
        let (w, b) = (var(&[4, 3, 3, 3], &mut rng), var(&[1, 4, 1, 1], &mut rng));
        let (lw, lb) = (var(&[5, 6], &mut rng), var(&[5], &mut rng));
        let (nw, nb) = (var(&[5], &mut rng), var(&[5], &mut rng));
        let ours = || {
            let h = frozen_conv2d(&x, &w, Some(&b), 1, 1, None).unwrap();
            let h = frozen_linear(&h, &lw, Some(&lb)).unwrap();
            let norm = LayerNorm {
                weight: nw.as_tensor().clone(),
                bias: nb.as_tensor().clone(),
                eps: 1e-5,
            };
            norm.forward(&h).unwrap()
        };
        let plain = || {
            let h = x.conv2d(&w, 1, 1, 1, 1).unwrap().broadcast_add(&b).unwrap();
            let h = h.broadcast_matmul(&lw.t().unwrap()).unwrap();
            let h = h.broadcast_add(&lb).unwrap();
            let mean = h.mean_keepdim(D::Minus1).unwrap();
            let c = h.broadcast_sub(&mean).unwrap();
            let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let n = c
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap();
            n.broadcast_mul(&nw).unwrap().broadcast_add(&nb).unwrap()
        };
        let loss = |y: Tensor| y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let (g_ours, g_plain) = (loss(ours()), loss(plain()));
        for (name, p) in [("conv w", &w), ("conv b", &b), ("linear w", &lw)]
            .into_iter()
            .chain([("linear b", &lb), ("norm w", &nw), ("norm b", &nb)])
        {
            let a = g_ours.get(p.as_tensor()).expect(name);
            let e = g_plain.get(p.as_tensor()).unwrap();
            assert!(
                max_diff(a, e) < 1e-4,
                "{name}: gradients differ by {}",
                max_diff(a, e)
            );
        }
    }

    /// The trained-kernel convolution's gradients equal candle's plain autograd for the
    /// UNet's strides and paddings, odd and even sizes, 1×1 and 3×3 kernels.
    #[test]
    fn trained_conv_gradients_match_autograd() {
        let mut rng = Rng::new(4);
        let cases = [(3, 7, 2, 1), (3, 8, 2, 1), (3, 6, 1, 1), (1, 5, 1, 0)];
        for (dtype, (k, size, stride, padding)) in
            PATHS.into_iter().flat_map(|d| cases.map(|c| (d, c)))
        {
            let var = |shape: &[usize], rng: &mut Rng| {
                Var::from_tensor(&normal(shape, dtype, rng)).unwrap()
            };
            let w = var(&[4, 3, k, k], &mut rng);
            let x = var(&[2, 3, size, size], &mut rng);
            let loss = |y: Tensor| y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let ours = loss(frozen_conv2d(&x, &w, None, padding, stride, None).unwrap());
            let plain = loss(x.conv2d(&w, padding, stride, 1, 1).unwrap());
            for (name, p) in [("input", x.as_tensor()), ("kernel", w.as_tensor())] {
                let (a, e) = (ours.get(p).unwrap(), plain.get(p).unwrap());
                assert!(
                    max_diff(a, e) < 1e-4,
                    "k {k} size {size} stride {stride}: {name} gradients differ by {}",
                    max_diff(a, e)
                );
            }
        }
    }

    /// A standard normal tensor of `dtype` on the CPU.
    fn normal(shape: &[usize], dtype: DType, rng: &mut Rng) -> Tensor {
        rng.normal_tensor(shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    fn normal_f64(shape: &[usize], rng: &mut Rng) -> Tensor {
        normal(shape, DType::F64, rng)
    }

    /// Group norm over `channels` in `groups`, with random f64 affine parameters.
    fn random_group_norm(channels: usize, groups: usize, rng: &mut Rng) -> GroupNorm {
        let weight = normal_f64(&[channels], rng);
        GroupNorm::new(&weight, &normal_f64(&[channels], rng), groups, 1e-5).unwrap()
    }

    /// Input gradient of `f` for a random upstream gradient (a weighted sum as the loss).
    fn input_grad_of(f: impl Fn(&Tensor) -> Tensor, x: &Tensor, upstream: &Tensor) -> Tensor {
        let x = Var::from_tensor(x).unwrap();
        let loss = (f(x.as_tensor()) * upstream).unwrap().sum_all().unwrap();
        loss.backward().unwrap().get(x.as_tensor()).unwrap().clone()
    }

    /// Off the CPU kernel (here: f64), group norm is one node whose input gradient matches
    /// candle's autograd through the composed ops, with and without the SiLU.
    #[test]
    fn group_norm_node_gradient_matches_composed_group_norm() {
        let mut rng = Rng::new(5);
        let norm = random_group_norm(6, 3, &mut rng);
        let x = (normal_f64(&[2, 6, 3, 5], &mut rng) * 2.0).unwrap();
        let up = normal_f64(&[2, 6, 3, 5], &mut rng);
        for silu in [false, true] {
            let ours = |x: &Tensor| norm.normalize(x, silu).unwrap();
            let composed = |x: &Tensor| norm.composed(x, silu).unwrap();
            assert!(max_diff(&ours(&x), &composed(&x)) < 1e-12);
            let (a, b) = (
                input_grad_of(ours, &x, &up),
                input_grad_of(composed, &x, &up),
            );
            assert!(
                max_diff(&a, &b) < 1e-10,
                "silu {silu}: {}",
                max_diff(&a, &b)
            );
        }
    }

    /// Broadcasting on merged axes gives candle's values and gradients, for the layouts the
    /// UNet uses and for ones it cannot merge.
    #[test]
    fn merged_broadcasts_match_candle() {
        let mut rng = Rng::new(9);
        let dev = Device::Cpu;
        let cases: [(&[usize], &[usize]); 7] = [
            (&[2, 3, 4, 5], &[1, 3, 1, 1]),
            (&[2, 3, 4, 5], &[2, 3, 1, 1]),
            (&[2, 7, 5], &[5]),
            (&[2, 1, 4], &[1, 1, 4]),
            (&[3, 4], &[3, 1]),
            (&[2, 3, 4, 5], &[2, 1, 4, 1]),
            (&[2, 3], &[2, 3]),
        ];
        for (y_dims, b_dims) in cases {
            let y = Var::from_tensor(&rng.normal_tensor(y_dims, &dev).unwrap()).unwrap();
            let b = Var::from_tensor(&rng.normal_tensor(b_dims, &dev).unwrap()).unwrap();
            type Op = fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>;
            let pairs: [(Op, Op); 2] = [
                (broadcast_add, Tensor::broadcast_add),
                (broadcast_mul, Tensor::broadcast_mul),
            ];
            for (ours, candle) in pairs {
                let (a, c) = (ours(&y, &b).unwrap(), candle(&y, &b).unwrap());
                assert_eq!(a.dims(), c.dims());
                assert!(max_diff(&a, &c) < 1e-6, "{y_dims:?} with {b_dims:?}");
                let (ga, gc) = (
                    a.sqr().unwrap().sum_all().unwrap().backward().unwrap(),
                    c.sqr().unwrap().sum_all().unwrap().backward().unwrap(),
                );
                for v in [&y, &b] {
                    let diff = max_diff(ga.get(v).unwrap(), gc.get(v).unwrap());
                    assert!(diff < 1e-5, "{y_dims:?} with {b_dims:?}: gradient {diff}");
                }
            }
        }
    }

    /// Group norm from candle's layer-norm kernel (every device and dtype but CPU f32 and f64),
    /// in f32 and with f16 values, matches the composed normalisation in f64.
    #[test]
    fn fused_group_norm_matches_composed_group_norm() {
        let mut rng = Rng::new(8);
        let norm = random_group_norm(8, 4, &mut rng);
        // Not centred: the kernel's one-pass variance must hold with a mean.
        let x = ((normal_f64(&[2, 8, 5, 3], &mut rng) * 3.0).unwrap() + 1.5).unwrap();
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::F16, 2e-2)] {
            let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
            let norm_in = GroupNorm {
                weight: cast(&norm.weight),
                bias: cast(&norm.bias),
                ..norm.clone()
            };
            for silu in [false, true] {
                let ours = norm_in.fused(&cast(&x), silu).unwrap();
                let expected = norm.composed(&x, silu).unwrap();
                let err = max_rel_diff(&ours.to_dtype(DType::F64).unwrap(), &expected);
                assert!(err < tolerance, "{dtype:?}, silu {silu}: {err}");
            }
        }
    }

    /// Off the CPU kernel (here: f64), GEGLU is one node whose input gradient matches candle's
    /// autograd through the composed ops.
    #[test]
    fn geglu_node_gradient_matches_composed_geglu() {
        let mut rng = Rng::new(6);
        let normal = |shape: &[usize], rng: &mut Rng| (normal_f64(shape, rng) * 2.0).unwrap();
        let (h, up) = (normal(&[2, 5, 8], &mut rng), normal(&[2, 5, 4], &mut rng));
        let composed = |h: &Tensor| {
            let (hidden, gate) = geglu_halves(h).unwrap();
            (hidden * gate.gelu_erf().unwrap()).unwrap()
        };
        let ours = |h: &Tensor| geglu(h).unwrap();
        assert!(max_diff(&ours(&h), &composed(&h)) < 1e-12);
        let (a, b) = (
            input_grad_of(ours, &h, &up),
            input_grad_of(composed, &h, &up),
        );
        // candle's gelu_erf backward rounds 1/√(2π) to 0.398942 (a relative 7e-7).
        assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
    }

    #[test]
    fn fused_layer_norm_gradient_matches_composed_layer_norm() {
        let mut rng = Rng::new(4);
        let dev = Device::Cpu;
        let (w, b) = (
            rng.normal_tensor(6, &dev).unwrap(),
            rng.normal_tensor(6, &dev).unwrap(),
        );
        let norm = LayerNorm {
            weight: w.clone(),
            bias: b.clone(),
            eps: 1e-5,
        };
        let composed = |x: &Tensor| {
            let mean = x.mean_keepdim(D::Minus1).unwrap();
            let c = x.broadcast_sub(&mean).unwrap();
            let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let n = c
                .broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                .unwrap();
            n.broadcast_mul(&w).unwrap().broadcast_add(&b).unwrap()
        };
        let x = (rng.normal_tensor((2, 5, 6), &dev).unwrap() * 2.0).unwrap();
        let up = rng.normal_tensor((2, 5, 6), &dev).unwrap();
        assert!(max_diff(&norm.forward(&x).unwrap(), &composed(&x)) < 1e-5);
        let ours = input_grad_of(|x| norm.forward(x).unwrap(), &x, &up);
        let reference = input_grad_of(composed, &x, &up);
        assert!(
            max_diff(&ours, &reference) < 1e-5,
            "{}",
            max_diff(&ours, &reference)
        );
        assert!(max_diff(&norm.forward(&x).unwrap(), &composed(&x)) < 1e-5);
    }

    /// Values and the gradients of both inputs of `f(x, r)` for a weighted sum as the loss.
    fn value_and_grads(
        f: impl Fn(&Tensor, &Tensor) -> Tensor,
        x: &Tensor,
        r: &Tensor,
        up: &Tensor,
    ) -> [Tensor; 3] {
        let (x, r) = (Var::from_tensor(x).unwrap(), Var::from_tensor(r).unwrap());
        let y = f(x.as_tensor(), r.as_tensor());
        let grads = (&y * up).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = |v: &Var| match grads.get(v.as_tensor()) {
            Some(g) => g.clone(),
            None => v.zeros_like().unwrap(),
        };
        [y.clone(), grad(&x), grad(&r)]
    }

    /// Each fused node (a frozen layer with the norm before it, or with what comes before it and
    /// the residual sum after it) gives the values and the input and residual gradients of the
    /// same computation composed from candle's ops and differentiated by candle's autograd: on
    /// the CPU kernels (f32) and on the path other devices take (f64 here; candle's `gelu_erf`
    /// backward rounds 1/√(2π) to a relative 7e-7, which bounds the f64 tolerance).
    #[test]
    fn fused_nodes_match_composed_ops_and_their_gradients() {
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-6)] {
            let mut rng = Rng::new(8);
            let mut normal = |shape: &[usize]| normal(shape, dtype, &mut rng);
            let (b, h, w, c, inner) = (2, 3, 4, 6, 8);
            let n = h * w;
            let (w_out, b_out) = (normal(&[c, c]), normal(&[c]));
            let (w_ff, b_ff) = (normal(&[c, inner]), normal(&[c]));
            let (w_in, b_in) = (normal(&[2 * inner, c]), normal(&[2 * inner]));
            let group_norm = GroupNorm::new(&normal(&[c]), &normal(&[c]), 3, 1e-5).unwrap();
            let layer_norm = LayerNorm {
                weight: normal(&[c]),
                bias: normal(&[c]),
                eps: 1e-5,
            };
            let linear = |x: &Tensor, w: &Tensor, b: &Tensor| {
                x.broadcast_matmul(&w.t().unwrap())
                    .unwrap()
                    .broadcast_add(b)
                    .unwrap()
            };
            let tokens_of =
                |x: &Tensor| x.permute((0, 2, 3, 1)).unwrap().reshape((b, n, c)).unwrap();
            let image_of = |t: &Tensor| {
                t.reshape((b, h, w, c))
                    .unwrap()
                    .permute((0, 3, 1, 2))
                    .unwrap()
            };
            let conv = |c_in: usize,
                        c_out: usize,
                        k: usize,
                        normal: &mut dyn FnMut(&[usize]) -> Tensor| {
                Conv2d {
                    weight: (normal(&[c_out, c_in, k, k]) * 0.3).unwrap(),
                    bias: normal(&[1, c_out, 1, 1]),
                    stride: 1,
                    padding: k / 2,
                    adjoint: AdjointKernel::default(),
                }
            };
            let (conv3, shortcut) = (conv(c, c, 3, &mut normal), conv(4, c, 1, &mut normal));
            let shift = normal(&[b, c, 1, 1]);
            let composed_conv = |x: &Tensor, conv: &Conv2d| {
                x.conv2d(&conv.weight, conv.padding, 1, 1, 1)
                    .unwrap()
                    .broadcast_add(&conv.bias)
                    .unwrap()
            };
            let composed_silu_conv =
                |x: &Tensor| composed_conv(&group_norm.composed(x, true).unwrap(), &conv3);
            type Fused<'a> = Box<dyn Fn(&Tensor, &Tensor) -> Tensor + 'a>;
            let cases: [(&str, Tensor, Tensor, Fused, Fused); 8] = [
                (
                    "group norm + silu + conv + shift",
                    (normal(&[b, c, h, w]) * 2.0).unwrap(),
                    normal(&[1]),
                    Box::new(|x, _| group_norm.silu_conv(x, &conv3, &shift).unwrap()),
                    Box::new(|x, _| composed_silu_conv(x).broadcast_add(&shift).unwrap()),
                ),
                (
                    "group norm + silu + conv + residual",
                    (normal(&[b, c, h, w]) * 2.0).unwrap(),
                    normal(&[b, c, h, w]),
                    Box::new(|x, r| group_norm.silu_conv_residual(x, &conv3, r, None).unwrap()),
                    Box::new(|x, r| (composed_silu_conv(x) + r).unwrap()),
                ),
                (
                    "group norm + silu + conv + shortcut",
                    (normal(&[b, c, h, w]) * 2.0).unwrap(),
                    normal(&[b, 4, h, w]),
                    Box::new(|x, r| {
                        group_norm
                            .silu_conv_residual(x, &conv3, r, Some(&shortcut))
                            .unwrap()
                    }),
                    Box::new(|x, r| (composed_silu_conv(x) + composed_conv(r, &shortcut)).unwrap()),
                ),
                (
                    "linear + residual",
                    normal(&[b, n, c]),
                    normal(&[b, n, c]),
                    Box::new(|x, r| frozen_linear_residual(x, &w_out, Some(&b_out), r).unwrap()),
                    Box::new(|x, r| (linear(x, &w_out, &b_out) + r).unwrap()),
                ),
                (
                    "geglu + linear + residual",
                    (normal(&[b, n, 2 * inner]) * 2.0).unwrap(),
                    normal(&[b, n, c]),
                    Box::new(|x, r| geglu_linear_residual(x, &w_ff, Some(&b_ff), r).unwrap()),
                    Box::new(|x, r| {
                        let (hidden, gate) = geglu_halves(x).unwrap();
                        let a = (hidden * gate.gelu_erf().unwrap()).unwrap();
                        (linear(&a, &w_ff, &b_ff) + r).unwrap()
                    }),
                ),
                (
                    "tokens to image + residual",
                    normal(&[b, n, c]),
                    normal(&[b, c, h, w]),
                    Box::new(|x, r| project_to_image_residual(x, &w_out, Some(&b_out), r).unwrap()),
                    Box::new(|x, r| (image_of(&linear(x, &w_out, &b_out)) + r).unwrap()),
                ),
                (
                    "group norm to tokens",
                    (normal(&[b, c, h, w]) * 2.0).unwrap(),
                    normal(&[1]),
                    Box::new(|x, _| {
                        group_norm
                            .forward_to_tokens(x, &w_out, Some(&b_out))
                            .unwrap()
                    }),
                    Box::new(|x, _| {
                        let normed = group_norm.composed(x, false).unwrap();
                        linear(&tokens_of(&normed), &w_out, &b_out)
                    }),
                ),
                (
                    "layer norm + linear",
                    (normal(&[b, n, c]) * 2.0).unwrap(),
                    normal(&[1]),
                    Box::new(|x, _| layer_norm.forward_linear(x, &w_in, Some(&b_in)).unwrap()),
                    Box::new(|x, _| {
                        let (x_hat, _) = standardized(x, 1e-5).unwrap();
                        let normed = x_hat
                            .broadcast_mul(&layer_norm.weight)
                            .unwrap()
                            .broadcast_add(&layer_norm.bias)
                            .unwrap();
                        linear(&normed, &w_in, &b_in)
                    }),
                ),
            ];
            for (name, x, r, fused, composed) in &cases {
                let out_shape = composed(x, r).dims().to_vec();
                let up = normal(&out_shape);
                let ours = value_and_grads(fused, x, r, &up);
                let reference = value_and_grads(composed, x, r, &up);
                for (what, a, e) in [
                    ("value", &ours[0], &reference[0]),
                    ("input gradient", &ours[1], &reference[1]),
                    ("residual gradient", &ours[2], &reference[2]),
                ] {
                    let err = max_rel_diff(a, e);
                    assert!(err < tol, "{name} ({dtype:?}): {what} differs by {err:.2e}");
                }
            }
        }
    }
}
