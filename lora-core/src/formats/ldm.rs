//! Single-file checkpoints in the original LDM (CompVis / A1111) layout, mapped to diffusers names.
//!
//! A single file holds three models under fixed prefixes:
//! - `model.diffusion_model.` — the UNet (`input_blocks`/`middle_block`/`output_blocks`),
//! - `first_stage_model.` — the VAE (`encoder.down.N.block.M`, `mid.attn_1` as 1×1 convs),
//! - `cond_stage_model.transformer.` — SD1's CLIP text encoder, transformers names as is, or
//!   `cond_stage_model.model.` — SD2's OpenCLIP text encoder, q/k/v stacked in `in_proj_weight`.
//!
//! [`LdmLayout::diffusers_name`] maps each key to the diffusers tensor(s) it holds; keys outside
//! the three models (EMA copies, `text_projection`, `logit_scale`, schedule buffers) map to
//! [`LdmTensor::Other`] and are meant to be carried over untouched. The UNet's block numbering
//! depends on its layers per block, which [`LdmLayout::detect`] reads off the keys.

use std::collections::BTreeSet;
use std::fmt;

use anyhow::{bail, ensure, Context, Result};

/// Key prefix of the UNet in a single-file checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Key prefix of the VAE.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Key prefix of SD1's CLIP text encoder (transformers names follow).
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// Key prefix of SD2's OpenCLIP text encoder.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";

/// One model of a Stable Diffusion checkpoint, named as its diffusers sub-folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModelPart {
    Unet,
    Vae,
    TextEncoder,
}

impl ModelPart {
    pub const ALL: [ModelPart; 3] = [Self::Unet, Self::Vae, Self::TextEncoder];

    /// The diffusers sub-folder (`unet`, `vae`, `text_encoder`).
    pub fn folder(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::Vae => "vae",
            Self::TextEncoder => "text_encoder",
        }
    }
}

impl fmt::Display for ModelPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.folder())
    }
}

/// A tensor of a diffusers model: which model, and its name there.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DiffusersTensor {
    pub part: ModelPart,
    pub name: String,
}

impl DiffusersTensor {
    fn new(part: ModelPart, name: impl Into<String>) -> Self {
        Self {
            part,
            name: name.into(),
        }
    }
}

/// What one single-file tensor holds in diffusers terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LdmTensor {
    /// The same values under a diffusers name. The VAE's attention projections are 1×1 convs
    /// here and Linear layers in diffusers: same data, `[out, in, 1, 1]` vs `[out, in]`.
    Renamed(DiffusersTensor),
    /// OpenCLIP's `in_proj_weight`/`in_proj_bias`: q, k and v stacked along dim 0, in that order.
    StackedQkv([DiffusersTensor; 3]),
    /// Not part of the UNet, VAE or text encoder as diffusers builds them.
    Other,
}

/// Which text encoder a single file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderLayout {
    /// SD1: transformers' CLIPTextModel under [`CLIP_PREFIX`].
    Clip,
    /// SD2: OpenCLIP under [`OPEN_CLIP_PREFIX`].
    OpenClip,
}

/// The layout facts of one single-file checkpoint needed to map its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LdmLayout {
    /// Resnets per UNet down block (up blocks have one more).
    pub layers_per_block: usize,
    /// Blocks of the VAE decoder; its `up.N` count from the lowest resolution backwards.
    pub vae_up_blocks: usize,
    pub text_encoder: TextEncoderLayout,
}

/// Whether `keys` look like an LDM single-file checkpoint (any UNet key under its prefix).
pub fn is_ldm_checkpoint<'a>(mut keys: impl Iterator<Item = &'a str>) -> bool {
    keys.any(|k| k.starts_with(UNET_PREFIX))
}

