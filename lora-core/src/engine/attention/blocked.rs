//! Scaled dot-product attention from candle's tensor ops, for every device and dtype that has no
//! dedicated kernel (CUDA; half precision), as one graph node.
//!
//! Why: composed and recorded, attention keeps every intermediate of every layer until the
//! backward pass: the `[B, H, N, M]` scores, their scaled and upcast copies, the probabilities
//! and their downcast copy. At SD1.5's 64² latents that is about 7 GiB per self-attention layer
//! at batch 4 in bf16, 35 GiB for the five such layers. Here the forward runs untracked, one
//! block of query rows at a time, and the backward recomputes each block's probabilities (as
//! flash attention does), so a layer keeps only q, k, v and its output.

use candle_core::{CustomOp3, DType, Result, Tensor, D};

use crate::engine::autograd::{forward_from_computed_output, ComputedOutput};
use crate::engine::kernels::cpu::attention::Geometry;
use crate::engine::tensor_ops::{compute_dtype, contiguous};

/// Bytes of scores one block of query rows may take (all heads and samples together). A block's
/// scores, probabilities and, in the backward pass, dP − δ and dS exist at once, so this bounds
/// those temporaries (under 0.5 GB); smaller blocks cost more launches and more f32 passes
/// accumulating dk and dv (benches/RESULTS.md has the measurements behind the size).
const BLOCK_SCORE_BYTES: usize = 1 << 27;

/// `[B, R, H·d] → [B, H, R, d]`, contiguous.
fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, rows, width) = x.dims3()?;
    contiguous(
        &x.reshape((b, rows, heads, width / heads))?
            .transpose(1, 2)?,
    )
}

/// `[B, H, R, d] → [B, R, H·d]`, contiguous.
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, heads, rows, d) = x.dims4()?;
    contiguous(&x.transpose(1, 2)?)?.reshape((b, rows, heads * d))
}

/// The dtype scores, probabilities and every product with them are computed in: the operands' own,
/// or f32 for half-precision operands when `upcast` (SD2's attention upcast). Staying in half
/// precision otherwise is what makes this path fast on a GPU: candle's elementwise kernels run far
/// below memory bandwidth, and each cast or scaling of a `[B, H, rows, M]` block is one more such
/// pass over the largest tensors of the step. The softmax still accumulates in f32 (see
/// [`softmax`]), and the sums across blocks and the row sums δ are kept in f32.
fn score_dtype(dtype: DType, upcast: bool) -> DType {
    match upcast {
        true => compute_dtype(dtype),
        false => dtype,
    }
}

/// Row-wise softmax over the last dimension. candle's CUDA kernel accumulates half-precision
/// input in f32; its CPU kernel accumulates in the input's dtype, so there half precision is
/// upcast first (the CPU runs this path only in tests and for half-precision models).
fn softmax(scores: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::engine::kernels::cuda::applies(&[scores]) {
        return crate::engine::kernels::cuda::softmax_last_dim(scores);
    }
    match scores.dtype() {
        DType::F16 | DType::BF16 if scores.device().is_cpu() => {
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                .to_dtype(scores.dtype())
        }
        _ => candle_nn::ops::softmax_last_dim(scores),
    }
}

/// `(P, P ⊙ d)` for the scores `s`: `P = softmax(s)`; on CUDA one kernel.
fn softmax_times(s: &Tensor, d: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if crate::engine::kernels::cuda::applies(&[s, d]) {
        return crate::engine::kernels::cuda::softmax_times(s, d);
    }
    let p = softmax(s)?;
    let pd = (&p * d)?;
    Ok((p, pd))
}

/// `[dO | −δ]` with `δ = rowsum(dO ⊙ O)` summed in f32, in `grad`'s dtype; on CUDA one kernel.
fn grad_and_neg_delta(grad: &Tensor, out: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::engine::kernels::cuda::applies(&[grad, out]) {
        return crate::engine::kernels::cuda::append_neg_row_dot(grad, out);
    }
    let acc = compute_dtype(grad.dtype());
    let delta = (grad.to_dtype(acc)? * out.to_dtype(acc)?)?.sum_keepdim(D::Minus1)?;
    Tensor::cat(&[grad, &delta.neg()?.to_dtype(grad.dtype())?], D::Minus1)
}

