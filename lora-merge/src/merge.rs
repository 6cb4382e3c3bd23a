//! Folding adapters into a checkpoint: `W ← W + Σᵢ weightᵢ · (alphaᵢ/rankᵢ) · upᵢ·downᵢ`, streamed
//! tensor by tensor from the memory-mapped base into a new checkpoint of the same layout.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use lora_core::formats::checkpoint_kind::identify_architecture;
use lora_core::formats::keys::Component;
use lora_core::formats::ldm::{LdmLayout, LdmTarget, LdmTensor, ModelPart, TextEncoderLayout};
use lora_core::io::write_folder_atomic;
use lora_core::options::{check_output, AdapterSpec, Precision};
use lora_core::{AdapterFile, AdapterModule};
use safetensors::Dtype;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::base_model::{BaseModel, Layout, TensorBytes};
use crate::stream::{write_streaming, PlannedTensor};

/// The safetensors dtype a `--dtype` precision is written as.
fn stored_dtype(precision: Precision) -> Dtype {
    match precision {
        Precision::F16 => Dtype::F16,
        Precision::Bf16 => Dtype::BF16,
        Precision::F32 => Dtype::F32,
    }
}

/// The layout of a merge's output when it differs from the base's (`--to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputLayout {
    /// A diffusers folder (`unet/`, `text_encoder/`, `vae/` plus config files).
    Diffusers,
    /// One `.safetensors` file with original LDM keys.
    SingleFile,
}

impl FromStr for OutputLayout {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "diffusers" => Ok(Self::Diffusers),
            "single-file" => Ok(Self::SingleFile),
            _ => bail!("unknown layout `{s}`: expected diffusers or single-file"),
        }
    }
}

/// `--to` and `--config-from`: write the merge in another layout.
#[derive(Debug, Clone)]
pub struct Conversion {
    pub to: OutputLayout,
    /// A diffusers folder whose config, tokenizer and scheduler files are copied into the output
    /// (`model_index.json`, `*/config.json`, …). Required to turn a single file into a diffusers
    /// folder: a single file holds no configs and they are not derived from its shapes.
    pub config_from: Option<PathBuf>,
    /// `--no-ema`: a single file's plain UNet weights become the output's UNet rather than its
    /// EMA copy (a single-file output keeps both copies, each merged).
    pub no_ema: bool,
}

#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub base: PathBuf,
    pub adapters: Vec<AdapterSpec>,
    pub output: PathBuf,
    /// Output dtype of floating-point tensors; `None` keeps each tensor's dtype.
    pub dtype: Option<Precision>,
    /// Warn about adapter modules that match nothing in the base instead of failing.
    pub allow_unmatched: bool,
    /// Accept NaN or infinity in the adapters and the base (and write what they give) instead of
    /// failing.
    pub allow_nonfinite: bool,
}

/// What a merge did.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    /// Per adapter file: how many modules were folded in.
    pub merged_modules: Vec<(PathBuf, usize)>,
    /// Adapter modules that matched nothing (only with `allow_unmatched`).
    pub unmatched: Vec<String>,
    /// Non-finite values let through (only with `allow_nonfinite`).
    pub non_finite: Vec<String>,
    pub tensors_changed: usize,
}

/// One adapter module to add to a weight, with its merge weight.
type Contributions = HashMap<(Component, String), Vec<(AdapterModule, f64)>>;

/// Merges `options.adapters` into `options.base`, writing `options.output` in the base's layout.
/// Nothing is written unless every adapter resolves; the output appears only when complete.
pub fn merge(options: &MergeOptions) -> Result<MergeReport> {
    merge_converting(options, None)
}

