//! The KL autoencoder (diffusers' `AutoencoderKL`) that maps images to latents and back.
//!
//! Built from candle-transformers' public VAE blocks (`DownEncoderBlock2D`, `ResnetBlock2D`,
//! `UpDecoderBlock2D`) rather than its `AutoEncoderKL`, whose encoder output type hides the
//! latent mean and can only sample with the device's global RNG; training needs the mean (and
//! reproducible samples) explicitly.
//!
//! Latents here are the VAE's own. The UNet works on `scaling_factor ×` these; callers apply the
//! factor themselves so it is never applied twice or forgotten silently.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};
use candle_transformers::models::stable_diffusion::resnet::{ResnetBlock2D, ResnetBlock2DConfig};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{
    DownEncoderBlock2D, DownEncoderBlock2DConfig, UpDecoderBlock2D, UpDecoderBlock2DConfig,
};

use crate::io::weights;
use crate::models::config::VaeConfig;

/// diffusers' VAE uses this epsilon in every group norm.
const NORM_EPS: f64 = 1e-6;
/// diffusers clamps the encoder's log-variance to this range before use.
const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);

pub struct Vae {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
    dtype: DType,
}

/// The encoder's diagonal Gaussian over latents (unscaled).
pub struct LatentDistribution {
    pub mean: Tensor,
    /// Log-variance, already clamped as diffusers does.
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// `mean + exp(logvar / 2) · noise`, with `noise` ~ N(0, 1) of the latents' shape supplied by
    /// the caller so sampling is reproducible.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        ensure!(
            noise.dims() == self.mean.dims(),
            "latent noise has shape {:?}, expected the latents' {:?}",
            noise.dims(),
            self.mean.dims()
        );
        let std = (&self.logvar * 0.5)?.exp()?;
        Ok((&self.mean + (std * noise.to_dtype(self.mean.dtype())?)?)?)
    }
}

impl Vae {
    /// Loads `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (or `.fp16`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let path = weights::component_weights(dir, "diffusion_pytorch_model")?;
        let vb = weights::var_builder(std::slice::from_ref(&path), dtype, device, BTreeMap::new())?;
        Self::new(vb, config).with_context(|| format!("loading the VAE from {}", path.display()))
    }

    /// Builds the VAE from weights named as in diffusers (a single-file checkpoint's, mapped).
    pub fn from_var_builder(vb: VarBuilder, config: VaeConfig) -> Result<Self> {
        Self::new(vb, config)
    }

    fn new(vb: VarBuilder, config: VaeConfig) -> Result<Self> {
        let latent = config.latent_channels;
        let conv1x1 = |channels, name| {
            candle_nn::conv2d(channels, channels, 1, Conv2dConfig::default(), vb.pp(name))
        };
        Ok(Self {
            dtype: vb.dtype(),
            encoder: Encoder::new(vb.pp("encoder"), &config)?,
            decoder: Decoder::new(vb.pp("decoder"), &config)?,
            quant_conv: config
                .use_quant_conv
                .then(|| conv1x1(2 * latent, "quant_conv"))
                .transpose()?,
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| conv1x1(latent, "post_quant_conv"))
                .transpose()?,
            config,
        })
    }

    /// `image`: `[batch, in_channels, H, W]` in [-1, 1], H and W multiples of
    /// [`VaeConfig::vae_scale_factor`].
    pub fn encode(&self, image: &Tensor) -> Result<LatentDistribution> {
        let (_, channels, height, width) = image
            .dims4()
            .context("VAE input image: expected [batch, channels, H, W]")?;
        let factor = self.config.vae_scale_factor();
        ensure!(
            channels == self.config.in_channels && height.is_multiple_of(factor) && width.is_multiple_of(factor),
            "VAE input image is [_, {channels}, {height}, {width}]: expected {} channels and H, W multiples of {factor}",
            self.config.in_channels
        );
        let moments = self.encoder.forward(image)?;
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments)?,
            None => moments,
        };
        let latent = self.config.latent_channels;
        let (low, high) = LOGVAR_RANGE;
        Ok(LatentDistribution {
            mean: moments.narrow(1, 0, latent)?,
            logvar: moments.narrow(1, latent, latent)?.clamp(low, high)?,
        })
    }

    /// The distribution's mean: the deterministic encoding.
    pub fn encode_mean(&self, image: &Tensor) -> Result<Tensor> {
        Ok(self.encode(image)?.mean)
    }

    /// `latents`: `[batch, latent_channels, h, w]`, unscaled. Returns the image in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, channels, _, _) = latents
            .dims4()
            .context("VAE latents: expected [batch, channels, h, w]")?;
        ensure!(
            channels == self.config.latent_channels,
            "VAE latents have {channels} channels, expected {}",
            self.config.latent_channels
        );
        let latents = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&latents)
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The dtype of the weights; inputs must be cast to it.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

