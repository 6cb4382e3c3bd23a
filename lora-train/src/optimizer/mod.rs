//! The optimizers of `--optimizer` over the adapter's `Var`s, plus global gradient-norm clipping:
//! AdamW (PyTorch's `torch.optim.AdamW`), AdamW8bit (bitsandbytes' block-wise 8-bit AdamW), Lion
//! (lion-pytorch) and Prodigy (prodigyopt), each the reference implementation's update in the
//! same order, checked against it over a fixed gradient sequence (`tests/optimizer_parity.rs`).
//!
//! Our own rather than candle-nn's: checkpoints need every piece of state out and back in. An
//! [`Optimizer`] is the parameters, one [`Algorithm`] and its state: per parameter a few named
//! tensors ("slots": f32 of the parameter's shape, or AdamW8bit's u8 codes and f32 block scales;
//! what `Algorithm::init_slots` makes) and a few named scalars (f64). A checkpoint keeps exactly
//! these, so a resumed run continues bit for bit.

mod adamw;
mod adamw8bit;
mod lion;
mod prodigy;
mod quantile_maps;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, Var};

use adamw::AdamW;
use adamw8bit::AdamW8bit;
use lion::Lion;
use prodigy::Prodigy;

/// `--optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimizerKind {
    #[default]
    AdamW,
    /// bitsandbytes' `AdamW8bit`: block-wise 8-bit moments.
    AdamW8bit,
    Lion,
    Prodigy,
}

impl OptimizerKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::AdamW => "adamw",
            Self::AdamW8bit => "adamw8bit",
            Self::Lion => "lion",
            Self::Prodigy => "prodigy",
        }
    }

    /// The reference implementation's default weight decay: PyTorch AdamW's and bitsandbytes'
    /// 0.01, lion-pytorch's and prodigyopt's 0.
    pub fn default_weight_decay(self) -> f64 {
        match self {
            Self::AdamW | Self::AdamW8bit => 1e-2,
            Self::Lion | Self::Prodigy => 0.0,
        }
    }

    /// The default peak learning rate: 1e-4, except Prodigy's 1.0 (there it scales the step size
    /// Prodigy estimates, and its authors advise leaving it at 1).
    pub fn default_lr(self) -> f64 {
        match self {
            Self::AdamW | Self::AdamW8bit | Self::Lion => 1e-4,
            Self::Prodigy => 1.0,
        }
    }
}

impl FromStr for OptimizerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "adamw" => Ok(Self::AdamW),
            // kohya's --optimizer_type spelling too.
            "adamw8bit" | "adamw_8bit" => Ok(Self::AdamW8bit),
            "lion" => Ok(Self::Lion),
            "prodigy" => Ok(Self::Prodigy),
            _ => bail!("unknown optimizer `{s}`: expected adamw, adamw8bit, lion or prodigy"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for OptimizerKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        lora_core::options::deserialize_text(d)
    }
}

impl fmt::Display for OptimizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which optimizer, and its settings: `--weight-decay` and the `--optimizer-args KEY=VALUE` of
/// its reference implementation (kohya's `--optimizer_args`).
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerSettings {
    pub kind: OptimizerKind,
    pub weight_decay: f64,
    pub args: BTreeMap<String, String>,
}

impl Default for OptimizerSettings {
    /// AdamW with PyTorch's defaults.
    fn default() -> Self {
        let kind = OptimizerKind::default();
        Self {
            kind,
            weight_decay: kind.default_weight_decay(),
            args: BTreeMap::new(),
        }
    }
}

impl OptimizerSettings {
    /// Checks the arguments by building the algorithm once, without parameters.
    pub fn check(&self) -> Result<()> {
        self.algorithm().map(|_| ())
    }

    fn algorithm(&self) -> Result<Box<dyn Algorithm>> {
        let mut args = Args::new(self.kind, &self.args);
        let algorithm: Box<dyn Algorithm> = match self.kind {
            OptimizerKind::AdamW => Box::new(AdamW::new(self.weight_decay, &mut args)?),
            OptimizerKind::AdamW8bit => Box::new(AdamW8bit::new(self.weight_decay, &mut args)?),
            OptimizerKind::Lion => Box::new(Lion::new(self.weight_decay, &mut args)?),
            OptimizerKind::Prodigy => Box::new(Prodigy::new(self.weight_decay, &mut args)?),
        };
        args.finish()?;
        Ok(algorithm)
    }
}

