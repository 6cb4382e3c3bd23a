//! SDXL parity with diffusers on the tiny random SDXL pipeline of
//! `tests/reference/make_sdxl_fixtures.py` (`tests/fixtures/sdxl-tiny/`): the UNet with its added
//! conditioning (pooled text embedding and micro-conditioning ids) on non-square latents, the
//! gradients of a LoRA on every transformer Linear and of the pooled embedding, and the prompt
//! encoding of both text encoders, and the whole generation pipeline.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use common::{fixtures, get, max_abs, max_abs_diff, rel_err};
use lora_toolkit::core::formats::adapter_file::{
    save_adapter, AdapterFile, AdapterFormat, ModelModules, SaveOptions,
};
use lora_toolkit::core::formats::kohya::BaseModelVersion;
use lora_toolkit::core::io::weights::component_weights;
use lora_toolkit::core::models::config::{ClipTextConfig, PredictionType, UNetConfig};
use lora_toolkit::core::models::sdxl_prompt::SdxlTextEncoders;
use lora_toolkit::core::models::text_encoder::{self, TextEncoder};
use lora_toolkit::core::models::tokenizer::ClipTokenizer;
use lora_toolkit::core::options::AdapterSpec;
use lora_toolkit::core::options::Precision;
use lora_toolkit::core::source::{BaseChoices, ModelFolder, ModelSource};
use lora_toolkit::core::{
    AdapterModule, AddedConditioning, Component, LoraModule, UNet2DConditionModel,
};
use lora_toolkit::infer::{GenerateOptions, Pipeline, SchedulerKind};
use lora_toolkit::merge::{Conversion, MergeOptions, OutputLayout};
use lora_toolkit::train::{checkpoint_paths, TrainArgs, Trainer};

fn sdxl() -> PathBuf {
    fixtures().join("sdxl-tiny")
}

fn expected() -> Result<HashMap<String, Tensor>> {
    let path = sdxl().join("expected.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("loading {}", path.display()))
}

fn load_unet() -> Result<UNet2DConditionModel> {
    let dir = sdxl().join("unet");
    let config = UNetConfig::from_file(&dir.join("config.json"))?;
    let weights = component_weights(&dir, "diffusion_pytorch_model")?;
    UNet2DConditionModel::from_files(&config, &[weights], DType::F32, &Device::Cpu)
}

/// The pipeline case the fixture script ran: its prompt, 3 Euler steps with guidance 5, two
/// images at 24×16 from its initial latents.
fn pipeline_options(exp: &HashMap<String, Tensor>) -> GenerateOptions {
    GenerateOptions {
        prompt: "a red circle on a white background".into(),
        steps: 3,
        guidance: 5.0,
        scheduler: SchedulerKind::Euler,
        height: Some(16),
        width: Some(24),
        num_images: 2,
        batch_size: 2,
        init_latents: Some(get(exp, "pipeline_init_latents").clone()),
        ..GenerateOptions::default()
    }
}

fn added(exp: &HashMap<String, Tensor>) -> AddedConditioning {
    AddedConditioning {
        text_embeds: get(exp, "text_embeds").clone(),
        time_ids: get(exp, "time_ids").clone(),
    }
}

#[test]
fn unet_with_added_conditioning_matches_diffusers() -> Result<()> {
    let exp = expected()?;
    let unet = load_unet()?;
    let config = unet.config();
    assert!(config.text_time.is_some(), "the SDXL config has text_time");
    assert_eq!(config.transformer_layers_per_block, [1, 1, 2]);
    let out = unet.forward_conditioned(
        get(&exp, "sample"),
        get(&exp, "timestep"),
        get(&exp, "encoder_hidden_states"),
        Some(&added(&exp)),
    )?;
    let reference = get(&exp, "unet_out");
    let err = max_abs_diff(&out, reference);
    println!(
        "SDXL UNet: max |ours - diffusers| = {err:.3e} (output max {:.3})",
        max_abs(reference)
    );
    assert!(
        err <= 1e-4,
        "SDXL UNet output differs from diffusers by {err}"
    );

    // Without its added conditioning an SDXL UNet refuses to run, rather than ignoring it.
    let err = unet
        .forward(
            get(&exp, "sample"),
            get(&exp, "timestep"),
            get(&exp, "encoder_hidden_states"),
        )
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("needs the pooled text embedding"),
        "{err:#}"
    );
    // A pooled embedding of the wrong width is named, not silently broadcast.
    let wrong = AddedConditioning {
        text_embeds: get(&exp, "text_embeds").narrow(1, 0, 19)?,
        time_ids: get(&exp, "time_ids").clone(),
    };
    let err = unet
        .forward_conditioned(
            get(&exp, "sample"),
            get(&exp, "timestep"),
            get(&exp, "encoder_hidden_states"),
            Some(&wrong),
        )
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("projection_class_embeddings_input_dim is 68"),
        "{err:#}"
    );
    Ok(())
}

/// The largest relative gradient error of a comparison, and which tensor had it.
#[derive(Default)]
struct WorstError {
    err: f32,
    at: String,
}

impl WorstError {
    fn see(&mut self, err: f32, at: &str) {
        if err > self.err {
            (self.err, self.at) = (err, at.to_string());
        }
    }

