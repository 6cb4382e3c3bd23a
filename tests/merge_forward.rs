//! Merge-then-run equals run-with-the-adapter-unmerged: the UNet loaded from the merged folder
//! and the base UNet with the same adapter attached (lora-core's `LoraLinear` path) agree on
//! the fixture inputs.

mod common;

use anyhow::Result;
use candle_core::{DType, Device};
use common::{expected, fixtures, get, max_abs, max_abs_diff, CONFIGS};
use lora_toolkit::core::formats::keys::{modules_from_weights, Component};
use lora_toolkit::core::models::config::UNetConfig;
use lora_toolkit::core::options::AdapterSpec;
use lora_toolkit::core::{AdapterFile, ModelModules, UNet2DConditionModel};
use lora_toolkit::merge::{merge, MergeOptions};

const WEIGHT: f64 = 0.8;

#[test]
fn merged_unet_equals_unmerged_adapter() -> Result<()> {
    for cfg in CONFIGS {
        let base = fixtures().join(cfg);
        let adapter_path = base.join("adapter_kohya.safetensors");
        let dir = tempfile::tempdir()?;
        let merged = dir.path().join("merged");
        merge(&MergeOptions {
            base: base.clone(),
            adapters: vec![AdapterSpec {
                path: adapter_path.clone(),
                scale: WEIGHT,
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
        let unet_modules = modules_from_weights(Component::Unet, &weights(&base))?;
        let adapter = AdapterFile::read(&adapter_path, &Device::Cpu)?.resolve(&ModelModules {
            unet: &unet_modules,
            text_encoder: None,
        })?;
        adapted.attach_adapter("kohya", &adapter.unet, WEIGHT)?;

        let exp = expected(cfg)?;
        let inputs = (
            get(&exp, "sample"),
            get(&exp, "timestep"),
            get(&exp, "encoder_hidden_states"),
        );
        let ours = merged_unet.forward(inputs.0, inputs.1, inputs.2)?;
        let reference = adapted.forward(inputs.0, inputs.1, inputs.2)?;
        let err = max_abs_diff(&ours, &reference);
        let scale = max_abs(&reference);
        println!(
            "{cfg}: merged vs unmerged UNet output, max diff {err:.2e} (output max {scale:.3})"
        );
        assert!(err <= 1e-4 * scale.max(1.0), "{cfg}: {err}");
    }
    Ok(())
}
