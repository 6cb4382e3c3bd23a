//! The UNet's down, mid and up blocks: what each holds, in diffusers' order.

use anyhow::Result;

use super::resnet::ResnetBlock2D;
use super::transformer::{Transformer2DModel, Visitor};
use crate::engine::Conv2dLayer;

/// A down or up block: resnets, each optionally followed by a transformer, then an optional
/// resampling conv.
#[derive(Debug, Clone)]
pub(super) struct UNetBlock {
    pub(super) resnets: Vec<ResnetBlock2D>,
    pub(super) attentions: Vec<Transformer2DModel>,
    /// Stride-2 conv (down blocks) or nearest-neighbour ×2 followed by a conv (up blocks).
    pub(super) resample: Option<Conv2dLayer>,
}

impl UNetBlock {
    pub(super) fn visit(&mut self, prefix: &str, f: &mut Visitor) -> Result<()> {
        for (j, attn) in self.attentions.iter_mut().enumerate() {
            attn.visit(&format!("{prefix}.attentions.{j}"), f)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub(super) struct MidBlock {
    pub(super) resnet_in: ResnetBlock2D,
    pub(super) attention: Transformer2DModel,
    pub(super) resnet_out: ResnetBlock2D,
}
