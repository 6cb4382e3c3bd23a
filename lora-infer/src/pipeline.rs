//! Text-to-image generation: the `StableDiffusionPipeline` loop of diffusers (classifier-free
//! guidance, a scheduler from [`crate::scheduler`]) over lora-core's UNet, text encoder and VAE,
//! with LoRA adapters applied to the UNet (unmerged at their scale, or fused into the weights)
//! and folded into the text encoder. For SDXL, `StableDiffusionXLPipeline`'s: two text encoders
//! ([`PromptEncoder`]), the pooled embedding and the size micro-conditioning (original size =
//! target size = the image's, no crop) added to the UNet's inputs. img2img ([`InitImage`],
//! `strength`) follows `StableDiffusionImg2ImgPipeline`: the image's latents noised to the first
//! step kept.
//!
//! A model without `vae/` denoises pixels: its final "latents" are the image in [-1, 1].

use std::collections::BTreeMap;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use lora_core::models::config::SchedulerConfig;
use lora_core::models::text_encoder::{self, TextEncoder};
use lora_core::models::vae::Vae;
use lora_core::source::ModelFolder;
use lora_core::{
    Adapter, AdapterFile, AdapterModules, AddedConditioning, ModelModules, Rng,
    UNet2DConditionModel,
};

use crate::prompt_encoder::{EncodedPrompts, PromptEncoder};

use crate::scheduler::{Scheduler, SchedulerKind};
use lora_core::options::{AdapterSpec, DeviceSpec, Precision};

/// The loaded models, ready to generate.
pub struct Pipeline {
    unet: UNet2DConditionModel,
    text: PromptEncoder,
    vae: Option<Vae>,
    scheduler_config: SchedulerConfig,
    device: Device,
    load_warnings: Vec<String>,
}

/// The parts of a [`Pipeline`], for callers that already hold them (e.g. a training loop sampling
/// with its UNet and attached, still-training adapter).
pub struct PipelineParts {
    pub unet: UNet2DConditionModel,
    pub text: PromptEncoder,
    /// `None` for pixel-space models.
    pub vae: Option<Vae>,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
}

/// What to generate. `Default` gives diffusers' defaults with an empty prompt.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    /// Classifier-free guidance scale; ≤ 1 disables guidance (no unconditional pass).
    pub guidance: f64,
    pub scheduler: SchedulerKind,
    /// Image size in pixels; `None`: the model's sample size (× the VAE factor).
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub num_images: usize,
    /// Images denoised together (the UNet batch is twice this with guidance).
    pub batch_size: usize,
    /// Image `i` uses seed `seed + i` for its initial noise and its sampler noise, so any image
    /// can be regenerated alone, whatever the batch size.
    pub seed: u64,
    /// Initial noise `[num_images, C, h, w]` instead of sampling it; scaled by the scheduler's
    /// initial noise sigma exactly as diffusers scales a passed `latents=` tensor. With
    /// `init_image`, the noise added to the encoded image instead.
    pub init_latents: Option<Tensor>,
    /// img2img: start from this image noised to `strength` instead of from pure noise.
    pub init_image: Option<InitImage>,
    /// img2img: how much of the schedule to run, in (0, 1]: the last
    /// `floor(steps · strength)` steps (diffusers' `StableDiffusionImg2ImgPipeline`).
    pub strength: f64,
}

/// The starting image of img2img, one for all images or one per image.
#[derive(Debug, Clone)]
pub enum InitImage {
    /// `[1 or N, channels, H, W]` in [-1, 1]; encoded with the VAE (a sample of its latent
    /// distribution, drawn with each image's seed, × the scaling factor).
    Pixels(Tensor),
    /// `[1 or N, C, h, w]` latents already × the scaling factor (what diffusers does with a
    /// 4-channel `image`).
    Latents(Tensor),
}

