//! An exponential moving average of the adapter weights (`--ema-decay`), kept as diffusers'
//! `EMAModel` keeps one with its defaults: the shadow starts as the weights, and after optimizer
//! step t it moves by `(1 − decay_t)·(shadow − weight)` with `decay_t = min(decay, (1 + s) /
//! (10 + s))`, `s = t − 1` (0 at the first step, so the average starts at the weights and warms
//! up). The average is written as an adapter of its own beside the trained one
//! ([`ema_output_path`]) and kept in checkpoints, so a resumed run continues it exactly.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use candle_core::{Tensor, Var};

pub struct Ema {
    decay: f64,
    /// One per parameter, in the optimizer's order.
    shadow: Vec<Tensor>,
}

impl Ema {
    /// An average starting at the current `params`.
    pub fn new(decay: f64, params: &[(String, Var)]) -> Result<Self> {
        check_decay(decay)?;
        let shadow = params
            .iter()
            // Detached, here and in `update`: an average computed from the live (tracked) weights
            // would record a graph through every step and keep each step's tensors alive.
            .map(|(_, p)| Ok(p.as_tensor().detach().copy()?))
            .collect::<Result<_>>()?;
        Ok(Self { decay, shadow })
    }

    /// The decay applied at optimizer step `step` (counting from 1).
    pub fn decay_at(&self, step: u64) -> f64 {
        let s = step.saturating_sub(1);
        if s == 0 {
            return 0.0;
        }
        ((1 + s) as f64 / (10 + s) as f64).min(self.decay)
    }

    /// Moves the average towards `params` after optimizer step `step`.
    pub fn update(&mut self, params: &[(String, Var)], step: u64) -> Result<()> {
        let one_minus_decay = 1.0 - self.decay_at(step);
        for (shadow, (_, p)) in self.shadow.iter_mut().zip(params) {
            let moved = ((&*shadow - p.as_tensor().detach())? * one_minus_decay)?;
            *shadow = (&*shadow - moved)?;
        }
        Ok(())
    }

    /// The average, one tensor per parameter.
    pub fn tensors(&self) -> &[Tensor] {
        &self.shadow
    }

    /// Restores an average saved from one over the same parameters.
    pub fn restore(&mut self, tensors: Vec<Tensor>) -> Result<()> {
        ensure!(
            tensors.len() == self.shadow.len()
                && tensors
                    .iter()
                    .zip(&self.shadow)
                    .all(|(a, b)| a.dims() == b.dims()),
            "the checkpoint's EMA does not match the adapter's parameters"
        );
        self.shadow = tensors;
        Ok(())
    }
}

/// `--ema-decay`'s range: strictly between 0 and 1.
pub fn check_decay(decay: f64) -> Result<()> {
    ensure!(
        decay > 0.0 && decay < 1.0,
        "--ema-decay = {decay}: expected a number between 0 and 1 (e.g. 0.999)"
    );
    Ok(())
}

/// Where the average of the adapter at `output` is written: `name.safetensors` →
/// `name-ema.safetensors`.
pub fn ema_output_path(output: &Path) -> PathBuf {
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let extension = output
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    output.with_file_name(format!("{stem}-ema{extension}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_warms_up_then_holds_its_decay() {
        let ema = Ema {
            decay: 0.9,
            shadow: Vec::new(),
        };
        assert_eq!(ema.decay_at(1), 0.0);
        assert!((ema.decay_at(2) - 2.0 / 11.0).abs() < 1e-15);
        assert_eq!(ema.decay_at(1000), 0.9);
        assert_eq!(
            ema_output_path(Path::new("out/my-lora.safetensors")),
            Path::new("out/my-lora-ema.safetensors")
        );
    }

    /// The average of trained (tracked) weights records no graph: a recorded one would keep
    /// every step's tensors alive until the run ends.
    #[test]
    fn the_average_holds_no_graph() {
        let device = candle_core::Device::Cpu;
        let var = Var::new(&[1.0f32, 2.0], &device).unwrap();
        let params = vec![("w".to_string(), var.clone())];
        let mut ema = Ema::new(0.9, &params).unwrap();
        for step in 1..=3 {
            var.set(&Tensor::new(&[step as f32, 0.0], &device).unwrap())
                .unwrap();
            ema.update(&params, step).unwrap();
        }
        let shadow = &ema.tensors()[0];
        assert!(!shadow.track_op(), "the average is part of a graph");
        // Step 1 starts at the weights (decay 0); steps 2 and 3 decay by 2/11 and 3/12.
        let mut expected = 1.0f64;
        for (step, w) in [(2.0f64, 2.0f64), (3.0, 3.0)] {
            let d = ((step - 1.0 + 1.0) / (step - 1.0 + 10.0)).min(0.9);
            expected = d * expected + (1.0 - d) * w;
        }
        let got = f64::from(shadow.to_vec1::<f32>().unwrap()[0]);
        assert!((got - expected).abs() < 1e-6, "{got} vs {expected}");
    }
}
