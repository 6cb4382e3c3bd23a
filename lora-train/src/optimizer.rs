//! AdamW (Loshchilov & Hutter, PyTorch's `torch.optim.AdamW` update order) over the adapter's
//! `Var`s, with f32 moments, plus global gradient-norm clipping.
//!
//! Our own rather than candle-nn's `AdamW`: checkpoints need the moments and the step count out
//! and back in, which candle-nn's optimizer does not expose.

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// Moments of one parameter.
pub struct Moments {
    pub m: Tensor,
    pub v: Tensor,
}

pub struct AdamW {
    config: AdamWConfig,
    /// Updates applied so far (bias correction uses `steps + 1` for the next one).
    steps: u64,
    params: Vec<(String, Var)>,
    moments: Vec<Moments>,
}

impl AdamW {
    /// Fresh state (zero moments) for `params`, which must be f32.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let moments = params
            .iter()
            .map(|(name, p)| {
                ensure!(
                    p.dtype() == DType::F32,
                    "parameter `{name}` is {:?}; the optimizer keeps f32 parameters only",
                    p.dtype()
                );
                Ok(Moments {
                    m: p.zeros_like()?,
                    v: p.zeros_like()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            config,
            steps: 0,
            params,
            moments,
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    pub fn moments(&self) -> &[Moments] {
        &self.moments
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Restores state saved from an optimizer over the same parameters (same names, same order,
    /// same shapes).
    pub fn restore(&mut self, steps: u64, moments: Vec<Moments>) -> Result<()> {
        ensure!(
            moments.len() == self.params.len(),
            "optimizer state has {} parameters, the adapter {}",
            moments.len(),
            self.params.len()
        );
        for ((name, p), mo) in self.params.iter().zip(&moments) {
            ensure!(
                mo.m.dims() == p.dims() && mo.v.dims() == p.dims(),
                "optimizer state for `{name}` has shape {:?}, the parameter {:?}",
                mo.m.dims(),
                p.dims()
            );
        }
        self.steps = steps;
        self.moments = moments;
        Ok(())
    }

    /// One update with learning rate `lr` from `grads` (one per parameter, in order).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        ensure!(
            grads.len() == self.params.len(),
            "{} gradients for {} parameters",
            grads.len(),
            self.params.len()
        );
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        self.steps += 1;
        let t = self.steps as i32;
        let correction1 = 1.0 - beta1.powi(t);
        let correction2 = 1.0 - beta2.powi(t);
        for (((name, p), mo), g) in self.params.iter().zip(&mut self.moments).zip(grads) {
            let mut update = || -> Result<()> {
                mo.m = ((&mo.m * beta1)? + (g * (1.0 - beta1))?)?;
                mo.v = ((&mo.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                let m_hat = (&mo.m / correction1)?;
                let v_hat = (&mo.v / correction2)?;
                let decayed = (p.as_tensor() * (1.0 - lr * weight_decay))?;
                let step = (m_hat / (v_hat.sqrt()? + eps)?)?;
                p.set(&(decayed - (step * lr)?)?)?;
                Ok(())
            };
            update().with_context(|| format!("AdamW update of `{name}`"))?;
        }
        Ok(())
    }
}

/// The global L2 norm of `grads`, and the grads scaled so that norm is at most `max_norm`
/// (PyTorch's `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when the norm exceeds it).
pub fn clip_grad_norm(grads: Vec<Tensor>, max_norm: f64) -> Result<(f64, Vec<Tensor>)> {
    let mut total = 0f64;
    for g in &grads {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    // A NaN norm passes through unclipped; the loop stops on it before any update.
    if norm.is_nan() || norm <= max_norm {
        return Ok((norm, grads));
    }
    let factor = max_norm / (norm + 1e-6);
    let clipped = grads
        .into_iter()
        .map(|g| Ok((g * factor)?))
        .collect::<Result<_>>()?;
    Ok((norm, clipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One AdamW step by hand: from zero moments the bias-corrected update is lr·sign(g)
    /// (|m̂| = |g|, √v̂ = |g|), after decoupled decay.
    #[test]
    fn first_step_matches_the_closed_form() {
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], AdamWConfig::default()).unwrap();
        let g = Tensor::new(&[0.5f32, -3.0], &Device::Cpu).unwrap();
        opt.step(&[g], 0.1).unwrap();
        let got = p.as_tensor().to_vec1::<f32>().unwrap();
        let want = [
            1.0 * (1.0 - 0.1 * 0.01) - 0.1,
            -2.0 * (1.0 - 0.1 * 0.01) + 0.1,
        ];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        assert_eq!(opt.steps(), 1);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let g = vec![Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()];
        let (norm, clipped) = clip_grad_norm(g.clone(), 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let v = clipped[0].to_vec1::<f32>().unwrap();
        assert!((v[0] - 0.6).abs() < 1e-5 && (v[1] - 0.8).abs() < 1e-5);
        let (_, same) = clip_grad_norm(g, 10.0).unwrap();
        assert_eq!(same[0].to_vec1::<f32>().unwrap(), vec![3.0, 4.0]);
    }
}
