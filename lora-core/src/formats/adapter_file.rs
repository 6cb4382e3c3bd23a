//! Adapter files: reading kohya/A1111 and diffusers/PEFT LoRA `.safetensors`, resolving them
//! against a model's modules, and writing either layout with the metadata each ecosystem reads.
//!
//! Reading is strict: keys of other algorithms (DoRA, LyCORIS) or of no known layout are errors
//! naming them, never silently dropped, and resolution reports every module that does not fit.
//!
//! Alpha semantics (`ΔW = alpha/rank · up · down`):
//! - kohya: the per-module `.alpha` scalar; missing or 0 means alpha = rank.
//! - diffusers/PEFT: alpha = rank (scale 1) unless per-module `.alpha` tensors or diffusers'
//!   `lora_adapter_metadata` header entry (`unet.lora_alpha`, `unet.alpha_pattern`, …) say
//!   otherwise.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::adapters::{Adapter, LoraModule, ModuleInfo, ModuleKind};
use crate::formats::keys::{
    kohya_name, parse_diffusers_key, parse_kohya_key, Component, KohyaNames, ParsedKey, Role,
    KOHYA_PREFIXES,
};
use crate::io::{read_safetensors, write_safetensors_atomic};
use crate::models::config::PredictionType;

/// Key layout of an adapter file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    /// kohya-ss/sd-scripts and A1111: `lora_unet_…`, `lora_down`/`lora_up`/`alpha`.
    Kohya,
    /// diffusers/PEFT: `unet.…`, `text_encoder.…`. Written as PEFT `lora_A`/`lora_B` (what
    /// `load_lora_weights` expects); read in every diffusers spelling.
    Peft,
}

impl AdapterFormat {
    pub fn name(self) -> &'static str {
        match self {
            Self::Kohya => "kohya",
            Self::Peft => "peft",
        }
    }
}

impl fmt::Display for AdapterFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AdapterFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kohya" => Ok(Self::Kohya),
            "peft" => Ok(Self::Peft),
            _ => bail!("unknown adapter format `{s}`: expected kohya or peft"),
        }
    }
}

/// Stable Diffusion generation the adapter was trained on, for kohya/modelspec metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseModelVersion {
    SdV1,
    SdV2,
}

/// The modules of the model an adapter is resolved against or written for.
#[derive(Debug, Clone, Copy)]
pub struct ModelModules<'a> {
    pub unet: &'a [ModuleInfo],
    /// `None` when the caller does not apply text-encoder adapters (UNet-only training, UNet-only
    /// tools): text-encoder modules of a file are then skipped when resolving (check
    /// [`AdapterFile::has_text_encoder`] to warn) and an error when writing. `Some` makes every
    /// text-encoder module of a file resolve or fail.
    pub text_encoder: Option<&'a [ModuleInfo]>,
}

impl<'a> ModelModules<'a> {
    /// The module at `path` (text-encoder paths compared with the `text_model.` level).
    pub fn find(&self, component: Component, path: &str) -> Option<&'a ModuleInfo> {
        let canonical = component.canonical_path(path);
        let list = match component {
            Component::Unet => self.unet,
            Component::TextEncoder => self.text_encoder.unwrap_or_default(),
        };
        list.iter()
            .find(|m| component.canonical_path(&m.path) == canonical)
    }
}

/// One LoRA module as stored in a file, before matching it to a model.
#[derive(Debug, Clone)]
pub struct RawModule {
    pub component: Component,
    /// The file's own module name: for kohya the flattened name without prefix
    /// (`down_blocks_0_…_attn2_to_q`), for diffusers/PEFT the canonical module path.
    pub name: String,
    /// Full key of the down tensor as written in the file, for messages.
    pub down_key: String,
    /// `[rank, in]`, f32 (1×1-conv tensors are stored 4-D in files and flattened here).
    pub down: Tensor,
    /// `[out, rank]`, f32.
    pub up: Tensor,
    pub alpha: f64,
    /// `(kh, kw)` of a conv adapter whose down is a larger kernel than 1×1 (kohya `conv_dim`,
    /// LyCORIS LoCon): `down` is then flattened to `[rank, in·kh·kw]`.
    pub kernel: Option<(usize, usize)>,
}

impl RawModule {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    pub fn lora(&self) -> LoraModule {
        LoraModule {
            down: self.down.clone(),
            up: self.up.clone(),
            alpha: self.alpha,
        }
    }
}

/// A LoRA adapter file read into memory.
#[derive(Debug, Clone)]
pub struct AdapterFile {
    path: PathBuf,
    format: AdapterFormat,
    metadata: BTreeMap<String, String>,
    /// Sorted by (component, name).
    modules: Vec<RawModule>,
}

