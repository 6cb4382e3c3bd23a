//! lora-train end to end on the tiny fixture models and the tiny fixture dataset
//! (`tests/fixtures/train-data`, written by `tests/reference/make_train_data.py`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::{Device, Tensor};
use lora_core::io::read_safetensors;
use lora_core::{AdapterFile, AdapterFormat, LoraTargets};
use lora_train::config::LrScheduler;
use lora_train::{checkpoint_paths, TrainArgs, Trainer};

fn train_data() -> PathBuf {
    common::fixtures().join("train-data")
}

/// A quick recipe on `model` writing into `out`: resolution 32 (sample_size 16 × VAE factor 2).
fn args(model: &str, data: &Path, out: &Path) -> TrainArgs {
    TrainArgs {
        base: Some(common::fixtures().join(model).display().to_string()),
        data: Some(data.to_path_buf()),
        output: Some(out.join("adapter.safetensors")),
        resolution: Some(32),
        lr: Some(1e-2),
        steps: Some(4),
        ..Default::default()
    }
}

fn quiet() -> impl FnMut(lora_train::Preparation) {
    |_| {}
}

/// Each of `cases`, given over the quick recipe, is refused at option checking with an error
/// containing its text.
fn assert_refused<const N: usize>(cases: [(TrainArgs, &str); N]) {
    let dir = tempfile::tempdir().unwrap();
    for (extra, expected) in cases {
        let err = format!(
            "{:#}",
            args("sd1-tiny", &train_data(), dir.path())
                .overlay(extra)
                .resolve()
                .unwrap_err()
        );
        assert!(err.contains(expected), "{err}");
    }
}

/// Every file of the model folder, read whole (the fixtures are small).
fn folder_bytes(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    read_safetensors(path, &Device::Cpu).unwrap().tensors
}

fn assert_same_tensors(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "different tensor names"
    );
    for (k, x) in a {
        let y = &b[k];
        assert_eq!((x.dims(), x.dtype()), (y.dims(), y.dtype()), "{k}");
        // Exact in f32 for every dtype a checkpoint holds (f32, and the u8 of 8-bit states).
        let values = |t: &Tensor| {
            t.to_dtype(candle_core::DType::F32)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .unwrap()
        };
        let (x, y) = (values(x), values(y));
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "tensor {k} differs"
        );
    }
}

/// Loss on the training images (fixed timesteps and noise) before and after a short run, for
/// both fixture models (ε and v prediction), averaged over seeds: training must lower it, write
/// only adapter tensors, and leave every byte of the model folder as it was.
#[test]
fn training_lowers_the_loss_sd1() -> Result<()> {
    lowers_the_loss_and_touches_only_the_adapter("sd1-tiny")
}

#[test]
fn training_lowers_the_loss_sd2_v_prediction() -> Result<()> {
    lowers_the_loss_and_touches_only_the_adapter("sd2-tiny")
}

fn lowers_the_loss_and_touches_only_the_adapter(model: &str) -> Result<()> {
    {
        let before_bytes = folder_bytes(&common::fixtures().join(model));
        let mut drops = Vec::new();
        for seed in [1u64, 2] {
            let dir = tempfile::tempdir()?;
            let config = TrainArgs {
                steps: Some(12),
                lr: Some(2e-2),
                seed: Some(seed),
                ..args(model, &train_data(), dir.path())
            }
            .resolve()?;
            let mut trainer = Trainer::new(config, &mut quiet())?;
            let before = trainer.evaluate(99, 3)?;
            let summary = trainer.run(&mut |_| {})?;
            let after = trainer.evaluate(99, 3)?;
            eprintln!("{model} seed {seed}: eval loss {before:.4} → {after:.4}");
            drops.push((before - after) / before);
            assert_eq!(summary.final_step, 12);

            let file = AdapterFile::read(&dir.path().join("adapter.safetensors"), &Device::Cpu)?;
            let saved = tensors(file.path());
            assert!(saved
                .keys()
                .all(|k| k.starts_with("lora_unet_") && k.contains("_attn2_")));
            // up starts at zero: after training every up matrix has moved.
            for (k, t) in &saved {
                if k.ends_with("lora_up.weight") {
                    assert!(common::max_abs(t) > 0.0, "{k} never trained");
                }
            }
            let meta = file.metadata();
            assert_eq!(meta["ss_steps"], "12");
            assert_eq!(meta["ss_resolution"], "(32, 32)");
            assert_eq!(meta["ss_num_train_images"], "9");
            assert_eq!(meta["ss_network_dim"], "4");
        }
        let mean_drop = drops.iter().sum::<f64>() / drops.len() as f64;
        assert!(
            mean_drop > 0.03,
            "{model}: mean relative loss drop {mean_drop:.4} (per seed {drops:?})"
        );
        assert!(
            before_bytes == folder_bytes(&common::fixtures().join(model)),
            "{model}: the base model folder changed"
        );
    }
    Ok(())
}

/// `--gradient-checkpointing` trains the same adapter: its gradients are the plain pass's (up to
/// the order of float sums), over a recipe with batches of two and accumulation, and the file
/// says it was used, as kohya's does.
#[test]
fn gradient_checkpointing_trains_the_same_adapter() -> Result<()> {
    let mut adapters = Vec::new();
    for checkpointing in [false, true] {
        let dir = tempfile::tempdir()?;
        let config = TrainArgs {
            batch_size: Some(2),
            grad_accum: Some(2),
            targets: Some(LoraTargets::AttnMlp),
            gradient_checkpointing: Some(checkpointing),
            ..args("sd1-tiny", &train_data(), dir.path())
        }
        .resolve()?;
        let summary = lora_train::train(config, &mut quiet(), &mut |_| {})?;
        let file = AdapterFile::read(&summary.output, &Device::Cpu)?;
        let expected = if checkpointing { "True" } else { "False" };
        assert_eq!(file.metadata()["ss_gradient_checkpointing"], expected);
        adapters.push(tensors(&summary.output));
    }
    assert!(!adapters[0].is_empty() && adapters[0].len() == adapters[1].len());
    let worst = adapters[0]
        .iter()
        .map(|(k, t)| common::max_abs_diff(t, &adapters[1][k]))
        .fold(0f32, f32::max);
    eprintln!("with and without checkpointing: max abs difference {worst:e}");
    // Four AdamW steps at lr 1e-2 move each weight by up to 4e-2; AdamW's normalisation turns
    // gradient differences in the last float digits into steps ~1e-5 apart.
    assert!(worst <= 1e-4, "the adapters differ by {worst}");
    Ok(())
}

/// A 4-step run with a checkpoint every 2 steps from `recipe(folder, None)`, then a run of the same
/// recipe resumed from its step-2 checkpoint in another folder: (straight, resumed) folders.
fn straight_then_resumed(
    recipe: &dyn Fn(&Path, Option<PathBuf>) -> TrainArgs,
) -> Result<(tempfile::TempDir, tempfile::TempDir)> {
    straight_then_resumed_from(recipe, 2)
}

/// [`straight_then_resumed`] resumed from the checkpoint of `step` (the recipe saves there).
fn straight_then_resumed_from(
    recipe: &dyn Fn(&Path, Option<PathBuf>) -> TrainArgs,
    step: usize,
) -> Result<(tempfile::TempDir, tempfile::TempDir)> {
    let straight = tempfile::tempdir()?;
    lora_train::train(
        recipe(straight.path(), None).resolve()?,
        &mut quiet(),
        &mut |_| {},
    )?;
    let (checkpoint, _) = checkpoint_paths(&straight.path().join("adapter.safetensors"), step);
    let resumed = tempfile::tempdir()?;
    lora_train::train(
        recipe(resumed.path(), Some(checkpoint)).resolve()?,
        &mut quiet(),
        &mut |_| {},
    )?;
    Ok((straight, resumed))
}

