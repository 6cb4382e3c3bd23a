//! `lora-merge --to diffusers|single-file`: layout conversion with or without adapters.
//! References: the sd2-tiny single file built by tests/reference/make_merge_fixtures.py and
//! verified with diffusers' `from_single_file` (fp16), and the fuse_lora fixtures.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{Device, Tensor};
use common::{fixtures, max_abs_diff, CONFIGS};
use lora_toolkit::core::formats::ldm::ModelPart;
use lora_toolkit::core::options::{AdapterSpec, Precision};
use lora_toolkit::merge::base_model::BaseModel;
use lora_toolkit::merge::{merge_converting, Conversion, MergeOptions, OutputLayout};

const TOLERANCE: f32 = 1e-5;

const PART_FILES: [&str; 3] = [
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
];

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

fn to(layout: OutputLayout, config_from: Option<PathBuf>) -> Conversion {
    Conversion {
        to: layout,
        config_from,
        no_ema: false,
    }
}

/// A stored tensor: dtype, shape and raw bytes.
type Stored = (safetensors::Dtype, Vec<usize>, Vec<u8>);

/// Every tensor of a safetensors file.
fn raw(path: &Path) -> Result<HashMap<String, Stored>> {
    let bytes = std::fs::read(path)?;
    let file = safetensors::SafeTensors::deserialize(&bytes)?;
    Ok(file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
            )
        })
        .collect())
}

fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

#[test]
fn folder_to_single_file_equals_the_reference_single_file() -> Result<()> {
    // The fixture single file is fp16; converting the f32 folder with --dtype fp16 must give the
    // same keys, shapes and bytes.
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("model.safetensors");
    let mut opts = options(fixtures().join("sd2-tiny"), vec![], out.clone());
    opts.dtype = Some(Precision::F16);
    merge_converting(&opts, Some(&to(OutputLayout::SingleFile, None)))?;
    let ours = raw(&out)?;
    let reference = raw(&fixtures().join("sd2-tiny/merge/model_ldm.safetensors"))?;
    let mut ours_keys: Vec<&String> = ours.keys().collect();
    let mut ref_keys: Vec<&String> = reference.keys().collect();
    ours_keys.sort();
    ref_keys.sort();
    assert_eq!(ours_keys, ref_keys);
    for (key, want) in &reference {
        assert!(ours[key] == *want, "`{key}` differs");
    }
    println!(
        "sd2-tiny folder → single file: all {} tensors bit-identical to the reference",
        reference.len()
    );
    Ok(())
}

#[test]
fn folder_to_single_file_to_folder_is_bit_exact() -> Result<()> {
    for cfg in CONFIGS {
        let dir = tempfile::tempdir()?;
        let single = dir.path().join("model.safetensors");
        let back = dir.path().join("back");
        let folder = fixtures().join(cfg);
        merge_converting(
            &options(folder.clone(), vec![], single.clone()),
            Some(&to(OutputLayout::SingleFile, None)),
        )?;
        merge_converting(
            &options(single.clone(), vec![], back.clone()),
            Some(&to(OutputLayout::Diffusers, Some(folder.clone()))),
        )?;
        let mut n = 0;
        for file in PART_FILES {
            let want = raw(&folder.join(file))?;
            let got = raw(&back.join(file))?;
            let mut a: Vec<&String> = want.keys().collect();
            let mut b: Vec<&String> = got.keys().collect();
            a.sort();
            b.sort();
            assert_eq!(a, b, "{cfg} {file}");
            for (key, t) in &want {
                assert!(got[key] == *t, "{cfg} {file}: `{key}` differs");
                n += 1;
            }
        }
        for file in [
            "model_index.json",
            "unet/config.json",
            "vae/config.json",
            "text_encoder/config.json",
            "scheduler/scheduler_config.json",
        ] {
            assert!(back.join(file).is_file(), "{cfg}: {file}");
        }
        // The folder written back opens as a model again.
        BaseModel::open(&back)?;
        println!("{cfg}: folder → single file → folder, {n} tensors bit-exact");
    }
    Ok(())
}

#[test]
fn merging_while_converting_matches_fuse_lora() -> Result<()> {
    // Diffusers folder base, single-file output.
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("merged.safetensors");
    let adapter = AdapterSpec {
        path: fixtures().join("sd1-tiny/adapter_kohya.safetensors"),
        scale: 0.8,
    };
    let report = merge_converting(
        &options(fixtures().join("sd1-tiny"), vec![adapter], out.clone()),
        Some(&to(OutputLayout::SingleFile, None)),
    )?;
    let expected = load(&fixtures().join("sd1-tiny/merge/expected_kohya.safetensors"))?;
    assert_eq!(report.tensors_changed, expected.len());
    let merged = BaseModel::open(&out)?;
    let err = worst(&merged, &expected)?;
    println!("sd1-tiny folder → single file with kohya at 0.8: max |ours - fuse_lora| = {err:.2e}");
    assert!(err <= TOLERANCE, "{err}");

    // Single-file base (SD2, stacked q/k/v), diffusers output.
    let back = dir.path().join("folder");
    let adapter = AdapterSpec {
        path: fixtures().join("sd2-tiny/adapter_kohya.safetensors"),
        scale: 0.8,
    };
    let mut opts = options(
        fixtures().join("sd2-tiny/merge/model_ldm.safetensors"),
        vec![adapter],
        back.clone(),
    );
    opts.dtype = Some(Precision::F32);
    merge_converting(
        &opts,
        Some(&to(
            OutputLayout::Diffusers,
            Some(fixtures().join("sd2-tiny")),
        )),
    )?;
    let expected = load(&fixtures().join("sd2-tiny/merge/expected_ldm_kohya.safetensors"))?;
    let err = worst(&BaseModel::open(&back)?, &expected)?;
    println!("sd2-tiny single file → folder with kohya at 0.8: max |ours - fuse_lora| = {err:.2e}");
    assert!(err <= TOLERANCE, "{err}");
    Ok(())
}

fn worst(merged: &BaseModel, expected: &HashMap<String, Tensor>) -> Result<f32> {
    assert!(!expected.is_empty(), "no expected tensors to compare");
    let mut worst = 0f32;
    for (key, want) in expected {
        let (part, name) = match key.split_once('.') {
            Some(("unet", name)) => (ModelPart::Unet, name),
            Some(("text_encoder", name)) => (ModelPart::TextEncoder, name),
            _ => panic!("unexpected fixture key `{key}`"),
        };
        let ours = merged.load_f32(part, name)?.reshape(want.dims())?;
        worst = worst.max(max_abs_diff(&ours, want));
    }
    Ok(worst)
}

#[test]
fn single_file_to_diffusers_needs_config_from() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("folder");
    let err = merge_converting(
        &options(
            fixtures().join("sd2-tiny/merge/model_ldm.safetensors"),
            vec![],
            out.clone(),
        ),
        Some(&to(OutputLayout::Diffusers, None)),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    // The tiny UNet is no built-in architecture, and the message says why.
    assert!(
        msg.contains("--config-from") && msg.contains("SD 1.x/2.x have 320"),
        "{msg}"
    );
    assert!(!out.exists());
    // Without --to, an adapter is still required.
    let err =
        lora_toolkit::merge::merge(&options(fixtures().join("sd1-tiny"), vec![], out)).unwrap_err();
    assert!(format!("{err:#}").contains("no adapter given"));
    Ok(())
}
