//! Evaluation of generated images and adapters: FID, IS and KID from the FID Inception-v3
//! network's features, CLIP score from a CLIP model, and the `compare` workflow that generates
//! with several adapters and scores them side by side.
pub use lora_core;

pub mod clip_score;
pub mod features;
pub mod frechet;
pub mod images;
pub mod inception_score;
pub mod kid;
pub mod numpy_rng;
pub mod resize;
