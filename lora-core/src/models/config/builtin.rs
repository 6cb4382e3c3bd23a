//! The configuration files of the Stable Diffusion models people have as single files, embedded so
//! that a single-file checkpoint needs no folder of configs: SD 1.x (CLIP ViT-L, 512²), SD 2.x-base
//! (OpenCLIP ViT-H, 512², ε), SD 2.x (768², v-prediction) and SDXL base (CLIP ViT-L and OpenCLIP
//! ViT-bigG, 1024²). The values are those of the diffusers folders
//! `stable-diffusion-v1-5/stable-diffusion-v1-5`, `stabilityai/stable-diffusion-2-1-base`,
//! `stabilityai/stable-diffusion-2-1` and `stabilityai/stable-diffusion-xl-base-1.0`
//! (`builtin/*.json`); the two SD 2 folders differ only in the sample size, attention upcasting and
//! the prediction type, which [`BuiltinConfigs`] sets. SDXL's first text encoder is SD 1.x's, and
//! its VAE has SD's architecture with its own scaling factor and fp16 upcast flag.

use std::fmt;

use anyhow::{Context, Result};
use serde_json::Value;

use super::{ClipTextConfig, PredictionType, SchedulerConfig, UNetConfig, VaeConfig};

/// Which Stable Diffusion architecture a model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    /// SD 1.x: CLIP ViT-L/14 text encoder (768-wide context), convolutional projections.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H/14 text encoder (1024-wide context, penultimate layer), linear
    /// projections.
    Sd2,
    /// SDXL base: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 (2048-wide context), added size/text
    /// conditioning.
    Sdxl,
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Sd1 => "SD 1.x",
            Self::Sd2 => "SD 2.x",
            Self::Sdxl => "SDXL",
        })
    }
}

/// The configs of one built-in model: an architecture, what its UNet predicts, and whether it was
/// trained with zero terminal SNR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinConfigs {
    pub architecture: Architecture,
    pub prediction: PredictionType,
    /// The schedule's betas rescaled to zero SNR at the last step (a file's `ztsnr` marker, as
    /// v-prediction SDXL fine-tunes carry it), sampled with trailing timesteps as diffusers
    /// recommends for such models.
    pub zero_terminal_snr: bool,
}

impl BuiltinConfigs {
    /// The configs of `architecture` predicting `prediction`, with the standard schedule.
    pub fn new(architecture: Architecture, prediction: PredictionType) -> Self {
        Self {
            architecture,
            prediction,
            zero_terminal_snr: false,
        }
    }

    /// The image side the model was trained at: SDXL's is 1024², SD 2.x with v-prediction is the
    /// 768² model, everything else 512².
    pub fn resolution(&self) -> usize {
        match self.architecture {
            Architecture::Sdxl => 1024,
            _ if self.is_sd2_768() => 768,
            _ => 512,
        }
    }

    fn is_sd2_768(&self) -> bool {
        self.architecture == Architecture::Sd2 && self.prediction == PredictionType::VPrediction
    }

    /// `unet/config.json`.
    pub fn unet_json(&self) -> String {
        let text = match self.architecture {
            Architecture::Sd1 => include_str!("builtin/sd1_unet.json"),
            Architecture::Sd2 => include_str!("builtin/sd2_unet.json"),
            Architecture::Sdxl => include_str!("builtin/sdxl_unet.json"),
        };
        if self.architecture != Architecture::Sd2 || self.is_sd2_768() {
            return text.to_owned();
        }
        // stable-diffusion-2-1-base: 64×64 latents, attention not upcast.
        patched(
            text,
            &[
                ("sample_size", Value::from(64)),
                ("upcast_attention", Value::Bool(false)),
            ],
        )
    }

    /// `text_encoder/config.json`.
    pub fn text_encoder_json(&self) -> String {
        match self.architecture {
            Architecture::Sd1 | Architecture::Sdxl => include_str!("builtin/sd1_text_encoder.json"),
            Architecture::Sd2 => include_str!("builtin/sd2_text_encoder.json"),
        }
        .to_owned()
    }

    /// `text_encoder_2/config.json`, SDXL's only.
    pub fn text_encoder_2_json(&self) -> Option<String> {
        (self.architecture == Architecture::Sdxl)
            .then(|| include_str!("builtin/sdxl_text_encoder_2.json").to_owned())
    }

    /// `vae/config.json` (the same VAE architecture for every model; its nominal sample size
    /// differs, and SDXL's has its own latent scale and must not decode in fp16).
    pub fn vae_json(&self) -> String {
        let mut changes = vec![("sample_size", Value::from(self.resolution()))];
        if self.architecture == Architecture::Sdxl {
            changes.push(("scaling_factor", Value::from(SDXL_SCALING_FACTOR)));
            changes.push(("force_upcast", Value::Bool(true)));
        }
        patched(include_str!("builtin/vae.json"), &changes)
    }

    /// `scheduler/scheduler_config.json`, with the prediction type set.
    pub fn scheduler_json(&self) -> String {
        let text = match self.architecture {
            Architecture::Sd1 => include_str!("builtin/sd1_scheduler.json"),
            Architecture::Sd2 => include_str!("builtin/sd2_scheduler.json"),
            Architecture::Sdxl => include_str!("builtin/sdxl_scheduler.json"),
        };
        let mut changes = vec![("prediction_type", Value::from(self.prediction.name()))];
        if self.zero_terminal_snr {
            changes.push(("rescale_betas_zero_snr", Value::Bool(true)));
            changes.push(("timestep_spacing", Value::from("trailing")));
        }
        patched(text, &changes)
    }

