//! Where a model's files are: a local diffusers folder, or a Hugging Face Hub id resolved to one
//! (the Hub cache's snapshot folder has the same layout), or a single-file (LDM) checkpoint whose
//! weights are read through [`crate::formats::single_file`], identified as SD 1.x, 2.x or SDXL from
//! its tensors and served with the built-in configs of that model
//! ([`crate::models::config::BuiltinConfigs`]), or with the config files of a folder like the one
//! below (`--base-config`). Load components through [`ModelFolder::load_unet`] & co., which work
//! for all of them. [`clip_model_folder`] resolves a CLIP model (CLIP score's) the same way: a
//! local folder, or a Hub id's cached snapshot.
//!
//! ```text
//! model_index.json                 optional; component classes
//! unet/config.json + weights       required
//! text_encoder/config.json + model.safetensors      required
//! scheduler/scheduler_config.json  required
//! vae/config.json + weights        optional: without it the UNet denoises pixels
//! tokenizer/                       optional: without it the embedded CLIP vocabulary is used
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::formats::ldm::ModelPart;
use crate::formats::single_file::SingleFile;
use crate::io::{pickle, weights};
use crate::models::config::{
    BuiltinConfigs, ClipTextConfig, PredictionType, SchedulerConfig, UNetConfig, VaeConfig,
};
use crate::models::text_encoder::TextEncoder;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::UNet2DConditionModel;
use crate::models::vae::Vae;

const MODEL_INDEX: &str = "model_index.json";
/// The marker tensor of a single file trained with zero terminal SNR (ComfyUI's and the v-pred
/// SDXL fine-tunes').
const ZERO_TERMINAL_SNR_KEY: &str = "ztsnr";
/// What SDXL's second tokenizer (OpenCLIP's) pads with.
const SDXL_SECOND_PAD_TOKEN: &str = "!";
/// Weights file stem of the diffusers components (unet/, vae/).
const DIFFUSERS_WEIGHTS_STEM: &str = "diffusion_pytorch_model";
const TEXT_ENCODER_WEIGHTS_STEM: &str = "model";
const TOKENIZER_FILES: [&str; 4] = [
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
];
/// The files of a transformers model repository that a model here reads: the `required` first,
/// then optional ones the loader has defaults for. A cached snapshot counts as complete (usable
/// offline) when it has the first `deciding` files.
struct TransformersFiles {
    /// What the model is, for errors.
    kind: &'static str,
    files: &'static [&'static str],
    required: usize,
    deciding: usize,
}

/// A CLIP model (CLIP score), as the OpenAI CLIP repositories on the Hub have it; without the
/// optional files `lora_eval::clip_score` falls back to defaults and the embedded vocabulary.
/// The tokenizer files change the features (the other two name the pad token and context
/// length, which the config gives too).
const CLIP_FILES: TransformersFiles = TransformersFiles {
    kind: "a CLIP model",
    files: &[
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ],
    required: 2,
    deciding: 5,
};

/// A BLIP captioning model, as Salesforce/blip-image-captioning-large has it; without a
/// preprocessor config, `BlipImageProcessor`'s defaults apply.
const BLIP_FILES: TransformersFiles = TransformersFiles {
    kind: "a BLIP captioning model",
    files: &[
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
    ],
    required: 3,
    deciding: 4,
};

/// Set (to anything but empty or `0`) to forbid network access, as with the Python libraries.
const OFFLINE_ENV: &str = "HF_HUB_OFFLINE";
/// Overrides the Hub's address (mirrors), as with the Python libraries.
const ENDPOINT_ENV: &str = "HF_ENDPOINT";

/// What the user named as the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// An existing local diffusers folder.
    Local(PathBuf),
    /// A Hugging Face Hub repository id, `owner/name`.
    Hub(String),
    /// A single-file (LDM layout) SD1.x/SD2.x/SDXL `.safetensors` checkpoint, with the folder its
    /// configs come from (a diffusers folder, or one holding only the config files).
    SingleFile {
        file: PathBuf,
        configs_from: Option<PathBuf>,
        /// An A1111 config beside the file the user named (`NAME.yaml`), which says its
        /// prediction type; kept when a pickle is read through its copy elsewhere.
        yaml: Option<PathBuf>,
    },
}

impl ModelSource {
    /// An existing path is a local folder; otherwise `owner/name` is a Hub id; anything else is an
    /// error (most likely a mistyped path).
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_file() {
            let yaml = path.with_extension("yaml");
            return Ok(Self::SingleFile {
                file: path.to_path_buf(),
                configs_from: None,
                yaml: yaml.is_file().then_some(yaml),
            });
        }
        if path.exists() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        if is_hub_id(spec) {
            return Ok(Self::Hub(spec.to_owned()));
        }
        bail!("model `{spec}` is neither an existing folder nor a Hugging Face Hub id of the form owner/name")
    }

    /// Sets where a single-file checkpoint's configs come from (`--base-config`); an error for
    /// folders and Hub ids, which have their own.
    pub fn with_configs_from(self, dir: Option<PathBuf>) -> Result<Self> {
        match (self, dir) {
            (source, None) => Ok(source),
            (Self::SingleFile { file, yaml, .. }, Some(dir)) => Ok(Self::SingleFile {
                file,
                configs_from: Some(dir),
                yaml,
            }),
            (_, Some(dir)) => bail!(
                "--base-config {} is only for a single-file checkpoint as --base; a diffusers \
                 folder or Hub id has its own configs",
                dir.display()
            ),
        }
    }

    /// A single-file PyTorch pickle (`.ckpt`) replaced by its safetensors copy when
    /// `allow_pickle` (see [`crate::io::pickle::safetensors_copy`]), with the copy's path for the
    /// user to be told; refused naming the file otherwise. Anything else is returned unchanged.
    pub fn reading_pickle(self, allow_pickle: bool) -> Result<(Self, Option<PathBuf>)> {
        match self {
            Self::SingleFile {
                file,
                configs_from,
                yaml,
            } => {
                let readable = pickle::safetensors_path(&file, allow_pickle)?;
                let copy = (readable != file).then(|| readable.clone());
                let source = Self::SingleFile {
                    file: readable,
                    configs_from,
                    yaml,
                };
                Ok((source, copy))
            }
            other => Ok((other, None)),
        }
    }

    /// The model's folder: local as is, or the Hub's cached snapshot, downloading missing files;
    /// a single file with the built-in configs of its architecture, or those of its
    /// `configs_from` folder. `choices` are the command line's (`--prediction-type`, `--no-ema`).
    pub fn open(&self, choices: &BaseChoices) -> Result<ModelFolder> {
        let folder = match self {
            Self::Local(path) => ModelFolder::open(path)?,
            Self::Hub(id) => {
                open_from_hub(id, Cache::from_env(), std::env::var(ENDPOINT_ENV).ok())?
            }
            Self::SingleFile {
                file,
                configs_from,
                yaml,
            } => {
                let source = SingleFileSource {
                    file,
                    configs_from: configs_from.as_deref(),
                    yaml: yaml.as_deref(),
                };
                return ModelFolder::open_single_file(&source, choices);
            }
        };
        Ok(folder.with_prediction(choices.prediction))
    }
}

