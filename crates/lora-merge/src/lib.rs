//! lora-merge library. Fold LoRA adapters into checkpoints; SVD merge, extract, resize, inspect (issue #4: not implemented yet).
//!
//! Built on [`lora_core`]; the `lora-merge` binary is a thin front end over this crate.

pub use lora_core;