/// Lion's, AdamW8bit's and Prodigy's state (momentum; 8-bit codes and block scales beside f32
/// moments; Prodigy's moments, running sum, start point and its step-size estimate, a header
/// scalar) resumes bit for bit too, and the adapter names the optimizer as kohya does; another
/// optimizer cannot resume it.
#[test]
fn lion_adamw8bit_and_prodigy_resume_bit_exactly() -> Result<()> {
    use lora_train::optimizer::OptimizerKind;
    for (kind, settings) in [
        (OptimizerKind::Lion, vec!["betas=0.9,0.98".to_string()]),
        // Some of the tiny adapter's matrices are 128 elements, some 64: both kinds of state.
        (
            OptimizerKind::AdamW8bit,
            vec!["min_8bit_size=100".to_string()],
        ),
        (
            OptimizerKind::Prodigy,
            vec![
                "d_coef=2".to_string(),
                "use_bias_correction=true".to_string(),
            ],
        ),
    ] {
        let recipe = |out: &Path, resume: Option<PathBuf>| TrainArgs {
            steps: Some(4),
            save_every: Some(2),
            optimizer: Some(kind),
            optimizer_args: Some(settings.clone()),
            lr: Some(match kind {
                OptimizerKind::Lion => 1e-3,
                OptimizerKind::AdamW8bit => 1e-2,
                _ => 1.0,
            }),
            seed: Some(3),
            resume,
            ..args("sd1-tiny", &train_data(), out)
        };
        let (straight, resumed) = straight_then_resumed(&recipe)?;
        let out = straight.path().join("adapter.safetensors");
        let (ckpt2, _) = checkpoint_paths(&out, 2);
        let (ckpt4, _) = checkpoint_paths(&out, 4);
        let out_r = resumed.path().join("adapter.safetensors");
        let ckpt = tensors(&ckpt4);
        let slot = match kind {
            OptimizerKind::Lion => "lion_m.",
            OptimizerKind::AdamW8bit => "adam8_m.",
            _ => "prodigy_p0.",
        };
        assert!(
            ckpt.keys().any(|k| k.starts_with(slot)),
            "{kind}: {:?}",
            ckpt.keys().take(4).collect::<Vec<_>>()
        );
        assert_same_tensors(&ckpt, &tensors(&checkpoint_paths(&out_r, 4).0));
        assert_same_tensors(&tensors(&out), &tensors(&out_r));
        let header = read_safetensors(&ckpt4, &Device::Cpu)?.metadata;
        assert_eq!(
            header,
            read_safetensors(&checkpoint_paths(&out_r, 4).0, &Device::Cpu)?.metadata
        );
        if kind == OptimizerKind::Prodigy {
            let d: f64 = header["lora_train.optimizer.d"].parse()?;
            assert!(d > 1e-6, "Prodigy's step size did not grow: {d}");
        }
        let described = AdapterFile::read(&out, &Device::Cpu)?.metadata()["ss_optimizer"].clone();
        let class = match kind {
            OptimizerKind::Lion => "Lion(",
            OptimizerKind::AdamW8bit => "AdamW8bit(",
            _ => "Prodigy(",
        };
        assert!(described.starts_with(class), "{described}");

        let elsewhere = tempfile::tempdir()?;
        if kind == OptimizerKind::AdamW8bit {
            // Both kinds of state were written: codes (u8) and f32 moments.
            let dtypes: std::collections::BTreeSet<_> = ckpt
                .iter()
                .filter(|(k, _)| k.starts_with("adam8_m."))
                .map(|(_, t)| format!("{:?}", t.dtype()))
                .collect();
            assert_eq!(dtypes.len(), 2, "{dtypes:?}");
        }
        let other = TrainArgs {
            optimizer: Some(OptimizerKind::AdamW),
            optimizer_args: None,
            ..recipe(elsewhere.path(), Some(ckpt2.clone()))
        };
        let err = Trainer::new(other.resolve()?, &mut quiet())
            .err()
            .expect("another optimizer must not resume");
        assert!(format!("{err:#}").contains("optimizer"), "{err:#}");
        // The same optimizer without the checkpoint's --optimizer-args is another recipe too.
        let dropped = TrainArgs {
            optimizer_args: None,
            ..recipe(elsewhere.path(), Some(ckpt2))
        };
        let err = Trainer::new(dropped.resolve()?, &mut quiet())
            .err()
            .expect("dropped optimizer arguments must not resume");
        assert!(
            format!("{err:#}").contains("optimizer-args: checkpoint {")
                && format!("{err:#}").contains("now not set"),
            "{err:#}"
        );
    }
    Ok(())
}

/// N steps, then a resumed N steps, equal 2N steps straight: the final checkpoints (parameters,
/// both AdamW moments, step) and adapters are bit-identical. The recipe uses
/// every random path: flips, caption dropout, noise offset, min-SNR, batches, accumulation and a
/// warm-up + cosine schedule that depends on the step.
#[test]
fn resume_continues_bit_exactly() -> Result<()> {
    let recipe = |out: &Path, resume: Option<PathBuf>| TrainArgs {
        steps: Some(4),
        save_every: Some(2),
        batch_size: Some(2),
        grad_accum: Some(2),
        flip: Some(true),
        caption_dropout: Some(0.3),
        noise_offset: Some(0.1),
        min_snr_gamma: Some(5.0),
        lr_scheduler: Some(LrScheduler::Cosine),
        warmup_steps: Some(1),
        seed: Some(7),
        resume,
        ..args("sd1-tiny", &train_data(), out)
    };
    let straight = tempfile::tempdir()?;
    lora_train::train(
        recipe(straight.path(), None).resolve()?,
        &mut quiet(),
        &mut |_| {},
    )?;
    let out = straight.path().join("adapter.safetensors");
    let (ckpt2, _) = checkpoint_paths(&out, 2);
    let (ckpt4, adapter4) = checkpoint_paths(&out, 4);

    // The resumed run's metrics file already holds steps 1-4 (as after a crash past the
    // checkpoint): steps 3-4 are dropped and rewritten.
    let resumed = tempfile::tempdir()?;
    std::fs::copy(
        straight.path().join("adapter.safetensors.metrics.jsonl"),
        resumed.path().join("adapter.safetensors.metrics.jsonl"),
    )?;
    let summary = lora_train::train(
        recipe(resumed.path(), Some(ckpt2.clone())).resolve()?,
        &mut quiet(),
        &mut |_| {},
    )?;
    assert_eq!((summary.steps_run, summary.final_step), (2, 4));
    let out_r = resumed.path().join("adapter.safetensors");
    let (ckpt4_r, adapter4_r) = checkpoint_paths(&out_r, 4);
    assert!(!checkpoint_paths(&out_r, 2).0.exists());

    assert_same_tensors(&tensors(&ckpt4), &tensors(&ckpt4_r));
    let (a, b) = (
        read_safetensors(&ckpt4, &Device::Cpu)?.metadata,
        read_safetensors(&ckpt4_r, &Device::Cpu)?.metadata,
    );
    assert_eq!(a, b, "checkpoint headers (step, recipe) differ");
    assert_same_tensors(&tensors(&adapter4), &tensors(&adapter4_r));
    assert_same_tensors(&tensors(&out), &tensors(&out_r));

    // Metrics: the resumed log equals the straight one, except for wall times.
    let metrics_without_times = |dir: &Path| -> Vec<String> {
        std::fs::read_to_string(dir.join("adapter.safetensors.metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| l.split(",\"seconds\"").next().unwrap().to_string())
            .collect()
    };
    let straight_log = metrics_without_times(straight.path());
    assert_eq!(straight_log.len(), 4);
    assert_eq!(metrics_without_times(resumed.path()), straight_log);

    // A different recipe is refused, naming what differs.
    let elsewhere = tempfile::tempdir()?;
    let other = TrainArgs {
        lr: Some(5e-3),
        ..recipe(elsewhere.path(), Some(ckpt2))
    };
    let err = Trainer::new(other.resolve()?, &mut quiet())
        .err()
        .expect("a changed lr must not resume");
    let msg = format!("{err:#}");
    assert!(msg.contains("lr: checkpoint 0.01, now 0.005"), "{msg}");
    // Under a decaying schedule the run's length is part of the recipe.
    let longer = TrainArgs {
        steps: Some(6),
        ..recipe(elsewhere.path(), Some(checkpoint_paths(&out, 2).0))
    };
    let err = Trainer::new(longer.resolve()?, &mut quiet())
        .err()
        .expect("a cosine schedule cannot be stretched on resume");
    assert!(
        format!("{err:#}").contains("total-steps: checkpoint 4, now 6"),
        "{err:#}"
    );
    Ok(())
}

/// A diverging run stops at the first non-finite loss, names the last good checkpoint, keeps
/// it, and writes no adapter.
#[test]
fn nan_stops_training_and_keeps_the_last_checkpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = TrainArgs {
        lr: Some(1e30),
        steps: Some(6),
        save_every: Some(1),
        ..args("sd1-tiny", &train_data(), dir.path())
    }
    .resolve()?;
    let out = config.output.clone();
    let err = lora_train::train(config, &mut quiet(), &mut |_| {}).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("became") && msg.contains("no adapter written"),
        "{msg}"
    );
    assert!(!out.exists(), "an adapter was written after NaN");
    let (ckpt1, _) = checkpoint_paths(&out, 1);
    assert!(ckpt1.exists());
    assert!(
        msg.contains(&ckpt1.display().to_string()) || msg.contains("-step0000"),
        "{msg}"
    );
    Ok(())
}

/// Unreadable, non-image and uncaptioned files are reported together with their names, and no
/// file is written; `--skip-bad` trains on the rest. An empty dataset is refused.
#[test]
fn bad_inputs_are_reported_together_and_nothing_is_written() -> Result<()> {
    let data = tempfile::tempdir()?;
    for f in [
        "red_circle.png",
        "red_circle.txt",
        "blue_square.png",
        "blue_square.txt",
    ] {
        std::fs::copy(train_data().join(f), data.path().join(f))?;
    }
    std::fs::write(
        data.path().join("broken.png"),
        b"\x89PNG\r\n\x1a\n truncated",
    )?;
    std::fs::write(data.path().join("notes.md"), "not an image")?;
    std::fs::copy(
        train_data().join("red_circle.png"),
        data.path().join("lonely.png"),
    )?;

    let out = tempfile::tempdir()?;
    let err = Trainer::new(
        args("sd1-tiny", data.path(), out.path()).resolve()?,
        &mut quiet(),
    )
    .err()
    .expect("bad files must stop training");
    let msg = format!("{err:#}");
    for needle in [
        "3 bad file(s)",
        "broken.png",
        "notes.md",
        "lonely.png",
        "no caption",
        "--skip-bad",
    ] {
        assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
    }
    assert_eq!(
        std::fs::read_dir(out.path())?.count(),
        0,
        "files written on failure"
    );

    let config = TrainArgs {
        skip_bad: Some(true),
        steps: Some(1),
        ..args("sd1-tiny", data.path(), out.path())
    }
    .resolve()?;
    let trainer = Trainer::new(config, &mut quiet())?;
    assert_eq!(trainer.dataset().skipped.len(), 3);
    assert_eq!(trainer.dataset().items.len(), 2);

    let empty = tempfile::tempdir()?;
    let err = Trainer::new(
        args("sd1-tiny", empty.path(), out.path()).resolve()?,
        &mut quiet(),
    )
    .err()
    .expect("an empty dataset must be refused");
    assert!(format!("{err:#}").contains("no usable images"), "{err:#}");

    // A resolution the VAE cannot encode is refused before anything runs.
    let config = TrainArgs {
        resolution: Some(33),
        ..args("sd1-tiny", &train_data(), out.path())
    }
    .resolve()?;
    let err = Trainer::new(config, &mut quiet())
        .err()
        .expect("odd resolution");
    assert!(format!("{err:#}").contains("--resolution = 33"), "{err:#}");
    assert_eq!(
        std::fs::read_dir(out.path())?.count(),
        0,
        "files written on failure"
    );
    Ok(())
}

