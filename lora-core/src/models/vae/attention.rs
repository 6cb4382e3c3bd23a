//! The VAE mid block's attention: group norm, one head spanning all channels over the `H·W`
//! pixels as tokens, the output projection and a residual sum (diffusers' `Attention` with
//! `attention_head_dim = channels`, `residual_connection`, softmax upcast).

use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::NORM_EPS;
use crate::engine::fused::project_to_image_residual;
use crate::engine::{attention, image_to_tokens, GroupNormLayer, LinearLayer};

pub(super) struct SelfAttention {
    norm: GroupNormLayer,
    query: LinearLayer,
    key: LinearLayer,
    value: LinearLayer,
    /// The output projection `[C, C]` and its bias `[C]`, applied with the residual sum.
    out_weight: Tensor,
    out_bias: Tensor,
}

impl SelfAttention {
    /// Accepts both diffusers weight spellings: `to_q/to_k/to_v/to_out.0` and the older
    /// `query/key/value/proj_attn`.
    pub(super) fn load(vb: &VarBuilder, groups: usize, channels: usize) -> Result<Self> {
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let linear = |name: &str| LinearLayer::load(&vb.pp(name), channels, channels, true);
        let out = vb.pp(names[3]);
        Ok(Self {
            norm: GroupNormLayer::load(&vb.pp("group_norm"), groups, channels, NORM_EPS)?,
            query: linear(names[0])?,
            key: linear(names[1])?,
            value: linear(names[2])?,
            out_weight: out.get((channels, channels), "weight")?,
            out_bias: out.get(channels, "bias")?,
        })
    }

    /// `x + attention(norm(x))` for `x` `[B, C, H, W]`.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let tokens = image_to_tokens(&self.norm.forward(x)?)?;
        let q = self.query.forward(&tokens)?;
        let k = self.key.forward(&tokens)?;
        let v = self.value.forward(&tokens)?;
        let attended = attention(&q, &k, &v, 1, true)?;
        Ok(project_to_image_residual(
            &attended,
            &self.out_weight,
            Some(&self.out_bias),
            x,
        )?)
    }
}
