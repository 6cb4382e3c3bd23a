//! Adapter math: the modules an adapter can attach to, the low-rank weights of one module and
//! their update `ΔW`, and a whole adapter (its initialisation for training included).
//!
//! Conventions (shared by kohya, peft and diffusers): `down` is `[rank, in]`, `up` is
//! `[out, rank]`, and the update is `ΔW = (alpha / rank) · up · down`. Adapter tensors are always
//! f32, whatever the base dtype.
//!
//! DoRA (weight-decomposed LoRA, peft `use_dora`, LyCORIS `dora_wd`) adds a learned magnitude
//! `m` per output channel: the adapted weight is `W' = m / ‖W + ΔW‖ · (W + ΔW)`, the norm per
//! output channel (a row of the `[out, in·kh·kw]` matrix). As peft does (and the DoRA paper's
//! §4.3 suggests), training treats the norm as a constant: no gradient flows through it. A
//! multiplier `λ` blends the base and the adapted weight, `W + λ·(W' − W)` (ComfyUI's strength);
//! at `λ = 1` it is `W'`, the weight peft and LyCORIS compute.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::config::{LoraConfig, LoraInit};
use super::lycoris::{fresh_lycoris, LycorisModule};
use crate::rng::Rng;

/// The shape of layer an adapter attaches to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    Linear,
    /// A 1×1 convolution (SD1's `proj_in`/`proj_out`); kohya stores its adapter 4-D.
    Conv1x1,
    /// A `kh×kw` convolution with a larger kernel (resnet `conv1`/`conv2`, down/upsampler
    /// `conv`), adapted by kohya `conv_dim` / LyCORIS LoCon: down `[r, in, kh, kw]`, up
    /// `[out, r, 1, 1]`. [`ModuleInfo::in_features`] is then `in · kh · kw` (the flattened
    /// kernel), so `ΔW = up · down` is `[out, in·kh·kw]`, reshaped to the kernel. Only merged
    /// into weights (lora-merge); the runtime UNet does not attach such adapters.
    Conv {
        kh: usize,
        kw: usize,
    },
}

/// One adaptable module of a model, as enumerated by the model itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleInfo {
    /// Path in the diffusers / transformers layout, without a component prefix, e.g.
    /// `mid_block.attentions.0.transformer_blocks.0.attn2.to_k` or
    /// `text_model.encoder.layers.0.self_attn.q_proj`.
    pub path: String,
    pub kind: ModuleKind,
    pub in_features: usize,
    pub out_features: usize,
}

/// Low-rank weights of one module.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// `[rank, in]`, f32.
    pub down: Tensor,
    /// `[out, rank]`, f32.
    pub up: Tensor,
    pub alpha: f64,
    /// DoRA's magnitude `[out]`, f32; `None` for plain LoRA.
    pub magnitude: Option<Tensor>,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// `alpha / rank`, the factor kohya and peft apply to `up · down`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank() as f64
    }

    /// `ΔW = (alpha/rank) · up · down` as an f32 `[out, in]` matrix.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.up.matmul(&self.down)? * self.scale())?)
    }

    /// The change `multiplier` applies to the module's `weight` (any dtype, `[out, …]`): for
    /// plain LoRA `multiplier · ΔW`, for DoRA `multiplier · (m / ‖W + ΔW‖ · (W + ΔW) − W)`; f32,
    /// `[out, in·kh·kw]`.
    pub fn weight_change(&self, weight: &Tensor, multiplier: f64) -> Result<Tensor> {
        let delta = self.delta_weight()?;
        let Some(magnitude) = &self.magnitude else {
            return Ok((delta * multiplier)?);
        };
        let weight = weight.flatten_from(1)?.to_dtype(DType::F32)?;
        let adapted = (&weight + delta)?;
        let factor = dora_channel_factor(magnitude, &adapted)?;
        let dora = adapted.broadcast_mul(&factor.unsqueeze(1)?)?;
        Ok(((dora - weight)? * multiplier)?)
    }

    /// Checks the shapes against the module this adapter is meant for.
    pub fn check_fits(&self, info: &ModuleInfo) -> Result<()> {
        let (r, i) = self
            .down
            .dims2()
            .with_context(|| format!("{}: down must be 2-D", info.path))?;
        let (o, r2) = self
            .up
            .dims2()
            .with_context(|| format!("{}: up must be 2-D", info.path))?;
        ensure!(
            r == r2 && i == info.in_features && o == info.out_features,
            "{}: adapter shapes down {:?} / up {:?} do not fit the module (expected down [r, {}], up [{}, r])",
            info.path,
            self.down.dims(),
            self.up.dims(),
            info.in_features,
            info.out_features
        );
        if let Some(m) = &self.magnitude {
            ensure!(
                m.dims() == [info.out_features],
                "{}: DoRA magnitude has shape {:?}, expected [{}] (one per output channel)",
                info.path,
                m.dims(),
                info.out_features
            );
        }
        Ok(())
    }
}

