//! CLIP (transformers' `CLIPModel`) for what CLIP score needs: `get_image_features` and
//! `get_text_features`, each tower's pooled output projected into the shared embedding space.
//! Inference only.
//!
//! A model is a folder as the OpenAI CLIP repositories on the Hub have it: `config.json`
//! ([`ClipModelConfig`]) and `model.safetensors` with `text_model.…` (the text tower,
//! [`TextEncoder`]), `vision_model.…` ([`ClipVisionTransformer`]) and the two bias-free
//! projections. Both towers run [`encoder`]'s layers.

pub(crate) mod encoder;
mod vision;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::io::weights;
use crate::models::config::ClipModelConfig;
use crate::models::text_encoder::TextEncoder;
pub use crate::models::text_encoder::TextPooling;

pub use vision::ClipVisionTransformer;

pub struct ClipModel {
    text_model: TextEncoder,
    vision_model: ClipVisionTransformer,
    text_projection: Linear,
    visual_projection: Linear,
    config: ClipModelConfig,
}

impl ClipModel {
    /// Loads `dir/config.json` and `dir/model.safetensors` (or `model.fp16.safetensors`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = ClipModelConfig::from_file(&dir.join("config.json"))?;
        let path = weights::component_weights(dir, "model")?;
        let vb = weights::var_builder(std::slice::from_ref(&path), dtype, device, BTreeMap::new())?;
        Self::new(vb, &config)
            .with_context(|| format!("loading the CLIP model from {}", path.display()))
    }

    /// Builds the model from a `VarBuilder` over a CLIPModel's weights, named as transformers
    /// names them.
    pub fn new(vb: VarBuilder, config: &ClipModelConfig) -> Result<Self> {
        let dim = config.projection_dim;
        Ok(Self {
            text_model: TextEncoder::from_var_builder(vb.clone(), &config.text)?,
            vision_model: ClipVisionTransformer::new(vb.pp("vision_model"), &config.vision)?,
            text_projection: candle_nn::linear_no_bias(
                config.text.hidden_size,
                dim,
                vb.pp("text_projection"),
            )?,
            visual_projection: candle_nn::linear_no_bias(
                config.vision.hidden_size,
                dim,
                vb.pp("visual_projection"),
            )?,
            config: config.clone(),
        })
    }

    /// `[batch, 3, image_size, image_size]` normalised pixels → `[batch, projection_dim]`
    /// (transformers' `get_image_features`).
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let pooled = self.vision_model.forward(pixel_values)?;
        Ok(self.visual_projection.forward(&pooled)?)
    }

    /// `[batch, seq]` token ids (an integer dtype) → `[batch, projection_dim]` (transformers'
    /// `get_text_features`). Each row must hold the end token unless the config's pooling is
    /// [`TextPooling::HighestId`]; padding after it does not change the result.
    pub fn text_features(&self, input_ids: &Tensor) -> Result<Tensor> {
        let input_ids = input_ids.to_dtype(DType::U32)?;
        let hidden = self.text_model.forward(&input_ids)?;
        let pooled = self.text_model.pooled_output(&input_ids, &hidden)?;
        Ok(self.text_projection.forward(&pooled)?)
    }

    pub fn text_pooling(&self) -> TextPooling {
        self.text_model.pooling()
    }

    pub fn config(&self) -> &ClipModelConfig {
        &self.config
    }
}
