//! The kohya/A1111 layout's writer: tensors named `lora_unet_…` with `.lora_down`, `.lora_up`
//! and `.alpha`, and the `ss_*` and SAI modelspec metadata sd-scripts writes. The one writer of
//! kohya files: trained adapters, and lora-merge's SVD merge, resize and extract.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use crate::adapters::lycoris::LycorisModule;
use crate::adapters::ModuleKind;
use crate::models::config::{ClipActivation, ClipTextConfig, PredictionType};

/// Stable Diffusion generation the adapter was trained on, for kohya/modelspec metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseModelVersion {
    SdV1,
    SdV2,
    /// SDXL base 1.0 (kohya: `sdxl_base_v1-0`).
    SdxlBase,
}

impl BaseModelVersion {
    /// The generation a text encoder belongs to: SD 2.x's OpenCLIP ViT-H uses exact GELU, SD
    /// 1.x's CLIP ViT-L quick GELU.
    pub fn of_text_encoder(config: &ClipTextConfig) -> Self {
        match config.hidden_act {
            ClipActivation::Gelu => Self::SdV2,
            ClipActivation::QuickGelu => Self::SdV1,
        }
    }
}

/// `m` (the down matrix if `down`, else the up) as stored for `kind`: `[a, b]`, `[a, b, 1, 1]`
/// for a 1×1 conv, and for a k×k conv the down `[r, in, kh, kw]` and the up `[out, r, 1, 1]`.
pub(crate) fn stored_shape(m: &Tensor, kind: ModuleKind, down: bool) -> Result<Tensor> {
    let m = m.to_dtype(DType::F32)?;
    let (a, b) = m.dims2()?;
    Ok(match kind {
        ModuleKind::Linear => m,
        ModuleKind::Conv { kh, kw } if down => m.reshape((a, b / (kh * kw), kh, kw))?,
        ModuleKind::Conv1x1 | ModuleKind::Conv { .. } => m.reshape((a, b, 1, 1))?,
    })
}

/// One module of a kohya-layout file about to be written.
#[derive(Debug, Clone)]
pub struct KohyaModule {
    /// The full kohya name (`lora_unet_…`, `lora_te_…`).
    pub name: String,
    /// How `down` and `up` are stored (see [`stored_shape`]).
    pub kind: ModuleKind,
    /// `[rank, in]`; for a k×k conv `[rank, in·kh·kw]`.
    pub down: Tensor,
    /// `[out, rank]`.
    pub up: Tensor,
    pub alpha: f64,
    /// DoRA's magnitude `[out]`, written as LyCORIS' `dora_scale`.
    pub magnitude: Option<Tensor>,
}

/// The tensors of a kohya file: `<name>.lora_down.weight`, `<name>.lora_up.weight` (f32, shaped
/// by [`stored_shape`]) and the 0-d f32 `<name>.alpha`.
pub fn kohya_tensors(modules: &[KohyaModule]) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = Vec::with_capacity(modules.len() * 3);
    for m in modules {
        let name = &m.name;
        tensors.push((
            format!("{name}.lora_down.weight"),
            stored_shape(&m.down, m.kind, true)?,
        ));
        tensors.push((
            format!("{name}.lora_up.weight"),
            stored_shape(&m.up, m.kind, false)?,
        ));
        tensors.push((
            format!("{name}.alpha"),
            Tensor::new(m.alpha as f32, &Device::Cpu)?,
        ));
        if let Some(magnitude) = &m.magnitude {
            // LyCORIS' `wd_on_output` layout: `[out, 1]`, `[out, 1, 1, 1]` for convs.
            let out = magnitude.elem_count();
            let stored = match m.kind {
                ModuleKind::Linear => magnitude.reshape((out, 1))?,
                ModuleKind::Conv1x1 | ModuleKind::Conv { .. } => {
                    magnitude.reshape((out, 1, 1, 1))?
                }
            };
            tensors.push((format!("{name}.dora_scale"), stored));
        }
    }
    Ok(tensors)
}

/// The one value all modules share, or "Dynamic" where they differ (sd-scripts' spelling, as after
/// a dynamic resize).
fn shared(values: Vec<String>) -> String {
    let first = values.first().cloned().unwrap_or_default();
    match values.iter().all(|v| *v == first) {
        true => first,
        false => "Dynamic".to_string(),
    }
}

