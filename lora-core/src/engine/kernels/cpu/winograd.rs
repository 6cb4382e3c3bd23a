//! 3×3 stride-1 convolutions with padding 1 by Winograd's minimal filtering F(m×m, 3×3), with
//! m = 2 or 4.
//!
//! Why: those convolutions are most of a Stable Diffusion step's arithmetic (55 % of an SD 1.5
//! UNet step at 64² latents, all of the VAE's heavy layers), and the im2col product spends 9
//! multiplications per input channel on each output, where F(2×2, 3×3) spends 16 on a 2×2 block
//! (4 per output) and F(4×4, 3×3) 36 on a 4×4 block (2.25 per output): each (m+2)×(m+2) input
//! tile `d` and each filter `g` are transformed (`V = Bᵀ·d·B`, `U = G·g·Gᵀ`), the (m+2)²
//! positions of the transformed tiles are independent matrix products over the channels
//! (`M_ξ = U_ξ · V_ξ`), and `Aᵀ·M·A` gives the m×m outputs.
//!
//! F(2×2)'s coefficients are 0, ±1 and ±½, so its results differ from the direct sum by
//! rounding only. F(4×4)'s (interpolation points 0, ±1, ±2 and ∞) reach 8 and include sixths,
//! and cost precision: on a 320-channel layer with a 16² map, against a float64 direct sum, the
//! relative rms error of the f32 direct sum is 3.3e-7, F(2×2)'s 5.5e-7, F(4×4)'s 3.6e-6 — still
//! far below what f16 weights or training noise move, and the trade cuDNN and oneDNN make too.
//!
//! The transformed filters are recomputed on every call ((m+2)²/9 of the kernel's size: keeping
//! them would cost more memory than the weights), which is why small maps, where that cost is
//! not repaid, take F(2×2) or keep the im2col path.

use rayon::prelude::*;

use super::buffers::from_chunks;
use super::conv::ConvGeometry;
use super::gemm::{matmul, with_scratch, Mat, Threads};
use super::math::{self, simd_dispatch};

/// The cost model that chooses between im2col, F(2×2) and F(4×4), per pair of input and output
/// channels, in multiply-adds of the im2col product: im2col spends 9 per output pixel; a variant
/// spends [`FILTER_VALUE_COST`] per transformed filter value (written, then packed by the
/// product: memory-bound) and [`TILE_PRODUCT_COST`] per position and tile (the product plus the
/// tile transforms). Fitted to the convolutions timed inside an SD 1.5 UNet training step at 64²
/// latents, not alone: alone, the transformed filters cost more than in the step, and the fit
/// then keeps im2col where Winograd is faster (benches/RESULTS.md, "Winograd F(4×4, 3×3)").
/// [`MIN_TILES`] binds before the model does: on maps wider than 7 both ways a variant with that
/// many tiles is always cheaper than im2col, and F(4×4) than F(2×2), so the rule there is F(4×4)
/// from 128 tiles (2048 output pixels over the batch), else F(2×2) from 128 (512 pixels), else
/// im2col; the model decides only thinner maps. At batch 1 that is F(4×4) for an SD 1.5 UNet's
/// 64² level and the VAE, F(2×2) for the 32² level, and im2col for 16² and below; at a batch of
/// 2 or 4 the 32² level takes F(4×4) and the 16² level F(2×2).
const FILTER_VALUE_COST: f64 = 50.0;
/// See [`FILTER_VALUE_COST`].
const TILE_PRODUCT_COST: f64 = 1.4;

/// Fewest tiles (over the batch) for a variant: with fewer, each of its 16 or 36 products has
/// too few columns to repay packing a whole bank of transformed filters, which the cost model
/// does not see; F(2×2) with 4× the tiles, or im2col, is then faster (benches/RESULTS.md,
/// 2026-12-07 and "Winograd F(4×4, 3×3)").
const MIN_TILES: usize = 128;

/// Fewest channels on either side: the first and last layers (3 or 4 channels) gain nothing.
const MIN_CHANNELS: usize = 16;

/// Most f32 values the transformed inputs and products of one band may hold (32 MiB).
const MAX_BAND_VALUES: usize = 1 << 23;

