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

pub use vision::ClipVisionTransformer;

/// transformers' `CLIPTextConfig` default, for a `text_config` without `eos_token_id`.
const DEFAULT_EOS_TOKEN_ID: u32 = 49407;
/// The `eos_token_id` configs written before transformers corrected it carry (see
/// [`TextPooling::HighestId`]).
const LEGACY_EOS_TOKEN_ID: u32 = 2;

/// Which of a prompt's hidden states is its pooled output, as transformers' `CLIPTextModel`
/// chooses by the text config's `eos_token_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPooling {
    /// `eos_token_id == 2`, the stale value of older configs: the position of the highest id
    /// (the first, if repeated), which is the end token in CLIP's own vocabulary.
    HighestId,
    /// The first position holding this end-token id.
    FirstEndToken(u32),
}

pub struct ClipModel {
    text_model: TextEncoder,
    vision_model: ClipVisionTransformer,
    text_projection: Linear,
    visual_projection: Linear,
    text_pooling: TextPooling,
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
        let text_pooling = match config.text.eos_token_id {
            Some(LEGACY_EOS_TOKEN_ID) => TextPooling::HighestId,
            Some(id) => TextPooling::FirstEndToken(id),
            None => TextPooling::FirstEndToken(DEFAULT_EOS_TOKEN_ID),
        };
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
            text_pooling,
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
        let (batch, seq, width) = hidden.dims3()?;
        let positions = pooled_positions(&input_ids.to_vec2::<u32>()?, self.text_pooling)?;
        let rows: Vec<u32> = positions
            .iter()
            .enumerate()
            .map(|(row, &position)| (row * seq + position) as u32)
            .collect();
        let rows = Tensor::new(rows, hidden.device())?;
        let pooled = hidden
            .reshape((batch * seq, width))?
            .index_select(&rows, 0)?;
        Ok(self.text_projection.forward(&pooled)?)
    }

    pub fn text_pooling(&self) -> TextPooling {
        self.text_pooling
    }

    pub fn config(&self) -> &ClipModelConfig {
        &self.config
    }
}

/// For each row of ids, the position whose hidden state is the pooled output.
fn pooled_positions(ids: &[Vec<u32>], pooling: TextPooling) -> Result<Vec<usize>> {
    ids.iter()
        .enumerate()
        .map(|(row, ids)| match pooling {
            TextPooling::HighestId => {
                let highest = ids.iter().max().context("empty input ids")?;
                Ok(ids
                    .iter()
                    .position(|id| id == highest)
                    .expect("the max is in the row"))
            }
            // transformers silently pools at position 0 when the end token is missing.
            TextPooling::FirstEndToken(end) => {
                ids.iter().position(|&id| id == end).with_context(|| {
                    format!(
                        "input ids row {row} has no end token (id {end}), where the text is pooled"
                    )
                })
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pools_where_transformers_does() {
        let ids = vec![vec![9, 5, 7, 9, 2, 2], vec![9, 2, 4, 2, 1, 1]];
        assert_eq!(
            pooled_positions(&ids, TextPooling::HighestId).unwrap(),
            [0, 0]
        );
        assert_eq!(
            pooled_positions(&ids, TextPooling::FirstEndToken(2)).unwrap(),
            [4, 1]
        );
        let err = pooled_positions(&ids, TextPooling::FirstEndToken(7)).unwrap_err();
        assert!(
            format!("{err:#}").contains("row 1 has no end token (id 7)"),
            "{err:#}"
        );
    }
}
