//! transformers' image processors for the vision models here (`CLIPImageProcessor` for CLIP score,
//! `BlipImageProcessor` for captioning), as transformers 5 runs them: the torchvision backend on
//! uint8 tensors.
//!
//! On uint8 tensors torchvision's antialiased bicubic resize runs PyTorch's uint8 kernel: per-axis
//! weights quantised to int16, integer accumulation, the width pass rounded to uint8 before the
//! height pass; [`crate::resample`] with [`Arithmetic::Torchvision`] is that arithmetic, so the
//! pixels equal the processor's exactly (a float resize would be a few levels off in places).
//! Then CLIP's centre crop (BLIP has none), and rescaling fused into normalisation as the backend
//! does it: `(x − 255·mean) / (255·std)` in f32.

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use image::{DynamicImage, RgbImage};
use serde_json::Value;

use crate::resample::{resize_rgb, Arithmetic, Filter};

/// OpenAI CLIP's normalisation: transformers' default for CLIP and BLIP processors.
const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// PIL's resampling filter numbers, which the configs use; both processors default to bicubic.
const PIL_BICUBIC: u64 = 3;
/// The file a model folder keeps its processor's settings in.
pub const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";

/// Which transformers image processor, for its defaults and the settings it may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessorKind {
    /// `CLIPImageProcessor`: shortest side to `size` (224), centre crop to `crop_size` (224).
    Clip,
    /// `BlipImageProcessor`: resized to `size` = height × width (384 × 384), no crop.
    Blip,
}

/// How an image is resized before any crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// The shorter side to this length, the longer one in proportion (truncated, as transformers
    /// computes it).
    ShortestEdge(u32),
    /// Exactly this `(height, width)`.
    Exact(u32, u32),
}

/// The steps of a processor, read from its `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    resize: ResizeTo,
    /// `(height, width)` of the centre crop, if the processor crops.
    crop: Option<(u32, u32)>,
    /// `image_mean` and `image_std` over the rescale factor, in f32 as the backend fuses them.
    mean: [f32; 3],
    std: [f32; 3],
}

