//! 3×3 max and average pools (the FID Inception network's). On the CPU in f32, for an input that
//! nothing differentiates, one kernel op pools a plane per task on the worker pool; otherwise
//! candle's ops compute them, with their backward.

use candle_core::{bail, Tensor};

use super::kernels::cpu::gemm::cpu_f32;
use super::kernels::cpu::pool::{Pool3x3, Reduction};

/// 3×3 max pool with `stride` (≥ 1) and `padding` (≤ 1, as PyTorch allows) on every side;
/// padding never wins a window. A NaN wins its windows on the kernel's path, as in PyTorch;
/// candle's CPU pool (a differentiated input, or another dtype) lets it win only as a window's
/// first value, and its CUDA pool drops it unless the whole window is NaN.
pub fn max_pool_3x3(x: &Tensor, stride: usize, padding: usize) -> candle_core::Result<Tensor> {
    if stride == 0 || padding > 1 {
        bail!(
            "3×3 max pool: stride {stride} and padding {padding} \
             (expected a stride ≥ 1 and padding ≤ 1)"
        );
    }
    if let Some(y) = kernel(x, Reduction::Max, stride, padding)? {
        return Ok(y);
    }
    let mut x = x.clone();
    if padding > 0 {
        for axis in [2, 3] {
            let mut dims = x.dims().to_vec();
            dims[axis] = padding;
            let edge = Tensor::full(f32::NEG_INFINITY, dims, x.device())?.to_dtype(x.dtype())?;
            x = Tensor::cat(&[&edge, &x, &edge], axis)?;
        }
    }
    x.max_pool2d_with_stride(3, stride)
}

/// 3×3 average pool, stride 1, padding 1, averaging only the positions inside the input
/// (`count_include_pad=False`): 4 in a corner, 6 on an edge, 9 inside.
pub fn avg_pool_3x3_inside(x: &Tensor) -> candle_core::Result<Tensor> {
    if let Some(y) = kernel(x, Reduction::MeanInside, 1, 1)? {
        return Ok(y);
    }
    let (_, _, h, w) = x.dims4()?;
    // candle's pool of the zero-padded input divides by 9: multiply back by 9 / count.
    let mean9 = x
        .pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?
        .avg_pool2d_with_stride(3, 1)?;
    // Window rows (columns) inside the input: 3, less one at each edge.
    let inside = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (3 - usize::from(i == 0) - usize::from(i + 1 == n)) as f32)
            .collect()
    };
    let (rows, cols) = (inside(h), inside(w));
    let factor: Vec<f32> = rows
        .iter()
        .flat_map(|r| cols.iter().map(move |c| 9.0 / (r * c)))
        .collect();
    let factor = Tensor::from_vec(factor, (1, 1, h, w), x.device())?.to_dtype(x.dtype())?;
    mean9.broadcast_mul(&factor)
}

