//! The scores of a generated set against a reference set, and the report that names how they
//! were computed.

use anyhow::Result;
use serde::Serialize;

use crate::frechet::frechet_distance;
use crate::inception_score::inception_score;
use crate::kid::kernel_inception_distance;
use crate::stats::FeatureSet;

/// How IS and KID sample (torch-fidelity's defaults, except IS keeps file order unless asked).
#[derive(Debug, Clone, Serialize)]
pub struct SamplingSettings {
    pub is_splits: usize,
    /// `Some(seed)`: shuffle as torch-fidelity does before splitting.
    pub is_shuffle: Option<u32>,
    pub kid_subsets: usize,
    pub kid_subset_size: usize,
    pub kid_seed: u32,
}

impl Default for SamplingSettings {
    fn default() -> Self {
        Self {
            is_splits: 10,
            is_shuffle: None,
            kid_subsets: 100,
            kid_subset_size: 1000,
            kid_seed: 2020,
        }
    }
}

/// FID, IS and KID of `fake` against `real`. A metric the sets are too small for is `None`, with
/// the reason in `warnings`.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub fid: f64,
    pub is_mean: Option<f64>,
    pub is_std: Option<f64>,
    pub kid_mean: Option<f64>,
    pub kid_std: Option<f64>,
    /// The KID subset size used (capped at the smaller set).
    pub kid_subset_size: Option<usize>,
    pub real_images: usize,
    pub fake_images: usize,
    pub warnings: Vec<String>,
}

pub fn scores(real: &FeatureSet, fake: &FeatureSet, settings: &SamplingSettings) -> Result<Scores> {
    let mut warnings = Vec::new();
    let dim = real.stats.dim();
    for set in [real, fake] {
        if set.count() <= dim {
            warnings.push(format!(
                "{}: {} images for {dim} feature dimensions: the covariance is singular and FID \
                 is biased upwards; compare only FIDs computed from equally many images (papers \
                 use 10,000 or more)",
                set.origin,
                set.count()
            ));
        }
    }
    let fid = frechet_distance(&real.stats, &fake.stats)?;
    let (is_mean, is_std) = match &fake.logits {
        Some(logits) if logits.rows() >= settings.is_splits => {
            let score = inception_score(logits, settings.is_splits, settings.is_shuffle)?;
            (Some(score.mean), Some(score.std))
        }
        Some(logits) => {
            warnings.push(format!(
                "IS not computed: {} generated images for {} splits",
                logits.rows(),
                settings.is_splits
            ));
            (None, None)
        }
        None => {
            warnings.push(format!(
                "IS not computed: {} holds no per-image logits",
                fake.origin
            ));
            (None, None)
        }
    };
    let (kid_mean, kid_std, kid_subset_size) = match (&real.pool, &fake.pool) {
        (Some(a), Some(b)) => {
            let kid = kernel_inception_distance(
                a,
                b,
                settings.kid_subsets,
                settings.kid_subset_size,
                settings.kid_seed,
            )?;
            if kid.subset_size < settings.kid_subset_size {
                warnings.push(format!(
                    "KID subsets of {} images (the smaller set's size), not {}",
                    kid.subset_size, settings.kid_subset_size
                ));
            }
            (Some(kid.mean), Some(kid.std), Some(kid.subset_size))
        }
        _ => {
            let without = if real.pool.is_none() { real } else { fake };
            warnings.push(format!(
                "KID not computed: {} holds statistics only, no per-image features",
                without.origin
            ));
            (None, None, None)
        }
    };
    Ok(Scores {
        fid,
        is_mean,
        is_std,
        kid_mean,
        kid_std,
        kid_subset_size,
        real_images: real.count(),
        fake_images: fake.count(),
        warnings,
    })
}
