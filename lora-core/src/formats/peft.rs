//! The diffusers/PEFT layout's own parts: `lora_adapter_metadata` (PEFT `LoraConfig` per
//! component) read into each module's alpha, and the tensors and metadata it is written with.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use serde_json::{json, Value};

use super::keys::Component;
use super::kohya::stored_shape;
use super::OutputModule;
use crate::adapters::ModuleKind;

/// PEFT `LoraConfig` fields of one component, from diffusers' `lora_adapter_metadata`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PeftConfig {
    r: Option<usize>,
    lora_alpha: f64,
    rank_pattern: Vec<(String, usize)>,
    alpha_pattern: Vec<(String, f64)>,
    use_rslora: bool,
    /// `use_dora`: every module must then carry its magnitude.
    pub(crate) use_dora: bool,
}

/// PEFT's `LoraConfig` default, which applies when the metadata leaves `lora_alpha` out.
const PEFT_DEFAULT_ALPHA: f64 = 8.0;

/// Parses `lora_adapter_metadata` (a JSON object with `unet.`/`text_encoder.`-prefixed
/// `LoraConfig` fields) into one config per component that has entries.
pub(crate) fn peft_configs(
    origin: &str,
    metadata: &BTreeMap<String, String>,
) -> Result<BTreeMap<Component, PeftConfig>> {
    let Some(text) = metadata.get("lora_adapter_metadata") else {
        return Ok(BTreeMap::new());
    };
    let json: serde_json::Map<String, Value> = serde_json::from_str(text).with_context(|| {
        format!("{origin}: header entry lora_adapter_metadata is not a JSON object")
    })?;
    let mut configs = BTreeMap::new();
    for component in Component::ALL {
        let fields: BTreeMap<&str, &Value> = json
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(component.diffusers_prefix())?, v)))
            .collect();
        if !fields.is_empty() {
            let config = PeftConfig::from_fields(&fields)
                .with_context(|| format!("{origin}: lora_adapter_metadata for the {component}"))?;
            configs.insert(component, config);
        }
    }
    Ok(configs)
}

impl PeftConfig {
    fn from_fields(fields: &BTreeMap<&str, &Value>) -> Result<Self> {
        let flag = |name: &str| fields.get(name).and_then(|v| v.as_bool()).unwrap_or(false);
        let r = fields.get("r").map(|v| json_usize("r", v)).transpose()?;
        let lora_alpha = fields
            .get("lora_alpha")
            .map(|v| json_f64("lora_alpha", v))
            .transpose()?;
        let pattern = |name: &str| -> Result<Vec<(String, &Value)>> {
            let Some(value) = fields.get(name) else {
                return Ok(Vec::new());
            };
            let object = value
                .as_object()
                .with_context(|| format!("{name} must be an object, got {value}"))?;
            object
                .iter()
                .map(|(p, v)| Ok((literal_pattern(name, p)?, v)))
                .collect()
        };
        let rank_pattern = pattern("rank_pattern")?
            .into_iter()
            .map(|(p, v)| Ok((p, json_usize("rank_pattern", v)?)))
            .collect::<Result<_>>()?;
        let alpha_pattern = pattern("alpha_pattern")?
            .into_iter()
            .map(|(p, v)| Ok((p, json_f64("alpha_pattern", v)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            r,
            lora_alpha: lora_alpha.unwrap_or(PEFT_DEFAULT_ALPHA),
            rank_pattern,
            alpha_pattern,
            use_rslora: flag("use_rslora"),
            use_dora: flag("use_dora"),
        })
    }

    /// The alpha PEFT would use for the module at `path` with tensors of rank `rank`, expressed
    /// for `alpha/rank` scaling. Also checks that the configured rank matches the tensors.
    pub(crate) fn alpha_for(&self, path: &str, rank: usize, key: &str) -> Result<f64> {
        let configured_rank = first_match(&self.rank_pattern, path).or(self.r);
        if let Some(r) = configured_rank {
            ensure!(
                r == rank,
                "`{key}` has rank {rank} but lora_adapter_metadata says {r}"
            );
        }
        let alpha = first_match(&self.alpha_pattern, path).unwrap_or(self.lora_alpha);
        // rsLoRA scales by alpha/√r; the same factor under alpha/r needs alpha·√r.
        Ok(if self.use_rslora {
            alpha * (rank as f64).sqrt()
        } else {
            alpha
        })
    }
}

/// The value of the first pattern (in key order) that matches `path` the way PEFT matches
/// literal module names: `^name` exactly, `name` exactly or as a `.`-separated suffix. Text-encoder
/// paths are also tried without their `text_model.` level.
fn first_match<T: Copy>(patterns: &[(String, T)], path: &str) -> Option<T> {
    let candidates = [path, path.strip_prefix("text_model.").unwrap_or(path)];
    let matches = |pattern: &str, candidate: &str| match pattern.strip_prefix('^') {
        Some(anchored) => candidate == anchored,
        None => candidate == pattern || candidate.ends_with(&format!(".{pattern}")),
    };
    patterns
        .iter()
        .find(|(p, _)| candidates.iter().any(|c| matches(p, c)))
        .map(|(_, v)| *v)
}

/// Accepts patterns that are module names (all diffusers writes), rejecting regular expressions
/// rather than matching them wrongly.
fn literal_pattern(field: &str, pattern: &str) -> Result<String> {
    const REGEX_SYNTAX: &[char] = &['*', '+', '?', '[', ']', '(', ')', '{', '}', '|', '\\', '$'];
    ensure!(
        !pattern.contains(REGEX_SYNTAX),
        "{field} entry `{pattern}` is a regular expression; only module names are supported"
    );
    Ok(pattern.to_string())
}

fn json_usize(field: &str, v: &Value) -> Result<usize> {
    let n = v
        .as_u64()
        .with_context(|| format!("{field} must be a non-negative integer, got {v}"))?;
    Ok(usize::try_from(n)?)
}

fn json_f64(field: &str, v: &Value) -> Result<f64> {
    v.as_f64()
        .with_context(|| format!("{field} must be a number, got {v}"))
}

pub(crate) fn peft_tensors(entries: &[OutputModule]) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = Vec::with_capacity(entries.len() * 2);
    for e in entries {
        let Some(lora) = e.module.as_lora() else {
            bail!(
                "`{}`: a LyCORIS {} module has no PEFT layout",
                e.info.path,
                e.module.algorithm()
            );
        };
        let key = format!(
            "{}{}",
            e.component.diffusers_prefix(),
            e.component.canonical_path(&e.info.path)
        );
        tensors.push((
            format!("{key}.lora_A.weight"),
            stored_shape(&lora.down, e.info.kind, true)?,
        ));
        tensors.push((
            format!("{key}.lora_B.weight"),
            stored_shape(&lora.up, e.info.kind, false)?,
        ));
        if let Some(magnitude) = &lora.magnitude {
            // PEFT's parameter shapes: `[out]`, `[1, out, 1, 1]` for convs.
            let out = magnitude.elem_count();
            let stored = match e.info.kind {
                ModuleKind::Linear => magnitude.clone(),
                ModuleKind::Conv1x1 | ModuleKind::Conv { .. } => {
                    magnitude.reshape((1, out, 1, 1))?
                }
            };
            tensors.push((format!("{key}.lora_magnitude_vector"), stored));
        }
    }
    Ok(tensors)
}

