//! The UNet's down, mid and up blocks: what each holds, in diffusers' order.

use anyhow::Result;

use super::resnet::ResnetBlock2D;
use super::transformer::{Transformer2DModel, Visitor};
use crate::adapters::{AdaptableLayer, AdaptableVisitor, LoraConv};

/// A down or up block: resnets, each optionally followed by a transformer, then an optional
/// resampling conv.
#[derive(Debug, Clone)]
pub(super) struct UNetBlock {
    pub(super) resnets: Vec<ResnetBlock2D>,
    pub(super) attentions: Vec<Transformer2DModel>,
    /// Stride-2 conv (down blocks, `downsamplers.0.conv`) or nearest-neighbour ×2 followed by a
    /// conv (up blocks, `upsamplers.0.conv`).
    pub(super) resample: Option<LoraConv>,
}

impl UNetBlock {
    pub(super) fn visit(&mut self, prefix: &str, f: &mut Visitor) -> Result<()> {
        for (j, attn) in self.attentions.iter_mut().enumerate() {
            attn.visit(&format!("{prefix}.attentions.{j}"), f)?;
        }
        Ok(())
    }

    /// Calls `f` with the path and layer of every adaptable layer of the resnets, then the
    /// resampler's convolution (`resampler` is `downsamplers` or `upsamplers`).
    pub(super) fn visit_resnets(
        &mut self,
        prefix: &str,
        resampler: &str,
        f: &mut AdaptableVisitor,
    ) -> Result<()> {
        for (j, resnet) in self.resnets.iter_mut().enumerate() {
            resnet.visit(&format!("{prefix}.resnets.{j}"), f)?;
        }
        match &mut self.resample {
            Some(conv) => f(
                &format!("{prefix}.{resampler}.0.conv"),
                AdaptableLayer::Conv(conv),
            ),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct MidBlock {
    pub(super) resnet_in: ResnetBlock2D,
    pub(super) attention: Transformer2DModel,
    pub(super) resnet_out: ResnetBlock2D,
}
