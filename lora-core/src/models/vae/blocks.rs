//! The VAE's building blocks, on the engine's frozen layers: diffusers' `ResnetBlock2D` without a
//! time embedding, the encoder's down blocks, the decoder's up blocks, the mid block and the
//! output head both halves end with.

use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::attention::SelfAttention;
use super::NORM_EPS;
use crate::engine::fused::{norm_silu_conv, norm_silu_conv_residual};
use crate::engine::{upsample_nearest, Conv2dLayer, GroupNormLayer};

fn conv3x3(
    vb: &VarBuilder,
    in_ch: usize,
    out_ch: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2dLayer> {
    Conv2dLayer::load(vb, in_ch, out_ch, 3, stride, padding)
}

/// `shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`, the shortcut a 1×1 conv where the
/// channel count changes; each half is one fused engine node, as in the UNet's resnets.
pub(super) struct ResnetBlock {
    norm1: GroupNormLayer,
    conv1: Conv2dLayer,
    norm2: GroupNormLayer,
    conv2: Conv2dLayer,
    conv_shortcut: Option<Conv2dLayer>,
}

impl ResnetBlock {
    pub(super) fn load(
        vb: &VarBuilder,
        groups: usize,
        in_ch: usize,
        out_ch: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNormLayer::load(&vb.pp("norm1"), groups, in_ch, NORM_EPS)?,
            conv1: conv3x3(&vb.pp("conv1"), in_ch, out_ch, 1, 1)?,
            norm2: GroupNormLayer::load(&vb.pp("norm2"), groups, out_ch, NORM_EPS)?,
            conv2: conv3x3(&vb.pp("conv2"), out_ch, out_ch, 1, 1)?,
            conv_shortcut: (in_ch != out_ch)
                .then(|| Conv2dLayer::load(&vb.pp("conv_shortcut"), in_ch, out_ch, 1, 1, 0))
                .transpose()?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = norm_silu_conv(&self.norm1, &self.conv1, x, None)?;
        Ok(norm_silu_conv_residual(
            &self.norm2,
            &self.conv2,
            &h,
            x,
            self.conv_shortcut.as_ref(),
        )?)
    }
}

/// `count` resnets, the first changing `in_ch` to `out_ch` channels.
fn resnets(
    vb: &VarBuilder,
    groups: usize,
    count: usize,
    in_ch: usize,
    out_ch: usize,
) -> Result<Vec<ResnetBlock>> {
    (0..count)
        .map(|j| {
            let in_ch = if j == 0 { in_ch } else { out_ch };
            ResnetBlock::load(&vb.pp(format!("resnets.{j}")), groups, in_ch, out_ch)
        })
        .collect()
}

/// `x` through `resnets` in order.
fn forward_resnets(resnets: &[ResnetBlock], x: &Tensor) -> Result<Tensor> {
    resnets
        .iter()
        .try_fold(x.clone(), |x, resnet| resnet.forward(&x))
}

/// diffusers' `DownEncoderBlock2D`: resnets, then (all but the last block) a stride-2 3×3 conv
/// over the input padded by one row and column at the bottom and right only.
pub(super) struct DownBlock {
    resnets: Vec<ResnetBlock>,
    downsample: Option<Conv2dLayer>,
}

impl DownBlock {
    pub(super) fn load(
        vb: &VarBuilder,
        groups: usize,
        layers: usize,
        in_ch: usize,
        out_ch: usize,
        downsample: bool,
    ) -> Result<Self> {
        Ok(Self {
            resnets: resnets(vb, groups, layers, in_ch, out_ch)?,
            downsample: downsample
                .then(|| conv3x3(&vb.pp("downsamplers.0.conv"), out_ch, out_ch, 2, 0))
                .transpose()?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = forward_resnets(&self.resnets, x)?;
        match &self.downsample {
            Some(conv) => Ok(conv.forward(&x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?),
            None => Ok(x),
        }
    }
}

/// diffusers' `UpDecoderBlock2D`: resnets, then (all but the last block) a nearest-neighbour ×2
/// upsampling followed by a 3×3 conv.
pub(super) struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2dLayer>,
}

impl UpBlock {
    pub(super) fn load(
        vb: &VarBuilder,
        groups: usize,
        layers: usize,
        in_ch: usize,
        out_ch: usize,
        upsample: bool,
    ) -> Result<Self> {
        Ok(Self {
            resnets: resnets(vb, groups, layers, in_ch, out_ch)?,
            upsample: upsample
                .then(|| conv3x3(&vb.pp("upsamplers.0.conv"), out_ch, out_ch, 1, 1))
                .transpose()?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = forward_resnets(&self.resnets, x)?;
        match &self.upsample {
            Some(conv) => {
                let (_, _, h, w) = x.dims4()?;
                Ok(conv.forward(&upsample_nearest(&x, 2 * h, 2 * w)?)?)
            }
            None => Ok(x),
        }
    }
}

/// diffusers' VAE `UNetMidBlock2D`: resnet, single-head self-attention over all pixels, resnet.
pub(super) struct MidBlock {
    resnet_in: ResnetBlock,
    attention: SelfAttention,
    resnet_out: ResnetBlock,
}

impl MidBlock {
    pub(super) fn load(vb: &VarBuilder, groups: usize, channels: usize) -> Result<Self> {
        Ok(Self {
            resnet_in: ResnetBlock::load(&vb.pp("resnets.0"), groups, channels, channels)?,
            attention: SelfAttention::load(&vb.pp("attentions.0"), groups, channels)?,
            resnet_out: ResnetBlock::load(&vb.pp("resnets.1"), groups, channels, channels)?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.resnet_in.forward(x)?;
        let x = self.attention.forward(&x)?;
        self.resnet_out.forward(&x)
    }
}

/// Group norm, SiLU, then the output convolution (`conv_norm_out`, `conv_out`): the tail of
/// both halves, one fused node.
pub(super) struct OutputHead {
    norm: GroupNormLayer,
    conv: Conv2dLayer,
}

impl OutputHead {
    pub(super) fn load(
        vb: &VarBuilder,
        groups: usize,
        channels: usize,
        out_ch: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm: GroupNormLayer::load(&vb.pp("conv_norm_out"), groups, channels, NORM_EPS)?,
            conv: conv3x3(&vb.pp("conv_out"), channels, out_ch, 1, 1)?,
        })
    }

    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(norm_silu_conv(&self.norm, &self.conv, x, None)?)
    }
}
