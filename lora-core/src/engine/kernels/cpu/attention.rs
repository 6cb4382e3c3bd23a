//! Scaled dot-product attention on the CPU for f32, forward and backward, as one candle op.
//!
//! Why: composed from candle ops, attention records about 18 graph nodes (head splits, the
//! score matmul, scaling, softmax, merges), and candle's backward allocates a zeroed gradient
//! and adds into it for every node — several passes over the `[B, H, N, M]` score tensor each
//! (32 MiB per self-attention layer at SD1.5's 32² latents). Here heads are strided views of the
//! `[B, N, H·d]` projections (no split copies, one merge into the output; keys and values are
//! transposed once per head where a product reads them transposed), the scores of one block of
//! query rows against one tile of keys at a time live in a per-thread buffer that stays in
//! cache, and the backward recomputes them instead of keeping them alive between the passes (as
//! flash attention does): from each query row's log-sum-exp, which the forward pass keeps, so
//! that the backward pass needs no row maxima or sums of its own.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::buffers::{for_each_band, zeroed};
use super::gemm::{f32_slice, matmul, with_f32_values, with_scratch, Mat, Threads, LINE_VALUES};
use super::math::{self, simd_dispatch};

/// `[B, N, H·d]` queries against `[B, M, H·d]` keys and values: the shape contract of every
/// attention path (the blocked one checks its operands here too).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub(crate) batch: usize,
    pub(crate) queries: usize,
    pub(crate) keys: usize,
    heads: usize,
    pub(crate) head_dim: usize,
}

impl Geometry {
    /// The geometry of operands of dims `q`, `k` and `v` split into `heads` heads; an error
    /// naming the dims where they do not fit.
    pub(crate) fn new(q: &[usize], k: &[usize], v: &[usize], heads: usize) -> Result<Self> {
        let fits = q.len() == 3
            && k.len() == 3
            && k == v
            && q[0] == k[0]
            && q[2] == k[2]
            && k[1] > 0
            && q[2] > 0
            && heads > 0
            && q[2].is_multiple_of(heads);
        if !fits {
            return Err(candle_core::Error::Msg(format!(
                "attention: queries {q:?}, keys {k:?} and values {v:?} do not fit {heads} heads \
                 (expected [B, N, H·d] and two [B, M, H·d], with M > 0 keys and d > 0)"
            )));
        }
        Ok(Self {
            batch: q[0],
            queries: q[1],
            keys: k[1],
            heads,
            head_dim: q[2] / heads,
        })
    }

    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Head `(b, h)` of a `[B, rows, H·d]` tensor from row `first` on: a `rows × d` view.
    fn head<'a>(&self, x: &'a [f32], rows: usize, head: (usize, usize), first: usize) -> Mat<'a> {
        Mat::rows(self.head_from(x, rows, head, first), self.width())
    }

    /// The transpose of [`Self::head`]: a `d × rows` view.
    fn head_t<'a>(&self, x: &'a [f32], rows: usize, head: (usize, usize), first: usize) -> Mat<'a> {
        Mat::transposed(self.head_from(x, rows, head, first), self.width())
    }

    /// Head `(b, h)` of a `[B, rows, H·d]` tensor, transposed into `out` (`d × rows`, rows
    /// contiguous).
    fn head_transposed_into(&self, x: &[f32], rows: usize, head: (usize, usize), out: &mut [f32]) {
        let sources = self.head_from(x, rows, head, 0).chunks(self.width());
        for (r, src) in sources.take(rows).enumerate() {
            for (j, &value) in src[..self.head_dim].iter().enumerate() {
                out[j * rows + r] = value;
            }
        }
    }

    /// The values of `x` (`[B, rows, H·d]`) from head `h` of sample `b`'s row `first` on.
    fn head_from<'a>(
        &self,
        x: &'a [f32],
        rows: usize,
        (b, h): (usize, usize),
        first: usize,
    ) -> &'a [f32] {
        &x[(b * rows + first) * self.width() + h * self.head_dim..]
    }

    /// Writes per-head blocks (in `(b, h)` order) into `out`, a `[B, rows, H·d]` tensor: each
    /// block `rows × d`, or its transpose `d × rows` when `transposed`, a band of rows of one
    /// sample at a time ([`for_each_band`]).
    fn merge_heads_into<B: AsRef<[f32]> + Sync>(
        &self,
        blocks: &[B],
        rows: usize,
        transposed: bool,
        out: &mut [f32],
    ) {
        let (d, width) = (self.head_dim, self.width());
        // Rows `first..` of sample `b`, as many as `dst` holds.
        let band = |b: usize, first: usize, dst: &mut [f32]| {
            let count = dst.len() / width;
            for (h, block) in blocks[b * self.heads..][..self.heads].iter().enumerate() {
                let block = block.as_ref();
                if transposed {
                    for (j, column) in block.chunks_exact(rows).enumerate() {
                        let values = &column[first..first + count];
                        for (dst_row, &value) in dst.chunks_exact_mut(width).zip(values) {
                            dst_row[h * d + j] = value;
                        }
                    }
                } else {
                    let sources = block[first * d..].chunks_exact(d);
                    for (dst_row, src) in dst.chunks_exact_mut(width).zip(sources) {
                        dst_row[h * d..][..d].copy_from_slice(src);
                    }
                }
            }
        };
        for_each_band(
            out,
            rows * width,
            MERGE_ROWS_PER_TASK * width,
            |b, i, dst| band(b, i * MERGE_ROWS_PER_TASK, dst),
        );
    }
}

