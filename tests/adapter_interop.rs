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
use lora_toolkit::core::models::config::PredictionType;
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
            let (m, n) = (m.as_lora().unwrap(), y[path].as_lora().unwrap());
            assert_eq!(max_abs_diff(&m.down, &n.down), 0.0, "{path} down");
            assert_eq!(max_abs_diff(&m.up, &n.up), 0.0, "{path} up");
            assert_eq!(m.alpha, n.alpha, "{path} alpha");
            match (&m.magnitude, &n.magnitude) {
                (Some(a), Some(b)) => assert_eq!(max_abs_diff(a, b), 0.0, "{path} magnitude"),
                (None, None) => {}
                _ => panic!("{path}: DoRA in one adapter only"),
            }
        }
    }
}

#[test]
fn adapter_files_checked_by_diffusers() -> Result<()> {
    let out_root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ours-adapters");
    for cfg in CONFIGS {
        let dir = fixtures().join(cfg);
        let folder = ModelFolder::open(&dir)?;
        let config = folder.unet_config()?;
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
            text_encoder_2: None,
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
                lokr_factor: None,
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

/// DoRA files in both layouts: the kohya/LyCORIS file LyCORIS' loader merged and the PEFT file
/// diffusers' loader injected (`make_dora_grad_fixtures.py`, both checked there against peft's
/// output) read into the same adapter, and our writers give back exactly those files' tensors
/// (same keys, shapes and values) with the metadata each loader reads.
#[test]
fn dora_files_read_and_write_as_lycoris_and_diffusers_do() -> Result<()> {
    let out = tempfile::tempdir()?;
    for cfg in CONFIGS {
        let dir = fixtures().join(cfg);
        let folder = ModelFolder::open(&dir)?;
        let config = folder.unet_config()?;
        let unet_modules = UNet2DConditionModel::adapter_modules_of(&config)?;
        let modules = ModelModules::unet_only(&unet_modules);
        let read = |name: &str| AdapterFile::read(&dir.join(name), &Device::Cpu);
        let kohya = read("adapter_dora_kohya.safetensors")?.resolve(&modules)?;
        let peft = read("adapter_dora_peft.safetensors")?.resolve(&modules)?;
        let dora = |m: &lora_toolkit::core::AdapterModule| {
            m.as_lora().is_some_and(|m| m.magnitude.is_some())
        };
        assert!(kohya.unet.values().all(dora), "{cfg}");
        assert_same_adapter(&kohya, &peft);

        for (format, reference) in [
            (AdapterFormat::Kohya, "adapter_dora_kohya.safetensors"),
            (AdapterFormat::Peft, "adapter_dora_peft.safetensors"),
        ] {
            let path = out.path().join(format!("{cfg}_{format}.safetensors"));
            let options = SaveOptions {
                format,
                base_model: BaseModelVersion::SdV1,
                prediction: PredictionType::Epsilon,
                title: None,
                extra_metadata: Default::default(),
                lokr_factor: None,
            };
            save_adapter(&path, &kohya, &modules, &options)?;
            let ours = candle_core::safetensors::load(&path, &Device::Cpu)?;
            let theirs = candle_core::safetensors::load(dir.join(reference), &Device::Cpu)?;
            let names = |m: &std::collections::HashMap<String, candle_core::Tensor>| {
                m.keys().cloned().collect::<BTreeSet<_>>()
            };
            assert!(!theirs.is_empty(), "{cfg} {reference}: no tensor");
            assert_eq!(names(&ours), names(&theirs), "{cfg} {format}: keys");
            for (key, t) in &theirs {
                let o = &ours[key];
                assert_eq!(o.dims(), t.dims(), "{cfg} {format}: `{key}` shape");
                let diff = max_abs_diff(&o.to_dtype(DType::F32)?, &t.to_dtype(DType::F32)?);
                assert_eq!(diff, 0.0, "{cfg} {format}: `{key}` values");
            }
            let written = AdapterFile::read(&path, &Device::Cpu)?;
            let meta = written.metadata();
            match format {
                AdapterFormat::Kohya => {
                    assert_eq!(meta["ss_network_module"], "lycoris.kohya");
                    let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"])?;
                    assert_eq!(args["dora_wd"], "True", "{cfg}");
                }
                AdapterFormat::Peft => {
                    let config: serde_json::Value =
                        serde_json::from_str(&meta["lora_adapter_metadata"])?;
                    assert_eq!(config["unet.use_dora"], true, "{cfg}");
                }
            }
        }
    }
    Ok(())
}
