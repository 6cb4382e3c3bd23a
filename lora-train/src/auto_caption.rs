//! Captions from a model (`lora-train data caption --model`): BLIP (`lora_core::models::blip`)
//! run over image files, a batch at a time, decoded as training decodes them (EXIF orientation
//! applied) and made RGB as transformers' `do_convert_rgb` does (transparency composited onto
//! white). What becomes of
//! the captions (which images get one, the prefix, the write) is [`crate::caption_edit`]'s.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use image::RgbImage;
use lora_core::models::blip::ImageCaptioner;
use lora_core::models::image_processor::convert_to_rgb;

use crate::dataset::decode_image;

/// What the model made of the images.
#[derive(Debug, Default)]
pub struct ModelCaptions {
    /// The caption of each image the model gave words to, normalized as training reads captions.
    pub captions: BTreeMap<PathBuf, String>,
    /// Images the model ended the caption of at once (an empty caption): left alone.
    pub empty: Vec<PathBuf>,
}

fn read_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let image = decode_image(&bytes).with_context(|| format!("image {}", path.display()))?;
    Ok(convert_to_rgb(&image))
}

/// Captions `images` with `captioner`, `batch_size` images at a time, each at most
/// `max_new_tokens` tokens; `progress` is told how many images are done after each batch. An
/// image that cannot be read stops nothing: all are tried, and the error lists every one.
pub fn caption_images(
    captioner: &ImageCaptioner,
    images: &[PathBuf],
    batch_size: usize,
    max_new_tokens: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<ModelCaptions> {
    ensure!(batch_size > 0, "--batch-size 0: expected at least 1");
    let mut made = ModelCaptions::default();
    let mut unreadable = Vec::new();
    let mut done = 0;
    for batch in images.chunks(batch_size) {
        let mut pixels = Vec::with_capacity(batch.len());
        let mut paths = Vec::with_capacity(batch.len());
        for path in batch {
            match read_rgb(path) {
                Ok(image) => {
                    pixels.push(image);
                    paths.push(path);
                }
                Err(e) => unreadable.push(format!("{e:#}")),
            }
        }
        if !pixels.is_empty() {
            let captions = captioner
                .caption(&pixels, max_new_tokens)
                .with_context(|| format!("captioning {}", paths[0].display()))?;
            for (path, caption) in paths.into_iter().zip(captions) {
                let caption = crate::dataset::normalize_caption(&caption);
                if caption.is_empty() {
                    made.empty.push(path.clone());
                } else {
                    made.captions.insert(path.clone(), caption);
                }
            }
        }
        done += batch.len();
        progress(done);
    }
    ensure!(
        unreadable.is_empty(),
        "nothing written: {} image(s) cannot be captioned:\n  {}",
        unreadable.len(),
        unreadable.join("\n  ")
    );
    Ok(made)
}
