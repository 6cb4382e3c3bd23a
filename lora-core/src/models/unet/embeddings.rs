//! The timestep embedding's input: diffusers' `Timesteps` sinusoidal features.

use anyhow::Result;
use candle_core::{DType, Tensor};

/// Sinusoidal timestep features `[B, dim]` (diffusers `Timesteps`), computed in f32.
pub(super) fn timestep_features(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - freq_shift)).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        Ok(emb.pad_with_zeros(1, 0, 1)?)
    } else {
        Ok(emb)
    }
}