/// The kernel's pool where it applies (f32 on the CPU, no gradient asked for).
fn kernel(
    x: &Tensor,
    reduction: Reduction,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Option<Tensor>> {
    if !cpu_f32(&[x]) || x.track_op() {
        return Ok(None);
    }
    let op = Pool3x3 {
        reduction,
        stride,
        padding,
    };
    x.contiguous()?.apply_op1(op).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::test_support::max_rel_diff;
    use candle_core::{Device, Var};

    /// The kernel (a plain tensor) against candle's ops (the same values as a `Var`, which takes
    /// the candle path), both reductions, strides 1 and 2, paddings 0 and 1, odd and even sides,
    /// and a size that the worker pool shares out (over `for_each_band`'s threshold).
    #[test]
    fn kernel_matches_candles_pools() {
        let mut rng = Rng::new(11);
        let shapes = [(2, 3, 7, 9), (1, 2, 10, 11), (2, 8, 64, 70), (1, 1, 3, 3)];
        for shape in shapes {
            let x = rng.normal_tensor(shape, &Device::Cpu).unwrap();
            let tracked = Var::from_tensor(&x).unwrap();
            for (stride, padding) in [(1, 1), (2, 0), (2, 1), (1, 0)] {
                let ours = max_pool_3x3(&x, stride, padding).unwrap();
                let reference = max_pool_3x3(tracked.as_tensor(), stride, padding).unwrap();
                assert_eq!(
                    ours.dims(),
                    reference.dims(),
                    "{shape:?} {stride} {padding}"
                );
                let diff = max_rel_diff(&ours, &reference);
                assert!(diff == 0.0, "max {shape:?} {stride} {padding}: {diff}");
            }
            let ours = avg_pool_3x3_inside(&x).unwrap();
            let reference = avg_pool_3x3_inside(tracked.as_tensor()).unwrap();
            let diff = max_rel_diff(&ours, &reference);
            assert!(diff < 1e-6, "average {shape:?}: {diff}");
        }
    }

    /// Averages by hand on a 3×4 plane: a corner window holds 4 positions, an edge window 6, an
    /// inner one 9; the padding is not counted.
    #[test]
    fn average_counts_only_positions_inside() {
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let x = Tensor::from_vec(values, (1, 1, 3, 4), &Device::Cpu).unwrap();
        let y = avg_pool_3x3_inside(&x).unwrap().flatten_all().unwrap();
        let y = y.to_vec1::<f32>().unwrap();
        // Rows 0 1 2 3 / 4 5 6 7 / 8 9 10 11.
        let corner = (0.0 + 1.0 + 4.0 + 5.0) / 4.0;
        let top_edge = (0.0 + 1.0 + 2.0 + 4.0 + 5.0 + 6.0) / 6.0;
        let inner = (0.0 + 1.0 + 2.0 + 4.0 + 5.0 + 6.0 + 8.0 + 9.0 + 10.0) / 9.0;
        assert_eq!((y[0], y[1], y[5]), (corner, top_edge, inner));
    }

    /// A NaN wins its windows, as in PyTorch's `max_pool2d`, and only those: first in its
    /// window (stride 2), in the middle of its windows' rows and columns, and beside the
    /// padding (stride 1, padding 1).
    #[test]
    fn max_propagates_nan_to_its_windows() {
        let nan_at = |at: &[usize], stride, padding| {
            let mut values = vec![1.0f32; 25];
            for &i in at {
                values[i] = f32::NAN;
            }
            let x = Tensor::from_vec(values, (1, 1, 5, 5), &Device::Cpu).unwrap();
            let y = max_pool_3x3(&x, stride, padding).unwrap();
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        let nans = |y: &[f32]| -> Vec<usize> { (0..y.len()).filter(|&i| y[i].is_nan()).collect() };
        let y = nan_at(&[0], 2, 0);
        assert_eq!((nans(&y), y[1..].to_vec()), (vec![0], vec![1.0; 3]));
        // (2, 2): every window whose rows and columns both reach 1..=3.
        let y = nan_at(&[12], 1, 1);
        let inner: Vec<usize> = (1..4)
            .flat_map(|r| (1..4).map(move |c| r * 5 + c))
            .collect();
        assert_eq!(nans(&y), inner);
        assert!(y.iter().all(|v| v.is_nan() || *v == 1.0), "{y:?}");
        // (0, 0): the windows of outputs (0..=1, 0..=1), the padding on their left and top.
        assert_eq!(nans(&nan_at(&[0], 1, 1)), [0, 1, 5, 6]);
    }

    #[test]
    fn unsupported_stride_and_padding_are_errors() {
        let x = Tensor::zeros((1, 1, 5, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        for (stride, padding) in [(0, 0), (1, 2)] {
            let error = max_pool_3x3(&x, stride, padding).unwrap_err().to_string();
            assert!(
                error.contains("expected a stride ≥ 1 and padding ≤ 1"),
                "{error}"
            );
        }
    }

    #[test]
    fn input_shorter_than_the_window_is_an_error() {
        let x = Tensor::zeros((1, 1, 2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let error = max_pool_3x3(&x, 2, 0).unwrap_err().to_string();
        assert!(error.contains("input side of 2 with padding 0"), "{error}");
    }
}
