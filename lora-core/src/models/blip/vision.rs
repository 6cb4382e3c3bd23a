//! BLIP's vision tower (transformers' `BlipVisionModel`): a ViT with a class token, no layer norm
//! before the encoder, pre-norm layers whose attention projects queries, keys and values with one
//! fused `qkv` linear, and `post_layernorm` over every position. The captioning decoder
//! cross-attends to that whole sequence (`last_hidden_state`), not to the pooled class token.

use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use crate::models::blip::attention::multi_head_attention;
use crate::models::clip::encoder::Mlp;
use crate::models::config::BlipVisionConfig;
use crate::models::vit_embeddings::VitEmbeddings;

pub struct BlipVisionModel {
    embeddings: VitEmbeddings,
    layers: Vec<VisionLayer>,
    post_layernorm: LayerNorm,
    config: BlipVisionConfig,
}

impl BlipVisionModel {
    /// `vb` is the `vision_model` level of a BlipForConditionalGeneration's weights.
    pub fn new(vb: VarBuilder, config: &BlipVisionConfig) -> Result<Self> {
        let (hidden, patch) = (config.hidden_size, config.patch_size);
        let embeddings = vb.pp("embeddings");
        // Unlike CLIP's, BLIP's patch convolution has a bias, and its position embedding is a
        // parameter `[1, positions, hidden]`, not an embedding table's `.weight`.
        let embeddings = VitEmbeddings::new(
            embeddings.get((hidden, 3, patch, patch), "patch_embedding.weight")?,
            Some(embeddings.get(hidden, "patch_embedding.bias")?),
            embeddings.get((1, 1, hidden), "class_embedding")?,
            embeddings.get((1, config.num_positions(), hidden), "position_embedding")?,
            config.image_size,
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| VisionLayer::new(vb.pp(format!("encoder.layers.{i}")), config))
            .collect::<Result<_>>()?;
        Ok(Self {
            embeddings,
            layers,
            post_layernorm: candle_nn::layer_norm(
                hidden,
                config.layer_norm_eps,
                vb.pp("post_layernorm"),
            )?,
            config: config.clone(),
        })
    }

    /// `[batch, 3, image_size, image_size]` normalised pixels → `[batch, positions, hidden]`
    /// (transformers' `last_hidden_state`, after `post_layernorm`).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let mut xs = self.embeddings.forward(pixel_values)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        Ok(self.post_layernorm.forward(&xs)?)
    }

    pub fn config(&self) -> &BlipVisionConfig {
        &self.config
    }
}

/// `encoder.layers.{i}`: `x + projection(attn(ln1(x)))`, then `x + mlp(ln2(x))`.
struct VisionLayer {
    layer_norm1: LayerNorm,
    qkv: Linear,
    projection: Linear,
    layer_norm2: LayerNorm,
    mlp: Mlp,
    heads: usize,
}

impl VisionLayer {
    fn new(vb: VarBuilder, c: &BlipVisionConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            qkv: candle_nn::linear(h, 3 * h, vb.pp("self_attn.qkv"))?,
            projection: candle_nn::linear(h, h, vb.pp("self_attn.projection"))?,
            layer_norm2: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            mlp: Mlp::new(vb.pp("mlp"), h, c.intermediate_size, c.hidden_act)?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let hidden = xs.dim(2)?;
        // `qkv`'s output is [q | k | v], each heads·head_dim wide.
        let qkv = self.qkv.forward(&self.layer_norm1.forward(xs)?)?;
        let q = qkv.narrow(2, 0, hidden)?;
        let k = qkv.narrow(2, hidden, hidden)?;
        let v = qkv.narrow(2, 2 * hidden, hidden)?;
        let attended = multi_head_attention(&q, &k, &v, self.heads, None)?;
        let xs = (xs + self.projection.forward(&attended)?)?;
        self.mlp
            .forward_residual(&self.layer_norm2.forward(&xs)?, &xs)
    }
}
