//! BLIP captioning config: a transformers `BlipForConditionalGeneration` `config.json`
//! (`vision_config`, a ViT; `text_config`, a BERT decoder with cross-attention), as
//! Salesforce/blip-image-captioning-large has it. Keys a tower config leaves out take
//! transformers' class defaults, as transformers fills them in.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::clip::{activation, check_model_kind, heads_divide, layer_norm_eps, required};
use super::ClipActivation;
use crate::models::vit_embeddings;

/// `vision_config` (transformers' `BlipVisionConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct BlipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
}

impl BlipVisionConfig {
    /// The class token and the patches.
    pub fn num_positions(&self) -> usize {
        vit_embeddings::positions(self.image_size, self.patch_size)
    }
}

/// `text_config` (transformers' `BlipTextConfig`), the decoder's part of it.
#[derive(Debug, Clone, PartialEq)]
pub struct BlipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The width of the image features the cross-attention keys and values are made from: the
    /// vision tower's `hidden_size`.
    pub encoder_hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    /// The decoder's start token (`[DEC]`), put in place of the prompt's `[CLS]`.
    pub bos_token_id: u32,
    /// The token generation stops at (`[SEP]`): transformers' BLIP generates up to
    /// `sep_token_id`, not `eos_token_id`.
    pub sep_token_id: u32,
    /// The LM head's weight is the word embedding matrix (transformers' default, and what its
    /// files assume when they leave `cls.predictions.decoder.weight` out); read from the
    /// top-level `tie_word_embeddings`, which is what ties BlipForConditionalGeneration's weights.
    pub tie_word_embeddings: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlipConfig {
    pub vision: BlipVisionConfig,
    pub text: BlipTextConfig,
}

/// transformers' `BlipVisionConfig` defaults for the keys read here.
const VISION_DEFAULTS: &str = r#"{
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "image_size": 384, "patch_size": 16, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5
}"#;
/// transformers' `BlipTextConfig` defaults for the keys read here.
const TEXT_DEFAULTS: &str = r#"{
    "vocab_size": 30524, "hidden_size": 768, "encoder_hidden_size": 768,
    "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 8,
    "max_position_embeddings": 512, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
    "pad_token_id": 0, "bos_token_id": 30522, "sep_token_id": 102, "is_decoder": true
}"#;

#[derive(Deserialize)]
struct RawVision {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_channels: Option<usize>,
    image_size: usize,
    patch_size: usize,
    hidden_act: String,
    layer_norm_eps: f64,
}

#[derive(Deserialize)]
struct RawText {
    vocab_size: usize,
    hidden_size: usize,
    encoder_hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    hidden_act: String,
    layer_norm_eps: f64,
    pad_token_id: u32,
    bos_token_id: u32,
    sep_token_id: u32,
    is_decoder: bool,
}

impl BlipConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid BLIP config {}", path.display()))
    }

    pub fn parse(json: &str) -> Result<Self> {
        let mut root: Map<String, Value> =
            serde_json::from_str(json).context("malformed BLIP config.json")?;
        check_model_kind(&root, "BlipForConditionalGeneration", "blip")
            .context("not a BLIP captioning model")?;
        let vision: RawVision =
            serde_json::from_value(with_defaults(&mut root, "vision_config", VISION_DEFAULTS)?)
                .context("malformed vision_config")?;
        let text: RawText =
            serde_json::from_value(with_defaults(&mut root, "text_config", TEXT_DEFAULTS)?)
                .context("malformed text_config")?;
        let tie_word_embeddings = match root.get("tie_word_embeddings") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(tie)) => *tie,
            Some(other) => bail!("tie_word_embeddings = {other}: expected true or false"),
        };
        let vision = vision_from_raw(vision).context("vision_config")?;
        Ok(Self {
            text: BlipTextConfig {
                tie_word_embeddings,
                // transformers' BlipConfig sets it so, whatever text_config says (the Hub's
                // blip-image-captioning-large leaves the default 768 beside a 1024-wide ViT).
                encoder_hidden_size: vision.hidden_size,
                ..text_from_raw(text).context("text_config")?
            },
            vision,
        })
    }
}

/// The tower config `key`, over transformers' defaults for what it leaves out.
fn with_defaults(root: &mut Map<String, Value>, key: &str, defaults: &str) -> Result<Value> {
    let mut config: Map<String, Value> =
        serde_json::from_str(defaults).expect("the defaults are valid JSON");
    match root.remove(key) {
        Some(Value::Object(given)) => {
            config.extend(given.into_iter().filter(|(_, v)| !v.is_null()));
        }
        Some(other) => bail!("{key} = {other}: expected an object"),
        None => bail!("missing {key}"),
    }
    Ok(Value::Object(config))
}

