//! LoRA adapters: their configuration and presets, the low-rank math, and the adapted layer the
//! models put wherever an adapter can attach. The one place that knows what `ΔW` is.

pub mod blocks;
pub mod config;
pub mod conv;
pub mod linear;
pub mod lycoris;
pub mod module;

pub use blocks::UNetBlocks;
pub use config::{AdapterAlgorithm, LoraConfig, LoraInit, LoraTargets};
pub use conv::{AdaptableLayer, AdaptableVisitor, LoraConv};
pub use linear::{attach_checked, check_adapter_fits, LayerVisitor, LoraLinear};
pub use module::{
    Adapter, AdapterModule, AdapterModules, Component, LoraModule, ModuleInfo, ModuleKind,
    TrainableAdapter,
};
