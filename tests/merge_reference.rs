//! `lora-merge` merges against the reference: diffusers `load_lora_weights` + `fuse_lora` on the
//! fixture models (tests/reference/make_merge_fixtures.py), for a diffusers folder with one and
//! with two weighted adapters, and for a single-file LDM checkpoint built from the same model.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::{fixtures, max_abs_diff, CONFIGS};
use lora_toolkit::core::formats::ldm::ModelPart;
use lora_toolkit::core::options::{AdapterSpec, Precision};
use lora_toolkit::merge::base_model::BaseModel;
use lora_toolkit::merge::{merge, MergeOptions};

/// f32 merges must match diffusers' fused weights this closely.
const TOLERANCE: f32 = 1e-5;

fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn spec(cfg: &str, file: &str, weight: f64) -> AdapterSpec {
    AdapterSpec {
        path: fixtures().join(cfg).join(file),
        scale: weight,
    }
}

fn options(base: PathBuf, adapters: Vec<AdapterSpec>, output: PathBuf) -> MergeOptions {
    MergeOptions {
        base,
        adapters,
        output,
        dtype: None,
        allow_unmatched: false,
        allow_nonfinite: false,
    }
}

/// The diffusers part and name of an expected key (`unet.<name>` / `text_encoder.<name>`).
fn split_expected(key: &str) -> (ModelPart, &str) {
    match key.split_once('.') {
        Some(("unet", name)) => (ModelPart::Unet, name),
        Some(("text_encoder", name)) => (ModelPart::TextEncoder, name),
        _ => panic!("unexpected fixture key `{key}`"),
    }
}

/// Largest difference between the merged checkpoint and diffusers' fused weights.
fn compare_with_reference(merged: &BaseModel, expected: &Path) -> Result<f32> {
    let expected_tensors = load(expected)?;
    assert!(
        !expected_tensors.is_empty(),
        "{} holds no tensors",
        expected.display()
    );
    let mut worst = 0f32;
    for (key, want) in expected_tensors {
        let (part, name) = split_expected(&key);
        let ours = merged.load_f32(part, name)?.reshape(want.dims())?;
        worst = worst.max(max_abs_diff(&ours, &want));
    }
    Ok(worst)
}

#[test]
fn one_adapter_into_a_diffusers_folder_matches_fuse_lora() -> Result<()> {
    for cfg in CONFIGS {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("merged");
        let report = merge(&options(
            fixtures().join(cfg),
            vec![spec(cfg, "adapter_kohya.safetensors", 0.8)],
            out.clone(),
        ))?;
        let expected = fixtures()
            .join(cfg)
            .join("merge/expected_kohya.safetensors");
        assert_eq!(report.tensors_changed, load(&expected)?.len(), "{cfg}");
        let err = compare_with_reference(&BaseModel::open(&out)?, &expected)?;
        println!("{cfg}: kohya adapter at 0.8, max |ours - fuse_lora| = {err:.2e}");
        assert!(err <= TOLERANCE, "{cfg}: {err}");

        for file in [
            "model_index.json",
            "unet/config.json",
            "text_encoder/config.json",
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json",
        ] {
            assert!(out.join(file).is_file(), "{cfg}: {file} missing");
        }
        assert_eq!(
            out.join("tokenizer/vocab.json").is_file(),
            fixtures().join(cfg).join("tokenizer").is_dir()
        );
        let metadata = safetensors_metadata(&out.join("unet/diffusion_pytorch_model.safetensors"))?;
        let adapters: serde_json::Value = serde_json::from_str(&metadata["lora_merge.adapters"])?;
        assert_eq!(adapters[0]["file"], "adapter_kohya.safetensors");
        assert_eq!(adapters[0]["weight"], 0.8);
        assert_eq!(adapters[0]["sha256"].as_str().unwrap().len(), 64);
    }
    Ok(())
}

