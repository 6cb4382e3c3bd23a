//! Adapter files read, resolved and written in both layouts, against the model's modules and
//! the reference fixtures.

use serde_json::{json, Value};

use super::*;
use candle_core::{DType, IndexOp};

const BLOCK: &str = "down_blocks.0.attentions.0.transformer_blocks.0";
const TE_ATTN: &str = "text_model.encoder.layers.0.self_attn";

fn info(path: &str, kind: ModuleKind, in_features: usize, out_features: usize) -> ModuleInfo {
    ModuleInfo {
        path: path.to_string(),
        kind,
        in_features,
        out_features,
    }
}

/// A miniature SD-like module list: attention projections (one with a wider context input),
/// a 1×1-conv `proj_in` and a GEGLU projection; two text-encoder linears.
fn unet_modules() -> Vec<ModuleInfo> {
    vec![
        info(
            "down_blocks.0.attentions.0.proj_in",
            ModuleKind::Conv1x1,
            8,
            8,
        ),
        info(&format!("{BLOCK}.attn2.to_q"), ModuleKind::Linear, 8, 8),
        info(&format!("{BLOCK}.attn2.to_k"), ModuleKind::Linear, 6, 8),
        info(&format!("{BLOCK}.attn2.to_out.0"), ModuleKind::Linear, 8, 8),
        info(&format!("{BLOCK}.ff.net.0.proj"), ModuleKind::Linear, 8, 16),
    ]
}

fn te_modules() -> Vec<ModuleInfo> {
    vec![
        info(&format!("{TE_ATTN}.q_proj"), ModuleKind::Linear, 6, 6),
        info(&format!("{TE_ATTN}.out_proj"), ModuleKind::Linear, 6, 6),
        info(
            "text_model.encoder.layers.0.mlp.fc1",
            ModuleKind::Linear,
            6,
            12,
        ),
    ]
}

struct Model {
    unet: Vec<ModuleInfo>,
    te: Vec<ModuleInfo>,
}

impl Model {
    fn new() -> Self {
        Self {
            unet: unet_modules(),
            te: te_modules(),
        }
    }
    fn with_te(&self) -> ModelModules<'_> {
        ModelModules {
            unet: &self.unet,
            text_encoder: Some(&self.te),
            text_encoder_2: None,
        }
    }
    fn unet_only(&self) -> ModelModules<'_> {
        ModelModules::unet_only(&self.unet)
    }
}

fn lora_for(info: &ModuleInfo, rank: usize, alpha: f64) -> Result<LoraModule> {
    let down = Tensor::randn(0f32, 1.0, (rank, info.in_features), &Device::Cpu)?;
    let up = Tensor::randn(0f32, 1.0, (info.out_features, rank), &Device::Cpu)?;
    Ok(LoraModule {
        down,
        up,
        alpha,
        magnitude: None,
    })
}

/// The LoRA module behind `m` (every module these tests build or read is one).
fn lora(m: &AdapterModule) -> &LoraModule {
    m.as_lora().expect("a LoRA module")
}

/// An adapter on every module of `model`, with rank/alpha varying per module when `mixed`.
fn adapter_for(model: &Model, mixed: bool) -> Result<Adapter> {
    let mut adapter = Adapter::default();
    for (i, m) in model.unet.iter().enumerate() {
        let (rank, alpha) = if mixed && i == 2 { (2, 0.5) } else { (4, 8.0) };
        adapter
            .unet
            .insert(m.path.clone(), lora_for(m, rank, alpha)?.into());
    }
    for (i, m) in model.te.iter().enumerate() {
        let (rank, alpha) = if mixed && i == 0 { (3, 1.0) } else { (4, 4.0) };
        adapter
            .text_encoder
            .insert(m.path.clone(), lora_for(m, rank, alpha)?.into());
    }
    Ok(adapter)
}

fn options(format: AdapterFormat) -> SaveOptions {
    SaveOptions {
        format,
        base_model: BaseModelVersion::SdV1,
        prediction: PredictionType::Epsilon,
        title: None,
        extra_metadata: BTreeMap::from([("ss_steps".to_string(), "100".to_string())]),
        lokr_factor: None,
    }
}

fn values(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_vec2::<f32>()?)
}

/// Same modules, bit-identical tensors, same alpha.
fn assert_same(a: &Adapter, b: &Adapter) -> Result<()> {
    for (x, y) in [(&a.unet, &b.unet), (&a.text_encoder, &b.text_encoder)] {
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
        for (path, m) in x {
            let n = &y[path];
            assert_eq!(
                values(&lora(m).down)?,
                values(&lora(n).down)?,
                "{path} down"
            );
            assert_eq!(values(&lora(m).up)?, values(&lora(n).up)?, "{path} up");
            assert_eq!(m.alpha(), n.alpha(), "{path} alpha");
        }
    }
    Ok(())
}

