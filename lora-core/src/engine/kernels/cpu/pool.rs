//! 3×3 max and average pools, forward only, a plane per task on the worker pool (candle's CPU
//! pools run on the calling thread). A window's rows are cut at the input's edges and its
//! columns padded with the reduction's identity (−∞ for the max, 0 for the sum, which is then
//! divided by the positions inside the input): what padding with −∞ does for a max, and what
//! `count_include_pad=False` asks of an average.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};

use super::buffers::{for_each_band, zeroed};
use super::gemm::f32_slice;

/// What a window is reduced to.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reduction {
    /// The largest value; NaN wins, as in PyTorch's `max_pool2d`.
    Max,
    /// The mean of the window's positions inside the input (`count_include_pad=False`).
    MeanInside,
}

/// A 3×3 pool with `stride` (≥ 1) and `padding` on every side (≤ 1, as PyTorch allows: every
/// window then holds an input position), output size rounded down as PyTorch's
/// `ceil_mode=False`.
pub(crate) struct Pool3x3 {
    pub(crate) reduction: Reduction,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

impl Pool3x3 {
    /// Output positions along an input axis of `n`, or an error naming the axis that is too short.
    fn out_len(&self, n: usize) -> Result<usize> {
        (n + 2 * self.padding)
            .checked_sub(3)
            .map(|span| span / self.stride + 1)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "3×3 pool: an input side of {n} with padding {} is shorter than the window",
                    self.padding
                ))
            })
    }

    /// The input positions `[lo, hi)` that window `o` covers along an axis of `n`.
    fn window(&self, o: usize, n: usize) -> (usize, usize) {
        let start = o * self.stride;
        let lo = start.saturating_sub(self.padding);
        let hi = (start + 3).saturating_sub(self.padding).min(n);
        (lo, hi)
    }

    /// One plane: `x` `[h, w]` into `y` `[ho, wo]`. Each output row first reduces its window's
    /// input rows into `line` (`w + 2·padding` values, the padding on both ends holding the
    /// reduction's identity: a loop over whole rows), then every window of three in `line`, so
    /// that neither loop branches on the edges.
    /// `columns[ox]`: the input columns inside window `ox` (for the mean).
    fn pool_plane(&self, x: &[f32], h: usize, y: &mut [f32], columns: &[f32], line: &mut [f32]) {
        let (p, wo) = (self.padding, columns.len());
        let w = line.len() - 2 * p;
        let identity = match self.reduction {
            Reduction::Max => f32::NEG_INFINITY,
            Reduction::MeanInside => 0.0,
        };
        line[..p].fill(identity);
        line[p + w..].fill(identity);
        for (oy, y_row) in y.chunks_exact_mut(wo).enumerate() {
            let (r0, r1) = self.window(oy, h);
            let body = &mut line[p..p + w];
            body.copy_from_slice(&x[r0 * w..][..w]);
            for row in x[(r0 + 1) * w..r1 * w].chunks_exact(w) {
                for (l, &v) in body.iter_mut().zip(row) {
                    *l = self.combine(*l, v);
                }
            }
            let s = self.stride;
            let windows = line
                .iter()
                .step_by(s)
                .zip(line[1..].iter().step_by(s))
                .zip(line[2..].iter().step_by(s));
            let rows = (r1 - r0) as f32;
            for ((out, ((&a, &b), &c)), count) in y_row.iter_mut().zip(windows).zip(columns) {
                let reduced = self.combine(self.combine(a, b), c);
                *out = match self.reduction {
                    Reduction::Max => reduced,
                    Reduction::MeanInside => reduced / (rows * count),
                };
            }
        }
    }

    /// One step of the reduction: down a column, and across a window's three columns.
    fn combine(&self, a: f32, b: f32) -> f32 {
        match self.reduction {
            Reduction::Max => max_nan(a, b),
            Reduction::MeanInside => a + b,
        }
    }
}

/// `max(a, b)` where a NaN on either side wins.
fn max_nan(a: f32, b: f32) -> f32 {
    if b > a || b.is_nan() {
        b
    } else {
        a
    }
}

impl CustomOp1 for Pool3x3 {
    fn name(&self) -> &'static str {
        "cpu-pool-3x3"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        if self.padding > 1 || self.stride == 0 {
            candle_core::bail!(
                "3×3 pool: stride {} and padding {} (expected a stride ≥ 1 and padding ≤ 1)",
                self.stride,
                self.padding
            );
        }
        let (batch, channels, h, w) = layout.shape().dims4()?;
        let (ho, wo) = (self.out_len(h)?, self.out_len(w)?);
        let x = f32_slice(x, layout, "3×3 pool: input")?;
        let mut y = zeroed(batch * channels * ho * wo);
        let columns: Vec<f32> = (0..wo)
            .map(|ox| {
                let (c0, c1) = self.window(ox, w);
                (c1 - c0) as f32
            })
            .collect();
        let plane = ho * wo;
        for_each_band(&mut y, plane, plane, |p, _, y| {
            let mut line = vec![0.0f32; w + 2 * self.padding];
            self.pool_plane(&x[p * h * w..][..h * w], h, y, &columns, &mut line);
        });
        Ok((CpuStorage::F32(y), Shape::from((batch, channels, ho, wo))))
    }
}
