//! UNet forward parity with diffusers (f32) on the tiny SD1-like and SD2-like fixtures.

mod common;

use anyhow::Result;
use candle_core::{DType, Device};
use common::{expected, fixtures, get, max_abs, max_abs_diff, CONFIGS};
use lora_toolkit::core::io::weights::component_weights;
use lora_toolkit::core::models::config::UNetConfig;
use lora_toolkit::core::UNet2DConditionModel;

pub fn load_unet(cfg: &str, dtype: DType) -> Result<UNet2DConditionModel> {
    let dir = fixtures().join(cfg).join("unet");
    let config = UNetConfig::from_file(&dir.join("config.json"))?;
    let weights = component_weights(&dir, "diffusion_pytorch_model")?;
    UNet2DConditionModel::from_files(&config, &[weights], dtype, &Device::Cpu)
}

#[test]
fn unet_forward_matches_diffusers() -> Result<()> {
    for cfg in CONFIGS {
        let exp = expected(cfg)?;
        let unet = load_unet(cfg, DType::F32)?;
        let out = unet.forward(
            get(&exp, "sample"),
            get(&exp, "timestep"),
            get(&exp, "encoder_hidden_states"),
        )?;
        let reference = get(&exp, "unet_out");
        let err = max_abs_diff(&out, reference);
        println!(
            "{cfg}: max |ours - diffusers| = {err:.3e} (output max {:.3})",
            max_abs(reference)
        );
        assert!(
            err <= 1e-4,
            "{cfg}: UNet output differs from diffusers by {err}"
        );
    }
    Ok(())
}

#[test]
fn unet_forward_runs_in_half_precision() -> Result<()> {
    // f16 weights: the same network within half-precision tolerance of the f32 reference.
    // (candle's CPU backend has no bf16 matmul; bf16 is exercised on CUDA.)
    let exp = expected("sd1-tiny")?;
    let unet = load_unet("sd1-tiny", DType::F16)?;
    let out = unet.forward(
        get(&exp, "sample"),
        get(&exp, "timestep"),
        get(&exp, "encoder_hidden_states"),
    )?;
    assert_eq!(out.dtype(), DType::F16);
    let reference = get(&exp, "unet_out");
    let err = max_abs_diff(&out, reference) / max_abs(reference);
    println!("f16: max error relative to output scale = {err:.3e}");
    assert!(
        err < 5e-2,
        "f16 output too far from the f32 reference: {err}"
    );
    Ok(())
}