/// A binary's `--base` and the options that go with it.
#[derive(Debug, Clone)]
pub struct BaseSpec<'a> {
    /// `--base`: a folder, a Hub id or a single file.
    pub base: &'a str,
    /// `--base-config`.
    pub base_config: Option<PathBuf>,
    /// `--allow-pickle`: a `.ckpt` is read through its safetensors copy.
    pub allow_pickle: bool,
    pub choices: BaseChoices,
}

impl BaseSpec<'_> {
    /// Parses and opens the base as every binary does; `on_pickle_copy` is told the path of the
    /// safetensors copy a pickle is read through.
    pub fn open(&self, on_pickle_copy: impl FnOnce(&Path)) -> Result<ModelFolder> {
        let (source, pickle_copy) = ModelSource::parse(self.base)?
            .with_configs_from(self.base_config.clone())?
            .reading_pickle(self.allow_pickle)?;
        if let Some(copy) = &pickle_copy {
            on_pickle_copy(copy);
        }
        source.open(&self.choices)
    }
}

/// `owner/name`, each part a Hub name: ASCII letters, digits, `-`, `_`, `.`, not starting with a
/// symbol, no `..`.
pub fn is_hub_id(spec: &str) -> bool {
    let part_ok = |p: &str| {
        p.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.contains("..")
            && p.len() <= 96
    };
    matches!(spec.split_once('/'), Some((owner, name)) if part_ok(owner) && part_ok(name))
}

/// The Hub cache's snapshot if it already holds a complete model; otherwise downloads what
/// `ModelFolder` needs into it.
fn open_from_hub(id: &str, cache: Cache, endpoint: Option<String>) -> Result<ModelFolder> {
    // What a partly cached snapshot lacks, for the error when the rest cannot be fetched.
    let mut incomplete = None;
    if let Some(index) = cache.model(id.to_owned()).get(MODEL_INDEX) {
        let snapshot = index
            .parent()
            .expect("a cached file is inside its snapshot folder");
        match ModelFolder::open(snapshot) {
            Ok(folder) => return Ok(folder),
            Err(e) => incomplete = Some(format!("{e:#}")),
        }
    }
    let how_to_use_local =
        "to use a local copy, pass the path of a diffusers folder (with model_index.json, unet/, \
                 text_encoder/, scheduler/) instead of the Hub id";
    let repo =
        HubRepo::open(id, RepoType::Model, cache, endpoint, how_to_use_local).map_err(|e| {
            match &incomplete {
                Some(missing) => e.context(format!(
                    "the Hugging Face cache holds only part of `{id}` ({missing})"
                )),
                None => e,
            }
        })?;
    let listed: Vec<&str> = repo.files.iter().map(String::as_str).collect();
    let mut snapshot = None;
    for file in files_to_download(&listed) {
        let path = repo.get(&file)?;
        if file == MODEL_INDEX {
            snapshot = path.parent().map(Path::to_path_buf);
        }
    }
    let snapshot = snapshot.with_context(|| {
        format!("Hub repository `{id}` has no {MODEL_INDEX}: not a diffusers model")
    })?;
    ModelFolder::open(&snapshot).with_context(|| {
        format!(
            "Hub repository `{id}` (downloaded to {})",
            snapshot.display()
        )
    })
}

/// A CLIP model's folder, for [`crate::models::clip::ClipModel::load`] and CLIP score: an
/// existing local folder as it is, or a Hub id (`openai/clip-vit-large-patch14`) resolved to its
/// cached snapshot, downloading the files it lacks.
pub fn clip_model_folder(spec: &str) -> Result<PathBuf> {
    transformers_model_folder(spec, &CLIP_FILES)
}

/// A BLIP captioning model's folder, for [`crate::models::blip::ImageCaptioner::load`]: a local
/// folder, or a Hub id (`Salesforce/blip-image-captioning-large`) as for [`clip_model_folder`].
pub fn blip_model_folder(spec: &str) -> Result<PathBuf> {
    transformers_model_folder(spec, &BLIP_FILES)
}

fn transformers_model_folder(spec: &str, model: &TransformersFiles) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    ensure!(
        is_hub_id(spec),
        "{} `{spec}` is neither an existing folder nor a Hugging Face Hub id of the form owner/name",
        model.kind
    );
    folder_from_hub(
        spec,
        model,
        Cache::from_env(),
        std::env::var(ENDPOINT_ENV).ok(),
    )
}

