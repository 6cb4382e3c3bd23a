//! What the frozen encoders make of the dataset, computed once before the first step: each
//! caption's text embedding and (with centre crops) each image's latent distribution. Epochs
//! after the first — in fact every step — then skip the text encoder and the VAE. Text encoders
//! that train (`--train-text-encoder`) cannot be cached: their captions are kept as token ids and
//! encoded every step ([`conditioning`] with [`TrainedText`]).
//!
//! The VAE's output is kept as its distribution (mean and standard deviation), not as one
//! sample, so every step still draws a fresh latent from it (as diffusers' scripts do) while the
//! encoder runs once. Random crops change the pixels every time, so with `--random-crop` the
//! decoded images are kept instead and the VAE runs per sample.
//!
//! For SDXL each caption is encoded by both text encoders (the context and the pooled
//! embedding; or tokenized by both tokenizers when they train), and each sample carries its size
//! and crop micro-conditioning ([`sdxl_time_ids`]), as diffusers' and kohya's SDXL scripts give
//! them.
//!
//! The cache lives in memory; both encoders are tiny next to the UNet's training cost. In a
//! data-parallel run each process encodes its share of the images and captions and the rest
//! arrive through the processes' sum (`cache/shard.rs`).

use std::collections::BTreeMap;

use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use image::DynamicImage;
use lora_core::models::sdxl_prompt::SdxlTextEncoders;
use lora_core::models::text_encoder::TextEncoder;
use lora_core::models::tokenizer::{ClipTokenizer, TokenizedPrompt};
use lora_core::models::vae::Vae;
use lora_core::source::ModelFolder;
use lora_core::{AddedConditioning, Rng};

use crate::config::Crop;
use crate::dataset::{image_to_tensor, CropWindow, Dataset};
use crate::distributed::ProcessGroup;
use crate::masks::{mask_weights, read_mask};

mod shard;
use shard::Shard;

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

/// A caption as [`conditioning`] takes it.
#[derive(Debug, Clone)]
pub enum Caption {
    /// Encoded once by frozen encoders: the `[seq, hidden]` f32 context and, for SDXL, the `[P]`
    /// pooled embedding (the second text encoder's).
    Embedded {
        context: Tensor,
        pooled: Option<Tensor>,
    },
    /// For the text encoders that train: the `[seq]` token ids and, for SDXL, the second
    /// tokenizer's.
    Tokens { ids: Tensor, ids_2: Option<Tensor> },
}

/// One sample's UNet inputs before noising.
#[derive(Debug, Clone)]
pub struct Sample {
    /// `[C, h, w]` f32.
    pub latents: Tensor,
    pub caption: Caption,
    /// SDXL's micro-conditioning ([`sdxl_time_ids`]); `None` for other models.
    pub time_ids: Option<[f32; 6]>,
}

/// The text encoders that train (`--train-text-encoder`), their adapters attached: captions go
/// through them every step.
#[allow(clippy::large_enum_variant)] // one per run
pub enum TrainedText {
    Clip(TextEncoder),
    Sdxl(SdxlTextEncoders),
}

impl TrainedText {
    /// The (first) text encoder.
    pub fn first(&self) -> &TextEncoder {
        match self {
            Self::Clip(encoder) => encoder,
            Self::Sdxl(encoders) => &encoders.text_encoder,
        }
    }

    /// SDXL's second text encoder.
    pub fn second(&self) -> Option<&TextEncoder> {
        match self {
            Self::Clip(_) => None,
            Self::Sdxl(encoders) => Some(&encoders.text_encoder_2),
        }
    }
}

