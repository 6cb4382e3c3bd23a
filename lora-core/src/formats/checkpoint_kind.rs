//! Which model a single-file checkpoint holds, read from its tensor names and shapes, and what its
//! UNet predicts, read from what the file (or the A1111 `.yaml` beside it) says.
//!
//! Architecture: SDXL base by its two text encoders (`conditioner.embedders.0/1`); otherwise the
//! cross-attention context width (768 for SD 1.x's CLIP, 1024 for SD 2.x's OpenCLIP) must agree
//! with the text encoder stored. Files of models we do not build (the SDXL refiner, SD 3, Flux,
//! Playground v2.5, inpainting and other UNets with extra input channels, ControlNets, unCLIP,
//! the x4 upscaler) are refused naming what they are, before any tensor is read.
//!
//! Prediction type, first found wins: a `v_pred` tensor (ComfyUI's and kohya's marker); the
//! `modelspec.prediction_type` metadata (Stability's model spec, which kohya writes); an A1111
//! `NAME.yaml` beside `NAME.safetensors` (`parameterization: "v"`, LDM's default is ε); a
//! `global_step` of 875000 (SD 2.x-base's, diffusers' rule); otherwise ε for SD 1.x and SDXL and
//! v-prediction for SD 2.x (the 768² model, which diffusers assumes too).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Result};

use crate::formats::ldm::{
    CLIP_PREFIX, OPEN_CLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX, UNET_PREFIX,
};
use crate::models::config::{Architecture, PredictionType};

/// A tensor whose last dimension is the cross-attention context width.
const CONTEXT_KEY: &str =
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";
/// The same in SDXL, whose first down block has no attention.
const SDXL_CONTEXT_KEY: &str =
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight";
/// SDXL base's context width: CLIP ViT-L's 768 and OpenCLIP ViT-bigG's 1280 side by side.
const SDXL_CONTEXT_WIDTH: usize = 2048;
/// SDXL's added conditioning (`add_embedding.linear_1`): `[1280, 2816]`, the pooled embedding
/// (1280) and six size ids of 256 features each.
const SDXL_ADDED_KEY: &str = "model.diffusion_model.label_emb.0.0.weight";
/// The last of the ten transformer layers of SDXL base's third down block: distilled SDXL UNets
/// (SSD-1B, Vega) have fewer, and another config.
const SDXL_DEPTH_KEY: &str =
    "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight";
/// The UNet's first convolution: `[320, input channels, 3, 3]`.
const CONV_IN_KEY: &str = "model.diffusion_model.input_blocks.0.0.weight";
/// SD 2.x-base's training step count, by which diffusers tells a single-file SD 2 base model.
const SD2_BASE_GLOBAL_STEP: i64 = 875_000;
/// More `model_ema.` tensors than this means the file holds a whole EMA copy of the UNet
/// (diffusers' threshold).
const EMA_MIN_TENSORS: usize = 100;
/// Key prefix of the EMA copy; its names are the UNet's with `model.` cut and the dots removed.
pub const EMA_PREFIX: &str = "model_ema.";

/// Where SDXL-family single files keep their text encoders.
const SDXL_PREFIX: &str = "conditioner.embedders.";

/// Key prefixes of models that are not SD 1.x/2.x or SDXL base, and what to call them. The
/// `conditioner.embedders.` ones do not apply to a file with both SDXL base text encoders.
const OTHER_MODELS: &[(&str, &str)] = &[
    (
        "conditioner.embedders.0.model.",
        "an SDXL refiner checkpoint",
    ),
    ("conditioner.embedders.", "an SDXL-family checkpoint"),
    (
        "model.diffusion_model.joint_blocks.",
        "a Stable Diffusion 3 checkpoint",
    ),
    ("joint_blocks.", "a Stable Diffusion 3 checkpoint"),
    ("model.diffusion_model.double_blocks.", "a Flux checkpoint"),
    ("double_blocks.", "a Flux checkpoint"),
    ("edm_mean", "a Playground v2.5 checkpoint"),
    ("control_model.", "a ControlNet"),
    ("embedder.model.", "a Stable unCLIP checkpoint"),
    ("noise_augmentor.", "a Stable unCLIP checkpoint"),
    (
        "depth_model.",
        "a Stable Diffusion 2 depth-to-image checkpoint",
    ),
];

