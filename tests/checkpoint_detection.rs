//! Recognising single-file checkpoints from their tensors, on the headers (names and shapes, no
//! data) of real-size SD 1.5, SD 2.1 and SDXL base files: `tests/fixtures/checkpoint_headers/*.json`,
//! written by `tests/reference/check_full_size.py` and `check_full_size_sdxl.py` from files that
//! diffusers' own `from_single_file` loaded tensor for tensor and whose model type diffusers'
//! `infer_diffusers_model_type` gave as `v1`, `v2` and `xl_base`. Variants of them stand for the
//! files we refuse (inpainting, the SDXL refiner, SD 3) and the extras real files carry (an EMA
//! copy, kohya's 1×1-conv projections in SD 2).

use std::collections::BTreeMap;

use anyhow::Result;
use lora_core::formats::checkpoint_kind::{
    ema_key, has_ema, identify_architecture, identify_prediction, PredictionHints,
};
use lora_core::formats::ldm::{LdmLayout, LdmTensor, ModelPart, TextEncoderLayout};
use lora_core::models::config::{Architecture, BuiltinConfigs, PredictionType};

mod common;

type Shapes = BTreeMap<String, Vec<usize>>;

fn header(name: &str) -> Result<Shapes> {
    let path = common::fixtures().join(format!("checkpoint_headers/{name}.json"));
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn shape<'a>(shapes: &'a Shapes, key: &str) -> &'a [usize] {
    shapes
        .get(key)
        .unwrap_or_else(|| panic!("the header has no `{key}`"))
}

