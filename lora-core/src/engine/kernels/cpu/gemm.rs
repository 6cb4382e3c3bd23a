//! What the CPU kernels share: when they apply, bounds-checked f32 matrix products on strided
//! slices, per-thread scratch, reading an op's operand as a slice, and the frozen linear layer.
//! The `gemm` crate (what candle's CPU matmul calls) reads any row/column strides, so
//! transposes, head splits and output bands are views, never copies.

use std::cell::RefCell;
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};
use gemm::Parallelism;

use super::buffers::{from_chunks, zeroed};

/// The linear layer's bias is copied into its output rows in tasks of at least this many values,
/// so a small layer's copy stays on the calling thread.
const BIAS_VALUES_PER_TASK: usize = 1 << 16;

/// Whether the CPU kernels apply: every tensor is on the CPU, in f32.
pub(crate) fn cpu_f32(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// A matrix view into `data`: element `(r, c)` at `r·row_stride + c·col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// Rows `row_stride` apart, columns adjacent.
    pub fn rows(data: &'a [f32], row_stride: usize) -> Self {
        Self {
            data,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose of a matrix whose rows are `row_stride` apart.
    pub fn transposed(data: &'a [f32], row_stride: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: row_stride,
        }
    }

    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// Whether one product may use candle's CPU thread count or must stay on the calling thread
/// (when the caller already runs products in parallel).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    All,
    One,
}

/// candle's CPU thread count, read once: `get_num_threads` parses /proc/cpuinfo on every call
/// unless `RAYON_NUM_THREADS` is set.
fn thread_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(candle_core::utils::get_num_threads)
}

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`, `dst` rows `dst_row_stride` apart; accumulates into
/// `dst` when `accumulate`, overwrites it otherwise.
pub(crate) fn matmul(
    dst: &mut [f32],
    dst_row_stride: usize,
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    lhs: Mat,
    rhs: Mat,
    threads: Threads,
) {
    assert!(
        Mat::rows(dst, dst_row_stride).covers(m, n) && lhs.covers(m, k) && rhs.covers(k, n),
        "matrix product out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|r| dst[r * dst_row_stride..][..n].fill(0.0));
        }
        return;
    }
    let product = Product { lhs, rhs, inner: k };
    // SAFETY: the bounds of all three matrices were checked above, `dst` is borrowed mutably
    // and so cannot alias `lhs` or `rhs`.
    unsafe {
        gemm_unchecked(
            (dst.as_mut_ptr(), dst_row_stride),
            accumulate,
            (m, n),
            product,
            threads,
        )
    }
}

/// [`matmul`] into `dst` without its checks. Without `accumulate` gemm never reads `dst` (in
/// gemm-common 0.19 its `alpha` becomes zero, and every kernel then stores without loading), so
/// `dst` may point at memory not yet written.
///
/// # Safety
///
/// `dst` must be valid for writes (and for reads if `accumulate`) at every element of the
/// `m × n` matrix with rows `dst_row_stride` apart, which must not overlap the product's
/// operands; they must cover their `m × inner` and `inner × n` matrices.
unsafe fn gemm_unchecked(
    (dst, dst_row_stride): (*mut f32, usize),
    accumulate: bool,
    (m, n): (usize, usize),
    Product { lhs, rhs, inner: k }: Product,
    threads: Threads,
) {
    let count = thread_count();
    let parallelism = match threads {
        Threads::All if count > 1 => Parallelism::Rayon(count),
        _ => Parallelism::None,
    };
    // SAFETY: the caller's.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A term `lhs·rhs` of [`sum_of_products`], `inner` the length of the sums.
#[derive(Clone, Copy)]
pub(crate) struct Product<'a> {
    pub lhs: Mat<'a>,
    pub rhs: Mat<'a>,
    pub inner: usize,
}

/// `Σ lhsᵢ·rhsᵢ` over `products`, `[rows × cols]`, plus `bias` (`cols` values) on every row,
/// in a new buffer on the pool. Without a bias the first product writes the buffer before
/// anything reads it (past one row or column), so it is never cleared: one pass over memory
/// fewer than zeroing it and then accumulating (the frozen linear layers' outputs and input
/// gradients), and none at all on the calling thread. Each further product (an adapter's
/// low-rank term) accumulates in place rather than into a tensor of its own that a sum would
/// read back.
pub(crate) fn sum_of_products(
    (rows, cols): (usize, usize),
    bias: Option<&[f32]>,
    products: &[Product],
) -> Vec<f32> {
    let len = rows * cols;
    let (mut y, rest) = match (bias.filter(|_| cols > 0), products) {
        (Some(bias), _) => {
            assert_eq!(bias.len(), cols, "bias length");
            let chunk_rows = BIAS_VALUES_PER_TASK.div_ceil(cols);
            let y = from_chunks(len, chunk_rows * cols, |_, chunk| {
                for row in chunk.chunks_exact_mut(cols) {
                    row.copy_from_slice(bias);
                }
            });
            (y, products)
        }
        // gemm's matrix-vector paths (one row or one column) view the destination as a slice,
        // which must hold values: such outputs are small, and zeroed.
        (None, [first, rest @ ..]) if rows > 1 && cols > 1 => {
            assert!(
                first.lhs.covers(rows, first.inner) && first.rhs.covers(first.inner, cols),
                "matrix product out of bounds"
            );
            let mut y = Vec::with_capacity(len);
            // SAFETY: the capacity holds the `rows × cols` result, rows `cols` apart, and a new
            // buffer overlaps nothing; the operands' bounds were checked above. Without
            // `accumulate` gemm writes every element of the result and reads none, so all `len`
            // values are initialised before `set_len`.
            unsafe {
                let dst = y.spare_capacity_mut().as_mut_ptr().cast();
                gemm_unchecked((dst, cols), false, (rows, cols), *first, Threads::All);
                y.set_len(len);
            }
            (y, rest)
        }
        (None, _) => (zeroed(len), products),
    };
    for p in rest {
        matmul(
            &mut y,
            cols,
            true,
            (rows, cols, p.inner),
            p.lhs,
            p.rhs,
            Threads::All,
        );
    }
    y
}

thread_local! {
    /// A per-thread work buffer kept between calls: a fresh one each call would cost the
    /// kernel's page zeroing every time.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// f32 values per cache line (64 bytes): the alignment of [`with_scratch`]'s buffer.
pub(crate) const LINE_VALUES: usize = 16;

/// Runs `f` on this thread's work buffer of `len` values (contents unspecified), which starts on
/// a cache line. Why: for products with few rows (`m` of 40, such as attention's `dVᵀ = dOᵀ·P`)
/// the gemm crate reads the right-hand matrix in place, markedly slower when that matrix's rows
/// are not 32-byte aligned (measured in benches/RESULTS.md); a `Vec`'s allocation is only
/// 16-byte aligned.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len + LINE_VALUES {
            buf.resize(len + LINE_VALUES, 0.0);
        }
        let line_bytes = LINE_VALUES * std::mem::size_of::<f32>();
        let past_line = (buf.as_ptr() as usize % line_bytes) / std::mem::size_of::<f32>();
        let start = (LINE_VALUES - past_line) % LINE_VALUES;
        f(&mut buf[start..start + len])
    })
}

/// The contiguous f32 values of an operand; `what` names it in errors ("conv2d: kernel").
pub(crate) fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    let error = |needed: &str| candle_core::Error::Msg(format!("{what} must be {needed}"));
    let CpuStorage::F32(values) = storage else {
        return Err(error("f32"));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| error("contiguous"))?;
    Ok(&values[start..end])
}

/// Runs `f` on the values of `tensors`, each contiguous f32 on the CPU, read in place (no copy)
/// under their storages' read locks; `what` names the op in errors. `f` must not write to any of
/// them (that would wait for the locks forever), and none may be written from another thread
/// meanwhile (a tensor given twice takes its lock twice, which a waiting writer could block).
pub(crate) fn with_f32_values<R>(
    tensors: &[&Tensor],
    what: &str,
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let values = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            Storage::Cpu(storage) => f32_slice(storage, layout, what),
            _ => Err(candle_core::Error::Msg(format!(
                "{what}: operands must be on the CPU"
            ))),
        })
        .collect::<Result<Vec<&[f32]>>>()?;
    f(&values)
}

/// Which side of a frozen linear layer's weight `[out, in]` an operand's last axis meets.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    /// The forward pass's input `[…, in]`, giving `[…, out]`.
    Inputs,
    /// The input gradient's `dy` `[…, out]`, giving `[…, in]`.
    Outputs,
}

impl Side {
    /// The inner length and the result's columns of a product with a weight `(out, in)`.
    fn inner_and_cols(self, (outputs, inputs): (usize, usize)) -> (usize, usize) {
        match self {
            Side::Inputs => (inputs, outputs),
            Side::Outputs => (outputs, inputs),
        }
    }

    /// The shape of a matrix that meets `inner` values on this side to give `cols`: a weight or
    /// up-projection `[cols, inner]` on the input side, a weight or down-projection
    /// `[inner, cols]` on the output side.
    fn matrix_dims(self, inner: usize, cols: usize) -> (usize, usize) {
        match self {
            Side::Inputs => (cols, inner),
            Side::Outputs => (inner, cols),
        }
    }

    /// `lhs` `[rows, inner]` times `matrix` (shaped as [`Self::matrix_dims`] says): transposed
    /// on the input side, as stored on the output side.
    fn product<'a>(
        self,
        lhs: &'a [f32],
        matrix: &'a [f32],
        inner: usize,
        cols: usize,
    ) -> Product<'a> {
        let rhs = match self {
            Side::Inputs => Mat::transposed(matrix, inner),
            Side::Outputs => Mat::rows(matrix, cols),
        };
        Product {
            lhs: Mat::rows(lhs, inner),
            rhs,
            inner,
        }
    }
}

/// The rows (the product of the leading axes), the weight's `(out, in)` and the result's shape
/// of a frozen linear layer's product of `a` with the weight `w`, or an error naming `op`.
fn frozen_linear_dims(
    op: &str,
    a: &Layout,
    w: &Layout,
    side: Side,
) -> Result<(usize, (usize, usize), Shape)> {
    let (Some((&features, leading)), &[outputs, inputs]) = (a.dims().split_last(), w.dims()) else {
        return Err(candle_core::Error::Msg(format!(
            "{op}: operand {:?} must have a feature axis, weight {:?} must be [out, in]",
            a.dims(),
            w.dims()
        )));
    };
    let (expected, produced) = side.inner_and_cols((outputs, inputs));
    if features != expected {
        return Err(candle_core::Error::Msg(format!(
            "{op}: operand {:?} does not fit weight {:?}",
            a.dims(),
            w.dims()
        )));
    }
    let mut shape = a.dims().to_vec();
    *shape.last_mut().expect("split above") = produced;
    Ok((leading.iter().product(), (outputs, inputs), shape.into()))
}

/// A low-rank term's values: `t` `[rows, rank]` and its projection (see [`Side::product`]).
type TermValues<'a> = (&'a [f32], &'a [f32], usize);

/// A frozen linear layer's product on `side` of `a` (`rows` rows) with the weight `w`
/// `[out, in]`, plus `bias` on every row and each low-rank term, in a new buffer (see
/// [`sum_of_products`]); an error naming `op` when the bias does not fit.
fn frozen_linear_sum(
    op: &str,
    side: Side,
    (rows, weight_dims): (usize, (usize, usize)),
    (a, w): (&[f32], &[f32]),
    bias: Option<&[f32]>,
    terms: &[TermValues],
) -> Result<Vec<f32>> {
    let (inner, cols) = side.inner_and_cols(weight_dims);
    if let Some(bias) = bias.filter(|b| b.len() != cols) {
        let (outputs, inputs) = weight_dims;
        return Err(candle_core::Error::Msg(format!(
            "{op}: bias of {} values for a weight {:?}",
            bias.len(),
            [outputs, inputs]
        )));
    }
    let products: Vec<Product> = std::iter::once(side.product(a, w, inner, cols))
        .chain(
            terms
                .iter()
                .map(|&(t, m, rank)| side.product(t, m, rank, cols)),
        )
        .collect();
    Ok(sum_of_products((rows, cols), bias, &products))
}

/// `x·Wᵀ + b` for a frozen `W` `[out, in]` (and frozen `b`) as one op whose backward is the
/// input gradient `dy·W` only: the output is computed in the graph, not re-attached as a copy.
struct Linear {
    bias: Option<Vec<f32>>,
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "cpu-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, weight_dims, shape) = frozen_linear_dims("linear", x_l, w_l, Side::Inputs)?;
        let x = f32_slice(x, x_l, "linear: input")?;
        let w = f32_slice(w, w_l, "linear: weight")?;
        let (side, bias) = (Side::Inputs, self.bias.as_deref());
        let y = frozen_linear_sum("linear", side, (rows, weight_dims), (x, w), bias, &[])?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        _: &Tensor,
        w: &Tensor,
        _: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = grad_out
            .contiguous()?
            .apply_op2_no_bwd(w, &LinearInputGrad)?;
        Ok((Some(dx), None))
    }
}

/// [`Linear`]'s input gradient `dy·W`, `[…, out] → […, in]`, by our product into a new buffer
/// that it writes without clearing first (candle's matmul zeroes its output on the calling
/// thread).
struct LinearInputGrad;

impl CustomOp2 for LinearInputGrad {
    fn name(&self) -> &'static str {
        "cpu-linear-input-grad"
    }

    fn cpu_fwd(
        &self,
        dy: &CpuStorage,
        dy_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = "linear input gradient";
        let (rows, weight_dims, shape) = frozen_linear_dims(op, dy_l, w_l, Side::Outputs)?;
        let dy = f32_slice(dy, dy_l, "linear input gradient: gradient")?;
        let w = f32_slice(w, w_l, "linear input gradient: weight")?;
        let dx = frozen_linear_sum(op, Side::Outputs, (rows, weight_dims), (dy, w), None, &[])?;
        Ok((CpuStorage::F32(dx), shape))
    }
}

/// Whether [`linear_op`] applies.
pub(crate) fn linear_applies(x: &Tensor, weight: &Tensor) -> bool {
    cpu_f32(&[x, weight]) && x.rank() >= 1 && weight.rank() == 2
}

/// `x·Wᵀ + b` with frozen `W` and `b` on the CPU, with the input gradient as its backward.
pub(crate) fn linear_op(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let bias = bias
        .map(|b| b.flatten_all()?.to_vec1::<f32>())
        .transpose()?;
    x.contiguous()?
        .apply_op2(&weight.contiguous()?, Linear { bias })
}

/// Whether [`linear_with_low_rank`] applies.
pub(crate) fn linear_with_low_rank_applies(
    a: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    terms: &[(&Tensor, &Tensor)],
) -> bool {
    let others = bias
        .into_iter()
        .chain(terms.iter().flat_map(|&(t, m)| [t, m]));
    linear_applies(a, weight) && cpu_f32(&others.collect::<Vec<_>>())
}

/// A frozen linear layer's product with low-rank terms added, computed outside the graph (it
/// records nothing): on the [`Side::Inputs`] side `x·Wᵀ + b + Σ tᵢ·Uᵢᵀ` for `x` `[…, in]`, each
/// `tᵢ` `[rows, r]` and `Uᵢ` `[out, r]` (a LoRA's up-projection of its scaled rank-r
/// projection); on the [`Side::Outputs`] side `dy·W + Σ gᵢ·Dᵢ` for `dy` `[…, out]` and `Dᵢ`
/// `[r, in]` (the input gradient, through each down-projection). The terms accumulate into the
/// layer's output buffer (see [`sum_of_products`]).
pub(crate) fn linear_with_low_rank(
    side: Side,
    a: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    terms: &[(&Tensor, &Tensor)],
) -> Result<Tensor> {
    let op = match side {
        Side::Inputs => "linear with low-rank terms",
        Side::Outputs => "linear input gradient with low-rank terms",
    };
    let (a, weight) = (a.contiguous()?, weight.contiguous()?);
    let (rows, weight_dims, shape) = frozen_linear_dims(op, a.layout(), weight.layout(), side)?;
    let (_, cols) = side.inner_and_cols(weight_dims);
    let bias = bias
        .map(|b| b.flatten_all()?.to_vec1::<f32>())
        .transpose()?;
    let device = a.device().clone();
    let (mut tensors, mut ranks) = (vec![a, weight], Vec::with_capacity(terms.len()));
    for &(t, m) in terms {
        let (t_rows, rank) = t.dims2()?;
        if t_rows != rows || m.dims2()? != side.matrix_dims(rank, cols) {
            return Err(candle_core::Error::Msg(format!(
                "{op}: term {:?} · {:?} does not fit {rows} rows of {cols} values",
                t.dims(),
                m.dims()
            )));
        }
        tensors.extend([t.contiguous()?, m.contiguous()?]);
        ranks.push(rank);
    }
    let y = with_f32_values(&tensors.iter().collect::<Vec<_>>(), op, |values| {
        let [a, weight, term_values @ ..] = values else {
            unreachable!("the operand and the weight come first");
        };
        let terms: Vec<TermValues> = (ranks.iter().zip(term_values.chunks_exact(2)))
            .map(|(&rank, pair)| (pair[0], pair[1], rank))
            .collect();
        let dims = (rows, weight_dims);
        frozen_linear_sum(op, side, dims, (a, weight), bias.as_deref(), &terms)
    })?;
    Tensor::from_vec(y, shape, &device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Operands that do not fit the weight are errors naming the op and the shapes.
    #[test]
    fn mismatched_linear_operands_are_errors() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
        let x = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let err = linear_op(&x, &w, None).unwrap_err().to_string();
        assert!(
            err.contains("linear: operand [2, 4] does not fit weight [3, 5]"),
            "{err}"
        );
        let bias = Tensor::zeros(4, DType::F32, &dev).unwrap();
        let x = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        let err = linear_op(&x, &w, Some(&bias)).unwrap_err().to_string();
        assert!(
            err.contains("bias of 4 values for a weight [3, 5]"),
            "{err}"
        );
        let dy = Tensor::zeros((2, 5), DType::F32, &dev).unwrap();
        let err = dy
            .apply_op2_no_bwd(&w, &LinearInputGrad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("linear input gradient: operand [2, 5] does not fit"),
            "{err}"
        );
        let scalar = Tensor::new(1.0f32, &dev).unwrap();
        let err = linear_op(&scalar, &w, None).unwrap_err().to_string();
        assert!(err.contains("must have a feature axis"), "{err}");
    }

    /// Without `accumulate` gemm never reads its destination (what `sum_of_products` relies on
    /// to skip clearing a new buffer): a destination full of NaN ends up holding exactly the
    /// product, for every path gemm takes (inner length 0, ≤ 2, small outputs, matrix-vector
    /// shapes, and a large product split over the pool and over the inner length).
    #[test]
    fn products_never_read_the_destination_they_overwrite() {
        let cases = [
            (3, 4, 0),
            (5, 6, 2),
            (7, 9, 11),
            (1, 40, 33),
            (40, 1, 33),
            (300, 200, 700),
        ];
        for (m, n, k) in cases {
            let lhs: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
            let mut dst = vec![f32::NAN; m * n];
            let (a, b) = (Mat::rows(&lhs, k), Mat::rows(&rhs, n));
            // SAFETY: `dst` holds `m × n` values, rows `n` apart; `lhs` and `rhs` cover theirs.
            unsafe {
                let product = Product {
                    lhs: a,
                    rhs: b,
                    inner: k,
                };
                gemm_unchecked((dst.as_mut_ptr(), n), false, (m, n), product, Threads::All);
            }
            let mut wrong = 0;
            for (i, j) in (0..m).flat_map(|i| (0..n).map(move |j| (i, j))) {
                let exact: f32 = (0..k).map(|l| lhs[i * k + l] * rhs[l * n + j]).sum();
                // Small integers: every partial sum is exact in f32 whatever the order.
                wrong += usize::from(dst[i * n + j] != exact);
            }
            assert_eq!(wrong, 0, "{m}×{n}, inner {k}");
        }
    }

    #[test]
    fn scratch_starts_on_a_cache_line_whatever_its_length() {
        let line_bytes = LINE_VALUES * std::mem::size_of::<f32>();
        // Growing lengths reallocate the buffer, shrinking ones reuse it.
        for len in [1, 7, 1000, 100_003, 17, 250_000, 0] {
            let (address, got) = with_scratch(len, |s| (s.as_ptr() as usize, s.len()));
            assert_eq!(got, len);
            assert_eq!(address % line_bytes, 0, "length {len}");
        }
    }
}