/// The most negative finite value of `dtype`, as an f32 (for the causal mask).
fn most_negative(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => -65504.0,         // f16::MIN
        DType::BF16 => -3.389_531_4e38, // bf16::MIN
        _ => f32::MIN,
    }
}

/// One attention's operands with heads split, in the score dtype.
struct Heads {
    /// Queries scaled by 1/√d, so no pass over the scores scales them.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The operands' dtype, which the results are returned in.
    dtype: DType,
    scale: f64,
    block_rows: usize,
    /// Causal attention (query row `i` attends to keys `0..=i` only, a text encoder's): the
    /// `[N, M]` scores mask, built once, in the score dtype.
    causal_mask: Option<Tensor>,
}

impl Heads {
    /// Blocks of query rows take at most `score_bytes` of scores (at least one row).
    fn new(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        heads: usize,
        upcast: bool,
        causal: bool,
        score_bytes: usize,
    ) -> Result<Self> {
        let shape = Geometry::new(q.dims(), k.dims(), v.dims(), heads)?;
        let (b, n, keys) = (shape.batch, shape.queries, shape.keys);
        let sd = score_dtype(q.dtype(), upcast);
        // The most negative finite value rather than −∞, as transformers masks: every masked
        // probability is still exactly 0 (each row keeps its own key, whose score is finite), and
        // the CUDA softmax kernels' running maximum starts at −∞, from which −∞ − (−∞) would be
        // NaN.
        let causal_mask = match causal {
            true => {
                let masked = most_negative(sd);
                let mask: Vec<f32> = (0..n)
                    .flat_map(|i| (0..keys).map(move |j| if j > i { masked } else { 0.0 }))
                    .collect();
                Some(Tensor::from_vec(mask, (n, keys), q.device())?.to_dtype(sd)?)
            }
            false => None,
        };
        let scale = 1.0 / (shape.head_dim as f64).sqrt();
        let row_bytes = b * heads * keys * sd.size_in_bytes();
        Ok(Self {
            q: (split_heads(q, heads)?.to_dtype(sd)? * scale)?,
            k: split_heads(k, heads)?.to_dtype(sd)?,
            v: split_heads(v, heads)?.to_dtype(sd)?,
            dtype: q.dtype(),
            scale,
            block_rows: (score_bytes / row_bytes.max(1)).clamp(1, n.max(1)),
            causal_mask,
        })
    }

    /// `(first row, rows)` of each block of query rows.
    fn blocks(&self) -> Result<Vec<(usize, usize)>> {
        let n = self.q.dim(2)?;
        Ok((0..n)
            .step_by(self.block_rows)
            .map(|start| (start, self.block_rows.min(n - start)))
            .collect())
    }

    /// Scaled scores of query rows `start..start + rows` against all keys, masked when causal.
    fn scores(&self, start: usize, rows: usize) -> Result<Tensor> {
        let scores = self.q.narrow(2, start, rows)?.matmul(&self.k.t()?)?;
        match &self.causal_mask {
            Some(mask) => scores.broadcast_add(&mask.narrow(0, start, rows)?),
            None => Ok(scores),
        }
    }

    /// Softmax probabilities of query rows `start..start + rows` over all keys.
    fn probabilities(&self, start: usize, rows: usize) -> Result<Tensor> {
        softmax(&self.scores(start, rows)?)
    }

    /// `softmax(q·kᵀ/√d)·v`, `[B, H, N, d]`.
    fn forward(&self) -> Result<Tensor> {
        let out = self
            .blocks()?
            .into_iter()
            .map(|(start, rows)| self.probabilities(start, rows)?.matmul(&self.v))
            .collect::<Result<Vec<_>>>()?;
        // No query rows, no blocks: an empty output of q's shape.
        let out = match out.is_empty() {
            true => self.q.zeros_like()?,
            false => Tensor::cat(&out, 2)?,
        };
        out.to_dtype(self.dtype)
    }