simd_dispatch! {
    /// Rows of raw scores `Q·Kᵀ` → their softmax `exp(scale · (scores − lse))`, in place, from
    /// each row's log-sum-exp (see [`forward`]). Rows are `stride` apart, the first `cols` of
    /// each are scores. The recomputed scores may round a little differently from the forward
    /// pass's, so a row's largest may exceed its `lse` by an ulp or so: the exponential is as
    /// accurate there.
    fn probabilities_in_place<const FMA: bool>(
        scores: &mut [f32],
        cols: usize,
        stride: usize,
        scale: f32,
        log_sum_exps: &[f32],
    ) {
        for (row, &lse) in scores.chunks_exact_mut(stride).zip(log_sum_exps) {
            // The sum is 1 up to rounding: not needed.
            math::exp_shifted_in_place_sum::<FMA>(&mut row[..cols], lse, scale);
        }
    }
}

simd_dispatch! {
    /// `dS = P ⊙ (dP − δ) · scale`, in place of `dP`, rows laid out as in
    /// [`probabilities_in_place`]. `δ = rowsum(P ⊙ dP)` is each row's `dO·O` (`dP = dO·Vᵀ` and
    /// `O = P·V`), which [`block_gradients`] takes from the forward pass's output: `d` values
    /// a row instead of a pass over all of the row's keys.
    fn softmax_grad_rows(
        probs: &[f32],
        deltas: &[f32],
        dp: &mut [f32],
        cols: usize,
        stride: usize,
        scale: f32,
    ) {
        let rows = probs.chunks_exact(stride).zip(dp.chunks_exact_mut(stride));
        for ((p, g), &delta) in rows.zip(deltas) {
            for (g, &p) in g[..cols].iter_mut().zip(&p[..cols]) {
                *g = p * (*g - delta) * scale;
            }
        }
    }
}

/// Rows of a merged tensor per task when the pool shares a merge of heads.
const MERGE_ROWS_PER_TASK: usize = 32;

/// Keys per tile of scores. Both passes run flash attention's loop: a block of query rows meets
/// the keys a tile at a time, so that the tile's scores stay in L2 between the products and the
/// exponentials (the forward pass keeps its softmax up to date across the tiles,
/// [`online_softmax_rows`]; the backward pass has the rows' log-sum-exps). Against a block of
/// rows meeting all keys at once, the forward pass over 9216 keys took 28 % less, over 4096 keys
/// 7 % less, on the Intel kind with 2 MiB of L2 per core; tiles of 512 and 4096 keys were slower
/// (benches/RESULTS.md, 2026-12-07 09:40). The backward pass over 4096 keys took ~12 % less in
/// tiles than in blocks of 256 rows against all keys (2026-12-07 16:13).
const KEY_TILE: usize = 1024;
/// Score values per tile (1 MiB): the tile's rows of queries.
const SCORE_TILE_VALUES: usize = 1 << 18;

/// How both passes cut a head's scores: blocks of `rows` query rows against tiles of `keys`
/// keys (the last ones may be shorter), a tile's rows `stride` apart in a thread's work buffer:
/// the keys rounded up to a cache line, so that each row starts on one in [`with_scratch`]'s
/// buffer (why: see there). The columns past the keys are never read.
#[derive(Clone, Copy)]
struct ScoreTiles {
    keys: usize,
    stride: usize,
    rows: usize,
}

impl ScoreTiles {
    fn new(g: &Geometry) -> Self {
        let keys = KEY_TILE.min(g.keys);
        let stride = keys.next_multiple_of(LINE_VALUES);
        let rows = (SCORE_TILE_VALUES / stride).clamp(1, g.queries.max(1));
        Self { keys, stride, rows }
    }
}

