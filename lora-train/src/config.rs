//! Training options: one set of names for the command line and the TOML file.
//!
//! [`TrainArgs`] is what a user may give — every field optional — and is both the clap argument
//! set and the TOML schema (`--config train.toml`, keys spelled as the flags: `batch-size = 2`).
//! Flags override the file ([`TrainArgs::overlay`]); [`TrainArgs::resolve`] fills the usual
//! defaults and checks every value, reporting all bad ones together.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::dataset::{ScanOptions, LABEL_PLACEHOLDER};
use crate::optimizer::{OptimizerKind, OptimizerSettings};
use crate::sample::SamplePrompt;
use anyhow::{bail, Context, Result};
use clap::Args;
use lora_core::adapters::blocks::parse_block_values;
use lora_core::adapters::AdapterAlgorithm;
use lora_core::adapters::Component;
use lora_core::models::config::PredictionType;
use lora_core::options::{DeviceSpec, Precision};
use lora_core::source::{BASE_CONFIG_HELP, NO_EMA_HELP, PREDICTION_TYPE_HELP};
use lora_core::{AdapterFormat, LoraInit, LoraTargets};
use serde::{Deserialize, Serialize};

/// Learning-rate schedule after the linear warm-up. Read from its flag spelling (`cosine`);
/// written into a checkpoint's recipe as `Cosine`, the spelling existing checkpoints hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LrScheduler {
    Constant,
    /// Half a cosine from the peak to 0 at the last step.
    Cosine,
    /// Straight line from the peak to 0 at the last step.
    Linear,
}

impl LrScheduler {
    pub fn name(self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::Cosine => "cosine",
            Self::Linear => "linear",
        }
    }
}

impl<'de> Deserialize<'de> for LrScheduler {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        lora_core::options::deserialize_text(d)
    }
}

impl FromStr for LrScheduler {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Self::Constant),
            "cosine" => Ok(Self::Cosine),
            "linear" => Ok(Self::Linear),
            _ => bail!("unknown LR scheduler `{s}`: expected constant, cosine or linear"),
        }
    }
}

/// How an image is cut to the square training resolution after its short side is resized to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Crop {
    /// The middle (kohya's default). Latents are then fixed per image and cached.
    Center,
    /// A fresh random window every time the image is drawn (diffusers' default). Latents cannot
    /// be cached, so the VAE runs every step.
    Random,
}