/// [`merge`], writing the output in `conversion.to`'s layout. With a conversion the adapter list
/// may be empty (a plain layout conversion).
pub fn merge_converting(
    options: &MergeOptions,
    conversion: Option<&Conversion>,
) -> Result<MergeReport> {
    ensure!(
        !options.adapters.is_empty() || conversion.is_some(),
        "no adapter given (--lora)"
    );
    check_output_is_new(options)?;
    let base = BaseModel::open_with(&options.base, !conversion.is_some_and(|c| c.no_ema))?;
    let to = match (conversion.map(|c| c.to), base.layout) {
        (Some(to), _) => to,
        (None, Layout::Diffusers) => OutputLayout::Diffusers,
        (None, Layout::SingleFile(_)) => OutputLayout::SingleFile,
    };
    let config_from = conversion.and_then(|c| c.config_from.clone());
    if to == OutputLayout::Diffusers {
        ensure!(
            !options.output.exists(),
            "output folder {} already exists; remove it or choose another path",
            options.output.display()
        );
    }
    if let (OutputLayout::Diffusers, Layout::SingleFile(_)) = (to, base.layout) {
        let dir = config_from.as_deref().with_context(|| {
            let shapes = base
                .entries
                .iter()
                .map(|e| (e.key.clone(), e.shape.clone()))
                .collect();
            let what = match identify_architecture(&shapes) {
                Ok(architecture) => format!("an {architecture} checkpoint"),
                Err(e) => format!("a checkpoint of no built-in architecture ({e})"),
            };
            format!(
                "--to diffusers from the single file {} ({what}) needs --config-from <a \
                 diffusers folder of that model> for model_index.json, the config files and the \
                 tokenizer files (a single file holds none)",
                options.base.display()
            )
        })?;
        ensure!(
            dir.join("unet/config.json").is_file(),
            "--config-from {}: not a diffusers folder (no unet/config.json)",
            dir.display()
        );
        let configs_sdxl = dir.join("text_encoder_2/config.json").is_file();
        ensure!(
            configs_sdxl == base.is_sdxl(),
            "--config-from {}: {} but {} {}: the configs must be the model's",
            dir.display(),
            match configs_sdxl {
                true => "an SDXL folder (text_encoder_2/)",
                false => "a folder without SDXL's text_encoder_2/",
            },
            options.base.display(),
            match base.is_sdxl() {
                true => "is an SDXL checkpoint",
                false => "has one text encoder",
            }
        );
    }
    let modules = base.merge_modules();
    let model = modules.model();
    let mut report = MergeReport::default();
    let mut contributions = Contributions::new();
    let mut records = Vec::new();
    for spec in &options.adapters {
        let file = AdapterFile::read_with(&spec.path, &Device::Cpu, options.allow_nonfinite)?;
        report.non_finite.extend_from_slice(file.warnings());
        let adapter = if options.allow_unmatched {
            let (adapter, unmatched) = file.resolve_allowing_unmatched(&model)?;
            report.unmatched.extend(unmatched);
            adapter
        } else {
            file.resolve(&model).with_context(|| {
                format!(
                    "adapter does not fit base model {} (pass --allow-unmatched to skip modules that match nothing)",
                    options.base.display()
                )
            })?
        };
        let parts = [
            (Component::Unet, adapter.unet),
            (Component::TextEncoder, adapter.text_encoder),
            (Component::TextEncoder2, adapter.text_encoder_2),
        ];
        let mut count = 0;
        for (component, modules) in parts {
            for (path, module) in modules {
                let key = (component, component.canonical_path(&path));
                contributions
                    .entry(key)
                    .or_default()
                    .push((module, spec.scale));
                count += 1;
            }
        }
        report.merged_modules.push((spec.path.clone(), count));
        records.push(adapter_record(spec, &file.describe_format())?);
    }
    let provenance = BTreeMap::from([(
        "lora_merge.adapters".to_string(),
        serde_json::to_string(&records)?,
    )]);
    let merger = Merger {
        base: &base,
        contributions: &contributions,
        dtype: options.dtype,
        allow_nonfinite: options.allow_nonfinite,
    };
    report.tensors_changed = match (base.layout, to) {
        (Layout::SingleFile(_), OutputLayout::SingleFile) => {
            merger.write_single_file(&options.output, provenance)?
        }
        (Layout::Diffusers, OutputLayout::Diffusers) => {
            merger.write_folder(&options.output, provenance)?
        }
        (Layout::Diffusers, OutputLayout::SingleFile) => {
            merger.write_ldm_from_folder(&options.output, provenance)?
        }
        (Layout::SingleFile(_), OutputLayout::Diffusers) => {
            let config_from = config_from.expect("checked above");
            merger.write_folder_from_ldm(&options.output, &config_from, provenance)?
        }
    };
    Ok(report)
}