impl GenerateOptions {
    /// The defaults of diffusers' pipeline for the model: Euler and guidance 5 for SDXL (as
    /// `StableDiffusionXLPipeline` ships), DDIM and 7.5 otherwise ([`Default`]).
    pub fn for_model(sdxl: bool) -> Self {
        match sdxl {
            true => Self {
                guidance: 5.0,
                scheduler: SchedulerKind::Euler,
                ..Self::default()
            },
            false => Self::default(),
        }
    }
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 30,
            guidance: 7.5,
            scheduler: SchedulerKind::Ddim,
            width: None,
            height: None,
            num_images: 1,
            batch_size: 1,
            seed: 0,
            init_latents: None,
            init_image: None,
            strength: 0.8,
        }
    }
}

/// The result of [`Pipeline::generate`], all f32 on the pipeline's device.
pub struct Generated {
    /// Final denoised latents `[N, C, h, w]`, before division by the VAE scaling factor.
    pub latents: Tensor,
    /// Decoded images `[N, channels, H, W]`, nominally in [-1, 1] but not clamped.
    pub images: Tensor,
    /// The seed of each image.
    pub seeds: Vec<u64>,
}

/// Where generation is, for progress displays.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub batch: usize,
    pub batches: usize,
    pub step: usize,
    pub steps: usize,
}

impl Pipeline {
    /// Loads `model` in `dtype` on `device` with `adapters` applied: to the UNet unmerged at
    /// their scales (or folded into its weights when `fuse`), and to the text encoder folded in
    /// at load, for adapters that have text-encoder modules. Adapters holding NaN or infinity
    /// are refused.
    pub fn load(
        model: &ModelFolder,
        adapters: &[AdapterSpec],
        device: &Device,
        dtype: DType,
        fuse: bool,
    ) -> Result<Self> {
        Self::load_with(model, adapters, device, dtype, fuse, false)
    }