impl LdmLayout {
    /// Reads the layout off a checkpoint's keys. Fails when the UNet or text encoder is missing
    /// or the block numbering is inconsistent.
    pub fn detect<'a>(keys: impl Iterator<Item = &'a str> + Clone) -> Result<Self> {
        ensure!(
            is_ldm_checkpoint(keys.clone()),
            "no `{UNET_PREFIX}…` keys: not a single-file (LDM) Stable Diffusion checkpoint"
        );
        let text_encoder = if keys.clone().any(|k| k.starts_with(OPEN_CLIP_PREFIX)) {
            TextEncoderLayout::OpenClip
        } else if keys.clone().any(|k| k.starts_with(CLIP_PREFIX)) {
            TextEncoderLayout::Clip
        } else {
            bail!("no text encoder (`{CLIP_PREFIX}…` or `{OPEN_CLIP_PREFIX}…` keys) in the single-file checkpoint")
        };
        let unet_keys = keys.clone().filter_map(|k| k.strip_prefix(UNET_PREFIX));
        let downsamplers = indices(unet_keys.clone(), "input_blocks.", |rest| {
            rest.starts_with("0.op.")
        });
        let output_blocks = indices(unet_keys, "output_blocks.", |_| true);
        let down_blocks = downsamplers.len() + 1;
        let n_out = output_blocks.last().map_or(0, |n| n + 1);
        ensure!(
            n_out > 0 && n_out % down_blocks == 0 && n_out / down_blocks >= 2,
            "UNet of the single-file checkpoint: {n_out} output blocks do not divide into \
             {down_blocks} up blocks of at least two layers"
        );
        let vae_up_blocks = indices(
            keys.filter_map(|k| k.strip_prefix(VAE_PREFIX)),
            "decoder.up.",
            |_| true,
        )
        .last()
        .map_or(0, |n| n + 1);
        Ok(Self {
            layers_per_block: n_out / down_blocks - 1,
            vae_up_blocks,
            text_encoder,
        })
    }

    /// The diffusers tensor(s) behind single-file key `key`; an error names keys under a model's
    /// prefix that follow no known pattern.
    pub fn diffusers_name(&self, key: &str) -> Result<LdmTensor> {
        let mapped = if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
            self.unet_name(rest)
                .map(|n| LdmTensor::Renamed(DiffusersTensor::new(ModelPart::Unet, n)))
        } else if let Some(rest) = key.strip_prefix(VAE_PREFIX) {
            self.vae_name(rest)
                .map(|n| LdmTensor::Renamed(DiffusersTensor::new(ModelPart::Vae, n)))
        } else if let Some(rest) = key.strip_prefix(CLIP_PREFIX) {
            Some(LdmTensor::Renamed(DiffusersTensor::new(
                ModelPart::TextEncoder,
                with_text_model_level(rest),
            )))
        } else if let Some(rest) = key.strip_prefix(OPEN_CLIP_PREFIX) {
            Some(open_clip_name(rest))
        } else {
            Some(LdmTensor::Other)
        };
        mapped.with_context(|| format!("single-file key `{key}` follows no known LDM pattern"))
    }

    fn unet_name(&self, rest: &str) -> Option<String> {
        if let Some(name) = replace_prefix(rest, &UNET_TOP) {
            return Some(name);
        }
        let per = self.layers_per_block + 1;
        if let Some((k, child, tail)) = numbered(rest, "input_blocks.") {
            let (block, layer) = ((k - 1) / per, (k - 1) % per);
            return match (child, tail.strip_prefix("op.")) {
                (0, Some(op)) if k % per == 0 => Some(format!(
                    "down_blocks.{}.downsamplers.0.conv.{op}",
                    k / per - 1
                )),
                (0, None) => Some(format!(
                    "down_blocks.{block}.resnets.{layer}.{}",
                    unet_resnet(tail)?
                )),
                (1, None) => Some(format!("down_blocks.{block}.attentions.{layer}.{tail}")),
                _ => None,
            };
        }
        if let Some((k, tail)) = numbered_once(rest, "middle_block.") {
            return match k {
                0 | 2 => Some(format!(
                    "mid_block.resnets.{}.{}",
                    k / 2,
                    unet_resnet(tail)?
                )),
                1 => Some(format!("mid_block.attentions.0.{tail}")),
                _ => None,
            };
        }
        if let Some((k, child, tail)) = numbered(rest, "output_blocks.") {
            let (block, layer) = (k / per, k % per);
            return match (child, tail.strip_prefix("conv.")) {
                (1 | 2, Some(conv)) if layer == self.layers_per_block => {
                    Some(format!("up_blocks.{block}.upsamplers.0.conv.{conv}"))
                }
                (0, _) => Some(format!(
                    "up_blocks.{block}.resnets.{layer}.{}",
                    unet_resnet(tail)?
                )),
                (1, None) => Some(format!("up_blocks.{block}.attentions.{layer}.{tail}")),
                _ => None,
            };
        }
        None
    }

    fn vae_name(&self, rest: &str) -> Option<String> {
        const SAME: [&str; 6] = [
            "quant_conv.",
            "post_quant_conv.",
            "encoder.conv_in.",
            "encoder.conv_out.",
            "decoder.conv_in.",
            "decoder.conv_out.",
        ];
        if SAME.iter().any(|p| rest.starts_with(p)) {
            return Some(rest.to_string());
        }
        let (coder, inner) = rest.split_once('.')?;
        if coder != "encoder" && coder != "decoder" {
            return None;
        }
        if let Some(tail) = inner.strip_prefix("norm_out.") {
            return Some(format!("{coder}.conv_norm_out.{tail}"));
        }
        if let Some(tail) = inner.strip_prefix("mid.") {
            return vae_mid(tail).map(|t| format!("{coder}.mid_block.{t}"));
        }
        let (blocks, stage) = match coder {
            "encoder" => ("down_blocks", "down."),
            _ => ("up_blocks", "up."),
        };
        let (i, tail) = numbered_once(inner, stage)?;
        // The decoder's `up.N` counts from the lowest resolution; diffusers' up_blocks from the
        // highest.
        let block = match coder {
            "encoder" => i,
            _ => self.vae_up_blocks.checked_sub(i + 1)?,
        };
        if let Some((j, resnet)) = numbered_once(tail, "block.") {
            let resnet = replace_prefix(resnet, &[("nin_shortcut.", "conv_shortcut.")])
                .unwrap_or_else(|| resnet.to_string());
            return Some(format!("{coder}.{blocks}.{block}.resnets.{j}.{resnet}"));
        }
        let sampler = replace_prefix(
            tail,
            &[
                ("downsample.", "downsamplers.0."),
                ("upsample.", "upsamplers.0."),
            ],
        )?;
        Some(format!("{coder}.{blocks}.{block}.{sampler}"))
    }
}

