//! lora-infer library. Generate images with a base model and LoRA adapters (issue #5: not implemented yet).
//!
//! Built on [`lora_core`]; the `lora-infer` binary is a thin front end over this crate.

pub use lora_core;
