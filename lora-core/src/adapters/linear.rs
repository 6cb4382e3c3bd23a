//! The adapted layer: a frozen Linear (or 1×1 conv) with unmerged adapters on top, and the graph
//! nodes that train one adapter without keeping the base output or the low-rank delta. Where no
//! adapter is attached, the layer runs as the engine's fused frozen nodes with its neighbours.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{CustomOp3, DType, Module, Tensor, D};
use candle_nn::VarBuilder;

use super::lycoris::LycorisModule;
use super::module::{
    dora_channel_factor, AdapterModule, AdapterModules, LoraModule, ModuleInfo, ModuleKind,
};
use crate::engine::autograd::{forward_from_computed_output, grad_if_tracked, ComputedOutput};
use crate::engine::linear::{frozen_linear_input_grad_plus_low_rank, frozen_linear_plus_low_rank};
use crate::engine::tensor_ops::{
    contiguous, image_to_tokens, shared_matmul, sum_of, tokens_to_image,
};
use crate::engine::{
    frozen_conv2d, frozen_linear, fused, geglu, AdjointKernel, GroupNormLayer, LayerNormLayer,
};

/// An adapter attached to a layer: its weights, `alpha / rank` and its multiplier.
#[derive(Debug, Clone)]
pub(super) struct AttachedLora {
    pub(super) name: String,
    pub(super) down: Tensor,
    pub(super) up: Tensor,
    /// `alpha / rank`.
    pub(super) scale: f64,
    pub(super) multiplier: f64,
    /// DoRA's magnitude `[out]` (see [`super::module`]).
    pub(super) magnitude: Option<Tensor>,
}

/// A LyCORIS LoHa/LoKr module attached to a layer, with its multiplier: the layer adds
/// `multiplier · ΔW` applied to its input, `ΔW` computed from the factors each pass (so its
/// gradient reaches them through candle's backward pass).
#[derive(Debug, Clone)]
pub(super) struct AttachedLycoris {
    pub(super) name: String,
    pub(super) module: LycorisModule,
    pub(super) multiplier: f64,
}

impl AttachedLycoris {
    /// `multiplier · ΔW` `[out, in·kh·kw]` in `dtype`.
    pub(super) fn scaled_delta(&self, dtype: DType) -> Result<Tensor> {
        Ok((self.module.delta_weight()? * self.multiplier)?.to_dtype(dtype)?)
    }
}

/// The adapters attached to one layer: LoRA (DoRA included) and LyCORIS modules.
#[derive(Debug, Clone, Default)]
pub(super) struct Attached {
    pub(super) lora: Vec<AttachedLora>,
    pub(super) lycoris: Vec<AttachedLycoris>,
}

impl Attached {
    pub(super) fn is_empty(&self) -> bool {
        self.lora.is_empty() && self.lycoris.is_empty()
    }

    pub(super) fn push(&mut self, name: &str, module: &AdapterModule, multiplier: f64) {
        match module {
            AdapterModule::Lora(m) => self.lora.push(AttachedLora::new(name, m, multiplier)),
            AdapterModule::Lycoris(m) => self.lycoris.push(AttachedLycoris {
                name: name.to_string(),
                module: m.clone(),
                multiplier,
            }),
        }
    }

    /// Removes the adapters attached under `name`; returns whether there was one.
    pub(super) fn remove(&mut self, name: &str) -> bool {
        let before = self.lora.len() + self.lycoris.len();
        self.lora.retain(|a| a.name != name);
        self.lycoris.retain(|a| a.name != name);
        before != self.lora.len() + self.lycoris.len()
    }
}

impl AttachedLora {
    pub(super) fn new(name: &str, module: &LoraModule, multiplier: f64) -> Self {
        Self {
            name: name.to_string(),
            down: module.down.clone(),
            up: module.up.clone(),
            scale: module.scale(),
            multiplier,
            magnitude: module.magnitude.clone(),
        }
    }

    /// The factor of the low-rank product in the output, `multiplier · alpha / rank`; for DoRA
    /// `alpha / rank` (the multiplier applies to the whole DoRA change, see
    /// [`Self::contribution`]).
    pub(super) fn factor(&self) -> f64 {
        match self.magnitude {
            Some(_) => self.scale,
            None => self.multiplier * self.scale,
        }
    }