/// `softmax(Q·Kᵀ/√d)·V` per head: `[B, N, H·d]`, and each query row's log-sum-exp for the
/// backward pass: `[B, H, N]` values `lse` such that `exp((Q·Kᵀ − lse)/√d)` is the row's softmax
/// (its maximum score plus `ln Σ exp` scaled back to scores; NaN for a row whose scores are all
/// −∞, as its output is). Tasks are (head, block of query rows) pairs, so that a few heads (SD
/// 2.1's five) still fill every core.
fn forward(g: &Geometry, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (n, m, d) = (g.queries, g.keys, g.head_dim);
    if n == 0 {
        return (Vec::new(), Vec::new());
    }
    let ScoreTiles {
        keys: tile_keys,
        stride,
        rows: block_rows,
    } = ScoreTiles::new(g);
    let scale = 1.0 / (d as f32).sqrt();
    // Each head's keys transposed once (`d × M`): the products read a tile of them as a
    // column-major operand, which the gemm crate packs by copying runs; the strided `[M, H·d]`
    // rows would be gathered value by value for every block of queries.
    let mut keys_t = vec![0.0f32; g.batch * g.heads * m * d];
    keys_t
        .par_chunks_mut(m * d)
        .enumerate()
        .for_each(|(t, k_t)| g.head_transposed_into(k, m, (t / g.heads, t % g.heads), k_t));
    let mut heads_out = vec![0.0f32; g.batch * g.heads * n * d];
    let mut log_sum_exps = vec![0.0f32; g.batch * g.heads * n];
    heads_out
        .par_chunks_mut(n * d)
        .zip(log_sum_exps.par_chunks_mut(n))
        .zip(keys_t.par_chunks(m * d))
        .enumerate()
        .for_each(|(t, ((head_out, head_lse), k_t))| {
            let head = (t / g.heads, t % g.heads);
            let blocks = head_out
                .par_chunks_mut(block_rows * d)
                .zip(head_lse.par_chunks_mut(block_rows))
                .enumerate();
            blocks.for_each(|(i, (dst, lse))| {
                let rows = dst.len() / d;
                let qh = g.head(q, n, head, i * block_rows);
                with_scratch(rows * stride + 2 * rows, |scratch| {
                    let (exps, rest) = scratch.split_at_mut(rows * stride);
                    let (maxes, sums) = rest.split_at_mut(rows);
                    for first_key in (0..m).step_by(tile_keys) {
                        let keys = tile_keys.min(m - first_key);
                        let kt = Mat::rows(&k_t[first_key..], m);
                        matmul(exps, stride, false, (rows, keys, d), qh, kt, Threads::One);
                        let tile = RowsTile {
                            keys,
                            stride,
                            first: first_key == 0,
                        };
                        online_softmax_rows(exps, tile, scale, maxes, sums, dst);
                        let vh = g.head(v, m, head, first_key);
                        let e = Mat::rows(exps, stride);
                        matmul(dst, d, first_key > 0, (rows, d, keys), e, vh, Threads::One);
                    }
                    let rows = dst.chunks_exact_mut(d).zip(lse).zip(&*sums).zip(&*maxes);
                    for (((row, lse), &sum), &max) in rows {
                        // A row of −∞ scores has no softmax: NaN, as in PyTorch (the
                        // exponential clamps −∞ to a tiny weight that would hide it).
                        let (inv, log_sum_exp) = if max == f32::NEG_INFINITY {
                            (f32::NAN, f32::NAN)
                        } else {
                            (1.0 / sum, max + sum.ln() / scale)
                        };
                        row.iter_mut().for_each(|x| *x *= inv);
                        *lse = log_sum_exp;
                    }
                });
            });
        });
    let blocks: Vec<&[f32]> = heads_out.chunks_exact(n * d).collect();
    let mut out = zeroed(g.batch * n * g.width());
    g.merge_heads_into(&blocks, n, false, &mut out);
    (out, log_sum_exps)
}

/// Where a tile of scores lies in its block: `keys` scores per row, rows `stride` apart, and
/// whether it is the first tile of the keys.
#[derive(Clone, Copy)]
struct RowsTile {
    keys: usize,
    stride: usize,
    first: bool,
}

