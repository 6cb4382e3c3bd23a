//! LyCORIS LoHa and LoKr modules (`--algo loha|lokr`): their factors, `ΔW`, and a fresh module
//! as LyCORIS draws one. Conventions as LyCORIS' (`lycoris.modules.loha` / `lokr`, non-Tucker):
//!
//! - LoHa: `ΔW = (alpha / r) · (w1_a · w1_b) ⊙ (w2_a · w2_b)`, `w1_a`/`w2_a` `[out, r]`,
//!   `w1_b`/`w2_b` `[r, in·kh·kw]`.
//! - LoKr: `ΔW = (alpha / r) · W1 ⊗ W2` with `out = a·b`, `in = c·d` (factored by
//!   [`factorization`]): `W1 = w1` `[a, c]` (or `w1_a · w1_b`), `W2 = w2` `[b, d·kh·kw]` or
//!   `w2_a · w2_b` (`[b, r]`, `[r, d·kh·kw]`); `r` is the rank of the low-rank half, and with
//!   both halves whole the scale is 1. The Kronecker product runs over rows and the `in` axis,
//!   the kernel staying innermost: `ΔW[i·b + p, (j·d + q)·k + s] = W1[i, j] · W2[p, q·k + s]`.
//!
//! `ΔW` is computed from the factors with candle's differentiable ops, so training gets every
//! factor's gradient from candle's backward pass. Each adapted layer adds `x ↦ layer(x; ΔW)`.

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor, Var};

use super::module::{ModuleInfo, ModuleKind};
use crate::rng::Rng;

/// One half of a LoKr Kronecker product: a whole matrix or a low-rank pair `a · b`.
#[derive(Debug, Clone)]
pub enum KronFactor {
    Full(Tensor),
    LowRank { a: Tensor, b: Tensor },
}

impl KronFactor {
    fn matrix(&self) -> Result<Tensor> {
        Ok(match self {
            Self::Full(w) => w.clone(),
            Self::LowRank { a, b } => a.matmul(b)?,
        })
    }

    fn rank(&self) -> Option<usize> {
        match self {
            Self::Full(_) => None,
            Self::LowRank { a, .. } => a.dims().get(1).copied(),
        }
    }
}

/// The factors of a LoHa or LoKr module, f32.
#[derive(Debug, Clone)]
pub enum LycorisFactors {
    LoHa {
        w1a: Tensor,
        w1b: Tensor,
        w2a: Tensor,
        w2b: Tensor,
    },
    LoKr {
        w1: KronFactor,
        w2: KronFactor,
    },
}

/// A LoHa or LoKr module: its factors and alpha.
#[derive(Debug, Clone)]
pub struct LycorisModule {
    pub factors: LycorisFactors,
    pub alpha: f64,
}

/// `(w1a · w1b) ⊙ (w2a · w2b)`.
pub fn hadamard_product(w1a: &Tensor, w1b: &Tensor, w2a: &Tensor, w2b: &Tensor) -> Result<Tensor> {
    Ok((w1a.matmul(w1b)? * w2a.matmul(w2b)?)?)
}

/// `W1 ⊗ W2` of `w1` `[a, c]` and `w2` `[b, d, k]` (`k` the kernel size, innermost) as an
/// `[a·b, c·d·k]` matrix: `[i·b + p, (j·d + q)·k + s] = w1[i, j] · w2[p, q, s]`.
pub fn kronecker_product(w1: &Tensor, w2: &Tensor) -> Result<Tensor> {
    let (a, c) = w1.dims2()?;
    let (b, d, k) = w2.dims3()?;
    Ok(w1
        .reshape((a, 1, c, 1, 1))?
        .broadcast_mul(&w2.reshape((1, b, 1, d, k))?)?
        .reshape((a * b, c * d * k))?)
}