    /// Prints `what` with the worst error and asserts it is under 1e-3.
    fn check(&self, label: &str, what: &str) {
        println!(
            "{what}; worst relative gradient error {:.2e} ({})",
            self.err, self.at
        );
        assert!(
            self.err < 1e-3,
            "{label}: gradient error {} at {}",
            self.err,
            self.at
        );
    }
}

#[test]
fn lora_and_pooled_embedding_gradients_match_pytorch() -> Result<()> {
    let exp = expected()?;
    for checkpointed in [false, true] {
        let mut unet = load_unet()?;
        let modules = ModelModules::unet_only(unet.lora_modules());
        let adapter =
            AdapterFile::read(&sdxl().join("adapter_grad_peft.safetensors"), &Device::Cpu)?
                .resolve(&modules)?;
        let mut vars = Vec::new();
        let mut trainable = std::collections::BTreeMap::new();
        for (path, module) in &adapter.unet {
            let AdapterModule::Lora(m) = module else {
                panic!("{path}: the fixture adapter is a plain LoRA");
            };
            let down = Var::from_tensor(&m.down)?;
            let up = Var::from_tensor(&m.up)?;
            vars.push((format!("grad.{path}.lora_A.weight"), down.clone()));
            vars.push((format!("grad.{path}.lora_B.weight"), up.clone()));
            trainable.insert(
                path.clone(),
                AdapterModule::Lora(LoraModule {
                    down: down.as_tensor().clone(),
                    up: up.as_tensor().clone(),
                    alpha: m.alpha,
                    magnitude: None,
                }),
            );
        }
        unet.attach_adapter("grad", &trainable, 1.0)?;
        let pooled = Var::from_tensor(get(&exp, "text_embeds"))?;
        let added = AddedConditioning {
            text_embeds: pooled.as_tensor().clone(),
            time_ids: get(&exp, "time_ids").clone(),
        };
        let (sample, timestep, context) = (
            get(&exp, "sample"),
            get(&exp, "timestep"),
            get(&exp, "encoder_hidden_states"),
        );
        let label = if checkpointed {
            "checkpointed"
        } else {
            "plain"
        };
        let mut params: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        params.push(pooled.clone());
        let (out, pass) = if checkpointed {
            let (prediction, pass) =
                unet.forward_checkpointed_conditioned(sample, timestep, context, Some(&added))?;
            (prediction, Some(pass))
        } else {
            (
                unet.forward_conditioned(sample, timestep, context, Some(&added))?,
                None,
            )
        };
        let forward_err = rel_err(&out, get(&exp, "unet_out_lora_grad"));
        assert!(
            forward_err < 1e-4,
            "{label}: LoRA forward error {forward_err}"
        );
        let loss = (out - get(&exp, "grad_target"))?.sqr()?.mean_all()?;
        let grads = match pass {
            None => loss.backward()?,
            Some(pass) => pass.backward(&loss, &params)?,
        };
        let reference_count = exp.keys().filter(|k| k.starts_with("grad.")).count();
        assert!(reference_count > 0, "the fixture holds no LoRA gradients");
        assert_eq!(
            vars.len(),
            reference_count,
            "every reference gradient is compared"
        );
        let mut worst = WorstError::default();
        for (key, var) in vars
            .iter()
            .chain([&("grad_text_embeds".to_string(), pooled.clone())])
        {
            let grad = grads
                .get(var.as_tensor())
                .with_context(|| format!("{label}: {key} got no gradient"))?;
            let reference = get(&exp, key).reshape(var.as_tensor().shape())?;
            assert!(
                max_abs(&reference) > 0.0,
                "reference gradient {key} is zero"
            );
            worst.see(rel_err(grad, &reference), key);
        }
        worst.check(
            label,
            &format!(
                "SDXL {label}: {} LoRA tensors and the pooled embedding",
                vars.len()
            ),
        );
    }
    Ok(())
}

