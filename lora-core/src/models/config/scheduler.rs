//! The noise schedule from a diffusers `scheduler/scheduler_config.json`.
//!
//! Only the keys that define the training noise schedule and the prediction target are modelled.
//! Sampler-specific keys (e.g. PNDM's `skip_prk_steps`) are tolerated because they do not change
//! `alphas_cumprod`; keys whose non-default value would change the math we implement (trained
//! betas, thresholding, learned variance, Karras sigmas) are rejected rather than ignored.
//! Keys missing from older files take diffusers' defaults, which is what diffusers itself does.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How `beta_start..beta_end` is spread over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `betas = linspace(beta_start, beta_end, n)`.
    Linear,
    /// `betas = linspace(√beta_start, √beta_end, n)²` (Stable Diffusion 1.x/2.x).
    ScaledLinear,
    /// Nichol & Dhariwal's cosine schedule, each beta capped at 0.999; ignores beta_start/end.
    SquaredCosCapV2,
}

/// What the model is trained to predict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

impl PredictionType {
    /// The name diffusers' configs give it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::VPrediction => "v_prediction",
            Self::Sample => "sample",
        }
    }
}

impl fmt::Display for PredictionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The names of scheduler configs, which `--prediction-type` takes too.
impl FromStr for PredictionType {
    type Err = anyhow::Error;

    fn from_str(name: &str) -> Result<Self> {
        match name {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            "sample" => Ok(Self::Sample),
            other => {
                bail!("unknown prediction_type `{other}`: expected epsilon, v_prediction or sample")
            }
        }
    }
}

impl Serialize for PredictionType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PredictionType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
}

/// How inference timesteps are picked from the training range (Table 2 of "Common Diffusion
/// Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// `_class_name`, e.g. `PNDMScheduler`; informational (the schedule does not depend on it).
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    /// Resolved per scheduler class when the file does not say (diffusers' per-class default).
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
    /// DDIM: whether the step after the last uses ᾱ = 1 rather than ᾱ₀.
    pub set_alpha_to_one: bool,
    /// DDPM/DDIM: whether the predicted x₀ is clamped to ±`clip_sample_range`.
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// Rescale the schedule so the last timestep has zero SNR (Lin et al. 2023).
    pub rescale_betas_zero_snr: bool,
}

/// The file as written, before validation; absent keys are `None`, unknown keys are dropped.
#[derive(Deserialize)]
struct RawSchedulerConfig {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    num_train_timesteps: Option<usize>,
    beta_start: Option<f64>,
    beta_end: Option<f64>,
    beta_schedule: Option<String>,
    trained_betas: Option<serde_json::Value>,
    prediction_type: Option<String>,
    timestep_spacing: Option<String>,
    steps_offset: Option<usize>,
    set_alpha_to_one: Option<bool>,
    clip_sample: Option<bool>,
    clip_sample_range: Option<f64>,
    rescale_betas_zero_snr: Option<bool>,
    thresholding: Option<bool>,
    variance_type: Option<String>,
    use_karras_sigmas: Option<bool>,
    use_exponential_sigmas: Option<bool>,
    use_beta_sigmas: Option<bool>,
}

