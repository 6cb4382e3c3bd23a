//! A single-file (LDM layout) checkpoint as `--base`, with its configs from `--base-config`:
//! `tests/fixtures/sd2-tiny/merge/model_ldm.safetensors` is sd2-tiny written by diffusers in
//! fp16 (OpenCLIP stacked q/k/v, VAE attention as 1×1 convs). Its components, loaded in f16,
//! must equal the folder's loaded in f16 (the same rounded values); in f32 they must match
//! diffusers' f32 outputs within what fp16 weights allow.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::{expected, fixtures, get, max_abs, max_abs_diff};
use lora_core::options::AdapterSpec;
use lora_core::source::{BaseChoices, ModelFolder, ModelSource, SingleFileSource};
use lora_infer::{GenerateOptions, Pipeline, SchedulerKind};
use lora_train::TrainArgs;

/// Relative error of fp16-rounded weights against the f32 reference.
const F16_WEIGHTS_TOLERANCE: f32 = 2e-2;

fn folder_dir() -> PathBuf {
    fixtures().join("sd2-tiny")
}

fn ldm_file() -> PathBuf {
    folder_dir().join("merge/model_ldm.safetensors")
}

fn single_file() -> Result<ModelFolder> {
    ModelSource::parse(ldm_file().to_str().unwrap())?
        .with_configs_from(Some(folder_dir()))?
        .open(&BaseChoices::default())
}

fn rel(a: &Tensor, b: &Tensor) -> f32 {
    max_abs_diff(a, b) / max_abs(b)
}

/// UNet, text encoder and VAE outputs of `model` in `dtype`, as f32.
fn outputs(model: &ModelFolder, dtype: DType) -> Result<[Tensor; 3]> {
    let exp = expected("sd2-tiny")?;
    let dev = Device::Cpu;
    let config = model.unet_config()?;
    let unet = model.load_unet(&config, dtype, &dev)?;
    let unet_out = unet.forward(
        &get(&exp, "sample").to_dtype(dtype)?,
        get(&exp, "timestep"),
        &get(&exp, "encoder_hidden_states").to_dtype(dtype)?,
    )?;
    let te_config = model.text_encoder_config()?;
    let te = model.load_text_encoder(&te_config, dtype, &dev, BTreeMap::new())?;
    let ids = get(&exp, "te_input_ids").to_dtype(DType::U32)?;
    let te_out = te.forward(&ids)?;
    let vae = model.load_vae(dtype, &dev)?.expect("sd2-tiny has a VAE");
    let decoded = vae.decode(&get(&exp, "vae_latents").to_dtype(dtype)?)?;
    Ok([unet_out, te_out, decoded].map(|t| t.to_dtype(DType::F32).unwrap()))
}

#[test]
fn components_from_the_single_file_equal_the_folders() -> Result<()> {
    let file = single_file()?;
    assert!(file.is_single_file() && file.has_vae());
    let folder = ModelFolder::open(&folder_dir())?;
    let names = ["unet_out", "te_out", "vae_decoded"];

    // f16: the file holds the folder's weights rounded to f16, which is what loading the folder
    // in f16 does, so the outputs must be the same.
    let ours = outputs(&file, DType::F16)?;
    let theirs = outputs(&folder, DType::F16)?;
    for (name, (a, b)) in names.iter().zip(ours.iter().zip(&theirs)) {
        let err = max_abs_diff(a, b);
        println!("f16 {name}: max |file - folder| = {err:.3e}");
        assert_eq!(
            err, 0.0,
            "{name}: single file differs from the folder in f16"
        );
    }

    // f32: against diffusers' f32 references, within fp16-weight rounding.
    let exp = expected("sd2-tiny")?;
    for (name, ours) in names.iter().zip(outputs(&file, DType::F32)?) {
        let err = rel(&ours, get(&exp, name));
        println!("f32 {name}: max |file - diffusers| / max |diffusers| = {err:.3e}");
        assert!(err < F16_WEIGHTS_TOLERANCE, "{name}: {err}");
    }
    Ok(())
}

fn options() -> Result<(GenerateOptions, Vec<AdapterSpec>)> {
    let infer = folder_dir().join("infer");
    let tensors = candle_core::safetensors::load(infer.join("pipeline.safetensors"), &Device::Cpu)?;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(infer.join("pipeline.json"))?)?;
    let options = GenerateOptions {
        prompt: meta["prompt"].as_str().unwrap().into(),
        negative_prompt: meta["negative_prompt"].as_str().unwrap().into(),
        steps: meta["steps"].as_u64().unwrap() as usize,
        guidance: meta["guidance"].as_f64().unwrap(),
        scheduler: SchedulerKind::Ddim,
        num_images: 1,
        init_latents: Some(get(&tensors, "init_latents").narrow(0, 0, 1)?),
        ..GenerateOptions::default()
    };
    // The kohya adapter has text-encoder modules: it exercises the f32 deltas of both parts.
    let kohya = AdapterSpec::new(folder_dir().join("adapter_kohya.safetensors"), 1.0);
    Ok((options, vec![kohya]))
}

