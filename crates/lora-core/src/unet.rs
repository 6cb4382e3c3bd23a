//! `UNet2DConditionModel` of Stable Diffusion 1.x/2.x in the diffusers layout, written for
//! training: every operation has a backward pass in candle, timesteps are a tensor (one per
//! sample), and the Linear / 1×1-conv layers of the transformer models are [`LoraLinear`]s that
//! adapters attach to without merging.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::{DownBlockType, UNetConfig, UpBlockType};
use crate::lora::{LoraLinear, LoraModule, ModuleInfo, ModuleKind};
use crate::nn::{
    attention, frozen_linear_residual, geglu, geglu_linear_residual, image_to_tokens,
    project_to_image_residual, tokens_to_image, upsample_nearest, Conv2d, GroupNorm, LayerNorm,
    Linear,
};
use crate::recompute::{CheckpointedForward, Direct, LayerRunner};

/// A `VarBuilder` backend handing out a broadcast zero of any requested shape (no storage
/// beyond one element), for building a UNet only to enumerate its layers.
struct ShapesOnly;

impl candle_nn::var_builder::SimpleBackend for ShapesOnly {
    fn get(
        &self,
        s: candle_core::Shape,
        _: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!("no shape for `{name}`")))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Calls `f` with the full path and layer of every adaptable layer below `prefix`.
type Visitor<'a> = dyn FnMut(&str, &mut LoraLinear) -> Result<()> + 'a;

fn lora_linear(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<LoraLinear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    LoraLinear::new(weight, bias, ModuleKind::Linear)
}

fn lora_conv1x1(vb: &VarBuilder, in_ch: usize, out_ch: usize) -> Result<LoraLinear> {
    let weight = vb.get((out_ch, in_ch, 1, 1), "weight")?;
    LoraLinear::new(weight, Some(vb.get(out_ch, "bias")?), ModuleKind::Conv1x1)
}

/// Sinusoidal timestep features `[B, dim]` (diffusers `Timesteps`), computed in f32.
fn timestep_features(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - freq_shift)).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        Ok(emb.pad_with_zeros(1, 0, 1)?)
    } else {
        Ok(emb)
    }
}