fn write_raw(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    metadata: BTreeMap<String, String>,
) -> Result<()> {
    write_safetensors_atomic(path, &tensors, metadata)
}

fn matrix(rows: usize, cols: usize) -> Result<Tensor> {
    Ok(Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?.reshape((rows, cols))?)
}

fn read_err(path: &Path) -> String {
    format!("{:#}", AdapterFile::read(path, &Device::Cpu).unwrap_err())
}

#[test]
fn kohya_round_trip_is_exact_and_keeps_conv_4d() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("a.safetensors");
    let model = Model::new();
    let adapter = adapter_for(&model, true)?;
    save_adapter(
        &path,
        &adapter,
        &model.with_te(),
        &options(AdapterFormat::Kohya),
    )?;

    let raw = read_safetensors(&path, &Device::Cpu)?;
    let proj_in = "lora_unet_down_blocks_0_attentions_0_proj_in";
    assert_eq!(
        raw.tensors[&format!("{proj_in}.lora_down.weight")].dims(),
        [4, 8, 1, 1]
    );
    assert_eq!(
        raw.tensors[&format!("{proj_in}.lora_up.weight")].dims(),
        [8, 4, 1, 1]
    );
    let alpha = &raw.tensors[&format!("{proj_in}.alpha")];
    assert_eq!((alpha.dims(), alpha.dtype()), (&[][..], DType::F32));
    assert!(raw
        .tensors
        .contains_key("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"));

    let file = AdapterFile::read(&path, &Device::Cpu)?;
    assert_eq!(file.format(), AdapterFormat::Kohya);
    assert_same(&file.resolve(&model.with_te())?, &adapter)
}

#[test]
fn kohya_metadata_describes_the_network_and_base_model() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = Model::new();
    let uniform = dir.path().join("uniform.safetensors");
    let mut opts = options(AdapterFormat::Kohya);
    opts.base_model = BaseModelVersion::SdV2;
    opts.prediction = PredictionType::VPrediction;
    let mut adapter = adapter_for(&model, false)?;
    adapter.text_encoder.clear();
    save_adapter(&uniform, &adapter, &model.unet_only(), &opts)?;
    let meta = AdapterFile::read(&uniform, &Device::Cpu)?
        .metadata()
        .clone();
    let expected = [
        ("ss_network_module", "networks.lora"),
        ("ss_network_dim", "4"),
        ("ss_network_alpha", "8.0"),
        ("ss_network_args", "{}"),
        ("ss_base_model_version", "sd_v2_v"),
        ("ss_v2", "True"),
        ("ss_steps", "100"),
        ("modelspec.sai_model_spec", "1.0.1"),
        ("modelspec.architecture", "stable-diffusion-v2-768-v/lora"),
        ("modelspec.implementation", "diffusers"),
        ("modelspec.title", "uniform"),
        ("modelspec.resolution", "768x768"),
        ("modelspec.prediction_type", "v"),
    ];
    for (key, value) in expected {
        assert_eq!(meta.get(key).map(String::as_str), Some(value), "{key}");
    }
    assert_eq!(meta["modelspec.date"].len(), "2024-01-01T00:00:00".len());

    let dynamic = dir.path().join("dynamic.safetensors");
    let mut titled = options(AdapterFormat::Kohya);
    titled.title = Some("my lora".into());
    save_adapter(
        &dynamic,
        &adapter_for(&model, true)?,
        &model.with_te(),
        &titled,
    )?;
    let meta = AdapterFile::read(&dynamic, &Device::Cpu)?
        .metadata()
        .clone();
    assert_eq!(
        (
            meta["ss_network_dim"].as_str(),
            meta["ss_network_alpha"].as_str()
        ),
        ("Dynamic", "Dynamic")
    );
    assert_eq!(
        (
            meta["ss_base_model_version"].as_str(),
            meta["ss_v2"].as_str()
        ),
        ("sd_v1", "False")
    );
    assert_eq!(meta["modelspec.architecture"], "stable-diffusion-v1/lora");
    assert_eq!(meta["modelspec.title"], "my lora");
    Ok(())
}

