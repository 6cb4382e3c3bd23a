//! lora-merge library: fold LoRA adapters into checkpoints (diffusers folders or single-file LDM
//! checkpoints, streamed tensor by tensor), merge adapters into one by SVD, resize an adapter's
//! rank, extract an adapter from two checkpoints, and inspect adapter files.
//!
//! Built on [`lora_core`]; the `lora-merge` binary is a thin front end over this crate.

pub mod algebra;
pub mod base_model;
pub mod inspect;
pub mod lowrank;
pub mod merge;
pub mod stream;

pub use algebra::DynamicRank;
pub use inspect::{inspect, Inspection};
pub use lora_core;
pub use lowrank::{extract, resize, svd_merge, LowRankReport, ModuleSummary};
pub use merge::{merge, merge_converting, Conversion, MergeOptions, MergeReport, OutputLayout};
