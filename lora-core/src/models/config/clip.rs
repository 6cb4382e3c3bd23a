//! CLIP configs: the text encoder's `text_encoder/config.json` (a transformers `CLIPTextConfig`),
//! and a whole transformers `CLIPModel`'s `config.json` (`text_config`, `vision_config`,
//! `projection_dim`), as the OpenAI CLIP repositories on the Hub have it.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::models::vit_embeddings;

/// The MLP activation, transformers' `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// `x · σ(1.702 x)`: OpenAI CLIP (SD 1.x).
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP ViT-H (SD 2.x).
    Gelu,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
    /// Only `CLIPTextModelWithProjection` uses it; the SD text encoders are read without it.
    pub projection_dim: Option<usize>,
    /// Token ids as written in the file. Many SD checkpoints carry transformers' stale defaults
    /// here (pad 1, bos 0, eos 2), so the tokenizer files take precedence over these.
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

#[derive(Deserialize)]
struct RawClipTextConfig {
    architectures: Option<Vec<String>>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    max_position_embeddings: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
    projection_dim: Option<usize>,
    pad_token_id: Option<u32>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
}

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text)
            .with_context(|| format!("invalid text encoder config {}", path.display()))
    }

    pub fn parse(json: &str) -> Result<Self> {
        let raw: RawClipTextConfig =
            serde_json::from_str(json).context("malformed text encoder config.json")?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawClipTextConfig) -> Result<Self> {
        for arch in raw.architectures.iter().flatten() {
            ensure!(
                matches!(arch.as_str(), "CLIPTextModel" | "CLIPTextModelWithProjection"),
                "architecture `{arch}` is not a CLIP text model: expected CLIPTextModel or CLIPTextModelWithProjection"
            );
        }
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        heads_divide(hidden_size, num_attention_heads)?;
        let hidden_act = activation(raw.hidden_act.as_deref())?;
        let layer_norm_eps = layer_norm_eps(raw.layer_norm_eps)?;
        let vocab_size = required(raw.vocab_size, "vocab_size")?;
        for (key, id) in [
            ("pad_token_id", raw.pad_token_id),
            ("bos_token_id", raw.bos_token_id),
            ("eos_token_id", raw.eos_token_id),
        ] {
            if let Some(id) = id {
                ensure!(
                    (id as usize) < vocab_size,
                    "{key} = {id} is outside the vocabulary (vocab_size = {vocab_size})"
                );
            }
        }
        Ok(Self {
            vocab_size,
            hidden_size,
            intermediate_size: required(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: required(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            max_position_embeddings: required(
                raw.max_position_embeddings,
                "max_position_embeddings",
            )?,
            hidden_act,
            layer_norm_eps,
            projection_dim: raw.projection_dim,
            pad_token_id: raw.pad_token_id,
            bos_token_id: raw.bos_token_id,
            eos_token_id: raw.eos_token_id,
        })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// A CLIP vision tower's `vision_config` (a transformers `CLIPVisionConfig`): a ViT over
/// `image_size`² RGB images cut into `patch_size`² patches, with a class token.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
}

#[derive(Deserialize)]
struct RawClipVisionConfig {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_channels: Option<usize>,
    image_size: Option<Value>,
    patch_size: Option<Value>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
}

impl ClipVisionConfig {
    fn from_raw(raw: RawClipVisionConfig) -> Result<Self> {
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        heads_divide(hidden_size, num_attention_heads)?;
        if let Some(channels) = raw.num_channels {
            ensure!(
                channels == 3,
                "num_channels = {channels}: only RGB (3) is supported"
            );
        }
        // transformers also accepts [height, width] here; no CLIP checkpoint uses it.
        let side = |value: Option<Value>, key: &str| -> Result<usize> {
            let value = value.with_context(|| format!("missing {key}"))?;
            let side = value
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .with_context(|| {
                    format!("unsupported {key} = {value}: expected one size in pixels")
                })?;
            required(Some(side), key)
        };
        let image_size = side(raw.image_size, "image_size")?;
        let patch_size = side(raw.patch_size, "patch_size")?;
        ensure!(
            image_size.is_multiple_of(patch_size),
            "image_size = {image_size} is not a multiple of patch_size = {patch_size}"
        );
        Ok(Self {
            hidden_size,
            intermediate_size: required(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: required(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            image_size,
            patch_size,
            hidden_act: activation(raw.hidden_act.as_deref())?,
            layer_norm_eps: layer_norm_eps(raw.layer_norm_eps)?,
        })
    }

    /// Patches along each side of the image.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// The class token and the patches.
    pub fn num_positions(&self) -> usize {
        vit_embeddings::positions(self.image_size, self.patch_size)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// A transformers `CLIPModel` `config.json`: both towers and the size of the shared embedding
/// space they are projected into.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipModelConfig {
    pub text: ClipTextConfig,
    pub vision: ClipVisionConfig,
    pub projection_dim: usize,
}

/// transformers' `CLIPTextConfig` defaults for the keys read here. Only a legacy
/// `text_config_dict` brings them in (see [`ClipModelConfig::parse`]).
const TEXT_CONFIG_DEFAULTS: &str = r#"{
    "vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
    "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 512, "pad_token_id": 1, "bos_token_id": 49406,
    "eos_token_id": 49407
}"#;
/// transformers' `CLIPVisionConfig` defaults for the keys read here, for `vision_config_dict`.
const VISION_CONFIG_DEFAULTS: &str = r#"{
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5
}"#;

impl ClipModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid CLIP model config {}", path.display()))
    }

    /// Older OpenAI CLIP configs also carry `text_config_dict` / `vision_config_dict` (a few
    /// sizes). transformers then rebuilds the whole tower config from that dict and its class
    /// defaults and lets it override `text_config` / `vision_config` key by key, so the same is
    /// done here: e.g. openai/clip-vit-large-patch14's `text_config` says `eos_token_id: 2`, and
    /// the model transformers loads has 49407.
    pub fn parse(json: &str) -> Result<Self> {
        let mut root: Map<String, Value> =
            serde_json::from_str(json).context("malformed CLIP model config.json")?;
        check_model_kind(&root, "CLIPModel", "clip")?;
        let text = tower(&mut root, "text_config", TEXT_CONFIG_DEFAULTS)?;
        let text: RawClipTextConfig =
            serde_json::from_value(text).context("malformed text_config")?;
        let text = ClipTextConfig::from_raw(text).context("text_config")?;
        let vision = tower(&mut root, "vision_config", VISION_CONFIG_DEFAULTS)?;
        let vision: RawClipVisionConfig =
            serde_json::from_value(vision).context("malformed vision_config")?;
        let vision = ClipVisionConfig::from_raw(vision).context("vision_config")?;
        let projection_dim = root
            .get("projection_dim")
            .context("missing projection_dim")?
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .context("projection_dim: expected a size")?;
        Ok(Self {
            text,
            vision,
            projection_dim: required(Some(projection_dim), "projection_dim")?,
        })
    }
}

/// Where a config names its class (`architectures`) and `model_type`, they must be `architecture`
/// and `model_type`: a config of another model is refused by name rather than misread.
pub(super) fn check_model_kind(
    root: &Map<String, Value>,
    architecture: &str,
    model_type: &str,
) -> Result<()> {
    if let Some(architectures) = root.get("architectures").filter(|a| !a.is_null()) {
        let names: Vec<&str> = architectures
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        ensure!(
            names == [architecture],
            "architectures = {architectures}: expected [\"{architecture}\"]"
        );
    }
    if let Some(given) = root.get("model_type").filter(|t| !t.is_null()) {
        ensure!(
            given == model_type,
            "model_type = {given}: expected \"{model_type}\""
        );
    }
    Ok(())
}

/// The tower config `key` of a CLIPModel config, with its legacy `<key>_dict` applied as
/// transformers applies it: `defaults` overlaid with the dict, overlaid on the config.
fn tower(root: &mut Map<String, Value>, key: &str, defaults: &str) -> Result<Value> {
    let mut config = match root.remove(key) {
        Some(Value::Object(config)) => config,
        Some(other) => bail!("{key} = {other}: expected an object"),
        None => bail!("missing {key}"),
    };
    match root.remove(&format!("{key}_dict")) {
        None | Some(Value::Null) => {}
        Some(Value::Object(dict)) => {
            let mut rebuilt: Map<String, Value> =
                serde_json::from_str(defaults).expect("the defaults are valid JSON");
            rebuilt.extend(dict);
            config.extend(rebuilt);
        }
        Some(other) => bail!("{key}_dict = {other}: expected an object"),
    }
    Ok(Value::Object(config))
}

/// An architecture size: present and positive; there is no sensible default to fall back on.
pub(super) fn required(value: Option<usize>, key: &str) -> Result<usize> {
    let v = value.with_context(|| format!("missing {key}"))?;
    ensure!(v > 0, "{key} = 0: expected a positive size");
    Ok(v)
}

pub(super) fn heads_divide(hidden_size: usize, num_attention_heads: usize) -> Result<()> {
    ensure!(
        hidden_size.is_multiple_of(num_attention_heads),
        "hidden_size = {hidden_size} is not divisible by num_attention_heads = {num_attention_heads}"
    );
    Ok(())
}

pub(super) fn activation(hidden_act: Option<&str>) -> Result<ClipActivation> {
    Ok(match hidden_act.context("missing hidden_act")? {
        "quick_gelu" => ClipActivation::QuickGelu,
        "gelu" => ClipActivation::Gelu,
        other => bail!("unsupported hidden_act `{other}`: expected quick_gelu or gelu"),
    })
}

pub(super) fn layer_norm_eps(value: Option<f64>) -> Result<f64> {
    let eps = value.context("missing layer_norm_eps")?;
    ensure!(
        eps > 0.0,
        "layer_norm_eps = {eps}: expected a positive number"
    );
    Ok(eps)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// stabilityai/stable-diffusion-2-1 text_encoder/config.json (abridged to the keys read).
    const SD21: &str = r#"{
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0,
        "dropout": 0.0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_size": 1024,
        "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 4096,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
        "num_attention_heads": 16, "num_hidden_layers": 23, "pad_token_id": 1,
        "projection_dim": 512, "torch_dtype": "float32", "vocab_size": 49408
    }"#;

    #[test]
    fn parses_sd21() {
        let c = ClipTextConfig::parse(SD21).unwrap();
        assert_eq!(c.hidden_act, ClipActivation::Gelu);
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.head_dim()),
            (1024, 23, 64)
        );
        assert_eq!((c.projection_dim, c.pad_token_id), (Some(512), Some(1)));
        let sd1 = SD21.replace("\"gelu\"", "\"quick_gelu\"");
        assert_eq!(
            ClipTextConfig::parse(&sd1).unwrap().hidden_act,
            ClipActivation::QuickGelu
        );
    }

    #[test]
    fn rejects_bad_values() {
        let cases = [
            (
                "\"gelu\"",
                "\"gelu_new\"",
                "unsupported hidden_act `gelu_new`",
            ),
            (
                "\"num_attention_heads\": 16",
                "\"num_attention_heads\": 15",
                "not divisible",
            ),
            (
                "\"CLIPTextModel\"",
                "\"T5EncoderModel\"",
                "`T5EncoderModel` is not a CLIP text model",
            ),
            ("\"hidden_size\": 1024,", "", "missing hidden_size"),
            (
                "\"pad_token_id\": 1",
                "\"pad_token_id\": 49408",
                "pad_token_id = 49408 is outside",
            ),
            (
                "\"layer_norm_eps\": 1e-05",
                "\"layer_norm_eps\": \"small\"",
                "malformed",
            ),
        ];
        for (from, to, expected) in cases {
            let json = SD21.replace(from, to);
            assert_ne!(json, SD21, "test case `{from}` did not apply");
            let err = format!("{:#}", ClipTextConfig::parse(&json).unwrap_err());
            assert!(err.contains(expected), "`{to}`: {err}");
        }
    }

    /// The layout of openai/clip-vit-large-patch14's config.json, abridged to the keys read: the
    /// full tower configs with transformers' defaults of the time, and the legacy `*_config_dict`.
    const VIT_L14: &str = r#"{
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
        "text_config": {
            "architectures": null, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
            "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
            "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "model_type": "clip_text_model",
            "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
            "vocab_size": 49408
        },
        "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072,
            "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768},
        "vision_config": {
            "architectures": null, "hidden_act": "quick_gelu", "hidden_size": 1024,
            "image_size": 224, "intermediate_size": 4096, "layer_norm_eps": 1e-05,
            "model_type": "clip_vision_model", "num_attention_heads": 16, "num_channels": 3,
            "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768
        },
        "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096,
            "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14,
            "projection_dim": 768}
    }"#;

    #[test]
    fn parses_a_clip_model_config_and_applies_the_legacy_dicts_as_transformers_does() {
        let c = ClipModelConfig::parse(VIT_L14).unwrap();
        assert_eq!(c.projection_dim, 768);
        assert_eq!(
            (
                c.text.hidden_size,
                c.text.num_hidden_layers,
                c.text.vocab_size
            ),
            (768, 12, 49408)
        );
        // text_config_dict rebuilds the text config from class defaults: the stale ids go.
        assert_eq!(
            (
                c.text.bos_token_id,
                c.text.eos_token_id,
                c.text.pad_token_id
            ),
            (Some(49406), Some(49407), Some(1))
        );
        let v = &c.vision;
        assert_eq!(
            (v.hidden_size, v.num_hidden_layers, v.head_dim()),
            (1024, 24, 64)
        );
        assert_eq!((v.image_size, v.patch_size, v.grid_size()), (224, 14, 16));
        assert_eq!(v.num_positions(), 257);
        assert_eq!(v.hidden_act, ClipActivation::QuickGelu);

        // Without the dicts the towers are read as written.
        let mut root: Value = serde_json::from_str(VIT_L14).unwrap();
        let root = root.as_object_mut().unwrap();
        root.remove("text_config_dict");
        root.remove("vision_config_dict");
        root["vision_config"]["patch_size"] = 32.into();
        let c = ClipModelConfig::parse(&Value::Object(root.clone()).to_string()).unwrap();
        assert_eq!((c.text.eos_token_id, c.vision.patch_size), (Some(2), 32));

        // A dict also brings back the defaults of the keys it does not name.
        root.insert(
            "vision_config_dict".into(),
            serde_json::json!({"patch_size": 16}),
        );
        let c = ClipModelConfig::parse(&Value::Object(root.clone()).to_string()).unwrap();
        assert_eq!((c.vision.hidden_size, c.vision.patch_size), (768, 16));
    }

    #[test]
    fn rejects_bad_clip_model_configs() {
        // The legacy dicts would replace most tower values: check those without them.
        let mut plain: Value = serde_json::from_str(VIT_L14).unwrap();
        plain.as_object_mut().unwrap().remove("text_config_dict");
        plain.as_object_mut().unwrap().remove("vision_config_dict");
        let plain = serde_json::to_string_pretty(&plain).unwrap();
        let cases = [
            (
                "\"CLIPModel\"",
                "\"CLIPVisionModel\"",
                "expected [\"CLIPModel\"]",
            ),
            (
                "\"model_type\": \"clip\"",
                "\"model_type\": \"siglip\"",
                "expected \"clip\"",
            ),
            ("\"projection_dim\": 768,", "", "missing projection_dim"),
            (
                "\"projection_dim\": 768,",
                "\"projection_dim\": -1,",
                "projection_dim: expected a size",
            ),
            (
                "\"image_size\": 224",
                "\"image_size\": 225",
                "not a multiple of patch_size",
            ),
            (
                "\"image_size\": 224",
                "\"image_size\": [224, 224]",
                "unsupported image_size",
            ),
            ("\"num_channels\": 3", "\"num_channels\": 4", "only RGB"),
            (
                "\"patch_size\": 14",
                "\"patch_size\": 0",
                "vision_config: patch_size = 0",
            ),
            (
                "\"vocab_size\": 49408",
                "\"vocab_size\": 0",
                "text_config: vocab_size = 0",
            ),
        ];
        for (from, to, expected) in cases {
            let json = plain.replacen(from, to, 1);
            assert_ne!(json, plain, "test case `{from}` did not apply");
            let err = format!("{:#}", ClipModelConfig::parse(&json).unwrap_err());
            assert!(err.contains(expected), "`{to}`: {err}");
        }
        let relu = plain.replacen("\"quick_gelu\"", "\"relu\"", 2);
        let relu = relu.replacen("\"relu\"", "\"quick_gelu\"", 1);
        let err = format!("{:#}", ClipModelConfig::parse(&relu).unwrap_err());
        assert!(
            err.contains("vision_config: unsupported hidden_act `relu`"),
            "{err}"
        );

        let bad_dict = VIT_L14.replace(
            "\"vision_config_dict\": {",
            "\"vision_config_dict\": 3, \"x\": {",
        );
        let err = format!("{:#}", ClipModelConfig::parse(&bad_dict).unwrap_err());
        assert!(err.contains("vision_config_dict = 3"), "{err}");
        let mut without_vision: Value = serde_json::from_str(VIT_L14).unwrap();
        without_vision
            .as_object_mut()
            .unwrap()
            .remove("vision_config");
        let err = ClipModelConfig::parse(&without_vision.to_string()).unwrap_err();
        assert!(
            format!("{err:#}").contains("missing vision_config"),
            "{err:#}"
        );
    }
}