pub struct EncodedDataset {
    space: Space,
    /// Per item, the encoding of the image as is `[0]` and mirrored `[1]` (only with `--flip`).
    /// Empty with random crops.
    encoded: Vec<[Option<Encoded>; 2]>,
    /// Decoded images, kept only for random crops.
    images: Vec<DynamicImage>,
    /// Per unique caption, what [`conditioning`] takes.
    captions: Vec<Caption>,
    /// Index into `captions` for each item.
    caption_of_item: Vec<usize>,
    /// The empty caption's, when caption dropout can pick it.
    empty_caption: Option<Caption>,
    /// Samples carry SDXL's micro-conditioning.
    sdxl: bool,
    /// Per item, the image's `(width, height)` before resizing.
    original_sizes: Vec<(usize, usize)>,
    /// Per item, where its centre crop is cut (empty with random crops, drawn per sample).
    windows: Vec<CropWindow>,
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
    /// every image, both split over `group`'s ranks and shared (every rank of it must call this
    /// with the same dataset; captions are only tokenized, by every rank, when the text encoder
    /// trains). `on_item(done, total)` is called after each of this rank's images,
    /// for progress display.
    pub fn build(
        model: &ModelFolder,
        dataset: &Dataset,
        options: &EncodeOptions,
        group: &ProcessGroup,
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
        let captions = encode_captions(
            model,
            dataset,
            options.caption_dropout,
            options.caption_tokens,
            group,
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

        // With centre crops the encoding is split over the ranks (`shard`), then shared.
        let shard = match options.crop {
            Crop::Center => Shard::of(group),
            Crop::Random => Shard::WHOLE,
        };
        let total = dataset.items.len();
        let mut encoded: Vec<[Option<Encoded>; 2]> = (0..total).map(|_| [None, None]).collect();
        let mut windows = vec![None; total];
        let mut images = Vec::new();
        let mine = shard.count(total);
        // Centre crops draw no randomness; the generator is only a required argument.
        let mut unused = Rng::new(0);
        for (done, (i, image)) in dataset.images_of(|i| shard.owns(i)).enumerate() {
            let image = image?;
            match options.crop {
                Crop::Random => images.push(image),
                Crop::Center => {
                    for (slot, flip) in encoded[i].iter_mut().zip([false, true]) {
                        if flip && !options.flip {
                            continue;
                        }
                        let (pixels, window) = image_to_tensor(
                            &image,
                            options.sizes[i],
                            Crop::Center,
                            flip,
                            channels,
                            &mut unused,
                            device,
                        )?;
                        if !flip {
                            windows[i] = Some(window);
                        }
                        *slot = Some(encode_pixels(&space, pixels).with_context(|| {
                            format!("cannot encode {}", dataset.items[i].image)
                        })?);
                    }
                }
            }
            on_item(done + 1, mine);
        }
        let (encoded, windows) = match options.crop {
            Crop::Random => (Vec::new(), Vec::new()),
            Crop::Center => {
                if group.is_collective() {
                    let latent = matches!(space, Space::Latent { .. });
                    share_encodings(group, shard, latent, &mut encoded, &mut windows, device)
                        .context("sharing the cached latents between the processes")?;
                }
                let windows = windows
                    .into_iter()
                    .map(|w| w.context("an item without its crop window"));
                (encoded, windows.collect::<Result<Vec<_>>>()?)
            }
        };
        let mut space = space;
        if let (Crop::Center, Space::Latent { vae, .. }) = (options.crop, &mut space) {
            *vae = None; // every latent is cached: free the VAE
        }
        Ok(Self {
            space,
            encoded,
            images,
            captions: captions.captions,
            caption_of_item: captions.caption_of_item,
            empty_caption: captions.empty,
            sdxl: model.is_sdxl(),
            original_sizes: dataset.items.iter().map(|item| item.size).collect(),
            windows,
            masks,
            crop: options.crop,
            sizes: options.sizes.clone(),
            channels,
            device: device.clone(),
        })
    }

    /// `item` as a training sample, mirrored when `flip`, with the empty caption when
    /// `dropped`; the VAE sample (and, for random crops, the window) drawn from `rng`.
    pub fn sample(&self, item: usize, flip: bool, dropped: bool, rng: &mut Rng) -> Result<Sample> {
        let (latents, window) = self.latents(item, flip, rng)?;
        let caption = self.caption(item, dropped)?.clone();
        let time_ids = self
            .sdxl
            .then(|| sdxl_time_ids(self.original_sizes[item], self.sizes[item], window, flip));
        Ok(Sample {
            latents,
            caption,
            time_ids,
        })
    }

    /// The UNet input for `item` (`[C, h, w]` f32) and where it was cut, drawing the VAE sample
    /// (and, for random crops, the window) from `rng`.
    fn latents(&self, item: usize, flip: bool, rng: &mut Rng) -> Result<(Tensor, CropWindow)> {
        let encoded;
        let (e, window) = match self.crop {
            Crop::Center => (
                self.encoded[item][usize::from(flip)]
                    .as_ref()
                    .context("flipped latents requested without --flip")?,
                self.windows[item],
            ),
            Crop::Random => {
                let (pixels, window) = image_to_tensor(
                    &self.images[item],
                    self.sizes[item],
                    Crop::Random,
                    flip,
                    self.channels,
                    rng,
                    &self.device,
                )?;
                encoded = encode_pixels(&self.space, pixels)?;
                (&encoded, window)
            }
        };
        let latents = match (e, &self.space) {
            (Encoded::Pixels(p), _) => p.clone(),
            (Encoded::Distribution { mean, std }, Space::Latent { scaling_factor, .. }) => {
                let noise = rng.normal_tensor(mean.shape(), &self.device)?;
                ((mean + (std * noise)?)? * *scaling_factor)?
            }
            (Encoded::Distribution { .. }, Space::Pixel) => {
                unreachable!("pixel-space models store pixels")
            }
        };
        Ok((latents, window))
    }

    /// `item`'s caption (the empty caption when `dropped`: kohya and diffusers drop a caption to
    /// its encoding, not to zeros) as [`conditioning`] takes it.
    fn caption(&self, item: usize, dropped: bool) -> Result<&Caption> {
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

/// SDXL's micro-conditioning ids of an image of `original` = `(width, height)` pixels trained at
/// `target` from `window`: `[original h, original w, crop top, crop left, target h, target w]`,
/// the crop's corner in the image as trained on, so mirrored when `flip` (diffusers' SDXL script
/// mirrors before cropping; here the window is mirrored after, the same pixels).
pub fn sdxl_time_ids(
    original: (usize, usize),
    target: (usize, usize),
    window: CropWindow,
    flip: bool,
) -> [f32; 6] {
    let ((original_w, original_h), (target_w, target_h)) = (original, target);
    let left = match flip {
        true => window.resized.0 - target_w - window.left,
        false => window.left,
    };
    [original_h, original_w, window.top, left, target_h, target_w].map(|v| v as f32)
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

/// The UNet's conditioning for a batch of samples: the context `[B, seq, hidden]` (the cached
/// embeddings stacked, or the token ids stacked and run through `text`, the encoders that train,
/// which must then be given) and, for SDXL samples, the added conditioning (pooled embedding and
/// micro-conditioning ids).
pub fn conditioning(
    samples: &[Sample],
    text: Option<&TrainedText>,
) -> Result<(Tensor, Option<AddedConditioning>)> {
    ensure!(!samples.is_empty(), "an empty batch");
    let stack = |tensors: Vec<&Tensor>| Tensor::stack(&tensors, 0);
    // Every sample's `Some` values stacked; `None` when none has one.
    let stack_some = |tensors: Vec<Option<&Tensor>>| -> Result<Option<Tensor>> {
        let present: Vec<&Tensor> = tensors.iter().flatten().copied().collect();
        ensure!(
            present.is_empty() || present.len() == tensors.len(),
            "a batch mixes SDXL captions with others"
        );
        Ok((!present.is_empty()).then(|| stack(present)).transpose()?)
    };
    let (context, pooled) = match &samples[0].caption {
        Caption::Embedded { .. } => {
            let (mut contexts, mut pooled) = (Vec::new(), Vec::new());
            for sample in samples {
                let Caption::Embedded { context, pooled: p } = &sample.caption else {
                    bail!("a batch mixes embedded captions with token ids");
                };
                contexts.push(context);
                pooled.push(p.as_ref());
            }
            (stack(contexts)?, stack_some(pooled)?)
        }
        Caption::Tokens { .. } => {
            let (mut ids, mut ids_2) = (Vec::new(), Vec::new());
            for sample in samples {
                let Caption::Tokens { ids: i, ids_2: i2 } = &sample.caption else {
                    bail!("a batch mixes token ids with embedded captions");
                };
                ids.push(i);
                ids_2.push(i2.as_ref());
            }
            let (ids, ids_2) = (stack(ids)?, stack_some(ids_2)?);
            match (text, ids_2) {
                (Some(TrainedText::Clip(encoder)), None) => (encoder.forward(&ids)?, None),
                (Some(TrainedText::Sdxl(encoders)), Some(ids_2)) => {
                    let embeddings = encoders.encode_ids(&ids, &ids_2)?;
                    (embeddings.context, Some(embeddings.pooled))
                }
                _ => bail!(
                    "captions as token ids need the text encoders that train, one per tokenizer"
                ),
            }
        }
    };
    let time_ids: Vec<f32> = samples.iter().flat_map(|s| s.time_ids).flatten().collect();
    match pooled {
        None => {
            ensure!(
                time_ids.is_empty(),
                "SDXL size ids without a pooled embedding"
            );
            Ok((context, None))
        }
        Some(pooled) => {
            ensure!(
                time_ids.len() == 6 * samples.len(),
                "an SDXL batch with samples lacking their size ids"
            );
            let added = AddedConditioning {
                text_embeds: pooled,
                time_ids: Tensor::from_vec(time_ids, (samples.len(), 6), context.device())?,
            };
            Ok((context, Some(added)))
        }
    }
}

/// [`shard::share`] of the images' encodings and crop windows: per item the posterior's mean and
/// deviation (`latent`), or the pixels, as is and mirrored, then the window as four numbers.
fn share_encodings(
    group: &ProcessGroup,
    shard: Shard,
    latent: bool,
    encoded: &mut [[Option<Encoded>; 2]],
    windows: &mut [Option<CropWindow>],
    device: &Device,
) -> Result<()> {
    let mut items = Vec::with_capacity(encoded.len());
    for (both, window) in encoded.iter().zip(windows.iter()) {
        let mut slots = Vec::with_capacity(5);
        for e in both {
            let (a, b) = match e {
                Some(Encoded::Distribution { mean, std }) => (Some(mean), Some(std)),
                Some(Encoded::Pixels(pixels)) => (Some(pixels), None),
                None => (None, None),
            };
            slots.extend([a.cloned(), b.cloned()]);
        }
        let window = window.map(|w| {
            let numbers = [w.resized.0, w.resized.1, w.left, w.top].map(|v| v as f32);
            Tensor::new(&numbers, device)
        });
        slots.push(window.transpose()?);
        items.push(slots);
    }
    shard::share(group, shard, &mut items, device)?;
    for (i, ((slots, both), window)) in items
        .into_iter()
        .zip(encoded.iter_mut())
        .zip(windows.iter_mut())
        .enumerate()
    {
        let mut slots = slots.into_iter();
        for e in both.iter_mut() {
            let (a, b) = (slots.next().flatten(), slots.next().flatten());
            *e = match (a, b) {
                (Some(mean), Some(std)) if latent => Some(Encoded::Distribution { mean, std }),
                (Some(pixels), None) if !latent => Some(Encoded::Pixels(pixels)),
                (None, None) => None,
                _ => bail!("item {i}: an encoding of the wrong kind"),
            };
        }
        let numbers = slots
            .next()
            .flatten()
            .with_context(|| format!("item {i}: no process encoded it"))?;
        let [resized_w, resized_h, left, top] = numbers
            .to_vec1::<f32>()?
            .try_into()
            .map_err(|_| anyhow::anyhow!("item {i}: a crop window of the wrong length"))?;
        *window = Some(CropWindow {
            resized: (resized_w as usize, resized_h as usize),
            left: left as usize,
            top: top as usize,
        });
    }
    Ok(())
}

/// [`shard::share`] of the captions' embeddings: per distinct caption the context and (SDXL)
/// the pooled embedding.
fn share_embeddings(
    group: &ProcessGroup,
    shard: Shard,
    captions: &mut [Option<Caption>],
    device: &Device,
) -> Result<()> {
    let mut items = Vec::with_capacity(captions.len());
    for caption in captions.iter() {
        items.push(match caption {
            Some(Caption::Embedded { context, pooled }) => {
                vec![Some(context.clone()), pooled.clone()]
            }
            Some(Caption::Tokens { .. }) => bail!("token ids are not shared"),
            None => vec![None, None],
        });
    }
    shard::share(group, shard, &mut items, device)?;
    for (i, (slots, caption)) in items.into_iter().zip(captions.iter_mut()).enumerate() {
        let mut slots = slots.into_iter();
        let (context, pooled) = (slots.next().flatten(), slots.next().flatten());
        let context = context.with_context(|| format!("caption {i}: no process embedded it"))?;
        *caption = Some(Caption::Embedded { context, pooled });
    }
    Ok(())
}

/// Each distinct caption's encoding, once.
struct EncodedCaptions {
    captions: Vec<Caption>,
    caption_of_item: Vec<usize>,
    /// The empty caption's, when dropout is on.
    empty: Option<Caption>,
}

/// Encodes each distinct caption once (and the empty caption when dropout is on): embeds it
/// (for SDXL with both encoders, keeping the pooled embedding too), or only tokenizes it (by both
/// tokenizers for SDXL) when `tokens_only`.
fn encode_captions(
    model: &ModelFolder,
    dataset: &Dataset,
    with_empty: bool,
    tokens_only: bool,
    group: &ProcessGroup,
    device: &Device,
) -> Result<EncodedCaptions> {
    let tokenizer = model.tokenizer()?;
    let text_config = model.text_encoder_config()?;
    // f32: it runs once per caption, and the embeddings feed an f32 loss path anyway.
    let load = || model.load_text_encoder(&text_config, DType::F32, device, BTreeMap::new());
    #[allow(clippy::large_enum_variant)] // one, alive while the captions are encoded
    enum Encoder {
        Tokens(ClipTokenizer, Option<ClipTokenizer>),
        Clip(ClipTokenizer, TextEncoder),
        Sdxl(SdxlTextEncoders),
    }
    let encoder = match (tokens_only, model.is_sdxl()) {
        (true, false) => Encoder::Tokens(tokenizer, None),
        (true, true) => Encoder::Tokens(tokenizer, Some(model.tokenizer_2()?)),
        (false, false) => Encoder::Clip(tokenizer, load()?),
        (false, true) => {
            let config_2 = model.text_encoder_2_config()?;
            Encoder::Sdxl(SdxlTextEncoders::new(
                load()?,
                model.load_text_encoder_2(&config_2, DType::F32, device, BTreeMap::new())?,
                tokenizer,
                model.tokenizer_2()?,
            )?)
        }
    };
    let embed = |caption: &str| -> Result<Caption> {
        let single = |tokenizer: &ClipTokenizer| -> Result<Tensor> {
            let ids = TokenizedPrompt::batch_tensor(&[tokenizer.encode(caption)], device)?;
            Ok(ids.squeeze(0)?)
        };
        Ok(match &encoder {
            Encoder::Tokens(tokenizer, tokenizer_2) => Caption::Tokens {
                ids: single(tokenizer)?,
                ids_2: tokenizer_2.as_ref().map(single).transpose()?,
            },
            Encoder::Clip(tokenizer, encoder) => Caption::Embedded {
                context: encoder
                    .forward(&single(tokenizer)?.unsqueeze(0)?)?
                    .squeeze(0)?
                    .to_dtype(DType::F32)?,
                pooled: None,
            },
            Encoder::Sdxl(encoders) => {
                let embeddings = encoders.encode(&[caption], device)?;
                Caption::Embedded {
                    context: embeddings.context.squeeze(0)?.to_dtype(DType::F32)?,
                    pooled: Some(embeddings.pooled.squeeze(0)?.to_dtype(DType::F32)?),
                }
            }
        })
    };
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    let mut distinct: Vec<&str> = Vec::new();
    let caption_of_item = dataset
        .items
        .iter()
        .map(|item| {
            *index.entry(&item.caption).or_insert_with(|| {
                distinct.push(&item.caption);
                distinct.len() - 1
            })
        })
        .collect();
    // Embeddings are split over the ranks and shared; tokenizing is cheap and done by all.
    let shard = match tokens_only {
        true => Shard::WHOLE,
        false => Shard::of(group),
    };
    let mut captions = distinct
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let embedded = shard.owns(i).then(|| embed(text)).transpose();
            embedded.with_context(|| format!("cannot embed caption `{text}`"))
        })
        .collect::<Result<Vec<_>>>()?;
    if !tokens_only && group.is_collective() {
        share_embeddings(group, shard, &mut captions, device)
            .context("sharing the caption embeddings between the processes")?;
    }
    let captions = captions
        .into_iter()
        .map(|caption| caption.context("a caption no process embedded"))
        .collect::<Result<Vec<_>>>()?;
    let empty = with_empty.then(|| embed("")).transpose()?;
    Ok(EncodedCaptions {
        captions,
        caption_of_item,
        empty,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::cover_and_crop;
    use image::RgbImage;

    /// diffusers' train_text_to_image_lora_sdxl.py, for a 300×200 image at 128²: resize the
    /// short side to 128 (192×128), mirror or not, then crop; `crop_top_left` is
    /// `(round((128 − 128)/2), round((192 − 128)/2))` = (0, 32) centred, and for a random crop
    /// the corner drawn in the (mirrored) image.
    #[test]
    fn time_ids_follow_the_diffusers_sdxl_script() {
        let image = DynamicImage::ImageRgb8(RgbImage::new(300, 200));
        let (_, centre) = cover_and_crop(&image, (128, 128), Crop::Center, &mut Rng::new(0));
        assert_eq!(
            centre,
            CropWindow {
                resized: (192, 128),
                left: 32,
                top: 0
            }
        );
        for flip in [false, true] {
            assert_eq!(
                sdxl_time_ids((300, 200), (128, 128), centre, flip),
                [200.0, 300.0, 0.0, 32.0, 128.0, 128.0]
            );
        }
        // A window 10 pixels from the left edge is 54 from it once the image is mirrored.
        let random = CropWindow {
            resized: (192, 128),
            left: 10,
            top: 0,
        };
        assert_eq!(
            sdxl_time_ids((300, 200), (128, 128), random, false)[3],
            10.0
        );
        assert_eq!(sdxl_time_ids((300, 200), (128, 128), random, true)[3], 54.0);
    }
}
