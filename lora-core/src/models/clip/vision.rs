//! CLIP's vision tower (transformers' `CLIPVisionModel`): a ViT whose pooled output is the class
//! token after the last layer, through `post_layernorm`.

use anyhow::{ensure, Context, Result};
use candle_core::{Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use crate::models::clip::encoder::ClipEncoder;
use crate::models::config::ClipVisionConfig;

pub struct ClipVisionTransformer {
    /// The patch embedding, a convolution whose stride is its kernel, kept as the matrix
    /// `[hidden, 3·patch·patch]` it is on flattened patches.
    patch_weight: Tensor,
    /// `[1, 1, hidden]`
    class_embedding: Tensor,
    /// `[1, positions, hidden]`: the class token's, then the patches' in row-major order.
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: LayerNorm,
    config: ClipVisionConfig,
}

impl ClipVisionTransformer {
    /// `vb` is the `vision_model` level of a CLIPModel's weights.
    pub fn new(vb: VarBuilder, config: &ClipVisionConfig) -> Result<Self> {
        let (hidden, patch) = (config.hidden_size, config.patch_size);
        let embeddings = vb.pp("embeddings");
        let patch_weight = embeddings
            .get((hidden, 3, patch, patch), "patch_embedding.weight")?
            .reshape((hidden, 3 * patch * patch))?;
        let class_embedding = embeddings
            .get(hidden, "class_embedding")?
            .reshape((1, 1, hidden))?;
        let position_embedding = embeddings
            .get(
                (config.num_positions(), hidden),
                "position_embedding.weight",
            )?
            .unsqueeze(0)?;
        let eps = config.layer_norm_eps;
        Ok(Self {
            patch_weight,
            class_embedding,
            position_embedding,
            // The misspelling is transformers' weight name.
            pre_layrnorm: candle_nn::layer_norm(hidden, eps, vb.pp("pre_layrnorm"))?,
            encoder: ClipEncoder::new(vb.pp("encoder"), config.into())?,
            post_layernorm: candle_nn::layer_norm(hidden, eps, vb.pp("post_layernorm"))?,
            config: config.clone(),
        })
    }

    /// `[batch, 3, image_size, image_size]` normalised pixels → the pooled `[batch, hidden]`
    /// (transformers' `pooler_output`).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (batch, channels, height, width) = pixel_values
            .dims4()
            .context("pixel values: expected [batch, 3, height, width]")?;
        let size = self.config.image_size;
        ensure!(
            (channels, height, width) == (3, size, size),
            "pixel values are {channels}×{height}×{width}; the model takes 3×{size}×{size}"
        );
        let (grid, patch) = (self.config.grid_size(), self.config.patch_size);
        let patches = pixel_values
            .to_dtype(self.patch_weight.dtype())?
            .reshape(vec![batch, 3, grid, patch, grid, patch])?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((batch, grid * grid, 3 * patch * patch))?;
        let patches = patches.broadcast_matmul(&self.patch_weight.t()?)?;
        let hidden = self.config.hidden_size;
        let class = self.class_embedding.broadcast_as((batch, 1, hidden))?;
        let xs = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let xs = self.pre_layrnorm.forward(&xs)?;
        let xs = self.encoder.forward(&xs, None)?;
        let class_out = xs.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(self.post_layernorm.forward(&class_out)?)
    }
}