/// Cap on each beta of the cosine schedule, as in the paper, to avoid a singular last step.
const COSINE_MAX_BETA: f64 = 0.999;

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid scheduler config {}", path.display()))
    }

    pub fn parse(json: &str) -> Result<Self> {
        let raw: RawSchedulerConfig =
            serde_json::from_str(json).context("malformed scheduler_config.json")?;
        if let Some(betas) = raw.trained_betas.as_ref().filter(|v| !v.is_null()) {
            let kind = if betas.is_array() {
                "a list"
            } else {
                "a non-null value"
            };
            bail!("trained_betas is {kind}; only computed schedules are supported (expected null)");
        }
        for (key, value) in [
            ("thresholding", raw.thresholding),
            ("use_karras_sigmas", raw.use_karras_sigmas),
            ("use_exponential_sigmas", raw.use_exponential_sigmas),
            ("use_beta_sigmas", raw.use_beta_sigmas),
        ] {
            ensure!(
                value != Some(true),
                "{key} = true is not supported (expected false or absent)"
            );
        }
        if let Some(v) = raw.variance_type.as_deref() {
            // The learned variants need a UNet that outputs twice the latent channels.
            ensure!(
                matches!(v, "fixed_small" | "fixed_small_log" | "fixed_large" | "fixed_large_log"),
                "unsupported variance_type `{v}`: expected fixed_small, fixed_small_log, fixed_large or fixed_large_log"
            );
        }

        let num_train_timesteps = raw
            .num_train_timesteps
            .context("missing num_train_timesteps")?;
        ensure!(
            num_train_timesteps >= 2,
            "num_train_timesteps = {num_train_timesteps}: expected at least 2"
        );
        let beta_schedule = parse_beta_schedule(
            raw.beta_schedule
                .as_deref()
                .context("missing beta_schedule")?,
        )?;
        let beta_start = raw.beta_start.context("missing beta_start")?;
        let beta_end = raw.beta_end.context("missing beta_end")?;
        if beta_schedule != BetaSchedule::SquaredCosCapV2 {
            ensure!(
                0.0 < beta_start && beta_start <= beta_end && beta_end < 1.0,
                "beta_start = {beta_start}, beta_end = {beta_end}: expected 0 < beta_start <= beta_end < 1"
            );
        }
        let prediction_type = match raw.prediction_type.as_deref() {
            None => PredictionType::Epsilon,
            Some(name) => name.parse()?,
        };
        let timestep_spacing = match raw.timestep_spacing.as_deref() {
            None => default_timestep_spacing(raw.class_name.as_deref()),
            Some("leading") => TimestepSpacing::Leading,
            Some("trailing") => TimestepSpacing::Trailing,
            Some("linspace") => TimestepSpacing::Linspace,
            Some(other) => {
                bail!("unknown timestep_spacing `{other}`: expected leading, trailing or linspace")
            }
        };
        let clip_sample_range = raw.clip_sample_range.unwrap_or(1.0);
        ensure!(
            clip_sample_range > 0.0,
            "clip_sample_range = {clip_sample_range}: expected a positive number"
        );

        Ok(Self {
            class_name: raw.class_name,
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            prediction_type,
            timestep_spacing,
            steps_offset: raw.steps_offset.unwrap_or(0),
            set_alpha_to_one: raw.set_alpha_to_one.unwrap_or(true),
            clip_sample: raw.clip_sample.unwrap_or(true),
            clip_sample_range,
            rescale_betas_zero_snr: raw.rescale_betas_zero_snr.unwrap_or(false),
        })
    }

    /// The per-timestep betas, before any zero-SNR rescaling.
    fn betas(&self) -> Vec<f64> {
        let n = self.num_train_timesteps;
        // Evenly spaced from `a` to `b` inclusive; n >= 2 is checked at parse time.
        let linspace =
            |a: f64, b: f64| (0..n).map(move |i| a + (b - a) * i as f64 / (n - 1) as f64);
        match self.beta_schedule {
            BetaSchedule::Linear => linspace(self.beta_start, self.beta_end).collect(),
            BetaSchedule::ScaledLinear => linspace(self.beta_start.sqrt(), self.beta_end.sqrt())
                .map(|s| s * s)
                .collect(),
            BetaSchedule::SquaredCosCapV2 => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(COSINE_MAX_BETA)
                    })
                    .collect()
            }
        }
    }

    /// ᾱ_t = ∏_{s≤t} (1 − β_s) for t in 0..num_train_timesteps, computed in f64 (diffusers
    /// accumulates in f32; for SD's schedule the two differ by < 4e-7). With
    /// `rescale_betas_zero_snr` the square roots are shifted and scaled so ᾱ at the last step is
    /// exactly 0 while the first is unchanged.
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let mut product = 1.0;
        let cumprod: Vec<f64> = self
            .betas()
            .into_iter()
            .map(|beta| {
                product *= 1.0 - beta;
                product
            })
            .collect();
        if !self.rescale_betas_zero_snr {
            return cumprod;
        }
        let sqrt: Vec<f64> = cumprod.iter().map(|a| a.sqrt()).collect();
        let (first, last) = (sqrt[0], sqrt[sqrt.len() - 1]);
        let scale = first / (first - last);
        sqrt.iter().map(|s| ((s - last) * scale).powi(2)).collect()
    }
}