    /// Its low-rank part (no DoRA magnitude) outside the graph.
    fn detached_low_rank(&self) -> Self {
        Self {
            name: self.name.clone(),
            down: self.down.detach(),
            up: self.up.detach(),
            scale: self.scale,
            multiplier: self.multiplier,
            magnitude: None,
        }
    }

    /// DoRA's factor `m / ‖W + ΔW‖` per output channel for the layer's `weight` (`[out, …]`),
    /// f32 `[out]`, the norm a constant of the graph; `None` for plain LoRA.
    fn dora_factor(&self, weight: &Tensor) -> Result<Option<Tensor>> {
        let Some(magnitude) = &self.magnitude else {
            return Ok(None);
        };
        let delta = (self.up.detach().matmul(&self.down.detach())? * self.scale)?;
        let adapted = (weight.flatten_from(1)?.to_dtype(DType::F32)? + delta)?;
        Ok(Some(dora_channel_factor(magnitude, &adapted)?))
    }

    /// The adapter's change of the layer's output, from `low_rank` (`factor() · up(down(x))`)
    /// and, for DoRA only, `plain` (the frozen layer's output without its bias): plain LoRA
    /// `low_rank`; DoRA `λ · ((c − 1) · plain + c · low_rank)` with `c` its
    /// [`Self::dora_factor`] shaped `channel_shape` (`[out]` for tokens, `[1, out, 1, 1]` for
    /// images), which is `λ · (W' − W)` applied to the input.
    pub(super) fn contribution(
        &self,
        weight: &Tensor,
        low_rank: Tensor,
        plain: impl FnOnce() -> Result<Tensor>,
        channel_shape: &[usize],
    ) -> Result<Tensor> {
        let Some(c) = self.dora_factor(weight)? else {
            return Ok(low_rank);
        };
        // `c − 1` formed in f32 before any cast: near 1, half precision would round small
        // changes of the magnitude to nothing. `(c − 1)·plain + c·low_rank` as
        // `(c − 1)·(plain + low_rank) + low_rank`.
        let c_minus_1 = (c - 1.0)?
            .reshape(channel_shape)?
            .to_dtype(low_rank.dtype())?;
        let plain = plain()?.to_dtype(low_rank.dtype())?;
        let change = ((plain + &low_rank)?.broadcast_mul(&c_minus_1)? + low_rank)?;
        Ok((change * self.multiplier)?)
    }
}

/// The dtype an adapter's products run in for the input `x`. On a GPU the activations' own, the
/// adapter's f32 weights cast to it (as PyTorch's autocast runs peft's): each pass over a
/// `[B, N, out]` tensor (an f32 copy of the input) costs as much as the adapter's products there,
/// and cuBLAS accumulates half-precision products in f32. On the CPU f32: there half precision is
/// a compatibility path, and f16 products would use up most of the f16-base gradient test's
/// error bound.
pub(super) fn adapter_dtype(x: &Tensor) -> DType {
    match x.device().is_cpu() {
        true => DType::F32,
        false => x.dtype(),
    }
}

/// `t` as a matrix `[rows, features]` in `dtype`: its leading axes merged into rows.
fn rows(t: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let t = contiguous(&t.to_dtype(dtype)?)?;
    let cols = t.dim(D::Minus1)?;
    t.reshape((t.elem_count() / cols.max(1), cols))
}

/// `(x, down, up) → x·Wᵀ + b + factor·(x·downᵀ)·upᵀ` for a frozen `W`, computed off the graph.
/// With `g` the output gradient and `t = x·downᵀ` (recomputed), `gu = g·up`:
/// `dx = g·W + factor·gu·down`, `d_down = factor·guᵀ·x`, `d_up = factor·gᵀ·t`, with the products
/// in [`adapter_dtype`].
struct LoraLinearNode {
    grads: LoraGrads,
    output: ComputedOutput,
}