/// Everything a user can set, from flags or the TOML file. `None` means "not given here".
#[derive(Debug, Clone, Default, Args, Deserialize)]
// Unknown keys are refused by `from_toml_file` (serde's deny_unknown_fields cannot be combined
// with the flattened dataset options).
#[serde(rename_all = "kebab-case")]
pub struct TrainArgs {
    /// Base model: a diffusers folder, a Hugging Face Hub id (owner/name), or a single-file
    /// SD1.x/SD2.x checkpoint (.safetensors with LDM keys), recognised from its tensors
    #[arg(long)]
    pub base: Option<String>,
    #[arg(long, value_name = "DIR", help = BASE_CONFIG_HELP)]
    pub base_config: Option<PathBuf>,
    #[arg(long, value_name = "TYPE", help = PREDICTION_TYPE_HELP)]
    pub prediction_type: Option<PredictionType>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", help = NO_EMA_HELP)]
    pub no_ema: Option<bool>,
    /// The training images: a folder in kohya's layout (sidecar caption files, `N_token`
    /// sub-folders repeated N times), a Hugging Face `imagefolder` (a metadata.jsonl or
    /// metadata.csv at its top level with a `file_name` and a caption column), or a Hugging Face
    /// dataset in parquet (a .parquet file, or a folder in the Hub layout: see --split)
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The adapter file to write (.safetensors)
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// LoRA rank [default: 4]
    #[arg(long)]
    pub rank: Option<usize>,
    /// LoRA alpha [default: the rank]
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Adapted layers: attn2, attn or attn-mlp [default: attn2]
    #[arg(long)]
    pub targets: Option<LoraTargets>,
    /// Initialisation of lora_down: kaiming-uniform or gaussian [default: kaiming-uniform]
    #[arg(long)]
    pub init: Option<LoraInit>,
    /// Also adapt the resnets and down/up samplers, as kohya's --network_args conv_dim=N does
    /// (LoCon): every 3×3 convolution at this rank, the resnets' time_emb_proj and 1×1
    /// conv_shortcut at --rank [default: off]
    #[arg(long, value_name = "RANK")]
    pub conv_rank: Option<usize>,
    /// Alpha of the conv adapters (kohya: conv_alpha, whose default is 1: give --conv-alpha 1 to
    /// port a kohya recipe that leaves it out) [default: --conv-rank, as --alpha defaults to
    /// --rank]
    #[arg(long, value_name = "ALPHA")]
    pub conv_alpha: Option<f64>,
    /// DoRA (weight-decomposed LoRA; peft use_dora, LyCORIS/kohya --network_args dora_wd=True):
    /// every adapted layer also learns a magnitude per output channel, its weight becoming
    /// m · (W + ΔW) / ‖W + ΔW‖; saved as kohya/LyCORIS dora_scale or PEFT
    /// lora_magnitude_vector. The norm gets no gradient, as in peft (LyCORIS differentiates
    /// through it)
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub dora: Option<bool>,
    /// Adapter algorithm: lora, or LyCORIS' loha (Hadamard product of two low-rank pairs) or
    /// lokr (Kronecker product), at --rank / --alpha (and --conv-rank for the convolutions), as
    /// LyCORIS' kohya module (--network_module lycoris.kohya --network_args algo=…) trains them;
    /// written in the kohya layout LyCORIS, ComfyUI and A1111 load [default: lora]
    #[arg(long)]
    pub algo: Option<AdapterAlgorithm>,
    /// LoKr's factor (LyCORIS factor): each side of a weight splits into two factors, one at most
    /// this [default: -1, as square as possible]
    #[arg(long, allow_negative_numbers = true)]
    pub factor: Option<i64>,
    /// Per-block learning rates as multiples of --lr, BLOCK=FACTOR with kohya's block names
    /// (in0…in11, mid, out0…out11 for SD1.x/SD2.x: rows of the original UNet), e.g.
    /// in4=0.5,mid=2,out11=1 (kohya: down_lr_weight / mid_lr_weight / up_lr_weight); a block at 0
    /// gets no adapter [default: 1 everywhere]
    #[arg(long, value_name = "BLOCK=FACTOR", num_args = 1..)]
    #[serde(default, deserialize_with = "one_or_many")]
    pub block_lr: Option<Vec<String>>,
    /// Per-block ranks, BLOCK=RANK with the same block names, e.g. mid=16,out11=8 (kohya:
    /// block_dims; alpha stays --alpha) [default: --rank everywhere]
    #[arg(long, value_name = "BLOCK=RANK", num_args = 1..)]
    #[serde(default, deserialize_with = "one_or_many")]
    pub block_rank: Option<Vec<String>>,
    /// Also train a LoRA on the text encoder (both of SDXL's): every attention projection and
    /// MLP layer (kohya trains it unless --network_train_unet_only); captions are then encoded
    /// every step instead of once
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub train_text_encoder: Option<bool>,
    /// Peak learning rate of the text encoders' adapters; SDXL takes one per encoder (first,
    /// second), and 0 leaves that encoder's adapter as it starts, a no-op (kohya:
    /// --text_encoder_lr) [default: --lr]
    #[arg(long, value_name = "LR", num_args = 1..=2)]
    #[serde(default, deserialize_with = "one_or_many")]
    pub text_encoder_lr: Option<Vec<f64>>,
    /// Optimizer steps to train (each of batch-size × grad-accum samples) [default: 1000]
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Train for this many passes over the dataset (with repeats) instead of --steps
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Samples per micro-batch [default: 1]
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches whose gradients are summed per optimizer step [default: 1]
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate [default: 1e-4]
    #[arg(long)]
    pub lr: Option<f64>,
    /// constant, cosine or linear [default: constant]
    #[arg(long)]
    pub lr_scheduler: Option<LrScheduler>,
    /// Steps of linear warm-up from 0 to --lr [default: 0]
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// adamw (PyTorch's AdamW), adamw8bit (bitsandbytes' AdamW8bit: block-wise 8-bit moments, a
    /// quarter of the state from rank 16 on), lion (lion-pytorch) or prodigy (prodigyopt; its
    /// step size is estimated, so --lr defaults to 1.0 with it) (kohya: --optimizer_type)
    /// [default: adamw]
    #[arg(long)]
    pub optimizer: Option<OptimizerKind>,
    /// KEY=VALUE settings of the optimizer, named as its reference implementation names them
    /// (kohya: --optimizer_args), e.g. betas=0.9,0.99 eps=1e-8; prodigy: d_coef=2
    /// use_bias_correction=true safeguard_warmup=true decouple=true beta3=… d0=… growth_rate=…
    #[arg(long, value_name = "KEY=VALUE", num_args = 1..)]
    pub optimizer_args: Option<Vec<String>>,
    /// Prior preservation (DreamBooth): class images (any --data layout, e.g. a kohya
    /// reg_data_dir holding folders such as `1_dog/`), one paired with each training sample, so a
    /// step runs 2 × --batch-size samples and --epochs counts passes over --data (kohya:
    /// --reg_data_dir, whose batches mix both and whose epochs take twice the steps; diffusers:
    /// --class_data_dir, as here); the loss adds theirs, weighted
    #[arg(long, value_name = "DATA")]
    pub class_data: Option<PathBuf>,
    /// The weight of the class images' loss (kohya and diffusers: --prior_loss_weight): the loss
    /// is the training samples' mean plus W times the class samples', as diffusers computes it
    /// (kohya's mean over the mixed batch is half that) [default: 1.0]
    #[arg(long, value_name = "W")]
    pub prior_loss_weight: Option<f64>,
    /// Held-out images (any --data layout, read with the same dataset options) whose denoising
    /// loss at fixed timesteps and noise is logged as `val_loss` in the metrics file
    #[arg(long, value_name = "DATA", conflicts_with = "validation_split")]
    pub validation_data: Option<PathBuf>,
    /// Hold out this fraction of --data's images for validation instead, chosen by --seed
    /// (kohya: --validation_split)
    #[arg(long, value_name = "F")]
    pub validation_split: Option<f64>,
    /// Score the validation images before the first step and every N steps (kohya:
    /// --validate_every_n_steps) [default: a tenth of the run]
    #[arg(long, value_name = "N")]
    pub validate_every: Option<usize>,
    /// Masked loss (kohya: --masked_loss): a folder with a grayscale mask per training image,
    /// named as the image (any image extension) and of its size; white counts, black is ignored
    #[arg(long, value_name = "DIR")]
    pub masks: Option<PathBuf>,
    /// Keep a moving average of the adapter weights with this decay (e.g. 0.999), as diffusers'
    /// EMAModel does (warm-up min(decay, (1+s)/(10+s))), written beside the adapter as
    /// NAME-ema.safetensors
    #[arg(long, value_name = "DECAY")]
    pub ema_decay: Option<f64>,
    /// Weight decay, decoupled as AdamW's [default: 0.01 for adamw, 0 for lion and prodigy, as
    /// their reference implementations]
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Gradient-norm clipping threshold [default: 1.0]
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Square training resolution in pixels [default: the model's, its UNet's sample size times
    /// the VAE's factor as in diffusers: 1024 for SDXL, 768 for SD 2.x-v, 512 for SD 1.x and
    /// SD 2.x-base]
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Crop the centre of each image (the default)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", conflicts_with = "random_crop")]
    pub center_crop: Option<bool>,
    /// Crop a random window each time (disables latent caching)
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub random_crop: Option<bool>,
    /// Mirror images horizontally at random
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub flip: Option<bool>,
    /// Aspect-ratio buckets: each image trains at the bucket (about resolution² pixels, sides
    /// multiples of the model's granularity) nearest its shape; a batch never mixes buckets
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub buckets: Option<bool>,
    #[command(flatten)]
    #[serde(flatten)]
    pub dataset: DatasetArgs,
    /// Probability of training a sample with the empty caption [default: 0]
    #[arg(long)]
    pub caption_dropout: Option<f64>,
    /// Seed of every random choice (init, data order, noise, timesteps) [default: 0]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Min-SNR-γ loss weighting (5 is usual) [default: off]
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// Noise offset added per sample and channel [default: 0]
    #[arg(long)]
    pub noise_offset: Option<f64>,
    /// dtype of the frozen base UNet: f32, f16 or bf16 (kohya: --mixed_precision) [default: f32]
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Keep only the values between UNet layers and recompute each layer in the backward pass:
    /// far less memory for about one more forward pass per step; the same gradients
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: Option<bool>,
    /// auto (CUDA when built with it and a GPU is present, else the CPU; the choice is printed),
    /// cpu, cuda or cuda:N [default: auto]
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Write a checkpoint (and an adapter) every N steps
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Keep only the newest N checkpoints of --save-every (with their adapters), deleting older
    /// ones as new ones are written (kohya: --save_last_n_steps) [default: keep all]
    #[arg(long, value_name = "N")]
    pub keep_checkpoints: Option<usize>,
    /// Continue from a checkpoint written by --save-every; `latest`: the newest one beside
    /// --output, or a fresh start when there is none (the same command for every restart of a
    /// preempted run)
    #[arg(long, value_name = "CHECKPOINT|latest")]
    pub resume: Option<PathBuf>,
    /// Adapter file layout: kohya or peft [default: kohya]
    #[arg(long)]
    pub format: Option<AdapterFormat>,
    /// Per-step metrics as JSON lines [default: <output>.metrics.jsonl]
    #[arg(long)]
    pub metrics: Option<PathBuf>,
    /// Skip unreadable images and images without a caption instead of refusing to start
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub skip_bad: Option<bool>,
    /// Start over where an earlier run left its adapter, metrics or checkpoints beside --output,
    /// replacing them (without it they are refused: pass --resume latest to continue that run)
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub overwrite: Option<bool>,
    /// Read a PyTorch pickle --base (.ckpt) through a safetensors copy in the cache, made by a
    /// reader that never executes anything from the file [default: pickles are refused]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub allow_pickle: Option<bool>,
    /// Write sample images (lora-infer's pipeline, DDIM, guidance 7.5) every N steps
    #[arg(long)]
    pub sample_every: Option<usize>,
    /// Prompt of the sample images (repeat the flag for several; a list in TOML), with kohya's
    /// per-prompt options if wanted: --n NEGATIVE, --d SEED, --l GUIDANCE, --s STEPS
    /// (e.g. "a sks dog --d 42 --l 6"); each step's samples are also drawn as one grid
    #[arg(long)]
    pub sample_prompt: Option<Vec<String>>,
    /// Denoising steps per sample image [default: 20]
    #[arg(long)]
    pub sample_steps: Option<usize>,
    /// With --sample-every: FID of each step's sample images against the training images, logged
    /// as `{"step": N, "fid": …}` in the metrics file. FILE: pytorch-fid's Inception-v3 weights
    /// as .safetensors (scripts/convert_fid_inception.py). Needs at least 2 --sample-prompt; FID
    /// from a handful of samples shows a trend over the run, not a number to compare with papers
    #[arg(long, value_name = "FILE")]
    pub eval_inception: Option<PathBuf>,
    /// With --sample-every: CLIP score of each step's sample images against their prompts,
    /// logged as `{"step": N, "clip_score": …}` in the metrics file (one row with FID when both
    /// are asked for). MODEL: a transformers CLIP folder or Hub id, such as
    /// openai/clip-vit-large-patch14
    #[arg(long, value_name = "MODEL")]
    pub eval_clip: Option<String>,
}

/// How a dataset is read, shared by training and the `lora-train data` commands. `None` means
/// "not given here".
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DatasetArgs {
    /// Caption file extension of a kohya folder [default: .txt]
    #[arg(long)]
    pub caption_ext: Option<String>,
    /// The caption column of an imagefolder's metadata or a parquet dataset (diffusers'
    /// --caption_column): text, or a ClassLabel whose class names become captions (see
    /// --caption-template) [default: text]
    #[arg(long, value_name = "NAME")]
    pub caption_column: Option<String>,
    /// The image column of a parquet dataset, a `datasets` Image (diffusers' --image_column)
    /// [default: image]
    #[arg(long, value_name = "NAME")]
    pub image_column: Option<String>,
    /// The split of a parquet dataset folder: the files its README's `configs:` give the split,
    /// else those its file or folder names say (`data/train-00000-of-00001.parquet`)
    /// [default: train]
    #[arg(long, value_name = "NAME")]
    pub split: Option<String>,
    /// Makes each caption from the caption column's text or class name, written in place of
    /// `{label}`: "a photo of {label}" [default: the column as it is]
    #[arg(long, value_name = "TEMPLATE")]
    pub caption_template: Option<String>,
    /// Keeps the rows of these classes only (a ClassLabel caption column; comma-separated or
    /// repeated)
    #[arg(long, value_name = "CLASS", value_delimiter = ',')]
    pub label_filter: Option<Vec<String>>,
}

impl DatasetArgs {
    /// `self` with every value given in `over` replacing its own.
    pub fn overlay(self, over: DatasetArgs) -> DatasetArgs {
        DatasetArgs {
            caption_ext: over.caption_ext.or(self.caption_ext),
            caption_column: over.caption_column.or(self.caption_column),
            image_column: over.image_column.or(self.image_column),
            split: over.split.or(self.split),
            caption_template: over.caption_template.or(self.caption_template),
            label_filter: over.label_filter.or(self.label_filter),
        }
    }

