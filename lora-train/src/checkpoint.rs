//! Training checkpoints: everything a run needs to continue exactly where it stopped.
//!
//! One safetensors file (written atomically) holding, per adapter parameter, its value and the
//! optimizer's state tensors (`param.<name>`, `<slot>.<name>`, all f32: AdamW's `adam_m` and
//! `adam_v`, Lion's `lion_m`, Prodigy's `prodigy_*`), and in the header the step, the optimizer's
//! update count and scalar state (`lora_train.optimizer.<name>`, Prodigy's step-size estimate),
//! the recipe (the options that shape the trajectory, the optimizer among them) and a fingerprint
//! of the dataset. Data order and every random draw are pure functions of the seed and the
//! sample's position in the run, so nothing else is needed for a bit-exact continuation on CPU,
//! on any number of processes (the recipe's `batch_size` is the step's, across all of them).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use lora_core::io::{read_safetensors, write_safetensors_atomic};
use serde_json::Value;

use crate::config::{LrScheduler, TrainConfig};
use crate::optimizer::OptimizerState;

const FORMAT_KEY: &str = "lora_train.checkpoint";
/// Version 2: no generator state (version 1's one stream of draws cannot continue exactly).
const FORMAT_VERSION: &str = "2";
const STEP_KEY: &str = "lora_train.step";
const OPTIMIZER_STEPS_KEY: &str = "lora_train.optimizer_steps";
const RECIPE_KEY: &str = "lora_train.recipe";
const DATASET_KEY: &str = "lora_train.dataset";
/// The tensor name prefix of the moving average (`--ema-decay`).
const EMA_SLOT: &str = "ema";
/// Prefix of the optimizer's scalar state keys.
const OPTIMIZER_SCALAR_PREFIX: &str = "lora_train.optimizer.";

/// The state of a run after `step` optimizer steps.
pub struct Checkpoint {
    pub step: usize,
    /// Options that must match to continue (JSON object), see `Trainer`.
    pub recipe: Value,
    /// Dataset fingerprint (sample count and a hash of files, captions and repeats).
    pub dataset: String,
    /// Parameter name → value, in the optimizer's order.
    pub params: Vec<(String, Tensor)>,
    /// The optimizer's state; its `slots` follow `params`.
    pub optimizer: OptimizerState,
    /// `--ema-decay`: the moving average of each parameter (`ema.<name>`), following `params`.
    pub ema: Option<Vec<Tensor>>,
}

impl Checkpoint {
    /// Writes the checkpoint; `slot_names` name the optimizer's state tensors of each parameter.
    pub fn save(&self, path: &Path, slot_names: &[&str]) -> Result<()> {
        let mut tensors = Vec::with_capacity(self.params.len() * (1 + slot_names.len()));
        for ((name, value), slots) in self.params.iter().zip(&self.optimizer.slots) {
            ensure!(
                slots.len() == slot_names.len(),
                "`{name}` has {} optimizer tensors for {} slot names",
                slots.len(),
                slot_names.len()
            );
            tensors.push((format!("param.{name}"), value.clone()));
            for (slot, tensor) in slot_names.iter().zip(slots) {
                tensors.push((format!("{slot}.{name}"), tensor.clone()));
            }
        }
        for ((name, _), average) in self.params.iter().zip(self.ema.iter().flatten()) {
            tensors.push((format!("{EMA_SLOT}.{name}"), average.clone()));
        }
        let mut metadata = BTreeMap::from([
            (FORMAT_KEY.to_string(), FORMAT_VERSION.to_string()),
            (STEP_KEY.to_string(), self.step.to_string()),
            (
                OPTIMIZER_STEPS_KEY.to_string(),
                self.optimizer.steps.to_string(),
            ),
            (RECIPE_KEY.to_string(), self.recipe.to_string()),
            (DATASET_KEY.to_string(), self.dataset.clone()),
        ]);
        // `{:?}` writes the shortest digits that read back to the same f64: resume stays exact.
        for (key, value) in &self.optimizer.scalars {
            metadata.insert(
                format!("{OPTIMIZER_SCALAR_PREFIX}{key}"),
                format!("{value:?}"),
            );
        }
        write_safetensors_atomic(path, &tensors, metadata)
    }

