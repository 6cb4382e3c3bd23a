//! lora-core: the Stable Diffusion models written for training (differentiable end to end), LoRA
//! adapters injected into them, and the file formats shared with kohya/A1111 and diffusers/peft.
//! See ARCHITECTURE.md at the repository root for the map and the layering rules:
//! `engine` ← `adapters` ← `models` ← `formats` ← `source`, with `io`, `options` and `rng` below.

pub mod adapters;
pub mod engine;
pub mod formats;
pub mod io;
pub mod models;
pub mod options;
pub mod process_setup;
pub mod resample;
pub mod rng;
pub mod source;
#[cfg(test)]
mod test_support;

pub use adapters::{
    Adapter, AdapterModule, AdapterModules, LoraConfig, LoraInit, LoraLinear, LoraModule,
    LoraTargets, ModuleInfo, ModuleKind,
};
pub use engine::CheckpointedForward;
pub use formats::adapter_file::{
    save_adapter, AdapterFile, AdapterFormat, ModelModules, SaveOptions,
};
pub use formats::keys::Component;
pub use formats::kohya::BaseModelVersion;
pub use models::unet::{AddedConditioning, UNet2DConditionModel};
pub use rng::Rng;
