//! lora-merge