#[test]
fn peft_round_trip_keeps_mixed_ranks_and_alphas() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("pytorch_lora_weights.safetensors");
    let model = Model::new();
    let adapter = adapter_for(&model, true)?;
    save_adapter(
        &path,
        &adapter,
        &model.with_te(),
        &options(AdapterFormat::Peft),
    )?;

    let raw = read_safetensors(&path, &Device::Cpu)?;
    assert_eq!(
        raw.tensors["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"].dims(),
        [4, 8, 1, 1]
    );
    assert!(raw
        .tensors
        .contains_key(&format!("text_encoder.{TE_ATTN}.q_proj.lora_B.weight")));
    assert!(raw.tensors.keys().all(|k| !k.ends_with(".alpha")));
    assert_eq!(raw.metadata["format"], "pt");
    let config: Value = serde_json::from_str(&raw.metadata["lora_adapter_metadata"])?;
    assert_eq!(config["unet.r"], json!(4));
    assert_eq!(config["unet.lora_alpha"], json!(8));
    assert_eq!(
        config["unet.rank_pattern"],
        json!({ format!("{BLOCK}.attn2.to_k"): 2 })
    );
    assert_eq!(
        config["unet.alpha_pattern"],
        json!({ format!("{BLOCK}.attn2.to_k"): 0.5 })
    );
    // Text-encoder names are written without the `text_model.` level (see peft_metadata).
    let te_q = format!("{TE_ATTN}.q_proj");
    assert_eq!(
        config["text_encoder.alpha_pattern"],
        json!({ te_q.strip_prefix("text_model.").unwrap(): 1 })
    );
    assert_eq!(
        config["unet.target_modules"].as_array().map(Vec::len),
        Some(5)
    );

    let file = AdapterFile::read(&path, &Device::Cpu)?;
    assert_eq!(file.format(), AdapterFormat::Peft);
    assert_same(&file.resolve(&model.with_te())?, &adapter)
}

#[test]
fn kohya_to_peft_to_kohya_is_lossless() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = Model::new();
    let adapter = adapter_for(&model, true)?;
    let mut current = adapter.clone();
    for (i, format) in [
        AdapterFormat::Kohya,
        AdapterFormat::Peft,
        AdapterFormat::Kohya,
    ]
    .into_iter()
    .enumerate()
    {
        let path = dir.path().join(format!("{i}.safetensors"));
        save_adapter(&path, &current, &model.with_te(), &options(format))?;
        current = AdapterFile::read(&path, &Device::Cpu)?.resolve(&model.with_te())?;
    }
    assert_same(&current, &adapter)
}

#[test]
fn kohya_alpha_defaults_to_rank_and_any_float_dtype_loads() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("old.safetensors");
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q";
    let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";
    let proj = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let tensors = vec![
        // No alpha at all (old files), f16 tensors.
        (
            format!("{q}.lora_down.weight"),
            matrix(2, 8)?.to_dtype(DType::F16)?,
        ),
        (
            format!("{q}.lora_up.weight"),
            matrix(8, 2)?.to_dtype(DType::F16)?,
        ),
        // Alpha 0 also means rank; bf16, one-element alpha.
        (
            format!("{k}.lora_down.weight"),
            matrix(3, 6)?.to_dtype(DType::BF16)?,
        ),
        (
            format!("{k}.lora_up.weight"),
            matrix(8, 3)?.to_dtype(DType::BF16)?,
        ),
        (
            format!("{k}.alpha"),
            Tensor::new(&[0f32], &Device::Cpu)?.to_dtype(DType::BF16)?,
        ),
        // 4-D 1×1 conv with a 0-d f16 alpha.
        (
            format!("{proj}.lora_down.weight"),
            matrix(2, 8)?.reshape((2, 8, 1, 1))?,
        ),
        (
            format!("{proj}.lora_up.weight"),
            matrix(8, 2)?.reshape((8, 2, 1, 1))?,
        ),
        (
            format!("{proj}.alpha"),
            Tensor::new(1.5f32, &Device::Cpu)?.to_dtype(DType::F16)?,
        ),
    ];
    write_raw(&path, tensors, BTreeMap::new())?;
    let model = Model::new();
    let adapter = AdapterFile::read(&path, &Device::Cpu)?.resolve(&model.unet_only())?;
    let to_q = &adapter.unet[&format!("{BLOCK}.attn2.to_q")];
    assert_eq!((to_q.alpha(), lora(to_q).down.dtype()), (2.0, DType::F32));
    assert_eq!(values(&lora(to_q).down)?, values(&matrix(2, 8)?)?);
    assert_eq!(adapter.unet[&format!("{BLOCK}.attn2.to_k")].alpha(), 3.0);
    let proj_in = &adapter.unet["down_blocks.0.attentions.0.proj_in"];
    assert_eq!(
        (proj_in.alpha(), lora(proj_in).up.dims()),
        (1.5, &[8, 2][..])
    );
    Ok(())
}

#[test]
fn peft_alpha_is_rank_unless_alpha_keys_say_otherwise() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let q = format!("unet.{BLOCK}.attn2.to_q");
    let k = format!("unet.{BLOCK}.attn2.to_k");
    let path = dir.path().join("p.safetensors");
    let tensors = vec![
        (format!("{q}.lora_A.weight"), matrix(2, 8)?),
        (format!("{q}.lora_B.weight"), matrix(8, 2)?),
        (format!("{k}.lora_A.weight"), matrix(2, 6)?),
        (format!("{k}.lora_B.weight"), matrix(8, 2)?),
        (format!("{k}.alpha"), Tensor::new(1f32, &Device::Cpu)?),
    ];
    write_raw(&path, tensors, BTreeMap::new())?;
    let adapter = AdapterFile::read(&path, &Device::Cpu)?.resolve(&Model::new().unet_only())?;
    assert_eq!(adapter.unet[&format!("{BLOCK}.attn2.to_q")].alpha(), 2.0);
    assert_eq!(adapter.unet[&format!("{BLOCK}.attn2.to_k")].alpha(), 1.0);
    Ok(())
}