/// One of Winograd's algorithms F(m×m, 3×3): the outputs per tile side and the three transforms.
pub(crate) struct Variant {
    /// Outputs per tile side; a tile reads m + 2 input rows and columns.
    pub(crate) m: usize,
    /// `Bᵀ`: m + 2 rows of m + 2.
    bt: &'static [&'static [f32]],
    /// `G`: m + 2 rows of 3.
    g: &'static [[f32; 3]],
    /// `Aᵀ`: m rows of m + 2.
    at: &'static [&'static [f32]],
}

/// F(2×2, 3×3), interpolation points 0, ±1 and ∞ (Lavin and Gray, "Fast Algorithms for
/// Convolutional Neural Networks", 2016).
static F2: Variant = Variant {
    m: 2,
    bt: &[
        &[1.0, 0.0, -1.0, 0.0],
        &[0.0, 1.0, 1.0, 0.0],
        &[0.0, -1.0, 1.0, 0.0],
        &[0.0, 1.0, 0.0, -1.0],
    ],
    g: &[
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ],
    at: &[&[1.0, 1.0, 1.0, 0.0], &[0.0, 1.0, -1.0, -1.0]],
};

/// F(4×4, 3×3), interpolation points 0, ±1, ±2 and ∞ (the same paper).
static F4: Variant = Variant {
    m: 4,
    bt: &[
        &[4.0, 0.0, -5.0, 0.0, 1.0, 0.0],
        &[0.0, -4.0, -4.0, 1.0, 1.0, 0.0],
        &[0.0, 4.0, -4.0, -1.0, 1.0, 0.0],
        &[0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        &[0.0, 2.0, -1.0, -2.0, 1.0, 0.0],
        &[0.0, 4.0, 0.0, -5.0, 0.0, 1.0],
    ],
    g: &[
        [0.25, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ],
    at: &[
        &[1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        &[0.0, 1.0, -1.0, 2.0, -2.0, 0.0],
        &[0.0, 1.0, 1.0, 4.0, 4.0, 0.0],
        &[0.0, 1.0, -1.0, 8.0, -8.0, 1.0],
    ],
};

/// The variant that computes this convolution, if any: the cheapest of im2col, F(2×2) and
/// F(4×4) by the cost model of [`FILTER_VALUE_COST`]. The choice does not depend on which side
/// has which channel count, so a convolution's input gradient (the channels swapped) takes the
/// same path as its forward pass.
pub(crate) fn variant(g: &ConvGeometry) -> Option<&'static Variant> {
    let shape = g.kh == 3
        && g.kw == 3
        && g.stride == 1
        && g.padding == (1, 1)
        && g.c_in >= MIN_CHANNELS
        && g.c_out >= MIN_CHANNELS;
    let im2col = 9.0 * (g.batch * g.h * g.w) as f64;
    let cost = |v: &Variant| {
        v.positions() as f64 * (FILTER_VALUE_COST + TILE_PRODUCT_COST * v.tiles(g) as f64)
    };
    [&F2, &F4]
        .into_iter()
        .filter(|v| shape && v.tiles(g) >= MIN_TILES)
        .map(|v| (cost(v), v))
        .filter(|(cost, _)| *cost < im2col)
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, v)| v)
}

/// The most coefficients in a row of a transform matrix: F(4×4)'s side of 6.
const MAX_TERMS: usize = 6;

/// `dst = Σᵢ coefficients[i] · source(i)` over the nonzero coefficients, so that a zero never
/// meets an infinity and F(2×2)'s sums stay exact (a product by ±1 or ½ is exact, fused or not).
fn combine<'a>(dst: &mut [f32], coefficients: &[f32], source: impl Fn(usize) -> &'a [f32]) {
    let len = dst.len();
    let mut terms = [(0.0f32, &[][..]); MAX_TERMS];
    let mut count = 0;
    for (i, &c) in coefficients.iter().enumerate().filter(|(_, c)| **c != 0.0) {
        let term = terms
            .get_mut(count)
            .expect("a transform row has at most MAX_TERMS coefficients");
        *term = (c, &source(i)[..len]);
        count += 1;
    }
    combine_terms(dst, &terms[..count]);
}

