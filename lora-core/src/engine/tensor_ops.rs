//! Tensor helpers every layer shares: broadcasts on merged axes, products with a matrix shared
//! across a batch, copies, layout changes between images and tokens, and the compute dtype.

use candle_core::{CustomOp2, DType, Tensor};

use super::autograd::{forward_from_computed_output, grad_if_tracked, ComputedOutput};
use super::kernels::cpu::gemm::cpu_f32;
use super::kernels::cpu::transpose::batched_transpose;

#[cfg(feature = "cuda")]
use super::kernels::cuda;

/// `y + b` for an optional bias `b` broadcast against `y`: on CUDA, outside the graph, one pass of
/// our per-channel kernel.
pub(crate) fn add_bias(y: Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let Some(b) = bias else { return Ok(y) };
    #[cfg(feature = "cuda")]
    if !y.track_op() && !b.track_op() && cuda::applies(&[&y, b]) {
        if let Some(axis) = cuda::bias_axis(y.dims(), b.dims()) {
            let params = b.reshape((1, ()))?;
            return cuda::channel_affine(&y, &params, axis, None, Some(0), false);
        }
    }
    broadcast_add(&y, b)
}

/// `a·b` where one operand is a matrix shared by every element of the other's batch. candle's
/// `broadcast_matmul` copies a shared left matrix once per batch element, and a shared right one
/// too unless the left operand is contiguous: for a conv kernel, a full copy per sample. Here a
/// shared left matrix is a stride-0 view, which the strided-batched product reads in place, and a
/// left batch is made contiguous so that candle folds it into the rows of one product with the
/// shared right matrix.
pub(crate) fn shared_matmul(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    match (a.rank(), b.rank()) {
        (2, 3) => a.broadcast_as((b.dim(0)?, a.dim(0)?, a.dim(1)?))?.matmul(b),
        (r, 2) if r > 2 => contiguous(a)?.broadcast_matmul(b),
        _ => a.broadcast_matmul(b),
    }
}

/// `x.contiguous()`, copied by our kernels on CUDA (candle's strided copy divides per element per
/// axis, which makes its copies cost more than a step's matrix products on a GPU).
pub(crate) fn contiguous(x: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    return cuda::contiguous(x);
    #[cfg(not(feature = "cuda"))]
    x.contiguous()
}

/// `y + b` for `b` broadcast against `y`. See [`broadcast_op`].
pub fn broadcast_add(y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    broadcast_op(y, b, BroadcastKind::Add)
}

/// `y − b` for `b` broadcast against `y`. See [`broadcast_op`].
pub fn broadcast_sub(y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    broadcast_op(y, b, BroadcastKind::Sub)
}

/// `y ⊙ b` for `b` broadcast against `y`. See [`broadcast_op`].
pub fn broadcast_mul(y: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    broadcast_op(y, b, BroadcastKind::Mul)
}

/// `op(y, b)` for `b` broadcast against `y`, computed on views of both in which neighbouring
/// axes are merged wherever `b` is broadcast along both or along neither: a per-channel
/// `[B, C, H, W] + [1, C, 1, 1]` runs as `[B, C, H·W] + [1, C, 1]`, a bias `[B, N, O] + [O]` as
/// `[B·N, O] + [1, O]`. candle's CUDA kernels compute each element's broadcast index with a
/// division per axis, which makes a bias addition cost more than the product it follows; fewer
/// axes, fewer divisions. Where a gradient flows to `b` (a trained bias or norm weight), the op
/// is one [`BroadcastNode`], whose backward sums `b`'s gradient by contiguous row sums and a
/// product with a ones vector. Same values and gradients as `op(y, b)`.
fn broadcast_op(y: &Tensor, b: &Tensor, kind: BroadcastKind) -> candle_core::Result<Tensor> {
    let op = |y: &Tensor, b: &Tensor| match kind {
        BroadcastKind::Add => y.broadcast_add(b),
        BroadcastKind::Sub => y.broadcast_sub(b),
        BroadcastKind::Mul => y.broadcast_mul(b),
    };
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
    let y_view: Vec<usize> = merged.iter().map(|&(n, _)| n).collect();
    let b_view: Vec<usize> = merged
        .iter()
        .map(|&(n, broadcast)| if broadcast { 1 } else { n })
        .collect();
    let summed_for_b = merged.iter().any(|&(_, broadcast)| broadcast);
    if b.track_op() && summed_for_b {
        let (y_merged, b_merged) = (y.reshape(y_view)?, b.reshape(b_view)?);
        let output = op(&y_merged.detach(), &b_merged.detach())?.contiguous()?;
        return y_merged
            .apply_op2(
                &b_merged,
                BroadcastNode {
                    output: ComputedOutput::new(output),
                    kind,
                    merged,
                },
            )?
            .reshape(y_dims);
    }
    if merged.len() == y_dims.len() {
        return op(y, b);
    }
    op(&y.reshape(y_view)?, &b.reshape(b_view)?)?.reshape(y_dims)
}

