//! The autograd plumbing of the engine: values computed outside candle's graph and re-attached
//! to it with a backward of our own, which returns only the gradients that can flow.
//!
//! Frozen weights: candle's backward computes the gradient of *both* operands of every matmul and
//! convolution, so a LoRA step would also compute (and keep until the step ends) a gradient for
//! every frozen weight: about a third of the backward work and a weight-sized buffer per layer.
//! Here the output is computed without recording it and re-attached to the input's graph by a
//! custom op whose backward returns only the input gradient.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, Shape, Storage, Tensor};

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
pub(crate) trait InputGradient: Send + Sync + 'static {
    const NAME: &'static str;
    fn input_grad(&self, input: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor>;
}

/// `input → output` for an `output` computed from `input` outside the graph, with a backward that
/// sends the output gradient to the input only.
pub(crate) struct Reattach<G> {
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
pub(crate) fn any_trained<'a>(params: impl IntoIterator<Item = Option<&'a Tensor>>) -> bool {
    params.into_iter().flatten().any(Tensor::track_op)
}

/// Runs `forward` untracked and re-attaches its output to `x`'s graph with the backward `grad`
/// computes (input gradient only); when no gradient can flow to `x` (inference) it is a plain
/// call, and so it is when `forward` reads trained parameters (their gradients are needed).
pub(crate) fn with_input_grad<G: InputGradient>(
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
/// well as the sum. As one node it keeps the sum only, which in the transformer blocks and resnets
/// is most of the difference between what candle's graph would keep and what PyTorch saves.
pub(crate) struct ResidualNode<G, R> {
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
pub(crate) struct Identity;

impl InputGradient for Identity {
    const NAME: &'static str = "identity";
    fn input_grad(&self, _: &Tensor, grad_out: &Tensor) -> candle_core::Result<Tensor> {
        Ok(grad_out.clone())
    }
}

/// `residual + forward(x)` as one [`ResidualNode`] (see [`with_residual_through`]).
pub(crate) fn with_residual<G: InputGradient>(
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
pub(crate) fn with_residual_through<G: InputGradient, R: InputGradient>(
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
