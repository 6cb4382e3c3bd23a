//! CLIP's vision tower (transformers' `CLIPVisionModel`): a ViT whose pooled output is the class
//! token after the last layer, through `post_layernorm`.

use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::models::clip::encoder::{AttentionMask, ClipEncoder};
use crate::models::config::ClipVisionConfig;
use crate::models::vit_embeddings::VitEmbeddings;

pub struct ClipVisionTransformer {
    embeddings: VitEmbeddings,
    pre_layrnorm: LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: LayerNorm,
}

impl ClipVisionTransformer {
    /// `vb` is the `vision_model` level of a CLIPModel's weights.
    pub fn new(vb: VarBuilder, config: &ClipVisionConfig) -> Result<Self> {
        let (hidden, patch) = (config.hidden_size, config.patch_size);
        let embeddings = vb.pp("embeddings");
        let embeddings = VitEmbeddings::new(
            embeddings.get((hidden, 3, patch, patch), "patch_embedding.weight")?,
            None,
            embeddings.get(hidden, "class_embedding")?,
            embeddings.get(
                (config.num_positions(), hidden),
                "position_embedding.weight",
            )?,
            config.image_size,
        )?;
        let eps = config.layer_norm_eps;
        Ok(Self {
            embeddings,
            // The misspelling is transformers' weight name.
            pre_layrnorm: candle_nn::layer_norm(hidden, eps, vb.pp("pre_layrnorm"))?,
            encoder: ClipEncoder::new(vb.pp("encoder"), config.into())?,
            post_layernorm: candle_nn::layer_norm(hidden, eps, vb.pp("post_layernorm"))?,
        })
    }

    /// `[batch, 3, image_size, image_size]` normalised pixels → the pooled `[batch, hidden]`
    /// (transformers' `pooler_output`).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let xs = self.embeddings.forward(pixel_values)?;
        let xs = self.pre_layrnorm.forward(&xs)?;
        let xs = self.encoder.forward(&xs, AttentionMask::None)?;
        let class_out = xs.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.post_layernorm.forward(&class_out)?)
    }
}