fn conv3x3(in_channels: usize, out_channels: usize, vb: VarBuilder) -> candle_core::Result<Conv2d> {
    candle_nn::conv2d(
        in_channels,
        out_channels,
        3,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        vb,
    )
}

/// diffusers' VAE `UNetMidBlock2D`: resnet, single-head self-attention over all pixels, resnet.
///
/// Our own rather than candle-transformers': its attention block feeds non-contiguous
/// single-head tensors to a batched matmul and decodes every image after the first of a batch
/// wrongly (`vae_batches_equal_single_images` checks ours).
struct MidBlock {
    resnet_in: ResnetBlock2D,
    attention: SelfAttention,
    resnet_out: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        let resnet = |i: usize| {
            let config = ResnetBlock2DConfig {
                out_channels: Some(channels),
                temb_channels: None,
                groups,
                groups_out: None,
                eps: NORM_EPS,
                use_in_shortcut: None,
                output_scale_factor: 1.0,
            };
            ResnetBlock2D::new(vb.pp(format!("resnets.{i}")), channels, config)
        };
        Ok(Self {
            resnet_in: resnet(0)?,
            attention: SelfAttention::new(vb.pp("attentions.0"), channels, groups)?,
            resnet_out: resnet(1)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = self.resnet_in.forward(xs, None)?;
        let xs = self.attention.forward(&xs)?;
        self.resnet_out.forward(&xs, None)
    }
}

/// One attention head spanning all channels, with a residual (diffusers `attention_head_dim =
/// channels`). Accepts both diffusers weight spellings: `to_q/to_k/to_v/to_out.0` and the older
/// `query/key/value/proj_attn`.
struct SelfAttention {
    norm: GroupNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    channels: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let linear = |name: &str| candle_nn::linear(channels, channels, vb.pp(name));
        Ok(Self {
            norm: candle_nn::group_norm(groups, channels, NORM_EPS, vb.pp("group_norm"))?,
            query: linear(names[0])?,
            key: linear(names[1])?,
            value: linear(names[2])?,
            out: linear(names[3])?,
            channels,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let tokens = self
            .norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let dtype = tokens.dtype();
        // Scores and softmax in f32, as diffusers upcasts the VAE attention.
        let q = self.query.forward(&tokens)?.to_dtype(DType::F32)?;
        let k = self.key.forward(&tokens)?.to_dtype(DType::F32)?;
        let v = self.value.forward(&tokens)?.to_dtype(DType::F32)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (self.channels as f64).sqrt())?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let attended = probs.matmul(&v)?.to_dtype(dtype)?;
        let out = self
            .out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + xs
    }
}

/// Group norm, SiLU, then the output convolution: the tail of both halves.
struct OutputHead {
    norm: GroupNorm,
    conv: Conv2d,
}

impl OutputHead {
    fn new(
        vb: &VarBuilder,
        groups: usize,
        channels: usize,
        out_channels: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm: candle_nn::group_norm(groups, channels, NORM_EPS, vb.pp("conv_norm_out"))?,
            conv: conv3x3(channels, out_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.conv.forward(&self.norm.forward(xs)?.silu()?)
    }
}

/// Image → concatenated (mean, logvar) moments, `2 × latent_channels` channels.
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: MidBlock,
    head: OutputHead,
}

impl Encoder {
    fn new(vb: VarBuilder, c: &VaeConfig) -> Result<Self> {
        let channels = &c.block_out_channels;
        let last = channels.len() - 1;
        let down_blocks = (0..=last)
            .map(|i| {
                let config = DownEncoderBlock2DConfig {
                    num_layers: c.layers_per_block,
                    resnet_eps: NORM_EPS,
                    resnet_groups: c.norm_num_groups,
                    output_scale_factor: 1.0,
                    add_downsample: i != last,
                    // diffusers pads the stride-2 convolution asymmetrically (right/bottom only).
                    downsample_padding: 0,
                };
                let in_channels = channels[i.saturating_sub(1)];
                DownEncoderBlock2D::new(
                    vb.pp(format!("down_blocks.{i}")),
                    in_channels,
                    channels[i],
                    config,
                )
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            conv_in: conv3x3(c.in_channels, channels[0], vb.pp("conv_in"))?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), channels[last], c.norm_num_groups)?,
            head: OutputHead::new(
                &vb,
                c.norm_num_groups,
                channels[last],
                2 * c.latent_channels,
            )?,
        })
    }

    fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let mut xs = self.conv_in.forward(image)?;
        for block in &self.down_blocks {
            xs = block.forward(&xs)?;
        }
        Ok(self.head.forward(&self.mid_block.forward(&xs)?)?)
    }
}

