//! Real-size SD 1.5, SD 2.1 (768, v-prediction) and SDXL base checkpoints with random weights, as
//! folders and as single files with no configs beside them: recognised, and reproducing
//! diffusers' outputs.
//! The weights are GBs, so these run outside CI (`#[ignore]`), on the folder
//! `tests/reference/check_full_size.py` fills (its docstring has the commands):
//!
//! ```sh
//! LORA_FULL_SIZE_DIR=/path/to/out cargo test --release --test full_size -- --ignored --nocapture
//! ```
//!
//! CI checks the recognition on the same files' headers (`checkpoint_detection.rs`).

mod common;

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use common::{get, max_abs, max_abs_diff};
use lora_core::models::config::PredictionType;
use lora_core::models::sdxl_prompt::SdxlTextEncoders;
use lora_core::source::{BaseChoices, ModelFolder, ModelSource};
use lora_core::AddedConditioning;
use lora_infer::{GenerateOptions, Pipeline, SchedulerKind};

/// Relative tolerances (max |ours − diffusers| / max |diffusers|): the issue's bounds.
const FORWARD_TOLERANCE: f32 = 1e-4;
const LATENTS_TOLERANCE: f32 = 1e-3;

fn out_dir() -> Result<PathBuf> {
    std::env::var_os("LORA_FULL_SIZE_DIR")
        .map(PathBuf::from)
        .context("set LORA_FULL_SIZE_DIR to the folder check_full_size.py filled")
}

fn rel(ours: &Tensor, theirs: &Tensor) -> f32 {
    max_abs_diff(ours, theirs) / max_abs(theirs)
}

fn peak_rss_mib() -> f64 {
    lora_train::metrics::peak_rss_bytes().map_or(f64::NAN, |b| b as f64 / (1 << 20) as f64)
}

