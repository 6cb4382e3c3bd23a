//! Fréchet Inception Distance between two Gaussians fitted to feature sets, as pytorch-fid
//! defines it: ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂), in f64.
//!
//! pytorch-fid takes a general matrix square root of Σ₁Σ₂ (scipy's `sqrtm`), which is slow and
//! loses accuracy when the covariances are singular (fewer images than dimensions). The trace
//! needs only the eigenvalues: with Σ₁ = B Bᵀ (B = V √Λ from Σ₁'s eigendecomposition, keeping the
//! positive eigenvalues), Σ₁Σ₂ has the same non-zero eigenvalues as the symmetric positive
//! semi-definite Bᵀ Σ₂ B, so tr √(Σ₁Σ₂) = Σᵢ √λᵢ(Bᵀ Σ₂ B): two symmetric eigendecompositions,
//! the second only as large as Σ₁'s rank.

use anyhow::{ensure, Result};
use nalgebra::{DMatrix, DVector, SymmetricEigen};

use crate::features::FeatureRows;

/// The Gaussian fitted to a feature set: mean and unbiased covariance (`np.cov`, N − 1).
#[derive(Debug, Clone)]
pub struct GaussianStats {
    pub mean: DVector<f64>,
    pub covariance: DMatrix<f64>,
    pub count: usize,
}

impl GaussianStats {
    pub fn from_features(features: &FeatureRows) -> Result<Self> {
        let (n, d) = (features.rows(), features.dim);
        ensure!(
            n >= 2,
            "FID needs at least 2 images per set to estimate a covariance; got {n}"
        );
        let mut mean = DVector::<f64>::zeros(d);
        for i in 0..n {
            for (m, &x) in mean.iter_mut().zip(features.row(i)) {
                *m += f64::from(x);
            }
        }
        mean /= n as f64;
        let centred =
            DMatrix::<f64>::from_fn(n, d, |i, j| f64::from(features.data[i * d + j]) - mean[j]);
        let covariance = centred.tr_mul(&centred) / (n - 1) as f64;
        Ok(Self {
            mean,
            covariance,
            count: n,
        })
    }

    pub fn dim(&self) -> usize {
        self.mean.len()
    }
}

/// The Fréchet distance between two fitted Gaussians of the same dimension.
pub fn frechet_distance(a: &GaussianStats, b: &GaussianStats) -> Result<f64> {
    ensure!(
        a.dim() == b.dim(),
        "the two feature sets have different dimensions ({} and {})",
        a.dim(),
        b.dim()
    );
    let mean_term = (&a.mean - &b.mean).norm_squared();
    let trace_term = a.covariance.trace() + b.covariance.trace();
    let cross = trace_sqrt_product(&a.covariance, &b.covariance);
    let distance = mean_term + trace_term - 2.0 * cross;
    ensure!(
        distance.is_finite(),
        "the Fréchet distance is not finite (mean term {mean_term}, traces {trace_term}, \
         cross term {cross}): the features hold NaN or infinite values"
    );
    Ok(distance)
}

/// tr √(Σ₁Σ₂) for symmetric positive semi-definite Σ₁, Σ₂.
fn trace_sqrt_product(s1: &DMatrix<f64>, s2: &DMatrix<f64>) -> f64 {
    let eig = SymmetricEigen::new(s1.clone());
    // Eigenvalues below this are rounding noise of a singular covariance, not directions.
    let largest = eig.eigenvalues.iter().cloned().fold(0.0, f64::max);
    let floor = largest * f64::EPSILON * s1.nrows() as f64;
    let kept: Vec<usize> = (0..eig.eigenvalues.len())
        .filter(|&i| eig.eigenvalues[i] > floor)
        .collect();
    if kept.is_empty() {
        return 0.0;
    }
    let factor = DMatrix::<f64>::from_fn(s1.nrows(), kept.len(), |r, c| {
        eig.eigenvectors[(r, kept[c])] * eig.eigenvalues[kept[c]].sqrt()
    });
    let inner = factor.tr_mul(&(s2 * &factor));
    let inner = (&inner + inner.transpose()) * 0.5;
    SymmetricEigen::new(inner)
        .eigenvalues
        .iter()
        .map(|&l| l.max(0.0).sqrt())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Diagonal covariances: tr √(Σ₁Σ₂) = Σ √(aᵢbᵢ), so FID has a closed form.
    #[test]
    fn diagonal_gaussians_have_the_closed_form() {
        let a = GaussianStats {
            mean: DVector::from_vec(vec![0.0, 1.0, 2.0]),
            covariance: DMatrix::from_diagonal(&DVector::from_vec(vec![1.0, 4.0, 9.0])),
            count: 10,
        };
        let b = GaussianStats {
            mean: DVector::from_vec(vec![1.0, 1.0, 0.0]),
            covariance: DMatrix::from_diagonal(&DVector::from_vec(vec![4.0, 1.0, 0.0])),
            count: 10,
        };
        // ‖Δμ‖² = 1 + 0 + 4; traces 14 + 5; cross √4 + √4 + 0 = 4.
        let expected = 5.0 + 19.0 - 2.0 * 4.0;
        let got = frechet_distance(&a, &b).unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        assert!(frechet_distance(&a, &a).unwrap().abs() < 1e-12);
    }
}
