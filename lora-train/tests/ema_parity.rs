//! `--ema-decay` against diffusers' `EMAModel` on `tests/fixtures/ema` (made by
//! `tests/reference/make_ema_fixtures.py`): fed the same parameter values after each step, the
//! average equals diffusers' at every step, for two decays.

mod common;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor, Var};
use lora_train::ema::Ema;

#[test]
fn the_average_follows_diffusers_ema_model() -> Result<()> {
    let dir = common::fixtures().join("ema");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ema.json"))?)?;
    let tensors = candle_core::safetensors::load(dir.join("ema.safetensors"), &Device::Cpu)?;
    let get = |key: String| -> Result<Tensor> {
        tensors
            .get(&key)
            .cloned()
            .with_context(|| format!("ema.safetensors has no `{key}`"))
    };
    let steps = meta["steps"].as_u64().context("steps")?;
    let count = meta["parameters"].as_u64().context("parameters")? as usize;
    let decays = meta["decays"].as_array().context("decays")?;
    ensure!(steps >= 20 && decays.len() == 2, "fixture too small");
    let mut compared = 0;
    for decay in decays {
        let decay_text = decay.as_str().context("decay")?;
        let params = (0..count)
            .map(|i| {
                Ok((
                    format!("p{i}"),
                    Var::from_tensor(&get(format!("param.p{i}.step0"))?)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut ema = Ema::new(decay_text.parse()?, &params)?;
        let mut worst = 0f32;
        for t in 1..=steps {
            for (i, (_, var)) in params.iter().enumerate() {
                var.set(&get(format!("param.p{i}.step{t}"))?)?;
            }
            ema.update(&params, t)?;
            for (i, ours) in ema.tensors().iter().enumerate() {
                let reference = get(format!("ema{decay_text}.p{i}.step{t}"))?;
                let diff = (ours - &reference)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                ensure!(
                    diff <= 1e-6,
                    "decay {decay_text}, step {t}, p{i}: off by {diff}"
                );
                worst = worst.max(diff);
                compared += 1;
            }
        }
        println!("decay {decay_text}: largest difference {worst:e}");
    }
    ensure!(
        compared == 2 * steps as usize * count,
        "{compared} comparisons"
    );
    Ok(())
}