/// DoRA's per-output-channel factor `m / (‖adapted‖ + ε)` for an `[out, k]` f32 weight
/// `adapted` (`W + ΔW`), the norm taken off the graph: gradients reach `m` only. ε is f32's
/// machine epsilon, as LyCORIS adds it, so an all-zero row gives 0, not NaN.
pub fn dora_channel_factor(magnitude: &Tensor, adapted: &Tensor) -> Result<Tensor> {
    let norm = (adapted.detach().sqr()?.sum(1)?.sqrt()? + f32::EPSILON as f64)?;
    Ok(magnitude.broadcast_div(&norm.to_dtype(magnitude.dtype())?)?)
}

/// One module of an adapter: LoRA (DoRA included) or a LyCORIS LoHa/LoKr module.
#[derive(Debug, Clone)]
pub enum AdapterModule {
    Lora(LoraModule),
    Lycoris(LycorisModule),
}

impl From<LoraModule> for AdapterModule {
    fn from(m: LoraModule) -> Self {
        Self::Lora(m)
    }
}

impl AdapterModule {
    /// The LoRA module, for what only LoRA has (PEFT files, SVD algebra).
    pub fn as_lora(&self) -> Option<&LoraModule> {
        match self {
            Self::Lora(m) => Some(m),
            Self::Lycoris(_) => None,
        }
    }

    /// `lora`, or the LyCORIS algorithm's name.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Self::Lora(_) => "lora",
            Self::Lycoris(m) => m.algorithm(),
        }
    }

    pub fn alpha(&self) -> f64 {
        match self {
            Self::Lora(m) => m.alpha,
            Self::Lycoris(m) => m.alpha,
        }
    }

    pub fn rank(&self) -> usize {
        match self {
            Self::Lora(m) => m.rank(),
            Self::Lycoris(m) => m.rank(),
        }
    }

    /// `ΔW` as an f32 `[out, in·kh·kw]` matrix.
    pub fn delta_weight(&self) -> Result<Tensor> {
        match self {
            Self::Lora(m) => m.delta_weight(),
            Self::Lycoris(m) => m.delta_weight(),
        }
    }

    /// What the module with `multiplier` changes in `weight` (see [`LoraModule::weight_change`]).
    pub fn weight_change(&self, weight: &Tensor, multiplier: f64) -> Result<Tensor> {
        match self {
            Self::Lora(m) => m.weight_change(weight, multiplier),
            Self::Lycoris(m) => Ok((m.delta_weight()? * multiplier)?),
        }
    }

    pub fn check_fits(&self, info: &ModuleInfo) -> Result<()> {
        match self {
            Self::Lora(m) => m.check_fits(info),
            Self::Lycoris(m) => m.check_fits(info),
        }
    }

    /// The same module with every tensor detached from the graph.
    pub fn detached(&self) -> Self {
        match self {
            Self::Lora(m) => Self::Lora(LoraModule {
                down: m.down.detach(),
                up: m.up.detach(),
                alpha: m.alpha,
                magnitude: m.magnitude.as_ref().map(Tensor::detach),
            }),
            Self::Lycoris(m) => Self::Lycoris(m.detached()),
        }
    }

    /// The tensor a trainable variable named `<path>.<which>` holds (`lora_down`, `lora_up`,
    /// `magnitude`, or a LyCORIS factor's name), to be replaced.
    pub fn tensor_mut(&mut self, which: &str) -> Option<&mut Tensor> {
        match self {
            Self::Lora(m) => match which {
                "lora_down" => Some(&mut m.down),
                "lora_up" => Some(&mut m.up),
                "magnitude" => m.magnitude.as_mut(),
                _ => None,
            },
            Self::Lycoris(m) => m.tensor_mut(which),
        }
    }
}

