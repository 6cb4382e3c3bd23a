//! `UNet2DConditionModel` of Stable Diffusion 1.x/2.x and SDXL in the diffusers layout, written
//! for training: every operation has a backward pass in candle, timesteps are a tensor (one per
//! sample), and the Linear / 1×1-conv layers of the transformer models are [`LoraLinear`]s that
//! adapters attach to without merging. SDXL adds a second embedding to the timestep's: the
//! pooled text embedding and the micro-conditioning ids ([`AddedConditioning`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

mod blocks;
mod embeddings;
mod resnet;
#[cfg(test)]
mod tests;
mod transformer;

use blocks::{MidBlock, UNetBlock};
use embeddings::{text_time_features, timestep_features};
use resnet::ResnetBlock2D;
use transformer::{Transformer2DModel, Visitor};

use crate::adapters::{
    check_adapter_fits, AdaptableLayer, AdaptableVisitor, AdapterModules, LoraConv, ModuleInfo,
};
use crate::engine::{
    upsample_nearest, CheckpointedForward, Conv2dLayer, Direct, GroupNormLayer, LayerRunner,
    LinearLayer,
};
use crate::models::config::{DownBlockType, UNetConfig, UpBlockType};

/// The UNet's inputs after [`UNet2DConditionModel::prepare_inputs`]: tensors, or the values a
/// [`LayerRunner`] keeps for them.
struct Inputs<V> {
    x: V,
    t_feat: V,
    /// SDXL's [`text_time_features`].
    added_feat: Option<V>,
    context: V,
}

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

/// SDXL's extra UNet inputs (`added_cond_kwargs` in diffusers).
#[derive(Debug, Clone)]
pub struct AddedConditioning {
    /// `[B, P]`: the second text encoder's pooled, projected output.
    pub text_embeds: Tensor,
    /// `[B, N]`: the micro-conditioning ids, for SDXL base `[original height, original width,
    /// crop top, crop left, target height, target width]`.
    pub time_ids: Tensor,
}

/// The time embedding's two linear layers, `linear_1` → SiLU → `linear_2` (diffusers
/// `TimestepEmbedding`), used for the timestep and for SDXL's added conditioning.
#[derive(Debug, Clone)]
struct TimeEmbedding {
    linear_1: LinearLayer,
    linear_2: LinearLayer,
}

impl TimeEmbedding {
    fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: LinearLayer::load(&vb.pp("linear_1"), in_dim, out_dim, true)?,
            linear_2: LinearLayer::load(&vb.pp("linear_2"), out_dim, out_dim, true)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.linear_1.forward(xs)?.silu()?;
        Ok(self.linear_2.forward(&h)?)
    }
}

