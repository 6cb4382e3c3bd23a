//! lora-train
