//! Adapter files: reading kohya/A1111 and diffusers/PEFT LoRA `.safetensors`, resolving them
//! against a model's modules, and writing either layout with the metadata each ecosystem reads.
//!
//! Reading is strict: keys of other algorithms (LyCORIS OFT, GLoRA, …) or of no known layout are
//! errors naming them, never silently dropped, and resolution reports every module that does not
//! fit. DoRA magnitudes are read in both layouts; LyCORIS LoHa/LoKr files (kohya layout) too.
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

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::keys::{Component, KohyaNamer, KohyaNames};
use super::kohya::{self, BaseModelVersion, KohyaModule};
use super::peft::{self, peft_configs};
use super::OutputModule;
use crate::adapters::lycoris::LycorisModule;
use crate::adapters::{Adapter, AdapterModule, LoraModule, ModuleInfo, ModuleKind};
use crate::io::{read_safetensors, write_safetensors_atomic, SafetensorsContents};
use crate::models::config::PredictionType;

mod layout;
mod lycoris;
#[cfg(test)]
mod tests;

use layout::{assemble_modules, detect_format, group_by_module};

/// An adapter file's tensors. A NaN or infinity in any of them is refused naming the file and key
/// (a diverged or damaged training run: it would turn every image it touches into NaN); with
/// `allow_nonfinite` (`--allow-nonfinite`) each such tensor is returned as a warning instead.
pub fn read_adapter_tensors(
    path: &Path,
    device: &Device,
    allow_nonfinite: bool,
) -> Result<(SafetensorsContents, Vec<String>)> {
    let contents = read_safetensors(path, device)?;
    let mut warnings = Vec::new();
    for (key, tensor) in &contents.tensors {
        if !tensor.dtype().is_float() {
            continue;
        }
        let values = tensor
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let Some(at) = values.iter().position(|v| !v.is_finite()) else {
            continue;
        };
        let problem = format!(
            "{}: `{key}` holds a non-finite value ({}) at flat index {at}",
            path.display(),
            values[at]
        );
        ensure!(
            allow_nonfinite,
            "{problem}: the adapter is broken (a diverged or damaged training run) and would turn \
             every image it touches into NaN; pass --allow-nonfinite to load it anyway"
        );
        warnings.push(format!("{problem} (let through by --allow-nonfinite)"));
    }
    Ok((contents, warnings))
}

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

impl<'de> serde::Deserialize<'de> for AdapterFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::options::deserialize_text(d)
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

/// The modules of the model an adapter is resolved against or written for.
#[derive(Debug, Clone, Copy)]
pub struct ModelModules<'a> {
    pub unet: &'a [ModuleInfo],
    /// `None` when the caller does not apply text-encoder adapters (UNet-only training, UNet-only
    /// tools): text-encoder modules of a file are then skipped when resolving (check
    /// [`AdapterFile::has_text_encoder`] to warn) and an error when writing. `Some` makes every
    /// text-encoder module of a file resolve or fail.
    pub text_encoder: Option<&'a [ModuleInfo]>,
    /// SDXL's second text encoder, as `text_encoder`; `None` for other models too.
    pub text_encoder_2: Option<&'a [ModuleInfo]>,
}

impl<'a> ModelModules<'a> {
    /// A model's UNet modules alone: text-encoder modules of a file are skipped.
    pub fn unet_only(unet: &'a [ModuleInfo]) -> Self {
        Self {
            unet,
            text_encoder: None,
            text_encoder_2: None,
        }
    }

    /// The modules of `component`, `None` for a text encoder the caller does not apply.
    pub fn of(&self, component: Component) -> Option<&'a [ModuleInfo]> {
        match component {
            Component::Unet => Some(self.unet),
            Component::TextEncoder => self.text_encoder,
            Component::TextEncoder2 => self.text_encoder_2,
        }
    }

    /// Whether the model is SDXL's (it has a second text encoder): kohya files then name the
    /// first one `lora_te1_`.
    pub fn is_sdxl(&self) -> bool {
        self.text_encoder_2.is_some()
    }

    /// The module at `path` (text-encoder paths compared with the `text_model.` level).
    pub fn find(&self, component: Component, path: &str) -> Option<&'a ModuleInfo> {
        let canonical = component.canonical_path(path);
        self.of(component)
            .unwrap_or_default()
            .iter()
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
    /// DoRA's magnitude `[out]`, f32.
    pub magnitude: Option<Tensor>,
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
            magnitude: self.magnitude.clone(),
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
    /// A LyCORIS LoHa/LoKr file's modules by (component, kohya name without prefix); such a
    /// file has no LoRA modules.
    lycoris: BTreeMap<(Component, String), LycorisModule>,
    /// What the reading policy let through and the user should hear about.
    warnings: Vec<String>,
}

