//! The UNet against diffusers' outputs on the tiny fixture model, and its layer enumeration.

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::Var;

use super::*;
use crate::adapters::{Adapter, Component, LoraConfig, LoraTargets};
use crate::io::weights::RandomInit;
use crate::test_support::max_rel_diff;
use crate::Rng;

fn tiny_config() -> Result<UNetConfig> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd1-tiny/unet");
    UNetConfig::from_file(&dir.join("config.json"))
}

/// Inputs for the tiny model: a batch of two, one timestep each.
fn inputs(cfg: &UNetConfig, dtype: DType) -> Result<(Tensor, Tensor, Tensor)> {
    let mut rng = Rng::new(7);
    let dev = Device::Cpu;
    let sample = rng.normal_tensor((2, cfg.in_channels, 16, 16), &dev)?;
    let context = rng.normal_tensor((2, 5, cfg.cross_attention_dim), &dev)?;
    let timesteps = Tensor::new(&[10f32, 700.], &dev)?;
    Ok((sample.to_dtype(dtype)?, timesteps, context.to_dtype(dtype)?))
}

/// Gradients of a weighted squared output under both backward passes.
fn both_gradients(unet: &UNet2DConditionModel, params: &[Var]) -> Result<[GradStore; 2]> {
    let (sample, timesteps, context) = inputs(unet.config(), unet.dtype())?;
    let target = Rng::new(9).normal_tensor(sample.shape(), &Device::Cpu)?;
    let loss = |out: &Tensor| -> Result<Tensor> {
        Ok((out.to_dtype(DType::F32)? - &target)?.sqr()?.mean_all()?)
    };
    let plain = loss(&unet.forward(&sample, &timesteps, &context)?)?.backward()?;
    let (prediction, pass) = unet.forward_checkpointed(&sample, &timesteps, &context)?;
    Ok([plain, pass.backward(&loss(&prediction)?, params)?])
}

fn assert_same_gradients(
    [plain, checkpointed]: &[GradStore; 2],
    params: &[(String, Var)],
    tol: f32,
    what: &str,
) {
    let mut compared = 0;
    for (name, var) in params {
        let Some(expected) = plain.get(var.as_tensor()) else {
            assert!(checkpointed.get(var.as_tensor()).is_none(), "{name}");
            continue;
        };
        let got = checkpointed
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient with checkpointing"));
        let err = max_rel_diff(got, expected);
        assert!(err <= tol, "{what}, {name}: gradients differ by {err:.2e}");
        compared += 1;
    }
    assert!(compared > 0, "no parameter got a gradient");
}

/// LoRA on every adaptable layer, on an f32 base (the CPU kernels) and an f16 base (the path
/// CUDA takes): checkpointing changes where activations live, not the gradients. In f16 the
/// gradients between layers are sums of f16 terms taken in another order, a few ulps
/// (≤ 6e-3 here) apart; `lora_parity` holds both passes to PyTorch's. On aarch64 CPUs with FP16
/// arithmetic, gemm's f16 kernels also multiply and add in f16 (x86 converts to f32), so the
/// order costs more (1.2e-2 under qemu's `max` CPU; within 1e-2 on its Cortex-A72, which has no
/// FP16 arithmetic).
#[test]
fn checkpointed_lora_gradients_equal_the_plain_backward_pass() -> Result<()> {
    let cfg = tiny_config()?;
    let f16_tol = if cfg!(target_arch = "aarch64") {
        2.5e-2
    } else {
        1e-2
    };
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, f16_tol)] {
        let vb = RandomInit::frozen(3)
            .var_builder(&Device::Cpu)
            .set_dtype(dtype);
        let mut unet = UNet2DConditionModel::load(&cfg, &vb)?;
        let lora = LoraConfig {
            rank: 2,
            alpha: 2.0,
            targets: LoraTargets::AttnMlp,
            ..Default::default()
        };
        let trainable = Adapter::init_unet(&lora, unet.lora_modules(), &Device::Cpu, 0)?;
        // `up` starts at zero, which would leave every `down` gradient zero.
        let mut rng = Rng::new(5);
        for (name, var) in &trainable.vars {
            if name.ends_with("up") {
                var.set(&(rng.normal_tensor(var.shape(), &Device::Cpu)? * 0.1)?)?;
            }
        }
        unet.attach_adapter("test", &trainable.adapter.unet, 1.0)?;
        let vars: Vec<Var> = trainable.vars.iter().map(|(_, v)| v.clone()).collect();
        let grads = both_gradients(&unet, &vars)?;
        assert_same_gradients(&grads, &trainable.vars, tol, &format!("{dtype:?} base"));
    }
    Ok(())
}