/// Modules by path, of one component.
pub type AdapterModules = BTreeMap<String, AdapterModule>;

/// The model part an adapter module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Unet,
    /// The (first) text encoder: SD's only one, SDXL's CLIP ViT-L.
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG).
    TextEncoder2,
}

impl Component {
    pub const ALL: [Component; 3] = [Self::Unet, Self::TextEncoder, Self::TextEncoder2];

    /// Whether this is a text encoder (either of SDXL's).
    pub fn is_text_encoder(self) -> bool {
        self != Self::Unet
    }

    /// The name of a trainable variable of this component's module `path` (`lora_down`,
    /// `lora_up`, `magnitude` or a LyCORIS factor: `which`). The second text encoder's paths are
    /// the first's, so its names carry a prefix; the others are `<path>.<which>`.
    pub fn var_name(self, path: &str, which: &str) -> String {
        match self {
            Self::TextEncoder2 => format!("{TEXT_ENCODER_2_VARS}{path}.{which}"),
            _ => format!("{path}.{which}"),
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unet => "UNet",
            Self::TextEncoder => "text encoder",
            Self::TextEncoder2 => "second text encoder",
        })
    }
}

/// Prefix of the second text encoder's variable names ([`Component::var_name`]).
const TEXT_ENCODER_2_VARS: &str = "text_encoder_2.";

/// A whole adapter: its modules for the UNet and the text encoder(s). Module keys are paths as
/// in [`ModuleInfo::path`].
#[derive(Debug, Clone, Default)]
pub struct Adapter {
    pub unet: AdapterModules,
    pub text_encoder: AdapterModules,
    /// SDXL's second text encoder (`lora_te2_`, `text_encoder_2.`).
    pub text_encoder_2: AdapterModules,
}

/// Trainable adapter variables, in a stable order (by module path, down before up).
pub struct TrainableAdapter {
    pub adapter: Adapter,
    pub vars: Vec<(String, Var)>,
}

impl Adapter {
    /// A fresh UNet adapter for every module of `modules` that `config.targets` selects.
    /// Deterministic for a given seed; `up` starts at zero.
    pub fn init_unet(
        config: &LoraConfig,
        modules: &[ModuleInfo],
        device: &Device,
        seed: u64,
    ) -> Result<TrainableAdapter> {
        Self::init_unet_with_ranks(config, modules, &|_| config.rank, device, seed)
    }

    /// [`Self::init_unet`] with each module's rank from `rank_of` (per-block ranks, kohya's
    /// `block_dims`); alpha stays `config.alpha`.
    pub fn init_unet_with_ranks(
        config: &LoraConfig,
        modules: &[ModuleInfo],
        rank_of: &dyn Fn(&ModuleInfo) -> usize,
        device: &Device,
        seed: u64,
    ) -> Result<TrainableAdapter> {
        let targeted = modules.iter().filter(|m| config.targets.matches(&m.path));
        let (unet, vars) = fresh_modules(config, Component::Unet, targeted, rank_of, device, seed)?;
        ensure!(
            !unet.is_empty(),
            "LoRA targets `{}` match no module of this model",
            config.targets
        );
        Ok(TrainableAdapter {
            adapter: Adapter {
                unet,
                ..Adapter::default()
            },
            vars,
        })
    }

    /// The modules of `component`.
    pub fn modules(&self, component: Component) -> &AdapterModules {
        match component {
            Component::Unet => &self.unet,
            Component::TextEncoder => &self.text_encoder,
            Component::TextEncoder2 => &self.text_encoder_2,
        }
    }