simd_dispatch! {
    /// One tile of raw scores `Q·Kᵀ` → `exp(scale · (scores − max))` in place, where `max` is
    /// each row's running maximum over the tiles so far (`maxes`, updated); `sums` keeps each
    /// row's `Σ exp` against that maximum, and the rows of `dst` (the output so far, `P·V` of
    /// the earlier tiles) are rescaled to it when it grows. Before the first tile `maxes` and
    /// `sums` hold anything: the first tile sets them. A row whose scores so far are all −∞
    /// keeps a shift of 0, so that −∞ − −∞ never makes a NaN (the caller makes a row that stays
    /// −∞ NaN); a NaN score makes its row's sum, and so its output, NaN.
    fn online_softmax_rows<const FMA: bool>(
        exps: &mut [f32],
        tile: RowsTile,
        scale: f32,
        maxes: &mut [f32],
        sums: &mut [f32],
        dst: &mut [f32],
    ) {
        let d = dst.len() / maxes.len();
        let rows = exps.chunks_exact_mut(tile.stride).zip(maxes.iter_mut());
        for (((row, max), sum), out_row) in rows.zip(sums.iter_mut()).zip(dst.chunks_exact_mut(d)) {
            let row = &mut row[..tile.keys];
            let tile_max = math::max(row);
            let old = if tile.first { f32::NEG_INFINITY } else { *max };
            let new = if tile_max > old { tile_max } else { old };
            let shift = if new == f32::NEG_INFINITY { 0.0 } else { new };
            let tile_sum = math::exp_shifted_in_place_sum::<FMA>(row, shift, scale);
            if tile.first {
                *sum = tile_sum;
            } else {
                // Only a larger maximum rescales: `exp(0)` in f32 is one ulp above 1, which
                // would tilt every later tile's weights.
                if new > old {
                    let correction = math::exp_nonpositive((old - shift) * scale);
                    *sum *= correction;
                    out_row.iter_mut().for_each(|x| *x *= correction);
                }
                *sum += tile_sum;
            }
            *max = new;
        }
    }
}

/// What the backward pass takes from the forward pass besides its operands: the output
/// gradient `dO`, the output `O` and the query rows' log-sum-exps (see [`forward`]).
#[derive(Clone, Copy)]
struct Upstream<'a> {
    grad_out: &'a [f32],
    out: &'a [f32],
    log_sum_exps: &'a [f32],
}

/// The gradients `(dQ, dK, dV)` of [`forward`] given the output gradient `dO`, packed one after
/// the other: with `P = softmax(S)`, `S = Q·Kᵀ/√d`, `dV = Pᵀ·dO`,
/// `dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O)) / √d`, `dQ = dS·K`, `dK = dSᵀ·Q`,
/// one block of query rows at a time ([`block_gradients`]). Tasks are (head, part of its
/// blocks) pairs ([`HEAD_PARTS`]): each part sums its blocks' dK and dV, and a head's parts are
/// added afterwards, in order.
fn backward(g: &Geometry, q: &[f32], k: &[f32], v: &[f32], upstream: Upstream) -> Vec<f32> {
    let (n, m, d) = (g.queries, g.keys, g.head_dim);
    let (q_len, kv_len) = (g.batch * n * g.width(), g.batch * m * g.width());
    let mut packed = zeroed(q_len + 2 * kv_len);
    if n == 0 {
        // No queries: nothing flows back to the keys and values.
        return packed;
    }
    let tiles = ScoreTiles::new(g);
    let block_rows = tiles.rows;
    let part_rows = block_rows * n.div_ceil(block_rows).div_ceil(HEAD_PARTS);
    let mut dq = zeroed(g.batch * g.heads * n * d);
    let dkv_t: Vec<KeyGrads> = dq
        .par_chunks_mut(n * d)
        .enumerate()
        .map(|(t, dq)| {
            let head = (t / g.heads, t % g.heads);
            // Keys and values transposed once per head, for the products that read them
            // transposed (see `forward`).
            let (mut k_t, mut v_t) = (vec![0.0f32; d * m], vec![0.0f32; d * m]);
            g.head_transposed_into(k, m, head, &mut k_t);
            g.head_transposed_into(v, m, head, &mut v_t);
            let operands = Operands {
                q,
                k,
                k_t: &k_t,
                v_t: &v_t,
                upstream,
            };
            let parts: Vec<KeyGrads> = dq
                .par_chunks_mut(part_rows * d)
                .enumerate()
                .map(|(part, dq_part)| {
                    let mut sums = (vec![0.0; d * m], vec![0.0; d * m]);
                    let blocks = dq_part.chunks_mut(block_rows * d).enumerate();
                    for (i, dq_rows) in blocks {
                        let rows = (part * part_rows + i * block_rows, dq_rows.len() / d);
                        let block = (head, rows, tiles);
                        block_gradients(g, &operands, block, dq_rows, &mut sums, i > 0);
                    }
                    sums
                })
                .collect();
            let mut parts = parts.into_iter();
            let first = parts.next().expect("a head with queries has a part");
            parts.fold(first, |(mut dk, mut dv), (dk_part, dv_part)| {
                dk.iter_mut().zip(&dk_part).for_each(|(x, y)| *x += y);
                dv.iter_mut().zip(&dv_part).for_each(|(x, y)| *x += y);
                (dk, dv)
            })
        })
        .collect();
    let (dk_t, dv_t): (Vec<_>, Vec<_>) = dkv_t.into_iter().unzip();
    let (packed_q, packed_kv) = packed.split_at_mut(q_len);
    let (packed_k, packed_v) = packed_kv.split_at_mut(kv_len);
    g.merge_heads_into(&dq.chunks(n * d).collect::<Vec<_>>(), n, false, packed_q);
    g.merge_heads_into(&dk_t, m, true, packed_k);
    g.merge_heads_into(&dv_t, m, true, packed_v);
    packed
}

