//! Low-rank algebra for `svd`, `resize` and `extract`: truncated SVDs of `up·down` products
//! (computed from QR factors of the thin matrices, never forming the product) and of full
//! weight differences, and the rank-selection rules kohya's tools use.

use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;

/// How many singular values to keep, beyond a fixed cap (`--dynamic`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DynamicRank {
    /// The smallest k with `Σ_{i<k} σᵢ² ≥ p² · Σ σᵢ²` (kohya `sv_fro`; `fro:` for `svd`).
    SvFro(f64),
    /// Every σ with `σ ≥ σ_max / p` (kohya `sv_ratio`).
    SvRatio(f64),
    /// The smallest k with `Σ_{i<k} σᵢ ≥ p · Σ σᵢ` (kohya `sv_cumulative`).
    SvCumulative(f64),
}

impl FromStr for DynamicRank {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (method, value) = s
            .split_once(':')
            .with_context(|| format!("`{s}`: expected METHOD:VALUE, e.g. sv_fro:0.9"))?;
        let p: f64 = value
            .parse()
            .with_context(|| format!("`{s}`: `{value}` is not a number"))?;
        let rule = match method {
            "fro" | "sv_fro" => Self::SvFro(p),
            "sv_ratio" => Self::SvRatio(p),
            "sv_cumulative" => Self::SvCumulative(p),
            _ => bail!("unknown dynamic rank method `{method}`: expected sv_fro (fro), sv_ratio or sv_cumulative"),
        };
        match rule {
            Self::SvFro(p) | Self::SvCumulative(p) => {
                ensure!(p > 0.0 && p <= 1.0, "`{s}`: the fraction must be in (0, 1]")
            }
            Self::SvRatio(p) => ensure!(p >= 1.0, "`{s}`: the ratio must be at least 1"),
        }
        Ok(rule)
    }
}

impl DynamicRank {
    /// The rank this rule keeps of `singular` (sorted descending), at least 1.
    fn rank(self, singular: &[f64]) -> usize {
        let smallest_reaching = |values: Vec<f64>, target: f64| {
            let mut sum = 0.0;
            for (i, v) in values.iter().enumerate() {
                sum += v;
                // A relative slack so that p = 1 keeps everything despite rounding.
                if sum >= target * (1.0 - 1e-12) {
                    return i + 1;
                }
            }
            values.len()
        };
        let k = match self {
            Self::SvFro(p) => {
                let squares: Vec<f64> = singular.iter().map(|s| s * s).collect();
                let total: f64 = squares.iter().sum();
                smallest_reaching(squares, p * p * total)
            }
            Self::SvCumulative(p) => {
                smallest_reaching(singular.to_vec(), p * singular.iter().sum::<f64>())
            }
            Self::SvRatio(p) => {
                let floor = singular.first().copied().unwrap_or(0.0) / p;
                singular.iter().filter(|&&s| s >= floor).count()
            }
        };
        k.max(1)
    }
}

/// The rank to keep: `cap` (at most), lowered by `dynamic` if given, at least 1, at most the
/// number of singular values.
pub fn select_rank(singular: &[f64], cap: usize, dynamic: Option<DynamicRank>) -> usize {
    let k = dynamic.map_or(cap, |d| d.rank(singular).min(cap));
    k.clamp(1, singular.len().max(1))
}

/// A truncated SVD `ΔW ≈ U·diag(σ)·Vᵀ`: `u` `[out, k]`, `vt` `[k, in]`, and all singular values
/// (descending), kept or not.
#[derive(Debug, Clone)]
pub struct Svd {
    pub u: DMatrix<f64>,
    pub singular: Vec<f64>,
    pub vt: DMatrix<f64>,
}

impl Svd {
    /// Full SVD of a dense matrix, singular values sorted descending.
    pub fn of(m: DMatrix<f64>) -> Result<Self> {
        let svd = m.svd(true, true);
        let u = svd.u.context("SVD did not return U")?;
        let vt = svd.v_t.context("SVD did not return Vᵀ")?;
        let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
        order.sort_by(|&a, &b| svd.singular_values[b].total_cmp(&svd.singular_values[a]));
        Ok(Self {
            u: u.select_columns(&order),
            singular: order.iter().map(|&i| svd.singular_values[i]).collect(),
            vt: vt.select_rows(&order),
        })
    }