fn folder_from_hub(
    id: &str,
    model: &TransformersFiles,
    cache: Cache,
    endpoint: Option<String>,
) -> Result<PathBuf> {
    // Which optional files a repository has is unknown offline.
    let deciding = &model.files[..model.deciding];
    let cached = cache.model(id.to_owned());
    let in_cache: Vec<PathBuf> = deciding.iter().filter_map(|f| cached.get(f)).collect();
    if in_cache.len() == deciding.len() {
        let snapshot = in_cache[0]
            .parent()
            .expect("a cached file is inside its snapshot folder");
        return Ok(snapshot.to_path_buf());
    }
    let how_to_use_local = format!(
        "to use a local copy, pass the path of a folder with the repository's {} instead of the \
         Hub id",
        deciding.join(", ")
    );
    let repo = HubRepo::open(id, RepoType::Model, cache, endpoint, &how_to_use_local)?;
    for required in &model.files[..model.required] {
        ensure!(
            repo.files.iter().any(|f| f == required),
            "Hub repository `{id}` has no {required}: not {} in safetensors",
            model.kind
        );
    }
    let mut snapshot = None;
    for file in model
        .files
        .iter()
        .filter(|f| repo.files.iter().any(|l| l == *f))
    {
        let path = repo.get(file)?;
        snapshot = path.parent().map(Path::to_path_buf);
    }
    Ok(snapshot.expect("config.json was downloaded"))
}

/// A dataset repository of the Hugging Face Hub (`--data owner/name` of lora-train): its file
/// list, its files downloaded into the Hub cache on demand, and the cached snapshot to use
/// offline.
pub struct HubDataset {
    repo: HubRepo,
}

impl HubDataset {
    /// The snapshot folder of the dataset's cached `main` revision, if the cache has its
    /// `README.md` (every Hub dataset has one): the files downloaded so far, in the repository's
    /// layout.
    pub fn cached_snapshot(id: &str) -> Option<PathBuf> {
        let readme = Cache::from_env().dataset(id.to_owned()).get(DATASET_CARD)?;
        readme.parent().map(Path::to_path_buf)
    }

    /// Lists the repository's files; offline or unreachable, an error that says how to point at
    /// a local copy.
    pub fn open(id: &str) -> Result<Self> {
        let how_to_use_local = "to use a local copy, download it (`huggingface-cli download \
             --repo-type dataset OWNER/NAME --local-dir DIR`) and pass --data DIR";
        let repo = HubRepo::open(
            id,
            RepoType::Dataset,
            Cache::from_env(),
            std::env::var(ENDPOINT_ENV).ok(),
            how_to_use_local,
        )?;
        Ok(Self { repo })
    }

    /// The repository's files, as paths relative to its root.
    pub fn files(&self) -> &[String] {
        &self.repo.files
    }

    /// Downloads `file` into the cache (unless there already) and returns its path there.
    pub fn get(&self, file: &str) -> Result<PathBuf> {
        self.repo.get(file)
    }
}

/// A dataset repository's card, which `HubDataset::cached_snapshot` looks for.
const DATASET_CARD: &str = "README.md";

/// A Hub repository reached through the API, with its file list; errors say how to do without.
struct HubRepo {
    id: String,
    api: hf_hub::api::sync::ApiRepo,
    files: Vec<String>,
    local_alternative: String,
}

impl HubRepo {
    fn open(
        id: &str,
        repo_type: RepoType,
        cache: Cache,
        endpoint: Option<String>,
        local_alternative: &str,
    ) -> Result<Self> {
        let kind = match repo_type {
            RepoType::Dataset => "dataset",
            RepoType::Model | RepoType::Space => "model",
        };
        let offline = std::env::var(OFFLINE_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
        ensure!(!offline, "{kind} `{id}` is not (completely) in the Hugging Face cache and {OFFLINE_ENV} is set (offline mode); \
             {local_alternative}");
        let mut builder = ApiBuilder::from_cache(cache);
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let unreachable = |e: &dyn std::fmt::Display| {
            unreachable_error(id, "the file list", e, local_alternative)
        };
        let api = builder
            .build()
            .map_err(|e| unreachable(&e))?
            .repo(Repo::new(id.to_owned(), repo_type));
        let info = api.info().map_err(|e| unreachable(&e))?;
        Ok(Self {
            id: id.to_owned(),
            api,
            files: info.siblings.into_iter().map(|s| s.rfilename).collect(),
            local_alternative: local_alternative.to_owned(),
        })
    }

    /// Downloads `file` into the cache (unless there already) and returns its path there.
    fn get(&self, file: &str) -> Result<PathBuf> {
        self.api.get(file).map_err(|e| {
            unreachable_error(&self.id, &format!("`{file}`"), &e, &self.local_alternative)
        })
    }
}

fn unreachable_error(
    id: &str,
    what: &str,
    e: &dyn std::fmt::Display,
    local_alternative: &str,
) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot fetch {what} of `{id}` from the Hugging Face Hub: offline, unreachable, or no such (public) \
         repository? ({e}); {local_alternative}"
    )
}

/// The files of a listed repository that a `ModelFolder` reads: configs, tokenizer files and one
/// weights file per component, preferring full precision (as `weights::component_weights` does).
fn files_to_download(listed: &[&str]) -> Vec<String> {
    let has = |f: &str| listed.contains(&f);
    let mut files = vec![
        MODEL_INDEX.to_owned(),
        "scheduler/scheduler_config.json".to_owned(),
    ];
    for (dir, stem) in [
        ("unet", DIFFUSERS_WEIGHTS_STEM),
        ("vae", DIFFUSERS_WEIGHTS_STEM),
        ("text_encoder", TEXT_ENCODER_WEIGHTS_STEM),
        ("text_encoder_2", TEXT_ENCODER_WEIGHTS_STEM),
    ] {
        files.push(format!("{dir}/config.json"));
        let full = format!("{dir}/{stem}.safetensors");
        let half = format!("{dir}/{stem}.fp16.safetensors");
        files.push(if has(&full) || !has(&half) {
            full
        } else {
            half
        });
    }
    for dir in ["tokenizer", "tokenizer_2"] {
        files.extend(TOKENIZER_FILES.iter().map(|f| format!("{dir}/{f}")));
    }
    // Only what exists: an optional part (vae/, tokenizer/, SDXL's second encoder) may be
    // absent, and a missing required file is reported by `ModelFolder::open` with its name.
    files.retain(|f| has(f));
    files
}

