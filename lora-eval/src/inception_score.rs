//! Inception Score as torch-fidelity computes it: the network's 1008 logits (without the fc
//! bias), softmax in f64, the set split into `splits` consecutive chunks
//! (`[i·N/splits, (i+1)·N/splits)`), per chunk exp(mean KL(p(y|x) ‖ p(y))), then the mean and
//! the population standard deviation of the chunks' scores.

use anyhow::{ensure, Result};

use crate::features::FeatureRows;
use crate::numpy_rng::LegacyRandomState;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InceptionScore {
    pub mean: f64,
    pub std: f64,
}

/// `shuffle`: torch-fidelity's default shuffles the rows with `RandomState(seed).permutation`
/// first; `None` keeps the given (sorted file) order.
pub fn inception_score(
    logits: &FeatureRows,
    splits: usize,
    shuffle: Option<u32>,
) -> Result<InceptionScore> {
    let n = logits.rows();
    ensure!(splits >= 1, "Inception Score needs at least one split");
    ensure!(
        n >= splits,
        "Inception Score with {splits} splits needs at least {splits} images; got {n}"
    );
    let order: Vec<usize> = match shuffle {
        Some(seed) => LegacyRandomState::new(seed).permutation(n),
        None => (0..n).collect(),
    };
    let (probs, log_probs): (Vec<Vec<f64>>, Vec<Vec<f64>>) = order
        .iter()
        .map(|&i| log_softmax(logits.row(i)))
        .map(|log_p| (log_p.iter().map(|l| l.exp()).collect(), log_p))
        .unzip();
    let scores: Vec<f64> = (0..splits)
        .map(|s| {
            let (start, end) = (s * n / splits, (s + 1) * n / splits);
            split_score(&probs[start..end], &log_probs[start..end])
        })
        .collect();
    let mean = scores.iter().sum::<f64>() / splits as f64;
    let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / splits as f64;
    ensure!(
        mean.is_finite() && var.is_finite(),
        "the Inception Score is not finite: the logits hold NaN or infinite values"
    );
    Ok(InceptionScore {
        mean,
        std: var.sqrt(),
    })
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row
        .iter()
        .map(|&x| f64::from(x))
        .fold(f64::NEG_INFINITY, f64::max);
    let log_sum = row
        .iter()
        .map(|&x| (f64::from(x) - max).exp())
        .sum::<f64>()
        .ln();
    row.iter().map(|&x| f64::from(x) - max - log_sum).collect()
}

/// exp(mean over the chunk of KL(p ‖ q)), q the chunk's mean distribution.
fn split_score(probs: &[Vec<f64>], log_probs: &[Vec<f64>]) -> f64 {
    let classes = probs[0].len();
    let mut log_q = vec![0.0; classes];
    for p in probs {
        for (q, &pk) in log_q.iter_mut().zip(p) {
            *q += pk;
        }
    }
    for q in &mut log_q {
        *q = (*q / probs.len() as f64).ln();
    }
    let kl_mean = probs
        .iter()
        .zip(log_probs)
        .map(|(p, log_p)| {
            p.iter()
                .zip(log_p)
                .zip(&log_q)
                .map(|((&pk, &lp), &lq)| pk * (lp - lq))
                .sum::<f64>()
        })
        .sum::<f64>()
        / probs.len() as f64;
    kl_mean.exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Identical predictions carry no information: every split scores exp(0) = 1. Confident,
    /// evenly spread predictions over k classes score k.
    #[test]
    fn limits_of_the_score() {
        let same = FeatureRows::new(3, [1.0, 2.0, 3.0].repeat(4)).unwrap();
        let s = inception_score(&same, 2, None).unwrap();
        assert!((s.mean - 1.0).abs() < 1e-12 && s.std.abs() < 1e-12, "{s:?}");
        let confident: Vec<f32> = (0..4)
            .flat_map(|i| (0..4).map(move |k| if k == i { 60.0 } else { 0.0 }))
            .collect();
        let s = inception_score(&FeatureRows::new(4, confident).unwrap(), 1, None).unwrap();
        assert!((s.mean - 4.0).abs() < 1e-9, "{s:?}");
    }
}
