//! diffusers' `Transformer2DModel` and what it is made of: `BasicTransformerBlock` (self-attention,
//! cross-attention, GEGLU feed-forward, each after a layer norm and with a residual sum),
//! `Attention` and `FeedForward`. Their Linear / 1×1-conv layers are [`LoraLinear`]s.

use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::adapters::{LayerVisitor, LoraLinear, ModuleKind};
use crate::engine::{attention, GroupNormLayer, LayerNormLayer};
use crate::models::config::UNetConfig;

/// Calls `f` with the full path and layer of every adaptable layer below `prefix`.
pub(super) type Visitor<'a> = LayerVisitor<'a>;

fn lora_linear(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<LoraLinear> {
    LoraLinear::load_linear(vb, in_dim, out_dim, bias)
}

fn lora_conv1x1(vb: &VarBuilder, in_ch: usize, out_ch: usize) -> Result<LoraLinear> {
    let weight = vb.get((out_ch, in_ch, 1, 1), "weight")?;
    LoraLinear::new(weight, Some(vb.get(out_ch, "bias")?), ModuleKind::Conv1x1)
}

#[derive(Debug, Clone)]
struct Attention {
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
    heads: usize,
    upcast: bool,
}

impl Attention {
    fn load(
        vb: &VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        upcast: bool,
    ) -> Result<Self> {
        Ok(Self {
            to_q: lora_linear(&vb.pp("to_q"), query_dim, query_dim, false)?,
            to_k: lora_linear(&vb.pp("to_k"), context_dim, query_dim, false)?,
            to_v: lora_linear(&vb.pp("to_v"), context_dim, query_dim, false)?,
            to_out: lora_linear(&vb.pp("to_out.0"), query_dim, query_dim, true)?,
            heads,
            upcast,
        })
    }

    /// `residual + attention(x, context)`: self-attention without a context.
    fn forward_residual(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = attention(&q, &k, &v, self.heads, self.upcast)?;
        self.to_out.forward_residual(&out, residual)
    }

    fn visit(&mut self, prefix: &str, f: &mut Visitor) -> Result<()> {
        f(&format!("{prefix}.to_q"), &mut self.to_q)?;
        f(&format!("{prefix}.to_k"), &mut self.to_k)?;
        f(&format!("{prefix}.to_v"), &mut self.to_v)?;
        f(&format!("{prefix}.to_out.0"), &mut self.to_out)
    }
}

/// GEGLU feed-forward: `net.2(h · gelu(gate))` with `[h, gate] = net.0.proj(x)`, exact-erf GELU.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: LoraLinear,
    proj_out: LoraLinear,
}

impl FeedForward {
    fn load(vb: &VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: lora_linear(&vb.pp("net.0.proj"), dim, inner * 2, true)?,
            proj_out: lora_linear(&vb.pp("net.2"), inner, dim, true)?,
        })
    }

    /// `x + ff(norm(x))`.
    fn forward_residual(&self, norm: &LayerNormLayer, x: &Tensor) -> Result<Tensor> {
        self.proj_in
            .forward_geglu_feed_forward_residual(&self.proj_out, norm, x)
    }

    fn visit(&mut self, prefix: &str, f: &mut Visitor) -> Result<()> {
        f(&format!("{prefix}.net.0.proj"), &mut self.proj_in)?;
        f(&format!("{prefix}.net.2"), &mut self.proj_out)
    }
}

#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNormLayer,
    attn1: Attention,
    norm2: LayerNormLayer,
    attn2: Attention,
    norm3: LayerNormLayer,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn load(vb: &VarBuilder, cfg: &UNetConfig, dim: usize, heads: usize) -> Result<Self> {
        const EPS: f64 = 1e-5;
        let upcast = cfg.upcast_attention;
        Ok(Self {
            norm1: LayerNormLayer::load(&vb.pp("norm1"), dim, EPS)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, dim, heads, upcast)?,
            norm2: LayerNormLayer::load(&vb.pp("norm2"), dim, EPS)?,
            attn2: Attention::load(&vb.pp("attn2"), dim, cfg.cross_attention_dim, heads, upcast)?,
            norm3: LayerNormLayer::load(&vb.pp("norm3"), dim, EPS)?,
            ff: FeedForward::load(&vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        // Each residual sum is one node with the layer before it where that layer is frozen:
        // the graph then keeps the sum only (see `engine::fused`).
        let x = self
            .attn1
            .forward_residual(&self.norm1.forward(x)?, None, x)?;
        let x = self
            .attn2
            .forward_residual(&self.norm2.forward(&x)?, Some(context), &x)?;
        self.ff.forward_residual(&self.norm3, &x)
    }

    fn visit(&mut self, prefix: &str, f: &mut Visitor) -> Result<()> {
        self.attn1.visit(&format!("{prefix}.attn1"), f)?;
        self.attn2.visit(&format!("{prefix}.attn2"), f)?;
        self.ff.visit(&format!("{prefix}.ff"), f)
    }
}

/// diffusers `Transformer2DModel`: group norm, projection in (1×1 conv or linear), transformer
/// blocks over the flattened pixels, projection out, residual.
#[derive(Debug, Clone)]
pub(super) struct Transformer2DModel {
    norm: GroupNormLayer,
    proj_in: LoraLinear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: LoraLinear,
}

impl Transformer2DModel {
    pub(super) fn load(
        vb: &VarBuilder,
        cfg: &UNetConfig,
        channels: usize,
        heads: usize,
        layers: usize,
    ) -> Result<Self> {
        let (proj_in, proj_out) = if cfg.use_linear_projection {
            (
                lora_linear(&vb.pp("proj_in"), channels, channels, true)?,
                lora_linear(&vb.pp("proj_out"), channels, channels, true)?,
            )
        } else {
            (
                lora_conv1x1(&vb.pp("proj_in"), channels, channels)?,
                lora_conv1x1(&vb.pp("proj_out"), channels, channels)?,
            )
        };
        let blocks = (0..layers)
            .map(|k| {
                BasicTransformerBlock::load(
                    &vb.pp(format!("transformer_blocks.{k}")),
                    cfg,
                    channels,
                    heads,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: GroupNormLayer::load(&vb.pp("norm"), cfg.norm_num_groups, channels, 1e-6)?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    pub(super) fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut tokens = self.proj_in.forward_group_normed_to_tokens(&self.norm, x)?;
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        self.proj_out.forward_to_image_residual(&tokens, x)
    }

    pub(super) fn visit(&mut self, prefix: &str, f: &mut Visitor) -> Result<()> {
        f(&format!("{prefix}.proj_in"), &mut self.proj_in)?;
        for (k, block) in self.blocks.iter_mut().enumerate() {
            block.visit(&format!("{prefix}.transformer_blocks.{k}"), f)?;
        }
        f(&format!("{prefix}.proj_out"), &mut self.proj_out)
    }
}
