//! Folding adapters into a checkpoint: `W ← W + Σᵢ weightᵢ · (alphaᵢ/rankᵢ) · upᵢ·downᵢ`, streamed
//! tensor by tensor from the memory-mapped base into a new checkpoint of the same layout.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use lora_core::keys::Component;
use lora_core::ldm::{LdmTensor, ModelPart};
use lora_core::{AdapterFile, LoraModule, ModelModules};
use safetensors::Dtype;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::checkpoint::{canonical, Checkpoint, Layout};
use crate::stream::{write_streaming, PlannedTensor};

/// `FILE[:WEIGHT]` as given to `--lora`; the weight defaults to 1.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub path: PathBuf,
    pub weight: f64,
}

impl FromStr for AdapterSpec {
    type Err = anyhow::Error;
    /// The text after the last `:` is a weight only if it parses as a number, so paths that
    /// contain `:` still work without one.
    fn from_str(s: &str) -> Result<Self> {
        let (path, weight) = match s.rsplit_once(':') {
            Some((path, w)) if !path.is_empty() && w.parse::<f64>().is_ok() => {
                (path, w.parse::<f64>()?)
            }
            _ => (s, 1.0),
        };
        ensure!(weight.is_finite(), "adapter weight in `{s}` is not finite");
        Ok(Self {
            path: PathBuf::from(path),
            weight,
        })
    }
}

/// Floating-point dtype of the output (`--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputDtype {
    F16,
    Bf16,
    F32,
}

impl FromStr for OutputDtype {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp16" | "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            "fp32" | "f32" => Ok(Self::F32),
            _ => bail!("unknown dtype `{s}`: expected fp16, bf16 or fp32"),
        }
    }
}

impl OutputDtype {
    fn stored(self) -> Dtype {
        match self {
            Self::F16 => Dtype::F16,
            Self::Bf16 => Dtype::BF16,
            Self::F32 => Dtype::F32,
        }
    }
}

#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub base: PathBuf,
    pub adapters: Vec<AdapterSpec>,
    pub output: PathBuf,
    /// Output dtype of floating-point tensors; `None` keeps each tensor's dtype.
    pub dtype: Option<OutputDtype>,
    /// Warn about adapter modules that match nothing in the base instead of failing.
    pub allow_unmatched: bool,
}

/// What a merge did.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    /// Per adapter file: how many modules were folded in.
    pub merged_modules: Vec<(PathBuf, usize)>,
    /// Adapter modules that matched nothing (only with `allow_unmatched`).
    pub unmatched: Vec<String>,
    pub tensors_changed: usize,
}

/// One adapter module to add to a weight, with its merge weight.
type Contributions = HashMap<(Component, String), Vec<(LoraModule, f64)>>;

/// Merges `options.adapters` into `options.base`, writing `options.output` in the base's layout.
/// Nothing is written unless every adapter resolves; the output appears only when complete.
pub fn merge(options: &MergeOptions) -> Result<MergeReport> {
    ensure!(!options.adapters.is_empty(), "no adapter given (--lora)");
    check_output_is_new(&options.base, &options.output)?;
    let base = Checkpoint::open(&options.base)?;
    let (unet, te) = base.modules();
    let model = ModelModules {
        unet: &unet,
        text_encoder: Some(&te),
    };
    let mut report = MergeReport::default();
    let mut contributions = Contributions::new();
    let mut records = Vec::new();
    for spec in &options.adapters {
        let file = AdapterFile::read(&spec.path, &Device::Cpu)?;
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
        ];
        let mut count = 0;
        for (component, modules) in parts {
            for (path, module) in modules {
                let key = (component, component.canonical_path(&path));
                contributions
                    .entry(key)
                    .or_default()
                    .push((module, spec.weight));
                count += 1;
            }
        }
        report.merged_modules.push((spec.path.clone(), count));
        records.push(adapter_record(spec, file.format().name())?);
    }
    let provenance = BTreeMap::from([(
        "lora_merge.adapters".to_string(),
        serde_json::to_string(&records)?,
    )]);
    let merger = Merger {
        base: &base,
        contributions: &contributions,
        dtype: options.dtype,
    };
    report.tensors_changed = match base.layout {
        Layout::SingleFile(_) => merger.write_single_file(&options.output, provenance)?,
        Layout::Diffusers => merger.write_folder(&options.output, provenance)?,
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
    Ok(json!({"file": name, "weight": spec.weight, "format": format, "sha256": hex}))
}