    /// The options with defaults filled in; each invalid value adds a line to `problems`.
    pub fn resolve(self, skip_bad: bool, problems: &mut Vec<String>) -> ScanOptions {
        let defaults = ScanOptions::default();
        let caption_ext = self.caption_ext.unwrap_or(defaults.caption_ext);
        if !(caption_ext.starts_with('.') && caption_ext.len() > 1 && !caption_ext.contains('/')) {
            problems.push(format!(
                "--caption-ext = `{caption_ext}`: expected an extension such as .txt"
            ));
        }
        let mut named = |flag: &str, value: Option<String>, default: String| {
            let value = value.unwrap_or(default);
            if value.trim().is_empty() {
                problems.push(format!("--{flag} is empty: expected a name"));
            }
            value
        };
        let caption_column = named(
            "caption-column",
            self.caption_column,
            defaults.caption_column,
        );
        let image_column = named("image-column", self.image_column, defaults.image_column);
        let split = named("split", self.split, defaults.split);
        if let Some(template) = &self.caption_template {
            if !template.contains(LABEL_PLACEHOLDER) {
                problems.push(format!(
                    "--caption-template = `{template}`: expected {LABEL_PLACEHOLDER} where the \
                     label goes, e.g. \"a photo of {LABEL_PLACEHOLDER}\""
                ));
            }
        }
        let label_filter = self.label_filter.unwrap_or_default();
        if label_filter.iter().any(|l| l.trim().is_empty()) {
            problems.push("--label-filter has an empty class name".into());
        }
        ScanOptions {
            caption_ext,
            caption_column,
            image_column,
            split,
            caption_template: self.caption_template,
            label_filter,
            skip_bad,
        }
    }
}

/// A checked, complete set of training options.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainConfig {
    pub base: String,
    pub base_config: Option<PathBuf>,
    /// `--prediction-type`; left out of the recipe when not given, as older checkpoints have no
    /// key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<PredictionType>,
    /// `--no-ema`; left out of the recipe when off.
    #[serde(skip_serializing_if = "is_false")]
    pub no_ema: bool,
    pub data: PathBuf,
    pub output: PathBuf,
    pub rank: usize,
    pub alpha: f64,
    #[serde(serialize_with = "as_display")]
    pub targets: LoraTargets,
    #[serde(serialize_with = "as_debug")]
    pub init: LoraInit,
    /// `--conv-rank`: LoCon adapters on the 3×3 convolutions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conv_rank: Option<usize>,
    /// With `conv_rank` only (default: the conv rank).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conv_alpha: Option<f64>,
    /// `--dora`; left out of the recipe when off, as checkpoints before it have no key.
    #[serde(skip_serializing_if = "is_false")]
    pub dora: bool,
    /// `--algo`; left out of the recipe for LoRA.
    #[serde(skip_serializing_if = "is_lora", serialize_with = "as_display")]
    pub algo: AdapterAlgorithm,
    /// `--factor` (LoKr only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub factor: Option<i64>,
    /// `--block-lr`: per block name, its learning rate as a multiple of `lr`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub block_lr: BTreeMap<String, f64>,
    /// `--block-rank`: per block name, its rank.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub block_rank: BTreeMap<String, usize>,
    /// Left out of the recipe when off, as checkpoints before it have no key.
    #[serde(skip_serializing_if = "is_false")]
    pub train_text_encoder: bool,
    /// `None`: `lr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_encoder_lr: Option<f64>,
    /// SDXL's second text encoder's, when two values were given (left out of the recipe
    /// otherwise, as checkpoints before it have no key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder_2_lr: Option<f64>,
    pub length: TrainLength,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub lr_scheduler: LrScheduler,
    pub warmup_steps: usize,
    /// Left out of the recipe at the default (AdamW), as checkpoints before it have no key.
    #[serde(
        skip_serializing_if = "is_default_optimizer",
        serialize_with = "as_display"
    )]
    pub optimizer: OptimizerKind,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub optimizer_args: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ema_decay: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_data: Option<PathBuf>,
    /// With `class_data` only (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prior_loss_weight: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_data: Option<PathBuf>,
    /// Part of the recipe: it decides which images train.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validation_split: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub validate_every: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masks: Option<PathBuf>,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub resolution: usize,
    /// `--resolution` was not given: [`Self::resolution`] becomes the model's once it is open
    /// (512 until then).
    #[serde(skip)]
    pub resolution_from_model: bool,
    pub crop: Crop,
    pub flip: bool,
    pub buckets: bool,
    /// How the dataset is read (`skip_bad` included); flattened so that the recipe keeps the
    /// keys it had before the options were grouped.
    #[serde(flatten)]
    pub dataset: ScanOptions,
    pub caption_dropout: f64,
    pub seed: u64,
    pub min_snr_gamma: Option<f64>,
    pub noise_offset: f64,
    /// Spelled `Fp32`, `Fp16` or `Bf16` in the recipe a checkpoint keeps, as checkpoints
    /// already written spell it, so that they still resume.
    #[serde(serialize_with = "recipe_precision")]
    pub precision: Precision,
    pub gradient_checkpointing: bool,
    pub device: DeviceSpec,
    pub save_every: Option<usize>,
    pub keep_checkpoints: Option<usize>,
    pub resume: Option<PathBuf>,
    #[serde(serialize_with = "as_display")]
    pub format: AdapterFormat,
    pub metrics: PathBuf,
    pub overwrite: bool,
    pub allow_pickle: bool,
    pub sample: Option<SampleConfig>,
}

