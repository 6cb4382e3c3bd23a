//! The transformer encoder both CLIP towers run (transformers' `CLIPEncoder`): pre-norm layers of
//! multi-head self-attention and an MLP, the same weights layout in text and vision. The text
//! tower passes a causal mask; the vision tower attends over all patches.

use anyhow::Result;
use candle_core::{DType, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use crate::models::config::{ClipActivation, ClipTextConfig, ClipVisionConfig};

/// The sizes an encoder is built from; the text and vision configs name them alike.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EncoderDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub head_dim: usize,
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
            head_dim: c.head_dim(),
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
            head_dim: c.head_dim(),
            layers: c.num_hidden_layers,
            layer_norm_eps: c.layer_norm_eps,
            activation: c.hidden_act,
        }
    }
}

/// `encoder.layers.{i}` of a tower.
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

    /// `[batch, seq, hidden]` → the same shape. `mask`: an additive `[seq, seq]` attention mask.
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let mut xs = xs.clone();
        for layer in &self.layers {
            xs = layer.forward(&xs, mask)?;
        }
        Ok(xs)
    }
}

/// Pre-norm transformer layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
struct EncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    mlp: Mlp,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, d: EncoderDims) -> Result<Self> {
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(d.hidden, d.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: SelfAttention::new(vb.pp("self_attn"), d)?,
            layer_norm2: candle_nn::layer_norm(d.hidden, d.layer_norm_eps, vb.pp("layer_norm2"))?,
            mlp: Mlp::new(vb.pp("mlp"), d.hidden, d.intermediate, d.activation)?,
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let xs = (xs
            + self
                .self_attn
                .forward(&self.layer_norm1.forward(xs)?, mask)?)?;
        Ok((&xs + self.mlp.forward(&self.layer_norm2.forward(&xs)?)?)?)
    }
}

/// The layers' feed-forward block, `fc2(act(fc1(x)))` (transformers' `CLIPMLP`; BLIP's vision
/// tower has the same).
pub(crate) struct Mlp {
    fc1: Linear,
    fc2: Linear,
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
            fc1: candle_nn::linear(hidden, intermediate, vb.pp("fc1"))?,
            fc2: candle_nn::linear(intermediate, hidden, vb.pp("fc2"))?,
            activation,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let hidden = activate(&self.fc1.forward(xs)?, self.activation)?;
        Ok(self.fc2.forward(&hidden)?)
    }
}

/// transformers' `ACT2FN[hidden_act]` for the activations CLIP and BLIP configs name.
pub(crate) fn activate(xs: &Tensor, activation: ClipActivation) -> Result<Tensor> {
    Ok(match activation {
        ClipActivation::QuickGelu => (xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?)?,
        ClipActivation::Gelu => xs.gelu_erf()?,
    })
}

struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, d: EncoderDims) -> Result<Self> {
        let h = d.hidden;
        Ok(Self {
            q_proj: candle_nn::linear(h, h, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(h, h, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(h, h, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(h, h, vb.pp("out_proj"))?,
            heads: d.heads,
            head_dim: d.head_dim,
        })
    }

    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (batch, seq, hidden) = xs.dims3()?;
        // [batch, seq, hidden] → [batch, heads, seq, head_dim], in f32 so half-precision weights do
        // not lose the softmax.
        let split_heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((batch, seq, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()?
                .to_dtype(DType::F32)?)
        };
        let q = split_heads(self.q_proj.forward(xs)?)?;
        let k = split_heads(self.k_proj.forward(xs)?)?;
        let v = split_heads(self.v_proj.forward(xs)?)?;
        let mut scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs
            .matmul(&v)?
            .to_dtype(xs.dtype())?
            .transpose(1, 2)?
            .reshape((batch, seq, hidden))?;
        Ok(self.out_proj.forward(&out)?)
    }
}
