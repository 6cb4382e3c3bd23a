//! `unet/config.json` of a diffusers `UNet2DConditionModel` (SD1.x / SD2.x / SDXL).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;

/// A config value that diffusers accepts either as one number for all blocks or as a list with one
/// entry per down block.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    All(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn resolve(&self, name: &str, blocks: usize) -> Result<Vec<usize>> {
        match self {
            Self::All(v) => Ok(vec![*v; blocks]),
            Self::Each(v) => {
                ensure!(
                    v.len() == blocks,
                    "`{name}` has {} entries but the UNet has {blocks} down blocks",
                    v.len()
                );
                Ok(v.clone())
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum DownBlockType {
    CrossAttnDownBlock2D,
    DownBlock2D,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum UpBlockType {
    CrossAttnUpBlock2D,
    UpBlock2D,
}

fn default_channels() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_layers() -> PerBlock {
    PerBlock::All(2)
}
fn default_one() -> usize {
    1
}
fn default_one_f() -> f64 {
    1.0
}
fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_transformer_layers() -> PerBlock {
    PerBlock::All(1)
}
fn default_head_dim() -> PerBlock {
    PerBlock::All(8)
}

/// The raw fields of a UNet2DConditionModel config that this implementation understands.
#[derive(Debug, Clone, Deserialize)]
struct RawUNetConfig {
    sample_size: Option<usize>,
    #[serde(default = "default_channels")]
    in_channels: usize,
    #[serde(default = "default_channels")]
    out_channels: usize,
    #[serde(default)]
    center_input_sample: bool,
    #[serde(default = "default_true")]
    flip_sin_to_cos: bool,
    #[serde(default)]
    freq_shift: f64,
    down_block_types: Vec<DownBlockType>,
    up_block_types: Vec<UpBlockType>,
    block_out_channels: Vec<usize>,
    #[serde(default = "default_layers")]
    layers_per_block: PerBlock,
    #[serde(default = "default_one")]
    downsample_padding: usize,
    #[serde(default = "default_one_f")]
    mid_block_scale_factor: f64,
    #[serde(default = "default_groups")]
    norm_num_groups: usize,
    #[serde(default = "default_eps")]
    norm_eps: f64,
    cross_attention_dim: usize,
    #[serde(default = "default_transformer_layers")]
    transformer_layers_per_block: PerBlock,
    #[serde(default = "default_head_dim")]
    attention_head_dim: PerBlock,
    #[serde(default)]
    use_linear_projection: bool,
    /// `null` in SDXL's config: false.
    #[serde(default)]
    upcast_attention: Option<bool>,
    /// `"text_time"` for SDXL (pooled text embedding + micro-conditioning ids); `null` otherwise.
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    projection_class_embeddings_input_dim: Option<usize>,
    // Keys below must hold their SD1.x/SD2.x value; anything else changes the architecture in a
    // way this implementation does not (yet) build, so it is rejected by `check_fixed`.
    #[serde(flatten)]
    fixed: serde_json::Map<String, Value>,
}

/// Keys that must keep the value SD1.x/SD2.x use (`null` = absent is always fine).
const FIXED_KEYS: &[(&str, &[&str])] = &[
    ("act_fn", &["\"silu\""]),
    ("mid_block_type", &["\"UNetMidBlock2DCrossAttn\""]),
    ("only_cross_attention", &["false"]),
    ("dual_cross_attention", &["false"]),
    ("dropout", &["0.0", "0"]),
    ("reverse_transformer_layers_per_block", &[]),
    ("encoder_hid_dim", &[]),
    ("encoder_hid_dim_type", &[]),
    ("num_attention_heads", &[]),
    ("class_embed_type", &[]),
    ("num_class_embeds", &[]),
    ("resnet_time_scale_shift", &["\"default\""]),
    ("resnet_skip_time_act", &["false"]),
    ("resnet_out_scale_factor", &["1.0", "1"]),
    ("time_embedding_type", &["\"positional\""]),
    ("time_embedding_dim", &[]),
    ("time_embedding_act_fn", &[]),
    ("timestep_post_act", &[]),
    ("time_cond_proj_dim", &[]),
    ("conv_in_kernel", &["3"]),
    ("conv_out_kernel", &["3"]),
    ("attention_type", &["\"default\""]),
    ("class_embeddings_concat", &["false"]),
    ("mid_block_only_cross_attention", &["false"]),
    ("cross_attention_norm", &[]),
    ("addition_embed_type_num_heads", &["64"]),
];

/// A validated UNet configuration with per-block values resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<DownBlockType>,
    pub up_block_types: Vec<UpBlockType>,
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: Vec<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    /// Transformer blocks per Transformer2DModel, per down block (SDXL uses more than one).
    pub transformer_layers_per_block: Vec<usize>,
    /// Attention heads per down block. diffusers' `attention_head_dim` config key holds the
    /// number of *heads* for SD1.x/SD2.x (a naming quirk kept for compatibility).
    pub attention_heads: Vec<usize>,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    /// SDXL's added conditioning; `None` for SD1.x/SD2.x.
    pub text_time: Option<TextTimeConfig>,
}

/// SDXL's `addition_embed_type: "text_time"`: the pooled text embedding and the
/// micro-conditioning ids (each turned into `time_embed_dim` sinusoidal features) are
/// concatenated, `input_dim` wide in all, and embedded into the timestep embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeConfig {
    /// `addition_time_embed_dim`: sinusoidal features per id (256 in SDXL).
    pub time_embed_dim: usize,
    /// `projection_class_embeddings_input_dim`: pooled width + ids × `time_embed_dim`
    /// (1280 + 6 × 256 = 2816 in SDXL base).
    pub input_dim: usize,
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read UNet config {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("invalid UNet config {}", path.display()))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let mut map: serde_json::Map<String, Value> =
            serde_json::from_str(text).context("not a JSON object")?;
        if let Some(class) = map.get("_class_name") {
            ensure!(
                class == "UNet2DConditionModel",
                "`_class_name` is {class}, expected \"UNet2DConditionModel\""
            );
        }
        map.retain(|k, _| !k.starts_with('_'));
        let raw: RawUNetConfig = serde_json::from_value(Value::Object(map))?;
        Self::validate(raw)
    }

    fn validate(raw: RawUNetConfig) -> Result<Self> {
        check_fixed(&raw.fixed)?;
        let n = raw.block_out_channels.len();
        ensure!(n > 0, "`block_out_channels` is empty");
        ensure!(
            raw.down_block_types.len() == n && raw.up_block_types.len() == n,
            "`down_block_types` ({}) and `up_block_types` ({}) must both have one entry per `block_out_channels` entry ({n})",
            raw.down_block_types.len(),
            raw.up_block_types.len()
        );
        let heads = raw.attention_head_dim.resolve("attention_head_dim", n)?;
        for (i, (&c, &h)) in raw.block_out_channels.iter().zip(&heads).enumerate() {
            ensure!(
                c % raw.norm_num_groups == 0,
                "block {i}: {c} channels not divisible by norm_num_groups {}",
                raw.norm_num_groups
            );
            ensure!(
                h > 0 && c % h == 0,
                "block {i}: {c} channels not divisible into {h} attention heads"
            );
        }
        let layers = raw.layers_per_block.resolve("layers_per_block", n)?;
        ensure!(
            layers.iter().all(|&l| l > 0),
            "`layers_per_block` must be positive"
        );
        let transformer_layers = raw
            .transformer_layers_per_block
            .resolve("transformer_layers_per_block", n)?;
        let text_time = match raw.addition_embed_type.as_deref() {
            None => {
                ensure!(
                    raw.addition_time_embed_dim.is_none()
                        && raw.projection_class_embeddings_input_dim.is_none(),
                    "`addition_time_embed_dim` and `projection_class_embeddings_input_dim` need `addition_embed_type` \"text_time\""
                );
                None
            }
            Some("text_time") => {
                let (Some(time_embed_dim), Some(input_dim)) = (
                    raw.addition_time_embed_dim,
                    raw.projection_class_embeddings_input_dim,
                ) else {
                    bail!("`addition_embed_type` \"text_time\" needs `addition_time_embed_dim` and `projection_class_embeddings_input_dim`");
                };
                ensure!(
                    time_embed_dim > 0 && input_dim > time_embed_dim,
                    "`projection_class_embeddings_input_dim` {input_dim} must exceed `addition_time_embed_dim` {time_embed_dim} (> 0)"
                );
                Some(TextTimeConfig {
                    time_embed_dim,
                    input_dim,
                })
            }
            Some(other) => bail!(
                "unsupported UNet config value `addition_embed_type` = \"{other}\": this UNet supports only null (SD1.x/SD2.x) or \"text_time\" (SDXL)"
            ),
        };
        Ok(Self {
            sample_size: raw.sample_size,
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            center_input_sample: raw.center_input_sample,
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift,
            down_block_types: raw.down_block_types,
            up_block_types: raw.up_block_types,
            block_out_channels: raw.block_out_channels,
            layers_per_block: layers,
            downsample_padding: raw.downsample_padding,
            mid_block_scale_factor: raw.mid_block_scale_factor,
            norm_num_groups: raw.norm_num_groups,
            norm_eps: raw.norm_eps,
            cross_attention_dim: raw.cross_attention_dim,
            transformer_layers_per_block: transformer_layers,
            attention_heads: heads,
            use_linear_projection: raw.use_linear_projection,
            upcast_attention: raw.upcast_attention.unwrap_or(false),
            text_time,
        })
    }

    /// Width of the timestep embedding fed to every resnet.
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }
}

fn check_fixed(fixed: &serde_json::Map<String, Value>) -> Result<()> {
    for (key, value) in fixed {
        let Some((_, allowed)) = FIXED_KEYS.iter().find(|(k, _)| k == key) else {
            bail!("unknown UNet config key `{key}` (value {value}); refusing to guess its meaning");
        };
        if value.is_null() {
            continue;
        }
        let text = value.to_string();
        if !allowed.contains(&text.as_str()) {
            let expected = if allowed.is_empty() {
                "null".to_string()
            } else {
                allowed.join(" or ")
            };
            bail!("unsupported UNet config value `{key}` = {text}: this UNet supports only {expected} (SD1.x/SD2.x/SDXL)");
        }
    }
    Ok(())
}
