//! `lora-merge` with LyCORIS-style adapters on sd1-tiny, against the reference fixtures of
//! tests/reference/make_merge_fixtures.py (`--lycoris`):
//! - LoCon (kohya `conv_dim`: 3×3 resnet and sampler convs, `conv_shortcut`, `time_emb_proj`):
//!   diffusers `load_lora_weights` + `fuse_lora`.
//! - LoHa and LoKr: `lycoris.functional.{loha,lokr}.diff_weight`, the reference implementation.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{Device, Tensor};
use common::{fixtures, max_abs_diff};
use lora_toolkit::core::formats::ldm::ModelPart;
use lora_toolkit::core::options::AdapterSpec;
use lora_toolkit::merge::base_model::BaseModel;
use lora_toolkit::merge::{merge, MergeOptions};

/// f32 merges must match the reference this closely.
const TOLERANCE: f32 = 1e-5;
const CFG: &str = "sd1-tiny";

fn load(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(path, &Device::Cpu)?)
}

fn merge_dir() -> PathBuf {
    fixtures().join(CFG).join("merge")
}

fn merged(adapter: &str, weight: f64, out: &Path) -> Result<usize> {
    let report = merge(&MergeOptions {
        base: fixtures().join(CFG),
        adapters: vec![AdapterSpec {
            path: merge_dir().join(adapter),
            scale: weight,
        }],
        output: out.to_path_buf(),
        dtype: None,
        allow_unmatched: false,
        allow_nonfinite: false,
    })?;
    Ok(report.tensors_changed)
}

/// Largest difference between the merged checkpoint and the expected tensors
/// (`unet.<name>` / `text_encoder.<name>`).
fn compare(out: &Path, expected: &Path) -> Result<f32> {
    let merged = BaseModel::open(out)?;
    let expected_tensors = load(expected)?;
    assert!(
        !expected_tensors.is_empty(),
        "{} holds no tensors",
        expected.display()
    );
    let mut worst = 0f32;
    for (key, want) in expected_tensors {
        let (part, name) = match key.split_once('.') {
            Some(("unet", name)) => (ModelPart::Unet, name),
            Some(("text_encoder", name)) => (ModelPart::TextEncoder, name),
            _ => panic!("unexpected fixture key `{key}`"),
        };
        let ours = merged.load_f32(part, name)?.reshape(want.dims())?;
        worst = worst.max(max_abs_diff(&ours, &want));
    }
    Ok(worst)
}

#[test]
fn locon_3x3_conv_adapter_matches_diffusers_fuse_lora() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("merged");
    let changed = merged("adapter_locon.safetensors", 0.8, &out)?;
    let expected = merge_dir().join("expected_locon.safetensors");
    assert_eq!(changed, load(&expected)?.len());
    let err = compare(&out, &expected)?;
    println!("LoCon at 0.8: max |ours - fuse_lora| = {err:.2e}");
    assert!(err <= TOLERANCE, "{err}");
    Ok(())
}

#[test]
fn locon_adapters_go_through_resize_and_svd_keeping_their_kernels() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let input = merge_dir().join("adapter_locon.safetensors");
    // At each module's own rank (≤ 4) both re-factorings are exact.
    let resized = dir.path().join("resized.safetensors");
    lora_toolkit::merge::resize(&input, Some(4), None, &resized)?;
    let svd = dir.path().join("svd.safetensors");
    let spec = AdapterSpec {
        path: input.clone(),
        scale: 1.0,
    };
    lora_toolkit::merge::svd_merge(&[spec], 4, None, &svd)?;
    let original = load(&input)?;
    for file in [&resized, &svd] {
        let stored = load(file)?;
        let down = "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight";
        let up = "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight";
        assert_eq!(stored[down].dims()[1..], original[down].dims()[1..]);
        assert_eq!(stored[up].dims()[1..], [stored[down].dims()[0], 1, 1]);
        let out = dir.path().join(format!(
            "merged-{}",
            file.file_stem().unwrap().to_string_lossy()
        ));
        merge(&MergeOptions {
            base: fixtures().join(CFG),
            adapters: vec![AdapterSpec {
                path: file.to_path_buf(),
                scale: 0.8,
            }],
            output: out.clone(),
            dtype: None,
            allow_unmatched: false,
            allow_nonfinite: false,
        })?;
        let err = compare(&out, &merge_dir().join("expected_locon.safetensors"))?;
        println!("{}: max |ours - fuse_lora| = {err:.2e}", file.display());
        assert!(err <= TOLERANCE, "{err}");
    }
    let inspection = lora_toolkit::merge::inspect(&input)?;
    assert_eq!(inspection.unet_modules, 7);
    Ok(())
}

