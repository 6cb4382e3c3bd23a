//! Key mapping between adapter-file layouts and the model's module paths, in one place.
//!
//! Module paths follow [`ModuleInfo::path`]: diffusers names for the UNet
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q`) and transformers names for the
//! text encoder, canonically with the `text_model.` level
//! (`text_model.encoder.layers.0.self_attn.q_proj`).
//!
//! Two adapter layouts are understood:
//! - kohya/A1111: `lora_unet_` / `lora_te_` + the path with `.` replaced by `_`. Flattening loses
//!   information (real names contain `_`), so flattened names are only ever *matched* against the
//!   flattened names of enumerated modules ([`KohyaNames`]), never split apart. SDXL files name
//!   the two text encoders `lora_te1_` / `lora_te2_` and the UNet by its LDM (single-file) paths
//!   (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q`), which [`KohyaNames`] indexes
//!   beside the diffusers spelling.
//! - diffusers/PEFT: `unet.` / `text_encoder.` / `text_encoder_2.` + the path, in several
//!   historical spellings that [`parse_diffusers_key`] maps back to the path.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

pub use crate::adapters::Component;
use crate::adapters::{ModuleInfo, ModuleKind};

/// The prefix SDXL kohya files give the first text encoder; read as [`Component::TextEncoder`].
const KOHYA_SDXL_TE1_PREFIX: &str = "lora_te1_";

/// How adapter files name each component.
impl Component {
    /// Prefix of kohya key names, separator included (`lora_unet_`), as SD 1.x/2.x files have it
    /// (see [`Self::kohya_prefix_for`]).
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            Self::Unet => "lora_unet_",
            Self::TextEncoder => "lora_te_",
            Self::TextEncoder2 => "lora_te2_",
        }
    }

    /// The kohya prefix written for a model with (`sdxl`) or without a second text encoder:
    /// SDXL files number the first one (`lora_te1_`).
    pub fn kohya_prefix_for(self, sdxl: bool) -> &'static str {
        match self {
            Self::TextEncoder if sdxl => KOHYA_SDXL_TE1_PREFIX,
            _ => self.kohya_prefix(),
        }
    }

    /// The component and the rest of a kohya key (`lora_te1_` read as the first text encoder).
    pub fn split_kohya_key(key: &str) -> Option<(Self, &str)> {
        if let Some(rest) = key.strip_prefix(KOHYA_SDXL_TE1_PREFIX) {
            return Some((Self::TextEncoder, rest));
        }
        Self::ALL
            .into_iter()
            .find_map(|c| Some((c, key.strip_prefix(c.kohya_prefix())?)))
    }

    /// Prefix of diffusers/PEFT keys and of `lora_adapter_metadata` entries, separator included
    /// (`unet.`).
    pub fn diffusers_prefix(self) -> &'static str {
        match self {
            Self::Unet => "unet.",
            Self::TextEncoder => "text_encoder.",
            Self::TextEncoder2 => "text_encoder_2.",
        }
    }

    /// The path as adapters name it: text-encoder paths gain the `text_model.` level if the
    /// model (transformers ≥ 5) or the file left it out; UNet paths are unchanged, and so is
    /// `text_projection`, which sits beside `text_model` in every transformers generation.
    pub fn canonical_path(self, path: &str) -> String {
        if self.is_text_encoder()
            && !path.starts_with(TEXT_MODEL)
            && path.split('.').next() != Some(TEXT_PROJECTION)
        {
            format!("{TEXT_MODEL}{path}")
        } else {
            path.to_string()
        }
    }
}

const TEXT_MODEL: &str = "text_model.";
/// `CLIPTextModelWithProjection`'s projection, outside `text_model`.
const TEXT_PROJECTION: &str = "text_projection";