impl LycorisModule {
    pub fn algorithm(&self) -> &'static str {
        match self.factors {
            LycorisFactors::LoHa { .. } => "loha",
            LycorisFactors::LoKr { .. } => "lokr",
        }
    }

    /// The rank `alpha` divides by: LoHa's `r`; LoKr's low-rank half's (0 when both are whole).
    pub fn rank(&self) -> usize {
        match &self.factors {
            LycorisFactors::LoHa { w1b, .. } => w1b.dims()[0],
            LycorisFactors::LoKr { w1, w2 } => w1.rank().or(w2.rank()).unwrap_or(0),
        }
    }

    /// `alpha / rank`; 1 for a LoKr module with two whole halves.
    pub fn scale(&self) -> f64 {
        match self.rank() {
            0 => 1.0,
            r => self.alpha / r as f64,
        }
    }

    /// `ΔW` as an f32 `[out, in·kh·kw]` matrix, differentiable in the factors.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let product = match &self.factors {
            LycorisFactors::LoHa { w1a, w1b, w2a, w2b } => hadamard_product(w1a, w1b, w2a, w2b)?,
            LycorisFactors::LoKr { w1, w2 } => {
                let w2 = w2.matrix()?;
                let (b, cols) = w2.dims2()?;
                kronecker_product(&w1.matrix()?, &w2.reshape((b, cols, 1))?)?
            }
        };
        Ok((product * self.scale())?)
    }

    /// Every factor tensor with its LyCORIS name (`hada_w1_a`, `lokr_w1`, …), in file order.
    pub fn named_tensors(&self) -> Vec<(&'static str, &Tensor)> {
        match &self.factors {
            LycorisFactors::LoHa { w1a, w1b, w2a, w2b } => vec![
                ("hada_w1_a", w1a),
                ("hada_w1_b", w1b),
                ("hada_w2_a", w2a),
                ("hada_w2_b", w2b),
            ],
            LycorisFactors::LoKr { w1, w2 } => {
                let mut named = Vec::new();
                for (factor, whole, a_name, b_name) in [
                    (w1, "lokr_w1", "lokr_w1_a", "lokr_w1_b"),
                    (w2, "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
                ] {
                    match factor {
                        KronFactor::Full(w) => named.push((whole, w)),
                        KronFactor::LowRank { a, b } => {
                            named.push((a_name, a));
                            named.push((b_name, b));
                        }
                    }
                }
                named
            }
        }
    }

    /// The factor named `name` (see [`Self::named_tensors`]), to be replaced.
    pub fn tensor_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        match &mut self.factors {
            LycorisFactors::LoHa { w1a, w1b, w2a, w2b } => match name {
                "hada_w1_a" => Some(w1a),
                "hada_w1_b" => Some(w1b),
                "hada_w2_a" => Some(w2a),
                "hada_w2_b" => Some(w2b),
                _ => None,
            },
            LycorisFactors::LoKr { w1, w2 } => {
                let (factor, part) = match name {
                    "lokr_w1" | "lokr_w1_a" | "lokr_w1_b" => (w1, &name[7..]),
                    "lokr_w2" | "lokr_w2_a" | "lokr_w2_b" => (w2, &name[7..]),
                    _ => return None,
                };
                match (factor, part) {
                    (KronFactor::Full(w), "") => Some(w),
                    (KronFactor::LowRank { a, .. }, "_a") => Some(a),
                    (KronFactor::LowRank { b, .. }, "_b") => Some(b),
                    _ => None,
                }
            }
        }
    }

    /// The same module with every factor detached from the graph.
    pub fn detached(&self) -> Self {
        let mut copy = self.clone();
        let names: Vec<&str> = self.named_tensors().iter().map(|(n, _)| *n).collect();
        for name in names {
            if let Some(t) = copy.tensor_mut(name) {
                *t = t.detach();
            }
        }
        copy
    }

    /// `[out, in·kh·kw]` of `ΔW`, from the factors' shapes (without computing it).
    pub fn delta_dims(&self) -> Result<(usize, usize)> {
        let dims = |t: &Tensor| t.dims2();
        Ok(match &self.factors {
            LycorisFactors::LoHa { w1a, w1b, .. } => (dims(w1a)?.0, dims(w1b)?.1),
            LycorisFactors::LoKr { w1, w2 } => {
                let half = |f: &KronFactor| -> Result<(usize, usize)> {
                    Ok(match f {
                        KronFactor::Full(w) => dims(w)?,
                        KronFactor::LowRank { a, b } => (dims(a)?.0, dims(b)?.1),
                    })
                };
                let ((a, c), (b, d)) = (half(w1)?, half(w2)?);
                (a * b, c * d)
            }
        })
    }

    /// Checks that `ΔW` is `[out, in·kh·kw]` of `info`.
    pub fn check_fits(&self, info: &ModuleInfo) -> Result<()> {
        let (out, cols) = self.delta_dims()?;
        ensure!(
            (out, cols) == (info.out_features, info.in_features),
            "{}: the {} ΔW is [{out}, {cols}] but the module is [{}, {}] (out, in·kernel)",
            info.path,
            self.algorithm(),
            info.out_features,
            info.in_features
        );
        Ok(())
    }
}

