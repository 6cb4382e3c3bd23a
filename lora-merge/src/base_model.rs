//! A base model opened for merging: a diffusers folder (`unet/`, `text_encoder/`, `vae/`) or a
//! single-file LDM checkpoint, memory-mapped, with every tensor's meaning in diffusers terms.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use lora_core::formats::checkpoint_kind::{ema_key, has_ema, refuse_other_models};
use lora_core::formats::keys::{locon_module_from_weight, module_from_weight, Component};
use lora_core::formats::ldm::{
    DiffusersTensor, LdmLayout, LdmTensor, ModelPart, TextEncoderLayout,
};
use lora_core::io::weights::{component_weights, header_metadata, release_mapped};
use lora_core::{ModelModules, ModuleInfo};
use safetensors::{Dtype, SafeTensors};

/// How the checkpoint is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// A diffusers folder, one weights file per model part.
    Diffusers,
    /// One `.safetensors` file with original LDM keys.
    SingleFile(LdmLayout),
}

/// One memory-mapped weights file.
pub struct WeightFile {
    pub path: PathBuf,
    /// The model part the whole file holds (diffusers folders); `None` for a single file.
    pub part: Option<ModelPart>,
    mmap: memmap2::Mmap,
}

impl WeightFile {
    fn open(path: &Path, part: Option<ModelPart>) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open weights file {}", path.display()))?;
        // SAFETY: read-only mapping of a file this tool never writes (outputs go to new files).
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let weights = Self {
            path: path.to_path_buf(),
            part,
            mmap,
        };
        lora_core::io::files::check_shapes(path, &weights.tensors()?)?;
        Ok(weights)
    }

    /// The parsed file (header only; data stays mapped).
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap)
            .with_context(|| lora_core::io::not_safetensors(&self.path, &self.mmap))
    }

    /// Drops the pages of `data` (a slice of this file's mapping) from the process's resident
    /// set once a tensor has been copied out or written: a merge reads every tensor once, and
    /// without this peak RSS grows to the checkpoint's size.
    fn release(&self, data: &[u8]) {
        assert!(
            data.is_empty() || self.mmap.as_ptr_range().contains(&data.as_ptr()),
            "released bytes outside this file's mapping"
        );
        // SAFETY: `data` lies in this file's read-only mapping (checked above), never written.
        unsafe { release_mapped(data) };
    }

    /// The `__metadata__` of the header.
    pub fn metadata(&self) -> Result<std::collections::BTreeMap<String, String>> {
        header_metadata(&self.path)
    }
}

/// A tensor's bytes on their way to an output: borrowed from a base file's mapping (an
/// unchanged tensor, written without a copy; only [`BaseModel::entry_bytes`] makes these) or
/// computed. Dropping mapped bytes releases their pages, so once written they stop counting
/// towards peak memory.
pub struct TensorBytes<'a>(Source<'a>);

enum Source<'a> {
    Mapped {
        file: &'a WeightFile,
        data: &'a [u8],
    },
    Computed(Vec<u8>),
}

impl TensorBytes<'_> {
    pub fn computed(bytes: Vec<u8>) -> Self {
        Self(Source::Computed(bytes))
    }
}

impl std::ops::Deref for TensorBytes<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Source::Mapped { data, .. } => data,
            Source::Computed(bytes) => bytes,
        }
    }
}

impl AsRef<[u8]> for TensorBytes<'_> {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for TensorBytes<'_> {
    fn drop(&mut self) {
        if let Source::Mapped { file, data } = self.0 {
            file.release(data);
        }
    }
}

/// One stored tensor and what it is in diffusers terms.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Index into [`BaseModel::files`].
    pub file: usize,
    pub key: String,
    pub meaning: LdmTensor,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// For a UNet weight stored twice (a single file with an EMA copy): which copy this is.
    pub copy: Option<UNetCopy>,
}

/// The two copies of a UNet weight in a single file that holds an EMA copy beside the plain one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UNetCopy {
    Plain,
    Ema,
}

/// Where a diffusers weight lives: the entry, and how the weight is stored in it.
#[derive(Debug, Clone, Copy)]
struct Location {
    entry: usize,
    form: StoredForm,
}