#[test]
fn loha_and_lokr_match_the_lycoris_reference() -> Result<()> {
    for (adapter, expected, weight) in [
        ("adapter_loha.safetensors", "expected_loha.safetensors", 1.0),
        ("adapter_lokr.safetensors", "expected_lokr.safetensors", 0.5),
    ] {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("merged");
        let changed = merged(adapter, weight, &out)?;
        let expected = merge_dir().join(expected);
        assert_eq!(changed, load(&expected)?.len(), "{adapter}");
        let err = compare(&out, &expected)?;
        println!("{adapter} at {weight}: max |ours - lycoris| = {err:.2e}");
        assert!(err <= TOLERANCE, "{adapter}: {err}");
    }
    Ok(())
}

/// The adapter reader takes LoHa/LoKr files too, so lora-infer and lora-train attach them
/// unmerged: the UNet with the file attached at a weight equals the UNet lora-merge folded it
/// into (which `loha_and_lokr_match_the_lycoris_reference` checks against LyCORIS' merge).
#[test]
fn loha_and_lokr_attached_unmerged_equal_the_merge() -> Result<()> {
    use lora_toolkit::core::models::config::UNetConfig;
    use lora_toolkit::core::{AdapterFile, ModelModules, UNet2DConditionModel};
    let base = fixtures().join(CFG);
    let config = UNetConfig::from_file(&base.join("unet/config.json"))?;
    let weights = |root: &Path| vec![root.join("unet/diffusion_pytorch_model.safetensors")];
    let load_unet = |root: &Path| {
        UNet2DConditionModel::from_files(
            &config,
            &weights(root),
            candle_core::DType::F32,
            &Device::Cpu,
        )
    };
    let exp = common::expected(CFG)?;
    let run = |unet: &UNet2DConditionModel| {
        unet.forward(
            common::get(&exp, "sample"),
            common::get(&exp, "timestep"),
            common::get(&exp, "encoder_hidden_states"),
        )
    };
    for (adapter, weight) in [
        ("adapter_loha.safetensors", 1.0),
        ("adapter_lokr.safetensors", 0.5),
    ] {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("merged");
        merged(adapter, weight, &out)?;
        let mut attached = load_unet(&base)?;
        let file = AdapterFile::read(&merge_dir().join(adapter), &Device::Cpu)?;
        let resolved = file.resolve(&ModelModules::unet_only(&attached.adapter_modules()))?;
        attached.attach_adapter(adapter, &resolved.unet, weight)?;
        let (ours, reference) = (run(&attached)?, run(&load_unet(&out)?)?);
        let err = max_abs_diff(&ours, &reference);
        let scale = common::max_abs(&reference);
        println!("{adapter} at {weight}: attached vs merged UNet, max diff {err:.2e}");
        assert!(err <= 1e-4 * scale.max(1.0), "{adapter}: {err}");
    }
    Ok(())
}

