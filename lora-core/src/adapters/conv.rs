//! The adapted k×k convolution (kohya `conv_dim` / LyCORIS LoCon): a frozen convolution with
//! unmerged low-rank adapters, `y = conv(x, W) + b + Σᵢ factorᵢ · upᵢ ∗ (downᵢ ∗ x)`, where
//! `down` is a `[r, in, kh, kw]` convolution with the layer's stride and padding and `up` a 1×1
//! convolution `[out, r]` (peft's and kohya's LoRA on `Conv2d`). The adapter's weights are kept
//! as [`LoraModule`] matrices (`down` flattened to `[r, in·kh·kw]`). Where no adapter is attached
//! the layer runs as the engine's frozen (or fused) convolution; with one, the delta is candle's
//! differentiable convolutions on the layer's input.

use anyhow::{ensure, Result};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::linear::{adapter_dtype, Attached, LoraLinear};
use super::module::{AdapterModule, ModuleInfo, ModuleKind};
use crate::engine::fused::{norm_silu_conv, norm_silu_conv_residual};
use crate::engine::{Conv2dLayer, GroupNormLayer};

/// One adaptable layer of a model where Linear layers and convolutions are visited together
/// (a resnet's `time_emb_proj`, convolutions and shortcut).
pub enum AdaptableLayer<'a> {
    Linear(&'a mut LoraLinear),
    Conv(&'a mut LoraConv),
}

impl AdaptableLayer<'_> {
    pub fn info(&self, path: &str) -> ModuleInfo {
        match self {
            Self::Linear(layer) => layer.info(path),
            Self::Conv(layer) => layer.info(path),
        }
    }

    pub fn attach(&mut self, name: &str, module: &AdapterModule, multiplier: f64) {
        match self {
            Self::Linear(layer) => layer.attach(name, module, multiplier),
            Self::Conv(layer) => layer.attach(name, module, multiplier),
        }
    }

    /// The frozen layer's weight (`[out, in]`, or the conv kernel).
    pub fn weight(&self) -> &Tensor {
        match self {
            Self::Linear(layer) => layer.weight(),
            Self::Conv(layer) => layer.conv.weight(),
        }
    }

    /// Removes the adapter attached under `name`; returns whether one was attached.
    pub fn detach(&mut self, name: &str) -> bool {
        match self {
            Self::Linear(layer) => layer.detach(name),
            Self::Conv(layer) => layer.detach(name),
        }
    }
}

/// Calls its function with the full path and layer of every such layer of a model.
pub type AdaptableVisitor<'a> = dyn FnMut(&str, AdaptableLayer) -> Result<()> + 'a;

#[derive(Debug, Clone)]
pub struct LoraConv {
    conv: Conv2dLayer,
    adapters: Attached,
}