/// A rank-2 PEFT file on to_q/to_k/to_out.0 with the given `lora_adapter_metadata`.
fn peft_file_with_config(dir: &Path, config: Value) -> Result<PathBuf> {
    let path = dir.join("meta.safetensors");
    let mut tensors = Vec::new();
    for (module, fan_in) in [("to_q", 8), ("to_k", 6), ("to_out.0", 8)] {
        tensors.push((
            format!("unet.{BLOCK}.attn2.{module}.lora_A.weight"),
            matrix(2, fan_in)?,
        ));
        tensors.push((
            format!("unet.{BLOCK}.attn2.{module}.lora_B.weight"),
            matrix(8, 2)?,
        ));
    }
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("lora_adapter_metadata".to_string(), config.to_string()),
    ]);
    write_raw(&path, tensors, metadata)?;
    Ok(path)
}

#[test]
fn lora_adapter_metadata_alpha_and_patterns_are_honoured() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = json!({
        "unet.r": 2,
        "unet.lora_alpha": 16,
        "unet.alpha_pattern": { "to_k": 4.0, format!("^{BLOCK}.attn2.to_out.0"): 0.5 },
        "unet.rank_pattern": {},
        "unet.target_modules": ["to_q", "to_k", "to_out.0"],
    });
    let path = peft_file_with_config(dir.path(), config)?;
    let adapter = AdapterFile::read(&path, &Device::Cpu)?.resolve(&Model::new().unet_only())?;
    let alpha = |m: &str| adapter.unet[&format!("{BLOCK}.attn2.{m}")].alpha();
    assert_eq!(
        (alpha("to_q"), alpha("to_k"), alpha("to_out.0")),
        (16.0, 4.0, 0.5)
    );
    Ok(())
}

#[test]
fn rslora_metadata_becomes_an_equivalent_alpha() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = peft_file_with_config(
        dir.path(),
        json!({ "unet.lora_alpha": 4, "unet.use_rslora": true }),
    )?;
    let file = AdapterFile::read(&path, &Device::Cpu)?;
    // alpha/√r with r = 2 is 4/√2, i.e. alpha 4·√2 under alpha/r.
    assert!(file
        .raw_modules()
        .iter()
        .all(|m| (m.alpha - 4.0 * 2f64.sqrt()).abs() < 1e-12));
    Ok(())
}

#[test]
fn inconsistent_or_unsupported_metadata_is_rejected() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases = [
        (
            json!({ "unet.r": 4, "unet.lora_alpha": 4 }),
            "has rank 2 but lora_adapter_metadata says 4",
        ),
        (
            json!({ "unet.r": 2, "unet.rank_pattern": { "to_k": 8 } }),
            "has rank 2 but lora_adapter_metadata says 8",
        ),
        (
            json!({ "unet.alpha_pattern": { ".*to_k": 1 } }),
            "regular expression",
        ),
        (
            json!({ "unet.use_dora": true }),
            "says use_dora, but the module has no lora_magnitude_vector",
        ),
    ];
    for (config, expected) in cases {
        let path = peft_file_with_config(dir.path(), config.clone())?;
        let msg = read_err(&path);
        assert!(
            msg.contains(expected) && msg.contains("meta.safetensors"),
            "{config}: {msg}"
        );
    }
    Ok(())
}

