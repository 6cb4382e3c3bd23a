//! The training loop: the model, the trainable adapter, the data stream and one optimizer step.
//!
//! Randomness: the adapter's initial values come from `seed`; the order of samples in epoch `e`
//! from a generator seeded by (`seed`, `e`), so it is a pure function of the sample index; every
//! other draw of a sample (flip, caption dropout, random crop, VAE sample, timestep, noise, noise
//! offset, in that order) comes from a generator of its own, seeded by (`seed`, the sample's
//! position in the run), and a class image's (`--class-data`) likewise. So the parameters and the
//! optimizer state are the whole state of a run, which makes resuming exact, and a sample is
//! drawn the same whichever process of a data-parallel run ([`crate::distributed`]) takes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor, Var};
use lora_core::adapters::{AdapterAlgorithm, AdapterModules, ModuleInfo, ModuleKind, UNetBlocks};
use lora_core::adapters::{Component, TrainableAdapter};
use lora_core::formats::keys::KohyaNamer;
use lora_core::formats::kohya::{python_bool, python_float};
use lora_core::io::folder_of;
use lora_core::io::weights::mmap_safetensors;
use lora_core::models::config::UNetConfig;
use lora_core::models::sdxl_prompt::SdxlTextEncoders;
use lora_core::models::text_encoder::TextEncoder;
use lora_core::options::{check_output, prepare_output};
use lora_core::rng::Fnv1a;
use lora_core::source::{BaseChoices, BaseSpec, ModelFolder};
use lora_core::{
    save_adapter, Adapter, BaseModelVersion, LoraConfig, ModelModules, Rng, SaveOptions,
    UNet2DConditionModel,
};

use crate::cache::{conditioning, EncodeOptions, EncodedDataset, TrainedText};
use crate::checkpoint::{check_recipe, recipe, Checkpoint};
use crate::config::{Crop, TrainConfig, TrainLength};
use crate::dataset::{bucket_size, Dataset};
use crate::distributed::{ProcessGroup, StepContribution};
use crate::ema::{ema_output_path, Ema};
use crate::masks::find_masks;
use crate::metrics::{peak_rss_bytes, MetricsLog, StepReport, TrainSummary};
use crate::objective::{denoising_loss, DenoisingBatch};
use crate::optimizer::{clip_grad_norm, Optimizer};
use crate::sample::Sampler;
use crate::schedule::{learning_rate, NoiseSchedule};
use crate::validation::{self, Validation, ValidationRow};

/// Name under which the trained adapter is attached to the UNet (and the text encoder).
const ADAPTER_NAME: &str = "train";
/// Generator stream of the text encoder adapter's initial values (the UNet's come from `seed`
/// itself, the run's draws from stream 1, epoch orders from 2 + epoch); SDXL's second encoder
/// draws from the next one.
const TEXT_ENCODER_INIT_STREAM: u64 = 1 << 42;
/// Generator stream of the conv adapters' initial values (`--conv-rank`).
const CONV_INIT_STREAM: u64 = 1 << 44;
/// Generator streams of the class images' order, one per pass over them (`--class-data`).
const CLASS_ORDER_STREAM: u64 = 1 << 43;
/// Generator streams of each sample's draws, one per position in the run (step × accumulation ×
/// batch across all processes).
const SAMPLE_STREAM: u64 = 1 << 45;
/// The same for the class image paired with each sample.
const CLASS_SAMPLE_STREAM: u64 = 1 << 46;

/// `--class-data`: the class images each batch pairs with its training samples (prior
/// preservation), in their own order: pass `p` over them shuffled by (`seed`, p).
struct ClassImages {
    dataset: Dataset,
    data: EncodedDataset,
    /// The pass whose order `order.1` holds.
    order: (usize, Vec<usize>),
    /// `--prior-loss-weight`.
    weight: f64,
}

