//! `--device` and `--precision` values.

use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// `cpu`, `cuda`, `cuda:N`, `metal` or `metal:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let (kind, ordinal) = match spec.split_once(':') {
        Some((kind, n)) => (
            kind,
            n.parse::<usize>()
                .with_context(|| format!("device `{spec}`: `{n}` is not a device number"))?,
        ),
        None => (spec, 0),
    };
    let device = match kind {
        "cpu" if ordinal == 0 => Device::Cpu,
        "cuda" => Device::new_cuda(ordinal).with_context(|| {
            format!(
                "cannot open CUDA device {ordinal} (built without the `cuda` feature, or no GPU?)"
            )
        })?,
        "metal" => Device::new_metal(ordinal)
            .with_context(|| format!("cannot open Metal device {ordinal}"))?,
        _ => bail!("unknown device `{spec}`: expected cpu, cuda, cuda:N, metal or metal:N"),
    };
    Ok(device)
}

/// The dtype models are loaded in. Adapters and latents stay f32 whatever this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}

impl FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" => Ok(Self::F32),
            "f16" | "fp16" => Ok(Self::F16),
            "bf16" => Ok(Self::Bf16),
            _ => bail!("unknown precision `{s}`: expected f32, f16 or bf16"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_precisions() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        for (bad, expected) in [
            ("gpu", "unknown device"),
            ("cuda:x", "not a device number"),
            ("cpu:1", "unknown device"),
        ] {
            let err = format!("{:#}", parse_device(bad).unwrap_err());
            assert!(err.contains(expected), "{bad}: {err}");
        }
        assert_eq!("bf16".parse::<Precision>().unwrap().dtype(), DType::BF16);
        assert!("f8".parse::<Precision>().is_err());
    }
}