#[test]
fn old_diffusers_spellings_resolve_to_the_same_modules() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("old.safetensors");
    let attn2 = format!("unet.{BLOCK}.attn2");
    let tensors = vec![
        (
            format!("{attn2}.processor.to_q_lora.down.weight"),
            matrix(2, 8)?,
        ),
        (
            format!("{attn2}.processor.to_q_lora.up.weight"),
            matrix(8, 2)?,
        ),
        (
            format!("{attn2}.processor.to_out_lora.down.weight"),
            matrix(2, 8)?,
        ),
        (
            format!("{attn2}.processor.to_out_lora.up.weight"),
            matrix(8, 2)?,
        ),
        (format!("{attn2}.to_k.lora.down.weight"), matrix(2, 6)?),
        (format!("{attn2}.to_k.lora.up.weight"), matrix(8, 2)?),
        (
            format!("text_encoder.{TE_ATTN}.to_q_lora.down.weight"),
            matrix(2, 6)?,
        ),
        (
            format!("text_encoder.{TE_ATTN}.to_q_lora.up.weight"),
            matrix(6, 2)?,
        ),
        (
            format!("text_encoder.{TE_ATTN}.out_proj.lora_linear_layer.down.weight"),
            matrix(2, 6)?,
        ),
        (
            format!("text_encoder.{TE_ATTN}.out_proj.lora_linear_layer.up.weight"),
            matrix(6, 2)?,
        ),
        // transformers ≥ 5 layout: no `text_model` level.
        (
            "text_encoder.encoder.layers.0.mlp.fc1.lora_A.weight".to_string(),
            matrix(2, 6)?,
        ),
        (
            "text_encoder.encoder.layers.0.mlp.fc1.lora_B.weight".to_string(),
            matrix(12, 2)?,
        ),
    ];
    write_raw(&path, tensors, BTreeMap::new())?;
    let adapter = AdapterFile::read(&path, &Device::Cpu)?.resolve(&Model::new().with_te())?;
    let unet: Vec<&String> = adapter.unet.keys().collect();
    let expected_unet =
        ["attn2.to_k", "attn2.to_out.0", "attn2.to_q"].map(|m| format!("{BLOCK}.{m}"));
    assert_eq!(unet, expected_unet.iter().collect::<Vec<_>>());
    let te: Vec<&String> = adapter.text_encoder.keys().collect();
    let expected_te = [
        "text_model.encoder.layers.0.mlp.fc1".into(),
        format!("{TE_ATTN}.out_proj"),
        format!("{TE_ATTN}.q_proj"),
    ];
    assert_eq!(te, expected_te.iter().collect::<Vec<_>>());
    Ok(())
}

#[test]
fn models_without_the_text_model_level_still_resolve() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("a.safetensors");
    let model = Model::new();
    let adapter = adapter_for(&model, false)?;
    save_adapter(
        &path,
        &adapter,
        &model.with_te(),
        &options(AdapterFormat::Kohya),
    )?;
    let te5: Vec<ModuleInfo> = model
        .te
        .iter()
        .map(|m| ModuleInfo {
            path: m.path.trim_start_matches("text_model.").to_string(),
            ..m.clone()
        })
        .collect();
    let resolved = AdapterFile::read(&path, &Device::Cpu)?.resolve(&ModelModules {
        unet: &model.unet,
        text_encoder: Some(&te5),
        text_encoder_2: None,
    })?;
    assert!(resolved
        .text_encoder
        .contains_key("encoder.layers.0.mlp.fc1"));
    Ok(())
}

#[test]
fn text_encoder_modules_are_skipped_only_when_no_text_encoder_is_given() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("a.safetensors");
    let model = Model::new();
    save_adapter(
        &path,
        &adapter_for(&model, false)?,
        &model.with_te(),
        &options(AdapterFormat::Peft),
    )?;
    let file = AdapterFile::read(&path, &Device::Cpu)?;
    assert!(file.has_text_encoder());
    let unet_only = file.resolve(&model.unet_only())?;
    assert_eq!((unet_only.unet.len(), unet_only.text_encoder.len()), (5, 0));

    let fewer_te = &model.te[..1];
    let err = file
        .resolve(&ModelModules {
            unet: &model.unet,
            text_encoder: Some(fewer_te),
            text_encoder_2: None,
        })
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("2 adapter modules do not fit"), "{msg}");
    assert!(
        msg.contains(&format!("text_encoder.{TE_ATTN}.out_proj.lora_A.weight")),
        "{msg}"
    );

    let mut te_only = adapter_for(&model, false)?;
    te_only.unet.clear();
    save_adapter(
        &path,
        &te_only,
        &model.with_te(),
        &options(AdapterFormat::Kohya),
    )?;
    let err = AdapterFile::read(&path, &Device::Cpu)?
        .resolve(&model.unet_only())
        .unwrap_err();
    assert!(err.to_string().contains("no module applies"), "{err}");
    Ok(())
}

#[test]
fn resolution_lists_every_unknown_module_and_wrong_shape() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.safetensors");
    let prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2";
    let tensors = vec![
        // Fits.
        (format!("{prefix}_to_q.lora_down.weight"), matrix(2, 8)?),
        (format!("{prefix}_to_q.lora_up.weight"), matrix(8, 2)?),
        // to_k takes 6 inputs, not 8.
        (format!("{prefix}_to_k.lora_down.weight"), matrix(2, 8)?),
        (format!("{prefix}_to_k.lora_up.weight"), matrix(8, 2)?),
        // No such modules in the model.
        (format!("{prefix}_to_v.lora_down.weight"), matrix(2, 8)?),
        (format!("{prefix}_to_v.lora_up.weight"), matrix(8, 2)?),
        (
            "lora_unet_up_blocks_1_attentions_0_proj_out.lora_down.weight".into(),
            matrix(2, 8)?,
        ),
        (
            "lora_unet_up_blocks_1_attentions_0_proj_out.lora_up.weight".into(),
            matrix(8, 2)?,
        ),
    ];
    write_raw(&path, tensors, BTreeMap::new())?;
    let err = AdapterFile::read(&path, &Device::Cpu)?
        .resolve(&Model::new().unet_only())
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("bad.safetensors: 3 adapter modules do not fit"),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("`{prefix}_to_v.lora_down.weight`: no UNet module")),
        "{msg}"
    );
    assert!(
        msg.contains(
            "`lora_unet_up_blocks_1_attentions_0_proj_out.lora_down.weight`: no UNet module"
        ),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("`{prefix}_to_k.lora_down.weight`")),
        "{msg}"
    );
    assert!(msg.contains("expected down [r, 6], up [8, r]"), "{msg}");
    assert!(!msg.contains("_to_q"), "{msg}");
    Ok(())
}

