//! The training and inference engine under the models: layer types whose backward returns only
//! the gradients that can flow (no frozen-weight gradients), frozen layers fused with their
//! neighbours into single graph nodes, attention, gradient checkpointing, and the CPU and CUDA
//! kernels they run on. Nothing here knows what a UNet is: the models call these layers by
//! weight name and shape, and each layer picks how it runs (kernel, device, fusion) itself.
//!
//! Every frozen layer is one recorded node whose backward returns only the input gradient. On
//! the CPU in f32 that node is one of our kernel ops (`kernels::cpu`), which computes the values
//! and carries its own backward. Elsewhere (CUDA, half precision on the CPU) candle's ops
//! compute the values outside the graph and `autograd` re-attaches them with the input gradient.

pub mod activation;
pub mod attention;
pub(crate) mod autograd;
pub mod conv;
pub mod fused;
pub(crate) mod kernels;
pub mod linear;
pub mod norm;
pub mod pool;
pub mod recompute;
pub mod tensor_ops;
#[cfg(test)]
mod tests;

pub use activation::geglu;
pub use attention::{attention, causal_attention};
pub use conv::{frozen_conv2d, AdjointKernel, Conv2dLayer};
pub use linear::{frozen_linear, LinearLayer};
pub use norm::{GroupNormLayer, LayerNormLayer};
pub use recompute::CheckpointedForward;
pub(crate) use recompute::{Direct, LayerRunner};
pub use tensor_ops::{image_to_tokens, tokens_to_image, upsample_nearest};