/// The adapter's entry in the output metadata: file name, merge weight, format, sha256.
fn adapter_record(spec: &AdapterSpec, format: &str) -> Result<serde_json::Value> {
    let bytes = std::fs::read(&spec.path)
        .with_context(|| format!("cannot read {}", spec.path.display()))?;
    let digest = Sha256::digest(&bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let name = spec
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(json!({"file": name, "weight": spec.scale, "format": format, "sha256": hex}))
}

/// The input is never modified: the output must be another path, and a folder output must not
/// exist yet (a folder cannot be replaced atomically).
fn check_output_is_new(options: &MergeOptions) -> Result<()> {
    let (base, output) = (&options.base, &options.output);
    let inputs: Vec<(&str, &Path)> = std::iter::once(("--base", base.as_path()))
        .chain(
            options
                .adapters
                .iter()
                .map(|a| ("--lora", a.path.as_path())),
        )
        .collect();
    check_output("--output", output, &inputs)?;
    if base.is_dir() {
        ensure!(
            !output.exists(),
            "output folder {} already exists; remove it or choose another path",
            output.display()
        );
    }
    Ok(())
}

struct Merger<'a> {
    base: &'a BaseModel,
    contributions: &'a Contributions,
    dtype: Option<Precision>,
    allow_nonfinite: bool,
}