fn parse_beta_schedule(name: &str) -> Result<BetaSchedule> {
    match name {
        "linear" => Ok(BetaSchedule::Linear),
        "scaled_linear" => Ok(BetaSchedule::ScaledLinear),
        "squaredcos_cap_v2" => Ok(BetaSchedule::SquaredCosCapV2),
        other => bail!(
            "unknown beta_schedule `{other}`: expected linear, scaled_linear or squaredcos_cap_v2"
        ),
    }
}

/// diffusers' default `timestep_spacing` per scheduler class: the k-diffusion family (Euler,
/// Heun, LMS, DPM-Solver, UniPC, DEIS, KDPM2) defaults to `linspace`, DDPM/DDIM/PNDM and the rest
/// to `leading`.
fn default_timestep_spacing(class_name: Option<&str>) -> TimestepSpacing {
    const LINSPACE_PREFIXES: [&str; 7] = [
        "Euler",
        "Heun",
        "LMS",
        "DPMSolver",
        "UniPC",
        "DEIS",
        "KDPM2",
    ];
    match class_name {
        Some(c) if LINSPACE_PREFIXES.iter().any(|p| c.starts_with(p)) => TimestepSpacing::Linspace,
        _ => TimestepSpacing::Leading,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stable Diffusion 1.5's scheduler_config.json, verbatim.
    const SD15: &str = r#"{
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
        "steps_offset": 1, "trained_betas": null, "clip_sample": false
    }"#;

    #[test]
    fn parses_sd15_with_defaults_for_absent_keys() {
        let c = SchedulerConfig::parse(SD15).unwrap();
        assert_eq!(c.class_name.as_deref(), Some("PNDMScheduler"));
        assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
        assert_eq!(c.prediction_type, PredictionType::Epsilon);
        assert_eq!(c.timestep_spacing, TimestepSpacing::Leading);
        assert_eq!(
            (c.steps_offset, c.set_alpha_to_one, c.clip_sample),
            (1, false, false)
        );
    }

    #[test]
    fn scaled_linear_matches_reference_values() {
        let a = SchedulerConfig::parse(SD15).unwrap().alphas_cumprod();
        assert_eq!(a.len(), 1000);
        // ᾱ₀ = 1 − 0.00085 exactly; the others are diffusers' float32 values (to f32 precision).
        assert!((a[0] - 0.99915).abs() < 1e-12);
        let beta1 = (0.00085f64.sqrt() + (0.012f64.sqrt() - 0.00085f64.sqrt()) / 999.0).powi(2);
        assert!((a[1] - 0.99915 * (1.0 - beta1)).abs() < 1e-12);
        assert!((a[999] - 0.004660).abs() < 1e-5, "{}", a[999]);
        assert!((a[499] - 0.277_670).abs() < 1e-5, "{}", a[499]);
        assert!(a.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn linear_and_cosine_schedules() {
        let linear = SchedulerConfig::parse(
            r#"{"num_train_timesteps": 3, "beta_start": 0.1, "beta_end": 0.3, "beta_schedule": "linear"}"#,
        )
        .unwrap();
        let expected = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7];
        for (a, e) in linear.alphas_cumprod().iter().zip(expected) {
            assert!((a - e).abs() < 1e-15);
        }

        let cosine = SchedulerConfig::parse(
            r#"{"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                "beta_schedule": "squaredcos_cap_v2"}"#,
        )
        .unwrap();
        let a = cosine.alphas_cumprod();
        // Away from the cap, ᾱ_t telescopes to alpha_bar((t+1)/n) / alpha_bar(0).
        let f = |t: f64| {
            ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                .cos()
                .powi(2)
        };
        for t in [0usize, 10, 500, 900] {
            let expected = f((t + 1) as f64 / 1000.0) / f(0.0);
            assert!(
                (a[t] - expected).abs() < 1e-12,
                "t={t}: {} vs {expected}",
                a[t]
            );
        }
        // The last beta is capped at 0.999, not 1 − 0 = 1.
        assert!(a[999] > 0.0 && (a[999] / a[998] - 0.001).abs() < 1e-12);
    }

    #[test]
    fn zero_snr_rescale_keeps_first_and_zeroes_last() {
        let json = SD15.replace("\"clip_sample\": false", "\"rescale_betas_zero_snr\": true");
        let c = SchedulerConfig::parse(&json).unwrap();
        let plain = SchedulerConfig {
            rescale_betas_zero_snr: false,
            ..c.clone()
        }
        .alphas_cumprod();
        let rescaled = c.alphas_cumprod();
        assert!((rescaled[0] - plain[0]).abs() < 1e-15);
        assert_eq!(rescaled[999], 0.0);
        assert!(rescaled.windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn class_default_spacing_and_explicit_values() {
        let euler = SD15.replace("PNDMScheduler", "EulerDiscreteScheduler");
        assert_eq!(
            SchedulerConfig::parse(&euler).unwrap().timestep_spacing,
            TimestepSpacing::Linspace
        );
        let sd2 = SD15.replace(
            "\"steps_offset\": 1",
            "\"steps_offset\": 1, \"prediction_type\": \"v_prediction\", \"timestep_spacing\": \"trailing\"",
        );
        let c = SchedulerConfig::parse(&sd2).unwrap();
        assert_eq!(
            (c.prediction_type, c.timestep_spacing),
            (PredictionType::VPrediction, TimestepSpacing::Trailing)
        );
    }

    #[test]
    fn rejects_unsupported_values_with_the_key_in_the_message() {
        let cases = [
            (
                "\"scaled_linear\"",
                "\"sigmoid\"",
                "unknown beta_schedule `sigmoid`",
            ),
            (
                "\"trained_betas\": null",
                "\"trained_betas\": [0.1, 0.2]",
                "trained_betas is a list",
            ),
            (
                "\"clip_sample\": false",
                "\"prediction_type\": \"flow\"",
                "unknown prediction_type `flow`",
            ),
            (
                "\"clip_sample\": false",
                "\"thresholding\": true",
                "thresholding = true",
            ),
            (
                "\"clip_sample\": false",
                "\"variance_type\": \"learned_range\"",
                "variance_type `learned_range`",
            ),
            (
                "\"clip_sample\": false",
                "\"timestep_spacing\": \"random\"",
                "timestep_spacing `random`",
            ),
            (
                "\"beta_end\": 0.012",
                "\"beta_end\": 0.0001",
                "expected 0 < beta_start <= beta_end < 1",
            ),
            (
                "\"num_train_timesteps\": 1000",
                "\"num_train_timesteps\": \"many\"",
                "malformed",
            ),
            (
                "\"num_train_timesteps\": 1000,",
                "",
                "missing num_train_timesteps",
            ),
        ];
        for (from, to, expected) in cases {
            let json = SD15.replace(from, to);
            assert_ne!(json, SD15, "test case `{from}` did not apply");
            let err = format!("{:#}", SchedulerConfig::parse(&json).unwrap_err());
            assert!(err.contains(expected), "`{to}`: {err}");
        }
    }
}