/// Latents → image; the blocks mirror the encoder's, each with one extra resnet.
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock2D>,
    head: OutputHead,
}

impl Decoder {
    fn new(vb: VarBuilder, c: &VaeConfig) -> Result<Self> {
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let last = reversed.len() - 1;
        let up_blocks = (0..=last)
            .map(|i| {
                let config = UpDecoderBlock2DConfig {
                    num_layers: c.layers_per_block + 1,
                    resnet_eps: NORM_EPS,
                    resnet_groups: c.norm_num_groups,
                    output_scale_factor: 1.0,
                    add_upsample: i != last,
                };
                let in_channels = reversed[i.saturating_sub(1)];
                UpDecoderBlock2D::new(
                    vb.pp(format!("up_blocks.{i}")),
                    in_channels,
                    reversed[i],
                    config,
                )
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            conv_in: conv3x3(c.latent_channels, reversed[0], vb.pp("conv_in"))?,
            mid_block: MidBlock::new(vb.pp("mid_block"), reversed[0], c.norm_num_groups)?,
            up_blocks,
            head: OutputHead::new(&vb, c.norm_num_groups, reversed[last], c.out_channels)?,
        })
    }

    fn forward(&self, latents: &Tensor) -> Result<Tensor> {
        let mut xs = self.mid_block.forward(&self.conv_in.forward(latents)?)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs)?;
        }
        Ok(self.head.forward(&xs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn tiny_vae(use_quant_conv: bool) -> Vae {
        let config = VaeConfig::parse(&format!(
            r#"{{"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": [8, 16],
                "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 16, "use_quant_conv": {use_quant_conv}}}"#
        ))
        .unwrap();
        // Random weights: the layout and shapes are what is under test here; numeric parity with
        // diffusers is checked against the reference fixtures in tests/.
        let vars = VarMap::new();
        Vae::new(
            VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu),
            config,
        )
        .unwrap()
    }

    #[test]
    fn shapes_round_trip() {
        let vae = tiny_vae(true);
        let image = Tensor::rand(-1f32, 1.0, (2, 3, 16, 16), &Device::Cpu).unwrap();
        let dist = vae.encode(&image).unwrap();
        assert_eq!(dist.mean.dims(), &[2, 4, 8, 8]);
        assert_eq!(dist.logvar.dims(), &[2, 4, 8, 8]);
        assert_eq!(vae.decode(&dist.mean).unwrap().dims(), &[2, 3, 16, 16]);
        assert_eq!(vae.scaling_factor(), 0.18215);

        let zero_noise = Tensor::zeros((2, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let sample = dist.sample(&zero_noise).unwrap();
        assert_eq!(
            sample.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            dist.mean.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(dist.sample(&zero_noise.narrow(0, 0, 1).unwrap()).is_err());
    }

    #[test]
    fn rejects_bad_input_shapes() {
        let vae = tiny_vae(false);
        let odd = Tensor::zeros((1, 3, 15, 16), DType::F32, &Device::Cpu).unwrap();
        let err = format!("{:#}", vae.encode(&odd).err().unwrap());
        assert!(err.contains("H, W multiples of 2"), "{err}");
        let latents = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(format!("{:#}", vae.decode(&latents).unwrap_err())
            .contains("have 3 channels, expected 4"));
    }
}