    /// [`load`](Self::load), letting adapters with NaN or infinity through when
    /// `allow_nonfinite`, each listed by [`load_warnings`](Self::load_warnings).
    pub fn load_with(
        model: &ModelFolder,
        adapters: &[AdapterSpec],
        device: &Device,
        dtype: DType,
        fuse: bool,
        allow_nonfinite: bool,
    ) -> Result<Self> {
        if dtype == DType::BF16 {
            Precision::Bf16.check_device(DeviceSpec::of(device))?;
        }
        let te_config = model.text_encoder_config()?;
        let tokenizer = model.tokenizer()?;
        let unet_config = model.unet_config()?;
        let unet_modules = UNet2DConditionModel::adapter_modules_of(&unet_config)?;

        let te_modules = text_encoder::lora_modules(&te_config);
        let te2_config = model
            .is_sdxl()
            .then(|| model.text_encoder_2_config())
            .transpose()?;
        let te2_modules = te2_config.as_ref().map(text_encoder::lora_modules);
        let modules = ModelModules {
            unet: &unet_modules,
            text_encoder: Some(&te_modules),
            text_encoder_2: te2_modules.as_deref(),
        };
        let mut load_warnings = Vec::new();
        let resolved: Vec<(&AdapterSpec, Adapter)> = adapters
            .iter()
            .map(|spec| {
                let file = AdapterFile::read_with(&spec.path, device, allow_nonfinite)?;
                load_warnings.extend_from_slice(file.warnings());
                let adapter = file.resolve(&modules).with_context(|| {
                    format!(
                        "adapter {} does not fit the model {} (trained for another base model?)",
                        spec.path.display(),
                        model.root().display()
                    )
                })?;
                Ok((spec, adapter))
            })
            .collect::<Result<_>>()?;

        // DoRA modules always attach unmerged: their change depends on the weight they apply
        // to, the base's (as peft combines adapters), which a fused layer no longer has. Plain
        // modules on the same layers stay unmerged with them.
        let name = |i: usize, spec: &AdapterSpec| format!("{i}:{}", spec.path.display());
        let unet_parts = resolved.iter().map(|(s, a)| (&a.unet, s.scale));
        let (unet_folded, unet_unmerged) = match fuse {
            true => split_for_folding(unet_parts),
            false => (
                Vec::new(),
                resolved.iter().map(|(_, a)| a.unet.clone()).collect(),
            ),
        };
        let mut unet = if fuse {
            let vb = model.unet_var_builder(dtype, device, summed_deltas(unet_folded)?)?;
            UNet2DConditionModel::load(&unet_config, &vb)
                .with_context(|| format!("loading the fused UNet of {}", model.root().display()))?
        } else {
            model.load_unet(&unet_config, dtype, device)?
        };
        for (i, ((spec, _), modules)) in resolved.iter().zip(&unet_unmerged).enumerate() {
            if !modules.is_empty() {
                unet.attach_adapter(&name(i, spec), modules, spec.scale)?;
            }
        }

        // Text encoders: plain modules folded in at load, DoRA ones attached.
        let with_adapters = |part: fn(&Adapter) -> &AdapterModules,
                             load: &dyn Fn(BTreeMap<String, Tensor>) -> Result<TextEncoder>|
         -> Result<TextEncoder> {
            let parts = resolved.iter().map(|(s, a)| (part(a), s.scale));
            let (folded, unmerged) = split_for_folding(parts);
            let mut encoder = load(summed_deltas(folded)?)?;
            for (i, ((spec, _), modules)) in resolved.iter().zip(&unmerged).enumerate() {
                if !modules.is_empty() {
                    encoder.attach_adapter(&name(i, spec), modules, spec.scale)?;
                }
            }
            Ok(encoder)
        };
        let text_encoder = with_adapters(|a| &a.text_encoder, &|deltas| {
            model.load_text_encoder(&te_config, dtype, device, deltas)
        })?;
        let text = if let Some(config_2) = &te2_config {
            let text_encoder_2 = with_adapters(|a| &a.text_encoder_2, &|deltas| {
                model.load_text_encoder_2(config_2, dtype, device, deltas)
            })?;
            PromptEncoder::sdxl(model, text_encoder, tokenizer, text_encoder_2)?
        } else {
            PromptEncoder::Clip {
                text_encoder,
                tokenizer,
            }
        };
        let vae = match model.vae_config()? {
            Some(config) => {
                // diffusers runs VAEs marked force_upcast (SD's) in f32 when the model is f16.
                let vae_dtype = if config.force_upcast && dtype == DType::F16 {
                    if model.is_sdxl() {
                        load_warnings.push(
                            "decoding with the VAE in f32: SDXL's original VAE overflows to NaN \
                             in f16 (its config says force_upcast)"
                                .to_owned(),
                        );
                    }
                    DType::F32
                } else {
                    dtype
                };
                model.load_vae(vae_dtype, device)?
            }
            None => None,
        };
        let mut pipeline = Self::from_parts(PipelineParts {
            unet,
            text,
            vae,
            scheduler_config: model.scheduler_config()?,
            device: device.clone(),
        })?;
        pipeline.load_warnings = load_warnings;
        Ok(pipeline)
    }

    /// What loading let through or changed that the user should hear: adapters' NaN or
    /// infinity (`--allow-nonfinite`), SDXL's VAE decoding in f32 under f16.
    pub fn load_warnings(&self) -> &[String] {
        &self.load_warnings
    }

