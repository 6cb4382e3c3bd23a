//! Reading an adapter file's key layout: which layout it is, its tensors grouped by module, and
//! each module assembled (shapes to 2-D f32, alpha resolved), every problem listed.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};

use super::{examples, listing, AdapterFormat, RawModule};
use crate::formats::keys::{
    parse_diffusers_key, parse_kohya_key, Component, ParsedKey, Role, KOHYA_PREFIXES,
};
use crate::formats::peft::PeftConfig;

/// kohya if every key has a kohya prefix (diffusers' own test), diffusers/PEFT if every key has
/// a component prefix; anything else is no adapter layout this toolkit reads.
pub(super) fn detect_format<'a>(
    origin: &str,
    keys: impl Iterator<Item = &'a String> + Clone,
) -> Result<AdapterFormat> {
    ensure!(
        keys.clone().next().is_some(),
        "{origin}: the file holds no tensors"
    );
    let is_kohya = |k: &&String| KOHYA_PREFIXES.iter().any(|p| k.starts_with(p));
    let is_diffusers = |k: &&String| {
        Component::ALL
            .iter()
            .any(|c| k.starts_with(c.diffusers_prefix()))
    };
    if keys.clone().all(|k| is_kohya(&k)) {
        return Ok(AdapterFormat::Kohya);
    }
    if keys.clone().all(|k| is_diffusers(&k)) {
        return Ok(AdapterFormat::Peft);
    }
    let foreign: Vec<&String> = keys
        .clone()
        .filter(|k| !is_kohya(k) && !is_diffusers(k))
        .collect();
    if foreign.is_empty() {
        bail!(
            "{origin}: mixes kohya keys ({}) with diffusers keys ({})",
            examples(keys.clone().filter(is_kohya)),
            examples(keys.filter(is_diffusers))
        );
    }
    bail!(
        "{origin}: not a LoRA adapter in kohya (lora_unet_…, lora_te_…) or diffusers/PEFT (unet.…, text_encoder.…) layout; \
         unrecognised keys: {}",
        examples(foreign)
    )
}

/// The tensors of one module, each with the key it was stored under.
#[derive(Debug, Default)]
pub(super) struct ModuleParts {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<(String, Tensor)>,
    magnitude: Option<(String, Tensor)>,
}

impl ModuleParts {
    fn slot(&mut self, role: Role) -> &mut Option<(String, Tensor)> {
        match role {
            Role::Down => &mut self.down,
            Role::Up => &mut self.up,
            Role::Alpha => &mut self.alpha,
            Role::Magnitude => &mut self.magnitude,
        }
    }
}