fn vision_from_raw(raw: RawVision) -> Result<BlipVisionConfig> {
    let hidden_size = required(Some(raw.hidden_size), "hidden_size")?;
    let num_attention_heads = required(Some(raw.num_attention_heads), "num_attention_heads")?;
    heads_divide(hidden_size, num_attention_heads)?;
    if let Some(channels) = raw.num_channels {
        ensure!(
            channels == 3,
            "num_channels = {channels}: only RGB (3) is supported"
        );
    }
    let image_size = required(Some(raw.image_size), "image_size")?;
    let patch_size = required(Some(raw.patch_size), "patch_size")?;
    ensure!(
        image_size.is_multiple_of(patch_size),
        "image_size = {image_size} is not a multiple of patch_size = {patch_size}"
    );
    Ok(BlipVisionConfig {
        hidden_size,
        intermediate_size: required(Some(raw.intermediate_size), "intermediate_size")?,
        num_hidden_layers: required(Some(raw.num_hidden_layers), "num_hidden_layers")?,
        num_attention_heads,
        image_size,
        patch_size,
        hidden_act: activation(Some(&raw.hidden_act))?,
        layer_norm_eps: layer_norm_eps(Some(raw.layer_norm_eps))?,
    })
}

fn text_from_raw(raw: RawText) -> Result<BlipTextConfig> {
    ensure!(
        raw.is_decoder,
        "is_decoder = false: a captioning model's text model is a decoder"
    );
    let hidden_size = required(Some(raw.hidden_size), "hidden_size")?;
    let num_attention_heads = required(Some(raw.num_attention_heads), "num_attention_heads")?;
    heads_divide(hidden_size, num_attention_heads)?;
    let vocab_size = required(Some(raw.vocab_size), "vocab_size")?;
    for (key, id) in [
        ("pad_token_id", raw.pad_token_id),
        ("bos_token_id", raw.bos_token_id),
        ("sep_token_id", raw.sep_token_id),
    ] {
        ensure!(
            (id as usize) < vocab_size,
            "{key} = {id} is outside the vocabulary (vocab_size = {vocab_size})"
        );
    }
    Ok(BlipTextConfig {
        vocab_size,
        hidden_size,
        encoder_hidden_size: required(Some(raw.encoder_hidden_size), "encoder_hidden_size")?,
        intermediate_size: required(Some(raw.intermediate_size), "intermediate_size")?,
        num_hidden_layers: required(Some(raw.num_hidden_layers), "num_hidden_layers")?,
        num_attention_heads,
        max_position_embeddings: required(
            Some(raw.max_position_embeddings),
            "max_position_embeddings",
        )?,
        hidden_act: activation(Some(&raw.hidden_act))?,
        layer_norm_eps: layer_norm_eps(Some(raw.layer_norm_eps))?,
        pad_token_id: raw.pad_token_id,
        bos_token_id: raw.bos_token_id,
        sep_token_id: raw.sep_token_id,
        tie_word_embeddings: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_take_transformers_defaults() {
        let config = BlipConfig::parse(
            r#"{"architectures": ["BlipForConditionalGeneration"], "model_type": "blip",
                "text_config": {"num_attention_heads": 12}, "vision_config": {"hidden_size": 1024,
                "num_attention_heads": 16, "num_hidden_layers": 24, "intermediate_size": 4096}}"#,
        )
        .unwrap();
        assert_eq!(config.text.vocab_size, 30524);
        assert_eq!(config.text.num_attention_heads, 12);
        assert_eq!(config.text.bos_token_id, 30522);
        assert_eq!(config.text.sep_token_id, 102);
        assert_eq!(config.text.layer_norm_eps, 1e-12);
        assert_eq!(config.vision.hidden_size, 1024);
        assert_eq!(config.vision.image_size, 384);
        assert_eq!(config.vision.num_positions(), 577);
        assert_eq!(config.vision.hidden_act, ClipActivation::Gelu);
        // As transformers' BlipConfig: the cross-attention reads the ViT's width; tied LM head.
        assert_eq!(config.text.encoder_hidden_size, 1024);
        assert!(config.text.tie_word_embeddings);
        let untied = BlipConfig::parse(
            r#"{"tie_word_embeddings": false, "text_config": {}, "vision_config": {}}"#,
        )
        .unwrap();
        assert!(!untied.text.tie_word_embeddings);
        let err = BlipConfig::parse(
            r#"{"tie_word_embeddings": "no", "text_config": {}, "vision_config": {}}"#,
        )
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("tie_word_embeddings"),
            "{err:#}"
        );
    }

    #[test]
    fn rejects_other_models_and_bad_sizes() {
        let err = BlipConfig::parse(
            r#"{"architectures": ["BlipForQuestionAnswering"], "text_config": {}, "vision_config": {}}"#,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("captioning"), "{err:#}");
        let err = BlipConfig::parse(r#"{"text_config": {}, "vision_config": {"patch_size": 7}}"#)
            .unwrap_err();
        assert!(format!("{err:#}").contains("not a multiple"), "{err:#}");
        let err = BlipConfig::parse(r#"{"text_config": {"vocab_size": 100}, "vision_config": {}}"#)
            .unwrap_err();
        assert!(format!("{err:#}").contains("bos_token_id"), "{err:#}");
    }
}