/// LyCORIS' split of `dimension` into `(m, n)`, `m ≤ n`, `m · n = dimension`: with `factor > 0`
/// dividing it, `(factor, dimension / factor)` ordered; else the divisors walked up from 1 while
/// the smaller stays ≤ `factor` (any, for `factor < 0`), the last pair taken.
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let (m, n) = (factor as usize, dimension / factor as usize);
        return (m.min(n), m.max(n));
    }
    let limit = if factor < 0 {
        dimension
    } else {
        factor as usize
    };
    let (mut m, mut n) = (1, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > limit {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    (m.min(n), m.max(n))
}

/// Which algorithm a fresh adapter uses, with its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LycorisAlgorithm {
    LoHa,
    /// `factor`: LyCORIS' `factor` (−1: as square as possible).
    LoKr {
        factor: i64,
    },
}

/// The variables of a fresh module: `(name, var)` with LyCORIS' tensor names.
pub type FreshFactors = (LycorisModule, Vec<(&'static str, Var)>);

/// A fresh LoHa/LoKr module for `info` at `rank` and `alpha`, initialised as LyCORIS does
/// (`use_scalar=False`): LoHa `w1_a ~ N(0, 0.1²)`, `w1_b`, `w2_b ~ N(0, 1)`, `w2_a = 0`; LoKr
/// `w1` (whole, as LyCORIS' default `decompose_both=False` keeps it) Kaiming-uniform, `w2`
/// whole and zero when `rank ≥ max(b, d) / 2`, else `w2_a` Kaiming-uniform and `w2_b = 0`. `ΔW`
/// starts at zero either way. Draws from `rng`.
pub fn fresh_lycoris(
    algorithm: LycorisAlgorithm,
    info: &ModuleInfo,
    rank: usize,
    alpha: f64,
    rng: &mut Rng,
    device: &Device,
) -> Result<FreshFactors> {
    let kernel = match info.kind {
        ModuleKind::Conv { kh, kw } => kh * kw,
        ModuleKind::Linear | ModuleKind::Conv1x1 => 1,
    };
    let (out, cols) = (info.out_features, info.in_features);
    let mut var = |dims: (usize, usize), draw: &mut dyn FnMut(&mut Rng) -> f64| -> Result<Var> {
        let values: Vec<f32> = (0..dims.0 * dims.1).map(|_| draw(rng) as f32).collect();
        Ok(Var::from_tensor(&Tensor::from_vec(values, dims, device)?)?)
    };
    // PyTorch's kaiming_uniform_(a=√5) on a [rows, fan_in] matrix: U(−1/√fan_in, 1/√fan_in).
    let kaiming = |fan_in: usize| {
        let bound = 1.0 / (fan_in as f64).sqrt();
        move |r: &mut Rng| (r.uniform() * 2.0 - 1.0) * bound
    };
    let mut vars: Vec<(&'static str, Var)> = Vec::new();
    let factors = match algorithm {
        LycorisAlgorithm::LoHa => {
            let w1a = var((out, rank), &mut |r| r.normal() * 0.1)?;
            let w1b = var((rank, cols), &mut |r| r.normal())?;
            let w2a = var((out, rank), &mut |_| 0.0)?;
            let w2b = var((rank, cols), &mut |r| r.normal())?;
            let factors = LycorisFactors::LoHa {
                w1a: w1a.as_tensor().clone(),
                w1b: w1b.as_tensor().clone(),
                w2a: w2a.as_tensor().clone(),
                w2b: w2b.as_tensor().clone(),
            };
            vars.extend([
                ("hada_w1_a", w1a),
                ("hada_w1_b", w1b),
                ("hada_w2_a", w2a),
                ("hada_w2_b", w2b),
            ]);
            factors
        }
        LycorisAlgorithm::LoKr { factor } => {
            let in_channels = cols / kernel;
            let (c, d) = factorization(in_channels, factor);
            let (a, b) = factorization(out, factor);
            let w1 = var((a, c), &mut kaiming(c))?;
            let w2 = match rank * 2 >= b.max(d) {
                true => {
                    let w2 = var((b, d * kernel), &mut |_| 0.0)?;
                    let factor = KronFactor::Full(w2.as_tensor().clone());
                    vars.push(("lokr_w2", w2));
                    factor
                }
                false => {
                    let w2a = var((b, rank), &mut kaiming(rank))?;
                    let w2b = var((rank, d * kernel), &mut |_| 0.0)?;
                    let factor = KronFactor::LowRank {
                        a: w2a.as_tensor().clone(),
                        b: w2b.as_tensor().clone(),
                    };
                    vars.push(("lokr_w2_a", w2a));
                    vars.push(("lokr_w2_b", w2b));
                    factor
                }
            };
            vars.push(("lokr_w1", w1.clone()));
            LycorisFactors::LoKr {
                w1: KronFactor::Full(w1.as_tensor().clone()),
                w2,
            }
        }
    };
    let mut module = LycorisModule { factors, alpha };
    // LyCORIS: two whole halves ignore alpha (scale 1) and store alpha = rank.
    if module.rank() == 0 {
        module.alpha = rank as f64;
    }
    Ok((module, vars))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factorization_matches_lycoris_table() {
        // What lycoris-lora 4.1.3's `factorization` returns (run, not its docstring's table,
        // which is out of date for 360).
        let cases = [
            (127, -1, (1, 127)),
            (128, -1, (8, 16)),
            (250, -1, (10, 25)),
            (360, -1, (18, 20)),
            (512, -1, (16, 32)),
            (1024, -1, (32, 32)),
            (320, -1, (16, 20)),
            (1280, -1, (32, 40)),
            (768, -1, (24, 32)),
            (128, 2, (2, 64)),
            (250, 4, (2, 125)),
            (360, 8, (8, 45)),
            (1024, 16, (16, 64)),
            (360, 16, (15, 24)),
            (96, 8, (8, 12)),
        ];
        for (dimension, factor, expected) in cases {
            assert_eq!(
                factorization(dimension, factor),
                expected,
                "{dimension} by {factor}"
            );
        }
    }

    #[test]
    fn kronecker_product_matches_the_definition_for_a_conv_half() -> Result<()> {
        let w1 = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?;
        // b = 1, d = 2, k = 2
        let w2 = Tensor::new(&[[[1f32, 10.], [100., 1000.]]], &Device::Cpu)?;
        let d = kronecker_product(&w1, &w2)?.to_vec2::<f32>()?;
        // rows: i·b + p; columns: (j·d + q)·k + s.
        assert_eq!(
            d,
            [
                [1., 10., 100., 1000., 2., 20., 200., 2000.],
                [3., 30., 300., 3000., 4., 40., 400., 4000.]
            ]
        );
        Ok(())
    }
}