impl LoraConv {
    /// A square `kernel`×`kernel` convolution with bias, read from `vb`.
    pub fn load(
        vb: &VarBuilder,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv: Conv2dLayer::load(vb, in_ch, out_ch, kernel, stride, padding)?,
            adapters: Attached::default(),
        })
    }

    /// A 1×1 convolution is a [`ModuleKind::Conv1x1`] module (adapted at the Linear rank, as
    /// kohya does), a larger kernel a [`ModuleKind::Conv`] one.
    pub fn info(&self, path: &str) -> ModuleInfo {
        let dims = self.conv.weight().dims();
        let kind = match (dims[2], dims[3]) {
            (1, 1) => ModuleKind::Conv1x1,
            (kh, kw) => ModuleKind::Conv { kh, kw },
        };
        ModuleInfo {
            path: path.to_string(),
            kind,
            in_features: dims[1] * dims[2] * dims[3],
            out_features: dims[0],
        }
    }

    /// The frozen convolution, for the engine's fused nodes where no adapter is attached.
    pub fn unadapted(&self) -> Option<&Conv2dLayer> {
        self.adapters.is_empty().then_some(&self.conv)
    }

    /// Attaches `module` (down `[r, in·kh·kw]`, up `[out, r]`) under `name` with `multiplier`.
    pub fn attach(&mut self, name: &str, module: &AdapterModule, multiplier: f64) {
        self.adapters.push(name, module, multiplier);
    }

    /// Removes the adapter attached under `name`; returns whether one was attached.
    pub fn detach(&mut self, name: &str) -> bool {
        self.adapters.remove(name)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let base = self.conv.forward(x)?;
        match self.adapters.is_empty() {
            true => Ok(base),
            false => self.add_delta(base, x),
        }
    }

    /// `conv(silu(norm(x))) + shift` (a resnet's first half, `shift` its time embedding); one node
    /// with the norm where no adapter is attached.
    pub fn forward_norm_silu(
        &self,
        norm: &GroupNormLayer,
        x: &Tensor,
        shift: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let Some(conv) = self.unadapted() {
            return Ok(norm_silu_conv(norm, conv, x, shift)?);
        }
        let y = self.forward(&norm.forward_silu(x)?)?;
        Ok(match shift {
            Some(shift) => y.broadcast_add(shift)?,
            None => y,
        })
    }

    /// `shortcut(r) + conv(silu(norm(h)))` (a resnet's second half and its residual sum); one
    /// node where neither this layer nor the shortcut has an adapter.
    pub fn forward_norm_silu_residual(
        &self,
        norm: &GroupNormLayer,
        h: &Tensor,
        r: &Tensor,
        shortcut: Option<&LoraConv>,
    ) -> Result<Tensor> {
        let frozen_shortcut = shortcut.map(LoraConv::unadapted);
        if let (Some(conv), None | Some(Some(_))) = (self.unadapted(), frozen_shortcut) {
            let shortcut = frozen_shortcut.flatten();
            return Ok(norm_silu_conv_residual(norm, conv, h, r, shortcut)?);
        }
        let residual = match shortcut {
            Some(s) => s.forward(r)?,
            None => r.clone(),
        };
        Ok((residual + self.forward(&norm.forward_silu(h)?)?)?)
    }

    /// `base + Σᵢ factorᵢ · upᵢ ∗ (downᵢ ∗ x)` (DoRA's change where it applies), plus each
    /// LyCORIS module's `multiplier · ΔW ∗ x`, the adapters' products in [`adapter_dtype`].
    fn add_delta(&self, base: Tensor, x: &Tensor) -> Result<Tensor> {
        let (out_ch, in_ch, kh, kw) = self.conv.weight().dims4()?;
        let (pad_h, pad_w) = self.conv.padding();
        ensure!(
            pad_h == pad_w,
            "conv adapters need the same padding on both axes, the layer has {pad_h}×{pad_w}"
        );
        let dtype = adapter_dtype(x);
        let x = x.to_dtype(dtype)?;
        let plain = || Ok(base.broadcast_sub(self.conv.bias())?);
        let mut sum = base.clone();
        for a in &self.adapters.lora {
            let rank = a.down.dim(0)?;
            let down = a.down.to_dtype(dtype)?.reshape((rank, in_ch, kh, kw))?;
            let up = a.up.to_dtype(dtype)?.reshape((out_ch, rank, 1, 1))?;
            let hidden = (x.conv2d(&down, pad_h, self.conv.stride(), 1, 1)? * a.factor())?;
            let low_rank = hidden.conv2d(&up, 0, 1, 1, 1)?;
            let change = a.contribution(self.conv.weight(), low_rank, plain, &[1, out_ch, 1, 1])?;
            sum = (sum + change.to_dtype(base.dtype())?)?;
        }
        for a in &self.adapters.lycoris {
            let kernel = a.scaled_delta(dtype)?.reshape((out_ch, in_ch, kh, kw))?;
            let change = x.conv2d(&kernel, pad_h, self.conv.stride(), 1, 1)?;
            sum = (sum + change.to_dtype(base.dtype())?)?;
        }
        Ok(sum)
    }
}
