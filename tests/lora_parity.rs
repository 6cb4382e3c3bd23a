//! LoRA-injected UNet parity with peft (per preset, two adapters at once, kohya files through
//! diffusers' loader) and gradient parity with PyTorch autograd for every adapter parameter.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use common::{expected, fixtures, get, max_abs, max_abs_diff, rel_err, CONFIGS};
use lora_toolkit::core::adapter_file::{AdapterFile, ModelModules};
use lora_toolkit::core::config::UNetConfig;
use lora_toolkit::core::weights::component_weights;
use lora_toolkit::core::{Adapter, LoraModule, LoraTargets, UNet2DConditionModel};

fn load_unet(cfg: &str) -> Result<UNet2DConditionModel> {
    let dir = fixtures().join(cfg).join("unet");
    let config = UNetConfig::from_file(&dir.join("config.json"))?;
    let weights = component_weights(&dir, "diffusion_pytorch_model")?;
    UNet2DConditionModel::from_files(&config, &[weights], DType::F32, &Device::Cpu)
}

/// Reads a fixture adapter file (written by diffusers/peft or by hand in kohya layout) and
/// resolves its UNet part against `unet`.
fn read_adapter(cfg: &str, file: &str, unet: &UNet2DConditionModel) -> Result<Adapter> {
    let path = fixtures().join(cfg).join(file);
    let modules = ModelModules {
        unet: unet.lora_modules(),
        text_encoder: None,
    };
    AdapterFile::read(&path, &Device::Cpu)?
        .resolve(&modules)
        .with_context(|| format!("resolving {file}"))
}

fn unet_forward(
    unet: &UNet2DConditionModel,
    exp: &std::collections::HashMap<String, Tensor>,
) -> Result<Tensor> {
    unet.forward(
        get(exp, "sample"),
        get(exp, "timestep"),
        get(exp, "encoder_hidden_states"),
    )
}

#[test]
fn each_preset_matches_peft() -> Result<()> {
    for cfg in CONFIGS {
        let exp = expected(cfg)?;
        let mut unet = load_unet(cfg)?;
        let base = unet_forward(&unet, &exp)?;
        for preset in LoraTargets::ALL {
            let adapter = read_adapter(cfg, &format!("adapter_{preset}_peft.safetensors"), &unet)?;
            // The preset's module selection is the same as the one the reference adapted.
            let ours: BTreeSet<&str> = unet
                .lora_modules()
                .iter()
                .filter(|m| preset.matches(&m.path))
                .map(|m| m.path.as_str())
                .collect();
            let theirs: BTreeSet<&str> = adapter.unet.keys().map(String::as_str).collect();
            assert_eq!(
                ours, theirs,
                "{cfg}: preset {preset} selects different modules than the reference"
            );

            unet.attach_adapter("p", &adapter.unet, 1.0)?;
            let out = unet_forward(&unet, &exp)?;
            let reference = get(&exp, &format!("unet_out_lora_{preset}"));
            let err = max_abs_diff(&out, reference);
            let effect = max_abs_diff(reference, get(&exp, "unet_out"));
            println!(
                "{cfg} {preset}: {} modules, max err {err:.2e} (adapter effect {effect:.3})",
                theirs.len()
            );
            assert!(effect > 1e-2, "fixture adapter has no visible effect");
            assert!(
                err <= 1e-4,
                "{cfg} {preset}: LoRA forward differs from peft by {err}"
            );

            unet.detach_adapter("p")?;
            assert_eq!(
                max_abs_diff(&unet_forward(&unet, &exp)?, &base),
                0.0,
                "detach must restore the base"
            );
        }
    }
    Ok(())
}

#[test]
fn two_adapters_with_weights_match_peft() -> Result<()> {
    for cfg in CONFIGS {
        let exp = expected(cfg)?;
        let mut unet = load_unet(cfg)?;
        let a = read_adapter(cfg, "adapter_two_a_peft.safetensors", &unet)?;
        let b = read_adapter(cfg, "adapter_two_b_peft.safetensors", &unet)?;
        unet.attach_adapter("a", &a.unet, 0.5)?;
        unet.attach_adapter("b", &b.unet, 0.7)?;
        let err = max_abs_diff(&unet_forward(&unet, &exp)?, get(&exp, "unet_out_two"));
        println!("{cfg}: two adapters max err {err:.2e}");
        assert!(
            err <= 1e-4,
            "{cfg}: two adapters differ from peft set_adapters by {err}"
        );
    }
    Ok(())
}

