//! lora-train library. Train a LoRA adapter on a folder of captioned images (issue #3: not implemented yet).
//!
//! Built on [`lora_core`]; the `lora-train` binary is a thin front end over this crate.

pub use lora_core;