impl AdapterFile {
    /// Reads a `.safetensors` adapter in either layout, its tensors converted to f32 on `device`.
    pub fn read(path: &Path, device: &Device) -> Result<Self> {
        let contents = read_safetensors(path, device)?;
        let origin = path.display().to_string();
        let format = detect_format(&origin, contents.tensors.keys())?;
        let parts = group_by_module(&origin, format, &contents.tensors)?;
        let peft_configs = match format {
            AdapterFormat::Kohya => BTreeMap::new(),
            AdapterFormat::Peft => peft_configs(&origin, &contents.metadata)?,
        };
        let modules = assemble_modules(&origin, format, parts, &peft_configs)?;
        Ok(Self {
            path: path.to_path_buf(),
            format,
            metadata: contents.metadata,
            modules,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> AdapterFormat {
        self.format
    }

    /// The `__metadata__` of the header (kohya `ss_*`, `modelspec.*`, diffusers `format`, …).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Every module as the file names it, sorted by (component, name); usable without a model.
    pub fn raw_modules(&self) -> &[RawModule] {
        &self.modules
    }

    pub fn has_text_encoder(&self) -> bool {
        self.modules
            .iter()
            .any(|m| m.component == Component::TextEncoder)
    }

    /// Maps every module of the file onto `model`'s modules and checks its shapes. Fails listing
    /// all modules that match nothing or do not fit (with the expected shapes), and when nothing
    /// at all applies. The adapter's keys are the model's module paths.
    pub fn resolve(&self, model: &ModelModules) -> Result<Adapter> {
        let (adapter, problems) = self.match_modules(model)?;
        let problems: Vec<String> = problems.into_iter().map(|p| p.text).collect();
        self.finish_resolution(adapter, &problems)
    }

    /// Like [`resolve`](Self::resolve), but modules that match no module of `model` are left out
    /// and returned as messages (for callers that warn instead, e.g. `lora-merge
    /// --allow-unmatched`). Modules that match but do not fit are still an error.
    pub fn resolve_allowing_unmatched(
        &self,
        model: &ModelModules,
    ) -> Result<(Adapter, Vec<String>)> {
        let (adapter, problems) = self.match_modules(model)?;
        let (unmatched, misfits): (Vec<Problem>, Vec<Problem>) =
            problems.into_iter().partition(|p| p.unmatched);
        let misfits: Vec<String> = misfits.into_iter().map(|p| p.text).collect();
        let adapter = self.finish_resolution(adapter, &misfits)?;
        Ok((adapter, unmatched.into_iter().map(|p| p.text).collect()))
    }

    fn finish_resolution(&self, adapter: Adapter, problems: &[String]) -> Result<Adapter> {
        if !problems.is_empty() {
            bail!(
                "{}",
                listing(
                    &format!(
                        "{}: {} adapter modules do not fit the model",
                        self.path.display(),
                        problems.len()
                    ),
                    problems
                )
            );
        }
        ensure!(
            !adapter.unet.is_empty() || !adapter.text_encoder.is_empty(),
            "{}: no module applies (the file holds only text-encoder modules and no text encoder was given)",
            self.path.display()
        );
        Ok(adapter)
    }

    /// The modules of the file that fit `model`, and a message for each that does not.
    fn match_modules(&self, model: &ModelModules) -> Result<(Adapter, Vec<Problem>)> {
        let kohya_names = match self.format {
            AdapterFormat::Kohya => {
                KohyaNames::new(model.unet, model.text_encoder.unwrap_or_default())?
            }
            AdapterFormat::Peft => KohyaNames::default(),
        };
        let mut adapter = Adapter::default();
        let mut problems = Vec::new();
        let misfit = |text: String| Problem {
            unmatched: false,
            text,
        };
        for raw in &self.modules {
            if raw.component == Component::TextEncoder && model.text_encoder.is_none() {
                continue;
            }
            let Some(info) = self.target_of(raw, model, &kohya_names) else {
                problems.push(unmatched_problem(raw, model));
                continue;
            };
            let lora = raw.lora();
            if let Some(e) = kernel_mismatch(raw, info) {
                problems.push(misfit(e));
                continue;
            }
            if let Err(e) = lora.check_fits(info) {
                problems.push(misfit(format!("`{}`: {e}", raw.down_key)));
                continue;
            }
            let target = match raw.component {
                Component::Unet => &mut adapter.unet,
                Component::TextEncoder => &mut adapter.text_encoder,
            };
            if target.insert(info.path.clone(), lora).is_some() {
                problems.push(misfit(format!(
                    "`{}`: module {} is given more than once",
                    raw.down_key, info.path
                )));
            }
        }
        Ok((adapter, problems))
    }

    /// The model module `raw` adapts: kohya names are matched against the flattened names of
    /// the model's modules, diffusers paths directly.
    fn target_of<'m>(
        &self,
        raw: &RawModule,
        model: &ModelModules<'m>,
        kohya_names: &KohyaNames,
    ) -> Option<&'m ModuleInfo> {
        match self.format {
            AdapterFormat::Kohya => kohya_names
                .lookup(&format!("{}{}", raw.component.kohya_prefix(), raw.name))
                .and_then(|(component, path)| model.find(component, path)),
            AdapterFormat::Peft => model.find(raw.component, &raw.name),
        }
    }
}

/// The problem of a module whose name matches nothing. A k×k conv adapter resolved against a
/// model that enumerates no k×k conv (the runtime UNet, which adapts only Linear and 1×1 conv
/// layers) is always an error saying where such adapters can be used.
fn unmatched_problem(raw: &RawModule, model: &ModelModules) -> Problem {
    let has_convs = model
        .unet
        .iter()
        .any(|m| matches!(m.kind, ModuleKind::Conv { .. }));
    match raw.kernel {
        Some((kh, kw)) if !has_convs => Problem {
            unmatched: false,
            text: format!(
                "`{}`: a {kh}×{kw} conv adapter (kohya conv_dim / LyCORIS LoCon); adapters are \
                 attached here only to Linear and 1×1 conv layers: fold 3×3 conv adapters into \
                 the model with lora-merge",
                raw.down_key
            ),
        },
        _ => Problem {
            unmatched: true,
            text: format!(
                "`{}`: no {} module has this name",
                raw.down_key, raw.component
            ),
        },
    }
}

/// A message when the file's kernel and the module's disagree (a 3×3 adapter on a Linear
/// layer, a 2-D adapter on a 3×3 conv).
fn kernel_mismatch(raw: &RawModule, info: &ModuleInfo) -> Option<String> {
    let expected = match info.kind {
        ModuleKind::Conv { kh, kw } => Some((kh, kw)),
        ModuleKind::Linear | ModuleKind::Conv1x1 => None,
    };
    (raw.kernel != expected).then(|| {
        let shape = |k: Option<(usize, usize)>| match k {
            Some((kh, kw)) => format!("a {kh}×{kw} conv"),
            None => "a Linear/1×1 conv".to_string(),
        };
        format!(
            "`{}`: the adapter is for {} but {} is {}",
            raw.down_key,
            shape(raw.kernel),
            info.path,
            shape(expected)
        )
    })
}

/// Why one module of a file does not resolve.
struct Problem {
    /// No module of the model has the name (as opposed to: it has, but the shapes differ).
    unmatched: bool,
    text: String,
}

/// "header:" followed by one indented line per item.
fn listing(header: &str, items: &[String]) -> String {
    let mut text = format!("{header}:");
    for item in items {
        text.push_str("\n  - ");
        text.push_str(item);
    }
    text
}

/// A few examples out of `keys`, for messages about files that may hold thousands.
fn examples<'a>(keys: impl IntoIterator<Item = &'a String>) -> String {
    const SHOWN: usize = 5;
    let keys: Vec<&String> = keys.into_iter().collect();
    let shown: Vec<String> = keys.iter().take(SHOWN).map(|k| format!("`{k}`")).collect();
    match keys.len().saturating_sub(SHOWN) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

/// kohya if every key has a kohya prefix (diffusers' own test), diffusers/PEFT if every key has
/// a component prefix; anything else is no adapter layout this toolkit reads.
fn detect_format<'a>(
    origin: &str,
    keys: impl Iterator<Item = &'a String> + Clone,
) -> Result<AdapterFormat> {
    ensure!(
        keys.clone().next().is_some(),
        "{origin}: the file holds no tensors"
    );
    let is_kohya = |k: &&String| KOHYA_PREFIXES.iter().any(|p| k.starts_with(p));
    let is_diffusers = |k: &&String| {
        Component::ALL
            .iter()
            .any(|c| k.starts_with(c.diffusers_prefix()))
    };
    if keys.clone().all(|k| is_kohya(&k)) {
        return Ok(AdapterFormat::Kohya);
    }
    if keys.clone().all(|k| is_diffusers(&k)) {
        return Ok(AdapterFormat::Peft);
    }
    let foreign: Vec<&String> = keys
        .clone()
        .filter(|k| !is_kohya(k) && !is_diffusers(k))
        .collect();
    if foreign.is_empty() {
        bail!(
            "{origin}: mixes kohya keys ({}) with diffusers keys ({})",
            examples(keys.clone().filter(is_kohya)),
            examples(keys.filter(is_diffusers))
        );
    }
    bail!(
        "{origin}: not a LoRA adapter in kohya (lora_unet_…, lora_te_…) or diffusers/PEFT (unet.…, text_encoder.…) layout; \
         unrecognised keys: {}",
        examples(foreign)
    )
}

/// The tensors of one module, each with the key it was stored under.
#[derive(Debug, Default)]
struct ModuleParts {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<(String, Tensor)>,
}

impl ModuleParts {
    fn slot(&mut self, role: Role) -> &mut Option<(String, Tensor)> {
        match role {
            Role::Down => &mut self.down,
            Role::Up => &mut self.up,
            Role::Alpha => &mut self.alpha,
        }
    }
}

/// Groups the file's tensors by module, failing on keys of unsupported algorithms (named), on
/// unknown keys (listed) and on two spellings of the same tensor.
fn group_by_module(
    origin: &str,
    format: AdapterFormat,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<(Component, String), ModuleParts>> {
    let mut parts: BTreeMap<(Component, String), ModuleParts> = BTreeMap::new();
    let mut unsupported: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    let mut unknown = Vec::new();
    let mut duplicates = Vec::new();
    for (key, tensor) in tensors {
        let parsed = match format {
            AdapterFormat::Kohya => parse_kohya_key(key),
            AdapterFormat::Peft => parse_diffusers_key(key),
        };
        match parsed {
            ParsedKey::Lora {
                component,
                module,
                role,
            } => {
                let slot = parts.entry((component, module)).or_default().slot(role);
                match slot {
                    Some((first, _)) => duplicates.push(format!("`{first}` and `{key}`")),
                    None => *slot = Some((key.clone(), tensor.clone())),
                }
            }
            ParsedKey::Unsupported { what } => unsupported.entry(what).or_default().push(key),
            ParsedKey::Unknown => unknown.push(key),
        }
    }
    if !unsupported.is_empty() {
        let items: Vec<String> = unsupported
            .iter()
            .map(|(what, keys)| format!("{what}, e.g. {}", examples(keys.iter().copied())))
            .collect();
        bail!(
            "{}",
            listing(
                &format!(
                    "{origin}: uses adapter types not supported here (only plain LoRA and \
                     LoCon are; lora-merge can fold LyCORIS LoHa/LoKr files into a model)"
                ),
                &items
            )
        );
    }
    ensure!(
        unknown.is_empty(),
        "{origin}: keys that are no LoRA tensor of the {format} layout: {}",
        examples(unknown)
    );
    ensure!(
        duplicates.is_empty(),
        "{origin}: the same tensor is stored twice: {}",
        duplicates.join(", ")
    );
    Ok(parts)
}

/// Builds the modules from their parts: shapes to 2-D f32, alpha resolved. Fails listing every
/// incomplete or malformed module.
fn assemble_modules(
    origin: &str,
    format: AdapterFormat,
    parts: BTreeMap<(Component, String), ModuleParts>,
    peft_configs: &BTreeMap<Component, PeftConfig>,
) -> Result<Vec<RawModule>> {
    let mut modules = Vec::new();
    let mut problems = Vec::new();
    for ((component, name), parts) in parts {
        let config = peft_configs.get(&component);
        match assemble_module(format, component, &name, parts, config) {
            Ok(module) => modules.push(module),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    if !problems.is_empty() {
        bail!(
            "{}",
            listing(
                &format!("{origin}: {} malformed LoRA modules", problems.len()),
                &problems
            )
        );
    }
    Ok(modules)
}

fn assemble_module(
    format: AdapterFormat,
    component: Component,
    name: &str,
    parts: ModuleParts,
    peft_config: Option<&PeftConfig>,
) -> Result<RawModule> {
    let (down_key, down, up_key, up) = match (parts.down, parts.up) {
        (Some((dk, d)), Some((uk, u))) => (dk, d, uk, u),
        (Some((dk, _)), None) => bail!("`{dk}` has no matching up tensor"),
        (None, Some((uk, _))) => bail!("`{uk}` has no matching down tensor"),
        (None, None) => {
            let alpha_key = parts.alpha.map(|(k, _)| k).unwrap_or_default();
            bail!("`{alpha_key}` is an alpha without down/up tensors")
        }
    };
    let (down, kernel) = as_matrix(&down_key, &down)?;
    let (up, up_kernel) = as_matrix(&up_key, &up)?;
    ensure!(
        up_kernel.is_none(),
        "`{up_key}`: the up tensor of a conv LoRA must be [out, r, 1, 1], got {:?}",
        up.dims()
    );
    let (rank, up_rank) = (down.dims()[0], up.dims()[1]);
    ensure!(
        rank == up_rank,
        "`{down_key}` {:?} and `{up_key}` {:?} disagree on the rank (down is [r, in], up is [out, r])",
        down.dims(),
        up.dims()
    );
    let alpha = match (parts.alpha, format, peft_config) {
        (Some((key, _)), AdapterFormat::Peft, Some(_)) => {
            bail!("`{key}`: the file has both per-module alphas and lora_adapter_metadata, which is ambiguous")
        }
        (Some((key, t)), _, _) => alpha_value(&key, &t, rank)?,
        (None, AdapterFormat::Peft, Some(config)) => config.alpha_for(name, rank, &down_key)?,
        (None, _, _) => rank as f64,
    };
    Ok(RawModule {
        component,
        name: name.to_string(),
        down_key,
        down,
        up,
        alpha,
        kernel,
    })
}

/// A stored down/up tensor as an f32 matrix: 2-D as is, 1×1-conv 4-D flattened, and a larger
/// kernel (kohya's conv_dim / LyCORIS LoCon, `[r, in, kh, kw]`) flattened to `[r, in·kh·kw]`
/// with its `(kh, kw)`.
fn as_matrix(key: &str, t: &Tensor) -> Result<(Tensor, Option<(usize, usize)>)> {
    let (matrix, kernel) = match *t.dims() {
        [_, _] => (t.clone(), None),
        [a, b, 1, 1] => (t.reshape((a, b))?, None),
        [a, b, kh, kw] => (t.reshape((a, b * kh * kw))?, Some((kh, kw))),
        _ => bail!(
            "`{key}` has shape {:?}; expected 2-D or a 1×1 conv [_, _, 1, 1]",
            t.dims()
        ),
    };
    Ok((matrix.to_dtype(DType::F32)?, kernel))
}

/// The scalar of an `.alpha` tensor (0-d or one element, any numeric dtype); 0 means "= rank",
/// as kohya defines it.
fn alpha_value(key: &str, t: &Tensor, rank: usize) -> Result<f64> {
    ensure!(
        t.elem_count() == 1,
        "`{key}` must be a scalar, got shape {:?}",
        t.dims()
    );
    let alpha = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
    ensure!(alpha.is_finite(), "`{key}` is not a finite number: {alpha}");
    Ok(if alpha == 0.0 { rank as f64 } else { alpha })
}

/// PEFT `LoraConfig` fields of one component, from diffusers' `lora_adapter_metadata`.
#[derive(Debug, Clone, PartialEq)]
struct PeftConfig {
    r: Option<usize>,
    lora_alpha: f64,
    rank_pattern: Vec<(String, usize)>,
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
}

/// PEFT's `LoraConfig` default, which applies when the metadata leaves `lora_alpha` out.
const PEFT_DEFAULT_ALPHA: f64 = 8.0;

/// Parses `lora_adapter_metadata` (a JSON object with `unet.`/`text_encoder.`-prefixed
/// `LoraConfig` fields) into one config per component that has entries.
fn peft_configs(
    origin: &str,
    metadata: &BTreeMap<String, String>,
) -> Result<BTreeMap<Component, PeftConfig>> {
    let Some(text) = metadata.get("lora_adapter_metadata") else {
        return Ok(BTreeMap::new());
    };
    let json: serde_json::Map<String, Value> = serde_json::from_str(text).with_context(|| {
        format!("{origin}: header entry lora_adapter_metadata is not a JSON object")
    })?;
    let mut configs = BTreeMap::new();
    for component in Component::ALL {
        let fields: BTreeMap<&str, &Value> = json
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(component.diffusers_prefix())?, v)))
            .collect();
        if !fields.is_empty() {
            let config = PeftConfig::from_fields(&fields)
                .with_context(|| format!("{origin}: lora_adapter_metadata for the {component}"))?;
            configs.insert(component, config);
        }
    }
    Ok(configs)
}

