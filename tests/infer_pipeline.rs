//! The whole lora-infer pipeline against diffusers' StableDiffusionPipeline (DDIM, eta 0,
//! guidance 7.5) from the same initial latents, on both tiny fixtures: final latents ≤ 1e-3 for
//! the base model, a kohya adapter on UNet and text encoder, and two PEFT adapters at 0.5 / 0.7;
//! the decoded image; `--fuse` against unfused; reproducibility by seed.
//! Expected values: tests/reference/make_infer_fixtures.py.

mod common;

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use lora_core::options::AdapterSpec;
use lora_core::source::ModelFolder;
use lora_infer::{GenerateOptions, InitImage, Pipeline, SchedulerKind};

const TOLERANCE: f32 = 1e-3;

struct Fixture {
    folder: ModelFolder,
    tensors: HashMap<String, Tensor>,
    meta: serde_json::Value,
}

fn fixture(cfg: &str) -> Result<Fixture> {
    let dir = common::fixtures().join(cfg);
    let infer = dir.join("infer");
    Ok(Fixture {
        folder: ModelFolder::open(&dir)?,
        tensors: candle_core::safetensors::load(infer.join("pipeline.safetensors"), &Device::Cpu)?,
        meta: serde_json::from_str(&std::fs::read_to_string(infer.join("pipeline.json"))?)?,
    })
}

impl Fixture {
    fn adapters(&self, case: &str) -> Vec<AdapterSpec> {
        self.meta["cases"][case]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                AdapterSpec::new(
                    self.folder.root().join(a[0].as_str().unwrap()),
                    a[1].as_f64().unwrap(),
                )
            })
            .collect()
    }

    fn options(&self) -> GenerateOptions {
        let m = &self.meta;
        GenerateOptions {
            prompt: m["prompt"].as_str().unwrap().into(),
            negative_prompt: m["negative_prompt"].as_str().unwrap().into(),
            steps: m["steps"].as_u64().unwrap() as usize,
            guidance: m["guidance"].as_f64().unwrap(),
            scheduler: SchedulerKind::Ddim,
            num_images: m["num_images"].as_u64().unwrap() as usize,
            batch_size: 2,
            init_latents: Some(common::get(&self.tensors, "init_latents").clone()),
            ..GenerateOptions::default()
        }
    }

    fn pipeline(&self, case: &str, fuse: bool) -> Result<Pipeline> {
        Pipeline::load(
            &self.folder,
            &self.adapters(case),
            &Device::Cpu,
            DType::F32,
            fuse,
        )
    }
}

#[test]
fn final_latents_match_diffusers() -> Result<()> {
    for cfg in common::CONFIGS {
        let fx = fixture(cfg)?;
        for case in ["base", "kohya", "two"] {
            let generated = fx.pipeline(case, false)?.generate(&fx.options())?;
            let expected = common::get(&fx.tensors, &format!("{case}.final_latents"));
            let err = common::max_abs_diff(&generated.latents, expected);
            println!(
                "{cfg} {case}: max |Δ final latents| = {err:.2e} (max |latents| {:.2})",
                common::max_abs(expected)
            );
            assert!(
                err <= TOLERANCE,
                "{cfg} {case}: final latents differ by {err}"
            );
            if case == "base" {
                let image = common::get(&fx.tensors, "base.image");
                let err = common::max_abs_diff(&generated.images, image);
                println!("{cfg} base: max |Δ decoded image| = {err:.2e}");
                assert!(err <= TOLERANCE, "{cfg}: decoded image differs by {err}");
            }
        }
    }
    Ok(())
}

#[test]
fn img2img_matches_diffusers() -> Result<()> {
    for cfg in common::CONFIGS {
        let fx = fixture(cfg)?;
        let get = |key: &str| common::get(&fx.tensors, key).clone();
        let options = GenerateOptions {
            init_image: Some(InitImage::Latents(get("img2img.image_latents"))),
            init_latents: Some(get("img2img.noise")),
            strength: fx.meta["img2img"]["strength"].as_f64().unwrap(),
            ..fx.options()
        };
        let generated = fx.pipeline("base", false)?.generate(&options)?;
        let expected = get("img2img.final_latents");
        let err = common::max_abs_diff(&generated.latents, &expected);
        println!("{cfg} img2img: max |Δ final latents| = {err:.2e}");
        assert!(
            err <= TOLERANCE,
            "{cfg} img2img: final latents differ by {err}"
        );
    }
    Ok(())
}