/// A pipeline component's `[library, class]` entry in `model_index.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentClass {
    pub library: String,
    pub class: String,
}

/// `model_index.json`: the pipeline class and the components present (null entries dropped).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelIndex {
    pub pipeline_class: Option<String>,
    pub components: BTreeMap<String, ComponentClass>,
    /// SDXL pipelines' flag: an empty negative prompt is all-zero embeddings, not the encoding
    /// of "".
    pub force_zeros_for_empty_prompt: Option<bool>,
}

impl ModelIndex {
    /// `dir/model_index.json` if the folder has one.
    fn in_folder(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MODEL_INDEX);
        path.is_file().then(|| Self::from_file(&path)).transpose()
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid {}", path.display()))
    }

    pub fn parse(json: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(json).context("malformed model_index.json")?;
        let object = value
            .as_object()
            .context("model_index.json: expected a JSON object")?;
        let mut index = ModelIndex::default();
        for (key, entry) in object {
            if key == "_class_name" {
                index.pipeline_class = entry.as_str().map(str::to_owned);
                continue;
            }
            if key == "force_zeros_for_empty_prompt" {
                let flag = entry.as_bool().with_context(|| {
                    format!("model_index.json: `{key}` = {entry}: expected true or false")
                })?;
                index.force_zeros_for_empty_prompt = Some(flag);
                continue;
            }
            // Components are `[library, class]` pairs; other keys (flags, versions) are not.
            let Some([library, class]) = entry.as_array().map(Vec::as_slice) else {
                continue;
            };
            match (library.as_str(), class.as_str()) {
                (Some(library), Some(class)) => {
                    index.components.insert(key.clone(), ComponentClass { library: library.into(), class: class.into() });
                }
                _ if library.is_null() && class.is_null() => {}
                _ => bail!("model_index.json: component `{key}` = {entry}: expected [library, class] or [null, null]"),
            }
        }
        Ok(index)
    }
}

/// `--base-config`'s help, the same in every binary.
pub const BASE_CONFIG_HELP: &str = "For a single-file --base: a diffusers folder whose config \
    files (unet/, text_encoder/, scheduler/, vae/ config.json, SDXL's text_encoder_2/ too; \
    tokenizer/ and tokenizer_2/ if any) describe it, replacing the built-in configs of the SD \
    1.x/2.x/SDXL model the file is recognised as; its weights are not read";
/// `--prediction-type`'s help.
pub const PREDICTION_TYPE_HELP: &str = "What the base UNet predicts, epsilon or v_prediction \
    (or sample), replacing what the model says: a folder's scheduler config, or for a single \
    file its v_pred marker, modelspec metadata or A1111 .yaml beside it, else epsilon for SD 1.x \
    and SDXL and v_prediction (768×768) for SD 2.x. The choice is printed";
/// `--no-ema`'s help.
pub const NO_EMA_HELP: &str = "For a single file that holds both EMA (`model_ema.…`) and plain \
    UNet weights: use the plain ones [default: the EMA weights]";

/// What the command line chose about the base model, for every binary alike.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BaseChoices {
    /// `--prediction-type`: what the UNet predicts, overriding what the model's files say.
    pub prediction: Option<PredictionType>,
    /// `--no-ema`: a single file's plain UNet weights rather than its EMA copy.
    pub no_ema: bool,
}

/// A single-file checkpoint to open: the file read, where its configs come from (`None`: the
/// built-in ones of what it is recognised as) and the A1111 `.yaml` found beside it.
#[derive(Debug, Clone, Copy)]
pub struct SingleFileSource<'a> {
    pub file: &'a Path,
    pub configs_from: Option<&'a Path>,
    pub yaml: Option<&'a Path>,
}

/// Where a model's configs come from.
#[derive(Debug, Clone)]
enum Configs {
    /// A diffusers folder: the model's own, or a single file's `--base-config`.
    Folder(PathBuf),
    /// The built-in configs of the architecture a single file was identified as.
    Builtin(BuiltinConfigs),
}

/// A verified diffusers model folder, or a single-file checkpoint with its configs.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    /// The folder, or the single file: what messages name as the model.
    root: PathBuf,
    configs: Configs,
    /// Set when the weights come from a single-file checkpoint instead of the folder.
    single_file: Option<Arc<SingleFile>>,
    index: Option<ModelIndex>,
    unet_weights: PathBuf,
    text_encoder_weights: PathBuf,
    /// SDXL's second text encoder (`text_encoder_2/`).
    text_encoder_2_weights: Option<PathBuf>,
    vae_weights: Option<PathBuf>,
    has_tokenizer: bool,
    has_tokenizer_2: bool,
    /// `--prediction-type`, replacing the scheduler config's.
    prediction_override: Option<PredictionType>,
    /// What was found and chosen, for the user (see [`ModelFolder::describe`]).
    summary: String,
}