    /// Reads a checkpoint; `names` are the adapter's parameters in optimizer order,
    /// `slot_names` the optimizer's state tensors of each and `with_ema` whether each has a
    /// moving average, and every one must be present (and nothing else). `accept_recipe` judges
    /// the saved recipe first, so that another optimizer or a dropped `--ema-decay` is named as
    /// such rather than as tensors the checkpoint has or lacks.
    pub fn load(
        path: &Path,
        names: &[String],
        slot_names: &[&str],
        with_ema: bool,
        accept_recipe: &dyn Fn(&Value) -> Result<()>,
        device: &Device,
    ) -> Result<Self> {
        let load = || -> Result<Self> {
            let mut file = read_safetensors(path, device)?;
            let meta = |key: &str| {
                file.metadata.get(key).with_context(|| {
                    format!("not a lora-train checkpoint: header key `{key}` missing")
                })
            };
            ensure!(
                meta(FORMAT_KEY)? == FORMAT_VERSION,
                "checkpoint format `{}` is not the supported version {FORMAT_VERSION} (an earlier \
                 lora-train drew its random numbers otherwise, so it cannot be continued exactly: \
                 start afresh)",
                meta(FORMAT_KEY)?
            );
            let number = |key: &str| -> Result<u64> {
                let v = meta(key)?;
                v.parse()
                    .with_context(|| format!("header `{key}` = `{v}` is not an integer"))
            };
            let step = number(STEP_KEY)? as usize;
            let optimizer_steps = number(OPTIMIZER_STEPS_KEY)?;
            let recipe = serde_json::from_str(meta(RECIPE_KEY)?)
                .with_context(|| format!("header `{RECIPE_KEY}` is not JSON"))?;
            accept_recipe(&recipe)?;
            let dataset = meta(DATASET_KEY)?.clone();
            let scalars = file
                .metadata
                .iter()
                .filter_map(|(key, value)| {
                    key.strip_prefix(OPTIMIZER_SCALAR_PREFIX)
                        .map(|name| (key, name, value))
                })
                .map(|(key, name, value)| {
                    let number: f64 = value
                        .parse()
                        .with_context(|| format!("header `{key}` = `{value}` is not a number"))?;
                    Ok((name.to_string(), number))
                })
                .collect::<Result<BTreeMap<_, _>>>()?;
            let expected = names.len() * (1 + slot_names.len() + usize::from(with_ema));
            let mut take = |key: String| {
                file.tensors
                    .remove(&key)
                    .with_context(|| format!("tensor `{key}` missing (does the checkpoint belong to this adapter and optimizer?)"))
            };
            let mut params = Vec::with_capacity(names.len());
            let mut slots = Vec::with_capacity(names.len());
            let mut ema = Vec::new();
            for name in names {
                params.push((name.clone(), take(format!("param.{name}"))?));
                slots.push(
                    slot_names
                        .iter()
                        .map(|slot| take(format!("{slot}.{name}")))
                        .collect::<Result<Vec<_>>>()?,
                );
                if with_ema {
                    ema.push(take(format!("{EMA_SLOT}.{name}"))?);
                }
            }
            ensure!(
                file.tensors.is_empty(),
                "{} tensors beyond the {expected} this adapter and optimizer have, e.g. `{}`",
                file.tensors.len(),
                file.tensors.keys().next().expect("non-empty")
            );
            Ok(Self {
                step,
                recipe,
                dataset,
                params,
                optimizer: OptimizerState {
                    steps: optimizer_steps,
                    scalars,
                    slots,
                },
                ema: with_ema.then_some(ema),
            })
        };
        load().with_context(|| format!("cannot resume from {}", path.display()))
    }
}

/// Options that do not change the trajectory, so a resumed run may set them differently.
const FREE_ON_RESUME: [&str; 15] = [
    "output",
    "metrics",
    "save_every",
    "keep_checkpoints",
    "resume",
    "format",
    "device",
    "skip_bad",
    "overwrite",
    "allow_pickle",
    "length",
    "sample",
    "gradient_checkpointing",
    "validation_data",
    "validate_every",
];

/// The options that shape the trajectory, as JSON; a resume must match them. The run's length
/// may change (train longer), except under a decaying LR schedule, whose curve depends on it.
/// `batch_size` is `global_batch`, the micro-batch across all processes, so a run continues on
/// any number of processes that keeps it.
pub(crate) fn recipe(
    config: &TrainConfig,
    total_steps: usize,
    global_batch: usize,
) -> Result<Value> {
    let mut value = serde_json::to_value(config)?;
    if let Value::Object(map) = &mut value {
        for key in FREE_ON_RESUME {
            map.remove(key);
        }
        map.insert("batch_size".into(), global_batch.into());
        if config.lr_scheduler != LrScheduler::Constant {
            map.insert("total_steps".into(), total_steps.into());
        }
    }
    Ok(value)
}

pub(crate) fn check_recipe(now: &Value, saved: &Value) -> Result<()> {
    let (Value::Object(now), Value::Object(saved)) = (now, saved) else {
        bail!("the checkpoint's recipe is not a JSON object");
    };
    // Both ways: an option left out of the recipe is at its default, so one the checkpoint has
    // and this run lacks (say --masks, or an --optimizer-args value) differs as well.
    let keys: std::collections::BTreeSet<&String> = now.keys().chain(saved.keys()).collect();
    let shown = |v: Option<&Value>| v.map_or("not set".to_string(), Value::to_string);
    let differences: Vec<String> = keys
        .into_iter()
        .filter(|k| now.get(k.as_str()) != saved.get(k.as_str()))
        .map(|k| {
            format!(
                "{}: checkpoint {}, now {}",
                match k.as_str() {
                    "text_encoder_2_lr" => "text-encoder-lr (second value)".to_string(),
                    "batch_size" => "batch-size (per step, times the processes)".to_string(),
                    k => k.replace('_', "-"),
                },
                shown(saved.get(k.as_str())),
                shown(now.get(k.as_str()))
            )
        })
        .collect();
    ensure!(
        differences.is_empty(),
        "options differ from the checkpoint's (a resumed run must use the same recipe):\n  {}",
        differences.join("\n  ")
    );
    Ok(())
}
