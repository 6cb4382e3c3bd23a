//! Single-file checkpoints in the original LDM (CompVis / A1111) layout, mapped to diffusers names.
//!
//! A single file holds three models under fixed prefixes:
//! - `model.diffusion_model.` — the UNet (`input_blocks`/`middle_block`/`output_blocks`),
//! - `first_stage_model.` — the VAE (`encoder.down.N.block.M`, `mid.attn_1` as 1×1 convs),
//! - `cond_stage_model.transformer.` — SD1's CLIP text encoder, transformers names as is, or
//!   `cond_stage_model.model.` — SD2's OpenCLIP text encoder, q/k/v stacked in `in_proj_weight`;
//!   SDXL has both encoders (Stability's SGM layout): CLIP under
//!   `conditioner.embedders.0.transformer.` and OpenCLIP under `conditioner.embedders.1.model.`,
//!   whose `text_projection` is the transposed weight of diffusers' `text_projection` Linear.
//!
//! [`LdmLayout::diffusers_name`] maps each key to the diffusers tensor(s) it holds; keys outside
//! the models (EMA copies, SD2's unused `text_projection`, `logit_scale`, schedule buffers) map to
//! [`LdmTensor::Other`] and are meant to be carried over untouched. The UNet's block numbering
//! depends on its layers per block, which [`LdmLayout::detect`] reads off the keys.
//! [`LdmLayout::ldm_key`] goes the other way.
//!
//! Both directions read the same rules: each model's correspondences are listed once, as pairs
//! of name prefixes (`input_blocks.4.1.` ↔ `down_blocks.1.attentions.0.`), by one function per
//! model (`LdmLayout::rules`). A name maps through the pair with the longest prefix it starts
//! with on its side, the rest carried over unchanged; so a fact such as the UNet's row
//! arithmetic or the decoder's reversed block order is written in one place, and reading and
//! writing agree on every name a model has.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::rc::Rc;

use anyhow::{bail, ensure, Context, Result};

use crate::formats::keys::Component;

/// Key prefix of the UNet in a single-file checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Key prefix of the VAE.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Key prefix of SD1's CLIP text encoder (transformers names follow).
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// Key prefix of SD2's OpenCLIP text encoder.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// Key prefix of SDXL's first text encoder, CLIP ViT-L (transformers names follow).
pub const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Key prefix of SDXL's second text encoder, OpenCLIP ViT-bigG.
pub const SDXL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";