impl ModelFolder {
    /// Checks that every required file is there (naming the first missing one) and that the parts
    /// `model_index.json` lists exist.
    pub fn open(root: &Path) -> Result<Self> {
        ensure!(
            root.is_dir(),
            "model folder {} does not exist",
            root.display()
        );
        let require = |relative: &str| -> Result<()> {
            let path = root.join(relative);
            ensure!(
                path.is_file(),
                "model folder {} is missing {relative}",
                root.display()
            );
            Ok(())
        };
        let index = ModelIndex::in_folder(root)?;
        let listed = |component: &str| {
            index
                .as_ref()
                .is_some_and(|i| i.components.contains_key(component))
        };

        require("unet/config.json")?;
        let unet_weights = weights::component_weights(&root.join("unet"), DIFFUSERS_WEIGHTS_STEM)?;
        require("text_encoder/config.json")?;
        let text_encoder_weights =
            weights::component_weights(&root.join("text_encoder"), TEXT_ENCODER_WEIGHTS_STEM)?;
        require("scheduler/scheduler_config.json")?;
        let text_encoder_2_weights =
            if root.join("text_encoder_2").is_dir() || listed("text_encoder_2") {
                require("text_encoder_2/config.json")?;
                Some(weights::component_weights(
                    &root.join("text_encoder_2"),
                    TEXT_ENCODER_WEIGHTS_STEM,
                )?)
            } else {
                None
            };

        let vae_dir = root.join("vae");
        let vae_weights = if vae_dir.is_dir() || listed("vae") {
            require("vae/config.json")?;
            Some(weights::component_weights(
                &vae_dir,
                DIFFUSERS_WEIGHTS_STEM,
            )?)
        } else {
            None
        };
        let has_tokenizer = root.join("tokenizer").is_dir();
        let has_tokenizer_2 = root.join("tokenizer_2").is_dir();
        for (has, name) in [
            (has_tokenizer, "tokenizer"),
            (has_tokenizer_2, "tokenizer_2"),
        ] {
            ensure!(
                has || !listed(name),
                "model folder {} is missing {name}/, which {MODEL_INDEX} lists",
                root.display()
            );
        }
        let summary = match text_encoder_2_weights {
            Some(_) => "SDXL diffusers folder (two text encoders)",
            None => "diffusers folder",
        };
        Ok(Self {
            root: root.to_path_buf(),
            configs: Configs::Folder(root.to_path_buf()),
            single_file: None,
            index,
            unet_weights,
            text_encoder_weights,
            text_encoder_2_weights,
            vae_weights,
            has_tokenizer,
            has_tokenizer_2,
            prediction_override: None,
            summary: summary.to_owned(),
        })
    }

    /// A single-file checkpoint: its architecture and prediction type identified from its
    /// tensors, metadata and an A1111 `.yaml` beside it, served with the built-in configs; or,
    /// with `configs_from`, with that folder's `unet/`, `text_encoder/`, `scheduler/` and (when
    /// the file has a VAE) `vae/` config files (`tokenizer/` optional), whatever the file is.
    pub fn open_single_file(source: &SingleFileSource, choices: &BaseChoices) -> Result<Self> {
        let SingleFileSource {
            file,
            configs_from,
            yaml,
        } = *source;
        let single = SingleFile::open(file, !choices.no_ema)?;
        let has_vae = single.has(ModelPart::Vae);
        let sdxl = single.has(ModelPart::TextEncoder2);
        let weights_note = if single.uses_ema() {
            ", EMA weights (--no-ema for the others)"
        } else {
            ""
        };
        let (configs, index, has_tokenizer, has_tokenizer_2, summary) = match configs_from {
            Some(dir) => {
                require_config_files(dir, file, has_vae, sdxl)?;
                let index = ModelIndex::in_folder(dir)?;
                let summary = format!(
                    "single-file checkpoint with the configs of {}{weights_note}",
                    dir.display()
                );
                (
                    Configs::Folder(dir.to_path_buf()),
                    index,
                    dir.join("tokenizer").is_dir(),
                    dir.join("tokenizer_2").is_dir(),
                    summary,
                )
            }
            None => {
                let architecture = single.architecture()?;
                // Given --prediction-type, what the file says is not read: a hint we cannot
                // read must not stop the override.
                let (prediction, why) = match choices.prediction {
                    Some(p) => (p, "--prediction-type".to_owned()),
                    None => {
                        let yaml = yaml.map(read_yaml).transpose()?;
                        let yaml_ref = yaml.as_ref().map(|(p, t)| (p.as_path(), t.as_str()));
                        single.prediction_type(architecture, yaml_ref)?
                    }
                };
                let builtin = BuiltinConfigs {
                    zero_terminal_snr: single.has_key(ZERO_TERMINAL_SNR_KEY),
                    ..BuiltinConfigs::new(architecture, prediction)
                };
                let summary = format!(
                    "single-file {architecture} checkpoint, built-in configs for {} ({prediction} \
                     from {why}){weights_note}",
                    builtin.describe(),
                );
                (Configs::Builtin(builtin), None, false, false, summary)
            }
        };
        let folder = Self {
            root: file.to_path_buf(),
            configs,
            single_file: Some(Arc::new(single)),
            index,
            unet_weights: file.to_path_buf(),
            text_encoder_weights: file.to_path_buf(),
            text_encoder_2_weights: sdxl.then(|| file.to_path_buf()),
            vae_weights: has_vae.then(|| file.to_path_buf()),
            has_tokenizer,
            has_tokenizer_2,
            prediction_override: None,
            summary,
        };
        Ok(match configs_from {
            Some(_) => folder.with_prediction(choices.prediction),
            None => folder,
        })
    }

    /// The model with its scheduler's prediction type replaced by `prediction` when given.
    fn with_prediction(mut self, prediction: Option<PredictionType>) -> Self {
        if let Some(p) = prediction {
            self.summary.push_str(&format!(", {p} (--prediction-type)"));
            self.prediction_override = Some(p);
        }
        self
    }

    /// What the model is and what was chosen for it (architecture, resolution, prediction type
    /// and why, EMA), for the binaries to print.
    pub fn describe(&self) -> String {
        format!("{}: {}", self.root.display(), self.summary)
    }

    /// The folder, or the single-file checkpoint.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the weights come from a single-file checkpoint.
    pub fn is_single_file(&self) -> bool {
        self.single_file.is_some()
    }

