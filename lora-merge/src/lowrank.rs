//! Adapter-to-adapter operations: `svd` (exact weighted sum re-factored), `resize` (new rank,
//! effective scale kept) and `extract` (an adapter from the difference of two checkpoints).
//! Outputs are kohya-layout files (`lora_unet_…`/`lora_te_…`, per-module alpha), which every
//! loader reads and which can hold a different rank and alpha per module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use lora_core::formats::keys::{kohya_name, Component, KohyaNamer};
use lora_core::formats::kohya::{kohya_tensors, network_metadata, KohyaModule};
use lora_core::formats::ldm::ModelPart;
use lora_core::io::write_safetensors_atomic;
use lora_core::options::{check_output, AdapterSpec};
use lora_core::{AdapterFile, AdapterFormat, ModuleKind};
use nalgebra::DMatrix;
use rayon::prelude::*;

use crate::algebra::{select_rank, to_matrix, to_tensor, DynamicRank, Svd};
use crate::base_model::BaseModel;

/// One module of an output adapter.
#[derive(Debug, Clone)]
pub struct OutputModule {
    /// Full kohya name (`lora_unet_…`).
    pub name: String,
    /// `Some((kh, kw))`: stored 4-D as a conv adapter, down `[r, in, kh, kw]` (the down matrix
    /// is `[r, in·kh·kw]`) and up `[out, r, 1, 1]`; `(1, 1)` for 1×1 convs.
    pub kernel: Option<(usize, usize)>,
    pub up: DMatrix<f64>,
    pub down: DMatrix<f64>,
    pub alpha: f64,
}

/// Per-module numbers of a rank change, for the summary.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSummary {
    pub name: String,
    pub old_rank: usize,
    pub new_rank: usize,
    /// `‖ΔW − ΔW_new‖_F`.
    pub error: f64,
    /// `‖ΔW‖²_F`, the module's Frobenius energy before truncation.
    pub energy: f64,
}

/// The result of `svd`, `resize` or `extract`.
#[derive(Debug, Clone, Default)]
pub struct LowRankReport {
    pub modules: Vec<ModuleSummary>,
    /// Modules `extract` skipped because their difference was at most `--min-diff`.
    pub skipped: Vec<String>,
}

impl LowRankReport {
    /// Share of the total Frobenius energy (all modules) kept: `1 − Σ error² / Σ ‖ΔW‖²`.
    pub fn energy_kept(&self) -> f64 {
        let total: f64 = self.modules.iter().map(|m| m.energy).sum();
        let dropped: f64 = self.modules.iter().map(|m| m.error * m.error).sum();
        if total == 0.0 {
            1.0
        } else {
            1.0 - dropped / total
        }
    }
}

/// `svd`: per module, `Σᵢ weightᵢ · (alphaᵢ/rankᵢ) · upᵢ·downᵢ` over the adapters that have it,
/// truncated to `rank` (or fewer with `dynamic`); alpha = new rank (scale 1).
pub fn svd_merge(
    adapters: &[AdapterSpec],
    rank: usize,
    dynamic: Option<DynamicRank>,
    output: &Path,
) -> Result<LowRankReport> {
    ensure!(rank > 0, "--rank must be at least 1");
    ensure!(!adapters.is_empty(), "no adapter given (--lora)");
    let inputs: Vec<(&str, &Path)> = adapters
        .iter()
        .map(|a| ("--lora", a.path.as_path()))
        .collect();
    check_output("--output", output, &inputs)?;
    let mut terms: BTreeMap<String, Vec<Term>> = BTreeMap::new();
    for spec in adapters {
        for module in read_modules(&spec.path)? {
            let scaled_up = module.up * (module.alpha / module.down.nrows() as f64 * spec.scale);
            terms.entry(module.name.clone()).or_default().push(Term {
                path: spec.path.clone(),
                kernel: module.kernel,
                up: scaled_up,
                down: module.down,
            });
        }
    }
    let results: Vec<(OutputModule, ModuleSummary)> = terms
        .into_par_iter()
        .map(|(name, terms)| {
            let (up, down, kernel) = stack_terms(&name, &terms)?;
            let svd = Svd::of_product(&up, &down)?;
            let k = select_rank(&svd.singular, rank, dynamic);
            Ok(refactored(name, kernel, &svd, k, up.ncols()))
        })
        .collect::<Result<_>>()?;
    finish(output, results, Vec::new(), "svd")
}