/// sd-scripts' network keys: `ss_network_module`, `ss_network_dim` and `ss_network_alpha` of the
/// Linear and 1×1 modules (each "Dynamic" where modules differ, as after a dynamic resize), and
/// `ss_network_args`, which gives the k×k conv modules' `conv_dim` and `conv_alpha` (LoCon) as
/// sd-scripts does when a network has them.
pub fn network_metadata(modules: &[KohyaModule]) -> BTreeMap<String, String> {
    let rank = |m: &KohyaModule| m.down.dims().first().copied().unwrap_or(0).to_string();
    let alpha = |m: &KohyaModule| python_float(m.alpha);
    let (conv, linear): (Vec<&KohyaModule>, Vec<&KohyaModule>) = modules
        .iter()
        .partition(|m| matches!(m.kind, ModuleKind::Conv { .. }));
    // A conv-only file describes its convs as the network, as sd-scripts' own extraction does.
    let main = if linear.is_empty() { &conv } else { &linear };
    let mut args = serde_json::Map::new();
    if !conv.is_empty() && !linear.is_empty() {
        args.insert(
            "conv_dim".into(),
            shared(conv.iter().map(|m| rank(m)).collect()).into(),
        );
        args.insert(
            "conv_alpha".into(),
            shared(conv.iter().map(|m| alpha(m)).collect()).into(),
        );
    }
    // DoRA is LyCORIS' (sd-scripts' own `networks.lora` has none): its kohya module, with
    // its network arguments.
    let dora = modules.iter().any(|m| m.magnitude.is_some());
    let network_module = match dora {
        true => {
            args.insert("algo".into(), "lora".into());
            args.insert("dora_wd".into(), "True".into());
            "lycoris.kohya"
        }
        false => "networks.lora",
    };
    BTreeMap::from([
        ("ss_network_module".to_string(), network_module.to_string()),
        (
            "ss_network_dim".to_string(),
            shared(main.iter().map(|m| rank(m)).collect()),
        ),
        (
            "ss_network_alpha".to_string(),
            shared(main.iter().map(|m| alpha(m)).collect()),
        ),
        (
            "ss_network_args".to_string(),
            serde_json::Value::Object(args).to_string(),
        ),
    ])
}

/// The tensors of LyCORIS LoHa/LoKr modules (`(kohya name, layer kind, module)`) as LyCORIS'
/// kohya module writes them: `<name>.hada_w1_a` … or `<name>.lokr_w1` …, 2-D (conv factors
/// flattened to `[_, in·kh·kw]`) except a whole `lokr_w2` of a conv layer, `[b, d, kh, kw]`; and
/// `<name>.alpha`.
pub fn lycoris_tensors(
    modules: &[(String, ModuleKind, &LycorisModule)],
) -> Result<Vec<(String, Tensor)>> {
    let mut tensors = Vec::new();
    for (name, kind, m) in modules {
        for (which, t) in m.named_tensors() {
            let t = t.to_dtype(DType::F32)?;
            let stored = match (which, kind) {
                ("lokr_w2", ModuleKind::Conv { kh, kw }) => {
                    let (b, cols) = t.dims2()?;
                    t.reshape((b, cols / (kh * kw), *kh, *kw))?
                }
                ("lokr_w2", ModuleKind::Conv1x1) => {
                    let (b, d) = t.dims2()?;
                    t.reshape((b, d, 1, 1))?
                }
                _ => t,
            };
            tensors.push((format!("{name}.{which}"), stored));
        }
        tensors.push((
            format!("{name}.alpha"),
            Tensor::new(m.alpha as f32, &Device::Cpu)?,
        ));
    }
    Ok(tensors)
}

/// The network keys of a LyCORIS LoHa/LoKr adapter as LyCORIS' kohya module writes them:
/// `ss_network_module = lycoris.kohya`, the shared rank and alpha, and `ss_network_args` with
/// the algorithm (and LoKr's `factor`).
pub fn lycoris_network_metadata(
    modules: &[(String, ModuleKind, &LycorisModule)],
    factor: Option<i64>,
) -> BTreeMap<String, String> {
    let mut args = serde_json::Map::new();
    let algorithm = modules.first().map_or("loha", |(_, _, m)| m.algorithm());
    args.insert("algo".into(), algorithm.into());
    if let Some(factor) = factor {
        args.insert("factor".into(), factor.to_string().into());
    }
    BTreeMap::from([
        ("ss_network_module".to_string(), "lycoris.kohya".to_string()),
        (
            "ss_network_dim".to_string(),
            shared(
                modules
                    .iter()
                    .map(|(_, _, m)| m.rank().to_string())
                    .collect(),
            ),
        ),
        (
            "ss_network_alpha".to_string(),
            shared(
                modules
                    .iter()
                    .map(|(_, _, m)| python_float(m.alpha))
                    .collect(),
            ),
        ),
        (
            "ss_network_args".to_string(),
            serde_json::Value::Object(args).to_string(),
        ),
    ])
}