    /// The gradients of q, k and v (`[B, H, ·, d]`, in the operands' dtype) for the output
    /// gradient `grad` (`[B, H, N, d]`) and the output `out`, recomputing each block's
    /// probabilities P: with dP = dO·vᵀ and δ = rowsum(dO ⊙ O) = rowsum(P ⊙ dP),
    /// dS = P ⊙ (dP − δ), dq = dS·k/√d, dk = Σ dSᵀ·q/√d, dv = Σ Pᵀ·dO.
    /// dP − δ comes out of one product, [dO | −δ]·[v | 1]ᵀ, so no pass over the block subtracts.
    fn backward(&self, out: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (sd, acc) = (self.v.dtype(), compute_dtype(self.v.dtype()));
        let grad = grad.to_dtype(sd)?;
        let grad_delta = grad_and_neg_delta(&grad, out)?;
        let v_ones = Tensor::cat(
            &[&self.v, &self.v.narrow(D::Minus1, 0, 1)?.ones_like()?],
            D::Minus1,
        )?;
        let k_scaled = (&self.k * self.scale)?;
        let (mut dq, mut dk, mut dv) = (Vec::new(), None::<Tensor>, None::<Tensor>);
        let accumulate = |sum: Option<Tensor>, term: Tensor| -> Result<Option<Tensor>> {
            let term = term.to_dtype(acc)?;
            Ok(Some(match sum {
                Some(sum) => (sum + term)?,
                None => term,
            }))
        };
        for (start, rows) in self.blocks()? {
            let dp_minus_delta = grad_delta.narrow(2, start, rows)?.matmul(&v_ones.t()?)?;
            let (p, ds) = softmax_times(&self.scores(start, rows)?, &dp_minus_delta)?;
            dv = accumulate(dv, p.t()?.matmul(&grad.narrow(2, start, rows)?)?)?;
            dq.push(ds.matmul(&k_scaled)?);
            dk = accumulate(dk, ds.t()?.matmul(&self.q.narrow(2, start, rows)?)?)?;
        }
        // No query rows: nothing reaches k and v, and dq is as empty as q.
        let dq = match dq.is_empty() {
            true => self.q.zeros_like()?,
            false => Tensor::cat(&dq, 2)?,
        };
        let or_zeros = |sum: Option<Tensor>| sum.map_or_else(|| self.k.zeros_like(), Ok);
        Ok((
            dq.to_dtype(self.dtype)?,
            or_zeros(dk)?.to_dtype(self.dtype)?,
            or_zeros(dv)?.to_dtype(self.dtype)?,
        ))
    }
}

/// `(q, k, v) → attention` with its output computed outside the graph by [`Heads::forward`].
struct BlockedAttention {
    heads: usize,
    upcast: bool,
    causal: bool,
    score_bytes: usize,
    output: ComputedOutput,
}

impl CustomOp3 for BlockedAttention {
    fn name(&self) -> &'static str {
        "blocked-attention"
    }

    forward_from_computed_output!(a, b, c);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let heads = Heads::new(
            q,
            k,
            v,
            self.heads,
            self.upcast,
            self.causal,
            self.score_bytes,
        )?;
        let (dq, dk, dv) = heads.backward(
            &split_heads(out, self.heads)?,
            &split_heads(grad, self.heads)?,
        )?;
        Ok((
            Some(merge_heads(&dq)?),
            Some(merge_heads(&dk)?),
            Some(merge_heads(&dv)?),
        ))
    }
}

/// `softmax(q·kᵀ/√d)·v` over `heads` heads of `[B, N, H·d]` queries and `[B, M, H·d]` keys and
/// values, returning `[B, N, H·d]`; scores in f32 when `upcast`; query row `i` attending to
/// keys `0..=i` only when `causal`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    upcast: bool,
    causal: bool,
) -> Result<Tensor> {
    attention_in_blocks(q, k, v, heads, upcast, causal, BLOCK_SCORE_BYTES)
}