/// One model of a Stable Diffusion checkpoint, named as its diffusers sub-folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModelPart {
    Unet,
    Vae,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl ModelPart {
    pub const ALL: [ModelPart; 4] = [Self::Unet, Self::Vae, Self::TextEncoder, Self::TextEncoder2];

    /// The diffusers sub-folder (`unet`, `vae`, `text_encoder`, `text_encoder_2`).
    pub fn folder(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::Vae => "vae",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }

    /// The adapter component this model is, `None` for the VAE (adapters do not touch it).
    pub fn component(self) -> Option<Component> {
        match self {
            Self::Unet => Some(Component::Unet),
            Self::Vae => None,
            Self::TextEncoder => Some(Component::TextEncoder),
            Self::TextEncoder2 => Some(Component::TextEncoder2),
        }
    }

    /// `name` as this model's tensors are compared: text-encoder names with the `text_model.`
    /// level, which files of either transformers generation may lack; others as they are.
    pub fn canonical_name(self, name: &str) -> String {
        match self.component() {
            Some(component) => component.canonical_path(name),
            None => name.to_string(),
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
    /// SDXL OpenCLIP's `text_projection` `[width, projection]` (applied as `x @ P`): the
    /// transpose of diffusers' Linear weight `[projection, width]`.
    Transposed(DiffusersTensor),
    /// Not part of the UNet, VAE or text encoder as diffusers builds them.
    Other,
}

/// Which text encoder a single file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TextEncoderLayout {
    /// SD1: transformers' CLIPTextModel under [`CLIP_PREFIX`].
    Clip,
    /// SD2: OpenCLIP under [`OPEN_CLIP_PREFIX`].
    OpenClip,
    /// SDXL: CLIP under [`SDXL_CLIP_PREFIX`] and OpenCLIP (the second encoder) under
    /// [`SDXL_OPEN_CLIP_PREFIX`].
    Sdxl,
}

/// The layout facts of one single-file checkpoint needed to map its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
        let has = |prefix: &str| keys.clone().any(|k| k.starts_with(prefix));
        let text_encoder = if has(SDXL_CLIP_PREFIX) || has(SDXL_OPEN_CLIP_PREFIX) {
            for (prefix, which) in [
                (SDXL_CLIP_PREFIX, "first"),
                (SDXL_OPEN_CLIP_PREFIX, "second"),
            ] {
                ensure!(
                    has(prefix),
                    "an SDXL single-file checkpoint without its {which} text encoder (no \
                     `{prefix}…` keys)"
                );
            }
            TextEncoderLayout::Sdxl
        } else if has(OPEN_CLIP_PREFIX) {
            TextEncoderLayout::OpenClip
        } else if has(CLIP_PREFIX) {
            TextEncoderLayout::Clip
        } else {
            bail!(
                "no text encoder (`{CLIP_PREFIX}…`, `{OPEN_CLIP_PREFIX}…` or \
                 `{SDXL_CLIP_PREFIX}…` keys) in the single-file checkpoint"
            )
        };
        let unet_keys = keys.clone().filter_map(|k| k.strip_prefix(UNET_PREFIX));
        let downsamplers = indices(unet_keys.clone(), "input_blocks.", |rest| {
            rest.starts_with("0.op.")
        });
        let output_blocks = indices(unet_keys, "output_blocks.", |_| true);
        let down_blocks = downsamplers.len() + 1;
        // Saturating: a hostile index of usize::MAX is refused by the MAX_INDEX check below.
        let n_out = output_blocks.last().map_or(0, |n| n.saturating_add(1));
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
        .map_or(0, |n| n.saturating_add(1));
        ensure!(
            n_out <= MAX_INDEX && vae_up_blocks <= MAX_INDEX,
            "single-file checkpoint: {n_out} UNet output blocks, {vae_up_blocks} VAE decoder \
             blocks; no Stable Diffusion model has more than {MAX_INDEX}"
        );
        Ok(Self {
            layers_per_block: n_out / down_blocks - 1,
            vae_up_blocks,
            text_encoder,
        })
    }

    /// The diffusers tensor(s) behind single-file key `key`; an error names keys under a model's
    /// prefix that follow no known pattern.
    pub fn diffusers_name(&self, key: &str) -> Result<LdmTensor> {
        let Some(section) = Section::ALL
            .into_iter()
            .find(|s| key.starts_with(s.prefix()))
        else {
            return Ok(LdmTensor::Other);
        };
        let rest = &key[section.prefix().len()..];
        let rules = self.rules(section, index_bound(rest), &[]);
        // A transposed tensor is named exactly (`text_projection`), not as a prefix.
        let matched = rules
            .longest_match(rest, Side::Ldm)
            .filter(|(rule, tail)| rule.kind != Kind::Transposed || tail.is_empty());
        let Some((rule, tail)) = matched else {
            // OpenCLIP's logit_scale, attn_mask (and SD2's text_projection): parts the
            // diffusers text encoders have no use for. The other models have no such extras.
            if matches!(section, Section::OpenClip | Section::SdxlOpenClip) {
                return Ok(LdmTensor::Other);
            }
            bail!("single-file key `{key}` follows no known LDM pattern");
        };
        let renamed =
            |r: &Rule| DiffusersTensor::new(section.part(), format!("{}{tail}", r.diffusers));
        Ok(match rule.kind {
            Kind::Plain | Kind::ConvWeight => LdmTensor::Renamed(renamed(rule)),
            Kind::Transposed => LdmTensor::Transposed(renamed(rule)),
            Kind::Stacked(_) => {
                // The q, k and v rules share this LDM prefix and are listed in that order.
                let thirds: Vec<DiffusersTensor> = rules
                    .rules
                    .iter()
                    .filter(|r| r.ldm == rule.ldm)
                    .map(renamed)
                    .collect();
                LdmTensor::StackedQkv(
                    thirds
                        .try_into()
                        .expect("OpenCLIP's rules list q, k and v under each in_proj_ prefix"),
                )
            }
        })
    }
}