/// Which tensor of a LoRA module a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `[rank, in]` (kohya `lora_down`, PEFT `lora_A`).
    Down,
    /// `[out, rank]` (kohya `lora_up`, PEFT `lora_B`).
    Up,
    /// The scalar alpha.
    Alpha,
    /// DoRA's magnitude per output channel (kohya/LyCORIS `dora_scale`, PEFT
    /// `lora_magnitude_vector`).
    Magnitude,
}

/// What a tensor key of an adapter file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedKey {
    /// Part of a plain LoRA module. `module` is, for kohya keys, the flattened name without
    /// prefix (`down_blocks_0_…_attn2_to_q`) and, for diffusers keys, the canonical path.
    Lora {
        component: Component,
        module: String,
        role: Role,
    },
    /// A key of a format or algorithm this toolkit does not implement; `what` names it.
    Unsupported { what: &'static str },
    /// Anything else.
    Unknown,
}

/// The kohya name of a module path, without component prefix: every `.` becomes `_`.
pub fn kohya_flatten(path: &str) -> String {
    path.replace('.', "_")
}

/// The full kohya module name (`lora_unet_…`, `lora_te_text_model_…`; `lora_te1_…` for
/// `sdxl`) of a module path, UNet modules in their diffusers spelling (see [`KohyaNamer`] for
/// SDXL files' UNet names).
pub fn kohya_name(component: Component, path: &str, sdxl: bool) -> String {
    format!(
        "{}{}",
        component.kohya_prefix_for(sdxl),
        kohya_flatten(&component.canonical_path(path))
    )
}

/// Names modules as kohya's sd-scripts writes them: for SDXL the UNet by its LDM paths
/// (`lora_unet_input_blocks_4_1_…`, what sd-scripts' SDXL UNet is built with, so what its own
/// loader matches) and the text encoders `lora_te1_` / `lora_te2_`; for SD 1.x/2.x as
/// [`kohya_name`].
pub struct KohyaNamer {
    sdxl: bool,
    /// SDXL's UNet numbering; `None` otherwise.
    ldm: Option<LdmUnetPaths>,
}

impl KohyaNamer {
    /// `unet`: the model's UNet modules, whose numbering the LDM paths follow. Fails for an SDXL
    /// UNet whose numbering cannot be read off them.
    pub fn new(unet: &[ModuleInfo], sdxl: bool) -> Result<Self> {
        let ldm = match sdxl && !unet.is_empty() {
            true => Some(LdmUnetPaths::of(unet).context(
                "the SDXL UNet's single-file numbering (kohya's module names) cannot be read off \
                 its modules: no down-block layers, or blocks with different layer counts",
            )?),
            false => None,
        };
        Ok(Self { sdxl, ldm })
    }

    pub fn name(&self, component: Component, path: &str) -> String {
        let ldm_path = match (component, &self.ldm) {
            (Component::Unet, Some(ldm)) => ldm.path(path),
            _ => None,
        };
        match ldm_path {
            Some(ldm_path) => format!("{}{}", component.kohya_prefix(), kohya_flatten(&ldm_path)),
            None => kohya_name(component, path, self.sdxl),
        }
    }
}

/// Prefixes that mark a file as kohya-layout; diffusers' loader uses the same test.
pub const KOHYA_PREFIXES: [&str; 4] = ["lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"];

/// Parses a key of a kohya-layout file (`<lora_name>.<suffix>`).
pub fn parse_kohya_key(key: &str) -> ParsedKey {
    let Some((component, rest)) = Component::split_kohya_key(key) else {
        return ParsedKey::Unknown;
    };
    // Flattened names contain no `.`, so the first one starts the suffix.
    let Some((name, suffix)) = rest.split_once('.') else {
        return ParsedKey::Unknown;
    };
    let role = match suffix {
        "lora_down.weight" => Role::Down,
        "lora_up.weight" => Role::Up,
        "alpha" => Role::Alpha,
        "dora_scale" => Role::Magnitude,
        _ => return unsupported_kohya_suffix(suffix),
    };
    ParsedKey::Lora {
        component,
        module: name.to_string(),
        role,
    }
}