/// [`attention`] in blocks of query rows of at most `score_bytes` of scores, forward and backward.
fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    upcast: bool,
    causal: bool,
    score_bytes: usize,
) -> Result<Tensor> {
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    let blocked = Heads::new(&qd, &kd, &vd, heads, upcast, causal, score_bytes)?;
    let out = merge_heads(&blocked.forward()?)?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    q.apply_op3(
        k,
        v,
        BlockedAttention {
            heads,
            upcast,
            causal,
            score_bytes,
            output: ComputedOutput::new(out),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::test_support::max_rel_diff;
    use candle_core::{Device, Var};

    /// Attention composed from candle's differentiable ops, in f64; with a causal mask added to
    /// the scores when `causal`.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Tensor {
        let (q, k, v) = (
            split_heads(q, heads).unwrap(),
            split_heads(k, heads).unwrap(),
            split_heads(v, heads).unwrap(),
        );
        let d = q.dim(3).unwrap();
        let mut scores = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        if causal {
            let (n, m) = (q.dim(2).unwrap(), k.dim(2).unwrap());
            let mask: Vec<f64> = (0..n)
                .flat_map(|i| (0..m).map(move |j| if j > i { f64::NEG_INFINITY } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (n, m), q.device()).unwrap();
            scores = scores.broadcast_add(&mask).unwrap();
        }
        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        merge_heads(&probs.matmul(&v).unwrap()).unwrap()
    }

    /// Output and the three gradients against composed attention differentiated by candle's
    /// autograd: in f64 exactly, in one block and in several, with and without the causal mask
    /// (self-attention shapes); with f16 operands (scores in f16, or upcast to f32) within half
    /// precision's rounding.
    #[test]
    fn matches_composed_attention_and_its_gradients() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(6);
        // (batch, queries, keys, heads, head_dim, rows per block)
        let cases = [
            (2, 7, 5, 3, 4, None),
            (1, 16, 77, 2, 8, None),
            (2, 9, 6, 1, 6, Some(4)),
            (1, 33, 20, 2, 4, Some(8)),
            (2, 12, 12, 2, 4, None),
            (1, 13, 13, 3, 4, Some(5)),
        ];
        for (b, n, m, heads, d, block) in cases {
            for (dtype, upcast, causal, tolerance) in [
                (DType::F64, false, false, 1e-12),
                (DType::F16, false, false, 2e-2),
                (DType::F16, true, false, 2e-2),
                (DType::F64, false, true, 1e-12),
                (DType::F16, true, true, 2e-2),
            ] {
                if causal && n != m {
                    continue;
                }
                let label = format!(
                    "{b}×{n}×{m}, {heads} heads, {dtype:?}, upcast {upcast}, causal {causal}"
                );
                let normal = |rng: &mut Rng, rows| {
                    rng.normal_tensor((b, rows, heads * d), &dev)
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                };
                let (q, k, v) = (
                    normal(&mut rng, n),
                    normal(&mut rng, m),
                    normal(&mut rng, m),
                );
                let upstream = normal(&mut rng, n);
                let vars = [&q, &k, &v].map(|x| Var::from_tensor(x).unwrap());
                let loss = |y: &Tensor| {
                    (y.to_dtype(DType::F64).unwrap() * &upstream)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                };
                let reference = composed(&vars[0], &vars[1], &vars[2], heads, causal);
                let expected = loss(&reference).backward().unwrap();

                let ours_vars =
                    [&q, &k, &v].map(|x| Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap());
                let (qo, ko, vo) = (&ours_vars[0], &ours_vars[1], &ours_vars[2]);
                // Blocks of `rows` query rows, in the forward pass and in the backward pass.
                let score_size = score_dtype(dtype, upcast).size_in_bytes();
                let score_bytes =
                    block.map_or(BLOCK_SCORE_BYTES, |rows| rows * b * heads * m * score_size);
                let blocks = Heads::new(qo, ko, vo, heads, upcast, causal, score_bytes)
                    .unwrap()
                    .blocks()
                    .unwrap()
                    .len();
                assert_eq!(blocks > 1, block.is_some(), "{label}: {blocks} blocks");
                let ours =
                    attention_in_blocks(qo, ko, vo, heads, upcast, causal, score_bytes).unwrap();
                let err = max_rel_diff(&ours.to_dtype(DType::F64).unwrap(), &reference);
                assert!(err < tolerance, "{label}: output {err}");
                let got = loss(&ours).backward().unwrap();
                for (name, ours, theirs) in [
                    ("q", qo, &vars[0]),
                    ("k", ko, &vars[1]),
                    ("v", vo, &vars[2]),
                ] {
                    let g = got.get(ours).unwrap().to_dtype(DType::F64).unwrap();
                    let err = max_rel_diff(&g, expected.get(theirs).unwrap());
                    assert!(err < tolerance, "{label}: d{name} {err}");
                }
            }
        }
    }

    /// The causal mask is finite in every score dtype (CUDA's softmax kernels start their
    /// running maximum at −∞, where an −∞ score would make NaN), and masked keys still get
    /// probability 0.
    #[test]
    fn causal_mask_is_finite_and_masks_completely() {
        let dev = Device::Cpu;
        for (dtype, upcast) in [
            (DType::F32, false),
            (DType::F16, false),
            (DType::BF16, false),
            (DType::F16, true),
        ] {
            let x = Rng::new(2)
                .normal_tensor((1, 5, 4), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let heads = Heads::new(&x, &x, &x, 2, upcast, true, BLOCK_SCORE_BYTES).unwrap();
            let mask = heads.causal_mask.as_ref().unwrap();
            let values: Vec<f32> = mask
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(
                values.iter().all(|v| v.is_finite()),
                "{dtype:?}: {values:?}"
            );
            let p = heads
                .probabilities(0, 5)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let row0: Vec<f32> = p
                .get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .get(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(row0[1..], [0.0; 4], "{dtype:?}");
            assert!((row0[0] - 1.0).abs() < 1e-3, "{dtype:?}: {row0:?}");
        }
    }

    #[test]
    fn mismatched_heads_are_errors() {
        let q = Tensor::zeros((1, 4, 6), DType::F64, &Device::Cpu).unwrap();
        let err = attention(&q, &q, &q, 4, false, false).unwrap_err();
        assert!(err.to_string().contains("do not fit 4 heads"), "{err}");
    }

    /// No keys, no heads or heads of size 0 are errors (the CPU kernel's shape check, which this
    /// path makes too), not a panic or an output of zeros.
    #[test]
    fn empty_keys_and_heads_are_errors() {
        let zeros = |shape: (usize, usize, usize)| Tensor::zeros(shape, DType::F64, &Device::Cpu);
        let (q, no_keys) = (zeros((1, 4, 6)).unwrap(), zeros((1, 0, 6)).unwrap());
        for causal in [false, true] {
            let err = attention(&q, &no_keys, &no_keys, 2, false, causal).unwrap_err();
            assert!(err.to_string().contains("M > 0 keys"), "{err}");
            let err = attention(&q, &q, &q, 0, false, causal).unwrap_err();
            assert!(err.to_string().contains("do not fit 0 heads"), "{err}");
            let (q, k) = (zeros((1, 4, 0)).unwrap(), zeros((1, 3, 0)).unwrap());
            let err = attention(&q, &k, &k, 2, false, causal).unwrap_err();
            assert!(err.to_string().contains("d > 0"), "{err}");
        }
    }

    /// No query rows: an empty output and zero gradients for the keys and values, as the CPU
    /// kernel gives, rather than an error from concatenating no blocks.
    #[test]
    fn no_queries_give_an_empty_output_and_zero_gradients() {
        let dev = Device::Cpu;
        let var = |rows: usize| {
            let values: Vec<f64> = (0..rows * 6).map(|i| i as f64 * 0.1 - 0.4).collect();
            Var::from_tensor(&Tensor::from_vec(values, (1, rows, 6), &dev).unwrap()).unwrap()
        };
        let (q, k, v) = (var(0), var(3), var(3));
        for causal in [false, true] {
            let out = attention(&q, &k, &v, 2, false, causal).unwrap();
            assert_eq!(out.dims(), &[1, 0, 6]);
            let grads = out.sum_all().unwrap().backward().unwrap();
            assert_eq!(grads.get(&q).unwrap().dims(), &[1, 0, 6]);
            for x in [&k, &v] {
                let grad = grads
                    .get(x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                assert_eq!(grad, vec![0.0; 18], "causal {causal}");
            }
        }
    }
}