    pub fn modules_mut(&mut self, component: Component) -> &mut AdapterModules {
        match component {
            Component::Unet => &mut self.unet,
            Component::TextEncoder => &mut self.text_encoder,
            Component::TextEncoder2 => &mut self.text_encoder_2,
        }
    }

    /// The component, module path and tensor kind of the variable named `name`
    /// ([`Component::var_name`]); `None` when no module of this adapter has it. UNet and
    /// first-encoder paths never coincide: the latter start with `text_model.`.
    pub fn locate_var<'n>(&self, name: &'n str) -> Option<(Component, &'n str, &'n str)> {
        let (component, rest) = match name.strip_prefix(TEXT_ENCODER_2_VARS) {
            Some(rest) => (Some(Component::TextEncoder2), rest),
            None => (None, name),
        };
        let (path, which) = rest.rsplit_once('.')?;
        let component = component.or_else(|| {
            [Component::Unet, Component::TextEncoder]
                .into_iter()
                .find(|&c| self.modules(c).contains_key(path))
        })?;
        self.modules(component)
            .contains_key(path)
            .then_some((component, path, which))
    }

    /// The tensor behind the variable named `name`, to replace it (a moving average's value).
    pub fn var_tensor_mut(&mut self, name: &str) -> Option<&mut Tensor> {
        let (component, path, which) = self.locate_var(name)?;
        self.modules_mut(component).get_mut(path)?.tensor_mut(which)
    }

    /// Weight deltas `multiplier · ΔW` keyed by the full weight name (`<path>.weight`), for
    /// folding a component's adapter into its weights at load time. DoRA modules, whose change
    /// depends on the weight, are refused (see [`LoraModule::weight_change`]).
    pub fn weight_deltas(
        modules: &AdapterModules,
        multiplier: f64,
    ) -> Result<BTreeMap<String, Tensor>> {
        modules
            .iter()
            .map(|(path, m)| {
                ensure!(
                    m.as_lora().is_none_or(|m| m.magnitude.is_none()),
                    "`{path}` is a DoRA module: it does not fold into a weight as a fixed delta"
                );
                Ok((format!("{path}.weight"), (m.delta_weight()? * multiplier)?))
            })
            .collect()
    }
}

impl TrainableAdapter {
    /// Adds a fresh adapter on every module of text encoder `component`'s `modules` (kohya's
    /// `lora_te_` set: all of them, whatever `config.targets` says of the UNet), with the rank,
    /// alpha and init of `config`, drawn from `seed`; `up` starts at zero.
    pub fn add_text_encoder(
        &mut self,
        component: Component,
        config: &LoraConfig,
        modules: &[ModuleInfo],
        device: &Device,
        seed: u64,
    ) -> Result<()> {
        ensure!(
            component.is_text_encoder(),
            "{component} is not a text encoder"
        );
        ensure!(
            self.adapter.modules(component).is_empty(),
            "the adapter already has {component} modules"
        );
        let (fresh, vars) =
            fresh_modules(config, component, modules, &|_| config.rank, device, seed)?;
        ensure!(!fresh.is_empty(), "the {component} has no adaptable module");
        *self.adapter.modules_mut(component) = fresh;
        self.add_vars(vars);
        Ok(())
    }

    /// Adds a fresh adapter on every one of the UNet's `modules` (e.g. its 3×3 convolutions for
    /// LoCon, `config` then holding the conv alpha and init), each of rank `rank_of(module)`,
    /// drawn from `seed`; none may have one already.
    pub fn add_unet_modules(
        &mut self,
        config: &LoraConfig,
        modules: &[ModuleInfo],
        rank_of: &dyn Fn(&ModuleInfo) -> usize,
        device: &Device,
        seed: u64,
    ) -> Result<()> {
        let (unet, vars) = fresh_modules(config, Component::Unet, modules, rank_of, device, seed)?;
        for (path, module) in unet {
            ensure!(
                self.adapter.unet.insert(path.clone(), module).is_none(),
                "UNet module `{path}` has an adapter already"
            );
        }
        self.add_vars(vars);
        Ok(())
    }