/// The gradients of a frozen Linear `W` with one adapter scaled by `factor`.
struct LoraGrads {
    weight: Tensor,
    factor: f64,
}

impl LoraGrads {
    /// `(dx, d_down, d_up)` for the output gradient `grad`; `dx` only where a gradient flows to
    /// `x`: not for the text embeddings into to_k/to_v, nor for the first adapted layer's input
    /// (candle would keep it to the end of the backward pass, unused).
    fn grads(
        &self,
        x: &Tensor,
        down: &Tensor,
        up: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Tensor, Tensor)> {
        let dtype = adapter_dtype(x);
        let (x2, g2) = (rows(&x.detach(), dtype)?, rows(grad, dtype)?);
        let (down_c, up_c) = (down.detach().to_dtype(dtype)?, up.detach().to_dtype(dtype)?);
        let t = x2.matmul(&down_c.t()?)?;
        let gu = g2.matmul(&up_c)?;
        let d_up = (g2.t()?.matmul(&t)? * self.factor)?;
        let d_down = (gu.t()?.matmul(&x2)? * self.factor)?;
        let dx = grad_if_tracked(x, || {
            let gu_scaled = (gu * self.factor)?;
            let terms = [(&gu_scaled, &down_c)];
            frozen_linear_input_grad_plus_low_rank(grad, &self.weight, &terms)?
                .reshape(x.shape())?
                .to_dtype(x.dtype())
        })?;
        Ok((
            dx,
            d_down.to_dtype(down.dtype())?,
            d_up.to_dtype(up.dtype())?,
        ))
    }
}

impl CustomOp3 for LoraLinearNode {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    forward_from_computed_output!(a, b, c);

    fn bwd(
        &self,
        x: &Tensor,
        down: &Tensor,
        up: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, d_down, d_up) = self.grads.grads(x, down, up, grad)?;
        Ok((dx, Some(d_down), Some(d_up)))
    }
}

/// `(x, [down | up], residual) → residual + x·Wᵀ + b + factor·(x·downᵀ)·upᵀ`: [`LoraLinearNode`]
/// with the residual sum after the layer (an attention's adapted output projection), so the
/// graph keeps the sum only, not the layer's output too. candle's ops take at most three inputs:
/// the adapter's two matrices travel flattened and concatenated (a small recorded `cat`, whose
/// backward splits their gradient).
struct LoraLinearResidualNode {
    grads: LoraGrads,
    down_shape: (usize, usize),
    up_shape: (usize, usize),
    output: ComputedOutput,
}

impl CustomOp3 for LoraLinearResidualNode {
    fn name(&self) -> &'static str {
        "lora-linear-residual"
    }

    forward_from_computed_output!(a, b, c);

    fn bwd(
        &self,
        x: &Tensor,
        packed: &Tensor,
        residual: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (r, i) = self.down_shape;
        let (o, _) = self.up_shape;
        let down = packed.narrow(0, 0, r * i)?.reshape(self.down_shape)?;
        let up = packed.narrow(0, r * i, o * r)?.reshape(self.up_shape)?;
        let (dx, d_down, d_up) = self.grads.grads(x, &down, &up, grad)?;
        let d_packed = Tensor::cat(&[d_down.flatten_all()?, d_up.flatten_all()?], 0)?;
        Ok((
            dx,
            Some(d_packed),
            grad_if_tracked(residual, || Ok(grad.clone()))?,
        ))
    }
}

/// A frozen Linear or 1×1 conv with any number of low-rank adapters applied unmerged:
/// `y = W·x + b + Σᵢ multiplierᵢ · (alphaᵢ / rankᵢ) · upᵢ(downᵢ(x))`.
/// The base may be f32/f16/bf16; the adapters' f32 weights are cast to the activations' dtype
/// for their products on a GPU, which stay in f32 on the CPU (see [`adapter_dtype`]).
#[derive(Debug, Clone)]
pub struct LoraLinear {
    /// `[out, in]` for Linear, `[out, in, 1, 1]` for Conv1x1.
    weight: Tensor,
    bias: Option<Tensor>,
    kind: ModuleKind,
    adapters: Attached,
    /// For Conv1x1: the kernel's adjoint, kept between backward passes.
    adjoint: AdjointKernel,
}

