//! `svd`, `resize` and `extract` against reference values: singular values from
//! `torch.linalg.svdvals` (tests/fixtures/<cfg>/merge/singular_values_kohya.safetensors) and
//! weights fused by diffusers.

mod common;

use std::collections::HashMap;
use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::{fixtures, max_abs_diff, CONFIGS};
use lora_toolkit::core::formats::keys::{kohya_name, Component};
use lora_toolkit::core::options::AdapterSpec;
use lora_toolkit::merge::{extract, merge, resize, svd_merge, DynamicRank, MergeOptions};

/// ΔW = alpha/rank · up·down of every module of a kohya file, keyed by module name.
fn kohya_deltas(path: &Path) -> Result<HashMap<String, Tensor>> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
    let mut deltas = HashMap::new();
    for (key, down) in &tensors {
        let Some(name) = key.strip_suffix(".lora_down.weight") else {
            continue;
        };
        let down = down.to_dtype(DType::F64)?.flatten_from(1)?;
        let up = tensors[&format!("{name}.lora_up.weight")]
            .to_dtype(DType::F64)?
            .flatten_from(1)?;
        let alpha = tensors[&format!("{name}.alpha")]
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let scale = alpha / down.dim(0)? as f64;
        deltas.insert(name.to_string(), (up.matmul(&down)? * scale)?);
    }
    Ok(deltas)
}

fn frobenius(t: &Tensor) -> Result<f64> {
    Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt())
}

fn reference_singular_values(cfg: &str) -> Result<HashMap<String, Vec<f64>>> {
    let path = fixtures()
        .join(cfg)
        .join("merge/singular_values_kohya.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)?
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_vec1::<f64>()?)))
        .collect()
}

fn kohya(cfg: &str, weight: f64) -> AdapterSpec {
    AdapterSpec {
        path: fixtures().join(cfg).join("adapter_kohya.safetensors"),
        scale: weight,
    }
}

#[test]
fn svd_of_one_adapter_at_its_rank_reproduces_it() -> Result<()> {
    for cfg in CONFIGS {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("svd.safetensors");
        let report = svd_merge(&[kohya(cfg, 1.0)], 4, None, &out)?;
        assert!((report.energy_kept() - 1.0).abs() < 1e-9);
        let original = kohya_deltas(&kohya(cfg, 1.0).path)?;
        let result = kohya_deltas(&out)?;
        assert_eq!(result.len(), original.len());
        assert!(
            !original.is_empty(),
            "{cfg}: the adapter has no modules to compare"
        );
        let mut worst = 0f32;
        for (name, delta) in &original {
            worst = worst.max(max_abs_diff(&result[name], delta));
        }
        // Singular values: the kept up columns have norm σ (down rows are orthonormal).
        let tensors = candle_core::safetensors::load(&out, &Device::Cpu)?;
        let reference = reference_singular_values(cfg)?;
        assert_eq!(
            reference.len(),
            original.len(),
            "{cfg}: singular values per module"
        );
        let mut worst_sigma = 0f64;
        for (name, sigma) in &reference {
            let up = tensors[&format!("{name}.lora_up.weight")]
                .to_dtype(DType::F64)?
                .flatten_from(1)?;
            let norms = up.sqr()?.sum(0)?.sqrt()?.to_vec1::<f64>()?;
            assert!(!norms.is_empty() && norms.len() <= sigma.len(), "{name}");
            for (ours, theirs) in norms.iter().zip(sigma) {
                let error = (ours - theirs).abs() / sigma[0];
                assert!(error.is_finite(), "{name}: σ error {error}");
                worst_sigma = worst_sigma.max(error);
            }
        }
        println!("{cfg}: svd at own rank: max |ΔW' - ΔW| = {worst:.2e}, max rel σ error vs torch = {worst_sigma:.2e}");
        assert!(
            worst <= 1e-5 && worst_sigma <= 1e-5,
            "{cfg}: {worst} {worst_sigma}"
        );
    }
    Ok(())
}

