//! `--lora FILE[:SCALE]`: which adapter files to apply and how strongly.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{bail, ensure, Result};

/// One adapter file and its multiplier (1.0 unless given).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f64,
}

impl LoraSpec {
    pub fn new(path: impl Into<PathBuf>, scale: f64) -> Self {
        Self {
            path: path.into(),
            scale,
        }
    }
}

impl FromStr for LoraSpec {
    type Err = anyhow::Error;

    /// `FILE` or `FILE:SCALE`. The scale is whatever follows the last `:`, so paths containing
    /// `:` still work when a scale is given; a path that itself ends in `:text` and exists is
    /// taken whole.
    fn from_str(spec: &str) -> Result<Self> {
        const USAGE: &str = "expected FILE or FILE:SCALE, e.g. style.safetensors:0.8";
        ensure!(!spec.is_empty(), "empty --lora value: {USAGE}");
        let Some((path, scale)) = spec.rsplit_once(':') else {
            return Ok(Self::new(spec, 1.0));
        };
        if std::path::Path::new(spec).is_file() {
            return Ok(Self::new(spec, 1.0));
        }
        ensure!(!path.is_empty(), "--lora `{spec}` names no file: {USAGE}");
        let Ok(scale) = scale.trim().parse::<f64>() else {
            bail!("--lora `{spec}`: scale `{scale}` is not a number: {USAGE}");
        };
        ensure!(
            scale.is_finite(),
            "--lora `{spec}`: scale must be a finite number"
        );
        Ok(Self::new(path, scale))
    }
}

impl fmt::Display for LoraSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.scale)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_and_scale() {
        assert_eq!(
            "a.safetensors".parse::<LoraSpec>().unwrap(),
            LoraSpec::new("a.safetensors", 1.0)
        );
        assert_eq!(
            "dir/a.safetensors:0.75".parse::<LoraSpec>().unwrap(),
            LoraSpec::new("dir/a.safetensors", 0.75)
        );
        assert_eq!(
            "C:/x/a.safetensors:-1".parse::<LoraSpec>().unwrap(),
            LoraSpec::new("C:/x/a.safetensors", -1.0)
        );
    }

    #[test]
    fn rejects_bad_syntax() {
        for (spec, expected) in [
            ("", "empty --lora"),
            (":0.5", "names no file"),
            ("a.safetensors:strong", "scale `strong` is not a number"),
            ("a.safetensors:", "scale `` is not a number"),
            ("a.safetensors:inf", "finite"),
        ] {
            let err = spec.parse::<LoraSpec>().unwrap_err().to_string();
            assert!(err.contains(expected), "{spec}: {err}");
        }
    }
}