/// What the UNet is for, by its number of input channels.
fn input_channels_kind(channels: usize) -> &'static str {
    match channels {
        9 => "an inpainting model",
        8 => "an InstructPix2Pix model",
        7 => "the x4 upscaler",
        5 => "a depth-to-image model",
        _ => "not a text-to-image model",
    }
}

/// Whether `keys` hold SDXL base's two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG).
pub fn has_sdxl_text_encoders<'a>(keys: impl Iterator<Item = &'a str> + Clone) -> bool {
    let has = |prefix: &str| keys.clone().any(|k| k.starts_with(prefix));
    has(SDXL_CLIP_PREFIX) && has(SDXL_OPEN_CLIP_PREFIX)
}

/// An error naming the model, for the checkpoint of a model other than SD 1.x/2.x or SDXL base
/// with tensors named `keys` (the SDXL refiner, SD 3, Flux…).
pub fn refuse_other_models<'a>(keys: impl Iterator<Item = &'a str> + Clone) -> Result<()> {
    let sdxl_base = has_sdxl_text_encoders(keys.clone());
    for (prefix, what) in OTHER_MODELS {
        if sdxl_base && prefix.starts_with(SDXL_PREFIX) {
            continue;
        }
        if keys.clone().any(|k| k.starts_with(prefix)) {
            bail!(
                "this is {what} (it has `{prefix}…` tensors); only SD 1.x, SD 2.x and SDXL base \
                 single-file checkpoints are supported"
            );
        }
    }
    Ok(())
}

/// The architecture of a single-file checkpoint with these tensor `shapes`, or an error naming
/// what else it is.
pub fn identify_architecture(shapes: &BTreeMap<String, Vec<usize>>) -> Result<Architecture> {
    refuse_other_models(shapes.keys().map(String::as_str))?;
    ensure!(
        shapes.keys().any(|k| k.starts_with(UNET_PREFIX)),
        "no `{UNET_PREFIX}…` tensors: not a single-file (LDM) Stable Diffusion checkpoint"
    );
    let conv_in = shapes
        .get(CONV_IN_KEY)
        .filter(|s| s.len() == 4)
        .ok_or_else(|| anyhow::anyhow!("no 4-D `{CONV_IN_KEY}`: not an SD 1.x/2.x/SDXL UNet"))?;
    ensure!(
        conv_in[1] == 4,
        "the UNet takes {} input channels (`{CONV_IN_KEY}` is {conv_in:?}): {}; only \
         text-to-image models (4 latent channels) are supported",
        conv_in[1],
        input_channels_kind(conv_in[1])
    );
    ensure!(
        conv_in[0] == 320,
        "the UNet's first block has {} channels (`{CONV_IN_KEY}` is {conv_in:?}), SD 1.x/2.x have \
         320: a different architecture; pass --base-config with a diffusers folder of its configs",
        conv_in[0]
    );
    if has_sdxl_text_encoders(shapes.keys().map(String::as_str)) {
        return identify_sdxl(shapes);
    }
    let context = shapes
        .get(CONTEXT_KEY)
        .and_then(|s| s.last())
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no `{CONTEXT_KEY}`: not an SD 1.x/2.x UNet"))?;
    let has = |prefix: &str| shapes.keys().any(|k| k.starts_with(prefix));
    let (architecture, encoder, encoder_prefix) = match context {
        768 => (Architecture::Sd1, "CLIP", CLIP_PREFIX),
        1024 => (Architecture::Sd2, "OpenCLIP", OPEN_CLIP_PREFIX),
        other => bail!(
            "cross-attention context width {other} (`{CONTEXT_KEY}`): neither SD 1.x (768) nor \
             SD 2.x (1024)"
        ),
    };
    ensure!(
        has(encoder_prefix),
        "the UNet is {architecture} (context width {context}) but the file has no {encoder} text \
         encoder (`{encoder_prefix}…`)"
    );
    Ok(architecture)
}

