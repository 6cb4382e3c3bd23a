//! SDXL parity with diffusers on the tiny random SDXL pipeline of
//! `tests/reference/make_sdxl_fixtures.py` (`tests/fixtures/sdxl-tiny/`): the UNet with its added
//! conditioning (pooled text embedding and micro-conditioning ids) on non-square latents, the
//! gradients of a LoRA on every transformer Linear and of the pooled embedding, and the prompt
//! encoding of both text encoders.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use common::{fixtures, get, max_abs, max_abs_diff, rel_err};
use lora_toolkit::core::formats::adapter_file::{AdapterFile, ModelModules};
use lora_toolkit::core::io::weights::component_weights;
use lora_toolkit::core::models::config::{ClipTextConfig, UNetConfig};
use lora_toolkit::core::models::sdxl_prompt::SdxlTextEncoders;
use lora_toolkit::core::models::text_encoder::TextEncoder;
use lora_toolkit::core::models::tokenizer::ClipTokenizer;
use lora_toolkit::core::{AdapterModule, AddedConditioning, LoraModule, UNet2DConditionModel};

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

#[test]
fn lora_and_pooled_embedding_gradients_match_pytorch() -> Result<()> {
    let exp = expected()?;
    for checkpointed in [false, true] {
        let mut unet = load_unet()?;
        let modules = ModelModules {
            unet: unet.lora_modules(),
            text_encoder: None,
        };
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
        assert_eq!(
            vars.len(),
            reference_count,
            "every reference gradient is compared"
        );
        let mut worst = (0f32, String::new());
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
            let err = rel_err(grad, &reference);
            if err > worst.0 {
                worst = (err, key.clone());
            }
        }
        println!(
            "SDXL {label}: {} LoRA tensors and the pooled embedding; worst relative gradient error {:.2e} ({})",
            vars.len(),
            worst.0,
            worst.1
        );
        assert!(
            worst.0 < 1e-3,
            "{label}: gradient error {} at {}",
            worst.0,
            worst.1
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
