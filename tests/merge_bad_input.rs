//! `lora-merge` on bad input: corrupt files, adapters for another model, unknown layouts, and
//! outputs that would overwrite the input. Every failure leaves no output behind.

mod common;

use std::path::{Path, PathBuf};

use anyhow::Result;
use common::fixtures;
use lora_toolkit::core::options::AdapterSpec;
use lora_toolkit::merge::{inspect, merge, resize, MergeOptions};

fn options(base: PathBuf, adapter: PathBuf, output: PathBuf) -> MergeOptions {
    MergeOptions {
        base,
        adapters: vec![AdapterSpec {
            path: adapter,
            scale: 1.0,
        }],
        output,
        dtype: None,
        allow_unmatched: false,
        allow_nonfinite: false,
    }
}

fn merge_error(options: &MergeOptions) -> String {
    let err = merge(options).expect_err("the merge must fail");
    assert!(
        !options.output.exists(),
        "a failed merge left {}",
        options.output.display()
    );
    format!("{err:#}")
}

fn empty_dir(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

fn sd1() -> PathBuf {
    fixtures().join("sd1-tiny")
}

#[test]
fn corrupt_adapter_and_checkpoint_files_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bytes = std::fs::read(sd1().join("adapter_kohya.safetensors"))?;
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
    let msg = merge_error(&options(sd1(), truncated.clone(), dir.path().join("out")));
    assert!(
        msg.contains("truncated.safetensors") && msg.contains("not a valid safetensors"),
        "{msg}"
    );

    let ldm = std::fs::read(fixtures().join("sd2-tiny/merge/model_ldm.safetensors"))?;
    let broken = dir.path().join("broken_ldm.safetensors");
    std::fs::write(&broken, &ldm[..ldm.len() - 100])?;
    let adapter = fixtures().join("sd2-tiny/adapter_kohya.safetensors");
    let out = dir.path().join("out.safetensors");
    let msg = merge_error(&options(broken, adapter, out));
    assert!(
        msg.contains("broken_ldm.safetensors") && msg.contains("not a valid safetensors"),
        "{msg}"
    );
    assert!(inspect(&truncated).is_err());
    Ok(())
}

#[test]
fn adapter_for_another_model_lists_what_does_not_fit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out");
    // sd2-tiny's adapter: more layers per block (unmatched names) and other widths.
    let msg = merge_error(&options(
        sd1(),
        fixtures().join("sd2-tiny/adapter_kohya.safetensors"),
        out.clone(),
    ));
    assert!(
        msg.contains("adapter modules do not fit the model"),
        "{msg}"
    );
    assert!(msg.contains("no UNet module has this name"), "{msg}");
    assert!(
        msg.contains("do not fit the module (expected down [r, "),
        "{msg}"
    );
    assert!(msg.contains("--allow-unmatched"), "{msg}");

    // Shape mismatches stay errors with --allow-unmatched.
    let mut lenient = options(
        sd1(),
        fixtures().join("sd2-tiny/adapter_kohya.safetensors"),
        out,
    );
    lenient.allow_unmatched = true;
    let msg = merge_error(&lenient);
    assert!(
        msg.contains("do not fit the module") && !msg.contains("has this name"),
        "{msg}"
    );
    assert!(empty_dir(dir.path()));
    Ok(())
}

#[test]
fn allow_unmatched_skips_modules_with_unknown_names() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let adapter = dir.path().join("extra.safetensors");
    let mut tensors = candle_core::safetensors::load(
        sd1().join("adapter_kohya.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let down = tensors["lora_unet_mid_block_attentions_0_proj_out.lora_down.weight"].clone();
    let up = tensors["lora_unet_mid_block_attentions_0_proj_out.lora_up.weight"].clone();
    tensors.insert(
        "lora_unet_mid_block_attentions_7_proj_out.lora_down.weight".into(),
        down,
    );
    tensors.insert(
        "lora_unet_mid_block_attentions_7_proj_out.lora_up.weight".into(),
        up,
    );
    candle_core::safetensors::save(&tensors, &adapter)?;

    let out = dir.path().join("out");
    let msg = merge_error(&options(sd1(), adapter.clone(), out.clone()));
    assert!(
        msg.contains("lora_unet_mid_block_attentions_7_proj_out.lora_down.weight"),
        "{msg}"
    );

    let mut lenient = options(sd1(), adapter, out.clone());
    lenient.allow_unmatched = true;
    let report = merge(&lenient)?;
    assert_eq!(report.unmatched.len(), 1);
    assert!(report.unmatched[0].contains("attentions_7"));
    assert_eq!(report.merged_modules[0].1, 96);
    assert!(out
        .join("unet/diffusion_pytorch_model.safetensors")
        .is_file());
    Ok(())
}

#[test]
fn unknown_layouts_are_rejected() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let adapter = sd1().join("adapter_kohya.safetensors");
    // A safetensors file that is no Stable Diffusion checkpoint (here: an adapter).
    let msg = merge_error(&options(
        adapter.clone(),
        adapter.clone(),
        dir.path().join("o.safetensors"),
    ));
    assert!(
        msg.contains("unknown checkpoint layout") && msg.contains("not a single-file"),
        "{msg}"
    );
    // A folder without the diffusers sub-folders.
    let msg = merge_error(&options(
        dir.path().to_path_buf(),
        adapter.clone(),
        dir.path().join("o"),
    ));
    assert!(
        msg.contains("unknown model layout: no unet/ folder"),
        "{msg}"
    );
    // A model file as the adapter.
    let msg = merge_error(&options(
        sd1(),
        sd1().join("unet/diffusion_pytorch_model.safetensors"),
        dir.path().join("o"),
    ));
    assert!(msg.contains("not a LoRA adapter"), "{msg}");
    Ok(())
}

