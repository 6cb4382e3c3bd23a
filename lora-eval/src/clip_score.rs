//! CLIP score as torchmetrics' `CLIPScore` computes it: `max(mean_i 100·cos(image_i, prompt_i), 0)`
//! over the CLIP model's image and text features, with the images prepared as transformers'
//! `CLIPImageProcessor` prepares them for it.
//!
//! Which processor that is: with transformers 5, `CLIPProcessor.from_pretrained` gives the
//! torchvision backend whenever torchvision is installed, and torchmetrics hands it the images as
//! uint8 tensors. On those, torchvision's antialiased bicubic resize runs PyTorch's uint8 kernel
//! (a port of Pillow-SIMD's): per-axis filter weights quantised to int16, integer accumulation,
//! the width pass rounded to uint8 before the height pass. [`ClipImagePreprocessor`] does the
//! same arithmetic, so its pixels equal the processor's exactly; a float resize would not (a few
//! levels off in places). Then the centre crop, and rescaling fused into normalisation as that
//! backend does it: `(x − 255·mean) / (255·std)` in f32.
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
use lora_core::models::tokenizer::{ClipTokenizer, TokenizedPrompt};
use lora_core::source::clip_model_folder;
use serde_json::Value;

use crate::images::read_rgb;

/// Images (and prompts) run through the model at once.
const BATCH: usize = 32;
/// OpenAI CLIP's normalisation, transformers' defaults when a model has no preprocessor config.
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
const DEFAULT_SIZE: u32 = 224;
/// PIL's resampling filter numbers, which the configs use; CLIP's processor supports bicubic.
const PIL_BICUBIC: u64 = 3;
const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";

/// transformers' `CLIPImageProcessor` (torchvision backend) on RGB images: shortest side to
/// `shortest_edge` (bicubic, antialiased), centre crop, rescale and normalise.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImagePreprocessor {
    shortest_edge: u32,
    crop_height: u32,
    crop_width: u32,
    /// `image_mean` and `image_std` over the rescale factor, in f32 as the backend fuses them.
    mean: [f32; 3],
    std: [f32; 3],
}

impl Default for ClipImagePreprocessor {
    /// transformers' `CLIPImageProcessor` defaults (OpenAI CLIP at 224 pixels).
    fn default() -> Self {
        Self::new(
            DEFAULT_SIZE,
            (DEFAULT_SIZE, DEFAULT_SIZE),
            1.0 / 255.0,
            OPENAI_CLIP_MEAN,
            OPENAI_CLIP_STD,
        )
    }
}

impl ClipImagePreprocessor {
    fn new(
        shortest_edge: u32,
        (crop_height, crop_width): (u32, u32),
        rescale_factor: f64,
        mean: [f64; 3],
        std: [f64; 3],
    ) -> Self {
        // The backend multiplies f32 tensors of mean and std by the scalar 1/rescale_factor,
        // which PyTorch rounds to f32 first.
        let scale = (1.0 / rescale_factor) as f32;
        Self {
            shortest_edge,
            crop_height,
            crop_width,
            mean: mean.map(|m| m as f32 * scale),
            std: std.map(|s| s as f32 * scale),
        }
    }