impl PeftConfig {
    fn from_fields(fields: &BTreeMap<&str, &Value>) -> Result<Self> {
        let flag = |name: &str| fields.get(name).and_then(|v| v.as_bool()).unwrap_or(false);
        ensure!(
            !flag("use_dora"),
            "use_dora is set: DoRA adapters are not supported here"
        );
        let r = fields.get("r").map(|v| json_usize("r", v)).transpose()?;
        let lora_alpha = fields
            .get("lora_alpha")
            .map(|v| json_f64("lora_alpha", v))
            .transpose()?;
        let pattern = |name: &str| -> Result<Vec<(String, &Value)>> {
            let Some(value) = fields.get(name) else {
                return Ok(Vec::new());
            };
            let object = value
                .as_object()
                .with_context(|| format!("{name} must be an object, got {value}"))?;
            object
                .iter()
                .map(|(p, v)| Ok((literal_pattern(name, p)?, v)))
                .collect()
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(p, v)| Ok((p, json_usize("rank_pattern", v)?)))
            .collect::<Result<_>>()?;
        let alpha_pattern = pattern("alpha_pattern")?
            .into_iter()
            .map(|(p, v)| Ok((p, json_f64("alpha_pattern", v)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            r,
            lora_alpha: lora_alpha.unwrap_or(PEFT_DEFAULT_ALPHA),
            rank_pattern,
            alpha_pattern,
            use_rslora: flag("use_rslora"),
        })
    }

    /// The alpha PEFT would use for the module at `path` with tensors of rank `rank`, expressed
    /// for `alpha/rank` scaling. Also checks that the configured rank matches the tensors.
    fn alpha_for(&self, path: &str, rank: usize, key: &str) -> Result<f64> {
        let configured_rank = first_match(&self.rank_pattern, path).or(self.r);
        if let Some(r) = configured_rank {
            ensure!(
                r == rank,
                "`{key}` has rank {rank} but lora_adapter_metadata says {r}"
            );
        }
        let alpha = first_match(&self.alpha_pattern, path).unwrap_or(self.lora_alpha);
        // rsLoRA scales by alpha/√r; the same factor under alpha/r needs alpha·√r.
        Ok(if self.use_rslora {
            alpha * (rank as f64).sqrt()
        } else {
            alpha
        })
    }
}

/// The value of the first pattern (in key order) that matches `path` the way PEFT matches
/// literal module names: `^name` exactly, `name` exactly or as a `.`-separated suffix. Text-encoder
/// paths are also tried without their `text_model.` level.
fn first_match<T: Copy>(patterns: &[(String, T)], path: &str) -> Option<T> {
    let candidates = [path, path.strip_prefix("text_model.").unwrap_or(path)];
    let matches = |pattern: &str, candidate: &str| match pattern.strip_prefix('^') {
        Some(anchored) => candidate == anchored,
        None => candidate == pattern || candidate.ends_with(&format!(".{pattern}")),
    };
    patterns
        .iter()
        .find(|(p, _)| candidates.iter().any(|c| matches(p, c)))
        .map(|(_, v)| *v)
}

/// Accepts patterns that are module names (all diffusers writes), rejecting regular expressions
/// rather than matching them wrongly.
fn literal_pattern(field: &str, pattern: &str) -> Result<String> {
    const REGEX_SYNTAX: &[char] = &['*', '+', '?', '[', ']', '(', ')', '{', '}', '|', '\\', '$'];
    ensure!(
        !pattern.contains(REGEX_SYNTAX),
        "{field} entry `{pattern}` is a regular expression; only module names are supported"
    );
    Ok(pattern.to_string())
}

fn json_usize(field: &str, v: &Value) -> Result<usize> {
    let n = v
        .as_u64()
        .with_context(|| format!("{field} must be a non-negative integer, got {v}"))?;
    Ok(usize::try_from(n)?)
}

fn json_f64(field: &str, v: &Value) -> Result<f64> {
    v.as_f64()
        .with_context(|| format!("{field} must be a number, got {v}"))
}

/// How [`save_adapter`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveOptions {
    pub format: AdapterFormat,
    pub base_model: BaseModelVersion,
    pub prediction: PredictionType,
    /// `modelspec.title` (kohya); the output file's stem when `None`.
    pub title: Option<String>,
    /// Header entries written last, over the generated ones (training adds `ss_steps`, …).
    pub extra_metadata: BTreeMap<String, String>,
}

/// One adapter module about to be written, with the model module it belongs to.
struct OutputModule<'a> {
    component: Component,
    info: &'a ModuleInfo,
    lora: &'a LoraModule,
}

/// Writes `adapter` to `path` (atomically) in `options.format`. `model` supplies each module's
/// kind (1×1 convs are stored 4-D, as kohya and PEFT do) and its shapes are checked; every module
/// of the adapter must be one of `model`'s.
pub fn save_adapter(
    path: &Path,
    adapter: &Adapter,
    model: &ModelModules,
    options: &SaveOptions,
) -> Result<()> {
    let entries =
        match_entries(adapter, model).with_context(|| format!("cannot save {}", path.display()))?;
    let (tensors, mut metadata) = match options.format {
        AdapterFormat::Kohya => (
            kohya_tensors(&entries)?,
            kohya_metadata(&entries, options, path),
        ),
        AdapterFormat::Peft => (peft_tensors(&entries)?, peft_metadata(&entries)),
    };
    metadata.extend(options.extra_metadata.clone());
    write_safetensors_atomic(path, &tensors, metadata)
}