impl LdmLayout {
    /// Whether diffusers tensor `t` has a place in a single file of this layout: not
    /// transformers' `position_ids` buffer of an OpenCLIP encoder (which older transformers saved
    /// in `text_encoder_2/` and SD2's `text_encoder/`; OpenCLIP files hold none, and loaders
    /// recompute it).
    pub fn stores(&self, t: &DiffusersTensor) -> bool {
        let open_clip = matches!(
            (t.part, self.text_encoder),
            (ModelPart::TextEncoder, TextEncoderLayout::OpenClip)
                | (ModelPart::TextEncoder2, TextEncoderLayout::Sdxl)
        );
        !(open_clip && t.part.canonical_name(&t.name) == OPEN_CLIP_POSITION_IDS)
    }
}

/// transformers' position ids buffer, which OpenCLIP files do not store.
const OPEN_CLIP_POSITION_IDS: &str = "text_model.embeddings.position_ids";

/// Where a diffusers tensor goes in a single-file checkpoint (the reverse of
/// [`LdmLayout::diffusers_name`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LdmTarget {
    /// Stored under `key`; `to_conv` for the VAE attention projections, Linear `[out, in]` in
    /// diffusers and 1×1 convs `[out, in, 1, 1]` in LDM checkpoints.
    Key { key: String, to_conv: bool },
    /// The `index`-th third (q, k, v) of OpenCLIP's stacked `key`.
    Stacked { key: String, index: usize },
    /// Stored transposed under `key` (SDXL OpenCLIP's `text_projection`).
    Transposed { key: String },
}

impl LdmTarget {
    pub fn key(&self) -> &str {
        match self {
            Self::Key { key, .. } | Self::Stacked { key, .. } | Self::Transposed { key } => key,
        }
    }
}

impl LdmLayout {
    /// The single-file key of diffusers tensor `t`. `up_blocks_with_attention` lists the UNet up
    /// blocks that have attentions (their upsampler is the block's third child, not its second).
    /// Text-encoder names may lack the `text_model.` level ([`ModelPart::canonical_name`]).
    pub fn ldm_key(
        &self,
        t: &DiffusersTensor,
        up_blocks_with_attention: &[usize],
    ) -> Result<LdmTarget> {
        let section = match (t.part, self.text_encoder) {
            (ModelPart::Unet, _) => Section::Unet,
            (ModelPart::Vae, _) => Section::Vae,
            (ModelPart::TextEncoder, TextEncoderLayout::Clip) => Section::Clip,
            (ModelPart::TextEncoder, TextEncoderLayout::OpenClip) => Section::OpenClip,
            (ModelPart::TextEncoder, TextEncoderLayout::Sdxl) => Section::SdxlClip,
            (ModelPart::TextEncoder2, TextEncoderLayout::Sdxl) => Section::SdxlOpenClip,
            (ModelPart::TextEncoder2, _) => bail!(
                "{} tensor `{}`: only SDXL single files have a second text encoder",
                t.part,
                t.name
            ),
        };
        let name = t.part.canonical_name(&t.name);
        let rules = self.rules(section, index_bound(&name), up_blocks_with_attention);
        let unmapped = || {
            format!(
                "{} tensor `{}` has no single-file (LDM) name",
                t.part, t.name
            )
        };
        let (rule, tail) = rules
            .longest_match(&name, Side::Diffusers)
            .with_context(unmapped)?;
        let rest = format!("{}{tail}", rule.ldm);
        let key = format!("{}{rest}", section.prefix());
        // Reading the key must go through a pair with the same LDM prefix, or it would come back
        // as another tensor. Only names no model has get here: `resnets.0.nin_shortcut.weight`
        // becomes `block.0.nin_shortcut.weight`, which reads back as `conv_shortcut`.
        let read_back = rules
            .longest_match(&rest, Side::Ldm)
            .map(|(r, _)| r.ldm.len());
        ensure!(
            read_back == Some(rule.ldm.len()),
            "{}: `{key}` would read back as another tensor",
            unmapped()
        );
        Ok(match rule.kind {
            Kind::Plain => LdmTarget::Key {
                key,
                to_conv: false,
            },
            Kind::ConvWeight => LdmTarget::Key {
                to_conv: key.ends_with(".weight"),
                key,
            },
            Kind::Stacked(index) => LdmTarget::Stacked { key, index },
            Kind::Transposed => LdmTarget::Transposed { key },
        })
    }
}

