//! Tokenizer, CLIP text encoder and VAE parity with transformers/diffusers (f32) on the tiny
//! fixtures, and the errors for broken model folders, configs and unreachable Hub ids.

mod common;

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use common::{expected, fixtures, get, max_abs, max_abs_diff, CONFIGS};
use lora_toolkit::core::models::config::SchedulerConfig;
use lora_toolkit::core::models::text_encoder::lora_modules;
use lora_toolkit::core::models::tokenizer::TokenizedPrompt;
use lora_toolkit::core::models::vae::Vae;
use lora_toolkit::core::source::{ModelFolder, ModelSource};

/// Parity bound for f32 against the PyTorch reference.
const TOLERANCE: f32 = 1e-4;

fn prompts(cfg: &str) -> Result<Vec<String>> {
    let path = fixtures().join(cfg).join("expected_meta.json");
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    serde_json::from_value(meta["prompts"].clone())
        .with_context(|| format!("{}: prompts", path.display()))
}

fn input_ids(cfg: &str) -> Result<Tensor> {
    Ok(get(&expected(cfg)?, "te_input_ids").to_dtype(DType::U32)?)
}

#[test]
fn tokenizer_matches_transformers() -> Result<()> {
    for cfg in CONFIGS {
        let folder = ModelFolder::open(&fixtures().join(cfg))?;
        // sd1-tiny ships tokenizer/ (EOS padding); sd2-tiny has none: embedded vocabulary, "!" padding.
        assert_eq!(folder.tokenizer_dir().is_some(), cfg == "sd1-tiny");
        let tokenizer = folder.tokenizer()?;
        let encoded: Vec<TokenizedPrompt> =
            prompts(cfg)?.iter().map(|p| tokenizer.encode(p)).collect();
        assert!(encoded.iter().all(|p| !p.truncated));
        let ours = TokenizedPrompt::batch_tensor(&encoded, &Device::Cpu)?;
        assert_eq!(
            ours.to_vec2::<u32>()?,
            input_ids(cfg)?.to_vec2::<u32>()?,
            "{cfg}"
        );
    }
    Ok(())
}

#[test]
fn text_encoder_matches_transformers() -> Result<()> {
    for cfg in CONFIGS {
        let folder = ModelFolder::open(&fixtures().join(cfg))?;
        let config = folder.text_encoder_config()?;
        let te = folder.load_text_encoder(&config, DType::F32, &Device::Cpu, BTreeMap::new())?;
        let out = te.forward(&input_ids(cfg)?)?;
        let reference = get(&expected(cfg)?, "te_out").clone();
        let err = max_abs_diff(&out, &reference);
        println!(
            "{cfg}: text encoder max |ours - transformers| = {err:.3e} (output max {:.3})",
            max_abs(&reference)
        );
        assert!(err <= TOLERANCE, "{cfg}: text encoder differs by {err}");
    }
    Ok(())
}

#[test]
fn text_encoder_and_vae_run_in_half_precision() -> Result<()> {
    // Same weights in f16/bf16: within half-precision tolerance of the f32 reference.
    let folder = ModelFolder::open(&fixtures().join("sd2-tiny"))?;
    let config = folder.text_encoder_config()?;
    let exp = expected("sd2-tiny")?;
    for dtype in [DType::F16, DType::BF16] {
        let te = folder.load_text_encoder(&config, dtype, &Device::Cpu, BTreeMap::new())?;
        let out = te.forward(&input_ids("sd2-tiny")?)?;
        assert_eq!(out.dtype(), dtype);
        let err = max_abs_diff(&out, get(&exp, "te_out")) / max_abs(get(&exp, "te_out"));
        println!("{dtype:?}: text encoder error relative to output scale = {err:.3e}");
        assert!(
            err < 5e-2,
            "{dtype:?}: text encoder too far from the f32 reference: {err}"
        );
    }
    // candle has no bf16 conv2d on the CPU, so the VAE is checked in f16 only here.
    let vae = Vae::load(
        &folder.vae_dir().context("fixture has a VAE")?,
        DType::F16,
        &Device::Cpu,
    )?;
    let decoded = vae.decode(&get(&exp, "vae_latents").to_dtype(DType::F16)?)?;
    let err = max_abs_diff(&decoded, get(&exp, "vae_decoded")) / max_abs(get(&exp, "vae_decoded"));
    println!("F16: VAE decode error relative to output scale = {err:.3e}");
    assert!(
        err < 5e-2,
        "F16: VAE decode too far from the f32 reference: {err}"
    );
    Ok(())
}