fn match_entries<'a>(
    adapter: &'a Adapter,
    model: &'a ModelModules,
) -> Result<Vec<OutputModule<'a>>> {
    let all = [
        (Component::Unet, &adapter.unet),
        (Component::TextEncoder, &adapter.text_encoder),
    ];
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    for (component, modules) in all {
        for (path, lora) in modules {
            let Some(info) = model.find(component, path) else {
                problems.push(format!(
                    "{component} module `{path}` is not a module of the model"
                ));
                continue;
            };
            match lora.check_fits(info) {
                Ok(()) => entries.push(OutputModule {
                    component,
                    info,
                    lora,
                }),
                Err(e) => problems.push(format!("{e}")),
            }
        }
    }
    ensure!(
        problems.is_empty(),
        "{}",
        listing("the adapter does not fit the model", &problems)
    );
    ensure!(!entries.is_empty(), "the adapter is empty");
    Ok(entries)
}

/// `m` (the down matrix if `down`, else the up) as stored for `kind`: `[a, b]`, `[a, b, 1, 1]`
/// for a 1×1 conv, and for a k×k conv the down `[r, in, kh, kw]` and the up `[out, r, 1, 1]`.
fn stored_shape(m: &Tensor, kind: ModuleKind, down: bool) -> Result<Tensor> {
    let m = m.to_dtype(DType::F32)?;
    let (a, b) = m.dims2()?;
    Ok(match kind {
        ModuleKind::Linear => m,
        ModuleKind::Conv { kh, kw } if down => m.reshape((a, b / (kh * kw), kh, kw))?,
        ModuleKind::Conv1x1 | ModuleKind::Conv { .. } => m.reshape((a, b, 1, 1))?,
    })
}

fn kohya_tensors(entries: &[OutputModule]) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = Vec::with_capacity(entries.len() * 3);
    for e in entries {
        let name = kohya_name(e.component, &e.info.path);
        tensors.push((
            format!("{name}.lora_down.weight"),
            stored_shape(&e.lora.down, e.info.kind, true)?,
        ));
        tensors.push((
            format!("{name}.lora_up.weight"),
            stored_shape(&e.lora.up, e.info.kind, false)?,
        ));
        tensors.push((
            format!("{name}.alpha"),
            Tensor::new(e.lora.alpha as f32, &Device::Cpu)?,
        ));
    }
    Ok(tensors)
}

fn peft_tensors(entries: &[OutputModule]) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = Vec::with_capacity(entries.len() * 2);
    for e in entries {
        let key = format!(
            "{}{}",
            e.component.diffusers_prefix(),
            e.component.canonical_path(&e.info.path)
        );
        tensors.push((
            format!("{key}.lora_A.weight"),
            stored_shape(&e.lora.down, e.info.kind, true)?,
        ));
        tensors.push((
            format!("{key}.lora_B.weight"),
            stored_shape(&e.lora.up, e.info.kind, false)?,
        ));
    }
    Ok(tensors)
}