/// A model folder without `vae/` trains in pixel space: the 4-channel UNet sees RGBA images at
/// its sample size (here through the per-step random-crop path, with --epochs, batches and
/// accumulation). The peft layout loads back through lora-core; samples are 16×16 PNGs.
#[test]
fn pixel_space_model_trains_and_peft_output_loads() -> Result<()> {
    let model = tempfile::tempdir()?;
    let src = common::fixtures().join("sd1-tiny");
    for part in ["unet", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir(model.path().join(part))?;
        for f in std::fs::read_dir(src.join(part))? {
            let f = f?;
            std::fs::copy(f.path(), model.path().join(part).join(f.file_name()))?;
        }
    }
    let out = tempfile::tempdir()?;
    let config = TrainArgs {
        base: Some(model.path().display().to_string()),
        resolution: Some(16),
        random_crop: Some(true),
        flip: Some(true),
        format: Some(AdapterFormat::Peft),
        // 2 epochs of 9 samples in steps of 3 × 3 samples: 2 steps.
        steps: None,
        epochs: Some(2),
        batch_size: Some(3),
        grad_accum: Some(3),
        sample_every: Some(2),
        sample_prompt: Some(vec![
            "a blue square --D 7 --s 3 --n red".into(),
            "a green triangle".into(),
        ]),
        sample_steps: Some(2),
        ..args("sd1-tiny", &train_data(), out.path())
    }
    .resolve()?;
    let summary = lora_train::train(config, &mut quiet(), &mut |_| {})?;
    assert_eq!(summary.final_step, 2);
    let file = AdapterFile::read(&summary.output, &Device::Cpu)?;
    assert_eq!(file.format(), lora_core::AdapterFormat::Peft);
    assert!(!file.raw_modules().is_empty());
    // kohya's per-prompt options: the first prompt's seed, steps and negative prompt; the second
    // takes --seed + 1 and --sample-steps.
    for (i, (prompt, seed, steps)) in [("a blue square", "7", "3"), ("a green triangle", "1", "2")]
        .into_iter()
        .enumerate()
    {
        let png = out.path().join(format!("adapter-step000002-sample{i}.png"));
        let (img, text) = lora_infer::output::read_png(&png)?;
        assert_eq!((img.width, img.height), (16, 16), "{}", png.display());
        assert_eq!(text["step"], "2");
        assert_eq!(
            (
                text["prompt"].as_str(),
                text["seed"].as_str(),
                text["steps"].as_str()
            ),
            (prompt, seed, steps)
        );
    }
    let (_, first) =
        lora_infer::output::read_png(&out.path().join("adapter-step000002-sample0.png"))?;
    assert_eq!(first["negative_prompt"], "red");
    // The step's grid: both pictures, enlarged to 256 pixels, with their labels.
    let (grid, _) =
        lora_infer::output::read_png(&out.path().join("adapter-step000002-samples.png"))?;
    assert!(
        grid.width > 256 && grid.height > 2 * 256,
        "{}×{}",
        grid.width,
        grid.height
    );

    let bad = TrainArgs {
        sample_every: Some(2),
        sample_prompt: Some(vec![
            "a cat --w 512".into(),
            "a dog --q 1".into(),
            "a fox --ss euler".into(),
        ]),
        ..args("sd1-tiny", &train_data(), out.path())
    };
    let err = format!("{:#}", bad.resolve().unwrap_err());
    assert!(
        err.contains("training resolution")
            && err.contains("option --q is not supported")
            && err.contains("option --ss is not supported"),
        "{err}"
    );
    Ok(())
}

/// The recipe of `tests/fixtures/train-check/recipe.toml` reproduces the adapter that
/// `tests/reference/check_trained.py` loaded into diffusers and found to lower diffusers'
/// denoising loss (its verdict and the file's sha256 are in train-check.json). Training is
/// bit-exact run to run on one build, but a change of float rounding in lora-core's kernels is
/// amplified over 30 AdamW steps (~1e-4 seen), so the tensors are compared to 1e-3 — far below
/// the ~0.1 the weights move in training — and the test says whether they were identical. The
/// header has a date, so tensors are compared, not bytes. After a numerics change, retrain and
/// rerun the check (commands in check_trained.py) to get back to bit-exact.
#[test]
fn reference_recipe_reproduces_the_checked_adapter() -> Result<()> {
    use sha2::{Digest, Sha256};
    let check_dir = common::fixtures().join("train-check");
    let verdict: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        check_dir.join("train-check.json"),
    )?)?;
    let checked = check_dir.join("adapter.safetensors");
    let sha = format!("{:x}", Sha256::digest(std::fs::read(&checked)?));
    assert_eq!(
        verdict["adapter_sha256"],
        sha.as_str(),
        "train-check.json is not about this adapter file"
    );
    let (without, with) = (
        verdict["loss_without_adapter"].as_f64().unwrap(),
        verdict["loss_with_adapter"].as_f64().unwrap(),
    );
    assert!(
        with < without,
        "the reference check did not pass: {with} vs {without}"
    );

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let recipe = TrainArgs::from_toml_file(&check_dir.join("recipe.toml"))?;
    let out = tempfile::tempdir()?;
    let config = TrainArgs {
        base: recipe
            .base
            .as_ref()
            .map(|b| root.join(b).display().to_string()),
        data: recipe.data.as_ref().map(|d| root.join(d)),
        output: Some(out.path().join("adapter.safetensors")),
        ..recipe
    }
    .resolve()?;
    let summary = lora_train::train(config, &mut quiet(), &mut |_| {})?;
    let (ours, theirs) = (tensors(&summary.output), tensors(&checked));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    assert!(!ours.is_empty(), "the retrained adapter has no tensors");
    let worst = ours
        .iter()
        .map(|(k, t)| common::max_abs_diff(t, &theirs[k]))
        .fold(0f32, f32::max);
    eprintln!("retrained adapter vs the checked one: max abs difference {worst:e}");
    assert!(worst <= 1e-3, "retrained adapter differs by {worst}");
    Ok(())
}

/// With --buckets a wide image trains at a wide bucket of about the same area, and no batch mixes
/// buckets.
#[test]
fn buckets_group_batches_by_aspect_ratio() -> Result<()> {
    let data = tempfile::tempdir()?;
    for f in [
        "red_circle.png",
        "red_circle.txt",
        "blue_square.png",
        "blue_square.txt",
    ] {
        std::fs::copy(train_data().join(f), data.path().join(f))?;
    }
    // A 64×32 image: white on the left, red on the right.
    let pixels = (0..32)
        .flat_map(|_| {
            (0..64).flat_map(|x| {
                if x < 32 {
                    [255, 255, 255]
                } else {
                    [220, 30, 30]
                }
            })
        })
        .collect();
    let wide = lora_infer::output::Image8 {
        width: 64,
        height: 32,
        channels: 3,
        pixels,
    };
    lora_infer::output::write_png(&data.path().join("wide.png"), &wide, &BTreeMap::new())?;
    std::fs::write(data.path().join("wide.txt"), "a wide red and white banner")?;

    let out = tempfile::tempdir()?;
    let config = TrainArgs {
        buckets: Some(true),
        batch_size: Some(2),
        steps: Some(3),
        ..args("sd1-tiny", data.path(), out.path())
    }
    .resolve()?;
    let mut trainer = Trainer::new(config, &mut quiet())?;
    let wide = trainer
        .dataset()
        .items
        .iter()
        .position(|i| i.image.name() == "wide.png")
        .unwrap();
    // Granularity: VAE factor 2 × 2² UNet levels = 8; area ≤ 32².
    assert_eq!(trainer.item_size(wide), (40, 24));
    let square = if wide == 0 { 1 } else { 0 };
    assert_eq!(trainer.item_size(square), (32, 32));
    for k in 0..8 {
        let items = trainer.micro_batch_items(k);
        let size = trainer.item_size(items[0]);
        assert!(
            items.iter().all(|&i| trainer.item_size(i) == size),
            "batch {k}: {items:?}"
        );
    }
    let summary = trainer.run(&mut |_| {})?;
    assert_eq!(summary.final_step, 3);
    let meta = AdapterFile::read(&summary.output, &Device::Cpu)?
        .metadata()
        .clone();
    assert_eq!(meta["ss_enable_bucket"], "True");
    Ok(())
}