// The rules: pairs of name prefixes, listed once per model and read in both directions.

/// The models of a single file, each under its key prefix. The text encoders have four: which
/// a file uses is read off its keys ([`TextEncoderLayout`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Section {
    Unet,
    Vae,
    Clip,
    OpenClip,
    SdxlClip,
    SdxlOpenClip,
}

impl Section {
    const ALL: [Section; 6] = [
        Self::Unet,
        Self::Vae,
        Self::Clip,
        Self::OpenClip,
        Self::SdxlClip,
        Self::SdxlOpenClip,
    ];

    fn prefix(self) -> &'static str {
        match self {
            Self::Unet => UNET_PREFIX,
            Self::Vae => VAE_PREFIX,
            Self::Clip => CLIP_PREFIX,
            Self::OpenClip => OPEN_CLIP_PREFIX,
            Self::SdxlClip => SDXL_CLIP_PREFIX,
            Self::SdxlOpenClip => SDXL_OPEN_CLIP_PREFIX,
        }
    }

    fn part(self) -> ModelPart {
        match self {
            Self::Unet => ModelPart::Unet,
            Self::Vae => ModelPart::Vae,
            Self::Clip | Self::OpenClip | Self::SdxlClip => ModelPart::TextEncoder,
            Self::SdxlOpenClip => ModelPart::TextEncoder2,
        }
    }
}

/// One correspondence: a name (after its model's prefix) starting with `ldm` in a single file is
/// the one starting with `diffusers` in the diffusers model, the rest the same.
#[derive(Debug)]
struct Rule {
    ldm: String,
    diffusers: String,
    kind: Kind,
}

/// How the tensors behind a [`Rule`] differ beyond their names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Same values, same shape.
    Plain,
    /// A VAE attention projection: Linear in diffusers, its weight a 1×1 conv in LDM files.
    ConvWeight,
    /// The `index`-th third (q, k, v) of OpenCLIP's stacked `in_proj_*`: three rules share
    /// the LDM prefix.
    Stacked(usize),
    /// SDXL OpenCLIP's `text_projection`, stored transposed.
    Transposed,
}

/// Which side of the rules a name is on.
#[derive(Debug, Clone, Copy)]
enum Side {
    Ldm = 0,
    Diffusers = 1,
}

impl Rule {
    fn prefix(&self, side: Side) -> &str {
        match side {
            Side::Ldm => &self.ldm,
            Side::Diffusers => &self.diffusers,
        }
    }
}

/// The rules of one model for one layout and index bound, with each side's prefixes indexed
/// so a name finds its rule in a few hash lookups, however many rules there are.
struct RuleSet {
    rules: Vec<Rule>,
    /// Per side: prefix → the first rule listed with it.
    by_prefix: [HashMap<String, usize>; 2],
}

