//! The LoRA toolkit's umbrella crate: it re-exports the four libraries so the workspace-level
//! integration tests (`tests/`) and benchmarks (`benches/`) can use them through one name.
pub use lora_core as core;
pub use lora_infer as infer;
pub use lora_merge as merge;
pub use lora_train as train;