#[test]
fn generation_from_the_single_file_equals_the_folders() -> Result<()> {
    let (options, kohya) = options()?;
    let file = single_file()?;
    let folder = ModelFolder::open(&folder_dir())?;
    // Without adapters f16 is exact. With them, deltas are added in f32 to the stored weights
    // (f16 in the file, f32 in the folder) before rounding to `dtype`: double rounding, which
    // 20 guided steps amplify to ~1e-2 of the latents' scale.
    for (dtype, adapters, fuse, tolerance) in [
        (DType::F16, &[][..], false, 0.0),
        (DType::F16, &kohya[..], false, 2e-2),
        (DType::F16, &kohya[..], true, 2e-2),
        (DType::F32, &kohya[..], true, 2e-2),
    ] {
        let run = |model: &ModelFolder| -> Result<Tensor> {
            let pipeline = Pipeline::load(model, adapters, &Device::Cpu, dtype, fuse)?;
            Ok(pipeline.generate(&options)?.latents)
        };
        let (a, b) = (run(&file)?, run(&folder)?);
        let err = rel(&a, &b);
        let n = adapters.len();
        println!("{dtype:?} adapters={n} fuse={fuse}: max |Δ latents| / max |latents| = {err:.3e}");
        assert!(
            err <= tolerance,
            "{dtype:?} adapters={n} fuse={fuse}: latents differ by {err}"
        );
    }
    Ok(())
}

#[test]
fn training_runs_on_the_single_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = TrainArgs {
        base: Some(ldm_file().display().to_string()),
        base_config: Some(folder_dir()),
        data: Some(fixtures().join("train-data")),
        output: Some(dir.path().join("adapter.safetensors")),
        resolution: Some(32),
        lr: Some(1e-2),
        steps: Some(2),
        ..Default::default()
    }
    .resolve()?;
    let out = config.output.clone();
    let summary = lora_train::train(config, &mut |_| {}, &mut |_| {})?;
    println!(
        "2 steps: losses {:?} → {:?}",
        summary.first_loss, summary.last_loss
    );
    assert_eq!(summary.final_step, 2);
    assert!(summary.last_loss.is_some_and(f64::is_finite));
    assert!(out.is_file());
    Ok(())
}

#[test]
fn bad_single_files_fail_clearly() -> Result<()> {
    // An adapter is a safetensors file but no checkpoint.
    let adapter = folder_dir().join("adapter_kohya.safetensors");
    let err = format!(
        "{:#}",
        ModelSource::parse(adapter.to_str().unwrap())?
            .with_configs_from(Some(folder_dir()))?
            .open(&BaseChoices::default())
            .unwrap_err()
    );
    assert!(
        err.contains("adapter_kohya.safetensors")
            && err.contains("not a single-file Stable Diffusion checkpoint"),
        "{err}"
    );

    // A checkpoint of a UNet no built-in config fits says what differs and which flag gives
    // configs.
    let err = format!(
        "{:#}",
        ModelSource::parse(ldm_file().to_str().unwrap())?
            .open(&BaseChoices::default())
            .unwrap_err()
    );
    assert!(
        err.contains("--base-config") && err.contains("SD 1.x/2.x have 320"),
        "{err}"
    );

    // A config folder without the configs names the missing file.
    let empty = tempfile::tempdir()?;
    let err = format!(
        "{:#}",
        ModelFolder::open_single_file(
            &SingleFileSource {
                file: &ldm_file(),
                configs_from: Some(empty.path()),
                yaml: None,
            },
            &BaseChoices::default()
        )
        .unwrap_err()
    );
    assert!(err.contains("is missing unet/config.json"), "{err}");
    Ok(())
}

/// The same checkpoint as an A1111-style `.ckpt` (tests/reference/make_pickle_fixtures.py:
/// torch.save's archive layout, the weights under `state_dict` beside other entries) is refused
/// as `--base` unless pickles are allowed, and its tensors read bit for bit as the safetensors
/// file's, in their stored f16.
#[test]
fn a_pickle_checkpoint_is_refused_or_read_like_its_safetensors() -> Result<()> {
    let ckpt = fixtures().join("pickle/model_ldm.ckpt");
    let err = format!(
        "{:#}",
        ModelSource::parse(ckpt.to_str().unwrap())?
            .reading_pickle(false)
            .unwrap_err()
    );
    assert!(
        err.contains("model_ldm.ckpt") && err.contains("--allow-pickle"),
        "{err}"
    );

    let from_pickle = lora_core::io::pickle::read_tensors(&ckpt)?;
    let from_safetensors = lora_core::io::read_safetensors(&ldm_file(), &Device::Cpu)?.tensors;
    assert_eq!(
        from_pickle.keys().collect::<Vec<_>>(),
        from_safetensors.keys().collect::<Vec<_>>()
    );
    assert!(!from_pickle.is_empty());
    for (name, tensor) in &from_pickle {
        let reference = &from_safetensors[name];
        assert_eq!(tensor.dtype(), DType::F16, "{name}");
        assert_eq!(tensor.dims(), reference.dims(), "{name}");
        // f16 → f32 is exact, so equal f32 bits mean equal stored bits.
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        assert_eq!(bits(tensor)?, bits(reference)?, "{name}");
    }
    Ok(())
}

