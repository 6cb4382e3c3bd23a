//! AdamW with block-wise 8-bit moments as bitsandbytes' `AdamW8bit` updates on CUDA (the
//! optimizer kohya users run most): a parameter of at least `min_8bit_size` (4096) elements keeps
//! each moment as one byte per element, a code into a 256-value map, times a per-block scale
//! (the block's largest magnitude, blocks of 256); smaller parameters keep f32 moments. Every
//! operation is one f32 operation in the order bitsandbytes' kernels write it
//! (`kOptimizerStatic8bit2StateBlockwise`, `quantize_2D`, `kOptimizer32bit2State`), so the
//! trajectory equals a faithful f32 re-implementation of them bit for bit
//! (`tests/optimizer_parity.rs`, fixtures by `make_adamw8bit_fixtures.py`). Two differences from
//! `torch.optim.AdamW` come with it: the weight decay is applied after the step, and ε is scaled
//! by the bias correction √(1 − β₂ᵗ).
//!
//! The update runs on the host, blocks in parallel: the quantiser is a search per element, and
//! LoRA parameters are small (at rank 16, about 7 M values for an SD1.5 attention adapter, some
//! 28 MB a step each way on a GPU).

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, Var};
use lora_core::formats::kohya::python_float;
use rayon::prelude::*;

use super::adamw::AdamW;
use super::quantile_maps::{SIGNED, UNSIGNED};
use super::{Algorithm, Args};

/// Elements per quantisation block (bitsandbytes' `BLOCKSIZE_2STATE` since 0.44).
const BLOCK: usize = 256;
/// bitsandbytes' default `min_8bit_size`.
const MIN_8BIT_SIZE: usize = 4096;

/// One of the two maps, with the f32 midpoints between neighbouring codes.
struct QuantileMap {
    code: [f32; 256],
    midpoints: [f32; 255],
}

impl QuantileMap {
    fn new(bits: &[u32; 256]) -> Self {
        let code = bits.map(f32::from_bits);
        let midpoints = std::array::from_fn(|k| (code[k] + code[k + 1]) * 0.5);
        Self { code, midpoints }
    }

    /// The nearest code to `x` (a value divided by its block's scale), as `quantize_2D`'s binary
    /// search finds it: the number of midpoints below `x`, except that `x` equal to a midpoint
    /// takes the even one of the two codes (the search ends on an even pivot); NaN (a block of
    /// zeros, 0/0) gives 0.
    fn quantize(&self, x: f32) -> u8 {
        if x.is_nan() {
            return 0;
        }
        let below = self.midpoints.partition_point(|&m| m < x);
        let index = match self.midpoints.get(below) {
            Some(&m) if m == x => below + below % 2,
            _ => below,
        };
        index as u8
    }
}

pub struct AdamW8bit {
    /// The hyper-parameters, which bitsandbytes takes as `torch.optim.AdamW` does.
    adam: AdamW,
    min_8bit_size: usize,
    signed: QuantileMap,
    unsigned: QuantileMap,
}

impl AdamW8bit {
    /// `--optimizer-args`: `betas` (0.9, 0.999), `eps` (1e-8), `min_8bit_size` (4096).
    pub(crate) fn new(weight_decay: f64, args: &mut Args) -> Result<Self> {
        let adam = AdamW::new(weight_decay, args)?;
        let min_8bit_size = args.number("min_8bit_size", MIN_8BIT_SIZE as f64, (1.0, 1e15))?;
        ensure!(
            min_8bit_size.fract() == 0.0,
            "--optimizer-args min_8bit_size={min_8bit_size}: expected a whole number"
        );
        Ok(Self {
            adam,
            min_8bit_size: min_8bit_size as usize,
            signed: QuantileMap::new(&SIGNED),
            unsigned: QuantileMap::new(&UNSIGNED),
        })
    }

    fn is_8bit(&self, elements: usize) -> bool {
        elements >= self.min_8bit_size
    }
}

/// The f32 hyper-parameters of one step (bitsandbytes passes them to its kernels as C floats).
struct StepConstants {
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    lr: f32,
    /// √(1 − β₂ᵗ).
    correction2: f32,
    /// −lr·√(1 − β₂ᵗ) / (1 − β₁ᵗ).
    step_size: f32,
}

impl StepConstants {
    fn new(optimizer: &AdamW8bit, lr: f64, step: u64) -> Self {
        let adam = &optimizer.adam;
        let (beta1, beta2) = (adam.beta1 as f32, adam.beta2 as f32);
        // The powers in f64 from the f32 betas (as C's pow on the hyper-parameters' values),
        // rounded to f32.
        let power = |beta: f32| f64::from(beta).powf(step as f64) as f32;
        let correction1 = 1.0 - power(beta1);
        let correction2 = (1.0 - power(beta2)).sqrt();
        let lr = lr as f32;
        Self {
            beta1,
            beta2,
            eps: adam.eps as f32,
            weight_decay: adam.weight_decay as f32,
            lr,
            correction2,
            step_size: (-lr * correction2) / correction1,
        }
    }