#[test]
fn the_input_is_never_the_output() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ldm = dir.path().join("model.safetensors");
    std::fs::copy(
        fixtures().join("sd2-tiny/merge/model_ldm.safetensors"),
        &ldm,
    )?;
    let before = std::fs::read(&ldm)?;
    let adapter = fixtures().join("sd2-tiny/adapter_kohya.safetensors");
    let err = merge(&options(ldm.clone(), adapter.clone(), ldm.clone())).unwrap_err();
    assert!(
        err.to_string().contains("is --base") && err.to_string().contains("never overwritten"),
        "{err}"
    );
    assert_eq!(std::fs::read(&ldm)?, before);

    let existing = dir.path().join("existing");
    std::fs::create_dir(&existing)?;
    let err = merge(&options(fixtures().join("sd2-tiny"), adapter, existing)).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    Ok(())
}

#[test]
fn resize_rejects_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = sd1().join("adapter_kohya.safetensors");
    let out = dir.path().join("r.safetensors");
    let err = resize(&adapter, None, None, &out).unwrap_err();
    assert!(err.to_string().contains("needs --rank, --dynamic"), "{err}");
    let err = resize(&adapter, Some(0), None, &out).unwrap_err();
    assert!(err.to_string().contains("at least 1"), "{err}");
    assert!(!out.exists());
}

/// Merging into a half-precision output refuses a value beyond the dtype's range (here an adapter
/// at an absurd scale) instead of writing an infinity, and names the tensor; an adapter that
/// holds a NaN is refused when it is read, naming its key. No output is left either time.
#[test]
fn non_finite_values_are_never_written() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let adapter = sd1().join("adapter_kohya.safetensors");
    let mut overflow = options(sd1(), adapter.clone(), dir.path().join("out"));
    overflow.adapters[0].scale = 1e9;
    overflow.dtype = Some(lora_toolkit::core::options::Precision::F16);
    let msg = merge_error(&overflow);
    assert!(
        msg.contains("merging overflows F16") && msg.contains("--dtype f32"),
        "{msg}"
    );

    let mut tensors = candle_core::safetensors::load(&adapter, &candle_core::Device::Cpu)?;
    let key = tensors
        .keys()
        .find(|k| k.ends_with(".lora_up.weight"))
        .cloned()
        .expect("the fixture has up tensors");
    let up = &tensors[&key];
    let mut values = up
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()?;
    values[0] = f32::NAN;
    let poisoned = candle_core::Tensor::from_vec(values, up.shape(), up.device())?;
    tensors.insert(key.clone(), poisoned);
    let nan_adapter = dir.path().join("nan.safetensors");
    candle_core::safetensors::save(&tensors, &nan_adapter)?;
    let msg = merge_error(&options(
        sd1(),
        nan_adapter.clone(),
        dir.path().join("out2"),
    ));
    assert!(
        msg.contains(&key)
            && msg.contains("non-finite value (NaN)")
            && msg.contains("--allow-nonfinite"),
        "{msg}"
    );

    // --allow-nonfinite: the merge goes through, says which tensor it let in, and writes the NaN
    // where that adapter lands.
    let mut allowed = options(sd1(), nan_adapter, dir.path().join("out3"));
    allowed.allow_nonfinite = true;
    let report = merge(&allowed)?;
    assert!(
        report.non_finite.len() == 1 && report.non_finite[0].contains(&key),
        "{:?}",
        report.non_finite
    );
    let mut non_finite = 0;
    for part in [
        "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ] {
        let merged =
            candle_core::safetensors::load(allowed.output.join(part), &candle_core::Device::Cpu)?;
        for tensor in merged.values() {
            let values = tensor
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?;
            non_finite += values.iter().filter(|v| !v.is_finite()).count();
        }
    }
    assert!(non_finite > 0, "the allowed NaN never reached the output");
    Ok(())
}