/// `--train-text-encoder` on SDXL: a LoRA on every module of both text encoders
/// (`grad_text_encoders.safetensors`, `make_sdxl_te_grad_fixtures.py`), through both encoders'
/// penultimate states and the second's pooled output into the UNet's loss, plain and
/// checkpointed. The first encoder's last layer gets no gradient, as in PyTorch: SDXL reads the
/// layer before it.
#[test]
fn both_text_encoders_lora_gradients_match_pytorch() -> Result<()> {
    let exp = expected()?;
    let path = sdxl().join("grad_text_encoders.safetensors");
    let fx = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let metadata = lora_toolkit::core::io::weights::header_metadata(&path)?;
    let no_grad: Vec<&str> = metadata["no_grad"].split(',').collect();
    assert_eq!(
        no_grad.len(),
        12,
        "the first encoder's last layer: 6 modules, A and B"
    );
    let folder = ModelFolder::open(&sdxl())?;
    let ids = |key: &str| get(&fx, key).to_dtype(DType::U32);
    for checkpointed in [false, true] {
        let label = if checkpointed {
            "checkpointed"
        } else {
            "plain"
        };
        let mut vars = Vec::new();
        let mut encoders = Vec::new();
        for (tag, component) in [
            ("te1", Component::TextEncoder),
            ("te2", Component::TextEncoder2),
        ] {
            let mut encoder = match component {
                Component::TextEncoder => folder.load_text_encoder(
                    &folder.text_encoder_config()?,
                    DType::F32,
                    &Device::Cpu,
                    BTreeMap::new(),
                )?,
                _ => folder.load_text_encoder_2(
                    &folder.text_encoder_2_config()?,
                    DType::F32,
                    &Device::Cpu,
                    BTreeMap::new(),
                )?,
            };
            let mut modules = BTreeMap::new();
            for info in encoder.lora_modules().to_vec() {
                let mut var = |which: &str| -> Result<Tensor> {
                    let name = format!("{tag}.{}.{which}.weight", info.path);
                    let v = Var::from_tensor(get(&fx, &name))?;
                    vars.push((name, v.clone()));
                    Ok(v.as_tensor().clone())
                };
                let module = LoraModule {
                    down: var("lora_A")?,
                    up: var("lora_B")?,
                    alpha: 8.0,
                    magnitude: None,
                };
                modules.insert(info.path.clone(), AdapterModule::Lora(module));
            }
            encoder.attach_adapter("grad", &modules, 1.0)?;
            encoders.push(encoder);
        }
        let second = encoders.pop().context("two encoders")?;
        let first = encoders.pop().context("two encoders")?;
        let text =
            SdxlTextEncoders::new(first, second, folder.tokenizer()?, folder.tokenizer_2()?)?;
        let embeddings = text.encode_ids(&ids("te_input_ids")?, &ids("te2_input_ids")?)?;
        for (what, ours, key) in [
            ("context", &embeddings.context, "context"),
            ("pooled", &embeddings.pooled, "pooled"),
        ] {
            let err = rel_err(ours, get(&fx, key));
            assert!(
                err < 1e-4,
                "{label}: {what} with the adapters differs by {err}"
            );
        }
        let unet = load_unet()?;
        let added = AddedConditioning {
            text_embeds: embeddings.pooled.clone(),
            time_ids: get(&exp, "time_ids").clone(),
        };
        let (sample, timestep) = (get(&exp, "sample"), get(&exp, "timestep"));
        let params: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
        let (out, pass) = match checkpointed {
            true => {
                let (out, pass) = unet.forward_checkpointed_conditioned(
                    sample,
                    timestep,
                    &embeddings.context,
                    Some(&added),
                )?;
                (out, Some(pass))
            }
            false => (
                unet.forward_conditioned(sample, timestep, &embeddings.context, Some(&added))?,
                None,
            ),
        };
        let err = rel_err(&out, get(&fx, "unet_out"));
        assert!(err < 1e-4, "{label}: UNet output differs by {err}");
        let loss = (out - get(&exp, "grad_target"))?.sqr()?.mean_all()?;
        let grads = match pass {
            None => loss.backward()?,
            Some(pass) => pass.backward(&loss, &params)?,
        };
        assert_eq!(
            vars.len(),
            72,
            "3 layers × 6 modules × A, B in each encoder"
        );
        let mut worst = WorstError::default();
        for (name, var) in &vars {
            let ours = grads.get(var.as_tensor());
            if no_grad.contains(&name.as_str()) {
                let none = ours.map_or(Ok(true), |g| -> Result<bool> {
                    Ok(g.abs()?.max_all()?.to_scalar::<f32>()? == 0.0)
                })?;
                assert!(
                    none,
                    "{label}: {name} got a gradient; PyTorch gives it none"
                );
                continue;
            }
            let ours = ours.with_context(|| format!("{label}: {name} got no gradient"))?;
            let reference = get(&fx, &format!("grad.{name}"));
            assert!(
                max_abs(reference) > 0.0,
                "reference gradient {name} is zero"
            );
            worst.see(rel_err(ours, reference), name);
        }
        worst.check(
            label,
            &format!(
                "SDXL text encoders, {label}: {} LoRA gradients",
                vars.len() - no_grad.len()
            ),
        );
    }
    Ok(())
}

#[test]
fn prompt_encoding_matches_diffusers_encode_prompt() -> Result<()> {
    let exp = expected()?;
    let dir = sdxl();
    let load = |encoder: &str, tokenizer: &str| -> Result<(TextEncoder, ClipTokenizer)> {
        let config = ClipTextConfig::from_file(&dir.join(encoder).join("config.json"))?;
        let model = TextEncoder::load(
            &dir.join(encoder),
            &config,
            DType::F32,
            &Device::Cpu,
            Default::default(),
        )?;
        Ok((
            model,
            ClipTokenizer::load(Some(&dir.join(tokenizer)), &config)?,
        ))
    };
    let (te, tok) = load("text_encoder", "tokenizer")?;
    let (te2, tok2) = load("text_encoder_2", "tokenizer_2")?;
    let encoders = SdxlTextEncoders::new(te, te2, tok, tok2)?;
    assert_eq!(encoders.context_width(), 40);

    let prompts = ["a red circle on a white background", "a photo of sks dog"];
    let (ids, ids_2, truncated) = encoders.tokenize(&prompts, &Device::Cpu)?;
    assert!(!truncated);
    // The second tokenizer pads with "!" (id 0), the first with the end token.
    for (ours, key) in [(&ids, "te_input_ids"), (&ids_2, "te2_input_ids")] {
        let reference = get(&exp, key).to_dtype(DType::U32)?.to_vec2::<u32>()?;
        assert_eq!(ours.to_vec2::<u32>()?, reference, "{key}");
    }
    let embeddings = encoders.encode_ids(&ids, &ids_2)?;
    let negative = encoders.encode(&["blurry", "a dark photo"], &Device::Cpu)?;
    for (ours, key) in [
        (&embeddings.context, "prompt_embeds"),
        (&embeddings.pooled, "pooled_prompt_embeds"),
        (&negative.context, "negative_prompt_embeds"),
        (&negative.pooled, "negative_pooled_prompt_embeds"),
    ] {
        let reference = get(&exp, key);
        let err = max_abs_diff(ours, reference);
        println!(
            "SDXL {key}: max |ours - diffusers| = {err:.3e} (max {:.3})",
            max_abs(reference)
        );
        assert!(err <= 1e-5, "{key} differs from diffusers by {err}");
    }
    Ok(())
}