#[test]
fn saving_checks_the_adapter_against_the_model() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("a.safetensors");
    let model = Model::new();
    let mut adapter = adapter_for(&model, false)?;
    adapter.unet.insert(
        "mid_block.attentions.0.proj_out".into(),
        lora_for(&model.unet[1], 2, 2.0)?.into(),
    );
    let err = save_adapter(
        &path,
        &adapter,
        &model.with_te(),
        &options(AdapterFormat::Kohya),
    )
    .unwrap_err();
    assert!(
        format!("{err:#}")
            .contains("`mid_block.attentions.0.proj_out` is not a module of the model"),
        "{err:#}"
    );
    assert!(!path.exists());

    let with_te = adapter_for(&model, false)?;
    let err = save_adapter(
        &path,
        &with_te,
        &model.unet_only(),
        &options(AdapterFormat::Peft),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!(
            "text encoder module `{TE_ATTN}.q_proj` is not a module"
        )),
        "{msg}"
    );
    Ok(())
}

#[test]
fn corrupt_and_foreign_files_are_rejected_naming_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = Model::new();
    let good = dir.path().join("good.safetensors");
    save_adapter(
        &good,
        &adapter_for(&model, false)?,
        &model.with_te(),
        &options(AdapterFormat::Kohya),
    )?;
    let bytes = std::fs::read(&good)?;
    let truncated = dir.path().join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
    let pickle = dir.path().join("pickle.safetensors");
    std::fs::write(&pickle, b"\x80\x02}q\x00(X\x05\x00\x00\x00torch")?;
    for (path, expected) in [
        (truncated, "not a valid safetensors"),
        (pickle, "PyTorch pickle file"),
    ] {
        let msg = read_err(&path);
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains(expected),
            "{msg}"
        );
    }
    Ok(())
}

#[test]
fn files_of_no_adapter_layout_list_offending_keys() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.safetensors");
    let tensors = (0..8)
        .map(|i| Ok((format!("model.diffusion_model.w{i}"), matrix(2, 2)?)))
        .collect::<Result<_>>()?;
    write_raw(&path, tensors, BTreeMap::new())?;
    let msg = read_err(&path);
    assert!(
        msg.contains("not a LoRA adapter") && msg.contains("`model.diffusion_model.w0`"),
        "{msg}"
    );
    assert!(msg.contains("and 3 more"), "{msg}");

    let mixed = dir.path().join("mixed.safetensors");
    let q = format!("{BLOCK}.attn2.to_q");
    let tensors = vec![
        (format!("unet.{q}.lora_A.weight"), matrix(2, 8)?),
        ("lora_unet_x.lora_down.weight".to_string(), matrix(2, 8)?),
    ];
    write_raw(&mixed, tensors, BTreeMap::new())?;
    assert!(read_err(&mixed).contains("mixes kohya keys"));

    let unknown = dir.path().join("unknown.safetensors");
    let tensors = vec![
        (format!("unet.{q}.lora_A.weight"), matrix(2, 8)?),
        (format!("unet.{q}.lora_B.weight"), matrix(8, 2)?),
        ("unet.conv_in.weight".to_string(), matrix(2, 2)?),
    ];
    write_raw(&unknown, tensors, BTreeMap::new())?;
    let msg = read_err(&unknown);
    assert!(
        msg.contains("no LoRA tensor of the peft layout: `unet.conv_in.weight`"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn lycoris_files_are_rejected_by_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q";
    let cases = [(
        vec![
            format!("{name}.lora_down.weight"),
            format!("{name}.lora_up.weight"),
            format!("{name}.lora_mid.weight"),
        ],
        "lora_mid",
    )];
    for (keys, algorithm) in cases {
        let path = dir.path().join("lycoris.safetensors");
        let tensors = keys
            .iter()
            .map(|k| Ok((k.clone(), matrix(2, 2)?)))
            .collect::<Result<_>>()?;
        write_raw(&path, tensors, BTreeMap::new())?;
        let msg = read_err(&path);
        assert!(
            msg.contains("not supported here") && msg.contains(algorithm),
            "{algorithm}: {msg}"
        );
    }
    Ok(())
}

#[test]
fn malformed_modules_are_all_listed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("m.safetensors");
    let tensors = vec![
        ("lora_unet_a.lora_down.weight".to_string(), matrix(2, 8)?),
        ("lora_unet_b.lora_up.weight".to_string(), matrix(8, 2)?),
        (
            "lora_unet_c.alpha".to_string(),
            Tensor::new(1f32, &Device::Cpu)?,
        ),
        ("lora_unet_d.lora_down.weight".to_string(), matrix(2, 8)?),
        ("lora_unet_d.lora_up.weight".to_string(), matrix(8, 3)?),
        (
            "lora_unet_e.lora_down.weight".to_string(),
            matrix(2, 72)?.reshape((2, 8, 3, 3))?,
        ),
        (
            "lora_unet_e.lora_up.weight".to_string(),
            matrix(8, 18)?.reshape((8, 2, 3, 3))?,
        ),
        ("lora_unet_f.lora_down.weight".to_string(), matrix(2, 8)?),
        ("lora_unet_f.lora_up.weight".to_string(), matrix(8, 2)?),
        ("lora_unet_f.alpha".to_string(), matrix(1, 2)?),
    ];
    write_raw(&path, tensors, BTreeMap::new())?;
    let msg = read_err(&path);
    for expected in [
        "m.safetensors: 6 malformed LoRA modules",
        "`lora_unet_a.lora_down.weight` has no matching up tensor",
        "`lora_unet_b.lora_up.weight` has no matching down tensor",
        "`lora_unet_c.alpha` is an alpha without down/up tensors",
        "disagree on the rank",
        "`lora_unet_e.lora_up.weight`: the up tensor of a conv LoRA must be [out, r, 1, 1]",
        "`lora_unet_f.alpha` must be a scalar, got shape [1, 2]",
    ] {
        assert!(msg.contains(expected), "missing `{expected}` in: {msg}");
    }
    Ok(())
}

