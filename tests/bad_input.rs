//! Bad input on the model side gives a clear error naming the file, key or value — never a crash
//! or a silent default.

mod common;

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device};
use common::fixtures;
use lora_toolkit::core::formats::adapter_file::{AdapterFile, ModelModules};
use lora_toolkit::core::io::weights::component_weights;
use lora_toolkit::core::models::config::UNetConfig;
use lora_toolkit::core::UNet2DConditionModel;

fn fixture_unet_config(cfg: &str) -> String {
    std::fs::read_to_string(fixtures().join(cfg).join("unet/config.json")).unwrap()
}

fn load(config: &UNetConfig, weights: &Path) -> Result<UNet2DConditionModel> {
    UNet2DConditionModel::from_files(config, &[weights.to_path_buf()], DType::F32, &Device::Cpu)
}

fn err_text<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn truncated_weights_name_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = component_weights(&fixtures().join("sd1-tiny/unet"), "diffusion_pytorch_model")?;
    let bytes = std::fs::read(&src)?;
    let truncated = dir.path().join("diffusion_pytorch_model.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
    let config = UNetConfig::from_json(&fixture_unet_config("sd1-tiny"))?;
    let msg = err_text(load(&config, &truncated));
    assert!(
        msg.contains("diffusion_pytorch_model.safetensors")
            && msg.contains("not a valid safetensors"),
        "{msg}"
    );

    std::fs::write(&truncated, b"definitely not safetensors")?;
    let msg = err_text(load(&config, &truncated));
    assert!(msg.contains("not a valid safetensors"), "{msg}");
    Ok(())
}

#[test]
fn weights_for_another_config_name_key_and_shapes() -> Result<()> {
    // SD2-like config (linear projections, wider context) over SD1-like weights.
    let config = UNetConfig::from_json(&fixture_unet_config("sd2-tiny"))?;
    let weights = component_weights(&fixtures().join("sd1-tiny/unet"), "diffusion_pytorch_model")?;
    let msg = err_text(load(&config, &weights));
    assert!(
        msg.contains("has shape") && msg.contains("expects"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn unknown_or_unsupported_config_values_are_errors() {
    let base: serde_json::Value = serde_json::from_str(&fixture_unet_config("sd1-tiny")).unwrap();
    let cases: [(&str, serde_json::Value, &str); 6] = [
        (
            "addition_embed_type",
            "text_time".into(),
            "addition_embed_type",
        ),
        (
            "some_future_option",
            true.into(),
            "unknown UNet config key `some_future_option`",
        ),
        ("act_fn", "gelu".into(), "act_fn"),
        (
            "down_block_types",
            serde_json::json!(["CrossAttnDownBlock2D", "SimpleDownBlock", "DownBlock2D"]),
            "SimpleDownBlock",
        ),
        (
            "attention_head_dim",
            serde_json::json!([2, 2]),
            "attention_head_dim",
        ),
        ("norm_num_groups", 5.into(), "norm_num_groups"),
    ];
    for (key, value, expect) in cases {
        let mut cfg = base.clone();
        cfg[key] = value;
        let msg = err_text(UNetConfig::from_json(&cfg.to_string()));
        assert!(
            msg.contains(expect),
            "{key}: error `{msg}` should mention `{expect}`"
        );
    }
    let msg = err_text(UNetConfig::from_json("{ not json"));
    assert!(msg.contains("JSON"), "{msg}");
}

#[test]
fn adapter_for_another_architecture_lists_keys_and_shapes() -> Result<()> {
    let dir = fixtures().join("sd1-tiny/unet");
    let config = UNetConfig::from_file(&dir.join("config.json"))?;
    let unet = load(
        &config,
        &component_weights(&dir, "diffusion_pytorch_model")?,
    )?;
    let sd2_adapter = AdapterFile::read(
        &fixtures().join("sd2-tiny/adapter_attn2_peft.safetensors"),
        &Device::Cpu,
    )?;
    let modules = ModelModules::unet_only(unet.lora_modules());
    let msg = err_text(sd2_adapter.resolve(&modules));
    // sd2-tiny has two resnets per block: its extra attention modules exist nowhere in sd1-tiny,
    // and its attn2 to_k/to_v take a 32-wide context where sd1-tiny's take 24.
    assert!(msg.contains("attentions.1"), "{msg}");
    assert!(msg.contains("to_k") && msg.contains("24"), "{msg}");
    Ok(())
}