#[test]
fn pipeline_matches_stable_diffusion_xl_pipeline() -> Result<()> {
    let exp = expected()?;
    let folder = ModelFolder::open(&sdxl())?;
    assert!(folder.is_sdxl() && folder.zeros_for_empty_negative());
    let pipeline = Pipeline::load(&folder, &[], &Device::Cpu, DType::F32, false)?;
    for (case, negative) in [("pipeline", ""), ("pipeline_negative", "blurry")] {
        let options = GenerateOptions {
            negative_prompt: negative.into(),
            ..pipeline_options(&exp)
        };
        let generated = pipeline.generate(&options)?;
        let latents_err = max_abs_diff(&generated.latents, get(&exp, &format!("{case}_latents")));
        // diffusers' output_type "pt" is the decoded image mapped to [0, 1] and clamped.
        let images = ((generated.images + 1.0)? / 2.0)?.clamp(0.0, 1.0)?;
        let images_err = max_abs_diff(&images, get(&exp, &format!("{case}_images")));
        println!("SDXL {case}: final latents max error {latents_err:.3e}, images {images_err:.3e}");
        assert!(
            latents_err <= 1e-3,
            "{case}: latents differ by {latents_err}"
        );
        assert!(images_err <= 1e-3, "{case}: images differ by {images_err}");
    }
    Ok(())
}

#[test]
fn peft_unet_adapter_matches_load_lora_weights() -> Result<()> {
    generation_matches(
        &sdxl().join("adapter_grad_peft.safetensors"),
        0.8,
        "pipeline_lora_latents",
    )
}

/// The fixture's pipeline case with `adapter` at `scale`, unmerged and fused, against diffusers'
/// final latents `reference` (with the adapter loaded by `load_lora_weights`).
fn generation_matches(adapter: &std::path::Path, scale: f64, reference: &str) -> Result<()> {
    let exp = expected()?;
    let folder = ModelFolder::open(&sdxl())?;
    let options = pipeline_options(&exp);
    for fuse in [false, true] {
        let spec = AdapterSpec::new(adapter.to_path_buf(), scale);
        let pipeline = Pipeline::load(&folder, &[spec], &Device::Cpu, DType::F32, fuse)?;
        let err = max_abs_diff(&pipeline.generate(&options)?.latents, get(&exp, reference));
        println!(
            "SDXL with {} at {scale} (fused: {fuse}): final latents max error {err:.3e}",
            adapter.display()
        );
        assert!(
            err <= 1e-3,
            "fused: {fuse}: latents differ from diffusers by {err}"
        );
    }
    Ok(())
}