#[test]
fn conv_3x3_adapters_resolve_only_against_conv_modules() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("locon.safetensors");
    let conv = "down_blocks.0.resnets.0.conv1";
    let tensors = vec![
        (
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight".to_string(),
            matrix(2, 72)?.reshape((2, 8, 3, 3))?,
        ),
        (
            "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight".to_string(),
            matrix(4, 2)?.reshape((4, 2, 1, 1))?,
        ),
        (
            "lora_unet_down_blocks_0_resnets_0_conv1.alpha".to_string(),
            Tensor::new(1f32, &Device::Cpu)?,
        ),
    ];
    write_raw(&path, tensors, BTreeMap::new())?;
    let file = AdapterFile::read(&path, &Device::Cpu)?;
    assert_eq!(file.raw_modules()[0].kernel, Some((3, 3)));
    assert_eq!(file.raw_modules()[0].down.dims(), [2, 72]);
    // The runtime UNet enumerates no 3×3 conv: a clear error, even when unmatched modules
    // would only be warned about.
    let unet = unet_modules();
    let runtime = ModelModules::unet_only(&unet);
    for msg in [
        format!("{:#}", file.resolve(&runtime).unwrap_err()),
        format!(
            "{:#}",
            file.resolve_allowing_unmatched(&runtime).unwrap_err()
        ),
    ] {
        assert!(
            msg.contains("3×3 conv adapter") && msg.contains("lora-merge"),
            "{msg}"
        );
    }
    // A model that enumerates the conv (lora-merge) resolves it; ΔW is [out, in·3·3].
    let mut wide = unet_modules();
    wide.push(ModuleInfo {
        path: conv.to_string(),
        kind: ModuleKind::Conv { kh: 3, kw: 3 },
        in_features: 72,
        out_features: 4,
    });
    let model = ModelModules::unet_only(&wide);
    let adapter = file.resolve(&model)?;
    assert_eq!(adapter.unet[conv].delta_weight()?.dims(), [4, 72]);
    // Saved again, the kernel shapes come back.
    let out = dir.path().join("again.safetensors");
    save_adapter(&out, &adapter, &model, &options(AdapterFormat::Kohya))?;
    let stored = read_safetensors(&out, &Device::Cpu)?.tensors;
    assert_eq!(
        stored["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].dims(),
        [2, 8, 3, 3]
    );
    assert_eq!(
        stored["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].dims(),
        [4, 2, 1, 1]
    );
    // A 3×3 adapter on a module the model has as Linear is a misfit naming both.
    let mut linear = unet_modules();
    linear.push(info(conv, ModuleKind::Linear, 72, 4));
    let model = ModelModules::unet_only(&linear);
    let msg = format!("{:#}", file.resolve(&model).unwrap_err());
    assert!(msg.contains("is for a 3×3 conv"), "{msg}");
    Ok(())
}

#[test]
fn raw_modules_need_no_model() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("a.safetensors");
    let model = Model::new();
    let adapter = adapter_for(&model, true)?;
    save_adapter(
        &path,
        &adapter,
        &model.with_te(),
        &options(AdapterFormat::Kohya),
    )?;
    let file = AdapterFile::read(&path, &Device::Cpu)?;
    let raw = file.raw_modules();
    assert_eq!(raw.len(), 8);
    let to_k = raw
        .iter()
        .find(|m| m.name == "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k")
        .unwrap();
    assert_eq!(
        (to_k.component, to_k.rank(), to_k.alpha),
        (Component::Unet, 2, 0.5)
    );
    assert_eq!(
        values(&to_k.down)?,
        values(&lora(&adapter.unet[&format!("{BLOCK}.attn2.to_k")]).down)?
    );
    assert_eq!(to_k.up.i((.., 0))?.dims(), [8]);
    Ok(())
}