#[test]
fn fused_adapters_match_unfused() -> Result<()> {
    for cfg in common::CONFIGS {
        let fx = fixture(cfg)?;
        for case in ["kohya", "two"] {
            let unfused = fx.pipeline(case, false)?.generate(&fx.options())?;
            let fused = fx.pipeline(case, true)?.generate(&fx.options())?;
            let err = common::max_abs_diff(&fused.latents, &unfused.latents);
            println!("{cfg} {case}: max |fused − unfused| = {err:.2e}");
            assert!(
                err <= TOLERANCE,
                "{cfg} {case}: fused differs from unfused by {err}"
            );
            let expected = common::get(&fx.tensors, &format!("{case}.final_latents"));
            assert!(common::max_abs_diff(&fused.latents, expected) <= TOLERANCE);
        }
    }
    Ok(())
}

#[test]
fn same_seed_same_images_whatever_the_batching() -> Result<()> {
    let fx = fixture("sd1-tiny")?;
    let pipeline = fx.pipeline("kohya", false)?;
    for scheduler in [SchedulerKind::EulerAncestral, SchedulerKind::DpmPlusPlus2M] {
        let options = GenerateOptions {
            prompt: "a photo of sks dog".into(),
            steps: 4,
            scheduler,
            num_images: 3,
            batch_size: 2,
            seed: 42,
            ..GenerateOptions::default()
        };
        let a = pipeline.generate(&options)?;
        let b = pipeline.generate(&GenerateOptions {
            batch_size: 1,
            ..options.clone()
        })?;
        assert_eq!(a.seeds, [42, 43, 44]);
        // Bit-identical when repeated; equal up to float reassociation across batch sizes.
        let again = pipeline.generate(&options)?;
        assert_eq!(
            common::max_abs_diff(&a.images, &again.images),
            0.0,
            "{scheduler}: not reproducible"
        );
        let d = common::max_abs_diff(&a.images, &b.images);
        assert!(d < 1e-3, "{scheduler}: batching changed the images by {d}");
        // Image i is seed + i on its own.
        let alone = pipeline.generate(&GenerateOptions {
            seed: 43,
            num_images: 1,
            ..options.clone()
        })?;
        assert!(common::max_abs_diff(&alone.images, &a.images.narrow(0, 1, 1)?) < 1e-3);
        let other = pipeline.generate(&GenerateOptions {
            seed: 7,
            ..options.clone()
        })?;
        for i in 0..3 {
            let d = common::max_abs_diff(&other.images.get(i)?, &a.images.get(i)?);
            assert!(
                d > 1e-2,
                "{scheduler}: seeds 7 and 42 gave the same image {i}"
            );
        }
        assert!(common::max_abs_diff(&a.images.get(0)?, &a.images.get(1)?) > 1e-2);
    }
    Ok(())
}

#[test]
fn every_scheduler_runs_on_both_prediction_types() -> Result<()> {
    for cfg in common::CONFIGS {
        let fx = fixture(cfg)?;
        let pipeline = fx.pipeline("base", false)?;
        for scheduler in SchedulerKind::ALL {
            let g = pipeline.generate(&GenerateOptions {
                prompt: "a red circle".into(),
                steps: 3,
                scheduler,
                seed: 1,
                ..GenerateOptions::default()
            })?;
            assert_eq!(g.images.dims(), [1, 3, 32, 32], "{cfg} {scheduler}");
            let finite = g
                .latents
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.is_finite());
            assert!(finite, "{cfg} {scheduler}: non-finite latents");
        }
    }
    Ok(())
}

#[test]
fn reports_truncated_prompts_and_bad_sizes() -> Result<()> {
    let fx = fixture("sd1-tiny")?;
    let pipeline = fx.pipeline("base", false)?;
    let long = "a photo of a dog ".repeat(30);
    let options = GenerateOptions {
        prompt: long,
        ..GenerateOptions::default()
    };
    let warnings = pipeline.prompt_warnings(&options);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("75 tokens") && warnings[0].contains("truncated"),
        "{}",
        warnings[0]
    );
    assert!(pipeline
        .prompt_warnings(&GenerateOptions::default())
        .is_empty());

    let odd = GenerateOptions {
        width: Some(33),
        ..GenerateOptions::default()
    };
    let err = pipeline.generate(&odd).err().unwrap().to_string();
    assert!(
        err.contains("width 33") && err.contains("multiple of 2"),
        "{err}"
    );
    let wrong = GenerateOptions {
        init_latents: Some(Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu)?),
        num_images: 2,
        ..GenerateOptions::default()
    };
    let err = pipeline.generate(&wrong).err().unwrap().to_string();
    assert!(
        err.contains("initial latents have shape [1, 4, 8, 8]"),
        "{err}"
    );
    Ok(())
}