/// `resize`: each module re-factored at `rank` (or fewer with `dynamic`, capped at `rank` or at
/// the module's rank), with `alpha = (old alpha / old rank) · new rank` so the scale is kept.
pub fn resize(
    input: &Path,
    rank: Option<usize>,
    dynamic: Option<DynamicRank>,
    output: &Path,
) -> Result<LowRankReport> {
    ensure!(
        rank.is_some() || dynamic.is_some(),
        "resize needs --rank, --dynamic, or both"
    );
    ensure!(rank != Some(0), "--rank must be at least 1");
    check_output("--output", output, &[("--lora", input)])?;
    let modules = read_modules(input)?;
    let results: Vec<(OutputModule, ModuleSummary)> = modules
        .into_par_iter()
        .map(|m| {
            let old_rank = m.down.nrows();
            let scale = m.alpha / old_rank as f64;
            let svd = Svd::of_product(&(&m.up * scale), &m.down)?;
            let k = select_rank(&svd.singular, rank.unwrap_or(old_rank), dynamic);
            let (mut out, summary) = refactored(m.name, m.kernel, &svd, k, old_rank);
            // Keep alpha/rank: the stored up carries σ / scale.
            out.up /= scale;
            out.alpha = scale * k as f64;
            Ok((out, summary))
        })
        .collect::<Result<_>>()?;
    finish(output, results, Vec::new(), "resize")
}

/// `extract`: per adaptable module of `base` (kohya's attn-mlp set, UNet and text encoder),
/// the SVD of `W_tuned − W_base` at `rank`; modules whose largest change is at most
/// `min_diff` are skipped. Alpha = rank (scale 1).
pub fn extract(
    base: &Path,
    tuned: &Path,
    rank: usize,
    min_diff: f64,
    output: &Path,
) -> Result<LowRankReport> {
    ensure!(rank > 0, "--rank must be at least 1");
    check_output("--output", output, &[("--base", base), ("--tuned", tuned)])?;
    let base = BaseModel::open(base)?;
    let tuned = BaseModel::open(tuned)?;
    let adaptable = base.modules();
    ensure!(
        adaptable == tuned.modules(),
        "{} and {} are different models (their adaptable modules or shapes differ)",
        base.root.display(),
        tuned.root.display()
    );
    // kohya's names for the model: SDXL's numbering where it is SDXL.
    let namer = KohyaNamer::new(adaptable.of(Component::Unet), base.is_sdxl())?;
    let modules: Vec<(Component, ModelPart, lora_core::ModuleInfo)> = ModelPart::ALL
        .into_iter()
        .filter_map(|part| Some((part.component()?, part)))
        .flat_map(|(component, part)| {
            adaptable
                .of(component)
                .iter()
                .map(move |m| (component, part, m.clone()))
        })
        .collect();
    let results: Vec<Option<(OutputModule, ModuleSummary)>> = modules
        .par_iter()
        .map(|(component, part, info)| {
            let weight = format!("{}.weight", info.path);
            let shape = (info.out_features, info.in_features);
            let w_base = base.load_f32(*part, &weight)?.reshape(shape)?;
            let w_tuned = tuned.load_f32(*part, &weight)?.reshape(shape)?;
            let diff = (w_tuned - w_base)?;
            let largest = diff.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            if f64::from(largest) <= min_diff {
                return Ok(None);
            }
            let svd = Svd::of(to_matrix(&diff)?)?;
            let k = rank.min(svd.singular.len());
            let name = namer.name(*component, &info.path);
            let kernel = (info.kind == ModuleKind::Conv1x1).then_some((1, 1));
            let full_rank = info.in_features.min(info.out_features);
            Ok(Some(refactored(name, kernel, &svd, k, full_rank)))
        })
        .collect::<Result<_>>()?;
    let skipped = modules
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_none())
        .map(|((c, _, info), _)| namer.name(*c, &info.path))
        .collect();
    let results: Vec<_> = results.into_iter().flatten().collect();
    ensure!(
        !results.is_empty(),
        "no module differs by more than --min-diff {min_diff} between {} and {}",
        base.root.display(),
        tuned.root.display()
    );
    finish(output, results, skipped, "extract")
}

/// One adapter's contribution to an `svd` module: up already scaled by weight·alpha/rank.
struct Term {
    path: PathBuf,
    kernel: Option<(usize, usize)>,
    up: DMatrix<f64>,
    down: DMatrix<f64>,
}

/// A conv adapter's kernel `(kh, kw)`; `None` for Linear layers.
type Kernel = Option<(usize, usize)>;

/// `[up₁ | up₂ …]` and `[down₁; down₂ …]`, whose product is the exact sum of the terms.
fn stack_terms(name: &str, terms: &[Term]) -> Result<(DMatrix<f64>, DMatrix<f64>, Kernel)> {
    let first = &terms[0];
    for t in &terms[1..] {
        ensure!(
            t.up.nrows() == first.up.nrows()
                && t.down.ncols() == first.down.ncols()
                && t.kernel.unwrap_or((1, 1)) == first.kernel.unwrap_or((1, 1)),
            "`{name}`: {} has ΔW [{}, {}] but {} has [{}, {}]; the adapters are for different models",
            first.path.display(),
            first.up.nrows(),
            first.down.ncols(),
            t.path.display(),
            t.up.nrows(),
            t.down.ncols()
        );
    }
    let rank: usize = terms.iter().map(|t| t.up.ncols()).sum();
    let mut up = DMatrix::zeros(first.up.nrows(), rank);
    let mut down = DMatrix::zeros(rank, first.down.ncols());
    let mut at = 0;
    for t in terms {
        let r = t.up.ncols();
        up.columns_mut(at, r).copy_from(&t.up);
        down.rows_mut(at, r).copy_from(&t.down);
        at += r;
    }
    Ok((up, down, first.kernel))
}

