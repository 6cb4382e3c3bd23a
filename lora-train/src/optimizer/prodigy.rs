//! Prodigy (Mishchenko & Defazio 2023, "Prodigy: An Expeditiously Adaptive Parameter-Free
//! Learner") as prodigyopt 1.1 updates, one parameter group, `slice_p = 1`: Adam whose step size
//! `d · lr` is estimated from the gradients' correlation with the distance travelled from the
//! start (`p0`), so `lr` stays about 1.

use std::collections::BTreeMap;

use anyhow::Result;
use candle_core::{DType, Tensor, Var};
use lora_core::formats::kohya::python_float;

use super::{scalar, Algorithm, Args};

pub struct Prodigy {
    beta1: f64,
    beta2: f64,
    /// `None`: √beta2.
    beta3: Option<f64>,
    eps: f64,
    weight_decay: f64,
    decouple: bool,
    use_bias_correction: bool,
    safeguard_warmup: bool,
    d0: f64,
    d_coef: f64,
    growth_rate: f64,
    // The state (prodigyopt keeps it in the parameter group).
    d: f64,
    d_max: f64,
    d_numerator: f64,
    /// Updates taken (not counting steps that found no gradient at all).
    k: u64,
}

const EXP_AVG: usize = 0;
const EXP_AVG_SQ: usize = 1;
const S: usize = 2;
const P0: usize = 3;

impl Prodigy {
    /// `--optimizer-args` as prodigyopt names them: `betas` (0.9, 0.999), `beta3` (√beta2),
    /// `eps` (1e-8), `decouple` (true), `use_bias_correction` (false), `safeguard_warmup`
    /// (false), `d0` (1e-6), `d_coef` (1.0), `growth_rate` (inf).
    pub(crate) fn new(weight_decay: f64, args: &mut Args) -> Result<Self> {
        let (beta1, beta2) = args.betas((0.9, 0.999))?;
        let beta3 = args.optional_number("beta3", (0.0, 1.0))?;
        let d0 = args.number("d0", 1e-6, (f64::MIN_POSITIVE, f64::MAX))?;
        Ok(Self {
            beta1,
            beta2,
            beta3,
            eps: args.number("eps", 1e-8, (f64::MIN_POSITIVE, 1.0))?,
            weight_decay,
            decouple: args.flag("decouple", true)?,
            use_bias_correction: args.flag("use_bias_correction", false)?,
            safeguard_warmup: args.flag("safeguard_warmup", false)?,
            d0,
            d_coef: args.number("d_coef", 1.0, (f64::MIN_POSITIVE, f64::MAX))?,
            growth_rate: args.number("growth_rate", f64::INFINITY, (1.0, f64::INFINITY))?,
            d: d0,
            d_max: d0,
            d_numerator: 0.0,
            k: 0,
        })
    }
}

