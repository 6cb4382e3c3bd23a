//! 2-D convolution on the CPU for f32 tensors: the forward pass, the input gradient and the
//! kernel gradient, each as an im2col of whole rows plus one matrix product per sample, or one
//! for the whole batch where the kernel outweighs the batch's columns (small maps); a forward
//! pass on maps under 1024 positions also runs one product per group of samples.
//!
//! Why our own: candle's CPU conv2d re-flattens the kernel into a new layout on every call (a
//! strided copy of up to 59 MB per SD1.5 layer), transposes the input to NHWC, and gathers
//! its im2col one scalar at a time; that and its scalar output scatter took more time than the
//! matrix products in an SD1.5 LoRA step. Here the kernel `[O, C, kh, kw]` is used in place as
//! the `[O, C·kh·kw]` matrix, im2col rows are built from contiguous row copies in NCHW order, and
//! the product (the `gemm` crate, which candle's matmul also uses) writes straight into the NCHW
//! output. The input gradient is `Wᵀ·dy` scattered back by col2im, so no flipped kernel is
//! stored. Bands of output rows bound the im2col scratch buffer (large VAE maps). 3×3 stride-1
//! convolutions with padding 1, at least 16 channels on each side and maps large enough go
//! through [`winograd`] instead, forward and input gradient (there the flipped kernel is
//! transformed on each call).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::buffers::{for_each_band, zeroed};
use super::gemm::{cpu_f32, f32_slice, matmul, with_scratch, Mat, Threads};
use super::math;
use super::winograd;
use crate::engine::autograd::grad_if_tracked;

/// Most f32 values an im2col band may hold (16 MiB), and the whole-batch product's columns and
/// result together; a band is at least one output row.
const MAX_BAND_VALUES: usize = 1 << 22;

/// Output positions per sample from which the forward pass runs a product per sample (see
/// [`ConvGeometry::sample_group`]): grouping samples below it took an FID Inception pass from
/// 5.50 to 4.6 s on a 2-core Xeon and moved no SD 1.5 UNet step (benches/RESULTS.md,
/// 2026-12-07 06:49); at 35² (1225) it gained nothing.
const GROUP_BELOW_POSITIONS: usize = 1024;

/// The shape of one convolution: input `[B, C, H, W]`, kernel `[O, C, kh, kw]`, zero padding
/// `(ph, pw)` on both sides of the rows and columns, equal strides, no dilation or groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvGeometry {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub padding: (usize, usize),
    pub stride: usize,
}

impl ConvGeometry {
    pub fn new(
        input: (usize, usize, usize, usize),
        kernel: (usize, usize, usize, usize),
        padding: (usize, usize),
        stride: usize,
    ) -> Result<Self> {
        let (batch, c_in, h, w) = input;
        let (c_out, k_c, kh, kw) = kernel;
        let (ph, pw) = padding;
        if k_c != c_in || stride == 0 || h + 2 * ph < kh || w + 2 * pw < kw {
            return Err(candle_core::Error::Msg(format!(
                "conv2d: input {input:?} does not fit kernel {kernel:?} with padding {padding:?} \
                 and stride {stride}"
            )));
        }
        Ok(Self {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            padding,
            stride,
        })
    }

    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.padding.0 - self.kh) / self.stride + 1
    }

    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.padding.1 - self.kw) / self.stride + 1
    }

    /// Rows of the im2col matrix: one per (input channel, kernel tap).
    fn taps(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    /// A 1×1 stride-1 unpadded convolution is a plain matrix product on the input itself.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.padding == (0, 0) && self.stride == 1
    }

    fn in_plane(&self) -> usize {
        self.h * self.w
    }

    fn out_plane(&self) -> usize {
        self.out_h() * self.out_w()
    }

    /// Whether the whole batch goes through one product, `[O, C·kh·kw]·[C·kh·kw, B·Ho·Wo]`,
    /// instead of one per sample: when a kernel row (`C·kh·kw` values) is at least as long as
    /// the batch's `B·Ho·Wo` columns, repacking the kernel for each sample (the product copies
    /// its operands into its own layout) would cost more than dealing the product's columns out
    /// to the samples. At a batch of 2 or 4 that is a UNet's 4² level and the 8² level's
    /// 1280-input layers; the columns and the product together must fit [`MAX_BAND_VALUES`],
    /// which the 8² level's 2560- and 1920-input layers at batch 4 do not.
    fn whole_batch(&self) -> bool {
        let columns = self.batch * self.out_plane();
        self.batch > 1
            && self.taps() >= columns
            && (self.taps() + self.c_out) * columns <= MAX_BAND_VALUES
    }

    /// Samples per product for the forward pass where [`Self::whole_batch`] does not apply but
    /// a sample has fewer than [`GROUP_BELOW_POSITIONS`] output positions: a product per sample
    /// then packs the whole kernel for a few hundred columns, so the samples go through one
    /// product in groups instead (im2col of the group, then its columns dealt out): as few
    /// groups as [`MAX_BAND_VALUES`] allows, ⌈B / groups⌉ samples each, the last taking the rest.
    /// `None` where a group would hold one sample. For example the FID Inception network's 17²
    /// and 8² levels at its batch of 32, or an SD 1.5 UNet's 8² up-block layers at batch 4.
    fn sample_group(&self) -> Option<usize> {
        let plane = self.out_plane();
        if self.batch < 2 || plane >= GROUP_BELOW_POSITIONS {
            return None;
        }
        let most = MAX_BAND_VALUES / ((self.taps() + self.c_out) * plane).max(1);
        if most < 2 {
            return None;
        }
        let groups = self.batch.div_ceil(most);
        Some(self.batch.div_ceil(groups))
    }

    /// Output rows per im2col band.
    fn band_rows(&self) -> usize {
        (MAX_BAND_VALUES / (self.taps() * self.out_w()).max(1)).clamp(1, self.out_h())
    }

    /// The output columns `[lo, hi)` of kernel column `kx` that read inside the input row
    /// (`ix = ox·stride + kx − pw`); output column `lo` reads input column
    /// `lo·stride + kx − pw`, and each next one `stride` further.
    fn span(&self, kx: usize) -> (usize, usize) {
        self.column_axis().inside(kx, 0, self.out_w())
    }

    /// The rows `[r0, r1)` of the band of `rows` output rows from `oy0` that read inside the
    /// input through kernel row `ky` (`iy = (oy0 + r)·stride + ky − ph`).
    fn row_span(&self, oy0: usize, rows: usize, ky: usize) -> (usize, usize) {
        self.row_axis().inside(ky, oy0, rows)
    }

    /// The input's rows as an [`Axis`].
    fn row_axis(&self) -> Axis {
        Axis {
            len: self.h,
            padding: self.padding.0,
            stride: self.stride,
        }
    }

    /// The input's columns as an [`Axis`].
    fn column_axis(&self) -> Axis {
        Axis {
            len: self.w,
            padding: self.padding.1,
            stride: self.stride,
        }
    }

    /// The input row that output row `oy` reads through kernel row `ky` (inside the input: see
    /// [`Self::row_span`]).
    fn input_row(&self, oy: usize, ky: usize) -> usize {
        oy * self.stride + ky - self.padding.0
    }
}