#[test]
fn tucker_factors_and_foreign_keys_are_rejected_by_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let original = load(&merge_dir().join("adapter_loha.safetensors"))?;
    let name = "lora_unet_down_blocks_0_resnets_0_conv1";
    for (extra, expected) in [
        (format!("{name}.hada_t1"), "Tucker decomposition"),
        (format!("{name}.dora_scale"), "DoRA"),
        (format!("{name}.hada_x"), "no LoHa/LoKr tensor"),
    ] {
        let mut tensors = original.clone();
        tensors.insert(
            extra.clone(),
            Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu)?,
        );
        let path = dir.path().join("bad.safetensors");
        candle_core::safetensors::save(&tensors, &path)?;
        let out = dir.path().join("out");
        let err = merge(&MergeOptions {
            base: fixtures().join(CFG),
            adapters: vec![AdapterSpec {
                path: path.clone(),
                scale: 1.0,
            }],
            output: out.clone(),
            dtype: None,
            allow_unmatched: false,
            allow_nonfinite: false,
        })
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(expected) && msg.contains(&extra), "{msg}");
        assert!(!out.exists());
    }
    // A module for another model: listed with both shapes.
    let mut tensors = original.clone();
    let w1a = format!("{name}.hada_w1_a");
    let w2a = format!("{name}.hada_w2_a");
    tensors.insert(w1a.clone(), tensors[&w1a].repeat((2, 1))?);
    tensors.insert(w2a.clone(), tensors[&w2a].repeat((2, 1))?);
    let path = dir.path().join("wide.safetensors");
    candle_core::safetensors::save(&tensors, &path)?;
    let err = merged_err(&path, dir.path())?;
    assert!(
        err.contains("the loha ΔW is [32, 144]") && err.contains("is [16, 144]"),
        "{err}"
    );
    Ok(())
}

fn merged_err(path: &Path, dir: &Path) -> Result<String> {
    let err = merge(&MergeOptions {
        base: fixtures().join(CFG),
        adapters: vec![AdapterSpec {
            path: path.to_path_buf(),
            scale: 1.0,
        }],
        output: dir.join("never"),
        dtype: None,
        allow_unmatched: false,
        allow_nonfinite: false,
    })
    .unwrap_err();
    Ok(format!("{err:#}"))
}

#[test]
fn inspect_reports_locon_loha_and_lokr_files() -> Result<()> {
    let locon = lora_toolkit::merge::inspect(&merge_dir().join("adapter_locon.safetensors"))?;
    assert_eq!(locon.format, "kohya");
    for target in ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "to_q"] {
        assert!(locon.targets.contains(target), "{:?}", locon.targets);
    }
    let loha = lora_toolkit::merge::inspect(&merge_dir().join("adapter_loha.safetensors"))?;
    assert_eq!(loha.format, "lycoris-loha");
    assert_eq!((loha.unet_modules, loha.text_encoder_modules), (2, 1));
    assert_eq!(loha.ranks, [(2, 2), (3, 1)].into());
    let lokr = lora_toolkit::merge::inspect(&merge_dir().join("adapter_lokr.safetensors"))?;
    assert_eq!(lokr.format, "lycoris-lokr");
    assert_eq!(lokr.ranks, [(0, 1), (2, 3)].into());
    Ok(())
}

#[test]
fn a_module_set_without_convs_rejects_3x3_locon_modules_pointing_to_lora_merge() -> Result<()> {
    use lora_toolkit::core::formats::keys::{modules_from_weights, Component};
    // The Linear/1×1 set of the transformer models (what a tool that adapts only those resolves
    // against).
    let unet = modules_from_weights(
        Component::Unet,
        &[fixtures()
            .join(CFG)
            .join("unet/diffusion_pytorch_model.safetensors")],
    )?;
    let model = lora_toolkit::core::ModelModules::unet_only(&unet);
    let file = lora_toolkit::core::AdapterFile::read(
        &merge_dir().join("adapter_locon.safetensors"),
        &Device::Cpu,
    )?;
    let msg = format!("{:#}", file.resolve(&model).unwrap_err());
    assert!(
        msg.contains("3×3 conv adapter") && msg.contains("lora-merge"),
        "{msg}"
    );
    Ok(())
}

