//! Euler samplers of the k-diffusion family (Karras et al. 2022): the probability-flow ODE in
//! σ-space, x_{σ'} = x_σ + (σ' − σ)·(x_σ − x̂₀)/σ, where the UNet sees x_σ / √(σ² + 1).
//! The ancestral variant steps down to σ_down and adds fresh noise of size σ_up.

use anyhow::Result;
use candle_core::Tensor;
use lora_core::models::config::{PredictionType, SchedulerConfig, TimestepSpacing};

use super::{discrete_timesteps, linspace, require_noise, sigmas_of, trailing, Scheduler};

/// The schedule both Euler variants share: timesteps, their σ, and a final σ = 0.
struct SigmaSchedule {
    prediction: PredictionType,
    timesteps: Vec<f64>,
    /// One per timestep, then 0.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
}

impl SigmaSchedule {
    fn new(config: &SchedulerConfig, steps: usize) -> Self {
        let train = config.num_train_timesteps;
        let timesteps: Vec<f64> = match config.timestep_spacing {
            TimestepSpacing::Leading => discrete_timesteps(config, steps),
            // Fractional and unrounded: diffusers computes these in f32.
            TimestepSpacing::Linspace => linspace(0.0, (train - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| f64::from(t as f32))
                .collect(),
            TimestepSpacing::Trailing => trailing(train, steps),
        };
        let sigmas = sigmas_of(config, &timesteps);
        let max_sigma = sigmas.iter().copied().fold(0.0, f64::max);
        let init_noise_sigma = match config.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Self {
            prediction: config.prediction_type,
            timesteps,
            sigmas,
            init_noise_sigma,
        }
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        let sigma = self.sigmas[step];
        Ok((sample / (sigma * sigma + 1.0).sqrt())?)
    }

    /// x₀ + σ·ε: the k-diffusion forward process (unscaled latents).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        Ok((original + (noise * self.sigmas[step])?)?)
    }

    /// x̂₀ from the model output at step `step`.
    fn predicted_original(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        step: usize,
    ) -> Result<Tensor> {
        let sigma = self.sigmas[step];
        Ok(match self.prediction {
            PredictionType::Epsilon => (sample - (model_output * sigma)?)?,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                ((model_output * (-sigma / s2.sqrt()))? + (sample / s2)?)?
            }
            PredictionType::Sample => model_output.clone(),
        })
    }

    /// The Euler move from σ_step to `sigma_to` along the ODE direction (x − x̂₀)/σ.
    fn euler_move(
        &self,
        sample: &Tensor,
        x0: &Tensor,
        step: usize,
        sigma_to: f64,
    ) -> Result<Tensor> {
        let sigma = self.sigmas[step];
        let derivative = ((sample - x0)? / sigma)?;
        Ok((sample + (derivative * (sigma_to - sigma))?)?)
    }
}

/// `EulerDiscreteScheduler` (without churn) or, with `ancestral`,
/// `EulerAncestralDiscreteScheduler`: the same σ schedule, the ancestral step moving to a lower
/// σ and adding fresh noise.
pub struct Euler {
    schedule: SigmaSchedule,
    ancestral: bool,
}

impl Euler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Self {
        Self {
            schedule: SigmaSchedule::new(config, steps),
            ancestral: false,
        }
    }

    pub fn ancestral(config: &SchedulerConfig, steps: usize) -> Self {
        Self {
            schedule: SigmaSchedule::new(config, steps),
            ancestral: true,
        }
    }

    /// σ per step, then the final 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.schedule.sigmas
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor> {
        self.schedule.scale_model_input(sample, step)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        self.schedule.add_noise(original, noise, step)
    }

    fn is_stochastic(&self) -> bool {
        self.ancestral
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let s = &self.schedule;
        let x0 = s.predicted_original(model_output, sample, step)?;
        if !self.ancestral {
            return s.euler_move(sample, &x0, step, s.sigmas[step + 1]);
        }
        let noise = require_noise(noise, sample, "euler-a")?;
        let (from, to) = (s.sigmas[step], s.sigmas[step + 1]);
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let moved = s.euler_move(sample, &x0, step, sigma_down)?;
        Ok((moved + (noise * sigma_up)?)?)
    }
}