    /// `p + step_size·m / (√v + ε·√(1 − β₂ᵗ))`, then the decoupled decay (after the step).
    fn update(&self, p: f32, m: f32, v: f32, eps_scaled: f32) -> f32 {
        let stepped = p + self.step_size * (m / (v.sqrt() + eps_scaled));
        match self.weight_decay > 0.0 {
            true => stepped * (1.0 - self.lr * self.weight_decay),
            false => stepped,
        }
    }
}

impl Algorithm for AdamW8bit {
    fn slots(&self) -> &'static [&'static str] {
        // 8-bit: m's and v's codes (u8, one per element) and block scales (f32); a small
        // parameter: m and v (f32, its shape) and empty scales.
        &["adam8_m", "adam8_v", "adam8_m_absmax", "adam8_v_absmax"]
    }

    fn init_slots(&self, p: &Tensor) -> Result<Vec<Tensor>> {
        let n = p.elem_count();
        let dev = p.device();
        Ok(match self.is_8bit(n) {
            true => {
                let blocks = n.div_ceil(BLOCK);
                vec![
                    Tensor::zeros(n, DType::U8, dev)?,
                    Tensor::zeros(n, DType::U8, dev)?,
                    Tensor::zeros(blocks, DType::F32, dev)?,
                    Tensor::zeros(blocks, DType::F32, dev)?,
                ]
            }
            false => vec![
                p.zeros_like()?,
                p.zeros_like()?,
                Tensor::zeros(0, DType::F32, dev)?,
                Tensor::zeros(0, DType::F32, dev)?,
            ],
        })
    }

    fn step(
        &mut self,
        params: &[(String, Var)],
        grads: &[Tensor],
        state: &mut [Vec<Tensor>],
        lrs: &[f64],
        step: u64,
    ) -> Result<()> {
        for ((((_, p), slots), g), &lr) in params.iter().zip(state).zip(grads).zip(lrs) {
            let c = StepConstants::new(self, lr, step);
            let values: Vec<f32> = p.as_tensor().flatten_all()?.to_vec1()?;
            let grad: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let updated = match self.is_8bit(values.len()) {
                true => self.step_8bit(&c, values, &grad, slots)?,
                false => step_32bit(&c, values, &grad, slots)?,
            };
            p.set(&Tensor::from_vec(updated, p.shape(), p.device())?)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "AdamW8bit(betas=({}, {}), eps={}, weight_decay={}, min_8bit_size={})",
            python_float(self.adam.beta1),
            python_float(self.adam.beta2),
            python_float(self.adam.eps),
            python_float(self.adam.weight_decay),
            self.min_8bit_size
        )
    }
}

/// The f32 moments of a small parameter: `m = m·β₁ + (1 − β₁)·g`, `v = v·β₂ + (1 − β₂)·g²`.
fn step_32bit(
    c: &StepConstants,
    mut values: Vec<f32>,
    grad: &[f32],
    slots: &mut [Tensor],
) -> Result<Vec<f32>> {
    let (shape, dev) = (slots[0].shape().clone(), slots[0].device().clone());
    let mut m: Vec<f32> = slots[0].flatten_all()?.to_vec1()?;
    let mut v: Vec<f32> = slots[1].flatten_all()?.to_vec1()?;
    let eps_scaled = c.eps * c.correction2;
    for (((p, m), v), &g) in values.iter_mut().zip(&mut m).zip(&mut v).zip(grad) {
        *m = *m * c.beta1 + (1.0 - c.beta1) * g;
        *v = *v * c.beta2 + (1.0 - c.beta2) * (g * g);
        *p = c.update(*p, *m, *v, eps_scaled);
    }
    slots[0] = Tensor::from_vec(m, &shape, &dev)?;
    slots[1] = Tensor::from_vec(v, &shape, &dev)?;
    Ok(values)
}