#[test]
fn svd_of_two_weighted_adapters_equals_their_fused_sum() -> Result<()> {
    for cfg in CONFIGS {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("svd.safetensors");
        let spec = |file: &str, weight| AdapterSpec {
            path: fixtures().join(cfg).join(file),
            scale: weight,
        };
        svd_merge(
            &[
                spec("adapter_two_a_peft.safetensors", 0.5),
                spec("adapter_two_b_peft.safetensors", 0.7),
            ],
            64,
            None,
            &out,
        )?;
        let deltas = kohya_deltas(&out)?;
        // Reference ΔW: diffusers' fused weights minus the base weights.
        let fused = candle_core::safetensors::load(
            fixtures().join(cfg).join("merge/expected_two.safetensors"),
            &Device::Cpu,
        )?;
        let base = candle_core::safetensors::load(
            fixtures()
                .join(cfg)
                .join("unet/diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )?;
        assert!(!fused.is_empty(), "{cfg}: the reference fused nothing");
        let mut worst = 0f32;
        for (key, w) in &fused {
            let name = key
                .strip_prefix("unet.")
                .expect("two adapters are UNet-only");
            let path = name.strip_suffix(".weight").unwrap();
            let reference = (w - &base[name])?;
            let ours = deltas[&kohya_name(Component::Unet, path, false)]
                .to_dtype(DType::F32)?
                .reshape(reference.dims())?;
            worst = worst.max(max_abs_diff(&ours, &reference));
        }
        println!("{cfg}: svd of two adapters vs fused sum: max diff {worst:.2e}");
        assert!(worst <= 1e-5, "{cfg}: {worst}");
    }
    Ok(())
}

#[test]
fn resize_error_equals_the_dropped_singular_values() -> Result<()> {
    for cfg in CONFIGS {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("r2.safetensors");
        let report = resize(&kohya(cfg, 1.0).path, Some(2), None, &out)?;
        let original = kohya_deltas(&kohya(cfg, 1.0).path)?;
        let resized = kohya_deltas(&out)?;
        let reference = reference_singular_values(cfg)?;
        assert!(
            !reference.is_empty(),
            "{cfg}: no singular values to compare"
        );
        let mut worst = 0f64;
        for (name, sigma) in &reference {
            let dropped = (sigma[2] * sigma[2] + sigma[3] * sigma[3]).sqrt();
            let error = frobenius(&(&original[name] - &resized[name])?)?;
            let off = (error - dropped).abs() / sigma[0];
            assert!(off.is_finite(), "{name}: {off}");
            worst = worst.max(off);
        }
        println!("{cfg}: resize 4→2: max |‖ΔW−ΔW'‖ − √(σ₃²+σ₄²)| / σ₁ = {worst:.2e}");
        assert!(worst <= 1e-5, "{cfg}: {worst}");
        assert!(report
            .modules
            .iter()
            .all(|m| m.new_rank == 2 && m.old_rank == 4));

        // alpha/rank is kept: UNet modules had alpha 2 at rank 4, so alpha 1 at rank 2.
        let tensors = candle_core::safetensors::load(&out, &Device::Cpu)?;
        let alpha = tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"].to_scalar::<f32>()?;
        assert_eq!(alpha, 1.0);
        assert_eq!(
            tensors["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].rank(),
            if cfg == "sd1-tiny" { 4 } else { 2 }
        );
    }
    Ok(())
}

#[test]
fn dynamic_resize_keeps_the_requested_energy() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("dyn.safetensors");
    let rule: DynamicRank = "sv_fro:0.9".parse()?;
    let report = resize(&kohya("sd1-tiny", 1.0).path, None, Some(rule), &out)?;
    let reference = reference_singular_values("sd1-tiny")?;
    for m in &report.modules {
        let sigma = &reference[&m.name];
        let total: f64 = sigma.iter().map(|s| s * s).sum();
        let kept = |k: usize| sigma[..k].iter().map(|s| s * s).sum::<f64>() / total;
        assert!(kept(m.new_rank) >= 0.81 - 1e-9, "{}", m.name);
        assert!(
            m.new_rank == 1 || kept(m.new_rank - 1) < 0.81,
            "{}: not the smallest rank",
            m.name
        );
    }
    Ok(())
}

#[test]
fn extract_from_a_merge_reproduces_the_adapter() -> Result<()> {
    let cfg = "sd1-tiny";
    let base = fixtures().join(cfg);
    let dir = tempfile::tempdir()?;
    let merged = dir.path().join("merged");
    merge(&MergeOptions {
        base: base.clone(),
        adapters: vec![kohya(cfg, 1.0)],
        output: merged.clone(),
        dtype: None,
        allow_unmatched: false,
        allow_nonfinite: false,
    })?;
    let out = dir.path().join("extracted.safetensors");
    let report = extract(&base, &merged, 4, 0.0, &out)?;
    assert!(report.skipped.is_empty());
    let original = kohya_deltas(&kohya(cfg, 1.0).path)?;
    let extracted = kohya_deltas(&out)?;
    assert_eq!(extracted.len(), original.len());
    assert!(
        !original.is_empty(),
        "{cfg}: the adapter has no modules to compare"
    );
    let mut worst = 0f32;
    for (name, delta) in &original {
        worst = worst.max(max_abs_diff(&extracted[name], delta));
    }
    println!("{cfg}: extract(base, merge(base, A)) vs A: max |ΔW diff| = {worst:.2e}");
    // W + ΔW − W in f32 loses the bits of ΔW below W's last place (|W| < 1 here).
    assert!(worst <= 1e-6, "{worst}");
    Ok(())
}

#[test]
fn extract_skips_modules_that_did_not_change() -> Result<()> {
    let cfg = "sd2-tiny";
    let base = fixtures().join(cfg);
    let dir = tempfile::tempdir()?;
    let merged = dir.path().join("merged");
    let attn2 = AdapterSpec {
        path: base.join("adapter_attn2_peft.safetensors"),
        scale: 1.0,
    };
    merge(&MergeOptions {
        base: base.clone(),
        adapters: vec![attn2],
        output: merged.clone(),
        dtype: None,
        allow_unmatched: false,
        allow_nonfinite: false,
    })?;
    let out = dir.path().join("extracted.safetensors");
    let report = extract(&base, &merged, 8, 1e-7, &out)?;
    assert!(
        report.modules.iter().all(|m| m.name.contains("_attn2_")),
        "only attn2 changed"
    );
    assert!(!report.skipped.is_empty());
    assert!(report.skipped.iter().all(|n| !n.contains("_attn2_")));
    Ok(())
}
