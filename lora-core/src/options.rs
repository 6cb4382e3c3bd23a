//! The option values every binary shares, parsed one way with one error for one mistake:
//! `--precision`, `--device` and `--lora FILE[:SCALE]`. Each parses from the text a user types
//! (`FromStr`, which clap uses) and reads from and writes to config files as that same text.
//! Also the rules every binary applies to the files it reads (`--allow-pickle`,
//! `--allow-nonfinite`) and writes (`--overwrite`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The floating-point type models are loaded in, or a merged checkpoint is written in. Adapters,
/// optimizer state and latents stay f32 whatever this is.
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

    /// As the flags spell it: `f32`, `f16` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    /// As kohya's metadata spells it (`ss_mixed_precision`): `fp32`, `fp16` or `bf16`.
    pub fn kohya_name(self) -> &'static str {
        match self {
            Self::F32 => "fp32",
            Self::F16 => "fp16",
            Self::Bf16 => "bf16",
        }
    }

    /// Refuses a precision the device cannot compute in: candle's CPU backend has no bf16
    /// matrix product, and falling back silently would change both numerics and memory from
    /// what was asked.
    pub fn check_device(self, device: DeviceSpec) -> Result<()> {
        ensure!(
            !(self == Self::Bf16 && device.resolve() == DeviceSpec::Cpu),
            "--precision bf16 needs a CUDA device: candle's CPU backend has no bf16 matrix \
             product (use f32 or f16 on the CPU)"
        );
        Ok(())
    }
}

impl TryFrom<DType> for Precision {
    type Error = anyhow::Error;
    fn try_from(dtype: DType) -> Result<Self> {
        match dtype {
            DType::F32 => Ok(Self::F32),
            DType::F16 => Ok(Self::F16),
            DType::BF16 => Ok(Self::Bf16),
            other => bail!("{other:?} is no model precision: expected f32, f16 or bf16"),
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
            _ => bail!("unknown precision `{s}`: expected f32, f16 or bf16 (or fp32, fp16)"),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a command runs: `auto` (the default: the first CUDA device when the build has CUDA and
/// one opens, else the CPU), `cpu`, `cuda` (device 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// The device `auto` stands for here, and why: CUDA device 0 when this build has CUDA and
    /// the device opens, else the CPU. Probed once per process (opening a CUDA device to look
    /// costs a context), however often a binary resolves `auto`.
    pub fn auto_choice() -> (Self, &'static str) {
        static CHOICE: std::sync::OnceLock<(DeviceSpec, &'static str)> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| {
            #[cfg(feature = "cuda")]
            {
                match Device::new_cuda(0) {
                    Ok(_) => (Self::Cuda(0), "a CUDA device is present"),
                    Err(_) => (Self::Cpu, "no CUDA device could be opened"),
                }
            }
            #[cfg(not(feature = "cuda"))]
            {
                (Self::Cpu, "this build has no CUDA support")
            }
        })
    }

    /// For a binary to print: what `auto` chose and why; `None` for an explicit device.
    pub fn auto_note(self) -> Option<String> {
        (self == Self::Auto).then(|| {
            let (device, why) = Self::auto_choice();
            format!("device: {device} (--device auto: {why})")
        })
    }

    /// A concrete device: `auto` resolved, the others as they are.
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto => Self::auto_choice().0,
            other => other,
        }
    }