/// Classifies a kohya suffix that is not plain LoRA: the algorithm it belongs to, so the user
/// learns *why* the file cannot be used rather than seeing its modules silently vanish.
fn unsupported_kohya_suffix(suffix: &str) -> ParsedKey {
    const GLORA: [&str; 5] = [
        "a1.weight",
        "a2.weight",
        "b1.weight",
        "b2.weight",
        "bm.weight",
    ];
    if let Some(what) = algorithm_marker(suffix) {
        return ParsedKey::Unsupported { what };
    }
    match suffix {
        s if GLORA.contains(&s) => ParsedKey::Unsupported {
            what: "LyCORIS GLoRA",
        },
        "weight" => ParsedKey::Unsupported {
            what: "LyCORIS (IA)³",
        },
        _ => ParsedKey::Unknown,
    }
}

/// The tensors of a LyCORIS LoHa module (after its kohya name): `ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b)`.
pub const LOHA_SUFFIXES: [&str; 4] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];
/// The tensors of a LyCORIS LoKr module: each Kronecker factor whole (`w1`, `w2`) or as a
/// low-rank pair (`w1_a`·`w1_b`, `w2_a`·`w2_b`).
pub const LOKR_SUFFIXES: [&str; 6] = [
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
];
/// The Tucker-decomposition tensors of LoHa/LoKr (their conv form), which nothing here reads.
pub const LYCORIS_TUCKER_SUFFIXES: [&str; 3] = ["hada_t1", "hada_t2", "lokr_t2"];

/// The non-LoRA algorithm whose tensor names start like `segment`, if any.
fn algorithm_marker(segment: &str) -> Option<&'static str> {
    const ALGORITHMS: [(&str, &str); 11] = [
        ("dora_scale", "DoRA in a diffusers file (dora_scale)"),
        ("hada_", "LyCORIS LoHa (hada_*)"),
        ("lokr_", "LyCORIS LoKr (lokr_*)"),
        (
            "lora_mid",
            "LyCORIS LoCon with Tucker decomposition (lora_mid)",
        ),
        ("oft_", "LyCORIS OFT/BOFT (oft_*)"),
        ("rescale", "LyCORIS OFT/BOFT (rescale)"),
        ("diff", "LyCORIS full weight difference (diff)"),
        ("on_input", "LyCORIS (IA)³"),
        ("w_norm", "LyCORIS norm training (w_norm/b_norm)"),
        ("b_norm", "LyCORIS norm training (w_norm/b_norm)"),
        ("lora_embedding_", "PEFT embedding LoRA (lora_embedding_*)"),
    ];
    ALGORITHMS
        .iter()
        .find(|(marker, _)| segment.starts_with(marker))
        .map(|(_, what)| *what)
}

/// Diffusers/PEFT spellings of a module's down/up tensors, as (key suffix, role). What precedes
/// the suffix is the module path itself.
const DIFFUSERS_SUFFIXES: [(&str, Role); 8] = [
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora_magnitude_vector", Role::Magnitude),
    (".lora_magnitude_vector.weight", Role::Magnitude),
    (".lora.down.weight", Role::Down),
    (".lora.up.weight", Role::Up),
    (".lora_linear_layer.down.weight", Role::Down),
    (".lora_linear_layer.up.weight", Role::Up),
];

