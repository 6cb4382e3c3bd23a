//! Multi-head scaled dot-product attention on projected queries, keys and values, the part BLIP's
//! vision attention (fused `qkv`) and its text decoder's self- and cross-attention share.

use anyhow::Result;
use candle_core::{DType, Tensor};

/// `q`: `[batch, queries, heads·head_dim]`, `k`/`v`: `[batch, keys, heads·head_dim]` →
/// `[batch, queries, heads·head_dim]` in `q`'s dtype. `mask`: an additive `[queries, keys]` mask.
/// The scores and softmax are computed in f32, so half-precision weights do not lose them.
pub(crate) fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (batch, queries, width) = q.dims3()?;
    let head_dim = width / heads;
    let split = |t: &Tensor| -> Result<Tensor> {
        let (batch, seq, _) = t.dims3()?;
        Ok(t.reshape((batch, seq, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()?
            .to_dtype(DType::F32)?)
    };
    let (qh, kh, vh) = (split(q)?, split(k)?, split(v)?);
    let mut scores = (qh.matmul(&kh.t()?)? / (head_dim as f64).sqrt())?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probs
        .matmul(&vh)?
        .to_dtype(q.dtype())?
        .transpose(1, 2)?
        .reshape((batch, queries, width))?)
}

/// The additive causal mask `[seq, seq]`: 0 on and below the diagonal, -inf above.
pub(crate) fn causal_mask(seq: usize, device: &candle_core::Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(values, (seq, seq), device)?)
}
