//! The transformer encoder both CLIP towers run (transformers' `CLIPEncoder`): pre-norm layers of
//! multi-head self-attention and an MLP, the same weights layout in text and vision. The text
//! tower attends causally; the vision tower attends over all patches.
//!
//! Built on the engine's layers (layer norm, attention, [`LoraLinear`] projections), so it is
//! differentiable end to end and its projections take adapters: the text tower trains them
//! (`--train-text-encoder`).

use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::adapters::{LayerVisitor, LoraLinear};
use crate::engine::{attention, causal_attention, LayerNormLayer};
use crate::models::config::{ClipActivation, ClipTextConfig, ClipVisionConfig};

/// The sizes an encoder is built from; the text and vision configs name them alike.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EncoderDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    pub layer_norm_eps: f64,
    pub activation: ClipActivation,
}

impl From<&ClipTextConfig> for EncoderDims {
    fn from(c: &ClipTextConfig) -> Self {
        Self {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            layer_norm_eps: c.layer_norm_eps,
            activation: c.hidden_act,
        }
    }
}

impl From<&ClipVisionConfig> for EncoderDims {
    fn from(c: &ClipVisionConfig) -> Self {
        Self {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            heads: c.num_attention_heads,
            layers: c.num_hidden_layers,
            layer_norm_eps: c.layer_norm_eps,
            activation: c.hidden_act,
        }
    }
}

/// Which tokens a query attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttentionMask {
    /// Every token (the vision tower).
    None,
    /// The token itself and those before it (the text tower).
    Causal,
}

/// `encoder.layers.{i}` of a tower.
#[derive(Debug, Clone)]
pub(crate) struct ClipEncoder {
    layers: Vec<EncoderLayer>,
}

impl ClipEncoder {
    /// `vb` is the tower's `encoder` level.
    pub fn new(vb: VarBuilder, dims: EncoderDims) -> Result<Self> {
        let layers = (0..dims.layers)
            .map(|i| EncoderLayer::new(vb.pp(format!("layers.{i}")), dims))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// `[batch, seq, hidden]` → the same shape.
    pub fn forward(&self, xs: &Tensor, mask: AttentionMask) -> Result<Tensor> {
        Ok(self.forward_with_penultimate(xs, mask)?.1)
    }

    /// [`Self::forward`] returning the penultimate layer's output too (`hidden_states[-2]`;
    /// the input itself for a one-layer encoder).
    pub fn forward_with_penultimate(
        &self,
        xs: &Tensor,
        mask: AttentionMask,
    ) -> Result<(Tensor, Tensor)> {
        let mut penultimate = xs.clone();
        let mut xs = xs.clone();
        for layer in &self.layers {
            penultimate = xs;
            xs = layer.forward(&penultimate, mask)?;
        }
        Ok((penultimate, xs))
    }

    /// Calls `f` with the path (below `prefix`, the encoder level) and layer of every projection
    /// an adapter can attach to.
    pub fn visit(&mut self, prefix: &str, f: &mut LayerVisitor) -> Result<()> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let layer_prefix = format!("{prefix}.layers.{i}");
            layer
                .self_attn
                .visit(&format!("{layer_prefix}.self_attn"), f)?;
            layer.mlp.visit(&format!("{layer_prefix}.mlp"), f)?;
        }
        Ok(())
    }
}

/// Pre-norm transformer layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNormLayer,
    self_attn: SelfAttention,
    layer_norm2: LayerNormLayer,
    mlp: Mlp,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, d: EncoderDims) -> Result<Self> {
        Ok(Self {
            layer_norm1: LayerNormLayer::load(&vb.pp("layer_norm1"), d.hidden, d.layer_norm_eps)?,
            self_attn: SelfAttention::new(vb.pp("self_attn"), d)?,
            layer_norm2: LayerNormLayer::load(&vb.pp("layer_norm2"), d.hidden, d.layer_norm_eps)?,
            mlp: Mlp::new(vb.pp("mlp"), d.hidden, d.intermediate, d.activation)?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: AttentionMask) -> Result<Tensor> {
        let xs = self
            .self_attn
            .forward_residual(&self.layer_norm1.forward(xs)?, mask, xs)?;
        self.mlp
            .forward_residual(&self.layer_norm2.forward(&xs)?, &xs)
    }
}

/// The layers' feed-forward block, `fc2(act(fc1(x)))` (transformers' `CLIPMLP`; BLIP's vision
/// tower has the same).
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    fc1: LoraLinear,
    fc2: LoraLinear,
    activation: ClipActivation,
}

impl Mlp {
    /// `vb` is the `mlp` level of a layer.
    pub fn new(
        vb: VarBuilder,
        hidden: usize,
        intermediate: usize,
        activation: ClipActivation,
    ) -> Result<Self> {
        Ok(Self {
            fc1: LoraLinear::load_linear(&vb.pp("fc1"), hidden, intermediate, true)?,
            fc2: LoraLinear::load_linear(&vb.pp("fc2"), intermediate, hidden, true)?,
            activation,
        })
    }

    /// `residual + mlp(xs)`.
    pub fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let hidden = activate(&self.fc1.forward(xs)?, self.activation)?;
        self.fc2.forward_residual(&hidden, residual)
    }

    fn visit(&mut self, prefix: &str, f: &mut LayerVisitor) -> Result<()> {
        f(&format!("{prefix}.fc1"), &mut self.fc1)?;
        f(&format!("{prefix}.fc2"), &mut self.fc2)
    }
}

/// transformers' `ACT2FN[hidden_act]` for the activations CLIP and BLIP configs name, from
/// candle's differentiable ops.
pub(crate) fn activate(xs: &Tensor, activation: ClipActivation) -> Result<Tensor> {
    Ok(match activation {
        ClipActivation::QuickGelu => (xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?)?,
        ClipActivation::Gelu => xs.gelu_erf()?,
    })
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    out_proj: LoraLinear,
    heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, d: EncoderDims) -> Result<Self> {
        let h = d.hidden;
        let proj = |name: &str| LoraLinear::load_linear(&vb.pp(name), h, h, true);
        Ok(Self {
            q_proj: proj("q_proj")?,
            k_proj: proj("k_proj")?,
            v_proj: proj("v_proj")?,
            out_proj: proj("out_proj")?,
            heads: d.heads,
        })
    }

    /// `residual + attention(xs)`, the scores in f32 so half-precision weights do not lose the
    /// softmax.
    fn forward_residual(
        &self,
        xs: &Tensor,
        mask: AttentionMask,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let q = self.q_proj.forward(xs)?;
        let k = self.k_proj.forward(xs)?;
        let v = self.v_proj.forward(xs)?;
        let attended = match mask {
            AttentionMask::None => attention(&q, &k, &v, self.heads, true)?,
            AttentionMask::Causal => causal_attention(&q, &k, &v, self.heads)?,
        };
        self.out_proj.forward_residual(&attended, residual)
    }

    fn visit(&mut self, prefix: &str, f: &mut LayerVisitor) -> Result<()> {
        f(&format!("{prefix}.q_proj"), &mut self.q_proj)?;
        f(&format!("{prefix}.k_proj"), &mut self.k_proj)?;
        f(&format!("{prefix}.v_proj"), &mut self.v_proj)?;
        f(&format!("{prefix}.out_proj"), &mut self.out_proj)
    }
}
