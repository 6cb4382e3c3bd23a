//! What an adapter to be trained looks like: rank, alpha, which layers it targets (presets) and
//! how its weights start.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Context, Result};

use super::lycoris::LycorisAlgorithm;

/// Which layers of the UNet get an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraTargets {
    /// `attn2.{to_q,to_k,to_v,to_out.0}` of every transformer block (diffusers scripts' choice).
    #[default]
    Attn2,
    /// The same four projections of both attn1 (self) and attn2 (cross).
    Attn,
    /// Every Linear and 1×1 conv inside the transformer models (kohya's default): proj_in,
    /// proj_out, attn1/attn2 projections, `ff.net.0.proj` and `ff.net.2`.
    AttnMlp,
}

impl LoraTargets {
    pub const ALL: [LoraTargets; 3] = [Self::Attn2, Self::Attn, Self::AttnMlp];

    /// Whether the module at `path` (a diffusers UNet path such as
    /// `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q`) is a target. `path` must be
    /// one of the UNet's adaptable modules (see `UNet2DConditionModel::lora_modules`).
    pub fn matches(&self, path: &str) -> bool {
        const PROJ: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
        let is_attn = |which: &str| {
            PROJ.iter()
                .any(|p| path.ends_with(&format!(".{which}.{p}")))
        };
        match self {
            Self::Attn2 => is_attn("attn2"),
            Self::Attn => is_attn("attn1") || is_attn("attn2"),
            Self::AttnMlp => true,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Attn2 => "attn2",
            Self::Attn => "attn",
            Self::AttnMlp => "attn-mlp",
        }
    }
}

impl fmt::Display for LoraTargets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for LoraTargets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::options::deserialize_text(d)
    }
}

impl FromStr for LoraTargets {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .with_context(|| {
                format!("unknown LoRA target preset `{s}`: expected attn2, attn or attn-mlp")
            })
    }
}

/// Which kind of adapter module to train (`--algo`, LyCORIS' `algo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdapterAlgorithm {
    #[default]
    Lora,
    /// LyCORIS LoHa: the Hadamard product of two low-rank pairs.
    LoHa,
    /// LyCORIS LoKr: a Kronecker product (`--factor`).
    LoKr,
}

impl AdapterAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            Self::Lora => "lora",
            Self::LoHa => "loha",
            Self::LoKr => "lokr",
        }
    }

    /// The LyCORIS algorithm a fresh module uses (`None` for LoRA), LoKr split by `factor`
    /// (LyCORIS' default −1: as square as possible).
    pub fn lycoris(self, factor: Option<i64>) -> Option<LycorisAlgorithm> {
        match self {
            Self::Lora => None,
            Self::LoHa => Some(LycorisAlgorithm::LoHa),
            Self::LoKr => Some(LycorisAlgorithm::LoKr {
                factor: factor.unwrap_or(-1),
            }),
        }
    }
}

impl fmt::Display for AdapterAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for AdapterAlgorithm {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::options::deserialize_text(d)
    }
}

impl FromStr for AdapterAlgorithm {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        [Self::Lora, Self::LoHa, Self::LoKr]
            .into_iter()
            .find(|a| a.name() == s)
            .with_context(|| {
                format!("unknown adapter algorithm `{s}`: expected lora, loha or lokr")
            })
    }
}

/// How a fresh adapter's `down` matrix is drawn; `up` always starts at zero so a new adapter is a
/// no-op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraInit {
    /// Kaiming-uniform with a = √5, i.e. U(-1/√in, 1/√in) (kohya, peft default).
    #[default]
    KaimingUniform,
    /// N(0, (1/rank)²) (diffusers training scripts, peft `init_lora_weights="gaussian"`).
    Gaussian,
}

impl<'de> serde::Deserialize<'de> for LoraInit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::options::deserialize_text(d)
    }
}

impl FromStr for LoraInit {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kaiming" | "kaiming-uniform" => Ok(Self::KaimingUniform),
            "gaussian" => Ok(Self::Gaussian),
            _ => bail!("unknown LoRA init `{s}`: expected kaiming-uniform or gaussian"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: LoraTargets,
    /// How LoRA's `down` starts (LyCORIS modules start as LyCORIS draws them).
    pub init: LoraInit,
    /// `None`: LoRA; else LyCORIS' LoHa or LoKr (`--algo`).
    pub lycoris: Option<LycorisAlgorithm>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 4.0,
            targets: LoraTargets::Attn2,
            init: LoraInit::KaimingUniform,
            lycoris: None,
        }
    }
}