/// Every output diffusers recorded, from `model` in f32.
fn check_outputs(model: &ModelFolder, name: &str) -> Result<()> {
    let dir = out_dir()?;
    let exp = candle_core::safetensors::load(
        dir.join(format!("{name}-expected.safetensors")),
        &Device::Cpu,
    )?;
    let dev = Device::Cpu;
    let started = std::time::Instant::now();
    let te = model.load_text_encoder(
        &model.text_encoder_config()?,
        DType::F32,
        &dev,
        Default::default(),
    )?;
    let unet = model.load_unet(&model.unet_config()?, DType::F32, &dev)?;
    let vae = model.load_vae(DType::F32, &dev)?.context("a VAE")?;
    println!(
        "{name}: loaded in {:.1} s, peak RSS {:.0} MiB",
        started.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
    let hidden = te.forward(&get(&exp, "token_ids").to_dtype(DType::U32)?)?;
    let text_err = rel(&hidden, get(&exp, "text_hidden"));
    let unet_out = unet.forward(
        get(&exp, "unet_latents"),
        &get(&exp, "unet_timestep").to_dtype(DType::F32)?,
        get(&exp, "text_hidden"),
    )?;
    let unet_err = rel(&unet_out, get(&exp, "unet_out"));
    // The script decodes its latents as a pipeline does: divided by the scaling factor first.
    let scaling = model.vae_config()?.context("a VAE")?.scaling_factor;
    let decoded = vae.decode(&(get(&exp, "vae_latents") / scaling)?)?;
    let vae_err = rel(&decoded, get(&exp, "vae_decoded"));
    println!("{name}: text encoder {text_err:.2e}, UNet {unet_err:.2e}, VAE decode {vae_err:.2e}");
    for (what, err) in [
        ("text encoder", text_err),
        ("UNet", unet_err),
        ("VAE", vae_err),
    ] {
        assert!(err <= FORWARD_TOLERANCE, "{name} {what}: {err}");
    }
    drop((te, unet, vae));

    let pipeline = Pipeline::load(model, &[], &dev, DType::F32, false)?;
    let options = GenerateOptions {
        prompt: "a photograph of an astronaut riding a horse".into(),
        negative_prompt: String::new(),
        steps: 2,
        guidance: 7.5,
        scheduler: SchedulerKind::Ddim,
        num_images: 1,
        init_latents: Some(get(&exp, "ddim_init").clone()),
        ..GenerateOptions::default()
    };
    let latents = pipeline.generate(&options)?.latents;
    let ddim_err = rel(&latents, get(&exp, "ddim_final"));
    println!("{name}: 2 DDIM steps with CFG {ddim_err:.2e}");
    assert!(ddim_err <= LATENTS_TOLERANCE, "{name} DDIM: {ddim_err}");
    Ok(())
}

fn open(path: PathBuf) -> Result<ModelFolder> {
    let model =
        ModelSource::parse(path.to_str().context("UTF-8 path")?)?.open(&BaseChoices::default())?;
    println!("{}", model.describe());
    Ok(model)
}

#[test]
#[ignore = "needs GBs of weights made by tests/reference/check_full_size.py"]
fn sd15_single_file_and_folder_reproduce_diffusers() -> Result<()> {
    let dir = out_dir()?;
    let file = open(dir.join("sd15.safetensors"))?;
    let unet = file.unet_config()?;
    assert_eq!(unet.cross_attention_dim, 768);
    assert_eq!(
        file.scheduler_config()?.prediction_type,
        PredictionType::Epsilon
    );
    check_outputs(&file, "sd15")?;
    check_outputs(&open(dir.join("sd15"))?, "sd15")
}

#[test]
#[ignore = "needs GBs of weights made by tests/reference/check_full_size.py"]
fn sd21_single_file_and_folder_reproduce_diffusers() -> Result<()> {
    let dir = out_dir()?;
    let file = open(dir.join("sd21.safetensors"))?;
    let unet = file.unet_config()?;
    assert_eq!(unet.cross_attention_dim, 1024);
    assert_eq!(unet.sample_size, Some(96), "the 768×768 model");
    assert_eq!(
        file.scheduler_config()?.prediction_type,
        PredictionType::VPrediction
    );
    check_outputs(&file, "sd21")?;
    check_outputs(&open(dir.join("sd21"))?, "sd21")
}

/// Full-size SDXL base 1.0 (random weights, `tests/reference/check_full_size_sdxl.py`), as its
/// diffusers folder and as the single file lora-merge wrote from it, which diffusers'
/// `from_single_file` read back tensor for tensor; the single file is opened with no configs (the
/// built-in SDXL ones).
#[test]
#[ignore = "needs GBs of weights made by tests/reference/check_full_size_sdxl.py"]
fn sdxl_single_file_and_folder_reproduce_diffusers() -> Result<()> {
    let dir = out_dir()?;
    let file = open(dir.join("sdxl.safetensors"))?;
    assert!(file.is_single_file());
    check_sdxl(&file)?;
    check_sdxl(&open(dir.join("sdxl"))?)
}

/// Both text encoders' prompt encoding, the UNet with its added conditioning, the VAE, and 2
/// Euler steps with guidance 5, against diffusers in f32.
fn check_sdxl(model: &ModelFolder) -> Result<()> {
    let dir = out_dir()?;
    assert!(model.is_sdxl());
    let exp = candle_core::safetensors::load(dir.join("sdxl-expected.safetensors"), &Device::Cpu)?;
    let dev = Device::Cpu;
    let prompt = "a photograph of an astronaut riding a horse";
    {
        let started = std::time::Instant::now();
        let (te_config, te2_config) =
            (model.text_encoder_config()?, model.text_encoder_2_config()?);
        let encoders = SdxlTextEncoders::new(
            model.load_text_encoder(&te_config, DType::F32, &dev, Default::default())?,
            model.load_text_encoder_2(&te2_config, DType::F32, &dev, Default::default())?,
            model.tokenizer()?,
            model.tokenizer_2()?,
        )?;
        let embeddings = encoders.encode(&[prompt], &dev)?;
        let context_err = rel(&embeddings.context, get(&exp, "prompt_embeds"));
        let pooled_err = rel(&embeddings.pooled, get(&exp, "pooled_prompt_embeds"));
        drop(encoders);
        let unet = model.load_unet(&model.unet_config()?, DType::F32, &dev)?;
        println!(
            "sdxl: loaded in {:.1} s, peak RSS {:.0} MiB",
            started.elapsed().as_secs_f64(),
            peak_rss_mib()
        );
        let added = AddedConditioning {
            text_embeds: get(&exp, "pooled_prompt_embeds").clone(),
            time_ids: get(&exp, "unet_time_ids").clone(),
        };
        let unet_out = unet.forward_conditioned(
            get(&exp, "unet_latents"),
            &Tensor::new(&[500f32], &dev)?,
            get(&exp, "prompt_embeds"),
            Some(&added),
        )?;
        let unet_err = rel(&unet_out, get(&exp, "unet_out"));
        drop(unet);
        let vae = model.load_vae(DType::F32, &dev)?.context("a VAE")?;
        let decoded = vae.decode(&(get(&exp, "vae_latents") / vae.scaling_factor())?)?;
        let vae_err = rel(&decoded, get(&exp, "vae_decoded"));
        println!(
            "sdxl: prompt embeddings {context_err:.2e}, pooled {pooled_err:.2e}, UNet \
             {unet_err:.2e}, VAE decode {vae_err:.2e}"
        );
        for (what, err) in [
            ("prompt embeddings", context_err),
            ("pooled embedding", pooled_err),
            ("UNet", unet_err),
            ("VAE", vae_err),
        ] {
            assert!(err <= FORWARD_TOLERANCE, "sdxl {what}: {err}");
        }
    }
    let pipeline = Pipeline::load(model, &[], &dev, DType::F32, false)?;
    let options = GenerateOptions {
        prompt: prompt.into(),
        steps: 2,
        guidance: 5.0,
        scheduler: SchedulerKind::Euler,
        width: Some(256),
        height: Some(256),
        num_images: 1,
        init_latents: Some(get(&exp, "euler_init").clone()),
        ..GenerateOptions::default()
    };
    let latents = pipeline.generate(&options)?.latents;
    let euler_err = rel(&latents, get(&exp, "euler_final"));
    println!("sdxl: 2 Euler steps with CFG {euler_err:.2e}");
    assert!(euler_err <= LATENTS_TOLERANCE, "sdxl Euler: {euler_err}");
    Ok(())
}