/// An optimizer's `--optimizer-args`, taken one by one; what is left is an error.
pub(crate) struct Args<'a> {
    kind: OptimizerKind,
    given: &'a BTreeMap<String, String>,
    taken: Vec<&'static str>,
}

impl<'a> Args<'a> {
    fn new(kind: OptimizerKind, given: &'a BTreeMap<String, String>) -> Self {
        Self {
            kind,
            given,
            taken: Vec::new(),
        }
    }

    fn raw(&mut self, key: &'static str) -> Option<&'a str> {
        self.taken.push(key);
        self.given.get(key).map(String::as_str)
    }

    fn bad(&self, key: &str, value: &str, expected: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "--optimizer-args {key}={value}: expected {expected} for {}",
            self.kind
        )
    }

    /// A number in `range` (both ends included), or `default`.
    pub(crate) fn number(
        &mut self,
        key: &'static str,
        default: f64,
        range: (f64, f64),
    ) -> Result<f64> {
        Ok(self.optional_number(key, range)?.unwrap_or(default))
    }

    /// A number in `range` (both ends included), if given.
    pub(crate) fn optional_number(
        &mut self,
        key: &'static str,
        range: (f64, f64),
    ) -> Result<Option<f64>> {
        let Some(value) = self.raw(key) else {
            return Ok(None);
        };
        let number: f64 = value
            .trim()
            .parse()
            .map_err(|_| self.bad(key, value, "a number"))?;
        ensure!(
            number >= range.0 && number <= range.1,
            self.bad(
                key,
                value,
                &format!("a number in [{}, {}]", range.0, range.1)
            )
        );
        Ok(Some(number))
    }

    /// `betas=B1,B2`, each in [0, 1).
    pub(crate) fn betas(&mut self, default: (f64, f64)) -> Result<(f64, f64)> {
        let Some(value) = self.raw("betas") else {
            return Ok(default);
        };
        let parts: Vec<f64> = value
            .trim_matches(|c| c == '(' || c == ')')
            .split(',')
            .map(|b| b.trim().parse::<f64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| self.bad("betas", value, "two numbers B1,B2"))?;
        match parts[..] {
            [b1, b2] if (0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2) => Ok((b1, b2)),
            _ => Err(self.bad("betas", value, "two numbers B1,B2 in [0, 1)")),
        }
    }

    /// `true`/`false` (any case), or `default`.
    pub(crate) fn flag(&mut self, key: &'static str, default: bool) -> Result<bool> {
        match self.raw(key).map(|v| (v, v.trim().to_ascii_lowercase())) {
            None => Ok(default),
            Some((_, v)) if v == "true" => Ok(true),
            Some((_, v)) if v == "false" => Ok(false),
            Some((v, _)) => Err(self.bad(key, v, "true or false")),
        }
    }

    fn finish(self) -> Result<()> {
        let unknown: Vec<&str> = self
            .given
            .keys()
            .map(String::as_str)
            .filter(|k| !self.taken.contains(k))
            .collect();
        ensure!(
            unknown.is_empty(),
            "--optimizer-args {}: not an argument of {} (it takes {})",
            unknown.join(", "),
            self.kind,
            self.taken.join(", ")
        );
        Ok(())
    }
}

/// The update rule of one optimizer. The per-parameter state is `slots()` tensors per parameter,
/// made by `init_slots` and kept by [`Optimizer`]; scalar state lives in the algorithm.
pub(crate) trait Algorithm: Send {
    /// Names of the per-parameter state tensors, as checkpoints spell them.
    fn slots(&self) -> &'static [&'static str];
    /// The fresh state tensors of parameter `p`, one per slot.
    fn init_slots(&self, p: &Tensor) -> Result<Vec<Tensor>>;
    /// The scalar state, by name (none by default).
    fn scalars(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
    /// Restores the scalar state `scalars()` gave.
    fn restore_scalars(&mut self, _scalars: &BTreeMap<String, f64>) -> Result<()> {
        Ok(())
    }
    /// One update of every parameter, parameter `i` with the (scheduled) learning rate `lrs[i]`;
    /// `step` counts the updates including this one.
    fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        state: &mut [Vec<Tensor>],
        lrs: &[f64],
        step: u64,
    ) -> Result<()>;
    /// The optimizer as kohya's `ss_optimizer` metadata names one (class and arguments).
    fn describe(&self) -> String;
}