/// `dst`'s runs of `run` values, one per row of `matrix`: run r is [`combine`] of row r's
/// coefficients with the sources `source(i)`. Both halves of each separable transform are this
/// (`X·Y` over runs of channels or tiles).
fn combine_rows<'a, R: AsRef<[f32]>>(
    dst: &mut [f32],
    matrix: &[R],
    run: usize,
    source: impl Fn(usize) -> &'a [f32],
) {
    for (row, coefficients) in dst.chunks_exact_mut(run).zip(matrix) {
        combine(row, coefficients.as_ref(), &source);
    }
}

simd_dispatch! {
    /// `dst = Σ c·s` over `terms` (each `s` as long as `dst`): compiled for the CPU's vector
    /// width and fused multiply-add, where the transforms' callers are plain baseline code.
    fn combine_terms<const FMA: bool>(dst: &mut [f32], terms: &[(f32, &[f32])]) {
        let ((c, first), rest) = terms
            .split_first()
            .expect("every row of a Winograd transform has a nonzero coefficient");
        for (d, s) in dst.iter_mut().zip(*first) {
            *d = c * s;
        }
        for &(c, source) in rest {
            for (d, &s) in dst.iter_mut().zip(source) {
                *d = math::mul_add::<FMA>(c, s, *d);
            }
        }
    }
}

impl Variant {
    /// Values per side of an input tile.
    fn side(&self) -> usize {
        self.m + 2
    }

    /// Values per transformed tile.
    fn positions(&self) -> usize {
        self.side() * self.side()
    }

    /// Tiles over the batch.
    fn tiles(&self, g: &ConvGeometry) -> usize {
        g.batch * g.h.div_ceil(self.m) * g.w.div_ceil(self.m)
    }

    /// `U = G·g·Gᵀ` of every filter, laid out `[O][(m+2)²][C]` (position ξ's `O × C` matrix is
    /// rows `(m+2)²·C` apart), where `tap(o, c)` returns filter `(o, c)`'s nine taps in row order.
    ///
    /// For each output channel the taps are first gathered tap-major (`[9][C]`), so that both
    /// halves of the transform are contiguous loops over the input channels.
    pub(crate) fn transform_filters(
        &self,
        c_out: usize,
        c_in: usize,
        tap: impl Fn(usize, usize) -> [f32; 9] + Sync,
    ) -> Vec<f32> {
        let (side, positions) = (self.side(), self.positions());
        from_chunks(c_out * positions * c_in, positions * c_in, |o, out| {
            let mut taps = vec![0.0f32; 9 * c_in];
            for c in 0..c_in {
                for (t, value) in tap(o, c).into_iter().enumerate() {
                    taps[t * c_in + c] = value;
                }
            }
            // G·g: m + 2 rows of the filters' three columns, `[row][column][C]`.
            let mut rows = vec![0.0f32; side * 3 * c_in];
            combine_rows(&mut rows, self.g, 3 * c_in, |i| &taps[3 * i * c_in..]);
            // (G·g)·Gᵀ: the same combinations of each row's columns.
            let out_rows = out.chunks_exact_mut(side * c_in);
            for (out_row, row) in out_rows.zip(rows.chunks_exact(3 * c_in)) {
                combine_rows(out_row, self.g, c_in, |k| &row[k * c_in..]);
            }
        })
    }

    /// The convolution of `x` `[B, C, H, W]` into `y` `[B, O, H, W]`, with the filters transformed
    /// by [`Variant::transform_filters`]: `y = conv(x) + bias`, through a ReLU when `relu` (`y` is
    /// overwritten). The tiles of every sample go through the same products, so each transformed
    /// filter is packed once per band.
    pub(crate) fn conv3x3(
        &self,
        g: &ConvGeometry,
        x: &[f32],
        u: &[f32],
        bias: Option<&[f32]>,
        relu: bool,
        y: &mut [f32],
    ) {
        let positions = self.positions();
        let (tiles_w, tiles_h) = (g.w.div_ceil(self.m), g.h.div_ceil(self.m));
        let band_rows = self.band_rows(g);
        for ty0 in (0..tiles_h).step_by(band_rows) {
            let band = Band {
                ty0,
                rows: band_rows.min(tiles_h - ty0),
                tiles_w,
                batch: g.batch,
            };
            let tiles = band.tiles();
            with_scratch(positions * (g.c_in + g.c_out) * tiles, |scratch| {
                let (v, m) = scratch.split_at_mut(positions * g.c_in * tiles);
                self.transform_inputs(g, x, &band, v);
                for position in 0..positions {
                    let lhs = Mat::rows(&u[position * g.c_in..], positions * g.c_in);
                    let rhs = Mat::rows(&v[position * tiles..], positions * tiles);
                    let dims = (g.c_out, tiles, g.c_in);
                    let dst = &mut m[position * tiles..];
                    matmul(dst, positions * tiles, false, dims, lhs, rhs, Threads::All);
                }
                self.transform_outputs(g, m, &band, (bias, relu), y);
            });
        }
    }

