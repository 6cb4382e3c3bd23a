//! Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") as lion-pytorch
//! updates: decay, a step of `lr` in the sign of the interpolated momentum, then the momentum
//! update with the second beta.

use anyhow::Result;
use candle_core::{Tensor, Var};
use lora_core::formats::kohya::python_float;

use super::{Algorithm, Args};

pub struct Lion {
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
}

impl Lion {
    /// `--optimizer-args`: `betas` (0.9, 0.99).
    pub(crate) fn new(weight_decay: f64, args: &mut Args) -> Result<Self> {
        let (beta1, beta2) = args.betas((0.9, 0.99))?;
        Ok(Self {
            beta1,
            beta2,
            weight_decay,
        })
    }
}

impl Algorithm for Lion {
    fn slots(&self) -> &'static [&'static str] {
        &["lion_m"]
    }

    fn init_slots(&self, p: &Tensor) -> Result<Vec<Tensor>> {
        Ok(vec![p.zeros_like()?])
    }

    fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        state: &mut [Vec<Tensor>],
        lrs: &[f64],
        _step: u64,
    ) -> Result<()> {
        let Self {
            beta1,
            beta2,
            weight_decay,
        } = *self;
        for ((((_, p), slots), g), &lr) in params.iter().zip(state).zip(grads).zip(lrs) {
            let decayed = (p.as_tensor() * (1.0 - lr * weight_decay))?;
            let direction = ((&slots[0] * beta1)? + (g * (1.0 - beta1))?)?.sign()?;
            p.set(&(decayed - (direction * lr)?)?)?;
            slots[0] = ((&slots[0] * beta2)? + (g * (1.0 - beta2))?)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "Lion(betas=({}, {}), weight_decay={})",
            python_float(self.beta1),
            python_float(self.beta2),
            python_float(self.weight_decay)
        )
    }
}