impl RuleSet {
    fn new(rules: Vec<Rule>) -> Self {
        let mut by_prefix = [HashMap::new(), HashMap::new()];
        for (index, rule) in rules.iter().enumerate() {
            for side in [Side::Ldm, Side::Diffusers] {
                by_prefix[side as usize]
                    .entry(rule.prefix(side).to_string())
                    .or_insert(index);
            }
        }
        Self { rules, by_prefix }
    }

    /// The rule whose `side` prefix is the longest that `name` starts with (the first listed of
    /// equally long ones), and the rest of `name`. Longest first lets a specific pair refine a
    /// general one: `block.0.nin_shortcut.` ↔ `resnets.0.conv_shortcut.` within `block.0.` ↔
    /// `resnets.0.`.
    fn longest_match<'n>(&self, name: &'n str, side: Side) -> Option<(&Rule, &'n str)> {
        let index = &self.by_prefix[side as usize];
        (0..=name.len())
            .rev()
            .filter(|&end| name.is_char_boundary(end))
            .find_map(|end| {
                index
                    .get(&name[..end])
                    .map(|&i| (&self.rules[i], &name[end..]))
            })
    }
}

/// Indices above this are not mapped; real models stay far below (SD's UNet has 12 output
/// rows, OpenCLIP-bigG 32 layers). It bounds the rules a hostile name can make us list (the
/// VAE's grow with its square).
const MAX_INDEX: usize = 64;

/// The highest block or layer index the rules for `name` need. Every index in a rule's prefix
/// is at most a number of the name it matches (an LDM row number is at least its block's
/// index), so the largest number in the name will do.
fn index_bound(name: &str) -> usize {
    name.split('.')
        .filter_map(|s| s.parse::<usize>().ok())
        .max()
        .unwrap_or(0)
        .min(MAX_INDEX)
}

/// Collects the rules of one model.
#[derive(Default)]
struct Rules(Vec<Rule>);

impl Rules {
    fn add(&mut self, ldm: impl Into<String>, diffusers: impl Into<String>, kind: Kind) {
        self.0.push(Rule {
            ldm: ldm.into(),
            diffusers: diffusers.into(),
            kind,
        });
    }

    fn pair(&mut self, ldm: impl Into<String>, diffusers: impl Into<String>) {
        self.add(ldm, diffusers, Kind::Plain);
    }

    /// Each (LDM, diffusers) pair of `table`, under `ldm` and `diffusers` respectively.
    fn table(&mut self, ldm: &str, diffusers: &str, table: &[(&str, &str)]) {
        for (l, d) in table {
            self.pair(format!("{ldm}{l}"), format!("{diffusers}{d}"));
        }
    }
}

impl LdmLayout {
    /// The rules of `section` with block and layer indices up to `bound` (see [`index_bound`]).
    /// `up_attn` lists the UNet up blocks with attentions; only writing needs it. Built once per
    /// thread for each such combination: a file's keys share a few.
    fn rules(&self, section: Section, bound: usize, up_attn: &[usize]) -> Rc<RuleSet> {
        type CacheKey = (LdmLayout, Section, usize, Vec<usize>);
        thread_local! {
            static CACHE: RefCell<HashMap<CacheKey, Rc<RuleSet>>> = RefCell::new(HashMap::new());
        }
        let key = (*self, section, bound, up_attn.to_vec());
        CACHE.with_borrow_mut(|cache| {
            // Bounded: MAX_INDEX + 1 bounds per section and layout.
            if cache.len() > Section::ALL.len() * (MAX_INDEX + 1) {
                cache.clear();
            }
            cache
                .entry(key)
                .or_insert_with(|| Rc::new(RuleSet::new(self.list_rules(section, bound, up_attn))))
                .clone()
        })
    }

