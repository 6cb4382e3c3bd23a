//! `--optimizer adamw|lion|prodigy` against their reference implementations (torch.optim.AdamW,
//! lion-pytorch, prodigyopt) on `tests/fixtures/optimizers` (made by
//! `tests/reference/make_optimizer_fixtures.py`): from the same start, fed the same gradients and
//! per-step learning rates, the parameters after every step match the reference's trajectory.

mod common;

use std::collections::{BTreeMap, HashMap};

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor, Var};
use lora_train::optimizer::{Optimizer, OptimizerSettings};

/// f32 against PyTorch's f32 over 12 steps, relative (Frobenius) error per parameter. The order of
/// operations is the reference's, but PyTorch fuses some multiply-adds and sums in another order;
/// Prodigy's step size is a ratio of such sums.
const TOLERANCE: f64 = 2e-6;

fn get<'a>(map: &'a HashMap<String, Tensor>, key: &str) -> Result<&'a Tensor> {
    map.get(key)
        .with_context(|| format!("trajectories.safetensors has no `{key}`"))
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> Result<f64> {
    ensure!(ours.dims() == reference.dims(), "shapes differ");
    let diff = (ours - reference)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let norm = reference.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok(if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    })
}

#[test]
fn optimizers_follow_their_reference_trajectories() -> Result<()> {
    let dir = common::fixtures().join("optimizers");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json"))?)?;
    let tensors =
        candle_core::safetensors::load(dir.join("trajectories.safetensors"), &Device::Cpu)?;
    let steps = meta["steps"].as_u64().context("steps")? as usize;
    let count = meta["parameters"].as_u64().context("parameters")? as usize;
    let multipliers: Vec<f64> = serde_json::from_value(meta["lr_multipliers"].clone())?;
    let cases = meta["cases"].as_object().context("cases")?;
    ensure!(cases.len() >= 7 && steps >= 10, "too few cases or steps");
    let mut checked = 0;
    for (name, case) in cases {
        let args: BTreeMap<String, String> = serde_json::from_value(case["args"].clone())?;
        let settings = OptimizerSettings {
            kind: case["optimizer"].as_str().context("optimizer")?.parse()?,
            weight_decay: case["weight_decay"].as_f64().context("weight_decay")?,
            args,
        };
        let lr = case["lr"].as_f64().context("lr")?;
        let params = (0..count)
            .map(|i| {
                let start = get(&tensors, &format!("{name}.p{i}.step0"))?;
                Ok((format!("p{i}"), Var::from_tensor(start)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut optimizer = Optimizer::new(params.clone(), &settings)?;
        let mut worst = 0f64;
        for t in 1..=steps {
            let grads = (0..count)
                .map(|i| Ok(get(&tensors, &format!("grad.p{i}.step{t}"))?.clone()))
                .collect::<Result<Vec<_>>>()?;
            optimizer.step(&grads, lr * multipliers[t - 1])?;
            for (i, (_, var)) in params.iter().enumerate() {
                let reference = get(&tensors, &format!("{name}.p{i}.step{t}"))?;
                let err = rel_err(var.as_tensor(), reference)?;
                // `!(err <= …)` also fails on NaN.
                ensure!(
                    err <= TOLERANCE,
                    "{name}, parameter {i}, step {t}: relative error {err:.3e}"
                );
                worst = worst.max(err);
                checked += 1;
            }
        }
        println!("{name}: largest relative error over {steps} steps {worst:.2e}");
        // The parameters moved: a case that changes nothing would pass vacuously.
        let start = get(&tensors, &format!("{name}.p0.step0"))?;
        ensure!(
            rel_err(params[0].1.as_tensor(), start)? > 1e-3,
            "{name}: the first parameter did not move"
        );
    }
    ensure!(
        checked == cases.len() * steps * count,
        "{checked} comparisons"
    );
    Ok(())
}