    /// `dir/preprocessor_config.json`, or the defaults when the model has none.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(PREPROCESSOR_CONFIG);
        if !path.exists() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid {}", path.display()))
    }

    /// A `preprocessor_config.json` of a CLIP image processor: `size` as an int or
    /// `{"shortest_edge": n}`, `crop_size` as an int or `{"height", "width"}`, bicubic resampling,
    /// and every step on. Keys that change nothing here (processor class names, `do_convert_rgb`)
    /// are ignored; a value this processor does not implement is an error.
    pub fn parse(json: &str) -> Result<Self> {
        let config: serde_json::Map<String, Value> =
            serde_json::from_str(json).context("malformed preprocessor config")?;
        for step in ["do_resize", "do_center_crop", "do_rescale", "do_normalize"] {
            match config.get(step) {
                None | Some(Value::Bool(true)) => {}
                Some(other) => bail!("unsupported {step} = {other}: CLIP score runs every step"),
            }
        }
        for square in ["default_to_square", "use_square_size"] {
            if let Some(Value::Bool(true)) = config.get(square) {
                bail!("unsupported {square} = true: CLIP resizes the shortest side");
            }
        }
        if let Some(resample) = config.get("resample") {
            ensure!(
                resample.as_u64() == Some(PIL_BICUBIC),
                "unsupported resample = {resample}: expected {PIL_BICUBIC} (bicubic)"
            );
        }
        let size = |value: &Value, key: &str| -> Result<u32> {
            value
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| v > 0)
                .with_context(|| format!("{key} = {value}: expected a size in pixels"))
        };
        let shortest_edge = match config.get("size") {
            None => DEFAULT_SIZE,
            Some(Value::Object(fields)) => match (fields.get("shortest_edge"), fields.len()) {
                (Some(edge), 1) => size(edge, "size.shortest_edge")?,
                _ => bail!(
                    "unsupported size = {}: CLIP resizes to a shortest edge",
                    Value::Object(fields.clone())
                ),
            },
            Some(value) => size(value, "size")?,
        };
        let crop = match config.get("crop_size") {
            None => (DEFAULT_SIZE, DEFAULT_SIZE),
            Some(Value::Object(fields)) => {
                let side = |key: &str| {
                    let value = fields
                        .get(key)
                        .with_context(|| format!("crop_size has no {key}"))?;
                    size(value, &format!("crop_size.{key}"))
                };
                (side("height")?, side("width")?)
            }
            Some(value) => {
                let side = size(value, "crop_size")?;
                (side, side)
            }
        };
        let rescale_factor = match config.get("rescale_factor") {
            None => 1.0 / 255.0,
            Some(value) => value
                .as_f64()
                .filter(|f| *f > 0.0)
                .with_context(|| format!("rescale_factor = {value}: expected a positive number"))?,
        };
        let triple = |key: &str, default: [f64; 3]| -> Result<[f64; 3]> {
            let Some(value) = config.get(key) else {
                return Ok(default);
            };
            let values: Option<Vec<f64>> = value
                .as_array()
                .map(|a| a.iter().map(Value::as_f64).collect())
                .unwrap_or_default();
            values
                .and_then(|v| <[f64; 3]>::try_from(v).ok())
                .with_context(|| format!("{key} = {value}: expected three numbers (R, G, B)"))
        };
        let mean = triple("image_mean", OPENAI_CLIP_MEAN)?;
        let std = triple("image_std", OPENAI_CLIP_STD)?;
        ensure!(
            std.iter().all(|s| *s > 0.0),
            "image_std = {std:?}: expected positive numbers"
        );
        Ok(Self::new(shortest_edge, crop, rescale_factor, mean, std))
    }

    /// `(height, width)` of the prepared images.
    pub fn crop_size(&self) -> (u32, u32) {
        (self.crop_height, self.crop_width)
    }

    /// The resized and cropped image, before normalisation.
    pub fn resize_and_crop(&self, image: &RgbImage) -> RgbImage {
        let (width, height) = image.dimensions();
        // transformers truncates the long side: int(shortest_edge · long / short).
        let scaled = |long: u32, short: u32| {
            ((u64::from(self.shortest_edge) * u64::from(long)) as f64 / f64::from(short)) as u32
        };
        let (new_width, new_height) = if width <= height {
            (self.shortest_edge, scaled(height, width))
        } else {
            (scaled(width, height), self.shortest_edge)
        };
        let resized = resize_bicubic_u8(image, new_width, new_height);
        centre_crop(&resized, self.crop_width, self.crop_height)
    }

    /// `[images, 3, crop_height, crop_width]` f32 pixel values on `device`.
    pub fn pixel_values(&self, images: &[RgbImage], device: &Device) -> Result<Tensor> {
        let (h, w) = (self.crop_height as usize, self.crop_width as usize);
        let mut values = Vec::with_capacity(images.len() * 3 * h * w);
        for image in images {
            let cropped = self.resize_and_crop(image);
            let pixels = cropped.as_raw();
            for c in 0..3 {
                values.extend(
                    pixels
                        .chunks_exact(3)
                        .map(|px| (f32::from(px[c]) - self.mean[c]) / self.std[c]),
                );
            }
        }
        Ok(Tensor::from_vec(values, (images.len(), 3, h, w), device)?)
    }
}

