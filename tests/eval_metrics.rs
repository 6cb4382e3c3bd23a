//! lora-eval's preprocessing and metric math against pytorch-fid and torch-fidelity, with the
//! values `tests/reference/make_eval_fixtures.py` recorded from them.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use common::{assert_scalar_close, fixtures};
use lora_toolkit::eval::features::FeatureRows;
use lora_toolkit::eval::frechet::{frechet_distance, GaussianStats};
use lora_toolkit::eval::images::{list_images, read_rgb};
use lora_toolkit::eval::inception_score::inception_score;
use lora_toolkit::eval::kid::kernel_inception_distance;
use lora_toolkit::eval::resize::bilinear_to_unit_range;
use serde_json::Value;

fn eval_dir() -> PathBuf {
    fixtures().join("eval")
}

fn expected() -> Value {
    let path = eval_dir().join("expected.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fixture script's `formula_features`: the same f64 expression, rounded once to f32.
fn formula_features(spec: &Value) -> FeatureRows {
    let p: Vec<f64> = spec
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let (n, d, phase, scale, shift) = (p[0] as usize, p[1] as usize, p[2], p[3], p[4]);
    let data = (0..n)
        .flat_map(|i| {
            (0..d).map(move |j| {
                let (i, j) = (i as f64, j as f64);
                (scale * (0.37 * i + 1.13 * j + phase).sin()
                    + 0.5 * (0.071 * i * j + phase).cos()
                    + shift) as f32
            })
        })
        .collect();
    FeatureRows::new(d, data).unwrap()
}

fn cases<'a>(expected: &'a Value, metric: &str) -> &'a [Value] {
    let cases = expected["math"][metric].as_array().unwrap();
    assert!(!cases.is_empty(), "no {metric} cases in the fixture");
    cases
}

#[test]
fn fid_equals_pytorch_fid() {
    let expected = expected();
    for case in cases(&expected, "fid") {
        let a = GaussianStats::from_features(&formula_features(&case["a"])).unwrap();
        let b = GaussianStats::from_features(&formula_features(&case["b"])).unwrap();
        let fid = frechet_distance(&a, &b).unwrap();
        // pytorch-fid's general sqrtm of the 2048² product adds the square roots of its ~2000
        // rounding-noise eigenvalues when the covariances are singular (fewer images than
        // dimensions): 1.7e-5 relative here. numpy computing our route agrees to 4e-7, the rest
        // being which of Σ₁'s noise eigenvalues count as zero.
        let singular = a.count <= a.dim() || b.count <= b.dim();
        let tol = if singular { 1e-4 } else { 1e-6 };
        assert_scalar_close(fid, case["fid"].as_f64().unwrap(), tol, "FID");
        let eigh = case["fid_numpy_eigh"].as_f64().unwrap();
        assert_scalar_close(fid, eigh, 1e-6, "FID/numpy eigh");
    }
}

#[test]
fn inception_score_equals_torch_fidelity() {
    let expected = expected();
    for case in cases(&expected, "is") {
        let logits = formula_features(&case["logits"]);
        let shuffle = case["shuffle"].as_u64().map(|s| s as u32);
        let splits = case["splits"].as_u64().unwrap() as usize;
        let score = inception_score(&logits, splits, shuffle).unwrap();
        let what = format!("IS (shuffle {shuffle:?})");
        assert_scalar_close(score.mean, case["mean"].as_f64().unwrap(), 1e-9, &what);
        assert_scalar_close(score.std, case["std"].as_f64().unwrap(), 1e-7, &what);
    }
}

#[test]
fn kid_equals_torch_fidelity() {
    let expected = expected();
    for case in cases(&expected, "kid") {
        let (a, b) = (formula_features(&case["a"]), formula_features(&case["b"]));
        let subsets = case["subsets"].as_u64().unwrap() as usize;
        let size = case["subset_size"].as_u64().unwrap() as usize;
        let seed = case["seed"].as_u64().unwrap() as u32;
        let kid = kernel_inception_distance(&a, &b, subsets, size, seed).unwrap();
        assert_eq!(kid.subset_size, size);
        // Same formula in f64: rounding only. torch-fidelity itself sums in the features' f32.
        assert_scalar_close(kid.mean, case["mean_f64"].as_f64().unwrap(), 1e-9, "KID");
        assert_scalar_close(kid.std, case["std_f64"].as_f64().unwrap(), 1e-7, "KID std");
        assert_scalar_close(
            kid.mean,
            case["mean_f32"].as_f64().unwrap(),
            1e-4,
            "KID/f32",
        );
    }
}

#[test]
fn preprocessing_equals_pytorch_fid() {
    let expected = expected();
    let rows = candle_core::safetensors::load(
        eval_dir().join("preprocess_rows.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut checked = 0;
    for set in ["real", "fake"] {
        let summaries = expected["preprocess"][set].as_object().unwrap();
        let files = list_images(&eval_dir().join(set)).unwrap();
        let names: Vec<String> = files.iter().map(|p| file_name(p)).collect();
        let mut sorted: Vec<String> = summaries.keys().cloned().collect();
        sorted.sort();
        assert_eq!(names, sorted, "{set}: the listed images");
        for path in &files {
            let name = file_name(path);
            let x = bilinear_to_unit_range(&read_rgb(path).unwrap(), 299);
            let plane = 299 * 299;
            // PNG and JPEG alike (JPEGs through libjpeg-turbo, as PIL): rounding only.
            let tol = 1e-5;
            for c in 0..3 {
                let channel = &x[c * plane..(c + 1) * plane];
                let sum: f64 = channel.iter().map(|&v| f64::from(v)).sum();
                let reference = summaries[&name]["sum"][c].as_f64().unwrap();
                let mean_diff = ((sum - reference) / plane as f64).abs();
                assert!(
                    mean_diff <= f64::from(tol) / 4.0,
                    "{name} channel {c}: mean differs by {mean_diff}"
                );
                let row: Vec<f32> = rows[&name].get(c).unwrap().to_vec1().unwrap();
                let ours = &channel[150 * 299..151 * 299];
                let worst = ours
                    .iter()
                    .zip(&row)
                    .map(|(a, b)| {
                        assert!(a.is_finite() && b.is_finite(), "{name}: not finite");
                        (a - b).abs()
                    })
                    .fold(0.0, f32::max);
                assert!(
                    worst <= tol,
                    "{name} channel {c} row 150: differs by {worst}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 22);
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}