/// A single file that holds an EMA copy of its UNet beside the plain weights, as
/// `v1-5-pruned.safetensors` does (`model_ema.` + the key without `model.` and its dots): the EMA
/// copy is the model unless `--no-ema`; lora-merge merges an adapter into both copies of a
/// single-file output and converts the chosen copy to a diffusers folder.
#[test]
fn an_ema_copy_is_the_model_unless_no_ema() -> Result<()> {
    use lora_core::formats::checkpoint_kind::ema_key;
    use lora_merge::{merge_converting, Conversion, MergeOptions, OutputLayout};
    let dev = Device::Cpu;
    let dir = tempfile::tempdir()?;
    let original = candle_core::safetensors::load(ldm_file(), &dev)?;
    let mut with_ema = std::collections::HashMap::new();
    for (key, t) in &original {
        if let Some(ema) = ema_key(key) {
            // The EMA copy holds the real weights; the plain ones are something else.
            with_ema.insert(ema, t.clone());
            with_ema.insert(key.clone(), (t * 0.5)?);
        } else {
            with_ema.insert(key.clone(), t.clone());
        }
    }
    let path = dir.path().join("with_ema.safetensors");
    candle_core::safetensors::save(&with_ema, &path)?;

    let open = |no_ema| {
        ModelSource::parse(path.to_str().unwrap())?
            .with_configs_from(Some(folder_dir()))?
            .open(&BaseChoices {
                prediction: None,
                no_ema,
            })
    };
    let exp = expected("sd2-tiny")?;
    let unet_out = |model: &ModelFolder| -> Result<Tensor> {
        let unet = model.load_unet(&model.unet_config()?, DType::F32, &dev)?;
        unet.forward(
            get(&exp, "sample"),
            get(&exp, "timestep"),
            get(&exp, "encoder_hidden_states"),
        )
    };
    let reference = unet_out(&single_file()?)?;
    let ema_model = open(false)?;
    assert!(
        ema_model.describe().contains("EMA weights"),
        "{}",
        ema_model.describe()
    );
    assert_eq!(max_abs_diff(&unet_out(&ema_model)?, &reference), 0.0);
    let plain_model = open(true)?;
    assert!(!plain_model.describe().contains("EMA"));
    assert!(max_abs_diff(&unet_out(&plain_model)?, &reference) > 1e-3);

    // Merged into a single file: every UNet weight the adapter changes changes in both copies.
    let kohya = AdapterSpec::new(folder_dir().join("adapter_kohya.safetensors"), 1.0);
    let merged_path = dir.path().join("merged.safetensors");
    let options = |output: PathBuf| MergeOptions {
        base: path.clone(),
        adapters: vec![kohya.clone()],
        output,
        dtype: None,
        allow_unmatched: false,
        allow_nonfinite: false,
    };
    merge_converting(&options(merged_path.clone()), None)?;
    let merged = candle_core::safetensors::load(&merged_path, &dev)?;
    let changed = |key: &str| -> Result<bool> {
        Ok(max_abs_diff(
            &merged[key].to_dtype(DType::F32)?,
            &with_ema[key].to_dtype(DType::F32)?,
        ) > 0.0)
    };
    let mut both = 0;
    for key in original
        .keys()
        .filter(|k| k.starts_with("model.diffusion_model."))
    {
        let ema = ema_key(key).unwrap();
        assert_eq!(changed(key)?, changed(&ema)?, "{key} vs {ema}");
        both += usize::from(changed(key)?);
    }
    assert!(both > 0, "the adapter changed no UNet weight");

    // Converted to a diffusers folder: the chosen copy is the folder's UNet.
    for (no_ema, scale) in [(false, 1.0), (true, 0.5)] {
        let output = dir.path().join(format!("folder-{no_ema}"));
        let conversion = Conversion {
            to: OutputLayout::Diffusers,
            config_from: Some(folder_dir()),
            no_ema,
        };
        let mut opts = options(output.clone());
        opts.adapters.clear();
        merge_converting(&opts, Some(&conversion))?;
        let unet = candle_core::safetensors::load(
            output.join("unet/diffusion_pytorch_model.safetensors"),
            &dev,
        )?;
        let expected = (original["model.diffusion_model.input_blocks.0.0.weight"]
            .to_dtype(DType::F32)?
            * scale)?;
        let err = max_abs_diff(&unet["conv_in.weight"].to_dtype(DType::F32)?, &expected);
        assert!(err <= 1e-3, "--no-ema {no_ema}: conv_in differs by {err}");
    }
    Ok(())
}
