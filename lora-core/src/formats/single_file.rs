//! Reading a single-file (LDM layout) Stable Diffusion checkpoint as if it were a diffusers
//! folder's weights: a `VarBuilder` per model part that asks for diffusers names and gets the
//! checkpoint's tensors, renamed through [`crate::formats::ldm`], q/k/v cut out of OpenCLIP's
//! stacked `in_proj_*`, SDXL OpenCLIP's `text_projection` transposed, and 1×1-conv/Linear shapes
//! reconciled (same data, `[o, i, 1, 1]` vs `[o, i]`).
//!
//! The file holds no configs: [`crate::source::ModelFolder::open_single_file`] takes the built-in
//! ones of the architecture [`SingleFile::identify`] finds, or a folder of config files.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::formats::checkpoint_kind::{self, PredictionHints};
use crate::formats::ldm::{LdmLayout, LdmTensor, ModelPart, TextEncoderLayout};
use crate::io::weights;
use crate::models::config::{Architecture, PredictionType};

/// Where a diffusers tensor lives in the single file.
#[derive(Debug, Clone)]
enum Source {
    Key(String),
    /// The `index`-th third (q, k, v) of a stacked tensor.
    Stacked {
        key: String,
        index: usize,
    },
    /// The transpose of a stored matrix.
    Transposed(String),
}

/// An opened single-file checkpoint: its tensors indexed by (model part, diffusers name).
pub struct SingleFile {
    path: PathBuf,
    files: MmapedSafetensors,
    layout: LdmLayout,
    index: HashMap<(ModelPart, String), Source>,
    uses_ema: bool,
}

impl std::fmt::Debug for SingleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SingleFile")
            .field("path", &self.path)
            .field("layout", &self.layout)
            .field("tensors", &self.index.len())
            .finish()
    }
}

impl SingleFile {
    /// Maps `path` and indexes every tensor of its UNet, VAE and text encoder, the UNet's from
    /// the file's EMA copy when it has one and `use_ema`. A file without an LDM UNet and text
    /// encoder (an adapter, a diffusers component file…) or of a model we do not build (the SDXL
    /// refiner, SD 3…) is an error naming it.
    pub fn open(path: &Path, use_ema: bool) -> Result<Self> {
        let files = weights::mmap_safetensors(&[path.to_path_buf()])?;
        let keys: Vec<String> = files.tensors().into_iter().map(|(k, _)| k).collect();
        checkpoint_kind::refuse_other_models(keys.iter().map(String::as_str))
            .with_context(|| format!("{}", path.display()))?;
        let layout = LdmLayout::detect(keys.iter().map(String::as_str)).with_context(|| {
            format!(
                "{} is not a single-file Stable Diffusion checkpoint (expected LDM keys \
                 `model.diffusion_model.…`, `cond_stage_model.…` or `conditioner.embedders.…`, \
                 `first_stage_model.…`)",
                path.display()
            )
        })?;
        let uses_ema = use_ema && checkpoint_kind::has_ema(keys.iter());
        let mut index = HashMap::new();
        for key in &keys {
            let mapped = layout
                .diffusers_name(key)
                .with_context(|| format!("{}", path.display()))?;
            match mapped {
                LdmTensor::Renamed(t) => {
                    let stored = match checkpoint_kind::ema_key(key) {
                        Some(ema) if uses_ema => {
                            ensure!(
                                files.get(&ema).is_ok(),
                                "{} holds EMA weights (`model_ema.…`) but none for `{key}` \
                                 (expected `{ema}`); pass --no-ema to use the plain weights",
                                path.display()
                            );
                            ema
                        }
                        _ => key.clone(),
                    };
                    index.insert((t.part, t.name), Source::Key(stored));
                }
                LdmTensor::StackedQkv(parts) => {
                    for (i, t) in parts.into_iter().enumerate() {
                        let source = Source::Stacked {
                            key: key.clone(),
                            index: i,
                        };
                        index.insert((t.part, t.name), source);
                    }
                }
                LdmTensor::Transposed(t) => {
                    index.insert((t.part, t.name), Source::Transposed(key.clone()));
                }
                LdmTensor::Other => {}
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            files,
            layout,
            index,
            uses_ema,
        })
    }

    /// Whether the file has a tensor named `key` (a marker such as `v_pred`).
    pub fn has_key(&self, key: &str) -> bool {
        self.files.get(key).is_ok()
    }

    /// Whether the UNet's tensors come from the file's EMA copy.
    pub fn uses_ema(&self) -> bool {
        self.uses_ema
    }