    pub fn from_parts(parts: PipelineParts) -> Result<Self> {
        let unet_config = parts.unet.config();
        let te_width = parts.text.context_width();
        ensure!(
            te_width == unet_config.cross_attention_dim,
            "the text encoders' hidden width {te_width} differs from the UNet's cross_attention_dim {}",
            unet_config.cross_attention_dim
        );
        ensure!(
            parts.text.has_pooled() == unet_config.text_time.is_some(),
            "an SDXL UNet needs SDXL's two text encoders, and only it takes them"
        );
        if let Some(vae) = &parts.vae {
            let latent = vae.config().latent_channels;
            ensure!(
                unet_config.in_channels == latent && unet_config.out_channels == latent,
                "the UNet has {} input / {} output channels but the VAE's latents have {latent}",
                unet_config.in_channels,
                unet_config.out_channels
            );
        }
        Ok(Self {
            unet: parts.unet,
            text: parts.text,
            vae: parts.vae,
            scheduler_config: parts.scheduler_config,
            device: parts.device,
            load_warnings: Vec::new(),
        })
    }

    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }

    /// Whether the model is SDXL (two text encoders, added conditioning).
    pub fn is_sdxl(&self) -> bool {
        self.text.has_pooled()
    }

    /// For attaching or detaching adapters between generations.
    pub fn unet_mut(&mut self) -> &mut UNet2DConditionModel {
        &mut self.unet
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Pixels per latent pixel: the VAE's factor, 1 for pixel-space models.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae
            .as_ref()
            .map_or(1, |v| v.config().vae_scale_factor())
    }

    /// `(width, height)` in pixels for `options`, defaulted and checked.
    pub fn image_size(&self, options: &GenerateOptions) -> Result<(usize, usize)> {
        let factor = self.vae_scale_factor();
        let from_latents = match (&options.init_image, &options.init_latents) {
            (Some(InitImage::Pixels(image)), _) => {
                let (_, _, h, w) = image
                    .dims4()
                    .context("initial image: expected [N, channels, H, W]")?;
                Some((w, h))
            }
            (Some(InitImage::Latents(l)), _) | (None, Some(l)) => {
                let (_, _, h, w) = l
                    .dims4()
                    .context("initial latents: expected [N, C, h, w]")?;
                Some((w * factor, h * factor))
            }
            (None, None) => None,
        };
        let default = |what: &str, from_latents: Option<usize>| -> Result<usize> {
            if let Some(size) = from_latents {
                return Ok(size);
            }
            let sample =
                self.unet.config().sample_size.with_context(|| {
                    format!("the UNet config has no sample_size: pass --{what}")
                })?;
            Ok(sample * factor)
        };
        let width = match options.width {
            Some(w) => w,
            None => default("width", from_latents.map(|s| s.0))?,
        };
        let height = match options.height {
            Some(h) => h,
            None => default("height", from_latents.map(|s| s.1))?,
        };
        check_image_size("width", width, factor)?;
        check_image_size("height", height, factor)?;
        Ok((width, height))
    }

    /// Warnings about the prompts of `options` (the part of a prompt beyond the text encoder's
    /// length is dropped, as diffusers drops it).
    pub fn prompt_warnings(&self, options: &GenerateOptions) -> Vec<String> {
        let limit = self.text.max_prompt_tokens();
        [
            ("prompt", &options.prompt),
            ("negative prompt", &options.negative_prompt),
        ]
        .into_iter()
        .filter(|(_, text)| self.text.truncates(text))
        .map(|(what, _)| {
            format!("the {what} is longer than the text encoder's {limit} tokens; the rest was truncated (ignored)")
        })
        .collect()
    }

    pub fn generate(&self, options: &GenerateOptions) -> Result<Generated> {
        self.generate_with_progress(options, &mut |_| {})
    }

    pub fn generate_with_progress(
        &self,
        options: &GenerateOptions,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Generated> {
        let o = options;
        ensure!(o.num_images > 0, "the number of images must be at least 1");
        ensure!(o.batch_size > 0, "the batch size must be at least 1");
        ensure!(
            o.guidance.is_finite(),
            "guidance scale {} is not a finite number",
            o.guidance
        );
        let (width, height) = self.image_size(o)?;
        let factor = self.vae_scale_factor();
        let channels = self.unet.config().in_channels;
        let latent_shape = (channels, height / factor, width / factor);
        if let Some(latents) = &o.init_latents {
            let (n, c, h, w) = latents.dims4()?;
            ensure!(
                (n, (c, h, w)) == (o.num_images, latent_shape),
                "initial latents have shape {:?}; expected [{}, {}, {}, {}] for {} image(s) of {width}x{height}",
                latents.dims(),
                o.num_images,
                latent_shape.0,
                latent_shape.1,
                latent_shape.2,
                o.num_images
            );
        }

        let first_step = self.first_step(o)?;
        let init_image = match &o.init_image {
            Some(image) => Some(self.check_init_image(image, o.num_images, latent_shape)?),
            None => None,
        };
        let guided = o.guidance > 1.0;
        let prompts = self
            .text
            .encode(&o.prompt, &o.negative_prompt, guided, &self.device)?;
        let seeds: Vec<u64> = (0..o.num_images as u64)
            .map(|i| o.seed.wrapping_add(i))
            .collect();
        let batches = o.num_images.div_ceil(o.batch_size);
        let mut all_latents = Vec::with_capacity(batches);
        let mut all_images = Vec::with_capacity(batches);
        for (batch, batch_seeds) in seeds.chunks(o.batch_size).enumerate() {
            let first = batch * o.batch_size;
            let mut rngs: Vec<Rng> = batch_seeds.iter().map(|&s| Rng::new(s)).collect();
            let mut scheduler = o.scheduler.build(&self.scheduler_config, o.steps)?;
            // As diffusers draws them: the VAE sample first, then the noise.
            let encoded = match &init_image {
                Some(image) => Some(self.encode_init_image(image, first, &mut rngs)?),
                None => None,
            };
            let noise = match &o.init_latents {
                Some(l) => l
                    .narrow(0, first, batch_seeds.len())?
                    .to_dtype(DType::F32)?
                    .to_device(&self.device)?,
                None => self.per_image_noise(&mut rngs, latent_shape)?,
            };
            let start = match &encoded {
                Some(encoded) => scheduler.add_noise(encoded, &noise, first_step)?,
                None => (noise * scheduler.init_noise_sigma())?,
            };
            let latents = self.denoise(
                scheduler.as_mut(),
                first_step,
                start,
                &prompts,
                (height, width),
                guided.then_some(o.guidance),
                &mut rngs,
                &mut |step| {
                    progress(Progress {
                        batch,
                        batches,
                        step,
                        steps: o.steps - first_step,
                    })
                },
            )?;
            all_images.push(self.decode(&latents)?);
            all_latents.push(latents);
        }
        Ok(Generated {
            latents: Tensor::cat(&all_latents, 0)?,
            images: Tensor::cat(&all_images, 0)?,
            seeds,
        })
    }

    /// The first step to run: 0, or for img2img the start of the last `floor(steps·strength)`.
    fn first_step(&self, options: &GenerateOptions) -> Result<usize> {
        if options.init_image.is_none() {
            return Ok(0);
        }
        let strength = options.strength;
        ensure!(
            strength > 0.0 && strength <= 1.0,
            "strength {strength}: expected a number in (0, 1]"
        );
        let run = ((options.steps as f64 * strength) as usize).min(options.steps);
        ensure!(
            run > 0,
            "strength {strength} of {} steps leaves no step to run: raise --strength or --steps",
            options.steps
        );
        Ok(options.steps - run)
    }

    /// The init image as f32 on the device, checked against the images to generate.
    fn check_init_image(
        &self,
        image: &InitImage,
        num_images: usize,
        latent_shape: (usize, usize, usize),
    ) -> Result<InitImage> {
        let (tensor, expected, what) = match image {
            InitImage::Pixels(t) => {
                let factor = self.vae_scale_factor();
                let channels = match &self.vae {
                    Some(vae) => vae.config().in_channels,
                    None => latent_shape.0,
                };
                let expected = (channels, latent_shape.1 * factor, latent_shape.2 * factor);
                (t, expected, "initial image")
            }
            InitImage::Latents(t) => (t, latent_shape, "initial image latents"),
        };
        let (n, c, h, w) = tensor
            .dims4()
            .with_context(|| format!("{what}: expected 4 dimensions"))?;
        ensure!(
            (n == 1 || n == num_images) && (c, h, w) == expected,
            "{what} has shape {:?}; expected [1 or {num_images}, {}, {}, {}]",
            tensor.dims(),
            expected.0,
            expected.1,
            expected.2
        );
        let tensor = tensor.to_dtype(DType::F32)?.to_device(&self.device)?;
        Ok(match image {
            InitImage::Pixels(_) => InitImage::Pixels(tensor),
            InitImage::Latents(_) => InitImage::Latents(tensor),
        })
    }

    /// The UNet-space latents of the init image for images `first..first + rngs.len()`; a VAE
    /// sample (× scaling factor) drawn with each image's generator for pixel images.
    fn encode_init_image(
        &self,
        image: &InitImage,
        first: usize,
        rngs: &mut [Rng],
    ) -> Result<Tensor> {
        let pick = |t: &Tensor, i: usize| -> Result<Tensor> {
            let index = if t.dim(0)? == 1 { 0 } else { first + i };
            Ok(t.narrow(0, index, 1)?)
        };
        let per_image = rngs
            .iter_mut()
            .enumerate()
            .map(|(i, rng)| match (image, &self.vae) {
                (InitImage::Latents(l), _) => pick(l, i),
                (InitImage::Pixels(p), None) => pick(p, i),
                (InitImage::Pixels(p), Some(vae)) => {
                    let pixels = pick(p, i)?.to_dtype(vae.dtype())?;
                    let dist = vae.encode(&pixels)?;
                    let noise = rng
                        .normal_tensor(dist.mean.dims(), &self.device)?
                        .to_dtype(dist.mean.dtype())?;
                    Ok((dist.sample(&noise)?.to_dtype(DType::F32)? * vae.scaling_factor())?)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&per_image, 0)?)
    }

    /// One standard-normal latent per image, each from its own generator.
    fn per_image_noise(&self, rngs: &mut [Rng], shape: (usize, usize, usize)) -> Result<Tensor> {
        let (c, h, w) = shape;
        let noise = rngs
            .iter_mut()
            .map(|rng| rng.normal_tensor((1, c, h, w), &self.device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&noise, 0)?)
    }

    /// The sampling loop for one batch, from `latents` (already at the noise level of step
    /// `first_step`) to final latents (f32).
    /// `guidance`: the classifier-free guidance scale, `None` without guidance (then `prompts`
    /// hold only the prompt). `size`: the image's (height, width) in pixels, SDXL's
    /// micro-conditioning.
    #[allow(clippy::too_many_arguments)] // one private call site; a struct would only rename them
    fn denoise(
        &self,
        scheduler: &mut dyn Scheduler,
        first_step: usize,
        mut latents: Tensor,
        prompts: &EncodedPrompts,
        size: (usize, usize),
        guidance: Option<f64>,
        rngs: &mut [Rng],
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        let batch = latents.dim(0)?;
        // [uncond × batch; cond × batch], the order diffusers concatenates them in.
        let per_image = |t: &Tensor| -> Result<Tensor> {
            let mut dims = t.dims().to_vec();
            let rows = dims.remove(0);
            let mut expanded = vec![rows, batch];
            expanded.extend_from_slice(&dims);
            let mut flat = vec![rows * batch];
            flat.extend_from_slice(&dims);
            Ok(t.unsqueeze(1)?.broadcast_as(expanded)?.reshape(flat)?)
        };
        let context = per_image(&prompts.context)?;
        let added = match &prompts.pooled {
            Some(pooled) => {
                let text_embeds = per_image(pooled)?;
                let (h, w) = (size.0 as f32, size.1 as f32);
                let rows = text_embeds.dim(0)?;
                let time_ids = Tensor::new(&[h, w, 0.0, 0.0, h, w], &self.device)?
                    .unsqueeze(0)?
                    .broadcast_as((rows, 6))?
                    .contiguous()?;
                Some(AddedConditioning {
                    text_embeds,
                    time_ids,
                })
            }
            None => None,
        };
        let timesteps = scheduler.timesteps().to_vec();
        for (step, &t) in timesteps.iter().enumerate().skip(first_step) {
            let input = if guidance.is_some() {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, step)?;
            let t = Tensor::new(t as f32, &self.device)?;
            let output = self
                .unet
                .forward_conditioned(&input, &t, &context, added.as_ref())?
                .to_dtype(DType::F32)?;
            let output = match guidance {
                Some(scale) => {
                    let uncond = output.narrow(0, 0, batch)?;
                    let cond = output.narrow(0, batch, batch)?;
                    (&uncond + ((cond - &uncond)? * scale)?)?
                }
                None => output,
            };
            let step_noise = if scheduler.is_stochastic() {
                let (_, c, h, w) = latents.dims4()?;
                Some(self.per_image_noise(rngs, (c, h, w))?)
            } else {
                None
            };
            latents = scheduler.step(&output, step, &latents, step_noise.as_ref())?;
            on_step(step + 1 - first_step);
        }
        Ok(latents)
    }

    /// Final latents to images in [-1, 1] (unclamped); pixel-space models' latents are images.
    fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let Some(vae) = &self.vae else {
            return Ok(latents.clone());
        };
        let scaled = (latents / vae.scaling_factor())?.to_dtype(vae.dtype())?;
        // One image at a time bounds the decoder's memory at full resolution, as diffusers' VAE
        // slicing does; the decoder's peak dwarfs the UNet's at 512² and above.
        let images = (0..scaled.dim(0)?)
            .map(|i| {
                vae.decode(&scaled.narrow(0, i, 1)?)?
                    .to_dtype(DType::F32)
                    .map_err(Into::into)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&images, 0)?)
    }
}