/// How a diffusers weight is stored in its entry.
#[derive(Debug, Clone, Copy)]
enum StoredForm {
    Whole,
    /// This third (q, k, v) of OpenCLIP's stacked rows.
    Third(usize),
    /// Transposed (SDXL OpenCLIP's `text_projection`).
    Transposed,
}

/// A model's adaptable modules per component (text encoders present only where the model has
/// them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ComponentModules(pub BTreeMap<Component, Vec<ModuleInfo>>);

impl ComponentModules {
    pub fn of(&self, component: Component) -> &[ModuleInfo] {
        self.0.get(&component).map_or(&[], Vec::as_slice)
    }

    /// As adapters are resolved against them: both text encoders where the model has them
    /// (kohya's SDXL names then).
    pub fn model(&self) -> ModelModules<'_> {
        ModelModules {
            unet: self.of(Component::Unet),
            text_encoder: Some(self.of(Component::TextEncoder)),
            text_encoder_2: self.0.get(&Component::TextEncoder2).map(Vec::as_slice),
        }
    }
}

pub struct BaseModel {
    pub root: PathBuf,
    pub layout: Layout,
    pub files: Vec<WeightFile>,
    /// Every stored tensor. Both copies of a UNet weight stored twice mean the same diffusers
    /// weight (a merge changes both); [`BaseModel::read_as_model`] tells the one the model is
    /// read as.
    pub entries: Vec<Entry>,
    /// The copy the model is read as, when the file holds two.
    pub chosen_copy: Option<UNetCopy>,
    by_name: HashMap<(ModelPart, String), Location>,
}