impl AdapterFile {
    /// [`read_with`](Self::read_with) refusing NaN and infinity.
    pub fn read(path: &Path, device: &Device) -> Result<Self> {
        Self::read_with(path, device, false)
    }

    /// Reads a `.safetensors` adapter in either layout, its tensors converted to f32 on `device`;
    /// non-finite values as [`read_adapter_tensors`] says.
    pub fn read_with(path: &Path, device: &Device, allow_nonfinite: bool) -> Result<Self> {
        let (contents, warnings) = read_adapter_tensors(path, device, allow_nonfinite)?;
        let origin = path.display().to_string();
        if lycoris::is_lycoris(contents.tensors.keys()) {
            return Ok(Self {
                path: path.to_path_buf(),
                format: AdapterFormat::Kohya,
                lycoris: lycoris::read_modules(&origin, &contents.tensors)?,
                metadata: contents.metadata,
                modules: Vec::new(),
                warnings,
            });
        }
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
            lycoris: BTreeMap::new(),
            warnings,
        })
    }

    /// Non-finite values let through by `--allow-nonfinite`, one line per tensor.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
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

    /// Every LoRA module as the file names it, sorted by (component, name); usable without a
    /// model. Empty for a LyCORIS file (see [`Self::lycoris_modules`]).
    pub fn raw_modules(&self) -> &[RawModule] {
        &self.modules
    }

    /// A LyCORIS LoHa/LoKr file's modules by (component, kohya name without prefix).
    pub fn lycoris_modules(&self) -> &BTreeMap<(Component, String), LycorisModule> {
        &self.lycoris
    }

    /// The layout's name, or `lycoris-<algorithms>` for a LoHa/LoKr file (`lycoris-loha`).
    pub fn describe_format(&self) -> String {
        if self.lycoris.is_empty() {
            return self.format.name().to_string();
        }
        let algorithms: std::collections::BTreeSet<&str> = self
            .lycoris
            .values()
            .map(LycorisModule::algorithm)
            .collect();
        format!(
            "lycoris-{}",
            algorithms.into_iter().collect::<Vec<_>>().join("+")
        )
    }

    /// Whether the file is an SDXL adapter: it has second-text-encoder modules or `lora_te1_`
    /// names, or its header says so (kohya's `ss_base_model_version` `sdxl_…`, modelspec's
    /// architecture).
    pub fn is_sdxl(&self) -> bool {
        let lora = self.modules.iter().map(|m| m.component);
        let second = lora
            .chain(self.lycoris.keys().map(|(c, _)| *c))
            .any(|c| c == Component::TextEncoder2);
        let said = |key: &str, marker: &str| {
            self.metadata
                .get(key)
                .is_some_and(|value| value.starts_with(marker))
        };
        // A kohya file numbers its first text encoder only for SDXL.
        let numbered = self
            .modules
            .iter()
            .any(|m| m.down_key.starts_with("lora_te1_"));
        second
            || numbered
            || said("ss_base_model_version", "sdxl")
            || said("modelspec.architecture", "stable-diffusion-xl")
    }

    /// Whether the file has modules for a text encoder (either of SDXL's).
    pub fn has_text_encoder(&self) -> bool {
        let lora = self.modules.iter().map(|m| m.component);
        lora.chain(self.lycoris.keys().map(|(c, _)| *c))
            .any(Component::is_text_encoder)
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
            Component::ALL
                .iter()
                .any(|&c| !adapter.modules(c).is_empty()),
            "{}: no module applies (the file holds only text-encoder modules and no text encoder was given)",
            self.path.display()
        );
        Ok(adapter)
    }

    /// The modules of the file that fit `model`, and a message for each that does not.
    fn match_modules(&self, model: &ModelModules) -> Result<(Adapter, Vec<Problem>)> {
        let kohya_names = match self.format {
            AdapterFormat::Kohya => KohyaNames::new(
                model.unet,
                model.text_encoder.unwrap_or_default(),
                model.text_encoder_2.unwrap_or_default(),
            )?,
            AdapterFormat::Peft => KohyaNames::default(),
        };
        let mut adapter = Adapter::default();
        let mut problems = Vec::new();
        let misfit = |text: String| Problem {
            unmatched: false,
            text,
        };
        for raw in &self.modules {
            if let Some(problem) = absent_component(model, raw.component, &raw.down_key) {
                problems.extend(problem);
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
            let target = adapter.modules_mut(raw.component);
            if target.insert(info.path.clone(), lora.into()).is_some() {
                problems.push(misfit(format!(
                    "`{}`: module {} is given more than once",
                    raw.down_key, info.path
                )));
            }
        }
        for ((component, name), module) in &self.lycoris {
            let full = format!("{}{name}", component.kohya_prefix());
            if let Some(problem) = absent_component(model, *component, &full) {
                problems.extend(problem);
                continue;
            }
            let found = kohya_names.lookup(&full);
            let Some(info) = found.and_then(|(c, path)| model.find(c, path)) else {
                problems.push(Problem {
                    unmatched: true,
                    text: format!("`{full}`: no {component} module has this name"),
                });
                continue;
            };
            if let Err(e) = module.check_fits(info) {
                problems.push(misfit(format!("`{full}`: {e}")));
                continue;
            }
            let target = adapter.modules_mut(*component);
            let module = AdapterModule::Lycoris(module.clone());
            if target.insert(info.path.clone(), module).is_some() {
                problems.push(misfit(format!(
                    "`{full}`: module {} is given more than once",
                    info.path
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

/// `None` when `model` has `component`; otherwise whether the module is skipped (`Some(None)`:
/// the caller applies no text encoder at all) or a problem (`Some(Some(_))`: a second-encoder
/// module, SDXL's, for a model with one text encoder).
fn absent_component(
    model: &ModelModules,
    component: Component,
    key: &str,
) -> Option<Option<Problem>> {
    if model.of(component).is_some() {
        return None;
    }
    if component == Component::TextEncoder2 && model.text_encoder.is_some() {
        return Some(Some(Problem {
            unmatched: true,
            text: format!(
                "`{key}`: a module of SDXL's second text encoder; this model has one text encoder \
                 (an SDXL adapter on another model?)"
            ),
        }));
    }
    Some(None)
}

/// The problem of a module whose name matches nothing. Adapters that lora-merge can fold but the
/// model does not attach are errors saying so: a k×k conv adapter against a module set without
/// k×k convs, and (LyCORIS' `full` preset) adapters on the UNet's `conv_in`, `conv_out` and
/// time-embedding layers, which the runtime UNet does not adapt.
fn unmatched_problem(raw: &RawModule, model: &ModelModules) -> Problem {
    let has_convs = model
        .unet
        .iter()
        .any(|m| matches!(m.kind, ModuleKind::Conv { .. }));
    let flat = raw.down_key.replace('.', "_");
    let top_level = raw.component == Component::Unet
        && ["_conv_in_", "_conv_out_", "_time_embedding_linear_"]
            .iter()
            .any(|part| flat.contains(part));
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
        _ if top_level => Problem {
            unmatched: false,
            text: format!(
                "`{}`: an adapter on the UNet's conv_in, conv_out or time embedding (LyCORIS' \
                 `full` preset); those layers take no adapter at run time: fold it into the model \
                 with lora-merge",
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
    /// LoKr's `--factor`, for the kohya network arguments of a LoKr adapter.
    pub lokr_factor: Option<i64>,
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
        AdapterFormat::Kohya => {
            let mut lora = Vec::new();
            let mut lycoris = Vec::new();
            let namer = KohyaNamer::new(model.unet, model.is_sdxl())?;
            for e in &entries {
                let name = namer.name(e.component, &e.info.path);
                match e.module {
                    AdapterModule::Lora(m) => lora.push(KohyaModule {
                        name,
                        kind: e.info.kind,
                        down: m.down.clone(),
                        up: m.up.clone(),
                        alpha: m.alpha,
                        magnitude: m.magnitude.clone(),
                    }),
                    AdapterModule::Lycoris(m) => lycoris.push((name, e.info.kind, m)),
                }
            }
            ensure!(
                lora.is_empty() || lycoris.is_empty(),
                "an adapter mixing LoRA and LyCORIS LoHa/LoKr modules has no kohya layout"
            );
            let title = options.title.clone().unwrap_or_else(|| {
                path.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            let (tensors, mut metadata) = match lycoris.is_empty() {
                true => (kohya::kohya_tensors(&lora)?, kohya::network_metadata(&lora)),
                false => (
                    kohya::lycoris_tensors(&lycoris)?,
                    kohya::lycoris_network_metadata(&lycoris, options.lokr_factor),
                ),
            };
            metadata.extend(kohya::model_metadata(
                options.base_model,
                options.prediction,
                &title,
            ));
            (tensors, metadata)
        }
        AdapterFormat::Peft => {
            let lycoris = entries.iter().find(|e| e.module.as_lora().is_none());
            if let Some(e) = lycoris {
                bail!(
                    "`{}` is a LyCORIS {} module: those are written in the kohya layout \
                     (--format kohya), which LyCORIS, ComfyUI and A1111 load",
                    e.info.path,
                    e.module.algorithm()
                );
            }
            (peft::peft_tensors(&entries)?, peft::peft_metadata(&entries))
        }
    };
    metadata.extend(options.extra_metadata.clone());
    write_safetensors_atomic(path, &tensors, metadata)
}

fn match_entries<'a>(
    adapter: &'a Adapter,
    model: &'a ModelModules,
) -> Result<Vec<OutputModule<'a>>> {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    for component in Component::ALL {
        let modules = adapter.modules(component);
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
                    module: lora,
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
