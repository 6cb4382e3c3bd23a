//! The `lora-infer` binary end to end on the tiny SD1 fixture: PNGs with metadata, contact sheet,
//! `--latents` / `--save-latents` parity with diffusers, and clear errors for bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use lora_infer::output::{read_png, write_png, Image8, IMAGE_KEY, LATENTS_KEY};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn sd1() -> PathBuf {
    fixtures().join("sd1-tiny")
}

fn lora_infer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora-infer"))
        .args(args)
        .output()
        .expect("cannot run lora-infer")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Largest absolute difference; fails on a NaN or infinity anywhere (candle's `max` drops a NaN
/// past the first element, so a comparison through it could pass on values that are no numbers).
#[track_caller]
fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let values = |t: &Tensor, what: &str| {
        let v = t
            .to_dtype(DType::F64)
            .and_then(|t| t.flatten_all()?.to_vec1::<f64>())
            .unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{what}: non-finite values");
        v
    };
    let (a, b) = (values(a, "ours"), values(b, "reference"));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max) as f32
}

#[test]
fn writes_pngs_with_metadata_and_a_grid() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("cat.png");
    let adapter = format!("{}:0.8", sd1().join("adapter_kohya.safetensors").display());
    let out = lora_infer(&[
        "--base",
        sd1().to_str().unwrap(),
        "--lora",
        &adapter,
        "--prompt",
        "a photo of sks dog",
        "--negative-prompt",
        "blurry",
        "--steps",
        "3",
        "--scheduler",
        "euler-a",
        "--seed",
        "5",
        "--num-images",
        "2",
        "--batch-size",
        "2",
        "--grid",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    for (i, seed) in [(0, "5"), (1, "6")] {
        let (image, text) = read_png(&dir.path().join(format!("cat-{i}.png"))).unwrap();
        assert_eq!((image.width, image.height, image.channels), (32, 32, 3));
        assert_eq!(text["prompt"], "a photo of sks dog");
        assert_eq!(text["negative_prompt"], "blurry");
        assert_eq!(text["seed"], seed);
        assert_eq!(text["steps"], "3");
        assert_eq!(text["scheduler"], "euler-a");
        assert_eq!(text["guidance"], "7.5");
        assert!(
            text["adapters"].ends_with("adapter_kohya.safetensors:0.8"),
            "{}",
            text["adapters"]
        );
        assert!(
            text["parameters"].contains(&format!("Seed: {seed}")),
            "{}",
            text["parameters"]
        );
    }
    let (grid, _) = read_png(&dir.path().join("cat-grid.png")).unwrap();
    assert_eq!((grid.width, grid.height), (64, 32));

    // The same seed again gives the same file content.
    let again = dir.path().join("again.png");
    let out = lora_infer(&[
        "--base",
        sd1().to_str().unwrap(),
        "--lora",
        &adapter,
        "--prompt",
        "a photo of sks dog",
        "--negative-prompt",
        "blurry",
        "--steps",
        "3",
        "--scheduler",
        "euler-a",
        "--seed",
        "6",
        "--output",
        again.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (a, _) = read_png(&again).unwrap();
    let (b, _) = read_png(&dir.path().join("cat-1.png")).unwrap();
    // Equal up to float reassociation between batch sizes: a level or two of 255 at most.
    let worst = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    assert!(
        worst <= 2,
        "seed 6 alone differs from the second image of seed 5 by {worst}/255"
    );
}

#[test]
fn latents_in_and_out_match_diffusers() {
    let dir = tempfile::tempdir().unwrap();
    let fixture =
        candle_core::safetensors::load(sd1().join("infer/pipeline.safetensors"), &Device::Cpu)
            .unwrap();
    let init = dir.path().join("init.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            LATENTS_KEY.to_owned(),
            fixture["init_latents"].clone(),
        )]),
        &init,
    )
    .unwrap();
    let saved = dir.path().join("final.safetensors");
    let out = lora_infer(&[
        "--base",
        sd1().to_str().unwrap(),
        "--prompt",
        "a red circle on a white background",
        "--negative-prompt",
        "blurry, low quality",
        "--steps",
        "6",
        "--latents",
        init.to_str().unwrap(),
        "--save-latents",
        saved.to_str().unwrap(),
        "--output",
        dir.path().join("out/").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let saved = candle_core::safetensors::load(&saved, &Device::Cpu).unwrap();
    let err = max_abs_diff(&saved[LATENTS_KEY], &fixture["base.final_latents"]);
    assert!(err <= 1e-3, "final latents differ from diffusers by {err}");
    let err = max_abs_diff(&saved[IMAGE_KEY], &fixture["base.image"]);
    assert!(err <= 1e-3, "decoded image differs from diffusers by {err}");
    assert!(
        dir.path().join("out/image-0.png").is_file()
            && dir.path().join("out/image-1.png").is_file()
    );
}

#[test]
fn bad_input_fails_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("x.png");
    let base = sd1();
    let run = |extra: &[&str]| one_step_into(&png, extra);
    let sd2_adapter = fixtures().join("sd2-tiny/adapter_kohya.safetensors");
    let wrong_latents = dir.path().join("wrong.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([(
            "noise".to_owned(),
            Tensor::zeros((1, 4, 16, 16), DType::F32, &Device::Cpu).unwrap(),
        )]),
        &wrong_latents,
    )
    .unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--lora", "a.safetensors:strong"],
            "scale `strong` is not a number",
        ),
        (vec!["--lora", "missing.safetensors"], "missing.safetensors"),
        (
            vec!["--lora", sd2_adapter.to_str().unwrap()],
            "does not fit the model",
        ),
        (
            vec!["--width", "31"],
            "width 31 is not a positive multiple of 2",
        ),
        (vec!["--scheduler", "k-lms"], "unknown scheduler `k-lms`"),
        (vec!["--precision", "f8"], "unknown precision `f8`"),
        (
            vec!["--precision", "bf16"],
            "--precision bf16 needs a CUDA device",
        ),
        (
            vec!["--latents", wrong_latents.to_str().unwrap()],
            "has no `latents` tensor",
        ),
    ];
    for (extra, expected) in cases {
        let out = run(&extra);
        let err = stderr(&out);
        assert!(!out.status.success(), "{extra:?} succeeded");
        assert!(err.contains(expected), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
    }

    // A model folder missing its UNet weights.
    let broken = dir.path().join("broken");
    copy_dir(&base, &broken);
    std::fs::remove_file(broken.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let out = lora_infer(&[
        "--base",
        broken.to_str().unwrap(),
        "--prompt",
        "x",
        "--output",
        png.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("diffusion_pytorch_model.safetensors"),
        "{}",
        stderr(&out)
    );
    assert!(!png.exists(), "a failed run left an image behind");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn img2img_from_an_image_file() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init.png");
    let pixels = (0..32 * 32 * 3).map(|i| (i * 7 % 256) as u8).collect();
    let image = Image8 {
        width: 32,
        height: 32,
        channels: 3,
        pixels,
    };
    write_png(&init, &image, &Default::default()).unwrap();
    let out_png = dir.path().join("out.png");
    let base = sd1();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--base",
            base.to_str().unwrap(),
            "--prompt",
            "x",
            "--steps",
            "4",
            "--seed",
            "1",
            "--init-image",
            init.to_str().unwrap(),
            "--output",
            out_png.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        lora_infer(&args)
    };
    let out = run(&["--strength", "0.5", "--scheduler", "euler"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (result, text) = read_png(&out_png).unwrap();
    assert_eq!((result.width, result.height), (32, 32));
    assert_eq!(text["strength"], "0.5");
    assert!(text["init_image"].ends_with("init.png"));

    for (extra, expected) in [
        (vec!["--strength", "0"], "strength 0"),
        (vec!["--strength", "0.1"], "leaves no step to run"),
        (vec!["--width", "64"], "differs from the init image's 32"),
    ] {
        // out.png exists from the run above: these cases are about their own mistakes.
        let out = run(&[extra.as_slice(), &["--overwrite"]].concat());
        assert!(!out.status.success(), "{extra:?} succeeded");
        assert!(
            stderr(&out).contains(expected),
            "{extra:?}: {}",
            stderr(&out)
        );
    }
}

/// An output that is one of the inputs (here the init image, spelled another way) is refused
/// before anything is written, and the input is left as it was.
#[test]
fn an_input_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("start.png");
    let image = Image8 {
        width: 32,
        height: 32,
        channels: 3,
        pixels: vec![128; 32 * 32 * 3],
    };
    write_png(&init, &image, &Default::default()).unwrap();
    let before = std::fs::read(&init).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let same = dir.path().join("sub/../start.png");
    let out = one_step_into(&same, &["--init-image", init.to_str().unwrap()]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("is --init-image"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read(&init).unwrap(), before);
}

/// One denoising step of prompt `x` on the sd1 fixture into `png`, with `extra` flags.
fn one_step_into(png: &Path, extra: &[&str]) -> Output {
    let base = sd1();
    let mut args = vec![
        "--base",
        base.to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--output",
        png.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    lora_infer(&args)
}

/// An existing image is refused without `--overwrite` (and kept), replaced with it.
#[test]
fn an_existing_output_needs_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("x.png");
    std::fs::write(&png, b"an earlier image").unwrap();
    let run = |extra: &[&str]| one_step_into(&png, extra);
    let refused = run(&[]);
    let err = stderr(&refused);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains("already exists") && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(&png).unwrap(), b"an earlier image");
    let replaced = run(&["--overwrite"]);
    assert!(replaced.status.success(), "{}", stderr(&replaced));
    assert!(read_png(&png).is_ok());
}

/// An adapter holding a NaN is refused naming its key, or loaded with `--allow-nonfinite` and a
/// warning that names it.
#[test]
fn a_nan_adapter_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let source = sd1().join("adapter_kohya.safetensors");
    let mut tensors = candle_core::safetensors::load(&source, &Device::Cpu).unwrap();
    let key = tensors
        .keys()
        .filter(|k| k.starts_with("lora_unet_") && k.ends_with(".lora_up.weight"))
        .min()
        .cloned()
        .expect("the fixture has UNet up tensors");
    let up = &tensors[&key];
    let mut values = up.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[0] = f32::NAN;
    let poisoned = Tensor::from_vec(values, up.shape(), &Device::Cpu).unwrap();
    tensors.insert(key.clone(), poisoned);
    let adapter = dir.path().join("nan.safetensors");
    candle_core::safetensors::save(&tensors, &adapter).unwrap();
    let png = dir.path().join("x.png");
    let run = |extra: &[&str]| {
        one_step_into(
            &png,
            &[&["--lora", adapter.to_str().unwrap()], extra].concat(),
        )
    };
    let refused = run(&[]);
    let err = stderr(&refused);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains(&key) && err.contains("non-finite") && err.contains("--allow-nonfinite"),
        "{err}"
    );
    assert!(!png.exists());
    let allowed = run(&["--allow-nonfinite"]);
    let err = stderr(&allowed);
    assert!(allowed.status.success(), "{err}");
    assert!(err.contains("warning:") && err.contains(&key), "{err}");
}
