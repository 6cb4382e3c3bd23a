//! BLIP image captioning (transformers' `BlipForConditionalGeneration`), inference only.
//!
//! A model is a folder as Salesforce/blip-image-captioning-large has it: `config.json`
//! ([`BlipConfig`]) and `model.safetensors` with `vision_model.…` ([`BlipVisionModel`]) and
//! `text_decoder.…` ([`BlipTextDecoder`]). A caption is decoded greedily from the `[DEC]` token
//! (and the words of an optional prompt) up to the `[SEP]` token, as transformers' `generate`
//! does with `num_beams=1, do_sample=False`. [`ImageCaptioner`] adds what turns image files into
//! caption text: the image processor (`preprocessor_config.json`) and the vocabulary
//! (`tokenizer.json`).

mod attention;
mod text_decoder;
mod tokenizer;
mod vision;

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use crate::io::weights;
use crate::models::config::BlipConfig;
use crate::models::image_processor::{ImageProcessor, ProcessorKind, PREPROCESSOR_CONFIG};

pub use text_decoder::{BlipTextDecoder, ImageKeysValues};
pub use tokenizer::WordPieceDecoder;
pub use vision::BlipVisionModel;

pub struct BlipCaptioner {
    vision_model: BlipVisionModel,
    text_decoder: BlipTextDecoder,
    config: BlipConfig,
}

impl BlipCaptioner {
    /// Loads `dir/config.json` and `dir/model.safetensors` (or `model.fp16.safetensors`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = BlipConfig::from_file(&dir.join("config.json"))?;
        let path = weights::component_weights(dir, "model")?;
        let vb = weights::var_builder(std::slice::from_ref(&path), dtype, device, BTreeMap::new())?;
        Self::new(vb, &config)
            .with_context(|| format!("loading the BLIP model from {}", path.display()))
    }

    /// Builds the model from a `VarBuilder` over a BlipForConditionalGeneration's weights, named
    /// as transformers names them.
    pub fn new(vb: VarBuilder, config: &BlipConfig) -> Result<Self> {
        ensure!(
            config.text.encoder_hidden_size == config.vision.hidden_size,
            "text_config.encoder_hidden_size = {} differs from vision_config.hidden_size = {}",
            config.text.encoder_hidden_size,
            config.vision.hidden_size
        );
        Ok(Self {
            vision_model: BlipVisionModel::new(vb.pp("vision_model"), &config.vision)?,
            text_decoder: BlipTextDecoder::new(vb.pp("text_decoder"), &config.text)?,
            config: config.clone(),
        })
    }

    /// `[batch, 3, image_size, image_size]` normalised pixels → the image features the decoder
    /// attends to, `[batch, positions, hidden]`.
    pub fn image_features(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.vision_model.forward(pixel_values)
    }

    /// Decoder logits `[batch, seq, vocab]` (f32) for `input_ids` `[batch, seq]` (the first being
    /// `[DEC]`) on the images `pixel_values`: transformers' `model(pixel_values, input_ids).logits`.
    pub fn logits(&self, pixel_values: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let image = self
            .text_decoder
            .image_keys_values(&self.image_features(pixel_values)?)?;
        self.text_decoder.forward(input_ids, &image)
    }

    /// Greedy captions for each image of `pixel_values`: `[DEC]`, the `prompt` ids (a prompt's
    /// word-piece ids, without `[CLS]` and `[SEP]`), then up to `max_new_tokens` generated ids,
    /// the last being `[SEP]` where the model ended the caption.
    pub fn generate(
        &self,
        pixel_values: &Tensor,
        prompt: &[u32],
        max_new_tokens: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let text = &self.config.text;
        let batch = pixel_values.dim(0)?;
        let image = self
            .text_decoder
            .image_keys_values(&self.image_features(pixel_values)?)?;
        let start: Vec<u32> = std::iter::once(text.bos_token_id)
            .chain(prompt.iter().copied())
            .collect();
        let mut rows = vec![start; batch];
        let mut done = vec![false; batch];
        let device = pixel_values.device();
        for _ in 0..max_new_tokens {
            if done.iter().all(|&d| d) {
                break;
            }
            let seq = rows[0].len();
            let ids = Tensor::from_vec(rows.concat(), (batch, seq), device)?;
            let logits = self.text_decoder.forward(&ids, &image)?;
            let next: Vec<u32> = logits.i((.., seq - 1, ..))?.argmax(1)?.to_vec1()?;
            for ((row, finished), id) in rows.iter_mut().zip(done.iter_mut()).zip(next) {
                // A finished caption is padded, as transformers pads it, to keep the batch square.
                row.push(if *finished { text.pad_token_id } else { id });
                *finished |= id == text.sep_token_id;
            }
        }
        // Drop the padding after each caption's `[SEP]`.
        for row in &mut rows {
            let prefix = 1 + prompt.len();
            if let Some(end) = row[prefix..].iter().position(|&id| id == text.sep_token_id) {
                row.truncate(prefix + end + 1);
            }
        }
        Ok(rows)
    }

    pub fn config(&self) -> &BlipConfig {
        &self.config
    }
}

/// transformers 5's default generation length for BLIP without a `max_new_tokens`: 20 tokens after
/// the `[DEC]` token (checked at full size by `tests/reference/check_blip_full_size.py`).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 20;

/// A BLIP captioning model with its image processor and vocabulary: images in, captions out, as
/// transformers' `BlipProcessor` + `generate` + `decode(skip_special_tokens=True)` make them.
pub struct ImageCaptioner {
    model: BlipCaptioner,
    processor: ImageProcessor,
    vocabulary: WordPieceDecoder,
    dtype: DType,
    device: Device,
}

impl ImageCaptioner {
    /// A model folder as Salesforce/blip-image-captioning-large has it: `config.json`, the
    /// weights, `tokenizer.json` and `preprocessor_config.json` (optional: BlipImageProcessor's
    /// defaults). A Hub id goes through `crate::source::blip_model_folder` first.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let model = BlipCaptioner::load(dir, dtype, device)?;
        let vocabulary = WordPieceDecoder::from_file(&dir.join("tokenizer.json"))?;
        let processor = ImageProcessor::load(dir, ProcessorKind::Blip)?;
        let side = model.config().vision.image_size as u32;
        ensure!(
            processor.output_size() == (side, side),
            "{}: size {:?} does not match the model's image_size {side}",
            dir.join(PREPROCESSOR_CONFIG).display(),
            processor.output_size()
        );
        let sep = model.config().text.sep_token_id;
        ensure!(
            vocabulary.is_special(sep),
            "{}: config.json's sep_token_id = {sep} is not a special token of tokenizer.json",
            dir.display()
        );
        Ok(Self {
            model,
            processor,
            vocabulary,
            dtype,
            device: device.clone(),
        })
    }

    /// A greedy caption for each image, at most `max_new_tokens` tokens long.
    pub fn caption(&self, images: &[RgbImage], max_new_tokens: usize) -> Result<Vec<String>> {
        let pixel_values = self
            .processor
            .pixel_values(images, &self.device)?
            .to_dtype(self.dtype)?;
        self.model
            .generate(&pixel_values, &[], max_new_tokens)?
            .iter()
            // Without the start token, which a tokenizer need not mark special.
            .map(|ids| self.vocabulary.decode(&ids[1..]))
            .collect()
    }

    pub fn processor(&self) -> &ImageProcessor {
        &self.processor
    }
}
