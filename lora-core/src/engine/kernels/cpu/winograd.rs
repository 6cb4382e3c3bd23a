//! 3×3 stride-1 convolutions with padding 1 by Winograd's minimal filtering F(2×2, 3×3).
//!
//! Why: those convolutions are most of a Stable Diffusion step's arithmetic (55 % of an SD 1.5
//! UNet step at 64² latents, all of the VAE's heavy layers), and the im2col product spends 36
//! multiplications per input channel on each 2×2 block of outputs where Winograd spends 16: each
//! 4×4 input tile `d` and each filter `g` are transformed (`V = Bᵀ·d·B`, `U = G·g·Gᵀ`), the 16
//! positions of the transformed tiles are 16 independent matrix products over the channels
//! (`M_ξ = U_ξ · V_ξ`), and `Aᵀ·M·A` gives the 2×2 outputs. The transforms' coefficients are
//! 0, ±1 and ±½, so the results differ from the direct sum by rounding only. The transformed
//! filters are recomputed on every call (16/9 of the kernel's size: keeping them would cost more
//! memory than the weights), which is why small maps, where that cost is not repaid, keep the
//! im2col path.

use rayon::prelude::*;

use super::conv::ConvGeometry;
use super::gemm::{matmul, with_scratch, Mat, Threads};

/// Values per transformed tile (4×4).
const POSITIONS: usize = 16;

/// Fewest tiles (over the batch) for the Winograd path. An estimate: the filter transform moves
/// 16/9 of the kernel through memory, about the time the product saves on 50–60 tiles.
const MIN_TILES: usize = 64;

/// Fewest channels on either side: the first and last layers (3 or 4 channels) gain nothing.
const MIN_CHANNELS: usize = 16;

/// Most f32 values the transformed inputs and products of one band may hold (32 MiB).
const MAX_BAND_VALUES: usize = 1 << 23;

/// Whether the Winograd path computes this convolution.
pub(crate) fn applies(g: &ConvGeometry) -> bool {
    g.kh == 3
        && g.kw == 3
        && g.stride == 1
        && g.padding == (1, 1)
        && g.c_in >= MIN_CHANNELS
        && g.c_out >= MIN_CHANNELS
        && g.batch * g.h.div_ceil(2) * g.w.div_ceil(2) >= MIN_TILES
}

/// `U = G·g·Gᵀ` of every filter, laid out `[O][16][C]` (position ξ's `O × C` matrix is rows
/// `16·C` apart), where `tap(o, c)` returns filter `(o, c)`'s nine taps in row order.
pub(crate) fn transform_filters(
    c_out: usize,
    c_in: usize,
    tap: impl Fn(usize, usize) -> [f32; 9] + Sync,
) -> Vec<f32> {
    let mut u = vec![0.0f32; c_out * POSITIONS * c_in];
    u.par_chunks_mut(POSITIONS * c_in)
        .enumerate()
        .for_each(|(o, out)| {
            for c in 0..c_in {
                let g = tap(o, c);
                // G·g: rows g0, (g0+g1+g2)/2, (g0−g1+g2)/2, g2 of the 3×3 filter.
                let mut rows = [[0.0f32; 3]; 4];
                for j in 0..3 {
                    let (g0, g1, g2) = (g[j], g[3 + j], g[6 + j]);
                    rows[0][j] = g0;
                    rows[1][j] = 0.5 * (g0 + g1 + g2);
                    rows[2][j] = 0.5 * (g0 - g1 + g2);
                    rows[3][j] = g2;
                }
                // (G·g)·Gᵀ: the same combinations of the columns.
                for (i, r) in rows.iter().enumerate() {
                    let cols = [
                        r[0],
                        0.5 * (r[0] + r[1] + r[2]),
                        0.5 * (r[0] - r[1] + r[2]),
                        r[2],
                    ];
                    for (j, v) in cols.into_iter().enumerate() {
                        out[(4 * i + j) * c_in + c] = v;
                    }
                }
            }
        });
    u
}