/// Parses a key of a diffusers/PEFT-layout file (`unet.<…>` / `text_encoder.<…>`), mapping every
/// known spelling to the canonical module path:
/// - `unet.<path>.lora_A.weight` / `.lora_B.weight` (PEFT), `.lora_magnitude_vector[.weight]`
///   (PEFT DoRA)
/// - `unet.<path>.lora.down.weight` / `.lora.up.weight` (diffusers training scripts)
/// - `text_encoder.<path>.lora_linear_layer.down.weight` / `.up.weight`
/// - `unet.<block>.attn2.processor.to_q_lora.down.weight` → `<block>.attn2.to_q`
///   (`to_out_lora` → `to_out.0`), and for the text encoder `<…>.self_attn.to_q_lora.down.weight`
///   → `<…>.self_attn.q_proj` (`k_proj`, `v_proj`, `out_proj`)
/// - `<path>.alpha`: a kohya-style alpha in a diffusers file.
pub fn parse_diffusers_key(key: &str) -> ParsedKey {
    let Some(component) = Component::ALL
        .into_iter()
        .find(|c| key.starts_with(c.diffusers_prefix()))
    else {
        return ParsedKey::Unknown;
    };
    let rest = &key[component.diffusers_prefix().len()..];
    match diffusers_module(component, rest) {
        Some((path, role)) if !path.is_empty() => ParsedKey::Lora {
            component,
            module: component.canonical_path(&path),
            role,
        },
        Some(_) => ParsedKey::Unknown,
        None => unsupported_diffusers_tail(rest),
    }
}

/// The module path and role behind `rest` (a key without component prefix), if it is one of the
/// diffusers spellings.
fn diffusers_module(component: Component, rest: &str) -> Option<(String, Role)> {
    if let Some((suffix, role)) = DIFFUSERS_SUFFIXES.iter().find(|(s, _)| rest.ends_with(s)) {
        return Some((rest[..rest.len() - suffix.len()].to_string(), *role));
    }
    // Bare `.down.weight` / `.up.weight` only occur in the old attention-processor spelling.
    for (suffix, role) in [(".down.weight", Role::Down), (".up.weight", Role::Up)] {
        if let Some(spelled) = rest.strip_suffix(suffix) {
            return old_processor_path(component, spelled).map(|path| (path, role));
        }
    }
    let spelled = rest.strip_suffix(".alpha")?;
    let path = old_processor_path(component, spelled).unwrap_or_else(|| spelled.to_string());
    Some((path, Role::Alpha))
}

/// Names the unsupported algorithm of a diffusers key by its last two segments (`…to_q.dora_scale`,
/// `…to_q.hada_w1_a`); anything else is unknown.
fn unsupported_diffusers_tail(rest: &str) -> ParsedKey {
    if rest.ends_with(".lora_B.bias") {
        return ParsedKey::Unsupported {
            what: "PEFT lora_bias (lora_B.bias)",
        };
    }
    let what = rest.rsplit('.').take(2).find_map(algorithm_marker);
    what.map_or(ParsedKey::Unknown, |what| ParsedKey::Unsupported { what })
}

/// Maps the `LoRAAttnProcessor` spelling `<parent>[.processor].to_<x>_lora` to the projection's
/// path: `to_q`…`to_out.0` in the UNet, `q_proj`…`out_proj` in the text encoder.
fn old_processor_path(component: Component, spelled: &str) -> Option<String> {
    let (parent, last) = spelled.rsplit_once('.')?;
    let projection = last.strip_suffix("_lora")?;
    let parent = parent.strip_suffix(".processor").unwrap_or(parent);
    let child = match (component.is_text_encoder(), projection) {
        (false, "to_q" | "to_k" | "to_v") => projection,
        (false, "to_out") => "to_out.0",
        (true, "to_q") => "q_proj",
        (true, "to_k") => "k_proj",
        (true, "to_v") => "v_proj",
        (true, "to_out") => "out_proj",
        _ => return None,
    };
    Some(format!("{parent}.{child}"))
}

/// Index from kohya module names to model modules, built by flattening every enumerated module
/// path. Text-encoder modules are indexed with and without the `text_model.` level, since
/// files of either generation exist.
#[derive(Debug, Clone, Default)]
pub struct KohyaNames {
    /// Full kohya name (`lora_unet_…`) → (component, the module's path as the model spells it).
    index: HashMap<String, (Component, String)>,
}

