//! The training objective: noise the latents at a drawn timestep per sample and score the UNet's
//! prediction of ε, v or x₀ by its (min-SNR weighted) mean squared error.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use lora_core::models::config::PredictionType;
use lora_core::{AddedConditioning, Rng, UNet2DConditionModel};

use crate::schedule::NoiseSchedule;

/// The training objective for one batch: draw a timestep per sample and noise (plus the noise
/// offset) from `rng`, noise the latents, predict with the UNet (given SDXL's `added`
/// conditioning for an SDXL UNet) and return the (min-SNR weighted) MSE against the ε, v or x₀
/// target, averaged in f32.
#[allow(clippy::too_many_arguments)] // the objective's inputs; a struct would only rename them
pub fn denoising_loss(
    unet: &UNet2DConditionModel,
    schedule: &NoiseSchedule,
    min_snr_gamma: Option<f64>,
    noise_offset: f64,
    latents: &Tensor,
    context: &Tensor,
    added: Option<&AddedConditioning>,
    rng: &mut Rng,
) -> Result<Tensor> {
    let batch = DenoisingBatch::draw(schedule, min_snr_gamma, noise_offset, latents, rng)?;
    batch.loss(&unet.forward_conditioned(&batch.noisy, &batch.timesteps, context, added)?)
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
        let b = latents.dims4()?.0;
        let num_t = schedule.num_timesteps() as u64;
        let timesteps: Vec<usize> = (0..b).map(|_| rng.below(num_t) as usize).collect();
        let noise = offset_noise(rng, latents.dims(), noise_offset, device)?;
        Self::with_noise(schedule, min_snr_gamma, latents, &timesteps, noise)
    }

    /// As [`Self::draw`], each sample from its own generator (`draws[i]` for sample `i`): its
    /// timestep, then its noise, then its noise offset.
    pub fn draw_each(
        schedule: &NoiseSchedule,
        min_snr_gamma: Option<f64>,
        noise_offset: f64,
        latents: &Tensor,
        draws: &mut [Rng],
    ) -> Result<Self> {
        let device = latents.device();
        let b = latents.dims4()?.0;
        ensure!(
            draws.len() == b,
            "{} generators for a batch of {b}",
            draws.len()
        );
        let num_t = schedule.num_timesteps() as u64;
        let mut timesteps = Vec::with_capacity(b);
        let mut noise = Vec::with_capacity(b);
        for rng in draws {
            timesteps.push(rng.below(num_t) as usize);
            noise.push(offset_noise(
                rng,
                &latents.dims()[1..],
                noise_offset,
                device,
            )?);
        }
        let noise = Tensor::stack(&noise, 0)?;
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

    /// Multiplies each sample's loss by `weights` (`[B]`, f32): prior preservation's weights.
    pub fn with_sample_weights(mut self, weights: &Tensor) -> Result<Self> {
        self.loss_weight = (&self.loss_weight * weights)?;
        Ok(self)
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

/// Standard-normal noise of `shape` (`[.., C, H, W]`), then, with `--noise-offset`, a normal
/// value per channel (per sample and channel) times `noise_offset` added to it, drawn after it.
fn offset_noise(
    rng: &mut Rng,
    shape: &[usize],
    noise_offset: f64,
    device: &Device,
) -> Result<Tensor> {
    let noise = rng.normal_tensor(shape, device)?;
    if noise_offset <= 0.0 {
        return Ok(noise);
    }
    let mut per_channel = shape.to_vec();
    let n = per_channel.len();
    per_channel[n - 2..].fill(1);
    let offset = rng.normal_tensor(per_channel, device)?;
    Ok(noise.broadcast_add(&(offset * noise_offset)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora_core::models::config::SchedulerConfig;

    /// Prior preservation's weights [2, 2, 2w, 2w] over a batch of two training and two class
    /// samples give diffusers' loss: the training samples' mean MSE plus w times the class
    /// samples', each computed here on its own half.
    #[test]
    fn sample_weights_give_the_prior_preservation_loss() -> Result<()> {
        let dev = Device::Cpu;
        let schedule = NoiseSchedule::new(&SchedulerConfig::parse(
            r#"{"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}"#,
        )?);
        let mut rng = Rng::new(3);
        let latents = rng.normal_tensor((4, 2, 3, 3), &dev)?;
        let prediction = rng.normal_tensor((4, 2, 3, 3), &dev)?;
        let w = 0.7f32;
        let weights = Tensor::new(&[2.0f32, 2.0, 2.0 * w, 2.0 * w], &dev)?;
        let batch = DenoisingBatch::draw(&schedule, None, 0.0, &latents, &mut Rng::new(5))?;
        let weighted = batch.with_sample_weights(&weights)?.loss(&prediction)?;
        let half = |start: usize| -> Result<f32> {
            let batch = DenoisingBatch::draw(&schedule, None, 0.0, &latents, &mut Rng::new(5))?;
            let squared = (prediction.narrow(0, start, 2)? - batch.target.narrow(0, start, 2)?)?;
            Ok(squared.sqr()?.mean_all()?.to_scalar::<f32>()?)
        };
        let expected = half(0)? + w * half(2)?;
        let got = weighted.to_scalar::<f32>()?;
        assert!(expected.is_finite() && expected > 0.0);
        assert!(
            (got - expected).abs() <= 1e-6 * expected,
            "{got} vs {expected}"
        );
        Ok(())
    }
}
