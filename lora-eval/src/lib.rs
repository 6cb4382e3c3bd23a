//! Evaluation of generated images and adapters: FID, IS and KID from the FID Inception-v3
//! network's features, CLIP score from a CLIP model, and the `compare` workflow that generates
//! with several adapters and scores them side by side.
//!
//! - [`images`] and [`resize`]: which files are read and how each becomes network input.
//! - [`extract`]: folders to Inception features; [`stats`]: a processed set saved and reloaded.
//! - [`frechet`], [`inception_score`], [`kid`]: the metrics, each as its reference tool computes
//!   it; [`metrics`]: all of them for a pair of sets; [`report`]: what `metrics` prints.
//! - [`clip_score`]: CLIP's preprocessing and torchmetrics' CLIP score; [`prompts`]: the prompt
//!   of each image.
//! - [`compare`]: generate with base and adapters, score every column, grid and plots.
pub use lora_core;

pub mod clip_score;
pub mod compare;
pub mod extract;
pub mod features;
pub mod frechet;
pub mod images;
pub mod inception_score;
pub mod kid;
pub mod metrics;
pub mod numpy_rng;
pub mod prompts;
pub mod report;
pub mod resize;
pub mod stats;

/// The CLIP model a bare `--clip` means (torchmetrics' and most papers' choice).
pub const DEFAULT_CLIP_MODEL: &str = "openai/clip-vit-large-patch14";
