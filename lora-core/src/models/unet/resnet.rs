//! diffusers' `ResnetBlock2D`: two halves `conv(silu(norm(x)))`, the time embedding added after the
//! first, and a shortcut (a 1×1 conv where the channel count changes) summed after the second.

use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::engine::fused::{norm_silu_conv, norm_silu_conv_residual};
use crate::engine::{Conv2dLayer, GroupNormLayer, LinearLayer};
use crate::models::config::UNetConfig;

#[derive(Debug, Clone)]
pub(super) struct ResnetBlock2D {
    norm1: GroupNormLayer,
    conv1: Conv2dLayer,
    time_emb_proj: LinearLayer,
    norm2: GroupNormLayer,
    conv2: Conv2dLayer,
    conv_shortcut: Option<Conv2dLayer>,
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
            conv1: Conv2dLayer::load(&vb.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj: LinearLayer::load(
                &vb.pp("time_emb_proj"),
                cfg.time_embed_dim(),
                out_ch,
                true,
            )?,
            norm2: GroupNormLayer::load(&vb.pp("norm2"), g, out_ch, eps)?,
            conv2: Conv2dLayer::load(&vb.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut: if in_ch != out_ch {
                Some(Conv2dLayer::load(
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
        // Each half is one node (see `engine::fused`): the graph keeps `h` and the sum.
        let h = norm_silu_conv(&self.norm1, &self.conv1, x, Some(&t))?;
        let out =
            norm_silu_conv_residual(&self.norm2, &self.conv2, &h, x, self.conv_shortcut.as_ref())?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.output_scale_factor)?)
        }
    }
}
