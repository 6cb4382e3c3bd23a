//! Validation loss (`--validation-data`, `--validation-split`, `--validate-every`): the denoising
//! loss of the adapted UNet on held-out images, at fixed timesteps with fixed noise, so that a
//! value is comparable across steps and across runs on the same validation images.
//!
//! Each validation image is scored at the timesteps kohya's validation uses
//! ([`VALIDATION_TIMESTEPS`], per 1000 of the schedule), each with its own noise (and VAE sample)
//! drawn from a generator seeded by the image's index alone, not by `--seed`: plain MSE against
//! the training target (ε, v or x₀; no min-SNR weight, no noise offset), averaged over images and
//! timesteps. Nothing here draws from the training generator, so validating changes no step of
//! the run. `--validation-split F` holds out a fraction of the dataset, chosen by `--seed`.

use anyhow::{ensure, Result};
use lora_core::{AddedConditioning, Rng, UNet2DConditionModel};

use crate::cache::{conditioning, EncodedDataset, TrainedText};
use crate::dataset::Dataset;
use crate::objective::DenoisingBatch;
use crate::schedule::NoiseSchedule;
use crate::trainer::derive_seed;

/// kohya-ss/sd-scripts' fixed validation timesteps, for a 1000-step schedule.
pub const VALIDATION_TIMESTEPS: [usize; 5] = [10, 350, 500, 650, 990];
/// Generator streams of the validation noise and of the split (far from the training ones).
const NOISE_STREAM: u64 = 1 << 40;
const SPLIT_STREAM: u64 = 1 << 41;

/// The encoded validation images and when to score them.
pub struct Validation {
    data: EncodedDataset,
    items: usize,
    every: usize,
}

impl Validation {
    pub fn new(data: EncodedDataset, items: usize, every: usize) -> Result<Self> {
        ensure!(items > 0, "the validation set is empty");
        ensure!(every > 0, "--validate-every 0: expected at least 1");
        Ok(Self { data, items, every })
    }

    /// Whether step `step` (1-based, after its update) is scored.
    pub fn due(&self, step: usize) -> bool {
        step.is_multiple_of(self.every)
    }

    /// The mean validation loss of `unet` (and of the text encoders that train, if any) as they
    /// are now.
    pub fn loss(
        &self,
        unet: &UNet2DConditionModel,
        text: Option<&TrainedText>,
        schedule: &NoiseSchedule,
    ) -> Result<f64> {
        let total = schedule.num_timesteps();
        let timesteps: Vec<usize> = VALIDATION_TIMESTEPS
            .iter()
            .map(|t| (t * total / 1000).min(total - 1))
            .collect();
        let k = timesteps.len();
        let mut sum = 0.0;
        // One batch per image: the image at each timestep, each with its own noise.
        for item in 0..self.items {
            let mut rng = Rng::new(derive_seed(0, NOISE_STREAM + item as u64));
            let sample = self.data.sample(item, false, false, &mut rng)?;
            let latents = sample.latents.unsqueeze(0)?;
            let (_, c, h, w) = latents.dims4()?;
            // The same sample at every timestep; its caption encoded once.
            let latents = latents.repeat((k, 1, 1, 1))?;
            let (context, added) = conditioning(std::slice::from_ref(&sample), text)?;
            let context = context.repeat((k, 1, 1))?;
            let added = added
                .map(|a| -> Result<AddedConditioning> {
                    Ok(AddedConditioning {
                        text_embeds: a.text_embeds.repeat((k, 1))?,
                        time_ids: a.time_ids.repeat((k, 1))?,
                    })
                })
                .transpose()?;
            let noise = rng.normal_tensor((k, c, h, w), latents.device())?;
            let batch = DenoisingBatch::with_noise(schedule, None, &latents, &timesteps, noise)?;
            let prediction =
                unet.forward_conditioned(&batch.noisy, &batch.timesteps, &context, added.as_ref())?;
            let loss = f64::from(batch.loss(&prediction)?.to_scalar::<f32>()?);
            ensure!(
                loss.is_finite(),
                "the validation loss of image {item} is {loss}"
            );
            sum += loss;
        }
        Ok(sum / self.items as f64)
    }
}

/// Holds out `round(fraction · n)` of `dataset`'s items (at least one, and at least one left to
/// train on), chosen by a shuffle seeded with `seed`; the rest keep their order. Returns
/// `(training, validation)`.
pub fn split(dataset: Dataset, fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
    check_fraction(fraction)?;
    let n = dataset.items.len();
    let held = ((fraction * n as f64).round() as usize).max(1);
    ensure!(
        held < n,
        "--validation-split = {fraction} of {n} image(s) leaves nothing to train on"
    );
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(derive_seed(seed, SPLIT_STREAM)).shuffle(&mut order);
    let mut validation_index: Vec<usize> = order[..held].to_vec();
    validation_index.sort_unstable();
    let mut training = Dataset {
        items: Vec::with_capacity(n - held),
        skipped: dataset.skipped,
        warnings: dataset.warnings,
    };
    let mut validation = Dataset {
        items: Vec::with_capacity(held),
        skipped: Vec::new(),
        warnings: Vec::new(),
    };
    for (i, item) in dataset.items.into_iter().enumerate() {
        if validation_index.binary_search(&i).is_ok() {
            validation.items.push(item);
        } else {
            training.items.push(item);
        }
    }
    Ok((training, validation))
}

/// `--validation-split`'s range: strictly between 0 and 1.
pub fn check_fraction(fraction: f64) -> Result<()> {
    ensure!(
        fraction > 0.0 && fraction < 1.0,
        "--validation-split = {fraction}: expected a fraction between 0 and 1"
    );
    Ok(())
}

/// One row of the metrics log.
#[derive(serde::Serialize)]
pub struct ValidationRow {
    pub step: usize,
    pub val_loss: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{DatasetItem, ImageLocation};

    fn dataset(n: usize) -> Dataset {
        Dataset {
            items: (0..n)
                .map(|i| DatasetItem {
                    image: ImageLocation::File(format!("{i}.png").into()),
                    caption: format!("image {i}"),
                    repeats: 1,
                    size: (8, 8),
                })
                .collect(),
            skipped: Vec::new(),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn a_split_is_seeded_and_keeps_both_sides_in_order() {
        let (train, val) = split(dataset(10), 0.3, 7).unwrap();
        assert_eq!((train.items.len(), val.items.len()), (7, 3));
        let names = |d: &Dataset| {
            d.items
                .iter()
                .map(|i| i.caption.clone())
                .collect::<Vec<_>>()
        };
        let (again_train, again_val) = split(dataset(10), 0.3, 7).unwrap();
        assert_eq!(names(&val), names(&again_val));
        assert_eq!(names(&train), names(&again_train));
        let mut all = names(&train);
        all.extend(names(&val));
        all.sort();
        assert_eq!(all.len(), 10);
        all.dedup();
        assert_eq!(all.len(), 10);
        assert_ne!(names(&split(dataset(10), 0.3, 8).unwrap().1), names(&val));
        // At least one held out, and at least one left.
        assert_eq!(split(dataset(3), 0.01, 0).unwrap().1.items.len(), 1);
        let err = split(dataset(1), 0.5, 0).unwrap_err();
        assert!(
            format!("{err:#}").contains("nothing to train on"),
            "{err:#}"
        );
        assert!(split(dataset(4), 1.0, 0).is_err());
    }
}