#[test]
fn kohya_sdxl_adapter_matches_diffusers_loader() -> Result<()> {
    let folder = ModelFolder::open(&sdxl())?;
    let adapter = sdxl().join("adapter_kohya.safetensors");
    generation_matches(&adapter, 1.0, "pipeline_kohya_latents")?;

    // Every module of the file resolves: UNet modules by their LDM names, both text encoders.
    let unet_config = UNetConfig::from_file(&sdxl().join("unet/config.json"))?;
    let unet_modules = UNet2DConditionModel::adapter_modules_of(&unet_config)?;
    let te = text_encoder::lora_modules(&folder.text_encoder_config()?);
    let te2 = text_encoder::lora_modules(&folder.text_encoder_2_config()?);
    let model = ModelModules {
        unet: &unet_modules,
        text_encoder: Some(&te),
        text_encoder_2: Some(&te2),
    };
    let file = AdapterFile::read(&adapter, &Device::Cpu)?;
    let resolved = file.resolve(&model)?;
    let counts = (
        resolved.unet.len(),
        resolved.text_encoder.len(),
        resolved.text_encoder_2.len(),
    );
    assert_eq!(counts, (192, 18, 18), "modules resolved (UNet, te1, te2)");
    let inspection = lora_toolkit::merge::inspect(&adapter)?;
    assert_eq!(
        (
            inspection.unet_modules,
            inspection.text_encoder_modules,
            inspection.text_encoder_2_modules
        ),
        counts,
        "lora-merge inspect counts"
    );

    // Written back for an SDXL model, the file numbers both encoders and reads back the same.
    let out = tempfile::tempdir()?;
    let written = out.path().join("again.safetensors");
    let options = SaveOptions {
        format: AdapterFormat::Kohya,
        base_model: BaseModelVersion::SdxlBase,
        prediction: PredictionType::Epsilon,
        title: None,
        extra_metadata: Default::default(),
        lokr_factor: None,
    };
    save_adapter(&written, &resolved, &model, &options)?;
    let again = AdapterFile::read(&written, &Device::Cpu)?;
    let keys: Vec<String> = again
        .raw_modules()
        .iter()
        .map(|m| m.down_key.clone())
        .collect();
    assert!(
        keys.iter().any(|k| k.starts_with("lora_te1_"))
            && keys.iter().any(|k| k.starts_with("lora_te2_"))
    );
    assert!(
        !keys.iter().any(|k| k.starts_with("lora_te_")),
        "SDXL files number the first encoder"
    );
    let reread = again.resolve(&model)?;
    for (ours, theirs) in [
        (&resolved.unet, &reread.unet),
        (&resolved.text_encoder, &reread.text_encoder),
        (&resolved.text_encoder_2, &reread.text_encoder_2),
    ] {
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// A quick lora-train recipe on the SDXL fixture writing into `out`: resolution 16 (its UNet's
/// sample size 16 latents would be 32 pixels; 16 keeps the run short), mirrored random crops and
/// caption dropout, so every part of SDXL's per-sample conditioning varies.
fn sdxl_train_args(out: &std::path::Path) -> TrainArgs {
    TrainArgs {
        base: Some(sdxl().display().to_string()),
        data: Some(fixtures().join("train-data")),
        output: Some(out.join("adapter.safetensors")),
        resolution: Some(16),
        lr: Some(2e-2),
        steps: Some(30),
        batch_size: Some(2),
        flip: Some(true),
        random_crop: Some(true),
        caption_dropout: Some(0.2),
        seed: Some(3),
        ..Default::default()
    }
}

#[test]
fn lora_train_trains_an_sdxl_unet_adapter_that_generation_applies() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut trainer = Trainer::new(sdxl_train_args(dir.path()).resolve()?, &mut |_| {})?;
    let before = trainer.evaluate(99, 3)?;
    trainer.run(&mut |_| {})?;
    let after = trainer.evaluate(99, 3)?;
    println!("SDXL training: eval loss {before:.4} → {after:.4}");
    // Measured: 4.2 % lower (seed 3); the bar is half of that.
    assert!(
        (before - after) / before > 0.02,
        "training did not lower the loss enough: {before} → {after}"
    );

    // A kohya SDXL file: the UNet by its LDM names, SDXL's base-model keys.
    let path = dir.path().join("adapter.safetensors");
    let file = AdapterFile::read(&path, &Device::Cpu)?;
    let keys: Vec<&String> = file.raw_modules().iter().map(|m| &m.down_key).collect();
    assert!(!keys.is_empty());
    assert!(
        keys.iter().all(|k| k.starts_with("lora_unet_input_blocks_")
            || k.starts_with("lora_unet_middle_block_")
            || k.starts_with("lora_unet_output_blocks_")),
        "{:?}",
        &keys[..3]
    );
    assert_eq!(file.metadata()["ss_base_model_version"], "sdxl_base_v1-0");

    // lora-infer applies it: the latents move.
    let exp = expected()?;
    let folder = ModelFolder::open(&sdxl())?;
    let options = GenerateOptions {
        steps: 2,
        ..pipeline_options(&exp)
    };
    let base = Pipeline::load(&folder, &[], &Device::Cpu, DType::F32, false)?.generate(&options)?;
    let with = Pipeline::load(
        &folder,
        &[AdapterSpec::new(path, 1.0)],
        &Device::Cpu,
        DType::F32,
        false,
    )?
    .generate(&options)?;
    let effect = max_abs_diff(&with.latents, &base.latents);
    assert!(
        effect > 1e-3,
        "the trained adapter changes nothing ({effect})"
    );
    Ok(())
}

/// Trains `recipe` for 4 steps straight, then again resumed from the straight run's step-2
/// checkpoint, and checks the two final adapters are bit-identical. Returns the straight run's
/// folder.
fn trains_and_resumes_exactly(
    recipe: impl Fn(&std::path::Path, Option<PathBuf>) -> TrainArgs,
) -> Result<tempfile::TempDir> {
    let run = |out: &std::path::Path, resume: Option<PathBuf>| -> Result<()> {
        let args = TrainArgs {
            steps: Some(4),
            save_every: Some(2),
            ..recipe(out, resume)
        };
        lora_train::train(args.resolve()?, &mut |_| {}, &mut |_| {})?;
        Ok(())
    };
    let straight = tempfile::tempdir()?;
    run(straight.path(), None)?;
    let out = straight.path().join("adapter.safetensors");
    let resumed = tempfile::tempdir()?;
    run(resumed.path(), Some(checkpoint_paths(&out, 2).0))?;
    assert_same_tensors(
        &tensors_of(&resumed.path().join("adapter.safetensors"))?,
        &tensors_of(&out)?,
        &[],
        "resumed from step 2",
    );
    Ok(straight)
}

#[test]
fn sdxl_training_resumes_bit_exactly() -> Result<()> {
    trains_and_resumes_exactly(|out, resume| TrainArgs {
        resume,
        ..sdxl_train_args(out)
    })?;
    Ok(())
}

/// `--train-text-encoder` on SDXL trains both encoders as kohya's `sdxl_train_network.py` does:
/// every module of each, written as `lora_te1_` / `lora_te2_`, the first encoder's last layer
/// left as it starts (SDXL does not read it: no gradient, no weight decay); the moving average
/// keeps each encoder's own values; a resumed run equals a straight one.
#[test]
fn sdxl_trains_both_text_encoders() -> Result<()> {
    let straight = trains_and_resumes_exactly(|out, resume| TrainArgs {
        train_text_encoder: Some(true),
        text_encoder_lr: Some(vec![5e-2]),
        ema_decay: Some(0.5),
        resume,
        ..sdxl_train_args(out)
    })?;
    let path = straight.path().join("adapter.safetensors");
    let tensors = tensors_of(&path)?;
    let file = AdapterFile::read(&path, &Device::Cpu)?;
    let count = |prefix: &str| {
        file.raw_modules()
            .iter()
            .filter(|m| m.down_key.starts_with(prefix))
            .count()
    };
    assert_eq!((count("lora_te1_"), count("lora_te2_")), (18, 18));
    assert_eq!(
        count("lora_te_"),
        0,
        "SDXL names its first encoder lora_te1_"
    );
    for (key, t) in &tensors {
        let Some(module) = key.strip_suffix(".lora_up.weight") else {
            continue;
        };
        let moved = max_abs(t) > 0.0;
        let last_of_first = module.starts_with("lora_te1_text_model_encoder_layers_2_");
        assert_eq!(moved, !last_of_first, "{module}: up moved = {moved}");
    }
    // That layer's other tensors stay as they start too: an optimizer passes over a parameter
    // without a gradient (weight decay included), while every other module moves on.
    let at_step_2 = tensors_of(&checkpoint_paths(&path, 2).1)?;
    for (key, t) in &tensors {
        let same = max_abs_diff(t, &at_step_2[key]) == 0.0;
        let last_of_first = key.starts_with("lora_te1_text_model_encoder_layers_2_");
        let down = key.ends_with(".lora_down.weight");
        if last_of_first || down {
            assert_eq!(same, last_of_first, "{key}: unchanged from step 2 = {same}");
        }
    }
    // The moving average: each encoder's values in its own modules (their widths differ).
    let ema = tensors_of(&straight.path().join("adapter-ema.safetensors"))?;
    assert_eq!(ema.len(), tensors.len());
    for (key, t) in &tensors {
        assert_eq!(ema[key].dims(), t.dims(), "{key}");
    }
    Ok(())
}

/// `--text-encoder-lr A B` gives each SDXL encoder its own rate, as kohya's list does: with
/// B = 0 the second encoder's adapter stays as it starts (up = 0) while the first's moves, and
/// the metadata records the list.
#[test]
fn each_sdxl_text_encoder_takes_its_own_learning_rate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let args = TrainArgs {
        steps: Some(2),
        train_text_encoder: Some(true),
        text_encoder_lr: Some(vec![5e-2, 0.0]),
        ..sdxl_train_args(dir.path())
    };
    lora_train::train(args.resolve()?, &mut |_| {}, &mut |_| {})?;
    let path = dir.path().join("adapter.safetensors");
    let tensors = tensors_of(&path)?;
    let ups_moved = |prefix: &str| -> Vec<bool> {
        tensors
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && k.ends_with(".lora_up.weight"))
            .filter(|(k, _)| !k.starts_with("lora_te1_text_model_encoder_layers_2_"))
            .map(|(_, t)| max_abs(t) > 0.0)
            .collect()
    };
    let (first, second) = (ups_moved("lora_te1_"), ups_moved("lora_te2_"));
    assert!(
        !first.is_empty() && !second.is_empty(),
        "no text-encoder modules"
    );
    assert!(first.iter().all(|&m| m), "a first-encoder up did not move");
    assert!(
        second.iter().all(|&m| !m),
        "a second-encoder up moved at lr 0"
    );
    let file = AdapterFile::read(&path, &Device::Cpu)?;
    let metadata = file.metadata();
    assert_eq!(
        metadata.get("ss_text_encoder_lr").map(String::as_str),
        Some("[0.05, 0.0]")
    );
    Ok(())
}

