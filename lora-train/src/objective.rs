//! The training objective: noise the latents at a drawn timestep per sample and score the UNet's
//! prediction of ε, v or x₀ by its (min-SNR weighted) mean squared error.

use anyhow::Result;
use candle_core::{DType, Tensor};
use lora_core::models::config::PredictionType;
use lora_core::{Rng, UNet2DConditionModel};

use crate::schedule::NoiseSchedule;

/// The training objective for one batch: draw a timestep per sample and noise (plus the noise
/// offset) from `rng`, noise the latents, predict with the UNet and return the (min-SNR
/// weighted) MSE against the ε, v or x₀ target, averaged in f32.
pub fn denoising_loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    min_snr_gamma: Option<f64>,
    noise_offset: f64,
    latents: &Tensor,
    context: &Tensor,
    rng: &mut Rng,
) -> Result<Tensor> {
    let batch = DenoisingBatch::draw(schedule, min_snr_gamma, noise_offset, latents, rng)?;
    batch.loss(&unet.forward(&batch.noisy, &batch.timesteps, context)?)
}

/// One batch of the training objective: the noised latents at their drawn timesteps (the UNet's
/// inputs), and what the UNet should predict.
pub struct DenoisingBatch {
    pub noisy: Tensor,
    /// `[B]`, f32.
    pub timesteps: Tensor,
    target: Tensor,
    /// Per sample: min-SNR weight or 1.
    loss_weight: Tensor,
    /// `--masks`: per sample and position, `[B, 1, h, w]` weights of the squared error.
    position_weight: Option<Tensor>,
}

impl DenoisingBatch {
    /// Draws a timestep per sample, then the noise (plus the noise offset), from `rng`.
    pub fn draw(
        schedule: &NoiseSchedule,
        min_snr_gamma: Option<f64>,
        noise_offset: f64,
        latents: &Tensor,
        rng: &mut Rng,
    ) -> Result<Self> {
        let device = latents.device();
        let (b, c, _, _) = latents.dims4()?;
        let num_t = schedule.num_timesteps() as u64;
        let timesteps: Vec<usize> = (0..b).map(|_| rng.below(num_t) as usize).collect();
        let mut noise = rng.normal_tensor(latents.shape(), device)?;
        if noise_offset > 0.0 {
            let offset = rng.normal_tensor((b, c, 1, 1), device)?;
            noise = noise.broadcast_add(&(offset * noise_offset)?)?;
        }
        Self::with_noise(schedule, min_snr_gamma, latents, &timesteps, noise)
    }

    /// The batch of `latents` noised with `noise` at the given `timesteps` (one per sample):
    /// what validation uses, with its timesteps and noise fixed.
    pub fn with_noise(
        schedule: &NoiseSchedule,
        min_snr_gamma: Option<f64>,
        latents: &Tensor,
        timesteps: &[usize],
        noise: Tensor,
    ) -> Result<Self> {
        let device = latents.device();
        let b = timesteps.len();
        let coef = schedule.coefficients(timesteps, min_snr_gamma, device)?;
        let noisy = (latents.broadcast_mul(&coef.signal)? + noise.broadcast_mul(&coef.noise)?)?;
        let target = match schedule.prediction {
            PredictionType::Epsilon => noise,
            PredictionType::VPrediction => {
                (noise.broadcast_mul(&coef.signal)? - latents.broadcast_mul(&coef.noise)?)?
            }
            PredictionType::Sample => latents.clone(),
        };
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        Ok(Self {
            noisy,
            timesteps: Tensor::from_vec(t, b, device)?,
            target,
            loss_weight: coef.loss_weight,
            position_weight: None,
        })
    }

    /// Weights the squared error per position (`[B, 1, h, w]`, broadcast over channels), as
    /// kohya's masked loss does: the mean then runs over every position, weighted or not.
    pub fn with_position_weights(mut self, weights: Tensor) -> Self {
        self.position_weight = Some(weights);
        self
    }

    /// The (min-SNR weighted, masked) MSE of the UNet's `prediction` against the target,
    /// averaged in f32.
    pub fn loss(&self, prediction: &Tensor) -> Result<Tensor> {
        let prediction = prediction.to_dtype(DType::F32)?;
        let mut squared = (prediction - &self.target)?.sqr()?;
        if let Some(weights) = &self.position_weight {
            squared = squared.broadcast_mul(weights)?;
        }
        let per_sample = squared.flatten_from(1)?.mean(1)?;
        Ok((per_sample * &self.loss_weight)?.mean_all()?)
    }
}
