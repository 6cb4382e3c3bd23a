//! AdamW as `torch.optim.AdamW` updates (Loshchilov & Hutter): decoupled decay, then the
//! bias-corrected Adam step.

use anyhow::Result;
use candle_core::{Tensor, Var};
use lora_core::formats::kohya::python_float;

use super::{Algorithm, Args};

pub struct AdamW {
    pub(super) beta1: f64,
    pub(super) beta2: f64,
    pub(super) eps: f64,
    pub(super) weight_decay: f64,
}

impl AdamW {
    /// `--optimizer-args`: `betas` (0.9, 0.999), `eps` (1e-8).
    pub(crate) fn new(weight_decay: f64, args: &mut Args) -> Result<Self> {
        let (beta1, beta2) = args.betas((0.9, 0.999))?;
        let eps = args.number("eps", 1e-8, (f64::MIN_POSITIVE, 1.0))?;
        Ok(Self {
            beta1,
            beta2,
            eps,
            weight_decay,
        })
    }
}

impl Algorithm for AdamW {
    fn slots(&self) -> &'static [&'static str] {
        // The names checkpoints have used since the first version.
        &["adam_m", "adam_v"]
    }

    fn init_slots(&self, p: &Tensor) -> Result<Vec<Tensor>> {
        Ok(vec![p.zeros_like()?, p.zeros_like()?])
    }

    fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        state: &mut [Vec<Tensor>],
        lrs: &[f64],
        step: u64,
    ) -> Result<()> {
        let Self {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = *self;
        let t = step as i32;
        let correction1 = 1.0 - beta1.powi(t);
        let correction2 = 1.0 - beta2.powi(t);
        for ((((_, p), slots), g), &lr) in params.iter().zip(state).zip(grads).zip(lrs) {
            let m = ((&slots[0] * beta1)? + (g * (1.0 - beta1))?)?;
            let v = ((&slots[1] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let m_hat = (&m / correction1)?;
            let v_hat = (&v / correction2)?;
            let decayed = (p.as_tensor() * (1.0 - lr * weight_decay))?;
            let update = (m_hat / (v_hat.sqrt()? + eps)?)?;
            p.set(&(decayed - (update * lr)?)?)?;
            slots[0] = m;
            slots[1] = v;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "AdamW(betas=({}, {}), eps={}, weight_decay={})",
            python_float(self.beta1),
            python_float(self.beta2),
            python_float(self.eps),
            python_float(self.weight_decay)
        )
    }
}