impl BaseModel {
    /// [`open_with`](Self::open_with) reading a single file's EMA copy of the UNet, when it has
    /// one, as the model (as every binary does by default).
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, true)
    }

    /// Opens a diffusers folder or a single-file checkpoint; anything else is an error saying
    /// which layouts are understood. A single file of a model other than SD 1.x/2.x/SDXL is refused
    /// naming it. With `use_ema` a single file's EMA copy of the UNet (when it has one) is the
    /// model; otherwise its plain weights.
    pub fn open_with(path: &Path, use_ema: bool) -> Result<Self> {
        let (layout, files) = if path.is_dir() {
            (Layout::Diffusers, diffusers_files(path)?)
        } else if path.is_file() {
            let file = WeightFile::open(path, None)?;
            let names: Vec<String> = file
                .tensors()?
                .names()
                .into_iter()
                .map(str::to_string)
                .collect();
            refuse_other_models(names.iter().map(String::as_str))
                .with_context(|| path.display().to_string())?;
            let layout = LdmLayout::detect(names.iter().map(String::as_str)).with_context(|| {
                format!(
                    "{}: unknown checkpoint layout (expected a diffusers folder or a single-file \
                     checkpoint with model.diffusion_model./first_stage_model./cond_stage_model. (SDXL: \
                     conditioner.embedders.) keys)",
                    path.display()
                )
            })?;
            (Layout::SingleFile(layout), vec![file])
        } else {
            bail!("base model {} does not exist", path.display());
        };
        let mut entries = list_entries(layout, &files)?;
        let chosen_copy = pair_ema_copies(path, &mut entries)?.then_some(if use_ema {
            UNetCopy::Ema
        } else {
            UNetCopy::Plain
        });
        let mut base = Self {
            root: path.to_path_buf(),
            layout,
            files,
            entries,
            chosen_copy,
            by_name: HashMap::new(),
        };
        base.by_name = index_entries(&base);
        Ok(base)
    }

    /// Whether entry `e` is part of the model as it is read: every tensor but the copy of a
    /// twice-stored UNet weight that was not chosen.
    pub fn read_as_model(&self, e: &Entry) -> bool {
        e.copy.is_none() || e.copy == self.chosen_copy
    }

    /// The adaptable modules (UNet, text encoders) with their diffusers paths, sorted: kohya's
    /// attn-mlp set (what `extract` targets and the runtime UNet adapts).
    pub fn modules(&self) -> ComponentModules {
        self.modules_with(module_from_weight)
    }

    /// Whether the model is SDXL's (it has a second text encoder).
    pub fn is_sdxl(&self) -> bool {
        match self.layout {
            Layout::Diffusers => self
                .files
                .iter()
                .any(|f| f.part == Some(ModelPart::TextEncoder2)),
            Layout::SingleFile(ldm) => ldm.text_encoder == TextEncoderLayout::Sdxl,
        }
    }

    /// The modules an adapter may be merged into: [`modules`](Self::modules) plus the resnet,
    /// downsampler and upsampler layers that kohya `conv_dim` / LyCORIS LoCon adapters target
    /// (3×3 convs included).
    pub fn merge_modules(&self) -> ComponentModules {
        self.modules_with(locon_module_from_weight)
    }

    fn modules_with(
        &self,
        select: fn(Component, &str, &[usize]) -> Option<ModuleInfo>,
    ) -> ComponentModules {
        let mut modules = ComponentModules::default();
        for (part, name, shape) in self.diffusers_tensors() {
            let Some(component) = part.component() else {
                continue;
            };
            if let Some(info) = select(component, &name, &shape) {
                modules.0.entry(component).or_default().push(info);
            }
        }
        for list in modules.0.values_mut() {
            list.sort_by(|a, b| a.path.cmp(&b.path));
        }
        modules
    }

    /// Every diffusers tensor with its diffusers shape (stacked q/k/v split into thirds).
    fn diffusers_tensors(&self) -> Vec<(ModelPart, String, Vec<usize>)> {
        let mut out = Vec::new();
        for e in self.entries.iter().filter(|e| self.read_as_model(e)) {
            match &e.meaning {
                LdmTensor::Renamed(t) => out.push((t.part, t.name.clone(), e.shape.clone())),
                LdmTensor::StackedQkv(parts) => {
                    let mut shape = e.shape.clone();
                    shape[0] /= 3;
                    for t in parts {
                        out.push((t.part, t.name.clone(), shape.clone()));
                    }
                }
                LdmTensor::Transposed(t) => {
                    let shape = e.shape.iter().rev().copied().collect();
                    out.push((t.part, t.name.clone(), shape));
                }
                LdmTensor::Other => {}
            }
        }
        out
    }

    /// The stored tensor of entry `i`, as stored (dtype and shape).
    pub fn load_entry(&self, i: usize) -> Result<Tensor> {
        let e = &self.entries[i];
        let file = &self.files[e.file];
        let view = file.tensors()?.tensor(&e.key)?;
        let tensor = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .with_context(|| format!("{}: cannot load `{}`", file.path.display(), e.key))?;
        file.release(view.data());
        Ok(tensor)
    }

    /// The raw bytes of entry `i`, borrowed from the file's mapping.
    pub fn entry_bytes(&self, i: usize) -> Result<TensorBytes<'_>> {
        let e = &self.entries[i];
        let file = &self.files[e.file];
        let data = file.tensors()?.tensor(&e.key)?.data();
        Ok(TensorBytes(Source::Mapped { file, data }))
    }

    /// The diffusers weight `name` of `part` in f32, in its stored shape (a third of the rows for
    /// stacked q/k/v; diffusers' for a transposed one). Text-encoder names are compared with the
    /// `text_model.` level.
    pub fn load_f32(&self, part: ModelPart, name: &str) -> Result<Tensor> {
        let location = self
            .by_name
            .get(&(part, part.canonical_name(name)))
            .with_context(|| format!("{}: no {part} tensor `{name}`", self.root.display()))?;
        let t = self.load_entry(location.entry)?.to_dtype(DType::F32)?;
        Ok(match location.form {
            StoredForm::Whole => t,
            StoredForm::Third(k) => {
                let rows = t.dim(0)? / 3;
                t.narrow(0, k * rows, rows)?
            }
            StoredForm::Transposed => t.t()?.contiguous()?,
        })
    }
}

