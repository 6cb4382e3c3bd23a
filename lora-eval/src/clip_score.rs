//! CLIP score as torchmetrics' `CLIPScore` computes it: `max(mean_i 100·cos(image_i, prompt_i), 0)`
//! over the CLIP model's image and text features, with the images prepared as transformers'
//! `CLIPImageProcessor` prepares them for it.
//!
//! Which processor that is: with transformers 5, `CLIPProcessor.from_pretrained` gives the
//! torchvision backend whenever torchvision is installed, and torchmetrics hands it the images as
//! uint8 tensors; `lora_core::models::image_processor` prepares them with the same arithmetic, so
//! the pixels equal the processor's exactly.
//!
//! Prompts longer than the model's context keep their first tokens and the end token (the
//! tokenizer's truncation). torchmetrics instead cuts the padded ids at the context length, which
//! drops the end token, so its features for such prompts come from another position; for prompts
//! that fit, the two agree.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use lora_core::models::clip::{ClipModel, TextPooling};
use lora_core::models::image_processor::{ImageProcessor, ProcessorKind, PREPROCESSOR_CONFIG};
use lora_core::models::tokenizer::{ClipTokenizer, TokenizedPrompt};
use lora_core::source::clip_model_folder;

use crate::images::read_rgb;

/// Images (and prompts) run through the model at once.
const BATCH: usize = 32;
/// A CLIP model with its tokenizer and image preprocessing: what CLIP score runs.
pub struct ClipScoreModel {
    model: ClipModel,
    tokenizer: ClipTokenizer,
    preprocessor: ImageProcessor,
    device: Device,
}

impl ClipScoreModel {
    /// A CLIP model folder as the OpenAI repositories on the Hub have it: `config.json`,
    /// `model.safetensors`, `preprocessor_config.json` (optional), and the tokenizer files
    /// (`vocab.json` + `merges.txt`, or none for the OpenAI vocabulary;
    /// `special_tokens_map.json`, `tokenizer_config.json`). A Hub id goes through
    /// `lora_core::source::clip_model_folder` first.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let model = ClipModel::load(dir, dtype, device)?;
        let text_config = &model.config().text;
        let tokenizer = ClipTokenizer::load(Some(dir), text_config)
            .with_context(|| format!("the tokenizer of the CLIP model in {}", dir.display()))?;
        if let TextPooling::FirstEndToken(end) = model.text_pooling() {
            ensure!(
                tokenizer.eos_id() == end,
                "{}: the tokenizer's end token is id {}, but config.json pools text at eos_token_id = {end}",
                dir.display(),
                tokenizer.eos_id()
            );
        }
        let preprocessor = ImageProcessor::load(dir, ProcessorKind::Clip)?;
        let side = model.config().vision.image_size as u32;
        ensure!(
            preprocessor.output_size() == (side, side),
            "{}: crop_size {:?} does not match the model's image_size {side}",
            dir.join(PREPROCESSOR_CONFIG).display(),
            preprocessor.output_size()
        );
        Ok(Self {
            model,
            tokenizer,
            preprocessor,
            device: device.clone(),
        })
    }

    /// `[images, projection_dim]` f32.
    pub fn image_features(&self, images: &[RgbImage]) -> Result<Tensor> {
        ensure!(!images.is_empty(), "no images");
        let batches = images
            .chunks(BATCH)
            .map(|batch| {
                let pixels = self.preprocessor.pixel_values(batch, &self.device)?;
                self.model.image_features(&pixels)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&batches, 0)?.to_dtype(DType::F32)?)
    }

    /// `[prompts, projection_dim]` f32.
    pub fn text_features<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Tensor> {
        ensure!(!prompts.is_empty(), "no prompts");
        let batches = prompts
            .chunks(BATCH)
            .map(|batch| {
                let encoded: Vec<TokenizedPrompt> = batch
                    .iter()
                    .map(|p| self.tokenizer.encode(p.as_ref()))
                    .collect();
                let ids = TokenizedPrompt::batch_tensor(&encoded, &self.device)?;
                self.model.text_features(&ids)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&batches, 0)?.to_dtype(DType::F32)?)
    }

    pub fn model(&self) -> &ClipModel {
        &self.model
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    pub fn preprocessor(&self) -> &ImageProcessor {
        &self.preprocessor
    }
}

/// `100·cos(image_i, prompt_i)` for each pair, in f64: torchmetrics' per-sample scores.
pub fn clip_scores<S: AsRef<str>>(
    model: &ClipScoreModel,
    images: &[RgbImage],
    prompts: &[S],
) -> Result<Vec<f64>> {
    ensure!(
        images.len() == prompts.len(),
        "{} images but {} prompts: CLIP score pairs them one to one",
        images.len(),
        prompts.len()
    );
    let image = model.image_features(images)?;
    let text = model.text_features(prompts)?;
    let rows = |t: &Tensor| -> Result<Vec<Vec<f64>>> { Ok(t.to_dtype(DType::F64)?.to_vec2()?) };
    let scores: Vec<f64> = rows(&image)?
        .iter()
        .zip(rows(&text)?)
        .map(|(a, b)| {
            let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            100.0 * dot / (norm(a) * norm(&b))
        })
        .collect();
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        bail!("pair {i}: the image or prompt has no direction in CLIP's embedding (zero features)");
    }
    Ok(scores)
}

/// torchmetrics' `CLIPScore`: the mean of [`clip_scores`], clamped at 0 from below.
pub fn clip_score<S: AsRef<str>>(
    model: &ClipScoreModel,
    images: &[RgbImage],
    prompts: &[S],
) -> Result<f64> {
    let scores = clip_scores(model, images, prompts)?;
    Ok((scores.iter().sum::<f64>() / scores.len() as f64).max(0.0))
}

/// The CLIP score of image files against their prompts, read `BATCH` images at a time so a
/// large set never sits in memory whole. `spec`: a transformers CLIP folder or Hub id.
pub fn clip_score_of_files<S: AsRef<str>>(
    spec: &str,
    files: &[PathBuf],
    prompts: &[S],
    device: &Device,
) -> Result<f64> {
    ensure!(
        files.len() == prompts.len(),
        "{} images but {} prompts: CLIP score pairs them one to one",
        files.len(),
        prompts.len()
    );
    ensure!(!files.is_empty(), "no images to score with CLIP");
    let folder = clip_model_folder(spec)?;
    let model = ClipScoreModel::load(&folder, DType::F32, device)?;
    let mut scores = Vec::with_capacity(files.len());
    for (chunk, texts) in files.chunks(BATCH).zip(prompts.chunks(BATCH)) {
        let images = chunk
            .iter()
            .map(|f| read_rgb(f))
            .collect::<Result<Vec<_>>>()?;
        scores.extend(clip_scores(&model, &images, texts)?);
    }
    Ok((scores.iter().sum::<f64>() / scores.len() as f64).max(0.0))
}
