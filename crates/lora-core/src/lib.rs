//! lora-core: the Stable Diffusion UNet written for training (differentiable end to end), LoRA
//! adapters injected into it, and the adapter file formats shared with kohya/A1111 and
//! diffusers/peft. See ARCHITECTURE.md at the repository root for the map.

pub mod adapter_file;
mod blocked_attention;
pub mod config;
mod cpu_activation;
mod cpu_attention;
mod cpu_conv;
mod cpu_gemm;
mod cpu_math;
mod cpu_norm;
pub mod cpu_runtime;
#[cfg(feature = "cuda")]
mod cuda_kernels;
pub mod io;
pub mod keys;
pub mod ldm;
pub mod lora;
pub mod model;
pub mod nn;
pub mod recompute;
pub mod rng;
pub mod single_file;
#[cfg(test)]
mod test_support;
pub mod text_encoder;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use adapter_file::{
    save_adapter, AdapterFile, AdapterFormat, BaseModelVersion, ModelModules, SaveOptions,
};
pub use keys::Component;
pub use lora::{
    Adapter, LoraConfig, LoraInit, LoraLinear, LoraModule, LoraTargets, ModuleInfo, ModuleKind,
};
pub use recompute::CheckpointedForward;
pub use rng::Rng;
pub use unet::UNet2DConditionModel;
