//! Adapter math: LoRA configuration, target presets, initialisation, the per-module low-rank
//! weights and the adapted layer that applies them on top of a frozen base.
//!
//! Conventions (shared by kohya, peft and diffusers): `down` is `[rank, in]`, `up` is
//! `[out, rank]`, and the update is `ΔW = (alpha / rank) · up · down`. Adapter tensors are always
//! f32, whatever the base dtype.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{CustomOp3, DType, Device, Tensor, Var, D};

use crate::nn::{
    forward_from_computed_output, frozen_conv2d, frozen_linear, grad_if_tracked, shared_matmul,
    AdjointKernel, ComputedOutput,
};
use crate::rng::Rng;

/// Which layers of the UNet get an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraTargets {
    /// `attn2.{to_q,to_k,to_v,to_out.0}` of every transformer block (diffusers scripts' choice).
    #[default]
    Attn2,
    /// The same four projections of both attn1 (self) and attn2 (cross).
    Attn,
    /// Every Linear and 1×1 conv inside the transformer models (kohya's default): proj_in,
    /// proj_out, attn1/attn2 projections, `ff.net.0.proj` and `ff.net.2`.
    AttnMlp,
}

impl LoraTargets {
    pub const ALL: [LoraTargets; 3] = [Self::Attn2, Self::Attn, Self::AttnMlp];

    /// Whether the module at `path` (a diffusers UNet path such as
    /// `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q`) is a target. `path` must be
    /// one of the UNet's adaptable modules (see `UNet2DConditionModel::lora_modules`).
    pub fn matches(&self, path: &str) -> bool {
        const PROJ: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
        let is_attn = |which: &str| {
            PROJ.iter()
                .any(|p| path.ends_with(&format!(".{which}.{p}")))
        };
        match self {
            Self::Attn2 => is_attn("attn2"),
            Self::Attn => is_attn("attn1") || is_attn("attn2"),
            Self::AttnMlp => true,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Attn2 => "attn2",
            Self::Attn => "attn",
            Self::AttnMlp => "attn-mlp",
        }
    }
}

impl fmt::Display for LoraTargets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LoraTargets {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .with_context(|| {
                format!("unknown LoRA target preset `{s}`: expected attn2, attn or attn-mlp")
            })
    }
}

/// How a fresh adapter's `down` matrix is drawn; `up` always starts at zero so a new adapter is a
/// no-op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// Kaiming-uniform with a = √5, i.e. U(-1/√in, 1/√in) (kohya, peft default).
    #[default]
    KaimingUniform,
    /// N(0, (1/rank)²) (diffusers training scripts, peft `init_lora_weights="gaussian"`).
    Gaussian,
}

impl FromStr for LoraInit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kaiming" | "kaiming-uniform" => Ok(Self::KaimingUniform),
            "gaussian" => Ok(Self::Gaussian),
            _ => bail!("unknown LoRA init `{s}`: expected kaiming-uniform or gaussian"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: LoraTargets,
    pub init: LoraInit,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 4.0,
            targets: LoraTargets::Attn2,
            init: LoraInit::KaimingUniform,
        }
    }
}

/// The shape of layer an adapter attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    Linear,
    /// A 1×1 convolution (SD1's `proj_in`/`proj_out`); kohya stores its adapter 4-D.
    Conv1x1,
    /// A `kh×kw` convolution with a larger kernel (resnet `conv1`/`conv2`, down/upsampler
    /// `conv`), adapted by kohya `conv_dim` / LyCORIS LoCon: down `[r, in, kh, kw]`, up
    /// `[out, r, 1, 1]`. [`ModuleInfo::in_features`] is then `in · kh · kw` (the flattened
    /// kernel), so `ΔW = up · down` is `[out, in·kh·kw]`, reshaped to the kernel. Only merged
    /// into weights (lora-merge); the runtime UNet does not attach such adapters.
    Conv {
        kh: usize,
        kw: usize,
    },
}