#[derive(Debug, Clone, Copy)]
enum BroadcastKind {
    Add,
    Sub,
    Mul,
}

/// `y + b`, `y − b` or `y ⊙ b` on merged views (see [`broadcast_op`]) with a backward whose
/// gradient for `b` avoids candle's: candle sums a broadcast operand's gradient over all its
/// broadcast axes in one reduction that divides every element's index per axis, which dominates
/// a full fine-tune of a small UNet (its conv biases and norm weights); here the trailing
/// broadcast axis is summed as contiguous rows and a leading one by a product with a ones vector.
struct BroadcastNode {
    output: ComputedOutput,
    kind: BroadcastKind,
    /// The merged axes: extent, and whether `b` is broadcast along it.
    merged: Vec<(usize, bool)>,
}

impl CustomOp2 for BroadcastNode {
    fn name(&self) -> &'static str {
        "broadcast-with-summed-gradient"
    }

    forward_from_computed_output!(y, b);

    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad_out: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = grad_if_tracked(y, || match self.kind {
            BroadcastKind::Mul => grad_out.broadcast_mul(b),
            BroadcastKind::Add | BroadcastKind::Sub => Ok(grad_out.clone()),
        })?;
        let db = match self.kind {
            BroadcastKind::Add => sum_over_broadcast(grad_out, &self.merged)?,
            BroadcastKind::Sub => sum_over_broadcast(grad_out, &self.merged)?.neg()?,
            BroadcastKind::Mul => sum_over_broadcast(&(grad_out * y)?, &self.merged)?,
        };
        Ok((dy, Some(db)))
    }
}

/// `g` (on the merged axes) summed over the axes where `b` is broadcast, shaped like `b`'s view.
fn sum_over_broadcast(g: &Tensor, merged: &[(usize, bool)]) -> candle_core::Result<Tensor> {
    let mut g = g.contiguous()?;
    let mut dims: Vec<usize> = merged.iter().map(|&(n, _)| n).collect();
    for (axis, &(n, broadcast)) in merged.iter().enumerate().rev() {
        if !broadcast {
            continue;
        }
        let outer: usize = dims[..axis].iter().product();
        let inner: usize = dims[axis + 1..].iter().product();
        g = if inner == 1 {
            // The broadcast axis is innermost: contiguous row sums.
            g.reshape((outer, n))?.sum_keepdim(1)?
        } else if outer == 1 {
            // The outermost axis: `1ᵀ·G` as one matrix product.
            let ones = Tensor::ones((1, n), g.dtype(), g.device())?;
            ones.matmul(&g.reshape((n, inner))?)?
        } else {
            g.reshape((outer, n, inner))?.sum_keepdim(1)?
        };
        dims[axis] = 1;
        g = g.reshape(dims.as_slice())?;
    }
    Ok(g)
}

/// `[B, N, C]` tokens of an `h × w` image as `[B, C, h, w]`.
pub fn tokens_to_image(t: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (b, _, c) = t.dims3()?;
    if cpu_f32(&[t]) {
        return batched_transpose(t)?.reshape((b, c, h, w));
    }
    contiguous(&t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?)
}

/// `[B, C, h, w]` as `[B, h·w, C]` tokens.
pub fn image_to_tokens(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if cpu_f32(&[x]) {
        return batched_transpose(&x.reshape((b, c, h * w))?);
    }
    contiguous(&x.permute((0, 2, 3, 1))?)?.reshape((b, h * w, c))
}

/// `Σ terms` (each the same shape), or `None` for no terms.
pub(crate) fn sum_of<E: From<candle_core::Error>>(
    terms: impl IntoIterator<Item = Result<Tensor, E>>,
) -> Result<Option<Tensor>, E> {
    terms.into_iter().try_fold(None, |sum, term| {
        let term = term?;
        Ok(Some(match sum {
            Some(s) => (s + term)?,
            None => term,
        }))
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

/// Nearest-neighbour resize of `[B, C, H, W]` to `[B, C, h, w]`. The usual exact ×2 is a
/// broadcast of each pixel over a 2×2 block, whose backward is a sum over the block: candle's
/// own `upsample_nearest2d` backward is a grouped convolution (one group per channel), far slower
/// than that sum.
pub fn upsample_nearest(x: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (b, c, xh, xw) = x.dims4()?;
    if (h, w) != (2 * xh, 2 * xw) {
        return x.upsample_nearest2d(h, w);
    }
    x.reshape((b, c, xh, 1, xw, 1))?
        .broadcast_as((b, c, xh, 2, xw, 2))?
        .reshape((b, c, h, w))
}