type Modules = AdapterModules;

/// Each adapter's modules of one component split into those folded into the weights (with the
/// adapter's scale) and those attached unmerged: every module of a layer that any adapter adapts
/// with DoRA is attached unmerged, the rest folds.
fn split_for_folding<'a>(
    components: impl Iterator<Item = (&'a Modules, f64)> + Clone,
) -> (Vec<(Modules, f64)>, Vec<Modules>) {
    let dora_layers: std::collections::BTreeSet<&String> = components
        .clone()
        .flat_map(|(modules, _)| modules.iter())
        .filter(|(_, m)| m.as_lora().is_some_and(|m| m.magnitude.is_some()))
        .map(|(path, _)| path)
        .collect();
    components
        .map(|(modules, scale)| {
            let (unmerged, folded): (Modules, Modules) = modules
                .iter()
                .map(|(p, m)| (p.clone(), m.clone()))
                .partition(|(p, _)| dora_layers.contains(p));
            ((folded, scale), unmerged)
        })
        .unzip()
}

/// Σᵢ scaleᵢ·ΔWᵢ per weight name over the adapters' plain LoRA modules of one component.
fn summed_deltas(components: Vec<(Modules, f64)>) -> Result<BTreeMap<String, Tensor>> {
    let mut sum: BTreeMap<String, Tensor> = BTreeMap::new();
    for (modules, scale) in components {
        for (name, delta) in Adapter::weight_deltas(&modules, scale)? {
            let total = match sum.remove(&name) {
                Some(acc) => (acc + delta)?,
                None => delta,
            };
            sum.insert(name, total);
        }
    }
    Ok(sum)
}

/// `size` pixels must be a positive multiple of the VAE's downscaling `factor` (1 without a VAE).
pub fn check_image_size(what: &str, size: usize, factor: usize) -> Result<()> {
    ensure!(
        size > 0 && size.is_multiple_of(factor),
        "{what} {size} is not a positive multiple of {factor} (the VAE's downscaling factor)"
    );
    Ok(())
}