/// `--sample-every`: images written during training, and the scores computed from them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SampleConfig {
    pub every: usize,
    pub prompts: Vec<SamplePrompt>,
    pub steps: usize,
    /// `--eval-inception`: FID against the training images.
    pub inception: Option<PathBuf>,
    /// `--eval-clip`: CLIP score against the prompts (a folder or Hub id, resolved on load).
    pub clip: Option<String>,
}

/// How long to train; epochs become steps once the dataset size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TrainLength {
    Steps(usize),
    Epochs(usize),
}

impl TrainConfig {
    /// The peak learning rate of text encoder `component`'s adapter (`--text-encoder-lr`, its
    /// second value for SDXL's second encoder, else `--lr`).
    pub fn text_encoder_lr(&self, component: Component) -> f64 {
        let first = self.text_encoder_lr.unwrap_or(self.lr);
        match component {
            Component::TextEncoder2 => self.text_encoder_2_lr.unwrap_or(first),
            _ => first,
        }
    }

    /// The optimizer and its settings.
    pub fn optimizer_settings(&self) -> OptimizerSettings {
        OptimizerSettings {
            kind: self.optimizer,
            weight_decay: self.weight_decay,
            args: self.optimizer_args.clone(),
        }
    }
}

/// A TOML value given as one string (`"in4=0.5,mid=2"`) or as a list of strings.
fn one_or_many<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Vec<T>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        One(T),
        Many(Vec<T>),
    }
    Ok(Some(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    }))
}

