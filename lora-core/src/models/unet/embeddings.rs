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

/// SDXL's added conditioning input (diffusers `add_time_proj` + concatenation): the pooled text
/// embedding `[B, P]` followed by `time_dim` sinusoidal features of each micro-conditioning id
/// `[B, N]`, giving `[B, P + N·time_dim]`, in the text embedding's dtype.
pub(super) fn text_time_features(
    text_embeds: &Tensor,
    time_ids: &Tensor,
    time_dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let (b, n) = time_ids.dims2()?;
    let ids = time_ids.flatten_all()?;
    let features = timestep_features(&ids, time_dim, flip_sin_to_cos, freq_shift)?
        .reshape((b, n * time_dim))?
        .to_dtype(text_embeds.dtype())?;
    Ok(Tensor::cat(&[text_embeds, &features], 1)?)
}