fn to_f64(t: Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl Algorithm for Prodigy {
    fn slots(&self) -> &'static [&'static str] {
        &["prodigy_m", "prodigy_v", "prodigy_s", "prodigy_p0"]
    }

    fn init_slots(&self, p: &Tensor) -> Result<Vec<Tensor>> {
        // p0 is the start; prodigyopt keeps a scalar 0 for an all-zero parameter, which
        // broadcasts to the same `p0 - p`.
        Ok(vec![
            p.zeros_like()?,
            p.zeros_like()?,
            p.zeros_like()?,
            p.copy()?,
        ])
    }

    fn scalars(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("d", self.d),
            ("d_max", self.d_max),
            ("d_numerator", self.d_numerator),
            ("k", self.k as f64),
        ]
    }

    fn restore_scalars(&mut self, scalars: &BTreeMap<String, f64>) -> Result<()> {
        self.d = scalar(scalars, "d")?;
        self.d_max = scalar(scalars, "d_max")?;
        self.d_numerator = scalar(scalars, "d_numerator")?;
        self.k = scalar(scalars, "k")? as u64;
        Ok(())
    }

    fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        state: &mut [Vec<Tensor>],
        lrs: &[f64],
        _step: u64,
    ) -> Result<()> {
        // One rate for all (`Optimizer::set_lr_scales` refuses others).
        let lr = lrs.first().copied().unwrap_or(0.0);
        let (beta1, beta2) = (self.beta1, self.beta2);
        let beta3 = self.beta3.unwrap_or(beta2.sqrt());
        let bias_correction = if self.use_bias_correction {
            let k = self.k as i32 + 1;
            (1.0 - beta2.powi(k)).sqrt() / (1.0 - beta1.powi(k))
        } else {
            1.0
        };
        let (d, d0) = (self.d, self.d0);
        let dlr = d * lr * bias_correction;
        let d_numerator = self.d_numerator * beta3;
        let mut delta_numerator = 0.0;
        let mut d_denom = 0.0;
        // Coupled weight decay goes into the gradient, which the update uses too.
        let grads: Vec<Tensor> = params
            .iter()
            .zip(grads)
            .map(|((_, p), g)| {
                if self.weight_decay != 0.0 && !self.decouple {
                    Ok((g + (p.as_tensor() * self.weight_decay)?)?)
                } else {
                    Ok(g.clone())
                }
            })
            .collect::<Result<_>>()?;
        if lr > 0.0 {
            for (((_, p), slots), g) in params.iter().zip(state.iter_mut()).zip(&grads) {
                let travelled = (&slots[P0] - p.as_tensor())?;
                delta_numerator += (d / d0) * dlr * to_f64((g * travelled)?.sum_all()?)?;
                if beta1 > 0.0 {
                    slots[EXP_AVG] = ((&slots[EXP_AVG] * beta1)? + (g * (d * (1.0 - beta1)))?)?;
                }
                slots[EXP_AVG_SQ] =
                    ((&slots[EXP_AVG_SQ] * beta2)? + (g.sqr()? * (d * d * (1.0 - beta2)))?)?;
                let s_scale = if self.safeguard_warmup {
                    (d / d0) * d
                } else {
                    (d / d0) * dlr
                };
                slots[S] = ((&slots[S] * beta3)? + (g * s_scale)?)?;
                d_denom += to_f64(slots[S].abs()?.sum_all()?)?;
            }
        }
        // No gradient anywhere (or lr 0): prodigyopt returns before estimating or stepping.
        if d_denom == 0.0 {
            return Ok(());
        }
        let global_numerator = d_numerator + delta_numerator;
        let d_hat = self.d_coef * global_numerator / d_denom;
        let mut d = self.d;
        if d == d0 {
            d = d.max(d_hat);
        }
        self.d_max = self.d_max.max(d_hat);
        d = self.d_max.min(d * self.growth_rate);
        self.d_numerator = global_numerator;
        self.d = d;
        for (((_, p), slots), g) in params.iter().zip(state.iter()).zip(&grads) {
            let denom = (slots[EXP_AVG_SQ].sqrt()? + d * self.eps)?;
            let mut value = p.as_tensor().clone();
            if self.weight_decay != 0.0 && self.decouple {
                value = (&value + (&value * (-self.weight_decay * dlr))?)?;
            }
            let update = if beta1 > 0.0 {
                ((&slots[EXP_AVG] / &denom)? * dlr)?
            } else {
                ((g / &denom)? * (dlr * d))?
            };
            p.set(&(value - update)?)?;
        }
        self.k += 1;
        Ok(())
    }

    fn describe(&self) -> String {
        let beta3 = self.beta3.map_or("None".to_string(), python_float);
        format!(
            "Prodigy(betas=({}, {}), beta3={beta3}, eps={}, weight_decay={}, decouple={}, \
             use_bias_correction={}, safeguard_warmup={}, d0={}, d_coef={}, growth_rate={})",
            python_float(self.beta1),
            python_float(self.beta2),
            python_float(self.eps),
            python_float(self.weight_decay),
            lora_core::formats::kohya::python_bool(self.decouple),
            lora_core::formats::kohya::python_bool(self.use_bias_correction),
            lora_core::formats::kohya::python_bool(self.safeguard_warmup),
            python_float(self.d0),
            python_float(self.d_coef),
            python_float(self.growth_rate)
        )
    }
}