    /// The spec of an opened device.
    pub fn of(device: &Device) -> Self {
        match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => Self::Cuda(gpu_id),
            _ => Self::Cpu,
        }
    }

    pub fn open(self) -> Result<Device> {
        match self.resolve() {
            Self::Auto => unreachable!("resolved above"),
            Self::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            Self::Cuda(n) => {
                Device::new_cuda(n).with_context(|| format!("cannot open CUDA device {n}"))
            }
            #[cfg(not(feature = "cuda"))]
            Self::Cuda(_) => bail!(
                "device `{self}` needs CUDA support: rebuild with `--features cuda` (this build \
                 is CPU-only)"
            ),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once(':') {
            None if s == "auto" => Ok(Self::Auto),
            None if s == "cpu" => Ok(Self::Cpu),
            None if s == "cuda" => Ok(Self::Cuda(0)),
            Some(("cuda", n)) => n
                .parse()
                .map(Self::Cuda)
                .with_context(|| format!("device `{s}`: `{n}` is not a device number")),
            _ => bail!("unknown device `{s}`: expected auto, cpu, cuda or cuda:N"),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// `--lora FILE[:SCALE]`: one adapter file and its multiplier (1 unless given).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub path: PathBuf,
    pub scale: f64,
}

impl AdapterSpec {
    pub fn new(path: impl Into<PathBuf>, scale: f64) -> Self {
        Self {
            path: path.into(),
            scale,
        }
    }

    /// This adapter as a file the readers take: a PyTorch pickle is refused, or with
    /// `allow_pickle` replaced by its safetensors copy (see [`crate::io::pickle`]).
    pub fn readable(&self, allow_pickle: bool) -> Result<Self> {
        Ok(Self::new(
            crate::io::pickle::safetensors_path(&self.path, allow_pickle)?,
            self.scale,
        ))
    }
}

impl FromStr for AdapterSpec {
    type Err = anyhow::Error;

    /// `FILE` or `FILE:SCALE`, the scale after the last `:`. A text that names an existing file
    /// is that file; otherwise a number after the last `:` is the scale. A text after the last
    /// `:` that is no number keeps the whole text as the path only where it is clearly part of
    /// one (it holds `/` or `\`, as in `dir:x/a.safetensors`, or what precedes it is a drive
    /// letter, `C:a.safetensors`); anything else is an error, never silently part of the path.
    fn from_str(spec: &str) -> Result<Self> {
        const USAGE: &str = "expected FILE or FILE:SCALE, e.g. style.safetensors:0.8";
        ensure!(!spec.is_empty(), "empty --lora value: {USAGE}");
        let Some((path, scale)) = spec.rsplit_once(':') else {
            return Ok(Self::new(spec, 1.0));
        };
        if Path::new(spec).is_file() {
            return Ok(Self::new(spec, 1.0));
        }
        if let Ok(scale) = scale.trim().parse::<f64>() {
            ensure!(!path.is_empty(), "--lora `{spec}` names no file: {USAGE}");
            ensure!(
                scale.is_finite(),
                "--lora `{spec}`: scale must be a finite number"
            );
            return Ok(Self::new(path, scale));
        }
        let drive_letter = path.len() == 1 && path.chars().all(|c| c.is_ascii_alphabetic());
        if scale.contains(['/', '\\']) || drive_letter {
            return Ok(Self::new(spec, 1.0));
        }
        ensure!(!path.is_empty(), "--lora `{spec}` names no file: {USAGE}");
        bail!(
            "--lora `{spec}`: scale `{scale}` is not a number (a file name that contains `:` \
             needs an explicit scale, e.g. `{spec}:1`): {USAGE}"
        )
    }
}

impl fmt::Display for AdapterSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.scale)
    }
}

/// The rule every binary applies to its outputs: an output is never one of the command's inputs
/// (a base model, an adapter, a dataset, a resumed checkpoint), whatever the spelling of either
/// path, since writing it would destroy the input. `inputs` pairs each input with its flag.
/// Checked before any work, with the same error in every binary.
pub fn check_output(flag: &str, output: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let target = resolved(output);
    for (input_flag, input) in inputs {
        ensure!(
            target != resolved(input),
            "{flag} {} is {input_flag} {}: an input is never overwritten; choose another output",
            output.display(),
            input.display()
        );
    }
    Ok(())
}