/// Where a diffusers tensor goes in a single-file checkpoint (the reverse of
/// [`LdmLayout::diffusers_name`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LdmTarget {
    /// Stored under `key`; `to_conv` for the VAE attention projections, Linear `[out, in]` in
    /// diffusers and 1×1 convs `[out, in, 1, 1]` in LDM checkpoints.
    Key { key: String, to_conv: bool },
    /// The `index`-th third (q, k, v) of OpenCLIP's stacked `key`.
    Stacked { key: String, index: usize },
}

impl LdmTarget {
    pub fn key(&self) -> &str {
        match self {
            Self::Key { key, .. } | Self::Stacked { key, .. } => key,
        }
    }
}

impl LdmLayout {
    /// The single-file key of diffusers tensor `t`. `up_blocks_with_attention` lists the UNet up
    /// blocks that have attentions (their upsampler is the block's third child, not its second).
    /// Every key is checked by mapping it back with [`diffusers_name`](Self::diffusers_name),
    /// so the two directions cannot disagree.
    pub fn ldm_key(
        &self,
        t: &DiffusersTensor,
        up_blocks_with_attention: &[usize],
    ) -> Result<LdmTarget> {
        let target = self
            .ldm_target(t, up_blocks_with_attention)
            .with_context(|| {
                format!(
                    "{} tensor `{}` has no single-file (LDM) name",
                    t.part, t.name
                )
            })?;
        let back = self.diffusers_name(target.key())?;
        let same = match (&target, &back) {
            (LdmTarget::Key { .. }, LdmTensor::Renamed(b)) => {
                b.part == t.part && b.name == canonical_name(t)
            }
            (LdmTarget::Stacked { index, .. }, LdmTensor::StackedQkv(parts)) => {
                parts[*index].name == canonical_name(t)
            }
            _ => false,
        };
        ensure!(
            same,
            "internal: {} `{}` maps to `{}`, which maps back to {back:?}",
            t.part,
            t.name,
            target.key()
        );
        Ok(target)
    }