/// The module at rank `k` with alpha = k (scale 1), and its summary.
fn refactored(
    name: String,
    kernel: Option<(usize, usize)>,
    svd: &Svd,
    k: usize,
    old_rank: usize,
) -> (OutputModule, ModuleSummary) {
    let (up, down) = svd.factors(k);
    let summary = ModuleSummary {
        name: name.clone(),
        old_rank,
        new_rank: k,
        error: svd.truncation_error(k),
        energy: svd.energy(),
    };
    let module = OutputModule {
        name,
        kernel,
        up,
        down,
        alpha: k as f64,
    };
    (module, summary)
}

fn finish(
    output: &Path,
    results: Vec<(OutputModule, ModuleSummary)>,
    skipped: Vec<String>,
    operation: &str,
) -> Result<LowRankReport> {
    let (modules, summaries): (Vec<OutputModule>, Vec<ModuleSummary>) = results.into_iter().unzip();
    write_output(output, &modules, operation)?;
    Ok(LowRankReport {
        modules: summaries,
        skipped,
    })
}

/// A module of an input adapter, named by its kohya name whatever the file's layout.
struct InputModule {
    name: String,
    kernel: Option<(usize, usize)>,
    up: DMatrix<f64>,
    down: DMatrix<f64>,
    alpha: f64,
}

fn read_modules(path: &Path) -> Result<Vec<InputModule>> {
    let file = AdapterFile::read(path, &Device::Cpu)?;
    let four_d = four_d_keys(path)?;
    // An SDXL adapter keeps `lora_te1_` for the first text encoder.
    let sdxl = file.is_sdxl();
    file.raw_modules()
        .iter()
        .map(|raw| {
            let name = match file.format() {
                AdapterFormat::Kohya => {
                    format!("{}{}", raw.component.kohya_prefix_for(sdxl), raw.name)
                }
                AdapterFormat::Peft => kohya_name(raw.component, &raw.name, sdxl),
            };
            // A DoRA module's magnitude belongs to its base weight and its own ΔW: no rank
            // change or sum of ΔWs keeps it meaningful.
            ensure!(
                raw.magnitude.is_none(),
                "{}: `{}` is a DoRA module; resizing and SVD-merging DoRA adapters is not \
                 supported (fold it into the model with `lora-merge` instead)",
                path.display(),
                raw.down_key
            );
            Ok(InputModule {
                name,
                kernel: raw
                    .kernel
                    .or_else(|| four_d.contains(&raw.down_key).then_some((1, 1))),
                up: to_matrix(&raw.up)?,
                down: to_matrix(&raw.down)?,
                alpha: raw.alpha,
            })
        })
        .collect()
}

/// Keys of 4-D tensors in a safetensors file (1×1-conv adapters keep that shape on output).
fn four_d_keys(path: &Path) -> Result<std::collections::HashSet<String>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    Ok(header
        .tensors()
        .into_iter()
        .filter(|(_, info)| info.shape.len() == 4)
        .map(|(name, _)| name)
        .collect())
}

/// Writes `modules` as a kohya-layout adapter (lora-core's kohya writer) with sd-scripts'
/// network keys and what this operation did.
fn write_output(path: &Path, modules: &[OutputModule], operation: &str) -> Result<()> {
    let modules: Vec<KohyaModule> = modules
        .iter()
        .map(|m| {
            Ok(KohyaModule {
                name: m.name.clone(),
                kind: match m.kernel {
                    None => ModuleKind::Linear,
                    Some((1, 1)) => ModuleKind::Conv1x1,
                    Some((kh, kw)) => ModuleKind::Conv { kh, kw },
                },
                down: to_tensor(&m.down)?,
                up: to_tensor(&m.up)?,
                alpha: m.alpha,
                magnitude: None,
            })
        })
        .collect::<Result<_>>()?;
    let text_encoder = modules
        .iter()
        .filter(|m| Component::split_kohya_key(&m.name).is_some_and(|(c, _)| c.is_text_encoder()))
        .count();
    let mut metadata = network_metadata(&modules);
    metadata.extend([
        ("lora_merge.operation".to_string(), operation.to_string()),
        (
            "lora_merge.modules".to_string(),
            format!(
                "{} UNet, {text_encoder} text encoder",
                modules.len() - text_encoder
            ),
        ),
    ]);
    write_safetensors_atomic(path, &kohya_tensors(&modules)?, metadata)
}
