//! LyCORIS LoHa and LoKr adapter files (kohya-prefixed keys, as `lycoris.kohya` writes them),
//! for merging only: the runtime UNet and the adapter reader of lora-core keep rejecting them.
//!
//! Per module (`<lora_name>.<suffix>`), with `scale = alpha / r` (alpha missing or 0: = r):
//! - LoHa: `ΔW = scale · (hada_w1_a · hada_w1_b) ⊙ (hada_w2_a · hada_w2_b)`, `r` = rows of
//!   `hada_w1_b`; the `[out, in·kh·kw]` product is reshaped to the weight.
//! - LoKr: `ΔW = scale · W1 ⊗ W2`, `W1 = lokr_w1` or `lokr_w1_a · lokr_w1_b`, `W2 = lokr_w2` or
//!   `lokr_w2_a · lokr_w2_b` (a conv `W2` keeps its `[b, d, kh, kw]` kernel; the Kronecker product
//!   runs over the first two axes). `r` = columns of `lokr_w1_a`, else of `lokr_w2_a`; both halves
//!   full: scale 1.
//!
//! Tucker factors (`hada_t1`/`hada_t2`, `lokr_t2`) and DoRA on LoHa/LoKr (`dora_scale`) are
//! rejected by name.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use lora_core::formats::adapter_file::read_adapter_tensors;
use lora_core::formats::keys::{
    Component, KohyaNames, LOHA_SUFFIXES, LOKR_SUFFIXES, LYCORIS_TUCKER_SUFFIXES,
};
use lora_core::{LoraModule, ModelModules, ModuleInfo};

/// Whether a safetensors file holds LoHa or LoKr tensors (judged from the header alone).
pub fn is_lycoris_file(path: &Path) -> Result<bool> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut len = [0u8; 8];
    use std::io::Read;
    if file.read_exact(&mut len).is_err() {
        return Ok(false);
    }
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return Ok(false);
    }
    let mut header = vec![0u8; n as usize];
    if file.read_exact(&mut header).is_err() {
        return Ok(false);
    }
    let text = String::from_utf8_lossy(&header);
    Ok(text.contains(".hada_w") || text.contains(".lokr_w"))
}

/// One LoHa/LoKr module's factors, all f32.
#[derive(Debug, Clone)]
pub enum LycorisFactors {
    LoHa {
        w1a: Tensor,
        w1b: Tensor,
        w2a: Tensor,
        w2b: Tensor,
    },
    LoKr {
        /// `[a, c]`.
        w1: Tensor,
        /// `[b, d, k]` with `k = kh·kw` (1 for Linear layers).
        w2: Tensor,
    },
}

/// A LoHa or LoKr module with its scale.
#[derive(Debug, Clone)]
pub struct LycorisModule {
    pub factors: LycorisFactors,
    pub scale: f64,
    /// The rank reported by `inspect` (LoKr with two full halves: 0).
    pub rank: usize,
    pub alpha: Option<f64>,
}

impl LycorisModule {
    pub fn algorithm(&self) -> &'static str {
        match self.factors {
            LycorisFactors::LoHa { .. } => "loha",
            LycorisFactors::LoKr { .. } => "lokr",
        }
    }

    /// `[out, in·kh·kw]` of ΔW, without computing it.
    pub fn delta_dims(&self) -> Result<(usize, usize)> {
        Ok(match &self.factors {
            LycorisFactors::LoHa { w1a, w1b, .. } => (w1a.dim(0)?, w1b.dim(1)?),
            LycorisFactors::LoKr { w1, w2 } => {
                let (a, c) = w1.dims2()?;
                let (b, d, k) = w2.dims3()?;
                (a * b, c * d * k)
            }
        })
    }

    /// ΔW as an f32 `[out, in·kh·kw]` matrix.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let delta = match &self.factors {
            LycorisFactors::LoHa { w1a, w1b, w2a, w2b } => (w1a.matmul(w1b)? * w2a.matmul(w2b)?)?,
            LycorisFactors::LoKr { w1, w2 } => {
                let (a, c) = w1.dims2()?;
                let (b, d, k) = w2.dims3()?;
                // kron over the first two axes: [i·b + p, (j·d + q)·k + s] = w1[i, j] · w2[p, q, s].
                w1.reshape((a, 1, c, 1, 1))?
                    .broadcast_mul(&w2.reshape((1, b, 1, d, k))?)?
                    .reshape((a * b, c * d * k))?
            }
        };
        Ok((delta * self.scale)?)
    }
}