    fn ldm_target(&self, t: &DiffusersTensor, up_attn: &[usize]) -> Option<LdmTarget> {
        let key = |key: String| LdmTarget::Key {
            key,
            to_conv: false,
        };
        match t.part {
            ModelPart::Unet => self
                .unet_key(&t.name, up_attn)
                .map(|k| key(format!("{UNET_PREFIX}{k}"))),
            ModelPart::Vae => {
                let (k, to_conv) = vae_key(&t.name, self.vae_up_blocks)?;
                Some(LdmTarget::Key {
                    key: format!("{VAE_PREFIX}{k}"),
                    to_conv,
                })
            }
            ModelPart::TextEncoder => {
                let name = canonical_name(t);
                match self.text_encoder {
                    TextEncoderLayout::Clip => Some(key(format!("{CLIP_PREFIX}{name}"))),
                    TextEncoderLayout::OpenClip => open_clip_key(&name),
                }
            }
        }
    }

    fn unet_key(&self, name: &str, up_attn: &[usize]) -> Option<String> {
        if let Some(k) = replace_prefix_reversed(name, &UNET_TOP) {
            return Some(k);
        }
        let per = self.layers_per_block + 1;
        if let Some((b, tail)) = numbered_once(name, "down_blocks.") {
            if let Some(conv) = tail.strip_prefix("downsamplers.0.conv.") {
                return Some(format!("input_blocks.{}.0.op.{conv}", (b + 1) * per));
            }
            if let Some((l, rest)) = numbered_once(tail, "resnets.") {
                return Some(format!(
                    "input_blocks.{}.0.{}",
                    1 + b * per + l,
                    resnet_key(rest)?
                ));
            }
            let (l, rest) = numbered_once(tail, "attentions.")?;
            return Some(format!("input_blocks.{}.1.{rest}", 1 + b * per + l));
        }
        if let Some((b, tail)) = numbered_once(name, "up_blocks.") {
            if let Some(conv) = tail.strip_prefix("upsamplers.0.conv.") {
                let child = if up_attn.contains(&b) { 2 } else { 1 };
                return Some(format!(
                    "output_blocks.{}.{child}.conv.{conv}",
                    b * per + self.layers_per_block
                ));
            }
            if let Some((l, rest)) = numbered_once(tail, "resnets.") {
                return Some(format!(
                    "output_blocks.{}.0.{}",
                    b * per + l,
                    resnet_key(rest)?
                ));
            }
            let (l, rest) = numbered_once(tail, "attentions.")?;
            return Some(format!("output_blocks.{}.1.{rest}", b * per + l));
        }
        if let Some(rest) = name.strip_prefix("mid_block.attentions.0.") {
            return Some(format!("middle_block.1.{rest}"));
        }
        let (i, rest) = numbered_once(name, "mid_block.resnets.")?;
        Some(format!("middle_block.{}.{}", 2 * i, resnet_key(rest)?))
    }
}

/// Text-encoder names with the `text_model.` level, others as they are.
fn canonical_name(t: &DiffusersTensor) -> String {
    match t.part {
        ModelPart::TextEncoder => with_text_model_level(&t.name),
        _ => t.name.clone(),
    }
}

/// A diffusers resnet child in LDM terms (`conv1` → `in_layers.2`, …).
fn resnet_key(tail: &str) -> Option<String> {
    replace_prefix_reversed(tail, &UNET_RESNET)
}

