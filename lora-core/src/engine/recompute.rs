//! Gradient checkpointing (activation recomputation): a forward pass that keeps only the values
//! passed between layers, and a backward pass that recomputes one layer at a time with its graph,
//! takes that layer's gradients and drops it before the next.
//!
//! Why: candle's graph hangs off the output tensor, so a tracked forward pass keeps every
//! activation alive until `backward()` returns; in a UNet training step those activations are
//! most of the memory. `torch.utils.checkpoint`, behind diffusers' and kohya's
//! `--gradient_checkpointing`, makes the same trade: one more forward pass of each layer.
//!
//! A model writes its forward pass once, over a [`LayerRunner`]: [`Direct`] runs each layer
//! on tensors as they come, [`CheckpointedForward`] runs it and records it for the backward
//! pass.

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// Runs a forward pass's layers. A layer is a function of tensors given by the values it reads;
/// the runner decides what is kept of it.
pub(crate) trait LayerRunner<'a> {
    /// What the forward pass passes between layers.
    type Value: Clone;

    /// Runs `layer` on `inputs` and returns its output.
    fn layer(
        &mut self,
        inputs: &[&Self::Value],
        layer: impl Fn(&[Tensor]) -> Result<Tensor> + 'a,
    ) -> Result<Self::Value>;

    /// The tensor of `value`, for shapes the forward pass reads.
    fn tensor<'v>(&'v self, value: &'v Self::Value) -> Result<&'v Tensor>;
}

/// The plain forward pass: layers on tensors, with whatever graph candle records.
pub(crate) struct Direct;

impl<'a> LayerRunner<'a> for Direct {
    type Value = Tensor;

    fn layer(
        &mut self,
        inputs: &[&Tensor],
        layer: impl Fn(&[Tensor]) -> Result<Tensor> + 'a,
    ) -> Result<Tensor> {
        let inputs: Vec<Tensor> = inputs.iter().map(|&t| t.clone()).collect();
        layer(&inputs)
    }

    fn tensor<'v>(&'v self, value: &'v Tensor) -> Result<&'v Tensor> {
        Ok(value)
    }
}

type LayerFn<'a> = Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>;

/// A layer the backward pass recomputes: the values it reads and the value it wrote.
struct RecordedLayer<'a> {
    inputs: Vec<usize>,
    output: usize,
    run: LayerFn<'a>,
}

/// A forward pass that kept only the values between its layers (detached, so each layer's graph
/// was freed as soon as its output was taken), and the layers to recompute for the gradients.
/// Values are numbered in the order they were made.
pub struct CheckpointedForward<'a> {
    /// Detached values; the backward pass drops each once no layer left to recompute reads it.
    values: Vec<Option<Tensor>>,
    /// Whether a gradient reaches the value: it depends on a trained variable.
    needs_grad: Vec<bool>,
    /// The layers whose output needs a gradient, in forward order; the others are never
    /// recomputed.
    layers: Vec<RecordedLayer<'a>>,
    /// The output value and the variable standing for it, which the loss is computed from.
    output: Option<(usize, Var)>,
    /// Inputs computed from trained variables outside the pass (the text encoder's output when
    /// it trains), with their graphs: the backward pass continues into them.
    tracked_inputs: Vec<(usize, Tensor)>,
}

impl<'a> CheckpointedForward<'a> {
    pub(crate) fn new() -> Self {
        Self {
            values: Vec::new(),
            needs_grad: Vec::new(),
            layers: Vec::new(),
            output: None,
            tracked_inputs: Vec::new(),
        }
    }

    /// One of the model's inputs. Its graph, if it has one (it was computed from trained
    /// variables), is kept for the backward pass; otherwise no gradient is taken for it.
    pub(crate) fn input(&mut self, tensor: &Tensor) -> usize {
        let tracked = tensor.track_op();
        let value = self.push(tensor.detach(), tracked);
        if tracked {
            self.tracked_inputs.push((value, tensor.clone()));
        }
        value
    }

    /// Marks `value` as the forward pass's output and returns it as a variable's tensor: compute
    /// the loss from it and pass the loss to [`Self::backward`].
    pub(crate) fn finish(&mut self, value: usize) -> Result<Tensor> {
        let prediction = Var::from_tensor(self.value(value)?)?;
        let tensor = prediction.as_tensor().clone();
        self.output = Some((value, prediction));
        Ok(tensor)
    }

    fn push(&mut self, tensor: Tensor, needs_grad: bool) -> usize {
        self.values.push(Some(tensor));
        self.needs_grad.push(needs_grad);
        self.values.len() - 1
    }