impl AdamW8bit {
    /// One step of an 8-bit parameter: its blocks are independent, so they run in parallel
    /// ([`Self::step_block`]; the result does not depend on the split).
    fn step_8bit(
        &self,
        c: &StepConstants,
        mut values: Vec<f32>,
        grad: &[f32],
        slots: &mut [Tensor],
    ) -> Result<Vec<f32>> {
        let dev = slots[0].device().clone();
        let mut m_codes: Vec<u8> = slots[0].to_vec1()?;
        let mut v_codes: Vec<u8> = slots[1].to_vec1()?;
        let mut m_scales: Vec<f32> = slots[2].to_vec1()?;
        let mut v_scales: Vec<f32> = slots[3].to_vec1()?;
        values
            .par_chunks_mut(BLOCK)
            .zip(grad.par_chunks(BLOCK))
            .zip(m_codes.par_chunks_mut(BLOCK))
            .zip(v_codes.par_chunks_mut(BLOCK))
            .zip(m_scales.par_iter_mut())
            .zip(v_scales.par_iter_mut())
            .for_each(|(((((p, g), m_code), v_code), m_scale), v_scale)| {
                self.step_block(c, p, g, (m_code, m_scale), (v_code, v_scale));
            });
        let (n, blocks) = (values.len(), m_scales.len());
        slots[0] = Tensor::from_vec(m_codes, n, &dev)?;
        slots[1] = Tensor::from_vec(v_codes, n, &dev)?;
        slots[2] = Tensor::from_vec(m_scales, blocks, &dev)?;
        slots[3] = Tensor::from_vec(v_scales, blocks, &dev)?;
        Ok(values)
    }

    /// One block (at most 256 elements): dequantise both moments, update them in f32, take the
    /// new block scales, step the parameter, re-quantise.
    fn step_block(
        &self,
        c: &StepConstants,
        values: &mut [f32],
        grad: &[f32],
        (m_codes, m_scale): (&mut [u8], &mut f32),
        (v_codes, v_scale): (&mut [u8], &mut f32),
    ) {
        let eps_scaled = c.correction2 * c.eps;
        let mut m = [0f32; BLOCK];
        let mut v = [0f32; BLOCK];
        let (mut m_max, mut v_max) = (0f32, 0f32);
        for i in 0..values.len() {
            let g = grad[i];
            let v_old = self.unsigned.code[usize::from(v_codes[i])] * *v_scale;
            let m_old = self.signed.code[usize::from(m_codes[i])] * *m_scale;
            // A NaN or infinite gradient zeroes the element's moments and skips its step.
            let finite = g.is_finite();
            v[i] = match finite {
                true => v_old * c.beta2 + ((1.0 - c.beta2) * g) * g,
                false => 0.0,
            };
            m[i] = match finite {
                true => m_old * c.beta1 + (1.0 - c.beta1) * g,
                false => 0.0,
            };
            m_max = m_max.max(m[i].abs());
            v_max = v_max.max(v[i].abs());
            if finite {
                values[i] = c.update(values[i], m[i], v[i], eps_scaled);
            }
        }
        if values.len() < BLOCK {
            // The kernel pads a partial block with code 128 (m) and 0 (v) and a zero gradient;
            // the padding's m takes part in the block's largest magnitude.
            let m_pad = self.signed.code[128] * *m_scale * c.beta1 + (1.0 - c.beta1) * 0.0;
            m_max = m_max.max(m_pad.abs());
        }
        *m_scale = m_max;
        *v_scale = v_max;
        for i in 0..values.len() {
            let mut code = self.signed.quantize(m[i] / m_max);
            // The sign fix: a code of the other sign moves one step toward the right one (u8
            // arithmetic: a block of zeros gets 255, harmlessly, its scale being 0).
            if self.signed.code[usize::from(code)].is_sign_negative() != m[i].is_sign_negative() {
                code = match m[i] > 0.0 {
                    true => code.wrapping_add(1),
                    false => code.wrapping_sub(1),
                };
            }
            m_codes[i] = code;
            v_codes[i] = self.unsigned.quantize(v[i] / v_max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The embedded maps are the fixture's (bitsandbytes' `create_dynamic_map`, checked there
    /// against bitsandbytes), and the quantiser gives the reference's code for each of its probes
    /// (random values, every midpoint and its neighbours).
    #[test]
    fn maps_and_quantiser_match_the_reference() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/optimizers-8bit/trajectories.safetensors");
        let fixture = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        let floats = |key: &str| -> Vec<f32> { fixture[key].to_vec1().unwrap() };
        for (map, name) in [(&SIGNED, "signed"), (&UNSIGNED, "unsigned")] {
            let quantile = QuantileMap::new(map);
            let reference = floats(&format!("qmap.{name}"));
            assert_eq!(
                quantile.code.map(f32::to_bits).to_vec(),
                reference.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{name} map"
            );
            let xs = floats(&format!("quant.x_{name}"));
            let codes: Vec<u8> = fixture[&format!("quant.code_{name}")].to_vec1().unwrap();
            assert!(xs.len() > 1000 && xs.len() == codes.len());
            for (x, code) in xs.iter().zip(&codes) {
                assert_eq!(quantile.quantize(*x), *code, "{name}: x = {x:e}");
            }
        }
    }
}