impl Merger<'_> {
    fn write_single_file(
        &self,
        output: &Path,
        provenance: BTreeMap<String, String>,
    ) -> Result<usize> {
        let mut metadata = self.base.files[0].metadata()?;
        metadata.extend(provenance);
        let entries: Vec<usize> = (0..self.base.entries.len()).collect();
        self.write_file(output, &entries, &metadata)
    }

    /// Writes the folder into a temporary sibling and renames it into place, so a failure
    /// leaves no partial output.
    fn write_folder(&self, output: &Path, provenance: BTreeMap<String, String>) -> Result<usize> {
        write_folder_atomic(output, |dir| self.fill_folder(dir, provenance))
    }

    /// A diffusers folder as one single file with LDM keys: every tensor renamed (OpenCLIP's
    /// q/k/v stacked into `in_proj_*` and SDXL's `text_projection` transposed, the VAE's
    /// attention projections as 1×1 convs), merged and cast as for a same-layout merge.
    fn write_ldm_from_folder(
        &self,
        output: &Path,
        provenance: BTreeMap<String, String>,
    ) -> Result<usize> {
        let layout = self.folder_ldm_layout()?;
        let up_attn: Vec<usize> =
            self.folder_indices(ModelPart::Unet, "up_blocks.", ".attentions.");
        // LDM key → (stored-order sources: (entry, third), how the shape changes)
        let mut targets: BTreeMap<String, (Vec<(usize, usize)>, Reshape)> = BTreeMap::new();
        for (i, e) in self.base.entries.iter().enumerate() {
            let LdmTensor::Renamed(t) = &e.meaning else {
                continue;
            };
            if !layout.stores(t) {
                continue;
            }
            match layout.ldm_key(t, &up_attn)? {
                LdmTarget::Key { key, to_conv } => {
                    let reshape = if to_conv {
                        Reshape::ToConv
                    } else {
                        Reshape::Keep
                    };
                    targets.insert(key, (vec![(i, 0)], reshape));
                }
                LdmTarget::Stacked { key, index } => {
                    targets.entry(key).or_default().0.push((i, index));
                }
                LdmTarget::Transposed { key } => {
                    targets.insert(key, (vec![(i, 0)], Reshape::Transpose));
                }
            }
        }
        let mut plan = Vec::with_capacity(targets.len());
        let mut sources = Vec::with_capacity(targets.len());
        for (key, (mut parts, reshape)) in targets {
            parts.sort_by_key(|&(_, third)| third);
            let first = &self.base.entries[parts[0].0];
            let mut shape = first.shape.clone();
            if parts.len() > 1 || parts[0].1 > 0 {
                let thirds: Vec<usize> = parts.iter().map(|p| p.1).collect();
                ensure!(
                    thirds == [0, 1, 2]
                        && parts.iter().all(|p| {
                            let e = &self.base.entries[p.0];
                            e.shape == first.shape && e.dtype == first.dtype
                        }),
                    "`{key}`: q, k and v must all be present with equal shapes and dtypes"
                );
                shape[0] *= 3;
            }
            match reshape {
                Reshape::ToConv if shape.len() == 2 => shape.extend([1, 1]),
                Reshape::Transpose => {
                    ensure!(shape.len() == 2, "`{key}`: a transposed tensor must be 2-D");
                    shape.reverse();
                }
                _ => {}
            }
            plan.push(PlannedTensor {
                name: key,
                dtype: self.output_dtype(first.dtype),
                shape,
            });
            sources.push((
                parts.into_iter().map(|p| p.0).collect::<Vec<usize>>(),
                reshape,
            ));
        }
        let mut metadata = self.base.files[0].metadata()?;
        metadata.extend(provenance);
        write_streaming(output, &plan, &metadata, |k| {
            let (entries, reshape) = &sources[k];
            if let ([i], Reshape::Keep | Reshape::ToConv) = (&entries[..], reshape) {
                return self.produce(*i, plan[k].dtype);
            }
            let mut bytes = Vec::new();
            for &i in entries {
                bytes.extend_from_slice(&self.produce(i, plan[k].dtype)?);
            }
            Ok(TensorBytes::computed(match reshape {
                Reshape::Transpose => {
                    let source = &self.base.entries[entries[0]].shape;
                    transposed(&bytes, source, plan[k].dtype)
                }
                _ => bytes,
            }))
        })?;
        Ok((0..self.base.entries.len())
            .filter(|&i| !self.deltas_for(i).is_empty())
            .count())
    }

    /// The single-file layout of a diffusers folder: blocks counted from the weights; SDXL's two
    /// encoders when it has a second, OpenCLIP (SD2) when the text encoder uses exact GELU
    /// (`hidden_act: gelu`), else CLIP (SD1).
    fn folder_ldm_layout(&self) -> Result<LdmLayout> {
        let resnets = self.folder_indices(ModelPart::Unet, "down_blocks.0.resnets.", "");
        ensure!(
            !resnets.is_empty(),
            "{}: no UNet down_blocks.0.resnets",
            self.base.root.display()
        );
        let config = self.base.root.join("text_encoder/config.json");
        let text: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&config)
                .with_context(|| format!("cannot read {}", config.display()))?,
        )
        .with_context(|| format!("{} is not JSON", config.display()))?;
        let text_encoder = match text.get("hidden_act").and_then(|v| v.as_str()) {
            _ if self.base.is_sdxl() => TextEncoderLayout::Sdxl,
            Some("gelu") => TextEncoderLayout::OpenClip,
            _ => TextEncoderLayout::Clip,
        };
        Ok(LdmLayout {
            layers_per_block: resnets.len(),
            vae_up_blocks: self
                .folder_indices(ModelPart::Vae, "decoder.up_blocks.", "")
                .len(),
            text_encoder,
        })
    }

    /// The distinct `N` of `part`'s tensors named `<head>N<infix>…`, sorted.
    fn folder_indices(&self, part: ModelPart, head: &str, infix: &str) -> Vec<usize> {
        let set: std::collections::BTreeSet<usize> = self
            .base
            .entries
            .iter()
            .filter_map(|e| match &e.meaning {
                LdmTensor::Renamed(t) if t.part == part => {
                    let (n, rest) = t.name.strip_prefix(head)?.split_once('.')?;
                    format!(".{rest}")
                        .starts_with(infix)
                        .then(|| n.parse().ok())
                        .flatten()
                }
                _ => None,
            })
            .collect();
        set.into_iter().collect()
    }

    /// A single file as a diffusers folder: the config files of `config_from`, and one weights
    /// file per model part with the diffusers names (OpenCLIP's stacked q/k/v split and SDXL's
    /// `text_projection` transposed, the VAE's 1×1-conv attention projections as Linear weights).
    /// Keys of no model part are dropped.
    fn write_folder_from_ldm(
        &self,
        output: &Path,
        config_from: &Path,
        provenance: BTreeMap<String, String>,
    ) -> Result<usize> {
        write_folder_atomic(output, |dir| {
            copy_folder_files(config_from, dir, &[])?;
            let mut metadata = self.base.files[0].metadata()?;
            metadata.extend(provenance);
            for part in ModelPart::ALL {
                // (diffusers name, entry, which part of the stored tensor, shape)
                let mut tensors: Vec<(String, usize, Portion, Vec<usize>)> = Vec::new();
                for (i, e) in self.base.entries.iter().enumerate() {
                    if !self.base.read_as_model(e) {
                        continue;
                    }
                    match &e.meaning {
                        LdmTensor::Renamed(t) if t.part == part => {
                            let mut shape = e.shape.clone();
                            if part == ModelPart::Vae && is_vae_attention_weight(&t.name) {
                                shape.truncate(2);
                            }
                            tensors.push((t.name.clone(), i, Portion::Whole, shape));
                        }
                        LdmTensor::StackedQkv(parts) => {
                            for (k, t) in parts.iter().enumerate().filter(|(_, t)| t.part == part) {
                                let mut shape = e.shape.clone();
                                shape[0] /= 3;
                                tensors.push((t.name.clone(), i, Portion::Third(k), shape));
                            }
                        }
                        LdmTensor::Transposed(t) if t.part == part => {
                            ensure!(
                                e.shape.len() == 2,
                                "`{}` is {:?}: a transposed tensor must be 2-D",
                                e.key,
                                e.shape
                            );
                            let shape = e.shape.iter().rev().copied().collect();
                            tensors.push((t.name.clone(), i, Portion::Transposed, shape));
                        }
                        _ => {}
                    }
                }
                if tensors.is_empty() {
                    continue;
                }
                tensors.sort_by(|a, b| a.0.cmp(&b.0));
                let plan: Vec<PlannedTensor> = tensors
                    .iter()
                    .map(|(name, i, _, shape)| PlannedTensor {
                        name: name.clone(),
                        dtype: self.output_dtype(self.base.entries[*i].dtype),
                        shape: shape.clone(),
                    })
                    .collect();
                let file = match part {
                    ModelPart::TextEncoder | ModelPart::TextEncoder2 => "model.safetensors",
                    _ => "diffusion_pytorch_model.safetensors",
                };
                let sub = dir.join(part.folder());
                std::fs::create_dir_all(&sub)
                    .with_context(|| format!("cannot create {}", sub.display()))?;
                write_streaming(&sub.join(file), &plan, &metadata, |k| {
                    let (_, i, portion, _) = &tensors[k];
                    let bytes = self.produce(*i, plan[k].dtype)?;
                    Ok(match portion {
                        Portion::Whole => bytes,
                        Portion::Third(t) => {
                            let n = bytes.len() / 3;
                            TensorBytes::computed(bytes[t * n..(t + 1) * n].to_vec())
                        }
                        Portion::Transposed => TensorBytes::computed(transposed(
                            &bytes,
                            &self.base.entries[*i].shape,
                            plan[k].dtype,
                        )),
                    })
                })?;
            }
            Ok((0..self.base.entries.len())
                .filter(|&i| !self.deltas_for(i).is_empty())
                .count())
        })
    }
}

