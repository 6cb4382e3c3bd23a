//! The VAE's `vae/config.json` (a diffusers `AutoencoderKL`).
//!
//! Architecture keys are required. Keys added to diffusers after SD 1.x shipped (`scaling_factor`,
//! `force_upcast`, the quant-conv switches…) take diffusers' defaults when absent, since SD 1.5's
//! own file predates them. Variants we do not implement (latent shift/normalisation, a mid block
//! without attention, other block types or activations) are errors.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    /// Image size the VAE was trained at (informational).
    pub sample_size: usize,
    /// Latents fed to the UNet are `scaling_factor ×` the VAE's latents.
    pub scaling_factor: f64,
    /// Whether diffusers runs this VAE in f32 even when the pipeline is f16 (SD 1.x/2.x VAEs
    /// overflow in f16).
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

#[derive(Deserialize)]
struct RawVaeConfig {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    in_channels: Option<usize>,
    out_channels: Option<usize>,
    latent_channels: Option<usize>,
    block_out_channels: Option<Vec<usize>>,
    layers_per_block: Option<usize>,
    norm_num_groups: Option<usize>,
    sample_size: Option<usize>,
    down_block_types: Option<Vec<String>>,
    up_block_types: Option<Vec<String>>,
    act_fn: Option<String>,
    scaling_factor: Option<f64>,
    shift_factor: Option<f64>,
    latents_mean: Option<serde_json::Value>,
    latents_std: Option<serde_json::Value>,
    force_upcast: Option<bool>,
    use_quant_conv: Option<bool>,
    use_post_quant_conv: Option<bool>,
    mid_block_add_attention: Option<bool>,
}

/// diffusers' default scaling factor (SD 1.x/2.x), used when an old config lacks the key.
const SD_SCALING_FACTOR: f64 = 0.18215;

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid VAE config {}", path.display()))
    }

    pub fn parse(json: &str) -> Result<Self> {
        let raw: RawVaeConfig = serde_json::from_str(json).context("malformed VAE config.json")?;
        if let Some(class) = raw.class_name.as_deref() {
            ensure!(
                class == "AutoencoderKL",
                "_class_name `{class}` is not supported: expected AutoencoderKL"
            );
        }
        let required = |value: Option<usize>, key: &str| -> Result<usize> {
            let v = value.with_context(|| format!("missing {key}"))?;
            ensure!(v > 0, "{key} = 0: expected a positive number");
            Ok(v)
        };
        let block_out_channels = raw
            .block_out_channels
            .context("missing block_out_channels")?;
        ensure!(
            !block_out_channels.is_empty(),
            "block_out_channels is empty: expected at least one block"
        );
        let norm_num_groups = required(raw.norm_num_groups, "norm_num_groups")?;
        ensure!(
            block_out_channels.iter().all(|c| c.is_multiple_of(norm_num_groups)),
            "block_out_channels {block_out_channels:?} must all be divisible by norm_num_groups = {norm_num_groups}"
        );
        for (key, types, expected) in [
            (
                "down_block_types",
                &raw.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &raw.up_block_types, "UpDecoderBlock2D"),
        ] {
            if let Some(types) = types {
                ensure!(
                    types.len() == block_out_channels.len() && types.iter().all(|t| t == expected),
                    "{key} = {types:?}: expected {} × {expected} (one per block_out_channels entry)",
                    block_out_channels.len()
                );
            }
        }
        if let Some(act) = raw.act_fn.as_deref() {
            ensure!(act == "silu", "unsupported act_fn `{act}`: expected silu");
        }
        ensure!(
            raw.shift_factor.is_none(),
            "shift_factor is not supported (SD3/Flux-style latents): expected null"
        );
        ensure!(
            raw.latents_mean.as_ref().is_none_or(|v| v.is_null()) && raw.latents_std.as_ref().is_none_or(|v| v.is_null()),
            "latents_mean/latents_std are not supported (per-channel latent normalisation): expected null"
        );
        ensure!(
            raw.mid_block_add_attention != Some(false),
            "mid_block_add_attention = false is not supported: expected true or absent"
        );
        let scaling_factor = raw.scaling_factor.unwrap_or(SD_SCALING_FACTOR);
        ensure!(
            scaling_factor > 0.0,
            "scaling_factor = {scaling_factor}: expected a positive number"
        );
        Ok(Self {
            in_channels: required(raw.in_channels, "in_channels")?,
            out_channels: required(raw.out_channels, "out_channels")?,
            latent_channels: required(raw.latent_channels, "latent_channels")?,
            layers_per_block: required(raw.layers_per_block, "layers_per_block")?,
            sample_size: required(raw.sample_size, "sample_size")?,
            block_out_channels,
            norm_num_groups,
            scaling_factor,
            force_upcast: raw.force_upcast.unwrap_or(true),
            use_quant_conv: raw.use_quant_conv.unwrap_or(true),
            use_post_quant_conv: raw.use_post_quant_conv.unwrap_or(true),
        })
    }

    /// How many image pixels one latent covers along each axis: every block but the last halves
    /// the resolution.
    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// runwayml/stable-diffusion-v1-5 vae/config.json, verbatim (it predates `scaling_factor`).
    const SD15: &str = r#"{
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
        "out_channels": 3, "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
    }"#;

    #[test]
    fn parses_sd15_with_default_scaling() {
        let c = VaeConfig::parse(SD15).unwrap();
        assert_eq!(c.vae_scale_factor(), 8);
        assert_eq!(c.scaling_factor, 0.18215);
        assert_eq!((c.latent_channels, c.layers_per_block), (4, 2));
        assert!(c.force_upcast && c.use_quant_conv && c.use_post_quant_conv);
    }

    #[test]
    fn rejects_unsupported_variants() {
        let cases = [
            (
                "\"act_fn\": \"silu\"",
                "\"act_fn\": \"gelu\"",
                "unsupported act_fn `gelu`",
            ),
            (
                "\"sample_size\": 512",
                "\"sample_size\": 512, \"shift_factor\": 0.1159",
                "shift_factor",
            ),
            (
                "\"sample_size\": 512",
                "\"sample_size\": 512, \"latents_mean\": [0.1]",
                "latents_mean",
            ),
            (
                "\"sample_size\": 512",
                "\"sample_size\": 512, \"mid_block_add_attention\": false",
                "mid_block_add_attention",
            ),
            (
                "\"norm_num_groups\": 32",
                "\"norm_num_groups\": 48",
                "divisible by norm_num_groups = 48",
            ),
            (
                "[128, 256, 512, 512]",
                "[128, 256, 512]",
                "expected 3 × DownEncoderBlock2D",
            ),
            (
                "\"AutoencoderKL\"",
                "\"AutoencoderTiny\"",
                "`AutoencoderTiny` is not supported",
            ),
            ("\"latent_channels\": 4,", "", "missing latent_channels"),
        ];
        for (from, to, expected) in cases {
            let json = SD15.replace(from, to);
            assert_ne!(json, SD15, "test case `{from}` did not apply");
            let err = format!("{:#}", VaeConfig::parse(&json).unwrap_err());
            assert!(err.contains(expected), "`{to}`: {err}");
        }
    }
}