/// What every binary does with each output before any work, beside [`check_output`]:
/// - an existing output is replaced only with `--overwrite` (`overwrite`);
/// - the output's folder is created when missing (as kohya and diffusers do with theirs), and
///   probed with a file created and removed there, so a folder that cannot be written (read
///   only, no permission, no room for a directory entry) is found now, not after the work.
pub fn prepare_output(flag: &str, output: &Path, overwrite: bool) -> Result<()> {
    ensure!(
        overwrite || !output.exists(),
        "{flag} {} already exists; pass --overwrite to replace it (the old file stays until the \
         new one is whole) or choose another output",
        output.display()
    );
    let folder = crate::io::folder_of(output);
    std::fs::create_dir_all(folder).with_context(|| {
        format!(
            "{flag} {}: cannot create its folder {}",
            output.display(),
            folder.display()
        )
    })?;
    crate::io::probe_writable(folder)
        .with_context(|| format!("{flag} {}: its folder cannot be written", output.display()))
}

/// `path` with its folder resolved (symbolic links, `..`), so two spellings of one file compare
/// equal; a path whose folder does not exist yet is taken as given.
fn resolved(path: &Path) -> PathBuf {
    if let Ok(full) = path.canonicalize() {
        return full;
    }
    match (crate::io::folder_of(path).canonicalize(), path.file_name()) {
        (Ok(folder), Some(name)) => folder.join(name),
        _ => path.to_path_buf(),
    }
}

/// Reads a value from config-file text through its `FromStr`, with the same error a flag gets:
/// the body of `Deserialize::deserialize` for every option value.
pub fn deserialize_text<'de, D: Deserializer<'de>, T>(d: D) -> Result<T, D::Error>
where
    T: FromStr<Err = anyhow::Error>,
{
    let text = String::deserialize(d)?;
    text.parse()
        .map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
}