/// Groups the file's tensors by module, failing on keys of unsupported algorithms (named), on
/// unknown keys (listed) and on two spellings of the same tensor.
pub(super) fn group_by_module(
    origin: &str,
    format: AdapterFormat,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<(Component, String), ModuleParts>> {
    let mut parts: BTreeMap<(Component, String), ModuleParts> = BTreeMap::new();
    let mut unsupported: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    let mut unknown = Vec::new();
    let mut duplicates = Vec::new();
    for (key, tensor) in tensors {
        let parsed = match format {
            AdapterFormat::Kohya => parse_kohya_key(key),
            AdapterFormat::Peft => parse_diffusers_key(key),
        };
        match parsed {
            ParsedKey::Lora {
                component,
                module,
                role,
            } => {
                let slot = parts.entry((component, module)).or_default().slot(role);
                match slot {
                    Some((first, _)) => duplicates.push(format!("`{first}` and `{key}`")),
                    None => *slot = Some((key.clone(), tensor.clone())),
                }
            }
            ParsedKey::Unsupported { what } => unsupported.entry(what).or_default().push(key),
            ParsedKey::Unknown => unknown.push(key),
        }
    }
    if !unsupported.is_empty() {
        let items: Vec<String> = unsupported
            .iter()
            .map(|(what, keys)| format!("{what}, e.g. {}", examples(keys.iter().copied())))
            .collect();
        bail!(
            "{}",
            listing(
                &format!(
                    "{origin}: uses adapter types not supported here (only LoRA, LoCon and \
                     DoRA are; lora-merge can fold LyCORIS LoHa/LoKr files into a model)"
                ),
                &items
            )
        );
    }
    ensure!(
        unknown.is_empty(),
        "{origin}: keys that are no LoRA tensor of the {format} layout: {}",
        examples(unknown)
    );
    ensure!(
        duplicates.is_empty(),
        "{origin}: the same tensor is stored twice: {}",
        duplicates.join(", ")
    );
    Ok(parts)
}

/// Builds the modules from their parts: shapes to 2-D f32, alpha resolved. Fails listing every
/// incomplete or malformed module.
pub(super) fn assemble_modules(
    origin: &str,
    format: AdapterFormat,
    parts: BTreeMap<(Component, String), ModuleParts>,
    peft_configs: &BTreeMap<Component, PeftConfig>,
) -> Result<Vec<RawModule>> {
    let mut modules = Vec::new();
    let mut problems = Vec::new();
    for ((component, name), parts) in parts {
        let config = peft_configs.get(&component);
        match assemble_module(format, component, &name, parts, config) {
            Ok(module) => modules.push(module),
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    if !problems.is_empty() {
        bail!(
            "{}",
            listing(
                &format!("{origin}: {} malformed LoRA modules", problems.len()),
                &problems
            )
        );
    }
    Ok(modules)
}

pub(super) fn assemble_module(
    format: AdapterFormat,
    component: Component,
    name: &str,
    parts: ModuleParts,
    peft_config: Option<&PeftConfig>,
) -> Result<RawModule> {
    let (down_key, down, up_key, up) = match (parts.down, parts.up) {
        (Some((dk, d)), Some((uk, u))) => (dk, d, uk, u),
        (Some((dk, _)), None) => bail!("`{dk}` has no matching up tensor"),
        (None, Some((uk, _))) => bail!("`{uk}` has no matching down tensor"),
        (None, None) => match (parts.alpha, parts.magnitude) {
            (Some((key, _)), _) => bail!("`{key}` is an alpha without down/up tensors"),
            (None, Some((key, _))) => {
                bail!("`{key}` is a DoRA magnitude without down/up tensors")
            }
            (None, None) => unreachable!("a module has at least one part"),
        },
    };
    let (down, kernel) = as_matrix(&down_key, &down)?;
    let (up, up_kernel) = as_matrix(&up_key, &up)?;
    ensure!(
        up_kernel.is_none(),
        "`{up_key}`: the up tensor of a conv LoRA must be [out, r, 1, 1], got {:?}",
        up.dims()
    );
    let (rank, up_rank) = (down.dims()[0], up.dims()[1]);
    ensure!(
        rank == up_rank,
        "`{down_key}` {:?} and `{up_key}` {:?} disagree on the rank (down is [r, in], up is [out, r])",
        down.dims(),
        up.dims()
    );
    let alpha = match (parts.alpha, format, peft_config) {
        (Some((key, _)), AdapterFormat::Peft, Some(_)) => {
            bail!("`{key}`: the file has both per-module alphas and lora_adapter_metadata, which is ambiguous")
        }
        (Some((key, t)), _, _) => alpha_value(&key, &t, rank)?,
        (None, AdapterFormat::Peft, Some(config)) => config.alpha_for(name, rank, &down_key)?,
        (None, _, _) => rank as f64,
    };
    let magnitude = parts
        .magnitude
        .map(|(key, t)| as_magnitude(format, &key, &t))
        .transpose()?;
    ensure!(
        magnitude.is_some() || !peft_config.is_some_and(|c| c.use_dora),
        "`{down_key}`: lora_adapter_metadata says use_dora, but the module has no \
         lora_magnitude_vector"
    );
    Ok(RawModule {
        component,
        name: name.to_string(),
        down_key,
        down,
        up,
        alpha,
        kernel,
        magnitude,
    })
}

/// A stored DoRA magnitude as an f32 `[out]` vector: kohya/LyCORIS `dora_scale` is `[out, 1]`
/// (`[out, 1, 1, 1]` for convs), PEFT's `lora_magnitude_vector` `[out]` (`[1, out, 1, 1]` for
/// convs). LyCORIS' `wd_on_output=False` files (`[1, in]`, a norm per input channel) are refused.
fn as_magnitude(format: AdapterFormat, key: &str, t: &Tensor) -> Result<Tensor> {
    let dims = t.dims();
    let fits = match format {
        AdapterFormat::Kohya => !dims.is_empty() && dims[1..].iter().all(|&d| d == 1),
        AdapterFormat::Peft => dims.iter().filter(|&&d| d != 1).count() <= 1,
    };
    ensure!(
        fits,
        "`{key}` has shape {dims:?}; a DoRA magnitude is one value per output channel \
         ([out, 1] or [out, 1, 1, 1] as LyCORIS writes it with wd_on_output, [out] or \
         [1, out, 1, 1] as PEFT does); magnitudes per input channel (LyCORIS \
         wd_on_output=False) are not supported"
    );
    Ok(t.flatten_all()?.to_dtype(DType::F32)?)
}

/// A stored down/up tensor as an f32 matrix: 2-D as is, 1×1-conv 4-D flattened, and a larger
/// kernel (kohya's conv_dim / LyCORIS LoCon, `[r, in, kh, kw]`) flattened to `[r, in·kh·kw]`
/// with its `(kh, kw)`.
pub(super) fn as_matrix(key: &str, t: &Tensor) -> Result<(Tensor, Option<(usize, usize)>)> {
    let (matrix, kernel) = match *t.dims() {
        [_, _] => (t.clone(), None),
        [a, b, 1, 1] => (t.reshape((a, b))?, None),
        [a, b, kh, kw] => (t.reshape((a, b * kh * kw))?, Some((kh, kw))),
        _ => bail!(
            "`{key}` has shape {:?}; expected 2-D or a 1×1 conv [_, _, 1, 1]",
            t.dims()
        ),
    };
    Ok((matrix.to_dtype(DType::F32)?, kernel))
}

/// The scalar of an `.alpha` tensor (0-d or one element, any numeric dtype); 0 means "= rank",
/// as kohya defines it.
pub(super) fn alpha_value(key: &str, t: &Tensor, rank: usize) -> Result<f64> {
    ensure!(
        t.elem_count() == 1,
        "`{key}` must be a scalar, got shape {:?}",
        t.dims()
    );
    let alpha = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
    ensure!(alpha.is_finite(), "`{key}` is not a finite number: {alpha}");
    Ok(if alpha == 0.0 { rank as f64 } else { alpha })
}
