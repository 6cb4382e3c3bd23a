//! The VAE's two halves: the encoder (image → latent moments) and the decoder (latents → image).

use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::blocks::{DownBlock, MidBlock, OutputHead, UpBlock};
use crate::engine::Conv2dLayer;
use crate::models::config::VaeConfig;

/// Image → concatenated (mean, logvar) moments, `2 × latent_channels` channels.
pub(super) struct Encoder {
    conv_in: Conv2dLayer,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    head: OutputHead,
}

impl Encoder {
    pub(super) fn load(vb: &VarBuilder, c: &VaeConfig) -> Result<Self> {
        let channels = &c.block_out_channels;
        let groups = c.norm_num_groups;
        let last = channels.len() - 1;
        let down_blocks = (0..=last)
            .map(|i| {
                DownBlock::load(
                    &vb.pp(format!("down_blocks.{i}")),
                    groups,
                    c.layers_per_block,
                    channels[i.saturating_sub(1)],
                    channels[i],
                    i != last,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            conv_in: Conv2dLayer::load(&vb.pp("conv_in"), c.in_channels, channels[0], 3, 1, 1)?,
            down_blocks,
            mid_block: MidBlock::load(&vb.pp("mid_block"), groups, channels[last])?,
            head: OutputHead::load(vb, groups, channels[last], 2 * c.latent_channels)?,
        })
    }

    pub(super) fn forward(&self, image: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(image)?;
        for block in &self.down_blocks {
            x = block.forward(&x)?;
        }
        self.head.forward(&self.mid_block.forward(&x)?)
    }
}

/// Latents → image; the blocks mirror the encoder's, each with one extra resnet.
pub(super) struct Decoder {
    conv_in: Conv2dLayer,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    head: OutputHead,
}

impl Decoder {
    pub(super) fn load(vb: &VarBuilder, c: &VaeConfig) -> Result<Self> {
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let groups = c.norm_num_groups;
        let last = reversed.len() - 1;
        let up_blocks = (0..=last)
            .map(|i| {
                UpBlock::load(
                    &vb.pp(format!("up_blocks.{i}")),
                    groups,
                    c.layers_per_block + 1,
                    reversed[i.saturating_sub(1)],
                    reversed[i],
                    i != last,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            conv_in: Conv2dLayer::load(&vb.pp("conv_in"), c.latent_channels, reversed[0], 3, 1, 1)?,
            mid_block: MidBlock::load(&vb.pp("mid_block"), groups, reversed[0])?,
            up_blocks,
            head: OutputHead::load(vb, groups, reversed[last], c.out_channels)?,
        })
    }

    pub(super) fn forward(&self, latents: &Tensor) -> Result<Tensor> {
        let mut x = self.mid_block.forward(&self.conv_in.forward(latents)?)?;
        for block in &self.up_blocks {
            x = block.forward(&x)?;
        }
        self.head.forward(&x)
    }
}