/// Calls its function with the full path and layer of every adaptable layer of a model.
pub type LayerVisitor<'a> = dyn FnMut(&str, &mut LoraLinear) -> Result<()> + 'a;

/// Checks that every one of `modules` (module path → weights) is one of `known` (the model's
/// adaptable modules; `model` names the model in errors) with fitting shapes; the error lists
/// every offending module with the expected shapes.
pub fn check_adapter_fits(
    model: &str,
    known: &[ModuleInfo],
    name: &str,
    modules: &AdapterModules,
) -> Result<()> {
    let known: BTreeMap<&str, &ModuleInfo> = known.iter().map(|m| (m.path.as_str(), m)).collect();
    let mut problems = Vec::new();
    for (path, module) in modules {
        match known.get(path.as_str()) {
            None => problems.push(format!(
                "`{path}`: no such adaptable module in this {model}"
            )),
            Some(info) => {
                if let Err(e) = module.check_fits(info) {
                    problems.push(e.to_string());
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "adapter `{name}` does not fit this {model}:\n  {}",
            problems.join("\n  ")
        );
    }
    ensure!(
        !modules.is_empty(),
        "adapter `{name}` has no {model} modules"
    );
    Ok(())
}

/// Attaches `modules` under `name` with `multiplier` to the layers `visit` walks, unmerged,
/// after [`check_adapter_fits`]: nothing is attached unless every module fits.
pub fn attach_checked(
    model: &str,
    known: &[ModuleInfo],
    name: &str,
    modules: &AdapterModules,
    multiplier: f64,
    visit: impl FnOnce(&mut LayerVisitor) -> Result<()>,
) -> Result<()> {
    check_adapter_fits(model, known, name, modules)?;
    visit(&mut |path, layer| {
        if let Some(m) = modules.get(path) {
            layer.attach(name, m, multiplier);
        }
        Ok(())
    })
}

impl LoraLinear {
    /// A Linear layer `[out_dim, in_dim]` from `vb`'s `weight` (and `bias`).
    pub fn load_linear(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = bias.then(|| vb.get(out_dim, "bias")).transpose()?;
        Self::new(weight, bias, ModuleKind::Linear)
    }

    pub fn new(weight: Tensor, bias: Option<Tensor>, kind: ModuleKind) -> Result<Self> {
        match kind {
            ModuleKind::Linear => ensure!(
                weight.rank() == 2,
                "linear weight must be 2-D, got {:?}",
                weight.dims()
            ),
            ModuleKind::Conv1x1 => {
                let (_, _, kh, kw) = weight.dims4().context("1x1 conv weight must be 4-D")?;
                ensure!(
                    kh == 1 && kw == 1,
                    "expected a 1x1 conv kernel, got {:?}",
                    weight.dims()
                );
            }
            ModuleKind::Conv { kh, kw } => bail!(
                "a {kh}×{kw} convolution is not a LoraLinear: it takes its adapters as a LoraConv"
            ),
        }
        Ok(Self {
            weight,
            bias,
            kind,
            adapters: Attached::default(),
            adjoint: AdjointKernel::default(),
        })
    }

    pub fn info(&self, path: &str) -> ModuleInfo {
        let dims = self.weight.dims();
        ModuleInfo {
            path: path.to_string(),
            kind: self.kind,
            in_features: dims[1],
            out_features: dims[0],
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Attaches `module` under `name` with the given multiplier (several may be attached).
    pub fn attach(&mut self, name: &str, module: &AdapterModule, multiplier: f64) {
        self.adapters.push(name, module, multiplier);
    }

    /// Removes the adapter attached under `name`; returns whether one was attached.
    pub fn detach(&mut self, name: &str) -> bool {
        self.adapters.remove(name)
    }

    /// With no adapter attached, the layer as a linear map: its weight `[out, in]` (a 1×1
    /// kernel flattened) and bias, for the engine's nodes that fuse it with its neighbours.
    fn unadapted(&self) -> Result<Option<(Tensor, Option<&Tensor>)>> {
        if !self.adapters.is_empty() {
            return Ok(None);
        }
        let weight = match self.kind {
            ModuleKind::Linear => self.weight.clone(),
            _ => self.weight.flatten_from(1)?,
        };
        Ok(Some((weight, self.bias.as_ref())))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.one_node_adapter(x) {
            Some(a) => self.forward_one_node(x, a),
            None => self.forward_values(x, &self.adapters.lora),
        }
    }

    /// `residual + self.forward(x)`: one node with the residual sum, frozen
    /// ([`fused::frozen_linear_residual`]) or training one adapter ([`LoraLinearResidualNode`]).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if let Some((w, b)) = self.unadapted()? {
            return Ok(fused::frozen_linear_residual(x, &w, b, residual)?);
        }
        let Some(a) = self.one_node_adapter(x).filter(|a| a.magnitude.is_none()) else {
            return Ok((self.forward(x)? + residual)?);
        };
        let output =
            (self.forward_values(&x.detach(), &[a.detached_low_rank()])? + residual.detach())?;
        let packed = Tensor::cat(&[a.down.flatten_all()?, a.up.flatten_all()?], 0)?;
        Ok(x.apply_op3(
            &packed,
            residual,
            LoraLinearResidualNode {
                grads: LoraGrads {
                    weight: self.weight.clone(),
                    factor: a.factor(),
                },
                down_shape: a.down.dims2()?,
                up_shape: a.up.dims2()?,
                output: ComputedOutput::new(output.contiguous()?),
            },
        )?)
    }

    /// `self.forward(norm(x))`; one node with the norm where the layer is frozen.
    fn forward_layer_normed(&self, norm: &LayerNormLayer, x: &Tensor) -> Result<Tensor> {
        match self.unadapted()? {
            Some((w, b)) => Ok(fused::layer_norm_linear(norm, x, &w, b)?),
            None => self.forward(&norm.forward(x)?),
        }
    }

    /// `residual + self.forward(geglu(h))`, the output half of a GEGLU feed-forward; one node
    /// where the layer is frozen.
    fn forward_geglu_residual(&self, h: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self.unadapted()? {
            Some((w, b)) => Ok(fused::geglu_linear_residual(h, &w, b, residual)?),
            None => Ok((self.forward(&geglu(h)?)? + residual)?),
        }
    }

    /// `x + proj_out(geglu(proj_in(norm(x))))` for `self` as `proj_in`: a transformer block's
    /// GEGLU feed-forward and its residual; one node where both layers are frozen, otherwise
    /// one per layer.
    pub fn forward_geglu_feed_forward_residual(
        &self,
        proj_out: &LoraLinear,
        norm: &LayerNormLayer,
        x: &Tensor,
    ) -> Result<Tensor> {
        if let (Some((w_in, b_in)), Some((w_out, b_out))) =
            (self.unadapted()?, proj_out.unadapted()?)
        {
            let (input, output) = ((&w_in, b_in), (&w_out, b_out));
            return Ok(fused::geglu_feed_forward_residual(norm, x, input, output)?);
        }
        let h = self.forward_layer_normed(norm, x)?;
        proj_out.forward_geglu_residual(&h, x)
    }

    /// The tokens `[B, H·W, out]` of this projection of the group-normed image `x`
    /// `[B, C, H, W]` (a transformer's input projection: a Linear on tokens or a 1×1 conv on the
    /// image, the same map); one node with the norm where the layer is frozen.
    pub fn forward_group_normed_to_tokens(
        &self,
        norm: &GroupNormLayer,
        x: &Tensor,
    ) -> Result<Tensor> {
        if let Some((w, b)) = self.unadapted()? {
            return Ok(fused::group_norm_to_tokens(norm, x, &w, b)?);
        }
        let normed = norm.forward(x)?;
        match self.kind {
            ModuleKind::Linear => self.forward(&image_to_tokens(&normed)?),
            _ => Ok(image_to_tokens(&self.forward(&normed)?)?),
        }
    }

    /// `residual + image(self.forward(tokens))` for tokens `[B, H·W, C]` and a `[B, out, H, W]`
    /// residual (a transformer's output projection and its residual); one node where the layer
    /// is frozen.
    pub fn forward_to_image_residual(&self, tokens: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if let Some((w, b)) = self.unadapted()? {
            return Ok(fused::project_to_image_residual(tokens, &w, b, residual)?);
        }
        let (_, _, h, w) = residual.dims4()?;
        let image = match self.kind {
            ModuleKind::Linear => tokens_to_image(&self.forward(tokens)?, h, w)?,
            _ => self.forward(&tokens_to_image(tokens, h, w)?)?,
        };
        Ok((image + residual)?)
    }

    /// The adapter a training forward pass runs as one node: the only one attached, on a
    /// Linear with a frozen base, when a gradient flows (for DoRA at multiplier 1, as trained).
    fn one_node_adapter(&self, x: &Tensor) -> Option<&AttachedLora> {
        let [a] = self.adapters.lora.as_slice() else {
            return None;
        };
        if !self.adapters.lycoris.is_empty() {
            return None;
        }
        if a.magnitude.is_some() && a.multiplier != 1.0 {
            return None;
        }
        let magnitude = a.magnitude.iter();
        let tracked = [x, &a.down, &a.up]
            .into_iter()
            .chain(magnitude)
            .any(Tensor::track_op);
        let frozen_base = [Some(&self.weight), self.bias.as_ref()]
            .into_iter()
            .flatten()
            .all(|t| !t.track_op());
        (tracked && frozen_base && self.kind == ModuleKind::Linear).then_some(a)
    }

    /// Training one adapter on a Linear: its value from [`Self::forward_values`] off the graph,
    /// re-attached as one node over `(x, down, up)` ([`LoraLinearNode`]). Composed, the graph
    /// would keep the base output, the delta and the sum of every adapted layer (three full-width
    /// tensors); this node keeps its output only, and its backward recomputes the rank-r `x·downᵀ`.
    /// DoRA (at multiplier 1) scales the node's output without its bias by `c` per channel:
    /// `b + c · (x·Wᵀ + s·x·downᵀ·upᵀ)`.
    fn forward_one_node(&self, x: &Tensor, a: &AttachedLora) -> Result<Tensor> {
        let output = self.forward_values(&x.detach(), &[a.detached_low_rank()])?;
        let node = x.apply_op3(
            &a.down,
            &a.up,
            LoraLinearNode {
                grads: LoraGrads {
                    weight: self.weight.clone(),
                    factor: a.factor(),
                },
                output: ComputedOutput::new(output),
            },
        )?;
        let Some(c) = a.dora_factor(&self.weight)? else {
            return Ok(node);
        };
        // `b + c·(node − b)` as `node + (c − 1)·(node − b)`, `c − 1` formed in f32 (see
        // `AttachedLora::contribution`).
        let c_minus_1 = (c - 1.0)?.to_dtype(node.dtype())?;
        let plain = match &self.bias {
            Some(b) => node.broadcast_sub(&b.to_dtype(node.dtype())?)?,
            None => node.clone(),
        };
        Ok((&node + plain.broadcast_mul(&c_minus_1)?)?)
    }

    /// The layer's output with `adapters`, recorded where its inputs are tracked (plain LoRAs on
    /// a Linear through the engine's low-rank sum, which composes candle's ops then).
    fn forward_values(&self, x: &Tensor, adapters: &[AttachedLora]) -> Result<Tensor> {
        let plain_lora = adapters.iter().all(|a| a.magnitude.is_none());
        let mut out = match self.kind {
            ModuleKind::Linear if plain_lora => self.linear_plus_low_rank(x, adapters)?,
            ModuleKind::Linear => {
                let base = frozen_linear(x, &self.weight, self.bias.as_ref())?;
                self.with_adapter_delta(x, base, adapters)?
            }
            ModuleKind::Conv1x1 => {
                let bias = self
                    .bias
                    .as_ref()
                    .map(|b| b.reshape((1, (), 1, 1)))
                    .transpose()?;
                let base = frozen_conv2d(
                    x,
                    &self.weight,
                    bias.as_ref(),
                    (0, 0),
                    1,
                    Some(&self.adjoint),
                )?;
                self.with_adapter_delta(x, base, adapters)?
            }
            ModuleKind::Conv { .. } => bail!("k×k conv layers are never built (see `new`)"),
        };
        let dtype = adapter_dtype(x);
        for a in &self.adapters.lycoris {
            let delta = a.scaled_delta(dtype)?;
            let x = x.to_dtype(dtype)?;
            let change = match self.kind {
                ModuleKind::Linear => shared_matmul(&x, &delta.t()?)?,
                _ => {
                    let (o, i) = delta.dims2()?;
                    x.conv2d(&delta.reshape((o, i, 1, 1))?, 0, 1, 1, 1)?
                }
            };
            out = (change.to_dtype(out.dtype())? + out)?;
        }
        Ok(out)
    }

    /// A Linear's output with plain LoRAs (no DoRA): each adapter's scaled rank-r projection
    /// `factor·x·downᵀ`, whose up-projections the engine sums into the layer's output (no
    /// full-width delta of their own, and no sum reading it back).
    fn linear_plus_low_rank(&self, x: &Tensor, adapters: &[AttachedLora]) -> Result<Tensor> {
        let dtype = adapter_dtype(x);
        let x_rows = rows(x, dtype)?;
        let terms = adapters
            .iter()
            .map(|a| {
                let (down, up) = (a.down.to_dtype(dtype)?, a.up.to_dtype(dtype)?);
                Ok(((x_rows.matmul(&down.t()?)? * a.factor())?, up))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let terms: Vec<_> = terms.iter().map(|(t, up)| (t, up)).collect();
        let bias = self.bias.as_ref();
        Ok(frozen_linear_plus_low_rank(x, &self.weight, bias, &terms)?)
    }

    /// `base + Σᵢ` of each adapter's change of the output (see [`Self::adapter_delta`]).
    fn with_adapter_delta(
        &self,
        x: &Tensor,
        base: Tensor,
        adapters: &[AttachedLora],
    ) -> Result<Tensor> {
        Ok(match self.adapter_delta(x, &base, adapters)? {
            Some(delta) => (&base + delta.to_dtype(base.dtype())?)?,
            None => base,
        })
    }

    /// `Σᵢ` of each adapter's change of the output (`factorᵢ · upᵢ(downᵢ(x))`, and DoRA's, see
    /// [`AttachedLora::contribution`]) over `adapters` (`None` for none); `base` is the frozen
    /// layer's output.
    fn adapter_delta(
        &self,
        x: &Tensor,
        base: &Tensor,
        adapters: &[AttachedLora],
    ) -> Result<Option<Tensor>> {
        // The factor scales the rank-r projection, and the delta is added in the base's dtype.
        let dtype = adapter_dtype(x);
        let x = x.to_dtype(dtype)?;
        let out = self.weight.dim(0)?;
        let channel_shape = match self.kind {
            ModuleKind::Linear => vec![out],
            _ => vec![1, out, 1, 1],
        };
        let plain = || -> Result<Tensor> {
            Ok(match &self.bias {
                Some(b) => base.broadcast_sub(&b.reshape(channel_shape.as_slice())?)?,
                None => base.clone(),
            })
        };
        sum_of(adapters.iter().map(|a| {
            let (down, up) = (a.down.to_dtype(dtype)?, a.up.to_dtype(dtype)?);
            let low_rank = match self.kind {
                ModuleKind::Linear => {
                    shared_matmul(&(shared_matmul(&x, &down.t()?)? * a.factor())?, &up.t()?)?
                }
                ModuleKind::Conv1x1 => {
                    let (r, i) = down.dims2()?;
                    let o = up.dim(0)?;
                    (x.conv2d(&down.reshape((r, i, 1, 1))?, 0, 1, 1, 1)? * a.factor())?.conv2d(
                        &up.reshape((o, r, 1, 1))?,
                        0,
                        1,
                        1,
                        1,
                    )?
                }
                ModuleKind::Conv { .. } => bail!("k×k conv layers are never built (see `new`)"),
            };
            a.contribution(&self.weight, low_rank, plain, &channel_shape)
        }))
    }
}