/// `format: pt` and diffusers' `lora_adapter_metadata`: per component the most common rank and
/// alpha as `r`/`lora_alpha`, the exceptions as `rank_pattern`/`alpha_pattern`, so
/// `load_lora_weights` restores every module's `alpha/rank` (diffusers would otherwise assume
/// alpha = rank).
pub(crate) fn peft_metadata(entries: &[OutputModule]) -> BTreeMap<String, String> {
    let mut config: BTreeMap<String, Value> = BTreeMap::new();
    for component in Component::ALL {
        let modules: Vec<&OutputModule> = entries
            .iter()
            .filter(|e| e.component == component)
            .collect();
        if modules.is_empty() {
            continue;
        }
        let rank = most_common(modules.iter().map(|e| e.module.rank()));
        let alpha = most_common(modules.iter().map(|e| e.module.alpha()));
        // Module names for peft's suffix matching. Text-encoder names drop the `text_model.`
        // level: `encoder.layers.0.self_attn.q_proj` matches both CLIPTextModel layouts
        // (with the level, as in real checkpoints, and without it, as transformers >= 5 builds
        // the model), whereas the full name would match nothing in the latter.
        let path = |e: &OutputModule| {
            let full = component.canonical_path(&e.info.path);
            match component.is_text_encoder() {
                true => full
                    .strip_prefix("text_model.")
                    .map_or(full.clone(), str::to_string),
                false => full,
            }
        };
        let rank_pattern: serde_json::Map<String, Value> = modules
            .iter()
            .filter(|e| e.module.rank() != rank)
            .map(|e| (path(e), json!(e.module.rank())))
            .collect();
        let alpha_pattern: serde_json::Map<String, Value> = modules
            .iter()
            .filter(|e| e.module.alpha() != alpha)
            .map(|e| (path(e), json_number(e.module.alpha())))
            .collect();
        let mut targets: Vec<String> = modules.iter().map(|e| path(e)).collect();
        targets.sort();
        let prefix = component.diffusers_prefix();
        config.insert(format!("{prefix}r"), json!(rank));
        config.insert(format!("{prefix}lora_alpha"), json_number(alpha));
        config.insert(format!("{prefix}target_modules"), json!(targets));
        config.insert(format!("{prefix}rank_pattern"), Value::Object(rank_pattern));
        config.insert(
            format!("{prefix}alpha_pattern"),
            Value::Object(alpha_pattern),
        );
        let dora = |e: &&OutputModule| e.module.as_lora().is_some_and(|m| m.magnitude.is_some());
        if modules.iter().any(dora) {
            config.insert(format!("{prefix}use_dora"), json!(true));
        }
    }
    // Sorted keys and two-space indent, as diffusers writes it.
    let text =
        serde_json::to_string_pretty(&config).expect("a map of JSON values always serialises");
    BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("lora_adapter_metadata".to_string(), text),
    ])
}

/// Integral values as JSON integers (as diffusers writes `lora_alpha`), others as floats.
fn json_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 2f64.powi(53) {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// The value occurring most often; on a tie the one seen first.
fn most_common<T: PartialEq + Copy>(values: impl Iterator<Item = T>) -> T {
    let mut counts: Vec<(T, usize)> = Vec::new();
    for v in values {
        match counts.iter_mut().find(|(seen, _)| *seen == v) {
            Some((_, n)) => *n += 1,
            None => counts.push((v, 1)),
        }
    }
    let best = counts
        .iter()
        .map(|(_, n)| *n)
        .max()
        .expect("called with at least one value");
    counts
        .into_iter()
        .find(|(_, n)| *n == best)
        .map(|(v, _)| v)
        .expect("the maximum occurs")
}