    /// The UNet's weights under diffusers names, with f32 `deltas` folded in at load.
    pub fn unet_var_builder(
        &self,
        dtype: DType,
        device: &Device,
        deltas: BTreeMap<String, Tensor>,
    ) -> Result<VarBuilder<'static>> {
        match &self.single_file {
            Some(file) => file.var_builder(ModelPart::Unet, dtype, device, deltas),
            None => weights::var_builder(
                std::slice::from_ref(&self.unet_weights),
                dtype,
                device,
                deltas,
            ),
        }
    }

    /// The frozen UNet in `dtype`.
    pub fn load_unet(
        &self,
        config: &UNetConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<UNet2DConditionModel> {
        let vb = self.unet_var_builder(dtype, device, BTreeMap::new())?;
        UNet2DConditionModel::load(config, &vb)
            .with_context(|| format!("loading the UNet of {}", self.root.display()))
    }

    /// The text encoder with `deltas` (keyed `text_model.…`) folded in.
    pub fn load_text_encoder(
        &self,
        config: &ClipTextConfig,
        dtype: DType,
        device: &Device,
        deltas: BTreeMap<String, Tensor>,
    ) -> Result<TextEncoder> {
        let Some(file) = &self.single_file else {
            let dir = self.root.join("text_encoder");
            return TextEncoder::load(&dir, config, dtype, device, deltas);
        };
        let vb = file.var_builder(ModelPart::TextEncoder, dtype, device, deltas)?;
        TextEncoder::from_model_var_builder(vb, config)
            .with_context(|| format!("loading the text encoder of {}", self.root.display()))
    }

    /// Whether the model is SDXL: it has a second text encoder.
    pub fn is_sdxl(&self) -> bool {
        self.text_encoder_2_weights.is_some()
    }

    fn require_sdxl(&self) -> Result<()> {
        ensure!(
            self.is_sdxl(),
            "{} has no second text encoder (text_encoder_2/): it is not an SDXL model",
            self.root.display()
        );
        Ok(())
    }

    /// SDXL's second text encoder's config.
    pub fn text_encoder_2_config(&self) -> Result<ClipTextConfig> {
        self.require_sdxl()?;
        match &self.configs {
            Configs::Folder(dir) => {
                ClipTextConfig::from_file(&dir.join("text_encoder_2/config.json"))
            }
            Configs::Builtin(builtin) => builtin.text_encoder_2(),
        }
    }

    /// SDXL's second text encoder, with its projection, `deltas` (keyed `text_model.…`) folded in.
    pub fn load_text_encoder_2(
        &self,
        config: &ClipTextConfig,
        dtype: DType,
        device: &Device,
        deltas: BTreeMap<String, Tensor>,
    ) -> Result<TextEncoder> {
        self.require_sdxl()?;
        let Some(file) = &self.single_file else {
            let dir = self.root.join("text_encoder_2");
            return TextEncoder::load(&dir, config, dtype, device, deltas);
        };
        let vb = file.var_builder(ModelPart::TextEncoder2, dtype, device, deltas)?;
        TextEncoder::from_model_var_builder(vb, config)
            .with_context(|| format!("loading the second text encoder of {}", self.root.display()))
    }

    /// SDXL's second tokenizer (`tokenizer_2/`: OpenCLIP's, padding with `!`; without the
    /// folder the embedded vocabulary padding with `!`, not the config's stale `pad_token_id`).
    pub fn tokenizer_2(&self) -> Result<ClipTokenizer> {
        let config = self.text_encoder_2_config()?;
        let dir = self
            .has_tokenizer_2
            .then(|| self.config_file("tokenizer_2"))
            .flatten();
        let tokenizer = match dir {
            Some(dir) => ClipTokenizer::load(Some(&dir), &config),
            None => ClipTokenizer::embedded(&config, SDXL_SECOND_PAD_TOKEN),
        };
        tokenizer
            .with_context(|| format!("loading the second tokenizer of {}", self.root.display()))
    }

    /// Whether an empty negative prompt is all-zero embeddings (`force_zeros_for_empty_prompt`,
    /// true unless `model_index.json` says otherwise, as `StableDiffusionXLPipeline` defaults).
    pub fn zeros_for_empty_negative(&self) -> bool {
        self.is_sdxl()
            && self
                .index
                .as_ref()
                .and_then(|i| i.force_zeros_for_empty_prompt)
                .unwrap_or(true)
    }

    /// The VAE in `dtype`, `None` for pixel-space models.
    pub fn load_vae(&self, dtype: DType, device: &Device) -> Result<Option<Vae>> {
        let Some(config) = self.vae_config()? else {
            return Ok(None);
        };
        let vb = match &self.single_file {
            Some(file) => file.var_builder(ModelPart::Vae, dtype, device, BTreeMap::new())?,
            None => weights::var_builder(
                std::slice::from_ref(self.vae_weights.as_ref().expect("a VAE config")),
                dtype,
                device,
                BTreeMap::new(),
            )?,
        };
        Vae::from_var_builder(vb, config)
            .map(Some)
            .with_context(|| format!("loading the VAE of {}", self.root.display()))
    }

    pub fn index(&self) -> Option<&ModelIndex> {
        self.index.as_ref()
    }

    /// The config file `relative` of a config folder, `None` for built-in configs.
    fn config_file(&self, relative: &str) -> Option<PathBuf> {
        match &self.configs {
            Configs::Folder(dir) => Some(dir.join(relative)),
            Configs::Builtin(_) => None,
        }
    }

    pub fn unet_config(&self) -> Result<UNetConfig> {
        match &self.configs {
            Configs::Folder(dir) => UNetConfig::from_file(&dir.join("unet/config.json")),
            Configs::Builtin(builtin) => builtin.unet(),
        }
    }

    pub fn unet_weights(&self) -> &Path {
        &self.unet_weights
    }

    pub fn text_encoder_weights(&self) -> &Path {
        &self.text_encoder_weights
    }

    pub fn text_encoder_config(&self) -> Result<ClipTextConfig> {
        match &self.configs {
            Configs::Folder(dir) => {
                ClipTextConfig::from_file(&dir.join("text_encoder/config.json"))
            }
            Configs::Builtin(builtin) => builtin.text_encoder(),
        }
    }

    /// The image side the model is made for, as diffusers' pipelines default to it: the UNet's
    /// `sample_size` times the VAE's factor (768 for SD 2.x-v, 512 for SD 1.x and SD 2.x-base);
    /// `None` when the UNet config has no sample size.
    pub fn native_resolution(&self) -> Result<Option<usize>> {
        let factor = self.vae_config()?.map_or(1, |vae| vae.vae_scale_factor());
        Ok(self.unet_config()?.sample_size.map(|s| s * factor))
    }

    /// False for pixel-space models, whose UNet denoises images directly.
    pub fn has_vae(&self) -> bool {
        self.vae_weights.is_some()
    }

    /// The VAE's folder of config (and, for a diffusers folder, weights) files; `None` without a
    /// VAE or with built-in configs.
    pub fn vae_dir(&self) -> Option<PathBuf> {
        self.has_vae().then(|| self.config_file("vae")).flatten()
    }

    pub fn vae_weights(&self) -> Option<&Path> {
        self.vae_weights.as_deref()
    }

    pub fn vae_config(&self) -> Result<Option<VaeConfig>> {
        if !self.has_vae() {
            return Ok(None);
        }
        match &self.configs {
            Configs::Folder(dir) => VaeConfig::from_file(&dir.join("vae/config.json")).map(Some),
            Configs::Builtin(builtin) => builtin.vae().map(Some),
        }
    }

    pub fn tokenizer_dir(&self) -> Option<PathBuf> {
        self.has_tokenizer
            .then(|| self.config_file("tokenizer"))
            .flatten()
    }

    /// The model's tokenizer (its own vocabulary if it has one, else the embedded CLIP one).
    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        let text_config = self.text_encoder_config()?;
        let tokenizer = match &self.configs {
            Configs::Builtin(builtin) => ClipTokenizer::embedded(&text_config, builtin.pad_token()),
            Configs::Folder(_) => {
                ClipTokenizer::load(self.tokenizer_dir().as_deref(), &text_config)
            }
        };
        tokenizer.with_context(|| format!("loading the tokenizer of {}", self.root.display()))
    }

    /// The scheduler config, with `--prediction-type` applied.
    pub fn scheduler_config(&self) -> Result<SchedulerConfig> {
        let mut config = match &self.configs {
            Configs::Folder(dir) => {
                SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?
            }
            Configs::Builtin(builtin) => builtin.scheduler()?,
        };
        if let Some(p) = self.prediction_override {
            config.prediction_type = p;
        }
        Ok(config)
    }
}

