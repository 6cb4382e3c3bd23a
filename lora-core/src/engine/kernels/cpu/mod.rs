//! CPU f32 kernels: convolution (im2col or Winograd), attention, group/layer norm, GEGLU and the
//! image ↔ tokens transpose as candle custom ops with their backward passes, 3×3 pools forward
//! only, over the strided `gemm` calls, output buffers and vector helpers they share.

pub(crate) mod activation;
pub(crate) mod attention;
pub(crate) mod buffers;
pub(crate) mod conv;
pub(crate) mod gemm;
pub(crate) mod math;
pub(crate) mod norm;
pub(crate) mod pool;
pub(crate) mod transpose;
pub(crate) mod winograd;