    fn list_rules(&self, section: Section, bound: usize, up_attn: &[usize]) -> Vec<Rule> {
        let mut rules = Rules::default();
        match section {
            Section::Unet => self.unet_rules(&mut rules, bound, up_attn),
            Section::Vae => self.vae_rules(&mut rules, bound),
            Section::Clip | Section::SdxlClip => {
                // CLIP keeps transformers' names; older files leave out the `text_model.` level.
                // Writing takes the first pair.
                rules.pair("text_model.", "text_model.");
                rules.pair("", "text_model.");
            }
            Section::OpenClip => open_clip_rules(&mut rules, bound),
            Section::SdxlOpenClip => {
                open_clip_rules(&mut rules, bound);
                rules.add(
                    "text_projection",
                    "text_projection.weight",
                    Kind::Transposed,
                );
            }
        }
        rules.0
    }

    /// `input_blocks` holds conv_in in row 0, then `layers_per_block + 1` rows per down block;
    /// `output_blocks` the same number of rows per up block, from row 0. In a row, child `.0` is
    /// the resnet and `.1` the attention (if the block has them). A down block's last row holds
    /// its downsampler instead (`.0.op`), an up block's last row its upsampler after the others
    /// (`.1.conv`, or `.2.conv` after an attention).
    fn unet_rules(&self, rules: &mut Rules, bound: usize, up_attn: &[usize]) {
        rules.table("", "", &UNET_TOP);
        let (last, per) = (self.layers_per_block, self.layers_per_block + 1);
        let input_row = |b: usize, l: usize| 1 + b * per + l;
        let output_row = |b: usize, l: usize| b * per + l;
        for b in 0..=bound {
            for l in 0..per {
                let (down, up) = (input_row(b, l), output_row(b, l));
                rules.table(
                    &format!("input_blocks.{down}.0."),
                    &format!("down_blocks.{b}.resnets.{l}."),
                    &UNET_RESNET,
                );
                rules.pair(
                    format!("input_blocks.{down}.1."),
                    format!("down_blocks.{b}.attentions.{l}."),
                );
                rules.table(
                    &format!("output_blocks.{up}.0."),
                    &format!("up_blocks.{b}.resnets.{l}."),
                    &UNET_RESNET,
                );
                rules.pair(
                    format!("output_blocks.{up}.1."),
                    format!("up_blocks.{b}.attentions.{l}."),
                );
            }
            rules.pair(
                format!("input_blocks.{}.0.op.", input_row(b, last)),
                format!("down_blocks.{b}.downsamplers.0.conv."),
            );
            // Reading takes either child; writing the first listed, the one that block has.
            let children = if up_attn.contains(&b) { [2, 1] } else { [1, 2] };
            for child in children {
                rules.pair(
                    format!("output_blocks.{}.{child}.conv.", output_row(b, last)),
                    format!("up_blocks.{b}.upsamplers.0.conv."),
                );
            }
        }
        rules.table("middle_block.0.", "mid_block.resnets.0.", &UNET_RESNET);
        rules.pair("middle_block.1.", "mid_block.attentions.0.");
        rules.table("middle_block.2.", "mid_block.resnets.1.", &UNET_RESNET);
    }

    /// The encoder's `down.N` is diffusers' `down_blocks.N`; the decoder's `up.N` counts from
    /// the lowest resolution, diffusers' `up_blocks` from the highest.
    fn vae_rules(&self, rules: &mut Rules, bound: usize) {
        rules.table("", "", &VAE_TOP);
        for coder in ["encoder.", "decoder."] {
            rules.table(coder, coder, &VAE_CODER);
            rules.table(
                &format!("{coder}mid."),
                &format!("{coder}mid_block."),
                &VAE_MID,
            );
            for (ldm, diffusers) in VAE_MID_PROJECTIONS {
                rules.add(
                    format!("{coder}mid.{ldm}"),
                    format!("{coder}mid_block.{diffusers}"),
                    Kind::ConvWeight,
                );
            }
        }
        let n = self.vae_up_blocks;
        let encoder = (0..=bound).map(|i| {
            (
                format!("encoder.down.{i}."),
                format!("encoder.down_blocks.{i}."),
            )
        });
        let decoder = (0..n).map(|i| {
            (
                format!("decoder.up.{i}."),
                format!("decoder.up_blocks.{}.", n - 1 - i),
            )
        });
        for (ldm, diffusers) in encoder.chain(decoder) {
            for j in 0..=bound {
                rules.table(
                    &format!("{ldm}block.{j}."),
                    &format!("{diffusers}resnets.{j}."),
                    &VAE_RESNET,
                );
            }
            rules.table(&ldm, &diffusers, &VAE_SAMPLERS);
        }
    }
}