/// kohya's minimum `ss_*` keys plus the SAI modelspec keys, as sd-scripts writes them.
fn kohya_metadata(
    entries: &[OutputModule],
    options: &SaveOptions,
    path: &Path,
) -> BTreeMap<String, String> {
    let v2 = options.base_model == BaseModelVersion::SdV2;
    let v_pred = options.prediction == PredictionType::VPrediction;
    let base_version = match (v2, v_pred) {
        (false, false) => "sd_v1",
        (true, false) => "sd_v2",
        (false, true) => "sd_v1_v",
        (true, true) => "sd_v2_v",
    };
    let (architecture, resolution) = match (v2, v_pred) {
        (false, _) => ("stable-diffusion-v1/lora", "512x512"),
        (true, false) => ("stable-diffusion-v2-512/lora", "512x512"),
        (true, true) => ("stable-diffusion-v2-768-v/lora", "768x768"),
    };
    // kohya writes "Dynamic" when modules differ (e.g. after a dynamic resize).
    let shared = |values: Vec<String>| {
        if values.iter().all(|v| *v == values[0]) {
            values[0].clone()
        } else {
            "Dynamic".to_string()
        }
    };
    let title = options.title.clone().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let fields = [
        ("ss_network_module", "networks.lora".to_string()),
        (
            "ss_network_dim",
            shared(entries.iter().map(|e| e.lora.rank().to_string()).collect()),
        ),
        (
            "ss_network_alpha",
            shared(entries.iter().map(|e| python_float(e.lora.alpha)).collect()),
        ),
        ("ss_network_args", "{}".to_string()),
        ("ss_base_model_version", base_version.to_string()),
        ("ss_v2", if v2 { "True" } else { "False" }.to_string()),
        ("modelspec.sai_model_spec", "1.0.1".to_string()),
        ("modelspec.architecture", architecture.to_string()),
        ("modelspec.implementation", "diffusers".to_string()),
        ("modelspec.title", title),
        ("modelspec.resolution", resolution.to_string()),
        ("modelspec.date", iso8601_utc(SystemTime::now())),
        (
            "modelspec.prediction_type",
            if v_pred { "v" } else { "epsilon" }.to_string(),
        ),
    ];
    fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// `4.0`, `0.5`: how Python's `str(float)` prints the values kohya tools compare against.
fn python_float(x: f64) -> String {
    format!("{x:?}")
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC.
fn iso8601_utc(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`), to avoid a date-time dependency for one header field.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `format: pt` and diffusers' `lora_adapter_metadata`: per component the most common rank and
/// alpha as `r`/`lora_alpha`, the exceptions as `rank_pattern`/`alpha_pattern`, so
/// `load_lora_weights` restores every module's `alpha/rank` (diffusers would otherwise assume
/// alpha = rank).
fn peft_metadata(entries: &[OutputModule]) -> BTreeMap<String, String> {
    let mut config: BTreeMap<String, Value> = BTreeMap::new();
    for component in Component::ALL {
        let modules: Vec<&OutputModule> = entries
            .iter()
            .filter(|e| e.component == component)
            .collect();
        if modules.is_empty() {
            continue;
        }
        let rank = most_common(modules.iter().map(|e| e.lora.rank()));
        let alpha = most_common(modules.iter().map(|e| e.lora.alpha));
        // Module names for peft's suffix matching. Text-encoder names drop the `text_model.`
        // level: `encoder.layers.0.self_attn.q_proj` matches both CLIPTextModel layouts
        // (with the level, as in real checkpoints, and without it, as transformers >= 5 builds
        // the model), whereas the full name would match nothing in the latter.
        let path = |e: &OutputModule| {
            let full = component.canonical_path(&e.info.path);
            match component {
                Component::TextEncoder => full
                    .strip_prefix("text_model.")
                    .map_or(full.clone(), str::to_string),
                Component::Unet => full,
            }
        };
        let rank_pattern: serde_json::Map<String, Value> = modules
            .iter()
            .filter(|e| e.lora.rank() != rank)
            .map(|e| (path(e), json!(e.lora.rank())))
            .collect();
        let alpha_pattern: serde_json::Map<String, Value> = modules
            .iter()
            .filter(|e| e.lora.alpha != alpha)
            .map(|e| (path(e), json_number(e.lora.alpha)))
            .collect();
        let mut targets: Vec<String> = modules.iter().map(|e| path(e)).collect();
        targets.sort();
        let prefix = component.diffusers_prefix();
        config.insert(format!("{prefix}r"), json!(rank));
        config.insert(format!("{prefix}lora_alpha"), json_number(alpha));
        config.insert(format!("{prefix}target_modules"), json!(targets));
        config.insert(format!("{prefix}rank_pattern"), Value::Object(rank_pattern));
        config.insert(
            format!("{prefix}alpha_pattern"),
            Value::Object(alpha_pattern),
        );
    }
    // Sorted keys and two-space indent, as diffusers writes it.
    let text =
        serde_json::to_string_pretty(&config).expect("a map of JSON values always serialises");
    BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("lora_adapter_metadata".to_string(), text),
    ])
}

/// Integral values as JSON integers (as diffusers writes `lora_alpha`), others as floats.
fn json_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 2f64.powi(53) {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The value occurring most often; on a tie the one seen first.
fn most_common<T: PartialEq + Copy>(values: impl Iterator<Item = T>) -> T {
    let mut counts: Vec<(T, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(seen, _)| *seen == v) {
            Some((_, n)) => *n += 1,
            None => counts.push((v, 1)),
        }
    }
    let best = counts
        .iter()
        .map(|(_, n)| *n)
        .max()
        .expect("called with at least one value");
    counts
        .into_iter()
        .find(|(_, n)| *n == best)
        .map(|(v, _)| v)
        .expect("the maximum occurs")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;

    const BLOCK: &str = "down_blocks.0.attentions.0.transformer_blocks.0";
    const TE_ATTN: &str = "text_model.encoder.layers.0.self_attn";

    fn info(path: &str, kind: ModuleKind, in_features: usize, out_features: usize) -> ModuleInfo {
        ModuleInfo {
            path: path.to_string(),
            kind,
            in_features,
            out_features,
        }
    }

    /// A miniature SD-like module list: attention projections (one with a wider context input),
    /// a 1×1-conv `proj_in` and a GEGLU projection; two text-encoder linears.
    fn unet_modules() -> Vec<ModuleInfo> {
        vec![
            info(
                "down_blocks.0.attentions.0.proj_in",
                ModuleKind::Conv1x1,
                8,
                8,
            ),
            info(&format!("{BLOCK}.attn2.to_q"), ModuleKind::Linear, 8, 8),
            info(&format!("{BLOCK}.attn2.to_k"), ModuleKind::Linear, 6, 8),
            info(&format!("{BLOCK}.attn2.to_out.0"), ModuleKind::Linear, 8, 8),
            info(&format!("{BLOCK}.ff.net.0.proj"), ModuleKind::Linear, 8, 16),
        ]
    }

    fn te_modules() -> Vec<ModuleInfo> {
        vec![
            info(&format!("{TE_ATTN}.q_proj"), ModuleKind::Linear, 6, 6),
            info(&format!("{TE_ATTN}.out_proj"), ModuleKind::Linear, 6, 6),
            info(
                "text_model.encoder.layers.0.mlp.fc1",
                ModuleKind::Linear,
                6,
                12,
            ),
        ]
    }

    struct Model {
        unet: Vec<ModuleInfo>,
        te: Vec<ModuleInfo>,
    }

    impl Model {
        fn new() -> Self {
            Self {
                unet: unet_modules(),
                te: te_modules(),
            }
        }
        fn with_te(&self) -> ModelModules<'_> {
            ModelModules {
                unet: &self.unet,
                text_encoder: Some(&self.te),
            }
        }
        fn unet_only(&self) -> ModelModules<'_> {
            ModelModules {
                unet: &self.unet,
                text_encoder: None,
            }
        }
    }

    fn lora_for(info: &ModuleInfo, rank: usize, alpha: f64) -> Result<LoraModule> {
        let down = Tensor::randn(0f32, 1.0, (rank, info.in_features), &Device::Cpu)?;
        let up = Tensor::randn(0f32, 1.0, (info.out_features, rank), &Device::Cpu)?;
        Ok(LoraModule { down, up, alpha })
    }

    /// An adapter on every module of `model`, with rank/alpha varying per module when `mixed`.
    fn adapter_for(model: &Model, mixed: bool) -> Result<Adapter> {
        let mut adapter = Adapter::default();
        for (i, m) in model.unet.iter().enumerate() {
            let (rank, alpha) = if mixed && i == 2 { (2, 0.5) } else { (4, 8.0) };
            adapter
                .unet
                .insert(m.path.clone(), lora_for(m, rank, alpha)?);
        }
        for (i, m) in model.te.iter().enumerate() {
            let (rank, alpha) = if mixed && i == 0 { (3, 1.0) } else { (4, 4.0) };
            adapter
                .text_encoder
                .insert(m.path.clone(), lora_for(m, rank, alpha)?);
        }
        Ok(adapter)
    }

    fn options(format: AdapterFormat) -> SaveOptions {
        SaveOptions {
            format,
            base_model: BaseModelVersion::SdV1,
            prediction: PredictionType::Epsilon,
            title: None,
            extra_metadata: BTreeMap::from([("ss_steps".to_string(), "100".to_string())]),
        }
    }

    fn values(t: &Tensor) -> Result<Vec<Vec<f32>>> {
        Ok(t.to_vec2::<f32>()?)
    }

    /// Same modules, bit-identical tensors, same alpha.
    fn assert_same(a: &Adapter, b: &Adapter) -> Result<()> {
        for (x, y) in [(&a.unet, &b.unet), (&a.text_encoder, &b.text_encoder)] {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
            for (path, m) in x {
                let n = &y[path];
                assert_eq!(values(&m.down)?, values(&n.down)?, "{path} down");
                assert_eq!(values(&m.up)?, values(&n.up)?, "{path} up");
                assert_eq!(m.alpha, n.alpha, "{path} alpha");
            }
        }
        Ok(())
    }

    fn write_raw(
        path: &Path,
        tensors: Vec<(String, Tensor)>,
        metadata: BTreeMap<String, String>,
    ) -> Result<()> {
        write_safetensors_atomic(path, &tensors, metadata)
    }

    fn matrix(rows: usize, cols: usize) -> Result<Tensor> {
        Ok(Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?.reshape((rows, cols))?)
    }

    fn read_err(path: &Path) -> String {
        format!("{:#}", AdapterFile::read(path, &Device::Cpu).unwrap_err())
    }

    #[test]
    fn kohya_round_trip_is_exact_and_keeps_conv_4d() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.safetensors");
        let model = Model::new();
        let adapter = adapter_for(&model, true)?;
        save_adapter(
            &path,
            &adapter,
            &model.with_te(),
            &options(AdapterFormat::Kohya),
        )?;

        let raw = read_safetensors(&path, &Device::Cpu)?;
        let proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in";
        assert_eq!(
            raw.tensors[&format!("{proj_in}.lora_down.weight")].dims(),
            [4, 8, 1, 1]
        );
        assert_eq!(
            raw.tensors[&format!("{proj_in}.lora_up.weight")].dims(),
            [8, 4, 1, 1]
        );
        let alpha = &raw.tensors[&format!("{proj_in}.alpha")];
        assert_eq!((alpha.dims(), alpha.dtype()), (&[][..], DType::F32));
        assert!(raw
            .tensors
            .contains_key("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"));

        let file = AdapterFile::read(&path, &Device::Cpu)?;
        assert_eq!(file.format(), AdapterFormat::Kohya);
        assert_same(&file.resolve(&model.with_te())?, &adapter)
    }

    #[test]
    fn kohya_metadata_describes_the_network_and_base_model() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let model = Model::new();
        let uniform = dir.path().join("uniform.safetensors");
        let mut opts = options(AdapterFormat::Kohya);
        opts.base_model = BaseModelVersion::SdV2;
        opts.prediction = PredictionType::VPrediction;
        let mut adapter = adapter_for(&model, false)?;
        adapter.text_encoder.clear();
        save_adapter(&uniform, &adapter, &model.unet_only(), &opts)?;
        let meta = AdapterFile::read(&uniform, &Device::Cpu)?
            .metadata()
            .clone();
        let expected = [
            ("ss_network_module", "networks.lora"),
            ("ss_network_dim", "4"),
            ("ss_network_alpha", "8.0"),
            ("ss_network_args", "{}"),
            ("ss_base_model_version", "sd_v2_v"),
            ("ss_v2", "True"),
            ("ss_steps", "100"),
            ("modelspec.sai_model_spec", "1.0.1"),
            ("modelspec.architecture", "stable-diffusion-v2-768-v/lora"),
            ("modelspec.implementation", "diffusers"),
            ("modelspec.title", "uniform"),
            ("modelspec.resolution", "768x768"),
            ("modelspec.prediction_type", "v"),
        ];
        for (key, value) in expected {
            assert_eq!(meta.get(key).map(String::as_str), Some(value), "{key}");
        }
        assert_eq!(meta["modelspec.date"].len(), "2024-01-01T00:00:00".len());

        let dynamic = dir.path().join("dynamic.safetensors");
        let mut titled = options(AdapterFormat::Kohya);
        titled.title = Some("my lora".into());
        save_adapter(
            &dynamic,
            &adapter_for(&model, true)?,
            &model.with_te(),
            &titled,
        )?;
        let meta = AdapterFile::read(&dynamic, &Device::Cpu)?
            .metadata()
            .clone();
        assert_eq!(
            (
                meta["ss_network_dim"].as_str(),
                meta["ss_network_alpha"].as_str()
            ),
            ("Dynamic", "Dynamic")
        );
        assert_eq!(
            (
                meta["ss_base_model_version"].as_str(),
                meta["ss_v2"].as_str()
            ),
            ("sd_v1", "False")
        );
        assert_eq!(meta["modelspec.architecture"], "stable-diffusion-v1/lora");
        assert_eq!(meta["modelspec.title"], "my lora");
        Ok(())
    }

    #[test]
    fn peft_round_trip_keeps_mixed_ranks_and_alphas() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("pytorch_lora_weights.safetensors");
        let model = Model::new();
        let adapter = adapter_for(&model, true)?;
        save_adapter(
            &path,
            &adapter,
            &model.with_te(),
            &options(AdapterFormat::Peft),
        )?;

        let raw = read_safetensors(&path, &Device::Cpu)?;
        assert_eq!(
            raw.tensors["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"].dims(),
            [4, 8, 1, 1]
        );
        assert!(raw
            .tensors
            .contains_key(&format!("text_encoder.{TE_ATTN}.q_proj.lora_B.weight")));
        assert!(raw.tensors.keys().all(|k| !k.ends_with(".alpha")));
        assert_eq!(raw.metadata["format"], "pt");
        let config: Value = serde_json::from_str(&raw.metadata["lora_adapter_metadata"])?;
        assert_eq!(config["unet.r"], json!(4));
        assert_eq!(config["unet.lora_alpha"], json!(8));
        assert_eq!(
            config["unet.rank_pattern"],
            json!({ format!("{BLOCK}.attn2.to_k"): 2 })
        );
        assert_eq!(
            config["unet.alpha_pattern"],
            json!({ format!("{BLOCK}.attn2.to_k"): 0.5 })
        );
        // Text-encoder names are written without the `text_model.` level (see peft_metadata).
        let te_q = format!("{TE_ATTN}.q_proj");
        assert_eq!(
            config["text_encoder.alpha_pattern"],
            json!({ te_q.strip_prefix("text_model.").unwrap(): 1 })
        );
        assert_eq!(
            config["unet.target_modules"].as_array().map(Vec::len),
            Some(5)
        );

        let file = AdapterFile::read(&path, &Device::Cpu)?;
        assert_eq!(file.format(), AdapterFormat::Peft);
        assert_same(&file.resolve(&model.with_te())?, &adapter)
    }

    #[test]
    fn kohya_to_peft_to_kohya_is_lossless() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let model = Model::new();
        let adapter = adapter_for(&model, true)?;
        let mut current = adapter.clone();
        for (i, format) in [
            AdapterFormat::Kohya,
            AdapterFormat::Peft,
            AdapterFormat::Kohya,
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("{i}.safetensors"));
            save_adapter(&path, &current, &model.with_te(), &options(format))?;
            current = AdapterFile::read(&path, &Device::Cpu)?.resolve(&model.with_te())?;
        }
        assert_same(&current, &adapter)
    }

    #[test]
    fn kohya_alpha_defaults_to_rank_and_any_float_dtype_loads() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("old.safetensors");
        let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q";
        let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";
        let proj = "lora_unet_down_blocks_0_attentions_0_proj_in";
        let tensors = vec![
            // No alpha at all (old files), f16 tensors.
            (
                format!("{q}.lora_down.weight"),
                matrix(2, 8)?.to_dtype(DType::F16)?,
            ),
            (
                format!("{q}.lora_up.weight"),
                matrix(8, 2)?.to_dtype(DType::F16)?,
            ),
            // Alpha 0 also means rank; bf16, one-element alpha.
            (
                format!("{k}.lora_down.weight"),
                matrix(3, 6)?.to_dtype(DType::BF16)?,
            ),
            (
                format!("{k}.lora_up.weight"),
                matrix(8, 3)?.to_dtype(DType::BF16)?,
            ),
            (
                format!("{k}.alpha"),
                Tensor::new(&[0f32], &Device::Cpu)?.to_dtype(DType::BF16)?,
            ),
            // 4-D 1×1 conv with a 0-d f16 alpha.
            (
                format!("{proj}.lora_down.weight"),
                matrix(2, 8)?.reshape((2, 8, 1, 1))?,
            ),
            (
                format!("{proj}.lora_up.weight"),
                matrix(8, 2)?.reshape((8, 2, 1, 1))?,
            ),
            (
                format!("{proj}.alpha"),
                Tensor::new(1.5f32, &Device::Cpu)?.to_dtype(DType::F16)?,
            ),
        ];
        write_raw(&path, tensors, BTreeMap::new())?;
        let model = Model::new();
        let adapter = AdapterFile::read(&path, &Device::Cpu)?.resolve(&model.unet_only())?;
        let to_q = &adapter.unet[&format!("{BLOCK}.attn2.to_q")];
        assert_eq!((to_q.alpha, to_q.down.dtype()), (2.0, DType::F32));
        assert_eq!(values(&to_q.down)?, values(&matrix(2, 8)?)?);
        assert_eq!(adapter.unet[&format!("{BLOCK}.attn2.to_k")].alpha, 3.0);
        let proj_in = &adapter.unet["down_blocks.0.attentions.0.proj_in"];
        assert_eq!((proj_in.alpha, proj_in.up.dims()), (1.5, &[8, 2][..]));
        Ok(())
    }

    #[test]
    fn peft_alpha_is_rank_unless_alpha_keys_say_otherwise() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let q = format!("unet.{BLOCK}.attn2.to_q");
        let k = format!("unet.{BLOCK}.attn2.to_k");
        let path = dir.path().join("p.safetensors");
        let tensors = vec![
            (format!("{q}.lora_A.weight"), matrix(2, 8)?),
            (format!("{q}.lora_B.weight"), matrix(8, 2)?),
            (format!("{k}.lora_A.weight"), matrix(2, 6)?),
            (format!("{k}.lora_B.weight"), matrix(8, 2)?),
            (format!("{k}.alpha"), Tensor::new(1f32, &Device::Cpu)?),
        ];
        write_raw(&path, tensors, BTreeMap::new())?;
        let adapter = AdapterFile::read(&path, &Device::Cpu)?.resolve(&Model::new().unet_only())?;
        assert_eq!(adapter.unet[&format!("{BLOCK}.attn2.to_q")].alpha, 2.0);
        assert_eq!(adapter.unet[&format!("{BLOCK}.attn2.to_k")].alpha, 1.0);
        Ok(())
    }

    /// A rank-2 PEFT file on to_q/to_k/to_out.0 with the given `lora_adapter_metadata`.
    fn peft_file_with_config(dir: &Path, config: Value) -> Result<PathBuf> {
        let path = dir.join("meta.safetensors");
        let mut tensors = Vec::new();
        for (module, fan_in) in [("to_q", 8), ("to_k", 6), ("to_out.0", 8)] {
            tensors.push((
                format!("unet.{BLOCK}.attn2.{module}.lora_A.weight"),
                matrix(2, fan_in)?,
            ));
            tensors.push((
                format!("unet.{BLOCK}.attn2.{module}.lora_B.weight"),
                matrix(8, 2)?,
            ));
        }
        let metadata = BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            ("lora_adapter_metadata".to_string(), config.to_string()),
        ]);
        write_raw(&path, tensors, metadata)?;
        Ok(path)
    }

    #[test]
    fn lora_adapter_metadata_alpha_and_patterns_are_honoured() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let config = json!({
            "unet.r": 2,
            "unet.lora_alpha": 16,
            "unet.alpha_pattern": { "to_k": 4.0, format!("^{BLOCK}.attn2.to_out.0"): 0.5 },
            "unet.rank_pattern": {},
            "unet.target_modules": ["to_q", "to_k", "to_out.0"],
        });
        let path = peft_file_with_config(dir.path(), config)?;
        let adapter = AdapterFile::read(&path, &Device::Cpu)?.resolve(&Model::new().unet_only())?;
        let alpha = |m: &str| adapter.unet[&format!("{BLOCK}.attn2.{m}")].alpha;
        assert_eq!(
            (alpha("to_q"), alpha("to_k"), alpha("to_out.0")),
            (16.0, 4.0, 0.5)
        );
        Ok(())
    }

    #[test]
    fn rslora_metadata_becomes_an_equivalent_alpha() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = peft_file_with_config(
            dir.path(),
            json!({ "unet.lora_alpha": 4, "unet.use_rslora": true }),
        )?;
        let file = AdapterFile::read(&path, &Device::Cpu)?;
        // alpha/√r with r = 2 is 4/√2, i.e. alpha 4·√2 under alpha/r.
        assert!(file
            .raw_modules()
            .iter()
            .all(|m| (m.alpha - 4.0 * 2f64.sqrt()).abs() < 1e-12));
        Ok(())
    }

    #[test]
    fn inconsistent_or_unsupported_metadata_is_rejected() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let cases = [
            (
                json!({ "unet.r": 4, "unet.lora_alpha": 4 }),
                "has rank 2 but lora_adapter_metadata says 4",
            ),
            (
                json!({ "unet.r": 2, "unet.rank_pattern": { "to_k": 8 } }),
                "has rank 2 but lora_adapter_metadata says 8",
            ),
            (json!({ "unet.use_dora": true }), "DoRA"),
            (
                json!({ "unet.alpha_pattern": { ".*to_k": 1 } }),
                "regular expression",
            ),
        ];
        for (config, expected) in cases {
            let path = peft_file_with_config(dir.path(), config.clone())?;
            let msg = read_err(&path);
            assert!(
                msg.contains(expected) && msg.contains("meta.safetensors"),
                "{config}: {msg}"
            );
        }
        Ok(())
    }

    #[test]
    fn old_diffusers_spellings_resolve_to_the_same_modules() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("old.safetensors");
        let attn2 = format!("unet.{BLOCK}.attn2");
        let tensors = vec![
            (
                format!("{attn2}.processor.to_q_lora.down.weight"),
                matrix(2, 8)?,
            ),
            (
                format!("{attn2}.processor.to_q_lora.up.weight"),
                matrix(8, 2)?,
            ),
            (
                format!("{attn2}.processor.to_out_lora.down.weight"),
                matrix(2, 8)?,
            ),
            (
                format!("{attn2}.processor.to_out_lora.up.weight"),
                matrix(8, 2)?,
            ),
            (format!("{attn2}.to_k.lora.down.weight"), matrix(2, 6)?),
            (format!("{attn2}.to_k.lora.up.weight"), matrix(8, 2)?),
            (
                format!("text_encoder.{TE_ATTN}.to_q_lora.down.weight"),
                matrix(2, 6)?,
            ),
            (
                format!("text_encoder.{TE_ATTN}.to_q_lora.up.weight"),
                matrix(6, 2)?,
            ),
            (
                format!("text_encoder.{TE_ATTN}.out_proj.lora_linear_layer.down.weight"),
                matrix(2, 6)?,
            ),
            (
                format!("text_encoder.{TE_ATTN}.out_proj.lora_linear_layer.up.weight"),
                matrix(6, 2)?,
            ),
            // transformers ≥ 5 layout: no `text_model` level.
            (
                "text_encoder.encoder.layers.0.mlp.fc1.lora_A.weight".to_string(),
                matrix(2, 6)?,
            ),
            (
                "text_encoder.encoder.layers.0.mlp.fc1.lora_B.weight".to_string(),
                matrix(12, 2)?,
            ),
        ];
        write_raw(&path, tensors, BTreeMap::new())?;
        let adapter = AdapterFile::read(&path, &Device::Cpu)?.resolve(&Model::new().with_te())?;
        let unet: Vec<&String> = adapter.unet.keys().collect();
        let expected_unet =
            ["attn2.to_k", "attn2.to_out.0", "attn2.to_q"].map(|m| format!("{BLOCK}.{m}"));
        assert_eq!(unet, expected_unet.iter().collect::<Vec<_>>());
        let te: Vec<&String> = adapter.text_encoder.keys().collect();
        let expected_te = [
            "text_model.encoder.layers.0.mlp.fc1".into(),
            format!("{TE_ATTN}.out_proj"),
            format!("{TE_ATTN}.q_proj"),
        ];
        assert_eq!(te, expected_te.iter().collect::<Vec<_>>());
        Ok(())
    }

    #[test]
    fn models_without_the_text_model_level_still_resolve() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.safetensors");
        let model = Model::new();
        let adapter = adapter_for(&model, false)?;
        save_adapter(
            &path,
            &adapter,
            &model.with_te(),
            &options(AdapterFormat::Kohya),
        )?;
        let te5: Vec<ModuleInfo> = model
            .te
            .iter()
            .map(|m| ModuleInfo {
                path: m.path.trim_start_matches("text_model.").to_string(),
                ..m.clone()
            })
            .collect();
        let resolved = AdapterFile::read(&path, &Device::Cpu)?.resolve(&ModelModules {
            unet: &model.unet,
            text_encoder: Some(&te5),
        })?;
        assert!(resolved
            .text_encoder
            .contains_key("encoder.layers.0.mlp.fc1"));
        Ok(())
    }

    #[test]
    fn text_encoder_modules_are_skipped_only_when_no_text_encoder_is_given() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.safetensors");
        let model = Model::new();
        save_adapter(
            &path,
            &adapter_for(&model, false)?,
            &model.with_te(),
            &options(AdapterFormat::Peft),
        )?;
        let file = AdapterFile::read(&path, &Device::Cpu)?;
        assert!(file.has_text_encoder());
        let unet_only = file.resolve(&model.unet_only())?;
        assert_eq!((unet_only.unet.len(), unet_only.text_encoder.len()), (5, 0));

        let fewer_te = &model.te[..1];
        let err = file
            .resolve(&ModelModules {
                unet: &model.unet,
                text_encoder: Some(fewer_te),
            })
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("2 adapter modules do not fit"), "{msg}");
        assert!(
            msg.contains(&format!("text_encoder.{TE_ATTN}.out_proj.lora_A.weight")),
            "{msg}"
        );

        let mut te_only = adapter_for(&model, false)?;
        te_only.unet.clear();
        save_adapter(
            &path,
            &te_only,
            &model.with_te(),
            &options(AdapterFormat::Kohya),
        )?;
        let err = AdapterFile::read(&path, &Device::Cpu)?
            .resolve(&model.unet_only())
            .unwrap_err();
        assert!(err.to_string().contains("no module applies"), "{err}");
        Ok(())
    }

    #[test]
    fn resolution_lists_every_unknown_module_and_wrong_shape() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("bad.safetensors");
        let prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2";
        let tensors = vec![
            // Fits.
            (format!("{prefix}_to_q.lora_down.weight"), matrix(2, 8)?),
            (format!("{prefix}_to_q.lora_up.weight"), matrix(8, 2)?),
            // to_k takes 6 inputs, not 8.
            (format!("{prefix}_to_k.lora_down.weight"), matrix(2, 8)?),
            (format!("{prefix}_to_k.lora_up.weight"), matrix(8, 2)?),
            // No such modules in the model.
            (format!("{prefix}_to_v.lora_down.weight"), matrix(2, 8)?),
            (format!("{prefix}_to_v.lora_up.weight"), matrix(8, 2)?),
            (
                "lora_unet_up_blocks_1_attentions_0_proj_out.lora_down.weight".into(),
                matrix(2, 8)?,
            ),
            (
                "lora_unet_up_blocks_1_attentions_0_proj_out.lora_up.weight".into(),
                matrix(8, 2)?,
            ),
        ];
        write_raw(&path, tensors, BTreeMap::new())?;
        let err = AdapterFile::read(&path, &Device::Cpu)?
            .resolve(&Model::new().unet_only())
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("bad.safetensors: 3 adapter modules do not fit"),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("`{prefix}_to_v.lora_down.weight`: no UNet module")),
            "{msg}"
        );
        assert!(
            msg.contains(
                "`lora_unet_up_blocks_1_attentions_0_proj_out.lora_down.weight`: no UNet module"
            ),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("`{prefix}_to_k.lora_down.weight`")),
            "{msg}"
        );
        assert!(msg.contains("expected down [r, 6], up [8, r]"), "{msg}");
        assert!(!msg.contains("_to_q"), "{msg}");
        Ok(())
    }

    #[test]
    fn saving_checks_the_adapter_against_the_model() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.safetensors");
        let model = Model::new();
        let mut adapter = adapter_for(&model, false)?;
        adapter.unet.insert(
            "mid_block.attentions.0.proj_out".into(),
            lora_for(&model.unet[1], 2, 2.0)?,
        );
        let err = save_adapter(
            &path,
            &adapter,
            &model.with_te(),
            &options(AdapterFormat::Kohya),
        )
        .unwrap_err();
        assert!(
            format!("{err:#}")
                .contains("`mid_block.attentions.0.proj_out` is not a module of the model"),
            "{err:#}"
        );
        assert!(!path.exists());

        let with_te = adapter_for(&model, false)?;
        let err = save_adapter(
            &path,
            &with_te,
            &model.unet_only(),
            &options(AdapterFormat::Peft),
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!(
                "text encoder module `{TE_ATTN}.q_proj` is not a module"
            )),
            "{msg}"
        );
        Ok(())
    }

    #[test]
    fn corrupt_and_foreign_files_are_rejected_naming_the_file() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let model = Model::new();
        let good = dir.path().join("good.safetensors");
        save_adapter(
            &good,
            &adapter_for(&model, false)?,
            &model.with_te(),
            &options(AdapterFormat::Kohya),
        )?;
        let bytes = std::fs::read(&good)?;
        let truncated = dir.path().join("truncated.safetensors");
        std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
        let pickle = dir.path().join("pickle.safetensors");
        std::fs::write(&pickle, b"\x80\x02}q\x00(X\x05\x00\x00\x00torch")?;
        for path in [truncated, pickle] {
            let msg = read_err(&path);
            assert!(
                msg.contains(&path.display().to_string())
                    && msg.contains("not a valid safetensors"),
                "{msg}"
            );
        }
        Ok(())
    }

    #[test]
    fn files_of_no_adapter_layout_list_offending_keys() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("model.safetensors");
        let tensors = (0..8)
            .map(|i| Ok((format!("model.diffusion_model.w{i}"), matrix(2, 2)?)))
            .collect::<Result<_>>()?;
        write_raw(&path, tensors, BTreeMap::new())?;
        let msg = read_err(&path);
        assert!(
            msg.contains("not a LoRA adapter") && msg.contains("`model.diffusion_model.w0`"),
            "{msg}"
        );
        assert!(msg.contains("and 3 more"), "{msg}");

        let mixed = dir.path().join("mixed.safetensors");
        let q = format!("{BLOCK}.attn2.to_q");
        let tensors = vec![
            (format!("unet.{q}.lora_A.weight"), matrix(2, 8)?),
            ("lora_unet_x.lora_down.weight".to_string(), matrix(2, 8)?),
        ];
        write_raw(&mixed, tensors, BTreeMap::new())?;
        assert!(read_err(&mixed).contains("mixes kohya keys"));

        let unknown = dir.path().join("unknown.safetensors");
        let tensors = vec![
            (format!("unet.{q}.lora_A.weight"), matrix(2, 8)?),
            (format!("unet.{q}.lora_B.weight"), matrix(8, 2)?),
            ("unet.conv_in.weight".to_string(), matrix(2, 2)?),
        ];
        write_raw(&unknown, tensors, BTreeMap::new())?;
        let msg = read_err(&unknown);
        assert!(
            msg.contains("no LoRA tensor of the peft layout: `unet.conv_in.weight`"),
            "{msg}"
        );
        Ok(())
    }

    #[test]
    fn lycoris_and_dora_files_are_rejected_by_name() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q";
        let cases = [
            (
                vec![
                    format!("{name}.hada_w1_a"),
                    format!("{name}.hada_w1_b"),
                    format!("{name}.alpha"),
                ],
                "LoHa",
            ),
            (
                vec![format!("{name}.lokr_w1"), format!("{name}.lokr_w2")],
                "LoKr",
            ),
            (
                vec![
                    format!("{name}.lora_down.weight"),
                    format!("{name}.lora_up.weight"),
                    format!("{name}.lora_mid.weight"),
                ],
                "lora_mid",
            ),
            (
                vec![
                    format!("{name}.lora_down.weight"),
                    format!("{name}.lora_up.weight"),
                    format!("{name}.dora_scale"),
                ],
                "DoRA",
            ),
            (
                vec![
                    format!("unet.{BLOCK}.attn2.to_q.lora_A.weight"),
                    format!("unet.{BLOCK}.attn2.to_q.lora_magnitude_vector"),
                ],
                "DoRA",
            ),
        ];
        for (keys, algorithm) in cases {
            let path = dir.path().join("lycoris.safetensors");
            let tensors = keys
                .iter()
                .map(|k| Ok((k.clone(), matrix(2, 2)?)))
                .collect::<Result<_>>()?;
            write_raw(&path, tensors, BTreeMap::new())?;
            let msg = read_err(&path);
            assert!(
                msg.contains("not supported here") && msg.contains(algorithm),
                "{algorithm}: {msg}"
            );
        }
        Ok(())
    }

    #[test]
    fn malformed_modules_are_all_listed() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("m.safetensors");
        let tensors = vec![
            ("lora_unet_a.lora_down.weight".to_string(), matrix(2, 8)?),
            ("lora_unet_b.lora_up.weight".to_string(), matrix(8, 2)?),
            (
                "lora_unet_c.alpha".to_string(),
                Tensor::new(1f32, &Device::Cpu)?,
            ),
            ("lora_unet_d.lora_down.weight".to_string(), matrix(2, 8)?),
            ("lora_unet_d.lora_up.weight".to_string(), matrix(8, 3)?),
            (
                "lora_unet_e.lora_down.weight".to_string(),
                matrix(2, 72)?.reshape((2, 8, 3, 3))?,
            ),
            (
                "lora_unet_e.lora_up.weight".to_string(),
                matrix(8, 18)?.reshape((8, 2, 3, 3))?,
            ),
            ("lora_unet_f.lora_down.weight".to_string(), matrix(2, 8)?),
            ("lora_unet_f.lora_up.weight".to_string(), matrix(8, 2)?),
            ("lora_unet_f.alpha".to_string(), matrix(1, 2)?),
        ];
        write_raw(&path, tensors, BTreeMap::new())?;
        let msg = read_err(&path);
        for expected in [
            "m.safetensors: 6 malformed LoRA modules",
            "`lora_unet_a.lora_down.weight` has no matching up tensor",
            "`lora_unet_b.lora_up.weight` has no matching down tensor",
            "`lora_unet_c.alpha` is an alpha without down/up tensors",
            "disagree on the rank",
            "`lora_unet_e.lora_up.weight`: the up tensor of a conv LoRA must be [out, r, 1, 1]",
            "`lora_unet_f.alpha` must be a scalar, got shape [1, 2]",
        ] {
            assert!(msg.contains(expected), "missing `{expected}` in: {msg}");
        }
        Ok(())
    }

    #[test]
    fn conv_3x3_adapters_resolve_only_against_conv_modules() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("locon.safetensors");
        let conv = "down_blocks.0.resnets.0.conv1";
        let tensors = vec![
            (
                "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight".to_string(),
                matrix(2, 72)?.reshape((2, 8, 3, 3))?,
            ),
            (
                "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight".to_string(),
                matrix(4, 2)?.reshape((4, 2, 1, 1))?,
            ),
            (
                "lora_unet_down_blocks_0_resnets_0_conv1.alpha".to_string(),
                Tensor::new(1f32, &Device::Cpu)?,
            ),
        ];
        write_raw(&path, tensors, BTreeMap::new())?;
        let file = AdapterFile::read(&path, &Device::Cpu)?;
        assert_eq!(file.raw_modules()[0].kernel, Some((3, 3)));
        assert_eq!(file.raw_modules()[0].down.dims(), [2, 72]);
        // The runtime UNet enumerates no 3×3 conv: a clear error, even when unmatched modules
        // would only be warned about.
        let unet = unet_modules();
        let runtime = ModelModules {
            unet: &unet,
            text_encoder: None,
        };
        for msg in [
            format!("{:#}", file.resolve(&runtime).unwrap_err()),
            format!(
                "{:#}",
                file.resolve_allowing_unmatched(&runtime).unwrap_err()
            ),
        ] {
            assert!(
                msg.contains("3×3 conv adapter") && msg.contains("lora-merge"),
                "{msg}"
            );
        }
        // A model that enumerates the conv (lora-merge) resolves it; ΔW is [out, in·3·3].
        let mut wide = unet_modules();
        wide.push(ModuleInfo {
            path: conv.to_string(),
            kind: ModuleKind::Conv { kh: 3, kw: 3 },
            in_features: 72,
            out_features: 4,
        });
        let model = ModelModules {
            unet: &wide,
            text_encoder: None,
        };
        let adapter = file.resolve(&model)?;
        assert_eq!(adapter.unet[conv].delta_weight()?.dims(), [4, 72]);
        // Saved again, the kernel shapes come back.
        let out = dir.path().join("again.safetensors");
        save_adapter(&out, &adapter, &model, &options(AdapterFormat::Kohya))?;
        let stored = read_safetensors(&out, &Device::Cpu)?.tensors;
        assert_eq!(
            stored["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].dims(),
            [2, 8, 3, 3]
        );
        assert_eq!(
            stored["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].dims(),
            [4, 2, 1, 1]
        );
        // A 3×3 adapter on a module the model has as Linear is a misfit naming both.
        let mut linear = unet_modules();
        linear.push(info(conv, ModuleKind::Linear, 72, 4));
        let model = ModelModules {
            unet: &linear,
            text_encoder: None,
        };
        let msg = format!("{:#}", file.resolve(&model).unwrap_err());
        assert!(msg.contains("is for a 3×3 conv"), "{msg}");
        Ok(())
    }

    #[test]
    fn raw_modules_need_no_model() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.safetensors");
        let model = Model::new();
        let adapter = adapter_for(&model, true)?;
        save_adapter(
            &path,
            &adapter,
            &model.with_te(),
            &options(AdapterFormat::Kohya),
        )?;
        let file = AdapterFile::read(&path, &Device::Cpu)?;
        let raw = file.raw_modules();
        assert_eq!(raw.len(), 8);
        let to_k = raw
            .iter()
            .find(|m| m.name == "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k")
            .unwrap();
        assert_eq!(
            (to_k.component, to_k.rank(), to_k.alpha),
            (Component::Unet, 2, 0.5)
        );
        assert_eq!(
            values(&to_k.down)?,
            values(&adapter.unet[&format!("{BLOCK}.attn2.to_k")].down)?
        );
        assert_eq!(to_k.up.i((.., 0))?.dims(), [8]);
        Ok(())
    }

    /// The diffusers-made fixtures (tests/fixtures, see tests/reference/make_fixtures.py) resolve
    /// against modules enumerated from the fixture model's own weight files, and the kohya one
    /// is rewritten key for key, shape for shape.
    #[test]
    fn reference_fixtures_resolve_against_the_fixture_model() -> Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd1-tiny");
        let unet = crate::formats::keys::modules_from_weights(
            Component::Unet,
            &[dir.join("unet/diffusion_pytorch_model.safetensors")],
        )?;
        let te = crate::formats::keys::modules_from_weights(
            Component::TextEncoder,
            &[dir.join("text_encoder/model.safetensors")],
        )?;
        let model = ModelModules {
            unet: &unet,
            text_encoder: Some(&te),
        };
        assert_eq!((unet.len(), te.len()), (84, 12));

        let kohya_path = dir.join("adapter_kohya.safetensors");
        let kohya = AdapterFile::read(&kohya_path, &Device::Cpu)?;
        assert_eq!(kohya.format(), AdapterFormat::Kohya);
        let adapter = kohya.resolve(&model)?;
        assert_eq!((adapter.unet.len(), adapter.text_encoder.len()), (84, 12));
        assert!(adapter
            .unet
            .values()
            .all(|m| m.alpha == 2.0 && m.rank() == 4));
        assert!(adapter.text_encoder.values().all(|m| m.alpha == 4.0));

        let out_dir = tempfile::tempdir()?;
        let rewritten = out_dir.path().join("kohya.safetensors");
        save_adapter(&rewritten, &adapter, &model, &options(AdapterFormat::Kohya))?;
        let (ours, theirs) = (
            read_safetensors(&rewritten, &Device::Cpu)?,
            read_safetensors(&kohya_path, &Device::Cpu)?,
        );
        assert_eq!(
            ours.tensors.keys().collect::<Vec<_>>(),
            theirs.tensors.keys().collect::<Vec<_>>()
        );
        for (key, t) in &theirs.tensors {
            let mine = &ours.tensors[key];
            assert_eq!((mine.dims(), mine.dtype()), (t.dims(), t.dtype()), "{key}");
            let flat = |x: &Tensor| x.flatten_all().and_then(|x| x.to_vec1::<f32>());
            assert_eq!(flat(mine)?, flat(t)?, "{key}");
        }

        let peft = AdapterFile::read(&dir.join("adapter_attn-mlp_peft.safetensors"), &Device::Cpu)?;
        assert_eq!(peft.format(), AdapterFormat::Peft);
        let adapter = peft.resolve(&model)?;
        assert_eq!((adapter.unet.len(), adapter.text_encoder.len()), (84, 0));
        // r = 4, lora_alpha = 8 come from lora_adapter_metadata, not from the alpha = rank default.
        assert!(adapter
            .unet
            .values()
            .all(|m| m.alpha == 8.0 && m.rank() == 4));
        Ok(())
    }

    #[test]
    fn format_names_parse() {
        assert_eq!(
            "kohya".parse::<AdapterFormat>().unwrap(),
            AdapterFormat::Kohya
        );
        assert_eq!(
            "peft".parse::<AdapterFormat>().unwrap(),
            AdapterFormat::Peft
        );
        assert!("diffusers"
            .parse::<AdapterFormat>()
            .unwrap_err()
            .to_string()
            .contains("expected kohya or peft"));
    }

    #[test]
    fn dates_are_gregorian_utc() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        let leap_day = UNIX_EPOCH + std::time::Duration::from_secs(19_782 * 86_400 + 3_723);
        assert_eq!(iso8601_utc(leap_day), "2024-02-29T01:02:03");
    }
}