    /// Tile rows per band: the transformed inputs and products of a band stay under
    /// [`MAX_BAND_VALUES`] (large VAE maps), at least one row.
    pub(crate) fn band_rows(&self, g: &ConvGeometry) -> usize {
        let per_row = self.positions() * (g.c_in + g.c_out) * g.w.div_ceil(self.m) * g.batch;
        (MAX_BAND_VALUES / per_row.max(1)).clamp(1, g.h.div_ceil(self.m))
    }

    /// `V = Bᵀ·d·B` of the input tiles of a band, into `v` laid out `[C][(m+2)²][tiles]`
    /// (position ξ's `C × tiles` matrix is rows `(m+2)²·tiles` apart). Tile `(ty, tx)` reads input
    /// rows `m·ty − 1 … m·ty + m` and columns `m·tx − 1 … m·tx + m`, zero outside.
    ///
    /// Per channel, the tiles' values are first gathered value-major (`d[i][k]`, a run over every
    /// tile of the band: each padded input row split into its columns modulo m, then runs copied
    /// out of the split), so that both halves of the transform are loops over all the band's
    /// tiles: a tile row alone is 8 or 16 tiles on the UNet's small maps, too short a loop for
    /// the vector unit.
    fn transform_inputs(&self, g: &ConvGeometry, x: &[f32], band: &Band, v: &mut [f32]) {
        let (m, side, positions) = (self.m, self.side(), self.positions());
        let (h, w, tiles_w) = (g.h, g.w, band.tiles_w);
        let tiles = band.tiles();
        // Padded columns per phase: a tile row spans m·tiles_w + 2 of them.
        let n = tiles_w + 1;
        // Per rayon job (reused over its channels): `d[i][k]` (row i, column k of every tile),
        // `(Bᵀ·d)[a][k]` and a split row. `d` is zero where a tile reads padding: the same places
        // for every channel of the band, so it is zeroed once per job and those places are never
        // written.
        let buffers = || {
            let values = vec![0.0f32; positions * tiles];
            (values.clone(), values, vec![0.0f32; m * n])
        };
        v.par_chunks_mut(positions * tiles)
            .enumerate()
            .for_each_init(buffers, |(d, mixed, phases), (c, out)| {
                for (b, r) in (0..band.batch).flat_map(|b| (0..band.rows).map(move |r| (b, r))) {
                    let plane = &x[(b * g.c_in + c) * h * w..][..h * w];
                    let (ty, first) = (band.ty0 + r, band.column(b, r));
                    for i in 0..side {
                        // Padded row m·ty + i is input row m·ty + i − 1.
                        let Some(iy) = (m * ty + i).checked_sub(1).filter(|&iy| iy < h) else {
                            continue;
                        };
                        split_columns(&plane[iy * w..][..w], m, phases);
                        // Padded column m·tx + k is phase k mod m at tile tx + k / m.
                        for k in 0..side {
                            let run = &phases[(k % m) * n + k / m..][..tiles_w];
                            d[(side * i + k) * tiles + first..][..tiles_w].copy_from_slice(run);
                        }
                    }
                }
                // Bᵀ·d over the rows, then ·B over the columns into `out`.
                combine_rows(mixed, self.bt, side * tiles, |i| &d[side * i * tiles..]);
                let out_rows = out.chunks_exact_mut(side * tiles);
                for (out_row, mixed_row) in out_rows.zip(mixed.chunks_exact(side * tiles)) {
                    combine_rows(out_row, self.bt, tiles, |k| &mixed_row[k * tiles..]);
                }
            });
    }