    /// Every stored tensor's shape, by key.
    pub fn tensor_shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.files
            .tensors()
            .into_iter()
            .map(|(key, view)| (key, view.shape().to_vec()))
            .collect()
    }

    /// The architecture the file's tensors say it is (an error naming what else it is).
    pub fn architecture(&self) -> Result<Architecture> {
        checkpoint_kind::identify_architecture(&self.tensor_shapes())
            .with_context(|| format!("{}", self.path.display()))
    }

    /// What the file says its UNet predicts, and where it says it; `yaml` is an A1111 config
    /// found beside it.
    pub fn prediction_type(
        &self,
        architecture: Architecture,
        yaml: Option<(&Path, &str)>,
    ) -> Result<(PredictionType, String)> {
        let metadata = weights::header_metadata(&self.path)?;
        let hints = PredictionHints {
            v_pred_key: self.has_key("v_pred"),
            metadata: Some(&metadata),
            yaml,
            global_step: self.global_step(),
        };
        checkpoint_kind::identify_prediction(architecture, &hints)
            .with_context(|| format!("{}", self.path.display()))
    }

    /// The file's `global_step` scalar, if it has a readable one.
    fn global_step(&self) -> Option<i64> {
        let step = self.files.load("global_step", &Device::Cpu).ok()?;
        let value = step.flatten_all().ok()?.to_dtype(DType::F64).ok()?;
        let values = value.to_vec1::<f64>().ok()?;
        match values.as_slice() {
            [v] if v.fract() == 0.0 => Some(*v as i64),
            _ => None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// SD1's CLIP, SD2's OpenCLIP, or SDXL's two encoders.
    pub fn text_encoder_layout(&self) -> TextEncoderLayout {
        self.layout.text_encoder
    }

    /// Whether the file has tensors of `part` (a checkpoint may leave out its VAE).
    pub fn has(&self, part: ModelPart) -> bool {
        self.index.keys().any(|(p, _)| *p == part)
    }

    /// A `VarBuilder` over `part`'s tensors under their diffusers names (the text encoder's
    /// with the `text_model.` level), adding `deltas` (keyed the same way) as f32 at load,
    /// as [`weights::var_builder`] does for folders.
    pub fn var_builder(
        self: &Arc<Self>,
        part: ModelPart,
        dtype: DType,
        device: &Device,
        deltas: BTreeMap<String, Tensor>,
    ) -> Result<VarBuilder<'static>> {
        let missing: Vec<&String> = deltas
            .keys()
            .filter(|k| !self.index.contains_key(&(part, (*k).clone())))
            .collect();
        ensure!(
            missing.is_empty(),
            "{} ({part}): adapter modules have no weight in the model: {missing:?}",
            self.path.display()
        );
        let backend = PartBackend {
            file: Arc::clone(self),
            part,
            deltas,
        };
        Ok(VarBuilder::from_backend(
            Box::new(backend),
            dtype,
            device.clone(),
        ))
    }

    /// The stored tensor behind `name` of `part`, q/k/v cut out or transposed, in the file's
    /// dtype or already in `dtype` (see [`weights::read_tensor`]).
    fn raw(
        &self,
        part: ModelPart,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let msg = |e: String| {
            candle_core::Error::Msg(format!(
                "{} ({part}): tensor `{name}`: {e}",
                self.path.display()
            ))
        };
        let source = self
            .index
            .get(&(part, name.to_owned()))
            .ok_or_else(|| msg("not in the single-file checkpoint".into()))?;
        let (key, rows) = match source {
            Source::Key(key) | Source::Transposed(key) => (key, None),
            // q, k or v: a third of the stacked rows.
            Source::Stacked { key, index } => (
                key,
                Some(weights::RowPart {
                    index: *index,
                    parts: 3,
                }),
            ),
        };
        let loaded = weights::read_tensor(&self.files, key, rows, dtype, dev)
            .map_err(|e| msg(e.to_string()));
        // A stacked q/k/v tensor is read three times; its pages are re-read from the file.
        if let Ok(view) = self.files.get(key) {
            // SAFETY: the view's bytes lie in the read-only mapping of the checkpoint.
            unsafe { weights::release_mapped(view.data()) };
        }
        match source {
            Source::Transposed(_) => loaded?.t()?.contiguous(),
            Source::Key(_) | Source::Stacked { .. } => loaded,
        }
    }
}

/// The `SimpleBackend` of one model part of a [`SingleFile`].
struct PartBackend {
    file: Arc<SingleFile>,
    part: ModelPart,
    deltas: BTreeMap<String, Tensor>,
}

impl PartBackend {
    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let raw = self.file.raw(self.part, name, dtype, dev)?;
        let origin = format!("{} ({})", self.file.path.display(), self.part);
        weights::with_delta(raw, self.deltas.get(name), name, dtype, &origin)
    }

    fn error(&self, e: String) -> candle_core::Error {
        candle_core::Error::Msg(format!("{} ({}): {e}", self.file.path.display(), self.part))
    }
}