    /// SVD of `up·down` (`[out, r]`·`[r, in]`) from the QR factors of `up` and `downᵀ`: only an
    /// `r×r` core is decomposed, so this is cheap for any layer size.
    pub fn of_product(up: &DMatrix<f64>, down: &DMatrix<f64>) -> Result<Self> {
        ensure!(
            up.ncols() == down.nrows(),
            "internal: up {:?} and down {:?} disagree on the rank",
            up.shape(),
            down.shape()
        );
        let qr_up = up.clone().qr();
        let qr_down = down.transpose().qr();
        let core = qr_up.r() * qr_down.r().transpose();
        let inner = Self::of(core)?;
        Ok(Self {
            u: qr_up.q() * inner.u,
            singular: inner.singular,
            vt: inner.vt * qr_down.q().transpose(),
        })
    }

    /// Kept factors of rank `k`: `(U_k·diag(σ_k), V_kᵀ)`, so that `up·down = U_k σ_k V_kᵀ`.
    pub fn factors(&self, k: usize) -> (DMatrix<f64>, DMatrix<f64>) {
        let mut up = self.u.columns(0, k).into_owned();
        for (j, s) in self.singular.iter().take(k).enumerate() {
            up.column_mut(j).scale_mut(*s);
        }
        (up, self.vt.rows(0, k).into_owned())
    }

    /// `‖ΔW − ΔW_k‖_F = √(Σ dropped σ²)`.
    pub fn truncation_error(&self, k: usize) -> f64 {
        self.singular[k..].iter().map(|s| s * s).sum::<f64>().sqrt()
    }

    /// `Σ σ² = ‖ΔW‖²_F`.
    pub fn energy(&self) -> f64 {
        self.singular.iter().map(|s| s * s).sum()
    }
}

/// A 2-D tensor as an f64 matrix.
pub fn to_matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let (rows, cols) = t.dims2()?;
    let values = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(rows, cols, &values))
}

/// An f64 matrix as a 2-D f32 tensor.
pub fn to_tensor(m: &DMatrix<f64>) -> Result<Tensor> {
    let values: Vec<f32> = m.transpose().iter().map(|&v| v as f32).collect();
    Ok(Tensor::from_vec(
        values,
        (m.nrows(), m.ncols()),
        &Device::Cpu,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_rules_follow_kohyas_definitions() {
        let s = [4.0, 2.0, 1.0, 1.0];
        // σ² = 16, 4, 1, 1 (total 22): 0.9² · 22 = 17.8 needs two values.
        assert_eq!(DynamicRank::SvFro(0.9).rank(&s), 2);
        // Σσ = 8: 0.75 · 8 = 6 is reached by 4 + 2.
        assert_eq!(DynamicRank::SvCumulative(0.75).rank(&s), 2);
        // σ ≥ 4/4 keeps all four.
        assert_eq!(DynamicRank::SvRatio(4.0).rank(&s), 4);
        assert_eq!(select_rank(&s, 1, Some(DynamicRank::SvRatio(4.0))), 1);
        assert!("sv_fro:1.5".parse::<DynamicRank>().is_err());
        assert!("magic:0.5".parse::<DynamicRank>().is_err());
    }

    #[test]
    fn product_svd_matches_the_dense_svd() -> Result<()> {
        let up = DMatrix::from_fn(6, 3, |i, j| ((i * 3 + j) as f64).sin());
        let down = DMatrix::from_fn(3, 5, |i, j| ((i * 5 + j) as f64).cos());
        let thin = Svd::of_product(&up, &down)?;
        let dense = Svd::of(&up * &down)?;
        for (a, b) in thin.singular.iter().zip(&dense.singular) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        let (u, v) = thin.factors(3);
        assert!((&u * &v - &up * &down).norm() < 1e-12);
        Ok(())
    }
}