/// How a folder tensor's shape changes on its way into a single file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Reshape {
    #[default]
    Keep,
    /// A Linear weight stored as a 1×1 conv.
    ToConv,
    Transpose,
}

/// Which part of a single file's tensor a diffusers weight is.
#[derive(Debug, Clone, Copy)]
enum Portion {
    Whole,
    /// This third (q, k, v) of OpenCLIP's stacked rows.
    Third(usize),
    /// Its transpose.
    Transposed,
}

/// The little-endian `bytes` of a `[rows, cols]` matrix (`shape`) of `dtype`, transposed.
fn transposed(bytes: &[u8], shape: &[usize], dtype: Dtype) -> Vec<u8> {
    let (rows, cols) = (shape[0], shape[1]);
    let size = dtype.bitsize() / 8;
    let mut out = vec![0u8; bytes.len()];
    for r in 0..rows {
        for c in 0..cols {
            let from = (r * cols + c) * size;
            let to = (c * rows + r) * size;
            out[to..to + size].copy_from_slice(&bytes[from..from + size]);
        }
    }
    out
}

/// The VAE mid-block attention projections: Linear `[out, in]` in diffusers.
fn is_vae_attention_weight(name: &str) -> bool {
    name.contains(".mid_block.attentions.0.to_") && name.ends_with(".weight")
}