/// Serde for values that are their own text (`FromStr` + `Display`), as config files hold them.
macro_rules! serde_as_text {
    ($($ty:ty),*) => {$(
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                deserialize_text(d)
            }
        }
    )*};
}
serde_as_text!(Precision, DeviceSpec, AdapterSpec);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precisions_parse_in_both_spellings() {
        for (text, expected) in [
            ("f32", Precision::F32),
            ("fp32", Precision::F32),
            ("f16", Precision::F16),
            ("fp16", Precision::F16),
            ("bf16", Precision::Bf16),
        ] {
            assert_eq!(text.parse::<Precision>().unwrap(), expected);
        }
        let err = "f8".parse::<Precision>().unwrap_err().to_string();
        assert!(err.contains("unknown precision `f8`"), "{err}");
        assert!(Precision::Bf16.check_device(DeviceSpec::Cpu).is_err());
        assert!(Precision::Bf16.check_device(DeviceSpec::Cuda(0)).is_ok());
        assert!(Precision::F16.check_device(DeviceSpec::Cpu).is_ok());
        assert_eq!(Precision::try_from(DType::BF16).unwrap(), Precision::Bf16);
        assert!(Precision::try_from(DType::U8).is_err());
    }

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!(DeviceSpec::default(), DeviceSpec::Auto);
        assert_ne!(DeviceSpec::Auto.resolve(), DeviceSpec::Auto);
        #[cfg(not(feature = "cuda"))]
        {
            assert_eq!(DeviceSpec::Auto.resolve(), DeviceSpec::Cpu);
            assert!(Precision::Bf16.check_device(DeviceSpec::Auto).is_err());
        }
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        assert!(DeviceSpec::Cpu.open().unwrap().is_cpu());
        for (bad, expected) in [
            ("gpu", "unknown device `gpu`"),
            ("tpu", "unknown device"),
            ("cpu:1", "unknown device"),
            ("cuda:x", "`x` is not a device number"),
        ] {
            let err = format!("{:#}", bad.parse::<DeviceSpec>().unwrap_err());
            assert!(err.contains(expected), "{bad}: {err}");
        }
    }

    #[test]
    fn adapter_specs_parse_file_and_scale() {
        for (text, path, scale) in [
            ("a.safetensors", "a.safetensors", 1.0),
            ("dir/a.safetensors:0.75", "dir/a.safetensors", 0.75),
            ("a.safetensors: 0.5", "a.safetensors", 0.5),
            ("C:/x/a.safetensors:-1", "C:/x/a.safetensors", -1.0),
            ("dir:x/a.safetensors", "dir:x/a.safetensors", 1.0),
            ("C:a.safetensors", "C:a.safetensors", 1.0),
            (r"C:\x\a.safetensors", r"C:\x\a.safetensors", 1.0),
        ] {
            assert_eq!(
                text.parse::<AdapterSpec>().unwrap(),
                AdapterSpec::new(path, scale),
                "{text}"
            );
        }
        assert_eq!(AdapterSpec::new("a", 0.8).to_string(), "a:0.8");
        // A one-letter file with a scale is a file and a scale, not a drive letter.
        assert_eq!(
            "a:0.5".parse::<AdapterSpec>().unwrap(),
            AdapterSpec::new("a", 0.5)
        );
        for spec in [
            AdapterSpec::new("a", 0.5),
            AdapterSpec::new("dir/style.safetensors", -1.25),
            AdapterSpec::new("C:/x/a.safetensors", 1.0),
        ] {
            assert_eq!(spec.to_string().parse::<AdapterSpec>().unwrap(), spec);
        }
    }

    #[test]
    fn adapter_specs_reject_bad_syntax_naming_the_value() {
        for (spec, expected) in [
            ("", "empty --lora"),
            (":0.5", "names no file"),
            ("a.safetensors:strong", "scale `strong` is not a number"),
            ("a.safetensors:", "scale `` is not a number"),
            ("a.safetensors:inf", "finite"),
            ("a.safetensors:NaN", "finite"),
        ] {
            let err = spec.parse::<AdapterSpec>().unwrap_err().to_string();
            assert!(err.contains(expected), "{spec}: {err}");
        }
    }

    #[test]
    fn an_existing_file_whose_name_ends_in_colon_text_is_taken_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("style:v2");
        std::fs::write(&path, b"").unwrap();
        let text = path.to_str().unwrap();
        assert_eq!(
            text.parse::<AdapterSpec>().unwrap(),
            AdapterSpec::new(&path, 1.0)
        );
    }

    #[test]
    fn values_read_from_config_text() {
        #[derive(Debug, Deserialize)]
        struct File {
            precision: Precision,
            device: DeviceSpec,
        }
        let file: File =
            serde_json::from_str(r#"{"precision": "fp16", "device": "cuda:1"}"#).unwrap();
        assert_eq!(
            (file.precision, file.device),
            (Precision::F16, DeviceSpec::Cuda(1))
        );
        let bad = serde_json::from_str::<File>(r#"{"precision": "f8", "device": "cpu"}"#);
        assert!(bad.unwrap_err().to_string().contains("unknown precision"));
    }

    #[test]
    fn an_output_that_is_an_input_is_refused_whatever_its_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.safetensors");
        std::fs::write(&base, b"x").unwrap();
        let other = dir.path().join("sub/../base.safetensors");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let err = check_output("--output", &other, &[("--base", &base)]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--output") && msg.contains("is --base"),
            "{msg}"
        );
        let fresh = dir.path().join("out.safetensors");
        assert!(check_output("--output", &fresh, &[("--base", &base)]).is_ok());
        let missing_folder = dir.path().join("new/out.safetensors");
        assert!(check_output("--output", &missing_folder, &[("--base", &base)]).is_ok());
    }

    #[test]
    fn an_existing_output_is_replaced_only_with_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.safetensors");
        std::fs::write(&out, b"old").unwrap();
        let err = prepare_output("--output", &out, false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("already exists") && msg.contains("--overwrite"),
            "{msg}"
        );
        assert!(prepare_output("--output", &out, true).is_ok());
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"old",
            "the check writes nothing"
        );
        let missing_folder = dir.path().join("new/out.safetensors");
        assert!(prepare_output("--output", &missing_folder, false).is_ok());
        assert!(
            dir.path().join("new").is_dir(),
            "the missing folder is created"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("new")).unwrap().count(),
            0,
            "the write probe is removed"
        );
    }

    #[test]
    fn an_output_under_a_file_is_refused_naming_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let err = prepare_output("--output", &file.join("out.safetensors"), false);
        let msg = format!("{:#}", err.unwrap_err());
        assert!(msg.contains("cannot create its folder"), "{msg}");
    }
}