/// Checks that config folder `dir` (for single file `file`) has the config files a model needs
/// (`sdxl`: the second text encoder's too).
fn require_config_files(dir: &Path, file: &Path, has_vae: bool, sdxl: bool) -> Result<()> {
    let mut required = vec![
        "unet/config.json",
        "text_encoder/config.json",
        "scheduler/scheduler_config.json",
    ];
    if has_vae {
        required.push("vae/config.json");
    }
    if sdxl {
        required.push("text_encoder_2/config.json");
    }
    for relative in required {
        ensure!(
            dir.join(relative).is_file(),
            "config folder {} (for {}) is missing {relative}",
            dir.display(),
            file.display()
        );
    }
    Ok(())
}

/// An A1111 config, with its text.
fn read_yaml(path: &Path) -> Result<(PathBuf, String)> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read {} (the A1111 config beside the checkpoint); pass --prediction-type \
             to do without it",
            path.display()
        )
    })?;
    Ok((path.to_path_buf(), text))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(root: &Path, relative: &str, contents: &str) {
        let path = root.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, contents).unwrap();
    }

    fn minimal_folder(root: &Path) {
        for f in [
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json",
        ] {
            touch(root, f, "{}");
        }
        touch(root, "text_encoder/model.fp16.safetensors", "");
        touch(root, "scheduler/scheduler_config.json", "{}");
    }

    #[test]
    fn opens_a_folder_without_vae_or_tokenizer() {
        let dir = tempfile::tempdir().unwrap();
        minimal_folder(dir.path());
        let folder = ModelFolder::open(dir.path()).unwrap();
        assert!(
            !folder.has_vae() && folder.vae_dir().is_none() && folder.tokenizer_dir().is_none()
        );
        assert!(folder
            .text_encoder_weights()
            .ends_with("text_encoder/model.fp16.safetensors"));
        assert!(folder
            .unet_weights()
            .ends_with("unet/diffusion_pytorch_model.safetensors"));
        assert!(folder.vae_config().unwrap().is_none());
    }

    #[test]
    fn names_the_missing_file() {
        let cases = [
            ("unet/config.json", "is missing unet/config.json"),
            (
                "unet/diffusion_pytorch_model.safetensors",
                "expected diffusion_pytorch_model.safetensors",
            ),
            (
                "text_encoder/model.fp16.safetensors",
                "expected model.safetensors or model.fp16.safetensors",
            ),
            (
                "scheduler/scheduler_config.json",
                "is missing scheduler/scheduler_config.json",
            ),
        ];
        for (removed, expected) in cases {
            let dir = tempfile::tempdir().unwrap();
            minimal_folder(dir.path());
            std::fs::remove_file(dir.path().join(removed)).unwrap();
            let err = format!("{:#}", ModelFolder::open(dir.path()).unwrap_err());
            assert!(err.contains(expected), "without {removed}: {err}");
        }

        // A vae/ folder, or one model_index.json lists, must be complete.
        let dir = tempfile::tempdir().unwrap();
        minimal_folder(dir.path());
        touch(dir.path(), "vae/config.json", "{}");
        let err = format!("{:#}", ModelFolder::open(dir.path()).unwrap_err());
        assert!(
            err.contains("no weights in") && err.contains("vae"),
            "{err}"
        );
        std::fs::remove_dir_all(dir.path().join("vae")).unwrap();
        touch(
            dir.path(),
            MODEL_INDEX,
            r#"{"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"]}"#,
        );
        let err = format!("{:#}", ModelFolder::open(dir.path()).unwrap_err());
        assert!(err.contains("is missing vae/config.json"), "{err}");
        touch(
            dir.path(),
            MODEL_INDEX,
            r#"{"tokenizer": ["transformers", "CLIPTokenizer"]}"#,
        );
        let err = format!("{:#}", ModelFolder::open(dir.path()).unwrap_err());
        assert!(err.contains("missing tokenizer/"), "{err}");
    }

    #[test]
    fn parses_model_index() {
        let index = ModelIndex::parse(
            r#"{"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
                "requires_safety_checker": false, "safety_checker": [null, null],
                "unet": ["diffusers", "UNet2DConditionModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}"#,
        )
        .unwrap();
        assert_eq!(
            index.pipeline_class.as_deref(),
            Some("StableDiffusionPipeline")
        );
        assert_eq!(
            index.components.keys().collect::<Vec<_>>(),
            ["tokenizer", "unet"]
        );
        assert_eq!(index.components["unet"].class, "UNet2DConditionModel");
        let err = format!(
            "{:#}",
            ModelIndex::parse(r#"{"unet": ["diffusers", 3]}"#).unwrap_err()
        );
        assert!(err.contains("component `unet`"), "{err}");
    }

    #[test]
    fn parses_sources() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().to_str().unwrap();
        assert_eq!(
            ModelSource::parse(local).unwrap(),
            ModelSource::Local(dir.path().to_path_buf())
        );
        assert_eq!(
            ModelSource::parse("stabilityai/stable-diffusion-2-1").unwrap(),
            ModelSource::Hub("stabilityai/stable-diffusion-2-1".into())
        );
        for bad in [
            "./no/such/folder",
            "no-slash",
            "a/b/c",
            "../x",
            "owner/",
            "-x/y",
            "a/..b",
        ] {
            let err = format!("{:#}", ModelSource::parse(bad).unwrap_err());
            assert!(
                err.contains("neither an existing folder nor a Hugging Face Hub id"),
                "{bad}: {err}"
            );
        }
        let file = dir.path().join("model.safetensors");
        std::fs::write(&file, "").unwrap();
        let source = ModelSource::parse(file.to_str().unwrap()).unwrap();
        assert_eq!(
            source,
            ModelSource::SingleFile {
                file: file.clone(),
                configs_from: None,
                yaml: None,
            }
        );
        let err = format!(
            "{:#}",
            ModelSource::parse(local)
                .unwrap()
                .with_configs_from(Some(dir.path().into()))
                .unwrap_err()
        );
        assert!(err.contains("only for a single-file checkpoint"), "{err}");
    }

    #[test]
    fn hub_download_fails_clearly_when_unreachable() {
        // A closed local port stands in for "no network", whatever the test machine has.
        let cache = tempfile::tempdir().unwrap();
        let cache = Cache::new(cache.path().to_path_buf());
        let err = format!(
            "{:#}",
            open_from_hub(
                "someone/some-model",
                cache,
                Some("http://127.0.0.1:9".into())
            )
            .unwrap_err()
        );
        assert!(
            err.contains("`someone/some-model`") && err.contains("offline"),
            "{err}"
        );
        assert!(err.contains("pass the path of a diffusers folder"), "{err}");
    }

    #[test]
    fn a_partly_cached_model_names_what_it_lacks() {
        // hf-hub's cache layout: refs/main names the snapshot folder holding the files.
        let cache_dir = tempfile::tempdir().unwrap();
        let repo = cache_dir.path().join("models--someone--some-model");
        touch(&repo, "refs/main", "abc123");
        let snapshot = repo.join("snapshots/abc123");
        touch(&snapshot, MODEL_INDEX, "{}");
        touch(&snapshot, "unet/config.json", "{}");
        let err = format!(
            "{:#}",
            open_from_hub(
                "someone/some-model",
                Cache::new(cache_dir.path().to_path_buf()),
                Some("http://127.0.0.1:9".into())
            )
            .unwrap_err()
        );
        assert!(
            err.contains("holds only part of `someone/some-model`")
                && err.contains("snapshots/abc123/unet: expected diffusion_pytorch_model")
                && err.contains("pass the path of a diffusers folder"),
            "{err}"
        );
    }

    #[test]
    fn clip_model_folders_are_local_or_from_the_hub() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().to_str().unwrap();
        assert_eq!(clip_model_folder(local).unwrap(), dir.path());
        let err = format!("{:#}", clip_model_folder("no/such/folder").unwrap_err());
        assert!(
            err.contains("neither an existing folder nor a Hugging Face Hub id"),
            "{err}"
        );

        let cache = tempfile::tempdir().unwrap();
        let cache = Cache::new(cache.path().to_path_buf());
        let err = format!(
            "{:#}",
            folder_from_hub(
                "openai/clip-vit-base-patch32",
                &CLIP_FILES,
                cache,
                Some("http://127.0.0.1:9".into())
            )
            .unwrap_err()
        );
        assert!(
            err.contains("`openai/clip-vit-base-patch32`") && err.contains("offline"),
            "{err}"
        );
        assert!(
            err.contains("config.json, model.safetensors, preprocessor_config.json"),
            "{err}"
        );

        // A cached snapshot with the files that decide the features is used as it is, offline.
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().to_path_buf());
        cache
            .model("someone/clip".to_owned())
            .create_ref("abc123")
            .unwrap();
        let snapshot = dir.path().join("models--someone--clip/snapshots/abc123");
        std::fs::create_dir_all(&snapshot).unwrap();
        for file in &CLIP_FILES.files[..5] {
            std::fs::write(snapshot.join(file), "").unwrap();
        }
        let found = folder_from_hub(
            "someone/clip",
            &CLIP_FILES,
            cache,
            Some("http://127.0.0.1:9".into()),
        );
        assert_eq!(found.unwrap(), snapshot);
    }

    #[test]
    fn picks_files_to_download() {
        let listed = [
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder/model.fp16.safetensors",
            "scheduler/scheduler_config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "text_encoder_2/config.json",
            "text_encoder_2/model.fp16.safetensors",
            "tokenizer_2/special_tokens_map.json",
            "README.md",
        ];
        let files = files_to_download(&listed);
        assert_eq!(
            files,
            [
                "model_index.json",
                "scheduler/scheduler_config.json",
                "unet/config.json",
                "unet/diffusion_pytorch_model.fp16.safetensors",
                "text_encoder/config.json",
                "text_encoder/model.safetensors",
                "text_encoder_2/config.json",
                "text_encoder_2/model.fp16.safetensors",
                "tokenizer/vocab.json",
                "tokenizer/merges.txt",
                "tokenizer_2/special_tokens_map.json",
            ]
        );
    }
}