impl Merger<'_> {
    fn fill_folder(&self, dir: &Path, provenance: BTreeMap<String, String>) -> Result<usize> {
        let weight_files: Vec<PathBuf> = self.base.files.iter().map(|f| f.path.clone()).collect();
        copy_folder_files(&self.base.root, dir, &weight_files)?;
        let mut changed = 0;
        for (index, file) in self.base.files.iter().enumerate() {
            let relative = file.path.strip_prefix(&self.base.root)?;
            let entries: Vec<usize> = (0..self.base.entries.len())
                .filter(|&i| self.base.entries[i].file == index)
                .collect();
            let mut metadata = file.metadata()?;
            metadata.extend(provenance.clone());
            changed += self.write_file(&dir.join(relative), &entries, &metadata)?;
        }
        Ok(changed)
    }

    /// Streams `entries` of the base into `path`; returns how many tensors changed.
    fn write_file(
        &self,
        path: &Path,
        entries: &[usize],
        metadata: &BTreeMap<String, String>,
    ) -> Result<usize> {
        let plan: Vec<PlannedTensor> = entries
            .iter()
            .map(|&i| {
                let e = &self.base.entries[i];
                PlannedTensor {
                    name: e.key.clone(),
                    dtype: self.output_dtype(e.dtype),
                    shape: e.shape.clone(),
                }
            })
            .collect();
        write_streaming(path, &plan, metadata, |k| {
            self.produce(entries[k], plan[k].dtype)
        })?;
        Ok(entries
            .iter()
            .filter(|&&i| !self.deltas_for(i).is_empty())
            .count())
    }

    fn output_dtype(&self, stored: Dtype) -> Dtype {
        match (self.dtype, stored) {
            (Some(d), Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64) => stored_dtype(d),
            _ => stored,
        }
    }

    /// For entry `i`: the contributions to each of its diffusers weights (three for stacked
    /// q/k/v), or an empty list when nothing changes it.
    fn deltas_for(&self, i: usize) -> Vec<Option<&Vec<(AdapterModule, f64)>>> {
        let lookup = |part: ModelPart, name: &str| {
            let component = part.component()?;
            let path = part.canonical_name(name.strip_suffix(".weight")?);
            self.contributions.get(&(component, path))
        };
        let found: Vec<Option<&Vec<(AdapterModule, f64)>>> = match &self.base.entries[i].meaning {
            LdmTensor::Renamed(t) => vec![lookup(t.part, &t.name)],
            LdmTensor::StackedQkv(parts) => parts.iter().map(|t| lookup(t.part, &t.name)).collect(),
            // No adapter module is a text projection (the encoders' module lists leave it out).
            LdmTensor::Transposed(_) | LdmTensor::Other => vec![],
        };
        if found.iter().all(Option::is_none) {
            Vec::new()
        } else {
            found
        }
    }

    /// The output bytes of entry `i` in `dtype`: the stored bytes when nothing changes, else
    /// the weight in f32 plus the weighted deltas, cast.
    ///
    /// A non-finite value is never written unless `allow_nonfinite`: one in the base is refused
    /// naming the tensor. A merged value that overflows a half-precision output (finite in f32)
    /// is always reported with the dtype that would hold it.
    fn produce(&self, i: usize, dtype: Dtype) -> Result<TensorBytes<'_>> {
        let e = &self.base.entries[i];
        let deltas = self.deltas_for(i);
        if deltas.is_empty() && dtype == e.dtype {
            let bytes = self.base.entry_bytes(i)?;
            if let Some(at) = first_non_finite(&bytes, dtype).filter(|_| !self.allow_nonfinite) {
                bail!(
                    "base tensor `{}` holds a non-finite value (NaN or infinity) at flat index \
                     {at}: the base model is damaged (--allow-nonfinite writes it anyway)",
                    e.key
                );
            }
            return Ok(bytes);
        }
        let mut w = self.base.load_entry(i)?.to_dtype(DType::F32)?;
        if !deltas.is_empty() {
            let delta = self.summed_delta(i, &w, &deltas)?;
            w = (w + delta)?;
        }
        let cast = w.to_dtype(candle_dtype(dtype)?)?;
        let bytes = safetensors::View::data(&cast).into_owned();
        if let Some(at) = first_non_finite(&bytes, dtype) {
            let value = w.flatten_all()?.get(at)?.to_scalar::<f32>()?;
            ensure!(
                !value.is_finite(),
                "merging overflows {dtype:?}: `{}` reaches {value} at flat index {at}, beyond the \
                 output dtype's range; merge to --dtype f32 (or bf16), or lower the adapter scale",
                e.key
            );
            if self.allow_nonfinite {
                return Ok(TensorBytes::computed(bytes));
            }
            bail!(
                "`{}`: the merged weight is not finite (NaN or infinity) at flat index {at}; the \
                 base or an adapter holds non-finite values (--allow-nonfinite writes it anyway)",
                e.key
            );
        }
        Ok(TensorBytes::computed(bytes))
    }

    /// Σ of each module's change at its weight for entry `i` (`base`, the stored weight in
    /// f32), shaped like the stored tensor (1×1 convs, stacked q/k/v with zero blocks for parts
    /// without an adapter). Each change is relative to the base, as peft combines adapters.
    fn summed_delta(
        &self,
        i: usize,
        base: &Tensor,
        deltas: &[Option<&Vec<(AdapterModule, f64)>>],
    ) -> Result<Tensor> {
        let e = &self.base.entries[i];
        let rows = e.shape[0] / deltas.len();
        let cols: usize = e.shape[1..].iter().product();
        let base = base.reshape((e.shape[0], cols))?;
        let mut blocks = Vec::with_capacity(deltas.len());
        for (block, contributions) in deltas.iter().enumerate() {
            let mut sum = Tensor::zeros((rows, cols), DType::F32, &Device::Cpu)?;
            let block_base = base.narrow(0, block * rows, rows)?;
            for (module, weight) in contributions.map(Vec::as_slice).unwrap_or_default() {
                let delta = module.weight_change(&block_base, *weight)?;
                ensure!(
                    delta.dims() == [rows, cols],
                    "`{}`: the adapter's ΔW is {:?}, the stored weight is {:?}",
                    e.key,
                    delta.dims(),
                    e.shape
                );
                sum = (sum + delta)?;
            }
            blocks.push(sum);
        }
        Ok(Tensor::cat(&blocks, 0)?.reshape(e.shape.as_slice())?)
    }
}