/// A diffusers VAE name in LDM terms, and whether it is an attention projection weight (stored
/// as a 1×1 conv there). The decoder's `up.N` counts from the lowest resolution: `up_blocks` is
/// the decoder's block count.
fn vae_key(name: &str, up_blocks: usize) -> Option<(String, bool)> {
    const SAME: [&str; 6] = [
        "quant_conv.",
        "post_quant_conv.",
        "encoder.conv_in.",
        "encoder.conv_out.",
        "decoder.conv_in.",
        "decoder.conv_out.",
    ];
    if SAME.iter().any(|p| name.starts_with(p)) {
        return Some((name.to_string(), false));
    }
    let (coder, inner) = name.split_once('.')?;
    if coder != "encoder" && coder != "decoder" {
        return None;
    }
    if let Some(tail) = inner.strip_prefix("conv_norm_out.") {
        return Some((format!("{coder}.norm_out.{tail}"), false));
    }
    if let Some(tail) = inner.strip_prefix("mid_block.") {
        if let Some((i, rest)) = numbered_once(tail, "resnets.") {
            return Some((format!("{coder}.mid.block_{}.{rest}", i + 1), false));
        }
        let k = replace_prefix_reversed(tail, &VAE_MID_ATTENTION)?;
        let to_conv = k.ends_with(".weight") && !k.starts_with("attn_1.norm.");
        return Some((format!("{coder}.mid.{k}"), to_conv));
    }
    let (blocks, stage) = match coder {
        "encoder" => ("down_blocks.", "down"),
        _ => ("up_blocks.", "up"),
    };
    let (i, tail) = numbered_once(inner, blocks)?;
    let i = match coder {
        "decoder" => up_blocks.checked_sub(i + 1)?,
        _ => i,
    };
    if let Some((j, rest)) = numbered_once(tail, "resnets.") {
        let rest = replace_prefix(rest, &[("conv_shortcut.", "nin_shortcut.")])
            .unwrap_or_else(|| rest.to_string());
        return Some((format!("{coder}.{stage}.{i}.block.{j}.{rest}"), false));
    }
    let sampler = replace_prefix(
        tail,
        &[
            ("downsamplers.0.", "downsample."),
            ("upsamplers.0.", "upsample."),
        ],
    )?;
    Some((format!("{coder}.{stage}.{i}.{sampler}"), false))
}

/// A transformers CLIPTextModel name (with `text_model.`) in OpenCLIP terms.
fn open_clip_key(name: &str) -> Option<LdmTarget> {
    let key = |k: String| LdmTarget::Key {
        key: format!("{OPEN_CLIP_PREFIX}{k}"),
        to_conv: false,
    };
    if let Some(k) = replace_prefix_reversed(name, &OPEN_CLIP_TOP) {
        return Some(key(k));
    }
    let (n, tail) = numbered_once(name, "text_model.encoder.layers.")?;
    let layer = format!("transformer.resblocks.{n}.");
    for (index, x) in ["q", "k", "v"].iter().enumerate() {
        if let Some(kind) = tail.strip_prefix(&format!("self_attn.{x}_proj.")) {
            return Some(LdmTarget::Stacked {
                key: format!("{OPEN_CLIP_PREFIX}{layer}attn.in_proj_{kind}"),
                index,
            });
        }
    }
    replace_prefix_reversed(tail, &OPEN_CLIP_LAYER).map(|k| key(format!("{layer}{k}")))
}

/// The distinct `N` of keys `<head>N.<rest>` whose rest satisfies `filter`, sorted.
fn indices<'a>(
    keys: impl Iterator<Item = &'a str>,
    head: &str,
    filter: impl Fn(&str) -> bool,
) -> Vec<usize> {
    let set: BTreeSet<usize> = keys
        .filter_map(|k| numbered_once(k, head))
        .filter(|(_, rest)| filter(rest))
        .map(|(n, _)| n)
        .collect();
    set.into_iter().collect()
}

/// `<head>N.<rest>` → (N, rest).
fn numbered_once<'a>(key: &'a str, head: &str) -> Option<(usize, &'a str)> {
    let (n, rest) = key.strip_prefix(head)?.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// `<head>N.M.<rest>` → (N, M, rest).
fn numbered<'a>(key: &'a str, head: &str) -> Option<(usize, usize, &'a str)> {
    let (n, rest) = numbered_once(key, head)?;
    let (m, rest) = rest.split_once('.')?;
    Some((n, m.parse().ok()?, rest))
}

// Prefix tables, each written once as (LDM, diffusers) and read in both directions.

/// UNet top-level layers.
const UNET_TOP: [(&str, &str); 5] = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
];

/// A UNet resnet's children.
const UNET_RESNET: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];