/// The input is never modified: the output must be another path, and a folder output must not
/// exist yet (a folder cannot be replaced atomically).
fn check_output_is_new(base: &Path, output: &Path) -> Result<()> {
    if let (Ok(a), Ok(b)) = (base.canonicalize(), output.canonicalize()) {
        ensure!(
            a != b,
            "output {} is the base model itself; write to a new path",
            output.display()
        );
    }
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
    base: &'a Checkpoint,
    contributions: &'a Contributions,
    dtype: Option<OutputDtype>,
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
        let name = output
            .file_name()
            .with_context(|| format!("{} does not name a folder", output.display()))?;
        let temp = output.with_file_name(format!(
            ".{}.tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let result = self.fill_folder(&temp, provenance).and_then(|changed| {
            std::fs::rename(&temp, output).with_context(|| {
                format!("cannot rename {} to {}", temp.display(), output.display())
            })?;
            Ok(changed)
        });
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&temp);
        }
        result
    }

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
            (Some(d), Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64) => d.stored(),
            _ => stored,
        }
    }

    /// For entry `i`: the contributions to each of its diffusers weights (three for stacked
    /// q/k/v), or an empty list when nothing changes it.
    fn deltas_for(&self, i: usize) -> Vec<Option<&Vec<(LoraModule, f64)>>> {
        let lookup = |part: ModelPart, name: &str| {
            let component = match part {
                ModelPart::Unet => Component::Unet,
                ModelPart::TextEncoder => Component::TextEncoder,
                ModelPart::Vae => return None,
            };
            let path = canonical(part, name.strip_suffix(".weight")?);
            self.contributions.get(&(component, path))
        };
        let found: Vec<Option<&Vec<(LoraModule, f64)>>> = match &self.base.entries[i].meaning {
            LdmTensor::Renamed(t) => vec![lookup(t.part, &t.name)],
            LdmTensor::StackedQkv(parts) => parts.iter().map(|t| lookup(t.part, &t.name)).collect(),
            LdmTensor::Other => vec![],
        };
        if found.iter().all(Option::is_none) {
            Vec::new()
        } else {
            found
        }
    }

    /// The output bytes of entry `i` in `dtype`: the stored bytes when nothing changes, else
    /// the weight in f32 plus the weighted deltas, cast.
    fn produce(&self, i: usize, dtype: Dtype) -> Result<Vec<u8>> {
        let e = &self.base.entries[i];
        let deltas = self.deltas_for(i);
        if deltas.is_empty() && dtype == e.dtype {
            return self.base.entry_bytes(i);
        }
        let mut w = self.base.load_entry(i)?.to_dtype(DType::F32)?;
        if !deltas.is_empty() {
            let delta = self.summed_delta(i, &deltas)?;
            w = (w + delta)?;
        }
        let w = w.to_dtype(candle_dtype(dtype)?)?;
        Ok(safetensors::View::data(&w).into_owned())
    }

    /// Σ weight·ΔW for entry `i`, shaped like the stored tensor (1×1 convs, stacked q/k/v with
    /// zero blocks for parts without an adapter).
    fn summed_delta(&self, i: usize, deltas: &[Option<&Vec<(LoraModule, f64)>>]) -> Result<Tensor> {
        let e = &self.base.entries[i];
        let rows = e.shape[0] / deltas.len();
        let cols: usize = e.shape[1..].iter().product();
        let mut blocks = Vec::with_capacity(deltas.len());
        for contributions in deltas {
            let mut sum = Tensor::zeros((rows, cols), DType::F32, &Device::Cpu)?;
            for (module, weight) in contributions.map(Vec::as_slice).unwrap_or_default() {
                let delta = (module.delta_weight()? * *weight)?;
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

fn candle_dtype(dtype: Dtype) -> Result<DType> {
    Ok(match dtype {
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        other => bail!("cannot convert a {other:?} tensor"),
    })
}

/// Copies a diffusers folder's non-weight files (model_index.json, configs, tokenizer,
/// scheduler) into `to`. Weight files are skipped: the merge writes the ones it read, and stale
/// variants (`*.fp16.safetensors`, `*.bin`) would hold unmerged weights.
fn copy_folder_files(from: &Path, to: &Path, weight_files: &[PathBuf]) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    let index = from.join("model_index.json");
    if index.is_file() {
        std::fs::copy(&index, to.join("model_index.json"))?;
    }
    for sub in ["unet", "text_encoder", "vae", "tokenizer", "scheduler"] {
        let dir = from.join(sub);
        if !dir.is_dir() {
            continue;
        }
        std::fs::create_dir_all(to.join(sub))?;
        for item in std::fs::read_dir(&dir)? {
            let path = item?.path();
            let is_weights = ["safetensors", "bin", "ckpt"]
                .iter()
                .any(|ext| path.extension().is_some_and(|e| e == *ext));
            if path.is_file() && !is_weights && !weight_files.contains(&path) {
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
    fn adapter_specs_parse_weights_and_paths_with_colons() {
        let spec: AdapterSpec = "a.safetensors:0.5".parse().unwrap();
        assert_eq!(
            (spec.path, spec.weight),
            (PathBuf::from("a.safetensors"), 0.5)
        );
        let spec: AdapterSpec = "dir:x/a.safetensors".parse().unwrap();
        assert_eq!(
            (spec.path, spec.weight),
            (PathBuf::from("dir:x/a.safetensors"), 1.0)
        );
        assert!("a:inf".parse::<AdapterSpec>().is_err());
    }
}
