//! lora-core