/// The parts each head's blocks of query rows are split into for the backward pass (fewer where
/// it has fewer blocks), so that a few heads (SD 2.1's five) still fill every core evenly. The
/// parts are fixed, not the pool's choice, so that the sums, and so the gradients' bits, are the
/// same at any batch and on any number of threads.
const HEAD_PARTS: usize = 2;

/// One head's `(dKᵀ, dVᵀ)`, or a part's share of them: `d × M` each.
type KeyGrads = (Vec<f32>, Vec<f32>);

/// What every block of one head's backward pass reads: the queries, the keys, the head's keys
/// and values transposed (`d × M`), and what the forward pass left ([`Upstream`]).
struct Operands<'a> {
    q: &'a [f32],
    k: &'a [f32],
    k_t: &'a [f32],
    v_t: &'a [f32],
    upstream: Upstream<'a>,
}

/// The backward pass of query rows `(first, rows)` of `head`, a tile of keys at a time: their dQ
/// into `dq_rows`, and their share of `(dKᵀ, dVᵀ)` added into `key_grads` (written over unless
/// `accumulate`). dK and dV are computed transposed (`dVᵀ = dOᵀ·P`, `dKᵀ = Qᵀ·dS`): that way
/// the `rows × keys` tile is a row-major operand the gemm crate reads as it is, where `Pᵀ·dO`
/// has it repack the tile element by element.
fn block_gradients(
    g: &Geometry,
    ops: &Operands,
    (head, (first, rows), tiles): ((usize, usize), (usize, usize), ScoreTiles),
    dq_rows: &mut [f32],
    (dk_t, dv_t): &mut KeyGrads,
    accumulate: bool,
) {
    let (n, m, d, stride) = (g.queries, g.keys, g.head_dim, tiles.stride);
    let scale = 1.0 / (d as f32).sqrt();
    let up = ops.upstream;
    let log_sum_exps = &up.log_sum_exps[(head.0 * g.heads + head.1) * n + first..][..rows];
    let (qh, q_t) = (
        g.head(ops.q, n, head, first),
        g.head_t(ops.q, n, head, first),
    );
    let dout = g.head(up.grad_out, n, head, first);
    let dout_t = g.head_t(up.grad_out, n, head, first);
    with_scratch(2 * rows * stride + rows, |scratch| {
        let (probs, rest) = scratch.split_at_mut(rows * stride);
        let (dp, deltas) = rest.split_at_mut(rows * stride);
        for (r, delta) in deltas.iter_mut().enumerate() {
            let grad_out = &g.head_from(up.grad_out, n, head, first + r)[..d];
            let out = &g.head_from(up.out, n, head, first + r)[..d];
            *delta = math::sum_zip(grad_out, out, |a, b| a * b);
        }
        for first_key in (0..m).step_by(tiles.keys) {
            let keys = tiles.keys.min(m - first_key);
            let kt = Mat::rows(&ops.k_t[first_key..], m);
            matmul(probs, stride, false, (rows, keys, d), qh, kt, Threads::One);
            probabilities_in_place(probs, keys, stride, scale, log_sum_exps);
            let transposed = (d, keys, rows);
            let (p, dv_t) = (Mat::rows(probs, stride), &mut dv_t[first_key..]);
            matmul(dv_t, m, accumulate, transposed, dout_t, p, Threads::One);
            let vt = Mat::rows(&ops.v_t[first_key..], m);
            matmul(dp, stride, false, (rows, keys, d), dout, vt, Threads::One);
            softmax_grad_rows(probs, deltas, dp, keys, stride, scale);
            let (ds, kh) = (Mat::rows(dp, stride), g.head(ops.k, m, head, first_key));
            matmul(
                dq_rows,
                d,
                first_key > 0,
                (rows, d, keys),
                ds,
                kh,
                Threads::One,
            );
            let dk_t = &mut dk_t[first_key..];
            matmul(dk_t, m, accumulate, transposed, q_t, ds, Threads::One);
        }
    });
}

