//! DDIM with eta = 0 (Song et al. 2021): x_{t−Δ} = √ᾱ_{t−Δ}·x̂₀ + √(1 − ᾱ_{t−Δ})·ε̂.

use anyhow::Result;
use candle_core::Tensor;
use lora_core::models::config::{PredictionType, SchedulerConfig};

use super::{
    alpha_sigma_of, clip_original, discrete_timesteps, noise_to_alpha_prod, predicted_original,
    timestep_alpha, Scheduler,
};

pub struct Ddim {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<f64>,
    /// Δ between consecutive steps; diffusers uses `train // steps` whatever the spacing.
    step_ratio: usize,
    /// ᾱ used after the last step: 1 with `set_alpha_to_one`, else ᾱ₀.
    final_alpha_cumprod: f64,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Self {
        let alphas_cumprod = config.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Self {
            config: config.clone(),
            timesteps: discrete_timesteps(config, steps),
            step_ratio: config.num_train_timesteps / steps,
            alphas_cumprod,
            final_alpha_cumprod,
        }
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        let (_, alpha_prod) = timestep_alpha(&self.timesteps, &self.alphas_cumprod, step)?;
        noise_to_alpha_prod(original, noise, alpha_prod)
    }

    fn is_stochastic(&self) -> bool {
        false
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (t, alpha_prod) = timestep_alpha(&self.timesteps, &self.alphas_cumprod, step)?;
        let alpha_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        let prediction = self.config.prediction_type;
        let x0 = predicted_original(prediction, model_output, sample, alpha_sigma_of(alpha_prod))?;
        // ε̂ is derived before clipping x̂₀, as diffusers does (use_clipped_model_output = False).
        let eps = match prediction {
            PredictionType::Epsilon => model_output.clone(),
            PredictionType::VPrediction => {
                ((model_output * alpha_prod.sqrt())? + (sample * (1.0 - alpha_prod).sqrt())?)?
            }
            PredictionType::Sample => {
                ((sample - (&x0 * alpha_prod.sqrt())?)? / (1.0 - alpha_prod).sqrt())?
            }
        };
        let x0 = clip_original(&self.config, x0)?;
        Ok(((x0 * alpha_prev.sqrt())? + (eps * (1.0 - alpha_prev).sqrt())?)?)
    }
}
