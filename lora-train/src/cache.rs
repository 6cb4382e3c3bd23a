//! What the frozen encoders make of the dataset, computed once before the first step: each
//! caption's text embedding and (with centre crops) each image's latent distribution. Epochs
//! after the first — in fact every step — then skip the text encoder and the VAE. A text encoder
//! that trains (`--train-text-encoder`) cannot be cached: its captions are kept as token ids and
//! encoded every step ([`conditioning`]).
//!
//! The VAE's output is kept as its distribution (mean and standard deviation), not as one
//! sample, so every step still draws a fresh latent from it (as diffusers' scripts do) while the
//! encoder runs once. Random crops change the pixels every time, so with `--random-crop` the
//! decoded images are kept instead and the VAE runs per sample.
//!
//! The cache lives in memory; both encoders are tiny next to the UNet's training cost.

use std::collections::BTreeMap;

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use lora_core::models::text_encoder::TextEncoder;
use lora_core::models::tokenizer::TokenizedPrompt;
use lora_core::models::vae::Vae;
use lora_core::source::ModelFolder;
use lora_core::Rng;

use crate::config::Crop;
use crate::dataset::{image_to_tensor, Dataset};
use crate::masks::{mask_weights, read_mask};

/// How an image becomes the UNet's input space.
enum Space {
    /// Latent diffusion: VAE latents × `scaling_factor`. The VAE is kept only while it is still
    /// needed: for encoding, and for the whole run with random crops.
    Latent {
        vae: Option<Box<Vae>>,
        scaling_factor: f64,
    },
    /// Pixel diffusion (model folder without `vae/`): the image itself in [-1, 1].
    Pixel,
}

/// One image's cached encoding for one orientation.
enum Encoded {
    /// VAE posterior: `[C, h, w]` mean and standard deviation, unscaled.
    Distribution { mean: Tensor, std: Tensor },
    /// Pixel-space input, `[C, H, W]`.
    Pixels(Tensor),
}

pub struct EncodedDataset {
    space: Space,
    /// Per item, the encoding of the image as is `[0]` and mirrored `[1]` (only with `--flip`).
    /// Empty with random crops.
    encoded: Vec<[Option<Encoded>; 2]>,
    /// Decoded images, kept only for random crops.
    images: Vec<DynamicImage>,
    /// Per unique caption, what [`conditioning`] takes: the `[seq, hidden]` f32 text embedding,
    /// or the `[seq]` token ids when the text encoder trains.
    captions: Vec<Tensor>,
    /// Index into `captions` for each item.
    caption_of_item: Vec<usize>,
    /// The empty caption's, when caption dropout can pick it.
    empty_caption: Option<Tensor>,
    /// `--masks`: per item, the loss weights `[1, h, w]` at the UNet's input size, as is `[0]`
    /// and mirrored `[1]` (only with `--flip`). Empty without masks.
    masks: Vec<[Option<Tensor>; 2]>,
    crop: Crop,
    /// Per item, the `(width, height)` it is trained at (its bucket, or the square resolution).
    sizes: Vec<(usize, usize)>,
    channels: usize,
    device: Device,
}

pub struct EncodeOptions {
    /// Per item, the `(width, height)` it is trained at.
    pub sizes: Vec<(usize, usize)>,
    pub crop: Crop,
    pub flip: bool,
    pub caption_dropout: bool,
    /// Keep token ids instead of embeddings: the text encoder trains.
    pub caption_tokens: bool,
    /// Channels the UNet takes (for pixel-space models; latent models take the VAE's).
    pub unet_in_channels: usize,
    /// `--masks`: each item's mask file (centre crops only).
    pub masks: Option<Vec<PathBuf>>,
}

