//! Reading LyCORIS LoHa and LoKr files (kohya-prefixed keys, as `lycoris.kohya` writes them) into
//! lora-core's [`LycorisModule`]s, which the runtime layers attach and lora-merge folds.
//!
//! Per module (`<lora_name>.<suffix>`), with `scale = alpha / r` (alpha missing or 0: = r):
//! - LoHa: `ΔW = scale · (hada_w1_a · hada_w1_b) ⊙ (hada_w2_a · hada_w2_b)`, `r` = rows of
//!   `hada_w1_b`; the `[out, in·kh·kw]` product is reshaped to the weight.
//! - LoKr: `ΔW = scale · W1 ⊗ W2`, `W1 = lokr_w1` or `lokr_w1_a · lokr_w1_b`, `W2 = lokr_w2` or
//!   `lokr_w2_a · lokr_w2_b` (a conv `W2` keeps its kernel innermost). `r` = columns of
//!   `lokr_w1_a`, else of `lokr_w2_a`; both halves whole: scale 1.
//!
//! Tucker factors (`hada_t1`/`hada_t2`, `lokr_t2`) and DoRA on LoHa/LoKr (`dora_scale`) are
//! rejected by name.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};

use super::layout::alpha_value;

use crate::adapters::lycoris::{KronFactor, LycorisFactors, LycorisModule};
use crate::formats::keys::{Component, LOHA_SUFFIXES, LOKR_SUFFIXES, LYCORIS_TUCKER_SUFFIXES};

/// Whether a file's keys are LyCORIS LoHa/LoKr ones.
pub(super) fn is_lycoris<'a>(mut keys: impl Iterator<Item = &'a String>) -> bool {
    keys.any(|k| k.contains(".hada_w") || k.contains(".lokr_w"))
}