/// The diffusers-made fixtures (tests/fixtures, see tests/reference/make_fixtures.py) resolve
/// against modules enumerated from the fixture model's own weight files, and the kohya one
/// is rewritten key for key, shape for shape.
#[test]
fn reference_fixtures_resolve_against_the_fixture_model() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/sd1-tiny");
    let unet = crate::formats::keys::modules_from_weights(
        Component::Unet,
        &[dir.join("unet/diffusion_pytorch_model.safetensors")],
    )?;
    let te = crate::formats::keys::modules_from_weights(
        Component::TextEncoder,
        &[dir.join("text_encoder/model.safetensors")],
    )?;
    let model = ModelModules {
        unet: &unet,
        text_encoder: Some(&te),
        text_encoder_2: None,
    };
    assert_eq!((unet.len(), te.len()), (84, 12));

    let kohya_path = dir.join("adapter_kohya.safetensors");
    let kohya = AdapterFile::read(&kohya_path, &Device::Cpu)?;
    assert_eq!(kohya.format(), AdapterFormat::Kohya);
    let adapter = kohya.resolve(&model)?;
    assert_eq!((adapter.unet.len(), adapter.text_encoder.len()), (84, 12));
    assert!(adapter
        .unet
        .values()
        .all(|m| m.alpha() == 2.0 && m.rank() == 4));
    assert!(adapter.text_encoder.values().all(|m| m.alpha() == 4.0));

    let out_dir = tempfile::tempdir()?;
    let rewritten = out_dir.path().join("kohya.safetensors");
    save_adapter(&rewritten, &adapter, &model, &options(AdapterFormat::Kohya))?;
    let (ours, theirs) = (
        read_safetensors(&rewritten, &Device::Cpu)?,
        read_safetensors(&kohya_path, &Device::Cpu)?,
    );
    assert_eq!(
        ours.tensors.keys().collect::<Vec<_>>(),
        theirs.tensors.keys().collect::<Vec<_>>()
    );
    for (key, t) in &theirs.tensors {
        let mine = &ours.tensors[key];
        assert_eq!((mine.dims(), mine.dtype()), (t.dims(), t.dtype()), "{key}");
        let flat = |x: &Tensor| x.flatten_all().and_then(|x| x.to_vec1::<f32>());
        assert_eq!(flat(mine)?, flat(t)?, "{key}");
    }

    let peft = AdapterFile::read(&dir.join("adapter_attn-mlp_peft.safetensors"), &Device::Cpu)?;
    assert_eq!(peft.format(), AdapterFormat::Peft);
    let adapter = peft.resolve(&model)?;
    assert_eq!((adapter.unet.len(), adapter.text_encoder.len()), (84, 0));
    // r = 4, lora_alpha = 8 come from lora_adapter_metadata, not from the alpha = rank default.
    assert!(adapter
        .unet
        .values()
        .all(|m| m.alpha() == 8.0 && m.rank() == 4));
    Ok(())
}

#[test]
fn format_names_parse() {
    assert_eq!(
        "kohya".parse::<AdapterFormat>().unwrap(),
        AdapterFormat::Kohya
    );
    assert_eq!(
        "peft".parse::<AdapterFormat>().unwrap(),
        AdapterFormat::Peft
    );
    assert!("diffusers"
        .parse::<AdapterFormat>()
        .unwrap_err()
        .to_string()
        .contains("expected kohya or peft"));
}

/// LyCORIS' `wd_on_output=False` DoRA keeps one magnitude per input channel (`[1, in]`): refused
/// naming the key, not read as if it were per output channel.
#[test]
fn dora_magnitudes_per_input_channel_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("dora.safetensors");
    let name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q";
    let tensors = vec![
        (format!("{name}.lora_down.weight"), matrix(2, 3)?),
        (format!("{name}.lora_up.weight"), matrix(5, 2)?),
        (format!("{name}.dora_scale"), matrix(1, 3)?),
    ];
    write_raw(&path, tensors, BTreeMap::new())?;
    let msg = read_err(&path);
    assert!(
        msg.contains(&format!("`{name}.dora_scale` has shape [1, 3]"))
            && msg.contains("wd_on_output=False"),
        "{msg}"
    );
    Ok(())
}
