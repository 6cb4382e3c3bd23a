//! Kernel Inception Distance as torch-fidelity computes it: the unbiased MMD² estimate with the
//! cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³, averaged over `subsets` random subsets of
//! `subset_size` rows drawn from each set (numpy `RandomState(seed).choice(n, size,
//! replace=False)`, set 1 then set 2, per subset), with the population standard deviation.
//! Computed in f64 (torch-fidelity sums in the features' f32).

use anyhow::{ensure, Result};
use nalgebra::DMatrix;

use crate::features::FeatureRows;
use crate::numpy_rng::LegacyRandomState;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KernelInceptionDistance {
    pub mean: f64,
    pub std: f64,
    /// The subset size used (the requested one, capped at the smaller set).
    pub subset_size: usize,
}

pub fn kernel_inception_distance(
    a: &FeatureRows,
    b: &FeatureRows,
    subsets: usize,
    subset_size: usize,
    seed: u32,
) -> Result<KernelInceptionDistance> {
    ensure!(
        a.dim == b.dim,
        "the two feature sets have different dimensions ({} and {})",
        a.dim,
        b.dim
    );
    ensure!(subsets >= 1, "KID needs at least one subset");
    let m = subset_size.min(a.rows()).min(b.rows());
    ensure!(
        m >= 2,
        "KID needs at least 2 images in each set; got {} and {}",
        a.rows(),
        b.rows()
    );
    // With sets this small every kernel value is computed once, and each subset only adds up
    // its entries: with the default subset size every subset is the whole set.
    let whole = (a.rows() <= WHOLE_SET_LIMIT && b.rows() <= WHOLE_SET_LIMIT).then(|| {
        let (all_a, all_b) = (
            gather(a, &identity(a.rows())),
            gather(b, &identity(b.rows())),
        );
        KernelMatrices::new(&all_a, &all_b)
    });
    let mut rng = LegacyRandomState::new(seed);
    let mmds: Vec<f64> = (0..subsets)
        .map(|_| {
            let x = rng.choice_without_replacement(a.rows(), m);
            let y = rng.choice_without_replacement(b.rows(), m);
            match &whole {
                Some(kernels) => kernels.unbiased_mmd2(&x, &y),
                None => KernelMatrices::new(&gather(a, &x), &gather(b, &y))
                    .unbiased_mmd2(&identity(m), &identity(m)),
            }
        })
        .collect();
    let mean = mmds.iter().sum::<f64>() / subsets as f64;
    let var = mmds.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / subsets as f64;
    ensure!(
        mean.is_finite() && var.is_finite(),
        "KID is not finite: the features hold NaN or infinite values"
    );
    Ok(KernelInceptionDistance {
        mean,
        std: var.sqrt(),
        subset_size: m,
    })
}

/// Sets up to this many images have their kernel matrices computed once (3 × 4096² f64 is 400 MB
/// at most); larger ones per subset.
const WHOLE_SET_LIMIT: usize = 4096;

fn identity(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// The chosen rows as an f64 matrix, one row per sample.
fn gather(set: &FeatureRows, rows: &[usize]) -> DMatrix<f64> {
    DMatrix::from_fn(rows.len(), set.dim, |r, c| f64::from(set.row(rows[r])[c]))
}

/// k(xᵢ, yⱼ) = (xᵢᵀyⱼ / d + 1)³ for every pair.
fn kernel_matrix(x: &DMatrix<f64>, y: &DMatrix<f64>) -> DMatrix<f64> {
    let d = x.ncols() as f64;
    (x * y.transpose()).map(|dot| (dot / d + 1.0).powi(3))
}

/// The kernel within each set and across them.
struct KernelMatrices {
    xx: DMatrix<f64>,
    yy: DMatrix<f64>,
    xy: DMatrix<f64>,
}

impl KernelMatrices {
    fn new(x: &DMatrix<f64>, y: &DMatrix<f64>) -> Self {
        Self {
            xx: kernel_matrix(x, x),
            yy: kernel_matrix(y, y),
            xy: kernel_matrix(x, y),
        }
    }

    /// The unbiased MMD² of the samples `x` (rows of `xx`) and `y` (rows of `yy`).
    fn unbiased_mmd2(&self, x: &[usize], y: &[usize]) -> f64 {
        let m = x.len() as f64;
        let within = sum_entries(&self.xx, x, x, true) + sum_entries(&self.yy, y, y, true);
        within / (m * (m - 1.0)) - 2.0 * sum_entries(&self.xy, x, y, false) / (m * m)
    }
}

/// Σ k[rᵢ, cⱼ] over all pairs (i, j), without i = j when `skip_diagonal`.
fn sum_entries(k: &DMatrix<f64>, rows: &[usize], cols: &[usize], skip_diagonal: bool) -> f64 {
    let mut total = 0.0;
    for (j, &c) in cols.iter().enumerate() {
        let column = k.column(c);
        for (i, &r) in rows.iter().enumerate() {
            if !(skip_diagonal && i == j) {
                total += column[r];
            }
        }
    }
    total
}