/// The index of the first NaN or infinity in little-endian `bytes` of a float `dtype` (all
/// exponent bits set), without converting them; `None` for other dtypes.
fn first_non_finite(bytes: &[u8], dtype: Dtype) -> Option<usize> {
    fn find<const N: usize>(bytes: &[u8], exponent: u64) -> Option<usize> {
        let special = |unit: &[u8]| {
            let mut word = [0u8; 8];
            word[..N].copy_from_slice(unit);
            u64::from_le_bytes(word) & exponent == exponent
        };
        // Blocks of values tested without an early exit, which the compiler vectorises (a
        // search that stops at each value does not); only a block with a hit is searched. Every
        // unchanged tensor of a merge passes through here.
        const BLOCK: usize = 512;
        bytes.chunks(BLOCK * N).enumerate().find_map(|(b, block)| {
            let hit = block.chunks_exact(N).fold(false, |any, u| any | special(u));
            if !hit {
                return None;
            }
            block
                .chunks_exact(N)
                .position(special)
                .map(|at| b * BLOCK + at)
        })
    }
    match dtype {
        Dtype::F16 => find::<2>(bytes, 0x7c00),
        Dtype::BF16 => find::<2>(bytes, 0x7f80),
        Dtype::F32 => find::<4>(bytes, 0x7f80_0000),
        Dtype::F64 => find::<8>(bytes, 0x7ff0_0000_0000_0000),
        _ => None,
    }
}