/// Folds the fixture's kohya text-encoder LoRA (`lora_te_*`) into the weights as deltas and
/// compares with transformers + peft running the same adapter.
#[test]
fn text_encoder_with_folded_kohya_adapter_matches_peft() -> Result<()> {
    for cfg in CONFIGS {
        let folder = ModelFolder::open(&fixtures().join(cfg))?;
        let config = folder.text_encoder_config()?;
        let adapter = candle_core::safetensors::load(
            fixtures().join(cfg).join("adapter_kohya.safetensors"),
            &Device::Cpu,
        )?;
        let mut deltas = BTreeMap::new();
        for module in lora_modules(&config) {
            let key = format!("lora_te_{}", module.path.replace('.', "_"));
            let (down, up) = (
                get(&adapter, &format!("{key}.lora_down.weight")),
                get(&adapter, &format!("{key}.lora_up.weight")),
            );
            let alpha = get(&adapter, &format!("{key}.alpha"))
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            let scale = alpha / down.dim(0)? as f64;
            deltas.insert(
                format!("{}.weight", module.path),
                (up.matmul(down)? * scale)?,
            );
        }
        assert_eq!(deltas.len(), 6 * config.num_hidden_layers);
        let te = folder.load_text_encoder(&config, DType::F32, &Device::Cpu, deltas)?;
        let out = te.forward(&input_ids(cfg)?)?;
        let exp = expected(cfg)?;
        let err = max_abs_diff(&out, get(&exp, "te_out_kohya"));
        let effect = max_abs_diff(get(&exp, "te_out_kohya"), get(&exp, "te_out"));
        println!("{cfg}: text encoder + kohya LoRA max |ours - peft| = {err:.3e} (adapter effect {effect:.3})");
        assert!(
            err <= TOLERANCE && effect > 100.0 * TOLERANCE,
            "{cfg}: err {err}, effect {effect}"
        );
    }
    Ok(())
}

#[test]
fn vae_matches_diffusers() -> Result<()> {
    for cfg in CONFIGS {
        let folder = ModelFolder::open(&fixtures().join(cfg))?;
        let vae = Vae::load(
            &folder.vae_dir().context("fixture has a VAE")?,
            DType::F32,
            &Device::Cpu,
        )?;
        let exp = expected(cfg)?;

        let decoded = vae.decode(get(&exp, "vae_latents"))?;
        let err = max_abs_diff(&decoded, get(&exp, "vae_decoded"));
        println!(
            "{cfg}: VAE decode max |ours - diffusers| = {err:.3e} (output max {:.3})",
            max_abs(get(&exp, "vae_decoded"))
        );
        assert!(err <= TOLERANCE, "{cfg}: VAE decode differs by {err}");

        let mean = vae.encode_mean(get(&exp, "vae_image"))?;
        let err = max_abs_diff(&mean, get(&exp, "vae_latent_mean"));
        println!("{cfg}: VAE encode mean max |ours - diffusers| = {err:.3e}");
        assert!(err <= TOLERANCE, "{cfg}: VAE latent mean differs by {err}");
        assert_eq!(vae.scaling_factor(), 0.18215);
    }
    Ok(())
}