#[test]
fn two_weighted_adapters_match_set_adapters_then_fuse() -> Result<()> {
    for cfg in CONFIGS {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("merged");
        merge(&options(
            fixtures().join(cfg),
            vec![
                spec(cfg, "adapter_two_a_peft.safetensors", 0.5),
                spec(cfg, "adapter_two_b_peft.safetensors", 0.7),
            ],
            out.clone(),
        ))?;
        let expected = fixtures().join(cfg).join("merge/expected_two.safetensors");
        let err = compare_with_reference(&BaseModel::open(&out)?, &expected)?;
        println!("{cfg}: two adapters at [0.5, 0.7], max |ours - fuse_lora| = {err:.2e}");
        assert!(err <= TOLERANCE, "{cfg}: {err}");
    }
    Ok(())
}

/// The single-file checkpoint was built by the fixture script and verified with diffusers'
/// `from_single_file`; it is stored in fp16.
fn ldm_fixture() -> PathBuf {
    fixtures().join("sd2-tiny/merge/model_ldm.safetensors")
}

#[test]
fn single_file_keys_map_to_the_diffusers_weights() -> Result<()> {
    let ldm = BaseModel::open(&ldm_fixture())?;
    let folder = fixtures().join("sd2-tiny");
    let mut compared = 0;
    for (part, file) in [
        (ModelPart::Unet, "unet/diffusion_pytorch_model.safetensors"),
        (ModelPart::Vae, "vae/diffusion_pytorch_model.safetensors"),
        (ModelPart::TextEncoder, "text_encoder/model.safetensors"),
    ] {
        for (name, want) in load(&folder.join(file))? {
            if name.ends_with("position_ids") {
                continue;
            }
            let want = want.to_dtype(DType::F16)?.to_dtype(DType::F32)?;
            let ours = ldm.load_f32(part, &name)?.reshape(want.dims())?;
            assert_eq!(max_abs_diff(&ours, &want), 0.0, "{part} {name}");
            compared += 1;
        }
    }
    println!("all {compared} diffusers tensors found in the single file, bit-exact");
    Ok(())
}

#[test]
fn single_file_merge_matches_fuse_lora_and_keeps_the_layout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("merged.safetensors");
    let mut opts = options(
        ldm_fixture(),
        vec![spec("sd2-tiny", "adapter_kohya.safetensors", 0.8)],
        out.clone(),
    );
    opts.dtype = Some(Precision::F32);
    merge(&opts)?;
    let expected = fixtures().join("sd2-tiny/merge/expected_ldm_kohya.safetensors");
    let merged = BaseModel::open(&out)?;
    let err = compare_with_reference(&merged, &expected)?;
    println!("sd2-tiny single file: max |ours - fuse_lora| = {err:.2e}");
    assert!(err <= TOLERANCE, "{err}");

    let input = load(&ldm_fixture())?;
    let output = load(&out)?;
    let mut keys: Vec<&String> = output.keys().collect();
    keys.sort();
    let mut input_keys: Vec<&String> = input.keys().collect();
    input_keys.sort();
    assert_eq!(keys, input_keys, "the output keeps the LDM keys");
    assert!(output.values().all(|t| t.dtype() == DType::F32));
    assert!(
        output.contains_key("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
    );
    Ok(())
}

#[test]
fn fp16_output_rounds_the_merged_weights() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("merged");
    let mut opts = options(
        fixtures().join("sd1-tiny"),
        vec![spec("sd1-tiny", "adapter_kohya.safetensors", 0.8)],
        out.clone(),
    );
    opts.dtype = Some(Precision::F16);
    merge(&opts)?;
    let unet = load(&out.join("unet/diffusion_pytorch_model.safetensors"))?;
    assert!(unet.values().all(|t| t.dtype() == DType::F16));
    let expected = fixtures().join("sd1-tiny/merge/expected_kohya.safetensors");
    let err = compare_with_reference(&BaseModel::open(&out)?, &expected)?;
    // fp16 keeps 11 significant bits; the fixture weights are below 1 in magnitude.
    assert!(err <= 1e-3, "{err}");
    Ok(())
}

fn safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    Ok(header.metadata().clone().unwrap_or_default())
}