#[derive(Debug, Clone)]
struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    fn load(
        vb: &VarBuilder,
        cfg: &UNetConfig,
        in_ch: usize,
        out_ch: usize,
        output_scale_factor: f64,
    ) -> Result<Self> {
        let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        Ok(Self {
            norm1: GroupNorm::load(&vb.pp("norm1"), g, in_ch, eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj: Linear::load(
                &vb.pp("time_emb_proj"),
                cfg.time_embed_dim(),
                out_ch,
                true,
            )?,
            norm2: GroupNorm::load(&vb.pp("norm2"), g, out_ch, eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut: if in_ch != out_ch {
                Some(Conv2d::load(
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
    fn forward(&self, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let t = self
            .time_emb_proj
            .forward(temb_act)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        // Each half is one node (see `GroupNorm::silu_conv`): the graph keeps `h` and the sum.
        let h = self.norm1.silu_conv(x, &self.conv1, &t)?;
        let out = self
            .norm2
            .silu_conv_residual(&h, &self.conv2, x, self.conv_shortcut.as_ref())?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            Ok((out / self.output_scale_factor)?)
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
    heads: usize,
    upcast: bool,
}

impl Attention {
    fn load(
        vb: &VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        upcast: bool,
    ) -> Result<Self> {
        Ok(Self {
            to_q: lora_linear(&vb.pp("to_q"), query_dim, query_dim, false)?,
            to_k: lora_linear(&vb.pp("to_k"), context_dim, query_dim, false)?,
            to_v: lora_linear(&vb.pp("to_v"), context_dim, query_dim, false)?,
            to_out: lora_linear(&vb.pp("to_out.0"), query_dim, query_dim, true)?,
            heads,
            upcast,
        })
    }

    /// `residual + attention(x, context)`: self-attention without a context.
    fn forward_residual(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let out = attention(&q, &k, &v, self.heads, self.upcast)?;
        Ok(match self.to_out.unadapted()? {
            Some((w, b)) => frozen_linear_residual(&out, &w, b, residual)?,
            None => self.to_out.forward_residual(&out, residual)?,
        })
    }

    fn visit(&mut self, prefix: &str, f: &mut Visitor) -> Result<()> {
        f(&format!("{prefix}.to_q"), &mut self.to_q)?;
        f(&format!("{prefix}.to_k"), &mut self.to_k)?;
        f(&format!("{prefix}.to_v"), &mut self.to_v)?;
        f(&format!("{prefix}.to_out.0"), &mut self.to_out)
    }
}

/// GEGLU feed-forward: `net.2(h · gelu(gate))` with `[h, gate] = net.0.proj(x)`, exact-erf GELU.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: LoraLinear,
    proj_out: LoraLinear,
}

impl FeedForward {
    fn load(vb: &VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: lora_linear(&vb.pp("net.0.proj"), dim, inner * 2, true)?,
            proj_out: lora_linear(&vb.pp("net.2"), inner, dim, true)?,
        })
    }

    /// `x + ff(norm(x))`.
    fn forward_residual(&self, norm: &LayerNorm, x: &Tensor) -> Result<Tensor> {
        let h = match self.proj_in.unadapted()? {
            Some((w, b)) => norm.forward_linear(x, &w, b)?,
            None => self.proj_in.forward(&norm.forward(x)?)?,
        };
        Ok(match self.proj_out.unadapted()? {
            Some((w, b)) => geglu_linear_residual(&h, &w, b, x)?,
            None => (self.proj_out.forward(&geglu(&h)?)? + x)?,
        })
    }

    fn visit(&mut self, prefix: &str, f: &mut Visitor) -> Result<()> {
        f(&format!("{prefix}.net.0.proj"), &mut self.proj_in)?;
        f(&format!("{prefix}.net.2"), &mut self.proj_out)
    }
}

#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn load(vb: &VarBuilder, cfg: &UNetConfig, dim: usize, heads: usize) -> Result<Self> {
        const EPS: f64 = 1e-5;
        let upcast = cfg.upcast_attention;
        Ok(Self {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, EPS)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, dim, heads, upcast)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, EPS)?,
            attn2: Attention::load(&vb.pp("attn2"), dim, cfg.cross_attention_dim, heads, upcast)?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, EPS)?,
            ff: FeedForward::load(&vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        // Each residual sum is one node with the layer before it where that layer is frozen:
        // the graph then keeps the sum only (see `nn::with_residual`).
        let x = self
            .attn1
            .forward_residual(&self.norm1.forward(x)?, None, x)?;
        let x = self
            .attn2
            .forward_residual(&self.norm2.forward(&x)?, Some(context), &x)?;
        self.ff.forward_residual(&self.norm3, &x)
    }

    fn visit(&mut self, prefix: &str, f: &mut Visitor) -> Result<()> {
        self.attn1.visit(&format!("{prefix}.attn1"), f)?;
        self.attn2.visit(&format!("{prefix}.attn2"), f)?;
        self.ff.visit(&format!("{prefix}.ff"), f)
    }
}

/// diffusers `Transformer2DModel`: group norm, projection in (1×1 conv or linear), transformer
/// blocks over the flattened pixels, projection out, residual.
#[derive(Debug, Clone)]
struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: LoraLinear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: LoraLinear,
    linear_projection: bool,
}

impl Transformer2DModel {
    fn load(
        vb: &VarBuilder,
        cfg: &UNetConfig,
        channels: usize,
        heads: usize,
        layers: usize,
    ) -> Result<Self> {
        let (proj_in, proj_out) = if cfg.use_linear_projection {
            (
                lora_linear(&vb.pp("proj_in"), channels, channels, true)?,
                lora_linear(&vb.pp("proj_out"), channels, channels, true)?,
            )
        } else {
            (
                lora_conv1x1(&vb.pp("proj_in"), channels, channels)?,
                lora_conv1x1(&vb.pp("proj_out"), channels, channels)?,
            )
        };
        let blocks = (0..layers)
            .map(|k| {
                BasicTransformerBlock::load(
                    &vb.pp(format!("transformer_blocks.{k}")),
                    cfg,
                    channels,
                    heads,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: GroupNorm::load(&vb.pp("norm"), cfg.norm_num_groups, channels, 1e-6)?,
            proj_in,
            blocks,
            proj_out,
            linear_projection: cfg.use_linear_projection,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut tokens = match self.proj_in.unadapted()? {
            // A 1×1 conv on the image is the same linear map on its tokens.
            Some((weight, bias)) => self.norm.forward_to_tokens(x, &weight, bias)?,
            None if self.linear_projection => self
                .proj_in
                .forward(&image_to_tokens(&self.norm.forward(x)?)?)?,
            None => image_to_tokens(&self.proj_in.forward(&self.norm.forward(x)?)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        if let Some((weight, bias)) = self.proj_out.unadapted()? {
            return Ok(project_to_image_residual(&tokens, &weight, bias, x)?);
        }
        let out = if self.linear_projection {
            tokens_to_image(&self.proj_out.forward(&tokens)?, h, w)?
        } else {
            self.proj_out.forward(&tokens_to_image(&tokens, h, w)?)?
        };
        Ok((out + x)?)
    }

    fn visit(&mut self, prefix: &str, f: &mut Visitor) -> Result<()> {
        f(&format!("{prefix}.proj_in"), &mut self.proj_in)?;
        for (k, block) in self.blocks.iter_mut().enumerate() {
            block.visit(&format!("{prefix}.transformer_blocks.{k}"), f)?;
        }
        f(&format!("{prefix}.proj_out"), &mut self.proj_out)
    }
}

/// A down or up block: resnets, each optionally followed by a transformer, then an optional
/// resampling conv.
#[derive(Debug, Clone)]
struct UNetBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    /// Stride-2 conv (down blocks) or nearest-neighbour ×2 followed by a conv (up blocks).
    resample: Option<Conv2d>,
}

impl UNetBlock {
    fn visit(&mut self, prefix: &str, f: &mut Visitor) -> Result<()> {
        for (j, attn) in self.attentions.iter_mut().enumerate() {
            attn.visit(&format!("{prefix}.attentions.{j}"), f)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct MidBlock {
    resnet_in: ResnetBlock2D,
    attention: Transformer2DModel,
    resnet_out: ResnetBlock2D,
}

/// The SD1.x/SD2.x denoising UNet. See the module docs.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    dtype: DType,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down_blocks: Vec<UNetBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UNetBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    lora_modules: Vec<ModuleInfo>,
}

impl UNet2DConditionModel {
    /// Loads the UNet from `unet/diffusion_pytorch_model[.fp16].safetensors`-style files,
    /// memory-mapped, with weights in `dtype`.
    pub fn from_files(
        config: &UNetConfig,
        files: &[PathBuf],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let vb = crate::weights::var_builder(files, dtype, device, BTreeMap::new())?;
        Self::load(config, &vb)
    }

    /// Builds the UNet from weights named as in diffusers (`down_blocks.0.resnets.0.conv1.weight`…).
    pub fn load(config: &UNetConfig, vb: &VarBuilder) -> Result<Self> {
        let cfg = config;
        let n = cfg.block_out_channels.len();
        let ch0 = cfg.block_out_channels[0];
        let temb_dim = cfg.time_embed_dim();

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = ch0;
        for (i, &kind) in cfg.down_block_types.iter().enumerate() {
            let vb = vb.pp(format!("down_blocks.{i}"));
            let in_ch = out_ch;
            out_ch = cfg.block_out_channels[i];
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..cfg.layers_per_block[i] {
                let rin = if j == 0 { in_ch } else { out_ch };
                resnets.push(ResnetBlock2D::load(
                    &vb.pp(format!("resnets.{j}")),
                    cfg,
                    rin,
                    out_ch,
                    1.0,
                )?);
                if kind == DownBlockType::CrossAttnDownBlock2D {
                    attentions.push(Transformer2DModel::load(
                        &vb.pp(format!("attentions.{j}")),
                        cfg,
                        out_ch,
                        cfg.attention_heads[i],
                        cfg.transformer_layers_per_block[i],
                    )?);
                }
            }
            let resample = if i + 1 < n {
                Some(Conv2d::load(
                    &vb.pp("downsamplers.0.conv"),
                    out_ch,
                    out_ch,
                    3,
                    2,
                    cfg.downsample_padding,
                )?)
            } else {
                None
            };
            down_blocks.push(UNetBlock {
                resnets,
                attentions,
                resample,
            });
        }

        let last = cfg.block_out_channels[n - 1];
        let mvb = vb.pp("mid_block");
        let mid_block = MidBlock {
            resnet_in: ResnetBlock2D::load(
                &mvb.pp("resnets.0"),
                cfg,
                last,
                last,
                cfg.mid_block_scale_factor,
            )?,
            attention: Transformer2DModel::load(
                &mvb.pp("attentions.0"),
                cfg,
                last,
                cfg.attention_heads[n - 1],
                cfg.transformer_layers_per_block[n - 1],
            )?,
            resnet_out: ResnetBlock2D::load(
                &mvb.pp("resnets.1"),
                cfg,
                last,
                last,
                cfg.mid_block_scale_factor,
            )?,
        };

        let rev = |v: &[usize], i: usize| v[n - 1 - i];
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = rev(&cfg.block_out_channels, 0);
        for (i, &kind) in cfg.up_block_types.iter().enumerate() {
            let vb = vb.pp(format!("up_blocks.{i}"));
            let prev_out = out_ch;
            out_ch = rev(&cfg.block_out_channels, i);
            let skip_in = rev(&cfg.block_out_channels, (i + 1).min(n - 1));
            let layers = rev(&cfg.layers_per_block, i) + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { skip_in } else { out_ch };
                let rin = if j == 0 { prev_out } else { out_ch };
                resnets.push(ResnetBlock2D::load(
                    &vb.pp(format!("resnets.{j}")),
                    cfg,
                    rin + skip,
                    out_ch,
                    1.0,
                )?);
                if kind == UpBlockType::CrossAttnUpBlock2D {
                    attentions.push(Transformer2DModel::load(
                        &vb.pp(format!("attentions.{j}")),
                        cfg,
                        out_ch,
                        rev(&cfg.attention_heads, i),
                        rev(&cfg.transformer_layers_per_block, i),
                    )?);
                }
            }
            let resample = if i + 1 < n {
                Some(Conv2d::load(
                    &vb.pp("upsamplers.0.conv"),
                    out_ch,
                    out_ch,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push(UNetBlock {
                resnets,
                attentions,
                resample,
            });
        }

        let mut unet = Self {
            config: cfg.clone(),
            dtype: vb.dtype(),
            conv_in: Conv2d::load(&vb.pp("conv_in"), cfg.in_channels, ch0, 3, 1, 1)?,
            time_linear_1: Linear::load(&vb.pp("time_embedding.linear_1"), ch0, temb_dim, true)?,
            time_linear_2: Linear::load(
                &vb.pp("time_embedding.linear_2"),
                temb_dim,
                temb_dim,
                true,
            )?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                &vb.pp("conv_norm_out"),
                cfg.norm_num_groups,
                ch0,
                cfg.norm_eps,
            )?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), ch0, cfg.out_channels, 3, 1, 1)?,
            lora_modules: Vec::new(),
        };
        let mut modules = Vec::new();
        unet.visit_lora(&mut |path, layer| {
            modules.push(layer.info(path));
            Ok(())
        })?;
        unet.lora_modules = modules;
        Ok(unet)
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The adaptable modules of a UNet with `config`, without its weights: the model is built
    /// over zero-stride placeholders, so no weight is read or allocated. Lets a caller resolve
    /// adapters before loading the UNet once with them folded in.
    pub fn lora_modules_of(config: &UNetConfig) -> Result<Vec<ModuleInfo>> {
        let vb = VarBuilder::from_backend(Box::new(ShapesOnly), DType::F32, Device::Cpu);
        Ok(Self::load(config, &vb)?.lora_modules)
    }

    /// The dtype of the frozen weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Every layer an adapter can attach to: the Linear and 1×1-conv layers of the transformer
    /// models, in model order, with diffusers paths.
    pub fn lora_modules(&self) -> &[ModuleInfo] {
        &self.lora_modules
    }

    fn visit_lora(&mut self, f: &mut Visitor) -> Result<()> {
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            block.visit(&format!("down_blocks.{i}"), f)?;
        }
        self.mid_block
            .attention
            .visit("mid_block.attentions.0", f)?;
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            block.visit(&format!("up_blocks.{i}"), f)?;
        }
        Ok(())
    }

    /// Attaches an adapter (module path → weights) under `name` with `multiplier`, unmerged.
    /// Every module must exist in this UNet with fitting shapes; otherwise nothing is attached
    /// and the error lists every offending module with the expected shapes.
    pub fn attach_adapter(
        &mut self,
        name: &str,
        modules: &BTreeMap<String, LoraModule>,
        multiplier: f64,
    ) -> Result<()> {
        let known: BTreeMap<&str, &ModuleInfo> = self
            .lora_modules
            .iter()
            .map(|m| (m.path.as_str(), m))
            .collect();
        let mut problems = Vec::new();
        for (path, module) in modules {
            match known.get(path.as_str()) {
                None => problems.push(format!("`{path}`: no such adaptable module in this UNet")),
                Some(info) => {
                    if let Err(e) = module.check_fits(info) {
                        problems.push(e.to_string());
                    }
                }
            }
        }
        if !problems.is_empty() {
            bail!(
                "adapter `{name}` does not fit this UNet:\n  {}",
                problems.join("\n  ")
            );
        }
        ensure!(!modules.is_empty(), "adapter `{name}` has no UNet modules");
        self.visit_lora(&mut |path, layer| {
            if let Some(m) = modules.get(path) {
                layer.attach(name, m, multiplier);
            }
            Ok(())
        })
    }

    /// Removes the adapter attached under `name` from every layer.
    pub fn detach_adapter(&mut self, name: &str) -> Result<()> {
        let mut found = false;
        self.visit_lora(&mut |_, layer| {
            found |= layer.detach(name);
            Ok(())
        })?;
        ensure!(found, "no adapter named `{name}` is attached");
        Ok(())
    }

    /// Predicts noise (or v) for `sample` `[B, C, H, W]` at `timesteps` (`[B]` or a scalar,
    /// any numeric dtype) given `encoder_hidden_states` `[B, S, cross_attention_dim]`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let (x, t_feat, context) = self.prepare_inputs(sample, timesteps, encoder_hidden_states)?;
        self.forward_layers(&mut Direct, x, t_feat, context)
    }

    /// [`Self::forward`] with gradient checkpointing: keeps only the values between layers
    /// (each resnet, transformer and resampling conv, the time embedding, `conv_in` and the
    /// output head), not their activations. Returns the prediction (a variable's tensor) to
    /// compute the loss from, and the pass whose [`CheckpointedForward::backward`] turns that
    /// loss into the parameters' gradients, recomputing one layer at a time. The gradients are
    /// those of the plain pass; the cost is one more forward pass.
    pub fn forward_checkpointed(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<(Tensor, CheckpointedForward<'_>)> {
        let (x, t_feat, context) = self.prepare_inputs(sample, timesteps, encoder_hidden_states)?;
        let mut pass = CheckpointedForward::new();
        let (x, t_feat, context) = (pass.input(&x), pass.input(&t_feat), pass.input(&context));
        let output = self.forward_layers(&mut pass, x, t_feat, context)?;
        let prediction = pass.finish(output)?;
        Ok((prediction, pass))
    }

    /// Checks the inputs and returns the sample and context in the model's dtype and the
    /// sinusoidal timestep features (f32).
    fn prepare_inputs(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let cfg = &self.config;
        let (b, c, _, _) = sample.dims4().context("UNet sample must be [B, C, H, W]")?;
        ensure!(
            c == cfg.in_channels,
            "UNet sample has {c} channels, the model expects {}",
            cfg.in_channels
        );
        let timesteps = match timesteps.rank() {
            0 => timesteps.broadcast_as(b)?.contiguous()?,
            1 => timesteps.clone(),
            _ => bail!(
                "timesteps must be a scalar or [B], got {:?}",
                timesteps.dims()
            ),
        };
        ensure!(
            timesteps.dim(0)? == b,
            "{} timesteps for a batch of {b}",
            timesteps.dim(0)?
        );
        let ctx_dim = encoder_hidden_states.dim(D::Minus1)?;
        ensure!(
            ctx_dim == cfg.cross_attention_dim,
            "encoder_hidden_states width {ctx_dim} differs from the UNet's cross_attention_dim {}",
            cfg.cross_attention_dim
        );
        let context = encoder_hidden_states.to_dtype(self.dtype)?;
        let mut x = sample.to_dtype(self.dtype)?;
        if cfg.center_input_sample {
            x = ((x * 2.0)? - 1.0)?;
        }
        let t_feat = timestep_features(
            &timesteps,
            cfg.block_out_channels[0],
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
        )?;
        Ok((x, t_feat, context))
    }

    /// The forward pass, written once as a sequence of layers over `runner`.
    fn forward_layers<'a, R: LayerRunner<'a>>(
        &'a self,
        runner: &mut R,
        x: R::Value,
        t_feat: R::Value,
        context: R::Value,
    ) -> Result<R::Value> {
        let dtype = self.dtype;
        let temb_act = runner.layer(&[&t_feat], move |xs| {
            let h = self
                .time_linear_1
                .forward(&xs[0].to_dtype(dtype)?)?
                .silu()?;
            Ok(self.time_linear_2.forward(&h)?.silu()?)
        })?;
        let resnet = |runner: &mut R, r: &'a ResnetBlock2D, x: &R::Value, temb: &R::Value| {
            runner.layer(&[x, temb], move |xs| r.forward(&xs[0], &xs[1]))
        };
        let transformer =
            |runner: &mut R, t: &'a Transformer2DModel, x: &R::Value, ctx: &R::Value| {
                runner.layer(&[x, ctx], move |xs| t.forward(&xs[0], &xs[1]))
            };

        let mut x = runner.layer(&[&x], move |xs| Ok(self.conv_in.forward(&xs[0])?))?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            for (j, r) in block.resnets.iter().enumerate() {
                x = resnet(runner, r, &x, &temb_act)?;
                if let Some(t) = block.attentions.get(j) {
                    x = transformer(runner, t, &x, &context)?;
                }
                skips.push(x.clone());
            }
            if let Some(down) = &block.resample {
                x = runner.layer(&[&x], move |xs| Ok(down.forward(&xs[0])?))?;
                skips.push(x.clone());
            }
        }

        let mid = &self.mid_block;
        x = resnet(runner, &mid.resnet_in, &x, &temb_act)?;
        x = transformer(runner, &mid.attention, &x, &context)?;
        x = resnet(runner, &mid.resnet_out, &x, &temb_act)?;

        for block in &self.up_blocks {
            for (j, r) in block.resnets.iter().enumerate() {
                let skip = skips.pop().context("UNet skip connections exhausted")?;
                x = runner.layer(&[&x, &skip, &temb_act], move |xs| {
                    r.forward(&Tensor::cat(&[&xs[0], &xs[1]], 1)?, &xs[2])
                })?;
                if let Some(t) = block.attentions.get(j) {
                    x = transformer(runner, t, &x, &context)?;
                }
            }
            if let Some(up) = &block.resample {
                // Upsample to the next skip's size: ×2 for sizes divisible by 2ⁿ, and still
                // correct for odd sizes, as diffusers' `upsample_size` does.
                let (h, w) = match skips.last() {
                    Some(s) => {
                        let s = runner.tensor(s)?;
                        (s.dim(2)?, s.dim(3)?)
                    }
                    None => {
                        let x = runner.tensor(&x)?;
                        (x.dim(2)? * 2, x.dim(3)? * 2)
                    }
                };
                x = runner.layer(&[&x], move |xs| {
                    Ok(up.forward(&upsample_nearest(&xs[0], h, w)?)?)
                })?;
            }
        }
        runner.layer(&[&x], move |xs| {
            let x = self.conv_norm_out.forward_silu(&xs[0])?;
            Ok(self.conv_out.forward(&x)?)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::backprop::GradStore;
    use candle_core::Var;

    use super::*;
    use crate::lora::{Adapter, LoraConfig, LoraTargets};
    use crate::test_support::max_rel_diff;
    use crate::weights::RandomInit;
    use crate::Rng;

    fn tiny_config() -> Result<UNetConfig> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sd1-tiny/unet");
        UNetConfig::from_file(&dir.join("config.json"))
    }

    /// Inputs for the tiny model: a batch of two, one timestep each.
    fn inputs(cfg: &UNetConfig, dtype: DType) -> Result<(Tensor, Tensor, Tensor)> {
        let mut rng = Rng::new(7);
        let dev = Device::Cpu;
        let sample = rng.normal_tensor((2, cfg.in_channels, 16, 16), &dev)?;
        let context = rng.normal_tensor((2, 5, cfg.cross_attention_dim), &dev)?;
        let timesteps = Tensor::new(&[10f32, 700.], &dev)?;
        Ok((sample.to_dtype(dtype)?, timesteps, context.to_dtype(dtype)?))
    }

    /// Gradients of a weighted squared output under both backward passes.
    fn both_gradients(unet: &UNet2DConditionModel, params: &[Var]) -> Result<[GradStore; 2]> {
        let (sample, timesteps, context) = inputs(unet.config(), unet.dtype())?;
        let target = Rng::new(9).normal_tensor(sample.shape(), &Device::Cpu)?;
        let loss = |out: &Tensor| -> Result<Tensor> {
            Ok((out.to_dtype(DType::F32)? - &target)?.sqr()?.mean_all()?)
        };
        let plain = loss(&unet.forward(&sample, &timesteps, &context)?)?.backward()?;
        let (prediction, pass) = unet.forward_checkpointed(&sample, &timesteps, &context)?;
        Ok([plain, pass.backward(&loss(&prediction)?, params)?])
    }

    fn assert_same_gradients(
        [plain, checkpointed]: &[GradStore; 2],
        params: &[(String, Var)],
        tol: f32,
    ) {
        let mut compared = 0;
        for (name, var) in params {
            let Some(expected) = plain.get(var.as_tensor()) else {
                assert!(checkpointed.get(var.as_tensor()).is_none(), "{name}");
                continue;
            };
            let got = checkpointed
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient with checkpointing"));
            let err = max_rel_diff(got, expected);
            assert!(err <= tol, "{name}: gradients differ by {err:.2e}");
            compared += 1;
        }
        assert!(compared > 0, "no parameter got a gradient");
    }

    /// LoRA on every adaptable layer, on an f32 base (the CPU kernels) and an f16 base (the path
    /// CUDA takes): checkpointing changes where activations live, not the gradients. In f16 the
    /// gradients between layers are sums of f16 terms taken in another order, a few ulps
    /// (≤ 6e-3 here) apart; `lora_parity` holds both passes to PyTorch's.
    #[test]
    fn checkpointed_lora_gradients_equal_the_plain_backward_pass() -> Result<()> {
        let cfg = tiny_config()?;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 1e-2)] {
            let vb = RandomInit::frozen(3)
                .var_builder(&Device::Cpu)
                .set_dtype(dtype);
            let mut unet = UNet2DConditionModel::load(&cfg, &vb)?;
            let lora = LoraConfig {
                rank: 2,
                alpha: 2.0,
                targets: LoraTargets::AttnMlp,
                ..Default::default()
            };
            let trainable = Adapter::init_unet(&lora, unet.lora_modules(), &Device::Cpu, 0)?;
            // `up` starts at zero, which would leave every `down` gradient zero.
            let mut rng = Rng::new(5);
            for (name, var) in &trainable.vars {
                if name.ends_with("up") {
                    var.set(&(rng.normal_tensor(var.shape(), &Device::Cpu)? * 0.1)?)?;
                }
            }
            unet.attach_adapter("test", &trainable.adapter.unet, 1.0)?;
            let vars: Vec<Var> = trainable.vars.iter().map(|(_, v)| v.clone()).collect();
            let grads = both_gradients(&unet, &vars)?;
            assert_same_gradients(&grads, &trainable.vars, tol);
        }
        Ok(())
    }

    /// Gradients go where something is trained: none is computed (and kept by candle until the
    /// backward pass ends) for the latents or the text embeddings, on the CPU kernels (f32) and
    /// on the path other devices take (f16).
    #[test]
    fn untracked_inputs_get_no_gradient() -> Result<()> {
        let cfg = tiny_config()?;
        for dtype in [DType::F32, DType::F16] {
            let vb = RandomInit::frozen(3)
                .var_builder(&Device::Cpu)
                .set_dtype(dtype);
            let mut unet = UNet2DConditionModel::load(&cfg, &vb)?;
            let lora = LoraConfig::default();
            let trainable = Adapter::init_unet(&lora, unet.lora_modules(), &Device::Cpu, 0)?;
            unet.attach_adapter("test", &trainable.adapter.unet, 1.0)?;
            let (sample, timesteps, context) = inputs(&cfg, dtype)?;
            let out = unet.forward(&sample, &timesteps, &context)?;
            let grads = out.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
            assert!(grads.get(&sample).is_none(), "{dtype:?}: latents");
            assert!(grads.get(&context).is_none(), "{dtype:?}: text embeddings");
            for (name, var) in &trainable.vars {
                assert!(grads.get(var.as_tensor()).is_some(), "{dtype:?}: {name}");
            }
        }
        Ok(())
    }

    /// A full fine-tune: every weight a variable, so gradients also flow between layers through
    /// the time embedding that every resnet reads, and into `conv_in` and the output head.
    #[test]
    fn checkpointed_full_fine_tune_gradients_equal_the_plain_backward_pass() -> Result<()> {
        let init = RandomInit::trainable(4);
        let unet = UNet2DConditionModel::load(&tiny_config()?, &init.var_builder(&Device::Cpu))?;
        let params = init.vars();
        let vars: Vec<Var> = params.iter().map(|(_, v)| v.clone()).collect();
        let grads = both_gradients(&unet, &vars)?;
        for name in [
            "time_embedding.linear_1.weight",
            "conv_in.weight",
            "conv_out.bias",
        ] {
            let var = &params.iter().find(|(n, _)| n == name).unwrap().1;
            assert!(grads[1].get(var.as_tensor()).is_some(), "{name}");
        }
        assert_same_gradients(&grads, &params, 1e-5);
        Ok(())
    }
}