/// Any module of an adapter file that a merge folds in.
#[derive(Debug, Clone)]
pub enum MergeModule {
    Lora(LoraModule),
    Lycoris(LycorisModule),
}

impl MergeModule {
    /// What folding the module with `multiplier` adds to `base` (the stored weight's block in
    /// f32): `multiplier · ΔW`, for DoRA relative to `base` (see `LoraModule::weight_change`);
    /// an f32 `[out, in·kh·kw]` matrix.
    pub fn weight_change(&self, base: &Tensor, multiplier: f64) -> Result<Tensor> {
        match self {
            Self::Lora(m) => m.weight_change(base, multiplier),
            Self::Lycoris(m) => Ok((m.delta_weight()? * multiplier)?),
        }
    }
}

/// A LoHa/LoKr file: modules by (component, kohya name without prefix).
#[derive(Debug, Clone)]
pub struct LycorisFile {
    pub modules: BTreeMap<(Component, String), LycorisModule>,
    pub metadata: BTreeMap<String, String>,
    /// Non-finite values let through by `--allow-nonfinite`, one line per tensor.
    pub warnings: Vec<String>,
}

impl LycorisFile {
    /// Reads a kohya-prefixed LoHa/LoKr file; every key must belong to a complete LoHa or LoKr
    /// module, else the error lists the offending keys. Non-finite values are refused unless
    /// `allow_nonfinite`, then listed in `warnings`.
    pub fn read(path: &Path, allow_nonfinite: bool) -> Result<Self> {
        let (contents, warnings) = read_adapter_tensors(path, &Device::Cpu, allow_nonfinite)?;
        let origin = path.display().to_string();
        let mut groups: BTreeMap<(Component, String), BTreeMap<String, Tensor>> = BTreeMap::new();
        let mut unsupported = Vec::new();
        let mut unknown = Vec::new();
        for (key, tensor) in &contents.tensors {
            let component = Component::ALL
                .into_iter()
                .find(|c| key.starts_with(c.kohya_prefix()));
            let split = key.split_once('.');
            let (Some(component), Some((name, suffix))) = (component, split) else {
                unknown.push(key.clone());
                continue;
            };
            let suffix = suffix.strip_suffix(".weight").unwrap_or(suffix);
            if LYCORIS_TUCKER_SUFFIXES.contains(&suffix) {
                unsupported.push(format!("`{key}` (Tucker decomposition)"));
                continue;
            }
            if suffix == "dora_scale" {
                unsupported.push(format!("`{key}` (DoRA)"));
                continue;
            }
            let known = LOHA_SUFFIXES.iter().chain(&LOKR_SUFFIXES);
            if suffix != "alpha" && !known.into_iter().any(|s| *s == suffix) {
                unknown.push(key.clone());
                continue;
            }
            let name = name[component.kohya_prefix().len()..].to_string();
            groups
                .entry((component, name))
                .or_default()
                .insert(suffix.to_string(), tensor.to_dtype(DType::F32)?);
        }
        ensure!(
            unsupported.is_empty(),
            "{origin}: LyCORIS features lora-merge does not merge: {}",
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
        Ok(Self {
            modules,
            metadata: contents.metadata,
            warnings,
        })
    }

    /// The modules keyed by the model's module paths, each checked against the module's
    /// `[out, in·kh·kw]`. Names that match nothing are returned (for `--allow-unmatched`) or
    /// an error listing them; misfits are always an error.
    #[allow(clippy::type_complexity)]
    pub fn resolve(
        &self,
        model: &ModelModules,
        allow_unmatched: bool,
    ) -> Result<(Vec<(Component, String, LycorisModule)>, Vec<String>)> {
        let names = KohyaNames::new(model.unet, model.text_encoder.unwrap_or_default())?;
        let mut resolved = Vec::new();
        let mut unmatched = Vec::new();
        let mut misfits = Vec::new();
        for ((component, name), module) in &self.modules {
            let full = format!("{}{name}", component.kohya_prefix());
            let Some(info) = names
                .lookup(&full)
                .and_then(|(c, path)| model.find(c, path))
            else {
                unmatched.push(format!("`{full}`: no {component} module has this name"));
                continue;
            };
            let dims = module.delta_dims()?;
            if dims != (info.out_features, info.in_features) {
                misfits.push(misfit(&full, module, dims, info));
                continue;
            }
            resolved.push((*component, info.path.clone(), module.clone()));
        }
        ensure!(
            misfits.is_empty() && (allow_unmatched || unmatched.is_empty()),
            "{} LoHa/LoKr modules do not fit the model:\n  - {}",
            misfits.len() + if allow_unmatched { 0 } else { unmatched.len() },
            misfits
                .iter()
                .chain(if allow_unmatched {
                    [].iter()
                } else {
                    unmatched.iter()
                })
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  - ")
        );
        ensure!(!resolved.is_empty(), "no module of the file applies");
        Ok((resolved, unmatched))
    }
}

fn misfit(full: &str, module: &LycorisModule, dims: (usize, usize), info: &ModuleInfo) -> String {
    format!(
        "`{full}`: the {} ΔW is [{}, {}] but {} is [{}, {}] (out, in·kernel)",
        module.algorithm(),
        dims.0,
        dims.1,
        info.path,
        info.out_features,
        info.in_features
    )
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
    let alpha = match parts.remove("alpha") {
        Some(t) => {
            ensure!(
                t.elem_count() == 1,
                "`{full}.alpha` must be a scalar, got {:?}",
                t.dims()
            );
            let a = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
            ensure!(a.is_finite(), "`{full}.alpha` is not finite");
            (a != 0.0).then_some(a)
        }
        None => None,
    };
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
    if has_hada {
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
        let alpha_or_rank = alpha.unwrap_or(r as f64);
        return Ok(LycorisModule {
            factors: LycorisFactors::LoHa { w1a, w1b, w2a, w2b },
            scale: alpha_or_rank / r as f64,
            rank: r,
            alpha,
        });
    }
    let [w1, w1a, w1b, w2, w2a, w2b] = lokr;
    let (w1, r1) = match (w1, w1a, w1b) {
        (Some(w1), None, None) => (matrix(&key("lokr_w1"), &w1)?, None),
        (None, Some(a), Some(b)) => {
            let (a, b) = (
                matrix(&key("lokr_w1_a"), &a)?,
                matrix(&key("lokr_w1_b"), &b)?,
            );
            ensure!(
                a.dim(1)? == b.dim(0)?,
                "`{full}`: lokr_w1_a {:?} and lokr_w1_b {:?} disagree on the rank",
                a.dims(),
                b.dims()
            );
            (a.matmul(&b)?, Some(a.dim(1)?))
        }
        _ => bail!("`{full}`: LoKr needs lokr_w1, or lokr_w1_a and lokr_w1_b"),
    };
    ensure!(w1.rank() == 2, "`{full}`: lokr_w1 must be 2-D");
    // W2 as [b, d, k]: a conv half keeps its kernel (k = kh·kw).
    let (w2, r2) = match (w2, w2a, w2b) {
        (Some(w2), None, None) => {
            let (b, d) = (w2.dim(0)?, w2.dim(1)?);
            (w2.reshape((b, d, w2.elem_count() / (b * d)))?, None)
        }
        (None, Some(a), Some(b)) => {
            let a = matrix(&key("lokr_w2_a"), &a)?;
            let (r, d) = (b.dim(0)?, b.dim(1)?);
            let k = b.elem_count() / (r * d);
            ensure!(
                a.dim(1)? == r,
                "`{full}`: lokr_w2_a {:?} and lokr_w2_b {:?} disagree on the rank",
                a.dims(),
                b.dims()
            );
            let w2 = a.matmul(&b.reshape((r, d * k))?)?;
            (w2.reshape((a.dim(0)?, d, k))?, Some(r))
        }
        _ => bail!("`{full}`: LoKr needs lokr_w2, or lokr_w2_a and lokr_w2_b"),
    };
    let (scale, rank) = match r1.or(r2) {
        Some(r) => (alpha.unwrap_or(r as f64) / r as f64, r),
        None => (1.0, 0),
    };
    Ok(LycorisModule {
        factors: LycorisFactors::LoKr { w1, w2 },
        scale,
        rank,
        alpha,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kron_matches_the_definition_for_a_conv_half() -> Result<()> {
        let w1 = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu)?;
        // b = 1, d = 2, k = 2
        let w2 = Tensor::new(&[[[1f32, 10.], [100., 1000.]]], &Device::Cpu)?;
        let m = LycorisModule {
            factors: LycorisFactors::LoKr { w1, w2 },
            scale: 1.0,
            rank: 0,
            alpha: None,
        };
        let d = m.delta_weight()?.to_vec2::<f32>()?;
        // rows: i·b + p; columns: (j·d + q)·k + s.
        assert_eq!(
            d,
            [
                [1., 10., 100., 1000., 2., 20., 200., 2000.],
                [3., 30., 300., 3000., 4., 40., 400., 4000.]
            ]
        );
        Ok(())
    }
}