/// A kohya LoCon file attached unmerged to the runtime UNet (3×3 resnet and sampler convs,
/// `conv_shortcut`, `time_emb_proj`, an attention Linear: what lora-infer does without `--fuse`)
/// runs as the UNet whose weights diffusers' `load_lora_weights` + `fuse_lora(0.8)` changed.
#[test]
fn a_locon_file_attached_unmerged_equals_diffusers_fused_weights() -> Result<()> {
    use lora_toolkit::core::source::ModelFolder;
    use lora_toolkit::core::{AdapterFile, ModelModules, Rng, UNet2DConditionModel};
    let folder = ModelFolder::open(&fixtures().join(CFG))?;
    let config = folder.unet_config()?;
    let scale = 0.8;
    let modules = UNet2DConditionModel::adapter_modules_of(&config)?;
    let adapter = AdapterFile::read(&merge_dir().join("adapter_locon.safetensors"), &Device::Cpu)?
        .resolve(&ModelModules::unet_only(&modules))?;
    assert!(adapter.unet.len() >= 6, "{:?}", adapter.unet.keys());
    let mut attached = folder.load_unet(&config, candle_core::DType::F32, &Device::Cpu)?;
    attached.attach_adapter("locon", &adapter.unet, scale)?;

    // diffusers' fused tensors, as deltas over the base weights.
    let base = load(
        &fixtures()
            .join(CFG)
            .join("unet/diffusion_pytorch_model.safetensors"),
    )?;
    let fused = load(&merge_dir().join("expected_locon.safetensors"))?;
    assert_eq!(fused.len(), adapter.unet.len());
    let deltas = fused
        .iter()
        .map(|(key, merged)| {
            let name = key.strip_prefix("unet.").expect("unet. key");
            Ok((name.to_string(), (merged - &base[name])?))
        })
        .collect::<Result<_>>()?;
    let vb = folder.unet_var_builder(candle_core::DType::F32, &Device::Cpu, deltas)?;
    let reference = UNet2DConditionModel::load(&config, &vb)?;

    let mut rng = Rng::new(11);
    let sample = rng.normal_tensor((2, 4, 16, 16), &Device::Cpu)?;
    let context = rng.normal_tensor((2, 7, config.cross_attention_dim), &Device::Cpu)?;
    let t = Tensor::new(&[100f32, 800.], &Device::Cpu)?;
    let ours = attached.forward(&sample, &t, &context)?;
    let theirs = reference.forward(&sample, &t, &context)?;
    let base_out = folder
        .load_unet(&config, candle_core::DType::F32, &Device::Cpu)?
        .forward(&sample, &t, &context)?;
    let err = max_abs_diff(&ours, &theirs) / common::max_abs(&theirs);
    let effect = max_abs_diff(&base_out, &theirs) / common::max_abs(&theirs);
    println!(
        "LoCon attached vs diffusers fused: {err:.2e} (the adapter moves the output {effect:.2e})"
    );
    assert!(effect > 1e-3, "the adapter changes nothing: {effect}");
    assert!(
        err <= TOLERANCE,
        "attached LoCon differs from the fused weights by {err}"
    );
    Ok(())
}

/// LyCORIS' `full` preset also adapts `conv_in` (and `conv_out`, the time embedding), which the
/// runtime UNet does not: resolving such a file for lora-infer says to fold it with lora-merge.
#[test]
fn conv_in_adapters_point_to_lora_merge_at_run_time() -> Result<()> {
    use lora_toolkit::core::source::ModelFolder;
    use lora_toolkit::core::{AdapterFile, ModelModules, UNet2DConditionModel};
    let folder = ModelFolder::open(&fixtures().join(CFG))?;
    let config = folder.unet_config()?;
    let out_ch = config.block_out_channels[0];
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("full.safetensors");
    let zeros = |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu);
    let tensors = HashMap::from([
        (
            "lora_unet_conv_in.lora_down.weight".to_string(),
            zeros(&[2, config.in_channels, 3, 3])?,
        ),
        (
            "lora_unet_conv_in.lora_up.weight".to_string(),
            zeros(&[out_ch, 2, 1, 1])?,
        ),
        (
            "lora_unet_conv_in.alpha".to_string(),
            Tensor::new(2f32, &Device::Cpu)?,
        ),
    ]);
    candle_core::safetensors::save(&tensors, &path)?;
    let modules = UNet2DConditionModel::adapter_modules_of(&config)?;
    let err = AdapterFile::read(&path, &Device::Cpu)?
        .resolve(&ModelModules::unet_only(&modules))
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("conv_in") && msg.contains("lora-merge"),
        "{msg}"
    );
    Ok(())
}