fn diffusers_files(dir: &Path) -> Result<Vec<WeightFile>> {
    let mut files = Vec::new();
    for part in ModelPart::ALL {
        let sub = dir.join(part.folder());
        let stem = match part {
            ModelPart::TextEncoder | ModelPart::TextEncoder2 => "model",
            _ => "diffusion_pytorch_model",
        };
        // Optional: the VAE (pixel-space models have none), the second text encoder (SDXL's).
        if matches!(part, ModelPart::Vae | ModelPart::TextEncoder2) && !sub.is_dir() {
            continue;
        }
        ensure!(
            sub.is_dir(),
            "{}: unknown model layout: no {}/ folder (expected a diffusers folder with unet/ and \
             text_encoder/, or a single-file .safetensors checkpoint)",
            dir.display(),
            part.folder()
        );
        files.push(WeightFile::open(
            &component_weights(&sub, stem)?,
            Some(part),
        )?);
    }
    Ok(files)
}

fn list_entries(layout: Layout, files: &[WeightFile]) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for (index, file) in files.iter().enumerate() {
        let tensors = file.tensors()?;
        let mut names: Vec<&str> = tensors.names();
        names.sort();
        for name in names {
            let view = tensors.tensor(name)?;
            let meaning = match (layout, file.part) {
                (Layout::SingleFile(ldm), _) => ldm
                    .diffusers_name(name)
                    .with_context(|| file.path.display().to_string())?,
                (Layout::Diffusers, Some(part)) => LdmTensor::Renamed(DiffusersTensor {
                    part,
                    name: name.to_string(),
                }),
                (Layout::Diffusers, None) => unreachable!("folder files always have a part"),
            };
            entries.push(Entry {
                file: index,
                key: name.to_string(),
                meaning,
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                copy: None,
            });
        }
    }
    Ok(entries)
}

/// Gives the EMA copy of each UNet weight (`model_ema.…`, when the file holds a whole one) the
/// meaning of its plain twin and marks both; whether there was such a copy. Every UNet weight
/// must have a twin of its shape and dtype, as the loader requires (`SingleFile::open`).
fn pair_ema_copies(path: &Path, entries: &mut [Entry]) -> Result<bool> {
    if !has_ema(entries.iter().map(|e| e.key.as_str())) {
        return Ok(false);
    }
    let by_key: HashMap<String, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.key.clone(), i))
        .collect();
    for i in 0..entries.len() {
        let is_unet =
            matches!(&entries[i].meaning, LdmTensor::Renamed(t) if t.part == ModelPart::Unet);
        let Some(twin_key) = ema_key(&entries[i].key).filter(|_| is_unet) else {
            continue;
        };
        let (plain, key) = (&entries[i], &entries[i].key);
        let j = *by_key.get(&twin_key).with_context(|| {
            format!(
                "{} holds EMA weights (`model_ema.…`) but none for `{key}` (expected \
                 `{twin_key}`)",
                path.display()
            )
        })?;
        let twin = &entries[j];
        ensure!(
            twin.shape == plain.shape && twin.dtype == plain.dtype,
            "{}: EMA weight `{twin_key}` is {:?} {:?} but `{key}` is {:?} {:?}",
            path.display(),
            twin.dtype,
            twin.shape,
            plain.dtype,
            plain.shape
        );
        entries[j].meaning = entries[i].meaning.clone();
        entries[i].copy = Some(UNetCopy::Plain);
        entries[j].copy = Some(UNetCopy::Ema);
    }
    Ok(true)
}

fn index_entries(base: &BaseModel) -> HashMap<(ModelPart, String), Location> {
    let mut index = HashMap::new();
    for (i, e) in base.entries.iter().enumerate() {
        if !base.read_as_model(e) {
            continue;
        }
        let mut insert = |t: &DiffusersTensor, form| {
            let location = Location { entry: i, form };
            index.insert((t.part, t.part.canonical_name(&t.name)), location);
        };
        match &e.meaning {
            LdmTensor::Renamed(t) => insert(t, StoredForm::Whole),
            LdmTensor::StackedQkv(parts) => {
                for (k, t) in parts.iter().enumerate() {
                    insert(t, StoredForm::Third(k));
                }
            }
            LdmTensor::Transposed(t) => insert(t, StoredForm::Transposed),
            LdmTensor::Other => {}
        }
    }
    index
}