/// The state of an optimizer as a checkpoint keeps it.
#[derive(Debug, Clone)]
pub struct OptimizerState {
    /// Updates applied.
    pub steps: u64,
    pub scalars: BTreeMap<String, f64>,
    /// Per parameter (in order), its slot tensors (in `slot_names` order).
    pub slots: Vec<Vec<Tensor>>,
}

pub struct Optimizer {
    kind: OptimizerKind,
    algorithm: Box<dyn Algorithm>,
    /// Updates applied so far.
    steps: u64,
    params: Vec<(String, Var)>,
    state: Vec<Vec<Tensor>>,
    /// Per parameter, its learning rate as a multiple of the scheduled one (PyTorch's parameter
    /// groups: `--text-encoder-lr`); all 1 by default.
    lr_scales: Vec<f64>,
}

impl Optimizer {
    /// Fresh state for `params`, which must be f32.
    pub fn new(params: Vec<(String, Var)>, settings: &OptimizerSettings) -> Result<Self> {
        let algorithm = settings.algorithm()?;
        let state = params
            .iter()
            .map(|(name, p)| {
                ensure!(
                    p.dtype() == DType::F32,
                    "parameter `{name}` is {:?}; the optimizer keeps f32 parameters only",
                    p.dtype()
                );
                algorithm.init_slots(p.as_tensor())
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            kind: settings.kind,
            algorithm,
            steps: 0,
            lr_scales: vec![1.0; params.len()],
            params,
            state,
        })
    }

    /// Sets each parameter's learning rate to `lr_scales[i]` times the scheduled one. Prodigy
    /// estimates one step size for all parameters and, as prodigyopt, refuses different rates.
    pub fn set_lr_scales(&mut self, lr_scales: Vec<f64>) -> Result<()> {
        ensure!(
            lr_scales.len() == self.params.len(),
            "{} learning-rate scales for {} parameters",
            lr_scales.len(),
            self.params.len()
        );
        ensure!(
            lr_scales.iter().all(|s| s.is_finite() && *s >= 0.0),
            "learning-rate scales must be finite and ≥ 0"
        );
        ensure!(
            self.kind != OptimizerKind::Prodigy || lr_scales.iter().all(|s| *s == lr_scales[0]),
            "prodigy estimates one step size for every parameter: it takes one learning rate \
             (prodigyopt refuses parameter groups with different ones)"
        );
        self.lr_scales = lr_scales;
        Ok(())
    }

    pub fn kind(&self) -> OptimizerKind {
        self.kind
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Bytes of optimizer state held (every slot tensor of every parameter).
    pub fn state_bytes(&self) -> usize {
        self.state
            .iter()
            .flatten()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// The names of each parameter's state tensors.
    pub fn slot_names(&self) -> &'static [&'static str] {
        self.algorithm.slots()
    }

    /// kohya's `ss_optimizer` value.
    pub fn describe(&self) -> String {
        self.algorithm.describe()
    }

    pub fn state(&self) -> OptimizerState {
        OptimizerState {
            steps: self.steps,
            scalars: self
                .algorithm
                .scalars()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            slots: self.state.clone(),
        }
    }

    /// Restores state saved from an optimizer of the same kind over the same parameters (same
    /// names, order and shapes).
    pub fn restore(&mut self, state: OptimizerState) -> Result<()> {
        ensure!(
            state.slots.len() == self.params.len(),
            "optimizer state has {} parameters, the adapter {}",
            state.slots.len(),
            self.params.len()
        );
        let names = self.algorithm.slots();
        for ((name, p), slots) in self.params.iter().zip(&state.slots) {
            ensure!(
                slots.len() == names.len(),
                "optimizer state for `{name}` has {} tensors, {} keeps {}",
                slots.len(),
                self.kind,
                names.len()
            );
            let fresh = self.algorithm.init_slots(p.as_tensor())?;
            for ((slot, tensor), expected) in names.iter().zip(slots).zip(&fresh) {
                ensure!(
                    tensor.dims() == expected.dims() && tensor.dtype() == expected.dtype(),
                    "optimizer state `{slot}` of `{name}` is {:?} {:?}; {} keeps {:?} {:?} for a \
                     parameter of shape {:?}",
                    tensor.dtype(),
                    tensor.dims(),
                    self.kind,
                    expected.dtype(),
                    expected.dims(),
                    p.dims()
                );
            }
        }
        for key in state.scalars.keys() {
            ensure!(
                self.algorithm.scalars().iter().any(|(k, _)| k == key),
                "optimizer state has a scalar `{key}` that {} does not keep",
                self.kind
            );
        }
        self.algorithm.restore_scalars(&state.scalars)?;
        self.steps = state.steps;
        self.state = state.slots;
        Ok(())
    }

    /// One update with learning rate `lr` from `grads` (one per parameter, in order). A
    /// parameter the loss does not reach (`None`: SDXL's unread last layer of its first text
    /// encoder) is passed over as PyTorch's optimizers pass over a `grad` of `None`: no weight
    /// decay, its state untouched, and no part in Prodigy's estimate. Bias corrections count
    /// the optimizer's steps, not each parameter's (PyTorch's); the two differ only for a
    /// parameter that some steps reach and others do not, which no model here has.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        ensure!(
            grads.len() == self.params.len(),
            "{} gradients for {} parameters",
            grads.len(),
            self.params.len()
        );
        self.steps += 1;
        let reached: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].is_some()).collect();
        let params: Vec<(String, Var)> = reached.iter().map(|&i| self.params[i].clone()).collect();
        let present: Vec<Tensor> = grads.iter().flatten().cloned().collect();
        let lrs: Vec<f64> = reached.iter().map(|&i| self.lr_scales[i] * lr).collect();
        let mut state: Vec<Vec<Tensor>> = reached
            .iter()
            .map(|&i| std::mem::take(&mut self.state[i]))
            .collect();
        let result = self
            .algorithm
            .step(&params, &present, &mut state, &lrs, self.steps);
        for (&i, slots) in reached.iter().zip(state) {
            self.state[i] = slots;
        }
        result.with_context(|| format!("{} update {}", self.kind, self.steps))
    }
}

