//! The Stable Diffusion models, written by us and differentiable end to end where we train
//! through them: the UNet, the CLIP text encoder, the VAE, the tokenizer and their config files;
//! SDXL's prompt encoding over its two text encoders (`sdxl_prompt`); a whole CLIP model (both
//! towers, for CLIP score); the evaluation metrics' feature network (FID's Inception-v3); and
//! BLIP, an image captioner; these last three inference only, the two
//! vision transformers sharing their input embedding (`vit_embeddings`) and transformers' image
//! processors (`image_processor`). Where a model's files come from (folder, Hub id, single file)
//! is `crate::source`.

pub mod blip;
pub mod clip;
pub mod config;
pub mod image_processor;
pub mod inception;
pub mod sdxl_prompt;
pub mod text_encoder;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod vit_embeddings;