/// SDXL base, once its two text encoders are found: the UNet must take their 2048-wide context
/// and have the added size/text conditioning.
fn identify_sdxl(shapes: &BTreeMap<String, Vec<usize>>) -> Result<Architecture> {
    let context = shapes.get(SDXL_CONTEXT_KEY).and_then(|s| s.last()).copied();
    ensure!(
        context == Some(SDXL_CONTEXT_WIDTH),
        "the file has SDXL's two text encoders but its UNet's context width (last dimension of \
         `{SDXL_CONTEXT_KEY}`) is {}, SDXL base's is {SDXL_CONTEXT_WIDTH}; pass --base-config \
         with a diffusers folder of its configs",
        context.map_or("missing".to_owned(), |c| c.to_string())
    );
    ensure!(
        shapes.contains_key(SDXL_ADDED_KEY),
        "the file has SDXL's two text encoders but no `{SDXL_ADDED_KEY}` (SDXL's added \
         size/text conditioning)"
    );
    ensure!(
        shapes.contains_key(SDXL_DEPTH_KEY),
        "an SDXL UNet without SDXL base's ten transformer layers in its third block (no \
         `{SDXL_DEPTH_KEY}`): a distilled or other SDXL variant; pass --base-config with a \
         diffusers folder of its configs"
    );
    Ok(Architecture::Sdxl)
}

/// Whether the file holds an EMA copy of the UNet beside its plain weights.
pub fn has_ema(keys: impl Iterator<Item = impl AsRef<str>>) -> bool {
    keys.filter(|k| k.as_ref().starts_with(EMA_PREFIX)).count() > EMA_MIN_TENSORS
}

/// The EMA copy's key for UNet key `key` (`model.diffusion_model.x.0.w` →
/// `model_ema.diffusion_modelx0w`), `None` for keys outside the UNet.
pub fn ema_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix("model.")?;
    rest.starts_with("diffusion_model.")
        .then(|| format!("{EMA_PREFIX}{}", rest.replace('.', "")))
}

/// What the checkpoint says about its prediction type, and where it says it.
#[derive(Debug, Default)]
pub struct PredictionHints<'a> {
    /// The file has a `v_pred` tensor.
    pub v_pred_key: bool,
    /// The header's `__metadata__`.
    pub metadata: Option<&'a BTreeMap<String, String>>,
    /// An A1111 config beside the file, with its path.
    pub yaml: Option<(&'a Path, &'a str)>,
    /// The file's `global_step` scalar, if it has one.
    pub global_step: Option<i64>,
}

/// The prediction type of an `architecture` checkpoint with these hints, and why.
pub fn identify_prediction(
    architecture: Architecture,
    hints: &PredictionHints,
) -> Result<(PredictionType, String)> {
    if hints.v_pred_key {
        return Ok((
            PredictionType::VPrediction,
            "the file's `v_pred` marker".into(),
        ));
    }
    if let Some(value) = hints
        .metadata
        .and_then(|m| m.get("modelspec.prediction_type"))
    {
        let prediction = match value.as_str() {
            "v" | "v_prediction" => PredictionType::VPrediction,
            "epsilon" | "eps" => PredictionType::Epsilon,
            other => bail!(
                "metadata modelspec.prediction_type = {other:?}: expected \"epsilon\" or \"v\" \
                 (override with --prediction-type)"
            ),
        };
        return Ok((prediction, "the file's modelspec.prediction_type".into()));
    }
    if let Some((path, text)) = hints.yaml {
        return yaml_parameterization(text)
            .map(|p| (p, format!("parameterization in {}", path.display())))
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    }
    if architecture == Architecture::Sd2 && hints.global_step == Some(SD2_BASE_GLOBAL_STEP) {
        return Ok((
            PredictionType::Epsilon,
            format!("global_step {SD2_BASE_GLOBAL_STEP}, SD 2.x-base's"),
        ));
    }
    Ok(match architecture {
        Architecture::Sd1 => (PredictionType::Epsilon, "the SD 1.x default".into()),
        Architecture::Sdxl => (PredictionType::Epsilon, "the SDXL default".into()),
        Architecture::Sd2 => (
            PredictionType::VPrediction,
            "the SD 2.x default, the 768×768 model as in diffusers; --prediction-type epsilon \
             for a 512×512 SD 2.x-base model"
                .into(),
        ),
    })
}

