//! DDPM ancestral sampling (Ho et al. 2020) over a subset of timesteps, with diffusers'
//! `fixed_small` variance β̃_t = (1 − ᾱ_prev)/(1 − ᾱ_t)·β_t.
//!
//! lora-core's `SchedulerConfig` does not keep `variance_type`; every Stable Diffusion scheduler
//! config leaves it at the default, `fixed_small`, which is what this implements.

use anyhow::Result;
use candle_core::Tensor;
use lora_core::models::config::SchedulerConfig;

use super::{
    alpha_sigma_of, clip_original, discrete_timesteps, noise_to_alpha_prod, predicted_original,
    require_noise, timestep_alpha, Scheduler,
};

/// diffusers clamps the variance to this before the square root.
const MIN_VARIANCE: f64 = 1e-20;

pub struct Ddpm {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
}

impl Ddpm {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Self {
        Self {
            config: config.clone(),
            alphas_cumprod: config.alphas_cumprod(),
            timesteps: discrete_timesteps(config, steps),
        }
    }
}

impl Scheduler for Ddpm {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        let (_, alpha_prod) = timestep_alpha(&self.timesteps, &self.alphas_cumprod, step)?;
        noise_to_alpha_prod(original, noise, alpha_prod)
    }

    fn is_stochastic(&self) -> bool {
        true
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (t, alpha_prod) = timestep_alpha(&self.timesteps, &self.alphas_cumprod, step)?;
        // The previous timestep is the next one in the list; after the last, ᾱ = 1.
        let alpha_prev = match self.timesteps.get(step + 1) {
            Some(&prev) => self.alphas_cumprod[prev as usize],
            None => 1.0,
        };
        let (beta_prod, beta_prod_prev) = (1.0 - alpha_prod, 1.0 - alpha_prev);
        let current_alpha = alpha_prod / alpha_prev;
        let current_beta = 1.0 - current_alpha;

        let x0 = predicted_original(
            self.config.prediction_type,
            model_output,
            sample,
            alpha_sigma_of(alpha_prod),
        )?;
        let x0 = clip_original(&self.config, x0)?;
        let x0_coeff = alpha_prev.sqrt() * current_beta / beta_prod;
        let sample_coeff = current_alpha.sqrt() * beta_prod_prev / beta_prod;
        let mean = ((x0 * x0_coeff)? + (sample * sample_coeff)?)?;
        if t == 0 {
            return Ok(mean);
        }
        let noise = require_noise(noise, sample, "ddpm")?;
        let variance = (beta_prod_prev / beta_prod * current_beta).max(MIN_VARIANCE);
        Ok((mean + (noise * variance.sqrt())?)?)
    }
}