/// A scalar named `key` of restored optimizer state.
pub(crate) fn scalar(scalars: &BTreeMap<String, f64>, key: &str) -> Result<f64> {
    scalars
        .get(key)
        .copied()
        .with_context(|| format!("optimizer state has no `{key}`"))
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
    fn first_adamw_step_matches_the_closed_form() {
        let p = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let settings = OptimizerSettings::default();
        let mut opt = Optimizer::new(vec![("p".into(), p.clone())], &settings).unwrap();
        let g = Tensor::new(&[0.5f32, -3.0], &Device::Cpu).unwrap();
        opt.step(&[Some(g)], 0.1).unwrap();
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

    /// Settings of `kind` with weight decay 0.1, and fresh parameters "a" and "b" from `start`.
    fn decayed_pair(
        kind: OptimizerKind,
        start: &[Tensor; 2],
    ) -> (OptimizerSettings, Vec<Var>, Vec<(String, Var)>) {
        let settings = OptimizerSettings {
            kind,
            weight_decay: 0.1,
            args: BTreeMap::new(),
        };
        let vars: Vec<Var> = start.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let named = vec![
            ("a".to_string(), vars[0].clone()),
            ("b".into(), vars[1].clone()),
        ];
        (settings, vars, named)
    }

    /// A learning-rate scale is a parameter group of its own rate: two parameters updated
    /// together with scales (1, 0.25) end where each alone ends under lr and lr/4, for AdamW and
    /// Lion; Prodigy refuses unequal scales.
    #[test]
    fn lr_scales_act_as_parameter_groups() {
        let dev = Device::Cpu;
        let grads = |t: f32| {
            [
                Tensor::new(&[0.5f32 * t, -3.0], &dev).unwrap(),
                Tensor::new(&[[1.0f32, -t], [0.25, 2.0]], &dev).unwrap(),
            ]
        };
        let start = [
            Tensor::new(&[1.0f32, -2.0], &dev).unwrap(),
            Tensor::new(&[[0.5f32, 0.1], [-0.3, 0.7]], &dev).unwrap(),
        ];
        for kind in [OptimizerKind::AdamW, OptimizerKind::Lion] {
            let (settings, vars, named) = decayed_pair(kind, &start);
            let mut together = Optimizer::new(named, &settings).unwrap();
            together.set_lr_scales(vec![1.0, 0.25]).unwrap();
            let alone: Vec<Var> = start.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
            let mut separate: Vec<Optimizer> = alone
                .iter()
                .map(|v| Optimizer::new(vec![("p".into(), v.clone())], &settings).unwrap())
                .collect();
            for t in 1..=3 {
                let g = grads(t as f32).map(Some);
                together.step(&g, 0.01).unwrap();
                separate[0].step(&g[..1], 0.01).unwrap();
                separate[1].step(&g[1..], 0.0025).unwrap();
            }
            let max_abs = |t: Tensor| {
                t.abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            for ((a, b), s) in vars.iter().zip(&alone).zip(&start) {
                let diff = max_abs((a.as_tensor() - b.as_tensor()).unwrap());
                assert!(diff.is_finite() && diff < 1e-7, "{kind}: {diff}");
                let moved = max_abs((a.as_tensor() - s).unwrap());
                assert!(moved > 1e-3, "{kind}: the parameter did not move ({moved})");
            }
        }
        let p = Var::new(&[1.0f32], &dev).unwrap();
        let settings = OptimizerSettings {
            kind: OptimizerKind::Prodigy,
            weight_decay: 0.0,
            args: BTreeMap::new(),
        };
        let mut prodigy =
            Optimizer::new(vec![("a".into(), p.clone()), ("b".into(), p)], &settings).unwrap();
        let err = prodigy.set_lr_scales(vec![1.0, 0.5]).unwrap_err();
        assert!(err.to_string().contains("one learning rate"), "{err}");
    }

    /// A parameter without a gradient is passed over, as PyTorch passes over `grad = None`: it
    /// keeps its value despite weight decay and its state stays fresh, and the other parameters
    /// end exactly where an optimizer over them alone takes them (Prodigy's estimate included).
    #[test]
    fn a_parameter_without_a_gradient_is_left_alone() {
        let dev = Device::Cpu;
        let start = [
            Tensor::new(&[1.0f32, -2.0, 0.5], &dev).unwrap(),
            Tensor::new(&[[0.5f32, 0.1], [-0.3, 0.7]], &dev).unwrap(),
        ];
        for kind in [
            OptimizerKind::AdamW,
            OptimizerKind::AdamW8bit,
            OptimizerKind::Lion,
            OptimizerKind::Prodigy,
        ] {
            let (settings, vars, named) = decayed_pair(kind, &start);
            let mut both = Optimizer::new(named, &settings).unwrap();
            let alone = Var::from_tensor(&start[0]).unwrap();
            let mut only_a = Optimizer::new(vec![("a".into(), alone.clone())], &settings).unwrap();
            for t in 1..=3 {
                let g = Tensor::new(&[0.5f32 * t as f32, -3.0, 1.0], &dev).unwrap();
                both.step(&[Some(g.clone()), None], 0.01).unwrap();
                only_a.step(&[Some(g)], 0.01).unwrap();
            }
            let a = vars[0].as_tensor().to_vec1::<f32>().unwrap();
            let a_alone = alone.as_tensor().to_vec1::<f32>().unwrap();
            assert_eq!(a, a_alone, "{kind}");
            assert_ne!(
                a,
                start[0].to_vec1::<f32>().unwrap(),
                "{kind}: a did not move"
            );
            let b = vars[1].as_tensor().to_vec2::<f32>().unwrap();
            assert_eq!(b, start[1].to_vec2::<f32>().unwrap(), "{kind}: b moved");
            let (state, fresh) = (both.state(), both.algorithm.init_slots(&start[1]).unwrap());
            assert_eq!(state.slots[1].len(), fresh.len());
            let values = |t: &Tensor| {
                let flat = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
                (t.dtype(), t.dims().to_vec(), flat.to_vec1::<f32>().unwrap())
            };
            for (slot, init) in state.slots[1].iter().zip(&fresh) {
                assert_eq!(values(slot), values(init), "{kind}: b's state changed");
            }
            assert_eq!(state.scalars, only_a.state().scalars, "{kind}");
        }
    }

    #[test]
    fn optimizer_args_are_checked() {
        let settings = |kind, args: &[(&str, &str)]| OptimizerSettings {
            kind,
            weight_decay: 0.0,
            args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert!(settings(
            OptimizerKind::Prodigy,
            &[("d_coef", "2"), ("decouple", "False")]
        )
        .check()
        .is_ok());
        for (kind, args, expected) in [
            (
                OptimizerKind::Lion,
                &[("eps", "1e-8")][..],
                "not an argument of lion",
            ),
            (OptimizerKind::AdamW, &[("betas", "0.9")], "two numbers"),
            (OptimizerKind::AdamW, &[("betas", "0.9,1.5")], "in [0, 1)"),
            (
                OptimizerKind::Prodigy,
                &[("safeguard_warmup", "yes")],
                "true or false",
            ),
            (OptimizerKind::Prodigy, &[("d0", "0")], "d0=0"),
        ] {
            let err = format!("{:#}", settings(kind, args).check().unwrap_err());
            assert!(err.contains(expected), "{args:?}: {err}");
        }
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
