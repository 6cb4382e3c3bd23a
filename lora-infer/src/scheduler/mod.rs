//! Samplers: the five diffusers schedulers users know, each reproducing its diffusers
//! counterpart's `set_timesteps` / `scale_model_input` / `step` for the model's noise schedule
//! ([`SchedulerConfig`], prediction type honoured).
//!
//! | name | diffusers class | notes |
//! |---|---|---|
//! | `ddim` | `DDIMScheduler` | eta = 0 (deterministic), as `StableDiffusionPipeline` defaults |
//! | `euler` | `EulerDiscreteScheduler` | no churn, as the pipeline calls it |
//! | `euler-a` | `EulerAncestralDiscreteScheduler` | stochastic |
//! | `dpm++2m` | `DPMSolverMultistepScheduler` | `dpmsolver++`, order 2, midpoint, final sigma 0 |
//! | `ddpm` | `DDPMScheduler` | stochastic, `fixed_small` variance |
//!
//! Steps are addressed by index (0..steps) rather than by timestep value, so repeated timesteps
//! cannot confuse the state. Coefficients are computed in f64 from the f64 schedule; diffusers
//! uses f32 throughout, which differs by a few ulps of f32.

mod ddim;
mod ddpm;
mod dpm_solver;
mod euler;

use std::fmt;
use std::str::FromStr;

use anyhow::{ensure, Result};
use candle_core::Tensor;
use lora_core::models::config::{PredictionType, SchedulerConfig, TimestepSpacing};

pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub use dpm_solver::DpmSolverPlusPlus2M;
pub use euler::Euler;

/// One sampling run's schedule and update rule. Build a fresh one per run: multistep samplers
/// keep the previous model outputs.
pub trait Scheduler {
    /// The timestep given to the UNet at each step (fractional for Euler with linspace spacing).
    fn timesteps(&self) -> &[f64];

    /// The standard deviation of the initial noise: the factor diffusers applies to the initial
    /// latents, whether sampled or passed in (1 for the DDPM family, which works in ᾱ terms).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The UNet input at step `step` for the current `sample` (identity for the DDPM family).
    fn scale_model_input(&self, sample: &Tensor, _step: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    /// `original` noised to the level the sampler expects before step `step` (img2img's start):
    /// diffusers' `add_noise` at `timesteps[step]` with the begin index set to `step`.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step: usize) -> Result<Tensor>;

    /// Whether [`Scheduler::step`] needs fresh standard-normal noise of the sample's shape.
    fn is_stochastic(&self) -> bool;

    /// The sample after step `step`, given the (guided) model output for `sample`. `noise` is
    /// required when [`Scheduler::is_stochastic`] is true and ignored otherwise.
    fn step(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor>;
}

/// The scheduler a user picks with `--scheduler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchedulerKind {
    #[default]
    Ddim,
    Euler,
    EulerAncestral,
    DpmPlusPlus2M,
    Ddpm,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] = [
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::DpmPlusPlus2M,
        Self::Ddpm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::DpmPlusPlus2M => "dpm++2m",
            Self::Ddpm => "ddpm",
        }
    }

    /// A scheduler for `steps` inference steps over the model's noise schedule.
    pub fn build(self, config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
        ensure!(
            (1..=config.num_train_timesteps).contains(&steps),
            "{steps} inference steps: expected 1 to the schedule's {} training timesteps",
            config.num_train_timesteps
        );
        Ok(match self {
            Self::Ddim => Box::new(Ddim::new(config, steps)),
            Self::Euler => Box::new(Euler::new(config, steps)),
            Self::EulerAncestral => Box::new(Euler::ancestral(config, steps)),
            Self::DpmPlusPlus2M => Box::new(DpmSolverPlusPlus2M::new(config, steps)),
            Self::Ddpm => Box::new(Ddpm::new(config, steps)),
        })
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown scheduler `{s}`: expected ddim, euler, euler-a, dpm++2m or ddpm"
                )
            })
    }
}