/// The convolution of `x` `[B, C, H, W]` into `y` `[B, O, H, W]`, with the filters transformed
/// by [`transform_filters`]: `y = conv(x) + bias` (`y` is overwritten). The tiles of every
/// sample go through the same 16 products, so each transformed filter is packed once per band.
pub(crate) fn conv3x3(g: &ConvGeometry, x: &[f32], u: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    let (tiles_w, tiles_h) = (g.w.div_ceil(2), g.h.div_ceil(2));
    let band_rows = band_rows(g);
    for ty0 in (0..tiles_h).step_by(band_rows) {
        let band = Band {
            ty0,
            rows: band_rows.min(tiles_h - ty0),
            tiles_w,
            batch: g.batch,
        };
        let tiles = band.tiles();
        with_scratch(POSITIONS * (g.c_in + g.c_out) * tiles, |scratch| {
            let (v, m) = scratch.split_at_mut(POSITIONS * g.c_in * tiles);
            transform_inputs(g, x, &band, v);
            for position in 0..POSITIONS {
                let lhs = Mat::rows(&u[position * g.c_in..], POSITIONS * g.c_in);
                let rhs = Mat::rows(&v[position * tiles..], POSITIONS * tiles);
                let dims = (g.c_out, tiles, g.c_in);
                let dst = &mut m[position * tiles..];
                matmul(dst, POSITIONS * tiles, false, dims, lhs, rhs, Threads::All);
            }
            transform_outputs(g, m, &band, bias, y);
        });
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

/// Tile rows per band: the transformed inputs and products of a band stay under
/// [`MAX_BAND_VALUES`] (large VAE maps), at least one row.
pub(crate) fn band_rows(g: &ConvGeometry) -> usize {
    let per_row = POSITIONS * (g.c_in + g.c_out) * g.w.div_ceil(2) * g.batch;
    (MAX_BAND_VALUES / per_row.max(1)).clamp(1, g.h.div_ceil(2))
}

/// `V = Bᵀ·d·B` of the 4×4 input tiles of a band, into `v` laid out `[C][16][tiles]` (position ξ's `C × tiles` matrix is rows `16·tiles` apart). Tile `(ty, tx)`
/// reads input rows `2ty − 1 … 2ty + 2` and columns `2tx − 1 … 2tx + 2`, zero outside.
///
/// Each padded input row is split into its even and odd columns first, so that every step is
/// a contiguous loop over the tiles of a row, which the compiler vectorises.
fn transform_inputs(g: &ConvGeometry, x: &[f32], band: &Band, v: &mut [f32]) {
    let (h, w, tiles_w) = (g.h, g.w, band.tiles_w);
    let tiles = band.tiles();
    let n = tiles_w + 1; // even (or odd) columns of a padded row of 2·tiles_w + 2
    v.par_chunks_mut(POSITIONS * tiles)
        .enumerate()
        .for_each(|(c, out)| {
            // Rows 0–3: the even columns of the tile row's four input rows; rows 4–7: the odd.
            let mut split = vec![0.0f32; 8 * n];
            let mut t = vec![0.0f32; 8 * n];
            for (b, r) in (0..band.batch).flat_map(|b| (0..band.rows).map(move |r| (b, r))) {
                let plane = &x[(b * g.c_in + c) * h * w..][..h * w];
                let ty = band.ty0 + r;
                for i in 0..4 {
                    let (even, odd) = split.split_at_mut(4 * n);
                    let (even, odd) = (&mut even[i * n..][..n], &mut odd[i * n..][..n]);
                    // Padded row 2ty + i is input row 2ty + i − 1.
                    match (2 * ty + i).checked_sub(1).filter(|&iy| iy < h) {
                        None => {
                            even.fill(0.0);
                            odd.fill(0.0);
                        }
                        Some(iy) => {
                            let row = &plane[iy * w..][..w];
                            // Padded column 2k is input column 2k − 1; 2k + 1 is input 2k.
                            even[0] = 0.0;
                            for (k, e) in even.iter_mut().enumerate().skip(1) {
                                *e = row.get(2 * k - 1).copied().unwrap_or(0.0);
                            }
                            for (k, o) in odd.iter_mut().enumerate() {
                                *o = row.get(2 * k).copied().unwrap_or(0.0);
                            }
                        }
                    }
                }
                // Bᵀ·d over the rows: d0 − d2, d1 + d2, d2 − d1, d1 − d3, for both halves.
                for half in 0..2 {
                    let d = &split[half * 4 * n..][..4 * n];
                    let (d0, d1, d2, d3) = (&d[..n], &d[n..2 * n], &d[2 * n..3 * n], &d[3 * n..]);
                    let t = &mut t[half * 4 * n..][..4 * n];
                    let (t0, rest) = t.split_at_mut(n);
                    let (t1, rest) = rest.split_at_mut(n);
                    let (t2, t3) = rest.split_at_mut(n);
                    for k in 0..n {
                        t0[k] = d0[k] - d2[k];
                        t1[k] = d1[k] + d2[k];
                        t2[k] = d2[k] - d1[k];
                        t3[k] = d1[k] - d3[k];
                    }
                }
                // ·B over the columns 2tx … 2tx + 3 = even[tx], odd[tx], even[tx+1], odd[tx+1].
                for i in 0..4 {
                    let (e, o) = (&t[i * n..][..n], &t[(4 + i) * n..][..n]);
                    let at = |j: usize| (4 * i + j) * tiles + band.column(b, r);
                    for (tx, v) in out[at(0)..][..tiles_w].iter_mut().enumerate() {
                        *v = e[tx] - e[tx + 1];
                    }
                    for (tx, v) in out[at(1)..][..tiles_w].iter_mut().enumerate() {
                        *v = o[tx] + e[tx + 1];
                    }
                    for (tx, v) in out[at(2)..][..tiles_w].iter_mut().enumerate() {
                        *v = e[tx + 1] - o[tx];
                    }
                    for (tx, v) in out[at(3)..][..tiles_w].iter_mut().enumerate() {
                        *v = o[tx] - o[tx + 1];
                    }
                }
            }
        });
}

/// `Aᵀ·M·A` of the products `m` (`[O][16][tiles]`) of a band: the 2×2 output blocks, plus the bias, written into `y` `[O, H, W]` (blocks past an odd edge cut).
fn transform_outputs(
    g: &ConvGeometry,
    m: &[f32],
    band: &Band,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let (h, w, tiles_w) = (g.h, g.w, band.tiles_w);
    let tiles = band.tiles();
    y.par_chunks_mut(h * w)
        .enumerate()
        .for_each(|(plane_index, plane)| {
            let (sample, o) = (plane_index / g.c_out, plane_index % g.c_out);
            let products = &m[o * POSITIONS * tiles..][..POSITIONS * tiles];
            let b = bias.map_or(0.0, |b| b[o]);
            // Aᵀ·M over the rows (m0 + m1 + m2, m1 − m2 − m3) for the four columns of each tile.
            let mut s = vec![0.0f32; 8 * tiles_w];
            for r in 0..band.rows {
                let first = band.column(sample, r);
                let at = |i: usize, j: usize| &products[(4 * i + j) * tiles + first..][..tiles_w];
                for j in 0..4 {
                    let (m0, m1, m2, m3) = (at(0, j), at(1, j), at(2, j), at(3, j));
                    let (s0, s1) = s.split_at_mut(4 * tiles_w);
                    let (s0, s1) = (
                        &mut s0[j * tiles_w..][..tiles_w],
                        &mut s1[j * tiles_w..][..tiles_w],
                    );
                    for tx in 0..tiles_w {
                        s0[tx] = m0[tx] + m1[tx] + m2[tx];
                        s1[tx] = m1[tx] - m2[tx] - m3[tx];
                    }
                }
                // ·A over the columns: outputs 2tx (c0 + c1 + c2) and 2tx + 1 (c1 − c2 − c3).
                for i in 0..2 {
                    let oy = 2 * (band.ty0 + r) + i;
                    if oy >= h {
                        break;
                    }
                    let c = &s[4 * i * tiles_w..][..4 * tiles_w];
                    let (c0, c1, c2, c3) = (
                        &c[..tiles_w],
                        &c[tiles_w..2 * tiles_w],
                        &c[2 * tiles_w..3 * tiles_w],
                        &c[3 * tiles_w..],
                    );
                    let row = &mut plane[oy * w..][..w];
                    let (pairs, last) = row.split_at_mut(w / 2 * 2);
                    for (tx, pair) in pairs.chunks_exact_mut(2).enumerate() {
                        pair[0] = c0[tx] + c1[tx] + c2[tx] + b;
                        pair[1] = c1[tx] - c2[tx] - c3[tx] + b;
                    }
                    if let Some(v) = last.first_mut() {
                        let tx = tiles_w - 1;
                        *v = c0[tx] + c1[tx] + c2[tx] + b;
                    }
                }
            }
        });
}