#[test]
fn sdxl_parts_are_checked_not_assumed() -> Result<()> {
    let folder = ModelFolder::open(&sdxl())?;
    let te_config = folder.text_encoder_config()?;
    let load_first =
        || folder.load_text_encoder(&te_config, DType::F32, &Device::Cpu, Default::default());
    // A second encoder without `text_projection` (here: the first one again) is refused.
    let err = SdxlTextEncoders::new(
        load_first()?,
        load_first()?,
        folder.tokenizer()?,
        folder.tokenizer_2()?,
    )
    .err()
    .context("an encoder without projection was accepted as SDXL's second")?;
    assert!(
        format!("{err:#}").contains("text_projection.weight"),
        "{err:#}"
    );

    // Second-encoder modules against a one-encoder model: named, not dropped; skipped only where
    // no text encoder applies.
    let unet_config = UNetConfig::from_file(&sdxl().join("unet/config.json"))?;
    let unet_modules = UNet2DConditionModel::adapter_modules_of(&unet_config)?;
    let te = text_encoder::lora_modules(&te_config);
    let file = AdapterFile::read(&sdxl().join("adapter_kohya.safetensors"), &Device::Cpu)?;
    assert!(file.is_sdxl());
    let one_encoder = ModelModules {
        unet: &unet_modules,
        text_encoder: Some(&te),
        text_encoder_2: None,
    };
    let err = file.resolve(&one_encoder).unwrap_err();
    assert!(
        format!("{err:#}").contains("a module of SDXL's second text encoder"),
        "{err:#}"
    );
    let unet_only = file.resolve(&ModelModules::unet_only(&unet_modules))?;
    assert_eq!(
        (
            unet_only.unet.len(),
            unet_only.text_encoder.len(),
            unet_only.text_encoder_2.len()
        ),
        (192, 0, 0)
    );

    // Without tokenizer_2/ the second tokenizer pads with "!", as SDXL's does, not with the
    // config's stale pad_token_id.
    let copy = tempfile::tempdir()?;
    copy_model_folder(copy.path(), &["tokenizer_2"])?;
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sdxl().join("model_index.json"))?)?;
    index
        .as_object_mut()
        .context("an object")?
        .remove("tokenizer_2");
    std::fs::write(copy.path().join("model_index.json"), index.to_string())?;
    let without = ModelFolder::open(copy.path())?;
    assert_eq!(without.tokenizer_2()?.pad_id(), 0, "the id of `!`");
    Ok(())
}

