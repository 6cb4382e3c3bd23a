//! lora-infer: text-to-image generation with a Stable Diffusion 1.x/2.x or SDXL base model and
//! LoRA adapters, step for step as diffusers' `StableDiffusionPipeline` /
//! `StableDiffusionXLPipeline`.
//!
//! - [`pipeline`]: [`Pipeline::load`] (model folder + adapters), [`Pipeline::generate`].
//! - [`prompt_encoder`]: the prompt and negative prompt to the UNet's conditioning.
//! - [`scheduler`]: DDIM, Euler, Euler ancestral, DPM-Solver++(2M), DDPM.
//! - [`output`]: PNGs with generation metadata, contact sheets, latents files.
//!
//! Built on [`lora_core`]; the `lora-infer` binary is a thin front end over this crate.

pub mod output;
pub mod pipeline;
pub mod plot;
pub mod prompt_encoder;
pub mod sampling_args;
pub mod scheduler;

pub use lora_core;
pub use pipeline::{GenerateOptions, Generated, InitImage, Pipeline, PipelineParts, Progress};
pub use prompt_encoder::PromptEncoder;
pub use sampling_args::SamplingArgs;
pub use scheduler::{Scheduler, SchedulerKind};