/// The `parameterization:` of an LDM config (`v` or `eps`, LDM's default when absent), or for an
/// SGM (SDXL) config its denoiser scaling (`…denoiser_scaling.VScaling` or `EpsScaling`). A line
/// scan rather than a YAML parser: the key appears once, under `model.params`, in every LDM
/// config.
fn yaml_parameterization(text: &str) -> Result<PredictionType> {
    let code = || {
        text.lines()
            .map(|line| line.split('#').next().unwrap_or_default())
    };
    if code().any(|line| line.contains("denoiser_scaling.VScaling")) {
        return Ok(PredictionType::VPrediction);
    }
    if code().any(|line| line.contains("denoiser_scaling.EpsScaling")) {
        return Ok(PredictionType::Epsilon);
    }
    let value = text.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or_default().trim();
        let value = line.strip_prefix("parameterization:")?;
        Some(value.trim().trim_matches(['"', '\'']).to_owned())
    });
    match value.as_deref() {
        None | Some("eps") => Ok(PredictionType::Epsilon),
        Some("v") => Ok(PredictionType::VPrediction),
        Some(other) => bail!(
            "parameterization {other:?}: expected \"eps\" or \"v\" (override with \
             --prediction-type)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(entries: &[(&str, &[usize])]) -> BTreeMap<String, Vec<usize>> {
        entries
            .iter()
            .map(|(k, s)| ((*k).to_owned(), s.to_vec()))
            .collect()
    }

    fn sd(context: usize, conv_in: usize, encoder: &str) -> BTreeMap<String, Vec<usize>> {
        shapes(&[
            (CONV_IN_KEY, &[320, conv_in, 3, 3]),
            (CONTEXT_KEY, &[320, context]),
            (encoder, &[1]),
        ])
    }

    #[test]
    fn tells_sd1_from_sd2_and_checks_the_text_encoder() {
        let clip = "cond_stage_model.transformer.text_model.final_layer_norm.weight";
        let open_clip = "cond_stage_model.model.ln_final.weight";
        assert_eq!(
            identify_architecture(&sd(768, 4, clip)).unwrap(),
            Architecture::Sd1
        );
        assert_eq!(
            identify_architecture(&sd(1024, 4, open_clip)).unwrap(),
            Architecture::Sd2
        );
        let err = identify_architecture(&sd(1024, 4, clip)).unwrap_err();
        assert!(
            err.to_string().contains("no OpenCLIP text encoder"),
            "{err}"
        );
        let err = identify_architecture(&sd(1280, 4, clip)).unwrap_err();
        assert!(err.to_string().contains("context width 1280"), "{err}");
    }

    #[test]
    fn names_what_it_does_not_build() {
        let clip = "cond_stage_model.transformer.text_model.final_layer_norm.weight";
        let err = identify_architecture(&sd(768, 9, clip)).unwrap_err();
        assert!(err.to_string().contains("inpainting"), "{err}");
        let refiner = shapes(&[("conditioner.embedders.0.model.ln_final.weight", &[1280])]);
        let err = identify_architecture(&refiner).unwrap_err();
        assert!(err.to_string().contains("SDXL refiner"), "{err}");
        // One SDXL text encoder alone is no model we build.
        let mut half = sd(768, 4, clip);
        half.insert(
            "conditioner.embedders.1.model.ln_final.weight".into(),
            vec![1],
        );
        let err = identify_architecture(&half).unwrap_err();
        assert!(err.to_string().contains("SDXL-family"), "{err}");
    }

    #[test]
    fn sdxl_base_by_its_two_encoders_context_and_added_conditioning() {
        let mut xl = shapes(&[
            (CONV_IN_KEY, &[320, 4, 3, 3]),
            (SDXL_CONTEXT_KEY, &[640, 2048]),
            (SDXL_ADDED_KEY, &[1280, 2816]),
            (SDXL_DEPTH_KEY, &[1280, 2048]),
            (
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                &[768],
            ),
            ("conditioner.embedders.1.model.ln_final.weight", &[1280]),
        ]);
        assert_eq!(identify_architecture(&xl).unwrap(), Architecture::Sdxl);
        let hints = PredictionHints::default();
        assert_eq!(
            identify_prediction(Architecture::Sdxl, &hints).unwrap().0,
            PredictionType::Epsilon
        );
        // Playground v2.5 has SDXL's encoders and is still refused.
        let mut playground = xl.clone();
        playground.insert("edm_mean".into(), vec![1, 4, 1, 1]);
        let err = identify_architecture(&playground).unwrap_err();
        assert!(err.to_string().contains("Playground"), "{err}");
        let mut distilled = xl.clone();
        distilled.remove(SDXL_DEPTH_KEY);
        let err = identify_architecture(&distilled).unwrap_err();
        assert!(err.to_string().contains("distilled"), "{err}");
        xl.remove(SDXL_ADDED_KEY);
        let err = identify_architecture(&xl).unwrap_err();
        assert!(err.to_string().contains("label_emb"), "{err}");
        xl.insert(SDXL_CONTEXT_KEY.into(), vec![640, 1280]);
        let err = identify_architecture(&xl).unwrap_err();
        assert!(err.to_string().contains("is 1280"), "{err}");
    }

    #[test]
    fn ema_keys_drop_the_dots() {
        assert_eq!(
            ema_key("model.diffusion_model.input_blocks.1.1.proj_in.weight").as_deref(),
            Some("model_ema.diffusion_modelinput_blocks11proj_inweight")
        );
        assert_eq!(ema_key("first_stage_model.encoder.conv_in.weight"), None);
        assert!(!has_ema(
            ["model_ema.decay", "model_ema.num_updates"].iter()
        ));
    }

    #[test]
    fn prediction_hints_in_order() {
        let v = PredictionType::VPrediction;
        let eps = PredictionType::Epsilon;
        let sd1 = Architecture::Sd1;
        let sd2 = Architecture::Sd2;
        let check = |arch, hints: PredictionHints, expected| {
            assert_eq!(identify_prediction(arch, &hints).unwrap().0, expected);
        };
        check(sd1, PredictionHints::default(), eps);
        check(sd2, PredictionHints::default(), v);
        let spec = BTreeMap::from([("modelspec.prediction_type".to_owned(), "v".to_owned())]);
        check(
            sd1,
            PredictionHints {
                metadata: Some(&spec),
                ..Default::default()
            },
            v,
        );
        let yaml = "model:\n  params:\n    parameterization: \"v\"  # velocity\n";
        let path = Path::new("m.yaml");
        check(
            sd1,
            PredictionHints {
                yaml: Some((path, yaml)),
                ..Default::default()
            },
            v,
        );
        check(
            sd2,
            PredictionHints {
                yaml: Some((path, "model:\n  params:\n    linear_start: 0.00085\n")),
                ..Default::default()
            },
            eps,
        );
        check(
            sd2,
            PredictionHints {
                global_step: Some(875_000),
                ..Default::default()
            },
            eps,
        );
        check(
            sd1,
            PredictionHints {
                v_pred_key: true,
                yaml: Some((path, "parameterization: eps")),
                ..Default::default()
            },
            v,
        );
        // SGM (SDXL) configs say it by their denoiser scaling.
        let sgm = |scaling: &str| {
            format!(
                "model:\n  params:\n    denoiser_config:\n      params:\n        \
                 scaling_config:\n          target: \
                 sgm.modules.diffusionmodules.denoiser_scaling.{scaling}\n"
            )
        };
        for (scaling, expected) in [("VScaling", v), ("EpsScaling", eps)] {
            let text = sgm(scaling);
            check(
                Architecture::Sdxl,
                PredictionHints {
                    yaml: Some((path, &text)),
                    ..Default::default()
                },
                expected,
            );
        }
        let bad = PredictionHints {
            yaml: Some((path, "parameterization: x0")),
            ..Default::default()
        };
        let err = identify_prediction(sd1, &bad).unwrap_err().to_string();
        assert!(err.contains("m.yaml") && err.contains("x0"), "{err}");
    }
}