/// The VAE mid block's attention (inside `mid.` / `mid_block.`).
const VAE_MID_ATTENTION: [(&str, &str); 5] = [
    ("attn_1.norm.", "attentions.0.group_norm."),
    ("attn_1.q.", "attentions.0.to_q."),
    ("attn_1.k.", "attentions.0.to_k."),
    ("attn_1.v.", "attentions.0.to_v."),
    ("attn_1.proj_out.", "attentions.0.to_out.0."),
];

/// OpenCLIP's top-level tensors (after the OpenCLIP prefix).
const OPEN_CLIP_TOP: [(&str, &str); 3] = [
    ("token_embedding.", "text_model.embeddings.token_embedding."),
    ("ln_final.", "text_model.final_layer_norm."),
    (
        "positional_embedding",
        "text_model.embeddings.position_embedding.weight",
    ),
];

/// An OpenCLIP residual block's children other than the stacked q/k/v.
const OPEN_CLIP_LAYER: [(&str, &str); 5] = [
    ("attn.out_proj.", "self_attn.out_proj."),
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
];

/// LDM → diffusers through a (LDM, diffusers) table.
fn replace_prefix(key: &str, table: &[(&str, &str)]) -> Option<String> {
    table
        .iter()
        .find_map(|(from, to)| key.strip_prefix(from).map(|rest| format!("{to}{rest}")))
}

/// diffusers → LDM through the same table.
fn replace_prefix_reversed(key: &str, table: &[(&str, &str)]) -> Option<String> {
    table
        .iter()
        .find_map(|(to, from)| key.strip_prefix(from).map(|rest| format!("{to}{rest}")))
}

/// A UNet resnet's inner names: `in_layers.0` (GroupNorm), `in_layers.2` (conv), …
fn unet_resnet(tail: &str) -> Option<String> {
    replace_prefix(tail, &UNET_RESNET)
}

/// The VAE's middle block: `block_1`/`block_2` resnets and the `attn_1` attention.
fn vae_mid(tail: &str) -> Option<String> {
    const RESNETS: [(&str, &str); 2] = [("block_1.", "resnets.0."), ("block_2.", "resnets.1.")];
    replace_prefix(tail, &RESNETS).or_else(|| replace_prefix(tail, &VAE_MID_ATTENTION))
}

/// SD1 text-encoder names as transformers spells them with the `text_model.` level (older
/// single files leave it out).
fn with_text_model_level(rest: &str) -> String {
    if rest.starts_with("text_model.") {
        rest.to_string()
    } else {
        format!("text_model.{rest}")
    }
}