impl ImageProcessor {
    /// The processor's transformers defaults, as for a model without a preprocessor config.
    pub fn default_for(kind: ProcessorKind) -> Self {
        let (resize, crop) = match kind {
            ProcessorKind::Clip => (ResizeTo::ShortestEdge(224), Some((224, 224))),
            ProcessorKind::Blip => (ResizeTo::Exact(384, 384), None),
        };
        Self::new(resize, crop, 1.0 / 255.0, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    }

    fn new(
        resize: ResizeTo,
        crop: Option<(u32, u32)>,
        rescale_factor: f64,
        mean: [f64; 3],
        std: [f64; 3],
    ) -> Self {
        // The backend multiplies f32 tensors of mean and std by the scalar 1/rescale_factor,
        // which PyTorch rounds to f32 first.
        let scale = (1.0 / rescale_factor) as f32;
        Self {
            resize,
            crop,
            mean: mean.map(|m| m as f32 * scale),
            std: std.map(|s| s as f32 * scale),
        }
    }

    /// `dir/preprocessor_config.json`, or the defaults when the model has none.
    pub fn load(dir: &Path, kind: ProcessorKind) -> Result<Self> {
        let path = dir.join(PREPROCESSOR_CONFIG);
        if !path.exists() {
            return Ok(Self::default_for(kind));
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text, kind).with_context(|| format!("invalid {}", path.display()))
    }

    /// A `preprocessor_config.json`: `size` as an int (CLIP: the shortest edge; BLIP: a square)
    /// or `{"shortest_edge": n}` (CLIP) or `{"height", "width"}` (BLIP), CLIP's `crop_size` as an
    /// int or `{"height", "width"}`, bicubic resampling, and every step on. Keys that change
    /// nothing here (processor class names, `do_convert_rgb`) are ignored; a value this processor
    /// does not implement is an error.
    pub fn parse(json: &str, kind: ProcessorKind) -> Result<Self> {
        let config: serde_json::Map<String, Value> =
            serde_json::from_str(json).context("malformed preprocessor config")?;
        let defaults = Self::default_for(kind);
        for step in ["do_resize", "do_rescale", "do_normalize"] {
            match config.get(step) {
                None | Some(Value::Bool(true)) => {}
                Some(other) => bail!("unsupported {step} = {other}: the model needs every step"),
            }
        }
        match (kind, config.get("do_center_crop")) {
            (ProcessorKind::Clip, None | Some(Value::Bool(true))) => {}
            (ProcessorKind::Blip, None | Some(Value::Bool(false))) => {}
            (_, Some(other)) => bail!("unsupported do_center_crop = {other} for {kind:?}"),
        }
        if kind == ProcessorKind::Clip {
            for square in ["default_to_square", "use_square_size"] {
                if let Some(Value::Bool(true)) = config.get(square) {
                    bail!("unsupported {square} = true: CLIP resizes the shortest side");
                }
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
        let height_width = |fields: &serde_json::Map<String, Value>, key: &str| {
            let side = |name: &str| {
                let value = fields
                    .get(name)
                    .with_context(|| format!("{key} has no {name}"))?;
                size(value, &format!("{key}.{name}"))
            };
            Ok::<_, anyhow::Error>((side("height")?, side("width")?))
        };
        let resize = match (kind, config.get("size")) {
            (_, None) => defaults.resize,
            (ProcessorKind::Clip, Some(Value::Object(fields))) => {
                match (fields.get("shortest_edge"), fields.len()) {
                    (Some(edge), 1) => ResizeTo::ShortestEdge(size(edge, "size.shortest_edge")?),
                    _ => bail!(
                        "unsupported size = {}: CLIP resizes to a shortest edge",
                        Value::Object(fields.clone())
                    ),
                }
            }
            (ProcessorKind::Blip, Some(Value::Object(fields))) => {
                let (height, width) = height_width(fields, "size")?;
                ResizeTo::Exact(height, width)
            }
            (ProcessorKind::Clip, Some(value)) => ResizeTo::ShortestEdge(size(value, "size")?),
            (ProcessorKind::Blip, Some(value)) => {
                let side = size(value, "size")?;
                ResizeTo::Exact(side, side)
            }
        };
        let crop = match (kind, config.get("crop_size")) {
            (ProcessorKind::Blip, _) => None,
            (ProcessorKind::Clip, None) => defaults.crop,
            (ProcessorKind::Clip, Some(Value::Object(fields))) => {
                Some(height_width(fields, "crop_size")?)
            }
            (ProcessorKind::Clip, Some(value)) => {
                let side = size(value, "crop_size")?;
                Some((side, side))
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
        Ok(Self::new(resize, crop, rescale_factor, mean, std))
    }

    /// `(height, width)` of the prepared images.
    pub fn output_size(&self) -> (u32, u32) {
        match (self.crop, self.resize) {
            (Some(crop), _) => crop,
            (None, ResizeTo::Exact(height, width)) => (height, width),
            // `parse` and `default_for` give a shortest-edge resize a crop.
            (None, ResizeTo::ShortestEdge(edge)) => (edge, edge),
        }
    }

    /// The resized (and, for CLIP, cropped) image, before normalisation.
    pub fn resize_and_crop(&self, image: &RgbImage) -> RgbImage {
        let (width, height) = image.dimensions();
        let (new_width, new_height) = match self.resize {
            ResizeTo::Exact(h, w) => (w, h),
            ResizeTo::ShortestEdge(edge) => {
                // transformers truncates the long side: int(shortest_edge · long / short).
                let scaled = |long: u32, short: u32| {
                    ((u64::from(edge) * u64::from(long)) as f64 / f64::from(short)) as u32
                };
                if width <= height {
                    (edge, scaled(height, width))
                } else {
                    (scaled(width, height), edge)
                }
            }
        };
        let resized = resize_rgb(
            image,
            new_width,
            new_height,
            Filter::Bicubic,
            Arithmetic::Torchvision,
        );
        match self.crop {
            Some((h, w)) => centre_crop(&resized, w, h),
            None => resized,
        }
    }

    /// `[images, 3, height, width]` f32 pixel values on `device`.
    pub fn pixel_values(&self, images: &[RgbImage], device: &Device) -> Result<Tensor> {
        let (h, w) = self.output_size();
        let (h, w) = (h as usize, w as usize);
        let mut values = Vec::with_capacity(images.len() * 3 * h * w);
        for image in images {
            let prepared = self.resize_and_crop(image);
            let pixels = prepared.as_raw();
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

/// transformers' `convert_to_rgb` (the processors' `do_convert_rgb`): an image with transparency
/// composited onto white as Pillow's `alpha_composite` computes it (7 fractional bits, rounded
/// divisions by 255), any other image made RGB.
pub fn convert_to_rgb(image: &DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    const BITS: u32 = 7;
    let div255 = |a: u32| ((a >> 8) + a) >> 8;
    let rgba = image.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        if a == 0 {
            return image::Rgb([255, 255, 255]);
        }
        let a = u32::from(a);
        // Over an opaque white background: outa255 = 255², so coef1 = a · 2^BITS exactly.
        let outa255 = a * 255 + 255 * (255 - a);
        let coef1 = a * 255 * 255 * (1 << BITS) / outa255;
        let coef2 = 255 * (1 << BITS) - coef1;
        let blend = |c: u8| {
            let t = u32::from(c) * coef1 + 255 * coef2;
            (div255(t + (0x80 << BITS)) >> BITS) as u8
        };
        image::Rgb([blend(r), blend(g), blend(b)])
    })
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

    fn clip(json: &str) -> Result<ImageProcessor> {
        ImageProcessor::parse(json, ProcessorKind::Clip)
    }

    #[test]
    fn shortest_side_is_resized_and_the_centre_cropped() {
        let pre = clip(r#"{"size": 40, "crop_size": 32}"#).unwrap();
        let image = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 0]));
        // 48 → 40, 64 → int(40·64/48) = 53; crop offsets (53 − 32) / 2 = 10 and (40 − 32) / 2 = 4.
        let resized = resize_rgb(&image, 53, 40, Filter::Bicubic, Arithmetic::Torchvision);
        let cropped = pre.resize_and_crop(&image);
        assert_eq!(cropped.dimensions(), (32, 32));
        assert_eq!(cropped.get_pixel(0, 0), resized.get_pixel(10, 4));
        assert_eq!(cropped.get_pixel(31, 31), resized.get_pixel(41, 35));
        // An image already at the size is only cropped.
        let exact = RgbImage::from_fn(73, 40, |x, y| image::Rgb([x as u8, y as u8, 7]));
        assert_eq!(pre.resize_and_crop(&exact).get_pixel(0, 0).0, [20, 4, 7]);
    }

    #[test]
    fn blip_resizes_to_its_size_without_a_crop() {
        let pre = ImageProcessor::parse(
            r#"{"size": {"height": 24, "width": 40}, "image_processor_type": "BlipImageProcessor"}"#,
            ProcessorKind::Blip,
        )
        .unwrap();
        assert_eq!(pre.output_size(), (24, 40));
        let image = RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 0]));
        assert_eq!(
            pre.resize_and_crop(&image),
            resize_rgb(&image, 40, 24, Filter::Bicubic, Arithmetic::Torchvision)
        );
        let square = ImageProcessor::parse(r#"{"size": 30}"#, ProcessorKind::Blip).unwrap();
        assert_eq!(square.output_size(), (30, 30));
        assert_eq!(
            ImageProcessor::default_for(ProcessorKind::Blip).output_size(),
            (384, 384)
        );
        let err =
            ImageProcessor::parse(r#"{"do_center_crop": true}"#, ProcessorKind::Blip).unwrap_err();
        assert!(format!("{err:#}").contains("do_center_crop"), "{err:#}");
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
        let default = clip("{}").unwrap();
        assert_eq!(default, ImageProcessor::default_for(ProcessorKind::Clip));
        assert_eq!(default.output_size(), (224, 224));
        assert_eq!(default.mean[0], 0.48145466f32 * 255.0);
        let dict = clip(
            r#"{"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 300},
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.25, 0.5], "rescale_factor": 0.5,
                "resample": 3, "do_convert_rgb": true, "image_processor_type": "CLIPImageProcessor"}"#,
        )
        .unwrap();
        assert_eq!(
            (dict.resize, dict.output_size()),
            (ResizeTo::ShortestEdge(336), (336, 300))
        );
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
            let err = format!("{:#}", clip(json).unwrap_err());
            assert!(err.contains(expected), "{json}: {err}");
        }
    }
}