/// `(q, k, v) → softmax(q·kᵀ/√d)·v`, with its backward. One op per call of [`attention`]: it
/// keeps its forward pass's log-sum-exps for its backward pass.
struct Attention {
    heads: usize,
    log_sum_exps: OnceLock<Vec<f32>>,
}

/// `(q, k, v) → [dQ | dK | dV]` for a given output gradient, the forward pass's output and its
/// log-sum-exps (no backward of its own).
struct AttentionGrad<'a> {
    heads: usize,
    grad_out: &'a [f32],
    out: &'a [f32],
    log_sum_exps: &'a [f32],
}

type Operand<'a> = (&'a CpuStorage, &'a Layout);

/// The geometry and values of an op's `(q, k, v)` operands.
fn operands<'a>(
    heads: usize,
    (q, q_l): Operand<'a>,
    (k, k_l): Operand<'a>,
    (v, v_l): Operand<'a>,
) -> Result<(Geometry, [&'a [f32]; 3])> {
    let g = Geometry::new(q_l.dims(), k_l.dims(), v_l.dims(), heads)?;
    let values = [
        f32_slice(q, q_l, "attention: queries")?,
        f32_slice(k, k_l, "attention: keys")?,
        f32_slice(v, v_l, "attention: values")?,
    ];
    Ok((g, values))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "cpu-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, [q, k, v]) = operands(self.heads, (q, q_l), (k, k_l), (v, v_l))?;
        let (out, log_sum_exps) = forward(&g, q, k, v);
        // Set once: `attention` makes a new op for every call, and candle runs an op's forward
        // pass once.
        let first = self.log_sum_exps.set(log_sum_exps).is_ok();
        debug_assert!(first, "attention: a second forward pass of one op");
        Ok((CpuStorage::F32(out), q_l.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let log_sum_exps = self.log_sum_exps.get().ok_or_else(|| {
            candle_core::Error::Msg("attention: backward pass before the forward pass".into())
        })?;
        // Read in place: copies of the output and its gradient would run on this thread alone
        // while the pool waits.
        let (grad_out, out) = (grad_out.contiguous()?, out.contiguous()?);
        let what = "attention backward";
        let packed = with_f32_values(&[&grad_out, &out], what, |values| {
            let op = AttentionGrad {
                heads: self.heads,
                grad_out: values[0],
                out: values[1],
                log_sum_exps,
            };
            q.apply_op3_no_bwd(k, v, &op)
        })?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = packed.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = packed.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = packed.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        // Keys and values from a frozen text encoder need no gradient.
        let keep = |t: &Tensor, grad: Tensor| t.track_op().then_some(grad);
        Ok((Some(dq), keep(k, dk), keep(v, dv)))
    }
}

impl CustomOp3 for AttentionGrad<'_> {
    fn name(&self) -> &'static str {
        "cpu-attention-grad"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_l: &Layout,
        k: &CpuStorage,
        k_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, [q, k, v]) = operands(self.heads, (q, q_l), (k, k_l), (v, v_l))?;
        let rows = g.batch * g.heads * g.queries;
        if self.grad_out.len() != q.len()
            || self.out.len() != q.len()
            || self.log_sum_exps.len() != rows
        {
            return Err(candle_core::Error::Msg(format!(
                "attention: output gradient ({}), output ({}) and log-sum-exps ({}) do not match \
                 the queries (expected {}, {} and {rows})",
                self.grad_out.len(),
                self.out.len(),
                self.log_sum_exps.len(),
                q.len(),
                q.len(),
            )));
        }
        let upstream = Upstream {
            grad_out: self.grad_out,
            out: self.out,
            log_sum_exps: self.log_sum_exps,
        };
        let packed = backward(&g, q, k, v, upstream);
        let len = packed.len();
        Ok((CpuStorage::F32(packed), Shape::from(len)))
    }
}