    /// `Aᵀ·M·A` of the `products` (`[O][(m+2)²][tiles]`) of a band: the m×m output blocks, plus
    /// the bias and through a ReLU when `relu`, written into `y` `[B, O, H, W]` (blocks past the
    /// bottom or right edge cut). Both halves run over all of a sample's tiles in the band at once
    /// (see [`Variant::transform_inputs`]).
    fn transform_outputs(
        &self,
        g: &ConvGeometry,
        products: &[f32],
        band: &Band,
        (bias, relu): (Option<&[f32]>, bool),
        y: &mut [f32],
    ) {
        let (m, side, positions) = (self.m, self.side(), self.positions());
        let (h, w, tiles_w) = (g.h, g.w, band.tiles_w);
        let tiles = band.tiles();
        // A sample's tiles in the band, contiguous.
        let run = band.rows * tiles_w;
        // Per rayon job: Aᵀ·M over the rows (`[i][j]`, m × (m + 2) runs), then ·A over the
        // columns (`[i][j]`, m × m runs); both are overwritten for every plane.
        let buffers = || (vec![0.0f32; m * side * run], vec![0.0f32; m * m * run]);
        y.par_chunks_mut(h * w).enumerate().for_each_init(
            buffers,
            |(rows, outputs), (plane_index, plane)| {
                let (sample, o) = (plane_index / g.c_out, plane_index % g.c_out);
                let first = band.column(sample, 0);
                let products = &products[o * positions * tiles..][..positions * tiles];
                let b = bias.map_or(0.0, |b| b[o]);
                for (i, row) in rows.chunks_exact_mut(side * run).enumerate() {
                    for (j, column) in row.chunks_exact_mut(run).enumerate() {
                        combine(column, self.at[i], |k| {
                            &products[(side * k + j) * tiles + first..]
                        });
                    }
                }
                let out_rows = outputs.chunks_exact_mut(m * run);
                for (out_row, row) in out_rows.zip(rows.chunks_exact(side * run)) {
                    combine_rows(out_row, self.at, run, |k| &row[k * run..]);
                }
                // Output (m·ty + i, m·tx + j) is tile (ty, tx)'s value `[i][j]`.
                for r in 0..band.rows {
                    for i in 0..m {
                        let oy = m * (band.ty0 + r) + i;
                        if oy >= h {
                            break;
                        }
                        let y_row = &mut plane[oy * w..][..w];
                        for j in 0..m {
                            let values = &outputs[(i * m + j) * run + r * tiles_w..][..tiles_w];
                            let columns = y_row.iter_mut().skip(j).step_by(m);
                            for (value, output) in columns.zip(values) {
                                let v = output + b;
                                *value = if relu { math::relu(v) } else { v };
                            }
                        }
                    }
                }
            },
        );
    }
}

/// Splits a row of `w` inputs, padded by a zero on each side, into its columns modulo m:
/// padded column `m·k + p` (input column `m·k + p − 1`) at `phases[p·n + k]`, with
/// `n = phases.len() / m`; every place past the row is zero.
fn split_columns(row: &[f32], m: usize, phases: &mut [f32]) {
    let n = phases.len() / m;
    for (p, phase) in phases.chunks_exact_mut(n).enumerate() {
        // Column 0 is the left padding.
        let skip = usize::from(p == 0);
        phase[..skip].fill(0.0);
        let inputs = row.get(m * skip + p - 1..).unwrap_or(&[]);
        let filled = skip
            + phase[skip..]
                .iter_mut()
                .zip(inputs.iter().step_by(m))
                .map(|(value, input)| *value = *input)
                .count();
        phase[filled..].fill(0.0);
    }
}

/// Tile rows `[ty0, ty0 + rows)` of every sample; tile `(b, r, tx)` is column
/// `(b·rows + r)·tiles_w + tx` of the transformed matrices.
struct Band {
    ty0: usize,
    rows: usize,
    tiles_w: usize,
    batch: usize,
}

impl Band {
    fn tiles(&self) -> usize {
        self.batch * self.rows * self.tiles_w
    }

    /// The first column of sample `b`'s tile row `r`.
    fn column(&self, b: usize, r: usize) -> usize {
        (b * self.rows + r) * self.tiles_w
    }
}