fn candle_dtype(dtype: Dtype) -> Result<DType> {
    Ok(match dtype {
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        other => bail!("cannot convert a {other:?} tensor"),
    })
}

/// Copies a diffusers folder's config files (model_index.json, configs, tokenizer, scheduler:
/// `.json` and `.txt`) into `to`. Nothing else: the merge writes the weights it read, and other
/// weight files (`*.fp16.safetensors`, `*.bin`, Flax, ONNX, OpenVINO) would hold unmerged
/// weights.
fn copy_folder_files(from: &Path, to: &Path, weight_files: &[PathBuf]) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    let index = from.join("model_index.json");
    if index.is_file() {
        std::fs::copy(&index, to.join("model_index.json"))?;
    }
    for sub in [
        "unet",
        "text_encoder",
        "text_encoder_2",
        "vae",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    ] {
        let dir = from.join(sub);
        if !dir.is_dir() {
            continue;
        }
        std::fs::create_dir_all(to.join(sub))?;
        for item in std::fs::read_dir(&dir)? {
            let path = item?.path();
            // Configs and tokenizer files only: a Hub clone also holds weights in other formats
            // (Flax, ONNX, OpenVINO), which would be unmerged copies.
            let is_config = ["json", "txt"]
                .iter()
                .any(|ext| path.extension().is_some_and(|e| e == *ext));
            if path.is_file() && is_config && !weight_files.contains(&path) {
                let target = to
                    .join(sub)
                    .join(path.file_name().expect("a file has a name"));
                std::fs::copy(&path, &target).with_context(|| {
                    format!("cannot copy {} to {}", path.display(), target.display())
                })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_config_and_tokenizer_files_are_copied() -> Result<()> {
        let from = tempfile::tempdir()?;
        let to = tempfile::tempdir()?;
        let files = [
            ("model_index.json", true),
            ("unet/config.json", true),
            ("unet/diffusion_pytorch_model.fp16.safetensors", false),
            ("unet/flax_model.msgpack", false),
            ("text_encoder_2/model.onnx", false),
            ("text_encoder_2/config.json", true),
            ("tokenizer_2/merges.txt", true),
            ("tokenizer_2/vocab.json", true),
        ];
        for (name, _) in files {
            let path = from.path().join(name);
            std::fs::create_dir_all(path.parent().expect("a parent"))?;
            std::fs::write(&path, name)?;
        }
        copy_folder_files(from.path(), to.path(), &[])?;
        for (name, copied) in files {
            assert_eq!(to.path().join(name).is_file(), copied, "{name}");
        }
        Ok(())
    }

    #[test]
    fn non_finite_values_are_found_in_every_float_dtype() {
        let bytes = |values: &[f32], dtype: DType| {
            let t = Tensor::new(values, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            safetensors::View::data(&t).into_owned()
        };
        for (dtype, stored) in [
            (DType::F16, Dtype::F16),
            (DType::BF16, Dtype::BF16),
            (DType::F32, Dtype::F32),
            (DType::F64, Dtype::F64),
        ] {
            let finite = bytes(&[0.0, -1.5, 6e4, f32::MIN_POSITIVE], dtype);
            assert_eq!(first_non_finite(&finite, stored), None, "{dtype:?}");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let values = bytes(&[1.0, 2.0, bad], dtype);
                assert_eq!(
                    first_non_finite(&values, stored),
                    Some(2),
                    "{dtype:?} {bad}"
                );
            }
        }
        // The first of several, past the first blocks of values, wherever it falls in its block.
        for at in [511, 512, 1000, 1537] {
            let mut values = vec![0.5f32; 2000];
            values[at] = f32::NAN;
            values[1800] = f32::INFINITY;
            let found = first_non_finite(&bytes(&values, DType::F16), Dtype::F16);
            assert_eq!(found, Some(at));
        }
        // Past f16's range (65504) is an infinity once cast: what an overflowing merge makes.
        assert_eq!(
            first_non_finite(&bytes(&[7e4], DType::F16), Dtype::F16),
            Some(0)
        );
    }
}