    /// Makes every module of `component` that is not DoRA yet DoRA: a trainable magnitude
    /// (`<path>.magnitude`) per output channel, starting at `‖W‖` of the module's frozen weight
    /// (`weights[path]`, `[out, …]`), so a fresh adapter is still a no-op (peft's
    /// initialisation).
    pub fn add_dora(
        &mut self,
        component: Component,
        weights: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let mut vars = Vec::new();
        for (path, module) in self.adapter.modules_mut(component).iter_mut() {
            let AdapterModule::Lora(module) = module else {
                bail!(
                    "`{path}`: DoRA applies to LoRA modules only (not {})",
                    module.algorithm()
                );
            };
            if module.magnitude.is_some() {
                continue;
            }
            let weight = weights
                .get(path)
                .with_context(|| format!("no base weight for the DoRA module `{path}`"))?;
            let rows = weight.flatten_from(1)?.to_dtype(DType::F32)?;
            let norm = rows
                .sqr()?
                .sum(1)?
                .sqrt()?
                .to_device(module.down.device())?;
            let magnitude = Var::from_tensor(&norm)?;
            module.magnitude = Some(magnitude.as_tensor().clone());
            vars.push((component.var_name(path, "magnitude"), magnitude));
        }
        self.add_vars(vars);
        Ok(())
    }

    fn add_vars(&mut self, vars: Vec<(String, Var)>) {
        self.vars.extend(vars);
        self.vars.sort_by(|a, b| a.0.cmp(&b.0));
    }
}

/// Modules by path, and their variables.
type FreshModules = (AdapterModules, Vec<(String, Var)>);

/// A fresh module for each of `component`'s `modules` (of rank `rank_of(module)`; LoRA, or the
/// LyCORIS algorithm of `config`) and their variables (`lora_down` / `lora_up`, or the LyCORIS
/// factors, named by [`Component::var_name`], sorted by name), drawn in order from `seed`.
fn fresh_modules<'a>(
    config: &LoraConfig,
    component: Component,
    modules: impl IntoIterator<Item = &'a ModuleInfo>,
    rank_of: &dyn Fn(&ModuleInfo) -> usize,
    device: &Device,
    seed: u64,
) -> Result<FreshModules> {
    let mut rng = Rng::new(seed);
    let mut weights = BTreeMap::new();
    let mut vars = Vec::new();
    for info in modules {
        let (r, fan_in) = (rank_of(info), info.in_features);
        ensure!(r > 0, "{}: LoRA rank must be at least 1", info.path);
        if let Some(algorithm) = config.lycoris {
            let (module, factors) =
                fresh_lycoris(algorithm, info, r, config.alpha, &mut rng, device)?;
            weights.insert(info.path.clone(), AdapterModule::Lycoris(module));
            vars.extend(
                factors
                    .into_iter()
                    .map(|(name, var)| (component.var_name(&info.path, name), var)),
            );
            continue;
        }
        let values: Vec<f32> = match config.init {
            LoraInit::KaimingUniform => {
                let bound = 1.0 / (fan_in as f64).sqrt();
                (0..r * fan_in)
                    .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            }
            LoraInit::Gaussian => {
                let std = 1.0 / r as f64;
                (0..r * fan_in)
                    .map(|_| (rng.normal() * std) as f32)
                    .collect()
            }
        };
        let down = Var::from_tensor(&Tensor::from_vec(values, (r, fan_in), device)?)?;
        let up = Var::from_tensor(&Tensor::zeros((info.out_features, r), DType::F32, device)?)?;
        let module = LoraModule {
            down: down.as_tensor().clone(),
            up: up.as_tensor().clone(),
            alpha: config.alpha,
            magnitude: None,
        };
        weights.insert(info.path.clone(), module.into());
        vars.push((component.var_name(&info.path, "lora_down"), down));
        vars.push((component.var_name(&info.path, "lora_up"), up));
    }
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((weights, vars))
}