/// The SD1.x/SD2.x/SDXL denoising UNet. See the module docs.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    dtype: DType,
    conv_in: Conv2dLayer,
    time_embedding: TimeEmbedding,
    /// SDXL's `add_embedding`, over [`text_time_features`].
    add_embedding: Option<TimeEmbedding>,
    down_blocks: Vec<UNetBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UNetBlock>,
    conv_norm_out: GroupNormLayer,
    conv_out: Conv2dLayer,
    lora_modules: Vec<ModuleInfo>,
    /// The layers of the resnets and resamplers an adapter can attach to (LoCon).
    resnet_modules: Vec<ModuleInfo>,
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
        let vb = crate::io::weights::var_builder(files, dtype, device, BTreeMap::new())?;
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
                Some(LoraConv::load(
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
                Some(LoraConv::load(
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
            conv_in: Conv2dLayer::load(&vb.pp("conv_in"), cfg.in_channels, ch0, 3, 1, 1)?,
            time_embedding: TimeEmbedding::load(&vb.pp("time_embedding"), ch0, temb_dim)?,
            add_embedding: cfg
                .text_time
                .map(|tt| TimeEmbedding::load(&vb.pp("add_embedding"), tt.input_dim, temb_dim))
                .transpose()?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNormLayer::load(
                &vb.pp("conv_norm_out"),
                cfg.norm_num_groups,
                ch0,
                cfg.norm_eps,
            )?,
            conv_out: Conv2dLayer::load(&vb.pp("conv_out"), ch0, cfg.out_channels, 3, 1, 1)?,
            lora_modules: Vec::new(),
            resnet_modules: Vec::new(),
        };
        let mut modules = Vec::new();
        unet.visit_lora(&mut |path, layer| {
            modules.push(layer.info(path));
            Ok(())
        })?;
        unet.lora_modules = modules;
        let mut resnet_modules = Vec::new();
        unet.visit_resnets(&mut |path, layer| {
            resnet_modules.push(layer.info(path));
            Ok(())
        })?;
        unet.resnet_modules = resnet_modules;
        Ok(unet)
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The adaptable modules of a UNet with `config` ([`Self::adapter_modules`]: Linear, 1×1
    /// and 3×3 conv), without its weights: the model is built over zero-stride placeholders, so
    /// no weight is read or allocated. Lets a caller resolve adapters before loading the UNet once
    /// with them folded in.
    pub fn adapter_modules_of(config: &UNetConfig) -> Result<Vec<ModuleInfo>> {
        let vb = VarBuilder::from_backend(Box::new(ShapesOnly), DType::F32, Device::Cpu);
        Ok(Self::load(config, &vb)?.adapter_modules())
    }

    /// The dtype of the frozen weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The Linear and 1×1-conv layers of the transformer models an adapter can attach to, in
    /// model order, with diffusers paths (what the target presets choose from).
    pub fn lora_modules(&self) -> &[ModuleInfo] {
        &self.lora_modules
    }

    /// The layers of the resnets and down/up samplers an adapter can attach to (kohya's
    /// `conv_dim` / LoCon set), in model order: every resnet's 3×3 `conv1` and `conv2`, its
    /// `time_emb_proj` and 1×1 `conv_shortcut`, and the samplers' 3×3 `conv`.
    pub fn resnet_modules(&self) -> &[ModuleInfo] {
        &self.resnet_modules
    }

    /// Every module an adapter can attach to: [`Self::lora_modules`] then
    /// [`Self::resnet_modules`] (what adapter files resolve against).
    pub fn adapter_modules(&self) -> Vec<ModuleInfo> {
        [self.lora_modules.as_slice(), &self.resnet_modules].concat()
    }

    fn visit_resnets(&mut self, f: &mut AdaptableVisitor) -> Result<()> {
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            block.visit_resnets(&format!("down_blocks.{i}"), "downsamplers", f)?;
        }
        self.mid_block.resnet_in.visit("mid_block.resnets.0", f)?;
        self.mid_block.resnet_out.visit("mid_block.resnets.1", f)?;
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            block.visit_resnets(&format!("up_blocks.{i}"), "upsamplers", f)?;
        }
        Ok(())
    }

    /// Every layer an adapter can attach to: the transformer models' ([`Self::visit_lora`]),
    /// then the resnets' and samplers' ([`Self::visit_resnets`]).
    fn visit_adaptable(&mut self, f: &mut AdaptableVisitor) -> Result<()> {
        self.visit_lora(&mut |path, layer| f(path, AdaptableLayer::Linear(layer)))?;
        self.visit_resnets(f)
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

    /// Attaches an adapter (module path → weights: Linear, 1×1 and 3×3 conv modules) under
    /// `name` with `multiplier`, unmerged. Every module must exist in this UNet with fitting
    /// shapes; otherwise nothing is attached and the error lists every offending module with the
    /// expected shapes.
    pub fn attach_adapter(
        &mut self,
        name: &str,
        modules: &AdapterModules,
        multiplier: f64,
    ) -> Result<()> {
        check_adapter_fits("UNet", &self.adapter_modules(), name, modules)?;
        self.visit_adaptable(&mut |path, mut layer| {
            if let Some(m) = modules.get(path) {
                layer.attach(name, m, multiplier);
            }
            Ok(())
        })
    }

    /// The frozen weight of every adaptable layer, by module path (DoRA's magnitudes start
    /// from their norms).
    pub fn adaptable_weights(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let mut weights = BTreeMap::new();
        self.visit_adaptable(&mut |path, layer| {
            weights.insert(path.to_string(), layer.weight().clone());
            Ok(())
        })?;
        Ok(weights)
    }

    /// Removes the adapter attached under `name` from every layer.
    pub fn detach_adapter(&mut self, name: &str) -> Result<()> {
        let mut found = false;
        self.visit_adaptable(&mut |_, mut layer| {
            found |= layer.detach(name);
            Ok(())
        })?;
        ensure!(found, "no adapter named `{name}` is attached");
        Ok(())
    }

    /// Predicts noise (or v) for `sample` `[B, C, H, W]` at `timesteps` (`[B]` or a scalar,
    /// any numeric dtype) given `encoder_hidden_states` `[B, S, cross_attention_dim]`; for a
    /// UNet without added conditioning (SD1.x/SD2.x).
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        self.forward_conditioned(sample, timesteps, encoder_hidden_states, None)
    }

    /// [`Self::forward`] with SDXL's added conditioning, which an SDXL UNet requires and any
    /// other refuses.
    pub fn forward_conditioned(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor> {
        let inputs = self.prepare_inputs(sample, timesteps, encoder_hidden_states, added)?;
        self.forward_layers(&mut Direct, inputs)
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
        self.forward_checkpointed_conditioned(sample, timesteps, encoder_hidden_states, None)
    }

    /// [`Self::forward_checkpointed`] with SDXL's added conditioning
    /// ([`Self::forward_conditioned`]).
    pub fn forward_checkpointed_conditioned(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<(Tensor, CheckpointedForward<'_>)> {
        let inputs = self.prepare_inputs(sample, timesteps, encoder_hidden_states, added)?;
        let mut pass = CheckpointedForward::new();
        let inputs = Inputs {
            x: pass.input(&inputs.x),
            t_feat: pass.input(&inputs.t_feat),
            added_feat: inputs.added_feat.map(|a| pass.input(&a)),
            context: pass.input(&inputs.context),
        };
        let output = self.forward_layers(&mut pass, inputs)?;
        let prediction = pass.finish(output)?;
        Ok((prediction, pass))
    }

    /// Checks the inputs and returns the sample and context in the model's dtype, the
    /// sinusoidal timestep features (f32) and, for SDXL, the added conditioning's input.
    fn prepare_inputs(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Inputs<Tensor>> {
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
        let added_feat = match (cfg.text_time, added) {
            (None, None) => None,
            (Some(_), None) => bail!(
                "this UNet (SDXL: `addition_embed_type` \"text_time\") needs the pooled text embedding and the micro-conditioning ids"
            ),
            (None, Some(_)) => bail!(
                "added conditioning (pooled text embedding, time ids) given to a UNet without `addition_embed_type`"
            ),
            (Some(tt), Some(added)) => {
                let (tb, _) = added
                    .text_embeds
                    .dims2()
                    .context("SDXL pooled text embedding must be [B, P]")?;
                let (ib, _) = added
                    .time_ids
                    .dims2()
                    .context("SDXL time ids must be [B, N]")?;
                ensure!(
                    tb == b && ib == b,
                    "SDXL added conditioning has {tb} pooled embeddings and {ib} time-id rows for a batch of {b}"
                );
                let feat = text_time_features(
                    &added.text_embeds.to_dtype(self.dtype)?,
                    &added.time_ids,
                    tt.time_embed_dim,
                    cfg.flip_sin_to_cos,
                    cfg.freq_shift,
                )?;
                ensure!(
                    feat.dim(1)? == tt.input_dim,
                    "SDXL added conditioning: pooled width {} + {} time ids × {} = {}, the UNet's projection_class_embeddings_input_dim is {}",
                    added.text_embeds.dim(1)?,
                    added.time_ids.dim(1)?,
                    tt.time_embed_dim,
                    feat.dim(1)?,
                    tt.input_dim
                );
                Some(feat)
            }
        };
        Ok(Inputs {
            x,
            t_feat,
            added_feat,
            context,
        })
    }

    /// The forward pass, written once as a sequence of layers over `runner`.
    fn forward_layers<'a, R: LayerRunner<'a>>(
        &'a self,
        runner: &mut R,
        inputs: Inputs<R::Value>,
    ) -> Result<R::Value> {
        let Inputs {
            x,
            t_feat,
            added_feat,
            context,
        } = inputs;
        let dtype = self.dtype;
        // The resnets take SiLU of the embedding; SDXL's added embedding is summed in first.
        let temb_act = match (&self.add_embedding, &added_feat) {
            (Some(add), Some(added_feat)) => runner.layer(&[&t_feat, added_feat], move |xs| {
                let temb = self.time_embedding.forward(&xs[0].to_dtype(dtype)?)?;
                Ok((temb + add.forward(&xs[1])?)?.silu()?)
            })?,
            _ => runner.layer(&[&t_feat], move |xs| {
                Ok(self
                    .time_embedding
                    .forward(&xs[0].to_dtype(dtype)?)?
                    .silu()?)
            })?,
        };
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
                x = runner.layer(&[&x], move |xs| down.forward(&xs[0]))?;
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
                    up.forward(&upsample_nearest(&xs[0], h, w)?)
                })?;
            }
        }
        runner.layer(&[&x], move |xs| {
            let x = self.conv_norm_out.forward_silu(&xs[0])?;
            Ok(self.conv_out.forward(&x)?)
        })
    }
}