#[test]
fn lora_merge_folds_a_kohya_sdxl_adapter_into_all_three_models() -> Result<()> {
    let exp = expected()?;
    let adapter = sdxl().join("adapter_kohya.safetensors");
    let out = tempfile::tempdir()?;
    let merged = out.path().join("merged");
    let options = MergeOptions {
        base: sdxl(),
        adapters: vec![AdapterSpec::new(adapter.clone(), 1.0)],
        output: merged.clone(),
        // f32: the merged weights are compared with diffusers' unmerged run, not rounded to f16.
        dtype: Some(Precision::F32),
        allow_unmatched: false,
        allow_nonfinite: false,
    };
    let report = lora_toolkit::merge::merge(&options)?;
    assert_eq!(report.merged_modules[0].1, 192 + 18 + 18);
    for part in [
        "text_encoder_2/model.safetensors",
        "tokenizer_2/special_tokens_map.json",
    ] {
        assert!(
            merged.join(part).is_file(),
            "the merged folder lacks {part}"
        );
    }
    let folder = ModelFolder::open(&merged)?;
    let options_gen = pipeline_options(&exp);
    let latents = Pipeline::load(&folder, &[], &Device::Cpu, DType::F32, false)?
        .generate(&options_gen)?
        .latents;
    let err = max_abs_diff(&latents, get(&exp, "pipeline_kohya_latents"));
    println!("SDXL merged with the kohya adapter: final latents max error {err:.3e}");
    assert!(
        err <= 1e-3,
        "the merged model differs from diffusers' unmerged run by {err}"
    );

    // The same adapter merged into the single file: OpenCLIP's stacked q/k/v get their three
    // deltas, and the merged file generates what diffusers does with the adapter.
    let merged_file = out.path().join("merged.safetensors");
    let report = lora_toolkit::merge::merge(&MergeOptions {
        base: ldm_file(),
        output: merged_file.clone(),
        ..options
    })?;
    assert_eq!(report.merged_modules[0].1, 192 + 18 + 18);
    let model = single_file_with_configs(&merged_file)?;
    let from_file = Pipeline::load(&model, &[], &Device::Cpu, DType::F32, false)?
        .generate(&options_gen)?
        .latents;
    let err = max_abs_diff(&from_file, get(&exp, "pipeline_kohya_latents"));
    println!("SDXL single file merged with the kohya adapter: final latents max error {err:.3e}");
    assert!(
        err <= 1e-3,
        "the merged single file differs from diffusers' unmerged run by {err}"
    );
    Ok(())
}

// The single-file (Stability SGM layout) checkpoint of the fixture, `model_ldm.safetensors`:
// written by `tests/reference/make_sdxl_single_file.py` with the script's own key map and read
// back by diffusers' `from_single_file` tensor for tensor (the text projection transposed, q/k/v
// stacked). It holds the folder's fp16 values, so what it gives must equal the folder's exactly.

/// The fixture's diffusers folder (`model_index.json` and the model's sub-folders, less `skip`)
/// copied into `to`.
fn copy_model_folder(to: &std::path::Path, skip: &[&str]) -> Result<()> {
    std::fs::create_dir_all(to)?;
    std::fs::copy(sdxl().join("model_index.json"), to.join("model_index.json"))?;
    for entry in std::fs::read_dir(sdxl())? {
        let path = entry?.path();
        let name = path.file_name().context("a name")?;
        if path.is_dir() && !skip.iter().any(|s| name == *s) {
            let target = to.join(name);
            std::fs::create_dir_all(&target)?;
            for file in std::fs::read_dir(&path)? {
                let file = file?.path();
                std::fs::copy(&file, target.join(file.file_name().context("a name")?))?;
            }
        }
    }
    Ok(())
}

fn ldm_file() -> PathBuf {
    sdxl().join("model_ldm.safetensors")
}

/// `file` as `--base`, with `--base-config` the fixture folder (a tiny model has no built-in
/// configs).
fn single_file_with_configs(file: &std::path::Path) -> Result<ModelFolder> {
    ModelSource::parse(file.to_str().context("a UTF-8 path")?)?
        .with_configs_from(Some(sdxl()))?
        .open(&BaseChoices::default())
}

#[test]
fn the_single_file_generates_what_the_folder_and_diffusers_do() -> Result<()> {
    let exp = expected()?;
    let file = single_file_with_configs(&ldm_file())?;
    assert!(file.is_single_file() && file.is_sdxl() && file.zeros_for_empty_negative());
    let folder = ModelFolder::open(&sdxl())?;
    for (case, negative) in [("pipeline", ""), ("pipeline_negative", "blurry")] {
        let options = GenerateOptions {
            negative_prompt: negative.into(),
            ..pipeline_options(&exp)
        };
        let generate = |model: &ModelFolder| -> Result<Tensor> {
            Ok(Pipeline::load(model, &[], &Device::Cpu, DType::F32, false)?
                .generate(&options)?
                .latents)
        };
        let from_file = generate(&file)?;
        let same = max_abs_diff(&from_file, &generate(&folder)?);
        assert_eq!(same, 0.0, "{case}: the single file differs from the folder");
        let err = max_abs_diff(&from_file, get(&exp, &format!("{case}_latents")));
        println!("SDXL single file, {case}: final latents max error {err:.3e}");
        assert!(err <= 1e-3, "{case}: latents differ by {err}");
    }
    Ok(())
}