/// An output that is one of the run's inputs (here the checkpoint it resumes from) is refused
/// before any work, and the input is left as it was.
#[test]
fn an_input_is_never_overwritten() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let checkpoint = dir.path().join("run.safetensors");
    std::fs::write(&checkpoint, b"not really a checkpoint")?;
    let config = TrainArgs {
        output: Some(checkpoint.clone()),
        resume: Some(checkpoint.clone()),
        ..args("sd1-tiny", &train_data(), dir.path())
    }
    .resolve()?;
    let err = match Trainer::new(config, &mut quiet()) {
        Ok(_) => panic!("training over its own checkpoint was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("is --resume") && err.contains("never overwritten"),
        "{err}"
    );
    assert_eq!(std::fs::read(&checkpoint)?, b"not really a checkpoint");
    Ok(())
}

/// `--resume latest` continues from the newest checkpoint beside --output that reads whole
/// (a damaged newer file is passed over), removes the temporaries a killed run left, and starts
/// afresh where there is no checkpoint yet.
#[test]
fn resume_latest_takes_the_newest_whole_checkpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = |steps: usize, resume: Option<&str>| -> Result<(Option<usize>, usize)> {
        let config = TrainArgs {
            steps: Some(steps),
            save_every: Some(2),
            resume: resume.map(PathBuf::from),
            ..args("sd1-tiny", &train_data(), dir.path())
        }
        .resolve()?;
        let mut resumed_at = None;
        let mut trainer = Trainer::new(config, &mut |event| {
            if let lora_train::Preparation::Resumed { step, .. } = event {
                resumed_at = Some(step);
            }
        })?;
        let summary = trainer.run(&mut |_| {})?;
        Ok((resumed_at, summary.final_step))
    };
    // No checkpoint yet: a fresh start.
    assert_eq!(run(4, Some("latest"))?, (None, 4));
    let out = dir.path().join("adapter.safetensors");
    assert!(checkpoint_paths(&out, 4).0.exists());

    // As a killed run leaves things: a newer checkpoint name holding a cut file (a copy that
    // did not go through the atomic write) and a temporary file of a process that is gone.
    std::fs::write(checkpoint_paths(&out, 6).0, b"cut short")?;
    let stale = dir
        .path()
        .join(".adapter-step000008.ckpt.safetensors.tmp-4000000000-0");
    std::fs::write(&stale, b"partial")?;
    assert_eq!(
        lora_train::latest_checkpoint(&out)?,
        Some(checkpoint_paths(&out, 4).0)
    );

    assert_eq!(run(8, Some("latest"))?, (Some(4), 8));
    assert!(!stale.exists(), "the stale temporary file was left");
    Ok(())
}

/// `--keep-checkpoints 1` leaves only the newest checkpoint and its adapter beside the output.
#[test]
fn keep_checkpoints_deletes_older_ones() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = TrainArgs {
        steps: Some(6),
        save_every: Some(2),
        keep_checkpoints: Some(1),
        ..args("sd1-tiny", &train_data(), dir.path())
    }
    .resolve()?;
    lora_train::train(config, &mut quiet(), &mut |_| {})?;
    let out = dir.path().join("adapter.safetensors");
    for step in [2, 4] {
        let (checkpoint, adapter) = checkpoint_paths(&out, step);
        assert!(
            !checkpoint.exists() && !adapter.exists(),
            "step {step} kept"
        );
    }
    let (checkpoint, adapter) = checkpoint_paths(&out, 6);
    assert!(checkpoint.exists() && adapter.exists() && out.exists());

    let without_saves = TrainArgs {
        keep_checkpoints: Some(2),
        ..args("sd1-tiny", &train_data(), dir.path())
    };
    let err = format!("{:#}", without_saves.resolve().unwrap_err());
    assert!(err.contains("--keep-checkpoints"), "{err}");
    Ok(())
}

/// A fresh run never silently replaces an earlier one: an existing adapter, or checkpoints of an
/// earlier run beside --output, are refused before any work, naming what to pass. `--overwrite`
/// starts over, deleting the earlier run's checkpoints (so a later `--resume latest` cannot pick
/// one up); `--resume` continues over the run's own files.
#[test]
fn an_earlier_run_is_replaced_only_with_overwrite() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let recipe = |steps: usize| TrainArgs {
        steps: Some(steps),
        save_every: Some(2),
        ..args("sd1-tiny", &train_data(), dir.path())
    };
    lora_train::train(recipe(4).resolve()?, &mut quiet(), &mut |_| {})?;
    let out = dir.path().join("adapter.safetensors");
    let adapter_before = std::fs::read(&out)?;

    let refused = Trainer::new(recipe(2).resolve()?, &mut quiet())
        .err()
        .expect("an existing adapter must be refused");
    let msg = format!("{refused:#}");
    assert!(
        msg.contains("already exists") && msg.contains("--overwrite"),
        "{msg}"
    );
    assert_eq!(std::fs::read(&out)?, adapter_before, "the refusal wrote");

    // Only the checkpoints are left (as after a run killed before its end).
    std::fs::remove_file(&out)?;
    std::fs::remove_file(dir.path().join("adapter.safetensors.metrics.jsonl"))?;
    let refused = Trainer::new(recipe(2).resolve()?, &mut quiet())
        .err()
        .expect("an earlier run's checkpoints must be refused");
    let msg = format!("{refused:#}");
    assert!(
        msg.contains("step-4 checkpoint") && msg.contains("--resume latest"),
        "{msg}"
    );

    let over = TrainArgs {
        overwrite: Some(true),
        ..recipe(2)
    };
    lora_train::train(over.resolve()?, &mut quiet(), &mut |_| {})?;
    assert!(
        !checkpoint_paths(&out, 4).0.exists(),
        "the old step-4 checkpoint is left"
    );
    assert!(checkpoint_paths(&out, 2).0.exists());

    // Continuing the run over its own files needs no --overwrite.
    let resumed = TrainArgs {
        resume: Some(PathBuf::from("latest")),
        ..recipe(4)
    };
    let summary = lora_train::train(resumed.resolve()?, &mut quiet(), &mut |_| {})?;
    assert_eq!((summary.steps_run, summary.final_step), (2, 4));
    Ok(())
}

/// `--ema-decay`: the average is written beside the adapter (`NAME-ema.safetensors`, with
/// `ss_ema_decay`), differs from the trained weights, and a resumed run continues it bit for bit.
#[test]
fn the_ema_adapter_is_written_and_resumes_exactly() -> Result<()> {
    let recipe = |out: &Path, resume: Option<PathBuf>| TrainArgs {
        steps: Some(4),
        save_every: Some(2),
        ema_decay: Some(0.9),
        seed: Some(5),
        resume,
        ..args("sd1-tiny", &train_data(), out)
    };
    let (straight, resumed) = straight_then_resumed(&recipe)?;
    let out = straight.path().join("adapter.safetensors");
    let ema = straight.path().join("adapter-ema.safetensors");
    let file = AdapterFile::read(&ema, &Device::Cpu)?;
    assert_eq!(file.metadata()["ss_ema_decay"], "0.9");
    let (trained, averaged) = (tensors(&out), tensors(&ema));
    assert_eq!(trained.len(), averaged.len());
    let moved = trained
        .iter()
        .filter(|(k, _)| k.contains("lora_up"))
        .map(|(k, t)| common::max_abs_diff(t, &averaged[k]))
        .fold(0f32, f32::max);
    assert!(moved > 0.0, "the average equals the trained weights");

    let (ckpt2, _) = checkpoint_paths(&out, 2);
    assert!(tensors(&ckpt2).keys().any(|k| k.starts_with("ema.")));
    // Without --ema-decay the recipe differs, and the error says so.
    let elsewhere = tempfile::tempdir()?;
    let without = TrainArgs {
        ema_decay: None,
        ..recipe(elsewhere.path(), Some(ckpt2.clone()))
    };
    let err = Trainer::new(without.resolve()?, &mut quiet())
        .err()
        .expect("a dropped --ema-decay must not resume");
    assert!(
        format!("{err:#}").contains("ema-decay: checkpoint 0.9, now not set"),
        "{err:#}"
    );
    assert_same_tensors(
        &averaged,
        &tensors(&resumed.path().join("adapter-ema.safetensors")),
    );
    // A second fresh run does not replace the average without --overwrite.
    let Err(err) = lora_train::train(
        recipe(straight.path(), None).resolve()?,
        &mut quiet(),
        &mut |_| {},
    ) else {
        panic!("a second run replaced the outputs without --overwrite");
    };
    assert!(format!("{err:#}").contains("--overwrite"), "{err:#}");
    Ok(())
}