/// `softmax(q·kᵀ/√d)·v` over `heads` heads of `[B, N, H·d]` queries and `[B, M, H·d]` keys and
/// values, with a backward to all three.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let op = Attention {
        heads,
        log_sum_exps: OnceLock::new(),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::test_support::max_rel_diff;
    use candle_core::{Device, Var};

    /// Output and all three gradients against attention composed from candle's own ops and
    /// differentiated by candle's autograd.
    #[test]
    fn matches_composed_attention_and_its_gradients() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(5);
        // (batch, queries, keys, heads, head_dim)
        // Both passes cut the scores into blocks of at most 256 query rows against tiles of at
        // most 1024 keys here (`ScoreTiles`): 600 queries against 1500 keys make three blocks,
        // the last one short, in two parts of the backward pass (`HEAD_PARTS`: two blocks and
        // one), and two tiles, the last one short; the cases with 20 000 keys have 20 tiles.
        let cases = [
            (1, 600, 1500, 1, 4),
            (2, 7, 5, 3, 4),
            (1, 16, 16, 2, 8),
            (2, 9, 77, 1, 6),
            (1, 80, 20_000, 2, 4),
            (1, 150, 20_000, 1, 4),
            // An output the pool merges, its rows off the merge's bands.
            (1, 4100, 3, 2, 8),
            // Key and value gradients the pool merges (transposed), over two samples.
            (2, 3, 4100, 2, 8),
        ];
        for (b, n, m, heads, d) in cases {
            let var = |rng: &mut Rng, rows| {
                Var::from_tensor(&rng.normal_tensor((b, rows, heads * d), &dev).unwrap()).unwrap()
            };
            let (q, k, v) = (var(&mut rng, n), var(&mut rng, m), var(&mut rng, m));
            let split = |x: &Tensor, rows| {
                x.reshape((b, rows, heads, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let scores = (split(&q, n).matmul(&split(&k, m).t().unwrap()).unwrap()
                / (d as f64).sqrt())
            .unwrap();
            let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap();
            let reference = probs
                .matmul(&split(&v, m))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, n, heads * d))
                .unwrap();
            let ours = attention(&q, &k, &v, heads).unwrap();
            assert!(max_rel_diff(&ours, &reference) < 1e-5, "output {b} {n} {m}");

            let upstream = rng.normal_tensor((b, n, heads * d), &dev).unwrap();
            let loss = |y: &Tensor| (y * &upstream).unwrap().sum_all().unwrap();
            let expected = loss(&reference).backward().unwrap();
            let got = loss(&ours).backward().unwrap();
            for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
                let diff = max_rel_diff(got.get(x).unwrap(), expected.get(x).unwrap());
                assert!(diff < 1e-5, "d{name} {b} {n} {m}: {diff}");
            }
        }
    }

    /// A sample's output and gradients are the same bits alone as beside another sample: what
    /// lets data-parallel training match one process at the whole batch (lora-train's
    /// distributed test) up to the other layers' sums.
    #[test]
    fn each_sample_gets_the_same_bits_at_any_batch() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(1);
        // (queries, keys, heads, head_dim): one tile of keys; two blocks of rows, so two parts
        // of the backward pass (`HEAD_PARTS`), against three tiles; one block against nine.
        let cases = [
            (64, 77, 2, 8),
            (300, 2 * KEY_TILE + 9, 2, 4),
            (150, 9000, 2, 4),
        ];
        for (n, m, heads, d) in cases {
            let var = |rng: &mut Rng, rows| {
                Var::from_tensor(&rng.normal_tensor((2, rows, heads * d), &dev).unwrap()).unwrap()
            };
            let (q, k, v) = (var(&mut rng, n), var(&mut rng, m), var(&mut rng, m));
            let upstream = rng.normal_tensor((2, n, heads * d), &dev).unwrap();
            let second = |t: &Tensor| t.narrow(0, 1, 1).unwrap();
            let run = |q: &Tensor, k: &Tensor, v: &Tensor, upstream: &Tensor| {
                let out = attention(q, k, v, heads).unwrap();
                let grads = (&out * upstream)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let grad = |x: &Tensor| grads.get(x).unwrap().clone();
                [out, grad(q), grad(k), grad(v)]
            };
            let both = run(&q, &k, &v, &upstream);
            let alone_var = |x: &Var| Var::from_tensor(&second(x)).unwrap();
            let (q1, k1, v1) = (alone_var(&q), alone_var(&k), alone_var(&v));
            let alone = run(&q1, &k1, &v1, &second(&upstream));
            for (name, (b, a)) in ["output", "dq", "dk", "dv"]
                .iter()
                .zip(both.iter().zip(&alone))
            {
                let b = second(b).flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert!(!a.is_empty());
                assert_eq!(b, a, "{name}, {n} queries, {m} keys");
            }
        }
    }

    #[test]
    fn mismatched_heads_are_errors() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 6), candle_core::DType::F32, &dev).unwrap();
        let err = attention(&q, &q, &q, 4).unwrap_err();
        assert!(err.to_string().contains("do not fit 4 heads"), "{err}");
    }

    /// No keys, or heads of size 0, are errors rather than a panic in the kernels.
    #[test]
    fn empty_keys_and_heads_are_errors() {
        let dev = Device::Cpu;
        let zeros = |shape: (usize, usize, usize)| {
            Tensor::zeros(shape, candle_core::DType::F32, &dev).unwrap()
        };
        let (q, no_keys) = (zeros((1, 4, 6)), zeros((1, 0, 6)));
        let err = attention(&q, &no_keys, &no_keys, 2).unwrap_err();
        assert!(err.to_string().contains("M > 0 keys"), "{err}");
        let (q, k) = (zeros((1, 4, 0)), zeros((1, 3, 0)));
        assert!(attention(&q, &k, &k, 2).is_err());
    }

    /// A NaN in one query reaches that query's output row (and not the others), as it does in
    /// PyTorch, instead of being weighted ~0 and hidden: over one tile of keys and over several.
    #[test]
    fn a_nan_query_makes_its_output_row_nan() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(3);
        for m in [7, 2 * KEY_TILE + 5] {
            let (b, n, heads, d) = (1, 5, 2, 4);
            let mut q = rng
                .normal_tensor((b, n, heads * d), &dev)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap();
            q[0][2][1] = f32::NAN;
            let q = Tensor::new(q, &dev).unwrap();
            let k = rng.normal_tensor((b, m, heads * d), &dev).unwrap();
            let v = rng.normal_tensor((b, m, heads * d), &dev).unwrap();
            let out = attention(&q, &k, &v, heads)
                .unwrap()
                .to_vec3::<f32>()
                .unwrap();
            for (row, values) in out[0].iter().enumerate() {
                // Query row 2's NaN sits in head 0 (feature 1 < d): that head's outputs are NaN.
                let nan = values.iter().map(|x| x.is_nan()).collect::<Vec<_>>();
                let expected = (0..heads * d)
                    .map(|c| row == 2 && c < d)
                    .collect::<Vec<_>>();
                assert_eq!(nan, expected, "{m} keys, row {row}: {values:?}");
            }
        }
    }

    /// A row whose scores are −∞ over every tile has no softmax: its output is NaN (as from
    /// PyTorch's softmax), not the mean of the last tile's values.
    #[test]
    fn a_row_of_minus_infinite_scores_is_nan() {
        let dev = Device::Cpu;
        for m in [5, 2 * KEY_TILE + 3] {
            // Query row 0 meets every key at −∞ (products past f32's range); row 1 is finite.
            let q = Tensor::new(&[[[1e20f32, 1e20], [1.0, 0.5]]], &dev).unwrap();
            let k = Tensor::full(-1e20f32, (1, m, 2), &dev).unwrap();
            let v = Tensor::ones((1, m, 2), candle_core::DType::F32, &dev).unwrap();
            let out = attention(&q, &k, &v, 1).unwrap().to_vec3::<f32>().unwrap();
            assert!(
                out[0][0].iter().all(|x| x.is_nan()),
                "{m} keys: {:?}",
                out[0][0]
            );
            // Equal scores: the mean of values of one.
            let finite = out[0][1].iter().all(|&x| (x - 1.0).abs() < 1e-5);
            assert!(finite, "{m} keys: {:?}", out[0][1]);
        }
    }

    /// A first tile of keys whose scores are all −∞ (products past f32's range) does not poison
    /// the rows: the later tile's finite scores decide them, as in a softmax over the whole row.
    #[test]
    fn a_tile_of_minus_infinite_scores_is_weighted_zero() {
        let dev = Device::Cpu;
        let (n, m, d) = (3, KEY_TILE + 4, 2);
        let q = Tensor::full(1e20f32, (1, n, d), &dev).unwrap();
        // The first tile's keys make scores of −∞, the last four finite ones, one per key.
        let keys: Vec<f32> = (0..m)
            .flat_map(|j| {
                let value = if j < KEY_TILE {
                    -1e20
                } else {
                    (j - KEY_TILE) as f32
                };
                [value; 2]
            })
            .collect();
        let k = Tensor::from_vec(keys, (1, m, d), &dev).unwrap();
        let values: Vec<f32> = (0..m * d).map(|i| i as f32).collect();
        let v = Tensor::from_vec(values, (1, m, d), &dev).unwrap();
        let out = attention(&q, &k, &v, 1).unwrap().to_vec3::<f32>().unwrap();
        // The largest score, 1e20 · 3 · 2, outweighs the others by e^(1e20): the last key's values.
        let last = ((m - 1) * d) as f32;
        for row in &out[0] {
            assert_eq!(row, &vec![last, last + 1.0], "{row:?}");
        }
    }
}
