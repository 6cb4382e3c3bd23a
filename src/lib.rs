//! The LoRA toolkit's umbrella crate. It re-exports the four libraries (for the workspace-level
//! integration tests in `tests/` and the benchmarks in `benches/`), and holds the demonstration
//! that runs on a fresh offline machine: the embedded default model's recipe
//! ([`default_model`]), the pictures it and the quick start's concept are made of ([`shapes`]),
//! and the quick start itself ([`quickstart`]).
pub use lora_core as core;
pub use lora_eval as eval;
pub use lora_infer as infer;
pub use lora_merge as merge;
pub use lora_train as train;

pub mod default_model;
pub mod following;
pub mod quickstart;
pub mod shapes;
