//! The CLIP text encoder's `text_encoder/config.json` (a transformers `CLIPTextConfig`).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

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
        for arch in raw.architectures.iter().flatten() {
            ensure!(
                matches!(arch.as_str(), "CLIPTextModel" | "CLIPTextModelWithProjection"),
                "architecture `{arch}` is not a CLIP text model: expected CLIPTextModel or CLIPTextModelWithProjection"
            );
        }
        // Architecture sizes have no sensible default for an SD text encoder: require them.
        let required = |value: Option<usize>, key: &str| -> Result<usize> {
            let v = value.with_context(|| format!("missing {key}"))?;
            ensure!(v > 0, "{key} = 0: expected a positive size");
            Ok(v)
        };
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        ensure!(
            hidden_size.is_multiple_of(num_attention_heads),
            "hidden_size = {hidden_size} is not divisible by num_attention_heads = {num_attention_heads}"
        );
        let hidden_act = match raw.hidden_act.as_deref().context("missing hidden_act")? {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            other => bail!("unsupported hidden_act `{other}`: expected quick_gelu or gelu"),
        };
        let layer_norm_eps = raw.layer_norm_eps.context("missing layer_norm_eps")?;
        ensure!(
            layer_norm_eps > 0.0,
            "layer_norm_eps = {layer_norm_eps}: expected a positive number"
        );
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
}