/// SD2's OpenCLIP names (after [`OPEN_CLIP_PREFIX`]) in transformers' CLIPTextModel terms.
fn open_clip_name(rest: &str) -> LdmTensor {
    let te = |name: String| LdmTensor::Renamed(DiffusersTensor::new(ModelPart::TextEncoder, name));
    if let Some(name) = replace_prefix(rest, &OPEN_CLIP_TOP) {
        return te(name);
    }
    let Some((n, tail)) = numbered_once(rest, "transformer.resblocks.") else {
        // text_projection, logit_scale, attn_mask: OpenCLIP parts CLIPTextModel has no use for.
        return LdmTensor::Other;
    };
    let layer = format!("text_model.encoder.layers.{n}.");
    if let Some(kind) = tail.strip_prefix("attn.in_proj_") {
        return LdmTensor::StackedQkv(["q", "k", "v"].map(|x| {
            DiffusersTensor::new(
                ModelPart::TextEncoder,
                format!("{layer}self_attn.{x}_proj.{kind}"),
            )
        }));
    }
    match replace_prefix(tail, &OPEN_CLIP_LAYER) {
        Some(name) => te(format!("{layer}{name}")),
        None => LdmTensor::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> LdmLayout {
        LdmLayout {
            layers_per_block: 2,
            vae_up_blocks: 4,
            text_encoder: TextEncoderLayout::OpenClip,
        }
    }

    fn renamed(key: &str) -> String {
        match layout().diffusers_name(key).unwrap() {
            LdmTensor::Renamed(t) => format!("{}:{}", t.part, t.name),
            other => panic!("{key}: {other:?}"),
        }
    }

    /// The SD1.5/SD2.x numbering (two layers per block), examples from the kohya reference table.
    #[test]
    fn unet_blocks_map_like_the_reference_table() {
        for (ldm, diffusers) in [
            (
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "input_blocks.5.0.in_layers.2.weight",
                "down_blocks.1.resnets.1.conv1.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            (
                "middle_block.2.emb_layers.1.weight",
                "mid_block.resnets.1.time_emb_proj.weight",
            ),
            (
                "middle_block.1.proj_in.weight",
                "mid_block.attentions.0.proj_in.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.4.1.norm.weight",
                "up_blocks.1.attentions.1.norm.weight",
            ),
            (
                "output_blocks.11.0.skip_connection.weight",
                "up_blocks.3.resnets.2.conv_shortcut.weight",
            ),
            ("time_embed.2.weight", "time_embedding.linear_2.weight"),
            ("out.2.weight", "conv_out.weight"),
        ] {
            assert_eq!(
                renamed(&format!("{UNET_PREFIX}{ldm}")),
                format!("unet:{diffusers}"),
                "{ldm}"
            );
        }
    }

    #[test]
    fn vae_and_open_clip_names() {
        for (ldm, diffusers) in [
            (
                "first_stage_model.decoder.up.3.block.0.nin_shortcut.weight",
                "vae:decoder.up_blocks.0.resnets.0.conv_shortcut.weight",
            ),
            (
                "first_stage_model.decoder.up.1.upsample.conv.weight",
                "vae:decoder.up_blocks.2.upsamplers.0.conv.weight",
            ),
            (
                "first_stage_model.encoder.down.0.downsample.conv.bias",
                "vae:encoder.down_blocks.0.downsamplers.0.conv.bias",
            ),
            (
                "first_stage_model.encoder.mid.attn_1.proj_out.weight",
                "vae:encoder.mid_block.attentions.0.to_out.0.weight",
            ),
            (
                "first_stage_model.encoder.norm_out.weight",
                "vae:encoder.conv_norm_out.weight",
            ),
            (
                "cond_stage_model.model.transformer.resblocks.3.mlp.c_proj.bias",
                "text_encoder:text_model.encoder.layers.3.mlp.fc2.bias",
            ),
            (
                "cond_stage_model.model.positional_embedding",
                "text_encoder:text_model.embeddings.position_embedding.weight",
            ),
            (
                "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight",
                "text_encoder:text_model.encoder.layers.0.mlp.fc1.weight",
            ),
        ] {
            assert_eq!(renamed(ldm), diffusers, "{ldm}");
        }
        let LdmTensor::StackedQkv(parts) = layout()
            .diffusers_name("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
            .unwrap()
        else {
            panic!("in_proj_weight is stacked")
        };
        assert_eq!(
            parts[2].name,
            "text_model.encoder.layers.0.self_attn.v_proj.weight"
        );
        for other in [
            "cond_stage_model.model.text_projection",
            "model_ema.decay",
            "alphas_cumprod",
        ] {
            assert_eq!(
                layout().diffusers_name(other).unwrap(),
                LdmTensor::Other,
                "{other}"
            );
        }
        let err = layout()
            .diffusers_name("model.diffusion_model.input_blocks.1.7.x")
            .unwrap_err();
        assert!(err.to_string().contains("input_blocks.1.7.x"), "{err}");
    }

    #[test]
    fn layout_is_read_off_the_keys() {
        let keys = [
            "model.diffusion_model.input_blocks.3.0.op.weight",
            "model.diffusion_model.input_blocks.6.0.op.weight",
            "model.diffusion_model.output_blocks.8.0.in_layers.0.weight",
            "first_stage_model.decoder.up.1.block.0.conv1.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        ];
        let layout = LdmLayout::detect(keys.iter().copied()).unwrap();
        assert_eq!(
            layout,
            LdmLayout {
                layers_per_block: 2,
                vae_up_blocks: 2,
                text_encoder: TextEncoderLayout::Clip
            }
        );
        let err = LdmLayout::detect(["unet.conv_in.weight"].iter().copied()).unwrap_err();
        assert!(err.to_string().contains("not a single-file"), "{err}");
    }
}