/// One adaptable module of a model, as enumerated by the model itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// Path in the diffusers / transformers layout, without a component prefix, e.g.
    /// `mid_block.attentions.0.transformer_blocks.0.attn2.to_k` or
    /// `text_model.encoder.layers.0.self_attn.q_proj`.
    pub path: String,
    pub kind: ModuleKind,
    pub in_features: usize,
    pub out_features: usize,
}

/// Low-rank weights of one module.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// `[rank, in]`, f32.
    pub down: Tensor,
    /// `[out, rank]`, f32.
    pub up: Tensor,
    pub alpha: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// `alpha / rank`, the factor kohya and peft apply to `up · down`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// `ΔW = (alpha/rank) · up · down` as an f32 `[out, in]` matrix.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.up.matmul(&self.down)? * self.scale())?)
    }

    /// Checks the shapes against the module this adapter is meant for.
    pub fn check_fits(&self, info: &ModuleInfo) -> Result<()> {
        let (r, i) = self
            .down
            .dims2()
            .with_context(|| format!("{}: down must be 2-D", info.path))?;
        let (o, r2) = self
            .up
            .dims2()
            .with_context(|| format!("{}: up must be 2-D", info.path))?;
        ensure!(
            r == r2 && i == info.in_features && o == info.out_features,
            "{}: adapter shapes down {:?} / up {:?} do not fit the module (expected down [r, {}], up [{}, r])",
            info.path,
            self.down.dims(),
            self.up.dims(),
            info.in_features,
            info.out_features
        );
        Ok(())
    }
}

/// A whole adapter: low-rank weights per module, for the UNet and the text encoder.
/// Module keys are paths as in [`ModuleInfo::path`].
#[derive(Debug, Clone, Default)]
pub struct Adapter {
    pub unet: BTreeMap<String, LoraModule>,
    pub text_encoder: BTreeMap<String, LoraModule>,
}

/// Trainable adapter variables, in a stable order (by module path, down before up).
pub struct TrainableAdapter {
    pub adapter: Adapter,
    pub vars: Vec<(String, Var)>,
}

impl Adapter {
    /// A fresh UNet adapter for every module of `modules` that `config.targets` selects.
    /// Deterministic for a given seed; `up` starts at zero.
    pub fn init_unet(
        config: &LoraConfig,
        modules: &[ModuleInfo],
        device: &Device,
        seed: u64,
    ) -> Result<TrainableAdapter> {
        ensure!(config.rank > 0, "LoRA rank must be at least 1");
        let mut rng = Rng::new(seed);
        let mut adapter = Adapter::default();
        let mut vars = Vec::new();
        for info in modules.iter().filter(|m| config.targets.matches(&m.path)) {
            let (r, fan_in) = (config.rank, info.in_features);
            let values: Vec<f32> = match config.init {
                LoraInit::KaimingUniform => {
                    let bound = 1.0 / (fan_in as f64).sqrt();
                    (0..r * fan_in)
                        .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                        .collect()
                }
                LoraInit::Gaussian => {
                    let std = 1.0 / r as f64;
                    (0..r * fan_in)
                        .map(|_| (rng.normal() * std) as f32)
                        .collect()
                }
            };
            let down = Var::from_tensor(&Tensor::from_vec(values, (r, fan_in), device)?)?;
            let up = Var::from_tensor(&Tensor::zeros((info.out_features, r), DType::F32, device)?)?;
            adapter.unet.insert(
                info.path.clone(),
                LoraModule {
                    down: down.as_tensor().clone(),
                    up: up.as_tensor().clone(),
                    alpha: config.alpha,
                },
            );
            vars.push((format!("{}.lora_down", info.path), down));
            vars.push((format!("{}.lora_up", info.path), up));
        }
        ensure!(
            !adapter.unet.is_empty(),
            "LoRA targets `{}` match no module of this model",
            config.targets
        );
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(TrainableAdapter { adapter, vars })
    }

