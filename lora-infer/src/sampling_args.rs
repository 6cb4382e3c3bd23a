//! The sampling options every command that generates shares (`lora-infer`, `lora-eval
//! compare`), as one clap argument group so each flag is spelled and documented once.

use clap::Args;

use crate::SchedulerKind;

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (≤ 1 turns guidance off).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// ddim, euler, euler-a, dpm++2m or ddpm, over the model's noise schedule.
    #[arg(long, default_value = "ddim")]
    pub scheduler: SchedulerKind,
    /// Image width in pixels (default: the model's sample size × the VAE factor).
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,
}