impl KohyaNames {
    /// Indexes the modules of each component: UNet modules under their diffusers spelling and,
    /// where [`LdmUnetPaths`] gives one, their LDM spelling (SDXL kohya files); text-encoder
    /// modules with and without the `text_model.` level. Fails if two modules flatten to the same
    /// name: matching would then be ambiguous.
    pub fn new(
        unet: &[ModuleInfo],
        text_encoder: &[ModuleInfo],
        text_encoder_2: &[ModuleInfo],
    ) -> Result<Self> {
        let mut names = Self::default();
        let unet_prefix = Component::Unet.kohya_prefix();
        let ldm = LdmUnetPaths::of(unet);
        for info in unet {
            names.insert(
                kohya_name(Component::Unet, &info.path, false),
                Component::Unet,
                &info.path,
            )?;
            if let Some(ldm_path) = ldm.as_ref().and_then(|l| l.path(&info.path)) {
                names.insert(
                    format!("{unet_prefix}{}", kohya_flatten(&ldm_path)),
                    Component::Unet,
                    &info.path,
                )?;
            }
        }
        for (component, modules) in [
            (Component::TextEncoder, text_encoder),
            (Component::TextEncoder2, text_encoder_2),
        ] {
            for info in modules {
                let canonical = component.canonical_path(&info.path);
                let without_level = &canonical[TEXT_MODEL.len()..];
                for spelled in [canonical.as_str(), without_level] {
                    let name = format!("{}{}", component.kohya_prefix(), kohya_flatten(spelled));
                    names.insert(name, component, &info.path)?;
                }
            }
        }
        Ok(names)
    }

    fn insert(&mut self, name: String, component: Component, path: &str) -> Result<()> {
        if let Some((_, other)) = self.index.get(&name) {
            ensure!(
                other == path,
                "modules `{other}` and `{path}` both flatten to the kohya name `{name}`"
            );
        }
        self.index.insert(name, (component, path.to_string()));
        Ok(())
    }

    /// The module behind a full kohya name (`lora_unet_…_to_q`), as (component, model path).
    pub fn lookup(&self, name: &str) -> Option<(Component, &str)> {
        self.index.get(name).map(|(c, p)| (*c, p.as_str()))
    }
}

/// The LDM (single-file, `input_blocks`/`middle_block`/`output_blocks`) paths of a UNet's
/// modules, as SDXL kohya files name them. The numbering follows from the UNet's layers per
/// block and which up blocks have attentions, both read off the module list.
struct LdmUnetPaths {
    /// Resnets per down block (up blocks have one more).
    layers: usize,
    /// Up blocks with attentions: their upsampler is the row's third child, not its second.
    up_with_attention: Vec<usize>,
}

impl LdmUnetPaths {
    /// `None` when the list has no down-block attentions or resnets to count layers from, or
    /// when its down blocks differ in layers (LDM numbering assumes one count).
    fn of(unet: &[ModuleInfo]) -> Option<Self> {
        let index_after = |path: &str, head: &str| -> Option<usize> {
            let rest = path.split_once(head)?.1;
            rest.split('.').next()?.parse().ok()
        };
        // The highest layer index seen in each down block.
        let mut highest: BTreeMap<usize, usize> = BTreeMap::new();
        for m in unet.iter().filter(|m| m.path.starts_with("down_blocks.")) {
            let (Some(block), Some(layer)) = (
                index_after(&m.path, "down_blocks."),
                index_after(&m.path, ".attentions.").or(index_after(&m.path, ".resnets.")),
            ) else {
                continue;
            };
            let top = highest.entry(block).or_default();
            *top = (*top).max(layer);
        }
        let mut counts = highest.values();
        let first = *counts.next()?;
        if counts.any(|&c| c != first) {
            return None;
        }
        let layers = first.checked_add(1)?;
        let mut up_with_attention: Vec<usize> = unet
            .iter()
            .filter(|m| m.path.contains(".attentions."))
            .filter_map(|m| index_after(&m.path, "up_blocks."))
            .collect();
        up_with_attention.sort_unstable();
        up_with_attention.dedup();
        Some(Self {
            layers,
            up_with_attention,
        })
    }