    fn value(&self, value: usize) -> Result<&Tensor> {
        self.values
            .get(value)
            .and_then(Option::as_ref)
            .with_context(|| format!("checkpointed value {value} is no longer kept"))
    }

    /// The gradients of `params` for `loss`, a scalar computed from the prediction the model's
    /// checkpointed forward pass returned (the output [`Self::finish`] made): candle's backward pass
    /// over the loss gives the prediction's gradient; then each recorded layer, last first, is
    /// run again on its kept inputs with its graph, and candle's backward pass from
    /// Σ output·(output's gradient) gives the gradients of its inputs and of the parameters it
    /// uses; last, the same sum over each tracked input and its gradient continues into the graph
    /// that made the input. Parameters nothing uses get no entry, as in candle's own `backward`.
    pub fn backward(mut self, loss: &Tensor, params: &[Var]) -> Result<GradStore> {
        let (output, prediction) = self
            .output
            .take()
            .context("the checkpointed forward pass has no output")?;
        let output_grad = loss
            .backward()?
            .remove(prediction.as_tensor())
            .context("the loss does not depend on the checkpointed pass's prediction")?;
        drop(prediction);
        let mut grads: Vec<Option<Tensor>> = vec![None; self.values.len()];
        grads[output] = Some(output_grad.detach());
        let mut param_grads = GradStore::default();
        for layer in std::mem::take(&mut self.layers).into_iter().rev() {
            // Every reader of the output came later in the forward pass and is done.
            self.values[layer.output] = None;
            let Some(grad) = grads[layer.output].take() else {
                continue; // nothing downstream that depends on the loss read it
            };
            let mut input_vars = Vec::new();
            let mut inputs = Vec::with_capacity(layer.inputs.len());
            for &v in &layer.inputs {
                let value = self.value(v)?;
                if self.needs_grad[v] {
                    let var = Var::from_tensor(value)?;
                    inputs.push(var.as_tensor().clone());
                    input_vars.push((v, var));
                } else {
                    inputs.push(value.clone());
                }
            }
            let out = (layer.run)(&inputs)?;
            let mut layer_grads = (out * &grad)?.sum_all()?.backward()?;
            for (v, var) in input_vars {
                if let Some(g) = layer_grads.remove(var.as_tensor()) {
                    grads[v] = Some(accumulate(grads[v].take(), &g)?);
                }
            }
            for param in params {
                if let Some(g) = layer_grads.remove(param.as_tensor()) {
                    let sum = accumulate(param_grads.remove(param.as_tensor()), &g)?;
                    param_grads.insert(param.as_tensor(), sum);
                }
            }
        }
        for (value, input) in std::mem::take(&mut self.tracked_inputs) {
            let Some(grad) = grads[value].take() else {
                continue;
            };
            let mut input_grads = (input * grad)?.sum_all()?.backward()?;
            for param in params {
                if let Some(g) = input_grads.remove(param.as_tensor()) {
                    let sum = accumulate(param_grads.remove(param.as_tensor()), &g)?;
                    param_grads.insert(param.as_tensor(), sum);
                }
            }
        }
        Ok(param_grads)
    }
}

/// `sum + g` (or `g` alone), with `g` detached: candle leaves a variable's gradient attached to
/// the graph that computed it (an input gradient through a trained weight records that weight),
/// so the next layer's backward would differentiate through it again.
fn accumulate(sum: Option<Tensor>, g: &Tensor) -> Result<Tensor> {
    let g = g.detach();
    Ok(match sum {
        Some(sum) => (sum + g)?,
        None => g,
    })
}

impl<'a> LayerRunner<'a> for CheckpointedForward<'a> {
    type Value = usize;

    fn layer(
        &mut self,
        inputs: &[&usize],
        layer: impl Fn(&[Tensor]) -> Result<Tensor> + 'a,
    ) -> Result<usize> {
        let tensors = inputs
            .iter()
            .map(|&&v| self.value(v).cloned())
            .collect::<Result<Vec<_>>>()?;
        let out = layer(&tensors)?;
        // The inputs are detached, so a recorded graph means the layer uses a variable.
        let needs_grad = out.track_op() || inputs.iter().any(|&&v| self.needs_grad[v]);
        let output = self.push(out.detach(), needs_grad);
        if needs_grad {
            self.layers.push(RecordedLayer {
                inputs: inputs.iter().map(|&&v| v).collect(),
                output,
                run: Box::new(layer),
            });
        }
        Ok(output)
    }

    fn tensor<'v>(&'v self, value: &'v usize) -> Result<&'v Tensor> {
        self.value(*value)
    }
}