#[test]
fn kohya_file_matches_diffusers_loader() -> Result<()> {
    for cfg in CONFIGS {
        let exp = expected(cfg)?;
        let mut unet = load_unet(cfg)?;
        let adapter = read_adapter(cfg, "adapter_kohya.safetensors", &unet)?;
        unet.attach_adapter("kohya", &adapter.unet, 1.0)?;
        let err = max_abs_diff(&unet_forward(&unet, &exp)?, get(&exp, "unet_out_kohya"));
        println!(
            "{cfg}: kohya adapter ({} UNet modules) max err {err:.2e}",
            adapter.unet.len()
        );
        assert!(
            err <= 1e-4,
            "{cfg}: kohya adapter differs from diffusers' load_lora_weights by {err}"
        );
    }
    Ok(())
}

#[test]
fn adapter_gradients_match_pytorch_autograd() -> Result<()> {
    for cfg in CONFIGS {
        let exp = expected(cfg)?;
        let mut unet = load_unet(cfg)?;
        let adapter = read_adapter(cfg, "adapter_grad_peft.safetensors", &unet)?;

        // Make every down/up a trainable variable.
        let mut vars: BTreeMap<String, (Var, Var)> = BTreeMap::new();
        let mut trainable = BTreeMap::new();
        for (path, m) in &adapter.unet {
            let (down, up) = (Var::from_tensor(&m.down)?, Var::from_tensor(&m.up)?);
            trainable.insert(
                path.clone(),
                LoraModule {
                    down: down.as_tensor().clone(),
                    up: up.as_tensor().clone(),
                    alpha: m.alpha,
                },
            );
            vars.insert(path.clone(), (down, up));
        }
        unet.attach_adapter("grad", &trainable, 1.0)?;

        let out = unet_forward(&unet, &exp)?;
        assert!(
            max_abs_diff(&out, get(&exp, "unet_out_lora_grad")) <= 1e-4,
            "{cfg}: forward differs"
        );
        let loss = (out - get(&exp, "grad_target"))?.sqr()?.mean_all()?;
        let ref_loss = get(&exp, "grad_loss")
            .flatten_all()?
            .get(0)?
            .to_scalar::<f32>()?;
        let our_loss = loss.to_scalar::<f32>()?;
        assert!(
            (our_loss - ref_loss).abs() <= 1e-5 * ref_loss.abs().max(1.0),
            "{cfg}: loss {our_loss} vs {ref_loss}"
        );

        let grads = loss.backward()?;
        let mut worst = (0f32, String::new());
        for (path, (down, up)) in &vars {
            for (var, which) in [(down, "lora_A"), (up, "lora_B")] {
                let key = format!("grad.{path}.{which}.weight");
                let grad = grads.get(var.as_tensor()).unwrap_or_else(|| {
                    panic!("{cfg}: adapter parameter {path}.{which} got no gradient")
                });
                let reference = get(&exp, &key).reshape(var.as_tensor().shape())?;
                assert!(
                    max_abs(&reference) > 0.0,
                    "{cfg}: reference gradient {key} is zero"
                );
                let err = rel_err(grad, &reference);
                if err > worst.0 {
                    worst = (err, key.clone());
                }
                assert!(err <= 1e-3, "{cfg}: gradient {key} relative error {err}");
            }
        }
        println!(
            "{cfg}: {} parameters, worst relative gradient error {:.2e} ({})",
            vars.len() * 2,
            worst.0,
            worst.1
        );
    }
    Ok(())
}

#[test]
fn module_list_without_weights_matches_the_loaded_unet() -> Result<()> {
    for cfg in CONFIGS {
        let unet = load_unet(cfg)?;
        let from_config = UNet2DConditionModel::lora_modules_of(unet.config())?;
        assert_eq!(from_config, unet.lora_modules(), "{cfg}");
    }
    Ok(())
}
