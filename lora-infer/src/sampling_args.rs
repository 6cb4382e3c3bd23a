//! The sampling options every command that generates shares (`lora-infer`, `lora-eval
//! compare`), as one clap argument group so each flag is spelled and documented once.

use clap::Args;
use lora_core::source::ModelFolder;

use crate::{GenerateOptions, SchedulerKind};

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (≤ 1 turns guidance off) [default: 5 for SDXL, 7.5
    /// otherwise, as diffusers' pipelines].
    #[arg(long)]
    pub guidance: Option<f64>,
    /// ddim, euler, euler-a, dpm++2m or ddpm, over the model's noise schedule [default: euler
    /// for SDXL, as its pipeline ships, ddim otherwise].
    #[arg(long)]
    pub scheduler: Option<SchedulerKind>,
    /// Image width in pixels (default: the model's sample size × the VAE factor).
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
}

impl SamplingArgs {
    /// The generation options these flags give for `model`, defaults filled in for its kind;
    /// the rest of the options at their defaults.
    pub fn options_for(&self, model: &ModelFolder) -> GenerateOptions {
        let defaults = GenerateOptions::for_model(model.is_sdxl());
        GenerateOptions {
            steps: self.steps,
            guidance: self.guidance.unwrap_or(defaults.guidance),
            scheduler: self.scheduler.unwrap_or(defaults.scheduler),
            width: self.width,
            height: self.height,
            ..defaults
        }
    }
}
