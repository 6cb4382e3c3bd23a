//! lora-infer