/// The base-model keys: kohya's `ss_base_model_version` and `ss_v2`, and the SAI modelspec
/// keys (architecture, resolution, prediction type, title, date).
pub fn model_metadata(
    base: BaseModelVersion,
    prediction: PredictionType,
    title: &str,
) -> BTreeMap<String, String> {
    let v2 = base == BaseModelVersion::SdV2;
    let v_pred = prediction == PredictionType::VPrediction;
    let (base_version, architecture, resolution) = match (base, v_pred) {
        (BaseModelVersion::SdV1, false) => ("sd_v1", "stable-diffusion-v1/lora", "512x512"),
        (BaseModelVersion::SdV1, true) => ("sd_v1_v", "stable-diffusion-v1/lora", "512x512"),
        (BaseModelVersion::SdV2, false) => ("sd_v2", "stable-diffusion-v2-512/lora", "512x512"),
        (BaseModelVersion::SdV2, true) => ("sd_v2_v", "stable-diffusion-v2-768-v/lora", "768x768"),
        (BaseModelVersion::SdxlBase, _) => (
            "sdxl_base_v1-0",
            "stable-diffusion-xl-v1-base/lora",
            "1024x1024",
        ),
    };
    let fields = [
        ("ss_base_model_version", base_version.to_string()),
        ("ss_v2", python_bool(v2)),
        ("modelspec.sai_model_spec", "1.0.1".to_string()),
        ("modelspec.architecture", architecture.to_string()),
        ("modelspec.implementation", "diffusers".to_string()),
        ("modelspec.title", title.to_string()),
        ("modelspec.resolution", resolution.to_string()),
        ("modelspec.date", iso8601_utc(SystemTime::now())),
        (
            "modelspec.prediction_type",
            if v_pred { "v" } else { "epsilon" }.to_string(),
        ),
    ];
    fields
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// How Python's `str(float)` prints `x` (`4.0`, `0.5`, `5e-05`, `1e+16`): kohya tools read and
/// compare these values as Python wrote them. Rust's shortest round-trip digits are Python's;
/// only the exponent is spelled differently (`5e-5`, `1e16`).
pub fn python_float(x: f64) -> String {
    let rust = format!("{x:?}");
    match rust.split_once('e') {
        None => rust,
        Some((mantissa, exponent)) => {
            let (sign, digits) = match exponent.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exponent),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
    }
}

/// `True` / `False`, as Python prints a bool.
pub fn python_bool(b: bool) -> String {
    match b {
        true => "True",
        false => "False",
    }
    .to_string()
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC.
fn iso8601_utc(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01 (H. Hinnant's
/// `civil_from_days`), to avoid a date-time dependency for one header field.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_as_python_prints_them() {
        for (x, python) in [
            (4.0, "4.0"),
            (0.5, "0.5"),
            (1e-4, "0.0001"),
            (5e-5, "5e-05"),
            (1.5e-7, "1.5e-07"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (2.5e123, "2.5e+123"),
            (-3e-10, "-3e-10"),
        ] {
            assert_eq!(python_float(x), python, "{x}");
        }
        assert_eq!(
            (python_bool(true), python_bool(false)),
            ("True".into(), "False".into())
        );
    }

    #[test]
    fn conv_modules_go_to_network_args() {
        let module = |name: &str, kind, rank: usize, alpha| KohyaModule {
            name: name.to_string(),
            kind,
            down: Tensor::zeros((rank, 9), DType::F32, &Device::Cpu).unwrap(),
            up: Tensor::zeros((4, rank), DType::F32, &Device::Cpu).unwrap(),
            alpha,
            magnitude: None,
        };
        let conv = ModuleKind::Conv { kh: 3, kw: 3 };
        let meta = network_metadata(&[
            module("lora_unet_a", ModuleKind::Linear, 4, 2.0),
            module("lora_unet_b", conv, 8, 1.0),
        ]);
        assert_eq!(meta["ss_network_dim"], "4");
        assert_eq!(meta["ss_network_alpha"], "2.0");
        let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
        assert_eq!(
            args,
            serde_json::json!({"conv_dim": "8", "conv_alpha": "1.0"})
        );
        let linear_only = network_metadata(&[module("lora_unet_a", ModuleKind::Linear, 4, 2.0)]);
        assert_eq!(linear_only["ss_network_args"], "{}");
        assert_eq!(linear_only["ss_network_module"], "networks.lora");
        // DoRA files name LyCORIS' module and its arguments, as LyCORIS' own files do.
        let mut dora = module("lora_unet_a", ModuleKind::Linear, 4, 2.0);
        dora.magnitude = Some(Tensor::ones(4, DType::F32, &Device::Cpu).unwrap());
        let meta = network_metadata(&[dora]);
        assert_eq!(meta["ss_network_module"], "lycoris.kohya");
        let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
        assert_eq!(args, serde_json::json!({"algo": "lora", "dora_wd": "True"}));
    }

    #[test]
    fn dates_are_gregorian_utc() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        let leap_day = UNIX_EPOCH + std::time::Duration::from_secs(19_782 * 86_400 + 3_723);
        assert_eq!(iso8601_utc(leap_day), "2024-02-29T01:02:03");
    }
}