/// Whether `a` and `b` differ only by trailing size-1 dims (a 1×1 conv and its Linear).
fn same_up_to_unit_dims(a: &[usize], b: &[usize]) -> bool {
    let trim = |s: &[usize]| {
        let end = s.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
        s[..end].to_vec()
    };
    trim(a) == trim(b)
}

impl SimpleBackend for PartBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        if t.shape() == &s {
            return Ok(t);
        }
        if same_up_to_unit_dims(t.dims(), s.dims()) {
            return t.reshape(s);
        }
        Err(self.error(format!(
            "tensor `{name}` has shape {:?}, the model config expects {:?}",
            t.dims(),
            s.dims()
        )))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.file.index.contains_key(&(self.part, name.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic checkpoint: a UNet of one down block with one layer (the least `detect`
    /// accepts: two output blocks), a VAE attention 1×1 conv, and SD1 or SD2 text-encoder keys.
    fn synthetic(dir: &Path, open_clip: bool) -> PathBuf {
        let dev = Device::Cpu;
        let t = |dims: &[usize]| {
            let n: usize = dims.iter().product();
            Tensor::arange(0f32, n as f32, &dev)
                .unwrap()
                .reshape(dims)
                .unwrap()
        };
        let mut tensors = BTreeMap::from([
            (
                "model.diffusion_model.input_blocks.0.0.weight".to_owned(),
                t(&[4, 4, 3, 3]),
            ),
            (
                "model.diffusion_model.output_blocks.0.0.in_layers.2.weight".to_owned(),
                t(&[4]),
            ),
            (
                "model.diffusion_model.output_blocks.1.0.in_layers.2.weight".to_owned(),
                t(&[4]),
            ),
            (
                "first_stage_model.encoder.mid.attn_1.q.weight".to_owned(),
                t(&[2, 2, 1, 1]),
            ),
        ]);
        if open_clip {
            tensors.insert(
                "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight".into(),
                t(&[6, 2]),
            );
        } else {
            tensors.insert(
                "cond_stage_model.transformer.text_model.final_layer_norm.weight".into(),
                t(&[2]),
            );
        }
        let path = dir.join(if open_clip {
            "sd2.safetensors"
        } else {
            "sd1.safetensors"
        });
        candle_core::safetensors::save(&tensors.into_iter().collect(), &path).unwrap();
        path
    }

    #[test]
    fn detects_the_text_encoder_and_serves_diffusers_names() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let sd1 = Arc::new(SingleFile::open(&synthetic(dir.path(), false), true).unwrap());
        assert_eq!(sd1.text_encoder_layout(), TextEncoderLayout::Clip);
        let sd2 = Arc::new(SingleFile::open(&synthetic(dir.path(), true), true).unwrap());
        assert_eq!(sd2.text_encoder_layout(), TextEncoderLayout::OpenClip);
        assert!(sd2.has(ModelPart::Vae) && sd2.has(ModelPart::Unet));

        // OpenCLIP's stacked q/k/v: k is the middle third of the rows.
        let te = sd2
            .var_builder(ModelPart::TextEncoder, DType::F32, &dev, BTreeMap::new())
            .unwrap();
        let k = te
            .get(
                (2, 2),
                "text_model.encoder.layers.0.self_attn.k_proj.weight",
            )
            .unwrap();
        assert_eq!(
            k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [4., 5., 6., 7.]
        );

        // The VAE attention's 1×1 conv is served as the Linear diffusers has, with a delta.
        let delta = Tensor::ones((2, 2), DType::F32, &dev).unwrap();
        let name = "encoder.mid_block.attentions.0.to_q.weight";
        let vae = sd2
            .var_builder(
                ModelPart::Vae,
                DType::F32,
                &dev,
                BTreeMap::from([(name.to_owned(), delta)]),
            )
            .unwrap();
        let q = vae.get((2, 2), name).unwrap();
        assert_eq!(
            q.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [1., 2., 3., 4.]
        );
        let err = vae.get((3, 2), name).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains("[2, 2, 1, 1]"), "{err}");
    }

    #[test]
    fn rejects_files_that_are_no_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter.safetensors");
        let tensors = [(
            "lora_unet_x.lora_down.weight".to_owned(),
            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
        )];
        candle_core::safetensors::save(&tensors.into_iter().collect(), &path).unwrap();
        let err = format!("{:#}", SingleFile::open(&path, true).unwrap_err());
        assert!(
            err.contains("adapter.safetensors is not a single-file"),
            "{err}"
        );
    }

    #[test]
    fn unit_dims_reconcile_conv_and_linear_only() {
        assert!(same_up_to_unit_dims(&[16, 16, 1, 1], &[16, 16]));
        assert!(same_up_to_unit_dims(&[16, 16], &[16, 16, 1, 1]));
        assert!(!same_up_to_unit_dims(&[16, 16, 3, 3], &[16, 16]));
        assert!(!same_up_to_unit_dims(&[16, 8], &[8, 16]));
    }
}
