//! Scaled dot-product attention as one graph node: on the CPU in f32 our fused kernel, elsewhere
//! candle's ops in blocks of query rows with a recomputing backward (`blocked`).

mod blocked;

use anyhow::{Context, Result};
use candle_core::Tensor;

use super::kernels::cpu;

/// `softmax(q·kᵀ/√d)·v` over `heads` heads of `[B, N, H·d]` queries and `[B, M, H·d]` keys and
/// values, returning `[B, N, H·d]`; scores in f32 when `upcast` (SD2's attention upcast). One graph
/// node either way: on the CPU in f32 our fused kernel (`kernels::cpu::attention`), elsewhere
/// candle's ops in blocks of query rows with a recomputing backward (`blocked`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, upcast: bool) -> Result<Tensor> {
    if cpu::gemm::cpu_f32(&[q, k, v]) {
        return cpu::attention::attention(q, k, v, heads).context("attention");
    }
    blocked::attention(q, k, v, heads, upcast, false).context("attention")
}

/// [`attention`] where query row `i` attends to keys `0..=i` only (a text encoder's causal
/// self-attention), in f32 scores. One graph node, candle's ops in blocks of query rows on every
/// device: text sequences are short (77 tokens), so there is no fused CPU kernel for it.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    blocked::attention(q, k, v, heads, true, true).context("causal attention")
}