fn is_lora(algo: &AdapterAlgorithm) -> bool {
    *algo == AdapterAlgorithm::Lora
}

fn is_false(value: &bool) -> bool {
    !value
}

fn is_default_optimizer(kind: &OptimizerKind) -> bool {
    *kind == OptimizerKind::default()
}

fn as_display<T: fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn recipe_precision<S: serde::Serializer>(p: &Precision, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match p {
        Precision::F32 => "Fp32",
        Precision::F16 => "Fp16",
        Precision::Bf16 => "Bf16",
    })
}

fn as_debug<T: fmt::Debug, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{v:?}"))
}

impl TrainArgs {
    /// Reads a TOML file of the same keys as the flags; unknown keys are errors.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::from_toml(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// The options a TOML text sets.
    pub fn from_toml(text: &str) -> Result<Self> {
        let table: toml::Table = toml::from_str(text)?;
        // The flags are the schema: a key that is no flag's name is a typo, not a setting to
        // ignore.
        let command = <Self as clap::Args>::augment_args(clap::Command::new("lora-train"));
        let keys: Vec<&str> = command
            .get_arguments()
            .filter_map(|a| a.get_long())
            .collect();
        let unknown: Vec<&String> = table
            .keys()
            .filter(|k| !keys.contains(&k.as_str()))
            .collect();
        if !unknown.is_empty() {
            bail!(
                "unknown key(s) {}; the keys are the flags' names without `--`",
                unknown
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(toml::Value::Table(table).try_into()?)
    }

    /// `self` with every value given in `over` replacing its own (flags over file).
    pub fn overlay(self, over: TrainArgs) -> TrainArgs {
        macro_rules! pick {
            ($($f:ident),*) => {
                TrainArgs {
                    $($f: over.$f.or(self.$f)),*,
                    dataset: self.dataset.overlay(over.dataset),
                }
            };
        }
        pick!(
            base,
            base_config,
            prediction_type,
            no_ema,
            data,
            output,
            rank,
            alpha,
            targets,
            init,
            conv_rank,
            conv_alpha,
            dora,
            algo,
            factor,
            block_lr,
            block_rank,
            train_text_encoder,
            text_encoder_lr,
            steps,
            epochs,
            batch_size,
            grad_accum,
            lr,
            lr_scheduler,
            warmup_steps,
            optimizer,
            optimizer_args,
            class_data,
            prior_loss_weight,
            validation_data,
            validation_split,
            validate_every,
            masks,
            ema_decay,
            weight_decay,
            max_grad_norm,
            resolution,
            center_crop,
            random_crop,
            flip,
            buckets,
            caption_dropout,
            seed,
            min_snr_gamma,
            noise_offset,
            precision,
            gradient_checkpointing,
            device,
            save_every,
            keep_checkpoints,
            resume,
            format,
            metrics,
            skip_bad,
            overwrite,
            allow_pickle,
            sample_every,
            sample_prompt,
            sample_steps,
            eval_inception,
            eval_clip
        )
    }

    /// Fills defaults and validates; every problem is listed in one error.
    pub fn resolve(self) -> Result<TrainConfig> {
        let mut problems: Vec<String> = Vec::new();
        for (name, given) in [
            ("base", self.base.is_some()),
            ("data", self.data.is_some()),
            ("output", self.output.is_some()),
        ] {
            if !given {
                problems.push(format!("--{name} is required"));
            }
        }
        let (base, data, output) = (self.base, self.data, self.output);

        let targets = self.targets.unwrap_or_default();
        let init = self.init.unwrap_or_default();
        let lr_scheduler = self.lr_scheduler.unwrap_or(LrScheduler::Constant);
        let precision = self.precision.unwrap_or_default();
        // A concrete device: `auto` is resolved once, here (the binary says what it chose).
        let device = self.device.unwrap_or_default().resolve();
        let format = self.format.unwrap_or(AdapterFormat::Kohya);
        let dataset = self
            .dataset
            .resolve(self.skip_bad.unwrap_or(false), &mut problems);

        let mut check = |ok: bool, message: String| {
            if !ok {
                problems.push(message);
            }
        };
        let rank = self.rank.unwrap_or(4);
        check(rank >= 1, format!("--rank = {rank}: expected at least 1"));
        let alpha = self.alpha.unwrap_or(rank as f64);
        check(
            alpha.is_finite() && alpha > 0.0,
            format!("--alpha = {alpha}: expected a positive number"),
        );
        let length = match (self.steps, self.epochs) {
            (Some(_), Some(_)) => {
                check(false, "give --steps or --epochs, not both".into());
                TrainLength::Steps(0)
            }
            (_, Some(e)) => TrainLength::Epochs(e),
            (s, None) => TrainLength::Steps(s.unwrap_or(1000)),
        };
        let n = match length {
            TrainLength::Steps(n) | TrainLength::Epochs(n) => n,
        };
        check(n >= 1, "--steps / --epochs: expected at least 1".into());
        let batch_size = self.batch_size.unwrap_or(1);
        check(
            batch_size >= 1,
            format!("--batch-size = {batch_size}: expected at least 1"),
        );
        let grad_accum = self.grad_accum.unwrap_or(1);
        check(
            grad_accum >= 1,
            format!("--grad-accum = {grad_accum}: expected at least 1"),
        );
        let optimizer = self.optimizer.unwrap_or_default();
        let lr = self.lr.unwrap_or(optimizer.default_lr());
        if let Some(rank) = self.conv_rank {
            check(
                rank >= 1,
                format!("--conv-rank = {rank}: expected at least 1"),
            );
        }
        let algo = self.algo.unwrap_or_default();
        if let Some(factor) = self.factor {
            check(
                algo == AdapterAlgorithm::LoKr,
                "--factor is LoKr's: give it with --algo lokr".into(),
            );
            check(
                factor == -1 || factor >= 1,
                format!("--factor = {factor}: expected -1 or a positive number"),
            );
        }
        check(
            !(self.dora.unwrap_or(false) && algo != AdapterAlgorithm::Lora),
            format!("--dora applies to --algo lora, not {algo}"),
        );
        check(
            algo == AdapterAlgorithm::Lora || format == AdapterFormat::Kohya,
            format!(
                "--algo {algo} is written in the kohya layout (LyCORIS, ComfyUI and A1111 load \
                 it); PEFT files hold LoRA only: leave out --format peft"
            ),
        );
        let conv_alpha = match (self.conv_rank, self.conv_alpha) {
            (None, Some(_)) => {
                check(false, "--conv-alpha given without --conv-rank".into());
                None
            }
            (Some(rank), alpha) => {
                let alpha = alpha.unwrap_or(rank.max(1) as f64);
                check(
                    alpha.is_finite() && alpha > 0.0,
                    format!("--conv-alpha = {alpha}: expected a positive number"),
                );
                Some(alpha)
            }
            (None, None) => None,
        };
        let block_lr = parse_block_values(
            "--block-lr",
            self.block_lr.as_deref().unwrap_or_default(),
            |v| v.parse::<f64>().ok().filter(|f| f.is_finite() && *f >= 0.0),
            "a factor ≥ 0",
        )
        .unwrap_or_else(|e| {
            check(false, format!("{e:#}"));
            BTreeMap::new()
        });
        check(
            optimizer != OptimizerKind::Prodigy || block_lr.values().all(|&f| f == 0.0 || f == 1.0),
            "--block-lr with --optimizer prodigy: prodigy estimates one step size for every \
             parameter, so a block's factor can only be 1 (or 0: no adapter there)"
                .into(),
        );
        let block_rank = parse_block_values(
            "--block-rank",
            self.block_rank.as_deref().unwrap_or_default(),
            |v| v.parse::<usize>().ok().filter(|r| *r >= 1),
            "a rank ≥ 1",
        )
        .unwrap_or_else(|e| {
            check(false, format!("{e:#}"));
            BTreeMap::new()
        });
        let train_text_encoder = self.train_text_encoder.unwrap_or(false);
        let te_lrs = self.text_encoder_lr.clone().unwrap_or_default();
        check(
            te_lrs.is_empty() || train_text_encoder,
            "--text-encoder-lr given without --train-text-encoder".into(),
        );
        check(
            te_lrs.len() <= 2,
            format!(
                "--text-encoder-lr takes one value, or two for SDXL's two text encoders, not {}",
                te_lrs.len()
            ),
        );
        for &te_lr in &te_lrs {
            check(
                te_lr.is_finite() && te_lr >= 0.0,
                format!("--text-encoder-lr = {te_lr}: expected a number ≥ 0"),
            );
            check(
                optimizer != OptimizerKind::Prodigy || te_lr == lr,
                format!(
                    "--text-encoder-lr = {te_lr} with --optimizer prodigy: prodigy estimates one \
                     step size for every parameter, so it takes one learning rate (--lr = {lr}); \
                     to keep the text encoder as it is, leave out --train-text-encoder"
                ),
            );
        }
        check(
            lr.is_finite() && lr > 0.0,
            format!("--lr = {lr}: expected a positive number"),
        );
        let warmup_steps = self.warmup_steps.unwrap_or(0);
        if let TrainLength::Steps(steps) = length {
            check(
                warmup_steps < steps.max(1),
                format!("--warmup-steps = {warmup_steps}: expected fewer than --steps = {steps}"),
            );
        }
        let weight_decay = self
            .weight_decay
            .unwrap_or(optimizer.default_weight_decay());
        check(
            weight_decay.is_finite() && weight_decay >= 0.0,
            format!("--weight-decay = {weight_decay}: expected a number ≥ 0"),
        );
        let mut optimizer_args = BTreeMap::new();
        for arg in self.optimizer_args.iter().flatten() {
            match arg.split_once('=') {
                Some((key, value)) if !key.trim().is_empty() => {
                    optimizer_args.insert(key.trim().to_string(), value.trim().to_string());
                }
                _ => check(
                    false,
                    format!("--optimizer-args `{arg}`: expected KEY=VALUE (e.g. d_coef=2)"),
                ),
            }
        }
        let prior_loss_weight = match (&self.class_data, self.prior_loss_weight) {
            (None, Some(_)) => {
                check(
                    false,
                    "--prior-loss-weight given without --class-data".into(),
                );
                None
            }
            (None, None) => None,
            (Some(_), weight) => {
                let weight = weight.unwrap_or(1.0);
                check(
                    weight.is_finite() && weight >= 0.0,
                    format!("--prior-loss-weight = {weight}: expected a number ≥ 0"),
                );
                check(
                    !self.buckets.unwrap_or(false),
                    "--class-data with --buckets: class images train at the square --resolution \
                     beside each training sample, so the batch cannot follow a bucket (drop \
                     --buckets)"
                        .into(),
                );
                Some(weight)
            }
        };
        if let Some(Err(e)) = self.validation_split.map(crate::validation::check_fraction) {
            check(false, format!("{e}"));
        }
        if let Some(every) = self.validate_every {
            check(every >= 1, "--validate-every 0: expected at least 1".into());
            check(
                self.validation_data.is_some() || self.validation_split.is_some(),
                "--validate-every needs validation images: --validation-data or --validation-split"
                    .into(),
            );
        }
        check(
            self.validation_data.is_none() || self.validation_split.is_none(),
            "--validation-data and --validation-split both give validation images: choose one"
                .into(),
        );
        check(
            self.masks.is_none() || !self.random_crop.unwrap_or(false),
            "--masks works with centre crops only: the random crop window is not shared with \
             the mask (drop --random-crop)"
                .into(),
        );
        if let Some(Err(e)) = self.ema_decay.map(crate::ema::check_decay) {
            check(false, format!("{e}"));
        }
        let optimizer_settings = OptimizerSettings {
            kind: optimizer,
            weight_decay,
            args: optimizer_args.clone(),
        };
        if let Err(e) = optimizer_settings.check() {
            check(false, format!("{e:#}"));
        }
        let max_grad_norm = self.max_grad_norm.unwrap_or(1.0);
        check(
            max_grad_norm.is_finite() && max_grad_norm > 0.0,
            format!("--max-grad-norm = {max_grad_norm}: expected a positive number"),
        );
        let resolution = self.resolution.unwrap_or(512);
        check(
            (8..=8192).contains(&resolution),
            format!("--resolution = {resolution}: expected 8 to 8192 pixels"),
        );
        let random = self.random_crop.unwrap_or(false);
        check(
            !(random && self.center_crop == Some(true)),
            "give --center-crop or --random-crop, not both".into(),
        );
        let crop = if random { Crop::Random } else { Crop::Center };
        let caption_dropout = self.caption_dropout.unwrap_or(0.0);
        check(
            (0.0..=1.0).contains(&caption_dropout),
            format!("--caption-dropout = {caption_dropout}: expected a probability in [0, 1]"),
        );
        if let Some(g) = self.min_snr_gamma {
            check(
                g.is_finite() && g > 0.0,
                format!("--min-snr-gamma = {g}: expected a positive number"),
            );
        }
        let noise_offset = self.noise_offset.unwrap_or(0.0);
        check(
            noise_offset.is_finite() && noise_offset >= 0.0,
            format!("--noise-offset = {noise_offset}: expected a number ≥ 0"),
        );
        if let Some(every) = self.save_every {
            check(
                every >= 1,
                format!("--save-every = {every}: expected at least 1"),
            );
        }
        if let Some(keep) = self.keep_checkpoints {
            check(
                keep >= 1 && self.save_every.is_some(),
                format!("--keep-checkpoints = {keep}: expected at least 1, with --save-every"),
            );
        }
        if let Err(e) = precision.check_device(device) {
            check(false, e.to_string());
        }
        if let Some(output) = &output {
            check(
                output.extension().is_some_and(|e| e == "safetensors"),
                format!(
                    "--output {}: expected a .safetensors file name",
                    output.display()
                ),
            );
        }
        let sample_steps = self.sample_steps.unwrap_or(20);
        check(
            sample_steps >= 1,
            format!("--sample-steps = {sample_steps}: expected at least 1"),
        );
        let prompts: Vec<SamplePrompt> = self
            .sample_prompt
            .unwrap_or_default()
            .iter()
            .filter_map(|line| match line.parse() {
                Ok(prompt) => Some(prompt),
                Err(e) => {
                    check(false, format!("--sample-prompt: {e:#}"));
                    None
                }
            })
            .collect();
        let sample = match self.sample_every {
            Some(every) => {
                check(
                    every >= 1 && !prompts.is_empty(),
                    format!("--sample-every = {every}: expected at least 1, with at least one --sample-prompt"),
                );
                if let Some(inception) = &self.eval_inception {
                    check(
                        prompts.len() >= 2,
                        format!(
                            "--eval-inception {}: FID needs at least 2 sample images to estimate \
                             a covariance; give at least 2 --sample-prompt (got {})",
                            inception.display(),
                            prompts.len()
                        ),
                    );
                }
                Some(SampleConfig {
                    every,
                    prompts,
                    steps: sample_steps,
                    inception: self.eval_inception,
                    clip: self.eval_clip,
                })
            }
            None => {
                check(
                    prompts.is_empty(),
                    "--sample-prompt given without --sample-every".into(),
                );
                for (flag, given) in [
                    ("--eval-inception", self.eval_inception.is_some()),
                    ("--eval-clip", self.eval_clip.is_some()),
                ] {
                    check(
                        !given,
                        format!("{flag} given without --sample-every: it scores the sample images"),
                    );
                }
                None
            }
        };
        if !problems.is_empty() {
            bail!("invalid training options:\n  {}", problems.join("\n  "));
        }
        let output = output.expect("checked above");
        let metrics = self
            .metrics
            .unwrap_or_else(|| append_to_name(&output, ".metrics.jsonl"));
        Ok(TrainConfig {
            base: base.expect("checked above"),
            base_config: self.base_config,
            prediction_type: self.prediction_type,
            no_ema: self.no_ema.unwrap_or(false),
            data: data.expect("checked above"),
            output,
            rank,
            alpha,
            targets,
            init,
            conv_rank: self.conv_rank,
            conv_alpha,
            dora: self.dora.unwrap_or(false),
            algo,
            factor: self.factor,
            block_lr,
            block_rank,
            train_text_encoder,
            // Equal to --lr is the default: one recipe, whichever way it was said. A second
            // value is kept as given, so that a model with one encoder refuses it.
            text_encoder_lr: te_lrs.first().copied().filter(|&te_lr| te_lr != lr),
            text_encoder_2_lr: te_lrs.get(1).copied(),
            length,
            batch_size,
            grad_accum,
            lr,
            lr_scheduler,
            warmup_steps,
            optimizer,
            optimizer_args,
            ema_decay: self.ema_decay,
            class_data: self.class_data,
            prior_loss_weight,
            validation_data: self.validation_data,
            validation_split: self.validation_split,
            validate_every: self.validate_every,
            masks: self.masks,
            weight_decay,
            max_grad_norm,
            resolution,
            resolution_from_model: self.resolution.is_none(),
            crop,
            flip: self.flip.unwrap_or(false),
            buckets: self.buckets.unwrap_or(false),
            dataset,
            caption_dropout,
            seed: self.seed.unwrap_or(0),
            min_snr_gamma: self.min_snr_gamma,
            noise_offset,
            precision,
            gradient_checkpointing: self.gradient_checkpointing.unwrap_or(false),
            device,
            save_every: self.save_every,
            keep_checkpoints: self.keep_checkpoints,
            resume: self.resume,
            format,
            metrics,
            overwrite: self.overwrite.unwrap_or(false),
            allow_pickle: self.allow_pickle.unwrap_or(false),
            sample,
        })
    }
}

/// `dir/name.safetensors` + `suffix` → `dir/name.safetensors<suffix>`.
pub(crate) fn append_to_name(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> TrainArgs {
        TrainArgs {
            base: Some("m".into()),
            data: Some("d".into()),
            output: Some("o.safetensors".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_the_usual_ones() {
        let c = minimal().resolve().unwrap();
        assert_eq!((c.rank, c.alpha, c.lr), (4, 4.0, 1e-4));
        assert_eq!(c.targets, LoraTargets::Attn2);
        assert_eq!(c.length, TrainLength::Steps(1000));
        assert_eq!((c.weight_decay, c.max_grad_norm), (1e-2, 1.0));
        assert_eq!(c.format, AdapterFormat::Kohya);
        assert_eq!(c.metrics, PathBuf::from("o.safetensors.metrics.jsonl"));
        assert_eq!(c.crop, Crop::Center);
    }

    #[test]
    fn flags_override_the_file_and_unknown_keys_are_errors() {
        let file =
            TrainArgs::from_toml("rank = 8\nlr = 0.001\nbatch-size = 2\ncaption-column = \"c\"\n")
                .unwrap();
        let flags = TrainArgs {
            rank: Some(16),
            ..minimal()
        };
        let c = file.overlay(flags).resolve().unwrap();
        assert_eq!((c.rank, c.lr, c.batch_size), (16, 1e-3, 2));
        assert_eq!(c.dataset.caption_column, "c");
        let err = TrainArgs::from_toml("rnak = 8\n").unwrap_err();
        assert!(err.to_string().contains("`rnak`"), "{err}");
    }

    #[test]
    fn bad_values_are_reported_together() {
        let args = TrainArgs {
            rank: Some(0),
            lr: Some(-1.0),
            caption_dropout: Some(2.0),
            output: Some("o.bin".into()),
            ..minimal()
        };
        let msg = format!("{:#}", args.resolve().unwrap_err());
        for needle in ["--rank = 0", "--lr = -1", "--caption-dropout = 2", "o.bin"] {
            assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
        }
    }

    #[test]
    fn bf16_on_cpu_is_refused_and_devices_parse() {
        let args = TrainArgs {
            precision: Some(Precision::Bf16),
            ..minimal()
        };
        assert!(format!("{:#}", args.resolve().unwrap_err()).contains("bf16"));
    }

    #[test]
    fn bad_values_in_the_file_name_the_value() {
        for (text, needle) in [
            (
                "targets = \"everything\"\n",
                "unknown LoRA target preset `everything`",
            ),
            ("device = \"tpu\"\n", "unknown device `tpu`"),
            ("precision = \"f8\"\n", "unknown precision `f8`"),
            ("lr-scheduler = \"step\"\n", "lr-scheduler"),
            ("format = \"ckpt\"\n", "ckpt"),
        ] {
            let err = format!("{:#}", TrainArgs::from_toml(text).unwrap_err());
            assert!(err.contains(needle), "{text}: {err}");
        }
        let file = TrainArgs::from_toml(
            "targets = \"attn-mlp\"\nprecision = \"fp16\"\ndevice = \"cuda:1\"\n",
        )
        .unwrap();
        assert_eq!(file.targets, Some(LoraTargets::AttnMlp));
        assert_eq!(file.precision, Some(Precision::F16));
        assert_eq!(file.device, Some(DeviceSpec::Cuda(1)));
    }

    #[test]
    fn eval_options_need_sample_every_and_fid_two_prompts() {
        let without_sampling = TrainArgs {
            eval_inception: Some("inception.safetensors".into()),
            eval_clip: Some("clip-folder".into()),
            ..minimal()
        };
        let msg = format!("{:#}", without_sampling.resolve().unwrap_err());
        for needle in [
            "--eval-inception given without --sample-every",
            "--eval-clip given without --sample-every",
        ] {
            assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
        }

        let sampling = |prompts: &[&str]| TrainArgs {
            sample_every: Some(5),
            sample_prompt: Some(prompts.iter().map(|p| p.to_string()).collect()),
            eval_inception: Some("inception.safetensors".into()),
            eval_clip: Some("clip-folder".into()),
            ..minimal()
        };
        let msg = format!("{:#}", sampling(&["a cat"]).resolve().unwrap_err());
        assert!(
            msg.contains("--eval-inception inception.safetensors")
                && msg.contains("at least 2 --sample-prompt"),
            "{msg}"
        );
        let sample = sampling(&["a cat", "a dog"]).resolve().unwrap().sample;
        let sample = sample.expect("--sample-every was given");
        assert_eq!(
            sample.inception,
            Some(PathBuf::from("inception.safetensors"))
        );
        assert_eq!(sample.clip.as_deref(), Some("clip-folder"));
        let file: TrainArgs =
            TrainArgs::from_toml("eval-inception = \"i.safetensors\"\neval-clip = \"c\"\n")
                .unwrap();
        assert_eq!(file.eval_clip.as_deref(), Some("c"));
    }

    /// A checkpoint's recipe holds these spellings; a resume compares them as text, so they must
    /// not change (checkpoints written by earlier versions must still resume).
    #[test]
    fn recipe_spellings_are_stable() {
        let config = TrainArgs {
            precision: Some(Precision::F16),
            lr_scheduler: Some(LrScheduler::Cosine),
            targets: Some(LoraTargets::AttnMlp),
            init: Some(LoraInit::Gaussian),
            ..minimal()
        }
        .resolve()
        .unwrap();
        let recipe = serde_json::to_value(&config).unwrap();
        for (key, spelling) in [
            ("precision", "Fp16"),
            ("lr_scheduler", "Cosine"),
            ("targets", "attn-mlp"),
            ("init", "Gaussian"),
            ("format", "kohya"),
            ("device", "cpu"),
        ] {
            assert_eq!(recipe[key], spelling, "{key}");
        }
        for key in [
            "caption_column",
            "image_column",
            "split",
            "caption_template",
            "label_filter",
        ] {
            assert!(recipe.get(key).is_none(), "{key}: {recipe}");
        }
        assert_eq!(recipe["caption_ext"], ".txt");
        let other = TrainArgs {
            dataset: DatasetArgs {
                caption_column: Some("caption".into()),
                ..DatasetArgs::default()
            },
            ..minimal()
        }
        .resolve()
        .unwrap();
        assert_eq!(
            serde_json::to_value(&other).unwrap()["caption_column"],
            "caption"
        );
    }
}