/// A CLIP model with its tokenizer and image preprocessing: what CLIP score runs.
pub struct ClipScoreModel {
    model: ClipModel,
    tokenizer: ClipTokenizer,
    preprocessor: ClipImagePreprocessor,
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
        let preprocessor = ClipImagePreprocessor::load(dir)?;
        let side = model.config().vision.image_size as u32;
        ensure!(
            preprocessor.crop_size() == (side, side),
            "{}: crop_size {:?} does not match the model's image_size {side}",
            dir.join(PREPROCESSOR_CONFIG).display(),
            preprocessor.crop_size()
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

    pub fn preprocessor(&self) -> &ClipImagePreprocessor {
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

/// Keys' cubic convolution kernel with a = −0.5, Pillow's and torchvision's antialiased bicubic.
fn keys_cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// One axis of the uint8 resize: for each output index, its first input index and its int16
/// weights, all at one fixed-point `precision`.
struct AxisFilter {
    taps: Vec<(usize, Vec<i16>)>,
    precision: u32,
}

impl AxisFilter {
    /// The weights PyTorch's uint8 antialiased kernel computes: in f64, the kernel widened by the
    /// downscale factor, normalised per output; then the precision that keeps the largest weight
    /// below 2^15, and each weight rounded half away from zero at it.
    fn new(input: usize, output: usize) -> Self {
        let scale = input as f64 / output as f64;
        let (support, inverse_scale) = if scale >= 1.0 {
            (2.0 * scale, 1.0 / scale)
        } else {
            (2.0, 1.0)
        };
        let max_taps = support.ceil() as usize * 2 + 1;
        let mut largest = 0.0f64;
        let float_taps: Vec<(usize, Vec<f64>)> = (0..output)
            .map(|i| {
                let centre = scale * (i as f64 + 0.5);
                // `as i64` truncates toward zero, as the C++ casts do.
                let first = ((centre - support + 0.5) as i64).max(0);
                let end = ((centre + support + 0.5) as i64).min(input as i64);
                let count = (end - first).clamp(0, max_taps as i64) as usize;
                let first = first as usize;
                let mut weights: Vec<f64> = (0..count)
                    .map(|j| keys_cubic(((first + j) as f64 - centre + 0.5) * inverse_scale))
                    .collect();
                let total: f64 = weights.iter().sum();
                if total != 0.0 {
                    for w in &mut weights {
                        *w /= total;
                        largest = largest.max(*w);
                    }
                }
                (first, weights)
            })
            .collect();
        let mut precision = 0u32;
        while precision < 22
            && ((0.5 + largest * f64::from(1u32 << (precision + 1))) as i32) < (1 << 15)
        {
            precision += 1;
        }
        let unit = f64::from(1u32 << precision);
        let taps = float_taps
            .into_iter()
            .map(|(first, weights)| {
                let fixed = weights
                    .iter()
                    .map(|w| {
                        let v = w * unit;
                        (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32 as i16
                    })
                    .collect();
                (first, fixed)
            })
            .collect();
        Self { taps, precision }
    }

    /// The weighted sum of `pixel(first + j)`, rounded and clamped to a uint8.
    fn apply(&self, weights: &[i16], pixel: impl Fn(usize) -> u8) -> u8 {
        let mut acc: i32 = 1 << (self.precision - 1);
        for (j, &w) in weights.iter().enumerate() {
            acc += i32::from(pixel(j)) * i32::from(w);
        }
        (acc >> self.precision).clamp(0, 255) as u8
    }
}

/// torchvision's `resize(…, BICUBIC, antialias=True)` of a uint8 image on the CPU: the width pass,
/// rounded to uint8, then the height pass; an axis whose size does not change is not filtered.
fn resize_bicubic_u8(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_width, in_height) = image.dimensions();
    let mut current = image.clone();
    if width != in_width {
        let filter = AxisFilter::new(in_width as usize, width as usize);
        let src = current.as_raw();
        let row = in_width as usize * 3;
        let mut out = Vec::with_capacity(width as usize * in_height as usize * 3);
        for y in 0..in_height as usize {
            for (first, weights) in &filter.taps {
                for c in 0..3 {
                    out.push(filter.apply(weights, |j| src[y * row + (first + j) * 3 + c]));
                }
            }
        }
        current = RgbImage::from_raw(width, in_height, out).expect("sized for the image");
    }
    if height != in_height {
        let filter = AxisFilter::new(in_height as usize, height as usize);
        let src = current.as_raw();
        let row = width as usize * 3;
        let mut out = Vec::with_capacity(width as usize * height as usize * 3);
        for (first, weights) in &filter.taps {
            for x in 0..row {
                out.push(filter.apply(weights, |j| src[(first + j) * row + x]));
            }
        }
        current = RgbImage::from_raw(width, height, out).expect("sized for the image");
    }
    current
}

/// The centre `width`×`height` window, top-left offsets rounded down; where the image is smaller,
/// it is padded with black, split as torchvision splits it (the odd pixel after).
fn centre_crop(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    let offset = |have: u32, want: u32| -> i64 {
        if have >= want {
            i64::from((have - want) / 2)
        } else {
            -i64::from((want - have) / 2)
        }
    };
    let (left, top) = (offset(image.width(), width), offset(image.height(), height));
    RgbImage::from_fn(width, height, |x, y| {
        let (sx, sy) = (i64::from(x) + left, i64::from(y) + top);
        if (0..i64::from(image.width())).contains(&sx)
            && (0..i64::from(image.height())).contains(&sy)
        {
            *image.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_weights_sum_to_one_in_fixed_point() {
        for (input, output) in [(64, 40), (24, 40), (160, 40), (7, 3), (3, 7)] {
            let filter = AxisFilter::new(input, output);
            assert_eq!(filter.taps.len(), output);
            let unit = 1i32 << filter.precision;
            for (first, weights) in &filter.taps {
                assert!(first + weights.len() <= input);
                let sum: i32 = weights.iter().map(|&w| i32::from(w)).sum();
                assert!(
                    (sum - unit).abs() <= weights.len() as i32,
                    "{input}→{output}: {sum} vs {unit}"
                );
            }
        }
        // A constant image stays constant through both passes.
        let grey = RgbImage::from_pixel(37, 23, image::Rgb([200, 17, 90]));
        let resized = resize_bicubic_u8(&grey, 11, 50);
        assert_eq!(resized.dimensions(), (11, 50));
        assert!(resized.pixels().all(|p| p.0 == [200, 17, 90]));
    }

    #[test]
    fn shortest_side_is_resized_and_the_centre_cropped() {
        let pre = ClipImagePreprocessor::parse(r#"{"size": 40, "crop_size": 32}"#).unwrap();
        let image = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 0]));
        // 48 → 40, 64 → int(40·64/48) = 53; crop offsets (53 − 32) / 2 = 10 and (40 − 32) / 2 = 4.
        let resized = resize_bicubic_u8(&image, 53, 40);
        let cropped = pre.resize_and_crop(&image);
        assert_eq!(cropped.dimensions(), (32, 32));
        assert_eq!(cropped.get_pixel(0, 0), resized.get_pixel(10, 4));
        assert_eq!(cropped.get_pixel(31, 31), resized.get_pixel(41, 35));
        // An image already at the size is only cropped.
        let exact = RgbImage::from_fn(73, 40, |x, y| image::Rgb([x as u8, y as u8, 7]));
        assert_eq!(pre.resize_and_crop(&exact).get_pixel(0, 0).0, [20, 4, 7]);
    }

    #[test]
    fn a_crop_larger_than_the_image_pads_with_black() {
        let image = RgbImage::from_pixel(3, 6, image::Rgb([9, 9, 9]));
        let cropped = centre_crop(&image, 6, 4);
        // Width 3 → 6: one column of padding before, two after; height 6 → 4: rows 1..5.
        let row: Vec<u8> = (0..6).map(|x| cropped.get_pixel(x, 0).0[0]).collect();
        assert_eq!(row, [0, 9, 9, 9, 0, 0]);
        assert_eq!(cropped.get_pixel(1, 3).0, [9, 9, 9]);
    }

    #[test]
    fn preprocessor_config_values_and_defaults() {
        let default = ClipImagePreprocessor::parse("{}").unwrap();
        assert_eq!(default, ClipImagePreprocessor::default());
        assert_eq!(default.crop_size(), (224, 224));
        assert_eq!(default.mean[0], 0.48145466f32 * 255.0);
        let dict = ClipImagePreprocessor::parse(
            r#"{"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 300},
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.25, 0.5], "rescale_factor": 0.5,
                "resample": 3, "do_convert_rgb": true, "image_processor_type": "CLIPImageProcessor"}"#,
        )
        .unwrap();
        assert_eq!((dict.shortest_edge, dict.crop_size()), (336, (336, 300)));
        assert_eq!((dict.mean, dict.std), ([1.0; 3], [1.0, 0.5, 1.0]));

        let cases = [
            (r#"{"resample": 2}"#, "unsupported resample = 2"),
            (
                r#"{"do_center_crop": false}"#,
                "unsupported do_center_crop = false",
            ),
            (
                r#"{"size": {"height": 224, "width": 224}}"#,
                "CLIP resizes to a shortest edge",
            ),
            (
                r#"{"crop_size": {"height": 224}}"#,
                "crop_size has no width",
            ),
            (r#"{"size": 0}"#, "size = 0: expected a size in pixels"),
            (r#"{"image_mean": [0.5, 0.5]}"#, "expected three numbers"),
            (
                r#"{"image_std": [0.5, 0, 0.5]}"#,
                "expected positive numbers",
            ),
            (
                r#"{"use_square_size": true}"#,
                "unsupported use_square_size",
            ),
            (r#"{"size": "#, "malformed preprocessor config"),
        ];
        for (json, expected) in cases {
            let err = format!("{:#}", ClipImagePreprocessor::parse(json).unwrap_err());
            assert!(err.contains(expected), "{json}: {err}");
        }
    }
}