    /// Weight deltas `multiplier · ΔW` keyed by the full weight name (`<path>.weight`), for
    /// folding a component's adapter into its weights at load time.
    pub fn weight_deltas(
        modules: &BTreeMap<String, LoraModule>,
        multiplier: f64,
    ) -> Result<BTreeMap<String, Tensor>> {
        modules
            .iter()
            .map(|(path, m)| Ok((format!("{path}.weight"), (m.delta_weight()? * multiplier)?)))
            .collect()
    }
}

/// An adapter attached to a layer: its weights and the factor `multiplier · alpha / rank`.
#[derive(Debug, Clone)]
struct AttachedLora {
    name: String,
    down: Tensor,
    up: Tensor,
    factor: f64,
}

impl AttachedLora {
    /// The same adapter outside the graph.
    fn detached(&self) -> Self {
        Self {
            name: self.name.clone(),
            down: self.down.detach(),
            up: self.up.detach(),
            factor: self.factor,
        }
    }
}

/// The dtype an adapter's products run in for the input `x`. On a GPU the activations' own, the
/// adapter's f32 weights cast to it (as PyTorch's autocast runs peft's): each pass over a
/// `[B, N, out]` tensor (an f32 copy of the input) costs as much as the adapter's products there,
/// and cuBLAS accumulates half-precision products in f32. On the CPU f32: there half precision is
/// a compatibility path, and with f16 products the f16-base gradient test's worst error doubled
/// (6e-2 → 1.4e-1 of its 0.15 bound).
fn adapter_dtype(x: &Tensor) -> DType {
    match x.device().is_cpu() {
        true => DType::F32,
        false => x.dtype(),
    }
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
        let rows = |t: &Tensor| -> candle_core::Result<Tensor> {
            let t = crate::nn::contiguous(&t.to_dtype(dtype)?)?;
            let cols = t.dim(D::Minus1)?;
            t.reshape((t.elem_count() / cols.max(1), cols))
        };
        let (x2, g2) = (rows(&x.detach())?, rows(grad)?);
        let (down_c, up_c) = (down.detach().to_dtype(dtype)?, up.detach().to_dtype(dtype)?);
        let t = x2.matmul(&down_c.t()?)?;
        let gu = g2.matmul(&up_c)?;
        let d_up = (g2.t()?.matmul(&t)? * self.factor)?;
        let d_down = (gu.t()?.matmul(&x2)? * self.factor)?;
        let dx = grad_if_tracked(x, || {
            let dx_base = shared_matmul(&grad.to_dtype(self.weight.dtype())?, &self.weight)?;
            let dx_lora = (gu.matmul(&down_c)? * self.factor)?.reshape(x.shape())?;
            (&dx_base + dx_lora.to_dtype(dx_base.dtype())?)?.to_dtype(x.dtype())
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
    adapters: Vec<AttachedLora>,
    /// For Conv1x1: the kernel's adjoint, kept between backward passes.
    adjoint: AdjointKernel,
}

impl LoraLinear {
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
                "{kh}×{kw} conv adapters cannot be attached at run time (only Linear and 1×1 conv \
                 layers are); fold them into the model with lora-merge"
            ),
        }
        Ok(Self {
            weight,
            bias,
            kind,
            adapters: Vec::new(),
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
    pub fn attach(&mut self, name: &str, module: &LoraModule, multiplier: f64) {
        self.adapters.push(AttachedLora {
            name: name.to_string(),
            down: module.down.clone(),
            up: module.up.clone(),
            factor: multiplier * module.scale(),
        });
    }

    /// Removes the adapter attached under `name`; returns whether one was attached.
    pub fn detach(&mut self, name: &str) -> bool {
        let before = self.adapters.len();
        self.adapters.retain(|a| a.name != name);
        before != self.adapters.len()
    }

    /// With no adapter attached, the layer as a linear map: its weight `[out, in]` (a 1×1
    /// kernel flattened) and bias, for nodes that fuse it with what follows.
    pub fn unadapted(&self) -> Result<Option<(Tensor, Option<&Tensor>)>> {
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
            None => self.forward_values(x, &self.adapters),
        }
    }

    /// `residual + self.forward(x)`, as one node where [`Self::forward`] is one
    /// ([`LoraLinearResidualNode`]).
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let Some(a) = self.one_node_adapter(x) else {
            return Ok((self.forward_values(x, &self.adapters)? + residual)?);
        };
        let output = (self.forward_values(&x.detach(), &[a.detached()])? + residual.detach())?;
        let packed = Tensor::cat(&[a.down.flatten_all()?, a.up.flatten_all()?], 0)?;
        Ok(x.apply_op3(
            &packed,
            residual,
            LoraLinearResidualNode {
                grads: LoraGrads {
                    weight: self.weight.clone(),
                    factor: a.factor,
                },
                down_shape: a.down.dims2()?,
                up_shape: a.up.dims2()?,
                output: ComputedOutput::new(output.contiguous()?),
            },
        )?)
    }

    /// The adapter a training forward pass runs as one node: the only one attached, on a
    /// Linear with a frozen base, when a gradient flows.
    fn one_node_adapter(&self, x: &Tensor) -> Option<&AttachedLora> {
        let [a] = self.adapters.as_slice() else {
            return None;
        };
        let tracked = [x, &a.down, &a.up].into_iter().any(Tensor::track_op);
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
    fn forward_one_node(&self, x: &Tensor, a: &AttachedLora) -> Result<Tensor> {
        let output = self.forward_values(&x.detach(), &[a.detached()])?;
        Ok(x.apply_op3(
            &a.down,
            &a.up,
            LoraLinearNode {
                grads: LoraGrads {
                    weight: self.weight.clone(),
                    factor: a.factor,
                },
                output: ComputedOutput::new(output),
            },
        )?)
    }

    /// The layer's output with `adapters`, composed from candle's ops (recorded where its inputs
    /// are tracked).
    fn forward_values(&self, x: &Tensor, adapters: &[AttachedLora]) -> Result<Tensor> {
        let base = match self.kind {
            ModuleKind::Linear => frozen_linear(x, &self.weight, self.bias.as_ref())?,
            ModuleKind::Conv1x1 => {
                let bias = self
                    .bias
                    .as_ref()
                    .map(|b| b.reshape((1, (), 1, 1)))
                    .transpose()?;
                frozen_conv2d(x, &self.weight, bias.as_ref(), 0, 1, Some(&self.adjoint))?
            }
            ModuleKind::Conv { .. } => bail!("k×k conv layers are never built (see `new`)"),
        };
        if adapters.is_empty() {
            return Ok(base);
        }
        Ok((&base + self.adapter_delta(x, adapters)?.to_dtype(base.dtype())?)?)
    }

    /// `Σᵢ factorᵢ · upᵢ(downᵢ(x))` over `adapters`.
    fn adapter_delta(&self, x: &Tensor, adapters: &[AttachedLora]) -> Result<Tensor> {
        // The factor scales the rank-r projection, and the delta is added in the base's dtype.
        let dtype = adapter_dtype(x);
        let x = x.to_dtype(dtype)?;
        let mut delta: Option<Tensor> = None;
        for a in adapters {
            let (down, up) = (a.down.to_dtype(dtype)?, a.up.to_dtype(dtype)?);
            let d = match self.kind {
                ModuleKind::Linear => {
                    shared_matmul(&(shared_matmul(&x, &down.t()?)? * a.factor)?, &up.t()?)?
                }
                ModuleKind::Conv1x1 => {
                    let (r, i) = down.dims2()?;
                    let o = up.dim(0)?;
                    (x.conv2d(&down.reshape((r, i, 1, 1))?, 0, 1, 1, 1)? * a.factor)?.conv2d(
                        &up.reshape((o, r, 1, 1))?,
                        0,
                        1,
                        1,
                        1,
                    )?
                }
                ModuleKind::Conv { .. } => bail!("k×k conv layers are never built (see `new`)"),
            };
            delta = Some(match delta {
                Some(acc) => (acc + d)?,
                None => d,
            });
        }
        Ok(delta.expect("adapters is non-empty"))
    }
}