/// The tensors of a safetensors file (text-encoder names without the `text_model.` level, which
/// transformers 5 leaves out of CLIPTextModel files).
fn tensors_of(path: &std::path::Path) -> Result<BTreeMap<String, Tensor>> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("loading {}", path.display()))?;
    Ok(tensors
        .into_iter()
        .map(|(k, t)| (k.strip_prefix("text_model.").unwrap_or(&k).to_owned(), t))
        .collect())
}

/// Every tensor of `ours` equals `reference`'s bit for bit, and their key sets are equal but
/// for `extra` (keys either may have without the other).
fn assert_same_tensors(
    ours: &BTreeMap<String, Tensor>,
    reference: &BTreeMap<String, Tensor>,
    extra: &[&str],
    what: &str,
) {
    let missing: Vec<&String> = reference
        .keys()
        .filter(|k| !ours.contains_key(*k) && !extra.contains(&k.as_str()))
        .collect();
    let unexpected: Vec<&String> = ours
        .keys()
        .filter(|k| !reference.contains_key(*k) && !extra.contains(&k.as_str()))
        .collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "{what}: missing {missing:?}, unexpected {unexpected:?}"
    );
    assert!(!ours.is_empty(), "{what}: no tensors");
    for (key, t) in ours.iter().filter(|(k, _)| reference.contains_key(*k)) {
        let want = &reference[key];
        assert_eq!(t.dtype(), want.dtype(), "{what}: `{key}`");
        let diff = max_abs_diff(
            &t.to_dtype(DType::F32).unwrap(),
            &want.to_dtype(DType::F32).unwrap(),
        );
        assert_eq!(diff, 0.0, "{what}: `{key}` differs by {diff}");
    }
}

#[test]
fn lora_merge_converts_sdxl_folders_and_single_files_both_ways() -> Result<()> {
    let out = tempfile::tempdir()?;
    let convert = |base: PathBuf, output: PathBuf, to, config_from| {
        let options = MergeOptions {
            base,
            adapters: vec![],
            output,
            dtype: None,
            allow_unmatched: false,
            allow_nonfinite: false,
        };
        let conversion = Conversion {
            to,
            config_from,
            no_ema: false,
        };
        lora_toolkit::merge::merge_converting(&options, Some(&conversion))
    };
    // Folder → single file: the reference file's tensors, but for the two the folder does not
    // hold (CLIP's position ids, OpenCLIP's logit scale). The folder's second encoder here also
    // has the `position_ids` buffer older transformers saved, which OpenCLIP files do not hold.
    let folder_with_ids = out.path().join("with-position-ids");
    copy_model_folder(&folder_with_ids, &[])?;
    let te2 = folder_with_ids.join("text_encoder_2/model.safetensors");
    let mut tensors = candle_core::safetensors::load(&te2, &Device::Cpu)?;
    let ids = Tensor::arange(0i64, 77, &Device::Cpu)?.unsqueeze(0)?;
    tensors.insert("text_model.embeddings.position_ids".into(), ids);
    candle_core::safetensors::save(&tensors, &te2)?;
    let single = out.path().join("sdxl.safetensors");
    convert(
        folder_with_ids,
        single.clone(),
        OutputLayout::SingleFile,
        None,
    )?;
    assert_same_tensors(
        &tensors_of(&single)?,
        &tensors_of(&ldm_file())?,
        &[
            "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
            "conditioner.embedders.1.model.logit_scale",
        ],
        "folder → single file",
    );
    // Single file → folder: each component file holds the fixture folder's tensors (and CLIP's
    // position ids, which the file has and transformers ignores).
    let folder = out.path().join("sdxl");
    convert(
        ldm_file(),
        folder.clone(),
        OutputLayout::Diffusers,
        Some(sdxl()),
    )?;
    for file in [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
    ] {
        assert_same_tensors(
            &tensors_of(&folder.join(file))?,
            &tensors_of(&sdxl().join(file))?,
            &["embeddings.position_ids"],
            file,
        );
    }
    Ok(())
}

#[test]
fn training_on_the_single_file_equals_training_on_the_folder() -> Result<()> {
    let run = |base: PathBuf, base_config: Option<PathBuf>| -> Result<BTreeMap<String, Tensor>> {
        let out = tempfile::tempdir()?;
        let args = TrainArgs {
            base: Some(base.display().to_string()),
            base_config,
            steps: Some(2),
            ..sdxl_train_args(out.path())
        };
        lora_train::train(args.resolve()?, &mut |_| {}, &mut |_| {})?;
        tensors_of(&out.path().join("adapter.safetensors"))
    };
    let from_file = run(ldm_file(), Some(sdxl()))?;
    let from_folder = run(sdxl(), None)?;
    assert_same_tensors(
        &from_file,
        &from_folder,
        &[],
        "adapter trained on the single file",
    );
    Ok(())
}
