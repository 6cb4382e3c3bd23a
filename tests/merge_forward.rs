//! Merge-then-run equals run-with-the-adapter-unmerged: the UNet loaded from the merged folder
//! and the base UNet with the same adapter attached (lora-core's `LoraLinear` path) agree on
//! the fixture inputs.

mod common;

use anyhow::Result;
use candle_core::{DType, Device};
use common::{expected, fixtures, get, max_abs, max_abs_diff, CONFIGS};
use lora_toolkit::core::models::config::UNetConfig;
use lora_toolkit::core::options::AdapterSpec;
use lora_toolkit::core::{AdapterFile, ModelModules, UNet2DConditionModel};
use lora_toolkit::merge::{merge, MergeOptions};

const WEIGHT: f64 = 0.8;

#[test]
fn merged_unet_equals_unmerged_adapter() -> Result<()> {
    for cfg in CONFIGS {
        let (merged, adapted) = merged_and_unmerged(cfg, "adapter_kohya.safetensors", WEIGHT)?;
        let (ours, reference) = (run(cfg, &merged)?, run(cfg, &adapted)?);
        let err = max_abs_diff(&ours, &reference);
        let scale = max_abs(&reference);
        println!(
            "{cfg}: merged vs unmerged UNet output, max diff {err:.2e} (output max {scale:.3})"
        );
        assert!(err <= 1e-4 * scale.max(1.0), "{cfg}: {err}");
    }
    Ok(())
}

/// DoRA folds as LyCORIS and peft apply it: `adapter_dora_kohya.safetensors` merged at 1.0
/// reproduces peft's UNet output (`make_dora_grad_fixtures.py`, where LyCORIS' own merge of the
/// same file agreed within 4e-6), and at another weight the merged UNet equals the adapter
/// attached unmerged at that weight (`W + λ·(W' − W)` both ways).
#[test]
fn merged_dora_unet_matches_peft_and_the_unmerged_adapter() -> Result<()> {
    for cfg in CONFIGS {
        let reference = candle_core::safetensors::load(
            fixtures().join(cfg).join("grad_dora.safetensors"),
            &Device::Cpu,
        )?;
        let peft_out = get(&reference, "dora_out");
        let (merged, _) = merged_and_unmerged(cfg, "adapter_dora_kohya.safetensors", 1.0)?;
        let err = max_abs_diff(&run(cfg, &merged)?, peft_out);
        let scale = max_abs(peft_out);
        println!("{cfg}: DoRA merged at 1.0 vs peft, max diff {err:.2e} (output max {scale:.3})");
        assert!(err <= 1e-4 * scale.max(1.0), "{cfg}: {err}");

        let (merged, adapted) = merged_and_unmerged(cfg, "adapter_dora_kohya.safetensors", 0.6)?;
        let (ours, unmerged) = (run(cfg, &merged)?, run(cfg, &adapted)?);
        let err = max_abs_diff(&ours, &unmerged);
        assert!(err <= 1e-4 * max_abs(&unmerged).max(1.0), "{cfg}: {err}");
        assert!(
            max_abs_diff(&ours, peft_out) > 1e-2,
            "{cfg}: the weight changed nothing"
        );
    }
    Ok(())
}

/// The UNet of the fixture `cfg` merged with `file` at `weight` by lora-merge, and the base UNet
/// with the same adapter attached unmerged at that weight.
fn merged_and_unmerged(
    cfg: &str,
    file: &str,
    weight: f64,
) -> Result<(UNet2DConditionModel, UNet2DConditionModel)> {
    let base = fixtures().join(cfg);
    let adapter_path = base.join(file);
    let dir = tempfile::tempdir()?;
    let merged = dir.path().join("merged");
    merge(&MergeOptions {
        base: base.clone(),
        adapters: vec![AdapterSpec {
            path: adapter_path.clone(),
            scale: weight,
        }],
        output: merged.clone(),
        dtype: None,
        allow_unmatched: false,
        allow_nonfinite: false,
    })?;

    let config = UNetConfig::from_file(&base.join("unet/config.json"))?;
    let weights =
        |root: &std::path::Path| vec![root.join("unet/diffusion_pytorch_model.safetensors")];
    let merged_unet =
        UNet2DConditionModel::from_files(&config, &weights(&merged), DType::F32, &Device::Cpu)?;
    let mut adapted =
        UNet2DConditionModel::from_files(&config, &weights(&base), DType::F32, &Device::Cpu)?;
    let adapter = AdapterFile::read(&adapter_path, &Device::Cpu)?
        .resolve(&ModelModules::unet_only(&adapted.adapter_modules()))?;
    adapted.attach_adapter(file, &adapter.unet, weight)?;
    Ok((merged_unet, adapted))
}

/// The UNet's output on the fixture inputs of `cfg`.
fn run(cfg: &str, unet: &UNet2DConditionModel) -> Result<candle_core::Tensor> {
    let exp = expected(cfg)?;
    unet.forward(
        get(&exp, "sample"),
        get(&exp, "timestep"),
        get(&exp, "encoder_hidden_states"),
    )
}
