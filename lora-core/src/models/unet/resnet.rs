//! diffusers' `ResnetBlock2D`: two halves `conv(silu(norm(x)))`, the time embedding added after the
//! first, and a shortcut (a 1×1 conv where the channel count changes) summed after the second.

use anyhow::Result;
use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::adapters::{AdaptableLayer, AdaptableVisitor, LoraConv, LoraLinear};
use crate::engine::GroupNormLayer;
use crate::models::config::UNetConfig;

#[derive(Debug, Clone)]
pub(super) struct ResnetBlock2D {
    norm1: GroupNormLayer,
    conv1: LoraConv,
    time_emb_proj: LoraLinear,
    norm2: GroupNormLayer,
    conv2: LoraConv,
    conv_shortcut: Option<LoraConv>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub(super) fn load(
        vb: &VarBuilder,
        cfg: &UNetConfig,
        in_ch: usize,
        out_ch: usize,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        Ok(Self {
            norm1: GroupNormLayer::load(&vb.pp("norm1"), g, in_ch, eps)?,
            conv1: LoraConv::load(&vb.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj: LoraLinear::load_linear(
                &vb.pp("time_emb_proj"),
                cfg.time_embed_dim(),
                out_ch,
                true,
            )?,
            norm2: GroupNormLayer::load(&vb.pp("norm2"), g, out_ch, eps)?,
            conv2: LoraConv::load(&vb.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut: if in_ch != out_ch {
                Some(LoraConv::load(
                    &vb.pp("conv_shortcut"),
                    in_ch,
                    out_ch,
                    1,
                    1,
                    0,
                )?)
            } else {
                None
            },
            output_scale_factor,
        })
    }

    /// `temb_act` is `silu(temb)`, shared by all resnets.
    pub(super) fn forward(&self, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let t = self
            .time_emb_proj
            .forward(temb_act)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        // Without adapters each half is one node (see `engine::fused`): the graph keeps `h` and
        // the sum.
        let h = self.conv1.forward_norm_silu(&self.norm1, x, Some(&t))?;
        let out = self.conv2.forward_norm_silu_residual(
            &self.norm2,
            &h,
            x,
            self.conv_shortcut.as_ref(),
        )?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.output_scale_factor)?)
        }
    }
}

impl ResnetBlock2D {
    /// Calls `f` with the path and layer of every layer an adapter can attach to: both 3×3
    /// convolutions, the time embedding's projection and the 1×1 shortcut (kohya's `conv_dim`
    /// set for a resnet).
    pub(super) fn visit(&mut self, prefix: &str, f: &mut AdaptableVisitor) -> Result<()> {
        f(
            &format!("{prefix}.conv1"),
            AdaptableLayer::Conv(&mut self.conv1),
        )?;
        f(
            &format!("{prefix}.time_emb_proj"),
            AdaptableLayer::Linear(&mut self.time_emb_proj),
        )?;
        f(
            &format!("{prefix}.conv2"),
            AdaptableLayer::Conv(&mut self.conv2),
        )?;
        match &mut self.conv_shortcut {
            Some(shortcut) => f(
                &format!("{prefix}.conv_shortcut"),
                AdaptableLayer::Conv(shortcut),
            ),
            None => Ok(()),
        }
    }
}