impl ClassImages {
    /// The class item of class sample `index` (counted over the whole run).
    fn item(&mut self, index: usize, seed: u64) -> usize {
        let n = self.dataset.samples_per_epoch();
        let pass = index / n;
        if self.order.0 != pass {
            let mut order = self.dataset.epoch_samples();
            Rng::new(derive_seed(seed, CLASS_ORDER_STREAM + pass as u64)).shuffle(&mut order);
            self.order = (pass, order);
        }
        self.order.1[index % n]
    }
}
/// Events before the first step, for the front end to display.
pub enum Preparation<'a> {
    Dataset(&'a Dataset),
    /// `--class-data`'s images, read.
    ClassImages(&'a Dataset),
    /// `done` of the `total` images this process encodes (in a data-parallel run, its share).
    Encoding {
        done: usize,
        total: usize,
    },
    Resumed {
        step: usize,
        path: &'a Path,
    },
    /// A pickle `--base` is read through this safetensors copy (`--allow-pickle`).
    PickleCopy(&'a Path),
    /// The base model, opened (what it was recognised as: [`ModelFolder::describe`]).
    Base(&'a ModelFolder),
}

pub struct Trainer {
    config: TrainConfig,
    unet: UNet2DConditionModel,
    /// `--train-text-encoder`: the text encoder(s) with their adapters attached.
    text: Option<TrainedText>,
    adapter: Adapter,
    optimizer: Optimizer,
    /// `--ema-decay`: the moving average of the adapter's parameters.
    ema: Option<Ema>,
    schedule: NoiseSchedule,
    dataset: Dataset,
    data: EncodedDataset,
    base_model: BaseModelVersion,
    /// The processes training this adapter together (one without a launcher).
    group: Arc<ProcessGroup>,
    /// Whether some process asked to stop during the last step (summed with its gradients).
    stop_requested: bool,
    /// Optimizer steps done.
    step: usize,
    total_steps: usize,
    /// The epoch whose sample order `epoch_order` holds.
    epoch_order: (usize, Vec<usize>),
    /// With buckets: the epoch whose batches `bucket_plan` holds.
    bucket_plan: (usize, Vec<Vec<usize>>),
    bucket_batches_per_epoch: usize,
    /// The last checkpoint written or resumed from, named when a run stops on NaN.
    last_checkpoint: Option<PathBuf>,
    sampler: Option<Sampler>,
    /// `--validation-data` / `--validation-split`: the held-out images' loss, logged.
    validation: Option<Validation>,
    /// `--class-data`.
    class_images: Option<ClassImages>,
    /// What a checkpoint records of the datasets (training and class images), to refuse a
    /// resume on changed data.
    dataset_fingerprint: String,
    /// Set from outside (a signal handler) to end [`Trainer::run`] after the current step.
    stop: Option<Arc<AtomicBool>>,
}

/// How [`Trainer::run`] ended early: stopped on request, with the checkpoint it wrote.
#[derive(Debug)]
pub struct Stopped {
    pub step: usize,
    pub checkpoint: PathBuf,
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "stopped at step {}; checkpoint written to {} (continue with --resume {}, or \
             --resume latest)",
            self.step,
            self.checkpoint.display(),
            self.checkpoint.display()
        )
    }
}

impl std::error::Error for Stopped {}

impl Trainer {
    /// Checks the dataset and the output location, loads the model, builds the adapter (or
    /// restores it from `config.resume`) and encodes the dataset. Nothing is written here.
    pub fn new(config: TrainConfig, on_prepare: &mut dyn FnMut(Preparation)) -> Result<Self> {
        Self::in_group(config, Arc::new(ProcessGroup::alone()), on_prepare)
    }

    /// [`Self::new`] for one process of a data-parallel run: `config.batch_size` is this
    /// process's share of each step's batch. Every process of `group` must call it; an error on
    /// one should end in [`ProcessGroup::abort`], as the others may be waiting for it.
    pub fn in_group(
        mut config: TrainConfig,
        group: Arc<ProcessGroup>,
        on_prepare: &mut dyn FnMut(Preparation),
    ) -> Result<Self> {
        let continuing = config.resume.is_some();
        if config.resume.as_deref() == Some(Path::new(RESUME_LATEST)) {
            // Nothing to resume is a fresh start: the same command serves every restart of a
            // preempted run, the first one included.
            config.resume = latest_checkpoint(&config.output)?;
        }
        // The outputs are process 0's: it alone checks, clears and writes them.
        if group.is_main() {
            remove_stale_temporaries(&config.output);
            // A resumed run rewrites the metrics log atomically too, wherever --metrics puts it.
            remove_stale_temporaries(&config.metrics);
            check_output_location(&config, continuing)?;
        }
        let device = group.open_device(config.device)?;
        let global_batch = config.batch_size * group.size();
        // Process 0 reads the dataset and opens the base model first (a Hub download, a pickle's
        // safetensors copy), the others after it, from the cache it filled.
        if !group.is_main() {
            group.barrier()?;
        }
        let dataset = Dataset::scan(&config.data, &config.dataset)?;
        let (dataset, held_out) = match (config.validation_split, &config.validation_data) {
            (Some(fraction), _) => {
                let (training, held_out) = validation::split(dataset, fraction, config.seed)?;
                (training, Some(held_out))
            }
            (None, Some(path)) => {
                let held_out = Dataset::scan(path, &config.dataset)
                    .with_context(|| format!("--validation-data {}", path.display()))?;
                (dataset, Some(held_out))
            }
            (None, None) => (dataset, None),
        };
        on_prepare(Preparation::Dataset(&dataset));
        let class_dataset = config
            .class_data
            .as_ref()
            .map(|path| {
                Dataset::scan(path, &config.dataset)
                    .with_context(|| format!("--class-data {}", path.display()))
            })
            .transpose()?;
        if let Some(class_dataset) = &class_dataset {
            on_prepare(Preparation::ClassImages(class_dataset));
        }
        let model = BaseSpec {
            base: &config.base,
            base_config: config.base_config.clone(),
            allow_pickle: config.allow_pickle,
            choices: BaseChoices {
                prediction: config.prediction_type,
                no_ema: config.no_ema,
            },
        }
        .open(|copy| on_prepare(Preparation::PickleCopy(copy)))?;
        if group.is_main() {
            group.barrier()?;
        }
        on_prepare(Preparation::Base(&model));
        ensure!(
            config.text_encoder_2_lr.is_none() || model.is_sdxl(),
            "{}: two --text-encoder-lr values are for SDXL's two text encoders; this model has \
             one",
            model.root().display()
        );
        let unet_config = model.unet_config()?;
        ensure!(
            unet_config.text_time.is_some() == model.is_sdxl(),
            "{}: the UNet {} SDXL's added conditioning but the model {} a second text encoder \
             (text_encoder_2/)",
            model.root().display(),
            if model.is_sdxl() {
                "does not take"
            } else {
                "takes"
            },
            if model.is_sdxl() { "has" } else { "has no" },
        );
        if config.resolution_from_model {
            if let Some(side) = model.native_resolution()? {
                config.resolution = side;
            }
        }
        check_resolution(&config, &model, &unet_config)?;
        let mut unet = model
            .load_unet(&unet_config, config.precision.dtype(), &device)
            .with_context(|| format!("cannot load the UNet of {}", model.root().display()))?;
        // The file's kohya names must be writable before the run, not only at its first save.
        KohyaNamer::new(&unet.adapter_modules(), model.is_sdxl())?;
        let schedule = NoiseSchedule::new(&model.scheduler_config()?);
        let base_model = match model.is_sdxl() {
            true => BaseModelVersion::SdxlBase,
            false => BaseModelVersion::of_text_encoder(&model.text_encoder_config()?),
        };

        let lora_config = LoraConfig {
            rank: config.rank,
            alpha: config.alpha,
            targets: config.targets,
            init: config.init,
            lycoris: config.algo.lycoris(config.factor),
        };
        // Per-block settings: a block at learning-rate factor 0 gets no adapter.
        let blocks = UNetBlocks::new(&unet_config.layers_per_block);
        blocks.check_names("--block-lr", &config.block_lr)?;
        blocks.check_names("--block-rank", &config.block_rank)?;
        let block_setting = |path: &str| blocks.block_of(path);
        let in_trained_block = |m: &&ModuleInfo| {
            block_setting(&m.path)
                .and_then(|b| config.block_lr.get(&b))
                .is_none_or(|&factor| factor > 0.0)
        };
        let adapted: Vec<ModuleInfo> = unet
            .lora_modules()
            .iter()
            .filter(in_trained_block)
            .cloned()
            .collect();
        let rank_of = |m: &ModuleInfo| {
            block_setting(&m.path)
                .and_then(|b| config.block_rank.get(&b).copied())
                .unwrap_or(config.rank)
        };
        let mut trainable =
            Adapter::init_unet_with_ranks(&lora_config, &adapted, &rank_of, &device, config.seed)?;
        if let (Some(rank), Some(alpha)) = (config.conv_rank, config.conv_alpha) {
            // kohya's conv_dim set: the 3×3 convolutions at the conv rank, the resnets' Linear
            // and 1×1 layers (time_emb_proj, conv_shortcut) at the Linear rank.
            let (convs, others): (Vec<ModuleInfo>, Vec<ModuleInfo>) = unet
                .resnet_modules()
                .iter()
                .filter(in_trained_block)
                .cloned()
                .partition(|m| matches!(m.kind, ModuleKind::Conv { .. }));
            let conv_config = LoraConfig {
                rank,
                alpha,
                ..lora_config.clone()
            };
            trainable.add_unet_modules(
                &conv_config,
                &convs,
                &|_| rank,
                &device,
                derive_seed(config.seed, CONV_INIT_STREAM),
            )?;
            // --block-rank applies to the Linear and 1×1 layers, as kohya's block_dims.
            trainable.add_unet_modules(
                &lora_config,
                &others,
                &rank_of,
                &device,
                derive_seed(config.seed, CONV_INIT_STREAM + 1),
            )?;
        }
        if config.dora {
            trainable.add_dora(Component::Unet, &unet.adaptable_weights()?)?;
        }
        unet.attach_adapter(ADAPTER_NAME, &trainable.adapter.unet, 1.0)?;
        let text = match config.train_text_encoder {
            true => Some(trained_text(
                &model,
                &config,
                &lora_config,
                &mut trainable,
                &device,
            )?),
            false => None,
        };
        let TrainableAdapter { adapter, vars } = trainable;
        let text_encoder_of = |name: &str| {
            adapter
                .locate_var(name)
                .map(|(component, ..)| component)
                .filter(|component| component.is_text_encoder())
        };
        let lr_scales: Vec<f64> = vars
            .iter()
            .map(|(name, _)| match text_encoder_of(name) {
                Some(component) => config.text_encoder_lr(component) / config.lr,
                None => block_setting(name)
                    .and_then(|b| config.block_lr.get(&b).copied())
                    .unwrap_or(1.0),
            })
            .collect();
        let mut optimizer = Optimizer::new(vars, &config.optimizer_settings())?;
        optimizer.set_lr_scales(lr_scales)?;
        let mut ema = config
            .ema_decay
            .map(|decay| Ema::new(decay, optimizer.params()))
            .transpose()?;
        let param_count: usize = optimizer.params().iter().map(|(_, v)| v.elem_count()).sum();
        // A checkpoint keeps the parameters, the optimizer's state and the moving average.
        let state_bytes = optimizer.state_bytes() + usize::from(ema.is_some()) * param_count * 4;
        check_free_space(&config, param_count, state_bytes as u64)?;
        let granularity = model.vae_config()?.map_or(1, |vae| vae.vae_scale_factor())
            * (1 << (unet_config.block_out_channels.len() - 1));
        // Each item's training size: its bucket, or the square resolution.
        let sizes_of = |dataset: &Dataset| -> Vec<(usize, usize)> {
            dataset
                .items
                .iter()
                .map(|item| match config.buckets {
                    true => bucket_size(item.size.0, item.size.1, config.resolution, granularity),
                    false => (config.resolution, config.resolution),
                })
                .collect()
        };
        let sizes = sizes_of(&dataset);
        // The same every epoch (bucket sizes and counts do not depend on the order).
        let bucket_batches_per_epoch =
            bucket_batches(&dataset, &sizes, global_batch, 0, config.seed).len();
        let total_steps = match config.length {
            TrainLength::Steps(n) => n,
            TrainLength::Epochs(e) if config.buckets => {
                (e * bucket_batches_per_epoch).div_ceil(config.grad_accum)
            }
            TrainLength::Epochs(e) => {
                let per_step = global_batch * config.grad_accum;
                (e * dataset.samples_per_epoch()).div_ceil(per_step)
            }
        };
        ensure!(
            config.warmup_steps < total_steps,
            "--warmup-steps = {} must be fewer than the {total_steps} training steps",
            config.warmup_steps
        );
        let mut step = 0;
        let mut last_checkpoint = None;
        let dataset_fingerprint = match &class_dataset {
            Some(class) => format!(
                "{}; class images {}",
                fingerprint(&dataset),
                fingerprint(class)
            ),
            None => fingerprint(&dataset),
        };
        if let Some(path) = &config.resume {
            let names: Vec<String> = optimizer.params().iter().map(|(n, _)| n.clone()).collect();
            let expected = recipe(&config, total_steps, global_batch)?;
            let ckpt = Checkpoint::load(
                path,
                &names,
                optimizer.slot_names(),
                ema.is_some(),
                &|saved| check_recipe(&expected, saved),
                &device,
            )?;
            ensure!(
                ckpt.dataset == dataset_fingerprint,
                "cannot resume from {}: the dataset changed since it was written (checkpoint: {}, now: {})",
                path.display(),
                ckpt.dataset,
                dataset_fingerprint
            );
            for ((name, var), (_, value)) in optimizer.params().iter().zip(&ckpt.params) {
                ensure!(
                    value.dims() == var.dims(),
                    "checkpoint parameter `{name}` has shape {:?}, the adapter {:?}",
                    value.dims(),
                    var.dims()
                );
                var.set(value)?;
            }
            optimizer.restore(ckpt.optimizer)?;
            if let (Some(ema), Some(average)) = (ema.as_mut(), ckpt.ema) {
                ema.restore(average)?;
            }
            step = ckpt.step;
            last_checkpoint = Some(path.clone());
            on_prepare(Preparation::Resumed { step, path });
        }

        // Every rank starts from the same adapter, options, data and length: a rank that read
        // another dataset or seed would train something else and the sums would mix them, and
        // one that stopped earlier would leave the others waiting. Checked before the caching
        // pass, whose sharing is the first collective call after this one.
        if group.is_collective() {
            let digest = run_digest(
                optimizer.params(),
                &[
                    &recipe(&config, total_steps, global_batch)?.to_string(),
                    &dataset_fingerprint,
                    &step.to_string(),
                    &total_steps.to_string(),
                ],
            )?;
            ensure!(
                group.same_everywhere(digest)?,
                "process {} of {}: the adapter, options or dataset differ between the processes \
                 of this run (each must see the same files and the same command)",
                group.rank(),
                group.size()
            );
        }
        let data = EncodedDataset::build(
            &model,
            &dataset,
            &EncodeOptions {
                sizes: sizes.clone(),
                crop: config.crop,
                flip: config.flip,
                caption_dropout: config.caption_dropout > 0.0,
                caption_tokens: config.train_text_encoder,
                unet_in_channels: unet_config.in_channels,
                masks: config
                    .masks
                    .as_deref()
                    .map(|dir| find_masks(dir, &dataset))
                    .transpose()?,
            },
            &group,
            &device,
            &mut |done, total| on_prepare(Preparation::Encoding { done, total }),
        )?;
        let class_images = match class_dataset {
            Some(class_dataset) => {
                let data = EncodedDataset::build(
                    &model,
                    &class_dataset,
                    &EncodeOptions {
                        // Square: --buckets is refused with class images.
                        sizes: sizes_of(&class_dataset),
                        crop: config.crop,
                        flip: config.flip,
                        caption_dropout: config.caption_dropout > 0.0,
                        caption_tokens: config.train_text_encoder,
                        unet_in_channels: unet_config.in_channels,
                        masks: None,
                    },
                    &group,
                    &device,
                    &mut |done, total| on_prepare(Preparation::Encoding { done, total }),
                )
                .context("encoding the --class-data images")?;
                Some(ClassImages {
                    dataset: class_dataset,
                    data,
                    order: (usize::MAX, Vec::new()),
                    weight: config.prior_loss_weight.unwrap_or(1.0),
                })
            }
            None => None,
        };
        let validation = match held_out {
            // Process 0 alone validates.
            Some(held_out) if group.is_main() => {
                let sizes = sizes_of(&held_out);
                let encoded = EncodedDataset::build(
                    &model,
                    &held_out,
                    &EncodeOptions {
                        sizes,
                        crop: Crop::Center,
                        flip: false,
                        caption_dropout: false,
                        caption_tokens: config.train_text_encoder,
                        unet_in_channels: unet_config.in_channels,
                        masks: None,
                    },
                    // Only this process encodes them.
                    &ProcessGroup::alone(),
                    &device,
                    &mut |done, total| on_prepare(Preparation::Encoding { done, total }),
                )?;
                let every = config.validate_every.unwrap_or((total_steps / 10).max(1));
                Some(Validation::new(encoded, held_out.items.len(), every)?)
            }
            _ => None,
        };
        ensure!(
            step <= total_steps,
            "the checkpoint is at step {step}, beyond the {total_steps} steps asked for"
        );
        let sampler = match &config.sample {
            Some(sample) if group.is_main() => Some(Sampler::new(
                &model,
                untracked_copy(&unet, &adapter.unet, |m, name, modules| {
                    m.detach_adapter(name)?;
                    m.attach_adapter(name, modules, 1.0)
                })?,
                text.as_ref()
                    .map(|text| untracked_encoders(text, &adapter))
                    .transpose()?,
                sample.clone(),
                config.resolution,
                config.seed,
                &dataset,
                &device,
            )?),
            _ => None,
        };
        Ok(Self {
            config,
            unet,
            text,
            adapter,
            optimizer,
            ema,
            schedule,
            dataset,
            data,
            base_model,
            group,
            stop_requested: false,
            step,
            total_steps,
            epoch_order: (usize::MAX, Vec::new()),
            bucket_plan: (usize::MAX, Vec::new()),
            bucket_batches_per_epoch,
            last_checkpoint,
            sampler,
            validation,
            class_images,
            dataset_fingerprint,
            stop: None,
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Samples per micro-batch across all processes.
    fn global_batch(&self) -> usize {
        self.config.batch_size * self.group.size()
    }

    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// Optimizer steps done so far.
    pub fn current_step(&self) -> usize {
        self.step
    }

    pub fn total_steps(&self) -> usize {
        self.total_steps
    }

    /// Bytes of optimizer state (moments; 8-bit codes and scales with `adamw8bit`).
    pub fn optimizer_state_bytes(&self) -> usize {
        self.optimizer.state_bytes()
    }

    /// The adapter being trained (its tensors are the trained variables').
    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    /// The trainable parameters (for inspection and benchmarks), in checkpoint order.
    pub fn params(&self) -> &[(String, Var)] {
        self.optimizer.params()
    }

    /// One optimizer step: `grad_accum` micro-batches of `batch_size` samples (on each process of
    /// a data-parallel run, their gradients then summed over the processes), gradient clipping,
    /// one optimizer update. A non-finite loss or gradient stops before any update.
    pub fn step(&mut self) -> Result<StepReport> {
        let start = Instant::now();
        let lr = learning_rate(
            self.config.lr_scheduler,
            self.config.lr,
            self.config.warmup_steps,
            self.step,
            self.total_steps,
        );
        let accum = self.config.grad_accum;
        let mut summed: Option<Vec<Option<Tensor>>> = None;
        let mut loss_sum = 0.0;
        for micro in 0..accum {
            let (loss, grads) = self.micro_batch(self.step * accum + micro, accum)?;
            loss_sum += loss;
            summed = Some(match summed {
                None => grads,
                Some(acc) => acc
                    .into_iter()
                    .zip(grads)
                    .map(|pair| match pair {
                        (Some(a), Some(g)) => Ok(Some((a + g)?)),
                        (a, g) => Ok(a.or(g)),
                    })
                    .collect::<Result<_>>()?,
            });
        }
        if self.group.is_collective() {
            // On a GPU the step's kernels may still be queued: the time below is the sum's alone.
            if let Some((_, param)) = self.optimizer.params().first() {
                param.device().synchronize()?;
            }
        }
        let reduce_start = Instant::now();
        let StepContribution {
            grads,
            loss: loss_sum,
            stop,
        } = self.group.sum_step(
            StepContribution {
                grads: summed.expect("grad_accum is at least 1"),
                loss: loss_sum,
                stop: self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)),
            },
            self.optimizer.params(),
        )?;
        self.stop_requested = stop;
        let reduce_seconds = self
            .group
            .is_collective()
            .then(|| reduce_start.elapsed().as_secs_f64());
        // Clipping over the gradients there are; the parameters without one stay without.
        let reached: Vec<bool> = grads.iter().map(Option::is_some).collect();
        let (grad_norm, clipped) = clip_grad_norm(
            grads.into_iter().flatten().collect(),
            self.config.max_grad_norm,
        )?;
        let mut clipped = clipped.into_iter();
        let grads: Vec<Option<Tensor>> = reached
            .iter()
            .map(|&r| if r { clipped.next() } else { None })
            .collect();
        if !grad_norm.is_finite() {
            bail!(
                "the gradient norm became {grad_norm} at step {}: {}",
                self.step + 1,
                self.stop_advice()
            );
        }
        self.optimizer.step(&grads, lr)?;
        if let Some(ema) = &mut self.ema {
            ema.update(self.optimizer.params(), self.optimizer.steps())?;
        }
        self.step += 1;
        Ok(StepReport {
            step: self.step,
            loss: loss_sum / accum as f64,
            lr,
            grad_norm,
            seconds: start.elapsed().as_secs_f64(),
            reduce_seconds,
        })
    }

    /// This process's share of micro-batch `index`: its part of the loss (the batch's mean loss
    /// times its share of the samples) and of the gradients (divided by `accum` too); `None` for
    /// a parameter the loss does not reach.
    fn micro_batch(&mut self, index: usize, accum: usize) -> Result<(f64, Vec<Option<Tensor>>)> {
        let batch_items = self.micro_batch_items(index);
        let mine = self.group.shard(batch_items.len(), self.config.batch_size);
        if mine.is_empty() {
            // A bucket's last batch left this process nothing: it adds zeros to the sum.
            return Ok((0.0, vec![None; self.optimizer.params().len()]));
        }
        let share = mine.len() as f64 / batch_items.len() as f64;
        // Where this micro-batch's samples start among the run's.
        let first = index * self.global_batch();
        let mut samples = Vec::with_capacity(mine.len());
        let mut masks = Vec::new();
        let mut draws = Vec::with_capacity(mine.len());
        for position in mine.clone() {
            let item = batch_items[position];
            let mut rng = sample_rng(self.config.seed, SAMPLE_STREAM, first + position);
            let (flip, dropped) = draw_augmentation(&self.config, &mut rng);
            samples.push(self.data.sample(item, flip, dropped, &mut rng)?);
            masks.extend(self.data.mask(item, flip)?.cloned());
            draws.push(rng);
        }
        let instances = samples.len();
        if let Some(class) = self.class_images.as_mut() {
            // One class sample beside each training sample, after them in the batch.
            for position in mine {
                let sample = first + position;
                let item = class.item(sample, self.config.seed);
                let mut rng = sample_rng(self.config.seed, CLASS_SAMPLE_STREAM, sample);
                let (flip, dropped) = draw_augmentation(&self.config, &mut rng);
                samples.push(class.data.sample(item, flip, dropped, &mut rng)?);
                if let Some(first) = masks.first() {
                    masks.push(first.ones_like()?); // class images are unmasked
                }
                draws.push(rng);
            }
        }
        let latents: Vec<&Tensor> = samples.iter().map(|s| &s.latents).collect();
        let latents = Tensor::stack(&latents, 0)?;
        let (context, added) = conditioning(&samples, self.text.as_ref())?;
        let mut batch = DenoisingBatch::draw_each(
            &self.schedule,
            self.config.min_snr_gamma,
            self.config.noise_offset,
            &latents,
            &mut draws,
        )?;
        if !masks.is_empty() {
            batch = batch.with_position_weights(Tensor::stack(&masks, 0)?);
        }
        if let Some(class) = &self.class_images {
            // The mean over 2B samples, weighted 2 and 2w: the training samples' mean loss plus
            // w times the class samples' (diffusers' prior-preservation loss).
            let weights: Vec<f32> = (0..2 * instances)
                .map(|i| {
                    if i < instances {
                        2.0
                    } else {
                        2.0 * class.weight as f32
                    }
                })
                .collect();
            let weights = Tensor::from_vec(weights, 2 * instances, latents.device())?;
            batch = batch.with_sample_weights(&weights)?;
        }
        let (prediction, checkpointed) = if self.config.gradient_checkpointing {
            let (prediction, pass) = self.unet.forward_checkpointed_conditioned(
                &batch.noisy,
                &batch.timesteps,
                &context,
                added.as_ref(),
            )?;
            (prediction, Some(pass))
        } else {
            let prediction = self.unet.forward_conditioned(
                &batch.noisy,
                &batch.timesteps,
                &context,
                added.as_ref(),
            )?;
            (prediction, None)
        };
        let loss = batch.loss(&prediction)?;
        let value = self.finite_loss(&loss)? * share;
        let loss = (loss * (share / accum as f64))?;
        let grads = match checkpointed {
            Some(pass) => {
                let params: Vec<Var> = self
                    .optimizer
                    .params()
                    .iter()
                    .map(|(_, v)| v.clone())
                    .collect();
                pass.backward(&loss, &params)?
            }
            None => loss.backward()?,
        };
        let grads = self
            .optimizer
            .params()
            .iter()
            .map(|(_, var)| grads.get(var.as_tensor()).cloned())
            .collect();
        Ok((value, grads))
    }

    /// The loss's value, or the error that stops a run whose loss diverged.
    fn finite_loss(&self, loss: &Tensor) -> Result<f64> {
        let value = f64::from(loss.to_scalar::<f32>()?);
        if !value.is_finite() {
            bail!(
                "the loss became {value} at step {}: {}",
                self.step + 1,
                self.stop_advice()
            );
        }
        Ok(value)
    }

    /// Mean loss over every dataset item (as is, with its caption) under `draws` fixed
    /// timestep/noise draws per item from `seed`: a low-variance measure for comparing the adapter
    /// before and after training. Draws nothing from the run's own generator.
    pub fn evaluate(&self, seed: u64, draws: usize) -> Result<f64> {
        let mut rng = Rng::new(seed);
        let mut total = 0.0;
        for item in 0..self.dataset.items.len() {
            for _ in 0..draws {
                let sample = self.data.sample(item, false, false, &mut rng)?;
                let latents = sample.latents.unsqueeze(0)?;
                let (context, added) = conditioning(&[sample], self.text.as_ref())?;
                let loss = denoising_loss(
                    &self.unet,
                    &self.schedule,
                    self.config.min_snr_gamma,
                    0.0,
                    &latents,
                    &context,
                    added.as_ref(),
                    &mut rng,
                )?;
                total += f64::from(loss.to_scalar::<f32>()?);
            }
        }
        Ok(total / (self.dataset.items.len() * draws) as f64)
    }

    /// The dataset items of micro-batch `index`, across all processes of the run. Without
    /// buckets, samples form one stream over the epochs (a batch may straddle two); with buckets,
    /// each epoch is cut into batches of one bucket each, so the last batch of a bucket may be
    /// smaller.
    pub fn micro_batch_items(&mut self, index: usize) -> Vec<usize> {
        let b = self.global_batch();
        if !self.config.buckets {
            return (0..b).map(|j| self.sample_item(index * b + j)).collect();
        }
        let per_epoch = self.bucket_batches_per_epoch;
        let epoch = index / per_epoch;
        if self.bucket_plan.0 != epoch {
            let sizes: Vec<(usize, usize)> = (0..self.dataset.items.len())
                .map(|i| self.data.size(i))
                .collect();
            let plan = bucket_batches(&self.dataset, &sizes, b, epoch, self.config.seed);
            self.bucket_plan = (epoch, plan);
        }
        self.bucket_plan.1[index % per_epoch].clone()
    }

    /// The `(width, height)` in pixels dataset item `item` trains at.
    pub fn item_size(&self, item: usize) -> (usize, usize) {
        self.data.size(item)
    }

    /// The dataset item of global sample `index`: epoch `index / n` in that epoch's order.
    fn sample_item(&mut self, index: usize) -> usize {
        let n = self.dataset.samples_per_epoch();
        let epoch = index / n;
        if self.epoch_order.0 != epoch {
            let mut order = self.dataset.epoch_samples();
            Rng::new(derive_seed(self.config.seed, 2 + epoch as u64)).shuffle(&mut order);
            self.epoch_order = (epoch, order);
        }
        self.epoch_order.1[index % n]
    }

    fn stop_advice(&self) -> String {
        let kept = match &self.last_checkpoint {
            Some(p) => format!("the last good checkpoint is {}", p.display()),
            None => "no checkpoint was written (use --save-every)".to_string(),
        };
        format!(
            "training stopped, no adapter written; {kept}. Try a lower --lr (now {}) or fp32 precision",
            self.config.lr
        )
    }

    /// Writes a checkpoint of the current state (atomically).
    pub fn save_checkpoint(&mut self, path: &Path) -> Result<()> {
        let params = self
            .optimizer
            .params()
            .iter()
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        Checkpoint {
            step: self.step,
            recipe: recipe(&self.config, self.total_steps, self.global_batch())?,
            dataset: self.dataset_fingerprint.clone(),
            params,
            optimizer: self.optimizer.state(),
            ema: self.ema.as_ref().map(|ema| ema.tensors().to_vec()),
        }
        .save(path, self.optimizer.slot_names())?;
        self.last_checkpoint = Some(path.to_path_buf());
        Ok(())
    }

    /// Writes the adapter as trained so far, in the configured format, with training metadata.
    pub fn save_adapter(&self, path: &Path) -> Result<()> {
        self.write_adapter(path, &self.adapter, None)
    }

    /// `adapter` (the trained one, or its moving average with that average's decay) with the
    /// run's training metadata.
    fn write_adapter(&self, path: &Path, adapter: &Adapter, ema_decay: Option<f64>) -> Result<()> {
        let c = &self.config;
        let samples = self.dataset.samples_per_epoch();
        let epochs = (self.step * self.global_batch() * c.grad_accum).div_ceil(samples);
        let mut extra = std::collections::BTreeMap::new();
        let mut put = |k: &str, v: String| {
            extra.insert(k.to_string(), v);
        };
        put("ss_steps", self.step.to_string());
        put("ss_epoch", epochs.to_string());
        put("ss_learning_rate", python_float(c.lr));
        put("ss_unet_lr", python_float(c.lr));
        if c.train_text_encoder {
            let (first, second) = (
                c.text_encoder_lr(Component::TextEncoder),
                c.text_encoder_lr(Component::TextEncoder2),
            );
            // One rate as a number (kohya's metadata before its argument became a list), two as
            // kohya's list.
            let value = match c.text_encoder_2_lr {
                Some(_) => format!("[{}, {}]", python_float(first), python_float(second)),
                None => python_float(first),
            };
            put("ss_text_encoder_lr", value);
        }
        put("ss_resolution", format!("({0}, {0})", c.resolution));
        put("ss_num_train_images", samples.to_string());
        put("ss_batch_size_per_device", c.batch_size.to_string());
        // kohya's: per device × processes × accumulation.
        put(
            "ss_total_batch_size",
            (self.global_batch() * c.grad_accum).to_string(),
        );
        put("ss_gradient_accumulation_steps", c.grad_accum.to_string());
        put("ss_lr_scheduler", c.lr_scheduler.name().to_string());
        put("ss_lr_warmup_steps", c.warmup_steps.to_string());
        put("ss_optimizer", self.optimizer.describe());
        put("ss_max_grad_norm", python_float(c.max_grad_norm));
        put(
            "ss_min_snr_gamma",
            c.min_snr_gamma.map_or("None".to_string(), python_float),
        );
        put("ss_noise_offset", python_float(c.noise_offset));
        put("ss_seed", c.seed.to_string());
        put("ss_mixed_precision", c.precision.kohya_name().to_string());
        put(
            "ss_gradient_checkpointing",
            python_bool(c.gradient_checkpointing),
        );
        put("ss_caption_dropout_rate", python_float(c.caption_dropout));
        put("ss_flip_aug", python_bool(c.flip));
        put("ss_random_crop", python_bool(c.crop == Crop::Random));
        put("ss_enable_bucket", python_bool(c.buckets));
        put(
            "ss_network_train_unet_only",
            python_bool(!c.train_text_encoder),
        );
        put("ss_sd_model_name", c.base.clone());
        put(
            "ss_output_name",
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        put("ss_lora_targets", c.targets.to_string());
        if !c.block_lr.is_empty() || !c.block_rank.is_empty() {
            let listed = |values: Vec<String>| values.join(",");
            put(
                "ss_block_lr",
                listed(c.block_lr.iter().map(|(b, f)| format!("{b}={f}")).collect()),
            );
            put(
                "ss_block_rank",
                listed(
                    c.block_rank
                        .iter()
                        .map(|(b, r)| format!("{b}={r}"))
                        .collect(),
                ),
            );
        }
        if let Some(decay) = ema_decay {
            put("ss_ema_decay", python_float(decay));
        }
        if let Some(class) = &self.class_images {
            put(
                "ss_num_reg_images",
                class.dataset.samples_per_epoch().to_string(),
            );
            put("ss_prior_loss_weight", python_float(class.weight));
        }
        save_adapter(
            path,
            adapter,
            &ModelModules {
                unet: &self.unet.adapter_modules(),
                text_encoder: self.text.as_ref().map(|t| t.first().lora_modules()),
                // An SDXL file names its modules as SDXL's, whether its encoders train or not.
                text_encoder_2: match self.text.as_ref().and_then(TrainedText::second) {
                    Some(encoder) => Some(encoder.lora_modules()),
                    None => (self.base_model == BaseModelVersion::SdxlBase).then_some(&[]),
                },
            },
            &SaveOptions {
                format: c.format,
                base_model: self.base_model,
                prediction: self.schedule.prediction,
                title: None,
                extra_metadata: extra,
                lokr_factor: (c.algo == AdapterAlgorithm::LoKr).then(|| c.factor.unwrap_or(-1)),
            },
        )
    }

    /// The validation loss now, as a metrics row; `None` without validation images.
    pub fn validate(&self) -> Result<Option<ValidationRow>> {
        let Some(validation) = &self.validation else {
            return Ok(None);
        };
        let val_loss = validation
            .loss(&self.unet, self.text.as_ref(), &self.schedule)
            .with_context(|| format!("validation at step {}", self.step))?;
        Ok(Some(ValidationRow {
            step: self.step,
            val_loss,
        }))
    }

    /// Writes the moving average of the adapter (`--ema-decay`) as an adapter file, with the
    /// same metadata as [`Self::save_adapter`] plus `ss_ema_decay`.
    pub fn save_ema_adapter(&self, path: &Path) -> Result<()> {
        let ema = self
            .ema
            .as_ref()
            .context("this run keeps no moving average (--ema-decay)")?;
        let mut averaged = self.adapter.clone();
        for ((name, _), tensor) in self.optimizer.params().iter().zip(ema.tensors()) {
            let slot = averaged
                .var_tensor_mut(name)
                .with_context(|| format!("adapter parameter `{name}` is no module's"))?;
            *slot = tensor.clone();
        }
        self.write_adapter(path, &averaged, self.config.ema_decay)
    }

    /// Ends [`Self::run`] after the step in progress once `flag` is set (by a SIGINT or SIGTERM
    /// handler): it writes a checkpoint and the adapter so far, and returns a [`Stopped`] error.
    pub fn stop_on(&mut self, flag: Arc<AtomicBool>) {
        self.stop = Some(flag);
    }

    /// What the main process writes after a step: the validation loss, a checkpoint (with an
    /// adapter beside it) and samples, when due.
    fn write_step_outputs(
        &mut self,
        log: &mut MetricsLog,
        val_losses: &mut Vec<f64>,
    ) -> Result<()> {
        if self.validation.as_ref().is_some_and(|v| v.due(self.step)) {
            if let Some(row) = self.validate()? {
                log.write_row(&row)?;
                val_losses.push(row.val_loss);
            }
        }
        if let Some(every) = self.config.save_every {
            if self.step.is_multiple_of(every) {
                let (ckpt, adapter) = checkpoint_paths(&self.config.output, self.step);
                self.save_adapter(&adapter)?;
                self.save_checkpoint(&ckpt)?;
                if let Some(keep) = self.config.keep_checkpoints {
                    remove_older_checkpoints(&self.config.output, keep)?;
                }
            }
        }
        if let Some(sampler) = self.sampler.as_ref().filter(|s| s.due(self.step)) {
            if let Some(scores) = sampler.write(&self.config.output, self.step)? {
                log.write_row(&scores)?;
            }
        }
        Ok(())
    }

    /// Trains to the last step: metrics per step, checkpoints (with an adapter beside each) every
    /// `save_every` steps, the adapter at the end. `on_step` sees every step's report. In a
    /// data-parallel run only the main process writes files, validates and samples.
    pub fn run(&mut self, on_step: &mut dyn FnMut(&StepReport)) -> Result<TrainSummary> {
        let main = self.group.is_main();
        let mut log = match (main, &self.config.resume) {
            (false, _) => None,
            (true, Some(_)) => Some(MetricsLog::resume(&self.config.metrics, self.step)?),
            (true, None) => Some(MetricsLog::create(&self.config.metrics)?),
        };
        let first_step = self.step;
        let mut first_loss = None;
        let mut last_loss = None;
        let mut seconds = 0.0;
        let mut val_losses = Vec::new();
        // The baseline before the first step (a resumed run's log already has it).
        if let Some(log) = log.as_mut().filter(|_| self.step == 0) {
            if let Some(row) = self.validate()? {
                log.write_row(&row)?;
                val_losses.push(row.val_loss);
            }
        }
        while self.step < self.total_steps {
            let report = self.step()?;
            seconds += report.seconds;
            first_loss.get_or_insert(report.loss);
            last_loss = Some(report.loss);
            if let Some(log) = log.as_mut() {
                log.write(&report)?;
            }
            on_step(&report);
            if let Some(log) = log.as_mut() {
                self.write_step_outputs(log, &mut val_losses)?;
            }
            // Alone, a request that came while the step's files were written counts too.
            let stop_requested = match self.group.is_collective() {
                false => self.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst)),
                true => self.stop_requested,
            };
            if stop_requested && self.step < self.total_steps {
                let (checkpoint, adapter) = checkpoint_paths(&self.config.output, self.step);
                if main {
                    self.save_adapter(&adapter)?;
                    self.save_checkpoint(&checkpoint)?;
                }
                return Err(Stopped {
                    step: self.step,
                    checkpoint,
                }
                .into());
            }
        }
        if main {
            self.save_adapter(&self.config.output)?;
            if self.ema.is_some() {
                self.save_ema_adapter(&ema_output_path(&self.config.output))?;
            }
        }
        let steps_run = self.step - first_step;
        let samples = (steps_run * self.global_batch() * self.config.grad_accum) as f64;
        Ok(TrainSummary {
            steps_run,
            final_step: self.step,
            first_loss,
            last_loss,
            mean_step_seconds: if steps_run > 0 {
                seconds / steps_run as f64
            } else {
                0.0
            },
            images_per_second: if seconds > 0.0 {
                samples / seconds
            } else {
                0.0
            },
            peak_rss_bytes: peak_rss_bytes(),
            output: self.config.output.clone(),
            ema_output: self
                .ema
                .is_some()
                .then(|| ema_output_path(&self.config.output)),
            first_val_loss: val_losses.first().copied(),
            last_val_loss: val_losses.last().copied(),
        })
    }
}

/// Prepares and runs a whole training job.
pub fn train(
    config: TrainConfig,
    on_prepare: &mut dyn FnMut(Preparation),
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<TrainSummary> {
    Trainer::new(config, on_prepare)?.run(on_step)
}

/// `--resume latest`: the newest checkpoint beside `--output`, or a fresh start if there is none.
pub const RESUME_LATEST: &str = "latest";

/// The checkpoint of the highest step that [`checkpoint_paths`] wrote beside `output` and that
/// reads whole, if any. Checkpoints are written atomically (a temporary file renamed), so a run
/// killed while saving leaves the previous ones whole and no partial file under their names.
/// Whole means a valid header whose tensors fill the file exactly; the tensors themselves are
/// read once, by the resume.
pub fn latest_checkpoint(output: &Path) -> Result<Option<PathBuf>> {
    Ok(saved_checkpoints(output)?
        .into_iter()
        .map(|(_, path)| path)
        .find(|path| mmap_safetensors(std::slice::from_ref(path)).is_ok()))
}

/// `output`'s file stem, which names the checkpoints and temporary files written beside it.
fn output_stem(output: &Path) -> String {
    output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The checkpoints [`checkpoint_paths`] wrote beside `output`, newest (highest step) first.
fn saved_checkpoints(output: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let (folder, stem) = (folder_of(output), output_stem(output));
    if !folder.is_dir() {
        return Ok(Vec::new());
    }
    let prefix = format!("{stem}-step");
    let entries = std::fs::read_dir(folder)
        .with_context(|| format!("cannot list the checkpoints in {}", folder.display()))?;
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?;
            let step = name
                .strip_prefix(&prefix)?
                .strip_suffix(".ckpt.safetensors")?;
            Some((step.parse().ok()?, path))
        })
        .collect();
    found.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    Ok(found)
}

/// `--keep-checkpoints`: deletes every checkpoint beside `output` but the newest `keep`, each
/// with the adapter written beside it. The adapter goes first: a run killed in between leaves a
/// checkpoint, which the next pruning finds and deletes, not an adapter nothing refers to.
fn remove_older_checkpoints(output: &Path, keep: usize) -> Result<()> {
    for (step, checkpoint) in saved_checkpoints(output)?.into_iter().skip(keep) {
        let (_, adapter) = checkpoint_paths(output, step);
        for path in [adapter, checkpoint] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| {
                        format!("--keep-checkpoints: cannot delete {}", path.display())
                    })
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Removes the temporary files a killed run left beside `output` (`.<name>.tmp-<pid>-<n>` for a
/// name starting with `output`'s stem, see `lora_core::io::write_atomic`) whose process is gone.
/// Best effort, Linux only (it needs `/proc` to tell a live writer from a dead one).
fn remove_stale_temporaries(output: &Path) {
    #[cfg(target_os = "linux")]
    {
        let (folder, stem) = (folder_of(output), output_stem(output));
        let Ok(entries) = std::fs::read_dir(folder) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((target, rest)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-"))
            else {
                continue;
            };
            let Some(pid) = rest.split('-').next() else {
                continue;
            };
            let dead = !Path::new("/proc").join(pid).exists();
            if target.starts_with(&stem) && dead {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = output;
}

/// `(checkpoint, adapter)` written at `step` next to `output`:
/// `<stem>-step000010.ckpt.safetensors` and `<stem>-step000010.safetensors`.
pub fn checkpoint_paths(output: &Path, step: usize) -> (PathBuf, PathBuf) {
    let stem = output_stem(output);
    (
        output.with_file_name(format!("{stem}-step{step:06}.ckpt.safetensors")),
        output.with_file_name(format!("{stem}-step{step:06}.safetensors")),
    )
}

/// The batches of `epoch` with buckets: the epoch's samples shuffled (as without buckets),
/// grouped by bucket in that order, cut into batches of at most `batch_size`, and the batches
/// shuffled. The number of batches is the same every epoch.
fn bucket_batches(
    dataset: &Dataset,
    sizes: &[(usize, usize)],
    batch_size: usize,
    epoch: usize,
    seed: u64,
) -> Vec<Vec<usize>> {
    let mut order = dataset.epoch_samples();
    Rng::new(derive_seed(seed, 2 + epoch as u64)).shuffle(&mut order);
    let mut by_bucket: std::collections::BTreeMap<(usize, usize), Vec<usize>> =
        std::collections::BTreeMap::new();
    for item in order {
        by_bucket.entry(sizes[item]).or_default().push(item);
    }
    let mut batches: Vec<Vec<usize>> = by_bucket
        .values()
        .flat_map(|items| items.chunks(batch_size).map(<[usize]>::to_vec))
        .collect();
    Rng::new(derive_seed(seed, (1 << 40) + epoch as u64)).shuffle(&mut batches);
    batches
}

/// The generator of the run's sample `index` in `stream` ([`SAMPLE_STREAM`] or
/// [`CLASS_SAMPLE_STREAM`]): all of that sample's draws.
fn sample_rng(seed: u64, stream: u64, index: usize) -> Rng {
    Rng::new(derive_seed(seed, stream + index as u64))
}

/// The digest of a run's start that every process must share: the parameters' values and the
/// given texts (recipe, dataset fingerprint, step), FNV-1a over their bytes.
fn run_digest(params: &[(String, Var)], texts: &[&str]) -> Result<u64> {
    let mut hash = Fnv1a::new();
    for (name, var) in params {
        feed_piece(&mut hash, name.as_bytes());
        let values = var
            .as_tensor()
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        feed_piece(&mut hash, &bytes);
    }
    for text in texts {
        feed_piece(&mut hash, text.as_bytes());
    }
    Ok(hash.finish())
}

/// Feeds `bytes` and then a 0xff separator (a byte no UTF-8 text has), so that pieces fed one
/// after the other cannot run into each other.
fn feed_piece(hash: &mut Fnv1a, bytes: &[u8]) {
    hash.update(bytes);
    hash.update(&[0xff]);
}

/// A sample's random choices, drawn in this order: whether it is mirrored (`--flip`) and whether
/// its caption is dropped (`--caption-dropout`).
fn draw_augmentation(config: &TrainConfig, rng: &mut Rng) -> (bool, bool) {
    let flip = config.flip && rng.uniform() < 0.5;
    let dropped = config.caption_dropout > 0.0 && rng.uniform() < config.caption_dropout;
    (flip, dropped)
}

/// A copy of `model` whose trained adapter (`modules`) is attached with its tensors detached:
/// the same storage, so the optimizer's updates show, but no graph is recorded when it generates
/// (a sampling loop would otherwise keep every denoising step's graph to its end).
fn untracked_copy<M: Clone>(
    model: &M,
    modules: &AdapterModules,
    reattach: impl Fn(&mut M, &str, &AdapterModules) -> Result<()>,
) -> Result<M> {
    let detached = modules
        .iter()
        .map(|(path, m)| (path.clone(), m.detached()))
        .collect();
    let mut copy = model.clone();
    reattach(&mut copy, ADAPTER_NAME, &detached)?;
    Ok(copy)
}

/// `--train-text-encoder`: the model's text encoder(s), SDXL's two, loaded with a fresh adapter
/// each (added to `trainable`) attached. All of an encoder's modules train, as kohya's
/// `lora_te_`/`lora_te1_`/`lora_te2_` sets (SDXL's first encoder's last layer included: its
/// output is not read, so it gets no gradient and the optimizer leaves it as it starts, as in
/// kohya).
fn trained_text(
    model: &ModelFolder,
    config: &TrainConfig,
    lora_config: &LoraConfig,
    trainable: &mut TrainableAdapter,
    device: &Device,
) -> Result<TrainedText> {
    let dtype = config.precision.dtype();
    let mut encoders = Vec::new();
    let components: &[Component] = match model.is_sdxl() {
        true => &[Component::TextEncoder, Component::TextEncoder2],
        false => &[Component::TextEncoder],
    };
    for (stream, &component) in (TEXT_ENCODER_INIT_STREAM..).zip(components) {
        let mut encoder = match component {
            Component::TextEncoder2 => {
                let text_config = model.text_encoder_2_config()?;
                model.load_text_encoder_2(&text_config, dtype, device, BTreeMap::new())
            }
            _ => {
                let text_config = model.text_encoder_config()?;
                model.load_text_encoder(&text_config, dtype, device, BTreeMap::new())
            }
        }
        .with_context(|| format!("cannot load the {component} of {}", model.root().display()))?;
        trainable.add_text_encoder(
            component,
            lora_config,
            encoder.lora_modules(),
            device,
            derive_seed(config.seed, stream),
        )?;
        if config.dora {
            trainable.add_dora(component, &encoder.adaptable_weights()?)?;
        }
        encoder.attach_adapter(ADAPTER_NAME, trainable.adapter.modules(component), 1.0)?;
        encoders.push(encoder);
    }
    let first = encoders.remove(0);
    Ok(match encoders.pop() {
        None => TrainedText::Clip(first),
        Some(second) => TrainedText::Sdxl(SdxlTextEncoders::new(
            first,
            second,
            model.tokenizer()?,
            model.tokenizer_2()?,
        )?),
    })
}

/// Untracked copies ([`untracked_copy`]) of the encoders that train, for sampling: the first
/// and, for SDXL, the second.
fn untracked_encoders(
    text: &TrainedText,
    adapter: &Adapter,
) -> Result<(TextEncoder, Option<TextEncoder>)> {
    let copy = |encoder: &TextEncoder, component| {
        untracked_copy(encoder, adapter.modules(component), |m, name, modules| {
            m.detach_adapter(name)?;
            m.attach_adapter(name, modules, 1.0)
        })
    };
    Ok((
        copy(text.first(), Component::TextEncoder)?,
        text.second()
            .map(|encoder| copy(encoder, Component::TextEncoder2))
            .transpose()?,
    ))
}

/// Independent seeds for the separate random streams of a run.
pub(crate) fn derive_seed(seed: u64, stream: u64) -> u64 {
    let mut r = Rng::new(seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03));
    r.next_u64()
}

/// Sample count and FNV-1a hash of every item's file name, caption and repeats.
fn fingerprint(dataset: &Dataset) -> String {
    let mut hash = Fnv1a::new();
    for item in &dataset.items {
        feed_piece(&mut hash, item.image.name().as_bytes());
        feed_piece(&mut hash, item.caption.as_bytes());
        feed_piece(&mut hash, &item.repeats.to_le_bytes());
    }
    format!(
        "{} samples, fnv1a {:016x}",
        dataset.samples_per_epoch(),
        hash.finish()
    )
}

/// The outputs are checked before any work: never an input, in a folder that exists (created
/// here, as kohya does with its output folder) and can be written. A run that continues
/// (`--resume`) rewrites its own outputs; a fresh run replaces an earlier one's adapter, metrics
/// and checkpoints only with `--overwrite`, which deletes that run's checkpoints so that a later
/// `--resume latest` cannot pick one of them up.
fn check_output_location(config: &TrainConfig, continuing: bool) -> Result<()> {
    let mut inputs: Vec<(&str, &Path)> = vec![
        ("--base", Path::new(&config.base)),
        ("--data", config.data.as_path()),
    ];
    inputs.extend(config.base_config.as_deref().map(|p| ("--base-config", p)));
    inputs.extend(config.resume.as_deref().map(|p| ("--resume", p)));
    let replace = config.overwrite || continuing;
    let ema_output = config.ema_decay.map(|_| ema_output_path(&config.output));
    let outputs = [("--output", &config.output), ("--metrics", &config.metrics)]
        .into_iter()
        .chain(
            ema_output
                .as_ref()
                .map(|path| ("--ema-decay's output", path)),
        );
    for (flag, output) in outputs {
        check_output(flag, output, &inputs)?;
        prepare_output(flag, output, replace)?;
    }
    if continuing {
        return Ok(());
    }
    if let Some((step, path)) = saved_checkpoints(&config.output)?.first() {
        ensure!(
            config.overwrite,
            "{} is the step-{step} checkpoint of an earlier run beside --output: pass --resume \
             latest to continue that run, or --overwrite to start over (deleting its checkpoints)",
            path.display()
        );
        remove_older_checkpoints(&config.output, 0)?;
    }
    Ok(())
}

/// Refuses to start when the output folder has clearly too little room for what the run will
/// write at once: the final adapter (and its moving average), and with `--save-every` one
/// checkpoint (the parameters and `state_bytes` of optimizer state and moving average) with its
/// adapter, twice over while a new one is written before the old is pruned. A
/// filesystem that fills up anyway fails at save time with the previous files intact.
fn check_free_space(config: &TrainConfig, adapter_params: usize, state_bytes: u64) -> Result<()> {
    let folder = folder_of(&config.output);
    let Some(free) = lora_core::io::free_space(folder) else {
        return Ok(());
    };
    let adapter = adapter_params as u64 * 4;
    let finals = if config.ema_decay.is_some() {
        2 * adapter
    } else {
        adapter
    };
    let checkpoints = match config.save_every {
        Some(_) => 2 * (adapter + state_bytes + adapter),
        None => 0,
    };
    // Headers, metrics and sample images, generously.
    let needed = finals + checkpoints + (1 << 20);
    ensure!(
        needed <= free,
        "the output folder {} has {} free, and this run needs about {} for its adapter{}: free \
         some space or choose another --output",
        folder.display(),
        human_bytes(free),
        human_bytes(needed),
        if checkpoints > 0 {
            " and checkpoints"
        } else {
            ""
        }
    );
    Ok(())
}

fn human_bytes(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}

/// The resolution must fit the VAE's downsampling (latent models) and give the UNet at least one
/// latent pixel at its deepest level.
fn check_resolution(config: &TrainConfig, model: &ModelFolder, unet: &UNetConfig) -> Result<()> {
    let factor = match model.vae_config()? {
        Some(vae) => vae.vae_scale_factor(),
        None => 1,
    };
    let res = config.resolution;
    ensure!(
        res.is_multiple_of(factor),
        "--resolution = {res} is not a multiple of the VAE's downsampling factor {factor}"
    );
    let depth = 1 << (unet.block_out_channels.len() - 1);
    ensure!(
        (res / factor) >= depth,
        "--resolution = {res} gives {}×{0} latents, too small for this UNet's {} levels (at least {} needed)",
        res / factor,
        unet.block_out_channels.len(),
        depth * factor
    );
    Ok(())
}