    /// The LDM path of diffusers module path `path`, if it is in a block LDM numbers (`None`
    /// too for indices whose row would overflow).
    fn path(&self, path: &str) -> Option<String> {
        let parts: Vec<&str> = path.splitn(5, '.').collect();
        let rows = self.layers.checked_add(1)?;
        let index = |s: &str| s.parse::<usize>().ok();
        // `rows · block + offset`, the row of a block's child.
        let row = |block: usize, offset: usize| rows.checked_mul(block)?.checked_add(offset);
        let (row, child, rest) = match parts.as_slice() {
            ["down_blocks", b, kind, j, rest] => {
                let (b, j) = (index(b)?, index(j)?);
                let row_of_layer = row(b, j.checked_add(1)?);
                match *kind {
                    "resnets" => (format!("input_blocks.{}", row_of_layer?), "0", *rest),
                    "attentions" => (format!("input_blocks.{}", row_of_layer?), "1", *rest),
                    // The stride-2 conv is the row's `op`.
                    "downsamplers" if j == 0 && *rest == "conv" => {
                        return Some(format!("input_blocks.{}.0.op", row(b.checked_add(1)?, 0)?));
                    }
                    _ => return None,
                }
            }
            ["up_blocks", b, kind, j, rest] => {
                let (b, j) = (index(b)?, index(j)?);
                match *kind {
                    "resnets" => (format!("output_blocks.{}", row(b, j)?), "0", *rest),
                    "attentions" => (format!("output_blocks.{}", row(b, j)?), "1", *rest),
                    "upsamplers" if j == 0 => {
                        let child = if self.up_with_attention.binary_search(&b).is_ok() {
                            "2"
                        } else {
                            "1"
                        };
                        (
                            format!("output_blocks.{}", row(b, self.layers)?),
                            child,
                            *rest,
                        )
                    }
                    _ => return None,
                }
            }
            ["mid_block", kind, j, rest @ ..] => {
                let child = match (*kind, index(j)?) {
                    ("resnets", 0) => "0",
                    ("attentions", 0) => "1",
                    ("resnets", 1) => "2",
                    _ => return None,
                };
                let rest = rest.join(".");
                return Some(format!("middle_block.{child}.{}", ldm_child(&rest)));
            }
            _ => return None,
        };
        Some(format!("{row}.{child}.{}", ldm_child(rest)))
    }
}

/// The LDM name of a module inside a resnet, upsampler or transformer model: resnets rename
/// their layers, the others keep theirs.
fn ldm_child(rest: &str) -> &str {
    match rest {
        "conv1" => "in_layers.2",
        "conv2" => "out_layers.3",
        "time_emb_proj" => "emb_layers.1",
        "conv_shortcut" => "skip_connection",
        _ => rest,
    }
}

/// The adaptable module a weight tensor belongs to, judged from its name and shape alone: the
/// modules kohya targets by default (its "attn-mlp" preset).
/// - UNet: every Linear (2-D weight) and 1×1 conv (`[out, in, 1, 1]`) inside the transformer
///   models (`….attentions.N.…`): `proj_in`, `proj_out`, attention projections, feed-forward.
/// - Text encoder: `self_attn.{q,k,v,out}_proj` and `mlp.fc1`/`fc2` of every encoder layer.
pub fn module_from_weight(component: Component, name: &str, shape: &[usize]) -> Option<ModuleInfo> {
    let path = name.strip_suffix(".weight")?;
    let selected = match component {
        Component::Unet => path.contains(".attentions."),
        Component::TextEncoder | Component::TextEncoder2 => {
            const CHILDREN: [&str; 6] = [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.out_proj",
                "mlp.fc1",
                "mlp.fc2",
            ];
            path.contains("encoder.layers.")
                && CHILDREN.iter().any(|c| path.ends_with(&format!(".{c}")))
        }
    };
    selected.then(|| module_info(path, shape, false)).flatten()
}