    /// The token prompts are padded with: SD 1.x (and SDXL's first tokenizer) pads with
    /// `<|endoftext|>`, SD 2.x with `!` (OpenCLIP's tokenizer pads with id 0).
    pub fn pad_token(&self) -> &'static str {
        match self.architecture {
            Architecture::Sd1 | Architecture::Sdxl => "<|endoftext|>",
            Architecture::Sd2 => "!",
        }
    }

    pub fn unet(&self) -> Result<UNetConfig> {
        UNetConfig::from_json(&self.unet_json()).context("built-in UNet config")
    }

    pub fn text_encoder(&self) -> Result<ClipTextConfig> {
        ClipTextConfig::parse(&self.text_encoder_json()).context("built-in text encoder config")
    }

    /// SDXL's second text encoder's config; an error for other architectures.
    pub fn text_encoder_2(&self) -> Result<ClipTextConfig> {
        let json = self
            .text_encoder_2_json()
            .with_context(|| format!("{} has no second text encoder", self.architecture))?;
        ClipTextConfig::parse(&json).context("built-in second text encoder config")
    }

    pub fn vae(&self) -> Result<VaeConfig> {
        VaeConfig::parse(&self.vae_json()).context("built-in VAE config")
    }

    pub fn scheduler(&self) -> Result<SchedulerConfig> {
        SchedulerConfig::parse(&self.scheduler_json()).context("built-in scheduler config")
    }

    /// What this is, for messages: `SD 2.x, 768×768, v_prediction`.
    pub fn describe(&self) -> String {
        let side = self.resolution();
        let snr = match self.zero_terminal_snr {
            true => ", zero terminal SNR",
            false => "",
        };
        format!(
            "{}, {side}×{side}, {}{snr}",
            self.architecture, self.prediction
        )
    }
}

/// SDXL's VAE latent scale (its `vae/config.json`).
const SDXL_SCALING_FACTOR: f64 = 0.13025;

/// `json` (an object) with `changes` set, pretty-printed.
fn patched(json: &str, changes: &[(&str, Value)]) -> String {
    let mut object: serde_json::Map<String, Value> =
        serde_json::from_str(json).expect("the built-in configs are JSON objects");
    for (key, value) in changes {
        object.insert((*key).to_owned(), value.clone());
    }
    serde_json::to_string_pretty(&object).expect("a JSON object serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<BuiltinConfigs> {
        let mut all = Vec::new();
        for architecture in [Architecture::Sd1, Architecture::Sd2, Architecture::Sdxl] {
            for prediction in [PredictionType::Epsilon, PredictionType::VPrediction] {
                all.push(BuiltinConfigs::new(architecture, prediction));
            }
        }
        all
    }

    #[test]
    fn every_builtin_config_parses_and_agrees() {
        for configs in all() {
            let unet = configs.unet().unwrap();
            let text = configs.text_encoder().unwrap();
            let vae = configs.vae().unwrap();
            let scheduler = configs.scheduler().unwrap();
            let context = match configs.text_encoder_2_json() {
                Some(_) => text.hidden_size + configs.text_encoder_2().unwrap().hidden_size,
                None => text.hidden_size,
            };
            assert_eq!(unet.cross_attention_dim, context, "{configs:?}");
            assert_eq!(scheduler.prediction_type, configs.prediction);
            let side = unet.sample_size.unwrap() * vae.vae_scale_factor();
            assert_eq!(side, configs.resolution(), "{configs:?}");
        }
    }

    #[test]
    fn sdxl_configs_are_sdxl_base() {
        let sdxl = BuiltinConfigs::new(Architecture::Sdxl, PredictionType::Epsilon);
        let text_time = sdxl.unet().unwrap().text_time.unwrap();
        let pooled = sdxl.text_encoder_2().unwrap().projection_dim.unwrap();
        assert_eq!(text_time.input_dim, pooled + 6 * text_time.time_embed_dim);
        let vae = sdxl.vae().unwrap();
        assert_eq!((vae.scaling_factor, vae.force_upcast), (0.13025, true));
        assert_eq!(
            sdxl.scheduler().unwrap().class_name.as_deref(),
            Some("EulerDiscreteScheduler")
        );
        assert_eq!(sdxl.describe(), "SDXL, 1024×1024, epsilon");
        let sd1 = BuiltinConfigs {
            architecture: Architecture::Sd1,
            ..sdxl
        };
        assert!(sd1.text_encoder_2().is_err() && sd1.unet().unwrap().text_time.is_none());
        assert_eq!(sd1.vae().unwrap().scaling_factor, 0.18215);
        // A `ztsnr` file: zero terminal SNR, trailing timesteps.
        let ztsnr = BuiltinConfigs {
            prediction: PredictionType::VPrediction,
            zero_terminal_snr: true,
            ..sdxl
        };
        let scheduler = ztsnr.scheduler().unwrap();
        assert!(scheduler.rescale_betas_zero_snr);
        assert_eq!(
            ztsnr.describe(),
            "SDXL, 1024×1024, v_prediction, zero terminal SNR"
        );
    }

    #[test]
    fn sd2_sizes_follow_the_prediction_type() {
        let sd2 = |prediction| BuiltinConfigs::new(Architecture::Sd2, prediction);
        assert_eq!(sd2(PredictionType::VPrediction).resolution(), 768);
        assert_eq!(sd2(PredictionType::Epsilon).resolution(), 512);
        assert!(
            sd2(PredictionType::VPrediction)
                .unet()
                .unwrap()
                .upcast_attention
        );
        assert!(
            !sd2(PredictionType::Epsilon)
                .unet()
                .unwrap()
                .upcast_attention
        );
        assert_eq!(
            sd2(PredictionType::VPrediction).describe(),
            "SD 2.x, 768×768, v_prediction"
        );
    }
}
