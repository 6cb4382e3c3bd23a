//! The Stable Diffusion models, written by us and differentiable end to end where we train
//! through them: the UNet, the CLIP text encoder, the VAE, the tokenizer, their config files,
//! and where a model's files come from (folder, Hub id, single file).

pub mod config;
pub mod source;
pub mod text_encoder;
pub mod tokenizer;
pub mod unet;
pub mod vae;