#[test]
fn vae_batches_equal_single_images() -> Result<()> {
    // Each image of a batch must come out as if it were alone (a batch of the reference input
    // and a scaled copy, so the two rows differ).
    for cfg in CONFIGS {
        let folder = ModelFolder::open(&fixtures().join(cfg))?;
        let vae = Vae::load(
            &folder.vae_dir().context("fixture has a VAE")?,
            DType::F32,
            &Device::Cpu,
        )?;
        let exp = expected(cfg)?;
        for (input, run) in [
            (
                get(&exp, "vae_latents"),
                &(|x: &Tensor| vae.decode(x)) as &dyn Fn(&Tensor) -> Result<Tensor>,
            ),
            (get(&exp, "vae_image"), &|x: &Tensor| vae.encode_mean(x)),
        ] {
            let second = (input * 0.5)?;
            let batch = run(&Tensor::cat(&[input, &second], 0)?)?;
            for (i, single) in [input, &second].into_iter().enumerate() {
                let err = max_abs_diff(&batch.get(i)?.unsqueeze(0)?, &run(single)?);
                assert!(
                    err <= 1e-5,
                    "{cfg}: batch row {i} differs from the single image by {err}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn fixture_folders_open_with_their_parts() -> Result<()> {
    let sd2 = ModelFolder::open(&fixtures().join("sd2-tiny"))?;
    assert!(sd2.has_vae() && sd2.tokenizer_dir().is_none());
    assert_eq!(
        sd2.index().and_then(|i| i.pipeline_class.as_deref()),
        Some("StableDiffusionPipeline")
    );
    assert!(sd2
        .unet_weights()
        .ends_with("unet/diffusion_pytorch_model.safetensors"));
    assert_eq!(
        sd2.vae_config()?.context("vae config")?.vae_scale_factor(),
        2
    );
    let scheduler = sd2.scheduler_config()?;
    assert_eq!(scheduler.alphas_cumprod().len(), 1000);
    Ok(())
}

#[test]
fn bad_inputs_fail_with_clear_errors() -> Result<()> {
    // A folder that is not a model: the first missing file is named.
    let not_a_model = fixtures().join("sd2-tiny").join("unet");
    let err = format!("{:#}", ModelFolder::open(&not_a_model).unwrap_err());
    assert!(err.contains("is missing unet/config.json"), "{err}");

    // A scheduler config with an unknown beta schedule: the file, key and value are named.
    let text =
        std::fs::read_to_string(fixtures().join("sd1-tiny/scheduler/scheduler_config.json"))?;
    let broken = text.replace("\"scaled_linear\"", "\"karras\"");
    assert_ne!(broken, text);
    let err = format!("{:#}", SchedulerConfig::parse(&broken).unwrap_err());
    assert!(err.contains("unknown beta_schedule `karras`"), "{err}");

    // Neither a folder nor a Hub id.
    let err = format!("{:#}", ModelSource::parse("./no/such/model").unwrap_err());
    assert!(
        err.contains("neither an existing folder nor a Hugging Face Hub id"),
        "{err}"
    );

    // A Hub id this machine cannot fetch (no network here; a nonexistent repository elsewhere).
    let source = ModelSource::parse("lora-toolkit-tests/no-such-model")?;
    assert_eq!(
        source,
        ModelSource::Hub("lora-toolkit-tests/no-such-model".into())
    );
    let err = format!("{:#}", source.open(&Default::default()).unwrap_err());
    println!("{err}");
    assert!(
        err.contains("`lora-toolkit-tests/no-such-model`")
            && err.contains("pass the path of a diffusers folder"),
        "{err}"
    );
    Ok(())
}

/// `--train-text-encoder`: peft's LoRA (rank 4, alpha 8, random A and B) on every text-encoder
/// projection, attached unmerged to our encoder. The output with the adapter and the gradient of
/// every adapter parameter equal transformers + peft under PyTorch autograd
/// (`make_text_encoder_grad_fixtures.py`), in f32 through the causal attention, the layer norms
/// and both activations (quick-GELU in sd1-tiny, GELU in sd2-tiny); with `--dora` too (peft's
/// `use_dora`, the magnitudes' gradients included).
#[test]
fn text_encoder_lora_gradients_match_pytorch_autograd() -> Result<()> {
    for cfg in CONFIGS {
        check_text_encoder_gradients(cfg, "grad_text_encoder.safetensors", false)?;
        check_text_encoder_gradients(cfg, "grad_text_encoder_dora.safetensors", true)?;
    }
    Ok(())
}

fn check_text_encoder_gradients(cfg: &str, file: &str, dora: bool) -> Result<()> {
    use candle_core::Var;
    use lora_toolkit::core::LoraModule;
    let folder = ModelFolder::open(&fixtures().join(cfg))?;
    let config = folder.text_encoder_config()?;
    let path = fixtures().join(cfg).join(file);
    let fx = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("loading {}", path.display()))?;
    let mut te = folder.load_text_encoder(&config, DType::F32, &Device::Cpu, BTreeMap::new())?;
    let ids = get(&fx, "input_ids").to_dtype(DType::U32)?;
    let base = te.forward(&ids)?;
    let err = max_abs_diff(&base, get(&fx, "base_hidden_state"));
    assert!(err <= TOLERANCE, "{cfg}: base output differs by {err}");

    let mut modules = BTreeMap::new();
    let mut vars = Vec::new();
    for info in te.lora_modules() {
        // transformers 5 names the modules without the `text_model.` level.
        let bare = info
            .path
            .strip_prefix("text_model.")
            .expect("text_model. path");
        let mut var = |which: &str| -> Result<candle_core::Tensor> {
            let name = format!("{bare}.{which}");
            let v = Var::from_tensor(get(&fx, &name))?;
            vars.push((name, v.clone()));
            Ok(v.as_tensor().clone())
        };
        let module = LoraModule {
            down: var("lora_A.weight")?,
            up: var("lora_B.weight")?,
            alpha: 8.0,
            magnitude: dora.then(|| var("lora_magnitude_vector")).transpose()?,
        };
        modules.insert(info.path.clone(), module.into());
    }
    let per_module = if dora { 3 } else { 2 };
    assert_eq!(vars.len(), per_module * 6 * config.num_hidden_layers);
    te.attach_adapter("train", &modules, 1.0)?;
    let out = te.forward(&ids)?;
    let reference = get(&fx, "lora_hidden_state");
    let err = max_abs_diff(&out, reference) / max_abs(reference);
    assert!(
        err <= TOLERANCE,
        "{cfg} {file}: output with the adapter differs by {err}"
    );
    let grads = (&out * get(&fx, "upstream"))?.sum_all()?.backward()?;
    let mut worst: f32 = 0.0;
    for (name, var) in &vars {
        let ours = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{cfg}: no gradient for {name}"));
        let theirs = get(&fx, &format!("grad.{name}"));
        let err = max_abs_diff(ours, theirs) / max_abs(theirs);
        worst = worst.max(err);
        assert!(
            err <= 1e-4,
            "{cfg} {file}: gradient of {name} differs by {err:.2e}"
        );
    }
    println!(
        "{cfg} {file}: {} adapter gradients, worst relative difference {worst:.2e}",
        vars.len()
    );
    Ok(())
}