/// The built-in configs of the recognised model agree with the file's shapes: context width,
/// text encoders' widths and depths, first UNet block, VAE latent channels.
fn check_builtin_fits(shapes: &Shapes, configs: BuiltinConfigs) -> Result<()> {
    let unet = configs.unet()?;
    let vae = configs.vae()?;
    let conv_in = shape(shapes, "model.diffusion_model.input_blocks.0.0.weight");
    assert_eq!(conv_in[..2], [unet.block_out_channels[0], unet.in_channels]);
    // The first attention: SDXL's first down block has none.
    let row = match configs.architecture {
        Architecture::Sdxl => 4,
        _ => 1,
    };
    let to_k = shape(
        shapes,
        &format!(
            "model.diffusion_model.input_blocks.{row}.1.transformer_blocks.0.attn2.to_k.weight"
        ),
    );
    assert_eq!(to_k[1], unet.cross_attention_dim);
    // (config, token embedding, layer prefix) per text encoder.
    let encoders = match configs.architecture {
        Architecture::Sd1 => vec![(
            configs.text_encoder()?,
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            "cond_stage_model.transformer.text_model.encoder.layers.",
        )],
        Architecture::Sd2 => vec![(
            configs.text_encoder()?,
            "cond_stage_model.model.token_embedding.weight",
            "cond_stage_model.model.transformer.resblocks.",
        )],
        Architecture::Sdxl => vec![
            (
                configs.text_encoder()?,
                "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                "conditioner.embedders.0.transformer.text_model.encoder.layers.",
            ),
            (
                configs.text_encoder_2()?,
                "conditioner.embedders.1.model.token_embedding.weight",
                "conditioner.embedders.1.model.transformer.resblocks.",
            ),
        ],
    };
    for (text, embedding, layer_prefix) in encoders {
        assert_eq!(
            shape(shapes, embedding),
            [text.vocab_size, text.hidden_size]
        );
        let layers = shapes
            .keys()
            .filter_map(|k| {
                k.strip_prefix(layer_prefix)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |n| n + 1);
        // SD 2 uses OpenCLIP's penultimate layer: diffusers' text encoder has 23 layers, a real
        // file 24 (the last unused), ours converted from a diffusers folder 23.
        let extra = usize::from(configs.architecture == Architecture::Sd2);
        assert!(
            (text.num_hidden_layers..=text.num_hidden_layers + extra).contains(&layers),
            "{layers} text encoder layers"
        );
    }
    let quant = shape(shapes, "first_stage_model.quant_conv.weight");
    assert_eq!(quant[0], 2 * vae.latent_channels);
    Ok(())
}

#[test]
fn real_size_headers_are_recognised_with_their_defaults() -> Result<()> {
    for (name, architecture, prediction, side) in [
        ("sd15", Architecture::Sd1, PredictionType::Epsilon, 512),
        ("sd21", Architecture::Sd2, PredictionType::VPrediction, 768),
        ("sdxl", Architecture::Sdxl, PredictionType::Epsilon, 1024),
    ] {
        let shapes = header(name)?;
        assert!(shapes.len() > 1000, "{name}: {} tensors", shapes.len());
        assert_eq!(identify_architecture(&shapes)?, architecture, "{name}");
        let (found, reason) = identify_prediction(architecture, &PredictionHints::default())?;
        println!("{name}: {architecture}, {found} ({reason})");
        assert_eq!(found, prediction, "{name}");
        let configs = BuiltinConfigs::new(architecture, prediction);
        assert_eq!(configs.resolution(), side);
        check_builtin_fits(&shapes, configs)?;
        assert!(!has_ema(shapes.keys()));
    }
    Ok(())
}

/// Every tensor of the SDXL header has its diffusers name, as many per model as diffusers read
/// from the file (`check_full_size_sdxl.py verify`: 1680, 248, 196 and 517), the second encoder's
/// stacked q/k/v counted as three.
#[test]
fn sdxl_header_maps_onto_the_diffusers_models() -> Result<()> {
    let shapes = header("sdxl")?;
    let layout = LdmLayout::detect(shapes.keys().map(String::as_str))?;
    assert_eq!(layout.text_encoder, TextEncoderLayout::Sdxl);
    let mut counts: BTreeMap<ModelPart, usize> = BTreeMap::new();
    for key in shapes.keys() {
        let parts = match layout.diffusers_name(key)? {
            LdmTensor::Renamed(t) | LdmTensor::Transposed(t) => vec![t.part],
            LdmTensor::StackedQkv(thirds) => thirds.map(|t| t.part).to_vec(),
            LdmTensor::Other => panic!("`{key}` is part of no model"),
        };
        for part in parts {
            *counts.entry(part).or_default() += 1;
        }
    }
    assert_eq!(
        counts,
        BTreeMap::from([
            (ModelPart::Unet, 1680),
            (ModelPart::Vae, 248),
            (ModelPart::TextEncoder, 196),
            (ModelPart::TextEncoder2, 517),
        ])
    );
    Ok(())
}

/// What Stability's and the fine-tuners' SDXL files carry beyond ours (CLIP's position ids,
/// OpenCLIP's logit scale, a sigma table, the v-pred and zero-SNR markers) leaves them SDXL base;
/// SDXL's inpainting UNet, Playground v2.5 and a distilled UNet are refused by name.
#[test]
fn sdxl_variants_are_told_apart() -> Result<()> {
    let sdxl = header("sdxl")?;
    let mut real = sdxl.clone();
    for (key, shape) in [
        (
            "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
            vec![1, 77],
        ),
        ("conditioner.embedders.1.model.logit_scale", vec![]),
        ("denoiser.sigmas", vec![1000]),
        ("v_pred", vec![]),
        ("ztsnr", vec![]),
    ] {
        real.insert(key.into(), shape);
    }
    assert_eq!(identify_architecture(&real)?, Architecture::Sdxl);
    let layout = LdmLayout::detect(real.keys().map(String::as_str))?;
    assert_eq!(
        layout.diffusers_name("conditioner.embedders.1.model.logit_scale")?,
        LdmTensor::Other
    );
    let hints = PredictionHints {
        v_pred_key: real.contains_key("v_pred"),
        ..Default::default()
    };
    assert_eq!(
        identify_prediction(Architecture::Sdxl, &hints)?.0,
        PredictionType::VPrediction
    );

    let conv_in = "model.diffusion_model.input_blocks.0.0.weight";
    let mut inpainting = sdxl.clone();
    inpainting.insert(conv_in.into(), vec![320, 9, 3, 3]);
    let mut playground = sdxl.clone();
    playground.insert("edm_mean".into(), vec![1, 4, 1, 1]);
    let mut distilled = sdxl.clone();
    distilled.retain(|k, _| !k.contains("input_blocks.7.1.transformer_blocks.9."));
    for (shapes, what) in [
        (inpainting, "inpainting"),
        (playground, "Playground"),
        (distilled, "distilled"),
    ] {
        let err = identify_architecture(&shapes).unwrap_err().to_string();
        assert!(err.contains(what), "{err}");
    }
    Ok(())
}

#[test]
fn kohya_style_sd2_with_conv_projections_is_still_sd2() -> Result<()> {
    let mut shapes = header("sd21")?;
    for (key, shape) in shapes.iter_mut() {
        if key.ends_with("proj_in.weight") || key.ends_with("proj_out.weight") {
            shape.extend([1, 1]);
        }
    }
    assert_eq!(identify_architecture(&shapes)?, Architecture::Sd2);
    Ok(())
}

#[test]
fn files_of_other_models_are_refused_by_name() -> Result<()> {
    let sd15 = header("sd15")?;
    let conv_in = "model.diffusion_model.input_blocks.0.0.weight";
    for (channels, what) in [(9, "inpainting"), (8, "InstructPix2Pix")] {
        let mut shapes = sd15.clone();
        shapes.insert(conv_in.into(), vec![320, channels, 3, 3]);
        let err = identify_architecture(&shapes).unwrap_err().to_string();
        assert!(
            err.contains(what) && err.contains(&format!("{channels} input channels")),
            "{err}"
        );
    }
    for (key, what) in [
        (
            "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias",
            "SDXL refiner",
        ),
        (
            "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
            "Stable Diffusion 3",
        ),
        (
            "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale",
            "Flux",
        ),
    ] {
        let mut shapes = sd15.clone();
        shapes.insert(key.into(), vec![1]);
        let err = identify_architecture(&shapes).unwrap_err().to_string();
        assert!(err.contains(what), "{err}");
    }
    // An SD 1 UNet with SD 2's text encoder (or none) is no model we know.
    let mut shapes = sd15.clone();
    shapes.retain(|k, _| !k.starts_with("cond_stage_model."));
    let err = identify_architecture(&shapes).unwrap_err().to_string();
    assert!(err.contains("no CLIP text encoder"), "{err}");
    Ok(())
}

#[test]
fn an_ema_copy_is_found_under_flattened_names() -> Result<()> {
    let mut shapes = header("sd15")?;
    let unet: Vec<(String, Vec<usize>)> = shapes
        .iter()
        .filter(|(k, _)| k.starts_with("model.diffusion_model."))
        .map(|(k, s)| (k.clone(), s.clone()))
        .collect();
    for (key, shape) in unet {
        let ema = ema_key(&key).expect("a UNet key");
        assert!(!ema["model_ema.".len()..].contains('.'), "{ema}");
        shapes.insert(ema, shape);
    }
    assert!(has_ema(shapes.keys()));
    assert_eq!(identify_architecture(&shapes)?, Architecture::Sd1);
    Ok(())
}

/// A file with the few tensors recognition reads, at their real shapes: SD 1.x's first
/// convolution and cross-attention key projection, one CLIP tensor, and the output blocks the LDM
/// layout needs. Opening it reads no weight, so the data can be this small.
fn recognisable_sd1_file(dir: &std::path::Path) -> Result<std::path::PathBuf> {
    use candle_core::{DType, Device, Tensor};
    let dev = Device::Cpu;
    let tensors: std::collections::HashMap<String, Tensor> = [
        (
            "model.diffusion_model.input_blocks.0.0.weight",
            vec![320, 4, 3, 3],
        ),
        (
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            vec![320, 768],
        ),
        (
            "model.diffusion_model.output_blocks.0.0.in_layers.2.weight",
            vec![4],
        ),
        (
            "model.diffusion_model.output_blocks.1.0.in_layers.2.weight",
            vec![4],
        ),
        (
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            vec![768],
        ),
    ]
    .into_iter()
    .map(|(k, s)| Ok((k.to_owned(), Tensor::zeros(s, DType::F16, &dev)?)))
    .collect::<Result<_>>()?;
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    Ok(path)
}

/// The A1111 `.yaml` beside a file says its prediction type; `--prediction-type` wins over it,
/// even over one that cannot be understood.
#[test]
fn the_yaml_beside_a_file_and_the_override() -> Result<()> {
    use lora_core::source::{BaseChoices, ModelSource};
    let dir = tempfile::tempdir()?;
    let file = recognisable_sd1_file(dir.path())?;
    let open = |prediction| {
        ModelSource::parse(file.to_str().unwrap())?.open(&BaseChoices {
            prediction,
            no_ema: false,
        })
    };
    let plain = open(None)?;
    assert!(
        plain.describe().contains("SD 1.x, 512×512, epsilon"),
        "{}",
        plain.describe()
    );

    let yaml = dir.path().join("model.yaml");
    std::fs::write(&yaml, "model:\n  params:\n    parameterization: \"v\"\n")?;
    let model = open(None)?;
    assert_eq!(
        model.scheduler_config()?.prediction_type,
        PredictionType::VPrediction
    );
    assert!(
        model.describe().contains("model.yaml"),
        "{}",
        model.describe()
    );

    std::fs::write(&yaml, "model:\n  params:\n    parameterization: x0\n")?;
    let err = format!("{:#}", open(None).unwrap_err());
    assert!(err.contains("model.yaml") && err.contains("x0"), "{err}");
    let model = open(Some(PredictionType::Epsilon))?;
    assert_eq!(
        model.scheduler_config()?.prediction_type,
        PredictionType::Epsilon
    );
    assert!(
        model.describe().contains("--prediction-type"),
        "{}",
        model.describe()
    );
    Ok(())
}