/// Integer training timesteps for `steps` inference steps, descending, as DDIM/DDPM space them.
fn discrete_timesteps(config: &SchedulerConfig, steps: usize) -> Vec<f64> {
    let train = config.num_train_timesteps;
    match config.timestep_spacing {
        TimestepSpacing::Leading => {
            let ratio = train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + config.steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Linspace => linspace(0.0, (train - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(f64::round_ties_even)
            .collect(),
        TimestepSpacing::Trailing => trailing(train, steps),
    }
}

/// `round(arange(train, 0, -train/steps)) - 1`, the `trailing` spacing of every scheduler.
/// Always `steps` values: for a few step counts (61, 103, 121… with 1000 training steps) numpy's
/// float `arange` yields one extra element, which diffusers turns into a timestep of −1.
fn trailing(train: usize, steps: usize) -> Vec<f64> {
    let ratio = train as f64 / steps as f64;
    (0..steps)
        .map(|i| (train as f64 - i as f64 * ratio).round_ties_even() - 1.0)
        .collect()
}

/// `n` evenly spaced values from `a` to `b` inclusive (numpy's `linspace`).
fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    (0..n)
        .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
        .collect()
}

/// σ_t = √((1 − ᾱ_t) / ᾱ_t) at a possibly fractional timestep, interpolated linearly between
/// the integer ones (numpy's `interp`, clamped at the ends).
fn sigma_at(alphas_cumprod: &[f64], t: f64) -> f64 {
    let sigma = |i: usize| ((1.0 - alphas_cumprod[i]) / alphas_cumprod[i]).sqrt();
    let last = alphas_cumprod.len() - 1;
    let t = t.clamp(0.0, last as f64);
    let low = t.floor() as usize;
    let frac = t - low as f64;
    if low == last || frac == 0.0 {
        return sigma(low);
    }
    sigma(low) * (1.0 - frac) + sigma(low + 1) * frac
}

/// The predicted clean sample x₀ from a model output for `sample` = α·x₀ + σ·ε: the DDPM family
/// passes (√ᾱ, √(1 − ᾱ)), DPM-Solver the (α_t, σ_t) of its noise level.
fn predicted_original(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    (alpha, sigma): (f64, f64),
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => ((sample - (model_output * sigma)?)? / alpha)?,
        PredictionType::VPrediction => ((sample * alpha)? - (model_output * sigma)?)?,
        PredictionType::Sample => model_output.clone(),
    })
}

/// (√ᾱ, √(1 − ᾱ)): the signal and noise factors of the DDPM family at ᾱ.
fn alpha_sigma_of(alpha_prod: f64) -> (f64, f64) {
    (alpha_prod.sqrt(), (1.0 - alpha_prod).sqrt())
}

/// The training timestep and its ᾱ at step `step` of a DDPM-family schedule; a step past the
/// schedule is an error, not a panic.
fn timestep_alpha(timesteps: &[f64], alphas_cumprod: &[f64], step: usize) -> Result<(usize, f64)> {
    let t = *timesteps.get(step).ok_or_else(|| {
        anyhow::anyhow!(
            "step {step} is past the schedule's {} steps",
            timesteps.len()
        )
    })? as usize;
    Ok((t, alphas_cumprod[t]))
}

/// σ at each timestep, then the final σ = 0 (the Euler and DPM-Solver schedules).
fn sigmas_of(config: &SchedulerConfig, timesteps: &[f64]) -> Vec<f64> {
    let alphas_cumprod = config.alphas_cumprod();
    let mut sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| sigma_at(&alphas_cumprod, t))
        .collect();
    sigmas.push(0.0);
    sigmas
}

/// √ᾱ·x₀ + √(1 − ᾱ)·ε, the forward process of the DDPM family.
fn noise_to_alpha_prod(original: &Tensor, noise: &Tensor, alpha_prod: f64) -> Result<Tensor> {
    Ok(((original * alpha_prod.sqrt())? + (noise * (1.0 - alpha_prod).sqrt())?)?)
}

/// x₀ clamped to ±`clip_sample_range` when the config asks for it (DDIM, DDPM).
fn clip_original(config: &SchedulerConfig, x0: Tensor) -> Result<Tensor> {
    if config.clip_sample {
        let r = config.clip_sample_range;
        Ok(x0.clamp(-r, r)?)
    } else {
        Ok(x0)
    }
}

fn require_noise<'a>(noise: Option<&'a Tensor>, sample: &Tensor, who: &str) -> Result<&'a Tensor> {
    let noise = noise.ok_or_else(|| anyhow::anyhow!("{who} is stochastic: step() needs noise"))?;
    ensure!(
        noise.dims() == sample.dims(),
        "{who}: noise has shape {:?}, the sample {:?}",
        noise.dims(),
        sample.dims()
    );
    Ok(noise)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_name_and_rejects_others() {
        for kind in SchedulerKind::ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
        }
        let err = "k-lms".parse::<SchedulerKind>().unwrap_err().to_string();
        assert!(err.contains("`k-lms`") && err.contains("dpm++2m"), "{err}");
    }

    #[test]
    fn interpolates_sigmas_between_integer_timesteps() {
        let ac = [0.9, 0.5, 0.1];
        let s = |a: f64| ((1.0 - a) / a).sqrt();
        assert_eq!(sigma_at(&ac, 1.0), s(0.5));
        assert!((sigma_at(&ac, 1.25) - (0.75 * s(0.5) + 0.25 * s(0.1))).abs() < 1e-15);
        assert_eq!(sigma_at(&ac, 2.0), s(0.1));
    }
}
