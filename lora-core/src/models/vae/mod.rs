//! The KL autoencoder (diffusers' `AutoencoderKL`) that maps images to latents and back.
//!
//! Built on the engine's frozen layers (`blocks`, `attention`, `coders`), as the UNet is: fused
//! group norm + SiLU + convolution nodes and our multi-threaded CPU kernels. The encoder returns
//! the latent mean and log-variance explicitly (training needs the mean, and reproducible
//! samples from caller-supplied noise).
//!
//! Latents here are the VAE's own. The UNet works on `scaling_factor ×` these; callers apply the
//! factor themselves so it is never applied twice or forgotten silently.

use std::collections::BTreeMap;
use std::path::Path;

mod attention;
mod blocks;
mod coders;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use self::coders::{Decoder, Encoder};
use crate::engine::Conv2dLayer;
use crate::io::weights;
use crate::models::config::VaeConfig;

/// diffusers' VAE uses this epsilon in every group norm.
const NORM_EPS: f64 = 1e-6;
/// diffusers clamps the encoder's log-variance to this range before use.
const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);

pub struct Vae {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2dLayer>,
    post_quant_conv: Option<Conv2dLayer>,
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
        let conv1x1 = |channels, name| Conv2dLayer::load(&vb.pp(name), channels, channels, 1, 1, 0);
        Ok(Self {
            dtype: vb.dtype(),
            encoder: Encoder::load(&vb.pp("encoder"), &config)?,
            decoder: Decoder::load(&vb.pp("decoder"), &config)?,
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
