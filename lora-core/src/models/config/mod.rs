//! Model and scheduler configurations, parsed from diffusers `config.json` files. Unknown or
//! unsupported values are errors, never silent defaults.

mod blip;
mod builtin;
mod clip;
mod scheduler;
mod unet;
mod vae;

pub use blip::{BlipConfig, BlipTextConfig, BlipVisionConfig};
pub use builtin::{Architecture, BuiltinConfigs};
pub use clip::{ClipActivation, ClipModelConfig, ClipTextConfig, ClipVisionConfig};
pub use scheduler::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
pub use unet::*;
pub use vae::VaeConfig;