/// A text embedding computed from trained variables (a text encoder with an adapter): the
/// checkpointed pass continues the backward pass into it, giving the same gradients as the plain
/// pass to the variables before the UNet and to the UNet's adapter.
#[test]
fn checkpointed_pass_continues_into_a_tracked_context() -> Result<()> {
    let cfg = tiny_config()?;
    let vb = RandomInit::frozen(3).var_builder(&Device::Cpu);
    let mut unet = UNet2DConditionModel::load(&cfg, &vb)?;
    let trainable =
        Adapter::init_unet(&LoraConfig::default(), unet.lora_modules(), &Device::Cpu, 0)?;
    unet.attach_adapter("test", &trainable.adapter.unet, 1.0)?;
    let (sample, timesteps, context) = inputs(&cfg, DType::F32)?;
    let scale = Var::from_tensor(&Rng::new(4).normal_tensor(context.dims()[2], &Device::Cpu)?)?;
    let context = context.broadcast_mul(scale.as_tensor())?;
    let target = Rng::new(9).normal_tensor(sample.shape(), &Device::Cpu)?;
    let loss = |out: &Tensor| -> Result<Tensor> { Ok((out - &target)?.sqr()?.mean_all()?) };
    let plain = loss(&unet.forward(&sample, &timesteps, &context)?)?.backward()?;
    let (prediction, pass) = unet.forward_checkpointed(&sample, &timesteps, &context)?;
    let mut params: Vec<(String, Var)> = trainable.vars.clone();
    params.push(("context scale".into(), scale.clone()));
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let checkpointed = pass.backward(&loss(&prediction)?, &vars)?;
    assert!(plain.get(scale.as_tensor()).is_some());
    assert_same_gradients(&[plain, checkpointed], &params, 1e-5, "tracked context");
    Ok(())
}

/// Gradients go where something is trained: none is computed (and kept by candle until the
/// backward pass ends) for the latents or the text embeddings, on the CPU kernels (f32) and
/// on the path other devices take (f16).
#[test]
fn untracked_inputs_get_no_gradient() -> Result<()> {
    let cfg = tiny_config()?;
    for dtype in [DType::F32, DType::F16] {
        let vb = RandomInit::frozen(3)
            .var_builder(&Device::Cpu)
            .set_dtype(dtype);
        let mut unet = UNet2DConditionModel::load(&cfg, &vb)?;
        let lora = LoraConfig::default();
        let trainable = Adapter::init_unet(&lora, unet.lora_modules(), &Device::Cpu, 0)?;
        unet.attach_adapter("test", &trainable.adapter.unet, 1.0)?;
        let (sample, timesteps, context) = inputs(&cfg, dtype)?;
        let out = unet.forward(&sample, &timesteps, &context)?;
        let grads = out.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
        assert!(grads.get(&sample).is_none(), "{dtype:?}: latents");
        assert!(grads.get(&context).is_none(), "{dtype:?}: text embeddings");
        for (name, var) in &trainable.vars {
            assert!(grads.get(var.as_tensor()).is_some(), "{dtype:?}: {name}");
        }
    }
    Ok(())
}

/// A full fine-tune: every weight a variable, so gradients also flow between layers through
/// the time embedding that every resnet reads, and into `conv_in` and the output head.
#[test]
fn checkpointed_full_fine_tune_gradients_equal_the_plain_backward_pass() -> Result<()> {
    let init = RandomInit::trainable(4);
    let unet = UNet2DConditionModel::load(&tiny_config()?, &init.var_builder(&Device::Cpu))?;
    let params = init.vars();
    let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
    let grads = both_gradients(&unet, &vars)?;
    for name in [
        "time_embedding.linear_1.weight",
        "conv_in.weight",
        "conv_out.bias",
    ] {
        let var = &params.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(grads[1].get(var.as_tensor()).is_some(), "{name}");
    }
    assert_same_gradients(&grads, &params, 1e-5, "full fine-tune");
    Ok(())
}

/// A fresh DoRA adapter (magnitudes at the base weights' norms, `up` at zero) leaves the UNet's
/// output as it is, on the transformer layers and the resnets' convolutions alike, and its
/// magnitudes get a gradient.
#[test]
fn fresh_dora_adapter_is_a_no_op() -> Result<()> {
    let cfg = tiny_config()?;
    let vb = RandomInit::frozen(3).var_builder(&Device::Cpu);
    let mut unet = UNet2DConditionModel::load(&cfg, &vb)?;
    let (sample, timesteps, context) = inputs(&cfg, DType::F32)?;
    let base = unet.forward(&sample, &timesteps, &context)?;
    let lora = LoraConfig {
        targets: LoraTargets::AttnMlp,
        ..Default::default()
    };
    let modules = unet.adapter_modules();
    let mut trainable = Adapter::init_unet(&lora, &modules, &Device::Cpu, 0)?;
    trainable.add_dora(Component::Unet, &unet.adaptable_weights()?)?;
    assert!(trainable
        .adapter
        .unet
        .values()
        .all(|m| m.as_lora().is_some_and(|m| m.magnitude.is_some())));
    unet.attach_adapter("dora", &trainable.adapter.unet, 1.0)?;
    let out = unet.forward(&sample, &timesteps, &context)?;
    let diff = (&out - &base)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(
        diff <= 1e-5,
        "a fresh DoRA adapter changed the output by {diff}"
    );
    let grads = out.sqr()?.mean_all()?.backward()?;
    let magnitudes: Vec<&(String, Var)> = trainable
        .vars
        .iter()
        .filter(|(name, _)| name.ends_with(".magnitude"))
        .collect();
    assert_eq!(magnitudes.len(), modules.len());
    for (name, var) in magnitudes {
        let grad = grads.get(var.as_tensor());
        assert!(grad.is_some(), "{name} got no gradient");
    }
    Ok(())
}