/// One axis of a convolution's input: its length, the padding on either end, the stride.
struct Axis {
    len: usize,
    padding: usize,
    stride: usize,
}

impl Axis {
    /// Of the `count` outputs from output `first` on, those `[lo, hi)` (counted from `first`)
    /// whose input position through kernel offset `k`, `(first + o)·stride + k − padding`, lies
    /// inside `[0, len)`.
    fn inside(&self, k: usize, first: usize, count: usize) -> (usize, usize) {
        let bound = |edge: usize| {
            edge.saturating_sub(k)
                .div_ceil(self.stride)
                .saturating_sub(first)
        };
        let lo = bound(self.padding).min(count);
        let hi = bound(self.len + self.padding).clamp(lo, count);
        (lo, hi)
    }
}

/// im2col of output rows `[oy0, oy0 + rows)` of the `samples` consecutive samples in `x`
/// `[S, C, H, W]` into `col` `[C·kh·kw, S·rows·Wo]` (sample `s` in the columns from
/// `s·rows·Wo`), zeros where the kernel reads the padding.
fn im2col(g: &ConvGeometry, x: &[f32], samples: usize, oy0: usize, rows: usize, col: &mut [f32]) {
    let (wo, in_plane) = (g.out_w(), g.in_plane());
    let band = rows * wo;
    // A kernel one column wide without column padding (pw = 0, so Wo = W), at stride 1 (1×1,
    // 3×1, 7×1): output rows are whole input rows, so a band of them is one contiguous copy.
    let whole_rows = g.kw == 1 && g.padding.1 == 0 && g.stride == 1;
    debug_assert!(!whole_rows || wo == g.w);
    col.par_chunks_mut(g.kh * g.kw * samples * band)
        .enumerate()
        .for_each(|(c, taps)| {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let (lo, hi) = g.span(kx);
                    let ix = (lo * g.stride + kx).saturating_sub(g.padding.1);
                    let tap_row = &mut taps[(ky * g.kw + kx) * samples * band..];
                    let (r0, r1) = g.row_span(oy0, rows, ky);
                    for (s, tap) in tap_row.chunks_exact_mut(band).take(samples).enumerate() {
                        let plane = &x[(s * g.c_in + c) * in_plane..][..in_plane];
                        tap[..r0 * wo].fill(0.0);
                        tap[r1 * wo..].fill(0.0);
                        if r0 == r1 {
                            continue;
                        }
                        if whole_rows {
                            // Output rows [r0, r1) read input rows from iy0 on, contiguous.
                            let iy0 = g.input_row(oy0 + r0, ky);
                            let inputs = &plane[iy0 * g.w..][..(r1 - r0) * wo];
                            tap[r0 * wo..r1 * wo].copy_from_slice(inputs);
                            continue;
                        }
                        for (r, out) in tap[..r1 * wo].chunks_exact_mut(wo).enumerate().skip(r0) {
                            let row = &plane[g.input_row(oy0 + r, ky) * g.w..][..g.w];
                            out[..lo].fill(0.0);
                            out[hi..].fill(0.0);
                            // With lo = hi every column reads padding, and ix may lie past the row.
                            if lo < hi {
                                if g.stride == 1 {
                                    out[lo..hi].copy_from_slice(&row[ix..][..hi - lo]);
                                } else {
                                    let inputs = row[ix..].iter().step_by(g.stride);
                                    for (o, v) in out[lo..hi].iter_mut().zip(inputs) {
                                        *o = *v;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// The adjoint of [`im2col`]: adds each `col` value back onto the input position it was read
/// from, in `dx` `[S, C, H, W]`.
fn col2im_add(
    g: &ConvGeometry,
    col: &[f32],
    samples: usize,
    oy0: usize,
    rows: usize,
    dx: &mut [f32],
) {
    let wo = g.out_w();
    let band = rows * wo;
    dx.par_chunks_mut(g.in_plane())
        .enumerate()
        .for_each(|(plane_index, plane)| {
            let (s, c) = (plane_index / g.c_in, plane_index % g.c_in);
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let tap_index = (c * g.kh + ky) * g.kw + kx;
                    let tap = &col[(tap_index * samples + s) * band..][..band];
                    let (lo, hi) = g.span(kx);
                    if lo == hi {
                        continue; // every column reads padding
                    }
                    let ix = lo * g.stride + kx - g.padding.1;
                    let (r0, r1) = g.row_span(oy0, rows, ky);
                    for (r, grad) in tap[..r1 * wo].chunks_exact(wo).enumerate().skip(r0) {
                        let row = &mut plane[g.input_row(oy0 + r, ky) * g.w..][..g.w];
                        let inputs = row[ix..].iter_mut().step_by(g.stride);
                        for (d, v) in inputs.zip(&grad[lo..hi]) {
                            *d += v;
                        }
                    }
                }
            }
        });
}

/// The output bands of one sample: `(first output row, rows)`.
fn bands(g: &ConvGeometry) -> impl Iterator<Item = (usize, usize)> {
    let (ho, step) = (g.out_h(), g.band_rows());
    (0..ho).step_by(step).map(move |oy| (oy, step.min(ho - oy)))
}

/// `y = conv(x, kernel) + bias`: `x` `[B, C, H, W]`, `kernel` `[O, C, kh, kw]`, `bias` `[O]`,
/// all contiguous; returns `[B, O, Ho, Wo]`, through a ReLU when `relu` (applied per sample on
/// the im2col path, while the whole-batch product's columns are dealt out, or while Winograd's
/// output transform writes the outputs: so while the output is still in cache).
pub(crate) fn conv2d(
    g: &ConvGeometry,
    x: &[f32],
    kernel: &[f32],
    bias: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let (plane, taps) = (g.out_plane(), g.taps());
    let mut y = zeroed(g.batch * g.c_out * plane);
    let weights = Mat::rows(kernel, taps);
    if let Some(variant) = winograd::variant(g) {
        let u = variant.transform_filters(g.c_out, g.c_in, |o, c| {
            std::array::from_fn(|t| kernel[(o * g.c_in + c) * 9 + t])
        });
        variant.conv3x3(g, x, &u, bias, relu, &mut y);
        return y;
    }
    if g.whole_batch() {
        whole_batch_conv(g, x, weights, bias, relu, &mut y);
        return y;
    }
    if let Some(group) = g.sample_group() {
        let (x_len, y_len) = (g.c_in * g.in_plane(), g.c_out * plane);
        for (xs, ys) in x.chunks(group * x_len).zip(y.chunks_mut(group * y_len)) {
            let part = ConvGeometry {
                batch: xs.len() / x_len,
                ..*g
            };
            whole_batch_conv(&part, xs, weights, bias, relu, ys);
        }
        return y;
    }
    // The bias fill and the ReLU run a plane per task on the worker pool (`for_each_band`), so
    // that the other cores do not wait on the calling thread.
    for (xs, ys) in x
        .chunks_exact(g.c_in * g.in_plane())
        .zip(y.chunks_exact_mut(g.c_out * plane))
    {
        if let Some(bias) = bias {
            for_each_band(ys, plane, plane, |o, _, channel| channel.fill(bias[o]));
        }
        im2col_conv(g, xs, weights, bias.is_some(), ys);
        if relu {
            for_each_band(ys, plane, plane, |_, _, channel| relu_in_place(channel));
        }
    }
    y
}

/// [`math::relu`] in place.
fn relu_in_place(values: &mut [f32]) {
    for v in values.iter_mut() {
        *v = math::relu(*v);
    }
}

/// One sample's `ys (+)= conv(xs, weights)` by im2col and matrix products (`accumulate`: onto
/// what `ys` holds, the bias).
fn im2col_conv(g: &ConvGeometry, xs: &[f32], weights: Mat, accumulate: bool, ys: &mut [f32]) {
    let (plane, taps, wo) = (g.out_plane(), g.taps(), g.out_w());
    if g.pointwise() {
        let dims = (g.c_out, plane, taps);
        let rhs = Mat::rows(xs, plane);
        matmul(ys, plane, accumulate, dims, weights, rhs, Threads::All);
        return;
    }
    for (oy, rows) in bands(g) {
        with_scratch(taps * rows * wo, |col| {
            im2col(g, xs, 1, oy, rows, col);
            let dims = (g.c_out, rows * wo, taps);
            let rhs = Mat::rows(col, rows * wo);
            matmul(
                &mut ys[oy * wo..],
                plane,
                accumulate,
                dims,
                weights,
                rhs,
                Threads::All,
            );
        });
    }
}

/// The gradient of [`conv2d`] with respect to `x`, given the output gradient `dy`
/// `[B, O, Ho, Wo]`: by Winograd where it applies, else `Wᵀ·dy` per band (or for the whole
/// batch, see [`ConvGeometry::whole_batch`]), scattered back by col2im.
pub(crate) fn conv2d_input_grad(g: &ConvGeometry, dy: &[f32], kernel: &[f32]) -> Vec<f32> {
    let (plane, taps, wo) = (g.out_plane(), g.taps(), g.out_w());
    let mut dx = zeroed(g.batch * g.c_in * g.in_plane());
    // With stride 1 and padding 1, `dx` is the convolution of `dy` by the kernel flipped in
    // both directions with its channel axes swapped, which Winograd computes as a forward pass.
    let flipped = ConvGeometry {
        c_in: g.c_out,
        c_out: g.c_in,
        ..*g
    };
    if let Some(variant) = winograd::variant(&flipped) {
        let u = variant.transform_filters(g.c_in, g.c_out, |c, o| {
            std::array::from_fn(|t| kernel[(o * g.c_in + c) * 9 + 8 - t])
        });
        variant.conv3x3(&flipped, dy, &u, None, false, &mut dx);
        return dx;
    }
    let weights_t = Mat::transposed(kernel, taps);
    if g.whole_batch() {
        whole_batch_input_grad(g, dy, weights_t, &mut dx);
        return dx;
    }
    for (dys, dxs) in dy
        .chunks_exact(g.c_out * plane)
        .zip(dx.chunks_exact_mut(g.c_in * g.in_plane()))
    {
        if g.pointwise() {
            let dims = (g.c_in, plane, g.c_out);
            matmul(
                dxs,
                plane,
                false,
                dims,
                weights_t,
                Mat::rows(dys, plane),
                Threads::All,
            );
            continue;
        }
        for (oy, rows) in bands(g) {
            with_scratch(taps * rows * wo, |col| {
                let dims = (taps, rows * wo, g.c_out);
                let rhs = Mat::rows(&dys[oy * wo..], plane);
                matmul(col, rows * wo, false, dims, weights_t, rhs, Threads::All);
                col2im_add(g, col, 1, oy, rows, dxs);
            });
        }
    }
    dx
}

/// The gradient of [`conv2d`] with respect to its kernel: `Σ_b dy·im2col(x)ᵀ`, `[O, C·kh·kw]`.
pub(crate) fn conv2d_kernel_grad(g: &ConvGeometry, x: &[f32], dy: &[f32]) -> Vec<f32> {
    let (plane, taps, wo) = (g.out_plane(), g.taps(), g.out_w());
    let mut dw = zeroed(g.c_out * taps);
    if g.whole_batch() {
        whole_batch_kernel_grad(g, x, dy, &mut dw);
        return dw;
    }
    for (xs, dys) in x
        .chunks_exact(g.c_in * g.in_plane())
        .zip(dy.chunks_exact(g.c_out * plane))
    {
        for (oy, rows) in bands(g) {
            let dims = (g.c_out, taps, rows * wo);
            let lhs = Mat::rows(&dys[oy * wo..], plane);
            if g.pointwise() {
                let rhs = Mat::transposed(&xs[oy * wo..], plane);
                matmul(&mut dw, taps, true, dims, lhs, rhs, Threads::All);
                continue;
            }
            with_scratch(taps * rows * wo, |col| {
                im2col(g, xs, 1, oy, rows, col);
                let rhs = Mat::transposed(col, rows * wo);
                matmul(&mut dw, taps, true, dims, lhs, rhs, Threads::All);
            });
        }
    }
    dw
}

/// Planes per pool task when [`samples_to_columns`] or [`columns_to_samples`] move them.
const PLANES_PER_TASK: usize = 64;

/// `columns` `[R, B·plane]` from `samples` `[B, R, plane]`: each row holds the batch's planes
/// side by side, the layout of a whole-batch product's operand.
fn samples_to_columns(samples: &[f32], batch: usize, plane: usize, columns: &mut [f32]) {
    let rows = samples.len() / (batch * plane);
    for_each_band(
        columns,
        columns.len(),
        PLANES_PER_TASK * plane,
        |_, band, out| {
            for (i, out) in out.chunks_exact_mut(plane).enumerate() {
                let chunk = band * PLANES_PER_TASK + i;
                let (r, b) = (chunk / batch, chunk % batch);
                out.copy_from_slice(&samples[(b * rows + r) * plane..][..plane]);
            }
        },
    );
}

/// The inverse of [`samples_to_columns`], adding `bias[r]` to row `r` when given, then through a
/// ReLU when `relu`.
fn columns_to_samples(
    columns: &[f32],
    (batch, plane): (usize, usize),
    bias: Option<&[f32]>,
    relu: bool,
    samples: &mut [f32],
) {
    let rows = samples.len() / (batch * plane);
    for_each_band(
        samples,
        rows * plane,
        PLANES_PER_TASK * plane,
        |b, band, out| {
            for (i, out) in out.chunks_exact_mut(plane).enumerate() {
                let r = band * PLANES_PER_TASK + i;
                out.copy_from_slice(&columns[(r * batch + b) * plane..][..plane]);
                if let Some(bias) = bias {
                    out.iter_mut().for_each(|v| *v += bias[r]);
                }
                if relu {
                    relu_in_place(out);
                }
            }
        },
    );
}

/// [`conv2d`] as one product over the whole batch (see [`ConvGeometry::whole_batch`]; also a
/// group of samples, see [`ConvGeometry::sample_group`]), into `y`, bias added, through a ReLU
/// when `relu`.
fn whole_batch_conv(
    g: &ConvGeometry,
    x: &[f32],
    weights: Mat,
    bias: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
) {
    let (taps, plane) = (g.taps(), g.out_plane());
    let columns = g.batch * plane;
    with_scratch((taps + g.c_out) * columns, |buf| {
        let (col, product) = buf.split_at_mut(taps * columns);
        im2col(g, x, g.batch, 0, g.out_h(), col);
        let dims = (g.c_out, columns, taps);
        let rhs = Mat::rows(col, columns);
        matmul(product, columns, false, dims, weights, rhs, Threads::All);
        columns_to_samples(product, (g.batch, plane), bias, relu, y);
    });
}

/// [`conv2d_input_grad`] as one product over the whole batch, `Wᵀ·dy`, into the zeroed `dx`.
fn whole_batch_input_grad(g: &ConvGeometry, dy: &[f32], weights_t: Mat, dx: &mut [f32]) {
    let (taps, plane) = (g.taps(), g.out_plane());
    let columns = g.batch * plane;
    with_scratch((taps + g.c_out) * columns, |buf| {
        let (col, dy_columns) = buf.split_at_mut(taps * columns);
        samples_to_columns(dy, g.batch, plane, dy_columns);
        let dims = (taps, columns, g.c_out);
        let rhs = Mat::rows(dy_columns, columns);
        matmul(col, columns, false, dims, weights_t, rhs, Threads::All);
        col2im_add(g, col, g.batch, 0, g.out_h(), dx);
    });
}

/// [`conv2d_kernel_grad`] as one product over the whole batch, `dy·im2col(x)ᵀ`, into `dw`.
fn whole_batch_kernel_grad(g: &ConvGeometry, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (taps, plane) = (g.taps(), g.out_plane());
    let columns = g.batch * plane;
    with_scratch((taps + g.c_out) * columns, |buf| {
        let (col, dy_columns) = buf.split_at_mut(taps * columns);
        samples_to_columns(dy, g.batch, plane, dy_columns);
        im2col(g, x, g.batch, 0, g.out_h(), col);
        let dims = (g.c_out, taps, columns);
        let (lhs, rhs) = (
            Mat::rows(dy_columns, columns),
            Mat::transposed(col, columns),
        );
        matmul(dw, taps, false, dims, lhs, rhs, Threads::All);
    });
}

/// Whether the CPU f32 path applies to a convolution of `x` by `kernel`.
pub(crate) fn applies(x: &Tensor, kernel: &Tensor) -> bool {
    cpu_f32(&[x, kernel]) && x.rank() == 4 && kernel.rank() == 4
}

/// Which of the three results an op computes from its two operands.
#[derive(Debug, Clone, Copy)]
enum Pass {
    /// `(x, kernel) → y`, through a ReLU when `relu`
    Forward { relu: bool },
    /// `(dy, kernel) → dx`
    InputGrad,
    /// `(x, dy) → dkernel`
    KernelGrad,
}

/// One of the three convolution passes as a candle op without a backward of its own (the
/// callers in the engine attach the gradients).
struct ConvPass {
    geometry: ConvGeometry,
    pass: Pass,
    bias: Option<Vec<f32>>,
}

impl CustomOp2 for ConvPass {
    fn name(&self) -> &'static str {
        "cpu-conv2d"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.geometry;
        let (a, b) = (
            f32_slice(a, a_layout, "conv2d: first operand")?,
            f32_slice(b, b_layout, "conv2d: second operand")?,
        );
        let (values, shape): (_, Shape) = match self.pass {
            Pass::Forward { relu } => (
                conv2d(g, a, b, self.bias.as_deref(), relu),
                (g.batch, g.c_out, g.out_h(), g.out_w()).into(),
            ),
            Pass::InputGrad => (
                conv2d_input_grad(g, a, b),
                (g.batch, g.c_in, g.h, g.w).into(),
            ),
            Pass::KernelGrad => (
                conv2d_kernel_grad(g, a, b),
                (g.c_out, g.c_in, g.kh, g.kw).into(),
            ),
        };
        Ok((CpuStorage::F32(values), shape))
    }

    /// The forward pass's gradients: for the input and the kernel, each where a gradient flows
    /// to it (candle would keep one for an untracked operand until the backward pass ends).
    /// After a ReLU, only where the output is positive.
    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        y: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Pass::Forward { relu } = self.pass else {
            return Err(candle_core::Error::Msg(
                "conv2d: gradient passes have no backward".into(),
            ));
        };
        let masked;
        let grad_out = match relu {
            true => {
                masked = (grad_out * y.gt(0.0)?.to_dtype(grad_out.dtype())?)?;
                &masked
            }
            false => grad_out,
        };
        let conv = (self.geometry.padding, self.geometry.stride);
        let dx = grad_if_tracked(x, || input_grad(x, kernel, grad_out, conv.0, conv.1))?;
        let dk = grad_if_tracked(kernel, || {
            run(Pass::KernelGrad, (x, kernel), (x, grad_out), conv, None)
        })?;
        Ok((dx, dk))
    }
}

/// Runs one pass of the convolution of `x` by `kernel` on the operands `(a, b)` its pass takes.
fn run(
    pass: Pass,
    (x, kernel): (&Tensor, &Tensor),
    (a, b): (&Tensor, &Tensor),
    (padding, stride): ((usize, usize), usize),
    bias: Option<Vec<f32>>,
) -> Result<Tensor> {
    let geometry = ConvGeometry::new(x.dims4()?, kernel.dims4()?, padding, stride)?;
    if let Some(bias) = bias.as_ref().filter(|b| b.len() != geometry.c_out) {
        return Err(candle_core::Error::Msg(format!(
            "conv2d: bias of {} values for a kernel of {} output channels",
            bias.len(),
            geometry.c_out
        )));
    }
    let op = ConvPass {
        geometry,
        pass,
        bias,
    };
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    match pass {
        // Recorded (when an operand is tracked), with the backward above.
        Pass::Forward { .. } => a.apply_op2(&b, op),
        Pass::InputGrad | Pass::KernelGrad => a.apply_op2_no_bwd(&b, &op),
    }
}

/// The input gradient of a convolution of an input shaped as `x` by `kernel`, for the output
/// gradient `dy`; `padding` is `(rows, columns)`.
pub(crate) fn input_grad(
    x: &Tensor,
    kernel: &Tensor,
    dy: &Tensor,
    padding: (usize, usize),
    stride: usize,
) -> Result<Tensor> {
    run(
        Pass::InputGrad,
        (x, kernel),
        (dy, kernel),
        (padding, stride),
        None,
    )
}

/// `conv(x, kernel) + bias` on the CPU (see [`applies`]), then a ReLU when `relu`, as one op
/// whose backward gives the input gradient, and the kernel gradient when the kernel is trained.
/// `bias` is frozen (a trained bias is added by the caller); `padding` is `(rows, columns)`.
pub(crate) fn conv2d_op(
    x: &Tensor,
    kernel: &Tensor,
    bias: Option<&Tensor>,
    padding: (usize, usize),
    stride: usize,
    relu: bool,
) -> Result<Tensor> {
    let bias = bias
        .map(|b| b.flatten_all()?.to_vec1::<f32>())
        .transpose()?;
    let conv = (x, kernel);
    run(Pass::Forward { relu }, conv, conv, (padding, stride), bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::test_support::max_rel_diff;
    use candle_core::{Device, Var};

    /// Largest relative difference allowed for F(4×4) against a direct convolution (see
    /// `passes_match_candle_convolution`); F(2×2) and im2col are held to 1e-5.
    const F4_TOLERANCE: f32 = 3e-5;

    /// The op and both its gradients against candle's own convolution and its autograd, over the
    /// shapes the UNet and VAE use (3×3 same, 3×3 stride 2, 1×1), Inception's rectangular kernels
    /// and paddings (1×7 with (0, 3), 7×1 with (3, 0), 1×3, 3×1), stride 2 without padding, with
    /// a 1×1 kernel and with a 7×7 one padded by 3, plus odd sizes and a narrow band. The batch-2
    /// forward passes on small maps go through [`ConvGeometry::sample_group`]'s grouped product,
    /// one case in two groups (2 + 1 samples); two batch-2 cases of over 1024 output positions
    /// take a product per sample (a 1×1 kernel, and stride 2); a 7×1 kernel over a 2-row map
    /// reads only padding through kernel rows 0, 1, 5 and 6. The seven cases before the last
    /// seven take the Winograd path: F(2×2) three times (odd sizes, a batch), then F(4×4) four
    /// times (odd sizes with a batch, a UNet's channel count, one tile per row); the last seven
    /// take the whole-batch product (3×3, 1×1, stride 2, a UNet's 4² level in small, a
    /// rectangular kernel padded along one axis, 70 output channels (a short last task when the
    /// columns are dealt out) and one large enough for the worker pool). F(4×4) rounds more (its
    /// transforms reach 8 and include sixths): at 320 input channels its largest error is 1.2e-5
    /// of the output's scale, so its cases are held to [`F4_TOLERANCE`]. candle pads both axes
    /// alike, so the reference pads explicitly and convolves unpadded; the strided cases' padded
    /// sides leave no remainder after the stride, as candle's own backward needs.
    #[test]
    fn passes_match_candle_convolution() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(3);
        // (input, kernel, padding, stride)
        let cases = [
            ((2, 5, 9, 7), (6, 5, 3, 3), (1, 1), 1),
            ((1, 4, 8, 8), (3, 4, 3, 3), (1, 1), 2),
            ((2, 3, 7, 9), (5, 3, 3, 3), (1, 1), 2),
            ((2, 6, 5, 4), (7, 6, 1, 1), (0, 0), 1),
            ((1, 3, 6, 6), (2, 3, 3, 3), (0, 0), 1),
            ((1, 2, 4, 5), (3, 2, 3, 3), (2, 2), 1),
            ((1, 2, 3, 3), (2, 2, 5, 5), (2, 2), 1),
            ((2, 3, 6, 9), (4, 3, 1, 7), (0, 3), 1),
            ((2, 3, 9, 6), (4, 3, 7, 1), (3, 0), 1),
            ((1, 4, 5, 5), (3, 4, 1, 3), (0, 1), 1),
            ((1, 4, 5, 5), (3, 4, 3, 1), (1, 0), 1),
            ((1, 3, 9, 7), (2, 3, 3, 5), (1, 2), 2),
            ((1, 3, 9, 9), (4, 3, 3, 3), (0, 0), 2),
            ((1, 4, 7, 9), (3, 4, 1, 1), (0, 0), 2),
            ((1, 3, 11, 11), (2, 3, 7, 7), (3, 3), 2),
            ((3, 160, 61, 61), (32, 160, 3, 3), (1, 1), 2),
            ((2, 6, 32, 33), (7, 6, 1, 1), (0, 0), 1),
            ((2, 3, 65, 65), (4, 3, 3, 3), (1, 1), 2),
            ((2, 3, 2, 11), (4, 3, 7, 1), (3, 0), 1),
            ((1, 16, 33, 35), (17, 16, 3, 3), (1, 1), 1),
            ((1, 20, 32, 32), (16, 20, 3, 3), (1, 1), 1),
            ((2, 16, 17, 17), (16, 16, 3, 3), (1, 1), 1),
            ((2, 16, 27, 37), (17, 16, 3, 3), (1, 1), 1),
            ((1, 20, 48, 48), (16, 20, 3, 3), (1, 1), 1),
            ((1, 320, 48, 48), (128, 320, 3, 3), (1, 1), 1),
            ((128, 16, 4, 4), (16, 16, 3, 3), (1, 1), 1),
            ((3, 32, 3, 3), (8, 32, 3, 3), (1, 1), 1),
            ((4, 40, 2, 3), (6, 40, 1, 1), (0, 0), 1),
            ((2, 24, 5, 5), (5, 24, 3, 3), (1, 1), 2),
            ((4, 64, 4, 4), (48, 64, 3, 3), (1, 1), 1),
            ((2, 24, 5, 5), (6, 24, 1, 7), (0, 3), 1),
            ((2, 16, 3, 3), (70, 16, 3, 3), (1, 1), 1),
            ((2, 128, 8, 8), (600, 128, 3, 3), (1, 1), 1),
        ];
        let winograd_side = |(input, kernel, padding, stride)| {
            let g = ConvGeometry::new(input, kernel, padding, stride).unwrap();
            winograd::variant(&g).map(|variant| variant.m)
        };
        let sides: Vec<usize> = cases.into_iter().filter_map(winograd_side).collect();
        assert_eq!(sides, [2, 2, 2, 4, 4, 4, 4]);
        let whole_batch = |(input, kernel, padding, stride)| {
            ConvGeometry::new(input, kernel, padding, stride)
                .unwrap()
                .whole_batch()
        };
        let whole_batch_cases: Vec<bool> = cases.into_iter().map(whole_batch).collect();
        assert_eq!(whole_batch_cases, [&[false; 26][..], &[true; 7]].concat());
        let group = |(input, kernel, padding, stride)| {
            ConvGeometry::new(input, kernel, padding, stride)
                .unwrap()
                .sample_group()
        };
        let groups: Vec<Option<usize>> = cases[15..19].iter().copied().map(group).collect();
        assert_eq!(groups, [Some(2), None, None, Some(2)]);
        for case in cases {
            let (input, kernel, padding, stride) = case;
            let tolerance = match winograd_side(case) {
                Some(4) => F4_TOLERANCE,
                _ => 1e-5,
            };
            let x = Var::from_tensor(&rng.normal_tensor(input, &dev).unwrap()).unwrap();
            let w = Var::from_tensor(&rng.normal_tensor(kernel, &dev).unwrap()).unwrap();
            let b = rng.normal_tensor(kernel.0, &dev).unwrap();
            let reference = x
                .pad_with_zeros(2, padding.0, padding.0)
                .unwrap()
                .pad_with_zeros(3, padding.1, padding.1)
                .unwrap()
                .conv2d(&w, 0, stride, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, kernel.0, 1, 1)).unwrap())
                .unwrap();
            let ours = conv2d_op(&x, &w, Some(&b), padding, stride, false).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            let what = format!("{input:?} * {kernel:?} pad {padding:?} stride {stride}");
            let diff = max_rel_diff(&ours, &reference);
            assert!(diff < tolerance, "forward {what}: {diff}");
            let ours_relu = conv2d_op(&x, &w, Some(&b), padding, stride, true).unwrap();
            let diff = max_rel_diff(&ours_relu, &reference.relu().unwrap());
            assert!(diff < tolerance, "forward + ReLU {what}: {diff}");

            let upstream = rng.normal_tensor(reference.dims(), &dev).unwrap();
            let loss = |y: &Tensor| (y * &upstream).unwrap().sum_all().unwrap();
            let expected = loss(&reference).backward().unwrap();
            let got = loss(&ours).backward().unwrap();
            for (name, p) in [("dx", &x), ("dw", &w)] {
                let diff = max_rel_diff(got.get(p).unwrap(), expected.get(p).unwrap());
                assert!(diff < tolerance, "{name} {what}: {diff}");
            }
        }
    }

    /// Maps too large for one im2col buffer are done in bands of output rows.
    /// `Axis::inside` against a direct check of every output's input position, over strides,
    /// paddings, kernel offsets and bands that start past the first output.
    #[test]
    fn axis_inside_holds_exactly_the_outputs_reading_the_input() {
        let mut checked = 0;
        for len in 1..7 {
            for padding in 0..3 {
                for stride in 1..4 {
                    let axis = Axis {
                        len,
                        padding,
                        stride,
                    };
                    for (k, first, count) in (0..4).flat_map(|k| {
                        (0..5).flat_map(move |first| (0..6).map(move |count| (k, first, count)))
                    }) {
                        let reads_inside = |o: usize| {
                            let position = ((first + o) * stride + k) as isize - padding as isize;
                            (0..len as isize).contains(&position)
                        };
                        let (lo, hi) = axis.inside(k, first, count);
                        assert!(
                            lo <= hi && hi <= count,
                            "{len} {padding} {stride} {k} {first}"
                        );
                        for o in 0..count {
                            assert_eq!(
                                (lo..hi).contains(&o),
                                reads_inside(o),
                                "len {len} padding {padding} stride {stride} k {k} first {first} \
                                 output {o}"
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert!(checked > 0);
    }

    #[test]
    fn banded_im2col_matches_single_band() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(4);
        // 3×3, and 7×1 padded along the rows only (whole input rows copied per band).
        for (kernel, padding) in [((2, 16, 3, 3), (1, 1)), ((2, 16, 7, 1), (3, 0))] {
            let g = ConvGeometry::new((1, 16, 600, 520), kernel, padding, 1).unwrap();
            assert!(g.band_rows() < g.out_h() && !g.out_h().is_multiple_of(g.band_rows()));
            let x = rng.normal_tensor((1, 16, 600, 520), &dev).unwrap();
            let w = rng.normal_tensor(kernel, &dev).unwrap();
            let padded = x.pad_with_zeros(2, padding.0, padding.0).unwrap();
            let padded = padded.pad_with_zeros(3, padding.1, padding.1).unwrap();
            let reference = padded.conv2d(&w, 0, 1, 1, 1).unwrap();
            let ours = conv2d_op(&x, &w, None, padding, 1, false).unwrap();
            assert!(max_rel_diff(&ours, &reference) < 1e-5, "{kernel:?}");
        }
    }

    /// The same for the Winograd path, whose bands are of tile rows (the last one cut: 602 rows
    /// make 150.5 tiles).
    #[test]
    fn banded_winograd_matches_candle() {
        let g = ConvGeometry::new((1, 16, 602, 520), (16, 16, 3, 3), (1, 1), 1).unwrap();
        let variant = winograd::variant(&g).unwrap();
        let tile_rows = g.out_h().div_ceil(variant.m);
        let band = variant.band_rows(&g);
        assert!(band < tile_rows && !tile_rows.is_multiple_of(band));
        let dev = Device::Cpu;
        let mut rng = Rng::new(5);
        let x = rng.normal_tensor((1, 16, 602, 520), &dev).unwrap();
        let w = rng.normal_tensor((16, 16, 3, 3), &dev).unwrap();
        let reference = x.conv2d(&w, 1, 1, 1, 1).unwrap();
        let ours = conv2d_op(&x, &w, None, (1, 1), 1, false).unwrap();
        assert!(variant.m == 4 && max_rel_diff(&ours, &reference) < F4_TOLERANCE);
    }

    /// F(4×4) over several bands of a batch, cut at the bottom and the right edge (301 × 261
    /// outputs make 75.25 × 65.25 tiles): each sample's tiles of a band are one run of the
    /// transformed matrices' columns, and the last band is shorter. (F(2×2) takes maps too small
    /// for a second band, but for thousands of channels.)
    #[test]
    fn banded_winograd_over_a_batch_matches_candle() {
        let (input, kernel) = ((2, 16, 301, 261), (16, 16, 3, 3));
        let g = ConvGeometry::new(input, kernel, (1, 1), 1).unwrap();
        let variant = winograd::variant(&g).unwrap();
        let tile_rows = g.out_h().div_ceil(variant.m);
        let band = variant.band_rows(&g);
        assert!(band < tile_rows && !tile_rows.is_multiple_of(band));
        assert!(!g.h.is_multiple_of(variant.m) && !g.w.is_multiple_of(variant.m));
        let dev = Device::Cpu;
        let mut rng = Rng::new(8);
        let x = rng.normal_tensor(input, &dev).unwrap();
        let w = rng.normal_tensor(kernel, &dev).unwrap();
        let b = rng.normal_tensor(kernel.0, &dev).unwrap();
        let reference = x
            .conv2d(&w, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, kernel.0, 1, 1)).unwrap())
            .unwrap();
        let ours = conv2d_op(&x, &w, Some(&b), (1, 1), 1, false).unwrap();
        let diff = max_rel_diff(&ours, &reference);
        assert!(variant.m == 4 && diff < F4_TOLERANCE, "{diff}");
    }

    /// F(4×4) over several bands with many channels on both sides, against the im2col path on
    /// the same data.
    #[test]
    fn winograd_bands_with_many_channels_match_im2col() {
        let g = ConvGeometry::new((1, 192, 104, 104), (160, 192, 3, 3), (1, 1), 1).unwrap();
        let variant = winograd::variant(&g).unwrap();
        assert!(variant.band_rows(&g) < g.h.div_ceil(variant.m));
        let dev = Device::Cpu;
        let mut rng = Rng::new(7);
        let x = rng.normal_tensor((1, 192, 104, 104), &dev).unwrap();
        let w = rng.normal_tensor((160, 192, 3, 3), &dev).unwrap();
        let (x, w) = (x.flatten_all().unwrap(), w.flatten_all().unwrap());
        let (x, w) = (x.to_vec1::<f32>().unwrap(), w.to_vec1::<f32>().unwrap());
        let mut direct = vec![0.0f32; 160 * 104 * 104];
        im2col_conv(&g, &x, Mat::rows(&w, g.taps()), false, &mut direct);
        let ours = conv2d(&g, &x, &w, None, false);
        let to_tensor = |v: Vec<f32>| Tensor::from_vec(v, (160, 104, 104), &dev).unwrap();
        let diff = max_rel_diff(&to_tensor(ours), &to_tensor(direct));
        assert!(variant.m == 4 && diff < F4_TOLERANCE, "{diff}");
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let err = ConvGeometry::new((1, 3, 8, 8), (4, 5, 3, 3), (1, 1), 1).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 16, 16, 16), candle_core::DType::F32, &dev).unwrap();
        let w = Tensor::zeros((16, 16, 3, 3), candle_core::DType::F32, &dev).unwrap();
        let short_bias = Tensor::zeros(15, candle_core::DType::F32, &dev).unwrap();
        let err = conv2d_op(&x, &w, Some(&short_bias), (1, 1), 1, false).unwrap_err();
        assert!(err.to_string().contains("bias of 15 values"), "{err}");
    }
}