/// A LoHa/LoKr file's modules by (component, kohya name without prefix); every key must belong
/// to a complete LoHa or LoKr module, else the error lists the offending keys.
pub(super) fn read_modules(
    origin: &str,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<(Component, String), LycorisModule>> {
    let mut groups: BTreeMap<(Component, String), BTreeMap<String, Tensor>> = BTreeMap::new();
    let mut unsupported = Vec::new();
    let mut unknown = Vec::new();
    for (key, tensor) in tensors {
        let split = Component::split_kohya_key(key)
            .and_then(|(component, rest)| Some((component, rest.split_once('.')?)));
        let Some((component, (name, suffix))) = split else {
            unknown.push(key.clone());
            continue;
        };
        let suffix = suffix.strip_suffix(".weight").unwrap_or(suffix);
        if LYCORIS_TUCKER_SUFFIXES.contains(&suffix) {
            unsupported.push(format!("`{key}` (Tucker decomposition)"));
            continue;
        }
        if suffix == "dora_scale" {
            unsupported.push(format!("`{key}` (DoRA on LoHa/LoKr)"));
            continue;
        }
        let known = LOHA_SUFFIXES.iter().chain(&LOKR_SUFFIXES);
        if suffix != "alpha" && !known.into_iter().any(|s| *s == suffix) {
            unknown.push(key.clone());
            continue;
        }
        let name = name.to_string();
        groups
            .entry((component, name))
            .or_default()
            .insert(suffix.to_string(), tensor.to_dtype(DType::F32)?);
    }
    ensure!(
        unsupported.is_empty(),
        "{origin}: LyCORIS features not supported here: {}",
        unsupported.join(", ")
    );
    ensure!(
        unknown.is_empty(),
        "{origin}: keys that are no LoHa/LoKr tensor (kohya-prefixed lora_unet_/lora_te_ \
         names with hada_*/lokr_*/alpha suffixes): {}",
        unknown.join(", ")
    );
    let mut modules = BTreeMap::new();
    let mut problems = Vec::new();
    for ((component, name), parts) in groups {
        let full = format!("{}{name}", component.kohya_prefix());
        match assemble(&full, parts) {
            Ok(m) => {
                modules.insert((component, name), m);
            }
            Err(e) => problems.push(format!("{e:#}")),
        }
    }
    ensure!(
        problems.is_empty(),
        "{origin}: {} malformed LoHa/LoKr modules:\n  - {}",
        problems.len(),
        problems.join("\n  - ")
    );
    ensure!(!modules.is_empty(), "{origin}: the file holds no module");
    Ok(modules)
}

/// A stored factor as a matrix: 2-D as is, 4-D flattened after the first axis.
fn matrix(key: &str, t: &Tensor) -> Result<Tensor> {
    match t.rank() {
        2 => Ok(t.clone()),
        4 => Ok(t.flatten_from(1)?),
        _ => bail!("`{key}` has shape {:?}; expected 2-D or 4-D", t.dims()),
    }
}

fn assemble(full: &str, mut parts: BTreeMap<String, Tensor>) -> Result<LycorisModule> {
    let alpha = parts.remove("alpha");
    let mut take = |s: &str| parts.remove(s);
    let key = |s: &str| format!("{full}.{s}");
    let hada = LOHA_SUFFIXES.map(&mut take);
    let lokr = LOKR_SUFFIXES.map(&mut take);
    let has_hada = hada.iter().any(Option::is_some);
    let has_lokr = lokr.iter().any(Option::is_some);
    ensure!(
        has_hada || has_lokr,
        "`{full}`: an alpha without LoHa/LoKr tensors"
    );
    ensure!(
        !(has_hada && has_lokr),
        "`{full}`: mixes LoHa (hada_*) and LoKr (lokr_*) tensors"
    );
    let factors = if has_hada {
        let [Some(w1a), Some(w1b), Some(w2a), Some(w2b)] = hada else {
            bail!("`{full}`: LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b");
        };
        let (w1a, w1b) = (
            matrix(&key("hada_w1_a"), &w1a)?,
            matrix(&key("hada_w1_b"), &w1b)?,
        );
        let (w2a, w2b) = (
            matrix(&key("hada_w2_a"), &w2a)?,
            matrix(&key("hada_w2_b"), &w2b)?,
        );
        let r = w1b.dim(0)?;
        let out = w1a.dim(0)?;
        let cols = w1b.dim(1)?;
        ensure!(
            w1a.dim(1)? == r
                && w2a.dims() == [out, w2a.dim(1)?]
                && w2b.dims() == [w2a.dim(1)?, cols],
            "`{full}`: LoHa factor shapes disagree: w1_a {:?}, w1_b {:?}, w2_a {:?}, w2_b {:?}",
            w1a.dims(),
            w1b.dims(),
            w2a.dims(),
            w2b.dims()
        );
        LycorisFactors::LoHa { w1a, w1b, w2a, w2b }
    } else {
        let [w1, w1a, w1b, w2, w2a, w2b] = lokr;
        // Each half as a matrix: a conv half `[b, d, kh, kw]` (or its `b` factor
        // `[r, d, kh, kw]`) flattened after the first axis, the kernel innermost.
        let half = |whole: Option<Tensor>, a: Option<Tensor>, b: Option<Tensor>, n: u8| {
            let name = |part: &str| key(&format!("lokr_w{n}{part}"));
            Ok(match (whole, a, b) {
                (Some(w), None, None) => KronFactor::Full(matrix(&name(""), &w)?),
                (None, Some(a), Some(b)) => {
                    let (a, b) = (matrix(&name("_a"), &a)?, matrix(&name("_b"), &b)?);
                    ensure!(
                        a.dim(1)? == b.dim(0)?,
                        "`{full}`: lokr_w{n}_a {:?} and lokr_w{n}_b {:?} disagree on the rank",
                        a.dims(),
                        b.dims()
                    );
                    KronFactor::LowRank { a, b }
                }
                _ => bail!("`{full}`: LoKr needs lokr_w{n}, or lokr_w{n}_a and lokr_w{n}_b"),
            })
        };
        LycorisFactors::LoKr {
            w1: half(w1, w1a, w1b, 1)?,
            w2: half(w2, w2a, w2b, 2)?,
        }
    };
    let mut module = LycorisModule {
        factors,
        alpha: 0.0,
    };
    // A missing alpha (or 0) is the rank, as LyCORIS reads it: scale 1.
    let rank = module.rank();
    module.alpha = match alpha {
        Some(t) => alpha_value(&key("alpha"), &t, rank)?,
        None => rank as f64,
    };
    Ok(module)
}
