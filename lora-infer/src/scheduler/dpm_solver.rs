//! DPM-Solver++(2M) (Lu et al. 2022), multistep, midpoint form, in diffusers'
//! `DPMSolverMultistepScheduler` defaults: data prediction, second order from the second step
//! on, first order on the first and the last step (the last goes to σ = 0).
//!
//! With α_t = 1/√(σ² + 1), σ_t = σ·α_t and λ = ln α_t − ln σ_t = −ln σ, one step from s to t is
//! x_t = (σ_t/σ_s)·x_s − α_t·(e^{−h} − 1)·(D₀ + ½·D₁), h = λ_t − λ_s, where D₀ is the current
//! x̂₀ and D₁ = (D₀ − x̂₀_prev)·h/h_prev (zero for the first-order steps).

use anyhow::Result;
use candle_core::Tensor;
use lora_core::models::config::{PredictionType, SchedulerConfig, TimestepSpacing};

use super::{linspace, predicted_original, sigmas_of, trailing, Scheduler};

pub struct DpmSolverPlusPlus2M {
    prediction: PredictionType,
    timesteps: Vec<f64>,
    /// One per timestep, then 0.
    sigmas: Vec<f64>,
    /// x̂₀ of the previous step, for the second-order correction.
    previous_x0: Option<Tensor>,
}

impl DpmSolverPlusPlus2M {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Self {
        let train = config.num_train_timesteps;
        // This scheduler spaces n + 1 points and drops the last (t = 0) for linspace/leading.
        let timesteps: Vec<f64> = match config.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut t: Vec<f64> = linspace(0.0, (train - 1) as f64, steps + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .rev()
                    .collect();
                t.pop();
                t
            }
            TimestepSpacing::Leading => {
                let ratio = train / (steps + 1);
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => trailing(train, steps),
        };
        let sigmas = sigmas_of(config, &timesteps);
        Self {
            prediction: config.prediction_type,
            timesteps,
            sigmas,
            previous_x0: None,
        }
    }

    /// σ per step, then the final 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// (α_t, σ_t) of the variance-preserving process at noise level σ.
    fn alpha_sigma(sigma: f64) -> (f64, f64) {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha, sigma * alpha)
    }
}

impl Scheduler for DpmSolverPlusPlus2M {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor> {
        let (alpha, sigma) = Self::alpha_sigma(self.sigmas[step]);
        Ok(((original * alpha)? + (noise * sigma)?)?)
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
        let (alpha_s, sigma_s) = Self::alpha_sigma(self.sigmas[step]);
        let x0 = predicted_original(self.prediction, model_output, sample, (alpha_s, sigma_s))?;
        let previous = self.previous_x0.replace(x0.clone());
        let sigma_next = self.sigmas[step + 1];
        if sigma_next == 0.0 {
            // λ_t = ∞: the first-order update reduces to x̂₀ exactly.
            return Ok(x0);
        }
        let (alpha_t, sigma_t) = Self::alpha_sigma(sigma_next);
        let lambda = |alpha: f64, sigma: f64| alpha.ln() - sigma.ln();
        let lambda_s = lambda(alpha_s, sigma_s);
        let h = lambda(alpha_t, sigma_t) - lambda_s;
        let data_coeff = -alpha_t * ((-h).exp() - 1.0);
        let direction = match previous {
            Some(prev_x0) if step > 0 => {
                let (alpha_p, sigma_p) = Self::alpha_sigma(self.sigmas[step - 1]);
                let r = (lambda_s - lambda(alpha_p, sigma_p)) / h;
                // D₀ + ½·D₁ with D₁ = (D₀ − x̂₀_prev)/r.
                ((&x0 * (1.0 + 0.5 / r))? - (prev_x0 * (0.5 / r))?)?
            }
            _ => x0,
        };
        Ok(((sample * (sigma_t / sigma_s))? + (direction * data_coeff)?)?)
    }
}