#[test]
fn adapter_for_another_base_is_refused_with_its_modules() -> Result<()> {
    let sd2 = fixture("sd2-tiny")?;
    let sd1_adapter = common::fixtures().join("sd1-tiny/adapter_kohya.safetensors");
    let err = Pipeline::load(
        &sd2.folder,
        &[AdapterSpec::new(&sd1_adapter, 1.0)],
        &Device::Cpu,
        DType::F32,
        false,
    )
    .err()
    .unwrap();
    let err = format!("{err:#}");
    assert!(
        err.contains("does not fit the model") && err.contains("adapter_kohya.safetensors"),
        "{err}"
    );
    // Names modules and shapes.
    assert!(
        err.contains("attn") && (err.contains("shape") || err.contains("expected")),
        "{err}"
    );
    Ok(())
}

#[test]
fn models_without_vae_denoise_pixels() -> Result<()> {
    // sd1-tiny without vae/ (and without model_index.json, which lists it): its UNet then works
    // on pixels, at its sample size, and the final latents are the images.
    let dir = tempfile::tempdir()?;
    let source = common::fixtures().join("sd1-tiny");
    for part in ["unet", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(dir.path().join(part))?;
        for entry in std::fs::read_dir(source.join(part))? {
            let entry = entry?;
            std::fs::copy(entry.path(), dir.path().join(part).join(entry.file_name()))?;
        }
    }
    let folder = ModelFolder::open(dir.path())?;
    assert!(!folder.has_vae());
    let pipeline = Pipeline::load(&folder, &[], &Device::Cpu, DType::F32, false)?;
    assert_eq!(pipeline.vae_scale_factor(), 1);
    let g = pipeline.generate(&GenerateOptions {
        prompt: "a red circle".into(),
        steps: 2,
        seed: 3,
        ..GenerateOptions::default()
    })?;
    assert_eq!(g.latents.dims(), [1, 4, 16, 16]);
    assert_eq!(common::max_abs_diff(&g.images, &g.latents), 0.0);
    Ok(())
}

/// A DoRA adapter (the fixture LyCORIS and peft agree on, `make_dora_grad_fixtures.py`) beside a
/// plain one: with `--fuse` the plain adapter folds into the weights and the DoRA one still
/// attaches unmerged (its change depends on the weight), so fused and unfused runs agree, and
/// the DoRA adapter changes the picture.
#[test]
fn dora_adapters_generate_fused_and_unfused_alike() -> Result<()> {
    for cfg in common::CONFIGS {
        let fx = fixture(cfg)?;
        let plain = fx.adapters("kohya");
        let dora = fx.folder.root().join("adapter_dora_kohya.safetensors");
        let mut adapters = plain.clone();
        adapters.push(AdapterSpec::new(dora, 0.7));
        check_fused_and_effect(&fx, &adapters, &plain, 1e-2, &format!("{cfg} kohya + DoRA"))?;
    }
    Ok(())
}

/// LyCORIS LoHa and LoKr files (the merge fixtures LyCORIS' merge was checked on) generate the
/// same picture unmerged and `--fuse`d, UNet and text encoder modules alike, and change it.
#[test]
fn lycoris_adapters_generate_fused_and_unfused_alike() -> Result<()> {
    let fx = fixture("sd1-tiny")?;
    let merge = fx.folder.root().join("merge");
    for (file, scale) in [
        ("adapter_loha.safetensors", 0.8),
        ("adapter_lokr.safetensors", 0.5),
    ] {
        let adapters = [AdapterSpec::new(merge.join(file), scale)];
        check_fused_and_effect(&fx, &adapters, &[], 1e-3, file)?;
    }
    Ok(())
}

/// `adapters` generate the same latents unmerged and fused, and differ from what `without`
/// generates by more than `effect`.
fn check_fused_and_effect(
    fx: &Fixture,
    adapters: &[AdapterSpec],
    without: &[AdapterSpec],
    effect: f32,
    label: &str,
) -> Result<()> {
    let run = |adapters: &[AdapterSpec], fuse: bool| {
        Pipeline::load(&fx.folder, adapters, &Device::Cpu, DType::F32, fuse)?
            .generate(&fx.options())
    };
    let unfused = run(adapters, false)?;
    let fused = run(adapters, true)?;
    let err = common::max_abs_diff(&fused.latents, &unfused.latents);
    println!("{label}: max |fused − unfused| = {err:.2e}");
    assert!(
        err <= TOLERANCE,
        "{label}: fused differs from unfused by {err}"
    );
    let change = common::max_abs_diff(&run(without, false)?.latents, &unfused.latents);
    assert!(
        change > effect,
        "{label}: the adapter changed the latents by {change}"
    );
    Ok(())
}