/// OpenCLIP in transformers' CLIPTextModel names (with the `text_model.` level).
fn open_clip_rules(rules: &mut Rules, bound: usize) {
    rules.table("", "", &OPEN_CLIP_TOP);
    for n in 0..=bound {
        let ldm = format!("transformer.resblocks.{n}.");
        let diffusers = format!("text_model.encoder.layers.{n}.");
        rules.table(&ldm, &diffusers, &OPEN_CLIP_LAYER);
        for (index, x) in ["q", "k", "v"].into_iter().enumerate() {
            rules.add(
                format!("{ldm}attn.in_proj_"),
                format!("{diffusers}self_attn.{x}_proj."),
                Kind::Stacked(index),
            );
        }
    }
}

// Prefix tables, each (LDM, diffusers).

/// UNet top-level layers (`label_emb.0` is SDXL's added size/text conditioning).
const UNET_TOP: [(&str, &str); 7] = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
];

/// A UNet resnet's children: `in_layers.0` (GroupNorm), `in_layers.2` (conv), …
const UNET_RESNET: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];

/// VAE layers outside the encoder and decoder.
const VAE_TOP: [(&str, &str); 2] = [
    ("quant_conv.", "quant_conv."),
    ("post_quant_conv.", "post_quant_conv."),
];

/// The encoder's and the decoder's own layers.
const VAE_CODER: [(&str, &str); 3] = [
    ("conv_in.", "conv_in."),
    ("conv_out.", "conv_out."),
    ("norm_out.", "conv_norm_out."),
];

/// The VAE mid block's resnets and attention norm (inside `mid.` / `mid_block.`).
const VAE_MID: [(&str, &str); 3] = [
    ("block_1.", "resnets.0."),
    ("block_2.", "resnets.1."),
    ("attn_1.norm.", "attentions.0.group_norm."),
];

/// The VAE mid block's attention projections (inside `mid.` / `mid_block.`).
const VAE_MID_PROJECTIONS: [(&str, &str); 4] = [
    ("attn_1.q.", "attentions.0.to_q."),
    ("attn_1.k.", "attentions.0.to_k."),
    ("attn_1.v.", "attentions.0.to_v."),
    ("attn_1.proj_out.", "attentions.0.to_out.0."),
];

/// A VAE resnet: its children keep their names but for the shortcut.
const VAE_RESNET: [(&str, &str); 2] = [("", ""), ("nin_shortcut.", "conv_shortcut.")];

/// A VAE block's resampler (encoder blocks have the first, decoder blocks the second).
const VAE_SAMPLERS: [(&str, &str); 2] = [
    ("downsample.", "downsamplers.0."),
    ("upsample.", "upsamplers.0."),
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

/// The distinct `N` of keys `<head>N.<rest>` whose rest satisfies `filter`, sorted.
fn indices<'a>(
    keys: impl Iterator<Item = &'a str>,
    head: &str,
    filter: impl Fn(&str) -> bool,
) -> Vec<usize> {
    let set: BTreeSet<usize> = keys
        .filter_map(|k| {
            let (n, rest) = k.strip_prefix(head)?.split_once('.')?;
            Some((n.parse().ok()?, rest))
        })
        .filter(|(_, rest)| filter(rest))
        .map(|(n, _)| n)
        .collect();
    set.into_iter().collect()
}

#[cfg(test)]
mod tests;
