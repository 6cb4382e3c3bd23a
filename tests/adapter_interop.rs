//! Adapter files written by our writers are the files diffusers accepted.
//!
//! This test re-writes the fixture kohya adapter (UNet + text encoder) in both formats into
//! `target/tmp/ours-adapters/<cfg>/`. `tests/reference/check_ours.py` loads exactly those files
//! with diffusers' `load_lora_weights`, fails on any missing/unexpected key or output difference,
//! and records the key lists it accepted in `tests/fixtures/<cfg>/ours_checked.json`. Here we
//! assert our writers still produce exactly those keys and metadata entries, and that the files
//! read back into the same adapter.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device};
use common::{fixtures, max_abs_diff, CONFIGS};
use lora_toolkit::core::formats::adapter_file::{
    save_adapter, AdapterFile, AdapterFormat, ModelModules, SaveOptions,
};
use lora_toolkit::core::formats::kohya::BaseModelVersion;
use lora_toolkit::core::models::config::{PredictionType, UNetConfig};
use lora_toolkit::core::source::ModelFolder;
use lora_toolkit::core::{models::text_encoder, Adapter, UNet2DConditionModel};

fn string_set(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn assert_same_adapter(a: &Adapter, b: &Adapter) {
    for (x, y) in [(&a.unet, &b.unet), (&a.text_encoder, &b.text_encoder)] {
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
        for (path, m) in x {
            let n = &y[path];
            assert_eq!(max_abs_diff(&m.down, &n.down), 0.0, "{path} down");
            assert_eq!(max_abs_diff(&m.up, &n.up), 0.0, "{path} up");
            assert_eq!(m.alpha, n.alpha, "{path} alpha");
        }
    }
}

#[test]
fn adapter_files_checked_by_diffusers() -> Result<()> {
    let out_root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ours-adapters");
    for cfg in CONFIGS {
        let dir = fixtures().join(cfg);
        let folder = ModelFolder::open(&dir)?;
        let config = UNetConfig::from_file(&folder.unet_config())?;
        let unet = UNet2DConditionModel::from_files(
            &config,
            &[folder.unet_weights().to_path_buf()],
            DType::F32,
            &Device::Cpu,
        )?;
        let te_modules = text_encoder::lora_modules(&folder.text_encoder_config()?);
        let modules = ModelModules {
            unet: unet.lora_modules(),
            text_encoder: Some(&te_modules),
        };
        let source = AdapterFile::read(&dir.join("adapter_kohya.safetensors"), &Device::Cpu)?
            .resolve(&modules)?;
        assert!(
            !source.text_encoder.is_empty(),
            "fixture adapter has text-encoder modules"
        );

        let checked: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("ours_checked.json"))?)?;
        let (base_model, prediction) = match cfg {
            "sd1-tiny" => (BaseModelVersion::SdV1, PredictionType::Epsilon),
            _ => (BaseModelVersion::SdV2, PredictionType::VPrediction),
        };
        std::fs::create_dir_all(out_root.join(cfg))?;
        for format in [AdapterFormat::Kohya, AdapterFormat::Peft] {
            let path = out_root
                .join(cfg)
                .join(format!("ours_{format}.safetensors"));
            let options = SaveOptions {
                format,
                base_model,
                prediction,
                title: Some("fixture".into()),
                extra_metadata: Default::default(),
            };
            save_adapter(&path, &source, &modules, &options)?;

            let written = AdapterFile::read(&path, &Device::Cpu)?;
            let accepted = &checked[format.name()];
            let keys: BTreeSet<String> =
                safetensors::SafeTensors::deserialize(&std::fs::read(&path)?)?
                    .names()
                    .into_iter()
                    .map(str::to_string)
                    .collect();
            assert_eq!(
                keys,
                string_set(&accepted["keys"]),
                "{cfg} {format}: keys differ from those diffusers accepted"
            );
            let meta: BTreeSet<String> = written.metadata().keys().cloned().collect();
            assert_eq!(
                meta,
                string_set(&accepted["metadata_keys"]),
                "{cfg} {format}: metadata keys differ"
            );
            assert!(accepted["loader_complaints"].as_array().unwrap().is_empty());
            assert!(accepted["unet_max_abs_err"].as_f64().unwrap() <= 1e-5);
            assert!(accepted["te_max_abs_err"].as_f64().unwrap() <= 1e-5);

            assert_same_adapter(&written.resolve(&modules)?, &source);
        }
    }
    Ok(())
}
