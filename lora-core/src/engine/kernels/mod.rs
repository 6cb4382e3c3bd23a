//! The kernels the engine's layers run on: CPU f32 kernels on raw slices, each a candle custom op
//! with its forward and its backward, and (feature `cuda`) our CUDA kernels compiled to PTX.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