/// Like [`module_from_weight`], over the wider set that kohya `conv_dim` / LyCORIS LoCon
/// adapters target, for tools that fold adapters into weights (lora-merge): besides the
/// transformer modules, the UNet's resnet `conv1`/`conv2` (3×3), `time_emb_proj` (Linear),
/// `conv_shortcut` (1×1), the down/upsampler `conv` (3×3), and (LyCORIS' `full` preset)
/// `conv_in`, `conv_out` and `time_embedding.linear_1`/`linear_2`. Larger kernels come back as
/// [`ModuleKind::Conv`] with `in_features = in · kh · kw`. The runtime UNet attaches adapters to
/// the resnet and sampler ones (`UNet2DConditionModel::resnet_modules`); the top-level ones are
/// only merged.
pub fn locon_module_from_weight(
    component: Component,
    name: &str,
    shape: &[usize],
) -> Option<ModuleInfo> {
    if let Some(info) = module_from_weight(component, name, shape) {
        return Some(info);
    }
    let path = name.strip_suffix(".weight")?;
    const RESNET_CHILDREN: [&str; 4] = ["conv1", "conv2", "time_emb_proj", "conv_shortcut"];
    // LyCORIS' default `full` preset also adapts these top-level layers.
    const TOP_LEVEL: [&str; 4] = [
        "conv_in",
        "conv_out",
        "time_embedding.linear_1",
        "time_embedding.linear_2",
    ];
    let selected = component == Component::Unet
        && ((path.contains(".resnets.")
            && RESNET_CHILDREN
                .iter()
                .any(|c| path.ends_with(&format!(".{c}"))))
            || path.ends_with(".downsamplers.0.conv")
            || path.ends_with(".upsamplers.0.conv")
            || TOP_LEVEL.contains(&path));
    selected.then(|| module_info(path, shape, true)).flatten()
}

/// The module a weight of `shape` at `path` describes: a Linear `[out, in]`, a 1×1 conv
/// `[out, in, 1, 1]`, or (where `kernels` allows them) a k×k conv, adapted on its flattened
/// kernel `[out, in·kh·kw]`. A header may declare any shape for an empty tensor, so a kernel whose
/// `in·kh·kw` overflows is no module.
fn module_info(path: &str, shape: &[usize], kernels: bool) -> Option<ModuleInfo> {
    let (kind, out_features, in_features) = match *shape {
        [out, inp] => (ModuleKind::Linear, out, inp),
        [out, inp, 1, 1] => (ModuleKind::Conv1x1, out, inp),
        [out, inp, kh, kw] if kernels => (
            ModuleKind::Conv { kh, kw },
            out,
            inp.checked_mul(kh)?.checked_mul(kw)?,
        ),
        _ => return None,
    };
    Some(ModuleInfo {
        path: path.to_string(),
        kind,
        in_features,
        out_features,
    })
}

/// The adaptable modules (see [`module_from_weight`]) of a component's diffusers-layout weight
/// files, sorted by path. Reads only the headers (the files are memory-mapped), so this works on
/// full checkpoints without building a model.
pub fn modules_from_weights(component: Component, paths: &[PathBuf]) -> Result<Vec<ModuleInfo>> {
    let files = crate::io::weights::mmap_safetensors(paths)?;
    let mut modules: Vec<ModuleInfo> = files
        .tensors()
        .iter()
        .filter_map(|(name, view)| module_from_weight(component, name, view.shape()))
        .collect();
    ensure!(
        !modules.is_empty(),
        "no adaptable {component} modules in {paths:?}"
    );
    modules.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(modules)
}

#[cfg(test)]
mod tests;