impl EncodedDataset {
    /// Runs the text encoder over every distinct caption and (for centre crops) the VAE over
    /// every image. `on_item` is called after each image, for progress display.
    pub fn build(
        model: &ModelFolder,
        dataset: &Dataset,
        options: &EncodeOptions,
        device: &Device,
        on_item: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        // The VAE runs once per image, so f32 costs little and avoids fp16 overflow in its
        // encoder (diffusers' `force_upcast`).
        let space = match model.load_vae(DType::F32, device)? {
            Some(vae) => {
                let scaling_factor = vae.scaling_factor();
                Space::Latent {
                    vae: Some(Box::new(vae)),
                    scaling_factor,
                }
            }
            None => Space::Pixel,
        };
        // The input's channels, and the pixels per input position.
        let (channels, pixels_per_input) = match &space {
            Space::Latent { vae, .. } => {
                let config = vae.as_ref().expect("just loaded").config();
                (config.in_channels, config.vae_scale_factor())
            }
            Space::Pixel => (options.unet_in_channels, 1),
        };
        let (captions, caption_of_item, empty_caption) = encode_captions(
            model,
            dataset,
            options.caption_dropout,
            options.caption_tokens,
            device,
        )?;
        let masks = match &options.masks {
            Some(files) => {
                ensure!(
                    options.crop == Crop::Center,
                    "--masks works with centre crops only (not --random-crop)"
                );
                dataset
                    .items
                    .iter()
                    .zip(files)
                    .enumerate()
                    .map(|(i, (item, file))| {
                        let mask = read_mask(file, item.size)?;
                        let mut both = [None, None];
                        for (slot, flip) in both.iter_mut().zip([false, true]) {
                            if !flip || options.flip {
                                *slot = Some(mask_weights(
                                    &mask,
                                    options.sizes[i],
                                    flip,
                                    pixels_per_input,
                                    device,
                                )?);
                            }
                        }
                        Ok(both)
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            None => Vec::new(),
        };

        let mut encoded = Vec::new();
        let mut images = Vec::new();
        let total = dataset.items.len();
        // Centre crops draw no randomness; the generator is only a required argument.
        let mut unused = Rng::new(0);
        for (i, (item, image)) in dataset.items.iter().zip(dataset.images()).enumerate() {
            let image = image?;
            match options.crop {
                Crop::Random => images.push(image),
                Crop::Center => {
                    let mut both = [None, None];
                    for (slot, flip) in both.iter_mut().zip([false, true]) {
                        if flip && !options.flip {
                            continue;
                        }
                        let pixels = image_to_tensor(
                            &image,
                            options.sizes[i],
                            Crop::Center,
                            flip,
                            channels,
                            &mut unused,
                            device,
                        )?;
                        *slot = Some(
                            encode_pixels(&space, pixels)
                                .with_context(|| format!("cannot encode {}", item.image))?,
                        );
                    }
                    encoded.push(both);
                }
            }
            on_item(i + 1, total);
        }
        let mut space = space;
        if let (Crop::Center, Space::Latent { vae, .. }) = (options.crop, &mut space) {
            *vae = None; // every latent is cached: free the VAE
        }
        Ok(Self {
            space,
            encoded,
            images,
            captions,
            caption_of_item,
            empty_caption,
            masks,
            crop: options.crop,
            sizes: options.sizes.clone(),
            channels,
            device: device.clone(),
        })
    }

    /// The UNet input for `item` (`[C, h, w]` f32), drawing the VAE sample (and, for random
    /// crops, the window) from `rng`.
    pub fn latents(&self, item: usize, flip: bool, rng: &mut Rng) -> Result<Tensor> {
        let encoded;
        let e = match self.crop {
            Crop::Center => self.encoded[item][usize::from(flip)]
                .as_ref()
                .context("flipped latents requested without --flip")?,
            Crop::Random => {
                let pixels = image_to_tensor(
                    &self.images[item],
                    self.sizes[item],
                    Crop::Random,
                    flip,
                    self.channels,
                    rng,
                    &self.device,
                )?;
                encoded = encode_pixels(&self.space, pixels)?;
                &encoded
            }
        };
        match (e, &self.space) {
            (Encoded::Pixels(p), _) => Ok(p.clone()),
            (Encoded::Distribution { mean, std }, Space::Latent { scaling_factor, .. }) => {
                let noise = rng.normal_tensor(mean.shape(), &self.device)?;
                Ok(((mean + (std * noise)?)? * *scaling_factor)?)
            }
            (Encoded::Distribution { .. }, Space::Pixel) => {
                unreachable!("pixel-space models store pixels")
            }
        }
    }

    /// `item`'s caption (the empty caption when `dropped`) as [`conditioning`] takes it: its text
    /// embedding, or its token ids when the text encoder trains.
    pub fn caption(&self, item: usize, dropped: bool) -> Result<&Tensor> {
        if dropped {
            return self
                .empty_caption
                .as_ref()
                .context("caption dropout without the empty caption encoded");
        }
        Ok(&self.captions[self.caption_of_item[item]])
    }

    /// `--masks`: the loss weights of `item` (`[1, h, w]`), mirrored with the image; `None`
    /// without masks.
    pub fn mask(&self, item: usize, flip: bool) -> Result<Option<&Tensor>> {
        match self.masks.get(item) {
            None => Ok(None),
            Some(both) => both[usize::from(flip)]
                .as_ref()
                .map(Some)
                .context("a mirrored mask requested without --flip"),
        }
    }

    /// Whether the model works on VAE latents (false: pixels).
    pub fn is_latent(&self) -> bool {
        matches!(self.space, Space::Latent { .. })
    }

    /// The `(width, height)` in pixels `item` is trained at.
    pub fn size(&self, item: usize) -> (usize, usize) {
        self.sizes[item]
    }
}

fn encode_pixels(space: &Space, pixels: Tensor) -> Result<Encoded> {
    Ok(match space {
        Space::Pixel => Encoded::Pixels(pixels),
        Space::Latent { vae, .. } => {
            let vae = vae
                .as_ref()
                .context("the VAE was released after caching every latent")?;
            let d = vae.encode(&pixels.unsqueeze(0)?)?;
            Encoded::Distribution {
                mean: d.mean.squeeze(0)?.to_dtype(DType::F32)?,
                std: (d.logvar * 0.5)?.exp()?.squeeze(0)?.to_dtype(DType::F32)?,
            }
        }
    })
}

/// The UNet's conditioning `[B, seq, hidden]` for a batch of captions as
/// [`EncodedDataset::caption`] gives them: the cached embeddings stacked, or the token ids
/// stacked and run through `text_encoder` (the one that trains, which must then be given).
pub fn conditioning(captions: &[Tensor], text_encoder: Option<&TextEncoder>) -> Result<Tensor> {
    let stacked = Tensor::stack(captions, 0)?;
    match (stacked.rank(), text_encoder) {
        (3, _) => Ok(stacked),
        (2, Some(encoder)) => encoder.forward(&stacked),
        (rank, _) => anyhow::bail!(
            "captions of rank {rank}: expected embeddings, or token ids with the text encoder"
        ),
    }
}

type EncodedCaptions = (Vec<Tensor>, Vec<usize>, Option<Tensor>);

/// Encodes each distinct caption once (and the empty caption when dropout is on): embeds it, or
/// only tokenizes it when `tokens_only`.
fn encode_captions(
    model: &ModelFolder,
    dataset: &Dataset,
    with_empty: bool,
    tokens_only: bool,
    device: &Device,
) -> Result<EncodedCaptions> {
    let tokenizer = model.tokenizer()?;
    let text_config = model.text_encoder_config()?;
    // f32: it runs once per caption, and the embeddings feed an f32 loss path anyway.
    let encoder = match tokens_only {
        true => None,
        false => {
            Some(model.load_text_encoder(&text_config, DType::F32, device, BTreeMap::new())?)
        }
    };
    let embed = |caption: &str| -> Result<Tensor> {
        let ids = TokenizedPrompt::batch_tensor(&[tokenizer.encode(caption)], device)?;
        Ok(match &encoder {
            Some(encoder) => encoder.forward(&ids)?.squeeze(0)?.to_dtype(DType::F32)?,
            None => ids.squeeze(0)?,
        })
    };
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    let mut embeddings = Vec::new();
    let mut caption_of_item = Vec::with_capacity(dataset.items.len());
    for item in &dataset.items {
        let i = match index.get(item.caption.as_str()) {
            Some(&i) => i,
            None => {
                embeddings.push(
                    embed(&item.caption)
                        .with_context(|| format!("cannot embed caption `{}`", item.caption))?,
                );
                index.insert(&item.caption, embeddings.len() - 1);
                embeddings.len() - 1
            }
        };
        caption_of_item.push(i);
    }
    let empty = with_empty.then(|| embed("")).transpose()?;
    Ok((embeddings, caption_of_item, empty))
}