/// The `val_loss` rows of a metrics file, as (step, loss).
fn val_losses(metrics: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|row| row.get("val_loss").is_some())
        .map(|row| {
            (
                row["step"].as_u64().unwrap(),
                row["val_loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Validation: scored before the first step and every N; at fixed noise, so the same images score
/// the same under another --seed while the adapter is still zero; validating changes no step of
/// the run; and validating on the training images, the loss falls as the adapter learns them.
#[test]
fn validation_loss_is_logged_fixed_and_falls_on_the_training_images() -> Result<()> {
    let run = |seed: u64, steps: usize, validation: bool| -> Result<(PathBuf, tempfile::TempDir)> {
        let dir = tempfile::tempdir()?;
        let config = TrainArgs {
            steps: Some(steps),
            lr: Some(2e-2),
            targets: Some(LoraTargets::Attn2),
            seed: Some(seed),
            validation_data: validation.then(train_data),
            validate_every: validation.then_some(5),
            ..args("sd1-tiny", &train_data(), dir.path())
        };
        lora_train::train(config.resolve()?, &mut quiet(), &mut |_| {})?;
        Ok((dir.path().join("adapter.safetensors"), dir))
    };
    let (out, dir) = run(0, 20, true)?;
    let losses = val_losses(&dir.path().join("adapter.safetensors.metrics.jsonl"));
    let steps: Vec<u64> = losses.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [0, 5, 10, 15, 20]);
    assert!(
        losses.iter().all(|(_, l)| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    let (first, last) = (losses[0].1, losses[4].1);
    eprintln!("validation loss on the training images: {first} → {last}");
    assert!(last < first, "the validation loss did not fall: {losses:?}");

    // Validating draws nothing from the training generator: the same adapter without it.
    let (plain, _plain_dir) = run(0, 20, false)?;
    assert_same_tensors(&tensors(&out), &tensors(&plain));

    // Fixed noise: another seed, the same step-0 score (the adapter's `up` starts at zero).
    let (_, other) = run(9, 5, true)?;
    let other_losses = val_losses(&other.path().join("adapter.safetensors.metrics.jsonl"));
    assert_eq!(other_losses[0], losses[0]);
    Ok(())
}

#[test]
fn a_validation_split_holds_images_out_and_bad_validation_options_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = TrainArgs {
        steps: Some(2),
        validation_split: Some(0.4),
        validate_every: Some(1),
        ..args("sd1-tiny", &train_data(), dir.path())
    };
    let summary = lora_train::train(config.resolve()?, &mut quiet(), &mut |_| {})?;
    let metrics = dir.path().join("adapter.safetensors.metrics.jsonl");
    assert_eq!(
        val_losses(&metrics)
            .iter()
            .map(|(s, _)| *s)
            .collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert!(summary.first_val_loss.is_some() && summary.last_val_loss.is_some());
    let file = AdapterFile::read(&summary.output, &Device::Cpu)?;
    // Five images, 40 % held out: fewer samples train than the whole dataset has.
    let whole = lora_train::dataset::Dataset::scan(&train_data(), &Default::default())?;
    assert_eq!(whole.items.len(), 5);
    let trained: usize = file.metadata()["ss_num_train_images"].parse()?;
    assert!(
        trained > 0 && trained < whole.samples_per_epoch(),
        "{trained} of {}",
        whole.samples_per_epoch()
    );

    for (bad, expected) in [
        (
            TrainArgs {
                validation_split: Some(1.5),
                ..args("sd1-tiny", &train_data(), dir.path())
            },
            "--validation-split = 1.5",
        ),
        (
            TrainArgs {
                validate_every: Some(3),
                ..args("sd1-tiny", &train_data(), dir.path())
            },
            "--validate-every needs validation images",
        ),
        (
            TrainArgs {
                validation_split: Some(0.5),
                validation_data: Some(train_data()),
                ..args("sd1-tiny", &train_data(), dir.path())
            },
            "choose one",
        ),
    ] {
        let err = format!("{:#}", bad.resolve().unwrap_err());
        assert!(err.contains(expected), "{err}");
    }
    Ok(())
}

/// A mask for every image of `data` (by file name), all of `value`, into a new folder of `dir`.
fn uniform_masks(data: &Path, dir: &Path, value: u8) -> PathBuf {
    let masks = dir.join(format!("masks-{value}"));
    std::fs::create_dir_all(&masks).unwrap();
    let mut stack = vec![data.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in std::fs::read_dir(folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "png") {
                let (w, h) = image::image_dimensions(&path).unwrap();
                image::GrayImage::from_pixel(w, h, image::Luma([value]))
                    .save(masks.join(path.file_name().unwrap()))
                    .unwrap();
            }
        }
    }
    masks
}

/// `--masks`: an all-white mask trains exactly as no mask; an all-black one leaves nothing to
/// learn (the `up` matrices stay zero); a mask of another size or a missing one is refused by
/// name before any work.
#[test]
fn masked_loss_weights_the_error_by_the_mask() -> Result<()> {
    let work = tempfile::tempdir()?;
    let run = |masks: Option<PathBuf>, out: &Path| -> Result<PathBuf> {
        let config = TrainArgs {
            steps: Some(3),
            flip: Some(true),
            masks,
            ..args("sd1-tiny", &train_data(), out)
        };
        Ok(lora_train::train(config.resolve()?, &mut quiet(), &mut |_| {})?.output)
    };
    let (a, b, c) = (
        tempfile::tempdir()?,
        tempfile::tempdir()?,
        tempfile::tempdir()?,
    );
    let plain = tensors(&run(None, a.path())?);
    let white = tensors(&run(
        Some(uniform_masks(&train_data(), work.path(), 255)),
        b.path(),
    )?);
    assert_same_tensors(&plain, &white);
    let black = tensors(&run(
        Some(uniform_masks(&train_data(), work.path(), 0)),
        c.path(),
    )?);
    let ups: Vec<_> = black
        .iter()
        .filter(|(k, _)| k.contains("lora_up"))
        .collect();
    assert!(!ups.is_empty());
    for (key, t) in ups {
        let largest = t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert_eq!(largest, 0.0, "{key} learned from a fully masked loss");
    }

    // A mask of another size, and an image without one.
    let wrong = uniform_masks(&train_data(), work.path(), 128);
    image::GrayImage::new(5, 7).save(wrong.join("red_circle.png"))?;
    std::fs::remove_file(wrong.join("blue_square.png"))?;
    let d = tempfile::tempdir()?;
    let err = format!("{:#}", run(Some(wrong), d.path()).unwrap_err());
    assert!(err.contains("blue_square"), "{err}");
    let wrong = uniform_masks(&train_data(), work.path(), 64);
    image::GrayImage::new(5, 7).save(wrong.join("red_circle.png"))?;
    let err = format!("{:#}", run(Some(wrong), d.path()).unwrap_err());
    assert!(err.contains("red_circle.png is 5×7 pixels"), "{err}");
    let err = format!(
        "{:#}",
        TrainArgs {
            masks: Some(work.path().to_path_buf()),
            random_crop: Some(true),
            ..args("sd1-tiny", &train_data(), d.path())
        }
        .resolve()
        .unwrap_err()
    );
    assert!(
        err.contains("--masks works with centre crops only"),
        "{err}"
    );
    Ok(())
}

/// The adapter's text-encoder part of a written kohya file: `lora_te_…` tensors by name.
fn text_encoder_tensors(path: &Path) -> BTreeMap<String, Tensor> {
    tensors(path)
        .into_iter()
        .filter(|(k, _)| k.starts_with("lora_te_"))
        .collect()
}

fn max_abs_of(t: &Tensor) -> f32 {
    common::max_abs(t)
}

/// `--train-text-encoder`: the written file has a kohya `lora_te_` pair for every projection
/// and MLP layer of the text encoder (2 layers × 6 here), which resolves against the encoder's
/// modules; the encoder's `up` matrices moved from zero, and the metadata says so as kohya does.
/// With `--text-encoder-lr 0` the text encoder's adapter stays exactly as initialised (up = 0),
/// so the UNet's adapter equals a UNet-only run's (the encoder run each step with a zero update
/// instead of its cached output: float rounding only). Gradient checkpointing continues the
/// backward pass into the encoder: the same adapter, encoder part included. A resumed run is
/// bit-exact.
#[test]
fn the_text_encoder_trains_with_its_own_learning_rate() -> Result<()> {
    // Caption dropout: the empty caption goes through the trained encoder too.
    let run = |extra: TrainArgs, out: &Path| -> Result<PathBuf> {
        let config = args("sd1-tiny", &train_data(), out)
            .overlay(TrainArgs {
                caption_dropout: Some(0.3),
                ..extra
            })
            .resolve()?;
        Ok(lora_train::train(config, &mut quiet(), &mut |_| {})?.output)
    };
    let with_te = |te_lr: Option<f64>, checkpointing: bool| TrainArgs {
        train_text_encoder: Some(true),
        text_encoder_lr: te_lr.map(|lr| vec![lr]),
        gradient_checkpointing: Some(checkpointing),
        ..Default::default()
    };

    let dir = tempfile::tempdir()?;
    let trained = run(with_te(Some(5e-3), false), dir.path())?;
    let file = AdapterFile::read(&trained, &Device::Cpu)?;
    let meta = file.metadata();
    assert_eq!(meta["ss_network_train_unet_only"], "False");
    assert_eq!(meta["ss_text_encoder_lr"], "0.005");
    assert_eq!(meta["ss_unet_lr"], "0.01");
    let te = text_encoder_tensors(&trained);
    // down, up and alpha per module.
    assert_eq!(te.len(), 3 * 12, "{:?}", te.keys().collect::<Vec<_>>());
    for layer in 0..2 {
        for module in [
            "self_attn_q_proj",
            "self_attn_out_proj",
            "mlp_fc1",
            "mlp_fc2",
        ] {
            let key = format!("lora_te_text_model_encoder_layers_{layer}_{module}.lora_up.weight");
            let up = te.get(&key).unwrap_or_else(|| panic!("{key} missing"));
            assert!(max_abs_of(up) > 1e-4, "{key} did not train");
        }
    }
    let folder = lora_core::source::ModelFolder::open(&common::fixtures().join("sd1-tiny"))?;
    let te_modules = lora_core::models::text_encoder::lora_modules(&folder.text_encoder_config()?);
    let unet_config = folder.unet_config()?;
    let unet_modules = lora_core::UNet2DConditionModel::adapter_modules_of(&unet_config)?;
    let adapter = file.resolve(&lora_core::ModelModules {
        unet: &unet_modules,
        text_encoder: Some(&te_modules),
        text_encoder_2: None,
    })?;
    assert_eq!(adapter.text_encoder.len(), 12);

    // A frozen text encoder through the trained path: the UNet-only run's adapter.
    let frozen_te = tempfile::tempdir()?;
    let frozen = run(with_te(Some(0.0), false), frozen_te.path())?;
    let unet_only_dir = tempfile::tempdir()?;
    let unet_only = run(TrainArgs::default(), unet_only_dir.path())?;
    for (key, up) in text_encoder_tensors(&frozen) {
        if key.ends_with("lora_up.weight") {
            assert_eq!(max_abs_of(&up), 0.0, "{key} moved with --text-encoder-lr 0");
        }
    }
    let unet_part = |path: &Path| -> BTreeMap<String, Tensor> {
        tensors(path)
            .into_iter()
            .filter(|(k, _)| k.starts_with("lora_unet_"))
            .collect()
    };
    let (a, b) = (unet_part(&frozen), unet_part(&unet_only));
    assert!(!a.is_empty() && a.len() == b.len());
    let worst = a
        .iter()
        .map(|(k, t)| common::max_abs_diff(t, &b[k]))
        .fold(0f32, f32::max);
    eprintln!("--text-encoder-lr 0 vs UNet only: UNet adapters differ by {worst:e}");
    assert!(worst <= 1e-4, "UNet adapters differ by {worst}");

    // Gradient checkpointing: the same adapter, the text encoder's part included.
    let checkpointed_dir = tempfile::tempdir()?;
    let checkpointed = run(with_te(Some(5e-3), true), checkpointed_dir.path())?;
    let (a, b) = (tensors(&trained), tensors(&checkpointed));
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .map(|(k, t)| common::max_abs_diff(t, &b[k]))
        .fold(0f32, f32::max);
    eprintln!("with and without checkpointing: adapters differ by {worst:e}");
    assert!(
        worst <= 1e-4,
        "checkpointing changed the adapter by {worst}"
    );

    // Resume: bit-exact, text encoder state included.
    let recipe = |out: &Path, resume: Option<PathBuf>| TrainArgs {
        train_text_encoder: Some(true),
        text_encoder_lr: Some(vec![5e-3]),
        save_every: Some(2),
        caption_dropout: Some(0.3),
        resume,
        ..args("sd1-tiny", &train_data(), out)
    };
    let (straight, resumed) = straight_then_resumed(&recipe)?;
    let out = straight.path().join("adapter.safetensors");
    let out_r = resumed.path().join("adapter.safetensors");
    assert_same_tensors(
        &tensors(&checkpoint_paths(&out, 4).0),
        &tensors(&checkpoint_paths(&out_r, 4).0),
    );
    assert_same_tensors(&tensors(&out), &tensors(&out_r));
    // A UNet-only run cannot resume it.
    let elsewhere = tempfile::tempdir()?;
    let unet_only = TrainArgs {
        train_text_encoder: None,
        text_encoder_lr: None,
        ..recipe(elsewhere.path(), Some(checkpoint_paths(&out, 2).0))
    };
    let err = Trainer::new(unet_only.resolve()?, &mut quiet())
        .err()
        .expect("a UNet-only run must not resume a text-encoder run");
    assert!(format!("{err:#}").contains("train-text-encoder"), "{err:#}");
    // Two learning rates are for SDXL's two encoders; this model has one.
    let two_rates = TrainArgs {
        text_encoder_lr: Some(vec![5e-3, 1e-3]),
        ..recipe(elsewhere.path(), None)
    };
    let err = Trainer::new(two_rates.resolve()?, &mut quiet())
        .err()
        .expect("two text-encoder learning rates on SD 1.5 must be refused");
    assert!(
        format!("{err:#}").contains("two --text-encoder-lr values are for SDXL"),
        "{err:#}"
    );
    Ok(())
}

#[test]
fn text_encoder_options_are_checked() {
    assert_refused([
        (
            TrainArgs {
                text_encoder_lr: Some(vec![1e-4]),
                ..Default::default()
            },
            "--text-encoder-lr given without --train-text-encoder",
        ),
        (
            TrainArgs {
                train_text_encoder: Some(true),
                text_encoder_lr: Some(vec![-1.0]),
                ..Default::default()
            },
            "--text-encoder-lr = -1: expected a number ≥ 0",
        ),
        (
            TrainArgs {
                train_text_encoder: Some(true),
                text_encoder_lr: Some(vec![1e-4, 2e-4, 3e-4]),
                ..Default::default()
            },
            "--text-encoder-lr takes one value, or two for SDXL's two text encoders, not 3",
        ),
        (
            TrainArgs {
                train_text_encoder: Some(true),
                text_encoder_lr: Some(vec![0.5]),
                optimizer: Some(lora_train::optimizer::OptimizerKind::Prodigy),
                ..Default::default()
            },
            "prodigy estimates one step size",
        ),
    ]);
}

/// A kohya `reg` folder of class images: `1_shape/` with the training images and no captions,
/// so each is captioned "shape" by its folder name.
fn class_folder(dir: &Path) -> PathBuf {
    let class = dir.join("reg");
    let folder = class.join("1_shape");
    std::fs::create_dir_all(&folder).unwrap();
    for name in ["blue_square.png", "red_circle.png", "yellow_circle.png"] {
        std::fs::copy(train_data().join(name), folder.join(name)).unwrap();
    }
    class
}

/// `--class-data` (prior preservation) from a kohya `reg` folder: the class samples are in the
/// loss with `--prior-loss-weight` (a weight of 0 makes their images irrelevant: two different
/// class folders give the same adapter, bit for bit; weight 1 another adapter), the metadata
/// counts them as kohya does, and a resumed run is bit-exact. Options that cannot work together
/// are refused.
#[test]
fn class_images_add_the_prior_preservation_loss() -> Result<()> {
    let classes = tempfile::tempdir()?;
    let reg = class_folder(classes.path());
    // The same layout with other pictures (mirrored copies of the training images).
    let other = classes.path().join("other");
    std::fs::create_dir_all(other.join("1_shape"))?;
    for name in ["blue_square.png", "red_circle.png", "yellow_circle.png"] {
        image::open(train_data().join(name))?
            .fliph()
            .rotate90()
            .save(other.join("1_shape").join(name))?;
    }
    let outputs = tempfile::tempdir()?;
    let run = |class: &Path, weight: Option<f64>, name: &str| -> Result<PathBuf> {
        let out = outputs.path().join(name);
        std::fs::create_dir(&out)?;
        let config = TrainArgs {
            class_data: Some(class.to_path_buf()),
            prior_loss_weight: weight,
            batch_size: Some(2),
            flip: Some(true),
            ..args("sd1-tiny", &train_data(), &out)
        }
        .resolve()?;
        Ok(lora_train::train(config, &mut quiet(), &mut |_| {})?.output)
    };
    let zero_reg = tensors(&run(&reg, Some(0.0), "zero-reg")?);
    let zero_other = tensors(&run(&other, Some(0.0), "zero-other")?);
    assert_same_tensors(&zero_reg, &zero_other);
    let weighted = run(&reg, None, "weighted")?;
    let meta = AdapterFile::read(&weighted, &Device::Cpu)?
        .metadata()
        .clone();
    assert_eq!(meta["ss_num_reg_images"], "3");
    assert_eq!(meta["ss_prior_loss_weight"], "1.0");
    let weighted = tensors(&weighted);
    let moved = weighted
        .iter()
        .map(|(k, t)| common::max_abs_diff(t, &zero_reg[k]))
        .fold(0f32, f32::max);
    assert!(moved > 1e-4, "the class loss changed nothing ({moved})");

    let recipe = |out: &Path, resume: Option<PathBuf>| TrainArgs {
        class_data: Some(reg.clone()),
        prior_loss_weight: Some(0.5),
        save_every: Some(2),
        flip: Some(true),
        resume,
        ..args("sd1-tiny", &train_data(), out)
    };
    let (straight, resumed) = straight_then_resumed(&recipe)?;
    let (a, b) = (
        straight.path().join("adapter.safetensors"),
        resumed.path().join("adapter.safetensors"),
    );
    assert_same_tensors(&tensors(&a), &tensors(&b));

    let dir = tempfile::tempdir()?;
    assert_refused([
        (
            TrainArgs {
                prior_loss_weight: Some(1.0),
                ..Default::default()
            },
            "--prior-loss-weight given without --class-data",
        ),
        (
            TrainArgs {
                class_data: Some(reg.clone()),
                buckets: Some(true),
                ..Default::default()
            },
            "--class-data with --buckets",
        ),
        (
            TrainArgs {
                class_data: Some(reg.clone()),
                prior_loss_weight: Some(f64::NAN),
                ..Default::default()
            },
            "--prior-loss-weight = NaN",
        ),
    ]);
    let missing = TrainArgs {
        class_data: Some(dir.path().join("nowhere")),
        ..args("sd1-tiny", &train_data(), dir.path())
    };
    let err = format!(
        "{:#}",
        Trainer::new(missing.resolve()?, &mut quiet())
            .err()
            .unwrap()
    );
    assert!(
        err.contains("--class-data") && err.contains("nowhere"),
        "{err}"
    );
    Ok(())
}

/// `--block-lr` and `--block-rank` (kohya's block names; sd1-tiny: in0–in5, mid, out0–out5).
/// After one AdamW step from the same start every module has moved by its own learning rate
/// only, so a block at factor ½ of --lr 1e-2 equals the run at --lr 5e-3 there and the run at
/// 1e-2 elsewhere; a block at 0 has no adapter; a block's rank shapes its modules. Names outside
/// the UNet and bad values are refused.
#[test]
fn block_learning_rates_and_ranks_apply_per_block() -> Result<()> {
    let outputs = tempfile::tempdir()?;
    let run = |name: &str, extra: TrainArgs| -> Result<BTreeMap<String, Tensor>> {
        let out = outputs.path().join(name);
        std::fs::create_dir(&out)?;
        let config = args("sd1-tiny", &train_data(), &out)
            .overlay(TrainArgs {
                steps: Some(1),
                ..extra
            })
            .resolve()?;
        Ok(tensors(
            &lora_train::train(config, &mut quiet(), &mut |_| {})?.output,
        ))
    };
    let halved_mid = run(
        "halved-mid",
        TrainArgs {
            block_lr: Some(vec!["mid=0.5".into()]),
            ..Default::default()
        },
    )?;
    let full = run("full", TrainArgs::default())?;
    let half = run(
        "half",
        TrainArgs {
            lr: Some(5e-3),
            ..Default::default()
        },
    )?;
    assert_eq!(halved_mid.len(), full.len());
    let (mut mid, mut other) = (0, 0);
    for (key, t) in &halved_mid {
        let reference = match key.starts_with("lora_unet_mid_block_") {
            true => {
                mid += 1;
                &half[key]
            }
            false => {
                other += 1;
                &full[key]
            }
        };
        let diff = common::max_abs_diff(t, reference);
        assert!(diff <= 1e-7, "{key}: {diff}");
    }
    assert!(mid > 0 && other > 0, "mid {mid}, other {other}");
    assert!(
        common::max_abs_diff(
            &full
                ["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q.lora_up.weight"],
            &half
                ["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_q.lora_up.weight"]
        ) > 1e-4
    );

    let shaped = run(
        "shaped",
        TrainArgs {
            block_lr: Some(vec!["in1=0".into()]),
            block_rank: Some(vec!["out5=2".into()]),
            ..Default::default()
        },
    )?;
    assert!(
        !shaped
            .keys()
            .any(|k| k.starts_with("lora_unet_down_blocks_0_")),
        "in1 (down_blocks.0) must have no adapter"
    );
    for (key, t) in shaped
        .iter()
        .filter(|(k, _)| k.ends_with("lora_down.weight"))
    {
        let rank = if key.starts_with("lora_unet_up_blocks_2_attentions_1_") {
            2
        } else {
            4
        };
        assert_eq!(t.dims()[0], rank, "{key}");
    }

    let dir = tempfile::tempdir()?;
    let unknown = TrainArgs {
        block_lr: Some(vec!["in11=0.5".into()]),
        ..args("sd1-tiny", &train_data(), dir.path())
    };
    let err = format!(
        "{:#}",
        Trainer::new(unknown.resolve()?, &mut quiet())
            .err()
            .unwrap()
    );
    assert!(
        err.contains("`in11` not a block of this UNet") && err.contains("in0–in5"),
        "{err}"
    );
    assert_refused([
        (
            TrainArgs {
                block_lr: Some(vec!["mid=-1".into()]),
                ..Default::default()
            },
            "expected a factor ≥ 0",
        ),
        (
            TrainArgs {
                block_rank: Some(vec!["mid=0".into()]),
                ..Default::default()
            },
            "expected a rank ≥ 1",
        ),
        (
            TrainArgs {
                block_lr: Some(vec!["mid=0.5".into()]),
                optimizer: Some(lora_train::optimizer::OptimizerKind::Prodigy),
                ..Default::default()
            },
            "--block-lr with --optimizer prodigy",
        ),
    ]);
    let toml = TrainArgs::from_toml("block-lr = \"in1=0.5, mid=2\"\nblock-rank = [\"mid=8\"]\n")?;
    assert_eq!(toml.block_lr, Some(vec!["in1=0.5, mid=2".to_string()]));
    assert_eq!(toml.block_rank, Some(vec!["mid=8".to_string()]));
    Ok(())
}

/// `--conv-rank` (LoCon): every resnet and sampler 3×3 convolution gets an adapter of that rank
/// (26 in sd1-tiny) and the resnets' time_emb_proj and 1×1 shortcuts one at --rank, as kohya's
/// conv_dim does, beside the attention ones, written as kohya writes LoCon (4-D `lora_down`,
/// `conv_dim`/`conv_alpha` in `ss_network_args`), trained (every `up` moved from zero), and the
/// file runs the same attached unmerged as folded into the weights (lora-infer's two ways); a
/// resumed run is bit-exact. `--conv-alpha` without `--conv-rank` is refused.
#[test]
fn conv_adapters_train_and_load_both_ways() -> Result<()> {
    use lora_core::source::ModelFolder;
    use lora_core::{ModelModules, UNet2DConditionModel};
    let dir = tempfile::tempdir()?;
    let config = TrainArgs {
        conv_rank: Some(2),
        conv_alpha: Some(1.0),
        ..args("sd1-tiny", &train_data(), dir.path())
    }
    .resolve()?;
    let output = lora_train::train(config, &mut quiet(), &mut |_| {})?.output;
    let file = AdapterFile::read(&output, &Device::Cpu)?;
    let args_meta: serde_json::Value = serde_json::from_str(&file.metadata()["ss_network_args"])?;
    assert_eq!(
        (
            args_meta["conv_dim"].as_str(),
            args_meta["conv_alpha"].as_str()
        ),
        (Some("2"), Some("1.0"))
    );
    let written = tensors(&output);
    // kohya's conv_dim set: 3×3 convolutions at the conv rank, the resnets' time_emb_proj
    // (Linear) and conv_shortcut (1×1) at --rank.
    let ups = |suffixes: &[&str]| -> Vec<&String> {
        written
            .keys()
            .filter(|k| {
                suffixes
                    .iter()
                    .any(|s| k.ends_with(&format!("{s}.lora_up.weight")))
            })
            .collect()
    };
    let convs = ups(&["_conv1", "_conv2", "samplers_0_conv"]);
    let (time_emb, shortcuts) = (ups(&["_time_emb_proj"]), ups(&["_conv_shortcut"]));
    // diffusers' sd1-tiny UNet has 26 such 3×3 convolutions, 11 time_emb_proj and 7 shortcuts.
    assert_eq!(
        (convs.len(), time_emb.len(), shortcuts.len()),
        (26, 11, 7),
        "{convs:?}"
    );
    for key in convs.iter().chain(&time_emb).chain(&shortcuts) {
        assert!(max_abs_of(&written[*key]) > 1e-4, "{key} did not train");
        let down = written[&key.replace("lora_up", "lora_down")]
            .dims()
            .to_vec();
        let expected_rank = if convs.contains(key) { 2 } else { 4 };
        assert_eq!(down[0], expected_rank, "{key}");
        if convs.contains(key) {
            assert_eq!(down[2..], [3, 3], "{key}");
        }
    }

    let folder = ModelFolder::open(&common::fixtures().join("sd1-tiny"))?;
    let unet_config = folder.unet_config()?;
    let modules = UNet2DConditionModel::adapter_modules_of(&unet_config)?;
    let adapter = file.resolve(&ModelModules::unet_only(&modules))?;
    let mut attached = folder.load_unet(&unet_config, candle_core::DType::F32, &Device::Cpu)?;
    attached.attach_adapter("trained", &adapter.unet, 0.8)?;
    let deltas = lora_core::Adapter::weight_deltas(&adapter.unet, 0.8)?;
    let vb = folder.unet_var_builder(candle_core::DType::F32, &Device::Cpu, deltas)?;
    let folded = UNet2DConditionModel::load(&unet_config, &vb)?;
    let mut rng = lora_core::Rng::new(4);
    let sample = rng.normal_tensor((1, 4, 16, 16), &Device::Cpu)?;
    let context = rng.normal_tensor((1, 77, unet_config.cross_attention_dim), &Device::Cpu)?;
    let t = Tensor::new(&[500f32], &Device::Cpu)?;
    let (a, b) = (
        attached.forward(&sample, &t, &context)?,
        folded.forward(&sample, &t, &context)?,
    );
    let diff = common::max_abs_diff(&a, &b) / common::max_abs(&b);
    assert!(diff <= 1e-5, "attached and folded differ by {diff}");

    let recipe = |out: &Path, resume: Option<PathBuf>| TrainArgs {
        conv_rank: Some(2),
        save_every: Some(2),
        resume,
        ..args("sd1-tiny", &train_data(), out)
    };
    let (straight, resumed) = straight_then_resumed(&recipe)?;
    assert_same_tensors(
        &tensors(&straight.path().join("adapter.safetensors")),
        &tensors(&resumed.path().join("adapter.safetensors")),
    );
    let err = format!(
        "{:#}",
        TrainArgs {
            conv_alpha: Some(1.0),
            ..args("sd1-tiny", &train_data(), dir.path())
        }
        .resolve()
        .unwrap_err()
    );
    assert!(
        err.contains("--conv-alpha given without --conv-rank"),
        "{err}"
    );
    Ok(())
}

/// Every training feature at once — text-encoder LoRA with its own rate, LoCon, class images,
/// block rates and ranks, AdamW8bit, gradient checkpointing, EMA, a validation split, flips,
/// caption dropout, accumulation — trains, and a run resumed from its step-3 checkpoint ends on
/// the same adapter and moving average, bit for bit.
#[test]
fn every_feature_together_trains_and_resumes_exactly() -> Result<()> {
    let classes = tempfile::tempdir()?;
    let reg = class_folder(classes.path());
    let recipe = |out: &Path, resume: Option<PathBuf>| TrainArgs {
        steps: Some(6),
        save_every: Some(3),
        batch_size: Some(2),
        grad_accum: Some(2),
        train_text_encoder: Some(true),
        text_encoder_lr: Some(vec![5e-3]),
        conv_rank: Some(2),
        dora: Some(true),
        class_data: Some(reg.clone()),
        prior_loss_weight: Some(0.5),
        block_lr: Some(vec!["mid=0.5".into(), "in1=0".into()]),
        block_rank: Some(vec!["out5=2".into()]),
        optimizer: Some(lora_train::optimizer::OptimizerKind::AdamW8bit),
        optimizer_args: Some(vec!["min_8bit_size=64".into()]),
        gradient_checkpointing: Some(true),
        ema_decay: Some(0.9),
        validation_split: Some(0.2),
        validate_every: Some(2),
        flip: Some(true),
        caption_dropout: Some(0.2),
        resume,
        ..args("sd1-tiny", &train_data(), out)
    };
    let (straight, resumed) = straight_then_resumed_from(&recipe, 3)?;
    let out = straight.path().join("adapter.safetensors");
    let out_r = resumed.path().join("adapter.safetensors");
    let adapter = tensors(&out);
    assert!(adapter.keys().any(|k| k.starts_with("lora_te_")));
    assert!(adapter
        .keys()
        .any(|k| k.ends_with("_conv1.lora_down.weight")));
    let count = |suffix: &str| adapter.keys().filter(|k| k.ends_with(suffix)).count();
    assert_eq!(count(".dora_scale"), count(".lora_down.weight"));
    assert_same_tensors(&adapter, &tensors(&out_r));
    let ema = |dir: &Path| tensors(&dir.join("adapter-ema.safetensors"));
    assert_same_tensors(&ema(straight.path()), &ema(resumed.path()));
    Ok(())
}

/// `--dora`: every module (UNet and text encoder) learns a magnitude per output channel, which
/// starts at its base weight's norms and moves with training; the PEFT file says `use_dora`.
#[test]
fn dora_trains_a_magnitude_per_output_channel() -> Result<()> {
    let out = tempfile::tempdir()?;
    let recipe = TrainArgs {
        steps: Some(3),
        lr: Some(5e-2),
        dora: Some(true),
        train_text_encoder: Some(true),
        format: Some(AdapterFormat::Peft),
        ..args("sd1-tiny", &train_data(), out.path())
    };
    lora_train::train(recipe.resolve()?, &mut quiet(), &mut |_| {})?;
    let path = out.path().join("adapter.safetensors");
    let folder = lora_core::source::ModelFolder::open(&common::fixtures().join("sd1-tiny"))?;
    let config = folder.unet_config()?;
    let weights = [folder.unet_weights().to_path_buf()];
    let mut unet = lora_core::UNet2DConditionModel::from_files(
        &config,
        &weights,
        candle_core::DType::F32,
        &Device::Cpu,
    )?;
    let te_config = folder.text_encoder_config()?;
    let te_modules = lora_core::models::text_encoder::lora_modules(&te_config);
    let file = AdapterFile::read(&path, &Device::Cpu)?;
    let adapter = file.resolve(&lora_core::ModelModules {
        unet: unet.lora_modules(),
        text_encoder: Some(&te_modules),
        text_encoder_2: None,
    })?;
    assert!(!adapter.text_encoder.is_empty());
    let all = adapter.unet.values().chain(adapter.text_encoder.values());
    assert!(all
        .clone()
        .all(|m| m.as_lora().is_some_and(|m| m.magnitude.is_some())));
    // The UNet's magnitudes moved away from the base weights' norms, where they started.
    let base = unet.adaptable_weights()?;
    let mut moved = 0f32;
    for (path, m) in &adapter.unet {
        let norm = base[path].flatten_from(1)?.sqr()?.sum(1)?.sqrt()?;
        let magnitude = m.as_lora().unwrap().magnitude.as_ref().unwrap();
        let diff = (magnitude - &norm)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let start = norm.max_all()?.to_scalar::<f32>()?;
        assert!(diff.is_finite() && diff < start, "{path}: moved by {diff}");
        moved = moved.max(diff);
    }
    assert!(moved > 1e-4, "no magnitude moved (largest change {moved})");
    let config: serde_json::Value =
        serde_json::from_str(&file.metadata()["lora_adapter_metadata"])?;
    assert_eq!(config["unet.use_dora"], true);
    assert_eq!(config["text_encoder.use_dora"], true);
    Ok(())
}

/// `--algo loha|lokr` (LyCORIS' kohya module, `--network_args algo=…`): the modules have the
/// layout LyCORIS makes for the same settings (every key and shape of the file LyCORIS saved for
/// this UNet, `make_lycoris_grad_fixtures.py`: LoHa rank 4; LoKr rank 2, factor 2, with low-rank
/// second halves), they train (LoHa's `hada_w2_a` and LoKr's `lokr_w2_b` start at zero and
/// move), resume bit for bit, and the adapter reader takes the file back.
#[test]
fn lycoris_algorithms_train_in_lycoris_layout() -> Result<()> {
    use lora_core::adapters::AdapterAlgorithm;
    let cases = [
        (
            AdapterAlgorithm::LoHa,
            4,
            None,
            "adapter_loha_kohya",
            "hada_w2_a",
        ),
        (
            AdapterAlgorithm::LoKr,
            2,
            Some(2),
            "adapter_lokr_kohya",
            "lokr_w2_b",
        ),
    ];
    for (algo, rank, factor, reference, starts_at_zero) in cases {
        let recipe = |out: &Path, resume: Option<PathBuf>| TrainArgs {
            algo: Some(algo),
            rank: Some(rank),
            alpha: Some(8.0),
            factor,
            targets: Some(LoraTargets::AttnMlp),
            conv_rank: Some(rank),
            conv_alpha: Some(8.0),
            save_every: Some(2),
            resume,
            ..args("sd1-tiny", &train_data(), out)
        };
        let (straight, resumed) = straight_then_resumed(&recipe)?;
        let path = straight.path().join("adapter.safetensors");
        let ours = tensors(&path);
        assert_same_tensors(&ours, &tensors(&resumed.path().join("adapter.safetensors")));
        let theirs = tensors(
            &common::fixtures()
                .join("sd1-tiny")
                .join(format!("{reference}.safetensors")),
        );
        let layout = |m: &BTreeMap<String, Tensor>| -> Vec<(String, Vec<usize>)> {
            m.iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect()
        };
        assert_eq!(layout(&ours), layout(&theirs), "{algo}: keys and shapes");
        // `max_abs` fails on a NaN or infinity; no such tensor leaves `moved` at 0.
        let moved = ours
            .iter()
            .filter(|(k, _)| k.ends_with(starts_at_zero))
            .map(|(_, t)| common::max_abs(t))
            .fold(0f32, f32::max);
        assert!(moved > 0.0, "{algo}: {starts_at_zero} stayed at {moved}");
        let file = AdapterFile::read(&path, &Device::Cpu)?;
        assert_eq!(file.lycoris_modules().len(), 128, "{algo}");
        assert_eq!(file.describe_format(), format!("lycoris-{algo}"));
        assert_eq!(file.metadata()["ss_network_module"], "lycoris.kohya");
    }
    assert_refused([
        (
            TrainArgs {
                factor: Some(4),
                ..Default::default()
            },
            "--factor is LoKr's",
        ),
        (
            TrainArgs {
                algo: Some(AdapterAlgorithm::LoHa),
                dora: Some(true),
                ..Default::default()
            },
            "--dora applies to --algo lora, not loha",
        ),
        (
            TrainArgs {
                algo: Some(AdapterAlgorithm::LoKr),
                format: Some(AdapterFormat::Peft),
                ..Default::default()
            },
            "--algo lokr is written in the kohya layout",
        ),
        (
            TrainArgs {
                algo: Some(AdapterAlgorithm::LoKr),
                factor: Some(0),
                ..Default::default()
            },
            "--factor = 0",
        ),
    ]);
    Ok(())
}

/// Without --resolution, training runs at the model's own size, as diffusers' pipelines default
/// to it: the UNet's sample size times the VAE's factor (16 × 2 here; 768 for SD 2.x-v).
#[test]
fn the_default_resolution_is_the_models() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = TrainArgs {
        resolution: None,
        steps: Some(1),
        ..args("sd1-tiny", &train_data(), dir.path())
    }
    .resolve()?;
    assert!(config.resolution_from_model);
    let trainer = Trainer::new(config, &mut quiet())?;
    assert_eq!(trainer.config().resolution, 32);
    Ok(())
}
