//! The two schedules of a run: the diffusion noise schedule (from the model's scheduler config)
//! and the learning-rate schedule.

use anyhow::Result;
use candle_core::{Device, Tensor};
use lora_core::models::config::{PredictionType, SchedulerConfig};

use crate::config::LrScheduler;

/// ᾱ per training timestep and the per-sample coefficients derived from it.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f64>,
    pub prediction: PredictionType,
}

/// Per-sample factors for one batch, each `[B, 1, 1, 1]` f32 (broadcast over C, H, W) except
/// `loss_weight`, which is `[B]`.
pub struct NoiseCoefficients {
    /// √ᾱ_t
    pub signal: Tensor,
    /// √(1 − ᾱ_t)
    pub noise: Tensor,
    /// The min-SNR-γ weight of each sample's MSE (all ones without γ).
    pub loss_weight: Tensor,
}

impl NoiseSchedule {
    pub fn new(config: &SchedulerConfig) -> Self {
        Self {
            alphas_cumprod: config.alphas_cumprod(),
            prediction: config.prediction_type,
        }
    }

    pub fn num_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Signal-to-noise ratio ᾱ/(1 − ᾱ) at `t`.
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }

    /// Min-SNR-γ weight (Hang et al. 2023) at `t`: min(snr, γ)/snr for ε targets,
    /// min(snr, γ)/(snr + 1) for v targets, min(snr, γ) for x₀ targets (where the loss already
    /// carries a factor snr relative to ε). Zero-SNR steps (ᾱ = 0) get the limit of each form.
    pub fn min_snr_weight(&self, t: usize, gamma: f64) -> f64 {
        let snr = self.snr(t);
        let clipped = snr.min(gamma);
        match self.prediction {
            PredictionType::Epsilon if snr == 0.0 => 0.0,
            PredictionType::Epsilon => clipped / snr,
            PredictionType::VPrediction => clipped / (snr + 1.0),
            PredictionType::Sample => clipped,
        }
    }

    pub fn coefficients(
        &self,
        timesteps: &[usize],
        min_snr_gamma: Option<f64>,
        device: &Device,
    ) -> Result<NoiseCoefficients> {
        let b = timesteps.len();
        let column = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = timesteps
                .iter()
                .map(|&t| f(self.alphas_cumprod[t]) as f32)
                .collect();
            Ok(Tensor::from_vec(v, (b, 1, 1, 1), device)?)
        };
        let weights: Vec<f32> = timesteps
            .iter()
            .map(|&t| min_snr_gamma.map_or(1.0, |g| self.min_snr_weight(t, g)) as f32)
            .collect();
        Ok(NoiseCoefficients {
            signal: column(&|a| a.sqrt())?,
            noise: column(&|a| (1.0 - a).sqrt())?,
            loss_weight: Tensor::from_vec(weights, b, device)?,
        })
    }
}

/// Learning rate for optimizer step `step` (0-based) of `total`: linear warm-up from 0 over
/// `warmup` steps, then the schedule from `peak` (to 0 at the end for cosine and linear).
pub fn learning_rate(
    scheduler: LrScheduler,
    peak: f64,
    warmup: usize,
    step: usize,
    total: usize,
) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay_steps).min(1.0);
    match scheduler {
        LrScheduler::Constant => peak,
        LrScheduler::Linear => peak * (1.0 - progress),
        LrScheduler::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(prediction: &str) -> NoiseSchedule {
        let json = format!(
            r#"{{"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "prediction_type": "{prediction}"}}"#
        );
        NoiseSchedule::new(&SchedulerConfig::parse(&json).unwrap())
    }

    #[test]
    fn min_snr_weights_follow_the_paper() {
        let eps = schedule("epsilon");
        // Early timesteps have SNR ≫ γ: weight γ/snr; late ones SNR < γ: weight 1.
        assert!((eps.min_snr_weight(0, 5.0) - 5.0 / eps.snr(0)).abs() < 1e-12);
        assert_eq!(eps.min_snr_weight(999, 5.0), 1.0);
        let v = schedule("v_prediction");
        let snr = v.snr(999);
        assert!((v.min_snr_weight(999, 5.0) - snr / (snr + 1.0)).abs() < 1e-12);
    }

    #[test]
    fn coefficients_square_to_one() {
        let s = schedule("epsilon");
        let c = s.coefficients(&[0, 500, 999], None, &Device::Cpu).unwrap();
        let sum = (c.signal.sqr().unwrap() + c.noise.sqr().unwrap()).unwrap();
        for x in sum.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            assert!((x - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn lr_schedules_warm_up_and_decay() {
        use LrScheduler::*;
        assert_eq!(learning_rate(Constant, 1.0, 4, 0, 10), 0.25);
        assert_eq!(learning_rate(Constant, 1.0, 4, 3, 10), 1.0);
        assert_eq!(learning_rate(Constant, 1.0, 0, 9, 10), 1.0);
        assert_eq!(learning_rate(Linear, 1.0, 0, 0, 10), 1.0);
        assert!((learning_rate(Linear, 1.0, 0, 5, 10) - 0.5).abs() < 1e-12);
        assert!((learning_rate(Cosine, 1.0, 0, 5, 10) - 0.5).abs() < 1e-12);
        assert!(learning_rate(Cosine, 1.0, 2, 9, 10) < 0.05);
    }
}
