//! Each lora-infer scheduler against the diffusers scheduler of the same name: timesteps, sigmas,
//! initial noise sigma, model inputs and every step's output on fixed model outputs, for epsilon
//! and v-prediction and each timestep spacing. Expected values: tests/reference/make_infer_fixtures.py.

mod common;

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{Device, Tensor};
use lora_core::models::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use lora_infer::scheduler::{DpmSolverPlusPlus2M, Euler, SchedulerKind};

fn fixture() -> Result<HashMap<String, Tensor>> {
    let path = common::fixtures().join("sd1-tiny/infer/schedulers.safetensors");
    Ok(candle_core::safetensors::load(&path, &Device::Cpu)?)
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// `|a − b| / max(1, |b|)`, largest over the tensor.
fn scaled_err(a: &Tensor, b: &Tensor) -> f32 {
    common::max_abs_diff(a, b) / common::max_abs(b).max(1.0)
}

#[test]
fn schedulers_match_diffusers_step_for_step() -> Result<()> {
    let fx = fixture()?;
    let base = common::fixtures().join("sd1-tiny/scheduler/scheduler_config.json");
    let base = SchedulerConfig::from_file(&base)?;
    let model_outputs = common::get(&fx, "model_outputs");
    let steps = model_outputs.dim(0)?;
    let mut checked = 0;
    let mut worst = 0f32;
    for (prediction, pname) in [
        (PredictionType::Epsilon, "epsilon"),
        (PredictionType::VPrediction, "v_prediction"),
    ] {
        for (spacing, sname) in [
            (TimestepSpacing::Leading, "leading"),
            (TimestepSpacing::Linspace, "linspace"),
            (TimestepSpacing::Trailing, "trailing"),
        ] {
            let config = SchedulerConfig {
                prediction_type: prediction,
                timestep_spacing: spacing,
                ..base.clone()
            };
            for kind in SchedulerKind::ALL {
                let key = format!("{kind}.{pname}.{sname}");
                let expect = |what: &str| common::get(&fx, &format!("{key}.{what}"));
                let mut scheduler = kind.build(&config, steps)?;

                let timesteps = values(expect("timesteps"));
                assert_eq!(timesteps.len(), steps, "{key}");
                assert_eq!(scheduler.timesteps().len(), steps, "{key}: our timesteps");
                for (ours, theirs) in scheduler.timesteps().iter().zip(&timesteps) {
                    assert!(
                        (ours - theirs).abs() < 1e-3,
                        "{key}: timesteps {:?} vs {timesteps:?}",
                        scheduler.timesteps()
                    );
                }
                let sigma0 = values(expect("init_noise_sigma"))[0];
                assert!(
                    (scheduler.init_noise_sigma() - sigma0).abs() <= 1e-5 * sigma0,
                    "{key}: init_noise_sigma {} vs {sigma0}",
                    scheduler.init_noise_sigma()
                );
                if let Some(sigmas) = fx.get(&format!("{key}.sigmas")) {
                    let ours = match kind {
                        SchedulerKind::Euler => Euler::new(&config, steps).sigmas().to_vec(),
                        SchedulerKind::EulerAncestral => {
                            Euler::ancestral(&config, steps).sigmas().to_vec()
                        }
                        SchedulerKind::DpmPlusPlus2M => {
                            DpmSolverPlusPlus2M::new(&config, steps).sigmas().to_vec()
                        }
                        _ => panic!("{key}: diffusers has sigmas, our scheduler none"),
                    };
                    let theirs = values(sigmas);
                    assert!(!theirs.is_empty() && ours.len() == theirs.len(), "{key}");
                    for (o, t) in ours.iter().zip(&theirs) {
                        assert!(
                            (o - t).abs() <= 1e-5 * t.max(1.0),
                            "{key}: sigmas {ours:?} vs {theirs:?}"
                        );
                    }
                }

                // img2img's start: the fixed start noised to step 2's level with step 0's noise.
                let noised =
                    scheduler.add_noise(common::get(&fx, "start"), &expect("noise").get(0)?, 2)?;
                let err = scaled_err(&noised, expect("add_noise_2"));
                assert!(err < 1e-5, "{key}: add_noise off by {err}");

                // Each step starts from diffusers' own previous sample, so errors cannot compound.
                let start = (common::get(&fx, "start") * sigma0)?;
                let inputs = expect("model_inputs");
                let prevs = expect("prev_samples");
                let noise = expect("noise");
                for step in 0..steps {
                    let sample = if step == 0 {
                        start.clone()
                    } else {
                        prevs.get(step - 1)?
                    };
                    let input = scheduler.scale_model_input(&sample, step)?;
                    let err = scaled_err(&input, &inputs.get(step)?);
                    assert!(err < 1e-5, "{key} step {step}: model input off by {err}");
                    let noise = noise.get(step)?;
                    let out =
                        scheduler.step(&model_outputs.get(step)?, step, &sample, Some(&noise))?;
                    let err = scaled_err(&out, &prevs.get(step)?);
                    assert!(err < 1e-5, "{key} step {step}: prev_sample off by {err}");
                    worst = worst.max(err);
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 30);
    println!("30 scheduler cases, worst step error |Δ|/max(1, |x|) = {worst:.1e}");
    Ok(())
}

#[test]
fn stochastic_schedulers_require_noise() -> Result<()> {
    let config = SchedulerConfig::from_file(
        &common::fixtures().join("sd1-tiny/scheduler/scheduler_config.json"),
    )?;
    let x = Tensor::ones((1, 4, 2, 2), candle_core::DType::F32, &Device::Cpu)?;
    for kind in [SchedulerKind::EulerAncestral, SchedulerKind::Ddpm] {
        let mut s = kind.build(&config, 4)?;
        assert!(s.is_stochastic());
        let err = s.step(&x, 0, &x, None).unwrap_err().to_string();
        assert!(err.contains("needs noise"), "{kind}: {err}");
    }
    let err = SchedulerKind::Ddim
        .build(&config, 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("0 inference steps"), "{err}");
    Ok(())
}
